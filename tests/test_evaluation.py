"""Evaluation on the tiny profile: retrievers through the service code, BM25 against its formula,
the judge pass against an in-process computation, determinism and the cache."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from carlos_ray.evaluation.queries import Query, QueryFileError, QuerySet, load_queries
from carlos_ray.evaluation.retrievers import BM25Retriever, encode_texts, text_diff_vectors

HELDOUT = """name: heldout-test
version: "1"
categories:
  heldout:
    - a lighthouse on a cliff under a cloudy sky
    - a bowl of cherries on a marble table
"""


def zoo_ids(zoo_dir: Path) -> dict[str, str]:
    """Zoo member name -> lora_id (first 16 hex digits of the file's SHA-256, computed here independently)."""
    members = json.loads((zoo_dir / "zoo.json").read_text())["members"]
    return {m["name"]: hashlib.sha256((zoo_dir / m["file"]).read_bytes()).hexdigest()[:16] for m in members}


def tiny_queries(zoo_dir: Path) -> QuerySet:
    ids = zoo_ids(zoo_dir)
    qs = []

    def add(text, names, kind="positive"):
        qs.append(Query(id=f"q{len(qs)}", text=text, kind=kind, relevance={ids[n]: 2 for n in names}))

    add("a crisp look", ["twin_a", "twin_b"])
    add("chaotic noise", ["erratic"])
    add("scalestyle", ["scale_x0.5", "scale_x1", "scale_x2"])
    add("pixel art", [], "negative")
    return QuerySet(name="tiny", loras={v: k for k, v in ids.items()}, queries=qs)


@pytest.fixture(scope="module")
def index_parts(built_index):
    from carlos_ray.serving.loading import load_query_encoder
    from carlos_ray.store import Index

    snap = Index(built_index["index"]).snapshot()
    return snap.signatures(), snap.manifest, load_query_encoder(snap.manifest)


def test_suffix_vectors_equal_the_service_encoder(index_parts):
    from carlos_ray.serving.loading import context_texts_from_manifest

    _, manifest, enc = index_parts
    qs = ["a crisp look", "watercolor painting of a cat"]
    ctx = context_texts_from_manifest(manifest)
    plain = text_diff_vectors(enc.model, enc.tokenizer, ctx, qs, position="suffix", joiner=enc.joiner)
    np.testing.assert_allclose(plain, enc.encode(qs), rtol=1e-4, atol=1e-5)
    # prefix: a loop over context prompts, one text at a time
    pre = text_diff_vectors(enc.model, enc.tokenizer, ctx, qs, position="prefix", joiner=enc.joiner)
    for qi, q in enumerate(qs):
        naive = np.mean([encode_texts(enc.model, enc.tokenizer, [q + " " + p])[0] - encode_texts(enc.model, enc.tokenizer, [p])[0]
                         for p in ctx], axis=0)
        np.testing.assert_allclose(pre[qi], naive, rtol=1e-5, atol=1e-6)
    assert not np.allclose(pre, plain)


def test_filter_ablations_go_through_the_ranker(index_parts):
    from carlos_ray.evaluation.retrievers import build_retrievers

    table, manifest, enc = index_parts
    th = manifest.thresholds
    by_id = {r["lora_id"]: r for r in table.select(["lora_id", "strength", "consistency"]).to_pylist()}
    full, none = build_retrievers(table, manifest, enc, ["carlos", "carlos-no-filter"])
    passing = [lid for lid, r in by_id.items() if r["strength"] <= th["max_strength"] and r["consistency"] >= th["min_consistency"]]
    assert 0 < len(passing) < table.num_rows  # the filters are active on this index
    r_full, r_none = full.rank(["a crisp look"], 100)[0], none.rank(["a crisp look"], 100)[0]
    assert sorted(r_full.ids) == sorted(passing)
    assert sorted(r_none.ids) == sorted(by_id)
    # the scores are cosines of Δq and the directions, recomputed here with numpy
    dq = enc.encode(["a crisp look"])[0].astype(np.float64)
    dirs = {r["lora_id"]: np.asarray(r["direction"]) for r in table.select(["lora_id", "direction"]).to_pylist()}
    for lid, s in zip(r_none.ids, r_none.scores):
        d = dirs[lid]
        want = 0.0 if not d.any() else d @ dq / np.linalg.norm(d) / np.linalg.norm(dq)
        assert s == pytest.approx(want, abs=1e-5)


def test_bm25_matches_the_formula():
    docs = {"l1": ("Red Cat", "a red cat sleeping"), "l2": ("Blue Dog", "blue dog"), "l3": ("Green", "green green green tree")}
    table = pa.table({"lora_id": list(docs), "name": [v[0] for v in docs.values()],
                      "description": [v[1] for v in docs.values()], "trigger_words": [[], ["bluey"], []],
                      "source_path": [None] * 3})
    r = BM25Retriever(table)
    # the documents after stop words ("a") and stemming (sleeping -> sleep, tree stays)
    tokens = {"l1": "red cat red cat sleep".split(), "l2": "blue dog blue dog bluey".split(), "l3": "green green green green tree".split()}
    n, avgdl, k1, b = 3, np.mean([len(t) for t in tokens.values()]), 1.5, 0.75

    def naive(query_terms, doc):
        s = 0.0
        for t in query_terms:
            df = sum(t in d for d in tokens.values())
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = tokens[doc].count(t)
            # Lucene's BM25 (Kamphuis et al. 2020): no (k1 + 1) factor in the numerator (a constant, rank-neutral)
            s += idf * tf / (tf + k1 * (1 - b + b * len(tokens[doc]) / avgdl))
        return s

    scores = r.scores("the red tree")
    for i, lid in enumerate(r.ids):
        assert scores[i] == pytest.approx(naive(["red", "tree"], lid), rel=1e-5)
    top = r.rank(["red cat"], 3)[0]
    assert top.ids[0] == "l1" and top.ids[1:] == ("l2", "l3")  # zero scores tie-break by lora_id
    assert r.rank(["zebra"], 2)[0].scores == (0.0, 0.0)


def test_query_file_validation(tmp_path):
    with pytest.raises(ValueError, match="no relevant LoRA"):
        Query(id="a", text="x", kind="positive")
    p = tmp_path / "q.json"
    p.write_text(json.dumps({"queries": [{"id": "a", "text": "x", "kind": "negative", "colour": 1}]}))
    with pytest.raises(QueryFileError, match="unknown key `queries.0.colour`"):
        load_queries(p)
    with pytest.raises(QueryFileError, match="not found"):
        load_queries(tmp_path / "nope.json")


def test_run_eval_judges_match_in_process_generation(built_index, zoo_dir, tmp_path, ray_session):
    from carlos_ray.evaluation.run import BASE, EvalSpec, format_table, run_eval
    from carlos_ray.models import create_encoder, create_generator
    from carlos_ray.store import Index

    (tmp_path / "heldout.yaml").write_text(HELDOUT)
    qs = tiny_queries(zoo_dir)
    spec = EvalSpec(heldout_prompts=str(tmp_path / "heldout.yaml"), judges=["clip"], num_seeds=1, judge_k=1,
                    retrievers=["carlos", "bm25-metadata"])
    res = run_eval(built_index["index"], qs, spec, cache_dir=tmp_path / "cache")
    names = [r["retriever"] for r in res["rows"]]
    assert names[:2] == ["carlos", "bm25-metadata"] and BASE in names
    assert res["judge"]["images_generated"] > 0

    # the clip judge of carlos's first query, recomputed in-process with the index's own models
    snap = Index(built_index["index"]).snapshot()
    manifest = snap.manifest
    from carlos_ray.evaluation.run import config_from_manifest

    cfg = config_from_manifest(manifest)
    row = res["per_query"]["carlos"][0]
    lid = row["top"][0]
    sig = {r["lora_id"]: r for r in snap.signatures().to_pylist()}[lid]
    enc = create_encoder(cfg.encoder)
    gen = create_generator(cfg.generator, enc.image_size)
    gen.activate(lid, sig["source_path"])
    trig = ", ".join(sig["trigger_words"] or [])
    prompts = [p + (", " + trig if trig else "") for p in ("a lighthouse on a cliff under a cloudy sky", "a bowl of cherries on a marble table")]
    imgs, _ = gen.generate(prompts, [1000, 1000])
    v = enc.encode_images(imgs).astype(np.float64)
    u = enc.encode_texts([qs.queries[0].text])[0].astype(np.float64)
    want = float(np.mean(v @ u / np.linalg.norm(v, axis=1) / np.linalg.norm(u)))
    assert row["clip"] == pytest.approx(want, abs=2e-4)

    # a second run is served from the cache and prints the same table
    again = run_eval(built_index["index"], qs, spec, cache_dir=tmp_path / "cache")
    assert again["judge"]["images_generated"] == 0
    assert format_table(again) == format_table(res)


def test_heldout_prompts_must_be_new(built_index, zoo_dir, tmp_path):
    from carlos_ray.evaluation.run import EvalSpec, run_eval
    from carlos_ray.prompts import load_prompt_set
    from carlos_ray.store import Index

    manifest = Index(built_index["index"]).snapshot().manifest
    used = load_prompt_set(manifest.sampling["prompts"], manifest.sampling["prompt_subset"]).texts[0]
    (tmp_path / "h.yaml").write_text(f'name: h\ncategories:\n  c:\n    - "{used}"\n')
    spec = EvalSpec(heldout_prompts=str(tmp_path / "h.yaml"), judges=["clip"], retrievers=["carlos"])
    with pytest.raises(ValueError, match="neither P nor P'"):
        run_eval(built_index["index"], tiny_queries(zoo_dir), spec, cache_dir=tmp_path / "c")


def test_eval_cli_labels_only_and_bad_input(built_index, zoo_dir, tmp_path, capsys):
    from carlos_ray.cli import main

    q = tiny_queries(zoo_dir).save(tmp_path / "q.json")
    out = tmp_path / "out"
    rc = main(["eval", "--index", built_index["index"], "--queries", str(q), "--judge", "none", "--out", str(out),
               "--retrievers", "carlos,carlos-no-filter,bm25-metadata"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "carlos-no-filter" in printed and "P@1" in printed
    res = json.loads((out / "results.json").read_text())
    assert [r["retriever"] for r in res["rows"]] == ["carlos", "carlos-no-filter", "bm25-metadata"]
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG" and "<table>" in (out / "index.html").read_text()
    assert main(["eval", "--index", built_index["index"], "--queries", str(q), "--judge", "smell"]) == 2
    assert "unknown judge" in capsys.readouterr().err
    assert main(["eval", "--index", built_index["index"], "--queries", str(tmp_path / "none.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"queries": [{"id": "a", "text": "x", "kind": "positive", "relevance": {"0123456789abcdef": 2}}]}))
    assert main(["eval", "--index", built_index["index"], "--queries", str(bad), "--judge", "none"]) == 2
    assert "does not hold" in capsys.readouterr().err
