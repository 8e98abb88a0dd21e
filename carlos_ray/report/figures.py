"""The report's figures: matplotlib `Figure` objects on the Agg canvas only (never pyplot, no global state)."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from carlos_ray.report.analysis import QUADRANTS
from carlos_ray.thresholds import Thresholds

logger = logging.getLogger(__name__)

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


def plot_label(name: str | None, lora_id: str, limit: int = 28) -> str:
    """A label the plotting font can draw (falls back to the id) with mathtext ``$`` escaped."""
    label = _plain(name or "")
    if len(label) < 3:
        label = lora_id
    return _short(label, limit).replace("$", r"\$")


def safe_name(lora_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", lora_id)[:60]
    if safe != lora_id:
        safe += "-" + hashlib.sha1(lora_id.encode("utf-8")).hexdigest()[:8]
    return safe


def fmt(v: Any, digits: int = 4) -> str:
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
