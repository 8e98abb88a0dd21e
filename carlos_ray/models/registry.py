"""The embedded models: packaged configs (and, for trained ones, packaged weights), nothing downloaded.

A generator's `generator.model` or an encoder's `encoder.arch` that names an entry here is built from the
package; any other name goes to diffusers' `from_pretrained` / open_clip. Adding an embedded model (e.g. the
micro world) is one entry in each of the two tables below: every place that needs to know about embedded models
(building the pipeline, the LoRA-target shapes, the encoder and its input size, weight availability) asks here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

import torch

from carlos_ray.config import EncoderSpec, GeneratorSpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model_config(name: str) -> dict:
    """A JSON model config shipped in `carlos_ray/models/configs/`."""
    return json.loads((resources.files("carlos_ray.models") / "configs" / name).read_text())


def _seeded_sdxl(cfg: dict, spec: GeneratorSpec) -> Any:
    """A real StableDiffusionXLPipeline from a packaged config with seeded random weights (the `tiny` builder)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from carlos_ray.models.tokenizer import build_clip_tokenizer

    seed = spec.seed
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**cfg["vae"])
    te_cfg = CLIPTextConfig(**cfg["text_encoder"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(te_cfg)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg.get("text_encoder_2", cfg["text_encoder"])))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(pad_token="<|endoftext|>"),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**cfg["scheduler"]),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seeded_clip(cfg: dict, spec: EncoderSpec) -> Any:
    """An open_clip CLIP from a packaged config with seeded random weights (the `tiny` builder)."""
    import open_clip

    torch.manual_seed(spec.seed)
    return open_clip.model.CLIP(**cfg)


def _micro_sdxl(cfg: dict, spec: GeneratorSpec) -> Any:
    """The trained micro-world SDXL (`carlos_ray/world/weights/`, built from `micro_sdxl.json`)."""
    from carlos_ray.world.micro import load_sdxl_pipeline

    return load_sdxl_pipeline()


def _micro_clip(cfg: dict, spec: EncoderSpec) -> Any:
    """The trained micro-world CLIP (open_clip model config `micro_clip`, packaged safetensors)."""
    from carlos_ray.world.micro import load_clip

    return load_clip()[0]


@dataclass(frozen=True)
class EmbeddedGenerator:
    """An SDXL-shaped generator built from a packaged JSON config (`unet`, `vae`, `text_encoder`, `scheduler`).

    `build(config, spec)` returns the pipeline; the default gives seeded random weights (a trained model's builder
    loads its packaged safetensors instead)."""

    config: str
    build: Callable[[dict, GeneratorSpec], Any] = _seeded_sdxl

    def model_config(self) -> dict:
        return load_model_config(self.config)

    def pipeline(self, spec: GeneratorSpec) -> Any:
        """The pipeline in `spec.dtype` (VAE in `spec.vae_dtype`), on the CPU."""
        pipe = self.build(self.model_config(), spec)
        pipe.to(dtype=TORCH_DTYPES[spec.dtype])
        pipe.vae.to(TORCH_DTYPES[spec.vae_dtype])
        return pipe

    def module_configs(self) -> tuple[dict, Any, Any]:
        """(UNet config dict, CLIPTextConfig, CLIPTextConfig) for building the modules on the meta device."""
        from transformers import CLIPTextConfig

        cfg = self.model_config()
        return cfg["unet"], CLIPTextConfig(**cfg["text_encoder"]), CLIPTextConfig(**cfg.get("text_encoder_2", cfg["text_encoder"]))


@dataclass(frozen=True)
class EmbeddedEncoder:
    """An open_clip CLIP built from a packaged JSON config (the keyword arguments of `open_clip.model.CLIP`);
    `build(config, spec)` returns the model (default: seeded random weights)."""

    config: str
    build: Callable[[dict, EncoderSpec], Any] = _seeded_clip
    weights: str = "random weights"  # what its parameters are, as reports name them

    def model(self, spec: EncoderSpec) -> Any:
        return self.build(load_model_config(self.config), spec)

    def tokenizer(self) -> Any:
        """open_clip's CLIP BPE tokenizer at the config's context length (77 unless the config says otherwise)."""
        import open_clip

        ctx = int(load_model_config(self.config)["text_cfg"].get("context_length", 77))
        return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)

    def image_size(self) -> int:
        size = load_model_config(self.config)["vision_cfg"]["image_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)


# `generator.model` names and `encoder.arch` names of the embedded models.
EMBEDDED_GENERATORS: dict[str, EmbeddedGenerator] = {
    "tiny": EmbeddedGenerator("tiny_sdxl.json"),
    "micro": EmbeddedGenerator("micro_sdxl.json", build=_micro_sdxl),
}
EMBEDDED_ENCODERS: dict[str, EmbeddedEncoder] = {
    "tiny": EmbeddedEncoder("tiny_clip.json"),
    "micro": EmbeddedEncoder("micro_clip.json", build=_micro_clip, weights="trained on the micro world"),
}


def embedded_generator(model: str) -> EmbeddedGenerator | None:
    """The embedded generator called `model`, or None (then it is a hub id or a local directory)."""
    return EMBEDDED_GENERATORS.get(model)


def embedded_encoder(arch: str) -> EmbeddedEncoder | None:
    """The embedded encoder called `arch`, or None (then it is an open_clip architecture)."""
    return EMBEDDED_ENCODERS.get(arch)
