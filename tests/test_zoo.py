"""The synthetic LoRA zoo: files, formats, planted roles, compatibility with the tiny generator, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from carlos_ray.config import GeneratorSpec
from carlos_ray.lora import check_compatible, inspect_lora, match_modules, read_sidecar
from carlos_ray.models.generator import generator_lora_targets
from carlos_ray.zoo import random_weights, state_dict, tiny_targets, write_lora

PLANTED = {"scale_x0.5", "scale_x1", "scale_x2", "twin_a", "twin_b", "noop", "erratic", "te_only"}
ROLES = {"scale_family", "near_duplicate", "noop", "erratic", "text_encoder", "random"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from carlos_ray.zoo import make_zoo

    d = tmp_path_factory.mktemp("zoo")
    members = make_zoo(d, n=11, seed=3)
    return d, members


@pytest.fixture(scope="module")
def targets():
    return generator_lora_targets(GeneratorSpec())


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _deltas(path: Path) -> dict[str, np.ndarray]:
    """Effective weight delta per module, computed straight from the tensors (independent of the inspector)."""
    sd = load_file(str(path))
    out = {}
    for k, down in sd.items():
        if k.endswith(".lora_down.weight"):
            stem = k[: -len(".lora_down.weight")]
            up = sd[stem + ".lora_up.weight"]
            alpha = float(sd[stem + ".alpha"]) if stem + ".alpha" in sd else down.shape[0]
            out[stem] = up.astype(np.float64) @ down * (alpha / down.shape[0])
        elif k.endswith(".lora_A.weight"):
            stem = k[: -len(".lora_A.weight")]
            out[stem] = sd[stem + ".lora_B.weight"].astype(np.float64) @ down
    return out


def test_files_manifest_and_sidecars(zoo):
    d, members = zoo
    files = sorted(d.rglob("*.safetensors"))
    assert len(files) == len(members) == 11
    manifest = json.loads((d / "zoo.json").read_text())
    assert manifest["n"] == 11 and manifest["seed"] == 3
    assert manifest["members"] == members
    assert sorted(d / m["file"] for m in members) == files
    assert len({m["name"] for m in members}) == 11
    for m in members:
        path = d / m["file"]
        side = path.parent / (path.name[: -len(".safetensors")] + ".civitai.info")
        assert side.is_file(), f"missing sidecar for {m['name']}"
        info = read_sidecar(path)
        assert info.extra["sources"][0] == side.name
        assert info.trigger_words == m["trigger_words"]
        assert info.name and info.description
    # no stray files besides LoRAs, their sidecars and the manifest
    other = [p for p in d.rglob("*") if p.is_file() and not p.name.endswith((".safetensors", ".civitai.info", "zoo.json"))]
    assert other == []


def test_planted_roles_and_both_formats(zoo):
    d, members = zoo
    by_name = {m["name"]: m for m in members}
    assert PLANTED <= set(by_name)
    assert {m["role"] for m in members} == ROLES
    assert {by_name[n]["role"] for n in ("scale_x0.5", "scale_x1", "scale_x2")} == {"scale_family"}
    assert by_name["te_only"]["role"] == "text_encoder" and by_name["noop"]["role"] == "noop"
    assert {m["format"] for m in members} == {"kohya", "diffusers"}
    for m in members:  # the manifest's format is what the inspector reads from the file
        assert inspect_lora(d / m["file"]).format == m["format"]


def test_every_file_inspects_and_fits_the_tiny_generator(zoo, targets):
    d, members = zoo
    for m in members:
        path = d / m["file"]
        info = inspect_lora(path)
        assert info.sha256 == _sha(path)
        assert info.dtypes == ("F32",), f"{m['name']}: {info.dtypes}"  # like real LoRAs: no float64 tensors
        check_compatible(info, targets)
        mapping = match_modules(info, targets)
        assert len(mapping) == len(info.modules)
        for mod in info.modules:  # each module lands on a generator module of exactly its shape
            comp, _, name = mapping[mod.key].partition(".")
            assert targets[comp][name][:2] == (mod.out_features, mod.in_features)
        comps = set(info.targets)
        assert comps == ({"text_encoder", "text_encoder_2"} if m["role"] == "text_encoder" else {"unet"})


def test_tiny_targets_agree_with_the_built_generator_modules(targets):
    """zoo.tiny_targets() derives shapes from the config by hand; compare with the real (meta) modules."""
    t = tiny_targets()
    for name, shape in t["unet"].items():
        assert targets["unet"][name] == shape
    for comp in ("text_encoder", "text_encoder_2"):
        got = {k.removeprefix("text_model."): v for k, v in targets[comp].items()}
        for name, shape in t[comp].items():
            assert got[name.removeprefix("text_model.")] == shape


def test_planted_behaviour_is_in_the_weights(zoo):
    d, members = zoo
    by_name = {m["name"]: d / m["file"] for m in members}
    noop = load_file(str(by_name["noop"]))
    ups = [v for k, v in noop.items() if k.endswith("lora_up.weight")]
    assert ups and all(not u.any() for u in ups)
    assert any(v.any() for k, v in noop.items() if k.endswith("lora_down.weight"))
    # the scale family: one direction, deltas exactly 0.5x / 1x / 2x (kohya vs diffusers layout)
    half, one, two = (_deltas(by_name[n]) for n in ("scale_x0.5", "scale_x1", "scale_x2"))
    assert len(one) == len(half) == len(two) >= 1
    for (kh, dh), (k1, d1), (k2, d2) in zip(sorted(half.items()), sorted(one.items()), sorted(two.items())):
        assert np.abs(d1).max() > 0
        np.testing.assert_allclose(dh, 0.5 * d1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(d2, 2.0 * d1, rtol=1e-5, atol=1e-7)
    # near duplicates: ~1% apart; erratic: high rank and large
    a, b = _deltas(by_name["twin_a"]), _deltas(by_name["twin_b"])
    assert len(a) == len(b)
    rel = [np.linalg.norm(x - y) / np.linalg.norm(x) for x, y in zip((a[k] for k in sorted(a)), (b[k] for k in sorted(b)))]
    assert 0 < max(rel) < 0.05
    erratic = inspect_lora(by_name["erratic"])
    assert erratic.rank == 16 and all(inspect_lora(p).rank <= 8 for n, p in by_name.items() if n != "erratic")


def test_kohya_and_diffusers_layouts_describe_the_same_delta(tmp_path):
    rng = np.random.default_rng(0)
    w = random_weights(tiny_targets(), ("unet", "text_encoder"), rank=4, magnitude=0.7, rng=rng)
    for alpha in (None, 2.0):
        k = _deltas(write_lora(tmp_path / f"k{alpha}.safetensors", w, "kohya", alpha=alpha))
        dd = _deltas(write_lora(tmp_path / f"d{alpha}.safetensors", w, "diffusers", alpha=alpha))
        assert len(k) == len(dd) == len(w["unet"]) + len(w["text_encoder"])
        by_dotted = {key.split(".", 1)[1].replace(".", "_"): v for key, v in dd.items()}
        factor = 1.0 if alpha is None else alpha / 4
        for key, delta in k.items():
            comp, name = ("unet", key[len("lora_unet_"):]) if key.startswith("lora_unet_") else ("text_encoder", key[len("lora_te1_"):])
            np.testing.assert_allclose(by_dotted[name], delta, rtol=1e-6, atol=1e-9)
            down, up = next((dn, u) for n, (dn, u) in w[comp].items() if n.replace(".", "_") == name)
            np.testing.assert_allclose(delta, up.astype(np.float64) @ down * factor, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="unknown LoRA layout 'peft'; valid: kohya, diffusers"):
        state_dict(w, "peft")


def test_n_below_8_raises(tmp_path):
    from carlos_ray.zoo import make_zoo

    with pytest.raises(ValueError, match="n >= 8.*n=7"):
        make_zoo(tmp_path / "z", n=7)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_deterministic_per_seed(tmp_path, zoo):
    from carlos_ray.zoo import make_zoo

    d, members = zoo
    again = make_zoo(tmp_path / "again", n=11, seed=3)
    assert again == members
    for m in members:
        assert _sha(tmp_path / "again" / m["file"]) == _sha(d / m["file"]), m["name"]
        assert inspect_lora(tmp_path / "again" / m["file"]).sha256 == inspect_lora(d / m["file"]).sha256
    other = make_zoo(tmp_path / "other", n=11, seed=4)
    diff = [m["name"] for m in other if _sha(tmp_path / "other" / m["file"]) != _sha(d / m["file"])]
    assert set(diff) == {m["name"] for m in members}  # even noop: its up weights are zero, its down weights differ
