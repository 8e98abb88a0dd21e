"""Standard errors from merged partial sums, checked against numpy on the raw diffs, a naive
leave-one-prompt-out loop, and the coverage of their intervals in seeded simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from carlos_ray.signatures import PartialStats
from carlos_ray.uncertainty import (
    Z95,
    consistency_leave_one_prompt_out,
    consistency_se,
    direction_sq_error,
    seed_consistency_se,
    seed_strength_se,
    standard_errors,
    strength_se,
)
from tests.test_signatures import naive_pair_mean


def _partial_in_chunks(x: np.ndarray, p: np.ndarray, n_prompts: int, chunks: int, rng) -> PartialStats:
    """Build the partial from shuffled chunks merged in a random order (as map-side partials are)."""
    order = rng.permutation(len(x))
    parts = [PartialStats.from_diffs(x[i], p[i], n_prompts) for i in np.array_split(order, chunks) if len(i)]
    rng.shuffle(parts)
    return PartialStats.merge_all(parts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction_and_strength_errors_equal_numpy_on_the_raw_diffs(seed):
    rng = np.random.default_rng(seed)
    n, d, n_prompts = 57, 9, 6
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=d) + rng.normal(size=d) * 2
    x[3] = 0.0  # a zero diff counts as a sample of norm 0
    p = rng.integers(0, n_prompts, size=n)
    part = _partial_in_chunks(x, p, n_prompts, 5, rng)

    expected_sq = float(np.var(x, axis=0, ddof=1).sum()) / n  # tr Cov / N
    assert direction_sq_error(part) == pytest.approx(expected_sq, rel=1e-10)
    norms = np.linalg.norm(x, axis=1)
    assert strength_se(part) == pytest.approx(float(np.std(norms, ddof=1)) / math.sqrt(n), rel=1e-10)
    errs = standard_errors(part)
    assert errs.n == n
    assert errs.direction_rse == pytest.approx(math.sqrt(expected_sq) / np.linalg.norm(x.mean(axis=0)), rel=1e-10)
    assert errs.strength_rse == pytest.approx(errs.strength_se / norms.mean(), rel=1e-12)


def test_nearly_equal_diffs_keep_their_small_spread():
    """Large diffs that differ by 1e-6 of their size: the raw second moment would cancel to noise."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=32) * 1e3
    x = base + rng.normal(size=(40, 32)) * 1e-3
    part = PartialStats.from_diffs(x, np.zeros(40, dtype=np.int64), 1)
    expected = float(np.var(x, axis=0, ddof=1).sum()) / 40
    assert direction_sq_error(part) == pytest.approx(expected, rel=1e-3)


def test_consistency_leave_one_prompt_out_equals_a_naive_loop_and_jackknife_formula():
    rng = np.random.default_rng(3)
    n_prompts, d = 7, 5
    p = np.repeat(np.arange(n_prompts), [3, 1, 4, 2, 0, 3, 5])  # unequal seeds, one prompt without samples
    x = rng.normal(size=(len(p), d)) + np.array([1.0, 0.5, 0, 0, 0])
    x[5] = 0.0  # zero diff: cosine 0 with everything
    part = _partial_in_chunks(x, p, n_prompts, 4, rng)

    have, values = consistency_leave_one_prompt_out(part)
    assert have.tolist() == [0, 1, 2, 3, 5, 6]
    naive = []
    for q in have:
        keep = p != q
        naive.append(naive_pair_mean(x[keep], lambda i, j: True))
    np.testing.assert_allclose(values, naive, rtol=1e-10, atol=1e-12)
    g = len(naive)
    jack = math.sqrt((g - 1) / g * sum((v - np.mean(naive)) ** 2 for v in naive))
    assert consistency_se(part) == pytest.approx(jack, rel=1e-10)


def test_too_few_samples_give_nan_not_a_number_that_looks_certain():
    x = np.array([[1.0, 0.0]])
    part = PartialStats.from_diffs(x, np.array([0]), 2)
    errs = standard_errors(part)
    assert math.isnan(errs.direction_se) and math.isnan(errs.strength_se) and math.isnan(errs.consistency_se)
    two = PartialStats.from_diffs(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]), 2)
    assert math.isnan(consistency_se(two))  # a single prompt: no jackknife over prompts
    assert not math.isnan(strength_se(two))


def test_a_lora_that_changes_nothing_is_known_exactly():
    part = PartialStats.from_diffs(np.zeros((6, 4)), np.arange(6) % 3, 3)
    errs = standard_errors(part)
    assert (errs.direction_se, errs.direction_rse, errs.strength_se, errs.strength_rse) == (0.0, 0.0, 0.0, 0.0)
    assert errs.consistency_se == 0.0


# ---- coverage in seeded simulations ---------------------------------------------------------------------
def _draw(rng, n: int, mu: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Anisotropic, heavy-ish tailed diffs (Student t with 5 dof) around mu."""
    t = rng.standard_t(5, size=(n, len(mu)))
    return mu + t * scale


def test_intervals_cover_the_population_values_at_their_stated_rate():
    """One sample per prompt, prompts drawn at random: the 95% intervals of strength and consistency cover the
    population values (computed by Monte Carlo on 10^6 fresh draws) at least 90% of the time, and the
    direction's stated squared error matches its realised squared error on average."""
    rng = np.random.default_rng(20261201)
    d, n, trials = 12, 48, 400
    mu = rng.normal(size=d) * 0.6
    scale = rng.uniform(0.3, 1.5, size=d)
    big = np.concatenate([_draw(rng, 250_000, mu, scale) for _ in range(4)])
    norms = np.linalg.norm(big, axis=1)
    true_strength = float(norms.mean())
    mean_unit = (big / norms[:, None]).mean(axis=0)
    true_consistency = float(mean_unit @ mean_unit)  # E cos(d1, d2) for independent d1, d2
    del big, norms

    hit_s = hit_c = 0
    sq_ratio = []
    for _ in range(trials):
        x = _draw(rng, n, mu, scale)
        part = PartialStats.from_diffs(x, np.arange(n), n)
        sig, errs = part.finalize(), standard_errors(part)
        hit_s += abs(sig.strength - true_strength) <= Z95 * errs.strength_se
        hit_c += abs(sig.consistency - true_consistency) <= Z95 * errs.consistency_se
        sq_ratio.append(float(np.sum((sig.direction - mu) ** 2)) / errs.direction_se**2)
    cov_s, cov_c = hit_s / trials, hit_c / trials
    assert cov_s >= 0.90, f"strength interval coverage {cov_s:.3f}"
    assert cov_c >= 0.90, f"consistency interval coverage {cov_c:.3f}"
    assert cov_s <= 0.99 and cov_c <= 0.99, f"intervals far wider than stated: {cov_s:.3f}, {cov_c:.3f}"
    assert 0.85 <= float(np.mean(sq_ratio)) <= 1.15, f"direction squared error / stated: {np.mean(sq_ratio):.3f}"


def test_intervals_cover_the_full_protocol_value_under_the_adaptive_order():
    """A finite 'full protocol' of P prompts x S seeds with strong prompt effects; the estimate uses the first
    n samples of the adaptive order (a stratified sweep, one seed per prompt before a second). The full
    protocol's value lies inside the 95% interval at least 90% of the time, across stopping points."""
    from carlos_ray.adaptive import sample_order

    rng = np.random.default_rng(7)
    n_prompts, n_seeds, d = 40, 8, 10
    categories = [f"c{i % 5}" for i in range(n_prompts)]
    order = sample_order(categories, n_seeds, seed=0)
    hits = {"strength": 0, "consistency": 0}
    total = 0
    for _ in range(120):
        mu = rng.normal(size=d)
        prompt_effect = rng.normal(size=(n_prompts, 1, d)) * rng.uniform(0.3, 1.2)
        x = mu + prompt_effect + rng.normal(size=(n_prompts, n_seeds, d)) * rng.uniform(0.3, 1.5)
        full = PartialStats.from_diffs(x.reshape(-1, d), np.repeat(np.arange(n_prompts), n_seeds), n_prompts).finalize()
        for n in (20, 40, 60):
            take = order[:n]
            part = PartialStats.from_diffs(x[take[:, 0], take[:, 1]], take[:, 0], n_prompts, take[:, 1])
            sig, errs = part.finalize(), standard_errors(part, independent_seeds=True)
            assert errs.basis == ("seeds" if n == 60 else "prompts")
            hits["strength"] += abs(sig.strength - full.strength) <= Z95 * errs.strength_se
            hits["consistency"] += abs(sig.consistency - full.consistency) <= Z95 * errs.consistency_se
            total += 1
    for name, h in hits.items():
        assert h / total >= 0.90, f"{name}: the full value is inside the interval {h / total:.3f} of the time"


# ---- seed errors for fixed prompts ----------------------------------------------------------------------
def _fixed_prompt_world(rng, n_prompts: int, d: int):
    """Strong prompt effects (every prompt has its own mean diff) and independent seed noise around them."""
    mu = rng.normal(size=d)
    prompt_mean = mu + rng.normal(size=(n_prompts, d)) * 1.2
    scale = rng.uniform(0.4, 1.0, size=(n_prompts, 1))
    return lambda n_seeds: prompt_mean[:, None, :] + rng.standard_t(6, size=(n_prompts, n_seeds, d)) * scale[:, :, None]


def test_odd_seed_sums_are_the_sums_over_odd_seed_samples():
    rng = np.random.default_rng(11)
    n_prompts, d = 5, 4
    p = rng.integers(0, n_prompts, 60)
    s = rng.integers(0, 7, 60)
    x = rng.normal(size=(60, d))
    x[4] = 0.0
    part = _partial_in_chunks(x, p, n_prompts, 3, rng)  # without seed indices: every sample is even
    assert not part.odd_count.any() and not part.odd_unit_sum.any()
    order = rng.permutation(60)
    parts = [PartialStats.from_diffs(x[i], p[i], n_prompts, s[i]) for i in np.array_split(order, 4)]
    part = PartialStats.merge_all(parts)
    for q in range(n_prompts):
        odd = (p == q) & (s % 2 == 1)
        norms = np.linalg.norm(x[odd], axis=1)
        units = np.array([v / nv if nv else v for v, nv in zip(x[odd], norms)]).reshape(-1, d)
        assert part.odd_count[q] == odd.sum()
        assert part.odd_norm_sum[q] == pytest.approx(norms.sum(), rel=1e-12)
        np.testing.assert_allclose(part.odd_unit_sum[q], units.sum(axis=0), rtol=1e-12, atol=1e-14)
    back = PartialStats.from_row(part.to_row())
    np.testing.assert_array_equal(back.odd_unit_sum, part.odd_unit_sum)
    with pytest.raises(ValueError, match="seed_idx must be >= 0"):
        PartialStats.from_diffs(x[:2], p[:2], n_prompts, [0, -1])
    with pytest.raises(ValueError, match="odd_count <= prompt_count"):
        PartialStats.from_row({**part.to_row(), "odd_count": (part.prompt_count + 1).tolist()})


def test_seed_errors_match_the_seed_to_seed_spread_of_a_fixed_prompt_set():
    """The same 16 prompts, 300 independent draws of 4 seeds each: the stated seed errors of strength and
    consistency match the standard deviation of the estimates across draws (a Monte Carlo, not a formula), while
    the population errors (prompt jackknife) are several times larger: they count the prompts' spread, which a
    fixed prompt set does not have."""
    rng = np.random.default_rng(4)
    n_prompts, n_seeds, d = 16, 4, 8
    draw = _fixed_prompt_world(rng, n_prompts, d)
    p = np.repeat(np.arange(n_prompts), n_seeds)
    s = np.tile(np.arange(n_seeds), n_prompts)
    est_s, est_c, se_s, se_c, pop_c = [], [], [], [], []
    for _ in range(300):
        x = draw(n_seeds).reshape(-1, d)
        part = PartialStats.from_diffs(x, p, n_prompts, s)
        sig, errs = part.finalize(), standard_errors(part, independent_seeds=True)
        assert errs.basis == "seeds"
        est_s.append(sig.strength)
        est_c.append(sig.consistency)
        se_s.append(errs.strength_se)
        se_c.append(errs.consistency_se)
        pop_c.append(consistency_se(part))
    assert est_c[-1] == pytest.approx(naive_pair_mean(x, lambda i, j: True), rel=1e-9)
    sd_s, sd_c = float(np.std(est_s, ddof=1)), float(np.std(est_c, ddof=1))
    rms_s, rms_c = math.sqrt(np.mean(np.square(se_s))), math.sqrt(np.mean(np.square(se_c)))
    assert 0.8 <= rms_s / sd_s <= 1.25, (rms_s, sd_s)
    assert 0.8 <= rms_c / sd_c <= 1.25, (rms_c, sd_c)
    assert float(np.mean(pop_c)) > 2 * sd_c
    assert seed_strength_se(part) == errs.strength_se and seed_consistency_se(part) == errs.consistency_se


def test_seed_errors_need_every_prompt_and_three_split_prompts_and_independent_seeds():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(12, 3)) + 1.0
    p = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    s = np.repeat([0, 1, 2], 4)
    full = PartialStats.from_diffs(x, p, 4, s)
    assert standard_errors(full, independent_seeds=True).basis == "seeds"
    assert standard_errors(full).basis == "prompts"  # shared seeds: never the split errors
    assert standard_errors(full).consistency_se == consistency_se(full)
    two_split = PartialStats.from_diffs(x[:6], p[:6], 4, s[:6])  # only prompts 0 and 1 have an odd seed
    assert standard_errors(two_split, independent_seeds=True).basis == "prompts"
    missing = PartialStats.from_diffs(x[p != 3], p[p != 3], 4, s[p != 3])  # prompt 3 never sampled
    assert standard_errors(missing, independent_seeds=True).basis == "prompts"
    assert math.isnan(seed_consistency_se(missing)) and math.isnan(seed_strength_se(missing))


# ---- what users see -------------------------------------------------------------------------------------
def test_estimates_are_shown_with_their_95_percent_half_width():
    from carlos_ray.uncertainty import format_estimate

    assert format_estimate(4.1234, 0.1) == "4.12 ± 0.20"  # 1.96 * 0.1 = 0.196: two significant digits
    assert format_estimate(0.043217, 0.0021) == "0.0432 ± 0.0041"
    assert format_estimate(123.4, 7.0) == "123 ± 14"
    assert format_estimate(0.0, 0.0) == "0 ± 0"
    assert format_estimate(2.5, None) == "2.5" and format_estimate(2.5, math.nan) == "2.5"
    assert format_estimate(None, 0.1) == "" and format_estimate(math.nan, 0.1) == "NaN"


def test_the_lora_endpoint_states_the_intervals_of_the_stored_errors(tmp_path):
    import pyarrow as pa

    from carlos_ray.ranker import Ranker
    from carlos_ray.schema import SIGNATURE_SCHEMA, conform_signatures
    from carlos_ray.serving import FixedIndex, RankerService
    from carlos_ray.store import Index

    rows = [{"lora_id": "a", "name": "A", "direction": [1.0, 0.0], "strength": 4.1234, "consistency": 0.5, "n": 140,
             "strength_se": 0.1, "consistency_se": 0.01, "direction_rse": 0.05, "n_rounds": 2},
            {"lora_id": "b", "name": "B", "direction": [0.0, 1.0], "strength": 1.0, "consistency": 0.2}]  # no errors
    table = conform_signatures(pa.Table.from_pylist(rows, schema=SIGNATURE_SCHEMA))
    index = Index(str(tmp_path / "idx"))
    index.init({"config_hash": "h"})
    service = RankerService(FixedIndex(Ranker.from_table(table), index.read_manifest()))
    a = service.get("a")
    assert a["signature"]["strength_se"] == 0.1 and a["signature"]["n"] == 140
    assert a["intervals"]["strength"] == "4.12 ± 0.20" and a["intervals"]["consistency"] == "0.500 ± 0.020"
    assert a["intervals"]["samples"] == 140 and a["intervals"]["rounds"] == 2 and a["intervals"]["confidence"] == 0.95
    assert a["intervals"]["strength_half_width"] == pytest.approx(Z95 * 0.1)
    b = service.get("b")
    assert b["intervals"]["strength"] == "1" and b["intervals"]["strength_half_width"] is None


# ---- the full protocol's pair mix ----------------------------------------------------------------------
def _naive_pair_mix(x, p, n_prompts, full_seeds):
    """(1 − λ)·mean cosine over pairs of different prompts + λ·mean over pairs of one prompt, by a pair loop."""
    def cos(a, b):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    cross, within = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j:
                (within if p[i] == p[j] else cross).append(cos(x[i], x[j]))
    lam = (full_seeds - 1) / (n_prompts * full_seeds - 1)
    return (1 - lam) * np.mean(cross) + lam * np.mean(within) if within else naive_pair_mean(x, lambda i, j: True)


def test_pair_mix_consistency_equals_a_naive_loop_and_the_plain_mean_on_a_full_protocol():
    from carlos_ray.uncertainty import consistency_leave_one_prompt_out

    rng = np.random.default_rng(11)
    n_prompts, s, d = 6, 3, 5
    x = rng.normal(size=(n_prompts, s, d)) + rng.normal(size=(n_prompts, 1, d)) * 2 + 1.0
    x[2, 1] = 0.0  # a zero diff: cosine 0 with everything
    p_all = np.repeat(np.arange(n_prompts), s)
    full = PartialStats.from_diffs(x.reshape(-1, d), p_all, n_prompts)
    # on the complete protocol the pair mix is the plain all-pairs mean
    assert full.finalize(full_seeds=s).consistency == pytest.approx(full.finalize().consistency, rel=1e-12)
    # a prefix: every prompt once, two prompts twice (within pairs exist), one not at all
    take = [(q, 0) for q in range(n_prompts - 1)] + [(0, 1), (2, 1), (2, 2)]
    xs = np.array([x[q, j] for q, j in take])
    ps = np.array([q for q, _ in take])
    part = PartialStats.from_diffs(xs, ps, n_prompts, np.array([j for _, j in take]))
    got = part.finalize(full_seeds=s).consistency
    assert got == pytest.approx(_naive_pair_mix(xs, ps, n_prompts, s), rel=1e-10)
    assert got != pytest.approx(part.finalize().consistency, rel=1e-6)  # it does differ from the sample's own mean
    # one seed per prompt (no within pair yet): the sample's own mean
    first = PartialStats.from_diffs(xs[:5], ps[:5], n_prompts)
    assert first.finalize(full_seeds=s).consistency == pytest.approx(first.finalize().consistency, rel=1e-12)
    # the jackknife's leave-one-prompt-out values are the pair mix of the rest, over |P| − 1 prompts
    have, values = consistency_leave_one_prompt_out(part, full_seeds=s)
    naive = [_naive_pair_mix(xs[ps != q], ps[ps != q], n_prompts - 1, s) for q in have]
    np.testing.assert_allclose(values, naive, rtol=1e-10, atol=1e-12)
    g = len(naive)
    jack = math.sqrt((g - 1) / g * sum((v - np.mean(naive)) ** 2 for v in naive))
    assert standard_errors(part, full_seeds=s).consistency_se == pytest.approx(jack, rel=1e-10)


def test_pair_mix_intervals_cover_a_full_protocol_whose_seeds_are_alike():
    """Prompts whose seeds agree far more than prompts do (as on the micro zoo): a prefix of the adaptive order
    has fewer within-prompt pairs than the full protocol, so its own mean is biased low; the pair-mix estimate
    is not, and its jackknife interval covers the full value >= 90% of the time."""
    from carlos_ray.adaptive import sample_order

    rng = np.random.default_rng(5)
    n_prompts, n_seeds, d = 24, 8, 12
    order = sample_order([f"c{i % 4}" for i in range(n_prompts)], n_seeds, seed=0)
    err = {"pair mix": [], "own mean": []}
    hits = 0
    for _ in range(60):
        mu = rng.normal(size=d) * 0.6
        x = mu + rng.normal(size=(n_prompts, 1, d)) + rng.normal(size=(n_prompts, n_seeds, d)) * 0.35
        full = PartialStats.from_diffs(x.reshape(-1, d), np.repeat(np.arange(n_prompts), n_seeds), n_prompts).finalize()
        for n in (30, 36, 48):
            take = order[:n]
            part = PartialStats.from_diffs(x[take[:, 0], take[:, 1]], take[:, 0], n_prompts, take[:, 1])
            mix = part.finalize(full_seeds=n_seeds).consistency
            hits += abs(mix - full.consistency) <= Z95 * standard_errors(part, full_seeds=n_seeds).consistency_se
            err["pair mix"].append(full.consistency - mix)
            err["own mean"].append(full.consistency - part.finalize().consistency)
    assert hits / len(err["pair mix"]) >= 0.9, hits
    own_bias, mix_bias = np.mean(err["own mean"]), np.mean(err["pair mix"])
    assert own_bias > 0 and abs(mix_bias) < own_bias / 2, (own_bias, mix_bias)
