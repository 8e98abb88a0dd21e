"""`carlos-ray index`: index LoRAs into an index directory, on Ray."""

from __future__ import annotations

import argparse
from pathlib import Path

from carlos_ray.cli.common import EXIT_OK, UsageError, rejects_table, table


def cmd_index(args: argparse.Namespace) -> int:
    from carlos_ray.config import Config
    from carlos_ray.indexing import run_index

    cfg = Config.from_file(args.config)
    for src in args.loras:
        if not Path(src).exists():
            raise UsageError(f"LoRA source not found: {src}")
    from carlos_ray.uncertainty import format_estimate

    indexed: list[dict] = []
    s = run_index(cfg, args.loras, args.index, address=args.address, max_loras=args.max_loras,
                  retry_rejected=args.retry_rejected, on_lora=indexed.append)
    if indexed:
        print("\nindexed (± is a 95% interval):")
        print(table([{"name": r["name"][:40], "strength": format_estimate(r["strength"], r["strength_se"]),
                      "consistency": format_estimate(r["consistency"], r["consistency_se"]), "samples": r["n"]}
                     for r in indexed], ["name", "strength", "consistency", "samples"]))
    if s.rejects:
        print("\nrejected:")
        print(rejects_table(s.rejects, 120))
    print(f"\nindexed {s.indexed}, skipped {s.skipped} (already indexed), rejected {s.rejected}, "
          f"duplicates {s.duplicates}, images generated {s.images_generated}, wall time {s.wall_seconds:.1f} s")
    print(f"index: {args.index}")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("index", help="index LoRAs (directories, files or manifests) into an index directory, on Ray")
    x.add_argument("--config", default="conf/tiny.yaml")
    x.add_argument("--loras", nargs="+", required=True, help="directories, .safetensors files, or CSV/JSONL/Parquet manifests")
    x.add_argument("--index", required=True, help="index directory or URI")
    x.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    x.add_argument("--max-loras", type=int, default=None, help="index at most this many new LoRAs, then stop")
    x.add_argument("--retry-rejected", action="store_true",
                   help="run again the LoRAs an earlier run rejected (bad samples, failed load, worker crashes)")
    x.set_defaults(func=cmd_index)
