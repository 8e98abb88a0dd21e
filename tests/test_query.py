"""QueryEncoder: the fast path (cached u(p'), no padding, prefix KV cache) against a plain reference.

The reference here is written independently of carlos_ray.query: tokenize P' and every p' + joiner
+ q with the open_clip tokenizer, run `model.encode_text` on the full 77-token rows, subtract, mean.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carlos_ray.query import QueryEncoder

REL_TOL = 1e-4

SUBJECTS = ["a cat", "an old lighthouse", "a red bicycle", "two children", "a bowl of ramen", "a dragon"]
PLACES = ["at dawn", "in the rain", "on a quiet hill", "under neon city lights", "by the sea"]
STYLES = ["watercolor", "pixel art", "oil painting", "cyberpunk", "origami", "charcoal sketch", "ukiyo-e"]


def make_context(n: int) -> list[str]:
    """Placeholder context prompts of varied length (the real P' lives in conf/prompts)."""
    return [f"{SUBJECTS[i % len(SUBJECTS)]} {PLACES[i % len(PLACES)]}, view {i}" for i in range(n)]


# short, medium, ending in punctuation, ~60 tokens (queries overflow 77), >= 76 tokens (query fully cut)
EDGE_CONTEXT = [
    "x",
    "a photo of a cat",
    "hello!",
    "a wide landscape with " + " and ".join(["tall mountains", "green valleys", "rivers"] * 8),
    "an endless list: " + ", ".join(["apples", "pears", "plums"] * 14),
]

QUERIES = [
    "dog",
    "in watercolor",
    "a cinematic photo with dramatic neon lighting, heavy rain and soft bokeh",
    "very " * 30 + "long",
    "",
    "cat's 3rd birthday!!",
]


def tiny_clip(custom_text: bool = False, quick_gelu: bool = False, **text_overrides) -> torch.nn.Module:
    text_cfg = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    text_cfg.update(text_overrides)
    vision_cfg = dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16)
    torch.manual_seed(0)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    model = cls(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def model():
    return tiny_clip()


@torch.no_grad()
def reference_delta(model, tokenizer, context: list[str], queries: list[str], joiner: str = " ") -> np.ndarray:
    u_ctx = model.encode_text(tokenizer(context)).double()
    rows = []
    for q in queries:
        u_q = model.encode_text(tokenizer([p + joiner + q for p in context])).double()
        rows.append((u_q - u_ctx).mean(dim=0))
    return torch.stack(rows).numpy()


def assert_close(got: np.ndarray, ref: np.ndarray, scale: float) -> None:
    """Per-row relative L2 error <= REL_TOL; rows whose reference is ~0 are compared to `scale`."""
    assert got.shape == ref.shape and got.dtype == np.float32
    err = np.linalg.norm(got - ref, axis=-1)
    denom = np.maximum(np.linalg.norm(ref, axis=-1), scale)
    assert np.all(err / denom <= REL_TOL), (err / denom)


def feature_scale(model, tokenizer, context) -> float:
    with torch.no_grad():
        return 1e-2 * float(model.encode_text(tokenizer(context)).norm(dim=-1).mean())


def test_edge_context_really_truncates(tokenizer):
    """Guard for the truncation tests below: the edge prompts do overflow the 77-token context."""
    lengths = [len(tokenizer.encode(p)) + 2 for p in EDGE_CONTEXT]
    assert lengths[3] + len(tokenizer.encode(QUERIES[2])) > 77 >= lengths[3]
    assert lengths[4] >= 77


def test_single_queries_match_reference(model, tokenizer):
    context = make_context(7) + EDGE_CONTEXT
    enc = QueryEncoder(model, tokenizer, context)
    assert enc.fast_path, enc.fast_path_disabled_reason
    ref = reference_delta(model, tokenizer, context, QUERIES)
    got = np.stack([enc.encode_one(q) for q in QUERIES])
    assert_close(got, ref, feature_scale(model, tokenizer, context))
    assert np.linalg.norm(ref[0]) > 0.1  # the reference is not trivially zero
    assert np.allclose(ref[4], 0.0)  # the empty query changes no token


def test_batched_mixed_lengths_match_reference_and_single(model, tokenizer):
    context = make_context(9) + EDGE_CONTEXT
    enc = QueryEncoder(model, tokenizer, context, cache_size=0)
    ref = reference_delta(model, tokenizer, context, QUERIES)
    batched = enc.encode(QUERIES)
    assert batched.shape == (len(QUERIES), enc.dim)
    assert_close(batched, ref, feature_scale(model, tokenizer, context))
    single = np.stack([enc.encode_one(q) for q in QUERIES])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc.plain_encode(QUERIES), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("joiner", [" ", ""])
def test_small_token_budget_chunks_prompts_and_queries(model, tokenizer, joiner):
    """A 7-token budget forces chunking of the prefix pass, of queries and of prompts within a query."""
    context = make_context(5) + EDGE_CONTEXT[1:4]
    queries = ["dog", "s in watercolor", QUERIES[2]]
    enc = QueryEncoder(model, tokenizer, context, joiner=joiner, max_tokens_per_pass=7)
    ref = reference_delta(model, tokenizer, context, queries, joiner=joiner)
    assert_close(enc.encode(queries), ref, feature_scale(model, tokenizer, context))


def test_duplicates_and_empty_batch(model, tokenizer):
    context = make_context(5)
    enc = QueryEncoder(model, tokenizer, context)
    out = enc.encode(["dog", "cat", "dog"])
    assert np.array_equal(out[0], out[2])
    assert enc.encode([]).shape == (0, enc.dim)


@pytest.mark.parametrize("joiner", ["", ",", "!", "  ", " - "])
def test_joiners_including_non_splitting_ones(model, tokenizer, joiner, caplog):
    context = make_context(4) + ["hello!", "cats"]
    queries = ["dog", "?!", "s on a mat", "in watercolor"]
    enc = QueryEncoder(model, tokenizer, context, joiner=joiner)
    with caplog.at_level(logging.DEBUG, logger="carlos_ray.query"):
        got = enc.encode(queries)
    ref = reference_delta(model, tokenizer, context, queries, joiner=joiner)
    assert_close(got, ref, feature_scale(model, tokenizer, context))
    if joiner == "":  # "cats" + "s on a mat" re-tokenizes across the boundary: exact fallback used
        assert "do not split" in caplog.text


@pytest.mark.parametrize(
    "variant",
    [
        dict(ls_init_value=0.5),
        dict(quick_gelu=True),
        dict(pool_type="last"),
        dict(pool_type="eos", eos_id=49407),
        dict(custom_text=True),
        dict(custom_text=True, proj_bias=True),
    ],
    ids=["layerscale", "quickgelu", "pool-last", "pool-eos", "customtextclip", "linear-proj"],
)
def test_supported_variants(tokenizer, variant):
    model = tiny_clip(**variant)
    context = make_context(4) + EDGE_CONTEXT[2:]
    enc = QueryEncoder(model, tokenizer, context)
    assert enc.fast_path, enc.fast_path_disabled_reason
    queries = ["dog", QUERIES[2], ""]
    ref = reference_delta(model, tokenizer, context, queries)
    assert_close(enc.encode(queries), ref, feature_scale(model, tokenizer, context))


@pytest.mark.parametrize(
    "variant, reason",
    [(dict(no_causal_mask=True), "causal"), (dict(qk_norm=True), "ResidualAttentionBlock")],
    ids=["bidirectional", "custom-block"],
)
def test_unsupported_variants_fall_back_to_plain(tokenizer, variant, reason, caplog):
    model = tiny_clip(**variant)
    context = make_context(4)
    with caplog.at_level(logging.WARNING, logger="carlos_ray.query"):
        enc = QueryEncoder(model, tokenizer, context)
    assert not enc.fast_path
    assert reason in enc.fast_path_disabled_reason and "fast path disabled" in caplog.text
    queries = ["dog", "in watercolor"]
    ref = reference_delta(model, tokenizer, context, queries)
    assert_close(enc.encode(queries), ref, feature_scale(model, tokenizer, context))


def test_vit_b32_random_weights(tokenizer):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    context = make_context(14) + EDGE_CONTEXT[3:]  # 16 prompts, two of them overflow with long queries
    enc = QueryEncoder(model, tokenizer, context)
    assert enc.fast_path and enc.dim == 512
    queries = ["dog", "in watercolor style", QUERIES[2]]
    ref = reference_delta(model, tokenizer, context, queries)
    assert_close(enc.encode(queries), ref, feature_scale(model, tokenizer, context))


def test_lru_cache_hits_eviction_and_copies(model, tokenizer):
    enc = QueryEncoder(model, tokenizer, make_context(5), cache_size=2)
    first = enc.encode_one("dog")
    again = enc.encode_one("dog")
    assert np.array_equal(first, again)
    assert enc.cache_info() == {"hits": 1, "misses": 1, "size": 1, "maxsize": 2}
    again[:] = 0.0  # results are copies: mutating one does not corrupt the cache
    assert np.array_equal(enc.encode_one("dog"), first)
    enc.encode(["cat", "bird"])  # "dog" is least recently used -> evicted
    info = enc.cache_info()
    assert info["size"] == 2
    enc.encode_one("dog")
    assert enc.cache_info()["misses"] == info["misses"] + 1

    off = QueryEncoder(model, tokenizer, make_context(5), cache_size=0)
    off.encode_one("dog")
    off.encode_one("dog")
    assert off.cache_info() == {"hits": 0, "misses": 2, "size": 0, "maxsize": 0}


def test_thread_safety_smoke(model, tokenizer):
    enc = QueryEncoder(model, tokenizer, make_context(6), cache_size=3)
    queries = [f"style number {i}" for i in range(6)]
    expected = {q: v for q, v in zip(queries, enc.plain_encode(queries))}
    barrier = threading.Barrier(4)

    def work(i: int) -> tuple[str, np.ndarray]:
        if i < 4:
            barrier.wait()
        q = queries[(i * 7) % len(queries)]
        return q, enc.encode_one(q)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(40)))
    for q, v in results:
        np.testing.assert_allclose(v, expected[q], rtol=1e-4, atol=1e-6)
    info = enc.cache_info()
    assert info["size"] <= 3 and info["hits"] + info["misses"] == 40


def test_input_validation(model, tokenizer):
    enc = QueryEncoder(model, tokenizer, make_context(3))
    with pytest.raises(TypeError, match="encode_one"):
        enc.encode("dog")
    with pytest.raises(TypeError, match="int"):
        enc.encode(["dog", 3])
    with pytest.raises(ValueError, match="non-empty"):
        QueryEncoder(model, tokenizer, [])
    with pytest.raises(ValueError, match="cache_size"):
        QueryEncoder(model, tokenizer, ["a"], cache_size=-1)
    with pytest.raises(ValueError, match="max_tokens_per_pass"):
        QueryEncoder(model, tokenizer, ["a"], max_tokens_per_pass=0)
    with pytest.raises(ValueError, match="cuda"):
        QueryEncoder(model, tokenizer, ["a"], device="cuda:0")


WORD = st.sampled_from(["dog", "cats", "s", "in", "watercolor", "neon", "3", "2024", "!", "?!", ",", "'s", "é", "日本"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(WORD, min_size=0, max_size=12),
    sep=st.sampled_from([" ", ""]),
    joiner=st.sampled_from([" ", "", ","]),
)
def test_property_fast_equals_reference(model, tokenizer, words, sep, joiner):
    context = ["a cat", "hello!", "cats", EDGE_CONTEXT[3]]
    query = sep.join(words)
    enc = QueryEncoder(model, tokenizer, context, joiner=joiner, cache_size=0)
    ref = reference_delta(model, tokenizer, context, [query], joiner=joiner)
    assert_close(enc.encode([query]), ref, feature_scale(model, tokenizer, context))
