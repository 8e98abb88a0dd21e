"""Every LoRA format as users have it, applied exactly or refused at inspection (issue 12).

One fixed adapter is written in every layout (kohya, kohya with SGM block names, per-module alpha, peft with
prefixes / no prefix / `.alpha` keys / `lora_adapter_metadata`, old diffusers, legacy attention processors,
OneTrainer OMI, LyCORIS LoHa and LoKr, DoRA in both layouts) plus fp16/bf16 copies. For every file the update
that the generator's real modules apply is read back by pushing an identity basis through each module and
compared with the file's formula computed here in numpy (float64): kohya alpha/rank · up @ down, LoCon/Tucker,
LoHa (w1a w1b) ⊙ (w2a w2b) · alpha/r, LoKr kron(w1, w2) with its scale rules, DoRA row/column norms.

Signatures: the factor values are chosen exactly representable in bf16 (hence fp16), and every alternative
scale is a power of two, so fp16/bf16 copies and rescaled layouts carry *identical* numbers: the derived bound
on their signature difference is 0 and they are compared to 1e-6 like fp32. Where rounding is real (random
values, `test_half_precision_rounding_bound`), the module-level bound is derived from the unit roundoff u
(fp16 2^-11, bf16 2^-8): |ΔW16 − ΔW32| ≤ scale · (|up| @ |down|) · (2u + u²) + float32 accumulation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from carlos_ray.config import GeneratorSpec
from carlos_ray.lora import LoraRejected, check_compatible, inspect_lora
from carlos_ray.models import create_generator
from carlos_ray.models.generator import build_tiny_sdxl_pipeline, generator_lora_targets
from carlos_ray.signatures import PartialStats

PROMPTS = ["a red cube on a wooden table", "portrait of an old sailor, oil painting"]
SEEDS = [42, 7]
LYCORIS_EPS = float(np.finfo(np.float32).eps)

# (component, diffusers module name, SGM/OMI name or None, rank); names as LoRA files spell them
FULL = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q", 4),
    ("unet", "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k", "output_blocks.3.1.transformer_blocks.0.attn2.to_k", 2),
    ("unet", "mid_block.attentions.0.proj_out", "middle_block.1.proj_out", 8),
    ("unet", "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", 4),  # 3x3 conv: LoCon
    ("unet", "up_blocks.1.resnets.0.conv_shortcut", "output_blocks.2.0.skip_connection", 2),  # 1x1 conv
    ("unet", "up_blocks.0.resnets.1.time_emb_proj", "output_blocks.1.0.emb_layers.1", 4),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", None, 4),
    ("text_encoder", "text_model.encoder.layers.1.self_attn.v_proj", None, 2),
    ("text_encoder_2", "text_model.encoder.layers.1.self_attn.k_proj", None, 4),
]
UNET_ATTN = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", None, 4),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", None, 4),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", None, 2),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", None, 8),
]
TE_QKV = [("text_encoder", f"text_model.encoder.layers.{i}.self_attn.{p}_proj", None, 4) for i in (0, 1) for p in "qkv"] + [
    ("text_encoder_2", f"text_model.encoder.layers.0.self_attn.{p}_proj", None, 2) for p in "qkv"]
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
OMI = {"unet": "unet.", "text_encoder": "clip_l.", "text_encoder_2": "clip_g."}


# ---------------------------------------------------------------------------------------------------
# The generator, its modules, and the identity-basis read-back
# ---------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def module_of(g, component: str, name: str) -> torch.nn.Module:
    model = getattr(g.pipe, component)
    try:
        return model.get_submodule(name)
    except AttributeError:  # transformers may flatten CLIPTextModel (no "text_model.")
        return model.get_submodule(name.removeprefix("text_model."))


@torch.no_grad()
def applied_weight(mod: torch.nn.Module) -> np.ndarray:
    """The weight a module applies, read by pushing an identity basis through it (bias removed)."""
    b = 0 if mod.bias is None else mod.bias
    if isinstance(mod, torch.nn.Linear):
        out = mod(torch.eye(mod.in_features, dtype=mod.weight.dtype))
        return (out - b).double().T.numpy()
    kh, kw = mod.kernel_size
    assert mod.stride == (1, 1) and mod.padding == (kh // 2, kw // 2)  # the centre output sees the whole input
    n = mod.in_channels * kh * kw
    out = mod(torch.eye(n, dtype=mod.weight.dtype).reshape(n, mod.in_channels, kh, kw))[:, :, kh // 2, kw // 2]
    return (out - (b if isinstance(b, int) else b[None, :])).double().T.reshape(mod.out_channels, mod.in_channels, kh, kw).numpy()


def base_weight(g, component: str, name: str) -> np.ndarray:
    return module_of(g, component, name).weight.detach().double().numpy()


# ---------------------------------------------------------------------------------------------------
# One fixed adapter (numpy), exactly representable in bf16
# ---------------------------------------------------------------------------------------------------


def _bf16_exact(a: np.ndarray) -> np.ndarray:
    a = np.sign(a) * np.maximum(np.abs(a), 1e-2)
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).float().numpy()


def make_adapter(spec, shapes, seed: int, magnitude: float = 0.6) -> list[dict]:
    """[{component, name, sgm, rank, down, up}] with conv factors 4-D (kohya/peft layout)."""
    rng = np.random.default_rng(seed)
    out = []
    for comp, name, sgm, r in spec:
        o, i, k = shapes[(comp, name)]
        down = rng.standard_normal((r, i, k, k) if k else (r, i)) / np.sqrt(i * max(k, 1) ** 2)
        up = rng.standard_normal((o, r, 1, 1) if k else (o, r)) * magnitude / np.sqrt(r)
        out.append({"component": comp, "name": name, "sgm": sgm, "rank": r, "down": _bf16_exact(down), "up": _bf16_exact(up)})
    return out


def lora_delta(m: dict) -> np.ndarray:
    """ΔW = up @ down of the canonical adapter (scale 1), in the module's weight shape."""
    d = m["up"].reshape(m["up"].shape[0], -1).astype(np.float64) @ m["down"].reshape(m["rank"], -1).astype(np.float64)
    return d.reshape(m["up"].shape[0], *m["down"].shape[1:])


def save(path: Path, state: dict[str, np.ndarray], dtype=torch.float32, metadata: dict | None = None) -> Path:
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dtype) for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _flat(name: str) -> str:
    return name.replace(".", "_")


def kohya_state(adapter, *, sgm: bool = False, alphas=None) -> dict[str, np.ndarray]:
    """kohya keys; ``alphas[i]`` None = no alpha key, 0 = alpha 0 (= rank), else alpha with up scaled by rank/alpha."""
    sd = {}
    for i, m in enumerate(adapter):
        key = KOHYA[m["component"]] + _flat(m["sgm"] if sgm and m["sgm"] else m["name"])
        alpha = m["rank"] if alphas is None else alphas[i]
        factor = 1.0 if not alpha else m["rank"] / alpha
        sd[f"{key}.lora_down.weight"] = m["down"]
        sd[f"{key}.lora_up.weight"] = m["up"] * factor
        if alpha is not None:
            sd[f"{key}.alpha"] = np.array(alpha, np.float32)
    return sd


def omi_state(adapter) -> dict[str, np.ndarray]:
    sd = {}
    for m in adapter:
        key = OMI[m["component"]] + (m["sgm"] or m["name"])
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = m["down"], m["up"] * 2
        sd[f"{key}.alpha"] = np.array(m["rank"] / 2, np.float32)
    return sd


def peft_state(adapter, *, prefix: str | None = "component", alpha_keys: bool = False, up_factor=None) -> dict:
    sd = {}
    for i, m in enumerate(adapter):
        stem = {"component": f"{m['component']}.", None: "", "base_model": "base_model.model."}[prefix] + m["name"]
        factor = 2.0 if alpha_keys else (1.0 if up_factor is None else up_factor[i])
        sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = m["down"], m["up"] * factor
        if alpha_keys:
            sd[f"{stem}.alpha"] = np.array(m["rank"] / 2, np.float32)
    return sd


def peft_metadata_file(path: Path, adapter) -> Path:
    """diffusers' lora_adapter_metadata: unet lora_alpha 8 with an alpha_pattern, te2 alpha 16; up = up / scale."""
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2}, "unet.rank_pattern": {},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 16}
    scales = []
    for m in adapter:
        alpha = {"unet": 8, "text_encoder": 4, "text_encoder_2": 16}[m["component"]]
        alpha = 2 if m["name"].endswith("attn2.to_k") else alpha
        scales.append(alpha / m["rank"])
    sd = peft_state(adapter, up_factor=[1 / s for s in scales])
    return save(path, sd, metadata={"lora_adapter_metadata": json.dumps(meta)})


def diffusers_old_state(adapter, *, legacy_procs: bool) -> dict:
    sd = {}
    for m in adapter:
        if legacy_procs:  # save_attn_procs: no prefix, "...attn1.processor.to_q_lora.down.weight"
            head, _, leaf = m["name"].removesuffix(".0").rpartition(".")
            stem = f"{head}.processor.{leaf}_lora"
            sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = m["down"], m["up"]
        else:
            stem = f"{m['component']}.{m['name']}.lora"
            sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = m["down"], m["up"]
    return sd


def loha_as_lora_state(adapter) -> dict:
    """LoHa whose second Hadamard factor is all ones (w2_a = 1/r, w2_b = 1): the same ΔW as the LoRA."""
    sd = {}
    for m in adapter:
        key, r = KOHYA[m["component"]] + _flat(m["name"]), m["rank"]
        up2, down2 = m["up"].reshape(m["up"].shape[0], r), m["down"].reshape(r, -1)
        sd.update({f"{key}.hada_w1_a": up2, f"{key}.hada_w1_b": down2, f"{key}.hada_w2_a": np.full(up2.shape, 1 / r),
                   f"{key}.hada_w2_b": np.ones(down2.shape), f"{key}.alpha": np.array(r, np.float32)})
    return sd


def lokr_as_lora_state(adapter) -> dict:
    """LoKr with w1 = [[2]] and alpha = rank/2: kron(w1, w2_a @ w2_b) · 1/2 is the LoRA's ΔW."""
    sd = {}
    for m in adapter:
        key, r = KOHYA[m["component"]] + _flat(m["name"]), m["rank"]
        sd.update({f"{key}.lokr_w1": np.array([[2.0]]), f"{key}.lokr_w2_a": m["up"].reshape(m["up"].shape[0], r),
                   f"{key}.lokr_w2_b": m["down"].reshape(r, -1), f"{key}.alpha": np.array(r / 2, np.float32)})
    return sd


def dora_magnitudes(g, adapter, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mags = []
    for m in adapter:
        w = base_weight(g, m["component"], m["name"]) + lora_delta(m)
        norms = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
        mags.append((norms * rng.uniform(0.6, 1.4, norms.shape)).astype(np.float32))
    return mags


def dora_state(adapter, mags, layout: str) -> dict:
    sd = {}
    for m, mag in zip(adapter, mags):
        conv = m["down"].ndim == 4
        if layout == "peft":
            stem = f"{m['component']}.{m['name']}"
            sd.update({f"{stem}.lora_A.weight": m["down"], f"{stem}.lora_B.weight": m["up"],
                       f"{stem}.lora_magnitude_vector": mag.reshape(1, -1, 1, 1) if conv else mag})
        else:
            key = KOHYA[m["component"]] + _flat(m["name"])
            sd.update({f"{key}.lora_down.weight": m["down"], f"{key}.lora_up.weight": m["up"],
                       f"{key}.alpha": np.array(m["rank"], np.float32),
                       f"{key}.dora_scale": mag.reshape(-1, 1, 1, 1) if conv else mag.reshape(-1, 1)})
    return sd


def dora_expected(w0: np.ndarray, delta: np.ndarray, mag: np.ndarray, *, column: bool, eps: float) -> np.ndarray:
    """W' − W0 of DoRA in numpy: magnitude · (W0 + ΔW) / ‖W0 + ΔW‖ (per output row, or per input column)."""
    w = w0 + delta
    if column:
        norm = np.linalg.norm(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1), axis=1).reshape(1, -1, *[1] * (w.ndim - 2))
        return mag.reshape(norm.shape) * w / (norm + eps) - w0
    norm = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1).reshape(-1, *[1] * (w.ndim - 1))
    return mag.reshape(norm.shape) * w / (norm + eps) - w0


# ---------------------------------------------------------------------------------------------------
# The corpus: {file name: (path, group, expected {(component, module): ΔW})}
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(gen):
    out = {}
    for spec in (FULL, UNET_ATTN, TE_QKV):
        for comp, name, _, _ in spec:
            mod = module_of(gen, comp, name)
            k = mod.kernel_size[0] if isinstance(mod, torch.nn.Conv2d) else 0
            out[(comp, name)] = (mod.weight.shape[0], mod.weight.shape[1], k)
    return out


@pytest.fixture(scope="module")
def corpus(gen, shapes, tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    full, attn, te = make_adapter(FULL, shapes, 1), make_adapter(UNET_ATTN, shapes, 2), make_adapter(TE_QKV, shapes, 3, 1.5)
    files: dict[str, tuple[Path, str, dict]] = {}

    def add(name, path, group, adapter, deltas=None):
        files[name] = (path, group, deltas or {(m["component"], m["name"]): lora_delta(m) for m in adapter})

    per_module = [4, 1, 2, 0, None, 2, 1, None, 4]  # alpha per FULL module: r, r/4, r/4, 0 (= r), absent, ...
    add("kohya", save(d / "kohya.safetensors", kohya_state(full)), "full", full)
    add("kohya-sgm", save(d / "kohya_sgm.safetensors", kohya_state(full, sgm=True)), "full", full)
    add("kohya-alpha-half", save(d / "half.safetensors", kohya_state(full, alphas=[m["rank"] / 2 for m in full])), "full", full)
    add("kohya-per-module-alpha", save(d / "per_module.safetensors", kohya_state(full, alphas=per_module)), "full", full)
    add("peft", save(d / "peft.safetensors", peft_state(full)), "full", full)
    add("peft-alpha-keys", save(d / "peft_alpha.safetensors", peft_state(full, alpha_keys=True)), "full", full)
    add("peft-adapter-metadata", peft_metadata_file(d / "peft_meta.safetensors", full), "full", full)
    add("onetrainer-omi", save(d / "omi.safetensors", omi_state(full)), "full", full)
    for dt, tag in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        add(f"kohya-{tag}", save(d / f"kohya_{tag}.safetensors", kohya_state(full), dt), "full", full)
        add(f"peft-{tag}", save(d / f"peft_{tag}.safetensors", peft_state(full), dt), "full", full)
        add(f"omi-{tag}", save(d / f"omi_{tag}.safetensors", omi_state(full), dt), "full", full)
    add("lycoris-loha", save(d / "loha.safetensors", loha_as_lora_state(full)), "dense", full)
    add("lycoris-lokr", save(d / "lokr.safetensors", lokr_as_lora_state(full)), "dense", full)
    add("lycoris-lokr-bf16", save(d / "lokr_bf16.safetensors", lokr_as_lora_state(full), torch.bfloat16), "dense", full)
    mags = dora_magnitudes(gen, full, 5)
    dora = {(m["component"], m["name"]): dora_expected(base_weight(gen, m["component"], m["name"]), lora_delta(m), mag,
                                                       column=False, eps=0.0) for m, mag in zip(full, mags)}
    add("dora-peft", save(d / "dora_peft.safetensors", dora_state(full, mags, "peft")), "dora", full, dora)
    add("dora-kohya", save(d / "dora_kohya.safetensors", dora_state(full, mags, "kohya")), "dora", full, dora)
    add("attn-peft", save(d / "attn_peft.safetensors", peft_state(attn)), "attn", attn)
    add("attn-peft-unprefixed", save(d / "attn_bare.safetensors", peft_state(attn, prefix=None)), "attn", attn)
    add("attn-peft-base-model", save(d / "attn_base.safetensors", peft_state(attn, prefix="base_model")), "attn", attn)
    add("attn-diffusers-legacy", save(d / "pytorch_lora_weights.safetensors", diffusers_old_state(attn, legacy_procs=True)),
        "attn", attn)
    add("attn-diffusers-old", save(d / "attn_old.safetensors", diffusers_old_state(attn, legacy_procs=False)), "attn", attn)
    add("attn-kohya", save(d / "attn_kohya.safetensors", kohya_state(attn)), "attn", attn)
    add("te-kohya-qkv", save(d / "te_kohya.safetensors", kohya_state(te)), "te", te)
    add("te-peft-qkv", save(d / "te_peft.safetensors", peft_state(te)), "te", te)
    return files


def _check_applied(g, expected: dict, tol: float = 1e-6) -> float:
    """Max over modules of max|applied − (W0 + ΔW)| / max|ΔW|; asserts each is below ``tol``."""
    worst = 0.0
    for (comp, name), delta in expected.items():
        mod = module_of(g, comp, name)
        want = mod.weight.detach().double().numpy() + delta
        err = np.abs(applied_weight(mod) - want).max() / np.abs(delta).max()
        assert err < tol, f"{comp}.{name}: relative error {err:.2e}"
        worst = max(worst, err)
    return worst


# ---------------------------------------------------------------------------------------------------
# Applied update == the file's formula, for every format
# ---------------------------------------------------------------------------------------------------


def test_every_format_is_accepted_and_applied_exactly(gen, corpus):
    targets = generator_lora_targets(GeneratorSpec())
    before = {key: applied_weight(module_of(gen, *key)) for key in corpus["kohya"][2]}
    errors = {}
    for name, (path, _, expected) in corpus.items():
        info = inspect_lora(path)
        check_compatible(info, targets)  # accepted by inspection ...
        gen.activate(name, str(path))  # ... and applied (never load_failed)
        errors[name] = _check_applied(gen, expected)
        gen.activate(None)
    for key, weight in before.items():  # the base model comes back bit for bit
        np.testing.assert_array_equal(applied_weight(module_of(gen, *key)), weight)
    print("max relative error of the applied update:", json.dumps({k: f"{v:.1e}" for k, v in errors.items()}))


def test_formats_are_named_in_inspection(corpus):
    want = {
        "kohya": ("kohya", {"kohya", "locon"}), "kohya-sgm": ("kohya", {"kohya-sgm", "locon"}),
        "peft": ("diffusers", {"peft", "locon"}), "onetrainer-omi": ("onetrainer-omi", {"onetrainer-omi", "locon"}),
        "lycoris-loha": ("kohya", {"kohya", "lycoris-loha"}), "lycoris-lokr": ("kohya", {"kohya", "lycoris-lokr"}),
        "dora-peft": ("diffusers", {"peft", "locon", "dora"}), "dora-kohya": ("kohya", {"kohya", "locon", "dora"}),
        "attn-diffusers-legacy": ("diffusers", {"diffusers-legacy"}), "attn-diffusers-old": ("diffusers", {"diffusers"}),
    }
    for name, (family, formats) in want.items():
        info = inspect_lora(corpus[name][0])
        assert (info.format, set(info.formats)) == (family, formats), name
    s = inspect_lora(corpus["kohya-per-module-alpha"][0]).summary()
    assert s["ranks"] == [2, 4, 8] and s["alphas"] == [0.0, 1.0, 2.0, 4.0]
    assert s["scales"] == [0.25, 0.5, 1.0] and s["components"] == {"text_encoder": 2, "text_encoder_2": 1, "unet": 6}
    assert s["dtypes"] == ["F32"] and s["kinds"] == {"locon": 1, "lora": 8}
    meta = inspect_lora(corpus["peft-adapter-metadata"][0])
    assert {m.name: m.scale for m in meta.modules}[FULL[1][1]] == 1.0  # alpha_pattern 2 / rank 2
    assert json.dumps(inspect_lora(corpus["lycoris-lokr-bf16"][0]).summary())  # JSON-ready
    assert inspect_lora(corpus["lycoris-lokr-bf16"][0]).summary()["dtypes"] == ["BF16"]


# ---------------------------------------------------------------------------------------------------
# Real (non-degenerate) LyCORIS modules against their numpy formulas
# ---------------------------------------------------------------------------------------------------

LIN = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")  # Linear 32 x 32
CONV = ("unet", "down_blocks.0.resnets.0.conv1")  # Conv2d 32 x 32 x 3 x 3
TE = ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj")  # Linear 32 x 32


def _key(target) -> str:
    return KOHYA[target[0]] + _flat(target[1])


def _lycoris_files(d: Path, rng) -> dict[str, tuple[dict, dict]]:
    """{name: (state, {target: ΔW or ("dora", ...)})} for LoHa/LoKr/Tucker/DoRA variants, formulas in numpy."""
    n = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32).astype(np.float64)  # noqa: E731  (written losslessly)
    out = {}
    a, b, c, e = n(32, 4), n(4, 32 * 9), n(32, 4), n(4, 32 * 9)
    w1a, w1b, w2a, w2b = n(32, 3), n(3, 32), n(32, 3), n(3, 32)
    out["loha"] = ({f"{_key(LIN)}.hada_w1_a": w1a, f"{_key(LIN)}.hada_w1_b": w1b, f"{_key(LIN)}.hada_w2_a": w2a,
                    f"{_key(LIN)}.hada_w2_b": w2b, f"{_key(LIN)}.alpha": np.array(1.5),
                    f"{_key(CONV)}.hada_w1_a": a, f"{_key(CONV)}.hada_w1_b": b, f"{_key(CONV)}.hada_w2_a": c,
                    f"{_key(CONV)}.hada_w2_b": e},  # conv: flattened (r, in*3*3), no alpha (= rank)
                   {LIN: (w1a @ w1b) * (w2a @ w2b) * 1.5 / 3, CONV: ((a @ b) * (c @ e)).reshape(32, 32, 3, 3)})
    t1, t2, u1, v1, u2, v2 = n(2, 2, 3, 3), n(2, 2, 3, 3), n(2, 32), n(2, 32), n(2, 32), n(2, 32)
    tuck = lambda t, wa, wb: np.einsum("ijkl,ip,jr->prkl", t, wa, wb)  # noqa: E731
    out["loha-tucker"] = ({f"{_key(CONV)}.hada_t1": t1, f"{_key(CONV)}.hada_w1_a": u1, f"{_key(CONV)}.hada_w1_b": v1,
                           f"{_key(CONV)}.hada_t2": t2, f"{_key(CONV)}.hada_w2_a": u2, f"{_key(CONV)}.hada_w2_b": v2,
                           f"{_key(CONV)}.alpha": np.array(4.0)},
                          {CONV: tuck(t1, u1, v1) * tuck(t2, u2, v2) * 4.0 / 2})
    k1, k2a, k2b = n(4, 4), n(8, 2), n(2, 8)
    f1a, f1b, f2 = n(4, 2), n(2, 4), n(8, 8)
    g1, g2 = n(4, 4), n(8, 8)
    out["lokr"] = ({f"{_key(LIN)}.lokr_w1": k1, f"{_key(LIN)}.lokr_w2_a": k2a, f"{_key(LIN)}.lokr_w2_b": k2b,
                    f"{_key(LIN)}.alpha": np.array(1.0),  # scale alpha / rank(w2_a) = 1/2
                    f"{_key(TE)}.lokr_w1_a": f1a, f"{_key(TE)}.lokr_w1_b": f1b, f"{_key(TE)}.lokr_w2": f2,
                    f"{_key(TE)}.alpha": np.array(8.0)},  # scale alpha / rank(w1_a) = 4
                   {LIN: np.kron(k1, k2a @ k2b) * 0.5, TE: np.kron(f1a @ f1b, f2) * 4.0})
    out["lokr-full"] = ({f"{_key(LIN)}.lokr_w1": g1, f"{_key(LIN)}.lokr_w2": g2, f"{_key(LIN)}.alpha": np.array(3.0)},
                        {LIN: np.kron(g1, g2)})  # both factors full: scale 1 whatever alpha says
    h1, ht, ha, hb, hw = n(4, 4), n(2, 2, 3, 3), n(2, 8), n(2, 8), n(8, 8, 3, 3)
    out["lokr-conv"] = ({f"{_key(CONV)}.lokr_w1": h1, f"{_key(CONV)}.lokr_t2": ht, f"{_key(CONV)}.lokr_w2_a": ha,
                         f"{_key(CONV)}.lokr_w2_b": hb, f"{_key(CONV)}.alpha": np.array(1.0)},
                        {CONV: np.kron(h1[:, :, None, None], tuck(ht, ha, hb)) * 0.5})
    out["lokr-conv-full"] = ({f"{_key(CONV)}.lokr_w1": h1, f"{_key(CONV)}.lokr_w2": hw},
                             {CONV: np.kron(h1[:, :, None, None], hw)})
    dn, md, upw = n(4, 32, 1, 1), n(4, 4, 3, 3), n(32, 4, 1, 1)
    out["locon-tucker"] = ({f"{_key(CONV)}.lora_down.weight": dn, f"{_key(CONV)}.lora_mid.weight": md,
                            f"{_key(CONV)}.lora_up.weight": upw, f"{_key(CONV)}.alpha": np.array(2.0)},
                           {CONV: np.einsum("pa,abkl,bq->pqkl", upw[:, :, 0, 0], md, dn[:, :, 0, 0]) * 0.5})
    return out


def test_lycoris_and_dora_modules_match_numpy_formulas(gen, tmp_path):
    rng = np.random.default_rng(7)
    cases = _lycoris_files(tmp_path, rng)
    # DoRA with a real (non-unit) magnitude, LyCORIS layout: rows (wd_on_out) and columns, and peft's layout
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731
    down, up = f32(rng.standard_normal((4, 32)) * 0.3), f32(rng.standard_normal((32, 4)) * 0.3)
    w0, delta = base_weight(gen, *LIN), up @ down * 0.5
    row = f32(np.linalg.norm(w0 + delta, axis=1) * rng.uniform(0.5, 1.5, 32))
    col = f32(np.linalg.norm(w0 + delta, axis=0) * rng.uniform(0.5, 1.5, 32))
    lk = {f"{_key(LIN)}.lora_down.weight": down, f"{_key(LIN)}.lora_up.weight": up, f"{_key(LIN)}.alpha": np.array(2.0)}
    cases["dora-row"] = ({**lk, f"{_key(LIN)}.dora_scale": row.reshape(32, 1)},
                         {LIN: dora_expected(w0, delta, row, column=False, eps=LYCORIS_EPS)})
    cases["dora-column"] = ({**lk, f"{_key(LIN)}.dora_scale": col.reshape(1, 32)},
                            {LIN: dora_expected(w0, delta, col, column=True, eps=LYCORIS_EPS)})
    stem = f"unet.{LIN[1]}"
    cases["dora-peft-real"] = ({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up * 0.5,  # x0.5: exact
                                f"{stem}.lora_magnitude_vector": row},
                               {LIN: dora_expected(w0, delta, row, column=False, eps=0.0)})
    errors = {}
    for name, (state, expected) in cases.items():
        path = save(tmp_path / f"{name}.safetensors", state)
        check_compatible(inspect_lora(path), generator_lora_targets(GeneratorSpec()))
        gen.activate(name, str(path))
        errors[name] = _check_applied(gen, expected)
        gen.activate(None)
    print("max relative error of the applied update:", json.dumps({k: f"{v:.1e}" for k, v in errors.items()}))




# ---------------------------------------------------------------------------------------------------
# Signatures: equal across formats
# ---------------------------------------------------------------------------------------------------

ROWS = [(p, s) for p in range(len(PROMPTS)) for s in SEEDS]


def _signature(gen, encoder, base_emb, name=None, path=None):
    gen.activate(name, None if path is None else str(path))
    imgs, ok = gen.generate([PROMPTS[p] for p, _ in ROWS], [s for _, s in ROWS])
    gen.activate(None)
    assert ok.all()
    diffs = encoder.encode_images(imgs).astype(np.float64) - base_emb
    return PartialStats.from_diffs(diffs, np.array([p for p, _ in ROWS]), len(PROMPTS)).finalize(), imgs


def _assert_same_signature(a, b, what: str, rtol: float = 1e-6) -> None:
    scale = max(np.abs(a.direction).max(), 1e-12)
    assert np.abs(a.direction - b.direction).max() <= rtol * scale, what
    assert abs(a.strength - b.strength) <= rtol * a.strength, what
    assert abs(a.consistency - b.consistency) <= rtol * max(abs(a.consistency), 1e-12), what


#: the default suite compares these (one micro-batch of images each); the slow test compares the whole corpus
LEAN = ("kohya", "kohya-sgm", "kohya-per-module-alpha", "peft-adapter-metadata", "onetrainer-omi", "kohya-fp16",
        "peft-bf16", "lycoris-loha", "lycoris-lokr", "dora-peft", "dora-kohya", "attn-peft", "attn-peft-unprefixed",
        "attn-diffusers-legacy", "te-peft-qkv", "te-kohya-qkv")
REFERENCE = {"full": "kohya", "dense": "lycoris-loha", "dora": "dora-peft", "attn": "attn-peft", "te": "te-peft-qkv"}


def _compare_signatures(gen, encoder, corpus, names, extra: dict[str, Path] | None = None) -> dict:
    gen.activate(None)
    imgs, _ = gen.generate([PROMPTS[p] for p, _ in ROWS], [s for _, s in ROWS])
    base = encoder.encode_images(imgs).astype(np.float64)
    paths = {**{n: corpus[n][0] for n in names}, **(extra or {})}
    sigs = {name: _signature(gen, encoder, base, name, path)[0] for name, path in paths.items()}
    for name in names:
        group = corpus[name][1]
        ref = REFERENCE[group]
        assert sigs[ref].strength > 0.01, ref  # the adapter does something
        _assert_same_signature(sigs[ref], sigs[name], f"{name} vs {ref}")
        if group == "dense":
            # the same adapter through another arithmetic path (dense ΔW x vs two thin matmuls): float32 rounding
            # of ΔW x differs by ~1e-7 relative; equal images are typical but not guaranteed, hence 1e-4 here
            _assert_same_signature(sigs["kohya"], sigs[name], f"{name} vs kohya (dense vs factored)", rtol=1e-4)
    return sigs


def test_signatures_are_equal_across_formats(gen, encoder, corpus, tmp_path):
    full = [n for n in LEAN if corpus[n][1] == "full"]
    # the per-module-alpha file with its alpha keys dropped: what a loader that ignores them would apply
    state = {k: v for k, v in _load(corpus["kohya-per-module-alpha"][0]).items() if not k.endswith(".alpha")}
    dropped = save(tmp_path / "alpha_dropped.safetensors", state)
    sigs = _compare_signatures(gen, encoder, corpus, LEAN, {"alpha-dropped": dropped})
    assert abs(sigs["alpha-dropped"].strength - sigs["kohya"].strength) > 0.01 * sigs["kohya"].strength  # can fail
    print({n: sigs[n].strength for n in full})


def _load(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_signatures_are_equal_across_the_whole_corpus(gen, encoder, corpus):
    _compare_signatures(gen, encoder, corpus, list(corpus))


# ---------------------------------------------------------------------------------------------------
# Refused at inspection, with a code and a reason; loading refuses the same way
# ---------------------------------------------------------------------------------------------------


def test_unappliable_files_are_refused_at_inspection_and_by_the_loader(gen, tmp_path):
    targets = generator_lora_targets(GeneratorSpec())
    k = _key(LIN)
    lora = {f"{k}.lora_down.weight": np.ones((2, 32)), f"{k}.lora_up.weight": np.ones((32, 2))}
    sdxl = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_"
    cases = {  # name: (state, metadata, code, words the reason must contain)
        "sdxl_full_size": ({f"{sdxl}{p}.lora_{h}.weight": np.ones((4, 2048) if h == "down" else (640, 4))
                            for p in "kv" for h in ("down", "up")}, None, "shape_mismatch", ["size mismatch", "2048"]),
        "kernel_1x1_on_3x3": ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.ones((2, 32)),
                               "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.ones((32, 2))},
                              None, "shape_mismatch", ["kernel (1, 1)", "kernel (3, 3)"]),
        "sd15": ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((4, 768)),
                  "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((768, 4))},
                 None, "wrong_base", ["SD1.x"]),
        "oft": ({f"{k}.oft_blocks": np.ones((4, 8, 8))}, None, "unsupported", ["LyCORIS OFT", "oft_blocks"]),
        "ia3": ({f"{k}.weight": np.ones(32), f"{k}.on_input": np.ones(1)}, None, "unsupported", ["IA3"]),
        "lora_bias": ({f"unet.{LIN[1]}.lora_A.weight": np.ones((2, 32)), f"unet.{LIN[1]}.lora_B.weight": np.ones((32, 2)),
                       f"unet.{LIN[1]}.lora_B.bias": np.ones(32)}, None, "unsupported", ["lora_bias"]),
        "mixed_lora_and_diff": ({**lora, f"{_key(TE)}.diff": np.ones((32, 32))}, None, "unsupported", ["weight diff"]),
        "half_lokr": ({f"{k}.lokr_w1": np.ones((4, 4)), f"{k}.lokr_w2_a": np.ones((8, 2))}, None, "bad_lora",
                      ["LoKr", "lokr_w2_b"]),
        "bad_dora_scale": ({**lora, f"{k}.dora_scale": np.ones((2, 16))}, None, "bad_lora", ["dora_scale"]),
        "bad_adapter_metadata": ({f"unet.{LIN[1]}.lora_A.weight": np.ones((2, 32)),
                                  f"unet.{LIN[1]}.lora_B.weight": np.ones((32, 2))},
                                 {"lora_adapter_metadata": "{not json"}, "bad_lora", ["lora_adapter_metadata"]),
        "lycoris_shape": ({f"{k}.hada_w1_a": np.ones((32, 2)), f"{k}.hada_w1_b": np.ones((2, 32)),
                           f"{k}.hada_w2_a": np.ones((32, 2)), f"{k}.hada_w2_b": np.ones((2, 16))}, None, "bad_lora",
                          ["LoHa", "disagree"]),
    }
    for name, (state, meta, code, words) in cases.items():
        path = save(tmp_path / f"{name}.safetensors", state, metadata=meta)
        with pytest.raises(LoraRejected) as exc:
            check_compatible(inspect_lora(path), targets)
        assert exc.value.code == code, (name, exc.value)
        assert all(w in exc.value.reason for w in words), (name, exc.value.reason)
        with pytest.raises(LoraRejected) as loading:
            gen.activate(name, str(path))
        assert loading.value.code == code, (name, loading.value)
    gen.activate(None)


# ---------------------------------------------------------------------------------------------------
# fp16 / bf16: the rounding bound, derived
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,u", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_half_precision_rounding_bound(gen, tmp_path, dtype, u):
    """Random factors (not representable): the applied ΔW is the formula on the rounded values, and its distance
    to the float32 ΔW obeys |fl(up) fl(down) − up down| <= (|up| @ |down|)(2u + u²) per element, times the scale."""
    rng = np.random.default_rng(3)
    down, up = rng.standard_normal((4, 32)).astype(np.float32), (rng.standard_normal((32, 4)) * 0.2).astype(np.float32)
    state = {f"{_key(LIN)}.lora_down.weight": down, f"{_key(LIN)}.lora_up.weight": up, f"{_key(LIN)}.alpha": np.array(2.0)}
    path = save(tmp_path / "half.safetensors", state, dtype)
    rd = torch.from_numpy(down).to(dtype).double().numpy()
    ru = torch.from_numpy(up).to(dtype).double().numpy()
    gen.activate(f"half-{dtype}", str(path))  # the generator caches adapters by name
    try:
        _check_applied(gen, {LIN: ru @ rd * 0.5})  # exact on the values the file holds
        mod = module_of(gen, *LIN)
        applied = applied_weight(mod) - mod.weight.detach().double().numpy()
    finally:
        gen.activate(None)
    exact = up.astype(np.float64) @ down.astype(np.float64) * 0.5
    bound = (np.abs(up) @ np.abs(down)) * 0.5 * (2 * u + u * u) + 1e-6 * np.abs(exact).max()
    err = np.abs(applied - exact)
    assert (err <= bound).all(), float((err / bound).max())
    assert err.max() > 1e-3 * bound.max()  # rounding did happen: the check is not vacuous


# ---------------------------------------------------------------------------------------------------
# The paper profile's loading path (from_pretrained on a directory) applies through the same code
# ---------------------------------------------------------------------------------------------------


def test_pretrained_directory_generator_applies_the_same_updates(corpus, encoder, tmp_path):
    d = tmp_path / "tiny_sdxl_saved"
    build_tiny_sdxl_pipeline(GeneratorSpec().seed).save_pretrained(d, safe_serialization=True)
    local = create_generator(GeneratorSpec(model=str(d)), encoder.image_size)
    for name in ("kohya-sgm", "lycoris-lokr", "dora-kohya", "attn-diffusers-legacy"):
        path, _, expected = corpus[name]
        local.activate(name, str(path))
        _check_applied(local, expected)
    local.activate(None)


# ---------------------------------------------------------------------------------------------------
# Through the Ray index job: every format indexed (never load_failed), same-adapter signatures equal
# ---------------------------------------------------------------------------------------------------


def test_the_index_job_indexes_every_format_with_equal_signatures(ray_session, tiny_config, corpus, tmp_path):
    import shutil

    from carlos_ray.indexing import run_index
    from carlos_ray.store import Index

    src = tmp_path / "loras"
    src.mkdir()
    for name in LEAN:
        shutil.copy(corpus[name][0], src / f"{name}.safetensors")
    summary = run_index(tiny_config, [str(src)], str(tmp_path / "idx"))
    assert summary.rejects == [] and summary.indexed == len(LEAN), summary.rejects
    rows = {Path(r["source_path"]).stem: r for r in Index(str(tmp_path / "idx")).snapshot().signatures().to_pylist()}
    assert sorted(rows) == sorted(LEAN)

    def close(a: dict, b: dict, rtol: float) -> bool:
        da, db = np.asarray(a["direction"], np.float64), np.asarray(b["direction"], np.float64)
        return (np.abs(da - db).max() <= rtol * np.abs(da).max() and abs(a["strength"] - b["strength"]) <= rtol * a["strength"]
                and abs(a["consistency"] - b["consistency"]) <= rtol * max(abs(a["consistency"]), 1e-12))

    for name in LEAN:
        group = corpus[name][1]
        ref = rows[REFERENCE[group]]
        assert ref["strength"] > 0.01, REFERENCE[group]
        assert close(ref, rows[name], 1e-6 if group != "dense" else 1e-4), f"{name} vs {REFERENCE[group]} in the index"
    # and different adapters do differ (the comparison can fail)
    assert not close(rows["kohya"], rows["attn-peft"], 1e-3)
