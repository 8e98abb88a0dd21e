"""Typed config: both shipped profiles load, typos and bad values name the key, hashes track what they claim."""

from __future__ import annotations

import pytest
import yaml

from carlos_ray.config import (
    Config,
    ConfigError,
    EncoderSpec,
    GeneratorSpec,
    SamplingSpec,
    config_schema_markdown,
)
from carlos_ray.paths import REPO_ROOT
from carlos_ray.models import create_encoder, create_generator, list_encoders, list_generators

PROMPT_HASH = "p" * 16


# ---- shipped profiles -----------------------------------------------------------------------------
def test_tiny_profile_loads_with_its_values():
    cfg = Config.from_file("conf/tiny.yaml")
    assert cfg.name == "tiny"
    assert (cfg.generator.model, cfg.generator.resolution, cfg.generator.steps) == ("tiny", 64, 4)
    assert cfg.encoder.arch == "tiny" and cfg.encoder.pretrained is None
    assert cfg.sampling.seeds == [42, 43]
    assert cfg.resources.generate.torch_threads == 1 and cfg.resources.embed.batch_size == 16
    # the file's keys are all taken, none silently defaulted: re-serialising gives back every value in the YAML
    raw = yaml.safe_load((REPO_ROOT / "conf/tiny.yaml").read_text())
    dumped = cfg.model_dump()
    for section, values in raw.items():
        if isinstance(values, dict):
            for k, v in values.items():
                got = dumped[section][k]
                if isinstance(v, dict):
                    got = {kk: got[kk] for kk in v}
                assert got == v, (section, k)


def test_paper_profile_loads_with_the_published_settings():
    cfg = Config.from_file(REPO_ROOT / "conf" / "paper.yaml")
    g = cfg.generator
    assert g.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (g.dtype, g.vae_dtype, g.resolution, g.steps, g.lora_scale) == ("float16", "float32", 1024, 25, 1.0)
    assert (cfg.encoder.arch, cfg.encoder.pretrained) == ("ViT-B-32", "openai")
    assert cfg.sampling.seeds == list(range(42, 58))
    assert cfg.sampling.trigger_words == "append" and cfg.query.joiner == " "
    assert (cfg.indexing.max_strength, cfg.indexing.min_consistency) == (9.8, 0.041)
    assert cfg.resources.embed.num_gpus == 0.25


def test_missing_file_and_bad_yaml_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.from_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        Config.from_file(bad)
    assert str(bad) in str(e.value)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping, got list"):
        Config.from_file(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert Config.from_file(empty) == Config()


# ---- typos -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, key",
    [
        ({"generatr": {}}, "generatr"),
        ({"generator": {"stpes": 4}}, "generator.stpes"),
        ({"encoder": {"pretrianed": "openai"}}, "encoder.pretrianed"),
        ({"resources": {"generate": {"num_gpu": 1}}}, "resources.generate.num_gpu"),
    ],
)
def test_misspelled_key_is_named(data, key):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(data)
    assert f"unknown key `{key}`" in str(e.value)


def test_misspelled_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("name: t\ngenerator:\n  resolutoin: 64\n")
    with pytest.raises(ConfigError) as e:
        Config.from_file(p)
    assert str(p) in str(e.value) and "generator.resolutoin" in str(e.value)


# ---- bad values ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, field, hint",
    [
        ({"generator": {"steps": -3}}, "generator.steps", "-3"),
        ({"generator": {"steps": 0}}, "generator.steps", "greater than or equal to 1"),
        ({"generator": {"resolution": 60}}, "generator.resolution", "multiple of 8"),
        ({"generator": {"dtype": "float8"}}, "generator.dtype", "float8"),
        ({"encoder": {"dtype": "float8"}}, "encoder.dtype", "'float32', 'float16' or 'bfloat16'"),
        ({"encoder": {"pretrained": "/ckpt/open_clip_model.bin"}}, "encoder.pretrained", "pickle"),
        ({"encoder": {"pretrained": "weights.PT"}}, "encoder.pretrained", "pickle"),
        ({"generator": {"compile_unet": True}}, "generator", "compile_unet requires lora_hotswap"),
        ({"sampling": {"num_seeds": 0}}, "sampling.num_seeds", "0"),
        ({"sampling": {"trigger_words": "prepend"}}, "sampling.trigger_words", "prepend"),
        ({"indexing": {"min_consistency": 2}}, "indexing.min_consistency", "2"),
    ],
)
def test_bad_value_names_the_field(data, field, hint):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(data)
    msg = str(e.value)
    assert f"`{field}`" in msg and hint in msg, msg


def test_compile_unet_with_hotswap_is_accepted_and_safetensors_checkpoint_is_not_refused():
    g = GeneratorSpec(compile_unet=True, lora_hotswap=True)
    assert g.compile_unet and g.lora_hotswap
    assert EncoderSpec(pretrained="/ckpt/clip.safetensors").pretrained == "/ckpt/clip.safetensors"


def test_assignment_is_validated_too():
    g = GeneratorSpec()
    with pytest.raises(ValueError, match="multiple of 8"):
        g.resolution = 100
    assert g.resolution == 64


# ---- hashes ----------------------------------------------------------------------------------------
def _variant(**sections) -> Config:
    return Config.from_dict(sections)


def test_lora_scale_changes_config_hash_but_not_base_key():
    a, b = _variant(), _variant(generator={"lora_scale": 0.5})
    assert a.config_hash(PROMPT_HASH) != b.config_hash(PROMPT_HASH)
    assert a.base_key(PROMPT_HASH) == b.base_key(PROMPT_HASH)
    c = _variant(sampling={"trigger_words": "ignore"})
    assert a.config_hash(PROMPT_HASH) != c.config_hash(PROMPT_HASH)
    assert a.base_key(PROMPT_HASH) == c.base_key(PROMPT_HASH)


@pytest.mark.parametrize(
    "other, prompt_hash",
    [
        ({"generator": {"steps": 5}}, PROMPT_HASH),
        ({"sampling": {"num_seeds": 3}}, PROMPT_HASH),
        ({"sampling": {"seed_start": 7}}, PROMPT_HASH),
        ({"sampling": {"seed_layout": "per_prompt"}}, PROMPT_HASH),
        ({"encoder": {"arch": "ViT-B-32"}}, PROMPT_HASH),
        ({}, "q" * 16),
    ],
)
def test_steps_seeds_encoder_and_prompts_change_both_hashes(other, prompt_hash):
    a, b = _variant(), _variant(**other)
    assert a.config_hash(PROMPT_HASH) != b.config_hash(prompt_hash)
    assert a.base_key(PROMPT_HASH) != b.base_key(prompt_hash)


def test_resources_and_device_do_not_change_hashes():
    a = _variant()
    b = _variant(resources={"generate": {"actors": 7}}, generator={"micro_batch": 2, "adapter_cache_size": 9})
    assert a.config_hash(PROMPT_HASH) == b.config_hash(PROMPT_HASH)
    assert a.base_key(PROMPT_HASH) == b.base_key(PROMPT_HASH)


def test_hashes_are_stable_across_instances_and_differ_from_each_other():
    a, b = Config.from_file("conf/tiny.yaml"), Config.from_file("conf/tiny.yaml")
    assert a.config_hash(PROMPT_HASH) == b.config_hash(PROMPT_HASH)
    assert a.base_key(PROMPT_HASH) != a.config_hash(PROMPT_HASH)
    assert len(a.config_hash(PROMPT_HASH)) == 16 and int(a.config_hash(PROMPT_HASH), 16) >= 0


# ---- seeds -----------------------------------------------------------------------------------------
def test_seeds_property():
    assert SamplingSpec().seeds == list(range(42, 58))
    assert SamplingSpec(seed_start=0, num_seeds=1).seeds == [0]
    s = SamplingSpec(seed_start=1000, num_seeds=3)
    assert s.seeds == [1000, 1001, 1002]


def test_the_default_seed_layout_keeps_every_existing_hash():
    a, b = _variant(), _variant(sampling={"seed_layout": "shared"})
    assert a.base_key(PROMPT_HASH) == b.base_key(PROMPT_HASH) and a.config_hash(PROMPT_HASH) == b.config_hash(PROMPT_HASH)
    assert "seed_layout" not in a._base_payload(PROMPT_HASH)
    with pytest.raises(ConfigError, match="seed_layout"):
        Config.from_dict({"sampling": {"seed_layout": "random"}})


def test_per_prompt_seeds_are_distinct_across_all_samples_and_shared_by_base_and_lora_rows():
    from carlos_ray.indexing import IndexPlan

    cfg = Config.from_file("conf/tiny.yaml")
    cfg.sampling.num_seeds = 3
    shared = IndexPlan(cfg).rows([None])
    assert {r["seed"] for r in shared} == set(cfg.sampling.seeds)  # every prompt: the same 3 seeds
    cfg.sampling.seed_layout = "per_prompt"
    plan = IndexPlan(cfg)
    base = plan.rows([None])
    seeds = [r["seed"] for r in base]
    assert len(set(seeds)) == len(base) == len(plan.prompts) * 3
    n_p = len(plan.prompts)
    assert all(r["seed"] == cfg.sampling.seed_start + r["seed_idx"] * n_p + r["prompt_idx"] for r in base)
    assert plan.independent_seeds and not IndexPlan(Config.from_file("conf/tiny.yaml")).independent_seeds


# ---- registries ------------------------------------------------------------------------------------
def test_unknown_generator_kind_lists_valid_ones():
    assert "sdxl" in list_generators()
    with pytest.raises(ValueError) as e:
        create_generator(GeneratorSpec(kind="flux"), 32)
    assert "'flux'" in str(e.value)
    for valid in list_generators():
        assert valid in str(e.value)


def test_unknown_encoder_kind_lists_valid_ones():
    assert "open_clip" in list_encoders()
    with pytest.raises(ValueError) as e:
        create_encoder(EncoderSpec(kind="siglip"))
    assert "'siglip'" in str(e.value)
    for valid in list_encoders():
        assert valid in str(e.value)


def test_schema_markdown_lists_every_leaf_field():
    md = config_schema_markdown()
    for key in ("generator.steps", "encoder.pretrained", "sampling.seed_start", "resources.generate.num_gpus", "query.joiner"):
        assert f"| `{key}` |" in md
    # every field is documented: no row ends with "None |" for a missing description
    assert "| None |" not in md
