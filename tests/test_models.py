"""Generator, encoder and tokenizer: real diffusers / transformers / open_clip classes at tiny size, no network.

One tiny generator and one tiny encoder are shared by the whole module. Torch runs on one thread here:
on a loaded 2-core box, two intra-op threads make the tiny UNet ~10x slower, and every comparison
below is between images made in the same process with the same settings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carlos_ray.config import EncoderSpec, GeneratorSpec
from carlos_ray.models import create_encoder, create_generator, encoder_image_size
from carlos_ray.models.generator import (
    SDXLGenerator,
    build_tiny_sdxl_pipeline,
    generator_lora_targets,
    load_model_config,
)
from carlos_ray.zoo import make_zoo, random_weights, tiny_targets, write_lora

PROMPTS = ["a red cube on a wooden table", "portrait of an old sailor, oil painting", "a city street at night in the rain"]
SEEDS = [42, 7, 123456]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(gen):
    gen.activate(None)
    images, finite = gen.generate(PROMPTS, SEEDS)
    return images, finite


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    return {m["name"]: str(d / m["file"]) for m in make_zoo(d, n=8, seed=0)}


def images_with(gen, name=None, path=None, prompts=PROMPTS, seeds=SEEDS):
    gen.activate(name, path)
    images, finite = gen.generate(prompts, seeds)
    assert finite.all()
    return images


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() == 0, f"{(diff > 0).sum()} values differ, max by {diff.max()}"


def changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    return float((a != b).mean())


# ---- generator: shape, determinism, batch independence ------------------------------------------------
def test_output_shape_dtype_and_finite_mask(base, encoder):
    images, finite = base
    assert encoder.image_size == 32 != GeneratorSpec().resolution  # exercises the resize path
    assert images.shape == (3, encoder.image_size, encoder.image_size, 3) and images.dtype == np.uint8
    assert finite.shape == (3,) and finite.dtype == bool and finite.all()
    assert images.std() > 5  # not a constant image
    assert changed_fraction(images[0], images[1]) > 0.5


def test_same_call_twice_is_bit_identical(gen, base):
    assert_same(images_with(gen), base[0])


def test_image_independent_of_batch_mates_and_position(gen, base):
    images = base[0]
    alone = images_with(gen, prompts=PROMPTS[:1], seeds=SEEDS[:1])
    assert alone.shape == (1, 32, 32, 3)
    assert_same(alone[0], images[0])
    # 5 samples: two micro-batches of 4, the second padded; the originals at new positions 4, 2, 0
    mixed = images_with(
        gen,
        prompts=[PROMPTS[2], "a bowl of fruit", PROMPTS[1], PROMPTS[0] + " at dawn", PROMPTS[0]],
        seeds=[SEEDS[2], 5, SEEDS[1], SEEDS[0], SEEDS[0]],
    )
    assert_same(mixed[4], images[0])
    assert_same(mixed[2], images[1])
    assert_same(mixed[0], images[2])
    # ...and the other inputs do matter: same seed with another prompt, same prompt with another seed
    assert changed_fraction(mixed[3], images[0]) > 0.1
    other_seed = images_with(gen, prompts=PROMPTS[:1], seeds=[SEEDS[0] + 1])
    assert changed_fraction(other_seed[0], images[0]) > 0.1


def test_generate_checks_lengths(gen):
    with pytest.raises(ValueError, match="got 2 prompts but 1 seeds"):
        gen.generate(PROMPTS[:2], SEEDS[:1])


# ---- generator: LoRA adapters ---------------------------------------------------------------------------
def test_lora_changes_output_and_none_restores_base(gen, base, zoo):
    with_lora = images_with(gen, "scale_x1", zoo["scale_x1"])
    assert changed_fraction(with_lora, base[0]) > 0.01
    assert_same(images_with(gen, None), base[0])
    # cached: re-activating without a path gives the same images again
    assert_same(images_with(gen, "scale_x1"), with_lora)
    gen.activate(None)


def test_unloaded_adapter_without_path_is_a_key_error(gen):
    with pytest.raises(KeyError, match="not loaded and no path"):
        gen.activate("never_loaded")


def test_non_safetensors_lora_is_refused(gen, tmp_path):
    p = tmp_path / "x.ckpt"
    p.write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        gen.activate("pickled", str(p))
    gen.activate(None)


def test_kohya_and_diffusers_layouts_give_identical_images(gen, base, tmp_path):
    w = random_weights(tiny_targets(), ("unet", "text_encoder", "text_encoder_2"), rank=4, magnitude=0.5,
                       rng=np.random.default_rng(11))
    k = write_lora(tmp_path / "same_k.safetensors", w, "kohya")
    d = write_lora(tmp_path / "same_d.safetensors", w, "diffusers")
    from_kohya = images_with(gen, "same_kohya", str(k))
    from_diffusers = images_with(gen, "same_diffusers", str(d))
    assert changed_fraction(from_kohya, base[0]) > 0.01
    assert_same(from_kohya, from_diffusers)
    gen.activate(None)


def test_noop_lora_is_bit_identical_to_base(gen, base, zoo):
    assert_same(images_with(gen, "noop", zoo["noop"]), base[0])
    gen.activate(None)


def test_text_encoder_only_lora_changes_output(gen, base, zoo):
    assert changed_fraction(images_with(gen, "te_only", zoo["te_only"]), base[0]) > 0.01
    gen.activate(None)


def test_lora_scale_two_equals_doubled_up_weights(gen, zoo):
    """scale_x1 at lora_scale 2 vs scale_x2 (up weights x2, other layout) at 1: x2 is exact in floats."""
    at_two = gen.spec.model_copy(update={"lora_scale": 2.0})
    old = gen.spec
    gen.spec = at_two
    try:
        doubled_by_scale = images_with(gen, "scale_x1", zoo["scale_x1"])
    finally:
        gen.spec = old
    doubled_weights = images_with(gen, "scale_x2", zoo["scale_x2"])
    assert_same(doubled_by_scale, doubled_weights)
    gen.activate(None)


def test_adapter_cache_eviction_reloads_correctly(gen, zoo):
    old = gen.spec
    gen.spec = old.model_copy(update={"adapter_cache_size": 2})
    try:
        fresh = {n: images_with(gen, n, zoo[n]) for n in ("twin_a", "erratic", "scale_x2")}
        assert len(gen._adapters) == 2
        assert set(gen._adapters) == {"erratic", "scale_x2"}  # twin_a dropped from the cache
        # only the active adapter's hooks are on the model (erratic and scale_x2 have as many modules)
        assert gen._lora.hooked_modules == len(gen._adapters["scale_x2"].updates)
        with pytest.raises(KeyError):
            gen.activate("twin_a")
        again = images_with(gen, "twin_a", zoo["twin_a"])
        assert_same(again, fresh["twin_a"])
        assert changed_fraction(fresh["twin_a"], fresh["erratic"]) > 0.01
        assert "erratic" not in gen._adapters  # least recently used went out
        assert_same(images_with(gen, "scale_x2"), fresh["scale_x2"])
    finally:
        gen.spec = old
        gen.activate(None)


def test_lora_targets_of_built_generator_match_meta_build(gen, zoo):
    """Compatibility targets must not change once peft has wrapped modules with adapters."""
    gen.activate("noop", zoo["noop"])
    gen.activate(None)
    assert gen._adapters  # an adapter has been prepared and applied once
    assert gen.lora_targets() == generator_lora_targets(GeneratorSpec())


# ---- generator: the paper-profile code path (from_pretrained on a local directory) -------------------------
@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sdxl_saved")
    build_tiny_sdxl_pipeline(GeneratorSpec().seed).save_pretrained(d, safe_serialization=True)
    return d


def test_saved_directory_holds_only_safetensors_weights(saved_pipeline):
    files = [p for p in saved_pipeline.rglob("*") if p.is_file()]
    assert (saved_pipeline / "model_index.json").is_file()
    weights = {p.parent.name for p in files if p.suffix == ".safetensors"}
    assert weights == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert not [p for p in files if p.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")]


def test_local_directory_generator_matches_tiny(saved_pipeline, gen, base):
    spec = GeneratorSpec(model=str(saved_pipeline))
    local = create_generator(spec, gen.output_size)
    assert isinstance(local, SDXLGenerator)
    assert_same(images_with(local), base[0])
    assert local.lora_targets() == generator_lora_targets(GeneratorSpec())  # no adapters loaded in `local`


def test_lora_targets_from_directory_config_equal_tiny(saved_pipeline):
    assert generator_lora_targets(GeneratorSpec(model=str(saved_pipeline))) == generator_lora_targets(GeneratorSpec())


def test_directory_without_model_index_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        SDXLGenerator(GeneratorSpec(model=str(tmp_path)), 32)
    assert str(tmp_path) in str(e.value) and "model_index.json" in str(e.value)


# ---- tokenizer ----------------------------------------------------------------------------------------------
TOKENIZER_TEXTS = [
    "a photo of a cat",
    "",
    "Hello, World!!! (test) -- ok? [yes]; {no}: 100% #1 @home",
    "naïve café résumé — Ωmega straße",
    "日本語のテキスト 🐱🚀 emoji 👍🏽 family 👨‍👩‍👧",
    "3.14159 and 42nd street, 1,000,000 and 2024-01-01",
    "  lots   of\t\twhitespace\n\nhere   ",
    "it's they're we've I'm you'll he'd",
    "UPPER lower MiXeD CaSe",
    "word " * 100,
    "x" * 500,
]


@pytest.fixture(scope="module")
def clip_tokenizers():
    import open_clip

    from carlos_ray.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(), open_clip.get_tokenizer("ViT-B-32")


def _hf_ids(tok, text: str) -> list[int]:
    # exactly how StableDiffusionXLPipeline.encode_prompt calls its tokenizers
    return tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids[0].tolist()


@pytest.mark.parametrize("text", TOKENIZER_TEXTS, ids=range(len(TOKENIZER_TEXTS)))
def test_tokenizer_ids_match_open_clip(clip_tokenizers, text):
    hf, oc = clip_tokenizers
    ref = oc([text])[0].tolist()
    got = _hf_ids(hf, text)
    assert len(got) == len(ref) == 77
    end = ref.index(49407)
    assert got[: end + 1] == ref[: end + 1]
    assert got[0] == 49406
    assert all(t == hf.pad_token_id for t in got[end + 1 :])


def test_tokenizer_truncates_long_text_with_end_token_last(clip_tokenizers):
    hf, oc = clip_tokenizers
    got = _hf_ids(hf, "word " * 100)
    assert got[0] == 49406 and got[-1] == 49407 and got[1:-1] == [got[1]] * 75


def test_tokenizer_specials_and_padding_match_sdxl(gen):
    from carlos_ray.models.tokenizer import build_clip_tokenizer

    te = load_model_config("tiny_sdxl.json")["text_encoder"]
    t1, t2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    assert len(t1) == te["vocab_size"] == 49408
    assert (t1.bos_token_id, t1.eos_token_id, t1.pad_token_id) == (te["bos_token_id"], te["eos_token_id"], 49407)
    assert t2.pad_token_id == 0  # SDXL's tokenizer_2 pads with "!", id 0
    assert _hf_ids(gen.pipe.tokenizer, PROMPTS[1]) == _hf_ids(t1, PROMPTS[1])
    assert _hf_ids(gen.pipe.tokenizer_2, "a b")[:6] == [49406, 320, 321, 49407, 0, 0]


# ---- encoder --------------------------------------------------------------------------------------------
def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_encoder_raw_features_are_not_normalized_and_match_open_clip(encoder):
    import open_clip

    x = _pixels(3, encoder.image_size)
    feats = encoder.encode_images(x)
    assert feats.shape == (3, encoder.embed_dim) == (3, 32) and feats.dtype == np.float32
    norms = np.linalg.norm(feats, axis=1)
    assert np.all(np.abs(norms - 1) > 1e-2), norms
    # independent preprocessing: OpenAI mean/std on [0, 1] pixels, then open_clip's own encode_image
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = encoder.model.encode_image((t - mean) / std).numpy()
        unit = encoder.model.encode_image((t - mean) / std, normalize=True).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats / norms[:, None], unit, rtol=1e-5, atol=1e-5)


def test_encoder_is_deterministic_and_seeded(encoder, base):
    images = base[0]
    a, b = encoder.encode_images(images), encoder.encode_images(images)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(encoder.encode_images(images[1:2])[0], a[1], rtol=1e-5, atol=1e-5)
    same_seed = create_encoder(EncoderSpec())
    assert np.array_equal(same_seed.encode_images(images), a)
    other_seed = create_encoder(EncoderSpec(seed=1))
    assert not np.allclose(other_seed.encode_images(images), a, atol=1e-3)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((1, 32, 32, 3), np.float32), "expected uint8 images"),
        (np.zeros((32, 32, 3), np.uint8), r"expected uint8 images \(B,H,W,3\)"),
        (np.zeros((1, 32, 32, 4), np.uint8), r"\(1, 32, 32, 4\)"),
        (np.zeros((1, 3, 32, 32), np.uint8), r"\(1, 3, 32, 32\)"),
        (np.zeros((2, 16, 16, 3), np.uint8), "expected 32x32 images, got 16x16"),
        (np.zeros((2, 32, 48, 3), np.uint8), "expected 32x32 images, got 32x48"),
    ],
)
def test_encode_images_validates_input(encoder, bad, match):
    with pytest.raises(ValueError, match=match):
        encoder.encode_images(bad)


def test_encode_texts_shape_and_reference(encoder):
    import open_clip

    texts = ["a cat", "an oil painting of a ship", ""]
    feats = encoder.encode_texts(texts)
    assert feats.shape == (3, encoder.embed_dim) and feats.dtype == np.float32
    with torch.no_grad():
        ref = encoder.model.encode_text(open_clip.tokenizer.SimpleTokenizer()(texts)).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(np.linalg.norm(feats, axis=1) - 1) > 1e-2)
    assert np.array_equal(encoder.encode_texts(texts), feats)


def test_encoder_image_size_without_building(encoder):
    assert encoder_image_size(EncoderSpec()) == encoder.image_size
    assert encoder.image_size == load_model_config("tiny_clip.json")["vision_cfg"]["image_size"]
    assert encoder_image_size(EncoderSpec(arch="ViT-B-32")) == 224
    assert encoder_image_size(EncoderSpec(arch="ViT-B-32-256")) == 256
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Q-99'"):
        encoder_image_size(EncoderSpec(arch="ViT-Q-99"))


SMALL_ARCH = "ViT-S-32-alt"  # the smallest registered open_clip architecture without timm/HF towers (~43M params)


def test_local_safetensors_checkpoint_for_named_arch(tmp_path, encoder):
    import open_clip
    from safetensors.torch import save_file

    from carlos_ray.models.encoder import OpenClipEncoder

    torch.manual_seed(123)
    src = open_clip.create_model(SMALL_ARCH, pretrained=None)
    state = {k: v.detach().half().contiguous() for k, v in src.state_dict().items()}  # fp16 halves the file
    ckpt = tmp_path / "small.safetensors"
    save_file(state, str(ckpt))
    spec = EncoderSpec(arch=SMALL_ARCH, pretrained=str(ckpt), seed=999)
    assert encoder_image_size(spec) == 224
    enc = OpenClipEncoder(spec)
    assert enc.image_size == 224
    loaded = enc.model.state_dict()
    for k in ("visual.conv1.weight", "text_projection", "token_embedding.weight", "visual.proj"):
        assert torch.equal(loaded[k], state[k].float()), k
    feats = enc.encode_images(_pixels(1, 224))
    assert feats.shape == (1, enc.embed_dim) and np.isfinite(feats).all()
    # a checkpoint of another architecture does not fit
    wrong = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(wrong))
    with pytest.raises(ValueError, match="does not fit"):
        OpenClipEncoder(EncoderSpec(arch=SMALL_ARCH, pretrained=str(wrong)))


def test_pickle_checkpoints_are_refused(tmp_path):
    from pydantic import ValidationError

    from carlos_ray.models.encoder import build_open_clip

    bin_path = tmp_path / "open_clip_pytorch_model.bin"
    bin_path.write_bytes(b"\x80\x02}q\x00.")  # a pickle; must never be opened
    with pytest.raises(ValidationError, match="pickle"):
        EncoderSpec(arch=SMALL_ARCH, pretrained=str(bin_path))
    # defence in depth: even a spec that skipped validation is refused before anything is read
    unchecked = EncoderSpec.model_construct(arch=SMALL_ARCH, pretrained=str(bin_path))
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        build_open_clip(unchecked)
    with pytest.raises(ValueError, match="unknown open_clip architecture 'nope'.*ViT-B-32"):
        build_open_clip(EncoderSpec(arch="nope"))


def test_generated_images_feed_the_encoder(encoder, base):
    feats = encoder.encode_images(base[0])
    assert feats.shape == (len(PROMPTS), encoder.embed_dim) and np.isfinite(feats).all()
