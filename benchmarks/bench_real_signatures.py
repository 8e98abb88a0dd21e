"""What the 740 published reference signatures (carlos==0.0.3) say without a text encoder.

Prints the definitions and a table, writes JSON. The wheel is read from ~/.cache/carlos-ray (the test
suite's fixture downloads it there with `pip download`), or from --wheel.

    python benchmarks/bench_real_signatures.py [--wheel PATH] [--out bench_results/real_signatures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from carlos_ray.evaluation import real
from carlos_ray.reference import read_reference

WHEEL = Path(os.path.expanduser("~")) / ".cache" / "carlos-ray" / "carlos-0.0.3-py3-none-any.whl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheel", default=str(WHEEL), help="the carlos==0.0.3 wheel or its metrics_database.parquet")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    if not Path(args.wheel).is_file():
        print(f"no reference wheel at {args.wheel}; fetch it with: pip download --no-deps --python-version 3.9 "
              f"--only-binary=:all: carlos==0.0.3 -d {Path(args.wheel).parent}", file=sys.stderr)
        return 2
    table, _ = read_reference(args.wheel)
    f = real.real_signature_figures(table, k=args.k)
    print("Definitions:")
    print(real.__doc__.split("Definitions", 1)[1].split("\n", 1)[1].rstrip())
    print(f"\n{f['n']} reference signatures (ViT-B/32 raw features); {f['zero_directions']} zero directions")
    th = f["thresholds"]
    print(f"paper thresholds: strength <= {th['max_strength']}: {f['pass_strength']} ({f['pass_strength'] / f['n']:.1%}); "
          f"consistency >= {th['min_consistency']}: {f['pass_consistency']} ({f['pass_consistency'] / f['n']:.1%}); "
          f"both: {f['pass_both']} ({f['pass_both'] / f['n']:.1%})")
    k = f["k"]
    print(f"\n{'family':<16} {'LoRAs':>6} {'P@1':>7} {f'P@{k}':>7} {'chance':>7}")
    for label, key in (("name token", "similar_name_family"), ("Civitai model", "similar_model_family"),
                       ("either", "similar_any_family")):
        s = f[key]
        print(f"{label:<16} {s['loras']:>6} {s['P@1']:>7.3f} {s[f'P@{k}']:>7.3f} {s['chance']:>7.4f}")
    d = f["nearest_different_name"]
    print(f"\nnearest direction has a different-looking name: {d['share']:.1%} of {d['loras']} named LoRAs "
          f"(two random LoRAs: {d['chance']:.1%})")
    for a, b in d["examples"]:
        print(f"  {a[:50]!r:<54} -> {b[:50]!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(f, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
