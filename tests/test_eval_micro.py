"""The micro world's side of the evaluation: oracle attributes on renders, queries from the vocabulary."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from carlos_ray.evaluation.micro import MicroOracle, behaviour_attribute, micro_queries, zoo_relevance


def test_oracle_attributes_read_renders():
    from carlos_ray.world import render as R

    imgs = np.stack([R.render(R.Scene("star", "red", styles=("striped",)), rng=np.random.default_rng(0)),
                     R.render(R.Scene("heart", "blue"), rng=np.random.default_rng(1))])
    a, b = MicroOracle().attributes(imgs)
    assert {"style:striped", "shape:star"} <= a
    assert {"shape:heart", "colour:blue"} <= b and not any(x.startswith("style:") for x in b)


def test_behaviour_attributes():
    assert behaviour_attribute("style:sepia") == "style:sepia"
    assert behaviour_attribute("content:star") == "shape:star"
    assert behaviour_attribute("content:red") == "colour:red"
    assert behaviour_attribute("content:small") is None  # the oracle does not read sizes


@pytest.fixture
def fake_zoo(tmp_path):
    """A zoo.json in the zoo's format beside files whose bytes differ (the queries only hash them)."""
    members = [
        {"name": "stripes_v1", "role": "style", "planted": "striped", "scale": 1.0},
        {"name": "bw_film", "role": "style", "planted": "grayscale", "scale": 1.0},
        {"name": "bw_film_x2", "role": "scale_family", "planted": "grayscale", "scale": 2.0},
        {"name": "starify", "role": "content", "planted": "star", "scale": 1.0},
        {"name": "chaos", "role": "erratic", "planted": None, "scale": 1.0},
        {"name": "pixel_hint_weak", "role": "weak", "planted": "pixelated", "scale": 1.0},
    ]
    for m in members:
        m["file"] = f"{m['name']}.safetensors"
        (tmp_path / m["file"]).write_bytes(m["name"].encode() * 3)
    (tmp_path / "zoo.json").write_text(json.dumps({"members": members}))
    return tmp_path


def test_relevance_from_zoo_json(fake_zoo):
    rel, names = zoo_relevance(fake_zoo)
    lid = {n: hashlib.sha256((fake_zoo / f"{n}.safetensors").read_bytes()).hexdigest()[:16] for n in names.values()}
    assert rel["style:grayscale"] == {lid["bw_film"]: 2, lid["bw_film_x2"]: 1}
    assert rel["content:star"] == {lid["starify"]: 2}
    assert rel["style:pixelated"] == {lid["pixel_hint_weak"]: 1}
    assert lid["chaos"] not in {x for r in rel.values() for x in r}


def test_queries_cover_every_behaviour_and_negatives(fake_zoo):
    from carlos_ray.world import captions as C

    qs = micro_queries(fake_zoo)
    again = micro_queries(fake_zoo)
    assert qs.model_dump() == again.model_dump()  # deterministic
    texts = [q.text for q in qs.queries]
    assert len(set(t.casefold() for t in texts)) == len(texts)
    pos = {q.behaviour for q in qs.positives}
    assert pos == {"style:striped", "style:grayscale", "content:star", "style:pixelated"}
    for word in C.STYLE_ADJECTIVES["striped"] + C.STYLE_PHRASES["striped"]:
        assert word in texts  # every synonym of the grammar is a short query
    assert any(q.form == "content" and "striped" in q.text for q in qs.positives)
    neg = qs.negatives
    assert any(q.behaviour == "style:sepia" for q in neg)  # planted by nobody in this zoo
    assert any(q.behaviour is None for q in neg)  # outside the world
    assert all(q.attribute == behaviour_attribute(q.behaviour) for q in qs.positives)
