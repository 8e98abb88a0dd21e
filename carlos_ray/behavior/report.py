"""The report's "What the LoRAs do" section: tags, content groups, duplicates (HTML and CSV)."""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from carlos_ray.behavior import unit_rows
from carlos_ray.behavior.api import TAGS_NOT_COMPUTED
from carlos_ray.behavior.index import DEFAULT_MIN_COSINE, DEFAULT_MIN_STRENGTH_RATIO, BehaviorView, _directions

MAX_GROUP_ROWS = 50
MAX_PAIR_ROWS = 50


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _table(header: list[str], rows: list[list[Any]]) -> str:
    e = html.escape

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.3f}"
        return e(str(v))

    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def behavior_view(snapshot: Any, table: pa.Table, max_strength: float | None, min_consistency: float | None) -> BehaviorView:
    """A BehaviorView over a signatures table (rows in table order)."""
    ids = [str(x) for x in table["lora_id"].to_pylist()]
    names = table["name"].to_pylist()
    unit, _ = unit_rows(_directions(table))
    return BehaviorView(ids, unit, table["strength"].to_numpy(), table["consistency"].to_numpy(), names, snapshot,
                        max_strength, min_consistency)


def behavior_section(snapshot: Any, table: pa.Table, out: Path, max_strength: float | None,
                     min_consistency: float | None) -> tuple[str, dict[str, Path]]:
    """(HTML of the section, CSV files written into ``out``)."""
    e = html.escape
    view = behavior_view(snapshot, table, max_strength, min_consistency)
    names = [n or i for n, i in zip(view.names, view.ids)]
    files: dict[str, Path] = {}
    parts = ["<h2>What the LoRAs do: tags, groups, duplicates</h2>",
             "<p>From the signatures alone, not from names or descriptions.</p>", "<h3>Tags</h3>"]
    if view.tagged:
        t = view.tagging or {}
        counts = view.vocabulary_counts()
        parts.append(f"<p>{sum(1 for r in view.tags.values() if r)} of {len(view.ids)} LoRAs carry a tag of the "
                     f"<b>{e(str(t.get('vocabulary')))}</b> vocabulary (calibration <b>{e(str(t.get('calibration')))}</b>: a "
                     "tag whose reciprocal text vector is unusually similar to the LoRA's direction). Most used:</p>")
        parts.append(_table(["tag", "LoRAs"], [[w, c] for w, c in list(counts.items())[:30]]))
        files["tags_csv"] = _csv(out / "tags.csv", ["lora_id", "name", "tags", "scores"],
                                 [[i, names[k], ";".join(w for w, _ in view.tags.get(i, [])),
                                   ";".join(f"{s:.3f}" for _, s in view.tags.get(i, []))] for k, i in enumerate(view.ids)])
        parts.append('<p><a href="tags.csv">tags.csv</a></p>')
    else:
        parts.append(f'<p class="note">{e(TAGS_NOT_COMPUTED)}.</p>')

    g, infos = view.groups()
    multi = [i for i in infos if len(i.members) >= 2]
    parts += ["<h3>Content groups</h3>",
              f"<p>{g.n_groups} groups of the {int((g.labels >= 0).sum())} LoRAs inside the thresholds "
              f"({len(multi)} with two or more members); {e(g.method)}"
              f"{'' if g.silhouette is None else f', silhouette {g.silhouette:.3f}'}. Cohesion is the members' mean cosine "
              "to the group centroid.</p>"]
    rows = [[i.group, len(i.members), i.cohesion, ", ".join(t for t, _ in i.tags),
             "; ".join(names[view.pos[m]] for m in i.members[:8]) + (" ..." if len(i.members) > 8 else "")]
            for i in multi[:MAX_GROUP_ROWS]]
    if rows:
        parts.append(_table(["group", "size", "cohesion", "shared tags", "members"], rows))
    files["groups_csv"] = _csv(out / "groups.csv", ["group", "lora_id", "name", "shared_tags"],
                               [[i.group, m, names[view.pos[m]], ";".join(t for t, _ in i.tags)] for i in infos for m in i.members])
    parts.append('<p><a href="groups.csv">groups.csv</a></p>')

    rep = view.all_duplicates(DEFAULT_MIN_COSINE, DEFAULT_MIN_STRENGTH_RATIO)
    parts += ["<h3>Duplicates</h3>",
              f"<p>Behavioural duplicates: directions with cosine &ge; {DEFAULT_MIN_COSINE} <i>and</i> strengths within a "
              f"ratio of {DEFAULT_MIN_STRENGTH_RATIO} (score = cosine &times; strength ratio). {len(rep.pairs)} pair(s). "
              f"Parallel directions at clearly different strengths are a scale family: {len(rep.families)}.</p>"]
    if rep.pairs:
        parts.append(_table(["score", "cosine", "strength ratio", "LoRA", "LoRA"],
                            [[p.score, p.cosine, p.strength_ratio, f"{names[p.a]} ({view.ids[p.a]})",
                              f"{names[p.b]} ({view.ids[p.b]})"] for p in rep.pairs[:MAX_PAIR_ROWS]]))
    for f in rep.families:
        parts.append("<p>Scale family: " + " &lt; ".join(f"{e(names[m])} ({s:.3g})" for m, s in zip(f.members, f.strengths))
                     + "</p>")
    files["duplicates_csv"] = _csv(out / "duplicates.csv", ["lora_a", "lora_b", "name_a", "name_b", "score", "cosine",
                                                            "strength_ratio"],
                                   [[view.ids[p.a], view.ids[p.b], names[p.a], names[p.b], p.score, p.cosine,
                                     p.strength_ratio] for p in rep.pairs])
    parts.append('<p><a href="duplicates.csv">duplicates.csv</a></p>')
    exact = sorted(view.aliases.items())
    parts.append(f"<p>Exact duplicates (the same file, same SHA-256, under other names or folders; indexed once): "
                 f"{sum(len(v) for _, v in exact)} extra cop{'y' if sum(len(v) for _, v in exact) == 1 else 'ies'}.</p>")
    if exact:
        parts.append(_table(["indexed LoRA", "other copies"], [[f"{names[view.pos[i]]} ({i})" if i in view.pos else i,
                                                                 "; ".join(paths)] for i, paths in exact]))
    return "\n".join(parts), files
