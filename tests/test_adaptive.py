"""Adaptive sampling end to end: each signature equals the statistics of exactly the samples its rounds took,
its stored errors equal numpy on those samples, and the stopping rule stopped it at the first round it allowed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from carlos_ray.adaptive import RoundPlan, round_size, sample_order
from carlos_ray.config import Config, ConfigError
from carlos_ray.store import Index
from tests.test_signatures import naive_pair_mean
from tests.test_uncertainty import _naive_pair_mix


# ---- schedule and config ---------------------------------------------------------------------------------
def test_sample_order_is_seed_major_stratified_and_deterministic():
    cats = ["a"] * 6 + ["b"] * 3 + ["c"] * 3
    order = sample_order(cats, 3, seed=1)
    assert order.shape == (36, 2)
    assert len({tuple(x) for x in order.tolist()}) == 36  # every (prompt, seed) exactly once
    assert order[:12, 1].tolist() == [0] * 12 and order[12:24, 1].tolist() == [1] * 12  # a sweep per seed
    first = [cats[p] for p in order[:6, 0]]
    assert sorted(first) == ["a", "a", "b", "b", "c", "c"]  # every prefix of a round per category is balanced
    np.testing.assert_array_equal(order, sample_order(cats, 3, seed=1))
    assert not np.array_equal(order, sample_order(cats, 3, seed=2))
    assert round_size(280, 10, 0.25) == 70 and round_size(5, 5, 0.2) == 5 and round_size(12, 3, 1.0) == 12
    plan = RoundPlan.build(cats, 3, 0.25, 0)
    assert plan.size == 3 and plan.n_rounds == 12 and plan.used(20) == 36
    with pytest.raises(ValueError, match="round 12 out of range"):
        plan.samples(12)


def test_adaptive_config_is_typed_and_off_by_default_in_the_paper_profile():
    assert Config.from_file("conf/paper.yaml").sampling.adaptive.enabled is False
    with pytest.raises(ConfigError, match="unknown key `sampling.adaptive.max_strength_se`"):
        Config.from_dict({"sampling": {"adaptive": {"max_strength_se": 0.1}}})
    with pytest.raises(ConfigError, match="round_fraction"):
        Config.from_dict({"sampling": {"adaptive": {"round_fraction": 0}}})
    off, on = Config(), Config.from_dict({"sampling": {"adaptive": {"enabled": True}}})
    assert off.config_hash("h") != on.config_hash("h")  # adaptive signatures go to another index
    assert off.base_key("h") == on.base_key("h")  # but share the base images


# ---- end to end ------------------------------------------------------------------------------------------
def _all_diffs(cfg, jobs, plan) -> dict[str, np.ndarray]:
    """(n_prompts, n_seeds, d) diffs of every sample of every LoRA, by a plain loop over the same models."""
    import torch

    from carlos_ray.models import create_encoder, create_generator

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.resources.generate.torch_threads or threads)
    try:
        enc = create_encoder(cfg.encoder)
        gen = create_generator(cfg.generator, enc.image_size)

        def embed(job):
            rows = plan.rows([job])
            gen.activate(job.lora_id if job else None, job.path if job else None)
            imgs, _ = gen.generate([r["prompt"] for r in rows], [r["seed"] for r in rows])
            emb = enc.encode_images(imgs).astype(np.float64)
            return emb.reshape(len(plan.prompts), len(plan.seeds), -1)

        base = embed(None)
        return {j.lora_id: embed(j) - base for j in jobs}
    finally:
        torch.set_num_threads(threads)


def _numpy_errors(x: np.ndarray, prompts: np.ndarray, seeds: np.ndarray, n_prompts: int,
                  independent: bool = True, full_seeds: int | None = None) -> tuple[float, float, float]:
    """(direction rse, strength rse, consistency se) straight from the diffs, with a loop per prompt: population
    errors (consistency: a naive delete-one-prompt jackknife) until every prompt has a sample and at least 3 have
    both an even and an odd seed; then, if no two prompts share a seed (`independent`), seed errors from the two
    halves of each prompt (uncertainty's module doc)."""
    n = len(x)
    mean = x.mean(axis=0)
    d_rse = math.sqrt(np.var(x, axis=0, ddof=1).sum() / n) / np.linalg.norm(mean) if np.any(mean) else 0.0
    norms = np.linalg.norm(x, axis=1)
    units = np.array([v / nv if nv > 0 else v * 0 for v, nv in zip(x, norms)])
    total = units.sum(axis=0)
    split = [p for p in range(n_prompts) if len(set(seeds[prompts == p] % 2)) == 2]
    if independent and len(set(prompts.tolist())) == n_prompts and len(split) >= 3:
        v_norm, v_cons = {}, {}
        for p in split:
            even, odd = (prompts == p) & (seeds % 2 == 0), (prompts == p) & (seeds % 2 == 1)
            k = 1 / even.sum() + 1 / odd.sum()
            v_norm[p] = (norms[even].mean() - norms[odd].mean()) ** 2 / k
            v_cons[p] = ((units[even] @ total).mean() - (units[odd] @ total).mean()) ** 2 / k
        m = {p: int((prompts == p).sum()) for p in range(n_prompts)}
        s_var = sum(m[p] * v_norm.get(p, np.mean(list(v_norm.values()))) for p in m) / n**2
        c_var = (2 / (n * (n - 1))) ** 2 * sum(m[p] * v_cons.get(p, np.mean(list(v_cons.values()))) for p in m)
        s_rse = math.sqrt(s_var) / norms.mean() if norms.mean() > 0 else 0.0
        return d_rse, s_rse, math.sqrt(c_var)
    s_rse = np.std(norms, ddof=1) / math.sqrt(n) / norms.mean() if norms.mean() > 0 else 0.0
    if full_seeds is None:
        loo = [naive_pair_mean(x[prompts != p], lambda i, j: True) for p in np.unique(prompts)]
    else:  # the jackknife of the full protocol's pair mix, over the protocol without the prompt
        loo = [_naive_pair_mix(x[prompts != p], prompts[prompts != p], n_prompts - 1, full_seeds) for p in np.unique(prompts)]
    g = len(loo)
    c_se = math.sqrt((g - 1) / g * sum((v - np.mean(loo)) ** 2 for v in loo))
    return d_rse, s_rse, c_se


def test_adaptive_signatures_are_the_statistics_of_the_samples_their_rounds_took(adaptive_setup, adaptive_index):
    from carlos_ray.indexing import IndexPlan, collect_sources
    from carlos_ray.models.generator import generator_lora_targets

    cfg = adaptive_setup["config"]
    a = cfg.sampling.adaptive
    plan = IndexPlan(cfg)
    rounds = plan.rounds
    jobs, _, _ = collect_sources([str(adaptive_setup["src"])], generator_lora_targets(cfg.generator))
    diffs = _all_diffs(cfg, jobs, plan)
    snap = Index(adaptive_index["index"]).snapshot()
    rows = {r["lora_id"]: r for r in snap.signatures().to_pylist()}
    assert set(rows) == {j.lora_id for j in jobs}
    stopped_at = {}
    for lid, row in rows.items():
        k = row["n_rounds"]
        assert row["n"] == rounds.used(k)
        # the stopping rule, recomputed with numpy: not settled at any earlier round, settled at k unless k is last
        for r in range(1, k + 1):
            take = rounds.order[: rounds.used(r)]
            x = diffs[lid][take[:, 0], take[:, 1]]
            d_rse, s_rse, c_se = _numpy_errors(x, take[:, 0], take[:, 1], len(plan.prompts), plan.independent_seeds,
                                               len(plan.seeds))
            settled = len(x) >= a.min_samples and d_rse <= a.max_direction_rse and s_rse <= a.max_strength_rse \
                and c_se <= a.max_consistency_se
            assert settled == (r == k) or (r == k == rounds.n_rounds and not settled), (row["name"], r, k)
        np.testing.assert_allclose(row["direction"], x.mean(axis=0), atol=1e-5)
        norms = np.linalg.norm(x, axis=1)
        assert row["strength"] == pytest.approx(norms.mean(), abs=1e-5)
        # the full protocol's pair mix (within- and cross-prompt means weighted as the full protocol weighs them)
        pairs = _naive_pair_mix(x, take[:, 0], len(plan.prompts), len(plan.seeds))
        assert row["consistency"] == pytest.approx(pairs, abs=1e-5)
        assert row["strength_se"] == pytest.approx(s_rse * norms.mean(), rel=1e-4, abs=1e-6)
        assert row["consistency_se"] == pytest.approx(c_se, abs=1e-5)
        assert row["direction_rse"] == pytest.approx(d_rse, rel=1e-4, abs=1e-9)
        stopped_at[Path(row["source_path"]).stem] = k
    # the fixture's bounds were chosen so that both cases happen
    assert min(stopped_at.values()) == 1 and max(stopped_at.values()) == rounds.n_rounds, stopped_at
    summary = adaptive_index["summary"]
    assert summary.images_generated == sum(r["n"] for r in rows.values()) + plan.samples_per_lora  # + base pass
    assert summary.rounds == max(stopped_at.values())
    partials = snap.table("partials").to_pylist()
    got = sorted((p["lora_id"], p["rounds_done"]) for p in partials)
    assert got == sorted((lid, r) for lid, row in rows.items() for r in range(1, row["n_rounds"]))


def test_compaction_keeps_only_the_round_statistics_a_resume_can_use(tmp_path):
    import pyarrow as pa

    from carlos_ray.adaptive import AdaptiveRounds, partials_table
    from carlos_ray.schema import SIGNATURE_SCHEMA, conform_signatures
    from carlos_ray.signatures import PartialStats

    rng = np.random.default_rng(0)

    def prow(lid: str, r: int) -> dict:
        part = PartialStats.from_diffs(rng.normal(size=(3, 4)), np.array([0, 1, 2]), 3)
        return {"lora_id": lid, "rounds_done": r, "n_nonfinite": 0, **part.to_row()}

    idx = Index(str(tmp_path / "idx"))
    idx.init({"config_hash": "h"})
    rows = [prow("a", 1), prow("b", 1), prow("a", 2), prow("c", 1), prow("b", 2), prow("b", 3)]
    for row in rows:
        idx.commit({"partials": partials_table([row], "h")})
    sig = conform_signatures(pa.Table.from_pylist([{"lora_id": "c", "direction": [1.0], "strength": 1.0,
                                                    "consistency": 0.5}], schema=SIGNATURE_SCHEMA))
    idx.commit({"signatures": sig})
    before = AdaptiveRounds(RoundPlan.build(["x"] * 3, 4, 1.0, 0), None, "h", idx.snapshot().table("partials"))
    idx.compact(retention_s=0)
    kept = idx.snapshot().table("partials").to_pylist()
    assert sorted((r["lora_id"], r["rounds_done"]) for r in kept) == [("a", 2), ("b", 3)]
    after = AdaptiveRounds(RoundPlan.build(["x"] * 3, 4, 1.0, 0), None, "h", idx.snapshot().table("partials"))
    for lid in ("a", "b"):  # a resume sees the same carry as before the compaction
        assert after.get(lid).rounds_done == before.get(lid).rounds_done
        np.testing.assert_array_equal(after.get(lid).partial.prompt_unit_sum, before.get(lid).partial.prompt_unit_sum)
    assert AdaptiveRounds(RoundPlan.build(["x"] * 3, 4, 1.0, 0), None, "other", idx.snapshot().table("partials")).carry == {}
