"""`carlos-ray import-reference` and `carlos-ray report`: thin wrappers over importer.py and report.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from carlos_ray.cli.common import EXIT_OK, UsageError


def cmd_import_reference(args: argparse.Namespace) -> int:
    from carlos_ray.importer import import_reference
    from carlos_ray.reference import ReferenceFormatError
    from carlos_ray.store import IndexError_

    try:
        s = import_reference(args.path, args.index, force=args.force)
    except (ReferenceFormatError, IndexError_) as e:
        raise UsageError(str(e)) from None
    t = s["thresholds"]
    print(f"imported {s['rows']} reference signatures from {s['source']} ({s['added']} new, {s['skipped']} already there)")
    print(f"index: {s['index']}  ({s['signatures']} signatures, manifest version {s['version']}"
          f"{', replaced the previous index' if s['replaced'] else ''})")
    print(f"filter: strength <= {t['max_strength']}, consistency >= {t['min_consistency']} ({t['source']})")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from carlos_ray.report import build_report
    from carlos_ray.store import IndexError_

    try:
        path = build_report(args.index, args.out, max_grids=args.max_grids)
    except (IndexError_, ValueError) as e:
        raise UsageError(str(e)) from None
    files = sorted(p.relative_to(path.parent).as_posix() for p in Path(path.parent).rglob("*") if p.is_file())
    print(f"report: {path}  ({len(files)} files: {', '.join(files[:8])}{', ...' if len(files) > 8 else ''})")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("import-reference",
                       help="import the published CARLoS signatures (carlos==0.0.3 wheel or metrics_database.parquet)")
    r.add_argument("path", help="the carlos-0.0.3 wheel or its metrics_database.parquet")
    r.add_argument("--index", required=True, help="index directory or URI to create")
    r.add_argument("--force", action="store_true", help="replace an existing index of another configuration")
    r.set_defaults(func=cmd_import_reference)

    p = sub.add_parser("report", help="static HTML report of an index: scatter, histograms, categories, near-duplicates")
    p.add_argument("--index", required=True, help="index directory or URI")
    p.add_argument("--out", required=True, help="output directory (index.html, PNGs, CSVs)")
    p.add_argument("--max-grids", type=int, default=200, help="at most this many base-vs-LoRA image grids")
    p.set_defaults(func=cmd_report)

