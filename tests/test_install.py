"""A non-editable `pip install .` runs `carlos-ray index`, `query`, `serve` and `report` from outside the checkout.

The package is installed (no deps) into a fresh venv whose only view of the dependencies is the shared venv's
site-packages, added by a `.pth` line (so no network is needed and the shared venv's editable install of some
checkout is not activated). Every command runs with the checkout off the path, in a directory outside it, and
starts its own Ray, whose workers run the venv's Python: they too import the installed package.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    build = root / "build"  # a copy of the tracked files: the build writes nothing into the checkout
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith("tests/"):
            (build / f).parent.mkdir(parents=True, exist_ok=True)
            (build / f).write_bytes((REPO / f).read_bytes())
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", str(build)], cwd=root, env=env)
    work = root / "elsewhere"
    work.mkdir()
    return {"venv": venv, "bin": venv / "bin" / "carlos-ray", "python": venv / "bin" / "python", "env": env,
            "work": work, "site": site}


@pytest.mark.slow
def test_installed_package_indexes_queries_serves_and_reports_outside_the_checkout(installed):
    py, cli, env, work = installed["python"], str(installed["bin"]), installed["env"], installed["work"]
    where = _run([str(py), "-c", "import carlos_ray.cli, carlos_ray.serving.app as a; print(a.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(installed["site"]), where.stdout  # not the checkout
    _run([cli, "zoo", str(work / "zoo"), "--n", "8"], work, env)
    index = work / "index"
    _run([cli, "index", "--config", "conf/tiny.yaml", "--loras", str(work / "zoo"), "--index", str(index),
          "--max-loras", "3"], work, env)
    body = json.loads(_run([cli, "query", "--index", str(index), "watercolor", "-k", "2", "--max-strength", "inf",
                            "--min-consistency", "0", "--json"], work, env).stdout)
    assert body["query"] == "watercolor" and len(body["hits"]) == 2
    out = _run([cli, "report", "--index", str(index), "--out", str(work / "report")], work, env).stdout
    assert (work / "report" / "index.html").is_file() and "report:" in out

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([cli, "serve", "--index", str(index), "--port", str(port)], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not any("carlos-ray: serving" in x for x in lines):
            time.sleep(0.5)
        assert proc.poll() is None, "".join(lines)[-3000:]
        r = requests.get(f"http://127.0.0.1:{port}/search",
                         params={"q": "watercolor", "k": 2, "max_strength": "inf", "min_consistency": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert [h["lora_id"] for h in r.json()["hits"]] == [h["lora_id"] for h in body["hits"]]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-3000:]
