"""`python -m carlos_ray.cli ...` runs the same entry point as the `carlos-ray` console script."""

import sys

from carlos_ray.cli.main import main

sys.exit(main(sys.argv[1:]))
