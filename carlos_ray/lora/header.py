"""Safetensors header parsing for untrusted files, and the bounded tensor reads inspection needs.

A LoRA file is untrusted input. This module reads only the safetensors header (an 8-byte
little-endian length, then that many bytes of JSON), validates it against the file size, and,
when asked, scans tensors one at a time for NaN/inf with a bounded read buffer. It never reads a
whole file into memory and never unpickles anything: pickle-based checkpoints are recognized by
extension or magic bytes and rejected.

Every failure is a :class:`LoraRejected` with a short machine ``code`` (one of
:data:`REJECT_CODES`) and a human ``reason`` that names the offending value.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

MiB = 1 << 20
DEFAULT_MAX_HEADER_BYTES = 100 * MiB
#: Sum of UTF-8 key and value lengths of ``__metadata__``. kohya's tag-frequency tables are the
#: largest legitimate metadata seen in the wild (tens to a few hundred KiB).
DEFAULT_MAX_METADATA_BYTES = 512 * 1024
#: Read buffer for hashing and for the NaN/inf scan.
CHUNK_BYTES = 1 * MiB

#: The one list of pickle-based checkpoint extensions (inspection, discovery, config checks).
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
        "not_lora",  # no LoRA keys of any supported format
        "bad_lora",  # LoRA keys present but malformed (missing half of a pair, rank mismatch, ...)
        "unsupported",  # an adapter algorithm that cannot be applied exactly (OFT, BOFT, IA3, GLoRA, norm/bias diffs, ...)
        "nonfinite",  # NaN or inf in a LoRA tensor
        "no_match",  # (check_compatible) some or all LoRA modules match no generator module
        "shape_mismatch",  # (check_compatible) a mapped module has other sizes (e.g. a full-size SDXL LoRA on a tiny SDXL)
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

#: Floating dtypes a LoRA factor may have (the NaN/inf scan and the loader handle exactly these).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# (unsigned view, exponent mask): all-ones exponent means inf or NaN.
_NONFINITE_MASKS: dict[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}


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
class TensorEntry:
    """One tensor as the header describes it (absolute file offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def pickle_extension_reject(path: str | os.PathLike[str]) -> LoraRejected | None:
    """A ``pickle`` rejection if ``path`` has a pickle-checkpoint extension, else None."""
    suffix = Path(path).suffix
    if suffix.lower() not in PICKLE_EXTENSIONS:
        return None
    return LoraRejected("pickle", f"extension {suffix!r} is a pickle-based checkpoint; only .safetensors is loaded", path)


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------


def resolve_path(path: str | os.PathLike[str], allowed_roots: Sequence[str | os.PathLike[str]] | None) -> Path:
    """The real path of ``path``; LoraRejected if missing, looping, or outside ``allowed_roots``."""
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


def open_regular(real: Path, path: Any) -> tuple[BinaryIO, int]:
    """Open a regular file without following a final symlink or blocking on a FIFO."""
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


def _is_pickle_magic(prefix: bytes) -> bool:
    is_pickle = len(prefix) >= 2 and prefix[0] == 0x80 and 1 <= prefix[1] <= 5
    return is_pickle or prefix[:4] == b"PK\x03\x04"


def read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at end of file)."""
    parts, left = [], n
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Header parsing
# ---------------------------------------------------------------------------------------------


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


def _header_length(f: BinaryIO, size: int, path: Any, max_header_bytes: int) -> int:
    """The validated header length from the first 9 bytes (pickle and non-safetensors files are refused)."""
    if size == 0:
        raise LoraRejected("empty", "file is zero bytes", path)
    prefix = read_exact(f, 9)
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
        raise LoraRejected("header_too_large", f"header claims {n} bytes; the limit is {max_header_bytes} bytes", path)
    if 8 + n > size:
        raise LoraRejected(
            "header_too_large", f"header claims {n} bytes but the file has only {size - 8} bytes after the length", path
        )
    if n < 2:
        raise LoraRejected("bad_header", f"header length {n} is too short for a JSON object", path)
    return n


def _header_json(f: BinaryIO, n: int, path: Any) -> dict:
    f.seek(8)
    raw = read_exact(f, n)
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
    if not isinstance(header, dict):
        raise LoraRejected("bad_header", f"header must be a JSON object, got {type(header).__name__}", path)
    return header


def _header_metadata(header: dict, path: Any, max_metadata_bytes: int) -> dict[str, str]:
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
    return metadata


def _tensor_entry(name: str, spec: Any, data_start: int, path: Any) -> TensorEntry:
    if not isinstance(spec, dict):
        raise LoraRejected("bad_header", f"tensor {name!r}: entry must be an object, got {type(spec).__name__}", path)
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise LoraRejected("bad_header", f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPE_SIZES)}", path)
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
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_layout(tensors: list[TensorEntry], data_start: int, size: int, path: Any) -> None:
    """Tensor byte ranges must be contiguous, non-overlapping, and end exactly at the end of the file."""
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
        raise LoraRejected("truncated", f"tensor data ends at byte {cursor} but the file has only {size} bytes", path)
    if cursor < size:
        raise LoraRejected(
            "bad_header", f"{size - cursor} trailing bytes after the last tensor are not covered by the header", path
        )


def parse_header(
    f: BinaryIO, size: int, path: Any, max_header_bytes: int, max_metadata_bytes: int
) -> tuple[list[TensorEntry], dict[str, str]]:
    """Validate the header of the open file ``f`` (``size`` bytes); return tensors sorted by offset, and metadata."""
    n = _header_length(f, size, path, max_header_bytes)
    header = _header_json(f, n, path)
    metadata = _header_metadata(header, path, max_metadata_bytes)
    tensors = [_tensor_entry(name, spec, 8 + n, path) for name, spec in header.items()]
    if not tensors:
        raise LoraRejected("empty", "header lists no tensors", path)
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_layout(tensors, 8 + n, size, path)
    return tensors, metadata


def read_metadata(
    path: str | os.PathLike[str],
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, after the same header validation as inspect_lora."""
    real = resolve_path(path, None)
    f, size = open_regular(real, path)
    with f:
        _, metadata = parse_header(f, size, path, max_header_bytes, max_metadata_bytes)
    return metadata


# ---------------------------------------------------------------------------------------------
# Bounded tensor reads
# ---------------------------------------------------------------------------------------------

_SCALAR_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8", "I16": "<i2", "U8": "u1"}
SCALAR_DTYPES = frozenset(_SCALAR_DTYPES) | {"BF16"}


def read_scalar(f: BinaryIO, t: TensorEntry) -> float:
    """The single value of a one-element numeric tensor (EOFError if the file ends inside it)."""
    f.seek(t.begin)
    raw = read_exact(f, t.end - t.begin)
    if len(raw) != t.end - t.begin:
        raise EOFError(t.name)
    if t.dtype == "BF16":
        return float((np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)[0])
    return float(np.frombuffer(raw, _SCALAR_DTYPES[t.dtype])[0])


def first_nonfinite(f: BinaryIO, t: TensorEntry, buf: bytearray) -> int | None:
    """Index of the first NaN/inf element of ``t`` (None if all finite or not a float), reading len(buf) at a time."""
    if t.dtype not in _NONFINITE_MASKS:
        return None
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


def sha256_of(f: BinaryIO, buf: bytearray) -> str:
    """SHA-256 of the whole open file, read through ``buf``."""
    h = hashlib.sha256()
    f.seek(0)
    mv = memoryview(buf)
    while True:
        got = f.readinto(mv)
        if not got:
            break
        h.update(mv[:got])
    return h.hexdigest()
