"""What a report says about an index, before anything is drawn: thresholds, quadrants, near-duplicates, categories."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from carlos_ray.behavior import connected_components
from carlos_ray.store import Manifest
from carlos_ray.thresholds import Thresholds, resolve_thresholds

logger = logging.getLogger(__name__)

NEAR_DUPLICATE_MIN_COSINE = 0.98
NEAR_DUPLICATE_STRENGTH_TOLERANCE = 0.10  # relative: |s_i - s_j| <= tol * max(|s_i|, |s_j|)
MAX_HEATMAP_ROWS = 60
DUP_BLOCK = 2048

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


def report_thresholds(manifest: Manifest, strength: np.ndarray, consistency: np.ndarray) -> Thresholds:
    """The manifest's thresholds; a missing one is calibrated from the index's own distribution."""
    return resolve_thresholds(stored=manifest.thresholds, calibrate_from=(strength, consistency))


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
    for start in range(0, n, DUP_BLOCK):
        block = unit[start : start + DUP_BLOCK]
        cos = block @ unit.T
        rows, cols = np.nonzero(cos >= min_cosine)
        rows = rows + start
        keep = (rows < cols) & valid[rows] & valid[cols]
        rows, cols = rows[keep], cols[keep]
        close = np.abs(s[rows] - s[cols]) <= strength_tolerance * np.maximum(np.abs(s[rows]), np.abs(s[cols]))
        for i, j in zip(rows[close].tolist(), cols[close].tolist()):
            edges.append((i, j, float(min(cos[i - start, j], 1.0))))
    groups = [g for g in connected_components((a, b) for a, b, _ in edges) if len(g) > 1]
    return groups, edges


def list_column(table: pa.Table, name: str) -> list:
    return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def category_matrix(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(categories, strength[n, k], within[n, k]) from the category columns, or None if absent."""
    names = list_column(table, "category_names")
    if not any(names):
        return None
    categories: list[str] = list(dict.fromkeys(c for row in names if row for c in row))
    col = {c: i for i, c in enumerate(categories)}
    n, k = table.num_rows, len(categories)
    strength = np.full((n, k), np.nan)
    within = np.full((n, k), np.nan)
    for r, (row_names, row_s, row_w) in enumerate(
        zip(names, list_column(table, "category_strength"), list_column(table, "category_within"))
    ):
        for j, c in enumerate(row_names or []):
            if row_s is not None and j < len(row_s) and row_s[j] is not None:
                strength[r, col[c]] = row_s[j]
            if row_w is not None and j < len(row_w) and row_w[j] is not None:
                within[r, col[c]] = row_w[j]
    return categories, strength, within


@dataclass
class ReportPage:
    """Everything the HTML page shows, gathered by :func:`carlos_ray.report.build.build_report`."""

    index_uri: str
    manifest: Manifest
    out: Path
    title: str
    thresholds: Thresholds
    ids: list[str]
    names: list[str]
    strength: np.ndarray
    consistency: np.ndarray
    quadrants: list[str]
    stated: list[tuple[str, str, int | None]] = field(default_factory=list)  # "x ± y" strength, consistency; samples
    labelled: list[int] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    cat_note: str = ""
    groups: list[list[int]] = field(default_factory=list)
    dup_header: list[str] = field(default_factory=list)
    dup_rows: list[list[Any]] = field(default_factory=list)
    grids: list[tuple[int, Path]] = field(default_factory=list)
    grid_note: str = ""
    behavior_html: str = ""  # the "What the LoRAs do" section (carlos_ray.behavior.report)

    @property
    def n(self) -> int:
        return len(self.ids)
