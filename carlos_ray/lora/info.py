"""`LoraInfo`: what inspection learns about one LoRA file (its header, recognised modules and hash).

Its own module so that the compatibility check (:mod:`carlos_ray.lora.compat`) and the inspection
(:mod:`carlos_ray.lora.inspect`) can both name it without importing each other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carlos_ray.lora.formats import LoraModule

__all__ = ["LoraInfo"]


@dataclass(frozen=True)
class LoraInfo:
    """What the header says about a LoRA file (plus its hash)."""

    path: Path  # resolved real path that was read
    sha256: str
    size_bytes: int
    format: str  # key family: "kohya" | "diffusers" | "onetrainer-omi"
    rank: int  # max over modules
    alpha: float | None  # the alpha shared by all modules, else the max; None if the file has none
    dtypes: tuple[str, ...]  # sorted dtypes of all tensors
    tensor_count: int
    targets: dict[str, list[str]]  # component -> sorted module names (diffusers dotted form)
    modules: tuple[LoraModule, ...]
    metadata: dict[str, str]
    ignored_keys: tuple[str, ...] = ()  # non-LoRA tensors in the file (first few), not checked
    ignored_count: int = 0
    formats: tuple[str, ...] = ()  # detailed: kohya, kohya-sgm, peft, diffusers, diffusers-legacy, onetrainer-omi, locon, ...

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: format(s), ranks, alphas, scales, components, module kinds, dtypes."""
        return {
            "format": self.format,
            "formats": list(self.formats),
            "rank": self.rank,
            "ranks": sorted({m.rank for m in self.modules}),
            "alpha": self.alpha,
            "alphas": sorted({m.alpha for m in self.modules if m.alpha is not None}),
            "scales": sorted({round(m.scale, 9) for m in self.modules}),
            "components": {c: len(v) for c, v in self.targets.items()},
            "kinds": dict(sorted(Counter(m.kind + ("+dora" if m.dora else "") for m in self.modules).items())),
            "dtypes": list(self.dtypes),
            "tensors": self.tensor_count,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
        }
