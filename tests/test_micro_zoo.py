"""The shipped micro zoo, indexed through Ray Data with conf/micro.yaml (the demo's index): does carlos-ray find
the LoRA that does what the query says? Truth comes from zoo.json (what each LoRA was trained to do), never
from the code under test.

Floors are set from the full measured runs (benchmarks/bench_zoo.py, bench_eval.py, bench_behavior.py on this
index; the numbers are in docs/EVALUATION.md and docs/BEHAVIOR.md) with a margin, so a regression in the query
encoder, the ranker, the filters or the tags fails here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

#: measured on this index: 9 of 12 style words find a LoRA planted with them at top-1 (bench_zoo.py): grainy and
#: inverted are filtered (consistency), blurred ranks the pixel LoRA first (its images are soft, not blocky: the VAE
#: loses pixelation); the issue's target is 0.9 (docs/MICRO_WORLD.md). Floor = measured minus one word.
WORD_TOP1_FLOOR = 8 / 12
#: measured CARLoS P@1 over the 140 positive micro queries (bench_eval.py): 0.779 with the index's filters, 0.871
#: without them (the calibrated consistency filter drops the two inverted LoRAs); floors = measured minus a margin
CARLOS_P1_FLOOR = 0.72
CARLOS_NO_FILTER_P1_FLOOR = 0.8


@pytest.fixture(scope="module")
def micro(ray_session, tmp_path_factory):
    from carlos_ray.config import Config
    from carlos_ray.indexing import run_index
    from carlos_ray.world.zoo_spec import shipped_zoo_dir

    zoo = shipped_zoo_dir()
    idx = tmp_path_factory.mktemp("micro") / "idx"
    summary = run_index(Config.from_file("conf/micro.yaml"), [str(zoo)], str(idx))
    members = json.loads((zoo / "zoo.json").read_text())["members"]
    return {"index": str(idx), "zoo": zoo, "summary": summary, "members": members,
            "by_id": {m["sha256"][:16]: m for m in members}}


def test_every_zoo_lora_is_indexed(micro):
    s = micro["summary"]
    assert s.rejects == [] and s.indexed == len(micro["members"]), s.rejects


def test_style_words_find_their_planted_lora(micro):
    from carlos_ray.serving import load_query_encoder, load_ranker
    from carlos_ray.world.render import STYLES

    ranker, manifest = load_ranker(micro["index"])
    enc = load_query_encoder(manifest)
    rows = []
    for word in STYLES:
        hits = ranker.search(enc.encode_one(word), k=1)
        top = micro["by_id"][hits[0].lora_id] if hits else {}
        rows.append((word, top.get("name"), top.get("planted") == word))
    print(rows)
    assert np.mean([ok for *_, ok in rows]) >= WORD_TOP1_FLOOR, rows


def test_the_overpowering_and_erratic_loras_fall_outside_the_thresholds(micro):
    """The calibrated strength filter drops the overpowering LoRA (the index's strongest), the consistency filter
    the erratic one (a different effect per prompt and seed: among the least consistent)."""
    from carlos_ray.serving import load_ranker

    ranker, manifest = load_ranker(micro["index"])
    th = manifest.thresholds
    rows = {lid: ranker.get(lid) for lid in micro["by_id"]}
    role = {lid: m["role"] for lid, m in micro["by_id"].items()}
    over = next(lid for lid, r in role.items() if r == "overpowering")
    assert rows[over]["strength"] > th["max_strength"]
    assert rows[over]["strength"] == max(r["strength"] for r in rows.values())
    erratic = next(lid for lid, r in role.items() if r == "erratic")
    below = sum(r["consistency"] < rows[erratic]["consistency"] for r in rows.values())
    assert below < len(rows) / 3, below
    assert rows[erratic]["consistency"] < th["min_consistency"]


def test_carlos_p_at_1_stays_above_its_floor_and_beats_the_metadata_baselines(micro):
    from carlos_ray.evaluation.micro import micro_queries
    from carlos_ray.evaluation.run import EvalSpec, run_eval

    queries = micro_queries(micro["zoo"])
    assert len(queries.positives) >= 100
    spec = EvalSpec(judges=[], retrievers=["carlos", "carlos-no-filter", "bm25-metadata", "dense-metadata"])
    result = run_eval(micro["index"], queries, spec)
    p1 = {r["retriever"]: r["P@1"] for r in result["rows"]}
    # an independent P@1: the fraction of positive queries whose top LoRA zoo.json says is relevant
    tops = {q["query"]: q["top"] for q in result["per_query"]["carlos"]}
    naive = np.mean([bool(tops[q.id]) and q.relevance.get(tops[q.id][0], 0) > 0 for q in queries.positives])
    assert p1["carlos"] == pytest.approx(naive)
    print(p1)
    assert p1["carlos"] >= CARLOS_P1_FLOOR and p1["carlos-no-filter"] >= CARLOS_NO_FILTER_P1_FLOOR
    assert p1["carlos"] > p1["bm25-metadata"] and p1["carlos"] > p1["dense-metadata"]


def test_tags_groups_and_duplicates_match_the_planted_truth(micro, tmp_path):
    import shutil

    from carlos_ray.behavior.index import evaluate_index, tag_index
    from carlos_ray.serving.loading import load_query_encoder

    idx = tmp_path / "idx"
    shutil.copytree(micro["index"], idx)  # tagging commits to the index; the module's copy stays as indexed
    tag_index(str(idx), vocabulary="micro", load_encoder=load_query_encoder)
    res = evaluate_index(str(idx), json.loads((micro["zoo"] / "zoo.json").read_text()), vocabulary="micro")
    print(json.dumps({k: res[k] for k in ("targets", "groups")}, default=str))
    d = res["duplicates"]
    assert not d["different_behaviour_pairs"], d  # no two LoRAs with different planted behaviours are duplicates
    assert res["tags"][res["calibration"]]["top1_accuracy"] >= TAG_TOP1_FLOOR, res["tags"]
    assert d["planted_found"] == d["planted_pairs"] == 1, d  # the sepia LoRA's second training seed
    assert res["calibration"] == "centered", res["tags"]
    # the grayscale LoRA at weights 0.8 / 1 / 1.4 is one scale family (conf/micro.yaml: family cosine 0.88), none
    # of its pairs a duplicate; groups are the planted behaviours (measured ARI 1.0: the family and the sepia twins
    # are the only groups, every other behaviour stands alone)
    assert res["targets"]["scale_family"], d
    assert res["groups"]["ari"] >= 0.8, res["groups"]


#: measured on this index (bench_behavior.py --zoo-only): top-1 tag 0.889 (16 of 18, centered calibration; the
#: misses are the grain and pixel LoRAs, whose behaviour the pixel oracle barely sees). Floor = one more miss.
TAG_TOP1_FLOOR = 15 / 18 - 1e-9
