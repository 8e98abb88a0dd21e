"""The diffusion generator: a diffusers StableDiffusionXLPipeline with a LoRA adapter cache.

`tiny` builds a real SDXL pipeline from `configs/tiny_sdxl.json` with seeded random weights and the
offline CLIP tokenizer; anything else is loaded with `from_pretrained` (hub id or local directory,
safetensors only). Images come back resized to the encoder's input size as uint8, so only small
arrays leave the generation actor.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from carlos_ray.config import GeneratorSpec
from carlos_ray.models.registry import (  # noqa: F401 (TORCH_DTYPES and load_model_config are re-exported)
    TORCH_DTYPES,
    embedded_generator,
    load_model_config,
)

logger = logging.getLogger(__name__)



def build_tiny_sdxl_pipeline(seed: int = 0):
    """The embedded `tiny` SDXL pipeline (real classes, seeded random weights, no download)."""
    from carlos_ray.models.registry import EMBEDDED_GENERATORS

    return EMBEDDED_GENERATORS["tiny"].pipeline(GeneratorSpec(model="tiny", seed=seed))


def load_pretrained_sdxl_pipeline(spec: GeneratorSpec):
    """SDXL from a hub id or a local directory (safetensors weights only)."""
    from diffusers import StableDiffusionXLPipeline

    src = spec.model
    if Path(src).expanduser().exists():
        src = str(Path(src).expanduser())
        if not Path(src, "model_index.json").is_file():
            raise FileNotFoundError(f"{spec.model} is a directory but has no model_index.json (expected a save_pretrained pipeline)")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        src, dtype=TORCH_DTYPES[spec.dtype], use_safetensors=True, variant=spec.variant
    )
    if spec.vae_dtype != spec.dtype:
        pipe.vae = pipe.vae.to(TORCH_DTYPES[spec.vae_dtype])
        if spec.vae_dtype == "float32":
            # keep VAE in fp32 even though the pipeline may upcast/downcast it at decode time
            pipe.vae.config.force_upcast = True
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SDXLGenerator:
    """Generates (prompt, seed) images with or without a LoRA; images depend only on their own inputs."""

    def __init__(self, spec: GeneratorSpec, output_size: int):
        self.spec = spec
        self.output_size = int(output_size)
        self.device = torch.device(spec.device)
        embedded = embedded_generator(spec.model)
        pipe = embedded.pipeline(spec) if embedded is not None else load_pretrained_sdxl_pipeline(spec)
        self.pipe = pipe.to(self.device)
        self._init_lora()
        if spec.compile_unet:
            self.pipe.unet = torch.compile(self.pipe.unet)
        self.images_generated = 0

    # ---- LoRA handling -------------------------------------------------------------------------
    def lora_targets(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Module name -> (out, in) per component, for the LoRA compatibility check."""
        return generator_lora_targets(self.spec)  # from configs: loaded adapters would rename modules

    def _init_lora(self) -> None:
        from carlos_ray.lora.apply import LoraApplier

        components = {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder,
                      "text_encoder_2": self.pipe.text_encoder_2}
        self._lora = LoraApplier(components, self.lora_targets())
        self._adapters: OrderedDict = OrderedDict()  # name -> PreparedAdapter (the file's factors on the device)
        self._active: str | None = None

    def activate(self, name: str | None, path: str | None = None) -> None:
        """Make adapter `name` (loaded from `path` on first use) the only active one; None = base model.

        The file's exact per-module update is added by forward hooks (carlos_ray.lora.apply); base weights
        are never written, so None restores the base model exactly. With `lora_hotswap` the same path runs.
        """
        if name is None:
            self._lora.deactivate()
            self._active = None
            return
        if name not in self._adapters:
            if path is None:
                raise KeyError(f"adapter {name!r} is not loaded and no path was given")
            self._adapters[name] = self._lora.prepare(path)
            while len(self._adapters) > self.spec.adapter_cache_size:
                old, _ = self._adapters.popitem(last=False)
                logger.debug("evicted adapter %s", old)
        self._adapters.move_to_end(name)
        self._lora.activate(self._adapters[name], self.spec.lora_scale)
        self._active = name

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode in the VAE's own dtype (e.g. fp32 VAE under an fp16/bf16 UNet, so SDXL does not emit NaN)."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def unload_all(self) -> None:
        self._lora.deactivate()
        self._adapters.clear()
        self._active = None

    # ---- generation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, S, S, 3) uint8 at the output size and a (B,) mask of finite samples.

        Every call to the pipeline has exactly `micro_batch` samples (the last padded by repeating),
        and each sample has its own `torch.Generator`, so an image never depends on its batch-mates.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        mb = self.spec.micro_batch
        out = np.zeros((len(prompts), self.output_size, self.output_size, 3), np.uint8)
        finite = np.ones(len(prompts), bool)
        for start in range(0, len(prompts), mb):
            p = list(prompts[start : start + mb])
            s = list(seeds[start : start + mb])
            real = len(p)
            p += [p[-1]] * (mb - real)
            s += [s[-1]] * (mb - real)
            gens = [torch.Generator(device="cpu").manual_seed(int(x)) for x in s]
            split_decode = self.pipe.vae.dtype != self.pipe.unet.dtype
            res = self.pipe(
                prompt=p,
                negative_prompt=[self.spec.negative_prompt] * mb,
                num_inference_steps=self.spec.steps,
                guidance_scale=self.spec.guidance_scale,
                height=self.spec.resolution,
                width=self.spec.resolution,
                generator=gens,
                output_type="latent" if split_decode else "pt",
            ).images[:real]
            imgs = (self._decode(res) if split_decode else res).float()
            ok = torch.isfinite(imgs).flatten(1).all(dim=1)
            imgs = torch.nan_to_num(imgs, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
            if imgs.shape[-1] != self.output_size:
                imgs = torch.nn.functional.interpolate(
                    imgs, size=(self.output_size, self.output_size), mode="bicubic", antialias=True, align_corners=False
                ).clamp(0, 1)
            arr = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            out[start : start + real] = arr
            finite[start : start + real] = ok.cpu().numpy()
            self.images_generated += real
        return out, finite


def generator_registry() -> Mapping[str, type]:
    return {"sdxl": SDXLGenerator}


def generator_lora_targets(spec: GeneratorSpec) -> dict[str, dict[str, tuple[int, int]]]:
    """LoRA-able module shapes of a generator, built on the meta device: no weights are loaded or allocated."""
    import copy

    return copy.deepcopy(_generator_lora_targets(spec.model, spec.variant))


@functools.lru_cache(maxsize=8)
def _generator_lora_targets(model: str, variant: str | None) -> dict[str, dict[str, tuple[int, int]]]:
    spec = GeneratorSpec(model=model, variant=variant)
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from carlos_ray.lora import targets_from_modules

    embedded = embedded_generator(spec.model)
    if embedded is not None:
        unet_cfg, te_cfg, te2_cfg = embedded.module_configs()
    else:
        src = str(Path(spec.model).expanduser()) if Path(spec.model).expanduser().exists() else spec.model
        unet_cfg = UNet2DConditionModel.load_config(src, subfolder="unet")
        te_cfg = CLIPTextConfig.from_pretrained(src, subfolder="text_encoder")
        te2_cfg = CLIPTextConfig.from_pretrained(src, subfolder="text_encoder_2")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_cfg)
        te1 = CLIPTextModel(te_cfg)
        te2 = CLIPTextModelWithProjection(te2_cfg)
    return {
        "unet": targets_from_modules(unet.named_modules()),
        "text_encoder": targets_from_modules(te1.named_modules()),
        "text_encoder_2": targets_from_modules(te2.named_modules()),
    }
