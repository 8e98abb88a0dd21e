"""Query encoding: the fast path (cached u(p'), no padding, prefix KV cache) vs the plain method.

Both compute Δq = mean over p' in P' of [u(p' + " " + q) − u(p')] with the same open_clip model:

- reference: ``QueryEncoder.plain_encode`` -- tokenize P' and every p' ⊕ q, run ``encode_text`` on
  the full 77-token padded sequences (2·|P'| sequences per query), subtract, mean;
- ours: ``QueryEncoder.encode`` after construction (which caches u(p') and the prefix keys/values)
  and a warm-up; every timed query is distinct, so the LRU cache never answers.

Full run: the ViT-B-32 text architecture with random weights (the numbers have no meaning, the
work does), |P'| = 280 from conf/prompts/context_prompts.yaml (generated sentences if the file is
missing), queries of 1, 3 and 8 words. Plain and fast run back to back per query so both see the
same machine load; the table reports medians (and the ratio of best times, which a shared, noisy
machine distorts less). ``--quick`` uses a tiny CLIP, 16 prompts and one thread.

    python benchmarks/bench_query.py [--quick] [--queries-per-length N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
try:
    from carlos_ray.query import QueryEncoder
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(REPO))
    from carlos_ray.query import QueryEncoder

CONTEXT_YAML = REPO / "conf" / "prompts" / "context_prompts.yaml"
LENGTHS = (1, 3, 8)
TARGET_SPEEDUP = 10.0  # for 1- and 3-word queries
TARGET_REL_ERROR = 1e-4
WORDS = (
    "watercolor neon cyberpunk vintage pastel gothic anime pixel baroque minimalist cinematic "
    "golden misty stormy autumn winter origami charcoal stained glass impressionist surreal "
    "ukiyo-e sketch dramatic soft glowing rusty velvet marble copper isometric lowpoly "
    "retro holographic noir sepia dreamy ornate crystal tropical frosted"
).split()


def context_prompts(n: int) -> tuple[list[str], str]:
    """n prompts from the context prompt file, topped up with generated sentences if needed."""
    texts: list[str] = []
    source = "generated"
    if CONTEXT_YAML.exists():
        import yaml

        with CONTEXT_YAML.open() as fh:
            data = yaml.safe_load(fh)
        texts = [p for prompts in data["categories"].values() for p in prompts][:n]
        source = str(CONTEXT_YAML.relative_to(REPO))
    subjects = ["a cat", "an old bridge", "a red bicycle", "a lighthouse", "a bowl of soup", "a dragon", "a market street"]
    places = ["at dawn", "in the rain", "on a quiet hill", "under city lights", "by the sea", "in a forest clearing"]
    i = 0
    while len(texts) < n:
        texts.append(f"{subjects[i % len(subjects)]} {places[(i // len(subjects)) % len(places)]}, view {i}")
        i += 1
    return texts, source


def make_queries(per_length: int, rng: np.random.Generator) -> dict[int, list[str]]:
    """Distinct queries of each word count (distinct across calls too, so the cache never hits)."""
    seen: set[str] = set()
    out: dict[int, list[str]] = {}
    for n_words in LENGTHS:
        qs: list[str] = []
        while len(qs) < per_length:
            q = " ".join(rng.choice(WORDS, size=n_words, replace=n_words > len(WORDS)))
            if q not in seen:
                seen.add(q)
                qs.append(q)
        out[n_words] = qs
    return out


def build_model(quick: bool):
    import open_clip

    torch.manual_seed(0)
    if quick:
        model = open_clip.model.CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
        )
        arch = "tiny (text width 64, 2 layers)"
    else:
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        arch = "ViT-B-32 (random weights)"
    return model.eval(), open_clip.get_tokenizer("ViT-B-32"), arch


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CLIP, 16 context prompts: a few seconds")
    parser.add_argument("--queries-per-length", type=int, default=None, help="timed queries per word count (default 3, quick 2)")
    parser.add_argument("--context-size", type=int, default=None, help="|P'| (default 280, quick 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 2; quick 1: tiny ops only pay thread hand-offs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    per_length = args.queries_per_length or (2 if args.quick else 3)
    n_context = args.context_size or (16 if args.quick else 280)
    model, tokenizer, arch = build_model(args.quick)
    texts, source = context_prompts(n_context)

    build_s, enc = timed(QueryEncoder, model, tokenizer, texts)
    if not enc.fast_path:
        raise SystemExit(f"fast path unavailable for this model: {enc.fast_path_disabled_reason}")
    # warm-up: both code paths once (allocator, thread pool, BPE cache for the warm-up words only)
    enc.encode(["warm up"])
    with torch.no_grad():
        model.encode_text(tokenizer(texts[:8]))

    queries = make_queries(per_length, np.random.default_rng(args.seed))
    per_len: dict[str, dict] = {}
    for n_words, qs in queries.items():
        plain_s, fast_s, errors = [], [], []
        for q in qs:
            misses = enc.cache_info()["misses"]
            tp, ref = timed(enc.plain_encode, [q])
            tf, got = timed(enc.encode, [q])
            if enc.cache_info()["misses"] != misses + 1:
                raise RuntimeError(f"timed query {q!r} was answered from the cache")
            plain_s.append(tp)
            fast_s.append(tf)
            errors.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
        plain_ms, fast_ms = 1e3 * statistics.median(plain_s), 1e3 * statistics.median(fast_s)
        per_len[str(n_words)] = {
            "queries": qs,
            "plain_ms": plain_ms,
            "fast_ms": fast_ms,
            "speedup": plain_ms / fast_ms,
            "plain_best_ms": 1e3 * min(plain_s),
            "fast_best_ms": 1e3 * min(fast_s),
            "speedup_best": min(plain_s) / min(fast_s),
            "max_rel_error": max(errors),
        }

    # batched: several distinct 3-word queries in one encode call, amortized per query
    batch = make_queries(8, np.random.default_rng(args.seed + 1))[3]
    batch = [q + " x" for q in batch]  # never timed above
    batch_s, _ = timed(enc.encode, batch)
    batched_ms = 1e3 * batch_s / len(batch)

    result = {
        "arch": arch,
        "context_prompts": n_context,
        "context_source": source,
        "torch_threads": torch.get_num_threads(),
        "queries_per_length": per_length,
        "build_s": build_s,
        "per_length": per_len,
        "speedup": min(v["speedup"] for v in per_len.values()),
        "max_rel_error": max(v["max_rel_error"] for v in per_len.values()),
        "batched_3word": {"batch": len(batch), "ms_per_query": batched_ms, "speedup_vs_plain": per_len["3"]["plain_ms"] / batched_ms},
        "target": {"speedup_1_3_words": TARGET_SPEEDUP, "max_rel_error": TARGET_REL_ERROR},
        "meets_target": all(per_len[k]["speedup"] >= TARGET_SPEEDUP for k in ("1", "3"))
        and max(v["max_rel_error"] for v in per_len.values()) <= TARGET_REL_ERROR,
    }

    print(f"Query encoding, {arch}, |P'| = {n_context} ({source}), torch threads = {result['torch_threads']}, "
          f"median of {per_length} distinct queries; encoder build {build_s:.2f} s\n")
    print("| query words | plain (ms) | fast (ms) | speedup | speedup, best-of | max rel. L2 error |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n_words, v in per_len.items():
        print(f"| {n_words} | {v['plain_ms']:.1f} | {v['fast_ms']:.1f} | {v['speedup']:.1f}x | "
              f"{v['speedup_best']:.1f}x | {v['max_rel_error']:.1e} |")
    print(f"| 3 (batch of {len(batch)}, per query) | {per_len['3']['plain_ms']:.1f} | {batched_ms:.1f} | "
          f"{result['batched_3word']['speedup_vs_plain']:.1f}x | | |")
    verdict = "n/a in --quick mode (tiny model)" if args.quick else ("met" if result["meets_target"] else "NOT met")
    print(f"\nworst speedup {result['speedup']:.1f}x, max rel. error {result['max_rel_error']:.1e}; "
          f"target >= {TARGET_SPEEDUP:.0f}x for 1-3 words at <= {TARGET_REL_ERROR:.0e}: {verdict}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
