"""Entry point for `ray job submit --working-dir . -- python jobs/index.py --config conf/X.yaml --loras SRC --index DIR`.

Thin: parses arguments and calls the library (carlos_ray.indexing.run_index)."""

import sys

from carlos_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
