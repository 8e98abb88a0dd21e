"""`carlos-ray demo` (the main job) runs to completion in a temp dir."""

from __future__ import annotations

import re
from pathlib import Path

from carlos_ray.cli import main
from carlos_ray.store import Index

GOLDEN_DEMO = Path(__file__).resolve().parent / "golden" / "demo_output.txt"


def _rankings(text: str) -> list[list[str | float]]:
    """The demo's query and more-like-this tables (steps 3 and 4), as printed: each line's tokens, numbers as floats."""
    section = text.split("[3/5]")[1].split("[5/5]")[0].strip()
    parts = (re.split(r"(-?\d+\.\d+(?:e[-+]?\d+)?)", line) for line in section.splitlines())
    return [[float(p) if i % 2 else " ".join(p.split()) for i, p in enumerate(line)] for line in parts]


def _same_rankings(got: list, want: list) -> bool:
    """Same lines and words exactly; numbers within the golden tolerance (tests/golden_record.py: CPUs differ)."""
    from tests.golden_record import differences

    return len(got) == len(want) and all(
        len(g) == len(w) and all(type(a) is type(b) for a, b in zip(g, w)) and not differences(g, w)
        for g, w in zip(got, want))


def test_demo_runs_end_to_end(ray_session, tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--config", "conf/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "ray job submit", "carlos-ray serve"):
        assert step in out
    assert "pickle" in out and "wrong_base" in out  # rejects printed with their reasons
    snap = Index(str(tmp_path / "demo" / "index")).snapshot()
    assert snap.manifest.counts["signatures"] == 12
    assert snap.rejects().num_rows == 22
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    # more-like-this: the planted near-duplicate leads
    section = out.split("[4/5]")[1].split("[5/5]")[0]
    first_row = [line for line in section.splitlines() if line.startswith("1 ")][0]
    assert "Twin B" in first_row
    # the same rankings as recorded before the upper floors were rebuilt (issue 11)
    assert _same_rankings(_rankings(out), _rankings(GOLDEN_DEMO.read_text()))
