"""`carlos-ray` CLI: zoo and inspect in-process, the console script once as a subprocess, exit codes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from carlos_ray.cli import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from carlos_ray.lora.hostile import write_hostile_corpus

CLI = Path(sys.executable).with_name("carlos-ray")
ROW_KEYS = {"path", "ok", "reason", "format", "rank", "sha256"}


@pytest.fixture(scope="module")
def good_zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_zoo")
    assert main(["zoo", str(d), "--n", "8"]) == EXIT_OK
    return d, json.loads((d / "zoo.json").read_text())["members"]


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory, good_zoo):
    d = tmp_path_factory.mktemp("cli_hostile")
    expected = write_hostile_corpus(d)
    zoo_dir, members = good_zoo
    shutil.copy(zoo_dir / members[0]["file"], d / "good_one.safetensors")
    return d, expected


def _json_rows(out: str) -> list[dict]:
    lines = out.strip().splitlines()
    rows = [json.loads(line) for line in lines]  # every stdout line is one JSON object, nothing else
    assert all(isinstance(r, dict) for r in rows)
    return rows


# ---- zoo ---------------------------------------------------------------------------------------------
def test_zoo_command_writes_the_zoo_and_a_table(tmp_path, capsys):
    d = tmp_path / "z"
    assert main(["zoo", str(d), "--n", "9", "--seed", "5"]) == EXIT_OK
    out = capsys.readouterr().out
    members = json.loads((d / "zoo.json").read_text())["members"]
    assert len(members) == 9 == len(list(d.rglob("*.safetensors")))
    assert f"wrote 9 LoRAs to {d}" in out
    for m in members:
        assert m["name"] in out and m["file"] in out


def test_zoo_command_rejects_small_n_as_usage_error(tmp_path, capsys):
    assert main(["zoo", str(tmp_path / "z"), "--n", "3"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "n >= 8" in err and "n=3" in err


# ---- inspect -----------------------------------------------------------------------------------------
def test_inspect_json_on_good_zoo(good_zoo, capsys):
    d, members = good_zoo
    capsys.readouterr()
    assert main(["inspect", str(d), "--json"]) == EXIT_OK
    rows = _json_rows(capsys.readouterr().out)
    assert len(rows) == len(members) == 8
    by_path = {Path(r["path"]).resolve(): r for r in rows}
    for m in members:
        path = (d / m["file"]).resolve()
        r = by_path[path]
        assert ROW_KEYS <= set(r)
        assert r["ok"] is True and r["reason"] is None
        assert r["format"] == m["format"]
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert isinstance(r["rank"], int) and r["rank"] >= 1
    assert by_path[(d / "erratic.safetensors").resolve()]["rank"] == 16


def test_inspect_json_on_hostile_files(hostile_dir, capsys):
    d, expected = hostile_dir
    capsys.readouterr()
    assert main(["inspect", str(d), "--json"]) == EXIT_REJECTED
    rows = _json_rows(capsys.readouterr().out)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == set(expected) | {"good_one.safetensors"}
    for name, code in expected.items():
        r = by_name[name]
        assert ROW_KEYS <= set(r)
        assert r["ok"] is False and r["sha256"] is None, name
        assert r["reason"].startswith(f"{code}: ") and r["code"] == code, (name, r["reason"])
    assert by_name["good_one.safetensors"]["ok"] is True


def test_inspect_table_summary_and_no_compat(hostile_dir, capsys):
    d, expected = hostile_dir
    capsys.readouterr()
    assert main(["inspect", str(d)]) == EXIT_REJECTED
    out = capsys.readouterr().out
    n = len(expected) + 1
    assert f"{n} files, 1 usable, {len(expected)} rejected" in out
    # without the generator check, the SD1.5 LoRA is a well-formed file: only compat codes change
    from carlos_ray.lora.hostile import COMPAT_ONLY_CODES

    compat_only = {name for name, code in expected.items() if code in COMPAT_ONLY_CODES}
    assert compat_only
    assert main(["inspect", str(d), "--json", "--no-compat"]) == EXIT_REJECTED
    rows = {Path(r["path"]).name: r for r in _json_rows(capsys.readouterr().out)}
    assert {name for name, r in rows.items() if r["ok"]} == compat_only | {"good_one.safetensors"}


def test_inspect_single_file_and_bad_config(good_zoo, tmp_path, capsys):
    d, members = good_zoo
    f = d / members[0]["file"]
    capsys.readouterr()
    assert main(["inspect", str(f), "--json"]) == EXIT_OK
    (row,) = _json_rows(capsys.readouterr().out)
    assert row["ok"] and Path(row["path"]).resolve() == f.resolve()
    assert main(["inspect", str(f), "--config", str(tmp_path / "missing.yaml")]) == EXIT_USAGE
    assert "config file not found" in capsys.readouterr().err


# ---- usage errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["inspect"], ["inspect", "--bogus", "."], ["zoo"], ["zoo", "d", "--n", "eight"]],
    ids=["no-args", "unknown-command", "inspect-no-path", "unknown-flag", "zoo-no-dir", "zoo-bad-int"],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == EXIT_USAGE
    assert "carlos-ray: error:" in capsys.readouterr().err


def test_missing_path_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["inspect", str(missing), "--no-compat"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no such file or directory" in err and str(missing) in err


# ---- the installed console script ----------------------------------------------------------------------
def test_console_script_subprocess(good_zoo):
    assert CLI.exists(), f"console script not installed at {CLI}: `make setup` installs it"
    d, members = good_zoo
    res = subprocess.run([str(CLI), "inspect", str(d), "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == EXIT_OK, res.stderr
    rows = _json_rows(res.stdout)  # logging and library warnings stay off stdout
    assert len(rows) == len(members) and all(r["ok"] for r in rows)
    usage = subprocess.run([str(CLI)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == EXIT_USAGE and "usage: carlos-ray" in usage.stderr and usage.stdout == ""
