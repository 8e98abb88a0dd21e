"""The plan of an indexing run: everything derived from a config before any model runs, and the rows it makes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from carlos_ray.adaptive import AdaptiveRounds, RoundPlan, StoppingRule
from carlos_ray.config import Config
from carlos_ray.indexing.sources import LoraJob
from carlos_ray.prompts import PromptSet, load_prompt_set
from carlos_ray.signatures import Signature
from carlos_ray.store import now_iso
from carlos_ray.uncertainty import SignatureErrors


def lora_prompt(text: str, job: LoraJob | None, cfg: Config) -> str:
    """The LoRA prompt: the base prompt plus the LoRA's trigger words when the policy says so."""
    if job is None or cfg.sampling.trigger_words == "ignore" or not job.trigger_words:
        return text
    return text + cfg.sampling.trigger_joiner + ", ".join(job.trigger_words)


class IndexPlan:
    """Everything derived from a config before any model runs: prompts, seeds, hashes, image size."""

    def __init__(self, cfg: Config):
        from carlos_ray.models import encoder_image_size

        self.cfg = cfg
        self.prompts: PromptSet = load_prompt_set(cfg.sampling.prompts, cfg.sampling.prompt_subset)
        self.seeds = cfg.sampling.seeds
        self.prompt_hash = self.prompts.content_hash()
        self.config_hash = cfg.config_hash(self.prompt_hash)
        self.base_key = cfg.base_key(self.prompt_hash)
        self.image_size = encoder_image_size(cfg.encoder)
        self.categories = list(self.prompts.category_of_index)
        a = cfg.sampling.adaptive
        self.rounds: RoundPlan | None = (
            RoundPlan.build(self.categories, len(self.seeds), a.round_fraction, a.order_seed) if a.enabled else None)

    def adaptive_state(self, partials: pa.Table | None) -> AdaptiveRounds | None:
        """Round state of an adaptive run, resumed from the index's `partials` table (None: not adaptive)."""
        if self.rounds is None:
            return None
        a = self.cfg.sampling.adaptive
        rule = StoppingRule(a.max_direction_rse, a.max_strength_rse, a.max_consistency_se, a.min_rounds, a.min_samples)
        return AdaptiveRounds(self.rounds, rule, self.config_hash, partials)

    @property
    def samples_per_lora(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def rows(self, jobs: list[LoraJob | None], samples: np.ndarray | None = None) -> list[dict]:
        """LoRA-major rows; `None` is the base model. `samples`: only these (prompt_idx, seed_idx) pairs."""
        if samples is None:
            samples = [(pi, si) for pi in range(len(self.prompts)) for si in range(len(self.seeds))]
        out = []
        for job in jobs:
            for pi, si in samples:
                pi, si = int(pi), int(si)
                out.append({"lora_id": job.lora_id if job else "", "lora_path": job.path if job else "",
                            "prompt": lora_prompt(self.prompts.prompts[pi].text, job, self.cfg), "prompt_idx": pi,
                            "seed_idx": si, "seed": self.seed(pi, si)})
        return out

    @property
    def independent_seeds(self) -> bool:
        """True when no two prompts share a seed (`sampling.seed_layout: per_prompt`)."""
        return self.cfg.sampling.seed_layout == "per_prompt"

    def seed(self, prompt_idx: int, seed_idx: int) -> int:
        """The generation seed of sample (prompt, seed index) under the config's seed layout."""
        if self.independent_seeds:
            return self.cfg.sampling.seed_start + seed_idx * len(self.prompts) + prompt_idx
        return self.seeds[seed_idx]

    def manifest_fields(self) -> dict:
        c = self.cfg
        return {
            "config_hash": self.config_hash,
            "base_key": self.base_key,
            "config_name": c.name,
            "generator": c.generator.model_dump(),
            "encoder": c.encoder.model_dump(),
            "sampling": c.sampling.model_dump(),
            "query": c.query.model_dump(),
            "behavior": c.behavior.model_dump(),
            "prompt_set": {"name": self.prompts.name, "hash": self.prompt_hash, "ids": list(self.prompts.ids),
                           "categories": self.categories},
            "seeds": self.seeds,
        }


def signature_row(job: LoraJob, sig: Signature, plan: IndexPlan, errs: SignatureErrors | None = None,
                  n_rounds: int | None = None) -> dict:
    return {**(errs.as_row() if errs else {}), "n_rounds": n_rounds,
        "lora_id": job.lora_id, "name": job.name, "description": job.description, "trigger_words": job.trigger_words,
        "source_path": job.path, "source_url": job.source_url, "sha256": job.sha256, "format": job.format,
        "rank": job.rank, "direction": sig.direction.tolist(), "strength": float(sig.strength),
        "consistency": float(sig.consistency), "n": int(sig.n), "strength_std": float(sig.strength_std),
        "category_names": list(sig.category_names), "category_strength": [float(x) for x in sig.category_strength],
        "category_within": [float(x) for x in sig.category_within], "config_hash": plan.config_hash,
        "civitai_model_id": job.civitai_model_id, "civitai_version_id": job.civitai_version_id,
        "download_count": job.download_count, "indexed_at": now_iso(),
    }


def diffs_table(lora_id: str, extra: dict[str, list], d: int) -> pa.Table:
    """Per-sample diffs of one LoRA, stored as float16 fixed-size lists."""
    flat = np.asarray(extra["diffs"], np.float16)
    n = flat.size // d
    return pa.table({
        "lora_id": pa.array([lora_id] * n, pa.string()),
        "prompt_idx": pa.array(extra["diff_prompt_idx"], pa.int32()),
        "seed_idx": pa.array(extra["diff_seed_idx"], pa.int32()),
        "diff": pa.FixedSizeListArray.from_arrays(pa.array(flat), d),
    })


def signatures_table(rows: list[dict]) -> pa.Table:
    from carlos_ray.schema import SIGNATURE_SCHEMA, conform_signatures

    return conform_signatures(pa.Table.from_pylist(rows, schema=SIGNATURE_SCHEMA))


def base_array(table: pa.Table, plan: IndexPlan) -> np.ndarray:
    n_p, n_s = len(plan.prompts), len(plan.seeds)
    if table.num_rows != n_p * n_s:
        raise RuntimeError(f"base cache has {table.num_rows} rows, expected {n_p * n_s}")
    emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
    out = np.zeros((n_p, n_s, emb.shape[1]), np.float32)
    out[np.asarray(table.column("prompt_idx")), np.asarray(table.column("seed_idx"))] = emb
    return out
