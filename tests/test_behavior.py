"""Behaviour library (tags, groups, duplicates) against independent computations on synthetic signatures.

References are written here from scratch: naive loops over all pairs in float64, full N×T
matrices with numpy, scipy's own hierarchy cut, a naive silhouette loop, and sklearn's
adjusted_rand_score against planted labels.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from carlos_ray.behavior.duplicates import DuplicateCriteria, behavioural_duplicates, duplicates_of, exact_duplicates
from carlos_ray.behavior.groups import _cuts, group_directions, shared_tags
from carlos_ray.behavior.tags import TagVocabulary, assign_tags, tag_statistics, tag_vectors


def _cos(a, b) -> float:
    a, b = [float(x) for x in a], [float(x) for x in b]
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# ---- duplicates ------------------------------------------------------------------------------------
def _planted_signatures(seed: int = 0):
    """60 random directions, 6 near-duplicate pairs (2 of them at a very different strength), a 4-member scale family."""
    rng = np.random.default_rng(seed)
    d = 32
    x = rng.standard_normal((60, d))
    s = rng.uniform(2.0, 6.0, 60)
    for k in range(6):  # rows 40+k copy row k with a little noise
        x[40 + k] = x[k] + 0.05 * rng.standard_normal(d)
        s[40 + k] = s[k] * (1.05 if k < 4 else 3.0)
    base = rng.standard_normal(d)
    for m, scale in enumerate([0.5, 1.0, 2.0, 4.0]):  # rows 50..53: one direction at four strengths
        x[50 + m] = base * scale + 0.02 * rng.standard_normal(d)
        s[50 + m] = 1.5 * scale
    return x, s


def test_behavioural_duplicates_match_naive_pair_loop():
    x, s = _planted_signatures()
    rep = behavioural_duplicates(x, s, DuplicateCriteria(0.95, 0.8), block_rows=7)
    expected = {}
    for a, b in itertools.combinations(range(len(x)), 2):
        c = _cos(x[a], x[b])
        r = min(s[a], s[b]) / max(s[a], s[b])
        if c >= 0.95 and r >= 0.8:
            expected[(a, b)] = c * r
    got = {(p.a, p.b): p.score for p in rep.pairs}
    assert set(got) == set(expected)
    assert set(expected) >= {(k, 40 + k) for k in range(4)}  # the planted ones are among them
    for key, score in expected.items():
        assert got[key] == pytest.approx(score, abs=1e-12)
    assert [p.score for p in rep.pairs] == sorted(got.values(), reverse=True)
    # the scale family: one family, strength order, none of its pairs called duplicates
    fam = [f for f in rep.families if set(f.members) & {50, 51, 52, 53}]
    assert len(fam) == 1 and fam[0].members == [50, 51, 52, 53]
    assert fam[0].strength_span == pytest.approx(8.0)
    assert not any(p.a >= 50 and p.b <= 53 for p in rep.pairs)
    # pairs 4 and 5 (3x the strength) are parallel but not duplicates: each is a two-member family
    assert {tuple(f.members) for f in rep.families} >= {(4, 44), (5, 45)}


def test_duplicates_of_one_row_matches_naive_loop():
    x, s = _planted_signatures(1)
    # a looser family cosine: rows 50..53 are a family at 0.85 but not all pairs at 0.99
    x[50:54] += 0.3 * np.random.default_rng(9).standard_normal((4, x.shape[1])) * np.linalg.norm(x[50:54], axis=1, keepdims=True) / np.sqrt(x.shape[1])
    for fam_cos in (0.95, 0.85, None):
        for row in (0, 4, 51):
            dups, rel = duplicates_of(row, x, s, DuplicateCriteria(0.95, 0.8, fam_cos))
            exp_d, exp_r = set(), set()
            for b in range(len(x)):
                if b == row:
                    continue
                c = _cos(x[row], x[b])
                r = min(s[row], s[b]) / max(s[row], s[b])
                if r >= 0.8 and c >= 0.95:
                    exp_d.add((min(row, b), max(row, b)))
                elif c >= (0.95 if fam_cos is None else fam_cos):
                    exp_r.add((min(row, b), max(row, b)))
            assert {(p.a, p.b) for p in dups} == exp_d
            assert {(p.a, p.b) for p in rel} == exp_r
            if row == 51 and fam_cos == 0.85:
                assert exp_r  # the looser family cosine finds relatives the strict one may not


def test_duplicates_cap_zero_and_excluded_rows():
    rng = np.random.default_rng(2)
    v = rng.standard_normal(16)
    x = np.vstack([v + 1e-4 * rng.standard_normal((6, 16)), rng.standard_normal((4, 16)), np.zeros((2, 16))])
    s = np.ones(12)
    rep = behavioural_duplicates(x, s, max_neighbors=2, block_rows=3)
    assert rep.capped_rows > 0
    partners = np.bincount([p.a for p in rep.pairs], minlength=12)
    assert partners.max() <= 2 and all(p.a < 6 and p.b < 6 for p in rep.pairs)
    include = np.ones(12, bool)
    include[0] = False
    rep = behavioural_duplicates(x, s, include=include)
    assert len(rep.pairs) == 10 and all(p.a != 0 for p in rep.pairs)  # 5 choose 2, zero rows never pair


@pytest.mark.parametrize("kw", [{"min_cosine": 0}, {"min_cosine": 1.5}, {"min_strength_ratio": -0.1},
                                {"min_strength_ratio": float("nan")}, {"min_cosine": True}])
def test_duplicate_thresholds_are_checked(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        DuplicateCriteria(**kw)


def test_exact_duplicates_list_every_copy_once():
    recs = [("a/x.safetensors", "AA"), ("b/x.safetensors", "aa"), ("c.safetensors", "bb"), ("a/x.safetensors", "aa"),
            ("d/renamed.safetensors", "aa")]
    got = exact_duplicates(recs)
    assert len(got) == 1 and got[0].sha256 == "aa"
    assert got[0].indexed_path == "a/x.safetensors"
    assert got[0].other_paths == ["b/x.safetensors", "d/renamed.safetensors"]
    with pytest.raises(ValueError, match="sha256"):
        exact_duplicates([("x", "")])


# ---- groups ----------------------------------------------------------------------------------------
def _clustered(n: int, k: int, d: int = 48, noise: float = 0.25, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    sizes = rng.integers(1, 6, k).astype(float)
    labels = rng.choice(k, size=n, p=sizes / sizes.sum())
    x = centers[labels] + noise * rng.standard_normal((n, d)) * np.linalg.norm(centers[labels], axis=1, keepdims=True) / math.sqrt(d)
    return x * rng.uniform(0.5, 3.0, (n, 1)), labels  # strength varies: clustering is by direction only


def test_groups_recover_planted_clusters_and_are_deterministic():
    x, planted = _clustered(400, 9)
    g = group_directions(x, seed=0)
    assert g.n_groups == len(np.unique(planted))
    assert adjusted_rand_score(planted, g.labels) >= 0.95
    again = group_directions(x, seed=0)
    np.testing.assert_array_equal(g.labels, again.labels)
    sizes = np.bincount(g.labels)
    assert (np.diff(sizes) <= 0).all()  # numbered by size
    # sample 120 of 400, assign the rest to the nearest centroid
    gs = group_directions(x, seed=3, sample_size=120)
    assert gs.sample_size == 120 and adjusted_rand_score(planted, gs.labels) >= 0.95


def test_groups_keep_loners_alone_and_skip_invalid_rows():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((24, 64))
    x[20:24] = x[0:4] + 0.05 * rng.standard_normal((4, 64))  # 4 pairs among 16 loners
    x = np.vstack([x, np.zeros((1, 64))])
    include = np.ones(25, bool)
    include[5] = False
    g = group_directions(x, include=include)
    planted = np.r_[np.arange(20), np.arange(4)]
    keep = np.r_[np.arange(5), np.arange(6, 24)]
    assert g.labels[5] == -1 and g.labels[24] == -1
    assert adjusted_rand_score(planted[keep], g.labels[keep]) == pytest.approx(1.0)


def test_tree_cut_matches_scipy_and_silhouette_matches_naive_loop():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from sklearn.cluster import AgglomerativeClustering

    x, _ = _clustered(40, 4, noise=0.8, seed=7)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.clip(1 - u @ u.T, 0, 2)
    np.fill_diagonal(dist, 0)
    dist = (dist + dist.T) / 2
    model = AgglomerativeClustering(n_clusters=1, compute_full_tree=True, metric="precomputed", linkage="average").fit(dist)
    z = linkage(squareform(dist, checks=False), method="average")
    cuts = _cuts(model.children_, 40, [2, 3, 5, 8])
    for k, labels in cuts.items():
        assert adjusted_rand_score(fcluster(z, k, criterion="maxclust"), labels) == pytest.approx(1.0)

    g = group_directions(x, seed=0, max_distance=0.5)  # loose clusters (noise 0.8): cosines ~0.6 inside
    lab = g.labels
    sil = []
    for i in range(40):  # naive silhouette (singletons score 0)
        same = [dist[i, j] for j in range(40) if lab[j] == lab[i] and j != i]
        if not same:
            sil.append(0.0)
            continue
        a = sum(same) / len(same)
        b = min(np.mean([dist[i, j] for j in range(40) if lab[j] == o]) for o in set(lab.tolist()) - {lab[i]})
        sil.append((b - a) / max(a, b))
    assert g.silhouette == pytest.approx(float(np.mean(sil)), abs=1e-6)  # float32 unit rows inside
    assert g.silhouette == pytest.approx(max(s for _, s in g.candidates))


def test_shared_tags_and_bad_group_settings():
    labels = np.array([0, 0, 0, 1, 1, -1])
    tags = [["a", "b"], ["a"], ["a", "c"], ["c"], ["c", "b"], ["z"]]
    out = shared_tags(labels, tags, min_share=0.5)
    assert out[0] == [("a", 1.0)] and out[1] == [("c", 1.0), ("b", 0.5)] and -1 not in out
    x, _ = _clustered(20, 2)
    for kw in ({"sample_size": 1}, {"max_groups": 1}, {"max_distance": 0}, {"distance_threshold": 3.0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            group_directions(x, **kw)


# ---- tags ------------------------------------------------------------------------------------------
def _tag_world(seed: int = 0, n: int = 300, t: int = 40, d: int = 64):
    """Directions = planted tag vector + a generic component shared by every LoRA + noise; tag 0 IS the generic one."""
    rng = np.random.default_rng(seed)
    tags = rng.standard_normal((t, d))
    generic = tags[0]
    planted = rng.integers(1, t, n)
    x = tags[planted] + 1.3 * generic + 0.6 * rng.standard_normal((n, d))
    return x, tags, planted


def _naive_scores(x, tags, calibration, margin=0.1):
    c = np.array([[_cos(a, b) for b in tags] for a in x])
    if calibration == "centered":
        return c - c.mean(axis=0)
    if calibration == "zscore":
        return (c - c.mean(axis=0)) / c.std(axis=0)
    if calibration == "margin":
        return c - np.median(c, axis=1, keepdims=True)
    return c


@pytest.mark.parametrize("calibration", ["centered", "zscore", "rank", "margin"])
def test_assign_tags_matches_full_matrix(calibration):
    x, tags, _ = _tag_world(n=60, t=12)
    thr = {"centered": {"min_shift": 0.05}, "zscore": {"z_min": 1.0}, "rank": {"min_cosine": 0.2},
           "margin": {"margin": 0.15}}[calibration]
    got = assign_tags(x, tags, calibration=calibration, max_tags=3, block_rows=16, **thr)
    score = _naive_scores(x, tags, calibration)
    cut = {"centered": 0.05, "zscore": 1.0, "rank": 0.2, "margin": 0.15}[calibration]
    for i in range(len(x)):
        order = sorted(range(len(tags)), key=lambda t: -score[i, t])
        assert got.top1[i] == order[0]
        expect = [(t, score[i, t]) for t in order[:3] if score[i, t] >= cut]
        assert [t for t, _ in got.tags[i]] == [t for t, _ in expect]
        assert [s for _, s in got.tags[i]] == pytest.approx([s for _, s in expect], abs=1e-9)


def test_tag_statistics_and_calibrations_on_a_generic_tag():
    x, tags, planted = _tag_world()
    st = tag_statistics(x, tags, block_rows=37)
    c = np.array([[_cos(a, b) for b in tags] for a in x[:50]])
    st50 = tag_statistics(x[:50], tags)
    np.testing.assert_allclose(st50.mean, c.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(st50.std, c.std(axis=0), atol=1e-12)
    assert st.count == 300
    z = assign_tags(x, tags, calibration="zscore", stats=st)
    ce = assign_tags(x, tags, calibration="centered", stats=st)
    r = assign_tags(x, tags, calibration="rank")
    # the generic word looks most similar to every LoRA by raw cosine; per-tag statistics see through it
    assert (r.top1 == 0).mean() > 0.9
    assert (z.top1 == planted).mean() >= 0.9
    assert (ce.top1 == planted).mean() >= 0.9


def test_tag_vectors_equal_the_plain_query_encoder_and_vocabulary_checks(tmp_path):
    from carlos_ray.config import EncoderSpec
    from carlos_ray.models import create_encoder
    from carlos_ray.query import QueryEncoder

    enc = create_encoder(EncoderSpec(arch="tiny"))
    qe = QueryEncoder(enc.model.eval(), enc.tokenizer, ["a photo of a cat", "a red house on a hill"])
    words = ["watercolor", "pixel art", "dark", "neon lights"]
    got = tag_vectors(qe, words, batch=3)
    np.testing.assert_allclose(got, qe.plain_encode(words), rtol=1e-4, atol=1e-5)

    voc = TagVocabulary.from_file("paper")
    assert len(voc.tags) >= 300 and {"style", "medium", "subject", "mood"} <= set(voc.categories)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncategories:\n  a: [red, blue]\n  b: [Red]\n")
    with pytest.raises(ValueError, match="listed twice"):
        TagVocabulary.from_file(bad)
    bad.write_text("name: x\ncategorys:\n  a: [red]\n")
    with pytest.raises(ValueError, match="categorys"):
        TagVocabulary.from_file(bad)
    with pytest.raises(ValueError, match="calibration"):
        assign_tags(np.ones((2, 3)), np.ones((2, 3)), calibration="best")


# ---- evaluation against planted truth --------------------------------------------------------------
def test_evaluate_against_planted_truth_and_a_corrupted_one():
    from carlos_ray.behavior.evaluate import Truth, evaluate

    rng = np.random.default_rng(4)
    t, d = 12, 64
    tags = rng.standard_normal((t, d))
    words = [f"w{i}" for i in range(t)]
    planted = list(range(t)) * 2  # 24 behaviour LoRAs, two per word
    x = np.vstack([tags[p] + 0.3 * rng.standard_normal(d) for p in planted])
    s = rng.uniform(2, 4, len(planted))
    x = np.vstack([x, x[0] + 0.01 * rng.standard_normal(d), x[1] * 2.0 + 0.01 * rng.standard_normal(d)])
    s = np.r_[s, s[0] * 1.02, s[1] * 2.0]  # row 24: near-duplicate of row 0; row 25: row 1 at twice the strength
    ids = [f"l{i}" for i in range(26)]
    behaviour = {ids[i]: words[p] for i, p in enumerate(planted)} | {"l24": words[0], "l25": words[1]}
    truth = Truth(behaviour, near_duplicates=[("l0", "l24")], scale_families=[["l1", "l25"]])
    res = evaluate(ids, x, s, tags, words, truth)
    assert res["tags"]["zscore"]["top1_accuracy"] == 1.0 and res["tags"]["centered"]["top1_accuracy"] == 1.0
    assert res["calibration"] == "centered"  # ties go to the default
    assert res["groups"]["ari"] == pytest.approx(1.0)
    assert res["duplicates"]["planted_found"] == 1 and res["duplicates"]["different_behaviour_pairs"] == []
    assert all(res["targets"].values()), res["targets"]
    # plant a wrong behaviour on the duplicate: one top-1 miss of 26, and a different-behaviour duplicate pair
    truth.behaviour["l24"] = words[5]
    res = evaluate(ids, x, s, tags, words, truth)
    assert res["tags"]["zscore"]["top1_accuracy"] == pytest.approx(25 / 26)
    assert res["duplicates"]["different_behaviour_pairs"] == [("l0", "l24")]
    assert res["targets"]["duplicates"] is False and res["groups"]["ari"] < 1.0


def test_truth_from_a_zoo_json():
    from carlos_ray.behavior.evaluate import truth_from_zoo

    def m(name, run, role, planted, behaviour, scale=1.0):
        return {"name": name, "run": run, "role": role, "planted": planted, "behaviour": behaviour, "scale": scale,
                "sha256": (name * 16)[:16] + "0" * 48}

    doc = {"members": [m("a", "r1", "style", "striped", "style:striped"), m("b", "r2", "near_duplicate", "striped", "style:striped"),
                       m("c", "r3", "style", "grayscale", "style:grayscale"), m("d", "r3", "scale_family", "grayscale", "style:grayscale", 2.0),
                       m("e", "r3", "scale_family", "grayscale", "style:grayscale", 0.5), m("f", "r4", "erratic", None, "erratic"),
                       m("g", "r5", "style", "sepia", "style:sepia")]}
    ids = [(x * 16)[:16] for x in "abcdef"]  # g is not in the index
    truth = truth_from_zoo(doc, ids)
    assert truth.behaviour == {ids[0]: "striped", ids[1]: "striped", ids[2]: "grayscale", ids[3]: "grayscale", ids[4]: "grayscale"}
    assert truth.near_duplicates == [(ids[1], ids[0])]
    assert truth.scale_families == [[ids[4], ids[2], ids[3]]]
