"""LoRA key formats: recognise a file's adapter modules from tensor names and shapes alone (no values).

Supported layouts (example key of each):

- kohya (sd-scripts, LyCORIS): ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``,
  ``lora_te1_…`` / ``lora_te2_…`` / ``lora_te_…``; SGM block names (``lora_unet_input_blocks_4_1_…``) are ``kohya-sgm``;
- OneTrainer OMI: ``unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight``, ``clip_l.…``, ``clip_g.…``;
- peft / diffusers: ``unet.down_blocks.1.….attn1.to_q.lora_A.weight`` (also ``text_encoder.``, ``text_encoder_2.``,
  ``base_model.model.`` or no prefix = UNet), old diffusers ``….lora.down.weight`` and ``….lora_linear_layer.down.weight``,
  and the legacy attention-processor layout ``….attn1.processor.to_q_lora.down.weight`` (``diffusers-legacy``).

Algorithms: LoRA, LoCon (conv kernels, Tucker ``lora_mid``), LyCORIS LoHa (``hada_w1_a`` …), LoKr (``lokr_w1`` …),
DoRA (``dora_scale`` of either norm convention, or peft's ``lora_magnitude_vector``). Each module gets the file's
per-module scale here (kohya ``alpha/rank``, alpha absent or 0 = rank; LoKr with two full factors: 1; peft: ``.alpha``
keys, else ``lora_adapter_metadata`` ``lora_alpha`` / ``alpha_pattern`` / ``use_rslora``, else 1).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from carlos_ray.lora.header import SCALAR_DTYPES, TensorEntry

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
_OMI_COMPONENT = {"unet": "unet", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}

#: kohya/OMI/LyCORIS tensor suffix -> role
_KOHYA_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "dora_scale": "dora_scale",
    **{f"hada_{n}": f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
#: suffixes of adapter algorithms whose update cannot be applied exactly here -> algorithm name
_UNSUPPORTED = {
    "oft_blocks": "LyCORIS OFT", "oft_diag": "LyCORIS OFT", "oft_R": "BOFT", "rescale": "OFT/BOFT rescale",
    "diff": "LyCORIS full (weight diff)", "diff_b": "LyCORIS full (bias diff)", "w_norm": "LyCORIS norm",
    "b_norm": "LyCORIS norm", "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "on_input": "IA3", "weight": "IA3", "lokr_t1": "LoKr with a Tucker w1", "lora_B.bias": "peft lora_bias",
    "lora_embedding_A": "peft embedding LoRA", "lora_embedding_B": "peft embedding LoRA",
}
_KOHYA_RE = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_([^.]+)\.(.+)$")
_OMI_RE = re.compile(r"^(unet|clip_l|clip_g)\.(.+?)\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha|dora_scale"
                     r"|hada_\w+|lokr_\w+|oft_\w+|diff|diff_b|w_norm|b_norm)$")
_PEFT_RE = re.compile(
    r"^(.+?)(\.lora_A\.weight|\.lora_B\.weight|\.lora\.down\.weight|\.lora\.up\.weight|_lora\.down\.weight"
    r"|_lora\.up\.weight|\.lora_linear_layer\.down\.weight|\.lora_linear_layer\.up\.weight|\.alpha"
    r"|\.lora_magnitude_vector(?:\.weight)?|\.lora_B\.bias|\.lora_embedding_A|\.lora_embedding_B)$"
)
_PEFT_ROLES = {
    ".lora_A.weight": "down", ".lora.down.weight": "down", "_lora.down.weight": "down",
    ".lora_linear_layer.down.weight": "down", ".lora_B.weight": "up", ".lora.up.weight": "up", "_lora.up.weight": "up",
    ".lora_linear_layer.up.weight": "up", ".alpha": "alpha", ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
_SGM_RE = re.compile(r"^(input_blocks|output_blocks|middle_block|label_emb|time_embed|out)_")

# Multi-word identifiers that kohya flattens with "_" (greedy, longest first) for display names.
_COMPOUNDS = {
    tuple(c.split("_"))
    for c in (
        "time_emb_proj final_layer_norm conv_norm_out add_k_proj add_v_proj add_q_proj to_add_out "
        "down_blocks up_blocks mid_block input_blocks output_blocks middle_block transformer_blocks "
        "to_q to_k to_v to_out proj_in proj_out conv_shortcut conv_in conv_out time_embedding linear_1 "
        "linear_2 add_embedding in_layers out_layers emb_layers skip_connection time_embed label_emb "
        "text_model self_attn q_proj k_proj v_proj out_proj layer_norm1 layer_norm2 text_projection "
        "token_embedding position_embedding norm_out"
    ).split()
}
_OLD_TE_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class FormatError(ValueError):
    """A key-level problem: ``code`` is a reject code (bad_lora, unsupported, not_lora)."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class LoraModule:
    """One adapted module, as the file defines it.

    ``name`` is the diffusers dotted form (best effort for kohya keys); ``naming`` says how it maps onto a model:
    "dotted" (exact diffusers module name) or "flat" (kohya underscore form, SGM block names allowed).
    ``in_features`` of a LoHa/LoKr conv in flattened form is in_channels * kernel area (``flat_in``).
    ``scale`` is the file's own factor for this module (alpha/rank etc.); the user's LoRA scale comes on top.
    ``dora`` is None, "row" (one magnitude per output, peft and LyCORIS wd_on_out) or "column" (one per input).
    """

    component: str
    name: str
    key: str  # the module's key prefix in the file, e.g. "lora_unet_down_blocks_1_..." or "unet.down_blocks.1...."
    out_features: int
    in_features: int
    rank: int
    alpha: float | None
    kind: str = "lora"  # lora | locon | loha | lokr
    naming: str = "dotted"
    scale: float = 1.0
    dora: str | None = None
    kernel: tuple[int, ...] = ()
    flat_in: bool = False
    tensors: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (role, tensor name)

    def tensor(self, role: str) -> str | None:
        return dict(self.tensors).get(role)


@dataclass
class _Group:
    layout: str
    component: str
    key: str
    naming: str
    body: str  # module path in the file's own spelling
    roles: dict[str, TensorEntry] = field(default_factory=dict)


def kohya_to_dotted(name: str) -> str:
    """Best-effort dotted form of a kohya module name ('down_blocks_1_..._to_q' -> 'down_blocks.1....to_q')."""
    tokens, out, i = name.split("_"), [], 0
    while i < len(tokens):
        for width in (3, 2):
            if tuple(tokens[i : i + width]) in _COMPOUNDS:
                out.append("_".join(tokens[i : i + width]))
                i += width
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


def _legacy_module_name(component: str, stem: str) -> str:
    """Module name of the legacy attention-processor spelling '...attn1.processor.to_q' -> '...attn1.to_q'."""
    stem = stem.replace(".processor.", ".")
    head, _, leaf = stem.rpartition(".")
    leaf = ("to_out.0" if leaf == "to_out" else leaf) if component == "unet" else _OLD_TE_NAMES.get(leaf, leaf)
    return f"{head}.{leaf}" if head else leaf


def _peft_group(name: str, stem: str, suffix: str) -> tuple[str, str, str, str]:
    """(layout, component, key, display name) of a peft/diffusers tensor."""
    first, _, rest = stem.partition(".")
    if first in COMPONENTS and rest:
        component, body, key = first, rest, stem
    else:
        component, body, key = "unet", stem.removeprefix("base_model.model."), stem
    if suffix.startswith("_lora"):
        return "diffusers-legacy", component, key, _legacy_module_name(component, body)
    layout = "peft" if "lora_A" in suffix or "lora_B" in suffix or "magnitude" in suffix else "diffusers"
    return layout, component, key, body


def group_tensors(tensors: Iterable[TensorEntry]) -> tuple[list[_Group], list[str], list[tuple[str, str]]]:
    """Group LoRA tensors by module: (groups, ignored tensor names, [(tensor name, unsupported algorithm)])."""
    groups: dict[tuple[str, str], _Group] = {}
    ignored: list[str] = []
    unsupported: list[tuple[str, str]] = []
    pending_alpha: list[tuple[str, str, TensorEntry]] = []  # "unet.x.alpha": OMI or peft, decided after the pass

    def add(layout: str, comp: str, key: str, naming: str, body: str, role: str, t: TensorEntry) -> None:
        groups.setdefault((comp, key), _Group(layout, comp, key, naming, body)).roles[role] = t

    for t in tensors:
        name = t.name
        if m := _KOHYA_RE.match(name):
            prefix, body, suffix = m.groups()
            if suffix in _KOHYA_ROLES:
                add("kohya", _KOHYA_COMPONENT[prefix], f"{prefix}_{body}", "flat", body, _KOHYA_ROLES[suffix], t)
            else:
                unsupported.append((name, _UNSUPPORTED.get(suffix, f"unknown suffix {suffix!r}")))
            continue
        if (m := _OMI_RE.match(name)) and not name.endswith(".alpha"):
            prefix, body, suffix = m.groups()
            if suffix in _KOHYA_ROLES:
                add("onetrainer-omi", _OMI_COMPONENT[prefix], f"{prefix}.{body}", "flat", body.replace(".", "_"),
                    _KOHYA_ROLES[suffix], t)
            else:
                unsupported.append((name, _UNSUPPORTED.get(suffix, suffix)))
            continue
        if m := _PEFT_RE.match(name):
            stem, suffix = m.groups()
            if suffix not in _PEFT_ROLES:
                unsupported.append((name, _UNSUPPORTED[suffix.lstrip(".")]))
            elif suffix == ".alpha":
                pending_alpha.append((stem, name, t))
            else:
                layout, comp, key, body = _peft_group(name, stem, suffix)
                add(layout, comp, key, "dotted", body, _PEFT_ROLES[suffix], t)
            continue
        ignored.append(name)
    _attach_alphas(groups, pending_alpha, ignored)
    return list(groups.values()), ignored, unsupported


def _attach_alphas(groups: dict[tuple[str, str], _Group], pending: list[tuple[str, str, TensorEntry]], ignored: list[str]) -> None:
    """Attach 'X.alpha' to the OMI module 'X' (OMI prefix) or the peft module 'X'; a lone alpha is ignored."""
    for stem, name, t in pending:
        first, _, rest = stem.partition(".")
        omi = (_OMI_COMPONENT.get(first), stem) if first in _OMI_COMPONENT and rest else None
        _, comp, key, _ = _peft_group(name, stem, ".alpha")
        for gk in (omi, (comp, key)):
            if gk and gk in groups:
                groups[gk].roles["alpha"] = t
                break
        else:
            ignored.append(name)


# ---------------------------------------------------------------------------------------------
# Per-module shapes
# ---------------------------------------------------------------------------------------------


def _need(g: _Group, roles: Iterable[str], what: str) -> None:
    missing = [r for r in roles if r not in g.roles]
    if missing:
        have = sorted(r for r in g.roles if r != "alpha") or ["nothing"]
        raise FormatError("bad_lora", f"{what} module {g.key!r} has {', '.join(have)} but misses {', '.join(missing)}")


def _lora_dims(g: _Group) -> tuple[int, int, int, tuple[int, ...], bool]:
    """(out, in, rank, kernel, flat_in) of a LoRA / LoCon module."""
    if "down" not in g.roles or "up" not in g.roles:
        have = "down weight" if "down" in g.roles else "up weight" if "up" in g.roles else " and ".join(sorted(g.roles))
        raise FormatError("bad_lora", f"module {g.key!r} has {have} but not both lora down and up weights")
    d, u, mid = g.roles["down"].shape, g.roles["up"].shape, g.roles.get("mid")
    if len(d) not in (2, 4) or len(u) not in (2, 4) or d[0] == 0 or (len(u) == 4 and u[2:] != (1, 1)):
        raise FormatError("bad_lora", f"module {g.key!r}: down {list(d)} / up {list(u)} are not LoRA shapes")
    if u[1] != d[0]:
        raise FormatError(
            "bad_lora", f"module {g.key!r}: down rank {d[0]} (shape {list(d)}) != up rank {u[1]} (shape {list(u)})"
        )
    kernel = tuple(d[2:]) if len(d) == 4 else ()
    if mid is not None:
        if len(mid.shape) != 4 or mid.shape[:2] != (d[0], d[0]) or kernel not in ((1, 1),):
            raise FormatError("bad_lora", f"module {g.key!r}: Tucker lora_mid {list(mid.shape)} does not fit down {list(d)}")
        kernel = tuple(mid.shape[2:])
    return u[0], d[1], d[0], kernel, False


def _loha_dims(g: _Group) -> tuple[int, int, int, tuple[int, ...], bool]:
    _need(g, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LyCORIS LoHa")
    w1a, w1b, w2a, w2b = (g.roles[f"hada_{n}"].shape for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    if "hada_t1" in g.roles or "hada_t2" in g.roles:
        _need(g, ("hada_t1", "hada_t2"), "LyCORIS LoHa (Tucker)")
        t1, t2 = g.roles["hada_t1"].shape, g.roles["hada_t2"].shape
        ok = len(t1) >= 3 and t1 == t2 and t1[:2] == (w1a[0], w1b[0]) and w1a == w2a and w1b == w2b
        if not ok:
            raise FormatError("bad_lora", f"LoHa module {g.key!r}: Tucker shapes t1 {list(t1)} w1_a {list(w1a)} w1_b {list(w1b)} disagree")
        return w1a[1], w1b[1], w1b[0], tuple(t1[2:]), False
    ok = all(len(s) == 2 for s in (w1a, w1b, w2a, w2b)) and w1a[1] == w1b[0] and w2a[1] == w2b[0]
    if not ok or w1a[0] != w2a[0] or w1b[1] != w2b[1]:
        raise FormatError(
            "bad_lora", f"LoHa module {g.key!r}: w1_a {list(w1a)} w1_b {list(w1b)} w2_a {list(w2a)} w2_b {list(w2b)} disagree"
        )
    return w1a[0], w1b[1], w1b[0], (), True


def _lokr_factor2(g: _Group) -> tuple[int, int, int | None, tuple[int, ...], bool]:
    """(rows, cols, rank or None, kernel, flat) of LoKr's second Kronecker factor."""
    if "lokr_w2" in g.roles:
        s = g.roles["lokr_w2"].shape
        if len(s) not in (2, 4):
            raise FormatError("bad_lora", f"LoKr module {g.key!r}: lokr_w2 {list(s)} is not a matrix or conv kernel")
        return s[0], s[1], None, tuple(s[2:]), False
    _need(g, ("lokr_w2_a", "lokr_w2_b"), "LyCORIS LoKr")
    a, b = g.roles["lokr_w2_a"].shape, g.roles["lokr_w2_b"].shape
    if "lokr_t2" in g.roles:
        t = g.roles["lokr_t2"].shape
        if len(t) < 3 or len(a) != 2 or len(b) != 2 or t[:2] != (a[0], b[0]):
            raise FormatError("bad_lora", f"LoKr module {g.key!r}: Tucker t2 {list(t)} w2_a {list(a)} w2_b {list(b)} disagree")
        return a[1], b[1], t[0], tuple(t[2:]), False
    if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
        raise FormatError("bad_lora", f"LoKr module {g.key!r}: w2_a {list(a)} @ w2_b {list(b)} is not a product")
    return a[0], b[1], a[1], (), True


def _lokr_dims(g: _Group) -> tuple[int, int, int, tuple[int, ...], bool, bool]:
    """(out, in, rank, kernel, flat_in, both_full) of a LoKr module; rank is LyCORIS' lora_dim."""
    if "lokr_w1" in g.roles:
        w1 = g.roles["lokr_w1"].shape
        rank1 = None
    else:
        _need(g, ("lokr_w1_a", "lokr_w1_b"), "LyCORIS LoKr")
        a, b = g.roles["lokr_w1_a"].shape, g.roles["lokr_w1_b"].shape
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise FormatError("bad_lora", f"LoKr module {g.key!r}: w1_a {list(a)} @ w1_b {list(b)} is not a product")
        w1, rank1 = (a[0], b[1]), a[1]
    if len(w1) != 2:
        raise FormatError("bad_lora", f"LoKr module {g.key!r}: lokr_w1 {list(w1)} is not a matrix")
    rows, cols, rank2, kernel, flat = _lokr_factor2(g)
    full = rank1 is None and rank2 is None
    rank = rank1 if rank1 is not None else rank2 if rank2 is not None else min(w1) * min(rows, cols)
    return w1[0] * rows, w1[1] * cols, rank, kernel, flat, full


def _dora_kind(g: _Group, out: int, inp: int) -> str | None:
    if "magnitude" in g.roles:
        s = g.roles["magnitude"].shape
        if math.prod(s) != out or (s and max(s) != out):
            raise FormatError("bad_lora", f"module {g.key!r}: lora_magnitude_vector {list(s)} must hold {out} values")
        return "row"
    if "dora_scale" not in g.roles:
        return None
    s = g.roles["dora_scale"].shape
    if len(s) >= 2 and s[0] == out and math.prod(s) == out:
        return "row"
    if len(s) >= 2 and s[0] == 1 and s[1] == inp and math.prod(s) == inp:
        return "column"
    raise FormatError("bad_lora", f"module {g.key!r}: dora_scale {list(s)} is neither ({out}, 1, ...) nor (1, {inp}, ...)")


# ---------------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------------


def adapter_metadata(metadata: Mapping[str, str]) -> dict:
    """diffusers' ``lora_adapter_metadata`` (peft LoraConfig fields, maybe prefixed 'unet.'), or {}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise FormatError("bad_lora", f"__metadata__ lora_adapter_metadata is not JSON: {str(exc)[:100]}") from None
    if not isinstance(meta, dict):
        raise FormatError("bad_lora", "__metadata__ lora_adapter_metadata must be a JSON object")
    return meta


def _peft_alpha(meta: dict, component: str, body: str, rank: int) -> tuple[float, bool]:
    """(alpha, rslora) for a peft module from adapter metadata (peft's pattern rule: '(.*\\.)?(pattern)$')."""
    def get(k: str):
        return meta.get(f"{component}.{k}", meta.get(k))

    alpha = get("lora_alpha")
    for pattern, value in (get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", body):
            alpha = value
            break
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        alpha = rank
    return float(alpha), bool(get("use_rslora"))


def module_scale(layout: str, kind: str, rank: int, alpha: float | None, *, both_full: bool = False,
                 rslora: bool = False) -> float:
    """The file's factor on the module's update (kohya/LyCORIS/peft conventions)."""
    if kind == "lokr" and both_full:
        return 1.0
    a = rank if alpha is None or alpha == 0 else alpha
    return float(a) / (math.sqrt(rank) if rslora else rank)


# ---------------------------------------------------------------------------------------------
# Recognition
# ---------------------------------------------------------------------------------------------


def _kind(g: _Group) -> str:
    if any(r.startswith("hada_") for r in g.roles):
        return "loha"
    if any(r.startswith("lokr_") for r in g.roles):
        return "lokr"
    return "lora"


def _display_name(g: _Group) -> str:
    return kohya_to_dotted(g.body) if g.naming == "flat" else g.body


def build_module(g: _Group, alpha: float | None, meta: dict) -> LoraModule:
    """A validated :class:`LoraModule` from a group of tensors and its alpha value."""
    kind, both_full = _kind(g), False
    if kind == "loha":
        out, inp, rank, kernel, flat = _loha_dims(g)
    elif kind == "lokr":
        out, inp, rank, kernel, flat, both_full = _lokr_dims(g)
    else:
        out, inp, rank, kernel, flat = _lora_dims(g)
        kind = "locon" if (kernel and kernel != (1, 1)) or "mid" in g.roles else "lora"
    dora = _dora_kind(g, out, inp)
    rslora = False
    if g.naming == "dotted" and alpha is None and meta:
        alpha, rslora = _peft_alpha(meta, g.component, g.body, rank)
    scale = module_scale(g.layout, kind, rank, alpha, both_full=both_full, rslora=rslora)
    tensors = tuple(sorted((role, t.name) for role, t in g.roles.items()))
    return LoraModule(g.component, _display_name(g), g.key, out, inp, rank, alpha, kind, g.naming, scale, dora,
                      kernel, flat, tensors)


def check_scalar(t: TensorEntry) -> None:
    if math.prod(t.shape) != 1 or t.dtype not in SCALAR_DTYPES:
        raise FormatError("bad_lora", f"{t.name!r} must be a numeric scalar, got {t.dtype} {list(t.shape)}")


def layouts_of(groups: list[_Group]) -> list[str]:
    """Key layouts present, refusing files that mix kohya-style and peft-style modules."""
    layouts = sorted({g.layout for g in groups})
    families = {"kohya" if lay == "kohya" else "omi" if lay == "onetrainer-omi" else "diffusers" for lay in layouts}
    if len(families) > 1:
        raise FormatError("bad_lora", f"mixes key styles {layouts} (kohya lora_unet_/lora_te*_, OneTrainer unet./clip_l., "
                          "diffusers/peft unet./text_encoder.) in one file")
    return layouts


def format_names(modules: list[LoraModule], layouts: list[str]) -> tuple[str, tuple[str, ...]]:
    """(key family: kohya | diffusers | onetrainer-omi, detailed format names such as ('kohya-sgm', 'lycoris-loha'))."""
    names = set(layouts)
    if "kohya" in names and any(m.component == "unet" and _SGM_RE.match(m.key.removeprefix("lora_unet_")) for m in modules):
        names = (names - {"kohya"}) | {"kohya-sgm"}
    kinds = {m.kind for m in modules}
    names |= {{"locon": "locon", "loha": "lycoris-loha", "lokr": "lycoris-lokr"}[k] for k in kinds if k != "lora"}
    if any(m.dora for m in modules):
        names.add("dora")
    family = "kohya" if "kohya" in layouts else "onetrainer-omi" if "onetrainer-omi" in layouts else "diffusers"
    return family, tuple(sorted(names))
