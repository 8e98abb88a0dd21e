"""A corpus of small malformed and hostile LoRA files, for tests and for demonstrating the rejects table.

Nothing here loads anything: pickle and zip bytes are *written* (as a torch checkpoint would look)
so that the inspector can prove it refuses them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import save as save_numpy

#: Codes that only :func:`carlos_ray.lora.inspect.check_compatible` produces; corpus files with these
#: codes pass ``inspect_lora`` and are rejected when checked against an SDXL-shaped generator.
COMPAT_ONLY_CODES = frozenset({"wrong_base", "no_match", "shape_mismatch"})


def _pairs(modules: Mapping[str, tuple[int, int]], rank: int, dtype: Any, seed: int, down: str, up: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, (n_out, n_in) in modules.items():
        out[f"{name}.{down}"] = (rng.standard_normal((rank, n_in)) * 0.1).astype(dtype)
        out[f"{name}.{up}"] = (rng.standard_normal((n_out, rank)) * 0.1).astype(dtype)
    return out


def kohya_state(
    modules: Mapping[str, tuple[int, int]],
    *,
    rank: int = 4,
    alpha: float | None = 4.0,
    dtype: Any = np.float32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """kohya tensors for ``{kohya module name: (out, in)}`` (e.g. "lora_unet_..._to_q": (64, 64))."""
    out = _pairs(modules, rank, dtype, seed, "lora_down.weight", "lora_up.weight")
    if alpha is not None:
        out.update({f"{name}.alpha": np.asarray(alpha, dtype=dtype) for name in modules})
    return out


def peft_state(
    modules: Mapping[str, tuple[int, int]], *, rank: int = 4, dtype: Any = np.float32, seed: int = 0
) -> dict[str, np.ndarray]:
    """diffusers/peft tensors for ``{"unet.<module>": (out, in)}``: ``<key>.lora_A.weight`` / ``.lora_B.weight``."""
    return _pairs(modules, rank, dtype, seed, "lora_A.weight", "lora_B.weight")


def pack_safetensors(header: dict[str, Any] | bytes, data: bytes, *, claimed_length: int | None = None) -> bytes:
    """Raw safetensors bytes from an arbitrary (possibly inconsistent) header; no validation at all."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    n = len(raw) if claimed_length is None else claimed_length
    return struct.pack("<Q", n) + raw + data


_SMALL_LORA = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (64, 64),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (64, 32),
}

_SD15_LORA = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": (320, 768),
}

_KEY = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def _lora_with_bad_value(dtype: str, bits: int) -> bytes:
    """A 1-module kohya LoRA (rank 2, 8x8) whose up weight holds one element with raw bit pattern ``bits``."""
    itemsize = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    np_bits = {2: "<u2", 4: "<u4"}[itemsize]
    down = np.zeros(16, dtype=np_bits)
    up = np.zeros(16, dtype=np_bits)
    up[5] = bits
    header = {
        f"{_KEY}.lora_down.weight": {"dtype": dtype, "shape": [2, 8], "data_offsets": [0, 16 * itemsize]},
        f"{_KEY}.lora_up.weight": {"dtype": dtype, "shape": [8, 2], "data_offsets": [16 * itemsize, 32 * itemsize]},
    }
    return pack_safetensors(header, down.tobytes() + up.tobytes())


def _header_cases(valid: bytes) -> dict[str, tuple[bytes, str]]:
    """Files whose safetensors header is broken or hostile."""
    f32x16 = np.arange(16, dtype="<f4").tobytes()
    return {
        "truncated.safetensors": (valid[:-10], "truncated"),
        "header_length_lies.safetensors": (struct.pack("<Q", len(valid) + 100) + valid[8:], "header_too_large"),
        "header_gigabytes.safetensors": (
            pack_safetensors({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32x16[:16], claimed_length=3 << 30),
            "header_too_large",
        ),
        "overlap.safetensors": (
            pack_safetensors(
                {
                    f"{_KEY}.lora_down.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]},
                    f"{_KEY}.lora_up.weight": {"dtype": "F32", "shape": [8, 2], "data_offsets": [32, 96]},
                },
                bytes(96),
            ),
            "overlap",
        ),
        "offsets_inconsistent.safetensors": (
            pack_safetensors({"x": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, bytes(32)),
            "bad_header",
        ),
        "negative_offset.safetensors": (
            pack_safetensors({"x": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, bytes(16)),
            "bad_header",
        ),
        "bad_dtype.safetensors": (
            pack_safetensors({"x": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
            "bad_header",
        ),
        "non_utf8_header.safetensors": (
            pack_safetensors(b'{"x\xff\xfe": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', bytes(16)),
            "bad_header",
        ),
        "not_json_header.safetensors": (pack_safetensors(b"{this is not json}", b""), "bad_header"),
        "duplicate_keys.safetensors": (
            pack_safetensors(
                b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},'
                b' "x": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}',
                bytes(32),
            ),
            "bad_header",
        ),
    }


def _content_cases() -> dict[str, tuple[bytes, str]]:
    """Well-formed headers with hostile or wrong content (values, pickles, no LoRA, another base model)."""
    return {
        "huge_metadata.safetensors": (
            save_numpy(kohya_state(_SMALL_LORA), metadata={"ss_tag_frequency": "x" * (600 * 1024)}),
            "metadata_too_large",
        ),
        "nan_weights.safetensors": (_lora_with_bad_value("F16", 0x7E00), "nonfinite"),
        "inf_weights.safetensors": (_lora_with_bad_value("BF16", 0x7F80), "nonfinite"),
        "neg_inf_f32.safetensors": (_lora_with_bad_value("F32", 0xFF800000), "nonfinite"),
        "pickle_renamed.safetensors": (pickle.dumps({"state_dict": {"w": [0.0] * 4}}, protocol=4), "pickle"),
        "zip_renamed.safetensors": (_torch_style_zip(), "pickle"),
        "model.ckpt": (pickle.dumps({"state_dict": {}}, protocol=2), "pickle"),
        "empty.safetensors": (b"", "empty"),
        "no_tensors.safetensors": (pack_safetensors({"__metadata__": {"a": "b"}}, b""), "empty"),
        "no_lora_keys.safetensors": (
            save_numpy({"model.diffusion_model.conv_in.weight": np.ones((4, 4), np.float32)}),
            "not_lora",
        ),
        "not_safetensors.safetensors": (b"this is a text file, not a model\n" * 4, "not_safetensors"),
        "sd15_kohya.safetensors": (save_numpy(kohya_state(_SD15_LORA, dtype=np.float16)), "wrong_base"),
    }


def write_hostile_corpus(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Write the corpus into ``directory``; return {file name: expected rejection code}.

    Codes in :data:`COMPAT_ONLY_CODES` come from ``check_compatible`` against an SDXL-shaped
    target; all others from ``inspect_lora`` with default limits. Every file is < 1 MB.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    valid = save_numpy(kohya_state(_SMALL_LORA))
    files = {**_header_cases(valid), **_content_cases()}
    for name, (data, _) in files.items():
        (d / name).write_bytes(data)
    return {name: code for name, (_, code) in files.items()}


def _torch_style_zip() -> bytes:
    """Bytes shaped like a ``torch.save`` zip archive (``archive/data.pkl`` + ``archive/version``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def make_symlink_loop(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory/loop/a/b/back -> ../..`` (a cycle) with one LoRA inside; return ``directory/loop``."""
    root = Path(directory) / "loop"
    inner = root / "a" / "b"
    inner.mkdir(parents=True, exist_ok=True)
    (inner / "inside.safetensors").write_bytes(save_numpy(kohya_state(_SMALL_LORA)))
    back = inner / "back"
    if not back.is_symlink():
        back.symlink_to(Path("..") / "..", target_is_directory=True)
    return root
