"""The CLIP encoder (open_clip): raw, un-normalized image and text features.

The paper's thresholds (strength 9.8, consistency 0.041) are on the raw ViT-B/32 feature scale, so
nothing here normalizes features.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from carlos_ray.config import EncoderSpec
from carlos_ray.models.registry import EMBEDDED_ENCODERS, TORCH_DTYPES, embedded_encoder

logger = logging.getLogger(__name__)


def build_open_clip(spec: EncoderSpec):
    """A named open_clip architecture with a pretrained tag, a local `.safetensors` checkpoint, or random weights."""
    import open_clip

    if spec.arch not in open_clip.list_models():
        valid = sorted(EMBEDDED_ENCODERS) + list(open_clip.list_models())
        raise ValueError(f"unknown open_clip architecture {spec.arch!r}; valid: " + ", ".join(valid))
    pretrained = spec.pretrained
    if pretrained is not None and Path(pretrained).expanduser().exists():
        path = Path(pretrained).expanduser()
        if path.suffix != ".safetensors":
            raise ValueError(f"local checkpoint {path} must be a .safetensors file")
        model = open_clip.create_model(spec.arch, pretrained=None)
        from safetensors.torch import load_file

        state = load_file(str(path))
        if "state_dict" in state:  # pragma: no cover - safetensors files are flat
            state = state["state_dict"]
        own = model.state_dict()
        for key, value in state.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(f"checkpoint {path} does not fit {spec.arch}: {key} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(own[key].shape)}")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"checkpoint {path} does not fit {spec.arch}: missing {missing[:3]}")
        return model
    torch.manual_seed(spec.seed)
    return open_clip.create_model(spec.arch, pretrained=pretrained)


class OpenClipEncoder:
    """`encode_images(uint8 (B,S,S,3))` and `encode_texts(list[str])` -> raw float32 features."""

    def __init__(self, spec: EncoderSpec):
        import open_clip

        self.spec = spec
        self.device = torch.device(spec.device)
        self.dtype = TORCH_DTYPES[spec.dtype]
        embedded = embedded_encoder(spec.arch)
        if embedded is not None:
            model = embedded.model(spec)
            self.tokenizer = embedded.tokenizer()
        else:
            model = build_open_clip(spec)
            self.tokenizer = open_clip.get_tokenizer(spec.arch)
        self.model = model.to(self.device, self.dtype).eval()
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if self.model.text_projection is not None else int(
            self.model.visual.output_dim
        )

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B,H,W,3), got {images.dtype} {images.shape}")
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {images.shape[1]}x{images.shape[2]}")
        mb = self.spec.micro_batch
        out = []
        for s in range(0, len(images), mb):
            chunk = images[s : s + mb]
            real = len(chunk)
            if real < mb:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], mb - real, axis=0)])
            x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float().div_(255.0)
            x = ((x - self._mean) / self._std).to(self.device, self.dtype)
            out.append(self.model.encode_image(x, normalize=False).float().cpu().numpy()[:real])
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=False).float().cpu().numpy()


def encoder_registry() -> Mapping[str, type]:
    return {"open_clip": OpenClipEncoder}


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub refuse network access (it reads the flag at import time, so set both)."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hc

        old_const = hc.HF_HUB_OFFLINE
        hc.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        hc = None
    try:
        yield
    finally:
        if hc is not None:
            hc.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def encoder_unavailable_reason(spec: EncoderSpec, allow_download: bool = False) -> str | None:
    """Why the encoder's weights cannot be loaded here without a download, or None if they can.

    Embedded models and local files are checked directly; a pretrained tag is asked of open_clip's own
    pretrained registry and resolved by open_clip itself with the Hugging Face hub set offline, so the file it
    would load is the one checked. Never touches the network."""
    if embedded_encoder(spec.arch) is not None or spec.pretrained is None:
        return None
    local = Path(spec.pretrained).expanduser()
    if local.exists():
        return None if local.suffix == ".safetensors" else f"encoder checkpoint {local.name} is not a .safetensors file"
    import open_clip
    from open_clip.pretrained import download_pretrained

    if spec.arch not in open_clip.list_models():
        return f"unknown open_clip architecture {spec.arch!r}"
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        return f"encoder.pretrained {spec.pretrained!r} is neither a local file nor an open_clip tag of {spec.arch} (tags: {tags})"
    hub = cfg.get("hf_hub", "")
    if not hub:
        return (f"encoder weights {spec.arch}/{spec.pretrained} are only published as a pickle checkpoint, which carlos-ray "
                "does not load; point encoder.pretrained to a local .safetensors file")
    if allow_download:
        return None
    try:
        with hub_offline():
            path = str(download_pretrained(cfg, prefer_hf_hub=True) or "")
    except Exception:  # noqa: BLE001 - open_clip raises FileNotFoundError; the hub its own offline errors
        path = ""
    if path.endswith(".safetensors"):
        return None
    found = f" (only the pickle {Path(path).name} is cached)" if path else ""
    return (f"encoder weights {spec.arch}/{spec.pretrained} are not on this machine: open_clip finds no safetensors "
            f"file of {hub.rstrip('/')} in the Hugging Face cache{found}, and downloads are off; fetch them first or "
            "allow downloads (`--allow-download`, or serve arg allow_download: true)")
