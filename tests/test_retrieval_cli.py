"""`carlos-ray query | similar | serve` against the built tiny index: output equals the in-process ranker."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from carlos_ray.cli import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from carlos_ray.config import EncoderSpec
from carlos_ray.models.encoder import encoder_unavailable_reason
from carlos_ray.serving import load_query_encoder, load_ranker

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("carlos-ray")
REF_ENCODER = {"kind": "open_clip", "arch": "ViT-B-32", "pretrained": "openai"}


@pytest.fixture(scope="module")
def index(built_index):
    ranker, manifest = load_ranker(built_index["index"])
    return {"path": built_index["index"], "ranker": ranker, "manifest": manifest, "encoder": load_query_encoder(manifest)}


@pytest.fixture(scope="module")
def ref_index(built_index, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_ref") / "idx"
    shutil.copytree(built_index["index"], d, ignore=shutil.ignore_patterns(".writer.lock"))
    m = json.loads((d / "manifest.json").read_text())
    m["encoder"] = REF_ENCODER
    (d / "manifest.json").write_text(json.dumps(m))
    return str(d)


def _run_json(capsys, argv):
    code = main(argv)
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    return json.loads(out)  # stdout is exactly one JSON object


def _same(hits, expected):
    assert [h["lora_id"] for h in hits] == [e.lora_id for e in expected]
    for h, e in zip(hits, expected):
        assert h["score"] == pytest.approx(e.score, abs=1e-6)


def test_query_json_equals_in_process_search(index, capsys):
    for q in ("watercolor", "neon city at night"):
        body = _run_json(capsys, ["query", "--index", index["path"], q, "-k", "4", "--json"])
        assert body["query"] == q and body["k"] == 4 and body["index_version"] == index["manifest"].version
        _same(body["hits"], index["ranker"].search(index["encoder"].encode([q])[0], k=4))
    body = _run_json(capsys, ["query", "--index", index["path"], "ink", "-k", "50", "--max-strength", "inf",
                              "--min-consistency", "0", "--json"])
    _same(body["hits"], index["ranker"].search(index["encoder"].encode(["ink"])[0], k=50, max_strength=math.inf,
                                               min_consistency=0.0))


def test_query_table_output(index, capsys):
    assert main(["query", "--index", index["path"], "watercolor", "-k", "3"]) == EXIT_OK
    out = capsys.readouterr().out
    expected = index["ranker"].search(index["encoder"].encode(["watercolor"])[0], k=3)
    assert "rank" in out and "lora_id" in out and "score" in out
    for i, hit in enumerate(expected, start=1):
        line = next(line for line in out.splitlines() if hit.lora_id in line)
        assert line.split()[0] == str(i) and f"{hit.score:.4f}" in line


def test_similar_json_and_table(index, capsys):
    lid = index["ranker"].search(index["encoder"].encode(["x"])[0], k=1, max_strength=math.inf, min_consistency=-1.0)[0].lora_id
    body = _run_json(capsys, ["similar", "--index", index["path"], lid, "-k", "3", "--json"])
    assert body["lora_id"] == lid
    _same(body["hits"], index["ranker"].similar(lid, k=3))
    assert main(["similar", "--index", index["path"], lid, "-k", "3"]) == EXIT_OK
    out = capsys.readouterr().out
    assert all(h.lora_id in out for h in index["ranker"].similar(lid, k=3))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["query", "--index", "{idx}", "   "], "empty"),
        (["query", "--index", "{idx}", "a" * 301], "300"),
        (["query", "--index", "{idx}", "cat", "-k", "0"], "k must be"),
        (["query", "--index", "{idx}", "cat", "--max-strength", "-1"], "max_strength"),
        (["query", "--index", "{idx}", "cat", "--min-consistency", "2"], "min_consistency"),
        (["similar", "--index", "{idx}", "no-such-lora"], "unknown lora_id 'no-such-lora'"),
        (["similar", "--index", "{idx}", "x", "-k", "-2"], "k must be"),
        (["query", "--index", "/nonexistent/idx", "cat"], "no index at"),
    ],
)
def test_bad_input_exits_2_with_a_reason(index, capsys, argv, needle):
    argv = [a.replace("{idx}", index["path"]) for a in argv]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unavailable_encoder_fails_fast_but_similar_works(index, ref_index, capsys):
    if encoder_unavailable_reason(EncoderSpec(**REF_ENCODER)) is None:
        pytest.skip("ViT-B-32/openai weights are in this machine's cache")
    t0 = time.monotonic()
    assert main(["query", "--index", ref_index, "watercolor"]) == EXIT_REJECTED
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert "ViT-B-32" in err and "not on this machine" in err
    lid = index["ranker"].search(index["encoder"].encode(["x"])[0], k=1, max_strength=math.inf, min_consistency=-1.0)[0].lora_id
    body = _run_json(capsys, ["similar", "--index", ref_index, lid, "-k", "2", "--json"])
    _same(body["hits"], index["ranker"].similar(lid, k=2))


def test_console_script_query(index):
    proc = subprocess.run([str(CLI), "query", "--index", index["path"], "watercolor", "-k", "2", "--json"],
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    _same(json.loads(proc.stdout)["hits"], index["ranker"].search(index["encoder"].encode(["watercolor"])[0], k=2))


def test_serve_command_serves_until_interrupted(index, ray_session, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = ray_session.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([str(CLI), "serve", "--index", index["path"], "--port", str(port), "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240  # the app is up once the command says so
        while time.monotonic() < deadline and proc.poll() is None and not any("carlos-ray: serving" in x for x in lines):
            time.sleep(0.3)
        assert proc.poll() is None, "".join(lines)
        r = requests.get(url + "/search", params={"q": "watercolor", "k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        _same(r.json()["hits"], index["ranker"].search(index["encoder"].encode(["watercolor"])[0], k=3))
        assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        # Serve's shutdown on a loaded 2-core machine has taken ~110 s to begin (full suite, 2026-12-02)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            from ray import serve

            serve.shutdown()  # the killed command's Serve instance must not outlive it in the shared cluster
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert f"at http://127.0.0.1:{port}" in out and "stopping" in out, out
    assert f"search page: http://127.0.0.1:{port}/" in out, out
    with pytest.raises(requests.RequestException):
        requests.get(url + "/healthz", timeout=5)
