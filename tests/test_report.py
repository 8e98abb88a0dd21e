"""The static HTML report: built from the tiny indexed zoo and from the imported reference."""

from __future__ import annotations

import csv
import html.parser
import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from carlos_ray.cli import main
from carlos_ray.report import build_report, draw_grid, near_duplicate_groups, quadrant_labels
from carlos_ray.schema import conform_signatures
from carlos_ray.thresholds import Thresholds, resolve_thresholds
from carlos_ray.store import Index, png_bytes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_report(built_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_report")
    return build_report(built_index["index"], out), Index(built_index["index"]).snapshot()


@pytest.fixture(scope="module")
def reference_report(reference_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_report")
    return build_report(reference_index["index"], out), Index(reference_index["index"]).snapshot()


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)


def _links(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.links


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _check_png(path: Path, min_size: tuple[int, int]) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes every pixel: a truncated file fails here
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)
        assert len(set(im.convert("L").getdata())) > 2, f"{path} is blank"


@pytest.mark.parametrize("which", ["tiny_report", "reference_report"])
def test_html_links_exist_and_images_are_valid(which, request):
    page, snap = request.getfixturevalue(which)
    out = page.parent
    links = _links(page)
    assert links and all("://" not in x and not x.startswith("/") for x in links)
    for link in links:
        assert (out / link).is_file(), f"{link} is referenced but missing"
    pngs = [x for x in links if x.endswith(".png")]
    assert {"scatter.png", "histograms.png"} <= set(pngs)
    for link in pngs:
        _check_png(out / link, (150, 100) if link.startswith("grids/") else (500, 300))
    # every PNG written is referenced by the page
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert written == set(pngs)


@pytest.mark.parametrize("which", ["tiny_report", "reference_report"])
def test_signatures_csv_matches_the_index(which, request):
    page, snap = request.getfixturevalue(which)
    table = snap.signatures()
    rows = _read_csv(page.parent / "signatures.csv")
    assert len(rows) == table.num_rows
    assert "direction" not in rows[0] and {"quadrant", "kept_by_filter", "near_duplicate_group"} <= set(rows[0])
    assert [r["lora_id"] for r in rows] == table["lora_id"].to_pylist()
    assert [float(r["strength"]) for r in rows] == table["strength"].to_pylist()
    # quadrants against an independent computation from the manifest thresholds
    th = snap.manifest.thresholds
    s, c = table["strength"].to_numpy(), table["consistency"].to_numpy()
    strong, directed = s > th["max_strength"], c >= th["min_consistency"]
    expected = np.select([strong & directed, strong, directed], ["overpowering", "chaotic", "focused"], "erratic")
    assert [r["quadrant"] for r in rows] == expected.tolist()
    assert [r["kept_by_filter"] == "True" for r in rows] == ((~strong) & directed).tolist()


def test_reference_report_contents(reference_report):
    page, snap = reference_report
    text = page.read_text(encoding="utf-8")
    kept = int(np.sum((snap.signatures()["strength"].to_numpy() <= 9.8)
                      & (snap.signatures()["consistency"].to_numpy() >= 0.041)))  # fmt: skip
    assert f"It keeps {kept} of 740 LoRAs" in text
    assert "substantiality" in text and "volition" in text
    assert "per-category heatmap is skipped" in text and not (page.parent / "categories.png").exists()
    assert "kept no thumbnails" in text and not (page.parent / "grids").exists()
    assert "strength &lt;= 9.8, consistency &gt;= 0.041 (paper)" in text
    groups = _read_csv(page.parent / "near_duplicates.csv")
    assert groups, "the reference has near-identical signatures (e.g. several LoRAs with the same direction)"


def test_tiny_report_has_categories_grids_and_the_twin_pair(tiny_report):
    page, snap = tiny_report
    out = page.parent
    table = snap.signatures()
    assert (out / "categories.png").is_file()
    cats = _read_csv(out / "categories.csv")
    n_cat = len(table["category_names"][0].as_py())
    assert len(cats) == table.num_rows * n_cat
    first = table.slice(0, 1).to_pylist()[0]
    mine = [r for r in cats if r["lora_id"] == first["lora_id"]]
    assert [float(r["strength"]) for r in mine] == first["category_strength"]
    # one grid per LoRA with thumbnails
    thumbs = snap.table("thumbs")
    assert len(list((out / "grids").glob("*.png"))) == len(set(thumbs["lora_id"].to_pylist())) == table.num_rows
    # the planted twins (zoo members twin_a / twin_b) are in one near-duplicate group
    by_file = {Path(p).name: lid for p, lid in zip(table["source_path"].to_pylist(), table["lora_id"].to_pylist())}
    a, b = by_file["twin_a.safetensors"], by_file["twin_b.safetensors"]
    groups = {}
    for r in _read_csv(out / "near_duplicates.csv"):
        groups.setdefault(r["group"], set()).add(r["lora_id"])
    assert any({a, b} <= g for g in groups.values())
    noop = by_file["noop.safetensors"]
    assert not any(noop in g for g in groups.values())  # a zero direction links to nothing
    sig = {r["lora_id"]: r for r in _read_csv(out / "signatures.csv")}
    assert sig[a]["near_duplicate_group"] == sig[b]["near_duplicate_group"] != ""


def test_grid_puts_base_above_lora():
    red = png_bytes(np.full((8, 8, 3), (255, 0, 0), np.uint8))
    blue = png_bytes(np.full((8, 8, 3), (0, 0, 255), np.uint8))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = draw_grid("t", ["p0", "p1"], [red, None], [blue, blue], Path(d) / "g.png")
        im = np.asarray(Image.open(path).convert("RGB")).astype(int)
    reds = np.argwhere((im[..., 0] > 200) & (im[..., 1] < 50) & (im[..., 2] < 50))
    blues = np.argwhere((im[..., 2] > 200) & (im[..., 0] < 50) & (im[..., 1] < 50))
    assert len(reds) and len(blues) and reds[:, 0].max() < blues[:, 0].min()
    assert len(blues) == 2 * len(reds)  # the missing base image is a grey placeholder


def _naive_groups(d: np.ndarray, s: np.ndarray, min_cos: float, tol: float) -> list[list[int]]:
    n = len(d)
    adj = {i: set() for i in range(n)}
    for i in range(n):
        for j in range(i + 1, n):
            ni, nj = math.sqrt(sum(x * x for x in d[i])), math.sqrt(sum(x * x for x in d[j]))
            if ni == 0 or nj == 0:
                continue
            cos = sum(x * y for x, y in zip(d[i], d[j])) / (ni * nj)
            if cos >= min_cos and abs(s[i] - s[j]) <= tol * max(abs(s[i]), abs(s[j])):
                adj[i].add(j)
                adj[j].add(i)
    seen, groups = set(), []
    for i in range(n):
        if i in seen:
            continue
        stack, comp = [i], set()
        while stack:
            k = stack.pop()
            if k not in comp:
                comp.add(k)
                stack.extend(adj[k] - comp)
        seen |= comp
        if len(comp) > 1:
            groups.append(sorted(comp))
    return groups


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    min_cos=st.sampled_from([0.9, 0.98, 0.999]),
)
def test_near_duplicate_groups_match_the_naive_pairwise_loop(n, seed, min_cos):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(3, 4))
    # rows near one of three directions, at a few strengths; some exact zeros
    d = base[rng.integers(0, 3, n)] + rng.normal(scale=rng.choice([0.01, 0.1, 0.5]), size=(n, 4))
    d[rng.random(n) < 0.15] = 0.0
    s = rng.choice([1.0, 1.05, 1.2, 2.0], size=n)
    groups, edges = near_duplicate_groups(d, s, min_cosine=min_cos, strength_tolerance=0.1)
    assert groups == _naive_groups(d, s, min_cos, 0.1)
    assert all(i < j and c >= min_cos - 1e-12 for i, j, c in edges)


def test_quadrants_and_thresholds_edge_cases():
    th = Thresholds(1.0, 0.5, "test")
    s = np.array([1.0, 1.5, 1.5, 0.2, np.nan, 0.5])
    c = np.array([0.5, 0.5, 0.49, 0.1, 0.9, np.nan])
    assert quadrant_labels(s, c, th) == ["focused", "overpowering", "chaotic", "erratic", "undefined", "undefined"]
    assert quadrant_labels(s, c, Thresholds(None, None, "none")) == ["undefined"] * 6
    # no thresholds in the manifest: calibrated; a configured one is kept
    # 10 LoRAs: strength keeps round(9.72) = 10 (max 9), consistency round(7.24) = 7 (the 7th largest, 3/9)
    got = resolve_thresholds(stored={}, calibrate_from=(np.arange(10.0), np.linspace(0, 1, 10)))
    assert (got.max_strength, got.min_consistency) == (9.0, 3 / 9) and "calibrated" in got.source
    got = resolve_thresholds(stored={"max_strength": 3.0, "min_consistency": None, "source": "config"},
                             calibrate_from=(np.arange(10.0), np.linspace(0, 1, 10)))  # fmt: skip
    assert got.max_strength == 3.0 and got.min_consistency == pytest.approx(3 / 9) and "config" in got.source
    # a request overrides the stored value, which overrides calibration
    got = resolve_thresholds(2.0, None, stored={"max_strength": 3.0, "min_consistency": 0.5, "source": "config"})
    assert (got.max_strength, got.min_consistency, got.source) == (2.0, 0.5, "request")


def _index_of(path: Path, rows: list[dict], thresholds: dict | None = None) -> str:
    ix = Index(str(path))
    ix.init({"config_hash": "t", **({"thresholds": thresholds} if thresholds else {})})
    ix.commit({"signatures": conform_signatures(pa.Table.from_pylist(rows))})
    return str(path)


def test_degenerate_indexes(tmp_path):
    rng = np.random.default_rng(0)
    one = [{"lora_id": "only", "name": "Only", "direction": rng.normal(size=8).tolist(), "strength": 1.0,
            "consistency": 0.3}]  # fmt: skip
    equal = [{"lora_id": f"e{i}", "name": f"E{i}", "direction": rng.normal(size=8).tolist(), "strength": 2.0,
              "consistency": 0.5, "category_names": ["a", "b"], "category_strength": [1.0, math.nan],
              "category_within": [math.nan, math.nan]} for i in range(25)]  # fmt: skip
    nans = [{"lora_id": f"n{i}", "name": "名字 $x^2$", "direction": ([0.0] * 8 if i == 0 else rng.normal(size=8).tolist()),
             "strength": math.nan if i == 1 else float(i), "consistency": 0.1 * i,
             "category_names": ["a"] if i % 2 else None, "category_strength": [1.0] if i % 2 else None,
             "category_within": [0.2] if i % 2 else None} for i in range(5)]  # fmt: skip
    for name, rows, th in (("one", one, None), ("equal", equal, None),
                           ("nans", nans, {"max_strength": None, "min_consistency": None, "source": "none"})):
        page = build_report(_index_of(tmp_path / name, rows, th), tmp_path / f"{name}_report")
        out = page.parent
        for link in _links(page):
            assert (out / link).is_file()
        for png in out.glob("*.png"):
            _check_png(png, (300, 200))
        csv_rows = _read_csv(out / "signatures.csv")
        assert len(csv_rows) == len(rows)
        if name == "nans":
            assert csv_rows[1]["quadrant"] == "undefined" and csv_rows[1]["strength"] == "NaN"
            assert "1 LoRA(s) with NaN" not in page.read_text()  # the note is drawn in the PNG, not the page
        if name == "equal":
            assert {r["quadrant"] for r in csv_rows} == {"focused"}
            # identical strengths, random directions in 8-d: no near-duplicates expected at cosine 0.98
            assert len(_read_csv(out / "near_duplicates.csv")) == 0


def test_empty_or_missing_index_is_an_error(tmp_path, capsys):
    ix = Index(str(tmp_path / "empty"))
    ix.init({"config_hash": "t"})
    with pytest.raises(ValueError, match="no signatures"):
        build_report(str(tmp_path / "empty"), tmp_path / "r")
    assert main(["report", "--index", str(tmp_path / "absent"), "--out", str(tmp_path / "r2")]) == 2
    assert "no index at" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_cli_report(reference_index, tmp_path, capsys):
    out = tmp_path / "cli_report"
    assert main(["report", "--index", reference_index["index"], "--out", str(out)]) == 0
    assert "index.html" in capsys.readouterr().out
    assert (out / "index.html").is_file() and (out / "scatter.png").is_file()
