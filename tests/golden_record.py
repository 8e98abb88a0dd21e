"""Record the public JSON of a small deterministic index: HTTP `/search`, `/loras/{id}`, `/loras/{id}/similar` and
`carlos-ray query --json` / `similar --json`.

The golden file `tests/golden/tiny_index.json` was written by this module *before* the upper floors were rebuilt
(issue 11); `tests/test_golden.py` rebuilds the same index and compares. Re-record (only when a behaviour change is
intended) with:

    PYTHONPATH=$PWD python tests/golden_record.py

Volatile fields, left out of the recording: a signature row's `indexed_at` (a timestamp) and the directory part of
its `source_path` (a temporary directory; the file name is kept).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_index.json"
ZOO_N, ZOO_SEED = 8, 0
QUERIES = [
    {"q": "watercolor", "k": 5},
    {"q": "neon city at night", "k": 8, "max_strength": "inf", "min_consistency": 0},
    {"q": "  a crisp sharp look  ", "k": 3, "min_consistency": 0.01},
]
# Numbers within 3% (or 6e-4): the same code on another CPU drifts that far. The tiny diffusion loop amplifies
# float32 kernel differences (ISA dispatch: AVX2 / AVX-512); on 2026-12-02's machine (AMD EPYC, AVX-512) the code
# of the recording commit itself gave up to 0.9% relative / 3.6e-4 absolute off the file, while every id, order,
# status, exit code and error line stayed exact. Those stay compared exactly.
REL, ABS = 3e-2, 6e-4


def build_index(root: Path) -> str:
    """The tiny profile over the synthetic zoo (n=8, seed 0): deterministic up to float rounding."""
    from carlos_ray.config import Config
    from carlos_ray.indexing import run_index
    from carlos_ray.zoo import make_zoo

    zoo = root / "zoo"
    make_zoo(zoo, n=ZOO_N, seed=ZOO_SEED)
    index = root / "index"
    run_index(Config.from_file("conf/tiny.yaml"), [str(zoo)], str(index))
    return str(index)


def _clean_signature(body: dict) -> dict:
    sig = body.get("signature")
    if isinstance(sig, dict):
        sig.pop("indexed_at", None)
        if sig.get("source_path"):
            sig["source_path"] = Path(sig["source_path"]).name
    return body


def _cli(argv: list[str]) -> dict:
    from carlos_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    text = out.getvalue().strip()
    errors = [line for line in err.getvalue().splitlines() if line.startswith("carlos-ray: error")]
    return {"exit": code, "stdout": json.loads(text) if text else None, "errors": errors}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(index: str, lora_ids: list[str]) -> dict:
    import requests
    from ray import serve

    from carlos_ray.serving import ServeArgs
    from carlos_ray.serving.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/golden"
    out: dict = {"search": [], "lora": {}, "similar": {}}
    try:
        serve.run(build_app(ServeArgs(index=index, poll_seconds=30, encoder_num_cpus=0.25, ranker_num_cpus=0.25,
                                      ingress_num_cpus=0.1, request_timeout_s=120)),
                  name="golden", route_prefix="/golden")

        def get(path: str, **params) -> dict:
            r = requests.get(url + path, params=params, timeout=120)
            return {"status": r.status_code, "body": _clean_signature(r.json())}

        for q in QUERIES:
            out["search"].append({"params": q, **get("/search", **q)})
        for lid in lora_ids:
            out["lora"][lid] = get(f"/loras/{lid}")
            out["similar"][lid] = get(f"/loras/{lid}/similar", k=4, max_strength="inf", min_consistency=0)
    finally:
        serve.shutdown()
    return out


def record(index: str) -> dict:
    """Everything the golden file holds, for the index at `index`."""
    from carlos_ray.store import Index

    lora_ids = sorted(Index(index).snapshot().signatures().column("lora_id").to_pylist())
    cli_query = []
    for q in QUERIES:
        argv = ["query", "--index", index, q["q"], "-k", str(q["k"]), "--json"]
        for key in ("max_strength", "min_consistency"):
            if key in q:
                argv += [f"--{key.replace('_', '-')}", str(q[key])]
        cli_query.append({"argv": argv[3:], **_cli(argv)})
    cli_similar = {lid: _cli(["similar", "--index", index, lid, "-k", "4", "--max-strength", "inf",
                              "--min-consistency", "0", "--json"]) for lid in lora_ids}
    return {"lora_ids": lora_ids, "cli_query": cli_query, "cli_similar": cli_similar, "http": _http(index, lora_ids)}


def differences(got, want, where: str = "$") -> list[str]:
    """Where two recordings differ: exact for everything but floats (relative REL, absolute ABS)."""
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return [] if got == want else [f"{where}: {got!r} != {want!r}"]
    if isinstance(want, (int, float)):
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return [f"{where}: {got!r} is not a number ({want!r})"]
        if isinstance(want, float) and not math.isfinite(want):
            return [] if got == want else [f"{where}: {got!r} != {want!r}"]
        return [] if math.isclose(got, want, rel_tol=REL, abs_tol=ABS) else [f"{where}: {got!r} != {want!r}"]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: list of {len(got) if isinstance(got, list) else type(got).__name__} != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{where}[{i}]")]
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            keys = set(got) if isinstance(got, dict) else set()
            return [f"{where}: keys {sorted(keys ^ set(want))} differ"]
        return [d for k in want for d in differences(got[k], want[k], f"{where}.{k}")]
    raise TypeError(f"{where}: unexpected {type(want).__name__}")


if __name__ == "__main__":  # pragma: no cover - re-records the golden file
    import tempfile

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as d:
        data = record(build_index(Path(d)))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    ray.shutdown()
    print(f"wrote {GOLDEN}", file=sys.stderr)
