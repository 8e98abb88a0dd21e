"""A static HTML report of an index: where its LoRAs sit in the Strength/Consistency plane.

:func:`build_report` writes, into one directory::

    index.html              the page (relative links only; open it from disk)
    scatter.png             Strength vs Consistency, filter thresholds, quadrant labels
    histograms.png          distributions of Strength and Consistency
    categories.png          per-category strength / within-category consistency (when the index has them)
    categories.csv          the same values, long format
    near_duplicates.csv     groups of LoRAs with nearly parallel directions and similar strengths
    signatures.csv          every signature (without the direction vector) with its quadrant
    grids/*.png             base vs LoRA thumbnails per LoRA (when the index kept thumbnails)

Quadrants are defined by the filter thresholds (the manifest's, else calibrated with
:func:`carlos_ray.ranker.calibrate_thresholds`): the filter keeps exactly the "focused" quadrant.
Matplotlib is used through ``Figure`` objects and the Agg canvas only, never ``pyplot``, so building
a report changes no global plotting state.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from carlos_ray.store import Index

logger = logging.getLogger(__name__)

NEAR_DUPLICATE_MIN_COSINE = 0.98
NEAR_DUPLICATE_STRENGTH_TOLERANCE = 0.10  # relative: |s_i - s_j| <= tol * max(|s_i|, |s_j|)
MAX_HEATMAP_ROWS = 60
MAX_GRIDS = 200
MAX_HTML_TABLE_ROWS = 100
_DUP_BLOCK = 2048

# name -> (colour, rule, reading). The filter keeps exactly "focused".
QUADRANTS: dict[str, tuple[str, str, str]] = {
    "focused": ("#1b9e77", "strength <= max, consistency >= min",
                "a moderate, directed effect: pushes outputs the same way without taking them over; kept by the filter"),
    "overpowering": ("#d95f02", "strength > max, consistency >= min",
                     "consistently takes over the output (substantial and volitional); removed by the strength filter"),
    "chaotic": ("#7570b3", "strength > max, consistency < min",
                "changes the output a lot but in no consistent direction; removed by both filters"),
    "erratic": ("#808080", "strength <= max, consistency < min",
                "small changes in no consistent direction (noise-like or prompt-dependent); removed by the consistency filter"),
    "undefined": ("#000000", "strength or consistency is NaN, or no thresholds",
                  "cannot be placed"),
}  # fmt: skip


@dataclass
class Thresholds:
    """The filter thresholds the report draws, and where each came from."""

    max_strength: float | None
    min_consistency: float | None
    source: str

    def describe(self) -> str:
        def fmt(v: float | None) -> str:
            return "none" if v is None else f"{v:.4g}"

        return f"strength <= {fmt(self.max_strength)}, consistency >= {fmt(self.min_consistency)} ({self.source})"


def resolve_thresholds(manifest: dict, strength: np.ndarray, consistency: np.ndarray) -> Thresholds:
    """The manifest's thresholds; a missing one is calibrated from the index's own distribution."""
    from carlos_ray.ranker import calibrate_thresholds

    given = manifest.get("thresholds") or {}
    max_s, min_c = given.get("max_strength"), given.get("min_consistency")
    source = given.get("source") or "manifest"
    if max_s is not None and min_c is not None:
        return Thresholds(float(max_s), float(min_c), source)
    try:
        cal = calibrate_thresholds(strength, consistency)
    except ValueError as e:
        logger.warning("no thresholds in the manifest and none can be calibrated: %s", e)
        return Thresholds(None if max_s is None else float(max_s), None if min_c is None else float(min_c), "none")
    parts = []
    if max_s is None:
        max_s = cal["max_strength"]
        parts.append("strength calibrated")
    if min_c is None:
        min_c = cal["min_consistency"]
        parts.append("consistency calibrated")
    if len(parts) < 2:
        parts.insert(0, source)
    return Thresholds(float(max_s), float(min_c), ", ".join(parts))


def quadrant_labels(strength: np.ndarray, consistency: np.ndarray, thresholds: Thresholds) -> list[str]:
    """One of QUADRANTS' names per LoRA (see the module docstring); NaN values are "undefined"."""
    s = np.asarray(strength, dtype=np.float64)
    c = np.asarray(consistency, dtype=np.float64)
    if thresholds.max_strength is None or thresholds.min_consistency is None:
        return ["undefined"] * len(s)
    strong = s > thresholds.max_strength
    directed = c >= thresholds.min_consistency
    out = np.where(strong, np.where(directed, "overpowering", "chaotic"), np.where(directed, "focused", "erratic"))
    out[~(np.isfinite(s) & np.isfinite(c))] = "undefined"
    return out.tolist()


def near_duplicate_groups(
    directions: np.ndarray,
    strength: np.ndarray,
    min_cosine: float = NEAR_DUPLICATE_MIN_COSINE,
    strength_tolerance: float = NEAR_DUPLICATE_STRENGTH_TOLERANCE,
) -> tuple[list[list[int]], list[tuple[int, int, float]]]:
    """Connected components of the graph linking LoRAs whose directions are nearly parallel
    (cosine >= ``min_cosine``) and whose strengths differ by at most ``strength_tolerance`` of the
    larger one. Zero or non-finite directions and non-finite strengths link to nothing.

    Returns ``(groups, edges)``: groups of >= 2 row indices (each sorted, groups ordered by their
    first member) and the linking pairs ``(i, j, cosine)`` with ``i < j``. The Gram matrix is
    computed in row blocks, so memory stays O(block * n).
    """
    x = np.asarray(directions, dtype=np.float64)
    s = np.asarray(strength, dtype=np.float64)
    n = len(x)
    if x.ndim != 2 or len(s) != n:
        raise ValueError(f"directions must be (n, d) and strength (n,), got {x.shape} and {s.shape}")
    norms = np.linalg.norm(x, axis=1) if n else np.zeros(0)
    valid = np.isfinite(norms) & (norms > 0) & np.isfinite(s)
    unit = np.zeros_like(x)
    unit[valid] = x[valid] / norms[valid, None]
    edges: list[tuple[int, int, float]] = []
    for start in range(0, n, _DUP_BLOCK):
        block = unit[start : start + _DUP_BLOCK]
        cos = block @ unit.T
        rows, cols = np.nonzero(cos >= min_cosine)
        rows = rows + start
        keep = (rows < cols) & valid[rows] & valid[cols]
        rows, cols = rows[keep], cols[keep]
        close = np.abs(s[rows] - s[cols]) <= strength_tolerance * np.maximum(np.abs(s[rows]), np.abs(s[cols]))
        for i, j in zip(rows[close].tolist(), cols[close].tolist()):
            edges.append((i, j, float(min(cos[i - start, j], 1.0))))
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in edges:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    groups = sorted((sorted(g) for g in members.values() if len(g) > 1), key=lambda g: g[0])
    return groups, edges


# ---- text helpers ------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _font_path() -> str:
    from matplotlib import font_manager

    return font_manager.findfont("DejaVu Sans")


@lru_cache(maxsize=1)
def _font_charmap() -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(_font_path()).get_charmap())


def _plain(text: str) -> str:
    """``text`` with the characters the plotting font cannot draw removed and whitespace tidied."""
    chars = _font_charmap()
    kept = "".join(ch if ord(ch) in chars else " " for ch in text)
    kept = re.sub(r"[(\[]\s*[)\]]", "", kept)  # brackets emptied by the removal
    return re.sub(r"\s+", " ", kept).strip(" -_|/")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _plot_label(name: str | None, lora_id: str, limit: int = 28) -> str:
    """A label the plotting font can draw (falls back to the id) with mathtext ``$`` escaped."""
    label = _plain(name or "")
    if len(label) < 3:
        label = lora_id
    return _short(label, limit).replace("$", r"\$")


def _safe_name(lora_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", lora_id)[:60]
    if safe != lora_id:
        safe += "-" + hashlib.sha1(lora_id.encode("utf-8")).hexdigest()[:8]
    return safe


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


# ---- figures -----------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=100)
    return path


def _place_labels(fig, ax, points: list[tuple[float, float, str]], avoid: list, xy_all: np.ndarray) -> None:
    """Annotate points with their labels; each label takes the candidate offset that overlaps no placed
    label or corner box, stays inside the axes and covers the fewest data points (nearest first)."""
    renderer = fig.canvas.get_renderer()
    placed = [a.get_window_extent(renderer) for a in avoid]
    axes_box = ax.get_window_extent(renderer)
    pix = ax.transData.transform(xy_all) if len(xy_all) else np.zeros((0, 2))
    radii = (8, 18, 32, 50, 72)
    angles = np.deg2rad([30, -30, 150, -150, 90, -90, 0, 180, 60, -60, 120, -120])
    offsets = [(r * math.cos(a), r * math.sin(a)) for r in radii for a in angles]
    for x, y, label in points:
        best, best_score = None, math.inf
        for rank, (dx, dy) in enumerate(offsets):
            ann = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                              ha="left" if dx > 1 else "right" if dx < -1 else "center",
                              va="bottom" if dy > 1 else "top" if dy < -1 else "center", zorder=6,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})  # fmt: skip
            box = ann.get_window_extent(renderer)
            ann.remove()
            inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
            overlaps = sum(box.overlaps(p) for p in placed)
            covered = int(np.sum((pix[:, 0] >= box.x0 - 3) & (pix[:, 0] <= box.x1 + 3)
                                 & (pix[:, 1] >= box.y0 - 3) & (pix[:, 1] <= box.y1 + 3)))  # fmt: skip
            score = (0 if inside else 1e6) + 1e4 * overlaps + 30 * covered + rank
            if score < best_score:
                best, best_score = (dx, dy, box), score
        dx, dy, box = best
        far = math.hypot(dx, dy) > 10
        ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                    ha="left" if dx > 1 else "right" if dx < -1 else "center",
                    va="bottom" if dy > 1 else "top" if dy < -1 else "center", zorder=6,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
                    arrowprops={"arrowstyle": "-", "color": "#444444", "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if far else None)  # fmt: skip
        placed.append(box)


def _limits(values: np.ndarray, extra: float | None) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if extra is not None:
        v = np.append(v, extra)
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.5
    return lo - 0.08 * span, hi + 0.08 * span


def plot_scatter(strength: np.ndarray, consistency: np.ndarray, quadrants: list[str], labels: list[str],
                 thresholds: Thresholds, title: str, path: Path) -> list[int]:
    """Strength vs Consistency with threshold lines and quadrant labels; returns the labelled rows."""
    n = len(strength)
    finite = np.isfinite(strength) & np.isfinite(consistency)
    fig = _new_figure(9.5, 7.0)
    ax = fig.add_subplot()
    size = 36 if n <= 50 else 14
    for q, (colour, _, _) in QUADRANTS.items():
        sel = finite & (np.asarray(quadrants) == q)
        if sel.any():
            ax.scatter(strength[sel], consistency[sel], s=size, c=colour, alpha=0.75 if n > 50 else 0.9,
                       edgecolors="white", linewidths=0.4, label=f"{q} ({int(sel.sum())})", zorder=3)
    ax.set_xlim(*_limits(strength, thresholds.max_strength))
    ax.set_ylim(*_limits(consistency, thresholds.min_consistency))
    corner_texts = []
    if thresholds.max_strength is not None:
        ax.axvline(thresholds.max_strength, color="#333333", ls="--", lw=1, zorder=2)
    if thresholds.min_consistency is not None:
        ax.axhline(thresholds.min_consistency, color="#333333", ls="--", lw=1, zorder=2)
    if thresholds.max_strength is not None and thresholds.min_consistency is not None:
        counts = {q: quadrants.count(q) for q in QUADRANTS}
        for q, (x, y, ha, va) in {"focused": (0.01, 0.99, "left", "top"), "overpowering": (0.99, 0.99, "right", "top"),
                                  "chaotic": (0.99, 0.01, "right", "bottom"), "erratic": (0.01, 0.01, "left", "bottom")}.items():
            suffix = " - kept" if q == "focused" else ""
            corner_texts.append(ax.text(
                x, y, f"{q}{suffix} ({counts[q]})", transform=ax.transAxes, ha=ha, va=va, fontsize=10, weight="bold",
                color=QUADRANTS[q][0], bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": QUADRANTS[q][0], "alpha": 0.9},
                zorder=5))  # fmt: skip
    ax.set_xlabel("Strength  (mean |CLIP(LoRA image) - CLIP(base image)|)  - substantiality", fontsize=10)
    ax.set_ylabel("Consistency  (mean pairwise cosine of the diffs)  - volition", fontsize=10)
    ax.set_title(f"{title}\nfilter: {thresholds.describe()}", fontsize=11)
    ax.grid(alpha=0.25, zorder=0)
    if (~finite).any():
        ax.text(0.5, 0.01, f"{int((~finite).sum())} LoRA(s) with NaN strength/consistency not shown",
                transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color="#aa0000")
    labelled = _pick_labelled(strength, consistency, finite)
    if n > 20 and labelled:  # ring the labelled extremes so each label's point is easy to find
        ax.scatter(strength[labelled], consistency[labelled], s=size * 2.5, facecolors="none", edgecolors="black",
                   linewidths=0.8, zorder=4)
    fig.canvas.draw()  # fixes the layout, so display coordinates are final
    xy = np.column_stack([strength[finite], consistency[finite]])
    pix = ax.transData.transform(xy) if len(xy) else np.zeros((0, 2))
    pts: list[tuple[float, float, str]] = []
    for i in labelled:  # points drawn on top of each other share one label
        p = ax.transData.transform([(strength[i], consistency[i])])[0]
        if any(math.hypot(*(p - ax.transData.transform([(x, y)])[0])) < 4 for x, y, _ in pts):
            continue
        here = int(np.sum(np.hypot(*(pix - p).T) < 4)) - 1
        pts.append((float(strength[i]), float(consistency[i]), labels[i] + (f" (+{here} here)" if here > 0 else "")))
    _place_labels(fig, ax, pts, corner_texts, xy)
    _save(fig, path)
    return labelled


def _pick_labelled(strength: np.ndarray, consistency: np.ndarray, finite: np.ndarray) -> list[int]:
    """All points of a small index; otherwise the extremes (strongest, weakest, least and most consistent),
    skipping points within 4% of the axis ranges of one already picked."""
    idx = np.flatnonzero(finite)
    if len(idx) <= 20:
        return idx.tolist()
    s, c = strength[idx], consistency[idx]
    unit = np.column_stack([(s - s.min()) / max(np.ptp(s), 1e-12), (c - c.min()) / max(np.ptp(c), 1e-12)])
    chosen: list[int] = []
    for order, count in ((np.argsort(-s, kind="stable"), 3), (np.argsort(-c, kind="stable"), 1),
                         (np.argsort(c, kind="stable"), 2), (np.argsort(s, kind="stable"), 2)):
        taken = 0
        for k in order:
            if taken == count:
                break
            if all(np.hypot(*(unit[k] - unit[j])) > 0.04 for j in chosen):
                chosen.append(int(k))
                taken += 1
    return [int(idx[k]) for k in chosen]


def plot_histograms(strength: np.ndarray, consistency: np.ndarray, thresholds: Thresholds, title: str,
                    path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    for ax, values, thr, name, colour in (
        (axes[0], strength, thresholds.max_strength, "Strength", "#4c72b0"),
        (axes[1], consistency, thresholds.min_consistency, "Consistency", "#55a868"),
    ):
        v = values[np.isfinite(values)]
        if v.size:
            bins = int(min(40, max(5, 2 * math.sqrt(v.size))))
            ax.hist(v, bins=bins, color=colour, alpha=0.85, edgecolor="white")
        else:
            ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center")
        if thr is not None:
            side = "max" if name == "Strength" else "min"
            ax.axvline(thr, color="#333333", ls="--", lw=1, label=f"filter {side} = {thr:.4g}")
            ax.legend(fontsize=8, loc="upper right")
        nan = int((~np.isfinite(values)).sum())
        ax.set_title(f"{name} (n = {v.size}{f', {nan} NaN' if nan else ''})", fontsize=11)
        ax.set_xlabel(name, fontsize=10)
        ax.set_ylabel("LoRAs", fontsize=10)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def plot_categories(names: list[str], categories: list[str], cat_strength: np.ndarray, cat_within: np.ndarray,
                    title: str, path: Path) -> Path:
    """Two heatmaps (rows = LoRAs, columns = categories); NaN cells are grey."""
    rows, cols = cat_strength.shape
    annotate = rows <= 25 and cols <= 12
    fig = _new_figure(max(9.0, 2.2 + 1.2 * cols * 2), max(3.0, 1.4 + 0.28 * rows))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, values, name, cmap in ((axes[0], cat_strength, "Strength per category", "viridis"),
                                   (axes[1], cat_within, "Consistency within category", "magma")):
        import matplotlib

        cm = matplotlib.colormaps[cmap].with_extremes(bad="#d0d0d0")
        masked = np.ma.masked_invalid(values)
        finite = values[np.isfinite(values)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmax <= vmin:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        im = ax.imshow(masked, aspect="auto", cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.9)
        ax.set_xticks(range(cols), [_short(_plain(c), 14) for c in categories], rotation=40, ha="right", fontsize=9)
        ax.set_yticks(range(rows), names, fontsize=8)
        ax.set_title(name, fontsize=11)
        if annotate:
            for r in range(rows):
                for c in range(cols):
                    v = values[r, c]
                    txt = "NaN" if not np.isfinite(v) else f"{v:.2f}"
                    light = np.isfinite(v) and (v - vmin) / (vmax - vmin) < 0.55
                    ax.text(c, r, txt, ha="center", va="center", fontsize=7, color="white" if light else "black")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def _decode_png(data: bytes | None, size: int):
    from PIL import Image

    if data is None:
        return None
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # a damaged thumbnail must not stop the report
        logger.warning("skipping an unreadable thumbnail: %s", e)
        return None
    return im.convert("RGB").resize((size, size), Image.NEAREST)


def draw_grid(title: str, columns: list[str], base: list[bytes | None], lora: list[bytes | None], path: Path,
              cell: int = 112) -> Path:
    """A 2-row image grid: base thumbnails above the LoRA's, one column per prompt."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(_font_path(), 13)
    small = ImageFont.truetype(_font_path(), 11)
    pad, left, top, head = 6, 56, 34, 18
    title = _plain(title) or "LoRA"
    width = max(left + len(columns) * (cell + pad) + pad, int(font.getlength(title)) + 2 * pad)
    height = top + head + 2 * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), title, fill="black", font=font)
    for row, (label, images) in enumerate((("base", base), ("LoRA", lora))):
        y = top + head + row * (cell + pad)
        draw.text((pad, y + cell // 2 - 7), label, fill="black", font=font)
        for col, data in enumerate(images):
            x = left + col * (cell + pad)
            im = _decode_png(data, cell)
            if im is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill="#dddddd")
                draw.text((x + cell // 2 - 10, y + cell // 2 - 7), "n/a", fill="#666666", font=small)
            else:
                canvas.paste(im, (x, y))
    for col, name in enumerate(columns):
        x = left + col * (cell + pad)
        draw.text((x, top), _short(_plain(name), 16), fill="#333333", font=small)
    canvas.save(path, format="PNG")
    return path


# ---- the report --------------------------------------------------------------------------------


def _list_column(table: pa.Table, name: str) -> list:
    return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def _category_matrix(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(categories, strength[n, k], within[n, k]) from the category columns, or None if absent."""
    names = _list_column(table, "category_names")
    if not any(names):
        return None
    categories: list[str] = list(dict.fromkeys(c for row in names if row for c in row))
    col = {c: i for i, c in enumerate(categories)}
    n, k = table.num_rows, len(categories)
    strength = np.full((n, k), np.nan)
    within = np.full((n, k), np.nan)
    for r, (row_names, row_s, row_w) in enumerate(
        zip(names, _list_column(table, "category_strength"), _list_column(table, "category_within"))
    ):
        for j, c in enumerate(row_names or []):
            if row_s is not None and j < len(row_s) and row_s[j] is not None:
                strength[r, col[c]] = row_s[j]
            if row_w is not None and j < len(row_w) and row_w[j] is not None:
                within[r, col[c]] = row_w[j]
    return categories, strength, within


def _csv_value(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return "" if v is None else v


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([_csv_value(v) for v in row])
    return path


def _html_table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } .note { color: #666; font-size: 0.9em; }
.grids { display: flex; flex-wrap: wrap; gap: 14px; } .grids figure { margin: 0; }
figcaption { font-size: 0.8em; color: #444; }
.q { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 50%; margin-right: 0.3em; }
"""


def build_report(index_uri: str, out_dir: str | Path, *, max_grids: int = MAX_GRIDS) -> Path:
    """Write the report of the index at ``index_uri`` into ``out_dir``; returns the path of index.html.

    Raises :class:`carlos_ray.store.IndexError_` if there is no readable index and ``ValueError`` if
    it has no signatures.
    """
    out = Path(out_dir)
    snap = Index(index_uri).snapshot()
    m = snap.manifest
    table = snap.signatures()
    if table is None or table.num_rows == 0:
        raise ValueError(f"index {index_uri} has no signatures to report on")
    out.mkdir(parents=True, exist_ok=True)
    n = table.num_rows
    ids = [str(x) for x in table["lora_id"].to_pylist()]
    raw_names = table["name"].to_pylist() if "name" in table.column_names else [None] * n
    names = [x or i for x, i in zip(raw_names, ids)]
    strength = np.asarray(table["strength"].to_pylist(), dtype=np.float64)
    consistency = np.asarray(table["consistency"].to_pylist(), dtype=np.float64)
    thresholds = resolve_thresholds(m, strength, consistency)
    quadrants = quadrant_labels(strength, consistency, thresholds)
    labels = [_plot_label(x, i) for x, i in zip(raw_names, ids)]
    title = f"{m.get('config_name') or Path(str(index_uri)).name}: {n} LoRAs, encoder {_describe(m.get('encoder'))}"
    files: dict[str, Path] = {}

    labelled = plot_scatter(strength, consistency, quadrants, labels, thresholds, title, out / "scatter.png")
    files["scatter"] = out / "scatter.png"
    files["histograms"] = plot_histograms(strength, consistency, thresholds, title, out / "histograms.png")

    # per-category values
    cat = _category_matrix(table)
    cat_note = ""
    if cat is not None:
        categories, cat_s, cat_w = cat
        order = np.argsort(-np.nan_to_num(strength, nan=-np.inf), kind="stable")
        shown = order[:MAX_HEATMAP_ROWS]
        if n > MAX_HEATMAP_ROWS:
            cat_note = f"Showing the {MAX_HEATMAP_ROWS} strongest of {n} LoRAs; every value is in categories.csv."
        files["categories"] = plot_categories([labels[i] for i in shown], categories, cat_s[shown], cat_w[shown],
                                              title, out / "categories.png")
        cat_rows = [[ids[r], names[r], c, cat_s[r, j], cat_w[r, j]]
                    for r in range(n) for j, c in enumerate(categories)
                    if np.isfinite(cat_s[r, j]) or np.isfinite(cat_w[r, j])]  # fmt: skip
        files["categories_csv"] = _write_csv(
            out / "categories.csv", ["lora_id", "name", "category", "strength", "within_consistency"], cat_rows)

    # near-duplicates
    directions = table["direction"].to_pylist()
    width = max((len(d) for d in directions), default=0)
    dmat = np.full((n, width), np.nan)
    for i, d in enumerate(directions):
        if len(d) == width:
            dmat[i] = d
    groups, edges = near_duplicate_groups(dmat, strength)
    best_cos: dict[int, float] = {}
    for i, j, c in edges:
        best_cos[i] = max(best_cos.get(i, -1.0), c)
        best_cos[j] = max(best_cos.get(j, -1.0), c)
    group_of = {i: g + 1 for g, members in enumerate(groups) for i in members}
    dup_rows = [[group_of[i], len(groups[group_of[i] - 1]), ids[i], names[i], strength[i], consistency[i], best_cos[i]]
                for members in groups for i in members]
    dup_header = ["group", "size", "lora_id", "name", "strength", "consistency", "max_cosine_in_group"]
    files["near_duplicates_csv"] = _write_csv(out / "near_duplicates.csv", dup_header, dup_rows)

    # signatures CSV
    skip = {"direction"}
    cols = [c for c in table.column_names if c not in skip]
    data = {c: table[c].to_pylist() for c in cols}
    kept = [q == "focused" for q in quadrants]
    sig_rows = [[*(data[c][i] for c in cols), quadrants[i], kept[i], group_of.get(i, "")] for i in range(n)]
    files["signatures_csv"] = _write_csv(
        out / "signatures.csv", [*cols, "quadrant", "kept_by_filter", "near_duplicate_group"], sig_rows)

    # base vs LoRA thumbnails
    grids: list[tuple[int, Path]] = []
    grid_note = ""
    thumbs = snap.table("thumbs")
    base_key = m.get("base_key")
    base = snap.base(base_key) if base_key else None
    if thumbs is None or thumbs.num_rows == 0:
        grid_note = ("This index kept no thumbnails (indexing.keep_thumbnails was off, or it was imported), "
                     "so there are no image grids.")
    else:
        base_thumbs: dict[int, bytes | None] = {}
        if base is not None and "thumb" in base.column_names:
            for p, s, t in zip(base["prompt_idx"].to_pylist(), base["seed_idx"].to_pylist(), base["thumb"].to_pylist()):
                if s == 0:
                    base_thumbs[int(p)] = t
        else:
            grid_note = "The base cache has no thumbnails; base images are shown as n/a."
        prompt_ids = list((m.get("prompt_set") or {}).get("ids") or [])
        by_lora: dict[str, dict[int, bytes]] = {}
        columns = (thumbs[c].to_pylist() for c in ("lora_id", "prompt_idx", "png"))
        for lid, p, png in zip(*columns):
            by_lora.setdefault(str(lid), {})[int(p)] = png
        row_of = {lid: i for i, lid in enumerate(ids)}
        todo = sorted((row_of[lid] for lid in by_lora if lid in row_of), key=lambda i: (names[i].lower(), ids[i]))
        if len(todo) > max_grids:
            grid_note = f"Showing grids for {max_grids} of {len(todo)} LoRAs with thumbnails (alphabetical)."
            todo = todo[:max_grids]
        (out / "grids").mkdir(exist_ok=True)
        for i in todo:
            pidx = sorted(by_lora[ids[i]])
            cols_ = [prompt_ids[p] if p < len(prompt_ids) else f"prompt {p}" for p in pidx]
            grid_title = f"{names[i]}  -  strength {strength[i]:.3g}, consistency {consistency[i]:.3g} ({quadrants[i]})"
            path = draw_grid(grid_title, cols_, [base_thumbs.get(p) for p in pidx], [by_lora[ids[i]][p] for p in pidx],
                             out / "grids" / f"{_safe_name(ids[i])}.png")
            grids.append((i, path))

    from carlos_ray.uncertainty import format_estimate

    def column(name: str) -> list:
        return table[name].to_pylist() if name in table.column_names else [None] * n

    stated = [(format_estimate(s, se), format_estimate(c, ce), k) for s, se, c, ce, k in zip(
        strength.tolist(), column("strength_se"), consistency.tolist(), column("consistency_se"), column("n"))]
    page = _render_html(
        index_uri=str(index_uri), manifest=m, n=n, title=title, thresholds=thresholds, quadrants=quadrants,
        ids=ids, names=names, strength=strength, consistency=consistency, stated=stated, labelled=labelled, files=files,
        cat_note=cat_note, groups=groups, dup_rows=dup_rows, dup_header=dup_header, grids=grids, grid_note=grid_note,
        out=out,
    )  # fmt: skip
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    logger.info("report of %d LoRAs written to %s (%d grids, %d near-duplicate groups)", n, path, len(grids), len(groups))
    return path


def _describe(spec: Any) -> str:
    """``arch (pretrained)`` / ``model`` of an encoder or generator spec from the manifest."""
    if not isinstance(spec, dict):
        return "unknown" if spec is None else str(spec)
    name = spec.get("arch") or spec.get("model") or "unknown"
    if "arch" in spec:
        return f"{name} ({spec.get('pretrained') or 'random weights'})"
    return str(name)


def _render_html(*, index_uri: str, manifest: dict, n: int, title: str, thresholds: Thresholds, quadrants: list[str],
                 ids: list[str], names: list[str], strength: np.ndarray, consistency: np.ndarray,
                 stated: list[tuple[str, str, int | None]], labelled: list[int],
                 files: dict[str, Path], cat_note: str, groups: list[list[int]], dup_rows: list, dup_header: list[str],
                 grids: list[tuple[int, Path]], grid_note: str, out: Path) -> str:
    def rel(p: Path) -> str:
        return html.escape(p.relative_to(out).as_posix(), quote=True)

    e = html.escape
    counts = {q: quadrants.count(q) for q in QUADRANTS}
    q_rows = "".join(
        f'<tr><td><span class="q" style="background:{c}"></span>{e(q)}</td><td>{e(rule)}</td>'
        f"<td>{counts[q]}</td><td>{e(reading)}</td></tr>"
        for q, (c, rule, reading) in QUADRANTS.items() if counts[q] or q != "undefined"
    )  # fmt: skip
    kept = counts["focused"]
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>carlos-ray report: {e(title)}</title><style>{_CSS}</style></head><body>",
        "<h1>carlos-ray index report</h1>",
        f'<p>Index <code>{e(index_uri)}</code> - {n} LoRA signatures - encoder {e(_describe(manifest.get("encoder")))}'
        f' - generator {e(_describe(manifest.get("generator")))}'
        f' - manifest version {e(str(manifest.get("version")))}, updated {e(str(manifest.get("updated_at")))}'
        f'{" - imported from " + e(str(manifest.get("source"))) if manifest.get("source") else ""}.</p>',
        f"<p>Filter: <b>{e(thresholds.describe())}</b>. It keeps {kept} of {n} LoRAs"
        f" ({100.0 * kept / n:.1f}%).</p>",
        "<h2>Reading Strength and Consistency</h2>",
        "<p>CARLoS describes a LoRA by what it does to a base model's images: the <b>Direction</b> (mean CLIP image-embedding "
        "difference between LoRA and base images over many prompts and seeds), the <b>Strength</b> (mean size of that "
        "difference) and the <b>Consistency</b> (mean pairwise cosine of the differences). The paper reads the last two "
        "through two notions from copyright analysis:</p><ul>"
        "<li><b>Strength as substantiality</b>: how much of the output the LoRA, rather than the base model and the prompt, "
        "determines. A very strong LoRA overrides the prompt; retrieval drops LoRAs above the strength threshold.</li>"
        "<li><b>Consistency as volition</b>: how reliably the LoRA pushes every image the same way, whatever the prompt and "
        "seed - a deliberate, directed effect rather than a random perturbation. Retrieval drops LoRAs below the "
        "consistency threshold, whose mean direction says little.</li></ul>"
        '<p class="note">The thresholds depend on the feature scale of the encoder (the paper\'s 9.8 / 0.041 are for raw '
        "ViT-B/32 features); an index built with another encoder uses its own calibrated thresholds. The quadrant "
        "names below are this report's shorthand, not legal categories.</p>",
        f'<table><thead><tr><th>quadrant</th><th>rule</th><th>LoRAs</th><th>reading</th></tr></thead><tbody>{q_rows}</tbody></table>',
        "<h2>Strength vs Consistency</h2>",
        f'<p><img src="{rel(files["scatter"])}" alt="Strength vs Consistency scatter"></p>',
    ]  # fmt: skip
    if n > 20:
        parts.append('<p class="note">Labelled points (extremes):</p>')
        parts.append(_html_table(["name", "lora_id", "strength", "consistency", "quadrant"],
                                 [[names[i], ids[i], strength[i], consistency[i], quadrants[i]] for i in labelled]))
    parts += [
        "<h2>Distributions</h2>",
        f'<p><img src="{rel(files["histograms"])}" alt="Strength and Consistency histograms"></p>',
        "<h2>Per-category behaviour</h2>",
    ]
    if "categories" in files:
        parts.append("<p>Mean diff norm per prompt category and mean pairwise cosine of the diffs inside each category "
                     "(grey: no samples / NaN).</p>")
        if cat_note:
            parts.append(f'<p class="note">{e(cat_note)}</p>')
        parts.append(f'<p><img src="{rel(files["categories"])}" alt="per-category heatmaps"></p>')
        parts.append(f'<p><a href="{rel(files["categories_csv"])}">categories.csv</a></p>')
    else:
        parts.append('<p class="note">This index has no per-category values (e.g. the imported reference publishes only '
                     "the overall signature), so the per-category heatmap is skipped.</p>")
    parts += [
        "<h2>Near-duplicates</h2>",
        f"<p>LoRAs linked when their directions are nearly parallel (cosine &ge; {NEAR_DUPLICATE_MIN_COSINE}) and their "
        f"strengths differ by at most {NEAR_DUPLICATE_STRENGTH_TOLERANCE:.0%} of the larger one; groups are connected "
        "components of those links (so a chain can join LoRAs that are not all pairwise close). Zero directions link to "
        f"nothing. {len(groups)} group(s), {sum(len(g) for g in groups)} LoRAs.</p>",
    ]
    if groups:
        parts.append(_html_table(dup_header, dup_rows))
    parts.append(f'<p><a href="{rel(files["near_duplicates_csv"])}">near_duplicates.csv</a></p>')
    parts.append("<h2>Base vs LoRA images</h2>")
    if grid_note:
        parts.append(f'<p class="note">{e(grid_note)}</p>')
    if grids:
        parts.append("<p>Top row: the base model (first seed of each prompt); bottom row: the same prompt and seed with the "
                     "LoRA attached.</p>")
        parts.append('<div class="grids">')
        for i, p in grids:
            parts.append(f'<figure><img src="{rel(p)}" alt="{e(names[i], quote=True)}"><figcaption>{e(names[i])} '
                         f"<code>{e(ids[i])}</code></figcaption></figure>")
        parts.append("</div>")
    parts.append("<h2>All signatures</h2>")
    parts.append(f'<p><a href="{rel(files["signatures_csv"])}">signatures.csv</a> (every column but the direction, with '
                 "quadrant, filter verdict and near-duplicate group).</p>")
    if n <= MAX_HTML_TABLE_ROWS:
        order = np.argsort(-np.nan_to_num(strength, nan=-np.inf), kind="stable")
        parts.append('<p class="note">Strength and consistency with their 95% intervals (± 1.96 standard errors, from '
                     "the samples each signature used).</p>")
        parts.append(_html_table(["name", "lora_id", "strength", "consistency", "samples", "quadrant"],
                                 [[names[i], ids[i], *stated[i], quadrants[i]] for i in order]))
    parts.append("</body></html>")
    return "\n".join(parts)
