"""Header-only inspection of LoRA ``.safetensors`` files, and their compatibility with a generator.

A LoRA file is untrusted input. This module reads only the safetensors header (an 8-byte
little-endian length, then that many bytes of JSON), validates it against the file size, and,
when asked, scans the LoRA tensors one at a time for NaN/inf with a bounded read buffer. It never
reads a whole file into memory and never unpickles anything: pickle-based checkpoints are
recognized by extension or magic bytes and rejected.

Every failure is a :class:`LoraRejected` with a short machine ``code`` (one of
:data:`REJECT_CODES`) and a human ``reason`` that names the offending value.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MAX_HEADER_BYTES = 100 * MiB
#: Sum of UTF-8 key and value lengths of ``__metadata__``. kohya's tag-frequency tables are the
#: largest legitimate metadata seen in the wild (tens to a few hundred KiB).
DEFAULT_MAX_METADATA_BYTES = 512 * 1024
#: Read buffer for hashing and for the NaN/inf scan.
CHUNK_BYTES = 1 * MiB

PICKLE_EXTENSIONS = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})

#: Every code :class:`LoraRejected` can carry.
REJECT_CODES = frozenset(
    {
        "not_found",  # path does not exist
        "unreadable",  # permission denied / not a regular file / I/O error
        "not_safetensors",  # does not start like a safetensors file
        "pickle",  # pickle or torch zip checkpoint (by extension or magic bytes): never loaded
        "empty",  # zero bytes, or a header with no tensors
        "truncated",  # shorter than the length field or than the last tensor's end offset
        "header_too_large",  # claimed header length larger than the file or the limit
        "bad_header",  # not UTF-8 / not JSON / wrong structure / bad dtype / bad or gapped offsets
        "overlap",  # two tensors' byte ranges overlap
        "metadata_too_large",  # __metadata__ larger than the limit
        "not_lora",  # no LoRA down/up keys
        "bad_lora",  # LoRA keys present but malformed (missing half of a pair, rank mismatch, ...)
        "nonfinite",  # NaN or inf in a LoRA tensor
        "no_match",  # (check_compatible) some or all LoRA modules match no generator module
        "shape_mismatch",  # (check_compatible) a mapped module has different (out, in) features
        "wrong_base",  # (check_compatible) the LoRA was trained for another base model family
        "outside_root",  # path resolves outside the allowed roots
        "symlink_loop",  # symlink loop on the path or in a directory walk
    }
)

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# (unsigned view, exponent mask): all-ones exponent means inf or NaN.
_NONFINITE_MASKS: dict[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LoraRejected(Exception):
    """A LoRA file that must not be used: ``code`` is machine-readable, ``reason`` says why."""

    def __init__(self, code: str, reason: str, path: str | os.PathLike[str] | None = None):
        self.code = code
        self.reason = reason
        self.path = None if path is None else str(path)
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"[{code}] {reason}{where}")

    def __reduce__(self):  # keep code/reason/path when pickled across processes (Ray)
        return (type(self), (self.code, self.reason, self.path))


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``name`` is diffusers dotted form (best effort for kohya keys)."""

    component: str
    name: str
    key: str  # the module's key prefix in the file, e.g. "lora_unet_down_blocks_1_..." or "unet.down_blocks.1...."
    out_features: int
    in_features: int
    rank: int
    alpha: float | None


@dataclass(frozen=True)
class LoraInfo:
    """What the header says about a LoRA file (plus its hash)."""

    path: Path  # resolved real path that was read
    sha256: str
    size_bytes: int
    format: str  # "kohya" | "diffusers"
    rank: int  # max over modules
    alpha: float | None  # the alpha shared by all modules, else the max; None if the file has none
    dtypes: tuple[str, ...]  # sorted dtypes of all tensors
    tensor_count: int
    targets: dict[str, list[str]]  # component -> sorted module names (diffusers dotted form)
    modules: tuple[LoraModule, ...]
    metadata: dict[str, str]
    ignored_keys: tuple[str, ...] = ()  # non-LoRA tensors in the file (first few), not checked
    ignored_count: int = 0


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


# ---------------------------------------------------------------------------------------------
# Opening and header parsing
# ---------------------------------------------------------------------------------------------


def _resolve(path: str | os.PathLike[str], allowed_roots: Sequence[str | os.PathLike[str]] | None) -> Path:
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        raise LoraRejected("not_found", "no such file", path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LoraRejected("symlink_loop", "path contains a symlink loop", path) from None
        raise LoraRejected("unreadable", f"cannot resolve path: {exc.strerror}", path) from None
    if allowed_roots is not None:
        roots = [os.path.realpath(r) for r in allowed_roots]
        if not any(os.path.commonpath([real, r]) == r for r in roots):
            raise LoraRejected(
                "outside_root",
                f"resolves to {real}, which is outside the allowed roots {roots}",
                path,
            )
    return Path(real)


def _is_pickle_magic(prefix: bytes) -> bool:
    is_pickle = len(prefix) >= 2 and prefix[0] == 0x80 and 1 <= prefix[1] <= 5
    return is_pickle or prefix[:4] == b"PK\x03\x04"


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at end of file)."""
    parts, left = [], n
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(
    f: BinaryIO, size: int, path: Any, max_header_bytes: int, max_metadata_bytes: int
) -> tuple[list[_Tensor], dict[str, str]]:
    """Validate the header of the open file ``f`` (``size`` bytes); return tensors sorted by offset."""
    if size == 0:
        raise LoraRejected("empty", "file is zero bytes", path)
    prefix = _read_exact(f, 9)
    if len(prefix) < 8:
        if _is_pickle_magic(prefix):
            raise LoraRejected("pickle", "pickle data (magic bytes), never loaded", path)
        raise LoraRejected("truncated", f"file is {size} bytes; a safetensors file starts with an 8-byte length", path)
    (n,) = struct.unpack("<Q", prefix[:8])
    looks_safetensors = prefix[8:9] == b"{" and 8 + n <= size
    if not looks_safetensors and _is_pickle_magic(prefix):
        kind = "a zip archive (torch.save format)" if prefix[:2] == b"PK" else f"pickle protocol {prefix[1]}"
        raise LoraRejected("pickle", f"file is {kind}, not safetensors; pickled checkpoints are never loaded", path)
    if prefix[8:9] != b"{":
        raise LoraRejected(
            "not_safetensors",
            f"the header must start with '{{' after the 8-byte length; found first bytes {prefix[:9].hex()}",
            path,
        )
    if n > max_header_bytes:
        raise LoraRejected(
            "header_too_large", f"header claims {n} bytes; the limit is {max_header_bytes} bytes", path
        )
    if 8 + n > size:
        raise LoraRejected(
            "header_too_large", f"header claims {n} bytes but the file has only {size - 8} bytes after the length", path
        )
    if n < 2:
        raise LoraRejected("bad_header", f"header length {n} is too short for a JSON object", path)
    f.seek(8)
    raw = _read_exact(f, n)
    if len(raw) != n:
        raise LoraRejected("truncated", f"file ended after {len(raw)} of {n} header bytes", path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoraRejected("bad_header", f"header is not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})", path) from None
    del raw
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise LoraRejected("bad_header", f"header is not valid JSON: {str(exc)[:200]}", path) from None
    del text
    if not isinstance(header, dict):
        raise LoraRejected("bad_header", f"header must be a JSON object, got {type(header).__name__}", path)

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraRejected("bad_header", "__metadata__ must be an object of string -> string", path)
    meta_bytes = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in metadata.items())
    if meta_bytes > max_metadata_bytes:
        raise LoraRejected(
            "metadata_too_large", f"__metadata__ is {meta_bytes} bytes; the limit is {max_metadata_bytes} bytes", path
        )

    data_start = 8 + n
    tensors: list[_Tensor] = []
    for name, spec in header.items():
        if not isinstance(spec, dict):
            raise LoraRejected("bad_header", f"tensor {name!r}: entry must be an object, got {type(spec).__name__}", path)
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise LoraRejected(
                "bad_header", f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPE_SIZES)}", path
            )
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
            raise LoraRejected(
                "bad_header", f"tensor {name!r}: shape {shape!r} must be a list of at most 8 non-negative ints", path
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise LoraRejected(
                "bad_header", f"tensor {name!r}: data_offsets {offsets!r} must be [begin, end] with 0 <= begin <= end", path
            )
        numel = 1
        for d in shape:
            numel *= d
        need = numel * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != need:
            raise LoraRejected(
                "bad_header",
                f"tensor {name!r}: shape {shape} of {dtype} needs {need} bytes but data_offsets {offsets} "
                f"span {offsets[1] - offsets[0]}",
                path,
            )
        tensors.append(_Tensor(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]))
    if not tensors:
        raise LoraRejected("empty", "header lists no tensors", path)

    tensors.sort(key=lambda t: (t.begin, t.end))
    cursor, prev = data_start, None
    for t in tensors:
        if t.begin < cursor:
            raise LoraRejected(
                "overlap",
                f"tensor {t.name!r} bytes [{t.begin - data_start}, {t.end - data_start}) overlap tensor "
                f"{prev.name!r} bytes [{prev.begin - data_start}, {prev.end - data_start})",
                path,
            )
        if t.begin > cursor:
            raise LoraRejected(
                "bad_header",
                f"gap of {t.begin - cursor} bytes before tensor {t.name!r}; safetensors data must be contiguous",
                path,
            )
        cursor, prev = t.end, t
    if cursor > size:
        raise LoraRejected(
            "truncated", f"tensor data ends at byte {cursor} but the file has only {size} bytes", path
        )
    if cursor < size:
        raise LoraRejected(
            "bad_header", f"{size - cursor} trailing bytes after the last tensor are not covered by the header", path
        )
    return tensors, metadata


def _open_regular(real: Path, path: Any) -> tuple[BinaryIO, int]:
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LoraRejected("symlink_loop", "path is a symlink loop", path) from None
        raise LoraRejected("unreadable", f"cannot open: {exc.strerror}", path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise LoraRejected("unreadable", "not a regular file", path)
    return os.fdopen(fd, "rb", buffering=0), st.st_size


def read_metadata(
    path: str | os.PathLike[str],
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, after the same header validation as inspect_lora."""
    real = _resolve(path, None)
    f, size = _open_regular(real, path)
    with f:
        _, metadata = _parse_header(f, size, path, max_header_bytes, max_metadata_bytes)
    return metadata


# ---------------------------------------------------------------------------------------------
# LoRA key recognition
# ---------------------------------------------------------------------------------------------

_KOHYA_RE = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
_KOHYA_PREFIX_RE = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_")
_KOHYA_COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
_DIFFUSERS_SUFFIX_RE = re.compile(
    r"^(.+?)(\.lora_A\.weight|\.lora_B\.weight|\.lora\.down\.weight|\.lora\.up\.weight|_lora\.down\.weight"
    r"|_lora\.up\.weight|\.lora_linear_layer\.down\.weight|\.lora_linear_layer\.up\.weight|\.alpha"
    r"|\.lora_magnitude_vector(?:\.weight)?)$"
)
_ROLE = {
    ".lora_A.weight": "down",
    ".lora.down.weight": "down",
    "_lora.down.weight": "down",
    ".lora_linear_layer.down.weight": "down",
    "lora_down.weight": "down",
    ".lora_B.weight": "up",
    ".lora.up.weight": "up",
    "_lora.up.weight": "up",
    ".lora_linear_layer.up.weight": "up",
    "lora_up.weight": "up",
    ".alpha": "alpha",
    "alpha": "alpha",
    "dora_scale": "extra",
    ".lora_magnitude_vector": "extra",
    ".lora_magnitude_vector.weight": "extra",
}
_LYCORIS_RE = re.compile(r"\.(hada_\w+|lokr_\w+|oft_\w+|lora_mid\.weight|diff|diff_b)$")

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


_OLD_TE_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _diffusers_module_name(component: str, stem: str, suffix: str) -> str:
    """Module name for the legacy attention-processor spellings; peft names pass through."""
    if suffix.startswith("_lora"):  # "...attn1.processor.to_q_lora.down.weight"
        stem = stem.replace(".processor.", ".")
        head, _, leaf = stem.rpartition(".")
        if component == "unet":
            leaf = "to_out.0" if leaf == "to_out" else leaf
        else:
            leaf = _OLD_TE_NAMES.get(leaf, leaf)
        stem = f"{head}.{leaf}" if head else leaf
    return stem


def _classify(names: Iterable[str]) -> tuple[str | None, dict[tuple[str, str], dict[str, str]], list[str]]:
    """Group tensor names into LoRA modules: {(component, module_key): {role: tensor name}}."""
    kohya: dict[tuple[str, str], dict[str, str]] = {}
    diff: dict[tuple[str, str], dict[str, str]] = {}
    unprefixed: dict[tuple[str, str], dict[str, str]] = {}
    ignored: list[str] = []
    for name in names:
        m = _KOHYA_RE.match(name)
        if m:
            prefix, body, suffix = m.groups()
            kohya.setdefault((_KOHYA_COMPONENT[prefix], f"{prefix}_{body}"), {})[_ROLE[suffix]] = name
            continue
        m = _DIFFUSERS_SUFFIX_RE.match(name)
        if m and not _LYCORIS_RE.search(name):
            stem, suffix = m.groups()
            role = _ROLE[suffix]
            first, _, rest = stem.partition(".")
            if first in COMPONENTS and rest:
                diff.setdefault((first, stem), {})[role] = name
            else:
                unprefixed.setdefault(("unet", stem), {})[role] = name
            continue
        ignored.append(name)
    if not diff and unprefixed:  # diffusers/peft files without component prefix are UNet-only
        diff = unprefixed
    else:
        ignored.extend(n for roles in unprefixed.values() for n in roles.values())

    def has_pairs(groups: dict) -> bool:
        return any("down" in r or "up" in r for r in groups.values())

    if has_pairs(kohya) and has_pairs(diff):
        raise ValueError("mixes kohya (lora_unet_/lora_te*_) and diffusers (unet./text_encoder.) key styles")
    if has_pairs(kohya):
        ignored.extend(n for roles in diff.values() for n in roles.values())
        return "kohya", kohya, ignored
    if has_pairs(diff):
        ignored.extend(n for roles in kohya.values() for n in roles.values())
        return "diffusers", diff, ignored
    return None, {}, ignored + [n for g in (kohya, diff) for roles in g.values() for n in roles.values()]


# ---------------------------------------------------------------------------------------------
# Tensor value reads (bounded)
# ---------------------------------------------------------------------------------------------


def _scalar(f: BinaryIO, t: _Tensor) -> float:
    f.seek(t.begin)
    raw = _read_exact(f, t.end - t.begin)
    if len(raw) != t.end - t.begin:
        raise EOFError(t.name)
    if t.dtype == "BF16":
        return float((np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)[0])
    np_dtype = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8", "I16": "<i2", "U8": "u1"}
    return float(np.frombuffer(raw, np_dtype[t.dtype])[0])


def _first_nonfinite(f: BinaryIO, t: _Tensor, buf: bytearray) -> int | None:
    """Index of the first NaN/inf element of ``t`` (None if all finite), reading CHUNK_BYTES at a time."""
    view_dtype, mask = _NONFINITE_MASKS[t.dtype]
    itemsize = DTYPE_SIZES[t.dtype]
    f.seek(t.begin)
    pos = t.begin
    mv = memoryview(buf)
    while pos < t.end:
        want = min(len(buf), t.end - pos)
        got = f.readinto(mv[:want])
        if not got:
            raise EOFError(t.name)
        if got % itemsize:  # keep element alignment on a short read
            extra = f.readinto(mv[got : got + itemsize - got % itemsize]) or 0
            got += extra
        bits = np.frombuffer(buf, view_dtype, count=got // itemsize)
        bad = np.flatnonzero((bits & mask) == mask)
        if bad.size:
            return (pos - t.begin) // itemsize + int(bad[0])
        pos += got
    return None


def _hash(f: BinaryIO, buf: bytearray) -> str:
    h = hashlib.sha256()
    f.seek(0)
    mv = memoryview(buf)
    while True:
        got = f.readinto(mv)
        if not got:
            break
        h.update(mv[:got])
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Public: inspect
# ---------------------------------------------------------------------------------------------


def inspect_lora(
    path: str | os.PathLike[str],
    *,
    allowed_roots: Sequence[str | os.PathLike[str]] | None = None,
    check_values: bool = True,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> LoraInfo:
    """Validate a LoRA ``.safetensors`` file from its header and describe it; raise LoraRejected otherwise.

    ``check_values`` scans every LoRA tensor (F16/BF16/F32/F64) for NaN/inf, one tensor at a time
    through a 1 MiB buffer. Non-LoRA tensors in the file are listed in ``ignored_keys``, unchecked.
    """
    real = _resolve(path, allowed_roots)
    for p in {Path(path), real}:
        if p.suffix.lower() in PICKLE_EXTENSIONS:
            raise LoraRejected(
                "pickle", f"extension {p.suffix!r} is a pickle-based checkpoint; only .safetensors is loaded", path
            )
    f, size = _open_regular(real, path)
    with f:
        tensors, metadata = _parse_header(f, size, path, max_header_bytes, max_metadata_bytes)
        by_name = {t.name: t for t in tensors}
        try:
            fmt, groups, ignored = _classify(by_name)
        except ValueError as exc:
            raise LoraRejected("bad_lora", str(exc), path) from None
        if fmt is None:
            lycoris = [n for n in ignored if _LYCORIS_RE.search(n)]
            hint = (
                f"; found LyCORIS keys such as {lycoris[0]!r} (LoHa/LoKr/LoCon-diff are not supported)"
                if lycoris
                else f"; keys look like {sorted(by_name)[:3]}"
            )
            raise LoraRejected(
                "not_lora",
                "no LoRA keys (kohya 'lora_unet_*.lora_down.weight' or diffusers '*.lora_A.weight' / "
                f"'*.lora.down.weight'){hint}",
                path,
            )

        modules: list[LoraModule] = []
        checked: list[_Tensor] = []
        for (component, key), roles in sorted(groups.items()):
            down, up = roles.get("down"), roles.get("up")
            if down is None or up is None:
                have = "down weight" if down else "up weight" if up else " and ".join(sorted(roles))
                raise LoraRejected(
                    "bad_lora", f"module {key!r} has {have} but not both lora down and up weights", path
                )
            d, u = by_name[down], by_name[up]
            if len(d.shape) not in (2, 4) or len(u.shape) not in (2, 4) or d.shape[0] == 0:
                raise LoraRejected(
                    "bad_lora", f"module {key!r}: down {list(d.shape)} / up {list(u.shape)} are not LoRA shapes", path
                )
            if u.shape[1] != d.shape[0]:
                raise LoraRejected(
                    "bad_lora",
                    f"module {key!r}: down rank {d.shape[0]} (shape {list(d.shape)}) != up rank {u.shape[1]} "
                    f"(shape {list(u.shape)})",
                    path,
                )
            alpha = None
            if "alpha" in roles:
                a = by_name[roles["alpha"]]
                if math.prod(a.shape) != 1 or a.dtype not in ("BF16", "F16", "F32", "F64", "I16", "I32", "I64", "U8"):
                    raise LoraRejected("bad_lora", f"{a.name!r} must be a numeric scalar, got {a.dtype} {list(a.shape)}", path)
                try:
                    alpha = _scalar(f, a)
                except EOFError:
                    raise LoraRejected("truncated", f"file ended inside tensor {a.name!r}", path) from None
                if not np.isfinite(alpha):
                    raise LoraRejected("nonfinite", f"{a.name!r} is {alpha}", path)
            checked += [by_name[r] for role, r in roles.items() if role in ("down", "up", "extra")]
            if fmt == "kohya":
                name = kohya_to_dotted(_KOHYA_PREFIX_RE.sub("", key))
            else:
                stem = key[len(component) + 1 :] if key.startswith(component + ".") else key
                legacy = roles["down"].endswith("_lora.down.weight")
                name = _diffusers_module_name(component, stem, "_lora" if legacy else "")
            modules.append(LoraModule(component, name, key, u.shape[0], d.shape[1], d.shape[0], alpha))

        if check_values:
            buf = bytearray(CHUNK_BYTES)
            for t in checked:
                if t.dtype not in _NONFINITE_MASKS:
                    continue
                try:
                    bad = _first_nonfinite(f, t, buf)
                except EOFError:
                    raise LoraRejected("truncated", f"file ended inside tensor {t.name!r}", path) from None
                if bad is not None:
                    raise LoraRejected(
                        "nonfinite", f"tensor {t.name!r} has a NaN or inf at flat index {bad}", path
                    )
        sha = _hash(f, bytearray(CHUNK_BYTES))

    alphas = [m.alpha for m in modules if m.alpha is not None]
    targets: dict[str, list[str]] = {}
    for m in modules:
        targets.setdefault(m.component, []).append(m.name)
    info = LoraInfo(
        path=real,
        sha256=sha,
        size_bytes=size,
        format=fmt,
        rank=max(m.rank for m in modules),
        alpha=(alphas[0] if len(set(alphas)) == 1 else max(alphas)) if alphas else None,
        dtypes=tuple(sorted({t.dtype for t in tensors})),
        tensor_count=len(tensors),
        targets={c: sorted(v) for c, v in sorted(targets.items())},
        modules=tuple(modules),
        metadata=metadata,
        ignored_keys=tuple(sorted(ignored)[:20]),
        ignored_count=len(ignored),
    )
    if ignored:
        logger.warning("%s: %d non-LoRA tensors ignored, e.g. %s", real, len(ignored), info.ignored_keys[:3])
    return info


# ---------------------------------------------------------------------------------------------
# Public: compatibility with a generator
# ---------------------------------------------------------------------------------------------


def targets_from_modules(named_modules: "Iterable[tuple[str, torch.nn.Module]] | torch.nn.Module") -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} of every Linear / Conv2d (out/in channels) of one component.

    Pass ``model.named_modules()`` or the model itself; build the per-component targets mapping with
    ``{"unet": targets_from_modules(pipe.unet), "text_encoder": ..., ...}``.
    """
    import torch

    if isinstance(named_modules, torch.nn.Module):
        named_modules = named_modules.named_modules()
    out: dict[str, tuple[int, int]] = {}
    for name, mod in named_modules:
        if isinstance(mod, torch.nn.Linear):
            out[name] = (int(mod.out_features), int(mod.in_features))
        elif isinstance(mod, torch.nn.Conv2d):
            out[name] = (int(mod.out_channels), int(mod.in_channels))
    return out


_CONTEXT_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_CROSS_KV_RE = re.compile(r"attn2[._]to_[kv]$")


def _context_widths(items: Iterable[tuple[str, int]]) -> list[int]:
    return [width for name, width in items if _CROSS_KV_RE.search(name)]


def _article(family: str) -> str:
    return "an" if family.startswith("S") else "a"


def _generator_family(targets: Mapping[str, Mapping[str, tuple[int, int]]]) -> tuple[str, str]:
    """(family, evidence) of the generator, e.g. ("SDXL", "two text encoders")."""
    ctx = Counter(_context_widths((n, s[1]) for n, s in targets.get("unet", {}).items()))
    width = ctx.most_common(1)[0][0] if ctx else None
    ctx_txt = f"cross-attention context {width}" if width else "no cross-attention"
    if "text_encoder_2" in targets:
        return "SDXL", f"two text encoders, {ctx_txt}"
    if width in _CONTEXT_FAMILY:
        return _CONTEXT_FAMILY[width], f"one text encoder, {ctx_txt}"
    return "single-encoder", f"one text encoder, {ctx_txt}"


_SGM_RES = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_SGM_FIXED = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}


def _sgm_to_diffusers(name: str, layers_per_block: int, index: Mapping[str, str]) -> str | None:
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


def _layers_per_block(unet: Mapping[str, tuple[int, int]]) -> int:
    found = {int(m.group(1)) for n in unet if (m := re.match(r"^down_blocks\.0\.resnets\.(\d+)\.", n))}
    return max(found) + 1 if found else 2


def check_compatible(info: LoraInfo, targets: Mapping[str, Mapping[str, tuple[int, int]]]) -> None:
    """Raise LoraRejected unless every LoRA module maps onto a generator module of the same shape.

    See :func:`match_modules`, which this calls and which also returns the mapping.
    """
    match_modules(info, targets)


def match_modules(info: LoraInfo, targets: Mapping[str, Mapping[str, tuple[int, int]]]) -> dict[str, str]:
    """{LoRA module key: "component.module"} for a compatible LoRA; raise LoraRejected otherwise.

    ``targets``: component ("unet", "text_encoder", "text_encoder_2") -> {diffusers module name ->
    (out_features, in_features)} (Conv2d: out/in channels), e.g. from :func:`targets_from_modules`.
    Kohya names match a module whose name with "." replaced by "_" is equal (SDXL's SGM block names
    are translated first). Strict: a LoRA with *any* module that matches nothing is rejected
    (``no_match``), because diffusers would silently skip those weights. Order of checks:
    wrong_base, then no_match, then shape_mismatch.
    """
    unknown = set(targets) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown target components {sorted(unknown)}; valid: {list(COMPONENTS)}")
    gen_family, gen_evidence = _generator_family(targets)
    path = info.path

    # -- wrong_base ------------------------------------------------------------------------------
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
    if lora_ctx and gen_ctx:
        differing = sum(c for w, c in lora_ctx.items() if w not in gen_ctx)
        if 2 * differing > sum(lora_ctx.values()):
            fam = _CONTEXT_FAMILY.get(lora_width)
            looks = f"looks like {_article(fam)} {fam} LoRA" if fam else "looks like a LoRA for another base model"
            raise LoraRejected(
                "wrong_base",
                f"{looks}; this generator is {gen_family}-shaped ({gen_evidence}): {differing} of "
                f"{sum(lora_ctx.values())} cross-attention to_k/to_v modules take context width {lora_width}, "
                f"the generator's take {sorted(gen_ctx)}",
                path,
            )

    # -- map names ---------------------------------------------------------------------------------
    underscore = {c: {n.replace(".", "_"): n for n in mods} for c, mods in targets.items()}
    lpb = _layers_per_block(targets.get("unet", {}))
    mapped: list[tuple[LoraModule, str]] = []
    unmapped: list[LoraModule] = []
    # recent transformers flatten CLIPTextModel (no "text_model." level); diffusers then strips that
    # prefix from LoRA keys, so do the same.
    flat_te = {
        c for c in ("text_encoder", "text_encoder_2") if c in targets and not any(n.startswith("text_model.") for n in targets[c])
    }
    for m in info.modules:
        comp = targets.get(m.component)
        target_name = None
        name = m.name.removeprefix("text_model.") if m.component in flat_te else m.name
        if comp is not None:
            if info.format == "diffusers":
                target_name = name if name in comp else None
            else:
                flat = name.replace(".", "_")
                index = underscore[m.component]
                target_name = index.get(flat)
                if target_name is None and m.component == "unet":
                    sgm = _sgm_to_diffusers(flat, lpb, index)
                    target_name = index.get(sgm) if sgm else None
        if target_name is None:
            unmapped.append(m)
        else:
            mapped.append((m, target_name))
    if not mapped:
        raise LoraRejected(
            "no_match",
            f"none of the {len(info.modules)} LoRA modules matches a module of this generator "
            f"(e.g. {[m.key for m in unmapped[:2]]}); LoRA components {sorted(info.targets)}, generator "
            f"components {sorted(targets)}",
            path,
        )
    if unmapped:
        raise LoraRejected(
            "no_match",
            f"{len(unmapped)} of {len(info.modules)} LoRA modules match no module of this generator "
            f"(e.g. {[m.key for m in unmapped[:2]]}); a partial match is rejected because diffusers would "
            "skip those weights silently",
            path,
        )

    # -- shapes --------------------------------------------------------------------------------------
    for m, target_name in mapped:
        want = tuple(targets[m.component][target_name])
        got = (m.out_features, m.in_features)
        if got != want:
            raise LoraRejected(
                "shape_mismatch",
                f"{m.key!r}: LoRA (out, in) = {got} but generator {m.component}.{target_name} is {want}",
                path,
            )
    return {m.key: f"{m.component}.{target_name}" for m, target_name in mapped}


# ---------------------------------------------------------------------------------------------
# Public: discovery
# ---------------------------------------------------------------------------------------------


def discover_loras(
    root: str | os.PathLike[str], *, follow_symlinks: bool = True
) -> Iterator[Path | LoraRejected]:
    """Walk ``root`` for ``*.safetensors`` files (sorted, depth first).

    Yields a Path per candidate, and a LoraRejected for each pickle-extension file (``pickle``),
    directory symlink that leads back to one of its ancestors (``symlink_loop``), broken/looping
    file symlink, and unreadable directory. A directory reached twice via symlinks is walked once.
    With ``follow_symlinks=False`` symlinks are skipped entirely.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise NotADirectoryError(f"LoRA root {str(root)!r} is not a directory")
    real_root = os.path.realpath(root_path)
    visited: set[str] = {real_root}
    # stack of (dir path, tuple of real paths of it and its ancestors)
    stack: list[tuple[Path, tuple[str, ...]]] = [(root_path, (real_root,))]
    while stack:
        directory, ancestors = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield LoraRejected("unreadable", f"cannot list directory: {exc.strerror}", directory)
            continue
        subdirs: list[tuple[Path, bool]] = []
        for entry in entries:
            p = Path(entry.path)
            is_link = entry.is_symlink()
            if is_link and not follow_symlinks:
                logger.debug("skipping symlink %s", p)
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = entry.is_file(follow_symlinks=True)
            except OSError:
                is_dir = is_file = False
            if is_link and not (is_dir or is_file):
                try:
                    os.stat(p)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        yield LoraRejected("symlink_loop", "symlink loop", p)
                    elif p.suffix.lower() == ".safetensors":
                        yield LoraRejected("not_found", "broken symlink", p)
                continue
            if is_dir:
                subdirs.append((p, is_link))
            elif is_file:
                suffix = p.suffix.lower()
                if suffix == ".safetensors":
                    yield p
                elif suffix in PICKLE_EXTENSIONS:
                    yield LoraRejected(
                        "pickle", f"extension {p.suffix!r} is a pickle-based checkpoint; only .safetensors is loaded", p
                    )
        # Claim real directories before symlinked aliases of them, so files keep their real paths.
        push: list[tuple[Path, tuple[str, ...]]] = []
        for p, is_link in sorted(subdirs, key=lambda item: item[1]):
            real = os.path.realpath(p)
            if real in ancestors:
                yield LoraRejected("symlink_loop", f"directory symlink leads back to its ancestor {real}", p)
            elif real in visited:
                logger.debug("skipping %s: %s already walked", p, real)
            else:
                visited.add(real)
                push.append((p, ancestors + (real,)))
        stack.extend(sorted(push, key=lambda item: item[0].name, reverse=True))
