"""LoRA files: header-only inspection, key formats, compatibility with a generator, discovery, sidecars, exact apply.

Rooms: ``header`` (safetensors header, bounded reads), ``formats`` (key recognition, per-module scales),
``convert`` (state dict -> exact per-module update, pure), ``compat`` (names/shapes against a generator),
``discover`` (directory walk), ``inspect`` (the public verdict), ``apply`` (hooks on torch modules).
"""

from carlos_ray.lora.compat import check_compatible, match_modules, targets_from_modules
from carlos_ray.lora.discover import discover_loras
from carlos_ray.lora.formats import LoraModule
from carlos_ray.lora.header import PICKLE_EXTENSIONS, REJECT_CODES, LoraRejected, read_metadata
from carlos_ray.lora.inspect import LoraInfo, inspect_lora
from carlos_ray.lora.sidecar import SidecarInfo, read_sidecar

__all__ = [
    "PICKLE_EXTENSIONS",
    "REJECT_CODES",
    "LoraInfo",
    "LoraModule",
    "LoraRejected",
    "SidecarInfo",
    "check_compatible",
    "discover_loras",
    "inspect_lora",
    "match_modules",
    "read_metadata",
    "read_sidecar",
    "targets_from_modules",
]
