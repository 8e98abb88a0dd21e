"""Applying a LoRA file to a model's modules, exactly as the file defines it.

Why forward hooks rather than peft adapters or merged weights: the update each format defines is computed
by one function (:mod:`carlos_ray.lora.convert`), so it can be checked against an independent formula; the
base weights are never written, so switching adapters or going back to the base model restores them bit for
bit; a cached adapter is just the file's own factors on the device (cheap), and only LoHa/LoKr/DoRA modules
of the *active* adapter hold a dense ΔW. LoRA/LoCon keep peft's cost: two thin matmuls (convs) per module.
The same code path serves the tiny generator and an SDXL loaded with ``from_pretrained``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from carlos_ray.lora.compat import Targets, match_modules
from carlos_ray.lora.convert import ModuleUpdate, convert_state_dict, delta_weight, dora_weight_delta
from carlos_ray.lora.header import LoraRejected
from carlos_ray.lora.inspect import describe_lora

logger = logging.getLogger(__name__)


@dataclass
class PreparedAdapter:
    """A file's per-module updates, keyed by "component.module", factors already on the modules' device/dtype."""

    path: str
    updates: dict[str, ModuleUpdate]
    formats: tuple[str, ...] = ()


def read_adapter(path: str | os.PathLike[str], targets: Targets) -> tuple[dict[str, ModuleUpdate], tuple[str, ...]]:
    """{"component.module": ModuleUpdate} for a file that fits ``targets`` (LoraRejected otherwise), on the CPU."""
    from safetensors import safe_open

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"LoRA {path} is not a .safetensors file; pickled formats are never loaded")
    info = describe_lora(path)
    mapping = match_modules(info, targets)
    names = {name for m in info.modules for _, name in m.tensors}
    with safe_open(str(info.path), framework="pt", device="cpu") as f:
        state = {n: f.get_tensor(n) for n in names}
    updates = convert_state_dict(info.modules, state)
    return {mapping[key]: u for key, u in updates.items()}, (info.format, *info.formats)


def _moved(u: ModuleUpdate, mod: torch.nn.Module) -> ModuleUpdate:
    """The update with its tensors on the module's device; low-rank factors in the module's dtype."""
    w = mod.weight
    low = {"dtype": w.dtype, "device": w.device}

    def mv(t: torch.Tensor | None, **kw) -> torch.Tensor | None:
        return None if t is None else t.to(**kw)

    if u.kind == "lowrank" and u.dora is None:
        return ModuleUpdate(u.key, u.kind, u.scale, down=mv(u.down, **low), up=mv(u.up, **low), mid=mv(u.mid, **low))
    f32 = {"dtype": torch.float32, "device": w.device}
    return ModuleUpdate(u.key, u.kind, u.scale, down=mv(u.down, **f32), up=mv(u.up, **f32), mid=mv(u.mid, **f32),
                        delta=mv(u.delta, **f32), dora=u.dora, dora_rule=u.dora_rule, magnitude=mv(u.magnitude, **f32))


def _conv_kwargs(mod: torch.nn.Conv2d) -> dict:
    if mod.groups != 1 or mod.padding_mode != "zeros":
        raise ValueError(f"conv with groups={mod.groups}, padding_mode={mod.padding_mode!r} cannot take a LoRA here")
    return {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation}


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.reshape(*t.shape[:2], 1, 1)


def _lowrank_fn(mod: torch.nn.Module, u: ModuleUpdate, c: float, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> c · up(mid(down(x))) with the module's own conv geometry on the spatial factor."""
    if isinstance(mod, torch.nn.Linear):
        down, up = u.down.flatten(1), u.up.flatten(1)
        if down.shape[1] != mod.in_features or up.shape[0] != mod.out_features:
            raise ValueError(f"{name}: LoRA {tuple(up.shape)} @ {tuple(down.shape)} does not fit Linear {tuple(mod.weight.shape)}")
        return lambda x: F.linear(F.linear(x, down), up) * c
    geo = _conv_kwargs(mod)
    down, up, mid = _as4d(u.down), _as4d(u.up), u.mid
    spatial = mid if mid is not None else down
    if tuple(spatial.shape[2:]) != tuple(mod.kernel_size) or down.shape[1] != mod.in_channels or up.shape[0] != mod.out_channels:
        raise ValueError(f"{name}: LoRA kernel {tuple(spatial.shape)} does not fit conv weight {tuple(mod.weight.shape)}")
    if mid is None:
        return lambda x: F.conv2d(F.conv2d(x, down, None, **geo), up) * c
    return lambda x: F.conv2d(F.conv2d(F.conv2d(x, down), mid, None, **geo), up) * c


def _dense_fn(mod: torch.nn.Module, u: ModuleUpdate, s: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> (W' − W) x for LoHa/LoKr/DoRA modules, W' built once in float32 from the module's base weight."""
    base = mod.weight.detach()
    if u.dora is not None:
        d = dora_weight_delta(u, base, s)
    else:
        d = delta_weight(u, tuple(base.shape)) * s
    d = d.to(base.dtype)
    if isinstance(mod, torch.nn.Linear):
        return lambda x: F.linear(x, d)
    geo = _conv_kwargs(mod)
    return lambda x: F.conv2d(x, d, None, **geo)


class LoraApplier:
    """Adds one adapter's update to a set of components (name -> nn.Module) through forward hooks."""

    def __init__(self, components: Mapping[str, torch.nn.Module], targets: Targets):
        self.components = dict(components)
        self.targets = targets
        self._handles: list = []
        self.active: tuple[PreparedAdapter, float] | None = None

    def _module(self, path: str) -> torch.nn.Module:
        comp, _, name = path.partition(".")
        model = self.components[comp]
        try:
            return model.get_submodule(name)
        except AttributeError:  # recent transformers flatten CLIPTextModel: no "text_model." level
            return model.get_submodule(name.removeprefix("text_model."))

    def prepare(self, path: str | os.PathLike[str]) -> PreparedAdapter:
        """Read, convert and check a file against the real modules (shapes), factors on their device."""
        updates, formats = read_adapter(path, self.targets)
        moved = {}
        for target, u in updates.items():
            mod = self._module(target)
            moved[target] = _moved(u, mod)
            if u.kind == "lowrank" and u.dora is None:  # fail here, not mid-generation
                _lowrank_fn(mod, moved[target], 1.0, target)
            else:
                delta_weight(moved[target], tuple(mod.weight.shape))
        return PreparedAdapter(str(path), moved, formats)

    def activate(self, adapter: PreparedAdapter, scale: float) -> None:
        """Make ``adapter`` at user scale ``scale`` the only applied update."""
        if self.active is not None and self.active[0] is adapter and self.active[1] == scale:
            return
        self.deactivate()
        for target, u in adapter.updates.items():
            mod = self._module(target)
            if u.kind == "lowrank" and u.dora is None:
                fn = _lowrank_fn(mod, u, scale * u.scale, target)
            else:
                fn = _dense_fn(mod, u, scale)
            self._handles.append(mod.register_forward_hook(lambda m, args, out, fn=fn: out + fn(args[0])))
        self.active = (adapter, scale)

    def deactivate(self) -> None:
        """Remove every hook: the modules compute exactly their base function again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.active = None

    @property
    def hooked_modules(self) -> int:
        return len(self._handles)


__all__ = ["LoraApplier", "LoraRejected", "PreparedAdapter", "read_adapter"]
