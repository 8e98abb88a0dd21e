"""Reading the published reference signatures (carlos==0.0.3's metrics_database.parquet)."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from carlos_ray.ranker import (
    PAPER_KEEP_CONSISTENCY,
    PAPER_KEEP_STRENGTH,
    PAPER_MAX_STRENGTH,
    PAPER_MIN_CONSISTENCY,
    Ranker,
    calibrate_thresholds,
)
from carlos_ray.reference import REFERENCE_MEMBER, ReferenceFormatError, read_reference, strip_html
from carlos_ray.schema import SIGNATURE_SCHEMA

@pytest.fixture(scope="session")
def reference(reference_wheel):
    return read_reference(reference_wheel)


def test_reads_740_signatures_in_the_index_schema(reference, source_table):
    table, manifest = reference
    assert table.num_rows == 740
    assert table.schema == SIGNATURE_SCHEMA
    assert table["lora_id"].to_pylist() == [f"civitai-{v}" for v in source_table["version_id"].to_pylist()]
    assert table["civitai_version_id"].to_pylist() == source_table["version_id"].to_pylist()
    assert table["civitai_model_id"].to_pylist() == source_table["model_id"].to_pylist()
    assert table["download_count"].to_pylist() == source_table["model_download_count"].to_pylist()
    assert table["strength"].to_pylist() == source_table["strength"].to_pylist()
    assert table["consistency"].to_pylist() == source_table["consistency"].to_pylist()
    assert table["name"].null_count == 0 and all(table["name"].to_pylist())
    assert manifest == {
        "encoder": {"arch": "ViT-B-32", "pretrained": "openai"},
        "generator": {"model": "stabilityai/stable-diffusion-xl-base-1.0"},
        "thresholds": {"max_strength": 9.8, "min_consistency": 0.041, "source": "paper"},
        "source": "carlos==0.0.3 metrics_database.parquet",
        "has_base_cache": False,
    }


def test_directions_are_bitwise_equal_to_the_source(reference, source_table):
    table, _ = reference
    ours = pc.list_flatten(table["direction"]).to_numpy()
    theirs = np.asarray(source_table["direction"].to_pylist(), dtype=np.float64)
    assert theirs.shape == (740, 512)
    assert ours.dtype == np.float64
    assert np.array_equal(ours.view(np.uint64), theirs.ravel().view(np.uint64))


def test_descriptions_have_no_html(reference, source_table):
    table, _ = reference
    # HTML elements the source uses; "<lora:name:0.8>" in the decoded text is prompt syntax, not HTML.
    tag = re.compile(r"</?(p|br|strong|em|a|span|h[1-6]|ul|ol|li|div|img|code|pre|blockquote|u|s|hr)( [^>]*)?/?>")
    descriptions = table["description"].to_pylist()
    assert sum(bool(tag.search(s)) for s in source_table["model_description"].to_pylist()) > 500
    assert not any(tag.search(d) for d in descriptions)
    assert not any("&amp;" in d or "&lt;" in d for d in descriptions)
    assert sum(bool(d) for d in descriptions) > 700


def test_strip_html():
    text = "<h2 id='x'>Title</h2><p>Use <strong>A &amp; B</strong>&nbsp;now.<br />Next</p><script>x=1</script>"
    assert strip_html(text) == "Title\n\nUse A & B now.\nNext"
    assert strip_html("plain  text") == "plain text"
    assert strip_html(None) is None


def test_parquet_path_gives_the_same_table(reference, reference_wheel, tmp_path):
    parquet = tmp_path / "metrics_database.parquet"
    with zipfile.ZipFile(reference_wheel) as zf:
        parquet.write_bytes(zf.read(REFERENCE_MEMBER))
    table, manifest = read_reference(parquet)
    expected, expected_manifest = reference
    assert table.drop_columns(["indexed_at"]).equals(expected.drop_columns(["indexed_at"]))
    assert manifest == expected_manifest


def test_similar_on_the_reference(reference):
    table, manifest = reference
    thresholds = manifest["thresholds"]
    ranker = Ranker.from_table(
        table, max_strength=thresholds["max_strength"], min_consistency=thresholds["min_consistency"]
    )
    for lora_id in table["lora_id"].to_pylist()[::97]:
        hits = ranker.similar(lora_id, k=10)
        assert len(hits) == 10 and lora_id not in [h.lora_id for h in hits]
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(-1.0 <= s <= 1.0 for s in scores)
        assert all(h.strength <= 9.8 and h.consistency >= 0.041 for h in hits)
        # independent check of the best score: float64 cosine over the allowed rows
        d = np.asarray(table["direction"].to_pylist())
        s, c = table["strength"].to_numpy(), table["consistency"].to_numpy()
        me = table["lora_id"].to_pylist().index(lora_id)
        allowed = (s <= 9.8) & (c >= 0.041)
        allowed[me] = False
        cos = d @ d[me] / (np.linalg.norm(d, axis=1) * np.linalg.norm(d[me]))
        assert scores[0] == pytest.approx(cos[allowed].max(), abs=1e-6)


def test_paper_fractions_and_calibration_on_the_reference(reference):
    table, _ = reference
    strength, consistency = table["strength"].to_numpy(), table["consistency"].to_numpy()
    kept_s = int(np.sum(strength <= PAPER_MAX_STRENGTH))
    kept_c = int(np.sum(consistency >= PAPER_MIN_CONSISTENCY))
    assert (kept_s / 740, kept_c / 740) == (PAPER_KEEP_STRENGTH, PAPER_KEEP_CONSISTENCY)
    calibrated = calibrate_thresholds(strength, consistency)
    assert int(np.sum(strength <= calibrated["max_strength"])) == kept_s
    assert int(np.sum(consistency >= calibrated["min_consistency"])) == kept_c
    assert calibrated["max_strength"] == pytest.approx(PAPER_MAX_STRENGTH, abs=0.05)
    assert calibrated["min_consistency"] == pytest.approx(PAPER_MIN_CONSISTENCY, abs=0.001)


# -- damaged inputs -------------------------------------------------------------------------


def write_parquet(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def test_missing_and_non_reference_files(tmp_path):
    with pytest.raises(ReferenceFormatError, match="does not exist"):
        read_reference(tmp_path / "nope.whl")
    junk = tmp_path / "junk.whl"
    junk.write_text("hello")
    with pytest.raises(ReferenceFormatError, match="neither a parquet file nor a readable zip"):
        read_reference(junk)
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("carlos/__init__.py", "")
    with pytest.raises(ReferenceFormatError, match="no member 'carlos/data/metrics_database.parquet'"):
        read_reference(other)


def test_truncated_wheel(reference_wheel, tmp_path):
    data = reference_wheel.read_bytes()
    truncated = tmp_path / "truncated.whl"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReferenceFormatError, match="neither a parquet file nor a readable zip"):
        read_reference(truncated)


def test_corrupted_member(reference_wheel, tmp_path):
    data = bytearray(reference_wheel.read_bytes())
    with zipfile.ZipFile(reference_wheel) as zf:
        info = zf.getinfo(REFERENCE_MEMBER)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 1000 : start + 1100] = bytes(100)  # zero 100 bytes of the compressed member
    damaged = tmp_path / "damaged.whl"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ReferenceFormatError, match="cannot read"):
        read_reference(damaged)


def test_truncated_parquet(source_table, tmp_path):
    path = write_parquet(source_table, tmp_path / "full.parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ReferenceFormatError, match="readable parquet"):
        read_reference(cut)


def test_parquet_with_a_column_dropped(source_table, tmp_path):
    path = write_parquet(source_table.drop_columns(["strength"]), tmp_path / "x.parquet")
    with pytest.raises(ReferenceFormatError, match=r"missing column\(s\) \['strength'\]"):
        read_reference(path)


def test_wrong_and_inconsistent_widths(source_table, tmp_path):
    i = source_table.column_names.index("direction")
    rows = source_table["direction"].to_pylist()
    short = source_table.set_column(i, "direction", pa.array([r[:511] for r in rows], pa.list_(pa.float64())))
    with pytest.raises(ReferenceFormatError, match="width 511; ViT-B/32 signatures have width 512"):
        read_reference(write_parquet(short, tmp_path / "short.parquet"))
    mixed = source_table.set_column(
        i, "direction", pa.array([r[:511] if j == 3 else r for j, r in enumerate(rows)], pa.list_(pa.float64()))
    )
    with pytest.raises(ReferenceFormatError, match=r"inconsistent widths \[511, 512\]"):
        read_reference(write_parquet(mixed, tmp_path / "mixed.parquet"))


def test_non_finite_values(source_table, tmp_path):
    i = source_table.column_names.index("direction")
    rows = source_table["direction"].to_pylist()
    rows[5] = [float("nan")] + rows[5][1:]
    bad = source_table.set_column(i, "direction", pa.array(rows, pa.list_(pa.float64())))
    with pytest.raises(ReferenceFormatError, match="'direction' has 1 non-finite value.*row 5"):
        read_reference(write_parquet(bad, tmp_path / "nan.parquet"))
    j = source_table.column_names.index("consistency")
    cons = source_table["consistency"].to_numpy().copy()
    cons[7] = np.inf
    bad = source_table.set_column(j, "consistency", pa.array(cons))
    with pytest.raises(ReferenceFormatError, match="'consistency' has 1 non-finite value.*row 7"):
        read_reference(write_parquet(bad, tmp_path / "inf.parquet"))


def test_duplicate_version_ids(source_table, tmp_path):
    dup = pa.concat_tables([source_table, source_table.slice(0, 1)])
    with pytest.raises(ReferenceFormatError, match="duplicate"):
        read_reference(write_parquet(dup, tmp_path / "dup.parquet"))
