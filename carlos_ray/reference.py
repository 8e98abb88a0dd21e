"""Read the published CARLoS reference signatures (``carlos==0.0.3``'s ``metrics_database.parquet``).

The reference ships 740 SDXL LoRA signatures computed with CLIP ViT-B/32 ``openai`` image
features. :func:`read_reference` accepts the published wheel (a zip: the parquet member is read
in memory; nothing in the wheel is extracted, imported or executed) or the parquet file itself,
and returns a table in the index's signature schema plus the manifest fields that describe it.
Directions are imported losslessly (the float64 source values, bit for bit).
"""

from __future__ import annotations

import datetime as dt
import logging
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from carlos_ray.lora.sidecar import strip_html  # noqa: F401  (re-exported)
from carlos_ray.schema import conform_signatures

logger = logging.getLogger(__name__)

REFERENCE_MEMBER = "carlos/data/metrics_database.parquet"
REFERENCE_WIDTH = 512  # ViT-B/32 feature dimension
REQUIRED_REFERENCE_COLUMNS = ("version_id", "model_name", "model_description", "direction", "strength", "consistency")
OPTIONAL_REFERENCE_COLUMNS = ("model_id", "model_download_count", "folder_name")
_MAX_MEMBER_BYTES = 1 << 30  # refuse to inflate a member larger than this (zip-bomb guard)
_PARQUET_MAGIC = b"PAR1"


class ReferenceFormatError(ValueError):
    """The reference file is missing, damaged, or not shaped like the published signature table."""


def reference_manifest() -> dict[str, Any]:
    """Manifest fields of the published reference (paper settings and thresholds)."""
    return {
        "encoder": {"arch": "ViT-B-32", "pretrained": "openai"},
        "generator": {"model": "stabilityai/stable-diffusion-xl-base-1.0"},
        "thresholds": {"max_strength": 9.8, "min_consistency": 0.041, "source": "paper"},
        "source": "carlos==0.0.3 metrics_database.parquet",
        "has_base_cache": False,
    }


def _read_source_bytes(path: Path) -> tuple[bytes, str]:
    """The parquet bytes and an ISO timestamp of when they were written."""
    if not path.exists():
        raise ReferenceFormatError(f"reference file {str(path)!r} does not exist")
    if not path.is_file():
        raise ReferenceFormatError(f"reference path {str(path)!r} is not a file")
    with path.open("rb") as f:
        head = f.read(4)
    if head == _PARQUET_MAGIC:
        mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, tz=dt.timezone.utc)
        return path.read_bytes(), mtime.replace(microsecond=0).isoformat()
    if not zipfile.is_zipfile(path):
        raise ReferenceFormatError(
            f"{str(path)!r} is neither a parquet file nor a readable zip/wheel "
            f"(starts with {head!r}; a truncated download looks like this too)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo(REFERENCE_MEMBER)
            except KeyError:
                raise ReferenceFormatError(
                    f"wheel {str(path)!r} has no member {REFERENCE_MEMBER!r}; "
                    f"it has {len(zf.namelist())} members, e.g. {zf.namelist()[:5]}"
                ) from None
            if info.file_size > _MAX_MEMBER_BYTES:
                raise ReferenceFormatError(
                    f"{REFERENCE_MEMBER!r} in {str(path)!r} claims {info.file_size} bytes, "
                    f"more than the {_MAX_MEMBER_BYTES} allowed"
                )
            data = zf.read(info)  # checks the CRC
    # zlib.error: damaged compressed data; NotImplementedError/RuntimeError: unsupported or encrypted member
    except (
        zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError
    ) as e:
        raise ReferenceFormatError(f"cannot read {REFERENCE_MEMBER!r} from {str(path)!r}: {e}") from e
    return data, dt.datetime(*info.date_time).isoformat()


def _check_finite(name: str, values: np.ndarray, width: int = 1) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0]) // width
        raise ReferenceFormatError(f"column {name!r} has {int(bad.sum())} non-finite value(s), first in row {first}")


def _directions(column: pa.ChunkedArray) -> pa.ListArray:
    """Validate the direction column and return it as one list<float> array (values untouched)."""
    t = column.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or t.value_type not in (
        pa.float32(),
        pa.float64(),
    ):
        raise ReferenceFormatError(f"column 'direction' must be a list of float32/float64, got {t}")
    if column.null_count:
        raise ReferenceFormatError(f"column 'direction' has {column.null_count} null row(s)")
    lengths = pc.list_value_length(column).to_numpy()
    widths = np.unique(lengths)
    if len(widths) > 1:
        raise ReferenceFormatError(
            f"column 'direction' has inconsistent widths {widths.tolist()[:10]}; every row must have {REFERENCE_WIDTH}"
        )
    if len(widths) == 1 and widths[0] != REFERENCE_WIDTH:
        raise ReferenceFormatError(
            f"column 'direction' has width {int(widths[0])}; ViT-B/32 signatures have width {REFERENCE_WIDTH}"
        )
    array = column.combine_chunks()
    if not pa.types.is_list(array.type):
        array = array.cast(pa.list_(t.value_type))
    flat = pc.list_flatten(array)
    if flat.null_count:
        raise ReferenceFormatError(f"column 'direction' has {flat.null_count} null element(s)")
    _check_finite("direction", flat.to_numpy(zero_copy_only=False), REFERENCE_WIDTH)
    return array


def read_reference(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """Read the published reference signatures from the wheel or its parquet member.

    Returns ``(table, manifest)``: ``table`` conforms to :data:`carlos_ray.schema.SIGNATURE_SCHEMA`
    (``lora_id`` is ``civitai-<version_id>``; HTML stripped from descriptions; a LoRA without a
    published name is named after its folder), ``manifest`` holds :func:`reference_manifest`.
    Raises :class:`ReferenceFormatError` if the file is missing, damaged or shaped differently.
    """
    path = Path(path)
    data, written_at = _read_source_bytes(path)
    try:
        source = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ReferenceFormatError(f"{str(path)!r} does not hold a readable parquet table: {e}") from e
    missing = [c for c in REQUIRED_REFERENCE_COLUMNS if c not in source.column_names]
    if missing:
        raise ReferenceFormatError(
            f"reference table in {str(path)!r} is missing column(s) {missing}; it has {source.column_names}"
        )
    n = source.num_rows
    if n == 0:
        raise ReferenceFormatError(f"reference table in {str(path)!r} has no rows")

    version_id = source["version_id"]
    if not pa.types.is_integer(version_id.type) or version_id.null_count:
        raise ReferenceFormatError(
            f"column 'version_id' must be non-null integers, got {version_id.type} with {version_id.null_count} null(s)"
        )
    if pc.count_distinct(version_id).as_py() != n:
        raise ReferenceFormatError("column 'version_id' has duplicate values; each LoRA version must appear once")
    for name in ("strength", "consistency"):
        col = source[name]
        if not pa.types.is_floating(col.type) or col.null_count:
            raise ReferenceFormatError(
                f"column {name!r} must be non-null floats, got {col.type} with {col.null_count} null(s)"
            )
        _check_finite(name, col.to_numpy())
    direction = _directions(source["direction"])

    def optional(name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
        if name in source.column_names:
            return source[name].cast(type_)
        return pa.nulls(n, type_)

    versions = version_id.to_pylist()
    model_ids = optional("model_id", pa.int64()).to_pylist()
    folders = optional("folder_name", pa.string()).to_pylist()
    names = []
    for model_name, folder, vid in zip(source["model_name"].to_pylist(), folders, versions):
        model_name = (model_name or "").strip()
        names.append(model_name or (folder or "").strip() or f"civitai-{vid}")
    urls = [
        f"https://civitai.com/models/{mid}?modelVersionId={vid}" if mid is not None else None
        for mid, vid in zip(model_ids, versions)
    ]
    table = pa.table(
        {
            "lora_id": pa.array([f"civitai-{v}" for v in versions], pa.string()),
            "name": pa.array(names, pa.string()),
            "description": pa.array([strip_html(x) for x in source["model_description"].to_pylist()], pa.string()),
            "source_url": pa.array(urls, pa.string()),
            "direction": direction,
            "strength": source["strength"].cast(pa.float64()),
            "consistency": source["consistency"].cast(pa.float64()),
            "civitai_model_id": pa.array(model_ids, pa.int64()),
            "civitai_version_id": version_id.cast(pa.int64()),
            "download_count": optional("model_download_count", pa.int64()),
            "indexed_at": pa.array([written_at] * n, pa.string()),
        }
    )
    logger.info("read %d reference signatures from %s", n, path)
    return conform_signatures(table), reference_manifest()
