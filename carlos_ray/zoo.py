"""A synthetic LoRA zoo for the tiny generator, with planted, known behavior.

`make_zoo(dir, n, seed)` writes `.safetensors` LoRAs (kohya and diffusers layouts) plus Civitai-style
sidecars. The planted members, always present when n >= 8:

- `scale_x0.5`, `scale_x1`, `scale_x2`: one adapter at three scales (same direction, rising strength);
- `twin_a`, `twin_b`: a near-duplicate pair (the second is the first plus 1% noise);
- `noop`: zero up-weights (the output is unchanged: strength exactly 0);
- `erratic`: high rank, large random weights;
- `te_only`: a text-encoder-only LoRA;
- then `style_NN` random adapters until n.

`zoo.json` beside the files lists every member with its planted role and format.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

logger = logging.getLogger(__name__)

# Modules a zoo LoRA touches in the tiny SDXL UNet and text encoders (diffusers dotted names).
UNET_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
TE_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

Weights = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # component -> module -> (down (r,in), up (out,r))


def tiny_targets() -> dict[str, dict[str, tuple[int, int]]]:
    """(out, in) of the attention projections a zoo LoRA touches, from the tiny generator built on the meta device."""
    from carlos_ray.config import GeneratorSpec
    from carlos_ray.models.generator import generator_lora_targets

    full = generator_lora_targets(GeneratorSpec())
    out: dict[str, dict[str, tuple[int, int]]] = {"unet": {}}
    for name, shape in full["unet"].items():
        if "transformer_blocks" in name and name.endswith(UNET_ATTN):
            out["unet"][name] = shape
    for comp in ("text_encoder", "text_encoder_2"):
        # the names LoRA files use (and diffusers maps), whatever transformers' module nesting
        out[comp] = {(n if n.startswith("text_model.") else "text_model." + n): s
                     for n, s in full[comp].items() if n.endswith(TE_ATTN)}
    return out


def scale_family_target() -> dict[str, dict[str, tuple[int, int]]]:
    """The last attention's output projection of the UNet: its effect on the image is close to linear in the
    LoRA scale (the tiny random UNet is chaotic elsewhere), so a scale family keeps one direction."""
    from carlos_ray.config import GeneratorSpec
    from carlos_ray.models.generator import generator_lora_targets

    unet = generator_lora_targets(GeneratorSpec())["unet"]
    last = sorted(n for n in unet if n.startswith("up_blocks.") and n.endswith(".proj_out"))[-1]
    return {"unet": {last: unet[last]}}


def random_weights(
    targets: Mapping[str, Mapping[str, tuple[int, int]]],
    components: tuple[str, ...],
    rank: int,
    magnitude: float,
    rng: np.random.Generator,
) -> Weights:
    out: Weights = {}
    for comp in components:
        out[comp] = {}
        for name, (o, i, *_) in targets[comp].items():  # a conv target also carries its kernel: a 2-D LoRA is 1x1
            down = (rng.standard_normal((rank, i)) / np.sqrt(i)).astype(np.float32)
            up = (rng.standard_normal((o, rank)) * magnitude / np.sqrt(rank)).astype(np.float32)
            out[comp][name] = (down, up)
    return out


def scaled(w: Weights, factor: float) -> Weights:
    return {c: {m: (d, u * np.float32(factor)) for m, (d, u) in mods.items()} for c, mods in w.items()}


def state_dict(w: Weights, fmt: str, alpha: float | None = None) -> dict[str, np.ndarray]:
    """LoRA tensors in kohya (`lora_unet_*.lora_down.weight`, `.alpha`) or diffusers/peft (`unet.*.lora_A.weight`) layout.

    The effective delta is `up @ down * alpha / rank` for kohya (alpha defaults to rank, i.e. 1.0) and
    `lora_B @ lora_A` for diffusers; `alpha` is folded into the up weights for diffusers so both
    layouts of the same `Weights` describe the same adapter.
    """
    sd: dict[str, np.ndarray] = {}
    for comp, mods in w.items():
        for name, (down, up) in mods.items():
            rank = down.shape[0]
            a = float(rank if alpha is None else alpha)
            if fmt == "kohya":
                key = KOHYA_PREFIX[comp] + name.replace(".", "_")
                sd[f"{key}.lora_down.weight"] = down
                sd[f"{key}.lora_up.weight"] = up
                sd[f"{key}.alpha"] = np.array(a, dtype=np.float32)
            elif fmt == "diffusers":
                sd[f"{comp}.{name}.lora_A.weight"] = down
                sd[f"{comp}.{name}.lora_B.weight"] = (up * np.float32(a / rank)).astype(np.float32)
            else:
                raise ValueError(f"unknown LoRA layout {fmt!r}; valid: kohya, diffusers")
    return sd


def write_lora(path: Path, w: Weights, fmt: str, *, alpha: float | None = None, metadata: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(w, fmt, alpha), str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def write_sidecar(path: Path, name: str, description: str, trigger_words: list[str]) -> None:
    info = {"model": {"name": name, "description": f"<p>{description}</p>"}, "trainedWords": trigger_words}
    (path.parent / (path.name[: -len(".safetensors")] + ".civitai.info")).write_text(json.dumps(info, indent=1))


#: the smallest zoo that holds every planted behavior
MIN_ZOO_SIZE = 8


def make_zoo(directory: str | Path, n: int = 12, seed: int = 0) -> list[dict]:
    """Write a zoo of `n` LoRAs (n >= MIN_ZOO_SIZE) into `directory`; returns the member list (also in zoo.json)."""
    if n < MIN_ZOO_SIZE:
        raise ValueError(f"a zoo needs n >= 8 to hold every planted behavior, got n={n}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    targets = tiny_targets()
    members: list[dict] = []

    def add(name: str, w: Weights, fmt: str, role: str, desc: str, words: list[str], sub: str = "") -> None:
        path = d / sub / f"{name}.safetensors"
        # one metadata key only: safetensors writes several in random order, and the zoo must be byte-deterministic
        write_lora(path, w, fmt, metadata={"ss_output_name": name})
        write_sidecar(path, name.replace("_", " ").title(), desc, words)
        members.append({"name": name, "file": str(path.relative_to(d)), "format": fmt, "role": role, "trigger_words": words})

    base = random_weights(scale_family_target(), ("unet",), rank=4, magnitude=8.0, rng=rng)
    for f, fmt in ((0.5, "kohya"), (1.0, "diffusers"), (2.0, "kohya")):
        add(f"scale_x{f:g}", scaled(base, f), fmt, "scale_family", f"One style at x{f:g} strength.", ["scalestyle"], "family")
    twin = random_weights(targets, ("unet",), rank=4, magnitude=0.5, rng=rng)
    noisy = {c: {m: (dn + 0.01 * rng.standard_normal(dn.shape).astype(np.float32) * dn.std(),
                     up + 0.01 * rng.standard_normal(up.shape).astype(np.float32) * up.std())
                 for m, (dn, up) in mods.items()} for c, mods in twin.items()}
    add("twin_a", twin, "diffusers", "near_duplicate", "A crisp look.", ["twinlook"])
    add("twin_b", noisy, "kohya", "near_duplicate", "A crisp look, retrained.", ["twinlook"])
    add("noop", scaled(random_weights(targets, ("unet",), 4, 0.5, rng), 0.0), "kohya", "noop", "Does nothing at all.", [])
    add("erratic", random_weights(targets, ("unet",), 16, 2.5, rng), "diffusers", "erratic", "Chaotic high-rank noise.", ["chaos"])
    add("te_only", random_weights(targets, ("text_encoder", "text_encoder_2"), 4, 1.5, rng), "kohya", "text_encoder",
        "Changes only the text encoders.", ["wordplay"])
    i = 0
    while len(members) < n:
        fmt = "kohya" if i % 2 else "diffusers"
        w = random_weights(targets, ("unet",), rank=int(rng.integers(2, 9)), magnitude=float(rng.uniform(0.2, 0.8)), rng=rng)
        add(f"style_{i:02d}", w, fmt, "random", f"Random style number {i}.", [f"style{i}"], "styles")
        i += 1
    (d / "zoo.json").write_text(json.dumps({"seed": seed, "n": n, "members": members}, indent=1))
    logger.info("wrote %d LoRAs to %s", len(members), d)
    return members
