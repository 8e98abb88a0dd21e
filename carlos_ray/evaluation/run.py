"""The evaluation end to end: retrievers x queries -> label metrics, and (optionally) the judges.

`run_eval(index_uri, queries, spec)` ranks every query with every retriever, scores the rankings
against the planted ground truth (`metrics`), then runs one judge pass on Ray Data for every LoRA
that some retriever put in a query's top `judge_k` (plus the planted LoRAs and the base model, the
two reference rows) and scores each retriever by what its LoRAs actually draw (`judging`).

Scoring rules (also printed under the table):

- label metrics are means over positive queries; grades from the query file (nDCG graded, P@k and
  MRR binary);
- `oracle`: per query, the mean over its top `judge_k` LoRAs of the fraction of their images (held-out
  prompts x seeds) in which the oracle sees the query's attribute; `clip`: the same mean of
  cos(v(image), u(query)); a slot with no retrieved LoRA (filters left fewer than `judge_k`) is
  judged on the base model's images (what the user gets without a LoRA);
- `top+` / `top-`: mean top score on positive / negative queries (each retriever's own scale), and
  `AUC`: P(a positive query's top score > a negative query's), the retriever's confidence telling
  them apart;
- `±` is the standard error of the mean over queries.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import Field

from carlos_ray.config import Config, ResourcesSpec, StrictModel
from carlos_ray.evaluation.metrics import LABEL_METRICS, label_metrics, separation_auc
from carlos_ray.evaluation.queries import QuerySet, check_against_index
from carlos_ray.evaluation.retrievers import RETRIEVER_NAMES, Ranking, build_retrievers

logger = logging.getLogger(__name__)

JUDGES = ("oracle", "clip")
PLANTED, BASE = "planted (ceiling)", "base model (no LoRA)"


class EvalSpec(StrictModel):
    heldout_prompts: str | None = Field(None, description="Held-out prompt set (YAML) for judging: in neither P nor P'.")
    heldout_subset: str | None = Field(None, description="Named subset of the held-out prompt set; None = all.")
    seed_start: int = Field(1000, ge=0, description="First held-out seed (the index uses its own seeds).")
    num_seeds: int = Field(2, ge=1, le=64, description="Seeds per held-out prompt.")
    k: int = Field(10, ge=10, le=1000, description="Ranking depth for the label metrics (nDCG@10 needs >= 10).")
    judge_k: int = Field(3, ge=1, le=20, description="Top LoRAs per query that generate images for the judges.")
    judges: list[str] = Field(default_factory=lambda: list(JUDGES), description="Judges to run: oracle, clip (empty: labels only).")
    oracle: str = Field("micro", description="Pixel oracle in the registry (`carlos_ray.evaluation.oracles`).")
    retrievers: list[str] = Field(default_factory=lambda: list(RETRIEVER_NAMES), description="Retrievers to compare.")
    graded: bool = Field(True, description="nDCG with graded gains (2^g - 1); False: binary.")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed_start, self.seed_start + self.num_seeds))


def config_from_manifest(manifest: Any, resources: ResourcesSpec | None = None) -> Config:
    """The index's generator, encoder, sampling and query settings, with the given actor-pool resources."""
    data = {k: getattr(manifest, k) for k in ("generator", "encoder", "sampling", "query") if getattr(manifest, k)}
    data["name"] = str(manifest.config_name or "index")
    cfg = Config.from_dict(data, source="index manifest")
    if resources is not None:
        cfg.resources = resources
    return cfg


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0


def heldout_prompts(spec: EvalSpec, cfg: Config, manifest: Any) -> list[str]:
    """The held-out prompt texts, checked to be in neither P nor P' of the index."""
    from carlos_ray.prompts import load_prompt_set
    from carlos_ray.serving.loading import context_texts_from_manifest

    if spec.heldout_prompts is None:
        raise ValueError("judging needs held-out prompts (EvalSpec.heldout_prompts / --heldout): a prompt set in neither "
                         "the index's prompts P nor its context prompts P'")
    texts = list(load_prompt_set(spec.heldout_prompts, spec.heldout_subset).texts)
    used = set(load_prompt_set(cfg.sampling.prompts, cfg.sampling.prompt_subset).texts)
    used |= set(context_texts_from_manifest(manifest))
    norm = {" ".join(t.split()).casefold() for t in used}
    overlap = [t for t in texts if " ".join(t.split()).casefold() in norm]
    if overlap:
        raise ValueError(f"held-out prompts must be in neither P nor P'; {len(overlap)} are, e.g. {overlap[0]!r}")
    return texts


def run_eval(index_uri: str, queries: QuerySet, spec: EvalSpec | None = None, *, cache_dir: str | Path | None = None,
             resources: ResourcesSpec | None = None, device: str | None = None) -> dict[str, Any]:
    """Evaluate every retriever of `spec` on `queries` over the index; returns the result dict (see `table_rows`)."""
    from carlos_ray.serving.loading import load_query_encoder
    from carlos_ray.store import Index

    spec = spec or EvalSpec()
    bad = [j for j in spec.judges if j not in JUDGES]
    if bad:
        raise ValueError(f"unknown judge(s) {bad}; valid: {list(JUDGES)}")
    t0 = time.time()
    snap = Index(index_uri).snapshot()
    table = snap.signatures()
    if table is None or table.num_rows == 0:
        raise ValueError(f"index {index_uri} holds no signatures; index a zoo first")
    manifest = snap.manifest
    check_against_index(queries, set(table.column("lora_id").to_pylist()))
    enc = load_query_encoder(manifest, device=device)
    retrievers = build_retrievers(table, manifest, enc, spec.retrievers)
    texts = [q.text for q in queries.queries]
    depth = max(spec.k, spec.judge_k)
    rankings: dict[str, list[Ranking]] = {}
    for r in retrievers:
        t = time.time()
        rankings[r.name] = r.rank(texts, depth)
        logger.info("%s ranked %d queries in %.2f s", r.name, len(texts), time.time() - t)
    t_rank = time.time() - t0

    per_query: dict[str, list[dict]] = {}
    for name, ranks in rankings.items():
        rows = []
        for q, rk in zip(queries.queries, ranks):
            m = label_metrics(list(rk.ids[: spec.k]), q.relevance, graded=spec.graded)
            rows.append({"query": q.id, "kind": q.kind, "top": list(rk.ids[: spec.judge_k]), "top_score": rk.top_score, **m})
        per_query[name] = rows

    judged = None
    t_judge = 0.0
    if spec.judges:
        t = time.time()
        judged = _judge(index_uri, manifest, table, queries, rankings, spec, enc, cache_dir, resources)
        for name, rows in judged["per_query"].items():
            if name in per_query:
                for row, j in zip(per_query[name], rows):
                    row.update(j)
            else:
                per_query[name] = [{"query": q.id, "kind": q.kind, **j} for q, j in zip(queries.queries, rows)]
        t_judge = time.time() - t
    result = {
        "index": str(index_uri), "index_version": manifest.version, "queries": queries.name,
        "n_queries": len(queries.queries), "n_positive": len(queries.positives), "n_negative": len(queries.negatives),
        "n_loras": table.num_rows, "spec": spec.model_dump(), "thresholds": dict(manifest.thresholds),
        "rows": table_rows(per_query, spec),
        "per_query": per_query,
        "judge": None if judged is None else {k: v for k, v in judged.items() if k != "per_query"},
        "seconds": {"rank": round(t_rank, 2), "judge": round(t_judge, 2), "total": round(time.time() - t0, 2)},
    }
    return result


def _judge(index_uri: str, manifest: Any, table: Any, queries: QuerySet, rankings: dict[str, list[Ranking]],
           spec: EvalSpec, enc: Any, cache_dir: str | Path | None, resources: ResourcesSpec | None) -> dict[str, Any]:
    from carlos_ray.evaluation.judging import BASE_ID, JudgeCache, JudgeLora, generation_key, judge_rows, judged_images
    from carlos_ray.evaluation.judging import run_judge_pass
    from carlos_ray.evaluation.retrievers import encode_texts

    cfg = config_from_manifest(manifest, resources)
    prompts = heldout_prompts(spec, cfg, manifest)
    seeds = spec.seeds
    oracle = spec.oracle if "oracle" in spec.judges else None
    planted = [tuple(sorted(q.relevance, key=lambda lid: (-q.relevance[lid], lid))[: spec.judge_k]) for q in queries.queries]
    wanted: dict[str, None] = {}
    for ranks in rankings.values():
        for rk in ranks:
            wanted.update(dict.fromkeys(rk.ids[: spec.judge_k]))
    for ids in planted:
        wanted.update(dict.fromkeys(ids))
    info = {lid: (p, tuple(w or ())) for lid, p, w in zip(*(table.column(c).to_pylist()
                                                             for c in ("lora_id", "source_path", "trigger_words")))}
    missing_files = [lid for lid in wanted if not info[lid][0] or not Path(info[lid][0]).is_file()]
    if missing_files:
        raise ValueError(f"{len(missing_files)} retrieved LoRA file(s) are gone from where the index found them, "
                         f"e.g. {info[missing_files[0]][0]!r}; judging needs the files")
    loras = [JudgeLora(BASE_ID, "")] + [JudgeLora(lid, info[lid][0], info[lid][1]) for lid in sorted(wanted)]
    cache = JudgeCache(cache_dir or Path(index_uri) / "judge-cache", generation_key(cfg, oracle))
    rows = judge_rows(loras, prompts, seeds, cfg, cache.keys())
    logger.info("judging: %d LoRAs x %d held-out prompts x %d seeds; %d images to generate (%d cached)",
                len(loras), len(prompts), len(seeds), len(rows), len(loras) * len(prompts) * len(seeds) - len(rows))
    cache.add(run_judge_pass(rows, cfg, oracle))
    images = judged_images(cache, [lo.lora_id for lo in loras], prompts, seeds)

    qfeat = encode_texts(enc.model, enc.tokenizer, [q.text for q in queries.queries], str(enc.device))
    qn = np.linalg.norm(qfeat, axis=1, keepdims=True)
    qfeat = np.divide(qfeat, qn, out=np.zeros_like(qfeat), where=qn > 0)

    def scores(qi: int, ids: Sequence[str]) -> dict[str, float]:
        slots = list(ids[: spec.judge_k]) + [BASE_ID] * (spec.judge_k - len(ids[: spec.judge_k]))
        out = {}
        if "oracle" in spec.judges:
            attr = queries.queries[qi].attribute
            out["oracle"] = (float(np.mean([np.mean([attr in a for a in images.attributes[lid]]) for lid in slots]))
                             if attr else math.nan)
        if "clip" in spec.judges:
            out["clip"] = float(np.mean([float(np.mean(images.features[lid] @ qfeat[qi])) if len(images.features[lid])
                                         else math.nan for lid in slots]))
        return out

    per_query = {name: [scores(i, rk.ids) for i, rk in enumerate(ranks)] for name, ranks in rankings.items()}
    per_query[PLANTED] = [scores(i, ids) for i, ids in enumerate(planted)]
    per_query[BASE] = [scores(i, ()) for i in range(len(queries.queries))]
    return {"per_query": per_query, "prompts": prompts, "seeds": seeds, "loras_judged": len(loras),
            "images_generated": len(rows), "images_cached": len(loras) * len(prompts) * len(seeds) - len(rows),
            "nonfinite_images": int(sum(images.nonfinite.values()))}


def table_rows(per_query: dict[str, list[dict]], spec: EvalSpec) -> list[dict]:
    """One row per retriever (then the reference rows): means (and standard errors) over queries."""
    out = []
    for name, rows in per_query.items():
        pos = [r for r in rows if r["kind"] == "positive"]
        neg = [r for r in rows if r["kind"] == "negative"]
        row: dict[str, Any] = {"retriever": name, "reference": name in (PLANTED, BASE)}
        for m in LABEL_METRICS:
            row[m], row[m + " se"] = _mean_se([r.get(m, math.nan) for r in pos])
        for j in spec.judges:
            row[j], row[j + " se"] = _mean_se([r.get(j, math.nan) for r in pos])
            row[j + " neg"], _ = _mean_se([r.get(j, math.nan) for r in neg])
        if not row["reference"]:
            tp = [r["top_score"] for r in pos]
            tn = [r["top_score"] for r in neg]
            row["top+"], _ = _mean_se(tp)
            row["top-"], _ = _mean_se(tn)
            row["AUC"] = separation_auc(tp, tn)
        out.append(row)
    return out


def format_table(result: dict[str, Any]) -> str:
    """The result as a fixed-width text table (deterministic: same numbers, same text)."""
    judges = result["spec"]["judges"]
    cols = ["retriever", *LABEL_METRICS, *judges, "top+", "top-", "AUC"]

    def cell(row: dict, c: str) -> str:
        v = row.get(c)
        if c == "retriever":
            return str(v)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        se = row.get(c + " se")
        if c in ("P@1",) + tuple(judges) and se is not None and math.isfinite(se):
            return f"{v:.3f}±{se:.3f}"
        return f"{v:.3f}"

    body = [[cell(r, c) for c in cols] for r in result["rows"]]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
