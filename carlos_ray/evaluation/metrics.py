"""Label metrics of one ranked list against graded relevance (planted behaviours are the truth).

``relevance`` maps a LoRA id to a grade (> 0 relevant, higher is better; missing or 0 irrelevant).
Binary metrics (P@k, MRR) count every grade > 0 as relevant; nDCG uses the grades as gains
(``2**g - 1``, the usual exponential gain, so binary relevance gives gain 1) with the ideal ranking
built from every relevant LoRA of the query, retrieved or not. A query with no relevant LoRA (a
negative query) has no label metrics: callers report its top score instead.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

LABEL_METRICS = ("P@1", "P@5", "MRR", "nDCG@10")


def _check(ranked: Sequence[str], relevance: Mapping[str, float], k: int | None = None) -> None:
    if isinstance(ranked, str):
        raise TypeError("ranked must be a sequence of ids, not a string")
    if len(set(ranked)) != len(ranked):
        raise ValueError(f"ranked list has repeated ids: {sorted({r for r in ranked if list(ranked).count(r) > 1})}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    bad = {i: g for i, g in relevance.items() if not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0)}
    if bad:
        raise ValueError(f"relevance grades must be finite numbers >= 0; got {dict(list(bad.items())[:3])}")


def precision_at_k(ranked: Sequence[str], relevance: Mapping[str, float], k: int) -> float:
    """Fraction of the first ``k`` positions holding a relevant id (a list shorter than k counts misses)."""
    _check(ranked, relevance, k)
    return sum(1 for r in ranked[:k] if relevance.get(r, 0) > 0) / k


def reciprocal_rank(ranked: Sequence[str], relevance: Mapping[str, float]) -> float:
    """1 / (1-based rank of the first relevant id), 0 if none is retrieved."""
    _check(ranked, relevance)
    for i, r in enumerate(ranked):
        if relevance.get(r, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain of gains in rank order: sum of g_i / log2(i + 2)."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(ranked: Sequence[str], relevance: Mapping[str, float], k: int, graded: bool = True) -> float:
    """nDCG@k with gain ``2**grade - 1`` (``graded``) or 1 per relevant id; NaN if nothing is relevant."""
    _check(ranked, relevance, k)

    def gain(g: float) -> float:
        if g <= 0:
            return 0.0
        return (2.0**g - 1.0) if graded else 1.0

    ideal = dcg(sorted((gain(g) for g in relevance.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        return math.nan
    return dcg([gain(relevance.get(r, 0)) for r in ranked[:k]]) / ideal


def label_metrics(ranked: Sequence[str], relevance: Mapping[str, float], graded: bool = True) -> dict[str, float]:
    """P@1, P@5, MRR and nDCG@10 of one ranked list (NaN for all when nothing is relevant)."""
    if not any(g > 0 for g in relevance.values()):
        _check(ranked, relevance)
        return {m: math.nan for m in LABEL_METRICS}
    return {
        "P@1": precision_at_k(ranked, relevance, 1),
        "P@5": precision_at_k(ranked, relevance, 5),
        "MRR": reciprocal_rank(ranked, relevance),
        "nDCG@10": ndcg_at_k(ranked, relevance, 10, graded=graded),
    }


def separation_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive query's top hit > a random negative's), ties count 1/2; NaN if a side is empty.

    A retriever whose confidence tells answerable queries from unanswerable ones scores near 1; its
    scale does not matter (BM25 scores and cosines compare alike)."""
    pos = [float(x) for x in positive if math.isfinite(x)]
    neg = [float(x) for x in negative if math.isfinite(x)]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
