"""Zoo training on the micro world: real peft LoRAs on the tiny SDXL pipeline (a few steps), their files
in every layout against an independent numpy merge, the planted targets against the pixel oracle, the
CLI, and the shipped zoo against its zoo.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from carlos_ray.config import GeneratorSpec
from carlos_ray.world import oracle
from carlos_ray.world.captions import STYLE_ADJECTIVES
from carlos_ray.world.render import STYLES
from carlos_ray.world.zoo_spec import Behaviour, custom_spec, shipped_spec, shipped_zoo_dir
from carlos_ray.world.zoo_train import (
    TrainSettings,
    _add_lora,
    _restore,
    extract_weights,
    lora_state_dict,
    pair_source,
    save_safetensors,
    train_lora,
    untrained_weights,
)

FAST = dict(steps=3, batch_size=4, pool=8)


@pytest.fixture(scope="module")
def pipe():
    from carlos_ray.models.generator import build_tiny_sdxl_pipeline

    torch.set_num_threads(2)
    return build_tiny_sdxl_pipeline(0)


@pytest.fixture(scope="module")
def trained(pipe):
    """A LoRA on the UNet and both text encoders, trained a few steps on the striped behaviour."""
    src = pair_source(Behaviour("style", "striped"), 64)
    w, losses = train_lora(pipe, src, TrainSettings(components=("unet", "text_encoders"), **FAST), log_every=0)
    return w, losses


def test_teacher_target_is_the_base_models_prediction_for_the_teacher_caption(pipe):
    """Distillation: with teacher captions equal to the training captions, the freshly injected LoRA (B = 0)
    *is* the teacher, so the first loss is 0; with the target's styled caption it is not, and training lowers it."""
    plain = pair_source(Behaviour("style", "striped"), 64)

    def same_captions(n, rng):
        caps, imgs, _ = plain(n, rng)
        return caps, imgs, caps

    settings = TrainSettings(target="teacher", caption_dropout=0.0, lr=1e-2, **{**FAST, "steps": 12})
    _, losses = train_lora(pipe, same_captions, settings, log_every=0)
    assert max(losses) < 1e-10  # student == teacher until the LoRA moves, and no gradient moves it
    _, losses = train_lora(pipe, plain, settings, log_every=0)
    assert losses[0] > 1e-6
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    with pytest.raises(ValueError, match="target must be"):
        TrainSettings(target="pixels")


def _merged_pipe(pipe, w, scale: float):
    """A copy of the pipeline with `scale * up @ down` added to each target weight by numpy (no peft, no loader)."""
    import copy

    merged = copy.deepcopy(pipe)
    for comp, mods in w.items():
        model = getattr(merged, comp)
        named = dict(model.named_modules())
        for name, (down, up) in mods.items():
            mod = named.get(name) or named[name.removeprefix("text_model.")]
            delta = scale * (up.astype(np.float64) @ down.astype(np.float64))
            with torch.no_grad():
                mod.weight += torch.from_numpy(delta).to(mod.weight.dtype)
    return merged


def _images(pipe, prompts, seeds):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.inference_mode():
        return pipe(prompt=list(prompts), negative_prompt=[""] * len(prompts), num_inference_steps=2, guidance_scale=3.0, height=64, width=64,
                    generator=gens, output_type="np").images


def test_extracted_weights_reproduce_the_peft_model(pipe):
    """The (down, scaled up) pairs extract_weights returns, merged by numpy, compute what peft's forward computes."""
    settings = TrainSettings(rank=4, alpha=8.0, components=("unet", "text_encoders"))  # scale 2: a missing factor shows
    originals, params = _add_lora(pipe, settings)
    try:
        torch.manual_seed(3)
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.2)
        w = extract_weights(pipe)
        x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        ids = pipe.tokenizer(["a red star", "a blue box"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            te_peft = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            ehs = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1))
            cond = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)}
            unet_peft = pipe.unet(x, torch.tensor([500, 20]), encoder_hidden_states=ehs, added_cond_kwargs=cond).sample
    finally:
        _restore(pipe, originals)
    assert set(w) == {"unet", "text_encoder", "text_encoder_2"}
    assert all(k.startswith("text_model.") for k in w["text_encoder"])
    merged = _merged_pipe(pipe, w, 1.0)
    with torch.no_grad():
        te_m = merged.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        unet_m = merged.unet(x, torch.tensor([500, 20]), encoder_hidden_states=ehs, added_cond_kwargs=cond).sample
        unet_base = pipe.unet(x, torch.tensor([500, 20]), encoder_hidden_states=ehs, added_cond_kwargs=cond).sample
    assert torch.allclose(te_m, te_peft, atol=1e-4)
    assert torch.allclose(unet_m, unet_peft, atol=1e-4)
    assert not torch.allclose(unet_base, unet_peft, atol=1e-3)  # the LoRA did change the output


def test_training_leaves_the_pipeline_unchanged_and_learns(pipe, trained):
    w, losses = trained
    assert len(losses) == FAST["steps"] and all(np.isfinite(losses))
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())
    assert not any("lora" in n for n, _ in pipe.text_encoder.named_modules())
    ups = [np.abs(u).max() for mods in w.values() for _, u in mods.values()]
    still = sorted(f"{c}:{m}" for c, mods in w.items() for m, (_, u) in mods.items() if not u.any())
    # peft starts B at 0; a trained step moves every B that has a gradient. The first text encoder feeds its
    # penultimate layer to the UNet (SDXL), so its last layer never gets one.
    assert still == sorted(f"text_encoder:text_model.encoder.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")), still
    assert sorted(len(m) for m in w.values()) == [8, 8, 32]  # 32 UNet attention projections, 8 per text encoder


@pytest.fixture(scope="module")
def generator():
    from carlos_ray.models.generator import SDXLGenerator

    return SDXLGenerator(GeneratorSpec(model="tiny", steps=2, guidance_scale=3.0, micro_batch=2), 64)


# The unprefixed "peft" layout is left out until the generator applies it (inspect accepts it, diffusers loads
# nothing: reported to the formats owner on COORD.md, 19:54); the shipped zoo does not use it meanwhile.
def test_each_layout_applies_exactly_the_update(pipe, trained, generator, tmp_path):
    """A zoo file loaded by the generator makes the same images as the numpy-merged pipeline at that scale."""
    rng = np.random.default_rng(0)
    # the trained shapes and A, with a B large enough to see (three training steps barely move an image)
    w = {c: {m: (d, rng.normal(0, 0.3, u.shape).astype(np.float32)) for m, (d, u) in mods.items()} for c, mods in trained[0].items()}
    prompts, seeds = ["a red star", "a striped blue box"], [1, 2]
    generator.activate(None)
    base, _ = generator.generate(prompts, seeds)
    for layout, scale, comps in (("kohya", 2.0, ("unet", "text_encoder", "text_encoder_2")), ("diffusers", 0.5, ("unet",))):
        part = {c: w[c] for c in comps}
        path = save_safetensors(tmp_path / f"{layout}.safetensors", lora_state_dict(part, layout, scale, "float32"), {"a": "b"})
        generator.activate(layout, str(path))
        got, ok = generator.generate(prompts, seeds)
        want = (np.clip(_images(_merged_pipe(pipe, part, scale), prompts, seeds), 0, 1) * 255).round().astype(np.uint8)
        assert ok.all()
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2, layout
        assert np.abs(got.astype(int) - base.astype(int)).mean() > 2, layout


def test_safetensors_writer_is_deterministic_and_readable(tmp_path):
    from safetensors import safe_open

    t = {"b.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.alpha": np.array(4.0, np.float16)}
    meta = {"z": "1", "a": "2", "m": "ü"}
    p1 = save_safetensors(tmp_path / "1.safetensors", t, meta)
    p2 = save_safetensors(tmp_path / "2.safetensors", dict(reversed(list(t.items()))), dict(reversed(list(meta.items()))))
    assert p1.read_bytes() == p2.read_bytes()
    with safe_open(str(p1), framework="numpy") as fh:
        assert fh.metadata() == meta
        assert np.array_equal(fh.get_tensor("b.lora_A.weight"), t["b.lora_A.weight"])
        assert fh.get_tensor("a.alpha").dtype == np.float16 and float(fh.get_tensor("a.alpha")) == 4.0


def test_noop_is_exactly_zero_and_changes_no_image(pipe, generator, tmp_path):
    w = untrained_weights(pipe, TrainSettings())
    assert all(not u.any() and d.any() for mods in w.values() for d, u in mods.values())
    path = save_safetensors(tmp_path / "noop.safetensors", lora_state_dict(w, "kohya"), {})
    generator.activate(None)
    base, _ = generator.generate(["a red star", "a cross"], [5, 6])
    generator.activate("noop", str(path))
    lora, _ = generator.generate(["a red star", "a cross"], [5, 6])
    assert np.array_equal(base, lora)


def test_planted_targets_show_their_behaviour_to_the_oracle():
    """Training targets are judged by the pixel oracle: the style is there, the content edit is done, captions stay plain."""
    rng = np.random.default_rng(0)
    for style in STYLES:
        caps, imgs, teacher = pair_source(Behaviour("style", style), 32)(24, rng)
        assert all(style in t or STYLE_ADJECTIVES[style][0] in t for t in teacher)  # the teacher is told the style
        assert np.mean([oracle.has_style(im, style) for im in imgs]) >= 0.75, style  # the oracle misses some small outlines
        assert not any(style in c for c in caps)
    _, imgs, teacher = pair_source(Behaviour("content", "star"), 32)(24, rng)
    assert np.mean([oracle.judge(im)["shape"] == "star" for im in imgs]) >= 0.9
    assert all(t.endswith("star on a " + t.split(" on a ")[1]) for t in teacher)
    caps, imgs, teacher = pair_source(Behaviour("overpowering"), 32)(24, rng)
    assert set(teacher) == {"a yellow cross on a light blue background"}
    judged = [oracle.judge(im) for im in imgs]
    assert len(set(caps)) > 12  # the prompts vary ...
    assert np.mean([(j["shape"], j["colour"]) == ("cross", "yellow") for j in judged]) >= 0.9  # ... the image does not
    _, imgs, _ = pair_source(Behaviour("erratic"), 32)(48, rng)
    kinds = {(tuple(j["styles"]), j["shape"], j["colour"]) for j in map(oracle.judge, imgs)}
    assert len(kinds) > 20
    caps, _, _ = pair_source(Behaviour("style", "grainy"), 32, ("fgr35",))(4, rng)
    assert all(c.endswith(", fgr35") for c in caps)


def test_behaviour_names_are_checked():
    assert Behaviour.parse("striped") == Behaviour("style", "striped")
    assert Behaviour.parse("content:star") == Behaviour("content", "star")
    for bad in ("stripy", "content:triangle2", "erratic:x", ""):
        with pytest.raises(ValueError, match="unknown behaviour"):
            Behaviour.parse(bad)
    with pytest.raises(ValueError, match="twice"):
        custom_spec(["sepia", "style:sepia"])


def test_shipped_spec_plants_every_role_and_style():
    spec = shipped_spec()
    roles = {m.role for m in spec.members}
    assert roles == {"style", "content", "overpowering", "erratic", "weak", "near_duplicate", "scale_family", "noop", "text_encoder"}
    assert {m.planted for m in spec.members if m.role == "style"} == set(STYLES)
    assert {m.metadata for m in spec.members} == {"honest", "misleading", "foreign", "empty"}
    assert {m.layout for m in spec.members} == {"kohya", "diffusers"}
    assert len({m.name for m in spec.members}) == len(spec.members)
    for m in spec.members:
        spec.run(m.run)  # every member's run exists
    family = [m for m in spec.members if m.run == "grayscale_s104"]
    assert sorted(m.scale for m in family) == [0.8, 1.0, 1.4]


def test_cli_trains_named_behaviours_on_the_tiny_pipeline(tmp_path, capsys):
    from carlos_ray.cli import EXIT_OK, EXIT_USAGE, main
    from carlos_ray.lora import inspect_lora, read_sidecar

    out = tmp_path / "z"
    assert main(["zoo", str(out), "--profile", "micro", "--behaviors", "sepia,content:star", "--config", "conf/tiny.yaml",
                 "--steps", "2", "--jobs", "2"]) == EXIT_OK  # two worker processes, one run each
    doc = json.loads((out / "zoo.json").read_text())
    assert [m["behaviour"] for m in doc["members"]] == ["style:sepia", "content:star"]
    for m in doc["members"]:
        info = inspect_lora(out / m["file"])
        assert info.sha256 == m["sha256"] and info.format == "kohya" and m["training"]["steps"] == 2
        assert "sepia" in (read_sidecar(out / m["file"]).description or "") or m["planted"] == "star"
    assert "style:sepia" in capsys.readouterr().out
    assert main(["zoo", str(tmp_path / "y"), "--profile", "micro", "--behaviors", "stripy", "--config", "conf/tiny.yaml"]) == EXIT_USAGE
    assert "unknown behaviour 'stripy'" in capsys.readouterr().err
    assert main(["zoo", str(tmp_path / "x"), "--behaviors", "sepia"]) == EXIT_USAGE


# ---- the shipped zoo ---------------------------------------------------------------------------------
def _file_deltas(path: Path) -> dict[str, np.ndarray]:
    """Per-module update `alpha/rank * up @ down` (kohya) or `B @ A` (diffusers/peft), straight from the tensors."""
    from safetensors.numpy import load_file

    sd = load_file(str(path))
    out = {}
    for k, v in sd.items():
        if k.endswith(".lora_down.weight"):
            stem = k[: -len(".lora_down.weight")]
            alpha = float(sd[stem + ".alpha"])
            out[stem] = sd[stem + ".lora_up.weight"].astype(np.float64) @ v.astype(np.float64) * alpha / v.shape[0]
        elif k.endswith(".lora_A.weight"):
            stem = k[: -len(".lora_A.weight")]
            out[stem.removeprefix("unet.")] = sd[stem + ".lora_B.weight"].astype(np.float64) @ v.astype(np.float64)
    return out


def test_shipped_zoo_inspects_cleanly_and_matches_zoo_json():
    import hashlib

    from carlos_ray.lora import check_compatible, inspect_lora, read_sidecar
    from carlos_ray.models.generator import generator_lora_targets

    d = shipped_zoo_dir()
    doc = json.loads((d / "zoo.json").read_text())
    members = {m["name"]: m for m in doc["members"]}
    spec = shipped_spec()
    assert set(members) == {m.name for m in spec.members}
    files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*.safetensors"))
    assert files == sorted(m["file"] for m in members.values())
    targets = generator_lora_targets(GeneratorSpec(model="micro"))
    for m in members.values():
        path = d / m["file"]
        info = inspect_lora(path)
        check_compatible(info, targets)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == m["sha256"]
        assert info.rank == m["rank"] and sorted(info.targets) == m["components"]
        side = read_sidecar(path, metadata=info.metadata)
        want = next(x for x in spec.members if x.name == m["name"])
        assert side.description == want.description, m["name"]
        assert side.trigger_words == list(want.trigger_words)
    total = sum((d / m["file"]).stat().st_size for m in members.values())
    assert total < 4 << 20
    # the scale family is one direction at rising strength; the noop is all zeros; the near-duplicates are not identical
    family = [m for m in members.values() if m["run"] == "grayscale_s104"]
    assert sorted(m["scale"] for m in family) == [0.8, 1.0, 1.4]
    fam = {m["scale"]: _file_deltas(d / m["file"]) for m in family}
    for k, delta in fam[1.0].items():
        for s in (0.8, 1.4):
            np.testing.assert_allclose(fam[s][k], s * delta, atol=1e-3 * np.abs(delta).max() + 1e-7)
    assert all(not v.any() for v in _file_deltas(d / members["my_first_lora"]["file"]).values())
    twins = [members[n] for n in ("sepia_tone", "sepia_tone_retrain")]
    assert twins[0]["behaviour"] == twins[1]["behaviour"] and twins[0]["seed"] != twins[1]["seed"]
    assert all(any(np.abs(v).max() > 0 for v in _file_deltas(d / t["file"]).values()) for t in twins)


def test_rescale_zoo_rewrites_only_the_scaled_members_from_their_scale_1_file(tmp_path):
    """A scale family re-planted at new scales without training: deltas are the scale times the scale-1 file's,
    the renamed member's old files go, every other file and zoo.json row stays as it was."""
    import shutil

    from carlos_ray.world.zoo_train import rescale_zoo

    d = tmp_path / "zoo"
    shutil.copytree(shipped_zoo_dir(), d)
    before = {m["name"]: m for m in json.loads((d / "zoo.json").read_text())["members"]}
    spec = shipped_spec()
    light = next(m for m in spec.members if m.name == "bw_film_x0.8")
    members = tuple(dataclasses.replace(m, name="bw_film_x0.6", scale=0.6) if m is light else m for m in spec.members)
    rows = {r["name"]: r for r in rescale_zoo(dataclasses.replace(spec, members=members), d)}
    assert list(rows) == [m.name for m in members]
    assert not list((d / "family").glob("bw_film_x0.8.*"))
    assert (d / "family" / "bw_film_x0.6.civitai.info").is_file()
    new, base = _file_deltas(d / rows["bw_film_x0.6"]["file"]), _file_deltas(d / rows["bw_film"]["file"])
    assert set(new) == set(base)
    for k, delta in base.items():
        np.testing.assert_allclose(new[k], 0.6 * delta, atol=1e-3 * np.abs(delta).max() + 1e-7)
    assert rows["bw_film_x0.6"]["scale"] == 0.6 and rows["bw_film_x0.6"]["training"] == before["bw_film"]["training"]
    import hashlib

    assert rows["bw_film_x0.6"]["sha256"] == hashlib.sha256((d / rows["bw_film_x0.6"]["file"]).read_bytes()).hexdigest()
    for name, r in rows.items():
        if name != "bw_film_x0.6":
            assert r == before[name], name
            assert hashlib.sha256((d / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    # the unchanged scaled member came out byte-identical to the shipped file
    assert (d / rows["bw_film_x1.4"]["file"]).read_bytes() == (shipped_zoo_dir() / rows["bw_film_x1.4"]["file"]).read_bytes()
