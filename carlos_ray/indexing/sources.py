"""Where LoRAs come from: directories, `.safetensors` files and CSV/JSONL/Parquet manifests, inspected header-only.

:func:`collect_sources` turns the sources of an indexing run into jobs (one per distinct file content) and
reject records; :func:`inspect_paths` is the same walk for `carlos-ray inspect`, one result per file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


class SourceError(ValueError):
    """A source named on the command line does not exist."""


@dataclass
class LoraJob:
    """A LoRA that passed inspection and waits to be indexed."""

    lora_id: str
    path: str
    sha256: str
    format: str
    rank: int
    name: str
    description: str = ""
    trigger_words: list[str] = field(default_factory=list)
    source_url: str | None = None
    civitai_model_id: int | None = None
    civitai_version_id: int | None = None
    download_count: int | None = None


def manifest_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"manifest {path} must be .csv, .jsonl, .json or .parquet")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not r.get("path"):
            raise ValueError(f"manifest {path}: row {i + 1} has no `path`")
    return rows


def _text(value: Any) -> str | None:
    """A manifest cell as text (CSV gives strings, JSON/Parquet may give numbers); None when empty."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value if isinstance(value, str) else str(value)


def reject_record(path: str | os.PathLike | None, code: str, reason: str, sha256: str | None = None) -> dict:
    """The one shape of a reject (what `store.rejects_table` stores and the CLI prints)."""
    return {"path": None if path is None else str(path), "sha256": sha256, "code": code, "reason": reason}


Candidate = tuple[Path, dict, "list[str] | None"]  # (file, manifest row or {}, allowed roots)


def expand_sources(sources: Iterable[str | os.PathLike], allowed_roots: list[str] | None = None,
                   manifests: bool = True) -> Iterator[Candidate | dict]:
    """Every file the sources name, in order: a candidate to inspect, or a reject record from discovery.

    Directories are walked (recursively, by `discover_loras`); with `manifests`, a .csv/.jsonl/.json/.parquet
    file is a manifest whose rows name the files (relative paths resolve beside it, and stay inside it)."""
    from carlos_ray.lora import LoraRejected, discover_loras

    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            for item in discover_loras(p):
                if isinstance(item, LoraRejected):
                    yield reject_record(item.path, item.code, item.reason)
                else:
                    yield item, {}, allowed_roots
        elif manifests and p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            roots = allowed_roots or [str(p.resolve().parent)]
            for row in manifest_rows(p):
                rp = Path(row["path"]).expanduser()
                yield (rp if rp.is_absolute() else p.parent / rp), row, roots
        elif p.is_file() or p.suffix == ".safetensors" or not manifests:
            yield p, {}, allowed_roots
        else:
            raise FileNotFoundError(f"LoRA source {src} is neither a directory, a .safetensors file nor a manifest")


def inspect_candidate(path: Path, roots: list[str] | None, targets: dict | None) -> Any:
    """`LoraInfo` of a file that passed inspection (and the compatibility check when `targets` is given), else a
    reject record."""
    from carlos_ray.lora import LoraRejected, check_compatible, inspect_lora

    try:
        info = inspect_lora(path, allowed_roots=roots)
        if targets is not None:
            check_compatible(info, targets)
    except LoraRejected as e:
        return reject_record(path, e.code, e.reason)
    return info


def collect_sources(
    sources: Iterable[str | os.PathLike], targets: dict | None, allowed_roots: list[str] | None = None,
    aliases: list[dict] | None = None,
) -> tuple[list[LoraJob], list[dict], int]:
    """Inspect every LoRA named by the sources (directories, files, manifests): (jobs, rejects, duplicates).

    ``aliases``, if given, receives ``{"sha256", "lora_id", "path"}`` for every skipped copy of a file already seen."""
    from carlos_ray.lora import read_sidecar
    from carlos_ray.lora.sidecar import clean_description, clean_name, clean_trigger_words

    candidates: list[Candidate] = []
    rejects: list[dict] = []
    for item in expand_sources(sources, allowed_roots):
        (rejects if isinstance(item, dict) else candidates).append(item)
    jobs: dict[str, LoraJob] = {}
    duplicates = 0
    for path, row, roots in candidates:
        info = inspect_candidate(path, roots, targets)
        if isinstance(info, dict):
            rejects.append(info)
            continue
        lora_id = info.sha256[:16]
        if lora_id in jobs:
            duplicates += 1
            logger.info("%s is a duplicate of %s (same SHA-256): indexed once", path, jobs[lora_id].path)
            if aliases is not None:
                aliases.append({"sha256": info.sha256, "lora_id": lora_id, "path": str(info.path)})
            continue
        side = read_sidecar(info.path, metadata=info.metadata)
        extra = side.extra or {}
        jobs[lora_id] = LoraJob(
            lora_id=lora_id,
            path=str(info.path),
            sha256=info.sha256,
            format=info.format,
            rank=int(info.rank),
            # manifest rows are untrusted text too: cleaned exactly as sidecars are
            name=clean_name(_text(row.get("name"))) or side.name or Path(path).stem,
            description=clean_description(_text(row.get("description"))) or side.description or "",
            trigger_words=clean_trigger_words(row.get("trigger_words")) or list(side.trigger_words),
            source_url=row.get("source_url") or side.source_url,
            civitai_model_id=_int_or_none(extra.get("civitai_model_id", extra.get("modelId"))),
            civitai_version_id=_int_or_none(extra.get("civitai_version_id", extra.get("id"))),
            download_count=_int_or_none(extra.get("download_count")),
        )
    return list(jobs.values()), rejects, duplicates


def inspect_paths(paths: list[str], targets: dict | None) -> list[dict]:
    """One result dict per file found under `paths` (files or directories, recursive), for `carlos-ray inspect`."""
    for p in paths:
        if not Path(p).exists() and not Path(p).is_symlink():
            raise SourceError(f"no such file or directory: {p}")
    results: list[dict] = []
    for item in expand_sources(paths, manifests=False):
        info = item if isinstance(item, dict) else inspect_candidate(item[0], item[2], targets)
        if isinstance(info, dict):
            results.append({"path": info["path"], "ok": False, "reason": f"{info['code']}: {info['reason']}",
                            "code": info["code"], "format": None, "rank": None, "sha256": None})
        else:
            results.append({"path": str(item[0]), "ok": True, "reason": None, "code": None, **info.summary(),
                            "targets": {k: len(v) for k, v in info.targets.items()}})
    return results


def _int_or_none(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None

