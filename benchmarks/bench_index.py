"""Indexing throughput: the Ray Data pipeline vs a plain sequential loop over the same models and rows.

Tiny models, the synthetic zoo, this machine, one run. Both sides start from a cached base pass and
include building their models. Reports rows/s of each and the ratio, the generation and embedding
actors' busy fractions (measured inside the actors), where the pipeline's wall time goes, and the
driver's peak RSS while indexing 8 vs 32 LoRAs (it should stay flat: partials are merged and
committed per LoRA, nothing accumulates).

    python benchmarks/bench_index.py [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class PeakRSS:
    """Samples this process's RSS every 20 ms; `peak_mb` is the maximum seen while running."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> "PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def sequential_loop(cfg, jobs, plan, base) -> float:
    """Plain loop: build models, then for every LoRA generate, embed, diff and accumulate. Returns seconds."""
    import numpy as np
    import torch

    from carlos_ray.models import create_encoder, create_generator
    from carlos_ray.signatures import PartialStats

    # the same per-process thread count as the actors: on 2 cores two threads per tiny model call
    # are slower than one (measured), so the loop gets its best setting, not a handicap
    torch.set_num_threads(cfg.resources.generate.torch_threads or 1)
    t0 = time.perf_counter()
    enc = create_encoder(cfg.encoder)
    gen = create_generator(cfg.generator, enc.image_size)
    bs = cfg.resources.generate.batch_size
    for job in jobs:
        rows = plan.rows([job])
        gen.activate(job.lora_id, job.path)
        embs = []
        for s in range(0, len(rows), bs):
            chunk = rows[s : s + bs]
            imgs, _ = gen.generate([r["prompt"] for r in chunk], [r["seed"] for r in chunk])
            embs.append(enc.encode_images(imgs))
        pidx = np.array([r["prompt_idx"] for r in rows])
        sidx = np.array([r["seed_idx"] for r in rows])
        diffs = np.concatenate(embs) - base[pidx, sidx]
        PartialStats.from_diffs(diffs, pidx, len(plan.prompts)).finalize(plan.categories)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write JSON here")
    ap.add_argument("--quick", action="store_true", help="small sizes, for the test suite")
    ap.add_argument("--config", default=str(REPO / "conf" / "tiny.yaml"))
    args = ap.parse_args()

    import logging

    import ray

    from carlos_ray.config import Config
    from carlos_ray.indexing import IndexPlan, base_array, collect_sources, run_index
    from carlos_ray.runtime import quiet_libraries
    from carlos_ray.models.generator import generator_lora_targets
    from carlos_ray.store import Index
    from carlos_ray.zoo import MIN_ZOO_SIZE, make_zoo

    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    small, large = (3, 5) if args.quick else (8, 32)  # quick: a smoke run of every code path
    cfg = Config.from_file(args.config)
    if args.quick:
        cfg.sampling.num_seeds = 1
    work = Path(tempfile.mkdtemp(prefix="bench_index_"))
    started_ray = not ray.is_initialized()
    try:
        if started_ray:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        zoo = work / "zoo"
        make_zoo(zoo, n=max(large, MIN_ZOO_SIZE), seed=1)
        jobs, _, _ = collect_sources([str(zoo)], generator_lora_targets(cfg.generator))
        jobs = sorted(jobs, key=lambda j: j.path)
        plan = IndexPlan(cfg)

        warm = work / "warm"
        run_index(cfg, [], str(warm))  # base pass only: cached for every run below
        base = base_array(Index(str(warm)).snapshot().base(plan.base_key), plan)

        runs = {}
        for n in (small, large):
            src = work / f"src{n}"
            src.mkdir()
            for j in jobs[:n]:
                shutil.copy(j.path, src / Path(j.path).name)
            idx = work / f"idx{n}"
            shutil.copytree(warm, idx)
            with PeakRSS() as rss:
                s = run_index(cfg, [str(src)], str(idx))
            assert s.indexed == n, f"expected {n} indexed, got {s.indexed}"
            runs[n] = {"summary": s, "peak_rss_mb": rss.peak_mb}

        s = runs[large]["summary"]
        rows = large * plan.samples_per_lora
        loop_s = sequential_loop(cfg, jobs[:large], plan, base)
        pipe_s = s.wall_seconds
        gen_actors = cfg.resources.generate.actors
        emb_actors = cfg.resources.embed.actors
        result = {
            "rows": rows,
            "loras": large,
            "loop_seconds": loop_s,
            "pipeline_seconds": pipe_s,
            "loop_rows_per_s": rows / loop_s,
            "pipeline_rows_per_s": rows / pipe_s,
            "ratio_vs_loop": loop_s / pipe_s,
            "lora_pass_seconds": s.lora_pass_seconds,
            "ratio_lora_pass_vs_loop": loop_s / s.lora_pass_seconds,
            "inspect_seconds": s.inspect_seconds,
            "base_seconds": s.base_seconds,
            "generate_busy_fraction": s.generate_busy_seconds / (s.lora_pass_seconds * gen_actors),
            "embed_busy_fraction": s.embed_busy_seconds / (s.lora_pass_seconds * emb_actors),
            "peak_rss_mb_small": runs[small]["peak_rss_mb"],
            "peak_rss_mb_large": runs[large]["peak_rss_mb"],
            "rss_growth": runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"] - 1.0,
            "small": small,
            "large": large,
            "quick": args.quick,
        }
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    r = result
    print(f"| measure | value |\n| --- | --- |")
    for k, label in [
        ("rows", "LoRA rows (prompts x seeds x LoRAs)"),
        ("loop_rows_per_s", "sequential loop rows/s"),
        ("pipeline_rows_per_s", "Ray Data job rows/s (whole job)"),
        ("ratio_vs_loop", "ratio job / loop"),
        ("ratio_lora_pass_vs_loop", "ratio LoRA pass / loop"),
        ("inspect_seconds", "job: inspection + compatibility s"),
        ("base_seconds", "job: base cache lookup s"),
        ("lora_pass_seconds", "job: LoRA pass s"),
        ("generate_busy_fraction", "generation actor busy fraction"),
        ("embed_busy_fraction", "embedding actor busy fraction"),
        ("peak_rss_mb_small", f"driver peak RSS, {r['small']} LoRAs (MB)"),
        ("peak_rss_mb_large", f"driver peak RSS, {r['large']} LoRAs (MB)"),
        ("rss_growth", "RSS growth"),
    ]:
        v = r[k]
        print(f"| {label} | {v:.4g} |" if isinstance(v, float) else f"| {label} | {v} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
