"""`carlos-ray zoo` and `carlos-ray inspect`: LoRA files, before any model runs."""

from __future__ import annotations

import argparse
import json

from carlos_ray.cli.common import EXIT_OK, EXIT_REJECTED, UsageError, table


def cmd_zoo(args: argparse.Namespace) -> int:
    from carlos_ray.zoo import make_zoo

    if args.n < 8:
        raise UsageError(f"a zoo needs n >= 8 to hold every planted behavior, got n={args.n}")
    members = make_zoo(args.dir, n=args.n, seed=args.seed)
    print(table(members, ["name", "format", "role", "file"]))
    print(f"\nwrote {len(members)} LoRAs to {args.dir}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from carlos_ray.indexing.sources import SourceError, inspect_paths

    targets = None
    if not args.no_compat:
        from carlos_ray.config import Config
        from carlos_ray.models.generator import generator_lora_targets

        targets = generator_lora_targets(Config.from_file(args.config).generator)
    try:
        results = inspect_paths(args.paths, targets)
    except SourceError as e:
        raise UsageError(str(e)) from None
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        rows = [{**r, "ok": "yes" if r["ok"] else "NO", "sha256": (r["sha256"] or "")[:12], "reason": r["reason"] or ""}
                for r in results]
        print(table(rows, ["path", "ok", "format", "rank", "sha256", "reason"]))
        bad = sum(not r["ok"] for r in results)
        print(f"\n{len(results)} files, {len(results) - bad} usable, {bad} rejected")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_REJECTED


def add_commands(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zoo", help="write the synthetic LoRA zoo for the tiny generator")
    z.add_argument("dir")
    z.add_argument("--n", type=int, default=12, help="number of LoRAs (>= 8)")
    z.add_argument("--seed", type=int, default=0)
    z.set_defaults(func=cmd_zoo)

    i = sub.add_parser("inspect", help="inspect LoRA files (header only) and check them against the generator")
    i.add_argument("paths", nargs="+", help="files or directories (recursive)")
    i.add_argument("--json", action="store_true", help="one JSON object per file")
    i.add_argument("--config", default="conf/tiny.yaml", help="config whose generator the LoRAs must fit")
    i.add_argument("--no-compat", action="store_true", help="skip the compatibility check against the generator")
    i.set_defaults(func=cmd_inspect)
