"""The Ray Serve app over real HTTP on localhost: every endpoint, every bad input, a live index swap, the 503 path.

Two applications run on one Serve instance (the session fixture ``served`` in conftest, shared with the
browser tests): the tiny built index at ``/`` and, at ``/ref``, a copy whose manifest names the ViT-B-32
``openai`` encoder (not on this machine): text search must answer 503 at once while ``/loras`` and
``/similar`` keep working. HTTP results are checked against the
in-process Ranker + QueryEncoder.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carlos_ray.config import EncoderSpec
from carlos_ray.models.encoder import encoder_unavailable_reason
from carlos_ray.serving import load_query_encoder, load_ranker
from carlos_ray.store import Index

from tests.conftest import REF_ENCODER, SERVE_TOKEN as TOKEN, SERVE_TOKEN_ENV as TOKEN_ENV  # noqa: F401

QUERIES = ["watercolor", "neon city at night", "a photo of a dog", "gothic cathedral, dramatic light"]


@pytest.fixture(scope="module")
def env(served):
    """The session's Serve app (conftest ``served``) and the in-process ranker and encoder of its index."""
    idx = served["idx"]
    ranker, manifest = load_ranker(str(idx))
    ids = Index(str(idx)).snapshot().signatures().column("lora_id").to_pylist()
    return {**served, "ranker": ranker, "manifest": manifest.model_dump(), "encoder": load_query_encoder(manifest),
            "manifest_ids": ids}


def _get(env, path, **params):
    return requests.get(env["url"] + path, params=params, timeout=60)


def _expected(env, query, k=10, **filters):
    vec = env["encoder"].encode([query])[0]
    return env["ranker"].search(vec, k=k, **filters)


def _same_hits(http_hits, expected):
    assert [h["lora_id"] for h in http_hits] == [h.lora_id for h in expected]
    assert [h["rank"] for h in http_hits] == list(range(1, len(expected) + 1))
    for got, want in zip(http_hits, expected):
        assert got["score"] == pytest.approx(want.score, abs=1e-5)
        assert got["strength"] == pytest.approx(want.strength) and got["consistency"] == pytest.approx(want.consistency)
        assert got["name"] == want.name and got["trigger_words"] == list(want.trigger_words or [])


def _some_id(env) -> str:
    """A LoRA with a non-zero direction (the zoo's no-op LoRA has none: similarity to it is a 422)."""
    sig = Index(str(env["idx"])).snapshot().signatures()
    for lid, strength in zip(sig.column("lora_id").to_pylist(), sig.column("strength").to_pylist()):
        if lid in env["manifest_ids"] and strength > 0:
            return lid
    raise AssertionError("the served index has no LoRA with a non-zero direction")


def _error(r, status, code, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])
    assert "Traceback" not in body["detail"] and "/tmp/" not in body["detail"] and "/work/" not in body["detail"]
    return body


# ---- every endpoint -------------------------------------------------------------------------------------
def test_healthz_and_index_describe_the_served_index(env):
    m = env["manifest"]
    h = _get(env, "/healthz")
    assert h.status_code == 200 and h.json() == {"status": "ok", "index_version": m["version"], "search_available": True}
    info = _get(env, "/index").json()
    assert info["version"] == m["version"] and info["config_hash"] == m["config_hash"]
    assert info["counts"] == m["counts"] and info["loras"] == m["counts"]["signatures"] == len(env["ranker"])
    assert info["dim"] == env["ranker"].dim == env["encoder"].dim
    assert info["thresholds"] == m["thresholds"]
    assert info["query"]["max_query_chars"] == m["query"]["max_query_chars"]
    assert info["max_k"] == 100 and info["search_available"] is True and info["search_unavailable_reason"] is None
    assert info["encoder"]["arch"] == "tiny"


def test_get_search_equals_in_process_ranker_and_encoder(env):
    th = env["manifest"]["thresholds"]
    for q in QUERIES:
        r = _get(env, "/search", q=q, k=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"] == q and body["k"] == 5 and body["index_version"] == env["manifest"]["version"]
        assert body["max_strength"] == th["max_strength"] and body["min_consistency"] == th["min_consistency"]
        _same_hits(body["hits"], _expected(env, q, k=5))
    # filters switched off (strength inf, consistency >= 0) and a tighter strength filter
    r = _get(env, "/search", q="neon", k=100, max_strength="inf", min_consistency=0)
    loose = _expected(env, "neon", k=100, max_strength=math.inf, min_consistency=0.0)
    _same_hits(r.json()["hits"], loose)
    assert r.json()["max_strength"] is None and r.json()["min_consistency"] == 0.0
    cut = float(np.median([h.strength for h in loose]))
    r = _get(env, "/search", q="neon", k=100, max_strength=cut, min_consistency=0)
    _same_hits(r.json()["hits"], _expected(env, "neon", k=100, max_strength=cut, min_consistency=0.0))
    assert all(h["strength"] <= cut for h in r.json()["hits"]) and 0 < len(r.json()["hits"]) < len(loose)


def test_post_search_answers_each_query_like_get(env):
    r = requests.post(env["url"] + "/search", json={"queries": QUERIES, "k": 3}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["query"] for x in body["results"]] == QUERIES and body["k"] == 3
    for result in body["results"]:
        _same_hits(result["hits"], _expected(env, result["query"], k=3))


def test_concurrent_queries_are_batched_and_still_exact(env):
    queries = [f"{w} style {i}" for i, w in enumerate(["neon", "oil", "pixel", "ink", "marble", "frost", "sepia", "gold"] * 2)]
    with ThreadPoolExecutor(len(queries)) as pool:
        responses = list(pool.map(lambda q: _get(env, "/search", q=q, k=4), queries))
    assert all(r.status_code == 200 for r in responses)
    for q, r in zip(queries, responses):
        _same_hits(r.json()["hits"], _expected(env, q, k=4))
    stats = _get(env, "/index").json()["encoder_stats"]
    assert stats["max_batch"] > 1, stats  # @serve.batch put concurrent queries into one encoder pass
    assert stats["queries"] >= len(queries)


def test_lora_and_similar_endpoints(env):
    ranker = env["ranker"]
    lid = ranker.search(env["encoder"].encode(["x"])[0], k=1, max_strength=math.inf, min_consistency=-1.0)[0].lora_id
    r = _get(env, f"/loras/{lid}")
    assert r.status_code == 200
    body = r.json()
    row = ranker.get(lid)
    assert body["lora_id"] == lid and body["dim"] == ranker.dim and "direction" not in body["signature"]
    assert body["signature"]["sha256"] == row["sha256"] and body["signature"]["strength"] == pytest.approx(row["strength"])
    r = _get(env, f"/loras/{lid}/similar", k=4)
    assert r.status_code == 200
    assert r.json()["lora_id"] == lid
    _same_hits(r.json()["hits"], ranker.similar(lid, k=4))
    assert lid not in [h["lora_id"] for h in r.json()["hits"]]


def test_openapi_docs(env):
    assert _get(env, "/docs").status_code == 200
    spec = _get(env, "/openapi.json").json()
    for path in ("/search", "/loras/{lora_id}", "/loras/{lora_id}/similar", "/index", "/healthz", "/admin/reload"):
        assert path in spec["paths"], path
    assert "post" in spec["paths"]["/search"] and "get" in spec["paths"]["/search"]


def test_groups_and_duplicates_endpoints_match_the_index(env):
    sig = Index(str(env["idx"])).snapshot().signatures()
    ids = sig.column("lora_id").to_pylist()
    d = np.array(sig.column("direction").to_pylist(), dtype=np.float64)
    s = np.asarray(sig.column("strength").to_pylist(), dtype=np.float64)
    c = np.asarray(sig.column("consistency").to_pylist(), dtype=np.float64)
    norms = np.linalg.norm(d, axis=1)
    th = env["manifest"]["thresholds"]
    inside = (norms > 0) & (s <= (th.get("max_strength") or math.inf)) & (c >= (th.get("min_consistency") or -math.inf))
    r = _get(env, "/groups", limit=10000)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["grouped"] == int(inside.sum()) and body["grouped"] + body["ungrouped"] == len(ids)
    assert sorted(m["lora_id"] for g in body["groups"] for m in g["members"]) == sorted(i for i, k in zip(ids, inside) if k)
    lid = _some_id(env)
    row = ids.index(lid)
    u = np.divide(d, norms[:, None], out=np.zeros_like(d), where=norms[:, None] > 0)
    for min_cos in (0.95, 0.3):
        r = _get(env, f"/loras/{lid}/duplicates", min_cosine=min_cos, min_strength_ratio=0.8)
        assert r.status_code == 200, r.text
        body = r.json()
        cos = u @ u[row]
        ratio = np.minimum(s, s[row]) / np.maximum(s, s[row])
        near = [j for j in range(len(ids)) if j != row and cos[j] >= min_cos]
        assert {x["lora_id"] for x in body["duplicates"]} == {ids[j] for j in near if ratio[j] >= 0.8}
        assert body["family_min_cosine"] == pytest.approx(min(min_cos, 0.95))  # the tiny profile's family cosine
        assert {x["lora_id"] for x in body["scale_relatives"]} == {ids[j] for j in near if ratio[j] < 0.8}
    assert _get(env, f"/loras/{lid}").json()["tags"] is None  # the tiny index has no tags yet


def test_behaviour_bad_input_and_tag_errors(env):
    lid = _some_id(env)
    _error(_get(env, "/loras/no-such-lora/duplicates"), 404, "unknown_lora", "no-such-lora")
    _error(_get(env, f"/loras/{lid}/duplicates", min_cosine=1.5), 422, "invalid_threshold", "min_cosine")
    _error(_get(env, f"/loras/{lid}/duplicates", min_strength_ratio="nan"), 422, "invalid_threshold", "min_strength_ratio")
    _error(_get(env, f"/loras/{lid}/duplicates", min_cosine="abc"), 422, "invalid_request", "min_cosine")
    _error(_get(env, "/groups", limit=0), 422, "invalid_limit")
    _error(_get(env, "/groups", min_size=-3), 422, "invalid_min_size")
    _error(_get(env, "/tags"), 409, "tags_not_computed", "carlos-ray tags")
    _error(_get(env, "/search", q="watercolor", tag="striped"), 409, "tags_not_computed")
    spec = _get(env, "/openapi.json").json()
    for path in ("/groups", "/tags", "/loras/{lora_id}/duplicates"):
        assert path in spec["paths"] and "200" in spec["paths"][path]["get"]["responses"], path
    assert "tag" in {p["name"] for p in spec["paths"]["/search"]["get"]["parameters"]}
    # /ref names ViT-B-32/openai, whose weights this machine does not have: tags fail exactly like /search
    assert encoder_unavailable_reason(EncoderSpec(**REF_ENCODER)) is not None
    same = _error(_get(env, "/ref/search", q="watercolor"), 503, "encoder_unavailable")
    assert _error(_get(env, "/ref/tags"), 503, "encoder_unavailable") == same
    assert _get(env, "/ref/groups").status_code == 200
    assert _get(env, f"/ref/loras/{lid}/duplicates").status_code == 200


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_get_search_inputs_are_422_with_a_reason(env):
    limit = env["manifest"]["query"]["max_query_chars"]
    cases = [
        (dict(q=""), "empty_query", "empty"),
        (dict(q="   \t "), "empty_query", "whitespace"),
        (dict(q="a" * (limit + 1)), "query_too_long", str(limit)),
        (dict(k=3), "invalid_request", "'q'"),
        (dict(q="cat", k=0), "invalid_k", "from 1 to 100"),
        (dict(q="cat", k=-3), "invalid_k", "-3"),
        (dict(q="cat", k=101), "invalid_k", "101"),
        (dict(q="cat", k="abc"), "invalid_request", "'k'"),
        (dict(q="cat", k="2.5"), "invalid_request", "'k'"),
        (dict(q="cat", max_strength="abc"), "invalid_request", "'max_strength'"),
        (dict(q="cat", max_strength=-1), "invalid_threshold", "max_strength"),
        (dict(q="cat", max_strength="nan"), "invalid_threshold", "max_strength"),
        (dict(q="cat", min_consistency=-0.1), "invalid_threshold", "min_consistency"),
        (dict(q="cat", min_consistency=1.5), "invalid_threshold", "0 to 1"),
        (dict(q="cat", min_consistency="x"), "invalid_request", "'min_consistency'"),
    ]
    t0 = time.monotonic()
    for params, code, needle in cases:
        _error(_get(env, "/search", **params), 422, code, needle)
    assert time.monotonic() - t0 < 30  # nothing hangs
    assert _get(env, "/search", q="a" * limit, k=100).status_code == 200  # the limit itself is fine


def test_bad_post_search_bodies_are_422(env):
    url = env["url"] + "/search"
    cases = [
        ({"queries": []}, "invalid_query", "non-empty"),
        ({"queries": ["cat", "  "]}, "empty_query", "queries[1]"),
        ({"queries": ["cat"] * 33}, "too_many_queries", "32"),
        ({"queries": "cat"}, "invalid_request", "queries"),
        ({"queries": ["cat"], "k": 0}, "invalid_k", "0"),
        ({"queries": ["cat"], "bogus": 1}, "invalid_request", "bogus"),
        ({"queries": ["cat"], "max_strength": -2}, "invalid_threshold", "max_strength"),
        ({"k": 3}, "invalid_request", "queries"),
    ]
    for body, code, needle in cases:
        _error(requests.post(url, json=body, timeout=60), 422, code, needle)
    _error(requests.post(url, data="not json", headers={"Content-Type": "application/json"}, timeout=60), 422,
           "invalid_request")
    _error(requests.post(url, data='{"queries": ["cat"], "max_strength": NaN}', headers={"Content-Type": "application/json"},
                         timeout=60), 422, "invalid_threshold")


def test_unknown_ids_routes_and_methods(env):
    _error(_get(env, "/loras/no-such-lora"), 404, "unknown_lora", "no-such-lora")
    _error(_get(env, "/loras/no-such-lora/similar"), 404, "unknown_lora", "no-such-lora")
    lid = _some_id(env)
    _error(_get(env, f"/loras/{lid}/similar", k=0), 422, "invalid_k")
    _error(_get(env, f"/loras/{lid}/similar", k=1000), 422, "invalid_k")
    _error(_get(env, f"/loras/{lid}/similar", min_consistency=-1), 422, "invalid_threshold")
    _error(_get(env, "/nowhere"), 404, "not_found", "/nowhere")
    _error(requests.delete(env["url"] + "/search", timeout=60), 405, "method_not_allowed")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q=st.text(max_size=60), k=st.integers(min_value=-5, max_value=120))
def test_any_text_and_k_gets_200_or_a_4xx_never_5xx(env, q, k):
    r = _get(env, "/search", q=q, k=k)
    assert r.status_code in (200, 422), (r.status_code, r.text)
    body = r.json()
    if r.status_code == 200:
        assert 1 <= k <= 100 and q.strip() and len(body["hits"]) <= k
    else:
        assert set(body) == {"error", "detail"}


# ---- admin ---------------------------------------------------------------------------------------------
def test_admin_reload_needs_the_bearer_token(env):
    url = env["url"] + "/admin/reload"
    r = requests.post(url, timeout=60)
    _error(r, 401, "unauthorized", "Bearer")
    assert r.headers.get("www-authenticate") == "Bearer"
    _error(requests.post(url, headers={"Authorization": "Bearer wrong"}, timeout=60), 403, "forbidden")
    _error(requests.post(url, headers={"Authorization": "Basic abc"}, timeout=60), 401, "unauthorized")
    r = requests.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 200 and r.json() == {"version": env["manifest"]["version"], "reloaded": True}


# ---- encoder not on this machine ---------------------------------------------------------------------
def test_index_with_unavailable_encoder_serves_everything_but_search(env):
    if encoder_unavailable_reason(EncoderSpec(**REF_ENCODER)) is None:
        pytest.skip("ViT-B-32/openai weights are in this machine's cache")
    t0 = time.monotonic()
    body = _error(_get(env, "/ref/search", q="watercolor"), 503, "encoder_unavailable", "ViT-B-32", "/loras")
    assert time.monotonic() - t0 < 5, "the 503 must be immediate"
    assert "cache" in body["detail"]
    _error(requests.post(env["url"] + "/ref/search", json={"queries": ["a", "b"]}, timeout=60), 503, "encoder_unavailable")
    _error(_get(env, "/ref/search", q=" "), 422, "empty_query")  # bad input is still a 4xx
    lid = _some_id(env)
    assert _get(env, f"/ref/loras/{lid}").status_code == 200
    r = _get(env, f"/ref/loras/{lid}/similar", k=3)
    assert r.status_code == 200
    _same_hits(r.json()["hits"], env["ranker"].similar(lid, k=3))
    info = _get(env, "/ref/index").json()
    assert info["search_available"] is False and "ViT-B-32" in info["search_unavailable_reason"]
    assert info["encoder"]["arch"] == "ViT-B-32"
    assert _get(env, "/ref/healthz").json()["status"] == "degraded"


# ---- limits, exposure, fuzzing --------------------------------------------------------------------------
def _no_leak(text: str, env) -> None:
    """An error body never shows a stack trace or a file system path of the server."""
    for needle in ("Traceback", 'File "', str(env["idx"]), str(env["ref"]), "/tmp/", "/work/", "site-packages", ".py\""):
        assert needle not in text, (needle, text[:500])


def test_request_size_limits_are_enforced(env):
    info = _get(env, "/index").json()
    max_body, max_url = info["max_body_bytes"], info["max_url_chars"]
    assert (max_body, max_url) == (65536, 4096)
    r = requests.post(env["url"] + "/search", data=b'{"queries": ["' + b"a" * max_body + b'"]}',
                      headers={"Content-Type": "application/json"}, timeout=60)
    _error(r, 413, "body_too_large", str(max_body))

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield b'{"queries": ["'
        for _ in range(40):
            yield b"b" * 4096
        yield b'"]}'

    r = requests.post(env["url"] + "/search", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    _error(r, 413, "body_too_large")
    _error(_get(env, "/search", q="c" * (max_url + 1)), 414, "uri_too_long", str(max_url))
    _error(_get(env, "/loras/" + "d" * (max_url + 1)), 414, "uri_too_long")
    # just under the limits the usual validation answers
    _error(_get(env, "/search", q="e" * 1000), 422, "query_too_long")
    r = requests.post(env["url"] + "/search", json={"queries": ["watercolor"] * 2, "k": 3}, timeout=60)
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_binds_localhost_and_reload_needs_a_token(env):
    from carlos_ray.serving import ServeArgs

    assert ServeArgs(index="x").host == "127.0.0.1"
    import yaml

    conf = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "serve", "config.yaml")))
    assert conf["http_options"]["host"] == "127.0.0.1"
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": "Basic " + TOKEN}, 401),
                            ({"Authorization": "Bearer " + TOKEN}, 200)):
        r = requests.post(env["url"] + "/admin/reload", headers=headers, timeout=60)
        assert r.status_code == status, (headers, r.text)
        _no_leak(r.text, env)
    assert requests.get(env["url"] + "/admin/reload", timeout=60).status_code == 405  # no state change over GET


FUZZ_EXAMPLES = 60  # per operation and per mode (schema-valid and schema-violating): bounded count, bounded time


def test_fuzzing_from_the_openapi_schema_finds_no_5xx_and_no_leak(env):
    """Property-based requests generated by schemathesis from the app's own OpenAPI schema."""
    import schemathesis
    from hypothesis import Phase, given
    from hypothesis import settings as hsettings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(env["url"] + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/search", "/loras/{lora_id}", "/loras/{lora_id}/similar", "/index",
                                              "/healthz", "/admin/reload"}
    statuses: Counter = Counter()
    bad: list[str] = []
    no_negative: list[str] = []
    t0 = time.monotonic()
    with requests.Session() as session:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @hsettings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                           phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case):
                    r = case.call(base_url=env["url"], session=session, timeout=60)
                    statuses[r.status_code] += 1
                    text = r.content.decode("utf-8", "replace")
                    if r.status_code >= 500:
                        bad.append(f"{case.method} {case.path} {case.path_parameters} {case.query} -> {r.status_code} {text[:200]}")
                    if op.path == "/admin/reload":
                        assert r.status_code in (401, 403, 405, 413, 414, 422), (r.status_code, case.headers)
                    _no_leak(text, env)

                try:
                    run()
                except Unsatisfiable:  # an operation without parameters has no schema-violating request
                    assert mode == GenerationMode.NEGATIVE, op.path
                    no_negative.append(f"{op.method.upper()} {op.path}")
    total = sum(statuses.values())
    print(f"fuzzed {total} requests over {len(operations)} operations in {time.monotonic() - t0:.1f}s: "
          f"{dict(statuses)}; no schema-violating case exists for {no_negative}")
    assert not {"GET /search", "POST /search", "GET /loras/{lora_id}/similar"} & set(no_negative), no_negative
    assert not bad, bad[:5]
    assert total >= 100, statuses
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses), statuses


# ---- a new index version while requests are in flight (last: it changes the index) -----------------
CLIENTS = 32


def test_index_swap_under_load_fails_no_request(env):
    """32 concurrent clients (GET and POST /search, /similar, /index) while a new index version is committed."""
    url = env["url"]
    some_id = _some_id(env)
    v0 = _get(env, "/index").json()["version"]
    n0 = _get(env, "/index").json()["loras"]
    stop = threading.Event()
    failures: list[str] = []
    statuses: Counter = Counter()
    versions: set = set()
    lock = threading.Lock()

    def hammer(kind: int) -> None:
        i = 0
        with requests.Session() as s:
            while not stop.is_set():
                i += 1
                try:
                    if kind == 0:
                        r = s.get(url + "/search", params={"q": f"neon {i}", "k": 5}, timeout=60)
                    elif kind == 1:
                        r = s.post(url + "/search", json={"queries": [f"ink {i}", "marble"], "k": 3}, timeout=60)
                    elif kind == 3:
                        r = s.get(url + f"/loras/{some_id}/similar", params={"k": 3}, timeout=60)
                    else:
                        r = s.get(url + "/index", timeout=60)
                except requests.RequestException as e:
                    with lock:
                        failures.append(repr(e))
                    continue
                with lock:
                    statuses[r.status_code] += 1
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        versions.add(r.json().get("index_version", r.json().get("version")))

    threads = [threading.Thread(target=hammer, args=(i % 4,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    # commit a new version: one more LoRA, a copy of an existing row pointing the opposite way
    index = Index(str(env["idx"]))
    old = index.snapshot().signatures()
    row = old.slice(0, 1).to_pylist()[0]
    row.update(lora_id="swapped-in", name="swapped in", direction=[-x for x in row["direction"]])
    with index:
        index.commit({"signatures": pa.Table.from_pylist([row], schema=old.schema)})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _get(env, "/index").json()["version"] != v0 + 1:
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures[:5]
    print(f"{CLIENTS} clients, {sum(statuses.values())} requests during the swap: {dict(statuses)}")
    assert statuses[200] >= 4 * CLIENTS, statuses
    assert versions == {v0, v0 + 1}, versions  # requests were answered by both versions, none failed in between
    info = _get(env, "/index").json()
    assert info["version"] == v0 + 1 and info["loras"] == n0 + 1 == info["counts"]["signatures"]
    assert _get(env, "/loras/swapped-in").status_code == 200
    ranker, _ = load_ranker(str(env["idx"]))
    vec = env["encoder"].encode(["neon"])[0]
    r = _get(env, "/search", q="neon", k=100, max_strength="inf", min_consistency=0)
    _same_hits(r.json()["hits"], ranker.search(vec, k=100, max_strength=math.inf, min_consistency=0.0))
    assert "swapped-in" in [h["lora_id"] for h in r.json()["hits"]] or ranker.get("swapped-in")["consistency"] < 0
