"""How one LoRA's signature responds to its scale (`generator.lora_scale`), on the demo's prompts and seeds.

    python benchmarks/bench_scale_response.py [LORA.safetensors] [--config conf/micro.yaml] [--scales 0.5,1,2]

Prints strength, consistency and the cosine of the direction to the scale-1 direction per scale, and writes
bench_results/scale_response.json. A *scale family* (issue: behavioural duplicates) is only detectable where the
direction stays parallel while the strength changes; this measures over which scales that holds for a model.
Signatures are computed in process (no Ray), one LoRA, |P| x seeds images per scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carlos_ray.config import Config  # noqa: E402
from carlos_ray.indexing import collect_sources  # noqa: E402
from carlos_ray.indexing.inprocess import signatures_in_process  # noqa: E402
from carlos_ray.models.generator import generator_lora_targets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lora", nargs="?", default="carlos_ray/world/zoo/family/bw_film.safetensors")
    ap.add_argument("--config", default="conf/micro.yaml")
    ap.add_argument("--scales", default="0.5,0.7,0.85,1,1.2,1.4,2")
    ap.add_argument("--out", type=Path, default=Path("bench_results/scale_response.json"))
    args = ap.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    if 1.0 not in scales:
        scales.append(1.0)
    cfg = Config.from_file(args.config)
    src = Path(args.lora)
    with tempfile.TemporaryDirectory() as d:
        for f in src.parent.glob(src.name.removesuffix(".safetensors") + ".*"):
            shutil.copy(f, d)
        jobs, _, _ = collect_sources([d], generator_lora_targets(cfg.generator))
        if len(jobs) != 1:
            raise SystemExit(f"{src}: expected one usable LoRA, got {len(jobs)}")
        sigs = {}
        for s in sorted(scales):
            c = cfg.model_copy(deep=True)
            c.generator.lora_scale = s
            t = time.time()
            sigs[s] = next(iter(signatures_in_process(c, jobs).values()))
            print(f"scale {s:g}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    ref = sigs[1.0].direction
    rows = []
    print(f"{src.name}, {cfg.name} profile, {sigs[1.0].n} samples per scale\n")
    print("| scale | strength | consistency | cosine to scale 1 | strength / strength at 1 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for s, sig in sigs.items():
        cos = float(sig.direction @ ref / (np.linalg.norm(sig.direction) * np.linalg.norm(ref)))
        rows.append({"scale": s, "strength": sig.strength, "consistency": sig.consistency, "cosine_to_1": cos,
                     "strength_ratio_to_1": sig.strength / sigs[1.0].strength})
        print(f"| {s:g} | {sig.strength:.2f} | {sig.consistency:.3f} | {cos:.3f} | {rows[-1]['strength_ratio_to_1']:.2f} |")
    # a scale family is found through its parallel pairs: every scale against every other
    keys = list(sigs)
    unit = np.stack([sigs[k].direction / np.linalg.norm(sigs[k].direction) for k in keys])
    cos_matrix = unit @ unit.T
    print("\ncosine between scales\n")
    print("| scale | " + " | ".join(f"{k:g}" for k in keys) + " |")
    print("| ---: |" + " ---: |" * len(keys))
    for k, row in zip(keys, cos_matrix):
        print(f"| {k:g} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"lora": str(src), "config": args.config, "rows": rows,
                                    "scales": keys, "cosine_matrix": cos_matrix.tolist()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
