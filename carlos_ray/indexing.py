"""Indexing a LoRA zoo on Ray Data.

    sources ─▶ inspect (header, hash, compatibility) ─▶ rejects
    rows (lora_id, prompt, seed), LoRA-major
      ─▶ GenerateImages actor pool (pipeline built once, adapter cache, trigger words)
      ─▶ EmbedDiff actor pool (CLIP image tower, base embeddings, diffs, map-side PartialStats)
      ─▶ driver: merge partials per LoRA ─▶ finalize ─▶ atomic commit to the index

The base pass (x0 for every prompt and seed) runs once per base key and is cached in the index. A
LoRA is committed only when all its samples are in, so a killed job loses at most the LoRAs in
flight and a re-run skips everything already indexed under the same configuration hash.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

from carlos_ray.adaptive import AdaptiveRounds, Carry, RoundPlan, StoppingRule, partials_table
from carlos_ray.config import Config, resolve_path
from carlos_ray.prompts import PromptSet, load_prompt_set
from carlos_ray.signatures import PartialStats, Signature
from carlos_ray.store import Index, now_iso, png_bytes, rejects_table
from carlos_ray.uncertainty import SignatureErrors, standard_errors

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
THUMBS_PER_LORA = 8
COMPACT_AFTER_PARTS = 64


@dataclass
class LoraJob:
    """A LoRA that passed inspection and waits to be indexed."""

    lora_id: str
    path: str
    sha256: str
    format: str
    rank: int
    name: str
    description: str = ""
    trigger_words: list[str] = field(default_factory=list)
    source_url: str | None = None
    civitai_model_id: int | None = None
    civitai_version_id: int | None = None
    download_count: int | None = None


@dataclass
class IndexSummary:
    indexed: int = 0
    skipped: int = 0
    rejected: int = 0
    duplicates: int = 0
    images_generated: int = 0
    rounds: int = 0  # LoRA passes run (adaptive sampling: one per round; else 1)
    pass_retries: int = 0
    duplicate_outputs: int = 0
    base_cached: bool = False
    wall_seconds: float = 0.0
    inspect_seconds: float = 0.0
    base_seconds: float = 0.0
    lora_pass_seconds: float = 0.0
    generate_busy_seconds: float = 0.0
    embed_busy_seconds: float = 0.0
    index: str = ""
    rejects: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---- sources ---------------------------------------------------------------------------------------
def _manifest_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"manifest {path} must be .csv, .jsonl, .json or .parquet")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not r.get("path"):
            raise ValueError(f"manifest {path}: row {i + 1} has no `path`")
    return rows


def _words(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [w.strip() for w in value.replace(";", ",").split(",") if w.strip()]
    return [str(w).strip() for w in value if str(w).strip()]


def collect_sources(
    sources: Iterable[str | os.PathLike], targets: dict | None, allowed_roots: list[str] | None = None
) -> tuple[list[LoraJob], list[dict], int]:
    """Inspect every LoRA named by the sources (directories, files, manifests): (jobs, rejects, duplicates)."""
    from carlos_ray.lora import LoraRejected, check_compatible, discover_loras, inspect_lora, read_sidecar

    candidates: list[tuple[Path, dict, list[str] | None]] = []
    rejects: list[dict] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            for item in discover_loras(p):
                if isinstance(item, LoraRejected):
                    rejects.append({"path": str(item.path), "sha256": None, "code": item.code, "reason": item.reason})
                else:
                    candidates.append((item, {}, allowed_roots))
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            roots = allowed_roots or [str(p.resolve().parent)]
            for row in _manifest_rows(p):
                rp = Path(row["path"]).expanduser()
                candidates.append((rp if rp.is_absolute() else p.parent / rp, row, roots))
        elif p.is_file() or p.suffix == ".safetensors":
            candidates.append((p, {}, allowed_roots))
        else:
            raise FileNotFoundError(f"LoRA source {src} is neither a directory, a .safetensors file nor a manifest")

    jobs: dict[str, LoraJob] = {}
    duplicates = 0
    for path, row, roots in candidates:
        try:
            info = inspect_lora(path, allowed_roots=roots)
            if targets is not None:
                check_compatible(info, targets)
        except LoraRejected as e:
            rejects.append({"path": str(path), "sha256": None, "code": e.code, "reason": e.reason})
            continue
        lora_id = info.sha256[:16]
        if lora_id in jobs:
            duplicates += 1
            logger.info("%s is a duplicate of %s (same SHA-256): indexed once", path, jobs[lora_id].path)
            continue
        side = read_sidecar(info.path, metadata=info.metadata)
        extra = side.extra or {}
        jobs[lora_id] = LoraJob(
            lora_id=lora_id,
            path=str(info.path),
            sha256=info.sha256,
            format=info.format,
            rank=int(info.rank),
            name=str(row.get("name") or side.name or Path(path).stem),
            description=str(row.get("description") or side.description or ""),
            trigger_words=_words(row.get("trigger_words")) or list(side.trigger_words),
            source_url=row.get("source_url") or side.source_url,
            civitai_model_id=_int_or_none(extra.get("civitai_model_id", extra.get("modelId"))),
            civitai_version_id=_int_or_none(extra.get("civitai_version_id", extra.get("id"))),
            download_count=_int_or_none(extra.get("download_count")),
        )
    return list(jobs.values()), rejects, duplicates


def _int_or_none(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def lora_prompt(text: str, job: LoraJob | None, cfg: Config) -> str:
    """The LoRA prompt: the base prompt plus the LoRA's trigger words when the policy says so."""
    if job is None or cfg.sampling.trigger_words == "ignore" or not job.trigger_words:
        return text
    return text + cfg.sampling.trigger_joiner + ", ".join(job.trigger_words)


# ---- Ray Data stages -----------------------------------------------------------------------------
def _setup_worker(torch_threads: int | None) -> None:
    import torch

    from carlos_ray.cli import _quiet_libraries

    if torch_threads:
        torch.set_num_threads(torch_threads)
    _quiet_libraries()


class InflightRegistry:
    """Which LoRA each generation actor is working on, kept by a small actor on the driver's node.

    An actor that Ray restarts reports in from `__init__`; the LoRA its previous incarnation had in flight
    gets a crash. A LoRA with `max_crashes` crashes is quarantined: the stage emits an error for it instead of
    running it again, and the driver rejects it as `worker_crashed` while the rest of the job goes on."""

    def __init__(self, max_crashes: int):
        self.max_crashes = max_crashes
        self.inflight: dict[str, tuple[str, int]] = {}  # Ray actor id (stable across restarts) -> (lora_id, pid)
        self.crashes: dict[str, int] = defaultdict(int)

    def actor_started(self, actor_id: str) -> str | None:
        previous = self.inflight.pop(actor_id, None)
        if previous is None:
            return None
        self.crashes[previous[0]] += 1
        return previous[0]

    def begin(self, actor_id: str, pid: int, lora_id: str) -> int | None:
        """None: go ahead; else the LoRA's crash count (it is quarantined, do not run it)."""
        if self.crashes[lora_id] >= self.max_crashes:
            return self.crashes[lora_id]
        self.inflight[actor_id] = (lora_id, pid)
        return None

    def end(self, actor_id: str, lora_id: str) -> None:
        if self.inflight.get(actor_id, ("",))[0] == lora_id:
            del self.inflight[actor_id]

    def state(self) -> dict:
        return {"inflight": dict(self.inflight), "crashes": dict(self.crashes)}


REGISTRY_PREFIX = "carlos-ray-inflight-"
WORKER_CRASHED = "worker_crashed"


def start_registry(max_crashes: int):
    """The registry actor of one indexing run, pinned to the driver's node (it lives and dies with the job)."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(InflightRegistry).options(
        name=REGISTRY_PREFIX + uuid.uuid4().hex[:12], num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(max_crashes)


class GenerateImages:
    """Ray Data stage: (lora_id, lora_path, prompt, seed) rows -> images at encoder size (uint8)."""

    REQUIRED = ("lora_id", "lora_path", "prompt", "seed")

    def __init__(self, generator_spec: dict, output_size: int, torch_threads: int | None = None, registry: Any = None):
        from carlos_ray.config import GeneratorSpec
        from carlos_ray.models import create_generator

        _setup_worker(torch_threads)
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

        _setup_worker(torch_threads)
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
            part = PartialStats.from_diffs(diffs, pidx[good], self.n_prompts) if good.any() else PartialStats.empty(
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


# ---- orchestration -------------------------------------------------------------------------------
def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def _data_context(cfg: Config):
    """Ray Data settings of both passes, chosen for exactly-once indexing (see docs/RELIABILITY.md)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.max_errored_blocks = 0  # a failed block fails the pass: rows are never dropped silently
    ctx.actor_task_retry_on_errors = False  # stage exceptions are deterministic; a failing LoRA becomes a reject
    ctx.enable_progress_bars = logger.isEnabledFor(logging.INFO)
    return ctx


def _stage_kwargs(stage, cfg: Config) -> dict:
    import ray.data

    return dict(
        compute=ray.data.ActorPoolStrategy(size=stage.actors),
        batch_size=stage.batch_size,
        num_gpus=stage.num_gpus or None,
        num_cpus=stage.num_cpus,
        # Bounded where Ray Data's default is unbounded; passed as remote args, the only way Ray 2.60 takes them.
        max_restarts=cfg.resources.max_restarts,
        max_task_retries=cfg.resources.max_task_retries,
    )


def _map_batches(ds, fn, **kwargs):
    import warnings

    with warnings.catch_warnings():  # Ray 2.60 deprecates **ray_remote_args but has no named max_restarts yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated", category=DeprecationWarning)
        return ds.map_batches(fn, **kwargs)


class IndexPlan:
    """Everything derived from a config before any model runs: prompts, seeds, hashes, image size."""

    def __init__(self, cfg: Config):
        from carlos_ray.models import encoder_image_size

        self.cfg = cfg
        self.prompts: PromptSet = load_prompt_set(resolve_path(cfg.sampling.prompts), cfg.sampling.prompt_subset)
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
                            "seed_idx": si, "seed": self.seeds[si]})
        return out

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


def _generate_and_embed(ds, plan: IndexPlan, base: np.ndarray | None, registry: Any = None):
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


def run_base_pass(plan: IndexPlan, index: Index) -> np.ndarray:
    """Base embeddings (n_prompts, n_seeds, d), from the index cache or computed on Ray Data and cached."""
    import ray.data

    snap = index.snapshot()
    cached = snap.base(plan.base_key)
    if cached is not None:
        logger.info("base images: cached (%d samples)", cached.num_rows)
        return _base_array(cached, plan)
    cfg = plan.cfg
    logger.info("base pass: %d prompts x %d seeds", len(plan.prompts), len(plan.seeds))
    _data_context(cfg)
    ds = _generate_and_embed(ray.data.from_items(plan.rows([None])), plan, base=None)
    table = ds.to_arrow_refs()
    import ray as _ray

    table = pa.concat_tables(_ray.get(table)).sort_by([("prompt_idx", "ascending"), ("seed_idx", "ascending")])
    if not all(table.column("finite").to_pylist()):
        bad = table.filter(pa.compute.invert(table.column("finite"))).num_rows
        raise RuntimeError(f"the base model produced {bad} non-finite images or embeddings; fix the generator settings "
                           "(e.g. keep the VAE in float32) before indexing")
    index.commit(base=(plan.base_key, table))
    return _base_array(table, plan)


def _base_array(table: pa.Table, plan: IndexPlan) -> np.ndarray:
    n_p, n_s = len(plan.prompts), len(plan.seeds)
    if table.num_rows != n_p * n_s:
        raise RuntimeError(f"base cache has {table.num_rows} rows, expected {n_p * n_s}")
    emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
    out = np.zeros((n_p, n_s, emb.shape[1]), np.float32)
    out[np.asarray(table.column("prompt_idx")), np.asarray(table.column("seed_idx"))] = emb
    return out


def run_index(
    cfg: Config,
    sources: list[str],
    index_uri: str,
    *,
    address: str | None = None,
    commit_every: int = 1,
    max_loras: int | None = None,
    on_lora: Callable[[dict], None] | None = None,
    retry_rejected: bool = False,
) -> IndexSummary:
    """Index every LoRA in `sources` into `index_uri`; resumable and exactly-once.

    A LoRA already indexed, or already rejected by an earlier run under the same configuration hash (bad
    samples, failed load, quarantine), is skipped; `retry_rejected` runs the rejected ones again."""
    from carlos_ray.models.generator import generator_lora_targets

    t0 = time.time()
    plan = IndexPlan(cfg)
    summary = IndexSummary(index=str(index_uri))
    index = Index(index_uri)
    with index:
        index.init(plan.manifest_fields())
        jobs, rejects, summary.duplicates = collect_sources(sources, generator_lora_targets(cfg.generator))
        summary.inspect_seconds = time.time() - t0
        snap = index.snapshot()  # one read serves the skip lists and the base-cache check below
        done = snap.indexed_ids()
        rej = snap.rejects()
        rejected = set() if retry_rejected else {
            sha for sha, ch in zip(rej.column("sha256").to_pylist(), rej.column("config_hash").to_pylist())
            if sha and ch == plan.config_hash}
        todo = [j for j in jobs if j.lora_id not in done and j.sha256 not in rejected]
        summary.skipped = len(jobs) - len(todo)
        n_rejected_before = sum(j.sha256 in rejected for j in jobs)
        if n_rejected_before:
            logger.info("%d LoRAs were rejected by an earlier run and are skipped (retry_rejected / --retry-rejected "
                        "runs them again)", n_rejected_before)
        if max_loras is not None:
            todo = todo[:max_loras]
        known_rejects = set(rej.column("path").to_pylist())
        new_rejects = [r for r in rejects if r["path"] not in known_rejects]
        summary.rejects = list(rejects)
        if new_rejects:
            index.commit({"rejects": rejects_table(new_rejects, plan.config_hash)})
        logger.info("%d LoRAs usable (%d already indexed, %d duplicates), %d rejected",
                    len(jobs), summary.skipped, summary.duplicates, len(rejects))
        ensure_ray(address)
        had_base = snap.base(plan.base_key) is not None  # a rejects commit does not change the base cache
        t1 = time.time()
        base = run_base_pass(plan, index) if todo or not had_base else None
        summary.base_seconds = time.time() - t1
        summary.base_cached = had_base
        if not had_base:
            summary.images_generated += plan.samples_per_lora
        if todo:
            t2 = time.time()
            rounds = plan.adaptive_state(snap.table("partials"))
            if rounds is None:
                _lora_pass_with_retries(plan, index, todo, base, summary, commit_every, on_lora)
                summary.rounds += 1
            else:  # waves of at most max_in_flight LoRAs; resumed LoRAs (with committed rounds) first
                todo.sort(key=lambda j: j.lora_id not in rounds.carry)
                wave_size = cfg.sampling.adaptive.max_in_flight
                for start in range(0, len(todo), wave_size):
                    wave = todo[start : start + wave_size]
                    while wave:  # one Ray Data pass per round, over the LoRAs of the wave still running
                        _lora_pass_with_retries(plan, index, wave, base, summary, commit_every, on_lora, rounds)
                        summary.rounds += 1
                        wave = [j for j in wave if j.lora_id in rounds.running]
            summary.lora_pass_seconds = time.time() - t2
        index.commit(fields={"thresholds": _thresholds(cfg, index), **plan.manifest_fields()})
        if index.read_manifest()["counts"].get("parts", 0) > COMPACT_AFTER_PARTS:
            index.compact()  # one part per table again; unreferenced files removed
    summary.rejected = len(summary.rejects)
    summary.wall_seconds = time.time() - t0
    return summary


def _thresholds(cfg: Config, index: Index) -> dict:
    """Manifest default filters: the config's (paper: 9.8 / 0.041), else calibrated from the index's own distribution."""
    if cfg.indexing.max_strength is not None or cfg.indexing.min_consistency is not None:
        return {"max_strength": cfg.indexing.max_strength, "min_consistency": cfg.indexing.min_consistency, "source": "config"}
    sig = index.snapshot().signatures()
    if sig is None or sig.num_rows < 2:
        return {"max_strength": None, "min_consistency": None, "source": "none"}
    from carlos_ray.ranker import calibrate_thresholds

    return calibrate_thresholds(np.asarray(sig.column("strength")), np.asarray(sig.column("consistency")))


class IncompletePass(RuntimeError):
    """The LoRA pass ended while some LoRAs still missed samples (nothing of them was committed)."""


def is_system_failure(e: BaseException) -> bool:
    """A Ray failure of the cluster rather than of our code (node or actor lost, object lost): worth a re-run."""
    from ray.exceptions import RayError, RayTaskError

    if isinstance(e, IncompletePass):
        return True
    if isinstance(e, RayTaskError):  # an exception raised inside a task: system only if caused by another Ray failure
        return isinstance(e.cause, RayError) and is_system_failure(e.cause)
    return isinstance(e, RayError)


def _lora_pass_with_retries(plan: IndexPlan, index: Index, todo: list[LoraJob], base: np.ndarray,
                            summary: IndexSummary, commit_every: int, on_lora: Callable[[dict], None] | None,
                            rounds: AdaptiveRounds | None = None) -> None:
    """Run the LoRA pass; after a system failure, re-run it for the LoRAs not yet committed.

    Ray restarts dead actors and retries their tasks (`resources.max_restarts`, `max_task_retries`); when that is
    not enough (a node lost with a task in flight), the whole pass fails. Every finished LoRA was already committed,
    so a re-run over the rest loses and duplicates nothing. Retries stop after `resources.pass_retries` failures in
    a row with no LoRA finished, so a cluster that cannot make progress fails the job instead of looping."""
    import ray

    registry = start_registry(plan.cfg.resources.max_worker_crashes)  # quarantines LoRAs that crash their actor
    try:
        _retry_loop(plan, index, list(todo), base, summary, commit_every, on_lora, registry, rounds)
    finally:
        ray.kill(registry)


def _retry_loop(plan: IndexPlan, index: Index, remaining: list[LoraJob], base: np.ndarray, summary: IndexSummary,
                commit_every: int, on_lora: Callable[[dict], None] | None, registry: Any,
                rounds: AdaptiveRounds | None = None) -> None:
    stalled = 0
    while True:
        finished: set[str] = set()
        try:
            _run_lora_pass(plan, index, remaining, base, summary, commit_every, on_lora, finished, registry, rounds)
            return
        except Exception as e:
            if not is_system_failure(e):
                raise
            remaining = [j for j in remaining if j.lora_id not in finished]
            stalled = 0 if finished else stalled + 1
            if stalled > plan.cfg.resources.pass_retries:
                raise RuntimeError(f"the LoRA pass failed {stalled} times in a row without finishing a LoRA "
                                   f"({len(remaining)} LoRAs left; re-run to resume): {type(e).__name__}: {e}") from e
            summary.pass_retries += 1
            logger.warning("the LoRA pass failed (%s: %s); %d LoRAs committed before it, re-running the pass for "
                           "the %d left (retry %d)", type(e).__name__, str(e)[:300], len(finished), len(remaining),
                           summary.pass_retries)
            time.sleep(min(2.0 ** stalled, 10.0))


def _run_lora_pass(plan: IndexPlan, index: Index, todo: list[LoraJob], base: np.ndarray, summary: IndexSummary,
                   commit_every: int, on_lora: Callable[[dict], None] | None, finished_ids: set[str],
                   registry: Any = None, rounds: AdaptiveRounds | None = None) -> None:
    """One streaming pass over `todo`; each LoRA is committed once all its samples are in (ids go to `finished_ids`).

    With `rounds` (adaptive sampling) a LoRA's samples in this pass are its next round; once they are in, its
    merged statistics either settle (signature committed) or are committed to the `partials` table, and the
    LoRA runs again in the next pass."""
    import ray.data

    cfg = plan.cfg
    _data_context(cfg)
    rows: list[dict] = []
    expected: dict[str, int] = {}
    for job in todo:
        samples = None if rounds is None else rounds.next_samples(job.lora_id)
        job_rows = plan.rows([job], samples)
        expected[job.lora_id] = len(job_rows)
        rows += job_rows
    per_lora = max(1, len(rows) // max(len(todo), 1))
    blocks = max(1, len(rows) // (cfg.indexing.lora_block_rows or per_lora))
    ds = _generate_and_embed(ray.data.from_items(rows, override_num_blocks=blocks), plan, base=base, registry=registry)

    by_id = {j.lora_id: j for j in todo}
    acc: dict[str, PartialStats] = {}
    covered: dict[str, set[int]] = defaultdict(set)  # prompt_idx << 32 | seed_idx of every sample received
    nonfinite: dict[str, int] = defaultdict(int)
    errors: dict[str, str] = {}
    extra: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    pending: dict[str, list] = {"signatures": [], "rejects": [], "diffs": [], "thumbs": [], "partials": []}
    committed_ids: list[str] = []
    carries: dict[str, Carry | None] = {}  # adaptive: the carry each pending LoRA leaves (None: it stopped)

    def flush() -> None:
        if not any(pending.values()):
            return
        tables = {
            "signatures": signatures_table(pending["signatures"]) if pending["signatures"] else None,
            "rejects": rejects_table(pending["rejects"], plan.config_hash) if pending["rejects"] else None,
            "diffs": pa.concat_tables(pending["diffs"]) if pending["diffs"] else None,
            "thumbs": pa.Table.from_pylist(pending["thumbs"]) if pending["thumbs"] else None,
            "partials": partials_table(pending["partials"], plan.config_hash) if pending["partials"] else None,
        }
        m = index.commit(tables)
        logger.info("committed %d signatures, %d rejects, %d round partials (index version %d)",
                    len(pending["signatures"]), len(pending["rejects"]), len(pending["partials"]), m["version"])
        if rounds is not None:
            for lid, carry in carries.items():
                rounds.record(lid, carry)
            carries.clear()
        finished_ids.update(committed_ids)
        committed_ids.clear()
        for v in pending.values():
            v.clear()

    def receive(row: dict) -> bool:
        """Merge one map-side partial; False for a repeated output (a retried task delivered twice)."""
        lid = row["lora_id"]
        keys = set(row["sample_keys"])
        if keys & covered[lid]:
            if keys <= covered[lid]:
                summary.duplicate_outputs += 1
                logger.warning("ignored a repeated output for LoRA %s (%d samples already merged)", lid, len(keys))
                return False
            raise RuntimeError(f"LoRA {lid}: a pipeline output overlaps samples already merged but is not a repeat; "
                               "the index is unchanged for it")
        covered[lid] |= keys
        part = PartialStats.from_row(row)
        acc[lid] = acc[lid].merge(part) if lid in acc else part
        nonfinite[lid] += int(row["n_nonfinite"])
        summary.generate_busy_seconds += float(row.get("gen_seconds") or 0.0)
        summary.embed_busy_seconds += float(row.get("embed_seconds") or 0.0)
        if row["error"]:
            errors.setdefault(lid, row["error"])
        for k in ("diff_prompt_idx", "diff_seed_idx", "diffs", "thumb_prompt_idx", "thumbs"):
            if k in row and row[k] is not None:
                extra[lid][k].extend(list(row[k]))
        return True

    def finish(lid: str, position: int) -> None:
        job = by_id[lid]
        summary.images_generated += expected[lid]
        if rounds is None:
            carry = Carry(1, acc[lid], nonfinite[lid])
            n_taken = plan.samples_per_lora
        else:
            carry = rounds.advance(lid, acc[lid], nonfinite[lid])
            n_taken = rounds.plan.used(carry.rounds_done)
        total = carry.partial
        reject = None
        if lid in errors and errors[lid].startswith(WORKER_CRASHED + ":"):
            reject = (WORKER_CRASHED, errors[lid].split(":", 1)[1].strip())
        elif lid in errors:
            reject = ("load_failed", f"the adapter failed to load or run: {errors[lid]}")
        elif carry.n_nonfinite / n_taken > cfg.indexing.max_nonfinite_fraction:
            reject = ("nonfinite_samples", f"{carry.n_nonfinite} of {n_taken} images or embeddings were non-finite "
                      f"(limit {cfg.indexing.max_nonfinite_fraction:.0%})")
        elif total.count < 2 and (rounds is None or rounds.is_last(carry)):
            reject = ("too_few_samples", f"only {total.count} finite samples; a signature needs at least 2")
        keep_extras = True
        if reject:
            r = {"path": job.path, "sha256": job.sha256, "code": reject[0], "reason": reject[1]}
            pending["rejects"].append(r)
            summary.rejects.append(r)
            keep_extras = False
            carries[lid] = None
            logger.info("[%d/%d] rejected %s: %s", position, len(todo), job.name, reject[1])
        else:
            errs = standard_errors(total)
            if rounds is not None and not rounds.is_last(carry) and not rounds.rule.settled(errs, carry.rounds_done):
                pending["partials"].append(rounds.row(lid, carry))
                carries[lid] = carry
                logger.info("[%d/%d] %s: round %d, %d samples, direction rse %.3g, strength rse %.3g, consistency "
                            "se %.3g: not settled", position, len(todo), job.name, carry.rounds_done, total.count,
                            errs.direction_rse, errs.strength_rse, errs.consistency_se)
            else:
                sig = total.finalize(plan.categories)
                pending["signatures"].append(signature_row(job, sig, plan, errs, carry.rounds_done))
                carries[lid] = None
                summary.indexed += 1
                logger.info("[%d/%d] indexed %s  strength=%.4g±%.2g consistency=%.4g±%.2g n=%d", position, len(todo),
                            job.name, sig.strength, errs.strength_se, sig.consistency, errs.consistency_se, sig.n)
                if on_lora:
                    on_lora({"lora_id": lid, "name": job.name, "strength": sig.strength, "consistency": sig.consistency,
                             "strength_se": errs.strength_se, "consistency_se": errs.consistency_se, "n": sig.n,
                             "n_rounds": carry.rounds_done})
        if keep_extras:  # a round's diffs and thumbnails are committed with the round's statistics
            if cfg.indexing.keep_diffs and extra[lid]["diffs"]:
                pending["diffs"].append(diffs_table(lid, extra[lid], total.d))
            if cfg.indexing.keep_thumbnails:
                for pi, png in zip(extra[lid]["thumb_prompt_idx"], extra[lid]["thumbs"]):
                    pending["thumbs"].append({"lora_id": lid, "prompt_idx": pi, "png": png})
        committed_ids.append(lid)
        del acc[lid], extra[lid]

    finished = 0
    try:
        for row in ds.iter_rows():
            if receive(row) and len(covered[row["lora_id"]]) == expected[row["lora_id"]]:
                finished += 1
                finish(row["lora_id"], finished)
                if finished % commit_every == 0:
                    flush()
    finally:  # every finished LoRA is complete: commit it even when the pass fails
        flush()
    incomplete = [by_id[k].name for k in covered if len(covered[k]) < expected[k]]
    if incomplete:
        raise IncompletePass(f"the pipeline ended with incomplete LoRAs {incomplete}: nothing of them was committed")


# ---- in-process reference --------------------------------------------------------------------------
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
        out[job.lora_id] = PartialStats.from_diffs(diffs, np.array([r["prompt_idx"] for r in rows]),
                                                   len(plan.prompts)).finalize(plan.categories)
    return out
