"""GPU throughput options, run on CPU where torch allows: bf16 UNet with an fp32 VAE, LoRA hotswap.

`torch.compile` + hotswap also runs on CPU (checked by hand: identical images, ~2 min of compile),
too slow for the suite; see README "GPU throughput options"."""

from __future__ import annotations

import numpy as np
import pytest

from carlos_ray.config import GeneratorSpec
from carlos_ray.models import create_generator

P = ["a lighthouse on a cliff", "a bowl of ramen"]
S = [3, 4]


@pytest.fixture(scope="module")
def reference(zoo_dir, one_torch_thread):
    g = create_generator(GeneratorSpec(), 32)
    out = {}
    for name in ("twin_a", "erratic"):
        g.activate(name, str(zoo_dir / f"{name}.safetensors"))
        out[name] = g.generate(P, S)[0]
    g.activate(None)
    out["base"] = g.generate(P, S)[0]
    return out


def test_hotswap_matches_regular_loading(reference, zoo_dir):
    g = create_generator(GeneratorSpec(lora_hotswap=True), 32)
    for name in ("twin_a", "erratic", "twin_a"):
        g.activate(name, str(zoo_dir / f"{name}.safetensors"))
        imgs, ok = g.generate(P, S)
        assert ok.all()
        np.testing.assert_array_equal(imgs, reference[name])


def test_bf16_unet_with_fp32_vae_runs_on_cpu(reference, zoo_dir):
    g = create_generator(GeneratorSpec(dtype="bfloat16", vae_dtype="float32"), 32)
    assert g.pipe.unet.dtype.__str__() == "torch.bfloat16" and g.pipe.vae.dtype.__str__() == "torch.float32"
    imgs, ok = g.generate(P, S)
    assert ok.all() and imgs.dtype == np.uint8
    # same model at lower precision: close to the fp32 images, not equal
    diff = np.abs(imgs.astype(int) - reference["base"]).mean()
    assert diff < 8.0


def test_nonfinite_images_are_flagged(tmp_path):
    from tests.conftest import write_overflow_lora

    path = tmp_path / "overflow.safetensors"
    write_overflow_lora(path)
    g = create_generator(GeneratorSpec(), 32)
    g.activate("overflow", str(path))
    imgs, ok = g.generate(P, S)
    assert not ok.any()
    assert imgs.dtype == np.uint8  # never NaN in the array itself


def test_compile_requires_hotswap():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lora_hotswap"):
        GeneratorSpec(compile_unet=True)
