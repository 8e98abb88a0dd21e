"""Adaptive sampling vs the full protocol, in one run, on the same zoo, models and machine.

Indexes the zoo twice — every LoRA with all prompts x seeds, and adaptively (`sampling.adaptive`) — and
prints side by side: LoRA images generated per LoRA (mean, max), wall time of the LoRA pass, retrieval
agreement over the query set (top-10 overlap, P@1 and the oracle judge of both indexes when the
evaluation harness and the micro world are installed), the LoRAs each index filters, and the coverage of
the adaptive 95% intervals (how often the full protocol's value lies inside). Then a sweep of the
stopping bounds replayed offline on the full run's stored per-sample diffs (no extra generation): what
each setting would have cost and how well it agrees — the table the config defaults come from. Last,
the projection to the paper's profile (280 prompts x 16 seeds, ~7 A6000 GPU-hours per LoRA).

    python benchmarks/bench_adaptive.py [--config conf/micro.yaml] [--loras DIR] [--seeds 16] [--out FILE]
    python benchmarks/bench_adaptive.py --quick      # tiny profile, 8 synthetic LoRAs, 5 prompts x 8 seeds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAPER_PROMPTS, PAPER_SEEDS, PAPER_GPU_HOURS = 280, 16, 7.0  # CARLoS: ~7 A6000 GPU-hours per LoRA at 4,480 images
PAPER_ROUND = 70  # sampling.adaptive.round_fraction 0.25 of 280 prompts
K = 10


def _signatures(index: str) -> dict[str, dict]:
    from carlos_ray.store import Index

    t = Index(index).snapshot().signatures()
    return {r["lora_id"]: r for r in t.to_pylist()}


def _thresholds(index: str) -> dict:
    from carlos_ray.store import Index

    return dict(Index(index).read_manifest().thresholds or {})


def _kept(rows: dict[str, dict], th: dict) -> set[str]:
    ms, mc = th.get("max_strength"), th.get("min_consistency")
    return {lid for lid, r in rows.items()
            if (ms is None or r["strength"] <= ms) and (mc is None or r["consistency"] >= mc)}


def _ranker(rows: dict[str, dict], th: dict):
    import pyarrow as pa

    from carlos_ray.ranker import Ranker
    from carlos_ray.schema import SIGNATURE_SCHEMA, conform_signatures

    table = conform_signatures(pa.Table.from_pylist(list(rows.values()), schema=SIGNATURE_SCHEMA))
    return Ranker.from_table(table, max_strength=th.get("max_strength"), min_consistency=th.get("min_consistency"))


def _top(ranker, vectors: np.ndarray, k: int = K) -> list[list[str]]:
    return [[h.lora_id for h in ranker.search(v, k=k)] for v in vectors]


def _overlap(a: list[list[str]], b: list[list[str]]) -> float:
    vals = [len(set(x) & set(y)) / max(len(x), len(y)) for x, y in zip(a, b) if x or y]
    return float(np.mean(vals)) if vals else 1.0


def _queries(zoo: Path, micro: bool) -> tuple[list[str], object | None]:
    """The evaluation query set of a micro zoo (texts, QuerySet) when the harness is installed; else a fixed word list."""
    if micro and (zoo / "zoo.json").is_file():
        try:
            from carlos_ray.evaluation.micro import micro_queries
        except ImportError:
            micro_queries = None
        if micro_queries is not None:
            try:
                qs = micro_queries(zoo)
                return [q.text for q in qs.queries], qs
            except (KeyError, ValueError) as e:  # a zoo.json without planted behaviours (the synthetic zoo)
                print(f"(no evaluation queries for {zoo}: {e})")
    words = ["striped", "grayscale", "sepia", "a red star", "blue", "dotted pattern", "inverted colours", "blurry",
             "pixel art", "a heart", "framed picture", "grainy film", "outline drawing", "checkered", "tiled", "small"]
    return words, None


def _eval(index: str, qs, heldout: str | None) -> dict:
    """P@1 and the oracle judge of the `carlos` retriever over the query set (carlos_ray.evaluation)."""
    from carlos_ray.evaluation.run import EvalSpec, run_eval

    judges = ["oracle"] if heldout else []
    spec = EvalSpec(retrievers=["carlos"], judges=judges, heldout_prompts=heldout)
    res = run_eval(index, qs, spec)
    row = next(r for r in res["rows"] if r["retriever"] == "carlos")
    return {"P@1": row["P@1"], "oracle": row.get("oracle"), "oracle se": row.get("oracle se")}


def _coverage(full: dict[str, dict], ad: dict[str, dict], z: float) -> dict:
    ids = [lid for lid in ad if lid in full]
    early = [lid for lid in ids if ad[lid]["n"] < full[lid]["n"]]

    def inside(lid: str, key: str) -> bool:
        se = ad[lid][key + "_se"]
        return se is not None and math.isfinite(se) and abs(ad[lid][key] - full[lid][key]) <= z * se + 1e-12

    def dir_inside(lid: str) -> bool:
        err = np.linalg.norm(np.asarray(ad[lid]["direction"]) - np.asarray(full[lid]["direction"]))
        se = ad[lid]["direction_se"]
        return se is not None and math.isfinite(se) and err <= z * se + 1e-12

    out = {}
    for name, sel in (("all", ids), ("stopped_early", early)):
        out[name] = {"n": len(sel),
                     "strength": float(np.mean([inside(i, "strength") for i in sel])) if sel else math.nan,
                     "consistency": float(np.mean([inside(i, "consistency") for i in sel])) if sel else math.nan,
                     "direction": float(np.mean([dir_inside(i) for i in sel])) if sel else math.nan}
    return out


def replay(full_index: str, cfg, bounds: dict, z: float) -> dict[str, dict]:
    """Adaptive signatures recomputed offline from the full run's stored diffs, for other stopping bounds."""
    from carlos_ray.adaptive import StoppingRule
    from carlos_ray.indexing import IndexPlan
    from carlos_ray.signatures import PartialStats
    from carlos_ray.store import Index
    from carlos_ray.uncertainty import standard_errors

    a = cfg.sampling.adaptive
    on = cfg.model_copy(deep=True)
    on.sampling.adaptive.enabled = True
    plan = IndexPlan(on)
    rule = StoppingRule(bounds["max_direction_rse"], bounds["max_strength_rse"], bounds["max_consistency_se"],
                        a.min_rounds, bounds.get("min_samples", a.min_samples))
    diffs = Index(full_index).snapshot().table("diffs")
    rows = _signatures(full_index)
    n_p, n_s = len(plan.prompts), len(plan.seeds)
    lids = np.asarray(diffs.column("lora_id").to_pylist())
    pidx, sidx = diffs.column("prompt_idx").to_numpy(), diffs.column("seed_idx").to_numpy()
    flat = np.asarray(diffs.column("diff").combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float64)
    x_all = flat.reshape(len(lids), -1)
    out = {}
    for lid, row in rows.items():
        sel = lids == lid
        cube = np.zeros((n_p, n_s, x_all.shape[1]))
        cube[pidx[sel], sidx[sel]] = x_all[sel]
        for r in range(1, plan.rounds.n_rounds + 1):
            take = plan.rounds.order[: plan.rounds.used(r)]
            part = PartialStats.from_diffs(cube[take[:, 0], take[:, 1]], take[:, 0], n_p, take[:, 1])
            errs = standard_errors(part, plan.independent_seeds, n_s)
            if rule.settled(errs, r) or r == plan.rounds.n_rounds:
                break
        sig = part.finalize(full_seeds=n_s)
        out[lid] = {**row, "direction": sig.direction.tolist(), "strength": sig.strength, "consistency": sig.consistency,
                    "n": sig.n, "n_rounds": r, **errs.as_row()}
    return out


def _fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="profile (default: conf/micro.yaml if its weights exist, else tiny)")
    ap.add_argument("--loras", default=None, help="zoo directory (default: the micro zoo, else a synthetic zoo)")
    ap.add_argument("--zoo-n", type=int, default=16, help="size of the synthetic zoo when no --loras")
    ap.add_argument("--seeds", type=int, default=None, help="seeds of the full protocol (default: 16, quick: 8)")
    ap.add_argument("--prompt-subset", default="__config__", help="prompt subset (default: the config's)")
    ap.add_argument("--heldout", default=None, help="held-out prompt set for the oracle judge (micro)")
    ap.add_argument("--workdir", default=None, help="where the two indexes go (default: a temporary directory)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="tiny profile, 8 synthetic LoRAs, 5 prompts x 8 seeds")
    for name in ("round_fraction", "max_direction_rse", "max_strength_rse", "max_consistency_se"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=None, help=f"sampling.adaptive.{name}")
    ap.add_argument("--min-samples", type=int, default=None, help="sampling.adaptive.min_samples")
    ap.add_argument("--seed-layout", choices=("shared", "per_prompt"), default=None,
                    help="sampling.seed_layout of both runs (default: the config's)")
    args = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from carlos_ray.config import Config
    from carlos_ray.indexing import IndexPlan, run_index
    from carlos_ray.uncertainty import Z95

    cfg_path = args.config or ("conf/tiny.yaml" if args.quick else "conf/micro.yaml")
    cfg = Config.from_file(cfg_path)
    cfg.sampling.num_seeds = args.seeds or (8 if args.quick else 16)
    if args.seed_layout:
        cfg.sampling.seed_layout = args.seed_layout
    if args.prompt_subset != "__config__":
        cfg.sampling.prompt_subset = args.prompt_subset or None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_adaptive_"))
    if args.loras:
        zoo = Path(args.loras)
    else:
        from carlos_ray.zoo import make_zoo

        zoo = work / "zoo"
        if not zoo.exists():
            make_zoo(zoo, n=8 if args.quick else args.zoo_n, seed=0)

    full_cfg = cfg.model_copy(deep=True)
    full_cfg.sampling.adaptive.enabled = False
    full_cfg.indexing.keep_diffs = True  # for the offline sweep
    ad_cfg = cfg.model_copy(deep=True)
    ad_cfg.sampling.adaptive.enabled = True
    ad_cfg.indexing.keep_diffs = False
    a = ad_cfg.sampling.adaptive
    if args.quick:  # 5 prompts x 8 seeds: the code path, with bounds loose enough that some LoRAs stop early
        a.min_samples, a.max_direction_rse, a.max_strength_rse, a.max_consistency_se = 10, 0.3, 0.1, 0.1
    for name in ("round_fraction", "max_direction_rse", "max_strength_rse", "max_consistency_se", "min_samples"):
        if getattr(args, name) is not None:
            setattr(a, name, getattr(args, name))
    full_cfg.sampling.adaptive = a.model_copy(update={"enabled": False})  # the replay uses the same schedule
    plan = IndexPlan(ad_cfg)
    full_n = plan.samples_per_lora
    print(f"profile {cfg.name}: {len(plan.prompts)} prompts x {len(plan.seeds)} seeds = {full_n} samples per LoRA; "
          f"adaptive rounds of {plan.rounds.size} samples, bounds: direction rse <= {a.max_direction_rse}, strength rse "
          f"<= {a.max_strength_rse}, consistency se <= {a.max_consistency_se}, min {a.min_samples} samples")

    runs = {}
    for name, c in (("full", full_cfg), ("adaptive", ad_cfg)):
        idx = str(work / f"index_{name}")
        t = time.time()
        s = run_index(c, [str(zoo)], idx)
        runs[name] = {"index": idx, "wall_s": time.time() - t, "lora_pass_s": s.lora_pass_seconds, "rounds": s.rounds,
                      "images": s.images_generated - (0 if s.base_cached else full_n), "indexed": s.indexed,
                      "rejected": s.rejected}
        print(f"{name}: {s.indexed} indexed, {s.rejected} rejected, LoRA pass {s.lora_pass_seconds:.0f} s, "
              f"{s.rounds} pass(es)")
    full, ad = _signatures(runs["full"]["index"]), _signatures(runs["adaptive"]["index"])
    th_full, th_ad = _thresholds(runs["full"]["index"]), _thresholds(runs["adaptive"]["index"])

    texts, qs = _queries(zoo, cfg.generator.model == "micro")
    from carlos_ray.serving import load_query_encoder
    from carlos_ray.store import Index

    enc = load_query_encoder(Index(runs["full"]["index"]).read_manifest())
    qv = enc.encode(texts)
    top_full = _top(_ranker(full, th_full), qv)

    def agreement(rows: dict[str, dict], th: dict) -> dict:
        n = np.array([r["n"] for r in rows.values()], float)
        return {"images_mean": float(n.mean()), "images_max": int(n.max()), "reduction": full_n / float(n.mean()),
                "top10_overlap": _overlap(top_full, _top(_ranker(rows, th), qv)),
                "top10_overlap_full_thresholds": _overlap(top_full, _top(_ranker(rows, th_full), qv)),
                "same_filtered": _kept(rows, th) == _kept(full, th_full),
                "same_filtered_full_thresholds": _kept(rows, th_full) == _kept(full, th_full),
                "filtered": sorted(r["name"] for lid, r in rows.items() if lid not in _kept(rows, th)),
                "coverage": _coverage(full, rows, Z95)}

    res_full = {"images_mean": float(full_n), "images_max": full_n, "reduction": 1.0, "top10_overlap": 1.0,
                "filtered": sorted(r["name"] for lid, r in full.items() if lid not in _kept(full, th_full))}
    res_ad = agreement(ad, th_ad)
    ev = {}
    if qs is not None:
        try:
            ev = {name: _eval(runs[name]["index"], qs, args.heldout) for name in ("full", "adaptive")}
        except ImportError as e:
            print(f"(evaluation harness unavailable: {e})")

    # offline sweep of the bounds on the full run's diffs
    grid = [
        {"max_direction_rse": d, "max_strength_rse": s_, "max_consistency_se": c, "min_samples": m}
        for d, s_, c, m in ((0.05, 0.02, 0.01, a.min_samples), (0.1, 0.05, 0.02, a.min_samples),
                            (0.15, 0.05, 0.02, a.min_samples), (0.2, 0.08, 0.03, a.min_samples),
                            (0.3, 0.1, 0.05, a.min_samples), (0.15, 0.05, 0.02, 2 * a.min_samples),
                            (0.15, 0.05, 0.02, max(2, a.min_samples // 2)))
    ]
    grid.append({"max_direction_rse": a.max_direction_rse, "max_strength_rse": a.max_strength_rse,
                 "max_consistency_se": a.max_consistency_se, "min_samples": a.min_samples, "this run": True})
    sweep = []
    for b in grid:
        rows = replay(runs["full"]["index"], full_cfg, b, Z95)
        g = agreement(rows, th_full)
        sweep.append({**b, **{k: g[k] for k in ("images_mean", "images_max", "reduction", "top10_overlap",
                                                   "same_filtered_full_thresholds")},
                      "coverage_strength": g["coverage"]["all"]["strength"],
                      "coverage_consistency": g["coverage"]["all"]["consistency"]})

    # paper projection
    frac = res_ad["images_mean"] / full_n
    paper_full = PAPER_PROMPTS * PAPER_SEEDS
    per_image_h = PAPER_GPU_HOURS / paper_full
    same_n = min(paper_full, math.ceil(res_ad["images_mean"] / PAPER_ROUND) * PAPER_ROUND)
    projection = {
        "full_images": paper_full, "full_gpu_hours": PAPER_GPU_HOURS, "gpu_seconds_per_image": per_image_h * 3600,
        "same_fraction_images": frac * paper_full, "same_fraction_gpu_hours": PAPER_GPU_HOURS * frac,
        "same_samples_images": same_n, "same_samples_gpu_hours": same_n * per_image_h,
    }

    # ---- print
    cov, cov_e = res_ad["coverage"]["all"], res_ad["coverage"]["stopped_early"]
    lines = [
        "",
        f"| measure | full protocol | adaptive |",
        "| --- | --- | --- |",
        f"| LoRA images per LoRA, mean | {res_full['images_mean']:.1f} | {res_ad['images_mean']:.1f} "
        f"({res_ad['reduction']:.2f}x fewer) |",
        f"| LoRA images per LoRA, max | {res_full['images_max']} | {res_ad['images_max']} |",
        f"| LoRA images, total | {runs['full']['images']} | {runs['adaptive']['images']} |",
        f"| wall time of the LoRA pass (s) | {runs['full']['lora_pass_s']:.0f} | {runs['adaptive']['lora_pass_s']:.0f} "
        f"({runs['full']['lora_pass_s'] / max(runs['adaptive']['lora_pass_s'], 1e-9):.2f}x) |",
        f"| Ray Data passes | {runs['full']['rounds']} | {runs['adaptive']['rounds']} |",
        f"| top-{K} overlap with full ({len(texts)} queries) | 1 | {res_ad['top10_overlap']:.3f} "
        f"(with full's thresholds {res_ad['top10_overlap_full_thresholds']:.3f}) |",
    ]
    if ev:
        lines.append(f"| P@1 | {_fmt(ev['full']['P@1'])} | {_fmt(ev['adaptive']['P@1'])} |")
        if args.heldout:
            lines.append(f"| oracle judge | {_fmt(ev['full']['oracle'])} | {_fmt(ev['adaptive']['oracle'])} |")
    else:
        lines.append("| P@1, oracle judge | n/a (needs carlos_ray.evaluation and a micro zoo) | n/a |")
    lines += [
        f"| filtered LoRAs (own thresholds) | {', '.join(res_full['filtered']) or '-'} | "
        f"{', '.join(res_ad['filtered']) or '-'} (same: {res_ad['same_filtered']}) |",
        f"| same filtered under full's thresholds | - | {res_ad['same_filtered_full_thresholds']} |",
        f"| 95% interval coverage, all LoRAs (n={cov['n']}) | - | strength {_fmt(cov['strength'])}, consistency "
        f"{_fmt(cov['consistency'])}, direction {_fmt(cov['direction'])} |",
        f"| 95% interval coverage, LoRAs stopped early (n={cov_e['n']}) | - | strength {_fmt(cov_e['strength'])}, "
        f"consistency {_fmt(cov_e['consistency'])}, direction {_fmt(cov_e['direction'])} |",
        "",
        "Bounds replayed on the full run's stored diffs (float16) with the full index's thresholds:",
        "",
        "| direction rse | strength rse | consistency se | min samples | images mean | max | reduction | top-10 overlap "
        "| same filtered | cover strength | cover consistency |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in sweep:
        mark = " (this run's bounds)" if s.get("this run") else ""
        lines.append(f"| {s['max_direction_rse']} | {s['max_strength_rse']} | {s['max_consistency_se']} | "
                     f"{s['min_samples']}{mark} | "
                     f"{s['images_mean']:.1f} | {s['images_max']} | {s['reduction']:.2f}x | {s['top10_overlap']:.3f} | "
                     f"{s['same_filtered_full_thresholds']} | {_fmt(s['coverage_strength'])} | "
                     f"{_fmt(s['coverage_consistency'])} |")
    p = projection
    lines += [
        "",
        "Paper profile projection (280 prompts x 16 seeds = 4,480 LoRA images, ~7 A6000 GPU-hours per LoRA):",
        f"  per image: 7 h / 4480 = {p['gpu_seconds_per_image']:.2f} GPU-s",
        f"  same fraction as measured: {res_ad['images_mean']:.1f} / {full_n} = {frac:.3f} -> {frac:.3f} x 4480 = "
        f"{p['same_fraction_images']:.0f} images = {p['same_fraction_gpu_hours']:.2f} GPU-h per LoRA "
        f"({1 / frac:.1f}x fewer)",
        f"  same samples to settle (rounded up to rounds of {PAPER_ROUND}): {p['same_samples_images']} images x "
        f"{p['gpu_seconds_per_image']:.2f} s = {p['same_samples_gpu_hours']:.2f} GPU-h per LoRA "
        f"({paper_full / p['same_samples_images']:.1f}x fewer)",
    ]
    print("\n".join(lines))
    result = {"profile": cfg.name, "prompts": len(plan.prompts), "seeds": len(plan.seeds), "round_size": plan.rounds.size,
              "bounds": a.model_dump(), "n_loras": len(full), "n_queries": len(texts), "runs": runs,
              "full": res_full, "adaptive": res_ad, "evaluation": ev, "sweep": sweep, "projection": projection}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
