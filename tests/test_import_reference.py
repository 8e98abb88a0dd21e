"""Importing the published reference (carlos==0.0.3) into a carlos-ray index."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from carlos_ray.cli import main
from carlos_ray.importer import import_reference, reference_config_hash
from carlos_ray.ranker import Ranker
from carlos_ray.reference import REFERENCE_MEMBER, ReferenceFormatError
from carlos_ray.schema import conform_signatures
from carlos_ray.store import SCHEMA_VERSION, Index, IndexError_


@pytest.fixture(scope="module")
def imported(reference_index):
    snap = Index(reference_index["index"]).snapshot()
    return snap.manifest, snap.signatures(), reference_index["summary"]


def _bits(table: pa.Table) -> np.ndarray:
    return pc.list_flatten(table["direction"]).to_numpy().view(np.uint64)


def test_imports_740_rows_with_metadata(imported, source_table):
    manifest, table, summary = imported
    assert table.num_rows == 740 == summary["rows"] == summary["added"] == manifest.counts["signatures"]
    assert summary["skipped"] == 0 and not summary["replaced"]
    versions = source_table["version_id"].to_pylist()
    by_id = {lid: i for i, lid in enumerate(table["lora_id"].to_pylist())}
    order = [by_id[f"civitai-{v}"] for v in versions]
    t = table.take(order)
    assert t["civitai_version_id"].to_pylist() == versions
    assert t["civitai_model_id"].to_pylist() == source_table["model_id"].to_pylist()
    assert t["download_count"].to_pylist() == source_table["model_download_count"].to_pylist()
    assert t["strength"].to_pylist() == source_table["strength"].to_pylist()
    assert t["consistency"].to_pylist() == source_table["consistency"].to_pylist()
    assert all(t["name"].to_pylist()) and sum(bool(d) for d in t["description"].to_pylist()) > 700
    assert set(t["config_hash"].to_pylist()) == {reference_config_hash()}
    model_ids = source_table["model_id"].to_pylist()
    expected_urls = [None if m is None else f"https://civitai.com/models/{m}?modelVersionId={v}"
                     for m, v in zip(model_ids, versions)]  # fmt: skip
    assert t["source_url"].to_pylist() == expected_urls and sum(u is not None for u in expected_urls) > 700


def test_directions_are_bitwise_equal_to_the_source(imported, source_table):
    _, table, _ = imported
    by_id = {lid: i for i, lid in enumerate(table["lora_id"].to_pylist())}
    t = table.take([by_id[f"civitai-{v}"] for v in source_table["version_id"].to_pylist()])
    assert pa.types.is_float64(t["direction"].type.value_type)
    theirs = np.asarray(source_table["direction"].to_pylist(), dtype=np.float64)
    assert theirs.shape == (740, 512)
    assert np.array_equal(_bits(t), theirs.ravel().view(np.uint64))


def test_manifest_fields(imported, reference_wheel):
    manifest, _, summary = imported
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.encoder == {"arch": "ViT-B-32", "pretrained": "openai"}
    assert manifest.generator == {"model": "stabilityai/stable-diffusion-xl-base-1.0"}
    assert manifest.thresholds == {"max_strength": 9.8, "min_consistency": 0.041, "source": "paper"}
    assert manifest.has_base_cache is False and manifest.base == {} and manifest.base_key is None
    assert manifest.config_hash == reference_config_hash() == summary["config_hash"]
    assert manifest.parts["thumbs"] == [] and manifest.parts["rejects"] == []
    assert manifest.imported_from["path"] == str(Path(reference_wheel).resolve())
    import hashlib

    assert manifest.imported_from["sha256"] == hashlib.sha256(Path(reference_wheel).read_bytes()).hexdigest()


def test_ranker_similar_on_the_imported_index(reference_index):
    snap = Index(reference_index["index"]).snapshot()
    table, th = snap.signatures(), snap.manifest.thresholds
    ranker = Ranker.from_table(table, max_strength=th["max_strength"], min_consistency=th["min_consistency"])
    d = np.asarray(table["direction"].to_pylist())
    s, c = table["strength"].to_numpy(), table["consistency"].to_numpy()
    ids = table["lora_id"].to_pylist()
    for me in (0, 123, 739):
        hits = ranker.similar(ids[me], k=5)
        allowed = (s <= 9.8) & (c >= 0.041)
        allowed[me] = False
        cos = d @ d[me] / (np.linalg.norm(d, axis=1) * np.linalg.norm(d[me]))
        expected = np.sort(cos[allowed])[::-1][:5]
        assert [h.score for h in hits] == pytest.approx(expected.tolist(), abs=1e-6)
        assert all(h.strength <= 9.8 and h.consistency >= 0.041 for h in hits)


def test_parquet_import_equals_wheel_import_and_reimport_is_idempotent(reference_wheel, imported, tmp_path):
    parquet = tmp_path / "metrics_database.parquet"
    with zipfile.ZipFile(reference_wheel) as zf:
        parquet.write_bytes(zf.read(REFERENCE_MEMBER))
    idx = tmp_path / "idx"
    first = import_reference(parquet, str(idx))
    table = Index(str(idx)).snapshot().signatures()
    _, wheel_table, _ = imported
    assert first["added"] == 740 and first["config_hash"] == reference_config_hash()
    assert table["lora_id"].to_pylist() == wheel_table["lora_id"].to_pylist()
    assert np.array_equal(_bits(table), _bits(wheel_table))
    again = import_reference(reference_wheel, str(idx))
    assert (again["added"], again["skipped"], again["signatures"]) == (0, 740, 740)
    assert again["version"] == first["version"] + 1
    assert Index(str(idx)).snapshot().signatures().num_rows == 740


def test_damaged_file_is_a_clear_error_and_touches_nothing(reference_wheel, tmp_path, capsys):
    data = reference_wheel.read_bytes()
    truncated = tmp_path / "truncated.whl"
    truncated.write_bytes(data[: len(data) // 3])
    idx = tmp_path / "idx"
    with pytest.raises(ReferenceFormatError, match="neither a parquet file nor a readable zip"):
        import_reference(truncated, str(idx))
    assert not idx.exists()
    assert main(["import-reference", str(truncated), "--index", str(idx)]) == 2
    err = capsys.readouterr().err
    assert "carlos-ray: error:" in err and "truncated.whl" in err and "Traceback" not in err
    assert not idx.exists()

    # a readable parquet of the wrong shape
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"version_id": [1, 2], "strength": [1.0, 2.0]}), wrong)
    assert main(["import-reference", str(wrong), "--index", str(idx)]) == 2
    assert "missing column(s)" in capsys.readouterr().err
    assert main(["import-reference", str(tmp_path / "absent.whl"), "--index", str(idx)]) == 2
    assert "does not exist" in capsys.readouterr().err


def _other_index(path: Path) -> dict:
    ix = Index(str(path))
    ix.init({"config_hash": "other-config", "config_name": "tiny"})
    row = {"lora_id": "x", "direction": [1.0, 0.0], "strength": 0.5, "consistency": 0.5}
    return ix.commit({"signatures": conform_signatures(pa.Table.from_pylist([row]))})


def test_refuses_another_config_unless_forced(reference_wheel, tmp_path, capsys):
    idx = tmp_path / "idx"
    before = _other_index(idx)
    old_parts = [idx / p for p in before.parts["signatures"]]
    with pytest.raises(IndexError_, match="another configuration.*--force"):
        import_reference(reference_wheel, str(idx))
    assert main(["import-reference", str(reference_wheel), "--index", str(idx)]) == 2
    assert "--force" in capsys.readouterr().err
    assert Index(str(idx)).snapshot().indexed_ids() == {"x"}  # untouched

    assert main(["import-reference", str(reference_wheel), "--index", str(idx), "--force"]) == 0
    assert "740 new" in capsys.readouterr().out
    snap = Index(str(idx)).snapshot()
    assert snap.signatures().num_rows == 740 and "x" not in snap.indexed_ids()
    assert snap.manifest.config_hash == reference_config_hash()
    assert snap.manifest.version > before.version
    assert not any(p.exists() for p in old_parts)  # the replaced index's parts are collected
    assert not (idx / ".writer.lock").exists()


def test_refuses_a_non_index_directory(reference_wheel, tmp_path):
    d = tmp_path / "stuff"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(IndexError_, match="non-empty directory without an index"):
            import_reference(reference_wheel, str(d), force=force)
    assert (d / "notes.txt").read_text() == "mine" and not (d / "manifest.json").exists()
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(IndexError_, match="not a directory"):
        import_reference(reference_wheel, str(f))


def test_unreadable_manifest_needs_force(reference_wheel, tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "manifest.json").write_text("{not json")
    with pytest.raises(IndexError_, match="unreadable.*force"):
        import_reference(reference_wheel, str(idx))
    summary = import_reference(reference_wheel, str(idx), force=True)
    assert summary["replaced"] and summary["signatures"] == 740
    assert json.loads((idx / "manifest.json").read_text())["counts"]["signatures"] == 740
