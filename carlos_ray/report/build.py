"""`build_report`: read one index snapshot, write the figures and CSV files section by section, then the page."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from carlos_ray.report.analysis import (
    MAX_HEATMAP_ROWS,
    ReportPage,
    category_matrix,
    near_duplicate_groups,
    quadrant_labels,
    report_thresholds,
)
from carlos_ray.report.figures import draw_grid, plot_categories, plot_histograms, plot_label, plot_scatter, safe_name
from carlos_ray.report.html import describe, render_html, write_csv
from carlos_ray.store import Index, Snapshot

logger = logging.getLogger(__name__)

MAX_GRIDS = 200


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
    strength = np.asarray(table["strength"].to_pylist(), dtype=np.float64)
    consistency = np.asarray(table["consistency"].to_pylist(), dtype=np.float64)
    thresholds = report_thresholds(m, strength, consistency)
    page = ReportPage(
        index_uri=str(index_uri), manifest=m, out=out, thresholds=thresholds, ids=ids,
        names=[x or i for x, i in zip(raw_names, ids)], strength=strength, consistency=consistency,
        quadrants=quadrant_labels(strength, consistency, thresholds),
        title=f"{m.config_name or Path(str(index_uri)).name}: {n} LoRAs, encoder {describe(m.encoder)}",
    )  # fmt: skip
    page.stated = _stated(table, strength, consistency)
    labels = [plot_label(x, i) for x, i in zip(raw_names, ids)]
    page.labelled = plot_scatter(strength, consistency, page.quadrants, labels, thresholds, page.title,
                                 out / "scatter.png")
    page.files["scatter"] = out / "scatter.png"
    page.files["histograms"] = plot_histograms(strength, consistency, thresholds, page.title, out / "histograms.png")
    _categories(page, table, labels)
    _near_duplicates(page, table)
    from carlos_ray.behavior.report import behavior_section

    page.behavior_html, behavior_files = behavior_section(snap, table, out, thresholds.max_strength,
                                                          thresholds.min_consistency)
    page.files.update(behavior_files)
    _signatures_csv(page, table)
    _grids(page, snap, max_grids)
    path = out / "index.html"
    path.write_text(render_html(page), encoding="utf-8")
    logger.info("report of %d LoRAs written to %s (%d grids, %d near-duplicate groups)", n, path, len(page.grids),
                len(page.groups))
    return path


def _stated(table: pa.Table, strength: np.ndarray, consistency: np.ndarray) -> list[tuple[str, str, int | None]]:
    """Strength and consistency with their 95% intervals ("4.12 ± 0.20") and the samples each signature used."""
    from carlos_ray.uncertainty import format_estimate

    def column(name: str) -> list:
        return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows

    return [(format_estimate(s, se), format_estimate(c, ce), k) for s, se, c, ce, k in zip(
        strength.tolist(), column("strength_se"), consistency.tolist(), column("consistency_se"), column("n"))]


def _categories(page: ReportPage, table: pa.Table, labels: list[str]) -> None:
    """Per-category heatmaps and categories.csv, when the index has per-category values."""
    cat = category_matrix(table)
    if cat is None:
        return
    categories, cat_s, cat_w = cat
    n, out = page.n, page.out
    order = np.argsort(-np.nan_to_num(page.strength, nan=-np.inf), kind="stable")
    shown = order[:MAX_HEATMAP_ROWS]
    if n > MAX_HEATMAP_ROWS:
        page.cat_note = f"Showing the {MAX_HEATMAP_ROWS} strongest of {n} LoRAs; every value is in categories.csv."
    page.files["categories"] = plot_categories([labels[i] for i in shown], categories, cat_s[shown], cat_w[shown],
                                               page.title, out / "categories.png")
    cat_rows = [[page.ids[r], page.names[r], c, cat_s[r, j], cat_w[r, j]]
                for r in range(n) for j, c in enumerate(categories)
                if np.isfinite(cat_s[r, j]) or np.isfinite(cat_w[r, j])]  # fmt: skip
    page.files["categories_csv"] = write_csv(
        out / "categories.csv", ["lora_id", "name", "category", "strength", "within_consistency"], cat_rows)


def _near_duplicates(page: ReportPage, table: pa.Table) -> None:
    """Groups of nearly parallel directions with similar strengths, and near_duplicates.csv."""
    directions = table["direction"].to_pylist()
    width = max((len(d) for d in directions), default=0)
    dmat = np.full((page.n, width), np.nan)
    for i, d in enumerate(directions):
        if len(d) == width:
            dmat[i] = d
    groups, edges = near_duplicate_groups(dmat, page.strength)
    best_cos: dict[int, float] = {}
    for i, j, c in edges:
        best_cos[i] = max(best_cos.get(i, -1.0), c)
        best_cos[j] = max(best_cos.get(j, -1.0), c)
    group_of = _group_of(groups)
    page.groups = groups
    page.dup_rows = [[group_of[i], len(groups[group_of[i] - 1]), page.ids[i], page.names[i], page.strength[i],
                      page.consistency[i], best_cos[i]] for members in groups for i in members]
    page.dup_header = ["group", "size", "lora_id", "name", "strength", "consistency", "max_cosine_in_group"]
    page.files["near_duplicates_csv"] = write_csv(page.out / "near_duplicates.csv", page.dup_header, page.dup_rows)


def _group_of(groups: list[list[int]]) -> dict[int, int]:
    return {i: g + 1 for g, members in enumerate(groups) for i in members}


def _signatures_csv(page: ReportPage, table: pa.Table) -> None:
    """Every signature but its direction, with quadrant, filter verdict and near-duplicate group."""
    cols = [c for c in table.column_names if c != "direction"]
    data = {c: table[c].to_pylist() for c in cols}
    group_of = _group_of(page.groups)
    rows = [[*(data[c][i] for c in cols), page.quadrants[i], page.quadrants[i] == "focused", group_of.get(i, "")]
            for i in range(page.n)]
    page.files["signatures_csv"] = write_csv(
        page.out / "signatures.csv", [*cols, "quadrant", "kept_by_filter", "near_duplicate_group"], rows)


def _grids(page: ReportPage, snap: Snapshot, max_grids: int) -> None:
    """Base vs LoRA thumbnail grids, when the index kept thumbnails."""
    thumbs = snap.table("thumbs")
    if thumbs is None or thumbs.num_rows == 0:
        page.grid_note = ("This index kept no thumbnails (indexing.keep_thumbnails was off, or it was imported), "
                          "so there are no image grids.")
        return
    base = snap.base(snap.manifest.base_key) if snap.manifest.base_key else None
    base_thumbs: dict[int, bytes | None] = {}
    if base is not None and "thumb" in base.column_names:
        for p, s, t in zip(base["prompt_idx"].to_pylist(), base["seed_idx"].to_pylist(), base["thumb"].to_pylist()):
            if s == 0:
                base_thumbs[int(p)] = t
    else:
        page.grid_note = "The base cache has no thumbnails; base images are shown as n/a."
    prompt_ids = list((snap.manifest.prompt_set or {}).get("ids") or [])
    by_lora: dict[str, dict[int, bytes]] = {}
    for lid, p, png in zip(*(thumbs[c].to_pylist() for c in ("lora_id", "prompt_idx", "png"))):
        by_lora.setdefault(str(lid), {})[int(p)] = png
    ids, names = page.ids, page.names
    row_of = {lid: i for i, lid in enumerate(ids)}
    todo = sorted((row_of[lid] for lid in by_lora if lid in row_of), key=lambda i: (names[i].lower(), ids[i]))
    if len(todo) > max_grids:
        page.grid_note = f"Showing grids for {max_grids} of {len(todo)} LoRAs with thumbnails (alphabetical)."
        todo = todo[:max_grids]
    (page.out / "grids").mkdir(exist_ok=True)
    for i in todo:
        pidx = sorted(by_lora[ids[i]])
        columns = [prompt_ids[p] if p < len(prompt_ids) else f"prompt {p}" for p in pidx]
        title = (f"{names[i]}  -  strength {page.strength[i]:.3g}, consistency {page.consistency[i]:.3g} "
                 f"({page.quadrants[i]})")
        path = draw_grid(title, columns, [base_thumbs.get(p) for p in pidx], [by_lora[ids[i]][p] for p in pidx],
                         page.out / "grids" / f"{safe_name(ids[i])}.png")
        page.grids.append((i, path))
