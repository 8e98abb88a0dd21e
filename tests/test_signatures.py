"""PartialStats / Signature checked against independent naive computations."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from carlos_ray.signatures import ROW_KEYS, PartialStats, Signature

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-9


# ----------------------------------------------------------------------------- naive references


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = math.sqrt(float(np.dot(a, a))), math.sqrt(float(np.dot(b, b)))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b)) / (na * nb)


def naive_pair_mean(x: np.ndarray, keep) -> float:
    """Mean cosine over pairs i < j for which keep(i, j) is true (NaN if none)."""
    total, count = 0.0, 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if keep(i, j):
                total += _cos(x[i], x[j])
                count += 1
    return total / count if count else float("nan")


def close(a, b, tol: float = TOL) -> bool:
    return bool(np.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))


def same_bits(a: PartialStats, b: PartialStats) -> bool:
    if (a.d, a.n_prompts, a.count) != (b.d, b.n_prompts, b.count):
        return False
    for name in ("sum_norm", "norm_m2"):
        if np.float64(getattr(a, name)).view(np.int64) != np.float64(getattr(b, name)).view(np.int64):
            return False
    for name in ("sum_diff", "prompt_unit_sum", "prompt_norm_sum", "prompt_count", "prompt_nonzero"):
        x, y = getattr(a, name), getattr(b, name)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def assert_signatures_close(s: Signature, t: Signature, tol: float = 1e-12) -> None:
    assert (s.n, s.n_nonzero, s.category_names) == (t.n, t.n_nonzero, t.category_names)
    np.testing.assert_array_equal(s.prompt_count, t.prompt_count)
    for name in (
        "direction", "strength", "consistency", "strength_std", "prompt_seed_consistency",
        "prompt_strength", "category_strength", "category_within", "category_cross",
    ):
        assert close(getattr(s, name), getattr(t, name), tol), name


# ----------------------------------------------------------------------------- strategies


@st.composite
def batches(draw, min_n: int = 2, max_n: int = 36):
    """(diffs as float64 and in a random input dtype, prompt_idx, n_prompts, categories)."""
    n_prompts = draw(st.integers(1, 6))
    d = draw(st.integers(1, 8))
    n = draw(st.integers(min_n, max_n))
    x = draw(
        hnp.arrays(np.float64, (n, d), elements=st.floats(-50, 50, allow_subnormal=False, width=32))
    )
    x[np.abs(x) < 1e-3] = 0.0
    zero_rows = draw(hnp.arrays(np.bool_, n, elements=st.booleans()))
    if draw(st.booleans()):
        x[zero_rows] = 0.0
    prompt_idx = draw(hnp.arrays(np.int64, n, elements=st.integers(0, n_prompts - 1)))
    if draw(st.booleans()):
        prompt_idx = np.sort(prompt_idx)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x_in = x.astype(dtype)
    n_cats = draw(st.integers(1, 3))
    categories = [f"c{draw(st.integers(0, n_cats - 1))}" for _ in range(n_prompts)]
    return x_in.astype(np.float64), x_in, prompt_idx, n_prompts, categories


# ----------------------------------------------------------------------------- exactness vs naive


@SETTINGS
@given(batches())
def test_matches_naive_loops(batch):
    x, x_in, p, n_prompts, cats = batch
    sig = PartialStats.from_diffs(x_in, p, n_prompts).finalize(cats)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))

    assert sig.n == len(x) and sig.n_nonzero == int((norms > 0).sum())
    assert close(sig.direction, x.mean(axis=0))
    assert close(sig.strength, norms.mean())
    assert close(sig.strength_std, norms.std())
    assert close(sig.consistency, naive_pair_mean(x, lambda i, j: True))

    for q in range(n_prompts):
        members = p == q
        m = int(members.sum())
        assert sig.prompt_count[q] == m
        assert close(sig.prompt_strength[q], norms[members].mean() if m else np.nan)
        expected = naive_pair_mean(x[members], lambda i, j: True)
        assert close(sig.prompt_seed_consistency[q], expected)

    cat_of_sample = np.array([cats[q] for q in p])
    assert sig.category_names == list(dict.fromkeys(cats))
    for k, name in enumerate(sig.category_names):
        inside = cat_of_sample == name
        strength = norms[inside].mean() if inside.any() else np.nan
        assert close(sig.category_strength[k], strength)
        within = naive_pair_mean(x, lambda i, j: inside[i] and inside[j])
        cross = naive_pair_mean(x, lambda i, j: inside[i] != inside[j])
        assert close(sig.category_within[k], within), (k, sig.category_within[k], within)
        assert close(sig.category_cross[k], cross), (k, sig.category_cross[k], cross)


@SETTINGS
@given(batches(), st.randoms(use_true_random=False))
def test_merge_of_any_partition_in_any_order_equals_all_at_once(batch, rnd):
    _, x_in, p, n_prompts, cats = batch
    whole = PartialStats.from_diffs(x_in, p, n_prompts)
    n = len(x_in)
    perm = list(range(n))
    rnd.shuffle(perm)
    cuts = sorted(rnd.sample(range(1, n), rnd.randint(0, min(5, n - 1))))
    pieces = np.split(np.array(perm), cuts)
    parts = [PartialStats.from_diffs(x_in[idx], p[idx], n_prompts) for idx in pieces]
    parts.append(PartialStats.empty(whole.d, n_prompts))  # the identity may appear anywhere
    rnd.shuffle(parts)
    # random merge tree, not just a left fold
    while len(parts) > 1:
        i = rnd.randrange(len(parts) - 1)
        parts[i : i + 2] = [parts[i].merge(parts[i + 1])]
    merged = parts[0]
    assert merged.count == whole.count
    np.testing.assert_array_equal(merged.prompt_count, whole.prompt_count)
    np.testing.assert_array_equal(merged.prompt_nonzero, whole.prompt_nonzero)
    assert_signatures_close(merged.finalize(cats), whole.finalize(cats))
    rnd.shuffle(pieces)
    listed = PartialStats.merge_all([PartialStats.from_diffs(x_in[i], p[i], n_prompts) for i in pieces])
    assert_signatures_close(listed.finalize(cats), whole.finalize(cats))


@SETTINGS
@given(batches(), batches())
def test_merge_is_commutative_bitwise(b1, b2):
    # first column only so the shapes agree: d = 1, n_prompts = 6 covers every prompt id
    a = PartialStats.from_diffs(b1[1][:, :1], b1[2], 6)
    b = PartialStats.from_diffs(b2[1][:, :1], b2[2], 6)
    assert same_bits(a.merge(b), b.merge(a))


def test_multi_chunk_unsorted_batch_matches_dense_float64():
    """A batch larger than one chunk, prompts shuffled, against an N x N float64 computation."""
    rng = np.random.default_rng(7)
    n_prompts, seeds, d = 40, 60, 600  # 2400 rows of 600 floats: several chunks
    p = np.repeat(np.arange(n_prompts), seeds)
    rng.shuffle(p)
    base = rng.standard_normal((n_prompts, d))
    shared = rng.standard_normal(d)
    x32 = (shared + base[p] + 2.0 * rng.standard_normal((len(p), d))).astype(np.float32)
    x32[::97] = 0.0
    x = x32.astype(np.float64)
    sig = PartialStats.from_diffs(x32, p, n_prompts).finalize()

    norms = np.linalg.norm(x, axis=1)
    u = np.divide(x, norms[:, None], out=np.zeros_like(x), where=norms[:, None] > 0)
    cos = u @ u.T
    n = len(x)
    assert close(sig.consistency, cos[np.triu_indices(n, 1)].mean())
    assert close(sig.direction, x.mean(axis=0))
    assert close(sig.strength, norms.mean())
    for q in (0, 13, 39):
        idx = np.flatnonzero(p == q)
        block = cos[np.ix_(idx, idx)]
        assert close(sig.prompt_seed_consistency[q], block[np.triu_indices(len(idx), 1)].mean())
    assert 0.05 < sig.consistency < sig.prompt_seed_consistency.min()  # non-trivial structure


@pytest.mark.parametrize("layout", ["prompt_major", "seed_major", "shuffled", "one_prompt", "mixed"])
def test_per_prompt_sums_for_every_row_layout(layout):
    """Seed-major rows (many short runs) and prompt-major rows (few long runs) group alike."""
    rng = np.random.default_rng(11)
    n_prompts, seeds, d = 7, 5, 4
    p = {
        "prompt_major": np.repeat(np.arange(n_prompts), seeds),
        "seed_major": np.tile(np.arange(n_prompts), seeds),
        "shuffled": rng.permutation(np.repeat(np.arange(n_prompts), seeds)),
        "one_prompt": np.full(n_prompts * seeds, 3),
        "mixed": np.concatenate([np.full(20, 2), np.arange(n_prompts), [6, 6, 0, 1, 5, 4, 4, 4]]),
    }[layout]
    x = rng.standard_normal((len(p), d))
    x[::6] = 0.0
    stats = PartialStats.from_diffs(x, p, n_prompts)
    for q in range(n_prompts):
        expected = np.zeros(d)
        for row, pq in zip(x, p):
            nrm = math.sqrt(float(row @ row))
            if pq == q and nrm > 0:
                expected += row / nrm
        assert close(stats.prompt_unit_sum[q], expected, 1e-12)
        assert stats.prompt_count[q] == int((p == q).sum())
        assert stats.prompt_nonzero[q] == int(((p == q) & x.any(axis=1)).sum())


# ----------------------------------------------------------------------------- invariances


@SETTINGS
@given(batches(), st.floats(1e-3, 1e3))
def test_scale_invariance(batch, c):
    x, _, p, n_prompts, cats = batch
    s1 = PartialStats.from_diffs(x, p, n_prompts).finalize(cats)
    s2 = PartialStats.from_diffs(x * c, p, n_prompts).finalize(cats)
    assert math.isclose(s2.strength, s1.strength * c, rel_tol=1e-12, abs_tol=1e-300)
    assert close(s2.direction, s1.direction * c, 1e-10 * max(c, 1))
    assert close(s2.consistency, s1.consistency, 1e-12)
    assert close(s2.prompt_seed_consistency, s1.prompt_seed_consistency, 1e-12)
    assert close(s2.category_within, s1.category_within, 1e-12)
    assert close(s2.category_cross, s1.category_cross, 1e-12)


@pytest.mark.parametrize("n", [2, 3, 17])
def test_identical_diffs_have_consistency_one(n):
    v = np.array([0.3, -1.5, 2.0, 0.0, 7.25])
    sig = PartialStats.from_diffs(np.tile(v, (n, 1)), np.zeros(n, dtype=int), 2).finalize(["a", "b"])
    assert sig.consistency == pytest.approx(1.0, abs=1e-14)
    assert sig.prompt_seed_consistency[0] == pytest.approx(1.0, abs=1e-14)
    assert np.isnan(sig.prompt_seed_consistency[1]) and np.isnan(sig.prompt_strength[1])
    assert sig.category_within[0] == pytest.approx(1.0, abs=1e-14)
    assert np.isnan(sig.category_within[1]) and np.isnan(sig.category_cross[0])
    assert sig.strength == pytest.approx(np.linalg.norm(v), rel=1e-15)
    assert sig.strength_std == pytest.approx(0.0, abs=1e-12)


def test_strength_std_survives_nearly_equal_norms_and_merging():
    rng = np.random.default_rng(5)
    norms = 1e4 + 1e-5 * rng.standard_normal(64)
    x = np.zeros((64, 3))
    x[:, 1] = norms
    p = np.arange(64) % 4
    parts = [PartialStats.from_diffs(x[i::3], p[i::3], 4) for i in range(3)]
    sig = PartialStats.merge_all(parts).finalize()
    # a raw sum of squared norms would leave an error of about sqrt(eps) * 1e4 ~ 1e-4 here
    assert sig.strength_std == pytest.approx(norms.std(), rel=1e-6)


def test_opposite_pair_has_consistency_minus_one():
    v = np.array([[1.0, 2.0, -3.0], [-1.0, -2.0, 3.0]], dtype=np.float32)
    sig = PartialStats.from_diffs(v, [0, 1], 2).finalize(["a", "b"])
    assert sig.consistency == pytest.approx(-1.0, abs=1e-14)
    np.testing.assert_allclose(sig.direction, 0.0, atol=0)
    np.testing.assert_allclose(sig.category_cross, [-1.0, -1.0], atol=1e-14)


def test_zero_diffs_count_as_cosine_zero():
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    sig = PartialStats.from_diffs(x, [0, 0, 0, 1], 2).finalize()
    # 6 pairs, only (0, 1) has cosine 1
    assert sig.consistency == pytest.approx(1 / 6, abs=1e-15)
    assert sig.n_nonzero == 2
    assert sig.prompt_seed_consistency[0] == pytest.approx(1 / 3, abs=1e-15)
    assert np.isnan(sig.prompt_seed_consistency[1]) and sig.prompt_strength[1] == 0.0


def test_tiny_nonzero_diff_is_not_treated_as_zero():
    x = np.array([[1e-170, 1e-170], [3.0, 3.0]])
    sig = PartialStats.from_diffs(x, [0, 0], 1).finalize()
    assert sig.n_nonzero == 2
    assert sig.consistency == pytest.approx(1.0, abs=1e-14)


def test_signature_is_frozen_and_arrays_read_only():
    sig = PartialStats.from_diffs(np.eye(3), [0, 1, 2], 3).finalize()
    with pytest.raises(AttributeError):
        sig.strength = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        sig.direction[0] = 1.0
    assert sig.category_names == [] and sig.category_within.shape == (0,)


# ----------------------------------------------------------------------------- serialization


@SETTINGS
@given(batches(min_n=0))
def test_arrow_row_round_trip_is_bitwise(batch):
    _, x_in, p, n_prompts, _ = batch
    stats = PartialStats.from_diffs(x_in, p, n_prompts)
    row = stats.to_row()
    assert set(row) == set(ROW_KEYS)
    table = pa.Table.from_pylist([row, row])
    for field in table.schema:
        assert field.type in (pa.int64(), pa.float64(), pa.list_(pa.int64()), pa.list_(pa.float64())), field
    back = PartialStats.from_row(table.to_pylist()[1])
    assert same_bits(back, stats)


def test_parquet_round_trip_is_bitwise(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 16)).astype(np.float32) * 1e-3
    x[4] = -0.0
    stats = PartialStats.from_diffs(x, rng.integers(0, 5, 50), 5)
    row = {"lora_id": "abc", **stats.to_row()}  # extra columns are ignored by from_row
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "s.parquet")
    back = PartialStats.from_row(pq.read_table(tmp_path / "s.parquet").to_pylist()[0])
    assert same_bits(back, stats)


# ----------------------------------------------------------------------------- errors


def _ok_batch():
    return np.ones((4, 3), dtype=np.float32), np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    "diffs, prompt_idx, n_prompts, match",
    [
        (np.ones(3), [0, 0, 0], 2, "2-D"),
        (np.ones((4, 3)), [0, 1, 0], 2, r"shape \(4,\)"),
        (np.ones((4, 3)), [[0, 1, 0, 1]], 2, r"shape \(4,\)"),
        (np.ones((4, 0)), [0, 1, 0, 1], 2, "at least one column"),
        (np.ones((4, 3)), [0, 1, 2, 1], 2, r"found 2, valid prompt ids are 0\.\.1"),
        (np.ones((4, 3)), [0, -1, 0, 1], 2, "found -1"),
        (np.ones((4, 3)), [0.0, 1.0, 0.0, 1.0], 2, "integers"),
        (np.ones((4, 3)), [0, 1, 0, 1], 0, "n_prompts must be >= 1"),
        (np.ones((4, 3)), [0, 1, 0, 1], 2.0, "n_prompts must be a positive int"),
        (np.ones((4, 3), dtype=complex), [0, 1, 0, 1], 2, "real .float or integer. dtype"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), [0, 0], 1, "non-finite.*row 0"),
        (np.array([[1.0, 1.0], [np.inf, 1.0]]), [0, 0], 1, "non-finite.*row 1"),
        (np.array([[1.0, 1.0], [1e200, 1.0]]), [0, 0], 1, "row 1 is too large"),
    ],
)
def test_from_diffs_rejects_bad_input(diffs, prompt_idx, n_prompts, match):
    with pytest.raises(ValueError, match=match):
        PartialStats.from_diffs(diffs, prompt_idx, n_prompts)


@pytest.mark.parametrize("n", [0, 1])
def test_finalize_needs_two_samples(n):
    stats = PartialStats.from_diffs(np.ones((n, 3)), np.zeros(n, dtype=int), 2)
    with pytest.raises(ValueError, match=f"at least 2 diff samples.*got {n}"):
        stats.finalize()


def test_finalize_rejects_bad_categories():
    stats = PartialStats.from_diffs(*_ok_batch(), 2)
    with pytest.raises(ValueError, match="n_prompts=2 names, got length 3"):
        stats.finalize(["a", "b", "c"])
    with pytest.raises(ValueError, match="got a str"):
        stats.finalize("ab")
    with pytest.raises(ValueError, match="must be str"):
        stats.finalize(["a", 1])  # type: ignore[list-item]


def test_merge_rejects_mismatched_stats():
    a = PartialStats.from_diffs(*_ok_batch(), 2)
    with pytest.raises(ValueError, match=r"d=3, n_prompts=2\) vs \(d=3, n_prompts=3"):
        a.merge(PartialStats.from_diffs(*_ok_batch(), 3))
    with pytest.raises(ValueError, match=r"d=3.*d=4"):
        a.merge(PartialStats.empty(4, 2))
    with pytest.raises(ValueError, match="empty sequence"):
        PartialStats.merge_all([])
    with pytest.raises(ValueError, match="only merge PartialStats"):
        a.merge({"count": 1})  # type: ignore[arg-type]


def test_from_row_rejects_bad_rows():
    row = PartialStats.from_diffs(*_ok_batch(), 2).to_row()
    with pytest.raises(ValueError, match=r"missing keys \['prompt_count'\]"):
        PartialStats.from_row({k: v for k, v in row.items() if k != "prompt_count"})
    with pytest.raises(ValueError, match="sum_diff must be a flat list of length 3"):
        PartialStats.from_row({**row, "sum_diff": [1.0, 2.0]})
    with pytest.raises(ValueError, match="prompt_unit_sum contains non-finite"):
        PartialStats.from_row({**row, "prompt_unit_sum": [float("nan")] * 6})
    with pytest.raises(ValueError, match=r"sum of prompt_count \(4\) does not equal count \(5\)"):
        PartialStats.from_row({**row, "count": 5})
    with pytest.raises(ValueError, match="norm_m2 must be >= 0"):
        PartialStats.from_row({**row, "norm_m2": -1.0})
    with pytest.raises(ValueError, match="prompt_nonzero <= prompt_count"):
        PartialStats.from_row({**row, "prompt_nonzero": [3, 2]})
