"""End-to-end indexing on the synthetic zoo through Ray Data (tiny models, local Ray)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from carlos_ray.indexing import collect_sources, run_index, signatures_in_process
from carlos_ray.store import Index

REPO = Path(__file__).resolve().parent.parent


def _rows(index: str) -> dict[str, dict]:
    t = Index(index).snapshot().signatures()
    return {r["lora_id"]: r for r in t.to_pylist()}


def _by_name(rows: dict[str, dict]) -> dict[str, dict]:
    return {Path(r["source_path"]).name.removesuffix(".safetensors"): r for r in rows.values()}


def _cos(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_signatures_equal_in_process_loop(built_index, tiny_config, zoo_dir):
    from carlos_ray.models.generator import generator_lora_targets

    jobs, _, _ = collect_sources([str(zoo_dir)], generator_lora_targets(tiny_config.generator))
    ref = signatures_in_process(tiny_config, jobs)
    rows = _rows(built_index["index"])
    assert set(rows) == set(ref)
    for lid, sig in ref.items():
        r = rows[lid]
        np.testing.assert_allclose(r["direction"], sig.direction, atol=1e-5, rtol=1e-5)
        assert r["strength"] == pytest.approx(sig.strength, abs=1e-5)
        assert r["consistency"] == pytest.approx(sig.consistency, abs=1e-5)
        assert r["n"] == sig.n == 10


def test_planted_behaviors(built_index):
    rows = _by_name(_rows(built_index["index"]))
    fam = [rows[f"scale_x{s}"] for s in ("0.5", "1", "2")]
    assert _cos(fam[0]["direction"], fam[1]["direction"]) > 0.99
    assert _cos(fam[1]["direction"], fam[2]["direction"]) > 0.99
    assert fam[0]["strength"] < fam[1]["strength"] < fam[2]["strength"]
    assert rows["noop"]["strength"] == pytest.approx(0.0, abs=1e-9)
    names = list(rows)
    dirs = np.array([np.asarray(rows[n]["direction"]) / (np.linalg.norm(rows[n]["direction"]) + 1e-12) for n in names])
    sim = dirs @ dirs.T
    np.fill_diagonal(sim, -2)
    nearest = {n: names[int(sim[i].argmax())] for i, n in enumerate(names)}
    assert nearest["twin_a"] == "twin_b" and nearest["twin_b"] == "twin_a"
    assert rows["erratic"]["strength"] == max(r["strength"] for r in rows.values())


def test_hostile_files_rejected_rest_indexed(built_index):
    summary = built_index["summary"]
    assert summary.indexed == 10
    got = {Path(r["path"]).name: r["code"] for r in summary.rejects}
    for name, code in built_index["hostile_expected"].items():
        assert name in got, f"{name} was not rejected"
        assert got[name] == code, f"{name}: expected {code}, got {got[name]}"
    rej = Index(built_index["index"]).snapshot().rejects()
    assert rej.num_rows == len(summary.rejects)
    assert all(r for r in rej.column("reason").to_pylist())


def test_manifest_and_tables(built_index, tiny_config):
    snap = Index(built_index["index"]).snapshot()
    m = snap.manifest
    assert m.counts["signatures"] == 10
    assert m.seeds == tiny_config.sampling.seeds
    assert m.generator["model"] == "tiny" and m.encoder["arch"] == "tiny"
    assert m.base_key in m.base
    base = snap.base(m.base_key)
    assert base.num_rows == len(m.prompt_set["ids"]) * len(m.seeds)
    thumbs = snap.table("thumbs")
    assert thumbs is not None and thumbs.num_rows > 0
    assert thumbs.column("png")[0].as_py()[:8] == b"\x89PNG\r\n\x1a\n"
    sig = snap.signatures()
    assert len(set(sig.column("lora_id").to_pylist())) == sig.num_rows
    assert set(m.thresholds) >= {"max_strength", "min_consistency", "source"}


def test_other_config_refuses_same_index(built_index, tiny_config):
    from carlos_ray.store import IndexError_

    other = tiny_config.model_copy(deep=True)
    other.generator.lora_scale = 0.5
    with pytest.raises(IndexError_, match="config hash"):
        run_index(other, [], built_index["index"])


def test_manifest_source(ray_session, tiny_config, zoo_dir, tmp_path):
    """A CSV manifest: metadata from the manifest wins; paths escaping the manifest's root are rejected."""
    from carlos_ray.models.generator import generator_lora_targets

    root = tmp_path / "root"
    shutil.copytree(zoo_dir, root / "zoo")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(zoo_dir / "noop.safetensors", outside)
    man = root / "loras.csv"
    man.write_text("path,name,description,trigger_words\n"
                   "zoo/twin_a.safetensors,Crisp,from manifest,\"crisp, sharp\"\n"
                   "../outside.safetensors,Escape,,\n")
    jobs, rejects, _ = collect_sources([str(man)], generator_lora_targets(tiny_config.generator))
    assert [j.name for j in jobs] == ["Crisp"]
    assert jobs[0].trigger_words == ["crisp", "sharp"] and jobs[0].description == "from manifest"
    assert [r["code"] for r in rejects] == ["outside_root"]


def test_manifest_text_is_cleaned_like_sidecars(tiny_config, zoo_dir, tmp_path):
    """Names, descriptions and trigger words from a manifest are untrusted: HTML stripped, control characters
    dropped, whitespace collapsed, lengths bounded, exactly as from a sidecar."""
    import json

    from carlos_ray.lora.sidecar import MAX_NAME_CHARS
    from carlos_ray.models.generator import generator_lora_targets

    shutil.copy(zoo_dir / "twin_a.safetensors", tmp_path / "a.safetensors")
    row = {"path": "a.safetensors", "name": "<b>Bold</b>\u0007  name " + "x" * 400,
           "description": "<script>alert(1)</script><p>Soft <i>focus</i></p>", "trigger_words": "<img src=x>crisp; sharp"}
    (tmp_path / "loras.jsonl").write_text(json.dumps(row) + "\n")
    jobs, rejects, _ = collect_sources([str(tmp_path / "loras.jsonl")], generator_lora_targets(tiny_config.generator))
    assert rejects == [] and len(jobs) == 1
    job = jobs[0]
    assert job.name.startswith("Bold name xxx") and len(job.name) <= MAX_NAME_CHARS and "\u0007" not in job.name
    assert "<" not in job.name + job.description and "alert" not in job.description and "Soft focus" in job.description
    assert job.trigger_words == ["crisp", "sharp"]


def test_kept_diffs_average_to_the_direction(built_index):
    snap = Index(built_index["index"]).snapshot()
    diffs = snap.table("diffs")
    assert diffs is not None
    rows = _rows(built_index["index"])
    assert diffs.num_rows == sum(r["n"] for r in rows.values())
    by_lora: dict[str, list] = {}
    for r in diffs.to_pylist():
        by_lora.setdefault(r["lora_id"], []).append(r["diff"])
    for lid, r in rows.items():
        mean = np.asarray(by_lora[lid], np.float64).mean(axis=0)
        np.testing.assert_allclose(mean, r["direction"], atol=2e-3)  # float16 storage
