"""Label metrics against hand-computed examples and a naive brute-force implementation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from carlos_ray.evaluation.metrics import (label_metrics, ndcg_at_k, precision_at_k, reciprocal_rank,
                                           separation_auc)


def test_hand_computed_example():
    ranked = ["a", "b", "c", "d"]
    rel = {"b": 2, "d": 1, "e": 1}  # e is relevant but never retrieved
    assert precision_at_k(ranked, rel, 1) == 0.0
    assert precision_at_k(ranked, rel, 5) == pytest.approx(2 / 5)  # a list shorter than k counts misses
    assert reciprocal_rank(ranked, rel) == 0.5
    # gains 2^g - 1: b -> 3 at rank 2, d -> 1 at rank 4; ideal: 3, 1, 1 at ranks 1..3
    dcg = 3 / math.log2(3) + 1 / math.log2(5)
    idcg = 3 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, rel, 10) == pytest.approx(dcg / idcg)
    # binary: gain 1 each
    assert ndcg_at_k(ranked, rel, 10, graded=False) == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 1 / math.log2(4)))
    m = label_metrics(ranked, rel)
    assert m["P@1"] == 0.0 and m["MRR"] == 0.5


def test_perfect_and_empty_rankings():
    rel = {"x": 1, "y": 2}
    assert ndcg_at_k(["y", "x", "z"], rel, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], rel, 10) < 1.0  # the grade-2 one should come first
    assert reciprocal_rank([], rel) == 0.0 and precision_at_k([], rel, 5) == 0.0
    assert all(math.isnan(v) for v in label_metrics(["x"], {}).values())  # a negative query has no labels


def naive_ndcg(ranked, rel, k, graded=True):
    """Brute force: the ideal DCG is the best DCG over every ordering of every k-subset of the relevant ids."""
    gain = (lambda g: 2.0**g - 1) if graded else (lambda g: 1.0 if g > 0 else 0.0)

    def dcg(ids):
        return float(np.sum([gain(rel.get(i, 0)) / np.log2(np.arange(2, len(ids) + 2))[j] for j, i in enumerate(ids)]))

    pos = [i for i, g in rel.items() if g > 0]
    best = max(dcg(list(p)) for r in range(1, min(k, len(pos)) + 1) for p in itertools.permutations(pos, r))
    return dcg(ranked[:k]) / best


def test_against_naive_implementation():
    rng = np.random.default_rng(0)
    ids = [f"l{i}" for i in range(12)]
    for _ in range(200):
        rel = {i: int(g) for i, g in zip(ids, rng.integers(0, 3, len(ids))) if g > 0 and rng.random() < 0.4}
        if not rel:
            continue
        ranked = list(rng.permutation(ids)[: int(rng.integers(1, 12))])
        for k in (1, 3, 5, 10):
            assert ndcg_at_k(ranked, rel, k) == pytest.approx(naive_ndcg(ranked, rel, k))
            assert ndcg_at_k(ranked, rel, k, graded=False) == pytest.approx(naive_ndcg(ranked, rel, k, graded=False))
            hits = np.array([rel.get(r, 0) > 0 for r in ranked[:k]] + [False] * (k - len(ranked[:k])))
            assert precision_at_k(ranked, rel, k) == pytest.approx(hits.mean())
        first = next((j for j, r in enumerate(ranked) if r in rel), None)
        assert reciprocal_rank(ranked, rel) == (0.0 if first is None else 1 / (first + 1))


def test_separation_auc_against_pairs():
    pos, neg = [0.9, 0.5, 0.5], [0.5, 0.1]
    # pairs: (0.9>0.5, 0.9>0.1, 0.5=0.5 -> 1/2, 0.5>0.1, 0.5=0.5 -> 1/2, 0.5>0.1) = 5 / 6
    assert separation_auc(pos, neg) == pytest.approx(5 / 6)
    assert math.isnan(separation_auc(pos, []))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="repeated"):
        precision_at_k(["a", "a"], {"a": 1}, 1)
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(["a"], {"a": 1}, 0)
    with pytest.raises(ValueError, match="grades"):
        reciprocal_rank(["a"], {"a": -1})
    with pytest.raises(TypeError):
        reciprocal_rank("abc", {"a": 1})
