"""Hostile sources as the indexer meets them: a tree and a manifest full of bad files, valid ones beside them.

Every bad file must be rejected with its specific code, the valid ones must become jobs, and the
inspection of the whole lot (a header claiming 3 GB among them) must stay within a small memory budget.
The end-to-end run of the same corpus through Ray is `built_index` (see test_indexing).
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest

from carlos_ray.indexing import collect_sources
from carlos_ray.lora.hostile import make_symlink_loop, write_hostile_corpus
from carlos_ray.models.generator import generator_lora_targets

MEMORY_BUDGET_BYTES = 32 << 20
BIG_FILE_BYTES = 128 << 20


def _write_big_sparse(path: Path, size: int) -> None:
    """A well-formed LoRA pair whose down weight is 128 MiB (sparse on disk: zeros cost nothing to write)."""
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    cols = size // (4 * 4)
    down = cols * 4 * 4
    header = json.dumps({
        f"{key}.lora_down.weight": {"dtype": "F32", "shape": [4, cols], "data_offsets": [0, down]},
        f"{key}.lora_up.weight": {"dtype": "F32", "shape": [32, 4], "data_offsets": [down, down + 512]},
    }).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + down + 512)


@pytest.fixture(scope="module")
def hostile_sources(tmp_path_factory, zoo_dir):
    root = tmp_path_factory.mktemp("hostile_sources")
    tree = root / "tree"
    expected = {f"hostile/{name}": code for name, code in write_hostile_corpus(tree / "hostile").items()}
    make_symlink_loop(tree)
    expected["loop/a/b/back"] = "symlink_loop"
    expected["loop/a/b/inside.safetensors"] = "wrong_base"  # reached once, not forever
    shutil.copy(Path(zoo_dir) / "noop.safetensors", tree / "valid_in_tree.safetensors")
    _write_big_sparse(tree / "big_sparse.safetensors", BIG_FILE_BYTES)
    expected["big_sparse.safetensors"] = "shape_mismatch"  # 128 MiB read in bounded chunks, then refused

    lists = root / "lists"
    (lists / "in").mkdir(parents=True)
    shutil.copy(Path(zoo_dir) / "te_only.safetensors", lists / "in" / "valid_in_manifest.safetensors")
    shutil.copy(Path(zoo_dir) / "erratic.safetensors", root / "outside.safetensors")  # valid, but outside the root
    rows = [
        {"path": "../outside.safetensors"},
        {"path": "in/../../outside.safetensors"},
        {"path": str(root / "outside.safetensors")},
        {"path": "/etc/passwd"},
        {"path": "in/missing.safetensors"},
        {"path": "in/valid_in_manifest.safetensors", "name": "from the manifest"},
    ]
    manifest = lists / "loras.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    manifest_expected = {
        "../outside.safetensors": "outside_root", "in/../../outside.safetensors": "outside_root",
        str(root / "outside.safetensors"): "outside_root", "/etc/passwd": "outside_root",
        "in/missing.safetensors": "not_found",
    }
    return {"root": root, "tree": tree, "manifest": manifest, "expected": expected, "manifest_expected": manifest_expected}


def test_every_hostile_source_is_rejected_with_its_reason_and_valid_ones_pass(hostile_sources, tiny_config):
    tree, manifest = hostile_sources["tree"], hostile_sources["manifest"]
    targets = generator_lora_targets(tiny_config.generator)
    tracemalloc.start()
    try:
        jobs, rejects, duplicates = collect_sources([str(tree), str(manifest)], targets)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BUDGET_BYTES, f"inspecting the hostile sources allocated {peak / 2**20:.1f} MiB at peak"

    got = {_key(r["path"], tree, manifest.parent): r["code"] for r in rejects}
    assert got == {**hostile_sources["expected"], **hostile_sources["manifest_expected"]}
    assert all(r["reason"] for r in rejects)
    assert sorted(Path(j.path).name for j in jobs) == ["valid_in_manifest.safetensors", "valid_in_tree.safetensors"]
    assert [j.name for j in jobs if j.path.endswith("valid_in_manifest.safetensors")] == ["from the manifest"]
    assert duplicates == 0


def _key(path: str, tree: Path, lists: Path) -> str:
    p = Path(path)
    if p.is_relative_to(tree):
        return p.relative_to(tree).as_posix()
    if p.is_relative_to(lists):
        return p.relative_to(lists).as_posix()
    return path


def test_reject_reasons_name_the_problem_without_reading_pickles(hostile_sources, tiny_config):
    targets = generator_lora_targets(tiny_config.generator)
    _, rejects, _ = collect_sources([str(hostile_sources["tree"]), str(hostile_sources["manifest"])], targets)
    by_name = {Path(r["path"]).name: r["reason"] for r in rejects}
    assert "3221225472" in by_name["header_gigabytes.safetensors"]
    assert "outside the allowed roots" in by_name["outside.safetensors"]
    assert "never loaded" in by_name["pickle_renamed.safetensors"]
    assert "SD1" in by_name["sd15_kohya.safetensors"]
    assert "leads back" in by_name["back"]
