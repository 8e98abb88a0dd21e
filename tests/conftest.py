"""Shared fixtures: one local Ray instance for the whole session (num_cpus=2), shut down at the end."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On 2 busy cores a Serve proxy can take longer than Serve's default 5 s to come up, and is then killed.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for the module (tiny models: thread hand-off costs more than it gains on a shared
    2-core machine, and the actors of conf/tiny.yaml use one thread too, so images compare bit for bit)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder():
    """The embedded tiny CLIP (seeded random weights), one per test module."""
    from carlos_ray.config import EncoderSpec
    from carlos_ray.models import create_encoder

    return create_encoder(EncoderSpec())


@pytest.fixture(scope="module")
def gen(encoder):
    """The embedded tiny SDXL generator at the tiny encoder's input size, one per test module."""
    from carlos_ray.config import GeneratorSpec
    from carlos_ray.models import create_generator

    return create_generator(GeneratorSpec(), encoder.image_size)


@pytest.fixture(scope="session")
def tiny_config():
    from carlos_ray.config import Config

    return Config.from_file("conf/tiny.yaml")


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    from carlos_ray.zoo import make_zoo

    d = tmp_path_factory.mktemp("zoo")
    make_zoo(d, n=10, seed=0)
    return d


@pytest.fixture(scope="session")
def built_index(ray_session, tiny_config, zoo_dir, tmp_path_factory):
    """The synthetic zoo plus hostile files, indexed once through Ray Data (shared by several test modules)."""
    from carlos_ray.indexing import run_index
    from carlos_ray.lora.hostile import write_hostile_corpus

    hostile = tmp_path_factory.mktemp("hostile")
    expected = write_hostile_corpus(hostile)
    expected["overflow.safetensors"] = "nonfinite_samples"  # valid file, but its images overflow to NaN
    write_overflow_lora(hostile / "overflow.safetensors")
    idx = tmp_path_factory.mktemp("index") / "idx"
    cfg = tiny_config.model_copy(deep=True)
    cfg.indexing.keep_diffs = True  # exercised here: the diffs table is checked against the directions
    summary = run_index(cfg, [str(zoo_dir), str(hostile)], str(idx))
    return {"index": str(idx), "summary": summary, "hostile": hostile, "hostile_expected": expected}


# ---- one Ray Serve instance for the session's HTTP tests (test_serve, test_web) -------------------------
SERVE_TOKEN_ENV = "CARLOS_RAY_TEST_SERVE_TOKEN"
SERVE_TOKEN = "s3cret-test-token"
REF_ENCODER = {"kind": "open_clip", "arch": "ViT-B-32", "pretrained": "openai", "dtype": "float32", "device": "cpu",
               "micro_batch": 16, "seed": 0}
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_DESCRIPTION = ('<script>alert(2)</script><b onmouseover="alert(3)">bold</b> <a href="javascript:alert(4)">link</a>'
                       '<iframe src="javascript:alert(5)"></iframe><svg onload=alert(6)></svg><style>body{display:none}</style>'
                       '"><img src=x onerror=alert(7)>&lt;escaped&gt; &amp; text')
HOSTILE_TRIGGERS = ["<svg onload=alert(8)>", '"><img src=x onerror=alert(9)>', "ok-word"]


def _add_hostile_lora(index_dir) -> str:
    """Commit one more LoRA whose every text field is HTML (a copy of a LoRA with a non-zero direction)."""
    import pyarrow as pa

    from carlos_ray.store import Index

    index = Index(str(index_dir))
    old = index.snapshot().signatures()
    rows = old.to_pylist()
    th = index.read_manifest().thresholds or {}
    kept = [r for r in rows if 0 < r["strength"] <= th.get("max_strength", float("inf"))
            and r["consistency"] >= th.get("min_consistency", -1.0)]  # passes the default filters: it shows in results
    row = dict(kept[0])
    row.update(lora_id="hostile-0001", name=HOSTILE_NAME, description=HOSTILE_DESCRIPTION, trigger_words=HOSTILE_TRIGGERS,
               source_url="javascript:alert(10)", sha256="0" * 64)
    with index:
        index.commit({"signatures": pa.Table.from_pylist([row], schema=old.schema)})
    return row["lora_id"]


@pytest.fixture(scope="session")
def served(ray_session, built_index, tmp_path_factory):
    """The Serve app over HTTP on localhost, started once: a copy of the tiny built index (plus one LoRA whose
    every text field is hostile HTML) at ``/`` and, at ``/ref``, a copy whose manifest names the ViT-B-32 ``openai``
    encoder (not on this machine: text search answers 503, the rest works). The admin token is SERVE_TOKEN."""
    import json
    import shutil
    import socket

    from ray import serve

    from carlos_ray.serving import ServeArgs
    from carlos_ray.serving.app import build_app

    root = tmp_path_factory.mktemp("serve")
    idx, ref = root / "idx", root / "ref"
    ignore = shutil.ignore_patterns(".writer.lock")
    shutil.copytree(built_index["index"], idx, ignore=ignore)
    hostile_id = _add_hostile_lora(idx)
    shutil.copytree(idx, ref, ignore=ignore)  # the same LoRAs: /ref answers /similar exactly like /
    manifest = json.loads((ref / "manifest.json").read_text())
    manifest["encoder"] = REF_ENCODER
    (ref / "manifest.json").write_text(json.dumps(manifest))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ[SERVE_TOKEN_ENV] = SERVE_TOKEN  # read by build_app in this process; the app keeps its SHA-256 only
    # No CPU reservations: the app lives until the session ends, and later modules need Ray's 2 CPUs for indexing.
    common = dict(poll_seconds=0.25, encoder_num_cpus=0, ranker_num_cpus=0, ingress_num_cpus=0,
                  admin_token_env=SERVE_TOKEN_ENV, batch_wait_timeout_s=0.05, request_timeout_s=60)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run_many([  # deployed side by side
            serve.RunTarget(build_app(ServeArgs(index=str(idx), **common)), name="carlos", route_prefix="/"),
            serve.RunTarget(build_app(ServeArgs(index=str(ref), **common)), name="ref", route_prefix="/ref"),
        ])
        yield {"url": f"http://127.0.0.1:{port}", "idx": idx, "ref": ref, "hostile_id": hostile_id}
    finally:
        serve.shutdown()
        os.environ.pop(SERVE_TOKEN_ENV, None)


REFERENCE_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "carlos-ray")
REFERENCE_WHEEL_NAME = "carlos-0.0.3-py3-none-any.whl"


def download_reference_wheel():
    """The published wheel carlos==0.0.3, downloaded once into ~/.cache/carlos-ray (pip download, no install)."""
    import subprocess
    import sys
    from pathlib import Path

    wheel = Path(REFERENCE_CACHE_DIR) / REFERENCE_WHEEL_NAME
    if wheel.is_file():
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.9",
           "--only-binary=:all:", "carlos==0.0.3", "-d", str(wheel.parent)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not download the reference wheel with {' '.join(cmd)!r} "
            f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return wheel


@pytest.fixture(scope="session")
def reference_wheel():
    """The published wheel (pip download, cached in ~/.cache/carlos-ray): reference, import and report tests."""
    import subprocess

    try:
        return download_reference_wheel()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"the reference wheel carlos==0.0.3 is required for this test and could not be fetched: {e}")


@pytest.fixture(scope="session")
def source_table(reference_wheel):
    """The reference parquet member read straight from the wheel (independently of carlos_ray.reference)."""
    import io
    import zipfile

    import pyarrow.parquet as pq

    from carlos_ray.reference import REFERENCE_MEMBER

    with zipfile.ZipFile(reference_wheel) as zf:
        return pq.read_table(io.BytesIO(zf.read(REFERENCE_MEMBER)))


@pytest.fixture(scope="session")
def reference_index(reference_wheel, tmp_path_factory):
    """The published reference imported into a fresh index (read-only for tests)."""
    from carlos_ray.importer import import_reference

    idx = tmp_path_factory.mktemp("reference") / "idx"
    summary = import_reference(reference_wheel, str(idx))
    return {"index": str(idx), "summary": summary}


def write_overflow_lora(path):
    """A well-formed LoRA whose weights are finite but so large that the images overflow to NaN."""
    import numpy as np

    from carlos_ray.zoo import random_weights, scale_family_target, write_lora

    w = random_weights(scale_family_target(), ("unet",), 4, 1e20, np.random.default_rng(0))
    write_lora(path, w, "diffusers")


# ---- a real headless browser (the OS's Chromium driven by Playwright) ----------------------------------
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_executable() -> str:
    """Chromium from the OS packages (`make browser` installs it); $CARLOS_RAY_CHROMIUM overrides the path."""
    import shutil

    return os.environ.get("CARLOS_RAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser(ray_session):
    """One headless Chromium for the session (Playwright gives it a fresh temporary --user-data-dir); closed at the end.

    Depends on ``ray_session``: Ray must start before Playwright in this process (seen here: a local Ray
    started after Playwright's driver times out waiting for its raylet; the other order works)."""
    exe = chromium_executable()
    if not os.path.isfile(exe):
        pytest.fail(f"Chromium is not installed at {exe}; run `make browser` (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS, timeout=60_000)
    except Exception:
        pw.stop()
        raise
    try:
        yield b
    finally:
        b.close()
        pw.stop()


class BrowserPage:
    """A fresh browser context and page for one test: records console errors, uncaught exceptions and dialogs.

    ``shot(name)`` saves a PNG under the test's tmp_path/screenshots; ``allow(pattern)`` lets a console
    error the test provokes on purpose (e.g. the 404 of an unknown LoRA) through. Any other error fails
    the test at teardown."""

    def __init__(self, browser, out_dir):
        import re

        self._re = re
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, java_script_enabled=True)
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.allowed: list = []
        self.out_dir = out_dir
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught exception: {exc}"))
        self.page.on("dialog", self._dialog)

    def _console(self, msg) -> None:
        if msg.type == "error" and not any(p.search(msg.text) for p in self.allowed):
            self.errors.append(f"console.error: {msg.text} ({msg.location.get('url', '')})")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def allow(self, pattern: str) -> None:
        self.allowed.append(self._re.compile(pattern))

    def shot(self, name: str):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def browser_page(browser, tmp_path):
    """A page in a fresh context; the test fails on any JavaScript error or dialog (alert/confirm/prompt)."""
    bp = BrowserPage(browser, tmp_path / "screenshots")
    try:
        yield bp
    finally:
        bp.close()
    problems = bp.errors + [f"dialog opened: {d}" for d in bp.dialogs]
    if problems:
        pytest.fail("the page reported JavaScript errors or dialogs:\n" + "\n".join(problems), pytrace=False)


ADAPTIVE_LORAS = ("noop", "te_only", "styles/style_00", "family/scale_x1")


@pytest.fixture(scope="session")
def adaptive_setup(tiny_config, zoo_dir, tmp_path_factory):
    """Four zoo LoRAs and an adaptive tiny config (4 seeds x 5 prompts, rounds of 5 samples) written as YAML too;
    the bounds are loose enough that some LoRAs stop after one round and others run to the full protocol."""
    import shutil
    from pathlib import Path

    import yaml

    src = tmp_path_factory.mktemp("adaptive_src")
    for name in ADAPTIVE_LORAS:
        stem = Path(zoo_dir) / name
        for f in stem.parent.glob(stem.name + ".*"):
            shutil.copy(f, src / f.name)
    cfg = tiny_config.model_copy(deep=True)
    cfg.sampling.num_seeds = 4
    cfg.sampling.seed_layout = "per_prompt"  # the seed errors apply once every prompt has a sample
    a = cfg.sampling.adaptive
    a.enabled, a.min_samples, a.round_fraction = True, 5, 0.2
    a.max_direction_rse, a.max_strength_rse, a.max_consistency_se = 0.3, 0.1, 0.1  # stops at rounds 1, 2, 3, 4
    path = src.parent / "adaptive.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return {"src": src, "config": cfg, "config_path": path}


@pytest.fixture(scope="session")
def adaptive_index(ray_session, adaptive_setup, tmp_path_factory):
    """The four LoRAs indexed adaptively, uninterrupted."""
    from carlos_ray.indexing import run_index

    idx = tmp_path_factory.mktemp("adaptive_index") / "idx"
    summary = run_index(adaptive_setup["config"], [str(adaptive_setup["src"])], str(idx))
    return {"index": str(idx), "summary": summary}
