"""Measurements of the micro models against the pixel oracle, on held-out renders and combinations.

- `clip_zero_shot(model, tokenizer, n)`: per attribute family (colour, shape, style), the share of
  held-out renders whose best-matching class prompt (an ensemble of templates) is the true class.
- `generator_following(pipe, n)`: per family, the share of images generated from prompts with a
  held-out (shape, colour) or (shape, style) pair that the oracle reads as the prompt says; and how
  different two seeds of one prompt are (mean absolute pixel difference, 0-255).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from carlos_ray.world import captions as C
from carlos_ray.world import oracle as O
from carlos_ray.world import render as R
from carlos_ray.world.train import held_out_scenes

logger = logging.getLogger(__name__)

COLOUR_KEEPING = tuple(s for s in R.STYLES if s not in ("grayscale", "sepia"))


def zero_shot_templates(family: str) -> dict[str, list[str]]:
    """Class -> several prompts (their normalized text features are averaged)."""
    if family == "colour":
        return {c: [f"a {w[0]} shape", f"a {w[0]} object", f"an image of a {w[0]} shape"] for c, w in C.COLOUR_WORDS.items()}
    if family == "shape":
        return {s: [C._article(w[0]), f"an image of a {w[0]}", f"a picture of a {w[0]}"] for s, w in C.SHAPE_WORDS.items()}
    if family == "style":
        out = {s: [f"a {C.STYLE_ADJECTIVES[s][0]} shape", f"a shape {C.STYLE_PHRASES[s][0]}",
                   f"an image of a {C.STYLE_ADJECTIVES[s][0]} object"] for s in R.STYLES}
        out["none"] = ["a plain shape", "a plain object", "an image of a plain shape"]
        return out
    raise ValueError(f"unknown attribute family {family!r}; valid: colour, shape, style")


def _truth(scene: R.Scene, family: str) -> str:
    if family == "style":
        return scene.styles[0] if scene.styles else "none"
    return getattr(scene, family)


@torch.inference_mode()
def clip_zero_shot(model, tokenizer, n: int = 300, seed: int = 1234) -> dict[str, float]:
    """Zero-shot accuracy per family on `n` held-out renders per family."""
    import open_clip

    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    rng = np.random.default_rng(seed)
    out = {}
    for k, fam in enumerate(("colour", "shape", "style")):
        kw = {"styles": COLOUR_KEEPING} if fam == "colour" else {}
        # a fixed seed per family (str hash() is salted per process)
        scenes = held_out_scenes(n, seed + 101 * (k + 1), p_style=0.85 if fam == "style" else 0.5, **kw)
        imgs = torch.from_numpy(np.stack([R.render(s, rng=rng) for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
        feats = model.encode_image((imgs - mean) / std, normalize=True)
        tmpl = zero_shot_templates(fam)
        classes = list(tmpl)
        txt = torch.stack([model.encode_text(tokenizer(tmpl[c]), normalize=True).mean(0) for c in classes])
        txt = txt / txt.norm(dim=-1, keepdim=True)
        pred = (feats @ txt.T).argmax(dim=1).tolist()
        ok = [classes[p] == _truth(s, fam) for p, s in zip(pred, scenes)]
        out[fam] = float(np.mean(ok))
        if fam == "shape":  # the same, on the unstyled renders only
            plain = [o for o, s in zip(ok, scenes) if not s.styles]
            out["shape_unstyled"] = float(np.mean(plain)) if plain else float("nan")
    return out


@torch.inference_mode()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 5.0, batch: int = 16) -> np.ndarray:
    """uint8 (N, 32, 32, 3) images, one torch.Generator per sample."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch]]
        ims = pipe(prompt=prompts[i : i + batch], negative_prompt=[""] * len(gens), num_inference_steps=steps,
                   guidance_scale=guidance, height=32, width=32, generator=gens, output_type="np").images
        out.append(np.clip(np.round(ims * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def generator_following(pipe, n: int = 96, seed: int = 4321, steps: int = 25, guidance: float = 5.0) -> dict:
    """Oracle agreement with the prompt per family, on prompts with held-out combinations."""
    scenes = held_out_scenes(n, seed, positions=("center",), p_style=0.5)
    scenes = [dataclasses.replace(s, jitter=(0.0, 0.0)) for s in scenes]
    prompts = [C.canonical(s) for s in scenes]
    imgs = generate(pipe, prompts, [seed + i for i in range(n)], steps, guidance)
    judged = [O.judge(im) for im in imgs]
    colour_ok = [j["colour"] == s.colour for j, s in zip(judged, scenes) if not set(s.styles) & {"grayscale", "sepia"}]
    shape_ok = [j["shape"] == s.shape for j, s in zip(judged, scenes)]
    style_ok = [(s.styles[0] in j["styles"]) if s.styles else not j["styles"] for j, s in zip(judged, scenes)]
    per_style = {}
    for j, s in zip(judged, scenes):
        key = s.styles[0] if s.styles else "none"
        per_style.setdefault(key, []).append((key in j["styles"]) if s.styles else not j["styles"])
    # seeds: the same prompt, two seeds
    two = generate(pipe, prompts[:16] * 2, [seed + 10_000 + i for i in range(32)], steps, guidance)
    seed_diff = float(np.abs(two[:16].astype(np.float32) - two[16:].astype(np.float32)).mean())
    return {
        "colour": float(np.mean(colour_ok)),
        "shape": float(np.mean(shape_ok)),
        "style": float(np.mean(style_ok)),
        "all_three": float(np.mean([a and b and c for a, b, c in zip(
            [(j["colour"] == s.colour) or bool(set(s.styles) & {"grayscale", "sepia"}) for j, s in zip(judged, scenes)],
            shape_ok, style_ok)])),
        "per_style": {k: float(np.mean(v)) for k, v in sorted(per_style.items())},
        "n": n,
        "seed_pixel_difference": seed_diff,
        "prompts": prompts,
        "images": imgs,
    }
