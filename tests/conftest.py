"""Shared fixtures: one local Ray instance for the whole session (num_cpus=2), shut down at the end."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    a = cfg.sampling.adaptive
    a.enabled, a.min_samples, a.round_fraction = True, 5, 0.2
    a.max_direction_rse, a.max_strength_rse, a.max_consistency_se = 0.3, 0.1, 0.1
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
