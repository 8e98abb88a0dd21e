"""The in-process reference: the same signatures by a plain sequential loop with the same models (tests, benchmarks)."""

from __future__ import annotations

import numpy as np

from carlos_ray.config import Config
from carlos_ray.indexing.plan import IndexPlan
from carlos_ray.indexing.sources import LoraJob
from carlos_ray.signatures import PartialStats, Signature


def signatures_in_process(cfg: Config, jobs: list[LoraJob], batch_size: int | None = None) -> dict[str, Signature]:
    """The same signatures computed by a plain sequential loop with the same models (tests, benchmarks)."""
    import torch

    plan = IndexPlan(cfg)
    threads = torch.get_num_threads()
    if cfg.resources.generate.torch_threads:  # same kernels as the actors: bit-identical images
        torch.set_num_threads(cfg.resources.generate.torch_threads)
    try:
        return _signatures_in_process(cfg, plan, jobs, batch_size)
    finally:
        torch.set_num_threads(threads)


def _signatures_in_process(cfg: Config, plan: "IndexPlan", jobs: list[LoraJob], batch_size: int | None) -> dict[str, Signature]:
    from carlos_ray.models import create_encoder, create_generator

    enc = create_encoder(cfg.encoder)
    gen = create_generator(cfg.generator, enc.image_size)
    bs = batch_size or cfg.resources.generate.batch_size

    def embed_rows(rows: list[dict], job: LoraJob | None) -> np.ndarray:
        gen.activate(job.lora_id if job else None, job.path if job else None)
        out = []
        for s in range(0, len(rows), bs):
            chunk = rows[s : s + bs]
            imgs, _ = gen.generate([r["prompt"] for r in chunk], [r["seed"] for r in chunk])
            out.append(enc.encode_images(imgs))
        return np.concatenate(out)

    base_rows = plan.rows([None])
    base = embed_rows(base_rows, None)
    out = {}
    for job in jobs:
        rows = plan.rows([job])
        diffs = embed_rows(rows, job) - base
        out[job.lora_id] = PartialStats.from_diffs(diffs, np.array([r["prompt_idx"] for r in rows]), len(plan.prompts),
                                                   np.array([r["seed_idx"] for r in rows])).finalize(plan.categories)
    return out
