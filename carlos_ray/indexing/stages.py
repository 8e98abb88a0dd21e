"""The two Ray Data stages, callable classes that load their model once and take a batch dict.

- :class:`GenerateImages`: (lora_id, lora_path, prompt, seed) rows -> images at the encoder's input size;
- :class:`EmbedDiff`: images -> CLIP embeddings -> diffs against the base -> map-side PartialStats per LoRA.

:func:`generate_and_embed` chains them as two actor pools with the resources of the config.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from carlos_ray.config import Config, StageResources
from carlos_ray.indexing.quarantine import WORKER_CRASHED
from carlos_ray.signatures import PartialStats
from carlos_ray.store import png_bytes

if TYPE_CHECKING:  # pragma: no cover
    from carlos_ray.indexing.plan import IndexPlan

logger = logging.getLogger(__name__)

THUMBS_PER_LORA = 8


def setup_worker(torch_threads: int | None) -> None:
    import torch

    from carlos_ray.runtime import quiet_libraries

    if torch_threads:
        torch.set_num_threads(torch_threads)
    quiet_libraries()


class GenerateImages:
    """Ray Data stage: (lora_id, lora_path, prompt, seed) rows -> images at encoder size (uint8)."""

    REQUIRED = ("lora_id", "lora_path", "prompt", "seed")

    def __init__(self, generator_spec: dict, output_size: int, torch_threads: int | None = None, registry: Any = None):
        from carlos_ray.config import GeneratorSpec
        from carlos_ray.models import create_generator

        setup_worker(torch_threads)
        self.registry = registry
        self.actor_id = ""
        if registry is not None:
            import ray

            self.actor_id = ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
            lost = self._registry_call("actor_started", self.actor_id)
            if lost:
                logger.warning("this generation actor was restarted; its previous process died while generating "
                               "with LoRA %s", lost)
        self.gen = create_generator(GeneratorSpec(**generator_spec), output_size)

    def _registry_call(self, method: str, *args: Any) -> Any:
        """A blocking call to the registry; without a registry (or if it is gone) quarantine is simply off."""
        if self.registry is None:
            return None
        import ray

        try:
            return ray.get(getattr(self.registry, method).remote(*args), timeout=60)
        except Exception as e:  # noqa: BLE001 - the registry is an aid, never a reason to fail a batch
            logger.warning("in-flight registry unavailable (%s); quarantine of crashing LoRAs is off", e)
            self.registry = None
            return None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in self.REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"GenerateImages needs columns {self.REQUIRED}; missing {missing}")
        t0 = time.perf_counter()
        n = len(batch["seed"])
        size = self.gen.output_size
        images = np.zeros((n, size, size, 3), np.uint8)
        finite = np.zeros(n, bool)
        errors = np.array([""] * n, dtype=object)
        ids = [str(x) for x in batch["lora_id"]]
        start = 0
        while start < n:  # consecutive runs of one LoRA (rows are LoRA-major)
            end = start
            while end < n and ids[end] == ids[start]:
                end += 1
            lid = ids[start]
            crashes = self._registry_call("begin", self.actor_id, os.getpid(), lid) if lid else None
            if crashes:
                errors[start:end] = (f"{WORKER_CRASHED}: generating with this LoRA killed its worker process {crashes} "
                                     "times (out of memory, a crash in native code, or a kill); quarantined")
                start = end
                continue
            try:
                self.gen.activate(lid or None, str(batch["lora_path"][start]) or None)
                imgs, ok = self.gen.generate([str(p) for p in batch["prompt"][start:end]], [int(s) for s in batch["seed"][start:end]])
                images[start:end], finite[start:end] = imgs, ok
            except Exception as e:  # a file that passed inspection but fails to load: reject that LoRA only
                logger.warning("generation failed for LoRA %s: %s", lid, e)
                errors[start:end] = f"{type(e).__name__}: {e}"[:500]
            if lid:
                self._registry_call("end", self.actor_id, lid)
            start = end
        out = {k: v for k, v in batch.items() if k not in ("prompt", "lora_path")}
        out.update(image=images, finite=finite, error=errors,
                   gen_seconds=np.full(n, (time.perf_counter() - t0) / max(n, 1)))
        return out


class EmbedDiff:
    """Ray Data stage: images -> CLIP embeddings -> diffs against the base -> one PartialStats row per LoRA in the batch.

    With `base=None` it is the base pass: it returns the raw embeddings per row instead."""

    REQUIRED = ("lora_id", "prompt_idx", "seed_idx", "image", "finite", "error")

    def __init__(self, encoder_spec: dict, n_prompts: int, base: np.ndarray | None, keep_diffs: bool = False,
                 keep_thumbnails: bool = False, thumbnail_size: int = 32, torch_threads: int | None = None):
        from carlos_ray.config import EncoderSpec
        from carlos_ray.models import create_encoder

        setup_worker(torch_threads)
        self.enc = create_encoder(EncoderSpec(**encoder_spec))
        self.n_prompts = n_prompts
        self.base = base  # (n_prompts, n_seeds, d) float32
        self.keep_diffs = keep_diffs
        self.keep_thumbnails = keep_thumbnails
        self.thumbnail_size = thumbnail_size

    def _thumb(self, img: np.ndarray) -> bytes:
        from PIL import Image

        im = Image.fromarray(img)
        if im.size[0] != self.thumbnail_size:
            im = im.resize((self.thumbnail_size, self.thumbnail_size), Image.BICUBIC)
        return png_bytes(np.asarray(im))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        missing = [c for c in self.REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"EmbedDiff needs columns {self.REQUIRED}; missing {missing}")
        t0 = time.perf_counter()
        ok = np.asarray(batch["finite"], bool) & (np.asarray([e == "" for e in batch["error"]]))
        emb = np.full((len(ok), self.enc.embed_dim), np.nan, np.float32)
        if ok.any():
            emb[ok] = self.enc.encode_images(np.ascontiguousarray(batch["image"][ok]))
        ok &= np.isfinite(emb).all(axis=1)
        pidx = np.asarray(batch["prompt_idx"], np.int64)
        sidx = np.asarray(batch["seed_idx"], np.int64)
        if self.base is None:
            rows = [{"prompt_idx": int(pidx[i]), "seed_idx": int(sidx[i]), "finite": bool(ok[i]),
                     "embedding": emb[i].tolist(),
                     "thumb": self._thumb(batch["image"][i]) if self.keep_thumbnails and sidx[i] == 0 else None}
                    for i in range(len(ok))]
            return pa.Table.from_pylist(rows)
        rows = []
        ids = np.asarray([str(x) for x in batch["lora_id"]])
        for lid in dict.fromkeys(ids.tolist()):
            sel = ids == lid
            good = sel & ok
            diffs = emb[good] - self.base[pidx[good], sidx[good]]
            part = PartialStats.from_diffs(diffs, pidx[good], self.n_prompts, sidx[good]) if good.any() else PartialStats.empty(
                self.enc.embed_dim, self.n_prompts)
            errs = [e for e in batch["error"][sel] if e]
            row = {"lora_id": lid, "n_rows": int(sel.sum()), "sample_keys": (pidx[sel] << 32 | sidx[sel]).tolist(), "n_nonfinite": int((sel & ~ok).sum()) - (int(sel.sum()) if errs else 0),
                   "error": errs[0] if errs else "", **part.to_row()}
            if self.keep_diffs:
                row["diff_prompt_idx"] = pidx[good].tolist()
                row["diff_seed_idx"] = sidx[good].tolist()
                row["diffs"] = diffs.astype(np.float16).ravel().tolist()
            if self.keep_thumbnails:
                t = np.flatnonzero(good & (sidx == 0))[:THUMBS_PER_LORA]
                row["thumb_prompt_idx"] = pidx[t].tolist()
                row["thumbs"] = [self._thumb(batch["image"][i]) for i in t]
            row["gen_seconds"] = float(np.asarray(batch.get("gen_seconds", np.zeros(len(ok))))[sel].sum())
            rows.append(row)
        per_row = (time.perf_counter() - t0) / max(len(ok), 1)
        for row in rows:
            row["embed_seconds"] = per_row * row["n_rows"]
        return pa.Table.from_pylist(rows)


def data_context(cfg: Config):
    """Ray Data settings of both passes, chosen for exactly-once indexing (see docs/RELIABILITY.md)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.max_errored_blocks = 0  # a failed block fails the pass: rows are never dropped silently
    ctx.actor_task_retry_on_errors = False  # stage exceptions are deterministic; a failing LoRA becomes a reject
    ctx.enable_progress_bars = logger.isEnabledFor(logging.INFO)
    return ctx


def _stage_kwargs(stage: StageResources, cfg: Config) -> dict:
    import ray.data

    return dict(
        compute=ray.data.ActorPoolStrategy(size=stage.actors),
        batch_size=stage.batch_size,
        num_gpus=stage.num_gpus or None,
        num_cpus=stage.num_cpus,
        # Bounded where Ray Data's default is unbounded. Ray 2.60's map_batches names label_selector,
        # fallback_strategy, max_calls, resources, accelerator_type and runtime_env, but no actor max_restarts /
        # max_task_retries: these two still go through its (deprecated) **ray_remote_args, here only.
        max_restarts=cfg.resources.max_restarts,
        max_task_retries=cfg.resources.max_task_retries,
    )


def _map_batches(ds, fn, **kwargs):
    import warnings

    with warnings.catch_warnings():  # Ray 2.60 deprecates **ray_remote_args but has no named max_restarts yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated", category=DeprecationWarning)
        return ds.map_batches(fn, **kwargs)


def generate_and_embed(ds, plan: "IndexPlan", base: np.ndarray | None, registry: Any = None):
    """The two actor-pool stages; `base=None` is the base pass (raw embeddings, no diffs)."""
    cfg = plan.cfg
    ds = _map_batches(ds, GenerateImages, fn_constructor_kwargs=dict(
        generator_spec=cfg.generator.model_dump(), output_size=plan.image_size,
        torch_threads=cfg.resources.generate.torch_threads, registry=registry),
        **_stage_kwargs(cfg.resources.generate, cfg))
    return _map_batches(ds, EmbedDiff, fn_constructor_kwargs=dict(
        encoder_spec=cfg.encoder.model_dump(), n_prompts=len(plan.prompts), base=base,
        keep_diffs=cfg.indexing.keep_diffs and base is not None, keep_thumbnails=cfg.indexing.keep_thumbnails,
        thumbnail_size=cfg.indexing.thumbnail_size, torch_threads=cfg.resources.embed.torch_threads),
        batch_format="numpy", **_stage_kwargs(cfg.resources.embed, cfg))
