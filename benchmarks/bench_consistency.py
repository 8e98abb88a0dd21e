"""Consistency of one LoRA: Gram-of-prompt-sums statistics vs the full N x N cosine matrix.

Both methods start from the same raw float32 diffs (d = 512, prompts x seeds rows in shuffled
order, a few zero rows):

- ours: ``PartialStats.from_diffs(...).finalize(categories)`` -- the whole signature (direction,
  strength, consistency, per-prompt and per-category breakdowns), float64 throughout;
- reference: normalize (zero rows stay zero), ``X @ X.T``, mean of the strict upper triangle,
  in float32 as the reference implementation does (consistency only).

Both are compared with an exact float64 consistency (blockwise pairwise cosines, fsum of the
block sums). Times are the best of a few repeats; peak memory is measured separately with
tracemalloc (numpy reports its allocations to it; the input array is allocated beforehand and
not counted).

    python benchmarks/bench_consistency.py [--quick] [--repeats R] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

try:
    from carlos_ray.signatures import PartialStats
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from carlos_ray.signatures import PartialStats

D = 512
FULL_SIZES = [(280, 16), (280, 64)]  # (prompts, seeds): N = 4480 and 17920
QUICK_SIZES = [(40, 8), (40, 32)]
TARGET_SPEEDUP = {4480: 12.0, 17920: 60.0}
TARGET_MAX_ABS_DIFF = 1e-9
N_CATEGORIES = 10


def make_diffs(n_prompts: int, seeds: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-like float32 diffs: shared shift + per-prompt shift + noise, shuffled rows, some zeros."""
    shared = rng.standard_normal(D)
    per_prompt = 0.8 * rng.standard_normal((n_prompts, D))
    prompt_idx = np.repeat(np.arange(n_prompts), seeds)
    rng.shuffle(prompt_idx)
    x = shared + per_prompt[prompt_idx] + 2.0 * rng.standard_normal((prompt_idx.size, D))
    x[rng.random(prompt_idx.size) < 0.01] = 0.0
    return x.astype(np.float32), prompt_idx


def ours(x: np.ndarray, prompt_idx: np.ndarray, n_prompts: int, categories: list[str]) -> float:
    return PartialStats.from_diffs(x, prompt_idx, n_prompts).finalize(categories).consistency


def reference(x: np.ndarray) -> float:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.maximum(norms, np.float32(1e-12))
    sim = u @ u.T
    n = sim.shape[0]
    return float(sim[np.triu(np.ones((n, n), dtype=bool), k=1)].mean())


def exact(x: np.ndarray, block: int = 2048) -> float:
    """Float64 mean cosine over pairs i < j, blockwise so memory stays bounded."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    u = np.divide(x, norms[:, None], out=np.zeros_like(x), where=norms[:, None] > 0)
    n = len(u)
    sums = []
    for i in range(0, n, block):
        rows = u[i : i + block]
        sums.append(float(np.triu(rows @ rows.T, k=1).sum()))
        if i + block < n:
            sums.append(float((rows @ u[i + block :].T).sum()))
    return math.fsum(sums) / (n * (n - 1) / 2)


def best_time(fn, repeats: int) -> tuple[float, float]:
    best, value = math.inf, math.nan
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run_size(n_prompts: int, seeds: int, repeats: int, rng: np.random.Generator) -> dict:
    x, prompt_idx = make_diffs(n_prompts, seeds, rng)
    categories = [f"cat{i * N_CATEGORIES // n_prompts}" for i in range(n_prompts)]
    n = len(x)
    ref_reps = max(1, repeats - 2) if n > 10_000 else repeats
    t_ours, c_ours = best_time(lambda: ours(x, prompt_idx, n_prompts, categories), repeats)
    t_ref, c_ref = best_time(lambda: reference(x), ref_reps)
    c_exact = exact(x)
    return {
        "n_prompts": n_prompts,
        "seeds": seeds,
        "n": n,
        "d": D,
        "ours_s": t_ours,
        "reference_s": t_ref,
        "speedup": t_ref / t_ours,
        "consistency_exact": c_exact,
        "max_abs_diff": abs(c_ours - c_exact),
        "reference_max_abs_diff": abs(c_ref - c_exact),
        "ours_peak_bytes": peak_bytes(lambda: ours(x, prompt_idx, n_prompts, categories)),
        "reference_peak_bytes": peak_bytes(lambda: reference(x)),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| N (prompts x seeds) | ours ms | reference ms | speedup | ours abs err | reference abs err "
        "| ours peak MiB | reference peak MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} ({r['n_prompts']}x{r['seeds']}) | {r['ours_s'] * 1e3:.1f} | "
            f"{r['reference_s'] * 1e3:.1f} | {r['speedup']:.1f}x | {r['max_abs_diff']:.1e} | "
            f"{r['reference_max_abs_diff']:.1e} | {r['ours_peak_bytes'] / 2**20:.1f} | "
            f"{r['reference_peak_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write results as JSON to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    rng = np.random.default_rng(args.seed)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    rows = [run_size(p, s, args.repeats, rng) for p, s in sizes]
    targets = {}
    if not args.quick:
        for r in rows:
            targets[str(r["n"])] = {
                "speedup_target": TARGET_SPEEDUP.get(r["n"]),
                "speedup_met": r["speedup"] >= TARGET_SPEEDUP.get(r["n"], 0.0),
                "max_abs_diff_met": r["max_abs_diff"] <= TARGET_MAX_ABS_DIFF,
            }
    result = {
        "benchmark": "consistency",
        "quick": args.quick,
        "d": D,
        "input_dtype": "float32",
        "speedup": min(r["speedup"] for r in rows),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "reference_max_abs_diff": max(r["reference_max_abs_diff"] for r in rows),
        "sizes": {str(r["n"]): r for r in rows},
        "targets": targets,
    }
    print(markdown(rows))
    print(
        f"\nworst-case speedup {result['speedup']:.1f}x, ours max abs diff {result['max_abs_diff']:.1e} "
        f"(reference {result['reference_max_abs_diff']:.1e}) vs exact float64"
    )
    for n, t in targets.items():
        print(
            f"N={n}: speedup target {t['speedup_target']}x {'met' if t['speedup_met'] else 'MISSED'}, "
            f"abs diff <= {TARGET_MAX_ABS_DIFF:g} {'met' if t['max_abs_diff_met'] else 'MISSED'}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
