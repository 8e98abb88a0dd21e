"""Faults during indexing: a generation actor killed, the whole job killed at random points, a node removed.

Every run indexes LoRAs of the synthetic zoo that the `built_index` fixture indexed without faults (and
that test_indexing checks against an in-process loop), so "exact" means: the same LoRA ids, each once,
with the same directions, strengths and consistencies.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from carlos_ray.indexing import run_index
from carlos_ray.lora.hostile import write_hostile_corpus
from carlos_ray.store import Index

REPO = Path(__file__).resolve().parent.parent
GENERATE_ACTOR = "MapWorker(MapBatches(GenerateImages))"
KILL_SEED = 20261125


def _rows(index: str) -> dict[str, dict]:
    t = Index(index).snapshot().signatures()
    if t is None:  # an index that holds no signature yet (e.g. killed after its base images were committed)
        return {}
    ids = t.column("lora_id").to_pylist()
    assert len(ids) == len(set(ids)), "a LoRA appears twice in the index"
    return {r["lora_id"]: r for r in t.to_pylist()}


def _assert_same_signatures(got: dict[str, dict], reference: dict[str, dict], ids: set[str]) -> None:
    assert set(got) == ids
    for lid in ids:
        np.testing.assert_allclose(got[lid]["direction"], reference[lid]["direction"], atol=1e-6, err_msg=lid)
        assert got[lid]["strength"] == pytest.approx(reference[lid]["strength"], abs=1e-6)
        assert got[lid]["consistency"] == pytest.approx(reference[lid]["consistency"], abs=1e-6)
        assert got[lid]["n"] == reference[lid]["n"]


def _zoo_ids(built_index, zoo_dir, names=None) -> set[str]:
    full = _rows(built_index["index"])
    return {lid for lid, r in full.items()
            if Path(r["source_path"]).is_relative_to(Path(zoo_dir).resolve())
            and (names is None or Path(r["source_path"]).name in names)}


def copy_loras(zoo_dir, dest: Path, n: int) -> list[str]:
    """Copy the first ``n`` LoRAs of ``zoo_dir`` (by file name) with their sidecars into ``dest``; returns the names."""
    names = sorted(p.name for p in Path(zoo_dir).glob("*.safetensors"))[:n]
    assert len(names) == n
    dest.mkdir()
    for name in names:  # with their sidecars: trigger words change the prompts
        for f in Path(zoo_dir).glob(name.removesuffix(".safetensors") + ".*"):
            shutil.copy(f, dest / f.name)
    return names


def _generation_actor_pids() -> set[int]:
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::" + GENERATE_ACTOR):
            out.add(p.info["pid"])
    return out


def test_generation_actor_killed_mid_job_is_restarted_and_signatures_stay_exact(ray_session, built_index, tiny_config,
                                                                                zoo_dir, tmp_path):
    before: set[int] = set()
    seen: set[int] = set()
    done = threading.Event()

    def on_lora(info: dict) -> None:
        if not before:  # after the first finished LoRA both actors are busy with the next ones
            before.update(_generation_actor_pids())
            os.kill(min(before), signal.SIGKILL)

    def watch() -> None:  # the process Ray restarts the actor in is a new one
        while not done.is_set():
            if before:
                seen.update(_generation_actor_pids())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = run_index(tiny_config, [str(zoo_dir)], str(tmp_path / "idx"), on_lora=on_lora)
    finally:
        done.set()
        watcher.join(timeout=10)
    assert len(before) == 2, f"expected the two generation actors of conf/tiny.yaml, found pids {before}"
    assert seen - before, f"no generation actor was restarted after killing pid {min(before)}"
    assert summary.indexed == 10 and summary.rejected == 0
    _assert_same_signatures(_rows(str(tmp_path / "idx")), _rows(built_index["index"]), _zoo_ids(built_index, zoo_dir))


def test_a_lora_that_kills_its_worker_every_time_is_quarantined(ray_session, built_index, tiny_config, zoo_dir,
                                                                tmp_path):
    """Every process that starts generating with one chosen LoRA is SIGKILLed at once, as an OOM or a native crash
    would do: that LoRA is rejected as `worker_crashed`, the other nine are indexed exactly, the job completes."""
    import hashlib

    import ray

    from carlos_ray.indexing import REGISTRY_PREFIX

    poison = Path(zoo_dir) / "erratic.safetensors"
    poison_id = hashlib.sha256(poison.read_bytes()).hexdigest()[:16]
    killed: list[int] = []
    done = threading.Event()

    def killer() -> None:  # watches the run's in-flight registry, the way an operator could
        registry = None
        while not done.is_set():
            try:
                if registry is None:
                    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                             if a["name"].startswith(REGISTRY_PREFIX)]
                    registry = ray.get_actor(names[0]) if names else None
                else:
                    for lid, pid in ray.get(registry.state.remote())["inflight"].values():
                        if lid == poison_id and pid not in killed:
                            killed.append(pid)
                            os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, ValueError, ray.exceptions.RayActorError):
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = run_index(tiny_config, [str(zoo_dir)], str(tmp_path / "idx"))
    finally:
        done.set()
        thread.join(timeout=10)
    assert len(killed) >= tiny_config.resources.max_worker_crashes, killed
    rejects = {r["path"]: r for r in summary.rejects}
    assert list(rejects) == [str(poison.resolve())]
    r = rejects[str(poison.resolve())]
    assert r["code"] == "worker_crashed" and "killed its worker process" in r["reason"]
    stored = Index(str(tmp_path / "idx")).snapshot().rejects().to_pylist()
    assert [(x["path"], x["code"]) for x in stored] == [(str(poison.resolve()), "worker_crashed")]
    assert summary.indexed == 9
    ids = _zoo_ids(built_index, zoo_dir) - {poison_id}
    _assert_same_signatures(_rows(str(tmp_path / "idx")), _rows(built_index["index"]), ids)
    # a re-run does not try the quarantined LoRA again; asked to, it indexes it (nothing kills it now)
    again = run_index(tiny_config, [str(zoo_dir)], str(tmp_path / "idx"))
    assert again.indexed == 0 and again.skipped == 10 and again.images_generated == 0
    retried = run_index(tiny_config, [str(zoo_dir)], str(tmp_path / "idx"), retry_rejected=True)
    assert retried.indexed == 1 and retried.skipped == 9
    _assert_same_signatures(_rows(str(tmp_path / "idx")), _rows(built_index["index"]), ids | {poison_id})


def test_job_killed_at_random_points_then_resumed_equals_uninterrupted_run(ray_session, built_index, tiny_config,
                                                                            zoo_dir, tmp_path):
    """SIGKILL the indexing process at seeded random moments, three times, then run to the end."""
    import ray

    src = tmp_path / "src"
    shutil.copytree(zoo_dir, src)
    shutil.copy(src / "twin_a.safetensors", src / "twin_a_copy.safetensors")  # same bytes: indexed once
    hostile = tmp_path / "hostile_all"
    codes = write_hostile_corpus(hostile)
    for name in ("truncated.safetensors", "nan_weights.safetensors"):
        shutil.copy(hostile / name, src / name)
    idx = tmp_path / "idx"
    cmd = [sys.executable, "-m", "carlos_ray.cli", "index", "--config", "conf/tiny.yaml", "--loras", str(src),
           "--index", str(idx), "--address", ray.get_runtime_context().gcs_address]
    rng = random.Random(KILL_SEED)
    kills = []
    for attempt in range(3):
        delay = rng.uniform(4.0, 40.0)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        n = len(_rows(str(idx))) if (idx / "manifest.json").exists() else 0
        kills.append({"after_s": round(delay, 1), "exit": proc.returncode, "indexed_so_far": n})
        if (idx / "manifest.json").exists():  # whatever the moment, the index on disk is valid
            snap = Index(str(idx)).snapshot()
            assert snap.signatures() is None or snap.signatures().num_rows == n
    print("kills:", kills)
    assert any(k["exit"] == -signal.SIGKILL for k in kills), f"no run was actually killed: {kills}"

    s = run_index(tiny_config, [str(src)], str(idx))
    assert s.duplicates == 1
    ids = _zoo_ids(built_index, zoo_dir)
    final = _rows(str(idx))
    _assert_same_signatures(final, _rows(built_index["index"]), ids)
    rejects = Index(str(idx)).snapshot().rejects().to_pylist()
    assert sorted((Path(r["path"]).name, r["code"]) for r in rejects) == [
        ("nan_weights.safetensors", codes["nan_weights.safetensors"]), ("truncated.safetensors", codes["truncated.safetensors"])]
    again = run_index(tiny_config, [str(src)], str(idx))
    assert again.indexed == 0 and again.skipped == 10 and again.images_generated == 0
    assert len(Index(str(idx)).snapshot().rejects().to_pylist()) == 2


@pytest.mark.slow  # a second, two-node cluster of its own: ~85 s; make test-all runs it
def test_worker_node_removed_mid_job_on_a_multi_node_cluster(built_index, zoo_dir, tmp_path):
    src = tmp_path / "src"
    names = copy_loras(zoo_dir, src, 5)
    idx, result = tmp_path / "idx", tmp_path / "result.json"
    cmd = [sys.executable, "-m", "tests.cluster_job", "--loras", str(src), "--index", str(idx), "--result", str(result)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        reader.join(timeout=10)
    log = "".join(lines)
    assert proc.returncode == 0, log[-4000:]
    out = json.loads(result.read_text())
    assert out.get("removed_after_loras") == 2, log[-4000:]
    assert out["summary"]["indexed"] == 5 and out["summary"]["rejected"] == 0
    got = _rows(str(idx))
    full = _rows(built_index["index"])
    _assert_same_signatures(got, full, _zoo_ids(built_index, zoo_dir, names))


# ---- the pass-level retry policy, on its own ------------------------------------------------------------
def _jobs(n: int):
    from carlos_ray.indexing import LoraJob

    return [LoraJob(lora_id=f"id{i}", path=f"/x/{i}.safetensors", sha256="0" * 64, format="kohya", rank=4, name=f"l{i}")
            for i in range(n)]


def test_system_failures_are_told_from_application_errors():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayTaskError

    from carlos_ray.indexing import IncompletePass, is_system_failure

    assert is_system_failure(ActorDiedError())
    assert is_system_failure(ActorUnavailableError("node gone", b"\x00" * 16))
    assert is_system_failure(ObjectLostError("0" * 56, "owner", "call site"))
    assert is_system_failure(IncompletePass("x"))
    assert not is_system_failure(ValueError("bug"))
    assert not is_system_failure(RayTaskError("f", "traceback", ValueError("bug in a stage")))
    assert is_system_failure(RayTaskError("f", "traceback", ActorDiedError()))


def test_pass_retries_resume_the_rest_and_stop_when_nothing_progresses():
    """The retry policy on its own: a pass is any callable `run_pass(remaining, finished)`."""
    from ray.exceptions import ActorDiedError

    from carlos_ray.indexing import IndexSummary, retry_passes

    calls: list[list[str]] = []
    sleeps: list[float] = []

    def flaky(todo, finished):
        calls.append([j.lora_id for j in todo])
        if len(calls) == 1:
            finished.add(todo[0].lora_id)  # one LoRA committed, then a node is lost
            raise ActorDiedError()
        if len(calls) == 2:
            raise ActorDiedError()  # no progress, still within pass_retries=2

    summary = IndexSummary()
    retry_passes(flaky, _jobs(3), 2, summary, sleep=sleeps.append)
    assert calls == [["id0", "id1", "id2"], ["id1", "id2"], ["id1", "id2"]]
    assert summary.pass_retries == 2 and sleeps == [1.0, 2.0]

    def always_down(todo, finished):
        raise ActorDiedError()

    with pytest.raises(RuntimeError, match="3 times in a row without finishing a LoRA"):
        retry_passes(always_down, _jobs(2), 2, IndexSummary(), sleep=sleeps.append)

    def buggy(todo, finished):
        raise KeyError("a bug, not a fault")

    with pytest.raises(KeyError):  # never retried
        retry_passes(buggy, _jobs(2), 2, IndexSummary(), sleep=sleeps.append)


def test_adaptive_job_killed_mid_round_then_resumed_equals_an_uninterrupted_run(ray_session, adaptive_setup,
                                                                               adaptive_index, tmp_path):
    """SIGKILL the adaptive indexing process as soon as a first round is committed for some LoRA (the others are
    then mid-round), resume: the index equals the uninterrupted adaptive run, and no committed round is redone."""
    import ray

    from carlos_ray.indexing import IndexPlan

    idx = tmp_path / "idx"
    cmd = [sys.executable, "-m", "carlos_ray.cli", "index", "--config", str(adaptive_setup["config_path"]),
           "--loras", str(adaptive_setup["src"]), "--index", str(idx), "--address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            m = json.loads((idx / "manifest.json").read_text()) if (idx / "manifest.json").exists() else {}
            if m.get("parts", {}).get("partials"):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and time.time() >= deadline:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the job was not killed mid-run (exit {proc.returncode})"
    snap = Index(str(idx)).snapshot()
    done_before = {r["lora_id"]: r["n"] for r in (snap.signatures().to_pylist() if snap.signatures() else [])}
    rounds_before: dict[str, int] = {}
    for p in snap.table("partials").to_pylist():
        rounds_before[p["lora_id"]] = max(rounds_before.get(p["lora_id"], 0), p["rounds_done"])
    assert rounds_before, "no round was committed before the kill"

    resumed = run_index(adaptive_setup["config"], [str(adaptive_setup["src"])], str(idx))
    want = _rows(adaptive_index["index"])
    got = _rows(str(idx))
    _assert_same_signatures(got, want, set(want))
    for lid in want:
        assert got[lid]["n_rounds"] == want[lid]["n_rounds"]
        for k in ("strength_se", "consistency_se", "direction_rse"):
            assert got[lid][k] == pytest.approx(want[lid][k], abs=1e-6), (lid, k)
    # exactly once: the resumed job generated only the samples not yet committed
    plan = IndexPlan(adaptive_setup["config"]).rounds
    committed = sum(done_before.values()) + sum(plan.used(r) for lid, r in rounds_before.items() if lid not in done_before)
    assert resumed.images_generated == sum(r["n"] for r in want.values()) - committed
    assert resumed.skipped == len(done_before)
