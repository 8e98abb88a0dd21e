"""Header-only inspection of LoRA ``.safetensors`` files: what the file is, and whether it can be applied.

Reads the header (:mod:`carlos_ray.lora.header`), recognises the adapter modules from the keys
(:mod:`carlos_ray.lora.formats`), reads only the per-module alpha scalars, optionally scans the adapter
tensors for NaN/inf through a bounded buffer, and hashes the file. The generator applies a file through
the same recognition (:mod:`carlos_ray.lora.apply`), so a file accepted here is a file it can apply.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from carlos_ray.lora.compat import check_compatible, match_modules, targets_from_modules
from carlos_ray.lora.discover import discover_loras
from carlos_ray.lora.info import LoraInfo
from carlos_ray.lora.formats import (
    COMPONENTS, FormatError, LoraModule, adapter_metadata, build_module, check_scalar, format_names, group_tensors,
    kohya_to_dotted, layouts_of,
)
from carlos_ray.lora.header import (
    CHUNK_BYTES, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_METADATA_BYTES, PICKLE_EXTENSIONS, REJECT_CODES,
    LoraRejected, TensorEntry, first_nonfinite, open_regular, parse_header, pickle_extension_reject, read_metadata,
    read_scalar, resolve_path, sha256_of,
)

__all__ = [
    "COMPONENTS", "PICKLE_EXTENSIONS", "REJECT_CODES", "LoraInfo", "LoraModule", "LoraRejected", "inspect_lora",
    "check_compatible", "describe_lora", "discover_loras", "kohya_to_dotted", "match_modules", "read_metadata", "recognize",
    "targets_from_modules",
]

logger = logging.getLogger(__name__)


def _alpha(f: BinaryIO, t: TensorEntry, path: Any) -> float:
    try:
        check_scalar(t)
        value = read_scalar(f, t)
    except FormatError as exc:
        raise LoraRejected(exc.code, str(exc), path) from None
    except EOFError:
        raise LoraRejected("truncated", f"file ended inside tensor {t.name!r}", path) from None
    if not math.isfinite(value):
        raise LoraRejected("nonfinite", f"{t.name!r} is {value}", path)
    return value


def _not_lora(names: Sequence[str], path: Any) -> LoraRejected:
    return LoraRejected(
        "not_lora",
        "no LoRA keys (kohya 'lora_unet_*.lora_down.weight', OneTrainer 'unet.*.lora_down.weight', peft "
        f"'*.lora_A.weight', diffusers '*.lora.down.weight', LyCORIS 'hada_*'/'lokr_*'); keys look like {sorted(names)[:3]}",
        path,
    )


def recognize(f: BinaryIO, tensors: list[TensorEntry], metadata: dict[str, str], path: Any) -> tuple[
        list[LoraModule], tuple[str, str, ...], list[str]]:
    """(modules, (family, *format names), ignored tensor names) of an open file; LoraRejected if unusable.

    Reads nothing but the alpha scalars.
    """
    groups, ignored, unsupported = group_tensors(tensors)
    try:
        if unsupported:
            name, algo = unsupported[0]
            raise FormatError("unsupported", f"{algo} tensors such as {name!r} ({len(unsupported)} in all): this adapter "
                              "algorithm is not applied by carlos-ray (supported: LoRA, LoCon, LoHa, LoKr, DoRA)")
        if not groups:
            raise _not_lora([t.name for t in tensors], path)
        layouts = layouts_of(groups)
        meta = adapter_metadata(metadata)
        modules = []
        for g in sorted(groups, key=lambda g: (g.component, g.key)):
            alpha = _alpha(f, g.roles["alpha"], path) if "alpha" in g.roles else None
            modules.append(build_module(g, alpha, meta))
    except FormatError as exc:
        raise LoraRejected(exc.code, str(exc), path) from None
    family, names = format_names(modules, layouts)
    return modules, (family, *names), ignored


def _scan_values(f: BinaryIO, modules: list[LoraModule], by_name: dict[str, TensorEntry], path: Any) -> None:
    buf = bytearray(CHUNK_BYTES)
    for m in modules:
        for role, name in m.tensors:
            if role == "alpha":
                continue
            t = by_name[name]
            try:
                bad = first_nonfinite(f, t, buf)
            except EOFError:
                raise LoraRejected("truncated", f"file ended inside tensor {t.name!r}", path) from None
            if bad is not None:
                raise LoraRejected("nonfinite", f"tensor {t.name!r} has a NaN or inf at flat index {bad}", path)


def _check_factor_dtypes(modules: list[LoraModule], by_name: dict[str, TensorEntry], path: Any) -> None:
    for m in modules:
        for role, name in m.tensors:
            if role != "alpha" and by_name[name].dtype not in ("F16", "BF16", "F32", "F64"):
                raise LoraRejected("bad_lora", f"tensor {name!r} is {by_name[name].dtype}; LoRA factors must be floats", path)


def _info(path: str | os.PathLike[str], allowed_roots: Sequence[str | os.PathLike[str]] | None, check_values: bool,
          with_hash: bool, max_header_bytes: int, max_metadata_bytes: int) -> LoraInfo:
    """Read and describe one file (sha256 "" unless ``with_hash``); LoraRejected if it is not an applicable LoRA."""
    real = resolve_path(path, allowed_roots)
    for p in (Path(path), real):
        if (rej := pickle_extension_reject(p)) is not None:
            raise LoraRejected(rej.code, rej.reason, path)
    f, size = open_regular(real, path)
    with f:
        tensors, metadata = parse_header(f, size, path, max_header_bytes, max_metadata_bytes)
        modules, names, ignored = recognize(f, tensors, metadata, path)
        by_name = {t.name: t for t in tensors}
        _check_factor_dtypes(modules, by_name, path)
        if check_values:
            _scan_values(f, modules, by_name, path)
        sha = sha256_of(f, bytearray(CHUNK_BYTES)) if with_hash else ""
    alphas = [m.alpha for m in modules if m.alpha is not None]
    targets: dict[str, list[str]] = {}
    for m in modules:
        targets.setdefault(m.component, []).append(m.name)
    return LoraInfo(
        path=real,
        sha256=sha,
        size_bytes=size,
        format=names[0],
        rank=max(m.rank for m in modules),
        alpha=(alphas[0] if len(set(alphas)) == 1 else max(alphas)) if alphas else None,
        dtypes=tuple(sorted({t.dtype for t in tensors})),
        tensor_count=len(tensors),
        targets={c: sorted(v) for c, v in sorted(targets.items())},
        modules=tuple(modules),
        metadata=metadata,
        ignored_keys=tuple(sorted(ignored)[:20]),
        ignored_count=len(ignored),
        formats=tuple(names[1:]),
    )


def describe_lora(path: str | os.PathLike[str]) -> LoraInfo:
    """The same description as :func:`inspect_lora` without hashing or the NaN scan (``sha256`` is "")."""
    return _info(path, None, False, False, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_METADATA_BYTES)


def inspect_lora(
    path: str | os.PathLike[str],
    *,
    allowed_roots: Sequence[str | os.PathLike[str]] | None = None,
    check_values: bool = True,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> LoraInfo:
    """Validate a LoRA ``.safetensors`` file from its header and describe it; raise LoraRejected otherwise.

    ``check_values`` scans every adapter tensor (F16/BF16/F32/F64) for NaN/inf, one tensor at a time
    through a 1 MiB buffer. Non-LoRA tensors in the file are listed in ``ignored_keys``, unchecked.
    """
    info = _info(path, allowed_roots, check_values, True, max_header_bytes, max_metadata_bytes)
    if info.ignored_count:
        logger.warning("%s: %d non-LoRA tensors ignored, e.g. %s", info.path, info.ignored_count, info.ignored_keys[:3])
    return info
