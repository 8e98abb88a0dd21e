"""LoRA file inspection: header-only validation, compatibility with a generator, discovery, sidecars."""

from carlos_ray.lora.inspect import (
    REJECT_CODES,
    LoraInfo,
    LoraModule,
    LoraRejected,
    check_compatible,
    discover_loras,
    inspect_lora,
    match_modules,
    read_metadata,
    targets_from_modules,
)
from carlos_ray.lora.sidecar import SidecarInfo, read_sidecar

__all__ = [
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
