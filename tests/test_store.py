"""The index store: atomic commits, exactly-once signatures, compaction, garbage collection, the writer lock."""

from __future__ import annotations

import json
import os
import threading

import pyarrow as pa
import pytest

from carlos_ray.store import SCHEMA_VERSION, Index, IndexError_, rejects_table


def _sig(ids, strength=1.0):
    from carlos_ray.schema import SIGNATURE_SCHEMA, conform_signatures

    rows = [{"lora_id": i, "direction": [1.0, 0.0], "strength": strength, "consistency": 0.5} for i in ids]
    return conform_signatures(pa.Table.from_pylist(rows, schema=SIGNATURE_SCHEMA))


@pytest.fixture
def index(tmp_path):
    idx = Index(str(tmp_path / "idx"))
    idx.init({"config_hash": "abc"})
    return idx


def test_commit_appends_and_drops_already_indexed(index):
    index.commit({"signatures": _sig(["a", "b"])})
    m = index.commit({"signatures": _sig(["b", "c", "c"], strength=2.0)})
    ids = index.snapshot().signatures().column("lora_id").to_pylist()
    assert sorted(ids) == ["a", "b", "c"]
    assert m["counts"]["signatures"] == 3 and m["version"] == 2
    # all rows already there: nothing written, no crash
    before = index.read_manifest()["parts"]["signatures"]
    index.commit({"signatures": _sig(["a"])})
    assert index.read_manifest()["parts"]["signatures"] == before


def test_other_config_refused(index):
    with pytest.raises(IndexError_, match="config hash"):
        Index(index.uri).init({"config_hash": "other"})


def test_reader_never_sees_a_partial_commit(index, monkeypatch):
    """A commit interrupted after writing its parts (before the manifest swap) leaves the previous index."""
    index.commit({"signatures": _sig(["a"])})

    def boom(manifest):
        raise OSError("disk full")

    monkeypatch.setattr(index, "_write_manifest", boom)
    with pytest.raises(OSError):
        index.commit({"signatures": _sig(["b"]), "rejects": rejects_table([{"path": "x", "code": "c", "reason": "r"}], "abc")})
    monkeypatch.undo()
    snap = Index(index.uri).snapshot()
    assert snap.signatures().column("lora_id").to_pylist() == ["a"]
    assert snap.rejects().num_rows == 0
    # the orphaned parts are garbage, and compaction removes them
    assert index.collect_garbage() == 2
    index.commit({"signatures": _sig(["b"])})
    m = index.compact()
    assert m["counts"]["parts"] == 1
    assert sorted(index.snapshot().signatures().column("lora_id").to_pylist()) == ["a", "b"]
    files = [f for _, _, fs in os.walk(os.path.join(index.root, "data")) for f in fs]
    assert len(files) == 1


def test_concurrent_readers_see_whole_versions(index):
    stop = threading.Event()
    seen, errors = set(), []

    def read():
        while not stop.is_set():
            try:
                snap = Index(index.uri).snapshot()
                t = snap.signatures()
                n = 0 if t is None else t.num_rows
                # each commit adds exactly 3 rows: a partial view would show another count
                assert n == 3 * snap.manifest["version"], (n, snap.manifest["version"])
                seen.add(n)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for r in readers:
        r.start()
    for v in range(10):
        index.commit({"signatures": _sig([f"{v}-{i}" for i in range(3)])})
    stop.set()
    for r in readers:
        r.join()
    assert not errors, errors[:3]
    assert len(seen) > 1


def test_writer_lock(index, tmp_path):
    other = Index(index.uri)
    with index:
        with pytest.raises(IndexError_, match="being written"):
            other.acquire_lock()
    with other:
        pass
    # a lock left by a dead process is broken
    lock = os.path.join(index.root, ".writer.lock")
    with open(lock, "w") as f:
        json.dump({"host": os.uname().nodename, "pid": 2**22 + 12345}, f)
    with Index(index.uri):
        pass


def test_missing_and_foreign_schema(tmp_path):
    with pytest.raises(IndexError_, match="no index"):
        Index(str(tmp_path / "nothing")).read_manifest()
    d = tmp_path / "future"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(IndexError_, match="schema version"):
        Index(str(d)).read_manifest()
