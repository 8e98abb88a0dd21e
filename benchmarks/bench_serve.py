"""HTTP serving: requests/s and latency of GET /search at 1, 8 and 32 concurrent clients on localhost.

Starts Ray, runs the Serve app (carlos_ray.serving.app) on an index and drives GET /search with asyncio
clients (aiohttp), each request a distinct query (so the encoder's LRU cache never answers).
Every level is bounded in requests and in seconds; any non-200 answer or client error counts as an
error and the run exits 1.

Two ways of doing the same work, back to back in one run: the encoder deployment with
``@serve.batch`` (concurrent queries encoded together, ``max_batch_size`` 16) and with batches of 1.
``--quick`` measures the batched app only, with few requests (the suite's smoke run, < 60 s).

The index is ``--index DIR`` or, by default, a synthetic one: the embedded tiny configuration's
manifest (tiny CLIP query encoder, its context prompts) over random signature directions. Serving
cost does not depend on how the directions were computed, and indexing a real zoo would take
longer than the whole benchmark.

    python benchmarks/bench_serve.py [--quick] [--index DIR] [--loras N] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

LEVELS = (1, 8, 32)
WORDS = (
    "watercolor neon cyberpunk vintage pastel gothic anime pixel baroque minimalist cinematic golden misty stormy "
    "autumn winter origami charcoal impressionist surreal sketch dramatic soft glowing rusty velvet marble copper "
    "isometric retro holographic noir sepia dreamy ornate crystal tropical frosted"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_index(path: Path, n: int, seed: int = 0) -> str:
    """An index in the tiny configuration's format with ``n`` random signatures (no generation)."""
    import pyarrow as pa

    from carlos_ray.config import Config
    from carlos_ray.indexing import IndexPlan
    from carlos_ray.models.encoder import OpenClipEncoder
    from carlos_ray.schema import SIGNATURE_SCHEMA, conform_signatures
    from carlos_ray.store import Index

    cfg = Config.from_file(REPO / "conf" / "tiny.yaml")
    plan = IndexPlan(cfg)
    dim = OpenClipEncoder(cfg.encoder).embed_dim
    rng = np.random.default_rng(seed)
    rows = [{"lora_id": f"synthetic-{i:05d}", "name": f"synthetic LoRA {i}", "description": None, "trigger_words": [],
             "direction": rng.standard_normal(dim).tolist(), "strength": float(rng.uniform(0.5, 3.0)),
             "consistency": float(rng.uniform(0.0, 0.6)), "config_hash": plan.config_hash} for i in range(n)]
    table = conform_signatures(pa.Table.from_pylist(rows, schema=SIGNATURE_SCHEMA))
    index = Index(str(path))
    with index:
        index.init(plan.manifest_fields())
        index.commit({"signatures": table}, fields={"thresholds": {"max_strength": None, "min_consistency": None,
                                                                     "source": "none"}})
    return str(path)


async def drive(url: str, concurrency: int, max_requests: int, max_seconds: float, offset: int) -> dict:
    """`concurrency` clients in a closed loop until `max_requests` are done or `max_seconds` pass."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal issued, errors
        while issued < max_requests and time.perf_counter() < deadline:
            i = offset + issued
            issued += 1
            q = f"{WORDS[i % len(WORDS)]} {WORDS[(i // len(WORDS)) % len(WORDS)]} style {i}"
            t0 = time.perf_counter()
            try:
                async with session.get(f"{url}/search", params={"q": q, "k": "10"}) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat_ms = np.asarray(latencies) * 1e3
    return {"requests": len(latencies), "errors": errors, "seconds": round(wall, 3),
            "rps": round(len(latencies) / wall, 2) if wall > 0 else 0.0,
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 2), "p99_ms": round(float(np.percentile(lat_ms, 99)), 2)}


def measure(index: str, port: int, batch: int, levels: tuple[int, ...], max_requests: int, max_seconds: float,
            offset: int) -> tuple[dict, dict]:
    from ray import serve

    from carlos_ray.serving import ServeArgs
    from carlos_ray.serving.app import build_app

    args = ServeArgs(index=index, max_batch_size=batch, encoder_num_cpus=1.0, ranker_num_cpus=0.25, ingress_num_cpus=0.25)
    serve.run(build_app(args), name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(drive(url, 4, 8, 10.0, offset=offset - 1000))  # warm-up: connections, first batches
    results = {}
    for level in levels:
        results[str(level)] = asyncio.run(drive(url, level, max_requests, max_seconds, offset))
        offset += max_requests
    import urllib.request

    with urllib.request.urlopen(f"{url}/index", timeout=30) as r:
        stats = json.loads(r.read())["encoder_stats"]
    serve.delete("bench")
    return results, stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batched app only, few requests (< 60 s)")
    ap.add_argument("--index", default=None, help="index to serve (default: a synthetic tiny index)")
    ap.add_argument("--loras", type=int, default=None, help="LoRAs in the synthetic index (default 2000, quick 200)")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 400, quick 48)")
    ap.add_argument("--seconds", type=float, default=None, help="time limit per level (default 30, quick 6)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    n = a.loras or (200 if a.quick else 2000)
    max_requests = a.requests or (48 if a.quick else 400)
    max_seconds = a.seconds or (6.0 if a.quick else 30.0)

    import ray
    from ray import serve

    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    index = a.index or synthetic_index(Path(tmp.name) / "index", n)
    port = free_port()
    ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    configs = {"batched": 16} if a.quick else {"batched": 16, "unbatched": 1}
    out: dict = {"index": "synthetic" if a.index is None else a.index, "loras": None, "levels": list(LEVELS),
                 "max_requests_per_level": max_requests, "max_seconds_per_level": max_seconds, "configs": {}}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        offset = 0
        for name, batch in configs.items():
            results, stats = measure(index, port, batch, LEVELS, max_requests, max_seconds, offset)
            offset += 10 * max_requests
            out["configs"][name] = {"max_batch_size": batch, "per_concurrency": results, "encoder_stats": stats}
    finally:
        serve.shutdown()
        ray.shutdown()
        from carlos_ray.store import Index

        out["loras"] = Index(index).read_manifest().counts["signatures"]
        tmp.cleanup()
    batched = out["configs"]["batched"]["per_concurrency"]
    out["per_concurrency"] = batched  # the headline: the app as configured by default
    out["errors"] = sum(r["errors"] for c in out["configs"].values() for r in c["per_concurrency"].values())
    if "unbatched" in out["configs"]:
        un = out["configs"]["unbatched"]["per_concurrency"]
        out["batching_speedup_rps"] = {lvl: round(batched[lvl]["rps"] / un[lvl]["rps"], 2) for lvl in batched}
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)

    print(f"\nGET /search on {out['loras']} LoRAs ({out['index']} index), distinct queries, localhost\n")
    print("| encoder batching | clients | requests | rps | p50 ms | p99 ms | errors | largest batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, c in out["configs"].items():
        for lvl, r in c["per_concurrency"].items():
            print(f"| {name} (max {c['max_batch_size']}) | {lvl} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {r['errors']} | {c['encoder_stats']['max_batch']} |")
    if "batching_speedup_rps" in out:
        print("\nrps ratio batched / unbatched: " + ", ".join(f"{k} clients {v}x" for k, v in out["batching_speedup_rps"].items()))
    print(f"\nwall time {out['wall_seconds']} s")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    if out["errors"]:
        print(f"FAILED: {out['errors']} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
