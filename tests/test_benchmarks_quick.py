"""Each benchmark runs end to end in --quick mode and writes the JSON keys it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_consistency_quick(tmp_path):
    out = tmp_path / "consistency.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_consistency.py"), "--quick", "--repeats", "2",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
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
