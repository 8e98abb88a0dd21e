"""Adaptive vs full on the micro zoo, offline: the adaptive signatures replayed from the full run's stored diffs
(the same fixed sample order and sums as a live adaptive run), for a grid of stopping bounds; prints images per
LoRA, top-10 overlap, P@1, the filtered LoRAs and interval coverage per row, writes bench_results/adaptive_offline.json.

    python benchmarks/bench_adaptive.py --config conf/micro.yaml --loras carlos_ray/world/zoo --seeds 8 \
        --prompt-subset "" --workdir WORK      # (the full index is enough: WORK/index_full)
    python benchmarks/bench_adaptive_replay.py WORK/index_full
"""

import json
import sys

import numpy as np
sys.path.insert(0, "benchmarks")
import bench_adaptive as B
from carlos_ray.config import Config
from carlos_ray.evaluation.metrics import label_metrics
from carlos_ray.evaluation.micro import micro_queries
from carlos_ray.serving import load_query_encoder
from carlos_ray.store import Index
from carlos_ray.thresholds import calibrate_thresholds
from carlos_ray.uncertainty import Z95

FULL = sys.argv[1] if len(sys.argv) > 1 else "bench_results/adaptive_work/index_full"  # an index_full from bench_adaptive.py --workdir
cfg = Config.from_file("conf/micro.yaml"); cfg.sampling.num_seeds = 8; cfg.sampling.prompt_subset = None
cfg.sampling.seed_layout = Index(FULL).read_manifest().sampling.get("seed_layout", "shared")  # the full run's layout
full = B._signatures(FULL); th_full = B._thresholds(FULL)
qs = micro_queries("carlos_ray/world/zoo"); texts = [q.text for q in qs.queries]
enc = load_query_encoder(Index(FULL).read_manifest()); qv = enc.encode(texts)
pos = [i for i, q in enumerate(qs.queries) if q.kind == "positive"]
def p1(rows, th):
    tops = B._top(B._ranker(rows, th), qv[pos], k=10)
    return float(np.mean([label_metrics(t, qs.queries[i].relevance)["P@1"] for t, i in zip(tops, pos)]))
top_full = B._top(B._ranker(full, th_full), qv)
full_n = max(r["n"] for r in full.values())
out = []
print(f"full: {full_n} samples per LoRA, P@1 {p1(full, th_full):.3f}, filtered {sorted(full[l]['name'] for l in full if l not in B._kept(full, th_full))}")
grid = [(0.15, 0.05, 0.02, 40), (0.2, 0.08, 0.03, 40), (0.25, 0.08, 0.04, 24), (0.3, 0.1, 0.05, 24), (0.35, 0.1, 0.05, 24),
        (0.4, 0.15, 0.06, 24), (0.3, 0.1, 0.05, 12), (0.3, 0.1, 0.04, 12), (0.25, 0.1, 0.05, 12), (0.35, 0.1, 0.05, 12),
        (0.5, 0.2, 0.08, 12)]
for d, s, c, m in grid:
    rows = B.replay(FULL, cfg, {"max_direction_rse": d, "max_strength_rse": s, "max_consistency_se": c, "min_samples": m}, Z95)
    cal = calibrate_thresholds([r["strength"] for r in rows.values()], [r["consistency"] for r in rows.values()])
    th = {"max_strength": cal["max_strength"], "min_consistency": cal["min_consistency"]}
    n = np.array([r["n"] for r in rows.values()], float)
    cov = B._coverage(full, rows, Z95)["all"]
    res = {"bounds": (d, s, c, m), "images_mean": n.mean(), "images_max": int(n.max()), "reduction": full_n / n.mean(),
           "top10": B._overlap(top_full, B._top(B._ranker(rows, th), qv)), "P@1": p1(rows, th),
           "same_filtered": B._kept(rows, th) == B._kept(full, th_full),
           "filtered": sorted(rows[l]["name"] for l in rows if l not in B._kept(rows, th)),
           "cov_s": cov["strength"], "cov_c": cov["consistency"], "cov_d": cov["direction"]}
    out.append(res)
    print(f"d<={d} s<={s} c<={c} min {m}: images mean {res['images_mean']:.1f} max {res['images_max']} ({res['reduction']:.2f}x) "
          f"top10 {res['top10']:.3f} P@1 {res['P@1']:.3f} same filtered {res['same_filtered']} coverage s {cov['strength']:.2f} "
          f"c {cov['consistency']:.2f} d {cov['direction']:.2f}", flush=True)


# ---- are the seed errors right for this seed layout? ------------------------------------------------------
# Per LoRA, on the full protocol: the split-half seed error of consistency (what the rule uses with per-prompt seeds)
# against a delete-one-seed jackknife (seed index j of every prompt left out together: it sees any correlation between
# prompts that share a seed), and the spread of the 2-seed estimates over all seed pairs against their stated error.
from carlos_ray.signatures import PartialStats
from carlos_ray.uncertainty import seed_consistency_se

diffs = Index(FULL).snapshot().table("diffs")
lids = np.asarray(diffs.column("lora_id").to_pylist())
pidx, sidx = diffs.column("prompt_idx").to_numpy(), diffs.column("seed_idx").to_numpy()
x_all = np.asarray(diffs.column("diff").combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float64)
x_all = x_all.reshape(len(lids), -1)
n_p, n_s = int(pidx.max()) + 1, int(sidx.max()) + 1


def _part(cube):
    """The partial of a (prompts, seeds, d) cube, seed index = position along axis 1."""
    k = cube.shape[1]
    return PartialStats.from_diffs(cube.reshape(-1, cube.shape[2]), np.repeat(np.arange(n_p), k), n_p,
                                   np.tile(np.arange(k), n_p))


ratios, pair_ratios = [], []
for lid in full:
    sel = lids == lid
    cube = np.zeros((n_p, n_s, x_all.shape[1]))
    cube[pidx[sel], sidx[sel]] = x_all[sel]
    if not np.any(cube):
        continue
    loo = np.array([_part(np.delete(cube, j, axis=1)).finalize().consistency for j in range(n_s)])
    jack = float(np.sqrt((n_s - 1) / n_s * np.sum((loo - loo.mean()) ** 2)))
    ratios.append(seed_consistency_se(_part(cube)) / jack)
    pairs = [(a, b) for a in range(n_s) for b in range(a + 1, n_s)]
    parts = [_part(cube[:, [a, b]]) for a, b in pairs]
    est = [q.finalize().consistency for q in parts]
    stated = [seed_consistency_se(q) for q in parts]
    pair_ratios.append(float(np.sqrt(np.mean(np.square(stated)))) / float(np.std(est)))
seed_check = {"seed_layout": cfg.sampling.seed_layout, "split_over_seed_jackknife": np.percentile(ratios, [10, 50, 90]).tolist(),
              "stated_over_spread_2_seeds": np.percentile(pair_ratios, [10, 50, 90]).tolist()}
print(f"seed errors ({cfg.sampling.seed_layout} seeds, {len(ratios)} LoRAs, 10/50/90th percentiles): split-half seed error / "
      f"seed jackknife {' / '.join(f'{v:.2f}' for v in seed_check['split_over_seed_jackknife'])}; stated error / spread "
      f"of the 2-seed estimates {' / '.join(f'{v:.2f}' for v in seed_check['stated_over_spread_2_seeds'])}")
json.dump({"grid": out, "seed_check": seed_check}, open("bench_results/adaptive_offline.json", "w"), indent=1, default=str)
