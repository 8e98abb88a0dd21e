"""`carlos-ray zoo` and `carlos-ray inspect`: LoRA files, before any model runs."""

from __future__ import annotations

import argparse
import json

from carlos_ray.cli.common import EXIT_OK, EXIT_REJECTED, UsageError, table


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.profile == "micro":
        return _micro_zoo(args)
    if args.behaviors:
        raise UsageError("--behaviors trains LoRAs on the micro world: add --profile micro")
    from carlos_ray.zoo import make_zoo

    if args.n < 8:
        raise UsageError(f"a zoo needs n >= 8 to hold every planted behavior, got n={args.n}")
    members = make_zoo(args.dir, n=args.n, seed=args.seed)
    print(table(members, ["name", "format", "role", "file"]))
    print(f"\nwrote {len(members)} LoRAs to {args.dir}")
    return EXIT_OK


def _micro_zoo(args: argparse.Namespace) -> int:
    """Train LoRAs with planted behaviours on the config's generator: the named ones, or the whole shipped zoo."""
    import tempfile
    from pathlib import Path

    from carlos_ray.config import Config
    from carlos_ray.world.zoo_spec import custom_spec, shipped_spec
    from carlos_ray.world.zoo_train import make_micro_zoo

    cfg = Config.from_file(args.config)
    try:
        if args.behaviors:
            spec = custom_spec([b for b in args.behaviors.split(",") if b.strip()], steps=args.steps or 200, seed=args.seed)
        else:
            spec = shipped_spec(**({"steps": args.steps} if args.steps else {}))
    except ValueError as e:
        raise UsageError(str(e)) from None
    generator = cfg.generator.model_dump(mode="json")
    with tempfile.TemporaryDirectory(prefix="zoo_runs_") as tmp:
        rows = make_micro_zoo(spec, args.dir, generator, args.cache or tmp, jobs=args.jobs)
    print(table([{**r, "train": f"{r['training'].get('steps', 0)} steps, {r['training'].get('seconds', 0):.0f} s"}
                 for r in rows], ["name", "role", "behaviour", "layout", "file", "train"]))
    print(f"\nwrote {len(rows)} LoRAs to {args.dir} (ground truth in {Path(args.dir) / 'zoo.json'})")
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
    z = sub.add_parser("zoo", help="write a LoRA zoo with planted behaviours (synthetic for tiny, trained for micro)")
    z.add_argument("dir")
    z.add_argument("--profile", choices=["tiny", "micro"], default="tiny",
                   help="tiny: random synthetic LoRAs for the tiny generator; micro: LoRAs trained on the micro world")
    z.add_argument("--behaviors", default=None,
                   help="micro: comma-separated behaviours to train one LoRA each for (e.g. striped,sepia,content:star); "
                        "default: the whole shipped zoo")
    z.add_argument("--config", default="conf/micro.yaml", help="micro: config whose generator the LoRAs are trained on")
    z.add_argument("--steps", type=int, default=None, help="micro: training steps per LoRA (default 200)")
    z.add_argument("--jobs", type=int, default=1, help="micro: training processes (one torch thread each)")
    z.add_argument("--cache", default=None, help="micro: keep trained runs here and reuse them (default: a temporary directory)")
    z.add_argument("--n", type=int, default=12, help="tiny: number of LoRAs (>= 8)")
    z.add_argument("--seed", type=int, default=0)
    z.set_defaults(func=cmd_zoo)

    i = sub.add_parser("inspect", help="inspect LoRA files (header only) and check them against the generator")
    i.add_argument("paths", nargs="+", help="files or directories (recursive)")
    i.add_argument("--json", action="store_true", help="one JSON object per file")
    i.add_argument("--config", default="conf/tiny.yaml", help="config whose generator the LoRAs must fit")
    i.add_argument("--no-compat", action="store_true", help="skip the compatibility check against the generator")
    i.set_defaults(func=cmd_inspect)
