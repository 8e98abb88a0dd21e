"""Compatibility of a recognised LoRA with a generator: module names (kohya, SGM, OMI, peft) -> model modules.

``targets``: component ("unet", "text_encoder", "text_encoder_2") -> {diffusers module name -> (out, in)}
(Conv2d: (out, in channels, kernel h, kernel w)), e.g. from :func:`targets_from_modules`. Strict: a LoRA with *any* module
that maps onto nothing is rejected, because its update could not be applied.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Iterable, Mapping

from carlos_ray.lora.formats import COMPONENTS, LoraModule
from carlos_ray.lora.header import LoraRejected
from carlos_ray.lora.info import LoraInfo

if TYPE_CHECKING:  # pragma: no cover
    import torch

# component -> module -> (out, in) for a Linear, (out, in, kernel_h, kernel_w) for a Conv2d
Targets = Mapping[str, Mapping[str, tuple[int, ...]]]


def targets_from_modules(named_modules: "Iterable[tuple[str, torch.nn.Module]] | torch.nn.Module") -> dict[str, tuple[int, ...]]:
    """{module name: (out_features, in_features)} of every Linear, (out, in channels, kernel h, kernel w) of every
    Conv2d, of one component.

    Pass ``model.named_modules()`` or the model itself; build the per-component targets mapping with
    ``{"unet": targets_from_modules(pipe.unet), "text_encoder": ..., ...}``.
    """
    import torch

    if isinstance(named_modules, torch.nn.Module):
        named_modules = named_modules.named_modules()
    out: dict[str, tuple[int, ...]] = {}
    for name, mod in named_modules:
        if isinstance(mod, torch.nn.Linear):
            out[name] = (int(mod.out_features), int(mod.in_features))
        elif isinstance(mod, torch.nn.Conv2d):
            out[name] = (int(mod.out_channels), int(mod.in_channels), *(int(k) for k in mod.kernel_size))
    return out


# ---------------------------------------------------------------------------------------------
# Base-model family
# ---------------------------------------------------------------------------------------------

_CONTEXT_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_CROSS_KV_RE = re.compile(r"attn2[._]to_[kv]$")


def _context_widths(items: Iterable[tuple[str, int]]) -> list[int]:
    return [width for name, width in items if _CROSS_KV_RE.search(name)]


def _article(family: str) -> str:
    return "an" if family.startswith("S") else "a"


def _generator_family(targets: Targets) -> tuple[str, str]:
    """(family, evidence) of the generator, e.g. ("SDXL", "two text encoders")."""
    ctx = Counter(_context_widths((n, s[1]) for n, s in targets.get("unet", {}).items()))
    width = ctx.most_common(1)[0][0] if ctx else None
    ctx_txt = f"cross-attention context {width}" if width else "no cross-attention"
    if "text_encoder_2" in targets:
        return "SDXL", f"two text encoders, {ctx_txt}"
    if width in _CONTEXT_FAMILY:
        return _CONTEXT_FAMILY[width], f"one text encoder, {ctx_txt}"
    return "single-encoder", f"one text encoder, {ctx_txt}"


def _check_family(info: LoraInfo, targets: Targets) -> None:
    """wrong_base for another family; shape_mismatch for the same family at another size (e.g. full SDXL on tiny)."""
    gen_family, gen_evidence = _generator_family(targets)
    path = info.path
    lora_ctx = Counter(_context_widths((m.name, m.in_features) for m in info.modules if m.component == "unet"))
    lora_width = lora_ctx.most_common(1)[0][0] if lora_ctx else None
    lora_family = _CONTEXT_FAMILY.get(lora_width, "SD1.x") if lora_width else "SD1.x"
    single_te = [m.key for m in info.modules if m.key.startswith("lora_te_")]
    if single_te and "text_encoder_2" in targets:
        fam = lora_family if lora_family != "SDXL" else "SD1.x"
        raise LoraRejected(
            "wrong_base",
            f"looks like {_article(fam)} {fam} LoRA; this generator is {gen_family}-shaped ({gen_evidence}): "
            f"the file has single-text-encoder keys such as {single_te[0]!r}"
            + (f" and cross-attention context {lora_width}" if lora_width else ""),
            path,
        )
    if "text_encoder_2" in info.targets and "text_encoder_2" not in targets:
        raise LoraRejected(
            "wrong_base",
            f"looks like an SDXL LoRA; this generator is {gen_family}-shaped ({gen_evidence}): the file has "
            "second-text-encoder weights",
            path,
        )
    gen_ctx = set(_context_widths((n, s[1]) for n, s in targets.get("unet", {}).items()))
    if not (lora_ctx and gen_ctx):
        return
    differing = sum(c for w, c in lora_ctx.items() if w not in gen_ctx)
    if 2 * differing <= sum(lora_ctx.values()):
        return
    fam = _CONTEXT_FAMILY.get(lora_width)
    evidence = (f"{differing} of {sum(lora_ctx.values())} cross-attention to_k/to_v modules take context width "
                f"{lora_width}, the generator's take {sorted(gen_ctx)}")
    if fam == gen_family:
        raise LoraRejected(
            "shape_mismatch",
            f"size mismatch: an {fam} LoRA made for a differently sized {fam} model; this generator is {fam}-shaped "
            f"({gen_evidence}) but smaller or larger: {evidence}",
            path,
        )
    looks = f"looks like {_article(fam)} {fam} LoRA" if fam else "looks like a LoRA for another base model"
    raise LoraRejected("wrong_base", f"{looks}; this generator is {gen_family}-shaped ({gen_evidence}): {evidence}", path)


# ---------------------------------------------------------------------------------------------
# Names: kohya / SGM (LDM UNet) -> diffusers
# ---------------------------------------------------------------------------------------------

_SGM_RES = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_SGM_FIXED = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}


def sgm_to_diffusers(name: str, layers_per_block: int, index: Mapping[str, str]) -> str | None:
    """Map a kohya SDXL (SGM/LDM UNet) module name to the diffusers name, underscore form."""
    if name in _SGM_FIXED:
        return _SGM_FIXED[name]
    m = re.match(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$", name) or re.match(
        r"^(middle_block)_(\d+)_(.+)$", name
    )
    if not m:
        return None
    kind = m.group(1)
    rest = m.group(m.lastindex)
    if kind == "middle_block":
        part = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(int(m.group(2)))
        return None if part is None else f"mid_block_{part}_{_SGM_RES.get(rest, rest)}"
    i, inner = int(m.group(2)), int(m.group(3))
    if kind == "input_blocks":
        block, layer = divmod(i - 1, layers_per_block + 1)
        if layer == layers_per_block or rest == "op":
            return f"down_blocks_{block}_downsamplers_0_conv"
        sub = "resnets" if inner == 0 else "attentions"
        return f"down_blocks_{block}_{sub}_{layer}_{_SGM_RES.get(rest, rest) if inner == 0 else rest}"
    block, layer = divmod(i, layers_per_block + 1)
    if inner == 0:
        return f"up_blocks_{block}_resnets_{layer}_{_SGM_RES.get(rest, rest)}"
    attn = f"up_blocks_{block}_attentions_{layer}_{rest}"
    if inner == 1 and attn in index:
        return attn
    return f"up_blocks_{block}_upsamplers_0_{rest}"


def _layers_per_block(unet: Mapping[str, tuple[int, ...]]) -> int:
    found = {int(m.group(1)) for n in unet if (m := re.match(r"^down_blocks\.0\.resnets\.(\d+)\.", n))}
    return max(found) + 1 if found else 2


class _NameIndex:
    """Resolves a LoRA module's name to a generator module name, per component."""

    def __init__(self, targets: Targets):
        self.targets = targets
        self.underscore = {c: {n.replace(".", "_"): n for n in mods} for c, mods in targets.items()}
        self.lpb = _layers_per_block(targets.get("unet", {}))
        # recent transformers flatten CLIPTextModel (no "text_model." level); diffusers then strips that prefix
        self.flat_te = {c for c in ("text_encoder", "text_encoder_2")
                        if c in targets and not any(n.startswith("text_model.") for n in targets[c])}

    def resolve(self, m: LoraModule) -> str | None:
        comp = self.targets.get(m.component)
        if comp is None:
            return None
        name = m.name.removeprefix("text_model.") if m.component in self.flat_te else m.name
        if m.naming == "dotted":
            return name if name in comp else None
        flat = name.replace(".", "_")
        index = self.underscore[m.component]
        found = index.get(flat)
        if found is None and m.component == "unet":
            sgm = sgm_to_diffusers(flat, self.lpb, index)
            found = index.get(sgm) if sgm else None
        return found


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------


def shape_fits(m: LoraModule, want: tuple[int, ...]) -> bool:
    """Whether module ``m`` fits a generator module ``want``: (out, in) of a Linear or (out, in, kh, kw) of a Conv2d.

    A conv's kernel must match too: the LoRA's spatial factor (its down or Tucker mid kernel; a 2-D factor is
    1 x 1), or for flattened LoHa/LoKr convs in = in_channels * kernel area. Targets given as (out, in) alone
    are checked on (out, in) only."""
    if m.out_features != want[0]:
        return False
    kernel = tuple(want[2:4]) if len(want) >= 4 else None
    if m.flat_in:
        ratio, rem = divmod(m.in_features, want[1])
        if kernel is not None:
            return rem == 0 and ratio == kernel[0] * kernel[1]
        return rem == 0 and math.isqrt(ratio) ** 2 == ratio
    if m.in_features != want[1]:
        return False
    return kernel is None or (tuple(m.kernel) or (1, 1)) == kernel


def check_compatible(info: LoraInfo, targets: Targets) -> None:
    """Raise LoraRejected unless every LoRA module maps onto a generator module of the same shape.

    See :func:`match_modules`, which this calls and which also returns the mapping.
    """
    match_modules(info, targets)


def match_modules(info: LoraInfo, targets: Targets) -> dict[str, str]:
    """{LoRA module key: "component.module"} for a compatible LoRA; raise LoraRejected otherwise.

    Dotted (peft/diffusers) names must equal a module name; flat (kohya, OMI) names match a module whose
    name with "." replaced by "_" is equal, SGM block names translated first. Order of checks: wrong_base
    (or shape_mismatch for the same family at another size), then no_match, then shape_mismatch.
    """
    unknown = set(targets) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown target components {sorted(unknown)}; valid: {list(COMPONENTS)}")
    _check_family(info, targets)
    index = _NameIndex(targets)
    mapped = [(m, index.resolve(m)) for m in info.modules]
    unmapped = [m for m, t in mapped if t is None]
    if len(unmapped) == len(info.modules):
        raise LoraRejected(
            "no_match",
            f"none of the {len(info.modules)} LoRA modules matches a module of this generator "
            f"(e.g. {[m.key for m in unmapped[:2]]}); LoRA components {sorted(info.targets)}, generator "
            f"components {sorted(targets)}",
            info.path,
        )
    if unmapped:
        raise LoraRejected(
            "no_match",
            f"{len(unmapped)} of {len(info.modules)} LoRA modules match no module of this generator "
            f"(e.g. {[m.key for m in unmapped[:2]]}); a partial match is rejected because those weights could "
            "not be applied",
            info.path,
        )
    for m, target_name in mapped:
        want = tuple(targets[m.component][target_name])
        if not shape_fits(m, want):
            got = (m.out_features, m.in_features)
            kernel = f", kernel {tuple(m.kernel) or (1, 1)}" if len(want) >= 4 and not m.flat_in else ""
            raise LoraRejected(
                "shape_mismatch",
                f"size mismatch: {m.key!r}: LoRA (out, in) = {got}{' (in x kernel area)' if m.flat_in else ''}{kernel} "
                f"but generator {m.component}.{target_name} is {want[:2]}"
                f"{f', kernel {want[2:4]}' if len(want) >= 4 else ''}",
                info.path,
            )
    return {m.key: f"{m.component}.{target_name}" for m, target_name in mapped}
