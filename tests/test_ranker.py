"""Ranker: exact filtered top-k against an independent brute force (float64 cosine, Python sort)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carlos_ray.ranker import Hit, Ranker, UnknownLora, calibrate_thresholds
from carlos_ray.schema import SIGNATURE_SCHEMA, conform_signatures

def _have_simsimd() -> bool:
    try:
        import simsimd  # noqa: F401
    except ImportError:
        return False
    return True


PASSES = ["float32"] + (["int8"] if _have_simsimd() else [])


def make_table(directions, strength, consistency, ids=None, dtype=pa.float64()) -> pa.Table:
    n = len(directions)
    ids = ids if ids is not None else [f"lora-{i:05d}" for i in range(n)]
    return pa.table(
        {
            "lora_id": pa.array(ids, pa.string()),
            "name": pa.array([f"name {i}" for i in ids], pa.string()),
            "trigger_words": pa.array([[f"tw-{i}"] for i in ids], pa.list_(pa.string())),
            "direction": pa.array([list(map(float, row)) for row in directions], pa.list_(dtype)),
            "strength": pa.array(np.asarray(strength, np.float64)),
            "consistency": pa.array(np.asarray(consistency, np.float64)),
        }
    )


def random_data(seed: int, n: int, d: int, n_dup: int = 0, n_zero: int = 0):
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n, d)) * rng.lognormal(0, 1, size=(n, 1))
    for _ in range(n_dup):  # exact copies: exact ties
        directions[rng.integers(n)] = directions[rng.integers(n)]
    directions[rng.choice(n, size=n_zero, replace=False)] = 0.0
    strength = rng.lognormal(1.5, 0.4, size=n)
    consistency = rng.uniform(0, 0.5, size=n)
    ids = [f"lora-{i:05d}" for i in rng.permutation(n)]  # id order unrelated to row order
    return directions, strength, consistency, ids


def brute_scores(directions, q) -> np.ndarray:
    """float64 cosine of the raw vectors (0 for a zero vector)."""
    d = np.asarray(directions, np.float64)
    q = np.asarray(q, np.float64)
    norms = np.linalg.norm(d, axis=1)
    scores = np.zeros(len(d))
    nz = norms > 0
    scores[nz] = d[nz] @ q / (norms[nz] * np.linalg.norm(q))
    return scores


def brute_force(directions, strength, consistency, ids, q, k, max_s=None, min_c=None, exclude=None):
    """Independent ranking: float64 cosine, filters in plain Python, sort by (-score, id)."""
    scores = brute_scores(directions, q)
    rows = [
        (float(scores[i]), ids[i])
        for i in range(len(scores))
        if (max_s is None or strength[i] <= max_s)
        and (min_c is None or consistency[i] >= min_c)
        and ids[i] != exclude
    ]
    rows.sort(key=lambda r: (-r[0], r[1]))
    return rows[:k]


def assert_same(hits: list[Hit], expected: list[tuple[float, str]], near_tie: float = 1e-6):
    """Same ranking; two ids may only trade places when their float64 scores are near-tied.

    The ranker scores the stored float32 unit vectors, so distinct LoRAs whose exact cosines
    differ by less than ~1e-7 may legitimately come out in either order. Exact ties (identical
    vectors) must be broken by lora_id on both sides.
    """
    assert len(hits) == len(expected)
    assert len({h.lora_id for h in hits}) == len(hits)
    np.testing.assert_allclose([h.score for h in hits], [e[0] for e in expected], rtol=0, atol=near_tie)
    for hit, (score, lora_id) in zip(hits, expected):
        if hit.lora_id != lora_id:
            assert abs(hit.score - score) < near_tie, (hit, lora_id, score)
    keys = [(-h.score, h.lora_id) for h in hits]
    assert keys == sorted(keys)


@pytest.mark.parametrize("first_pass", PASSES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 300),
    d=st.sampled_from([1, 3, 16, 64]),
    k=st.integers(1, 40),
    max_s=st.one_of(st.none(), st.floats(1.0, 12.0), st.just(math.inf)),
    min_c=st.one_of(st.none(), st.floats(0.0, 0.5), st.just(-math.inf)),
)
def test_search_matches_brute_force(first_pass, seed, n, d, k, max_s, min_c):
    directions, strength, consistency, ids = random_data(seed, n, d, n_dup=n // 4, n_zero=min(n, 2))
    ranker = Ranker.from_table(make_table(directions, strength, consistency, ids), first_pass=first_pass)
    q = np.random.default_rng(seed + 1).standard_normal(d)
    hits = ranker.search(q, k=k, max_strength=max_s, min_consistency=min_c)
    assert_same(hits, brute_force(directions, strength, consistency, ids, q, k, max_s, min_c))
    for h in hits:
        assert max_s is None or h.strength <= max_s
        assert min_c is None or h.consistency >= min_c
        assert -1.0 - 1e-9 <= h.score <= 1.0 + 1e-9


@pytest.mark.parametrize("first_pass", PASSES)
def test_large_index_uses_block_bound_and_stays_exact(first_pass):
    # More rows than the block-maxima threshold, clustered so many candidates crowd the k-th score.
    rng = np.random.default_rng(7)
    n, d = 70_000, 24
    centers = rng.standard_normal((5, d))
    directions = centers[rng.integers(5, size=n)] + 0.05 * rng.standard_normal((n, d))
    directions[:300] = directions[300]  # a block of exact ties
    strength = rng.lognormal(1.5, 0.4, size=n)
    consistency = rng.uniform(0, 0.5, size=n)
    ids = [f"l{i:06d}" for i in rng.permutation(n)]
    ranker = Ranker.from_table(make_table(directions, strength, consistency, ids, pa.float32()), first_pass=first_pass)
    assert ranker.first_pass == first_pass
    directions32 = np.asarray(directions, np.float32)  # the table stores float32
    for q, k, max_s, min_c in [
        (directions[300], 50, None, None),  # the tie block straddles k
        (rng.standard_normal(d), 10, 6.0, 0.1),
        (centers[2], 200, 5.0, None),
    ]:
        hits = ranker.search(q, k=k, max_strength=max_s, min_consistency=min_c)
        assert_same(hits, brute_force(directions32, strength, consistency, ids, q, k, max_s, min_c))


def test_ties_break_by_lora_id():
    d = np.tile([1.0, 2.0, 0.5], (6, 1))
    ids = ["f", "b", "e", "a", "d", "c"]
    ranker = Ranker.from_table(make_table(d, np.ones(6), np.ones(6), ids))
    hits = ranker.search(np.array([0.3, 1.0, 2.0]), k=4)
    assert [h.lora_id for h in hits] == ["a", "b", "c", "d"]
    assert len({h.score for h in hits}) == 1


def test_defaults_and_overrides():
    directions, strength, consistency, ids = random_data(3, 200, 8)
    table = make_table(directions, strength, consistency, ids)
    ranker = Ranker.from_table(table, max_strength=5.0, min_consistency=0.2)
    q = np.random.default_rng(4).standard_normal(8)
    assert_same(ranker.search(q, k=15), brute_force(directions, strength, consistency, ids, q, 15, 5.0, 0.2))
    assert_same(
        ranker.search(q, k=15, max_strength=8.0),
        brute_force(directions, strength, consistency, ids, q, 15, 8.0, 0.2),
    )
    assert_same(
        ranker.search(q, k=15, max_strength=math.inf, min_consistency=-math.inf),
        brute_force(directions, strength, consistency, ids, q, 15),
    )


def test_nan_strength_or_consistency_fails_active_filters_only():
    directions, strength, consistency, ids = random_data(5, 50, 4)
    strength[:5] = np.nan
    consistency[5:10] = np.nan
    ranker = Ranker.from_table(make_table(directions, strength, consistency, ids))
    q = np.ones(4)
    assert len(ranker.search(q, k=100)) == 50
    filtered = ranker.search(q, k=100, max_strength=100.0, min_consistency=0.0)
    assert {h.lora_id for h in filtered} == set(ids[10:])


def test_fewer_allowed_than_k_returns_all_allowed():
    directions, strength, consistency, ids = random_data(6, 30, 5)
    ranker = Ranker.from_table(make_table(directions, strength, consistency, ids))
    q = np.random.default_rng(0).standard_normal(5)
    expected = brute_force(directions, strength, consistency, ids, q, 100, 4.5, 0.25)
    hits = ranker.search(q, k=100, max_strength=4.5, min_consistency=0.25)
    assert 0 < len(hits) < 30
    assert_same(hits, expected)
    assert ranker.search(q, k=3, max_strength=-1.0) == []


def test_zero_directions_score_zero():
    d = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    ranker = Ranker.from_table(make_table(d, np.ones(4), np.ones(4), ["z1", "x", "z0", "y"]))
    hits = ranker.search(np.array([1.0, 0.0]), k=4)
    assert [(h.lora_id, h.score) for h in hits] == [("x", 1.0), ("z0", 0.0), ("z1", 0.0), ("y", -1.0)]


def test_batch_queries_equal_single_queries():
    directions, strength, consistency, ids = random_data(8, 120, 16, n_dup=10)
    ranker = Ranker.from_table(make_table(directions, strength, consistency, ids), min_consistency=0.1)
    queries = np.random.default_rng(9).standard_normal((4, 16)).astype(np.float32)
    batch = ranker.search(queries, k=7)
    assert len(batch) == 4
    for q, hits in zip(queries, batch):
        assert hits == ranker.search(q, k=7)


def test_hit_fields_and_get():
    directions, strength, consistency, ids = random_data(10, 20, 3)
    table = make_table(directions, strength, consistency, ids)
    ranker = Ranker.from_table(table)
    hit = ranker.search(directions[4], k=1)[0]
    assert hit.lora_id == ids[4]
    assert hit.score == pytest.approx(1.0, abs=1e-7)
    assert (hit.strength, hit.consistency) == (strength[4], consistency[4])
    assert hit.name == f"name {ids[4]}" and hit.trigger_words == [f"tw-{ids[4]}"] and hit.description is None
    row = ranker.get(ids[4])
    assert row == conform_signatures(table).slice(4, 1).to_pylist()[0]
    assert row["direction"] == list(directions[4]) and row["source_url"] is None


@pytest.mark.parametrize("first_pass", PASSES)
def test_similar_excludes_itself(first_pass):
    directions, strength, consistency, ids = random_data(11, 150, 12, n_dup=20)
    ranker = Ranker.from_table(make_table(directions, strength, consistency, ids), first_pass=first_pass)
    for i in (0, 17, 99):
        hits = ranker.similar(ids[i], k=12, min_consistency=0.05)
        assert ids[i] not in [h.lora_id for h in hits]
        expected = brute_force(directions, strength, consistency, ids, directions[i], 12, None, 0.05, exclude=ids[i])
        assert_same(hits, expected)


def test_errors_are_clear():
    directions, strength, consistency, ids = random_data(12, 10, 4)
    directions[3] = 0.0
    ranker = Ranker.from_table(make_table(directions, strength, consistency, ids))
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(B, 4\), got \(5,\)"):
        ranker.search(np.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        ranker.search(np.array([1.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="zero norm"):
        ranker.search(np.zeros(4))
    for bad_k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            ranker.search(np.ones(4), k=bad_k)
    with pytest.raises(ValueError, match="max_strength must be a number"):
        ranker.search(np.ones(4), max_strength=float("nan"))
    with pytest.raises(UnknownLora, match="unknown lora_id 'nope'") as info:
        ranker.similar("nope")
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownLora):
        ranker.get("nope")
    with pytest.raises(ValueError, match="zero direction"):
        ranker.similar(ids[3])
    with pytest.raises(ValueError, match="unique"):
        Ranker.from_table(make_table(directions[:2], [1, 1], [1, 1], ["a", "a"]))
    with pytest.raises(ValueError, match="first_pass"):
        Ranker.from_table(make_table(directions, strength, consistency, ids), first_pass="fp16")
    with pytest.raises(ValueError, match="non-finite"):
        bad = directions.copy()
        bad[2, 1] = np.inf
        Ranker.from_table(make_table(bad, strength, consistency, ids))
    with pytest.raises(ValueError, match="empty"):
        Ranker.from_table(SIGNATURE_SCHEMA.empty_table())
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['strength'\]"):
        Ranker.from_table(make_table(directions, strength, consistency, ids).drop_columns(["strength"]))


def test_conform_signatures_fills_and_orders():
    directions, strength, consistency, ids = random_data(13, 3, 2)
    table = make_table(directions, strength, consistency, ids, pa.float32())
    out = conform_signatures(table.select(["strength", "direction", "consistency", "lora_id"]))
    assert out.schema.names == SIGNATURE_SCHEMA.names
    assert out.schema.field("direction").type == pa.list_(pa.float32())
    assert out["name"].null_count == 3 and out["civitai_model_id"].type == pa.int64()
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['extra'\]"):
        conform_signatures(table.append_column("extra", pa.array([1, 2, 3])))
    with pytest.raises(ValueError, match="'rank' has type string"):
        conform_signatures(table.append_column("rank", pa.array(["x", "y", "z"])))


def test_calibrate_thresholds_keeps_paper_fractions():
    rng = np.random.default_rng(14)
    strength = rng.lognormal(1.7, 0.3, size=1000)
    consistency = rng.uniform(0, 0.4, size=1000)
    out = calibrate_thresholds(strength, consistency)
    assert out["source"] == "calibrated" and "paper" in out["rule"]
    kept_s = int(np.sum(strength <= out["max_strength"]))
    kept_c = int(np.sum(consistency >= out["min_consistency"]))
    assert kept_s == round(719 / 740 * 1000) and out["max_strength"] in strength
    assert kept_c == round(536 / 740 * 1000) and out["min_consistency"] in consistency
    small = calibrate_thresholds(strength[:23], consistency[:23])  # 22.35 and 16.66 LoRAs: keep 22 and 17
    assert np.sum(strength[:23] <= small["max_strength"]) == 22 and np.sum(consistency[:23] >= small["min_consistency"]) == 17
    with pytest.raises(ValueError, match="no finite values"):
        calibrate_thresholds([np.nan], [0.1])
