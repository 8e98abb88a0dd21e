"""Conversion: a LoRA state dict in, the exact per-module update out (pure functions, no model needed).

Conventions, each from its source:

- kohya sd-scripts ``networks/lora.py``: ΔW = alpha/rank · up @ down (alpha absent or 0 = rank); convolutions
  (LoCon) have a k×k ``lora_down`` and a 1×1 ``lora_up``;
- LyCORIS ``modules/locon.py``: Tucker ``lora_mid``: ΔW[o,i,…] = Σ up[o,a] mid[a,b,…] down[b,i];
- LyCORIS ``modules/loha.py``: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha/rank (rank = w1_b rows); Tucker:
  einsum('ij…,jr,ip->pr…', t, w_b, w_a) per factor;
- LyCORIS ``modules/lokr.py``: ΔW = kron(w1, w2) · alpha/rank with w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2,
  w2_a @ w2_b or Tucker(t2, w2_a, w2_b); rank = w1_a columns, else w2's; two full factors: scale 1;
- DoRA, LyCORIS ``dora_scale`` (``wd_on_out`` True: one value per output row, False: per input column):
  W' = dora_scale · (W + ΔW) / (‖W + ΔW‖ + eps) (eps = 1.2e-7 is left out: for row norms ≳ 1 it moves the
  ratio by less than float32 rounding, and without it both layouts share one expression); peft ``lora_magnitude_vector`` (rows, no eps):
  W' = m · (W + sΔW) / ‖W + sΔW‖.

A user LoRA scale ``s`` multiplies ΔW (kohya/peft ``multiplier`` / ``set_adapters`` weight). For DoRA files in the
LyCORIS layout ``s`` interpolates between the base and the full DoRA weight (W + s·(W' − W), as ComfyUI applies
it); for peft's layout it is peft's own rule above. At s = 1 both are the file's definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from carlos_ray.lora.formats import LoraModule


@dataclass(frozen=True)
class ModuleUpdate:
    """The exact update one module of a file defines.

    ``kind`` "lowrank": ΔW = scale · up @ [mid] @ down (kept factored: cheap to cache and to apply);
    "dense": ΔW = scale · delta (LoHa, LoKr: only their full matrix is exact). ``dora`` ("row" | "column")
    with ``magnitude`` re-normalises W + ΔW (``dora_rule`` says how a user scale enters: "lycoris" | "peft").
    Tensors are float32 on the CPU, in the file's own layout (``delta`` is (out, in · kernel area)).
    """

    key: str
    kind: str
    scale: float
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    mid: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    dora: str | None = None
    dora_rule: str = "lycoris"
    magnitude: torch.Tensor | None = None


def _t(state: Mapping[str, torch.Tensor], module: LoraModule, role: str) -> torch.Tensor | None:
    name = module.tensor(role)
    return None if name is None else state[name].to(torch.float32)


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS rebuild_tucker: einsum('i j ..., i p, j r -> p r ...') = Σ core[i,j,…] wa[i,p] wb[j,r]."""
    return torch.einsum("ij...,ip,jr->pr...", core, wa, wb)


def _loha_delta(m: LoraModule, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    w1a, w1b, w2a, w2b = (_t(state, m, f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    t1, t2 = _t(state, m, "hada_t1"), _t(state, m, "hada_t2")
    if t1 is not None:
        return (_tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b)).flatten(1)
    return (w1a @ w1b) * (w2a @ w2b)


def _lokr_delta(m: LoraModule, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    w1 = _t(state, m, "lokr_w1")
    if w1 is None:
        w1 = _t(state, m, "lokr_w1_a") @ _t(state, m, "lokr_w1_b")
    w2 = _t(state, m, "lokr_w2")
    if w2 is None:
        t2, a, b = _t(state, m, "lokr_t2"), _t(state, m, "lokr_w2_a"), _t(state, m, "lokr_w2_b")
        w2 = _tucker(t2, a, b) if t2 is not None else a @ b
    return torch.kron(w1, w2.flatten(1))  # (a·b, c·d·k·k): equal to the 4-D kron viewed as (out, in, k, k)


def module_update(m: LoraModule, state: Mapping[str, torch.Tensor]) -> ModuleUpdate:
    """The update module ``m`` of a file defines, from the file's tensors ``state`` (any float dtype)."""
    dora = None
    magnitude = _t(state, m, "magnitude")
    rule = "peft" if magnitude is not None else "lycoris"
    if magnitude is None:
        magnitude = _t(state, m, "dora_scale")
    if magnitude is not None:
        dora, magnitude = m.dora, magnitude.flatten()
    if m.kind == "loha":
        return ModuleUpdate(m.key, "dense", m.scale, delta=_loha_delta(m, state), dora=dora, dora_rule=rule,
                            magnitude=magnitude)
    if m.kind == "lokr":
        return ModuleUpdate(m.key, "dense", m.scale, delta=_lokr_delta(m, state), dora=dora, dora_rule=rule,
                            magnitude=magnitude)
    return ModuleUpdate(m.key, "lowrank", m.scale, down=_t(state, m, "down"), up=_t(state, m, "up"),
                        mid=_t(state, m, "mid"), dora=dora, dora_rule=rule, magnitude=magnitude)


def convert_state_dict(modules: tuple[LoraModule, ...] | list[LoraModule],
                       state: Mapping[str, torch.Tensor]) -> dict[str, ModuleUpdate]:
    """{module key: ModuleUpdate} for every recognised module of a file."""
    return {m.key: module_update(m, state) for m in modules}


def delta_weight(u: ModuleUpdate, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """scale · ΔW as a float32 tensor of the module's weight shape (no DoRA, no user scale)."""
    if u.kind == "dense":
        delta = u.delta
    elif u.mid is not None:
        delta = _tucker(u.mid, u.up.flatten(1).T, u.down.flatten(1)).flatten(1)
    else:
        delta = u.up.flatten(1) @ u.down.flatten(1)
    if delta.numel() != torch.Size(weight_shape).numel():
        raise ValueError(f"{u.key}: update of shape {tuple(delta.shape)} does not fit a weight of shape {weight_shape}")
    return (delta * u.scale).reshape(weight_shape)


def _norm(w: torch.Tensor, dora: str) -> torch.Tensor:
    """‖w‖ per output row ("row") or per input column ("column"), shaped to broadcast against w."""
    if dora == "row":
        return w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    return w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))


def _ratio(mag: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """mag / norm, 0 where the norm is 0 (LyCORIS' eps gives the same zero row there)."""
    return torch.where(norm > 0, mag / norm.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(mag))


def dora_weight_delta(u: ModuleUpdate, base: torch.Tensor, lora_scale: float) -> torch.Tensor:
    """W' − W for a DoRA module at user scale ``lora_scale`` (float32, weight shape), per the module's rule.

    Written as (c − 1)·W + c·ΔW so that a magnitude equal to the norm (c = 1) gives exactly ΔW.
    """
    base = base.to(torch.float32)
    delta = delta_weight(u, tuple(base.shape))
    shape = (-1, *[1] * (base.dim() - 1)) if u.dora == "row" else (1, -1, *[1] * (base.dim() - 2))
    mag = u.magnitude.reshape(shape)
    if u.dora_rule == "peft":
        c = _ratio(mag, _norm(base + lora_scale * delta, u.dora))
        return (c - 1) * base + c * (lora_scale * delta)
    c = _ratio(mag, _norm(base + delta, u.dora))
    return lora_scale * ((c - 1) * base + c * delta)
