"""Committing signatures one LoRA at a time: does a commit stay O(1) as the index grows?

An indexing run commits every finished LoRA on its own (`commit_every=1`). Each commit must skip rows already
indexed (exactly once), so it needs the index's lora_ids. This program commits N one-row signature tables
(d = 512) to a fresh local index and compares the mean time of the first 100 commits with the last 100:

- ``store``: `Index.commit` as the driver calls it (one writer; the ids of its last commit are kept, and a run of
  MERGE_PARTS small parts is merged into one, so the manifest stays short);
- ``reread``: the same commits when every commit re-reads the lora_id column of every part and parts are never
  merged (what the driver did before; run at a smaller N because it is quadratic).

Target: last-100 / first-100 <= 1.5 for ``store`` at N = 2000.

    python benchmarks/bench_commit.py [--n 2000] [--reread-n 500] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from carlos_ray import store
from carlos_ray.schema import SIGNATURE_SCHEMA, conform_signatures
from carlos_ray.store import Index

D = 512
WINDOW = 100
TARGET_RATIO = 1.5


def one_row(i: int, rng: np.random.Generator) -> pa.Table:
    row = {"lora_id": f"{i:016x}", "name": f"lora {i}", "direction": rng.standard_normal(D).tolist(),
           "strength": float(rng.random()), "consistency": float(rng.random()), "n": 10}
    return conform_signatures(pa.Table.from_pylist([row], schema=SIGNATURE_SCHEMA))


def run(n: int, mode: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = [one_row(i, rng) for i in range(n)]
    merge = store.MERGE_PARTS
    with tempfile.TemporaryDirectory(prefix="bench_commit_") as d:
        index = Index(str(Path(d) / "idx"))
        index.init({"config_hash": "bench"})
        times = []
        try:
            if mode == "reread":
                store.MERGE_PARTS = 10**9
            for table in rows:
                if mode == "reread":
                    index = Index(index.uri)  # a fresh object: no ids kept from the previous commit
                t0 = time.perf_counter()
                index.commit({"signatures": table})
                times.append(time.perf_counter() - t0)
        finally:
            store.MERGE_PARTS = merge
        m = index.read_manifest()
        assert m.counts["signatures"] == n, m.counts
        assert len(set(index.snapshot().signatures().column("lora_id").to_pylist())) == n
    first, last = np.mean(times[:WINDOW]) * 1e3, np.mean(times[-WINDOW:]) * 1e3
    return {"mode": mode, "n": n, "first100_ms": round(float(first), 3), "last100_ms": round(float(last), 3),
            "ratio": round(float(last / first), 3), "total_s": round(float(np.sum(times)), 2),
            "parts_at_end": m.counts["parts"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--reread-n", type=int, default=500)
    p.add_argument("--quick", action="store_true", help="N = 300 and 150 (a smoke run; the target is for N = 2000)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.quick:
        a.n, a.reread_n = 300, 150
    results = [run(a.n, "store"), run(a.reread_n, "reread")]
    print(f"{'mode':8} {'N':>6} {'first 100 (ms)':>15} {'last 100 (ms)':>14} {'ratio':>7} {'total (s)':>10} {'parts':>6}")
    for r in results:
        print(f"{r['mode']:8} {r['n']:>6} {r['first100_ms']:>15.3f} {r['last100_ms']:>14.3f} {r['ratio']:>7.2f} "
              f"{r['total_s']:>10.2f} {r['parts_at_end']:>6}")
    ok = results[0]["ratio"] <= TARGET_RATIO
    print(f"\nstore: last-100 / first-100 = {results[0]['ratio']:.2f} (target <= {TARGET_RATIO}): {'ok' if ok else 'MISSED'}")
    if a.out:
        Path(a.out).write_text(json.dumps({"results": results, "target_ratio": TARGET_RATIO, "ok": ok}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
