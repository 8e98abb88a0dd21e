"""The `carlos-ray` command line: user-facing output lives here, the logic in the library.

One module per command group (`lora`: zoo, inspect; `indexing`: index; `demo`; `retrieval`: query, similar,
serve; `report`: import-reference, report), each with an `add_commands(subparsers)`; `main.COMMAND_GROUPS`
lists them. Exit codes and table printing are in `common`. Nothing outside this package imports from it.
"""

from carlos_ray.cli.common import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, UsageError
from carlos_ray.cli.main import build_parser, main

__all__ = ["EXIT_OK", "EXIT_REJECTED", "EXIT_USAGE", "UsageError", "build_parser", "main"]
