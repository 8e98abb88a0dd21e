"""The CLIP encoder (open_clip): raw, un-normalized image and text features.

The paper's thresholds (strength 9.8, consistency 0.041) are on the raw ViT-B/32 feature scale, so
nothing here normalizes features.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from carlos_ray.config import EncoderSpec
from carlos_ray.models.generator import TORCH_DTYPES, load_model_config

logger = logging.getLogger(__name__)


def build_tiny_clip(seed: int = 0):
    import open_clip

    cfg = load_model_config("tiny_clip.json")
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**cfg)


def build_micro_clip():
    """The trained micro-world CLIP shipped in the package (open_clip model config `micro_clip`) and its tokenizer."""
    from carlos_ray.world.micro import load_clip

    return load_clip()


def build_open_clip(spec: EncoderSpec):
    """A named open_clip architecture with a pretrained tag, a local `.safetensors` checkpoint, or random weights."""
    import open_clip

    if spec.arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {spec.arch!r}; valid: tiny, micro, " + ", ".join(open_clip.list_models()))
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
        if spec.arch == "tiny":
            model = build_tiny_clip(spec.seed)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer()
        elif spec.arch == "micro":
            model, self.tokenizer = build_micro_clip()
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
