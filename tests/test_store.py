"""The index store: atomic commits, exactly-once signatures, compaction, garbage collection, the writer lock."""

from __future__ import annotations

import json
import re
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
    assert m.counts["signatures"] == 3 and m.version == 2
    # all rows already there: nothing written, no crash
    before = index.read_manifest().parts["signatures"]
    index.commit({"signatures": _sig(["a"])})
    assert index.read_manifest().parts["signatures"] == before


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
    assert index.collect_garbage() == 0  # younger than the retention: a writer could still be naming them
    assert index.collect_garbage(retention_s=0) == 2
    index.commit({"signatures": _sig(["b"])})
    m = index.compact(retention_s=0)
    assert m.counts["parts"] == 1
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
                assert n == 3 * snap.manifest.version, (n, snap.manifest.version)
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


# ---- an index write interrupted at every step ------------------------------------------------------------
class _Faulty:
    """A stand-in for a module (os, pyarrow.parquet) whose file-system calls fail at the n-th call overall."""

    def __init__(self, module, names, counter):
        self._module, self._names, self._counter = module, names, counter

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if name not in self._names:
            return attr

        def call(*args, **kwargs):
            self._counter["n"] += 1
            if self._counter["n"] == self._counter["fail_at"]:
                raise OSError(f"injected failure at step {self._counter['n']} ({name})")
            return attr(*args, **kwargs)

        return call


def _inject(monkeypatch, fail_at: int) -> dict:
    import builtins

    import pyarrow.parquet as pq

    import carlos_ray.store as store

    counter = {"n": 0, "fail_at": fail_at}
    monkeypatch.setattr(store, "os", _Faulty(os, {"fsync", "replace", "open", "close"}, counter))
    monkeypatch.setattr(store, "pq", _Faulty(pq, {"write_table"}, counter))
    monkeypatch.setattr(store, "open", _Faulty(builtins, {"open"}, counter).open, raising=False)
    return counter


def _state(uri: str) -> dict:
    snap = Index(uri).snapshot()
    m = snap.manifest
    sig = snap.signatures()
    return {"version": m.version, "ids": sorted(sig.column("lora_id").to_pylist()) if sig is not None else [],
            "rejects": snap.rejects().column("path").to_pylist(), "base": sorted(m.base),
            "note": m.config_name, "counts": m.counts}


def _base_table():
    return pa.table({"prompt_idx": [0], "seed_idx": [0], "finite": [True], "embedding": [[1.0, 2.0]]})


@pytest.mark.parametrize("operation", ["commit", "compact", "replace"])
def test_a_write_interrupted_at_any_step_leaves_the_previous_index(index, monkeypatch, operation):
    index.commit({"signatures": _sig(["a"])}, base=("k1", _base_table()))
    index.commit({"signatures": _sig(["b"])})
    before = _state(index.uri)
    steps = 0
    for fail_at in range(1, 100):
        counter = _inject(monkeypatch, fail_at)
        try:
            if operation == "commit":
                index.commit({"signatures": _sig(["c"]), "rejects": rejects_table([{"path": "x", "code": "c", "reason": "r"}], "abc")},
                             base=("k2", _base_table()), fields={"config_name": "new"})
            elif operation == "compact":
                index.compact(retention_s=0)
            else:
                index.replace({"config_hash": "abc", "config_name": "new"}, {"signatures": _sig(["z"])})
            failed = False
        except OSError as e:
            assert "injected failure" in str(e)
            failed = True
        finally:
            monkeypatch.undo()
        after = _state(index.uri)  # always readable, by a fresh reader
        if failed:
            assert after == before, (fail_at, after)
            for t in ("signatures", "rejects"):
                Index(index.uri).snapshot().table(t)  # every listed part is there
            continue
        steps = counter["n"]
        break
    else:
        pytest.fail("the operation never completed")
    print(f"{operation}: interrupted at each of {steps} steps")
    assert steps >= 3, f"{operation} had only {steps} failure points"
    after = _state(index.uri)
    assert after["version"] == before["version"] + 1
    expected_ids = {"commit": ["a", "b", "c"], "compact": ["a", "b"], "replace": ["z"]}[operation]
    assert after["ids"] == expected_ids
    if operation == "commit":
        assert after["base"] == ["k1", "k2"] and after["rejects"] == ["x"] and after["note"] == "new"
    # the leftovers of the interrupted attempts are garbage, removed once past the retention
    index.collect_garbage(retention_s=0)
    live = {p for ps in index.read_manifest().parts.values() for p in ps} | set(index.read_manifest().base.values())
    on_disk = {os.path.relpath(os.path.join(d, f), index.root) for d, _, fs in os.walk(os.path.join(index.root, "data"))
               for f in fs}
    assert on_disk == live
    assert not [f for f in os.listdir(index.root) if f.endswith(".tmp")]


def test_a_reader_of_the_previous_version_survives_compaction(index):
    for v in range(3):
        index.commit({"signatures": _sig([f"id{v}"])})
    old = Index(index.uri).snapshot()  # a reader loaded the manifest ...
    index.compact()  # ... then a writer compacted: the old parts are retired, not deleted
    assert sorted(old.signatures().column("lora_id").to_pylist()) == ["id0", "id1", "id2"]
    m = index.read_manifest()
    assert len(m.retired) == 3 and m.counts["parts"] == 1
    assert index.collect_garbage() == 0  # within the retention
    assert index.collect_garbage(retention_s=0) == 3
    assert sorted(Index(index.uri).snapshot().signatures().column("lora_id").to_pylist()) == ["id0", "id1", "id2"]


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.update(shards=[]), "unknown key `shards`"),
    (lambda m: m.pop("version"), "`version`: Field required"),
    (lambda m: m.update(counts={"signatures": "many"}), "`counts.signatures`"),
])
def test_a_manifest_with_an_unknown_or_missing_key_is_an_error_naming_it(tmp_path, change, needle):
    ix = Index(str(tmp_path / "idx"))
    ix.init({"config_hash": "abc"})
    path = tmp_path / "idx" / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(IndexError_, match=re.escape(needle)):
        ix.read_manifest()
    with pytest.raises(IndexError_, match=re.escape(needle)):
        Index(str(tmp_path / "idx")).snapshot()


def test_a_manifest_update_naming_no_field_is_refused(tmp_path):
    ix = Index(str(tmp_path / "idx"))
    ix.init({"config_hash": "abc"})
    with pytest.raises(ValueError, match="unknown key `colour`"):
        ix.commit(fields={"colour": "red"})
    assert ix.read_manifest().version == 0  # nothing was written
