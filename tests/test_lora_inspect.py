"""LoRA inspection: header validation, hostile files, compatibility with a tiny real SDXL-shaped generator."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_numpy
from safetensors.numpy import save_file as save_numpy_file
from safetensors.torch import save_file as save_torch_file

from carlos_ray.lora import (
    REJECT_CODES,
    LoraRejected,
    check_compatible,
    discover_loras,
    inspect_lora,
    match_modules,
    read_sidecar,
    targets_from_modules,
)
from carlos_ray.lora.hostile import (
    COMPAT_ONLY_CODES,
    kohya_state,
    make_symlink_loop,
    pack_safetensors,
    peft_state,
    write_hostile_corpus,
)
from carlos_ray.lora.inspect import kohya_to_dotted

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"

# ---------------------------------------------------------------------------------------------------
# Fixtures: tiny real generator modules (diffusers UNet, transformers CLIP text encoders)
# ---------------------------------------------------------------------------------------------------


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        transformer_layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        sample_size=16,
        in_channels=4,
        out_channels=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        use_linear_projection=True,
    )


def _tiny_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    te1 = CLIPTextModel(cfg)
    cfg2 = CLIPTextConfig(**{**cfg.to_dict(), "hidden_size": 48, "intermediate_size": 40, "projection_dim": 48})
    te2 = CLIPTextModelWithProjection(cfg2)
    return te1, te2


@pytest.fixture(scope="module")
def tiny_modules():
    te1, te2 = _tiny_text_encoders()
    return {"unet": _tiny_unet(), "text_encoder": te1, "text_encoder_2": te2}


@pytest.fixture(scope="module")
def targets(tiny_modules):
    return {name: targets_from_modules(m.named_modules()) for name, m in tiny_modules.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    return d, write_hostile_corpus(d)


def _kohya_file(path: Path, mods, **kw) -> Path:
    save_numpy_file(kohya_state(mods, **kw), str(path))
    return path


# ---------------------------------------------------------------------------------------------------
# targets_from_modules
# ---------------------------------------------------------------------------------------------------


def test_targets_from_modules_matches_weight_shapes(tiny_modules, targets):
    for comp, model in tiny_modules.items():
        expected = {  # (out, in) of a Linear; a Conv2d also carries its kernel
            n: tuple(m.weight.shape[:2]) + (tuple(m.weight.shape[2:]) if type(m) is torch.nn.Conv2d else ())
            for n, m in model.named_modules()
            if type(m) in (torch.nn.Linear, torch.nn.Conv2d)
        }
        assert targets[comp] == expected
        assert len(expected) > 10
    assert targets["unet"][f"{ATTN}.attn2.to_k"] == (64, 32)  # (out, in): context width 32
    assert targets["unet"]["down_blocks.0.resnets.0.conv1"] == (32, 32, 3, 3)
    assert targets["text_encoder_2"]["text_projection"] == (48, 48)
    # the module itself works as well as its named_modules()
    assert targets_from_modules(tiny_modules["text_encoder"]) == targets["text_encoder"]


# ---------------------------------------------------------------------------------------------------
# Hostile corpus: every code
# ---------------------------------------------------------------------------------------------------


def test_corpus_is_small_and_codes_are_known(corpus):
    d, expected = corpus
    assert set(expected.values()) <= REJECT_CODES
    for name in expected:
        assert (d / name).stat().st_size < 1_000_000, name


def test_every_corpus_file_is_rejected_with_its_code(corpus, targets):
    d, expected = corpus
    seen = set()
    for name, code in sorted(expected.items()):
        if code in COMPAT_ONLY_CODES:
            info = inspect_lora(d / name)
            with pytest.raises(LoraRejected) as exc:
                check_compatible(info, targets)
        else:
            with pytest.raises(LoraRejected) as exc:
                inspect_lora(d / name)
        assert exc.value.code == code, (name, exc.value)
        assert exc.value.reason and len(exc.value.reason) > 10
        seen.add(code)
    assert {
        "truncated", "header_too_large", "overlap", "bad_header", "metadata_too_large", "nonfinite",
        "pickle", "empty", "not_lora", "not_safetensors", "wrong_base",
    } <= seen


def test_sd15_lora_reason_names_both_families(corpus, targets):
    d, _ = corpus
    info = inspect_lora(d / "sd15_kohya.safetensors")
    assert info.format == "kohya" and info.dtypes == ("F16",)
    with pytest.raises(LoraRejected) as exc:
        check_compatible(info, targets)
    assert "looks like an SD1.x LoRA; this generator is SDXL-shaped" in exc.value.reason


def test_reject_reasons_name_the_values(corpus):
    d, _ = corpus
    with pytest.raises(LoraRejected, match="3221225472") as exc:
        inspect_lora(d / "header_gigabytes.safetensors")
    assert exc.value.path == str(d / "header_gigabytes.safetensors")
    with pytest.raises(LoraRejected, match="needs 64 bytes"):
        inspect_lora(d / "offsets_inconsistent.safetensors")
    with pytest.raises(LoraRejected, match="'F33'.*F32"):
        inspect_lora(d / "bad_dtype.safetensors")
    with pytest.raises(LoraRejected, match="flat index 5"):
        inspect_lora(d / "nan_weights.safetensors")
    with pytest.raises(LoraRejected, match="zip archive"):
        inspect_lora(d / "zip_renamed.safetensors")


def test_check_values_false_skips_nan_scan(corpus):
    d, _ = corpus
    info = inspect_lora(d / "nan_weights.safetensors", check_values=False)
    assert info.rank == 2 and info.dtypes == ("F16",)


def test_limits_are_configurable(corpus, tmp_path):
    d, _ = corpus
    info = inspect_lora(d / "huge_metadata.safetensors", max_metadata_bytes=1 << 20)
    assert len(info.metadata["ss_tag_frequency"]) == 600 * 1024
    path = _kohya_file(tmp_path / "ok.safetensors", {"lora_unet_x_to_q": (8, 8)})
    with pytest.raises(LoraRejected) as exc:
        inspect_lora(path, max_header_bytes=16)
    assert exc.value.code == "header_too_large"


def test_more_malformed_files(tmp_path):
    key = "lora_unet_a_to_q"
    cases = {
        "short.safetensors": (b"\x10\x00\x00", "truncated"),
        "trailing.safetensors": (save_numpy(kohya_state({key: (4, 4)})) + b"\0" * 8, "bad_header"),
        "gap.safetensors": (
            pack_safetensors({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)),
            "bad_header",
        ),
        "list_header.safetensors": (pack_safetensors(b"[1, 2]", b""), "not_safetensors"),
        "nan_const.safetensors": (pack_safetensors(b'{"x": NaN}', b""), "bad_header"),
        "bool_shape.safetensors": (
            pack_safetensors({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)),
            "bad_header",
        ),
        "meta_not_str.safetensors": (
            pack_safetensors({"__metadata__": {"a": 1}, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
            "bad_header",
        ),
        "deep.safetensors": (pack_safetensors(b"{" + b'"a":[' * 50000 + b"]" * 50000 + b"}", b""), "bad_header"),
        "missing_up.safetensors": (
            save_numpy({f"{key}.lora_down.weight": np.zeros((2, 4), np.float32)}),
            "bad_lora",
        ),
        "rank_mismatch.safetensors": (
            save_numpy({f"{key}.lora_down.weight": np.zeros((2, 4), np.float32),
                        f"{key}.lora_up.weight": np.zeros((4, 3), np.float32)}),
            "bad_lora",
        ),
        "mixed_styles.safetensors": (
            save_numpy({**kohya_state({key: (4, 4)}), **peft_state({"unet.a.to_q": (4, 4)})}),
            "bad_lora",
        ),
        "loha.safetensors": (  # half a LoHa: LoHa is supported, a module without its second Hadamard factor is not
            save_numpy({f"{key}.hada_w1_a": np.zeros((4, 2), np.float32), f"{key}.hada_w1_b": np.zeros((2, 4), np.float32)}),
            "bad_lora",
        ),
        "oft.safetensors": (save_numpy({f"{key}.oft_blocks": np.zeros((4, 2, 2), np.float32)}), "unsupported"),
        "alpha_nan.safetensors": (save_numpy(kohya_state({key: (4, 4)}, alpha=float("nan"))), "nonfinite"),
        "weights.pt": (save_numpy(kohya_state({key: (4, 4)})), "pickle"),  # even valid bytes: never by name
        "pickle_proto2.safetensors": (b"\x80\x02}q\x00.", "pickle"),
    }
    for name, (data, code) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LoraRejected) as exc:
            inspect_lora(tmp_path / name)
        assert exc.value.code == code, (name, exc.value)
    # the reason names the format and what is missing
    with pytest.raises(LoraRejected, match="LyCORIS LoHa .* misses hada_w2_a, hada_w2_b"):
        inspect_lora(tmp_path / "loha.safetensors")
    with pytest.raises(LoraRejected, match="LyCORIS OFT"):
        inspect_lora(tmp_path / "oft.safetensors")


def test_fifo_is_not_opened_for_blocking_read(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(LoraRejected) as exc:
        inspect_lora(fifo)
    assert exc.value.code == "unreadable"


def test_path_checks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    real = _kohya_file(outside / "x.safetensors", {"lora_unet_a_to_q": (4, 4)})
    (root / "link.safetensors").symlink_to(real)
    inside = _kohya_file(root / "in.safetensors", {"lora_unet_a_to_q": (4, 4)})
    assert inspect_lora(inside, allowed_roots=[root]).path == inside.resolve()
    with pytest.raises(LoraRejected) as exc:
        inspect_lora(root / "link.safetensors", allowed_roots=[root])
    assert exc.value.code == "outside_root" and str(outside) in exc.value.reason
    assert inspect_lora(root / "link.safetensors", allowed_roots=[root, outside]).path == real.resolve()
    (root / "self.safetensors").symlink_to(root / "self.safetensors")
    for name, code in (("self.safetensors", "symlink_loop"), ("nope.safetensors", "not_found")):
        with pytest.raises(LoraRejected) as exc:
            inspect_lora(root / name)
        assert exc.value.code == code
    # a symlink named .safetensors that points at a .ckpt is still a pickle
    ckpt = outside / "m.ckpt"
    ckpt.write_bytes(save_numpy(kohya_state({"lora_unet_a_to_q": (4, 4)})))
    (root / "disguised.safetensors").symlink_to(ckpt)
    with pytest.raises(LoraRejected) as exc:
        inspect_lora(root / "disguised.safetensors")
    assert exc.value.code == "pickle"


def test_rejection_survives_copy_and_pickle_protocol():
    err = LoraRejected("overlap", "tensors a and b overlap", "/x.safetensors")
    clone = copy.deepcopy(err)  # uses __reduce__, as pickling across Ray workers does
    assert (clone.code, clone.reason, clone.path) == ("overlap", "tensors a and b overlap", "/x.safetensors")
    assert "[overlap]" in str(clone)


# ---------------------------------------------------------------------------------------------------
# Valid files
# ---------------------------------------------------------------------------------------------------

KOHYA_MODS = {
    f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q": (64, 64),
    f"lora_unet_{ATTN.replace('.', '_')}_attn2_to_k": (64, 32),
    f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_out_0": (64, 64),
    "lora_unet_mid_block_attentions_0_proj_in": (64, 64),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
    "lora_te1_text_model_encoder_layers_1_mlp_fc1": (37, 32),
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": (48, 48),
}


def test_valid_kohya(tmp_path, targets):
    path = tmp_path / "style.safetensors"
    save_numpy_file(
        kohya_state(KOHYA_MODS, rank=4, alpha=2.0, dtype=np.float16),
        str(path),
        metadata={"ss_network_dim": "4", "ss_output_name": "style"},
    )
    info = inspect_lora(path)
    data = path.read_bytes()
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.size_bytes == len(data) and info.path == path.resolve()
    assert (info.format, info.rank, info.alpha, info.dtypes) == ("kohya", 4, 2.0, ("F16",))
    assert info.tensor_count == 3 * len(KOHYA_MODS)
    assert info.metadata == {"ss_network_dim": "4", "ss_output_name": "style"}
    assert info.targets == {
        "unet": sorted([f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_k", f"{ATTN}.attn1.to_out.0", "mid_block.attentions.0.proj_in"]),
        "text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"],
        "text_encoder_2": ["text_model.encoder.layers.0.self_attn.out_proj"],
    }
    shapes = {m.key: (m.out_features, m.in_features, m.rank, m.alpha) for m in info.modules}
    assert shapes == {k: (o, i, 4, 2.0) for k, (o, i) in KOHYA_MODS.items()}
    check_compatible(info, targets)
    mapping = match_modules(info, targets)
    assert mapping["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"] == (
        "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj"
    )


def test_valid_diffusers_peft_and_legacy(tmp_path, targets):
    a = {f"unet.{ATTN}.attn1.to_q": (64, 64), "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": (32, 32)}
    state = {k: torch.from_numpy(v) for k, v in peft_state(a, rank=8).items()}
    state.update({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in peft_state({f"unet.{ATTN}.attn2.to_v": (64, 32)}, rank=2).items()})
    path = tmp_path / "peft.safetensors"
    save_torch_file(state, str(path))
    info = inspect_lora(path)
    assert (info.format, info.rank, info.alpha, info.dtypes, info.tensor_count) == ("diffusers", 8, None, ("BF16", "F32"), 6)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.targets["unet"] == [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v"]
    assert {m.name: m.rank for m in info.modules}[f"{ATTN}.attn2.to_v"] == 2
    check_compatible(info, targets)

    legacy = {
        f"unet.{ATTN}.attn1.processor.to_out_lora.down.weight": np.zeros((4, 64), np.float32),
        f"unet.{ATTN}.attn1.processor.to_out_lora.up.weight": np.zeros((64, 4), np.float32),
        "text_encoder.text_model.encoder.layers.1.self_attn.to_q_lora.down.weight": np.zeros((4, 32), np.float32),
        "text_encoder.text_model.encoder.layers.1.self_attn.to_q_lora.up.weight": np.zeros((32, 4), np.float32),
        "unet.mid_block.attentions.0.proj_out.lora.down.weight": np.zeros((4, 64), np.float32),
        "unet.mid_block.attentions.0.proj_out.lora.up.weight": np.zeros((64, 4), np.float32),
    }
    save_numpy_file(legacy, str(tmp_path / "legacy.safetensors"))
    info = inspect_lora(tmp_path / "legacy.safetensors")
    assert info.targets == {
        "text_encoder": ["text_model.encoder.layers.1.self_attn.q_proj"],
        "unet": [f"{ATTN}.attn1.to_out.0", "mid_block.attentions.0.proj_out"],
    }
    check_compatible(info, targets)

    # peft keys without a component prefix are UNet keys (as diffusers assumes)
    save_numpy_file(peft_state({f"{ATTN}.attn1.to_k": (64, 64)}), str(tmp_path / "bare.safetensors"))
    info = inspect_lora(tmp_path / "bare.safetensors")
    assert info.targets == {"unet": [f"{ATTN}.attn1.to_k"]}
    check_compatible(info, targets)


def test_file_written_by_diffusers_itself(tmp_path, targets):
    """A LoRA produced by peft + diffusers' own saver inspects as diffusers format and matches."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet))
    info = inspect_lora(tmp_path / "pytorch_lora_weights.safetensors")
    wrapped = sorted(n for n, m in unet.named_modules() if hasattr(m, "lora_A"))
    assert info.format == "diffusers" and info.rank == 4
    assert info.targets == {"unet": wrapped}
    assert len(wrapped) == 4 * 2 * 4  # 4 transformer blocks (down 1, mid 1, up 2) x (attn1, attn2) x (q, k, v, out)
    assert set(match_modules(info, targets).values()) == {f"unet.{n}" for n in wrapped}


def test_kohya_mapping_agrees_with_diffusers_loader(tmp_path, targets):
    """Our kohya name mapping (incl. SDXL's SGM block names) = the modules diffusers actually wraps."""
    from diffusers import StableDiffusionXLPipeline

    mods = {
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k": (64, 32),
        "lora_unet_output_blocks_1_1_proj_in": (64, 64),
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0": (64, 64),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2": (64, 256),
        "lora_unet_output_blocks_1_2_conv": (64, 64),
        "lora_unet_input_blocks_2_0_op": (32, 32),
    }
    arrays = kohya_state(mods)
    # the two 3x3 convs get 4-D (LoCon) factors: a 2-D factor is a 1x1 kernel, refused on a 3x3 conv
    for key, ch in (("lora_unet_input_blocks_2_0_op", 32), ("lora_unet_output_blocks_1_2_conv", 64)):
        arrays[f"{key}.lora_down.weight"] = np.zeros((4, ch, 3, 3), np.float32)
        arrays[f"{key}.lora_up.weight"] = np.zeros((ch, 4, 1, 1), np.float32)
    path = tmp_path / "sgm.safetensors"
    save_numpy_file(arrays, str(path))
    info = inspect_lora(path)
    ours = match_modules(info, targets)
    assert ours["lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k"] == f"unet.{ATTN}.attn2.to_k"

    state = {k: torch.from_numpy(v) for k, v in arrays.items()}
    unet = _tiny_unet()
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(converted, alphas, unet, adapter_name="t")
    wrapped = {f"unet.{n}" for n, m in unet.named_modules() if hasattr(m, "lora_A")}
    assert set(ours.values()) == wrapped


def test_kohya_to_dotted():
    assert kohya_to_dotted("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == f"{ATTN}.attn1.to_q"
    assert kohya_to_dotted("text_model_encoder_layers_11_self_attn_out_proj") == "text_model.encoder.layers.11.self_attn.out_proj"
    assert kohya_to_dotted("up_blocks_0_resnets_1_time_emb_proj") == "up_blocks.0.resnets.1.time_emb_proj"


# ---------------------------------------------------------------------------------------------------
# Compatibility
# ---------------------------------------------------------------------------------------------------


def test_no_match_when_nothing_maps(tmp_path, targets):
    info = inspect_lora(_kohya_file(tmp_path / "x.safetensors", {"lora_unet_foo_bar_to_q": (64, 64)}))
    with pytest.raises(LoraRejected) as exc:
        check_compatible(info, targets)
    assert exc.value.code == "no_match" and "lora_unet_foo_bar_to_q" in exc.value.reason


def test_partial_match_is_rejected_listing_unknown_keys(tmp_path, targets):
    mods = {
        f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q": (64, 64),
        "lora_unet_down_blocks_7_attentions_0_proj_in": (64, 64),
        "lora_te1_text_model_encoder_layers_9_mlp_fc1": (37, 32),
    }
    info = inspect_lora(_kohya_file(tmp_path / "x.safetensors", mods))
    with pytest.raises(LoraRejected) as exc:
        check_compatible(info, targets)
    assert exc.value.code == "no_match"
    assert "2 of 3" in exc.value.reason
    assert "lora_unet_down_blocks_7_attentions_0_proj_in" in exc.value.reason
    assert "lora_te1_text_model_encoder_layers_9_mlp_fc1" in exc.value.reason


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, targets):
    key = f"unet.{ATTN}.attn1.to_v"
    info = inspect_lora(_write_peft(tmp_path, {key: (64, 48)}))
    with pytest.raises(LoraRejected) as exc:
        check_compatible(info, targets)
    assert exc.value.code == "shape_mismatch"
    assert key in exc.value.reason and "(64, 48)" in exc.value.reason and "(64, 64)" in exc.value.reason


def _write_peft(tmp_path: Path, mods) -> Path:
    path = tmp_path / "peft.safetensors"
    save_numpy_file(peft_state(mods), str(path))
    return path


@pytest.mark.parametrize(
    "ctx,family",
    [(768, "SD1.x"), (1024, "SD2.x")],
)
def test_wrong_base_from_cross_attention_width(tmp_path, targets, ctx, family):
    mods = {f"unet.{ATTN}.attn2.to_k": (64, ctx), f"unet.{ATTN}.attn2.to_v": (64, ctx), f"unet.{ATTN}.attn1.to_q": (64, 64)}
    info = inspect_lora(_write_peft(tmp_path, mods))
    with pytest.raises(LoraRejected) as exc:
        check_compatible(info, targets)
    assert exc.value.code == "wrong_base"
    assert f"looks like an {family} LoRA; this generator is SDXL-shaped" in exc.value.reason
    assert str(ctx) in exc.value.reason and "32" in exc.value.reason


def test_full_size_sdxl_lora_on_tiny_sdxl_is_a_size_mismatch(tmp_path, targets):
    """Same family (SDXL), other size: not a wrong base, and the reason says size mismatch with both widths."""
    mods = {f"unet.{ATTN}.attn2.to_k": (64, 2048), f"unet.{ATTN}.attn2.to_v": (64, 2048), f"unet.{ATTN}.attn1.to_q": (64, 64)}
    info = inspect_lora(_write_peft(tmp_path, mods))
    with pytest.raises(LoraRejected) as exc:
        check_compatible(info, targets)
    assert exc.value.code == "shape_mismatch"
    assert "size mismatch" in exc.value.reason and "2048" in exc.value.reason and "[32]" in exc.value.reason
    assert "looks like" not in exc.value.reason


def test_wrong_base_sdxl_lora_on_single_encoder_generator(tmp_path, targets):
    sd1_like = {"unet": targets["unet"], "text_encoder": targets["text_encoder"]}
    info = inspect_lora(_kohya_file(tmp_path / "x.safetensors", KOHYA_MODS))
    with pytest.raises(LoraRejected) as exc:
        check_compatible(info, sd1_like)
    assert exc.value.code == "wrong_base" and "looks like an SDXL LoRA" in exc.value.reason
    # the same file without te2 keys is fine on that generator
    no_te2 = {k: v for k, v in KOHYA_MODS.items() if not k.startswith("lora_te2_")}
    check_compatible(inspect_lora(_kohya_file(tmp_path / "y.safetensors", no_te2)), sd1_like)


def test_sd1_lora_matches_an_sd1_shaped_target(corpus):
    d, _ = corpus
    info = inspect_lora(d / "sd15_kohya.safetensors")
    # an SD1.5-shaped target written by hand: 768-wide text encoder and cross-attention context
    a = "down_blocks.0.attentions.0.transformer_blocks.0"
    sd15 = {
        "unet": {f"{a}.attn1.to_q": (320, 320), f"{a}.attn2.to_k": (320, 768), f"{a}.attn2.to_v": (320, 768)},
        "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": (768, 768)},
    }
    check_compatible(info, sd15)
    with pytest.raises(ValueError, match="unknown target components"):
        check_compatible(info, {"vae": {}})


# ---------------------------------------------------------------------------------------------------
# Memory and value scanning
# ---------------------------------------------------------------------------------------------------


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def _expect_reject(path, code, **kw):
    def run():
        with pytest.raises(LoraRejected) as exc:
            inspect_lora(path, **kw)
        assert exc.value.code == code

    return run


def test_claimed_2gb_header_is_never_allocated(tmp_path):
    small = tmp_path / "small.safetensors"
    small.write_bytes(struct.pack("<Q", 2 << 30) + b'{"a": 1}')
    assert _peak_bytes(_expect_reject(small, "header_too_large")) < 2 << 20
    # a sparse 2.5 GB file really holding that much: rejected by the limit, still nothing allocated
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as fh:
        fh.write(struct.pack("<Q", 2 << 30) + b"{")
        fh.truncate((5 << 30) // 2)
    assert _peak_bytes(_expect_reject(sparse, "header_too_large")) < 2 << 20


def test_value_scan_reads_in_bounded_chunks(tmp_path):
    n_in = 1 << 20  # down weight: 4 x 1M float32 = 16 MB
    rng = np.random.default_rng(1)
    down = rng.standard_normal((4, n_in)).astype(np.float32)
    bad_flat = 3 * n_in + 777_777
    down.reshape(-1)[bad_flat] = np.inf
    path = tmp_path / "big.safetensors"
    save_numpy_file({"lora_unet_a_to_q.lora_down.weight": down, "lora_unet_a_to_q.lora_up.weight": np.zeros((8, 4), np.float32)}, str(path))
    del down
    holder = {}

    def run():
        with pytest.raises(LoraRejected) as exc:
            inspect_lora(path)
        holder["exc"] = exc.value

    assert _peak_bytes(run) < 6 << 20  # file is 16 MB
    assert holder["exc"].code == "nonfinite" and f"flat index {bad_flat}" in holder["exc"].reason
    # without the inf the whole file is scanned and hashed, still in bounded memory
    clean = tmp_path / "clean.safetensors"
    save_numpy_file(
        {"lora_unet_a_to_q.lora_down.weight": np.ones((4, n_in), np.float32), "lora_unet_a_to_q.lora_up.weight": np.zeros((8, 4), np.float32)},
        str(clean),
    )
    peak = _peak_bytes(lambda: holder.update(info=inspect_lora(clean)))
    assert peak < 6 << 20
    assert holder["info"].sha256 == hashlib.sha256(clean.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nan_detected_in_every_float_dtype(tmp_path, dtype):
    down = torch.zeros(4, 300)
    down[2, 123] = float("nan")
    path = tmp_path / "n.safetensors"
    save_torch_file({"unet.a.to_q.lora_A.weight": down.to(dtype), "unet.a.to_q.lora_B.weight": torch.zeros(8, 4, dtype=dtype)}, str(path))
    with pytest.raises(LoraRejected, match=f"flat index {2 * 300 + 123}") as exc:
        inspect_lora(path)
    assert exc.value.code == "nonfinite"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_only_ever_raise_lora_rejected(tmp_path, data):
    base = bytearray(save_numpy(kohya_state({"lora_unet_a_to_q": (8, 8), "lora_te1_b_q_proj": (4, 8)}, rank=2)))
    n = struct.unpack("<Q", base[:8])[0]
    kind = data.draw(st.sampled_from(["flip", "cut", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, 8 + n + 8))
            base[min(i, len(base) - 1)] = data.draw(st.integers(0, 255))
    elif kind == "cut":
        base = base[: data.draw(st.integers(0, len(base) - 1))]
    else:
        i = data.draw(st.integers(8, 8 + n))
        base[i:i] = data.draw(st.binary(max_size=12))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(base))
    try:
        info = inspect_lora(path)
    except LoraRejected as exc:
        assert exc.code in REJECT_CODES
    else:
        assert info.sha256 == hashlib.sha256(bytes(base)).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------


def test_discover_loras(tmp_path):
    root = tmp_path / "zoo"
    (root / "sub" / "deeper").mkdir(parents=True)
    lora = kohya_state({"lora_unet_a_to_q": (4, 4)})
    for p in ("a.safetensors", "sub/B.SafeTensors", "sub/deeper/c.safetensors"):
        save_numpy_file(lora, str(root / p))
    for p in ("old.ckpt", "sub/w.pt", "sub/x.pth", "y.bin"):
        (root / p).write_bytes(b"\x80\x02.")
    (root / "notes.txt").write_text("hi")
    (root / "self.safetensors").symlink_to(root / "self.safetensors")
    loop_root = make_symlink_loop(root)
    (root / "alias").symlink_to(root / "sub", target_is_directory=True)  # duplicate, not a loop

    found = list(itertools.islice(discover_loras(root), 100))
    paths = sorted(str(p.relative_to(root)) for p in found if isinstance(p, Path))
    rejects = {(Path(r.path).relative_to(root).as_posix(), r.code) for r in found if isinstance(r, LoraRejected)}
    assert paths == ["a.safetensors", "loop/a/b/inside.safetensors", "sub/B.SafeTensors", "sub/deeper/c.safetensors"]
    assert rejects == {
        ("old.ckpt", "pickle"),
        ("y.bin", "pickle"),
        ("sub/w.pt", "pickle"),
        ("sub/x.pth", "pickle"),
        ("self.safetensors", "symlink_loop"),
        ("loop/a/b/back", "symlink_loop"),
    }
    assert loop_root == root / "loop"

    no_follow = list(itertools.islice(discover_loras(root, follow_symlinks=False), 100))
    assert sorted(str(p.relative_to(root)) for p in no_follow if isinstance(p, Path)) == [
        "a.safetensors", "loop/a/b/inside.safetensors", "sub/B.SafeTensors", "sub/deeper/c.safetensors",
    ]
    assert not any(isinstance(r, LoraRejected) and r.code == "symlink_loop" for r in no_follow)
    with pytest.raises(NotADirectoryError):
        list(discover_loras(root / "a.safetensors"))


# ---------------------------------------------------------------------------------------------------
# Sidecars
# ---------------------------------------------------------------------------------------------------


def test_sidecar_civitai_info(tmp_path):
    lora = _kohya_file(tmp_path / "pixel.safetensors", {"lora_unet_a_to_q": (4, 4)})
    (tmp_path / "pixel.civitai.info").write_text(json.dumps({
        "id": 222, "modelId": 111, "name": "v2", "baseModel": "SDXL 1.0",
        "trainedWords": ["pixel art", " 8bit ", "pixel art"],
        "stats": {"downloadCount": 1234},
        "model": {"name": "Pixel <b>Art</b> XL", "description": "<p>Makes <i>pixels</i>&amp; more.</p><script>alert(1)</script><p>Line 2</p>"},
    }))
    (tmp_path / "pixel.json").write_text(json.dumps({"activation text": "ignored, because civitai wins", "sd version": "SDXL"}))
    info = read_sidecar(lora)
    assert info.name == "Pixel Art XL"
    assert info.description == "Makes pixels& more.\n\nLine 2"
    assert info.trigger_words == ["pixel art", "8bit"]
    assert info.source_url == "https://civitai.com/models/111?modelVersionId=222"
    assert info.extra["download_count"] == 1234 and info.extra["base_model"] == "SDXL 1.0"
    assert info.extra["sources"] == ["pixel.civitai.info", "pixel.json"]


def test_sidecar_json_and_metadata_fallback(tmp_path):
    lora = tmp_path / "ink.safetensors"
    save_numpy_file(
        kohya_state({"lora_unet_a_to_q": (4, 4)}),
        str(lora),
        metadata={"modelspec.title": "Ink Wash", "modelspec.trigger_phrase": "ink wash, sumi-e",
                  "modelspec.description": "Brush <br>strokes", "ss_tag_frequency": json.dumps({"a": {"b": 1}})},
    )
    info = read_sidecar(lora)
    assert (info.name, info.description, info.trigger_words) == ("Ink Wash", "Brush\nstrokes", ["ink wash", "sumi-e"])
    assert info.extra["sources"] == ["__metadata__"] and "ss_tag_frequency" not in info.extra

    (tmp_path / "ink.metadata.json").write_text(json.dumps({"name": "Ink (meta)", "trigger_words": ["inkstyle"]}))
    (tmp_path / "ink.json").write_text(json.dumps({"description": "from json", "activation text": "a, b", "url": "https://example.invalid/ink"}))
    info = read_sidecar(lora)
    assert info.name == "Ink (meta)" and info.trigger_words == ["inkstyle"]
    assert info.description == "from json" and info.source_url == "https://example.invalid/ink"


def test_bad_sidecars_are_ignored_with_a_warning(tmp_path, caplog):
    lora = _kohya_file(tmp_path / "m.safetensors", {"lora_unet_a_to_q": (4, 4)})
    (tmp_path / "m.civitai.info").write_text("{not json")
    (tmp_path / "m.metadata.json").write_text("[1, 2]")
    (tmp_path / "m.json").write_bytes(b'{"name": "' + b"x" * 2_000_000 + b'"}')
    with caplog.at_level(logging.WARNING, logger="carlos_ray.lora.sidecar"):
        info = read_sidecar(lora)
    assert info.name is None and info.trigger_words == [] and info.extra["sources"] == []
    text = caplog.text
    assert "m.civitai.info" in text and "not valid JSON" in text
    assert "m.metadata.json" in text and "m.json" in text and "larger than" in text
    inspect_lora(lora)  # a sidecar problem never rejects the LoRA

    hostile = tmp_path / "h.safetensors"
    hostile.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="carlos_ray.lora.sidecar"):
        assert read_sidecar(hostile).name is None  # unreadable header: warning, not an exception
