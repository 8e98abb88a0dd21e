"""Import the published CARLoS reference signatures into a carlos-ray index.

The published ``carlos==0.0.3`` wheel (or its ``metrics_database.parquet``) holds 740 SDXL LoRA
signatures computed with CLIP ViT-B/32 ``openai`` image features. :func:`import_reference`
reads it with :func:`carlos_ray.reference.read_reference` (directions kept bit for bit) and writes
an ordinary index through :class:`carlos_ray.store.Index`, so every reader (ranker, server,
report) treats it like an index built here. The index has no base cache and no thumbnails: the
reference ships signatures only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from carlos_ray.reference import read_reference, reference_manifest
from carlos_ray.store import MANIFEST, Index, IndexError_

logger = logging.getLogger(__name__)

REFERENCE_CONFIG_NAME = "carlos-reference-0.0.3"


def reference_config_hash() -> str:
    """The configuration hash of an imported reference index (a function of the reference settings only)."""
    blob = json.dumps({"name": REFERENCE_CONFIG_NAME, **reference_manifest()}, sort_keys=True).encode("utf-8")
    return "ref-" + hashlib.sha256(blob).hexdigest()[:16]


def reference_index_fields(source_path: str | Path, source_sha256: str) -> dict[str, Any]:
    """Manifest fields of an index imported from the reference (besides those `Index.init` adds)."""
    return {
        **reference_manifest(),
        "config_hash": reference_config_hash(),
        "config_name": REFERENCE_CONFIG_NAME,
        "base_key": None,
        "imported_from": {"path": str(source_path), "sha256": source_sha256},
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_target(index: Index, config_hash: str, force: bool) -> bool:
    """Decide what to do with an existing target; returns True if an existing index must be replaced.

    Raises :class:`IndexError_` for a non-empty directory that is not an index, and for an index of
    another configuration (or an unreadable manifest) unless ``force``.
    """
    if not index.exists():
        entries = index.fs.get_file_info(pafs.FileSelector(index.root, recursive=False, allow_not_found=True))
        visible = [e.base_name for e in entries if not e.base_name.startswith(".")]
        if visible:
            raise IndexError_(
                f"{index.uri} is a non-empty directory without an index ({MANIFEST} missing; it holds "
                f"{sorted(visible)[:5]}); import into a new or empty directory"
            )
        return False
    try:
        existing = index.read_manifest()
    except IndexError_ as e:
        if force:
            logger.warning("replacing the unreadable index at %s (--force): %s", index.uri, e)
            return True
        raise IndexError_(f"{e}; pass force=True (--force) to replace it") from None
    if existing.config_hash == config_hash:
        return False  # same reference: the import is idempotent (rows already present are skipped)
    if not force:
        raise IndexError_(
            f"index {index.uri} holds another configuration ({existing.config_name or 'unnamed'}, config hash "
            f"{existing.config_hash}, {existing.counts.get('signatures', 0)} signatures); "
            f"the reference has config hash {config_hash}. Use another --index directory, or --force to replace it"
        )
    logger.warning("replacing index %s (config hash %s) with the reference (--force)", index.uri, existing.config_hash)
    return True


def import_reference(path: str | Path, index_uri: str, *, force: bool = False) -> dict[str, Any]:
    """Import the published reference (wheel or parquet) at ``path`` into the index at ``index_uri``.

    Creates the index with the reference manifest fields (ViT-B/32 ``openai``, paper thresholds
    9.8 / 0.041, no base cache) and commits the 740 signatures. Re-importing into the same index
    adds nothing. An existing index of another configuration is refused unless ``force``, which
    replaces it (its parts are garbage-collected after the new manifest is in place).

    Returns a summary: index, source, sha256, rows, added, skipped, config_hash, thresholds, version.
    Raises :class:`carlos_ray.reference.ReferenceFormatError` for a wrong or damaged file and
    :class:`carlos_ray.store.IndexError_` for a target that cannot be written.
    """
    path = Path(path)
    table, _ = read_reference(path)  # validates everything before the index is touched
    fields = reference_index_fields(path.resolve(), _sha256(path))
    table = table.set_column(
        table.schema.get_field_index("config_hash"), "config_hash",
        pa.array([fields["config_hash"]] * table.num_rows, pa.string()),
    )  # fmt: skip
    index = Index(index_uri)
    info = index.fs.get_file_info(index.root)
    if info.type not in (pafs.FileType.NotFound, pafs.FileType.Directory):
        raise IndexError_(f"index path {index.uri} exists and is not a directory")
    with index:
        replace = _check_target(index, fields["config_hash"], force)
        if replace:  # one manifest write swaps the whole index: readers see the old one or the new one
            new_rows = list(range(table.num_rows))
            manifest = index.replace(fields, {"signatures": table})
            removed = index.collect_garbage(manifest, retention_s=0)  # replaced on request: no need to keep old parts
            logger.info("removed %d files of the replaced index", removed)
        else:
            index.init(fields)
            before = index.snapshot().indexed_ids()
            new_rows = [i for i, x in enumerate(table["lora_id"].to_pylist()) if x not in before]
            # only new rows are handed to commit (an idempotent re-import commits the fields alone)
            tables = {"signatures": table.take(pa.array(new_rows, pa.int64()))} if new_rows else {}
            manifest = index.commit(tables, fields=fields)
    added = len(new_rows)
    summary = {
        "index": str(index_uri),
        "source": str(path),
        "sha256": fields["imported_from"]["sha256"],
        "rows": table.num_rows,
        "added": added,
        "skipped": table.num_rows - added,
        "signatures": manifest.counts["signatures"],
        "config_hash": fields["config_hash"],
        "thresholds": manifest.thresholds,
        "version": manifest.version,
        "replaced": replace,
    }
    logger.info("imported %d reference signatures into %s (%d new)", table.num_rows, index_uri, added)
    return summary
