"""The index: a directory (local path or any URI pyarrow's filesystems accept) of Parquet parts and a manifest.

Layout::

    INDEX/manifest.json                     the current snapshot: specs, counts, and the list of live parts
    INDEX/data/signatures/part-*.parquet    one row per indexed LoRA
    INDEX/data/rejects/part-*.parquet       rejected files (path, sha256, code, reason)
    INDEX/data/base/<base_key>.parquet      base-image embeddings per (prompt, seed), shared by every LoRA
    INDEX/data/diffs/part-*.parquet         optional per-sample diffs (float16)
    INDEX/data/thumbs/part-*.parquet        optional small base/LoRA image pairs (PNG bytes)
    INDEX/data/aliases/part-*.parquet       other paths of indexed files (exact duplicates: same SHA-256)
    INDEX/data/tags/part-*.parquet          behavioural tags per LoRA (replaced as a whole by `carlos-ray tags`)
    INDEX/data/tag_vectors/part-*.parquet   the tag vocabulary's reciprocal text vectors (a cache)
    INDEX/data/partials/part-*.parquet      adaptive sampling: merged statistics of LoRAs between rounds

Commits are atomic: parts are immutable and written first under fresh names; the manifest naming them
is then swapped in by a single rename (local) or a single object PUT (object stores). A reader loads
the manifest once and reads exactly the parts it lists, so it sees the previous or the new index,
never a partial one. Parts no manifest lists (left by an interrupted commit) are ignored and
garbage-collected by `compact()`. Parts a compaction or a replacement drops are listed as `retired`
and deleted only after `retention_s` (default 10 minutes), so a reader that loaded the previous
manifest just before can still read every part it names.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TABLES = ("signatures", "rejects", "diffs", "thumbs", "aliases", "tags", "tag_vectors", "partials")
MANIFEST = "manifest.json"
RETENTION_S = 600.0  # how long dropped parts outlive the manifest that stopped listing them
MERGE_PARTS = 16  # a run of this many parts of one size class is merged into one part of the next class
MAX_LEVEL = 9  # size class of a fully compacted table

REJECT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("code", pa.string()),
        ("reason", pa.string()),
        ("config_hash", pa.string()),
        ("rejected_at", pa.string()),
    ]
)


class IndexError_(RuntimeError):
    """The index is missing, unreadable, locked by another writer, or of another configuration."""


class Manifest(BaseModel):
    """The manifest: the one typed view of `manifest.json`, read and written only through this model.

    An unknown or a missing key is an error that names it (:meth:`Index.read_manifest` raises IndexError_)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(..., description="Layout version of the index; this carlos-ray reads SCHEMA_VERSION.")
    created_at: str = Field(..., description="When the index was created (ISO 8601, UTC).")
    updated_at: str = Field(..., description="When the last commit was made.")
    version: int = Field(..., ge=0, description="Incremented by every commit; readers reload when it changes.")
    parts: dict[str, list[str]] = Field(..., description="Live Parquet parts per table, relative to the index root.")
    base: dict[str, str] = Field(..., description="Base-embedding cache file per base key.")
    counts: dict[str, int] = Field(..., description="Row counts (signatures, rejects) and the number of live parts.")
    retired: dict[str, float] = Field(default_factory=dict, description="Dropped files and when they were dropped.")
    config_hash: str | None = Field(None, description="What a signature depends on; a re-run under it skips done LoRAs.")
    base_key: str | None = Field(None, description="What the base images depend on (key of the base cache).")
    config_name: str | None = Field(None, description="Name of the configuration the index was built with.")
    generator: dict[str, Any] = Field(default_factory=dict, description="The generator spec the index was built with.")
    encoder: dict[str, Any] = Field(default_factory=dict, description="The encoder spec (the query encoder follows it).")
    sampling: dict[str, Any] | None = Field(None, description="Prompts, seeds and trigger-word policy.")
    query: dict[str, Any] | None = Field(None, description="Query encoding settings (joiner, limits).")
    prompt_set: dict[str, Any] | None = Field(None, description="Name, hash, ids and categories of the prompt set P.")
    seeds: list[int] | None = Field(None, description="Generation seeds.")
    thresholds: dict[str, Any] = Field(default_factory=dict, description="Default filters: max_strength, min_consistency, source.")
    source: str | None = Field(None, description="Where an imported index came from.")
    has_base_cache: bool | None = Field(None, description="False for an imported index without base images.")
    imported_from: dict[str, Any] | None = Field(None, description="Path and SHA-256 of an imported reference file.")
    behavior: dict[str, Any] | None = Field(None, description="Scale-family cosine and group distance of the profile "
                                            "(`config.BehaviorSpec`); None: the defaults.")
    tagging: dict[str, Any] | None = Field(None, description="How the `tags` table was made: vocabulary, calibration, "
                                           "settings and the cache key of the tag vectors (`carlos-ray tags`).")

    @classmethod
    def parse(cls, data: Any, where: str) -> "Manifest":
        """Validate raw JSON data; an error names the key (unknown or missing) and the index."""
        from carlos_ray.config import format_validation_error

        if not isinstance(data, dict):
            raise IndexError_(f"index manifest at {where} is not a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise IndexError_(
                f"index at {where} has schema version {data.get('schema_version')!r}; this carlos-ray reads {SCHEMA_VERSION}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise IndexError_(f"index manifest at {where} is invalid: {format_validation_error(e)}") from None

    def updated(self, **changes: Any) -> "Manifest":
        """A validated copy with `changes` (a field name that does not exist is an error naming it)."""
        try:
            return Manifest.model_validate({**self.model_dump(), **changes})
        except ValidationError as e:
            from carlos_ray.config import format_validation_error

            raise ValueError(f"manifest update: {format_validation_error(e)}") from None

    def live_files(self) -> set[str]:
        return {p for ps in self.parts.values() for p in ps} | set(self.base.values())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fs_and_path(uri: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path inside it, is_local)."""
    if "://" in str(uri):
        fs, path = pafs.FileSystem.from_uri(str(uri))
        return fs, path.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(str(uri))), True


@dataclass
class Snapshot:
    """One consistent view of an index: its manifest and the tables it lists."""

    manifest: Manifest
    root: str
    fs: pafs.FileSystem

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        parts = self.manifest.parts.get(name, [])
        if not parts:
            return None
        tables = [pq.read_table(f"{self.root}/{p}", filesystem=self.fs, columns=columns) for p in parts]
        return pa.concat_tables(tables, promote_options="permissive")

    def signatures(self) -> pa.Table | None:
        return self.table("signatures")

    def rejects(self) -> pa.Table:
        t = self.table("rejects")
        return t if t is not None else REJECT_SCHEMA.empty_table()

    def base(self, base_key: str) -> pa.Table | None:
        rel = self.manifest.base.get(base_key)
        if rel is None:
            return None
        return pq.read_table(f"{self.root}/{rel}", filesystem=self.fs)

    def indexed_ids(self) -> set[str]:
        t = self.table("signatures", columns=["lora_id"])
        return set() if t is None else set(t.column("lora_id").to_pylist())


class Index:
    """Reader and single writer of an index directory."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self.fs, self.root, self.local = _fs_and_path(uri)
        self._lock_path: str | None = None
        self._ids: tuple[int, set[str]] | None = None  # (manifest version, its lora_ids) after this writer's commit

    # ---- reading ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.get_file_info(f"{self.root}/{MANIFEST}").type == pafs.FileType.File

    def read_manifest(self) -> Manifest:
        path = f"{self.root}/{MANIFEST}"
        try:
            with self.fs.open_input_stream(path) as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise IndexError_(f"no index at {self.uri} (no {MANIFEST})") from None
        except (OSError, ValueError) as e:
            raise IndexError_(f"index manifest at {self.uri} is unreadable: {e}") from None
        return Manifest.parse(data, self.uri)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.read_manifest(), self.root, self.fs)

    # ---- writing ---------------------------------------------------------------------------------
    def acquire_lock(self) -> None:
        """One writer at a time (local filesystems): a lock file holding host and pid; a dead holder's lock is broken."""
        if not self.local:
            return
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, ".writer.lock")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": now_iso()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                self._lock_path = path
                return
            except FileExistsError:
                try:
                    holder = json.loads(open(path).read() or "{}")
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
                    logger.warning("breaking stale index lock of dead pid %s", holder.get("pid"))
                    os.unlink(path)
                    continue
                raise IndexError_(f"index {self.uri} is being written by {holder or 'another process'}; {path} holds the lock")
        raise IndexError_(f"could not lock index {self.uri}")

    def release_lock(self) -> None:
        if self._lock_path and os.path.exists(self._lock_path):
            os.unlink(self._lock_path)
        self._lock_path = None

    def __enter__(self) -> "Index":
        self.acquire_lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release_lock()

    def _write_part(self, name: str, table: pa.Table, level: int = 0) -> str:
        suffix = f"-L{level}" if level else ""
        rel = f"data/{name}/part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}{suffix}.parquet"
        self.fs.create_dir(f"{self.root}/data/{name}", recursive=True)
        pq.write_table(table, f"{self.root}/{rel}", filesystem=self.fs, compression="zstd")
        self._fsync_file(rel)
        return rel

    def _write_parts(self, tables: dict[str, pa.Table | None], parts: dict[str, list[str]]) -> dict[str, list[str]]:
        """Write each non-empty table as a new part, appended to `parts` (which it returns)."""
        for name, t in tables.items():
            if name not in TABLES:
                raise ValueError(f"unknown index table {name!r}; valid: {TABLES}")
            if t is not None and t.num_rows:
                parts[name].append(self._write_part(name, t))
        return parts

    def _fsync_file(self, rel: str) -> None:
        """Local parts reach the disk before a manifest names them (a power cut cannot leave a dangling name)."""
        if self.local:
            fd = os.open(f"{self.root}/{rel}", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_manifest(self, manifest: Manifest) -> None:
        data = json.dumps(manifest.model_dump(mode="json"), indent=1, sort_keys=True).encode("utf-8")
        final = f"{self.root}/{MANIFEST}"
        if self.local:
            tmp = f"{self.root}/.{MANIFEST}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # atomic on POSIX
            _fsync_dir(self.root)
        else:
            with self.fs.open_output_stream(final) as f:  # a single PUT: atomic on object stores
                f.write(data)

    def init(self, fields: dict) -> Manifest:
        """Create the index if missing, or check that an existing one has the same configuration hash."""
        self.fs.create_dir(self.root, recursive=True)
        if self.exists():
            m = self.read_manifest()
            if fields.get("config_hash") and m.config_hash not in (None, fields["config_hash"]):
                raise IndexError_(
                    f"index {self.uri} was built with config hash {m.config_hash} but this job has "
                    f"{fields['config_hash']}; use another --index directory for another configuration"
                )
            return m
        m = Manifest(schema_version=SCHEMA_VERSION, created_at=now_iso(), updated_at=now_iso(), version=0,
                     parts={t: [] for t in TABLES}, base={}, counts={}).updated(**fields)
        self._write_manifest(m)
        return m

    def _indexed_ids(self, m: Manifest) -> set[str]:
        """lora_ids of `m`'s signatures: kept from this writer's last commit when `m` is still that version, so a
        run of N one-LoRA commits reads each part's ids once instead of every part at every commit."""
        if self._ids is not None and self._ids[0] == m.version:
            return self._ids[1]
        return Snapshot(m, self.root, self.fs).indexed_ids()

    def commit(
        self,
        tables: dict[str, pa.Table | None] | None = None,
        base: tuple[str, pa.Table] | None = None,
        fields: dict | None = None,
    ) -> Manifest:
        """Append parts (and/or a base cache) and swap in a new manifest: all or nothing.

        Signature rows whose lora_id is already indexed are dropped (exactly once). When a table's newest parts
        of one size class reach MERGE_PARTS, they are merged into one part of the next class in the same commit
        (their files are retired like a compaction's), so the manifest stays short and a commit reads O(1)
        parts amortized."""
        m = self.read_manifest()
        tables = dict(tables or {})
        counts = dict(m.counts)
        sig = tables.get("signatures")
        have = None
        if sig is not None and sig.num_rows:
            have = self._indexed_ids(m)
            ids = sig.column("lora_id").to_pylist()
            keep = [i for i, x in enumerate(ids) if x not in have and x not in ids[:i]]
            if len(keep) != len(ids):
                logger.warning("dropping %d signature rows already in the index", len(ids) - len(keep))
                sig = sig.take(pa.array(keep, pa.int64()))
            tables["signatures"] = sig
            counts["signatures"] = len(have) + sig.num_rows
        new_parts = self._write_parts(tables, {t: list(m.parts.get(t, [])) for t in TABLES})
        new_parts = {name: self._merge_tail(name, ps) for name, ps in new_parts.items()}
        new_base = dict(m.base)
        if base is not None:
            key, table = base
            rel = f"data/base/{key}-{uuid.uuid4().hex[:8]}.parquet"
            self.fs.create_dir(f"{self.root}/data/base", recursive=True)
            pq.write_table(table, f"{self.root}/{rel}", filesystem=self.fs, compression="zstd")
            self._fsync_file(rel)
            new_base[key] = rel
        rej = tables.get("rejects")
        out = m.updated(**(fields or {})).updated(
            parts=new_parts, base=new_base, version=m.version + 1, updated_at=now_iso(),
            # counts kept incrementally: a commit never re-reads the whole index
            counts={**counts, "signatures": int(counts.get("signatures", 0)),
                    "rejects": int(counts.get("rejects", 0)) + (0 if rej is None else rej.num_rows),
                    "parts": sum(len(v) for v in new_parts.values())},
            retired=_retire(m, new_parts, new_base))
        self._write_manifest(out)
        if have is not None:
            self._ids = (out.version, have | set(tables["signatures"].column("lora_id").to_pylist()))
        elif self._ids is not None and self._ids[0] == m.version:
            self._ids = (out.version, self._ids[1])
        return out

    def _merge_tail(self, name: str, parts: list[str]) -> list[str]:
        """Merge the newest run of MERGE_PARTS parts of one size class into one part of the next class."""
        while True:
            level = _part_level(parts[-1]) if parts else 0
            tail = 0
            while tail < len(parts) and _part_level(parts[-1 - tail]) == level:
                tail += 1
            if tail < MERGE_PARTS:
                return parts
            run = parts[len(parts) - tail:]
            merged = pa.concat_tables([pq.read_table(f"{self.root}/{p}", filesystem=self.fs) for p in run],
                                      promote_options="permissive")
            parts = parts[: len(parts) - tail] + [self._write_part(name, merged, level + 1)]

    def compact(self, retention_s: float = RETENTION_S) -> Manifest:
        """Merge each table's parts into one; the old parts are retired, and deleted after `retention_s`."""
        m = self.read_manifest()
        snap = Snapshot(m, self.root, self.fs)
        parts = {}
        for name in TABLES:
            t = snap.table(name)
            if name == "partials" and t is not None:  # round statistics of finished LoRAs are dead weight
                from carlos_ray.adaptive import live_partials

                t = live_partials(t, snap.indexed_ids())
            parts[name] = [self._write_part(name, t, MAX_LEVEL)] if t is not None and t.num_rows else []
        m = m.updated(parts=parts, counts={**m.counts, "parts": sum(len(v) for v in parts.values())},
                      version=m.version + 1, updated_at=now_iso(), retired=_retire(m, parts, m.base))
        self._write_manifest(m)
        self.collect_garbage(m, retention_s=retention_s)
        return m

    def replace_table(self, name: str, table: pa.Table | None, fields: dict | None = None) -> Manifest:
        """Swap one table's parts for ``table`` (None or empty: drop it) in one manifest write; the old parts are retired."""
        if name not in TABLES or name == "signatures":
            raise ValueError(f"replace_table works on {[t for t in TABLES if t != 'signatures']}, got {name!r}")
        m = self.read_manifest()
        parts = {t: list(m.parts.get(t, [])) for t in TABLES}
        parts[name] = []
        parts = self._write_parts({name: table}, parts)
        m = m.updated(**(fields or {}), parts=parts, counts={**m.counts, "parts": sum(len(v) for v in parts.values())},
                      version=m.version + 1, updated_at=now_iso(), retired=_retire(m, parts, m.base))
        self._write_manifest(m)
        return m

    def replace(self, fields: dict, tables: dict[str, pa.Table | None] | None = None) -> Manifest:
        """Swap in a whole new index (new fields, only `tables`) in one manifest write; the old parts are retired."""
        try:
            old = self.read_manifest()
        except IndexError_:  # missing or unreadable: nothing to retire
            old = None
        parts = self._write_parts(tables or {}, {t: [] for t in TABLES})
        sig, rej = (tables or {}).get("signatures"), (tables or {}).get("rejects")
        m = Manifest(schema_version=SCHEMA_VERSION, created_at=now_iso(), updated_at=now_iso(),
                     version=1 if old is None else old.version + 1, parts=parts, base={},
                     counts={"signatures": 0 if sig is None else sig.num_rows, "rejects": 0 if rej is None else rej.num_rows,
                             "parts": sum(len(v) for v in parts.values())},
                     retired={} if old is None else _retire(old, parts, {})).updated(**fields)
        self._write_manifest(m)
        return m

    def collect_garbage(self, manifest: Manifest | None = None, retention_s: float = RETENTION_S) -> int:
        """Delete files the manifest does not list: retired parts and leftovers of interrupted commits
        (parts, temporary manifests), once older than `retention_s`. Run it under the writer lock."""
        m = manifest or self.read_manifest()
        live = m.live_files()
        now = time.time()
        removed = 0
        sel = pafs.FileSelector(f"{self.root}/data", recursive=True, allow_not_found=True)
        files = [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        root_files = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True))
        files += [i for i in root_files if i.base_name.startswith(f".{MANIFEST}.") and i.base_name.endswith(".tmp")]
        for info in files:
            rel = info.path[len(self.root) + 1 :] if info.path.startswith(self.root) else info.path
            if rel in live:
                continue
            since = m.retired.get(rel)
            if since is None:  # never listed: use the file's own age
                since = info.mtime.timestamp() if info.mtime is not None else 0.0
            if now - since >= retention_s:
                self.fs.delete_file(info.path)
                removed += 1
        return removed


def _part_level(rel: str) -> int:
    """Size class of a part from its name (`...-L2.parquet`; parts without a suffix are class 0)."""
    stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    tag = stem.rsplit("-", 1)[-1]
    return int(tag[1:]) if tag.startswith("L") and tag[1:].isdigit() else 0


def _retire(old: Manifest, parts: dict, base: dict) -> dict[str, float]:
    """The `retired` map of a manifest that replaces `old`: its dropped files, with the time they were dropped."""
    live = {p for ps in parts.values() for p in ps} | set(base.values())
    now = time.time()
    # entries past the retention fall back to the file's own (older) age in collect_garbage: the map stays small
    retired = {p: t for p, t in old.retired.items() if p not in live and now - t < RETENTION_S}
    for p in sorted(old.live_files()):
        if p not in live:
            retired.setdefault(p, now)
    return retired


def rejects_table(rows: Iterable[dict], config_hash: str) -> pa.Table:
    rows = [{"path": r.get("path"), "sha256": r.get("sha256"), "code": r["code"], "reason": r["reason"],
             "config_hash": config_hash, "rejected_at": now_iso()} for r in rows]
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def png_bytes(image) -> bytes:
    """Encode a uint8 (H, W, 3) array as PNG (for thumbnails)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
