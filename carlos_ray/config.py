"""Typed configuration for carlos-ray, loaded from YAML.

One pydantic base with ``extra="forbid"``: a misspelled key is an error that names it. Every field has
a description; ``carlos-ray config-schema`` prints them. Two hashes derive from a config:

- ``config_hash()``: everything that changes a signature (generator, sampling, prompt set, seeds,
  encoder). A LoRA indexed under the same hash is skipped on a re-run.
- ``base_key()``: everything that changes the base images and their embeddings (the same minus LoRA
  scale and the trigger-word policy). Base embeddings are cached under it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DType = Literal["float32", "float16", "bfloat16"]


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names the problem."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class GeneratorSpec(StrictModel):
    kind: str = Field("sdxl", description="Generator family in the registry (see `carlos_ray.models.list_generators()`).")
    model: str = Field(
        "tiny",
        description="`tiny` for the embedded seeded model, `micro` for the trained micro-world SDXL, a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) "
        "or a local directory saved with `save_pretrained`.",
    )
    variant: str | None = Field(None, description="Weight file variant to load from the hub or directory (e.g. `fp16`).")
    dtype: DType = Field("float32", description="Dtype of the UNet and text encoders.")
    vae_dtype: DType = Field(
        "float32", description="Dtype of the VAE. Keep float32 for SDXL unless the VAE is fp16-safe: the stock SDXL VAE emits NaN in fp16."
    )
    device: str = Field("cpu", description="Torch device for the pipeline (`cpu`, `cuda`, `cuda:1`).")
    resolution: int = Field(64, ge=16, le=4096, description="Output image height and width in pixels (multiple of 8).")
    steps: int = Field(4, ge=1, le=500, description="Number of denoising steps.")
    guidance_scale: float = Field(5.0, ge=0.0, le=50.0, description="Classifier-free guidance scale.")
    lora_scale: float = Field(1.0, ge=0.0, le=10.0, description="Scale applied to every LoRA adapter.")
    negative_prompt: str = Field("", description="Negative prompt used for base and LoRA images alike.")
    micro_batch: int = Field(
        4,
        ge=1,
        le=256,
        description="Fixed size of every pipeline call; the last call is padded. Keeps each image bit-identical whatever its batch-mates.",
    )
    adapter_cache_size: int = Field(4, ge=1, le=256, description="Number of LoRA adapters kept loaded per generation actor.")
    compile_unet: bool = Field(False, description="`torch.compile` the UNet (GPU throughput option; pair with `lora_hotswap`).")
    lora_hotswap: bool = Field(
        False, description="Swap adapter weights in place (diffusers `enable_lora_hotswap`) so a compiled UNet never recompiles."
    )
    hotswap_max_rank: int = Field(128, ge=1, le=4096, description="Largest LoRA rank accepted when `lora_hotswap` is on.")
    seed: int = Field(0, description="Seed of the embedded `tiny` model's random weights (ignored for real models).")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {v}")
        return v

    @model_validator(mode="after")
    def _check_hotswap(self) -> "GeneratorSpec":
        if self.compile_unet and not self.lora_hotswap:
            raise ValueError("compile_unet requires lora_hotswap: true, or every new adapter recompiles the UNet")
        return self


class EncoderSpec(StrictModel):
    kind: str = Field("open_clip", description="Encoder family in the registry (see `carlos_ray.models.list_encoders()`).")
    arch: str = Field("tiny", description="`tiny` for the embedded seeded CLIP, `micro` for the trained micro-world CLIP, or an open_clip architecture name (e.g. ViT-B-32).")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (e.g. `openai`) or a local `.safetensors` checkpoint; None = random weights."
    )
    dtype: DType = Field("float32", description="Dtype of the CLIP model.")
    device: str = Field("cpu", description="Torch device for the encoder.")
    micro_batch: int = Field(
        16, ge=1, le=4096, description="Fixed size of every image-encoder call (last padded), so an embedding never depends on its batch-mates."
    )
    seed: int = Field(0, description="Seed of the embedded `tiny` model's random weights.")

    @field_validator("pretrained")
    @classmethod
    def _no_pickles(cls, v: str | None) -> str | None:
        from carlos_ray.lora.header import PICKLE_EXTENSIONS

        if v is not None and v.lower().endswith(tuple(PICKLE_EXTENSIONS)):
            raise ValueError(f"pretrained checkpoint {v!r} is a pickle format; only `.safetensors` checkpoints are loaded")
        return v


class AdaptiveSpec(StrictModel):
    """Adaptive sampling: a LoRA is sampled in rounds and stops once its signature's standard errors are small.

    Defaults come from benchmarks/bench_adaptive.py (see docs/ADAPTIVE.md)."""

    enabled: bool = Field(False, description="Sample each LoRA in rounds and stop when the bounds below hold (or at the "
                          "full protocol). Off: every LoRA gets all prompts x seeds.")
    round_fraction: float = Field(
        0.25, gt=0.0, le=1.0, description="Samples per round as a fraction of |P|, rounded up to a whole number of prompts "
        "per category; a round is the next stratified prompt subset, one seed each (all prompts get seed 0 first).")
    min_rounds: int = Field(1, ge=1, le=4096, description="Rounds every LoRA runs before the stopping rule may stop it.")
    min_samples: int = Field(
        24, ge=2, description="Samples every LoRA gets before the stopping rule may stop it: the standard errors are "
        "themselves estimates, too noisy to trust from a handful of samples.")
    max_direction_rse: float = Field(
        0.3, gt=0.0, description="Stop only when the direction's relative standard error sqrt(E|err|²)/|mean d| is at "
        "most this (about the angle, in radians, between the estimate and the true direction).")
    max_strength_rse: float = Field(
        0.1, gt=0.0, description="Stop only when strength's standard error relative to the strength is at most this "
        "(relative, so one bound serves every encoder's feature scale).")
    max_consistency_se: float = Field(
        0.05, gt=0.0, description="Stop only when consistency's standard error is at most this (a jackknife over prompts; "
        "with `sampling.seed_layout: per_prompt`, the error over seeds once every prompt has a sample).")
    order_seed: int = Field(0, ge=0, description="Seed of the within-category prompt shuffle that fixes the sample order.")
    max_in_flight: int = Field(
        256, ge=1, le=1_000_000, description="LoRAs sampled in rounds together (a wave); the next wave starts when this "
        "one is done. Bounds the driver's memory and the index's `partials` table to this many LoRAs' statistics "
        "(O(|P| d) each, ~1.1 MB at 280 x 512).")


class SamplingSpec(StrictModel):
    prompts: str = Field("conf/prompts/index_prompts.yaml", description="Indexing prompt set P (YAML), relative to the repo or absolute.")
    prompt_subset: str | None = Field(None, description="Named subset of P to use (e.g. `tiny`, `small`); None = all prompts.")
    context_prompts: str = Field(
        "conf/prompts/context_prompts.yaml", description="Query-context prompt set P' (YAML) for the query encoder."
    )
    context_subset: str | None = Field(None, description="Named subset of P' to use; None = all.")
    seed_start: int = Field(42, ge=0, description="First generation seed; seeds are seed_start .. seed_start+num_seeds-1.")
    num_seeds: int = Field(16, ge=1, le=4096, description="Number of seeds per prompt.")
    seed_layout: Literal["shared", "per_prompt"] = Field(
        "shared", description="`shared`: every prompt uses the same seeds (the paper). `per_prompt`: sample (prompt p, seed "
        "index j) uses seed_start + j*|P| + p, so no two prompts share a seed: their noise is independent, which "
        "makes signatures less noisy for the same samples and lets adaptive sampling state seed errors it can trust "
        "(docs/ADAPTIVE.md). Either way a LoRA image and its base image share the seed.")
    trigger_words: Literal["append", "ignore"] = Field(
        "append", description="`append`: add the LoRA's trigger words to the LoRA prompt only (as the reference); `ignore`: never."
    )
    trigger_joiner: str = Field(", ", description="Text placed between the prompt and the trigger words.")
    adaptive: AdaptiveSpec = Field(default_factory=AdaptiveSpec, description="Adaptive sampling in rounds (off by default).")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed_start, self.seed_start + self.num_seeds))


class StageResources(StrictModel):
    actors: int = Field(1, ge=1, le=4096, description="Size of the actor pool.")
    batch_size: int = Field(4, ge=1, le=65536, description="Rows per batch handed to an actor.")
    num_gpus: float = Field(0.0, ge=0.0, le=64.0, description="GPUs per actor (fractional allowed, e.g. 0.5).")
    num_cpus: float = Field(1.0, ge=0.0, le=256.0, description="CPUs reserved per actor.")
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch.set_num_threads inside the actor; None = torch default.")


class ResourcesSpec(StrictModel):
    generate: StageResources = Field(default_factory=StageResources, description="Generation actor pool.")
    embed: StageResources = Field(default_factory=StageResources, description="CLIP embedding actor pool.")
    max_task_retries: int = Field(
        3, ge=0, le=100, description="Retries of an actor task lost to a dead or unreachable actor (Ray `max_task_retries`; "
        "Ray Data's default is unbounded, which lets a crash loop hang a job).")
    max_restarts: int = Field(3, ge=0, le=100, description="Restarts of a dead actor, e.g. killed or OOM (Ray `max_restarts`).")
    max_worker_crashes: int = Field(
        2, ge=1, le=100, description="A LoRA in flight when its generation actor died this many times (OOM, native "
        "crash) is quarantined: rejected as `worker_crashed` while the rest of the job goes on.")
    pass_retries: int = Field(
        2, ge=0, le=100, description="Re-runs of the LoRA pass after a Ray system failure (node lost, actor unreachable, object "
        "lost) in a row without a LoRA finishing in between; committed LoRAs are never redone.")


class IndexingSpec(StrictModel):
    max_strength: float | None = Field(None, gt=0, description="Default strength filter stored in the manifest (paper: 9.8).")
    min_consistency: float | None = Field(None, ge=-1, le=1, description="Default consistency filter stored in the manifest (paper: 0.041).")
    max_nonfinite_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="A LoRA whose fraction of non-finite images/embeddings exceeds this is rejected."
    )
    keep_diffs: bool = Field(False, description="Also store every per-sample diff (float16) in the index.")
    keep_thumbnails: bool = Field(False, description="Also store small base/LoRA image pairs for reports.")
    thumbnail_size: int = Field(32, ge=8, le=256, description="Edge of kept thumbnails in pixels.")
    lora_block_rows: int = Field(
        0, ge=0, description="Rows per Ray Data block in the LoRA pass; 0 = one LoRA's prompts×seeds per block."
    )


class QuerySpec(StrictModel):
    joiner: str = Field(" ", description="Text between a context prompt p' and the query q (the reference uses one space).")
    max_query_chars: int = Field(300, ge=1, le=10000, description="Longest accepted query, in characters.")
    cache_size: int = Field(4096, ge=0, description="LRU cache of encoded queries.")


class BehaviorSpec(StrictModel):
    """How tags, groups and duplicates read an index built with this profile (stored in its manifest)."""

    family_min_cosine: float = Field(
        0.95, gt=0, le=1,
        description="Cosine from which two LoRAs of different strength are one scale family (duplicates need "
                    "cosine >= 0.95 and a similar strength). A model whose image features saturate turns a "
                    "LoRA's direction as its weight changes: set it below 0.95 there (conf/micro.yaml).")
    group_max_distance: float = Field(
        0.15, gt=0, le=2,
        description="Content groups: largest average cosine distance of a merge (0.15: members of a group have "
                    "a mean cosine >= 0.85). See carlos_ray.behavior.groups.")


class Config(StrictModel):
    name: str = Field("custom", description="Free-form name of this configuration.")
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec, description="Diffusion generator.")
    encoder: EncoderSpec = Field(default_factory=EncoderSpec, description="CLIP encoder.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Prompts, seeds and trigger-word policy.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray actor pools.")
    indexing: IndexingSpec = Field(default_factory=IndexingSpec, description="Index contents and rejection policy.")
    query: QuerySpec = Field(default_factory=QuerySpec, description="Query encoding.")
    behavior: BehaviorSpec = Field(default_factory=BehaviorSpec, description="Tags, groups and duplicates.")

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        """Load a YAML config (safe loader); errors name the file and the offending key."""
        from carlos_ray.paths import find_conf_file

        p = find_conf_file(path)
        if p is None:
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Config":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{source}: {format_validation_error(e)}") from None

    def _hash(self, payload: dict) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _base_payload(self, prompt_hash: str) -> dict:
        g = self.generator
        return {
            "generator": {k: getattr(g, k) for k in ("kind", "model", "variant", "dtype", "vae_dtype", "resolution", "steps",
                                                     "guidance_scale", "negative_prompt", "seed")},
            "encoder": {k: getattr(self.encoder, k) for k in ("kind", "arch", "pretrained", "dtype", "seed")},
            "prompts": prompt_hash,
            "seeds": self.sampling.seeds,
            # only when not the default, so every shared-seed cache and index keeps its key
            **({"seed_layout": self.sampling.seed_layout} if self.sampling.seed_layout != "shared" else {}),
        }

    def base_key(self, prompt_hash: str) -> str:
        """Key of the base-image embedding cache: what changes x0 and v(x0)."""
        return self._hash(self._base_payload(prompt_hash))

    def config_hash(self, prompt_hash: str) -> str:
        """Key of a signature: base key plus LoRA scale and trigger-word policy."""
        payload = self._base_payload(prompt_hash)
        payload["lora"] = {
            "scale": self.generator.lora_scale,
            "trigger_words": self.sampling.trigger_words,
            "trigger_joiner": self.sampling.trigger_joiner,
        }
        if self.sampling.adaptive.enabled:  # adaptive signatures use fewer samples: another index
            payload["adaptive"] = self.sampling.adaptive.model_dump(exclude={"max_in_flight"})
        return self._hash(payload)


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key `{loc}`")
        else:
            parts.append(f"`{loc}`: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def config_schema_markdown() -> str:
    """Markdown reference of every config field (used for the README's config reference)."""
    lines = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = f.get_default(call_default_factory=True)
            lines.append(f"| `{prefix}{name}` | `{default!r}` | {f.description} |")

    walk(Config, "")
    return "| key | default | meaning |\n| --- | --- | --- |\n" + "\n".join(lines)
