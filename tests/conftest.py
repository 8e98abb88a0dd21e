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
    idx = tmp_path_factory.mktemp("index") / "idx"
    summary = run_index(tiny_config, [str(zoo_dir), str(hostile)], str(idx))
    return {"index": str(idx), "summary": summary, "hostile": hostile, "hostile_expected": expected}
