"""`ray job submit` against a local head started here with token authentication on.

The head runs in its own temp dir and ports, beside the suite's shared Ray instance, and is stopped
by its process group (never `ray stop`, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from carlos_ray.store import Index
from tests.test_faults import _assert_same_signatures, _rows, _zoo_ids, copy_loras

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture
def token_head(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    _ray("get-auth-token", "--generate", env=env, check=True)
    assert (home / ".ray" / "auth_token").is_file()
    temp_dir = tempfile.mkdtemp(prefix="/tmp/crj")  # short: Ray's socket paths have a length limit
    gcs, dash = _free_port(), _free_port()
    # every port the head and its agents bind is chosen here: the suite's own Ray instance already
    # holds the defaults (a second dashboard agent on 52365 never registers: "No available agent")
    own_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", *own_ports,
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:  # the job agent comes up after the dashboard: wait until the API answers
            r = _ray("job", "list", "--address", url, env=env, timeout=60)
            if r.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head never became ready: {r.stderr[-2000:]}")
            time.sleep(2)
        yield {"url": url, "env": env, "home": home}
    finally:
        try:  # a graceful stop first; Ray's own shutdown can take half a minute on 2 busy cores
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_with_token_auth(token_head, built_index, zoo_dir, tmp_path):
    env, url = token_head["env"], token_head["url"]
    src = tmp_path / "src"  # three LoRAs: the job path, not the zoo's size, is under test
    names = copy_loras(zoo_dir, src, 3)

    # without the token the job API refuses
    other_home = tmp_path / "nohome"
    other_home.mkdir()
    no_token = {**env, "HOME": str(other_home)}
    denied = _ray("job", "list", "--address", url, env=no_token, timeout=60)
    assert denied.returncode != 0

    idx = tmp_path / "idx"
    deadline = time.time() + 240
    while True:
        r = _ray("job", "submit", "--address", url, "--working-dir", str(REPO), "--", "python", "jobs/index.py",
                 "--config", "conf/tiny.yaml", "--loras", str(src), "--index", str(idx), env=env, timeout=900)
        out = r.stdout + r.stderr
        # the dashboard answers before the node's job agent has registered; the job was not created: retry
        if r.returncode == 0 or "No available agent" not in out or time.time() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    sig = Index(str(idx)).snapshot().signatures()
    assert sig is not None and sig.num_rows == 3
    # the submitted job computes the same signatures as the suite's in-process Ray Data run
    _assert_same_signatures(_rows(str(idx)), _rows(built_index["index"]), _zoo_ids(built_index, zoo_dir, names))
