"""`carlos-ray`: the parser, built from an explicit list of command groups, and `main`."""

from __future__ import annotations

import argparse
import logging
import sys

from carlos_ray.cli import demo, indexing, lora, report, retrieval
from carlos_ray.cli.common import EXIT_USAGE, UsageError

# Every command group adds its subcommands here, in this order (the order of `carlos-ray --help`).
COMMAND_GROUPS = (
    lora.add_commands,  # zoo, inspect
    indexing.add_commands,  # index
    demo.add_commands,  # demo
    retrieval.add_commands,  # query, similar, serve
    report.add_commands,  # import-reference, report
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors; keep that, with our prefix
        self.print_usage(sys.stderr)
        print(f"carlos-ray: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="carlos-ray", description="Characterize LoRAs by behavior and retrieve them from text, on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add_commands in COMMAND_GROUPS:
        add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from carlos_ray.config import ConfigError
    from carlos_ray.runtime import quiet_libraries

    quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as e:
        print(f"carlos-ray: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
