"""The report's HTML page and CSV files (relative links only: the directory opens from disk)."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from carlos_ray.report.analysis import (
    NEAR_DUPLICATE_MIN_COSINE,
    NEAR_DUPLICATE_STRENGTH_TOLERANCE,
    QUADRANTS,
    ReportPage,
)
from carlos_ray.report.figures import fmt

MAX_HTML_TABLE_ROWS = 100


def csv_value(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return "" if v is None else v


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([csv_value(v) for v in row])
    return path


def html_table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
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


def describe(spec: Any) -> str:
    """``arch (pretrained)`` / ``model`` of an encoder or generator spec from the manifest."""
    if not isinstance(spec, dict):
        return "unknown" if spec is None else str(spec)
    name = spec.get("arch") or spec.get("model") or "unknown"
    if "arch" in spec:
        if spec.get("pretrained"):
            return f"{name} ({spec['pretrained']})"
        from carlos_ray.models.registry import embedded_encoder

        embedded = embedded_encoder(str(name))
        return f"{name} ({embedded.weights if embedded is not None else 'random weights'})"
    return str(name)


def render_html(page: ReportPage) -> str:
    """The report page (one string) from what :func:`build_report` gathered."""
    out, n, title, thresholds, manifest = page.out, page.n, page.title, page.thresholds, page.manifest
    ids, names, strength, consistency, quadrants = page.ids, page.names, page.strength, page.consistency, page.quadrants
    files, groups, grids = page.files, page.groups, page.grids

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
        f'<p>Index <code>{e(page.index_uri)}</code> - {n} LoRA signatures - encoder {e(describe(manifest.encoder))}'
        f' - generator {e(describe(manifest.generator))}'
        f' - manifest version {e(str(manifest.version))}, updated {e(str(manifest.updated_at))}'
        f'{" - imported from " + e(str(manifest.source)) if manifest.source else ""}.</p>',
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
        parts.append(html_table(["name", "lora_id", "strength", "consistency", "quadrant"],
                                 [[names[i], ids[i], strength[i], consistency[i], quadrants[i]] for i in page.labelled]))
    parts += [
        "<h2>Distributions</h2>",
        f'<p><img src="{rel(files["histograms"])}" alt="Strength and Consistency histograms"></p>',
        "<h2>Per-category behaviour</h2>",
    ]
    if "categories" in files:
        parts.append("<p>Mean diff norm per prompt category and mean pairwise cosine of the diffs inside each category "
                     "(grey: no samples / NaN).</p>")
        if page.cat_note:
            parts.append(f'<p class="note">{e(page.cat_note)}</p>')
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
        parts.append(html_table(page.dup_header, page.dup_rows))
    parts.append(f'<p><a href="{rel(files["near_duplicates_csv"])}">near_duplicates.csv</a></p>')
    parts.append(page.behavior_html)
    parts.append("<h2>Base vs LoRA images</h2>")
    if page.grid_note:
        parts.append(f'<p class="note">{e(page.grid_note)}</p>')
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
        parts.append(html_table(["name", "lora_id", "strength", "consistency", "samples", "quadrant"],
                                [[names[i], ids[i], *page.stated[i], quadrants[i]] for i in order]))
    parts.append("</body></html>")
    return "\n".join(parts)
