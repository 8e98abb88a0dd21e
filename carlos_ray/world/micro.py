"""The micro models: an open_clip CLIP and the SDXL components at micro size, built from the JSON
configs in `carlos_ray/models/configs/`, saved to and loaded from `.safetensors` only.

Token embeddings: only the rows of tokens the world's captions use are trained (the others are zero
from initialisation on and get no gradient), so they are stored sparsely: `<key>::ids` (int64) and
`<key>::rows`; `unpack_state` rebuilds the full matrix. That keeps the real 49,408-token CLIP
vocabulary (the real BPE tokenizer works on any text) at a small file size.
"""

from __future__ import annotations

import functools
import json
import logging
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CLIP_MODEL_NAME = "micro_clip"
WEIGHTS_PACKAGE = "carlos_ray.world"
WEIGHT_FILES = {
    "clip": "micro_clip.safetensors",
    "vae": "micro_sdxl_vae.safetensors",
    "unet": "micro_sdxl_unet.safetensors",
    "text_encoder": "micro_sdxl_text_encoder.safetensors",
    "text_encoder_2": "micro_sdxl_text_encoder_2.safetensors",
}
_SPARSE_KEYS = ("token_embedding.weight",)


def config(name: str) -> dict:
    return json.loads((resources.files("carlos_ray.models") / "configs" / name).read_text())


def default_weights_dir() -> Path:
    """The weights shipped inside the package (`carlos_ray/world/weights/`)."""
    return Path(str(resources.files(WEIGHTS_PACKAGE) / "weights"))


@functools.lru_cache(maxsize=1)
def register_clip_config() -> str:
    """Register `micro_clip.json` with open_clip (create_model / get_tokenizer by name); returns the name."""
    import open_clip

    path = Path(str(resources.files("carlos_ray.models") / "configs" / f"{CLIP_MODEL_NAME}.json"))
    if CLIP_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(path)
    return CLIP_MODEL_NAME


def world_token_ids() -> list[int]:
    """Every token id the world's captions, prompts and zero-shot prompts can produce (plus the specials)."""
    import open_clip

    from carlos_ray.world import captions as C

    tok = open_clip.tokenizer.SimpleTokenizer()
    words: set[str] = set()
    tables = (C.SHAPE_WORDS, C.COLOUR_WORDS, C.BACKGROUND_WORDS, C.SIZE_WORDS, C.POSITION_WORDS,
              C.STYLE_ADJECTIVES, C.STYLE_PHRASES)
    for table in tables:
        for phrases in table.values():
            words.update(phrases)
    words.update(C.OPENERS)
    words.update(C.GENERIC_NOUNS)
    words.update(["a", "an", "on", "background", "plain", "shape", "object", ",", "of", "the", "image", "with"])
    for fam in ("colour", "shape", "background", "style"):
        words.update(C.zero_shot_prompts(fam).values())
    ids = {tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"], 0}  # 0 = "!" pads tokenizer_2
    for w in words:
        ids.update(tok.encode(w))
    return sorted(ids)


def zero_unused_rows(embedding: torch.nn.Embedding, keep: list[int]) -> None:
    """Zero every row but `keep` (they get no gradient, so they stay zero through training)."""
    with torch.no_grad():
        mask = torch.ones(embedding.weight.shape[0], dtype=torch.bool)
        mask[torch.tensor(keep)] = False
        embedding.weight[mask] = 0.0


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict -> safetensors-ready dict, token embeddings stored as (ids, rows)."""
    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu").contiguous()
        if key.endswith(_SPARSE_KEYS) and value.ndim == 2:
            ids = torch.nonzero(value.abs().sum(dim=1) > 0).flatten()
            out[key + "::ids"] = ids.to(torch.int64)
            out[key + "::rows"] = value[ids].contiguous()
            out[key + "::shape"] = torch.tensor(list(value.shape), dtype=torch.int64)
        else:
            out[key] = value
    return out


def unpack_state(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in packed.items():
        if key.endswith("::ids") or key.endswith("::shape"):
            continue
        if key.endswith("::rows"):
            base = key[: -len("::rows")]
            shape = tuple(int(x) for x in packed[base + "::shape"].tolist())
            full = torch.zeros(shape, dtype=value.dtype)
            full[packed[base + "::ids"]] = value
            out[base] = full
        else:
            out[key] = value
    return out


def save_module(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file(pack_state(module.state_dict()), str(tmp), metadata=metadata or {})
    os.replace(tmp, path)  # readers never see a half-written file


def load_module(module: torch.nn.Module, path: Path) -> dict[str, str]:
    """Load a `.safetensors` file written by `save_module` into `module` (strict); returns its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pickled formats are never loaded")
    if not path.is_file():
        raise FileNotFoundError(f"micro weights {path} not found (run `make world` to train them)")
    state = unpack_state(load_file(str(path)))
    module.load_state_dict(state, strict=True)
    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})


# ---- builders (random init) -----------------------------------------------------------------------
def build_clip(seed: int = 0):
    """A micro open_clip `CLIP` from `micro_clip.json`, token embedding zero outside the world's tokens."""
    import open_clip

    name = register_clip_config()
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    zero_unused_rows(model.token_embedding, world_token_ids())
    return model


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**config("micro_sdxl.json")["vae"])


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config("micro_sdxl.json")["unet"])


def build_text_encoders(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**config("micro_sdxl.json")["text_encoder"])
    keep = world_token_ids()
    torch.manual_seed(seed)
    te1 = CLIPTextModel(cfg)
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(cfg)
    for te in (te1, te2):
        zero_unused_rows(te.get_input_embeddings(), keep)
    return te1, te2


def build_tokenizers():
    from carlos_ray.models.tokenizer import build_clip_tokenizer

    n = int(config("micro_sdxl.json")["tokenizer_max_length"])
    return build_clip_tokenizer(pad_token="<|endoftext|>", model_max_length=n), build_clip_tokenizer(pad_token="!", model_max_length=n)


def build_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**config("micro_sdxl.json")["scheduler"])


def assemble_pipeline(vae, unet, te1, te2):
    """A real `StableDiffusionXLPipeline` from micro components, the real tokenizer and Euler scheduler."""
    from diffusers import StableDiffusionXLPipeline

    tok1, tok2 = build_tokenizers()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
        scheduler=build_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- loaders (trained weights) --------------------------------------------------------------------
def load_clip(weights_dir: Path | None = None):
    """The trained micro CLIP (open_clip `CLIP`, eval mode) and its tokenizer."""
    import open_clip

    d = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    model = build_clip(0)
    load_module(model, d / WEIGHT_FILES["clip"])
    return model.eval(), open_clip.get_tokenizer(register_clip_config())


def load_sdxl_pipeline(weights_dir: Path | None = None):
    """The trained micro SDXL as a `StableDiffusionXLPipeline` (float32, CPU, eval mode)."""
    d = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    vae, unet = build_vae(0), build_unet(0)
    te1, te2 = build_text_encoders(0)
    meta = load_module(vae, d / WEIGHT_FILES["vae"])
    if "scaling_factor" not in meta:
        raise ValueError(f"{d / WEIGHT_FILES['vae']} has no scaling_factor in its metadata")
    vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    for module, key in ((unet, "unet"), (te1, "text_encoder"), (te2, "text_encoder_2")):
        load_module(module, d / WEIGHT_FILES[key])
    for m in (vae, unet, te1, te2):
        m.eval().requires_grad_(False)
    return assemble_pipeline(vae, unet, te1, te2)
