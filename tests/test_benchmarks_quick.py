"""Each benchmark runs end to end in --quick mode and writes the JSON keys it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str, *args: str, timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run benchmarks/<name>.py with these arguments from the repository root."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_bench_consistency_quick(tmp_path):
    out = tmp_path / "consistency.json"
    proc = _bench("bench_consistency", "--quick", "--repeats", "2", "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| N (prompts x seeds) |" in proc.stdout
    result = json.loads(out.read_text())
    assert {"speedup", "max_abs_diff", "sizes"} <= set(result)
    assert len(result["sizes"]) == 2
    for size in result["sizes"].values():
        assert {"speedup", "max_abs_diff", "reference_max_abs_diff", "ours_peak_bytes"} <= set(size)
        assert size["speedup"] > 0
        assert size["max_abs_diff"] <= 1e-9  # ours vs the exact float64 pairwise mean
    assert result["speedup"] == min(s["speedup"] for s in result["sizes"].values())
    assert result["max_abs_diff"] == max(s["max_abs_diff"] for s in result["sizes"].values())


def test_bench_rank_quick(tmp_path):
    out = tmp_path / "rank.json"
    proc = _bench("bench_rank", "--quick", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| size | first pass | p50 ms | p99 ms |" in proc.stdout
    result = json.loads(out.read_text())
    assert {"p50_ms", "p99_ms", "speedup_vs_loop", "topk_exact", "sizes"} <= set(result)
    assert set(result["p50_ms"]) == {"740", "100k"}
    assert all(v > 0 for v in result["p50_ms"].values())
    assert result["topk_exact"] is True  # checked against an independent float64 brute force
    assert result["sizes"]["740"]["loop_agrees"] is True
    assert result["speedup_vs_loop"] > 1


def test_bench_query_quick(tmp_path):
    out = tmp_path / "query.json"
    proc = _bench("bench_query", "--quick", "--out", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "| query words | plain (ms) | fast (ms) | speedup |" in proc.stdout
    result = json.loads(out.read_text())
    assert {"speedup", "max_rel_error", "per_length", "batched_3word"} <= set(result)
    assert set(result["per_length"]) == {"1", "3", "8"}
    for row in result["per_length"].values():
        assert {"plain_ms", "fast_ms", "speedup", "max_rel_error"} <= set(row)
        assert row["plain_ms"] > 0 and row["fast_ms"] > 0
        assert row["max_rel_error"] <= 1e-4  # fast path vs the plain padded encode_text
    assert result["speedup"] == min(r["speedup"] for r in result["per_length"].values())
    assert result["max_rel_error"] == max(r["max_rel_error"] for r in result["per_length"].values())


def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    proc = _bench("bench_serve", "--quick", "--out", str(out), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| encoder batching | clients | requests | rps | p50 ms | p99 ms | errors | largest batch |" in proc.stdout
    result = json.loads(out.read_text())
    assert {"per_concurrency", "errors", "configs", "loras"} <= set(result)
    assert set(result["per_concurrency"]) == {"1", "8", "32"}
    for row in result["per_concurrency"].values():
        assert {"rps", "p50_ms", "p99_ms", "errors", "requests"} <= set(row)
        assert row["errors"] == 0 and row["requests"] > 0 and row["rps"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert result["errors"] == 0 and result["loras"] == 200


def test_bench_index_quick(tmp_path):
    out = tmp_path / "index.json"
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = _bench("bench_index", "--quick", "--out", str(out), timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ratio job / loop |" in proc.stdout
    result = json.loads(out.read_text())
    assert {"ratio_vs_loop", "rss_growth", "generate_busy_fraction", "loop_rows_per_s", "pipeline_rows_per_s"} <= set(result)
    assert result["ratio_vs_loop"] > 0 and 0 < result["generate_busy_fraction"] <= 1.5


def test_bench_commit_quick(tmp_path):
    out = tmp_path / "commit.json"
    proc = _bench("bench_commit", "--quick", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    store, reread = data["results"]
    assert (store["mode"], store["n"], reread["mode"], reread["n"]) == ("store", 300, "reread", 150)
    assert store["parts_at_end"] < 300 and reread["parts_at_end"] == 150  # merged vs one part per commit
    assert {"first100_ms", "last100_ms", "ratio", "total_s"} <= set(store) and "ok" in data


def test_bench_behavior_quick(tmp_path):
    out = tmp_path / "behavior.json"
    proc = _bench("bench_behavior", "--quick", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| stage | seconds | peak MB | quality |" in proc.stdout and "share a name stem" in proc.stdout
    result = json.loads(out.read_text())
    syn, real = result["synthetic"], result["real"]
    assert syn["blocked_vs_full"]["same_pairs"] is True  # the blocked scan finds exactly the full matrix's pairs
    assert syn["duplicates"]["planted_recall"] == 1.0 and syn["grouping"]["ari"] > 0.9
    assert syn["tagging"]["zscore"]["top1_accuracy"] > 0.9
    assert real["n"] == 740 and len(real["top_pairs"]) == 20 and real["pairs"] >= 20
    assert 0 <= real["pairs_same_stem"] <= real["pairs"]


@pytest.mark.slow
def test_bench_adaptive_quick(tmp_path):
    out = tmp_path / "adaptive.json"
    proc = _bench("bench_adaptive", "--quick", "--workdir", str(tmp_path / "w"), "--out", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| LoRA images per LoRA, mean |" in proc.stdout and "GPU-h per LoRA" in proc.stdout
    result = json.loads(out.read_text())
    assert {"runs", "full", "adaptive", "sweep", "projection"} <= set(result)
    full_n = result["prompts"] * result["seeds"]
    assert result["full"]["images_mean"] == full_n
    assert 0 < result["adaptive"]["images_mean"] <= full_n and result["adaptive"]["images_max"] <= full_n
    # the real adaptive run and the offline replay of its own bounds (float16 diffs) spend about the same samples
    own = next(s for s in result["sweep"] if s.get("this run"))
    assert abs(own["images_mean"] - result["adaptive"]["images_mean"]) <= 0.25 * full_n
    p = result["projection"]
    assert p["full_images"] == 4480 and abs(p["gpu_seconds_per_image"] - 7 * 3600 / 4480) < 1e-9


def test_bench_scale_response_on_a_tiny_lora(tmp_path, zoo_dir):
    out = tmp_path / "scale.json"
    lora = Path(zoo_dir) / "styles" / "style_00.safetensors"
    proc = _bench("bench_scale_response", str(lora), "--config", "conf/tiny.yaml", "--scales", "0.5,2", "--out", str(out),
                  timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| scale | strength | consistency | cosine to scale 1 |" in proc.stdout
    rows = {r["scale"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == [0.5, 1.0, 2.0]
    assert rows[1.0]["cosine_to_1"] == pytest.approx(1.0) and rows[1.0]["strength_ratio_to_1"] == pytest.approx(1.0)
    assert rows[0.5]["strength"] < rows[1.0]["strength"] < rows[2.0]["strength"]  # a bigger delta changes images more
