"""Tags, groups and duplicates on real indexes: the imported reference (no text encoder) and a small
index over the tiny CLIP whose tags are checked against the plain query encoder and numpy z-scores."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest

from carlos_ray.behavior.index import tag_index
from carlos_ray.behavior.tags import TagVocabulary
from carlos_ray.cli import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from carlos_ray.serving import RankerService, ServiceError
from carlos_ray.serving.loading import load_query_encoder
from carlos_ray.serving.watcher import load_fixed_index
from carlos_ray.store import Index


def _cli_json(capsys, argv):
    code = main(argv)
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    return json.loads(out)


# ---- the imported reference: groups and duplicates work, tags say the encoder is unavailable ----------
def test_reference_groups_and_duplicates_match_the_source(reference_index, source_table, capsys):
    idx = reference_index["index"]
    d = np.array(source_table["direction"].to_pylist(), dtype=np.float64)
    s = np.asarray(source_table["strength"].to_pylist(), dtype=np.float64)
    c = np.asarray(source_table["consistency"].to_pylist(), dtype=np.float64)
    ids = [f"civitai-{v}" for v in source_table["version_id"].to_pylist()]
    inside = (s <= 9.8) & (c >= 0.041) & (np.linalg.norm(d, axis=1) > 0)

    body = _cli_json(capsys, ["groups", "--index", idx, "--min-size", "1", "--limit", "10000", "--json"])
    assert body["grouped"] == int(inside.sum()) and body["ungrouped"] == 740 - int(inside.sum())
    members = [m["lora_id"] for g in body["groups"] for m in g["members"]]
    assert sorted(members) == sorted(i for i, keep in zip(ids, inside) if keep)
    assert [g["size"] for g in body["groups"]] == sorted((g["size"] for g in body["groups"]), reverse=True)
    assert body["n_groups"] == len(body["groups"]) and 2 <= body["n_groups"] < body["grouped"]

    u = d / np.linalg.norm(d, axis=1, keepdims=True)
    row = ids.index("civitai-440425")  # ParchartXL: three other versions are near-parallel
    body = _cli_json(capsys, ["duplicates", "civitai-440425", "--index", idx, "--min-cosine", "0.9", "--json"])
    cos = u @ u[row]
    ratio = np.minimum(s, s[row]) / np.maximum(s, s[row])
    par = [j for j in range(740) if j != row and cos[j] >= 0.9]
    want_dup = {ids[j]: cos[j] * ratio[j] for j in par if ratio[j] >= 0.8}
    want_rel = {ids[j] for j in par if ratio[j] < 0.8}
    assert {x["lora_id"]: x["score"] for x in body["duplicates"]} == pytest.approx(want_dup, abs=1e-6)
    assert {x["lora_id"] for x in body["scale_relatives"]} == want_rel
    assert len(want_dup) >= 2


def test_reference_tags_answer_encoder_unavailable_like_query(reference_index, capsys):
    idx = reference_index["index"]
    assert main(["tags", "--index", idx]) == EXIT_REJECTED
    tags_err = capsys.readouterr().err
    assert main(["query", "watercolor", "--index", idx]) == EXIT_REJECTED
    query_err = capsys.readouterr().err
    assert "cannot encode text queries for this index" in tags_err and "ViT-B-32" in tags_err
    assert tags_err.strip().splitlines()[-1] == query_err.strip().splitlines()[-1]
    service = RankerService(load_fixed_index(idx))
    assert service.get("civitai-440425")["tags"] is None  # untagged: null, not an empty list
    with pytest.raises(ServiceError) as e:
        service.tags()
    assert e.value.status == 409


@pytest.mark.parametrize("argv, needle", [
    (["duplicates", "--min-cosine", "1.5"], "min_cosine"),
    (["duplicates", "--min-strength-ratio", "0"], "min_strength_ratio"),
    (["duplicates", "civitai-0"], "unknown lora_id"),
    (["groups", "--limit", "0"], "limit"),
    (["tags", "--calibration", "best"], "calibration"),
])
def test_reference_bad_input_is_a_usage_error(reference_index, capsys, argv, needle):
    assert main([*argv, "--index", reference_index["index"]]) == EXIT_USAGE
    assert needle in capsys.readouterr().err


# ---- a small tiny-CLIP index: tags against an independent computation ---------------------------------
@pytest.fixture(scope="module")
def tiny_tag_index(tmp_path_factory):
    """40 signatures whose directions are the plain-path tag vectors of planted micro words plus noise."""
    from carlos_ray.config import EncoderSpec, SamplingSpec
    from carlos_ray.models import create_encoder
    from carlos_ray.prompts import load_prompt_set
    from carlos_ray.query import QueryEncoder

    spec = EncoderSpec(arch="tiny")
    sampling = SamplingSpec(context_subset="tiny")
    enc = create_encoder(spec)
    texts = list(load_prompt_set(sampling.context_prompts, sampling.context_subset).texts)
    qe = QueryEncoder(enc.model.eval(), enc.tokenizer, texts)
    vocab = TagVocabulary.from_file("micro")
    plain = qe.plain_encode(vocab.tags).astype(np.float64)  # the reference path, no caches
    rng = np.random.default_rng(0)
    planted = rng.integers(0, len(vocab.tags), 40)
    unit = plain / np.linalg.norm(plain, axis=1, keepdims=True)
    dirs = unit[planted] * rng.uniform(1, 3, (40, 1)) + 0.02 * rng.standard_normal((40, plain.shape[1]))
    ids = [f"lora-{i:02d}" for i in range(40)]
    table = pa.table({"lora_id": ids, "name": [f"L{i}" for i in range(40)], "direction": [list(r) for r in dirs],
                      "strength": rng.uniform(1, 5, 40), "consistency": rng.uniform(0.2, 0.6, 40)})
    path = tmp_path_factory.mktemp("tags") / "idx"
    index = Index(str(path))
    with index:
        index.init({"config_name": "micro", "encoder": spec.model_dump(), "sampling": sampling.model_dump(),
                    "query": {"joiner": " "}, "thresholds": {"max_strength": None, "min_consistency": None}})
        index.commit({"signatures": table})
    return {"path": str(path), "plain": plain, "dirs": dirs, "ids": ids, "planted": planted, "vocab": vocab}


def test_tag_index_matches_plain_vectors_and_numpy_zscores(tiny_tag_index):
    t = tiny_tag_index
    summary = tag_index(t["path"], vocabulary="micro", load_encoder=load_query_encoder)
    assert summary["vectors_cached"] is False and summary["calibration"] == "centered" and summary["loras"] == 40
    words = t["vocab"].tags
    u = t["dirs"] / np.linalg.norm(t["dirs"], axis=1, keepdims=True)
    tv = t["plain"] / np.linalg.norm(t["plain"], axis=1, keepdims=True)
    c = u @ tv.T
    centered = c - c.mean(axis=0)
    z = (c - c.mean(axis=0)) / c.std(axis=0)
    for calibration, score, cut in (("centered", centered, 0.2), ("zscore", z, 2.0)):
        if calibration != "centered":
            again = tag_index(t["path"], vocabulary="micro", calibration=calibration)
            assert again["vectors_cached"] is True and again["calibration"] == calibration
        stored = {r["lora_id"]: r for r in Index(t["path"]).snapshot().table("tags").to_pylist()}
        for i, lid in enumerate(t["ids"]):
            order = [int(k) for k in np.argsort(-score[i], kind="stable")[:3] if score[i, k] >= cut]
            assert stored[lid]["tags"] == [words[k] for k in order]
            assert stored[lid]["tag_scores"] == pytest.approx([score[i, k] for k in order], abs=1e-3)
            assert stored[lid]["top1"] == words[int(np.argmax(score[i]))]
        top1 = np.array([words.index(stored[lid]["top1"]) for lid in t["ids"]])
        assert (top1 == t["planted"]).mean() >= 0.9, calibration
    again = tag_index(t["path"], vocabulary="micro", calibration="rank")
    assert again["vectors_cached"] is True and again["calibration"] == "rank"


def test_tags_in_lora_search_filter_and_errors(tiny_tag_index):
    t = tiny_tag_index
    tag_index(t["path"], vocabulary="micro", load_encoder=load_query_encoder)
    service = RankerService(load_fixed_index(t["path"]))
    stored = {r["lora_id"]: r for r in Index(t["path"]).snapshot().table("tags").to_pylist()}
    for i in t["ids"]:
        assert [x["tag"] for x in service.get(i)["tags"]] == stored[i]["tags"]
    lid = next(i for i in t["ids"] if stored[i]["tags"])
    tag = stored[lid]["tags"][0]
    carriers = {i for i, r in stored.items() if tag in r["tags"]}
    q = t["plain"][t["vocab"].tags.index(tag)]
    out = service.search(q[None], k=40, max_strength=math.inf, min_consistency=0.0, tag=tag)
    got = [h["lora_id"] for h in out["hits"][0]]
    u = t["dirs"] / np.linalg.norm(t["dirs"], axis=1, keepdims=True)
    score = {i: float(u[k] @ (q / np.linalg.norm(q))) for k, i in enumerate(t["ids"]) if i in carriers}
    assert got == sorted(score, key=lambda i: (-score[i], i))
    body = service.tags()
    assert sum(x["loras"] for x in body["tags"]) == sum(len(r["tags"]) for r in stored.values())
    for bad, status in (("no-such-word", 422), ("", 422)):
        with pytest.raises(ServiceError) as e:
            service.search(q[None], k=3, max_strength=None, min_consistency=None, tag=bad)
        assert e.value.status == status
    assert service.check_tag(tag.upper()) == tag


# ---- exact duplicates recorded while collecting sources ----------------------------------------------
def test_exact_copies_are_listed_and_indexed_once(zoo_dir, tmp_path, tiny_config):
    from carlos_ray.behavior.duplicates import exact_duplicates
    from carlos_ray.indexing import collect_sources
    from carlos_ray.models.generator import generator_lora_targets

    src = sorted(p for p in zoo_dir.iterdir() if p.suffix == ".safetensors")[0]
    copies = tmp_path / "other" / "folder"
    copies.mkdir(parents=True)
    shutil.copy(src, copies / "renamed_v2_final.safetensors")
    aliases: list[dict] = []
    jobs, _, dups = collect_sources([str(zoo_dir), str(tmp_path / "other")], generator_lora_targets(tiny_config.generator),
                                    aliases=aliases)
    assert dups == 1 and len(aliases) == 1
    assert aliases[0]["path"].endswith("renamed_v2_final.safetensors")
    job = next(j for j in jobs if j.lora_id == aliases[0]["lora_id"])
    assert job.path == str(src.resolve()) or job.path == str(src)
    import hashlib

    assert aliases[0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    listed = exact_duplicates([(j.path, j.sha256) for j in jobs] + [(a["path"], a["sha256"]) for a in aliases])
    assert len(listed) == 1 and listed[0].other_paths == [aliases[0]["path"]]
