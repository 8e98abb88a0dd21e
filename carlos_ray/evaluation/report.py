"""The evaluation's outputs: results JSON, the text table, an HTML page with the table and a chart PNG."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from carlos_ray.evaluation.metrics import LABEL_METRICS
from carlos_ray.evaluation.run import format_table

RULES = [
    "Label metrics: means over positive queries against the planted behaviours (nDCG@10 graded 2^g - 1; P@k and MRR binary).",
    "oracle: per query, mean over its top judge_k LoRAs of the fraction of their held-out images in which the pixel oracle "
    "sees the queried attribute; clip: the same mean of cos(v(image), u(query)) with the index's encoder. An empty slot is "
    "judged on the base model's images.",
    "top+ / top-: mean top score on positive / negative queries (each retriever's own scale); AUC: P(top score of a positive "
    "query > that of a negative query), ties 1/2.",
    "± is the standard error of the mean over queries. Reference rows: the planted LoRAs (a ceiling for the judges) and the "
    "base model without any LoRA (the floor).",
]


def json_safe(o: Any) -> Any:
    """`o` with non-finite floats replaced by None (strict JSON)."""
    if isinstance(o, float):
        return None if not math.isfinite(o) else o
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o


def plot_chart(result: dict, path: Path) -> Path:
    """Grouped bars per retriever: P@1 and each judge (with standard errors)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import numpy as np

    rows = result["rows"]
    metrics = ["P@1", "nDCG@10", *result["spec"]["judges"]]
    fig = Figure(figsize=(10, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    w = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        vals = [r.get(m) if r.get(m) is not None and math.isfinite(r.get(m)) else 0.0 for r in rows]
        err = [r.get(m + " se") if r.get(m + " se") is not None and math.isfinite(r.get(m + " se")) else 0.0 for r in rows]
        ax.bar(x + (i - (len(metrics) - 1) / 2) * w, vals, w, yerr=err, capsize=2, label=m)
    ax.set_xticks(x, [r["retriever"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score (mean over positive queries)")
    ax.set_title(f"{result['queries']}: {result['n_positive']} positive, {result['n_negative']} negative queries, "
                 f"{result['n_loras']} LoRAs")
    ax.legend(fontsize=8, ncols=len(metrics))
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png", dpi=100)
    return path


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json, table.txt, chart.png and index.html in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "table.txt", "chart": out / "chart.png", "html": out / "index.html"}
    paths["json"].write_text(json.dumps(json_safe(result), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    table = format_table(result)
    paths["table"].write_text(table + "\n", encoding="utf-8")
    plot_chart(result, paths["chart"])
    judges = result["spec"]["judges"]
    cols = ["retriever", *LABEL_METRICS, *judges, *(j + " neg" for j in judges), "top+", "top-", "AUC"]

    def cell(r: dict, c: str) -> str:
        v = r.get(c)
        if c == "retriever":
            return html.escape(str(v))
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        se = r.get(c + " se")
        return f"{v:.3f}" + (f" <small>±{se:.3f}</small>" if se is not None and math.isfinite(se) else "")

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "\n".join("<tr" + (' class="ref"' if r.get("reference") else "") + ">" +
                     "".join(f"<td>{cell(r, c)}</td>" for c in cols) + "</tr>" for r in result["rows"])
    j = result.get("judge") or {}
    spec = result["spec"]
    info = (f"index {html.escape(result['index'])} (version {result['index_version']}), {result['n_loras']} LoRAs; "
            f"{result['n_queries']} queries ({result['n_positive']} positive, {result['n_negative']} negative); "
            f"judged: top {spec['judge_k']} LoRAs per query, {len(j.get('prompts', []))} held-out prompts x "
            f"{len(j.get('seeds', []))} seeds, {j.get('loras_judged', 0)} LoRAs, {j.get('images_generated', 0)} images "
            f"generated ({j.get('images_cached', 0)} from the cache); {result['seconds']['total']:.0f} s")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>carlos-ray evaluation</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}}
table{{border-collapse:collapse;font-size:.85em}}th,td{{border:1px solid #ddd;padding:3px 7px}}th{{background:#f4f4f4}}
tr.ref td{{color:#666;font-style:italic}}small{{color:#888}}.note{{color:#555;font-size:.9em}}img{{max-width:100%}}</style>
</head><body><h1>Does it find the right LoRA?</h1><p class="note">{info}</p>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<ul class="note">{''.join(f'<li>{html.escape(r)}</li>' for r in RULES)}</ul>
<img src="chart.png" alt="P@1, nDCG@10 and judge scores per retriever">
<h2>Held-out prompts</h2><ul class="note">{''.join(f'<li>{html.escape(p)}</li>' for p in j.get('prompts', []))}</ul>
</body></html>
"""
    paths["html"].write_text(page, encoding="utf-8")
    return paths
