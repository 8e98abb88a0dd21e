"""The paper's judging protocol as one more Ray Data pipeline over the indexing actor pools.

Each retrieved LoRA generates images on held-out prompts (in neither the indexing set P nor the
query-context set P′) with held-out seeds; the images are judged

- by the pixel **oracle** (`carlos_ray.evaluation.oracles`): the fraction of images that show the
  queried attribute;
- by the **encoder** (the index's CLIP): cosine of the raw image features v(x) and the raw text
  features u(q) of the query.

Rows `(lora_id, prompt, seed)` go LoRA-major through the indexing `GenerateImages` actor pool (same
generator, trigger words appended to the LoRA prompt as when indexing) and then a `JudgeImages` pool
(CLIP image features and oracle attributes per image). Results are cached by
`(generator key, lora_id, prompt, seed)` in a Parquet file, so a LoRA retrieved by several
retrievers, or by a second run, is generated once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from carlos_ray.config import Config

logger = logging.getLogger(__name__)

BASE_ID = ""  # lora_id of the base model (no LoRA) in judge rows
CACHE_SCHEMA = pa.schema([
    pa.field("lora_id", pa.string()), pa.field("prompt", pa.string()), pa.field("seed", pa.int64()),
    pa.field("finite", pa.bool_()), pa.field("embedding", pa.list_(pa.float32())),
    pa.field("attributes", pa.list_(pa.string())),
])


@dataclass(frozen=True)
class JudgeLora:
    """A LoRA to judge: id, file and trigger words (as in the index)."""

    lora_id: str
    path: str
    trigger_words: tuple[str, ...] = ()


class JudgeImages:
    """Ray Data stage: generated images -> raw CLIP image features and the oracle's attributes per image."""

    REQUIRED = ("lora_id", "cache_prompt", "seed", "image", "finite", "error")

    def __init__(self, encoder_spec: dict, oracle: str | None, torch_threads: int | None = None):
        from carlos_ray.config import EncoderSpec
        from carlos_ray.evaluation.oracles import create_oracle
        from carlos_ray.models import create_encoder

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.enc = create_encoder(EncoderSpec(**encoder_spec))
        self.oracle = create_oracle(oracle) if oracle else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        missing = [c for c in self.REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"JudgeImages needs columns {self.REQUIRED}; missing {missing}")
        errors = [str(e) for e in batch["error"]]
        bad = [e for e in errors if e]
        if bad:  # an adapter that passed indexing but fails now is a bug worth stopping for
            raise RuntimeError(f"generation failed while judging: {bad[0]}")
        images = np.ascontiguousarray(batch["image"])
        ok = np.asarray(batch["finite"], bool)
        emb = self.enc.encode_images(images).astype(np.float32)
        ok &= np.isfinite(emb).all(axis=1)
        attrs = self.oracle.attributes(images) if self.oracle is not None else [[] for _ in range(len(images))]
        return {
            "lora_id": [str(x) for x in batch["lora_id"]],
            "prompt": [str(x) for x in batch["cache_prompt"]],
            "seed": np.asarray(batch["seed"], np.int64),
            "finite": ok,
            "embedding": [e.tolist() for e in emb],
            "attributes": [sorted(a) for a in attrs],
        }


def generation_key(cfg: Config, oracle: str | None) -> str:
    """What changes a judged image: generator, LoRA scale, trigger-word policy, encoder and oracle."""
    g, e, s = cfg.generator, cfg.encoder, cfg.sampling
    payload = {
        "generator": {k: getattr(g, k) for k in ("kind", "model", "variant", "dtype", "vae_dtype", "resolution", "steps",
                                                 "guidance_scale", "negative_prompt", "seed", "lora_scale")},
        "encoder": {k: getattr(e, k) for k in ("kind", "arch", "pretrained", "dtype", "seed")},
        "trigger": [s.trigger_words, s.trigger_joiner], "oracle": oracle or "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class JudgeCache:
    """Judged images keyed by (lora_id, prompt, seed), one Parquet file per generation key."""

    def __init__(self, directory: str | Path, key: str):
        self.path = Path(directory) / f"judged-{key}.parquet"
        self.table = pq.read_table(self.path, schema=CACHE_SCHEMA) if self.path.is_file() else CACHE_SCHEMA.empty_table()

    def keys(self) -> set[tuple[str, str, int]]:
        cols = (self.table.column(c).to_pylist() for c in ("lora_id", "prompt", "seed"))
        return set(zip(*cols))

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        merged = pa.concat_tables([self.table, table.select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA)])
        merged = merged.sort_by([("lora_id", "ascending"), ("prompt", "ascending"), ("seed", "ascending")])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(merged, tmp)
        os.replace(tmp, self.path)
        self.table = merged


def judge_rows(loras: Sequence[JudgeLora], prompts: Sequence[str], seeds: Sequence[int], cfg: Config,
               have: set[tuple[str, str, int]]) -> list[dict]:
    """LoRA-major generation rows for every (lora, prompt, seed) not yet judged; `BASE_ID` is the base model."""
    from carlos_ray.indexing import LoraJob, lora_prompt

    rows = []
    for lora in loras:
        job = None if lora.lora_id == BASE_ID else LoraJob(lora_id=lora.lora_id, path=lora.path, sha256="", format="",
                                                            rank=0, name="", trigger_words=list(lora.trigger_words))
        for pi, text in enumerate(prompts):
            for si, seed in enumerate(seeds):
                if (lora.lora_id, text, int(seed)) in have:
                    continue
                rows.append({"lora_id": lora.lora_id, "lora_path": lora.path, "prompt": lora_prompt(text, job, cfg),
                             "cache_prompt": text, "prompt_idx": pi, "seed_idx": si, "seed": int(seed)})
    return rows


def run_judge_pass(rows: list[dict], cfg: Config, oracle: str | None) -> pa.Table:
    """Generate and judge `rows` on Ray Data: GenerateImages pool (as indexing) -> JudgeImages pool."""
    import ray
    import ray.data

    from carlos_ray.indexing.stages import GenerateImages, _map_batches, _stage_kwargs, data_context
    from carlos_ray.runtime import ensure_ray
    from carlos_ray.models import encoder_image_size

    if not rows:
        return CACHE_SCHEMA.empty_table()
    ensure_ray()
    data_context(cfg)
    t0 = time.time()
    res = cfg.resources
    per_block = max(1, res.generate.batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // (per_block * 4)))
    ds = _map_batches(ds, GenerateImages, fn_constructor_kwargs=dict(
        generator_spec=cfg.generator.model_dump(), output_size=encoder_image_size(cfg.encoder),
        torch_threads=res.generate.torch_threads), **_stage_kwargs(res.generate, cfg))
    ds = _map_batches(ds, JudgeImages, fn_constructor_kwargs=dict(
        encoder_spec=cfg.encoder.model_dump(), oracle=oracle, torch_threads=res.embed.torch_threads),
        batch_format="numpy", **_stage_kwargs(res.embed, cfg))
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables([t.select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA) for t in tables])
    if table.num_rows != len(rows):
        raise RuntimeError(f"the judge pass returned {table.num_rows} rows for {len(rows)} requested")
    logger.info("judge pass: %d images generated and judged in %.1f s", len(rows), time.time() - t0)
    return table


@dataclass
class JudgedImages:
    """Per LoRA: unit image features (n, d) and the oracle's attribute sets, in (prompt, seed) order."""

    features: dict[str, np.ndarray]
    attributes: dict[str, list[frozenset[str]]]
    nonfinite: dict[str, int]


def judged_images(cache: JudgeCache, lora_ids: Sequence[str], prompts: Sequence[str], seeds: Sequence[int]) -> JudgedImages:
    """The judged images of each LoRA on exactly these prompts and seeds (all must be in the cache)."""
    want = {(p, int(s)) for p in prompts for s in seeds}
    t = cache.table
    ids, ps, ss = (t.column(c).to_pylist() for c in ("lora_id", "prompt", "seed"))
    fin = t.column("finite").to_pylist()
    emb = t.column("embedding").to_pylist()
    att = t.column("attributes").to_pylist()
    lset = set(lora_ids)
    picked: dict[str, list[tuple[tuple[str, int], int]]] = {lid: [] for lid in lora_ids}
    for i, (lid, p, s) in enumerate(zip(ids, ps, ss)):
        if lid in lset and (p, s) in want:
            picked[lid].append(((p, s), i))
    feats, attrs, nonfinite = {}, {}, {}
    for lid, items in picked.items():
        if len(items) != len(want):
            raise RuntimeError(f"judge cache holds {len(items)} of {len(want)} images of LoRA {lid!r}")
        items.sort()
        rows = [i for _, i in items]
        good = [i for i in rows if fin[i]]
        x = np.asarray([emb[i] for i in good], np.float64).reshape(len(good), -1)
        n = np.linalg.norm(x, axis=1, keepdims=True)
        feats[lid] = np.divide(x, n, out=np.zeros_like(x), where=n > 0)
        attrs[lid] = [frozenset(att[i] or []) if fin[i] else frozenset() for i in rows]
        nonfinite[lid] = len(rows) - len(good)
    return JudgedImages(feats, attrs, nonfinite)
