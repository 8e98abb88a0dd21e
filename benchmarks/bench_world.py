"""The micro world's models against the pixel oracle, per attribute family.

- micro CLIP zero-shot accuracy (colour, shape, style) on held-out renders (scenes with a (shape,
  colour) or (shape, style) pair no training batch contained), with chance level;
- micro SDXL prompt-following: images generated from canonical prompts with held-out pairs
  ("a striped green circle"), judged by the oracle for colour, shape and style; per style too;
- seed diversity: mean absolute pixel difference between two seeds of one prompt (0-255), next to
  the difference between two renders of different scenes for scale.

Every number is measured by the oracle (plain pixel functions), never by a learned model.

    python benchmarks/bench_world.py [--weights DIR] [--n 96] [--out bench_results/world.json] [--grid grid.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from carlos_ray.world import evaluate as E  # noqa: E402
from carlos_ray.world import micro  # noqa: E402
from carlos_ray.world import render as R  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default: the package's)")
    p.add_argument("--n", type=int, default=96, help="generated images (held-out prompts)")
    p.add_argument("--clip-n", type=int, default=300, help="held-out renders per family for CLIP")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the generated images")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.time()
    model, tok = micro.load_clip(args.weights)
    clip = E.clip_zero_shot(model, tok, n=args.clip_n)
    t_clip = time.time() - t0
    chance = {"colour": 1 / len(R.COLOURS), "shape": 1 / len(R.SHAPES), "style": 1 / (len(R.STYLES) + 1)}

    t1 = time.time()
    pipe = micro.load_sdxl_pipeline(args.weights)
    gen = E.generator_following(pipe, n=args.n, steps=args.steps, guidance=args.guidance)
    t_gen = time.time() - t1
    rng = np.random.default_rng(0)
    a = np.stack([R.render(R.random_scene(rng, p_style=0.0)) for _ in range(64)]).astype(np.float32)
    render_diff = float(np.abs(a[:32] - a[32:]).mean())

    print(f"{'family':<8} {'CLIP zero-shot':>15} {'generator (oracle)':>19} {'chance':>7}")
    for fam in ("colour", "shape", "style"):
        print(f"{fam:<8} {clip[fam]:>15.3f} {gen[fam]:>19.3f} {chance[fam]:>7.3f}")
    print(f"CLIP shape on unstyled held-out renders: {clip['shape_unstyled']:.3f}")
    print(f"all three right in one image: {gen['all_three']:.3f}  (n={gen['n']} held-out prompts)")
    print("per style (generator):", ", ".join(f"{k} {v:.2f}" for k, v in gen["per_style"].items()))
    print(f"seed diversity: {gen['seed_pixel_difference']:.1f} mean |pixel difference| between two seeds of one prompt "
          f"(two different rendered scenes: {render_diff:.1f})")
    print(f"time: CLIP eval {t_clip:.0f} s, generation + oracle {t_gen:.0f} s")
    if args.grid is not None:
        from PIL import Image

        imgs = gen["images"][:64]
        cols = 8
        rows = int(np.ceil(len(imgs) / cols))
        sheet = np.full((rows * 34, cols * 34, 3), 255, np.uint8)
        for i, im in enumerate(imgs):
            r, c = divmod(i, cols)
            sheet[r * 34 : r * 34 + 32, c * 34 : c * 34 + 32] = im
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.Resampling.NEAREST).save(args.grid)
        with open(args.grid.with_suffix(".txt"), "w") as fh:
            fh.write("\n".join(gen["prompts"][:64]) + "\n")
        print(f"grid: {args.grid}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        res = {"clip_zero_shot": clip, "generator": {k: v for k, v in gen.items() if k not in ("images",)},
               "chance": chance, "render_pair_difference": render_diff,
               "seconds": {"clip": round(t_clip, 1), "generator": round(t_gen, 1)},
               "settings": {"n": args.n, "clip_n": args.clip_n, "steps": args.steps, "guidance": args.guidance}}
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
