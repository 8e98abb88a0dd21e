"""No code path unpickles user data: checked on the source (AST) and while the hostile corpus is inspected."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("carlos_ray", "serve", "jobs") for p in (REPO / d).rglob("*.py"))

# module attribute calls that deserialize code or arbitrary objects
FORBIDDEN = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
    ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"),
    ("shelve", "open"), ("torch", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"), ("np", "load"),
    ("numpy", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
}
FORBIDDEN_BUILTINS = {"eval", "exec", "__import__"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_sources_exist():
    assert len(SOURCES) > 20, SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_deserializing_call_in_the_source(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    safe_loaders = {"yaml.SafeLoader", "yaml.CSafeLoader"} | {  # classes of this module derived from the safe loader
        n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and any(ast.unparse(b) == "yaml.SafeLoader" for b in n.bases)}
    bad = []
    for call in _calls(tree):
        f = call.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in FORBIDDEN:
            loader = {k.arg: ast.unparse(k.value) for k in call.keywords}.get("Loader")
            if not ((f.value.id, f.attr) == ("yaml", "load") and loader in safe_loaders):
                bad.append(f"{f.value.id}.{f.attr} at line {call.lineno}")
        if isinstance(f, ast.Name) and f.id in FORBIDDEN_BUILTINS:
            bad.append(f"{f.id}() at line {call.lineno}")
        if isinstance(f, ast.Attribute) and f.attr == "from_pretrained":
            owner = ast.unparse(f.value)
            if not owner.endswith("Config"):  # configs are JSON; models and pipelines must refuse pickles
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("use_safetensors"), ast.Constant) and kw["use_safetensors"].value is True
                if not ok:
                    bad.append(f"{owner}.from_pretrained without use_safetensors=True at line {call.lineno}")
    for node in ast.walk(tree):  # `from pickle import loads` and friends
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "cloudpickle", "dill", "marshal", "joblib"}:
            names = {a.name for a in node.names} & {"load", "loads", "Unpickler"}
            if names:
                bad.append(f"from {node.module} import {sorted(names)} at line {node.lineno}")
    assert not bad, f"{path.relative_to(REPO)}: {bad}"


def test_the_hostile_corpus_is_inspected_without_unpickling(tmp_path, monkeypatch, tiny_config):
    """Every deserializer is replaced by a tripwire while pickles renamed .safetensors, .ckpt and zips are inspected."""
    import torch

    from carlos_ray.indexing import collect_sources
    from carlos_ray.lora.hostile import write_hostile_corpus
    from carlos_ray.models.generator import generator_lora_targets

    tripped = []

    def tripwire(*args, **kwargs):
        tripped.append(args[:1])
        raise AssertionError("a deserializer was called")

    targets = generator_lora_targets(tiny_config.generator)  # builds the model on the meta device first
    expected = write_hostile_corpus(tmp_path)
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, tripwire)
    jobs, rejects, _ = collect_sources([str(tmp_path)], targets)
    assert not tripped
    assert not jobs
    codes = {Path(r["path"]).name: r["code"] for r in rejects}
    assert codes == expected
    assert {n for n, c in codes.items() if c == "pickle"} == {"pickle_renamed.safetensors", "zip_renamed.safetensors", "model.ckpt"}
