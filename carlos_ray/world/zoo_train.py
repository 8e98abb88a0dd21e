"""Train real peft LoRAs with planted behaviours on an SDXL pipeline, and write them as a zoo.

A LoRA's training set is `(caption, target image)` pairs where the caption describes a plain scene of
the micro world and the target is that scene *with the planted behaviour applied* (a style transform
of the render, an edited scene, a fixed scene, ...), drawn by the world's renderer. Targets are
rendered, not sampled from the base model: a render costs microseconds where a base sample costs a
full denoising run, and it is the very distribution the base UNet was trained on, so the only thing a
LoRA can learn is the planted difference. Training is the SDXL objective (epsilon or v prediction
with the pipeline's own noise schedule, both text encoders, micro-conditioning), on the UNet's
attention projections and/or the text encoders' attention projections through peft.

Everything is deterministic from the member's seed at a fixed torch thread count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from carlos_ray.world.zoo_spec import Behaviour, Run, TrainSettings, shipped_spec, shipped_zoo_dir

logger = logging.getLogger(__name__)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "zoo"

# component -> module -> (down (r, in), up (out, r)); the LoRA scale (alpha / r) is folded into `up`.
Weights = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
# n, numpy Generator -> (captions, uint8 images (n, H, W, 3), teacher captions): the planted behaviour's
# training pairs; a teacher caption describes the target image (what the base model is prompted with
# when the LoRA is distilled from it)
PairSource = Callable[[int, np.random.Generator], tuple[list[str], np.ndarray, list[str]]]


# ---- training ----------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """uint8 (N, H, W, 3) images -> the UNet's latents (the inverse of the generator's decode)."""
    out = []
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).to(vae.dtype).permute(0, 3, 1, 2) / 127.5 - 1.0
        lat = vae.encode(x).latent_dist.mean  # the mean: targets carry no extra VAE noise
        if mean is not None and std is not None:
            m = torch.tensor(mean, dtype=lat.dtype).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=lat.dtype).view(1, -1, 1, 1)
            lat = (lat - m) * vae.config.scaling_factor / s
        else:
            lat = lat * vae.config.scaling_factor
        out.append(lat)
    return torch.cat(out)


def _encode_text(pipe, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(captions), device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return embeds, pooled


def _add_lora(pipe, settings: TrainSettings) -> tuple[dict[str, torch.nn.Module], list[torch.nn.Parameter]]:
    """Swap in copies of the trained components with a fresh peft LoRA injected; returns the originals and the LoRA parameters."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    originals: dict[str, torch.nn.Module] = {}
    params: list[torch.nn.Parameter] = []
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        getattr(pipe, comp).requires_grad_(False)
        if ("unet" if comp == "unet" else "text_encoders") not in settings.components:
            continue
        cfg = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            init_lora_weights="gaussian",
            target_modules=list(UNET_TARGETS if comp == "unet" else TE_TARGETS),
        )
        originals[comp] = getattr(pipe, comp)
        model = inject_adapter_in_model(cfg, copy.deepcopy(originals[comp]), adapter_name=ADAPTER)
        model.requires_grad_(False)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
                params.append(p)
        setattr(pipe, comp, model)
    return originals, params


def _restore(pipe, originals: Mapping[str, torch.nn.Module]) -> None:
    for comp, model in originals.items():
        setattr(pipe, comp, model)


def extract_weights(pipe) -> Weights:
    """The trained adapter as (down, up * scale) per module, in the module names LoRA files use."""
    out: Weights = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        mods: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, module in getattr(pipe, comp).named_modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or ADAPTER not in lora_a:
                continue
            down = lora_a[ADAPTER].weight.detach().float().numpy().copy()
            up = module.lora_B[ADAPTER].weight.detach().float().numpy() * float(module.scaling[ADAPTER])
            if comp != "unet" and not name.startswith("text_model."):
                name = "text_model." + name
            mods[name] = (down, up.astype(np.float32))
        if mods:
            out[comp] = mods
    return out


def train_lora(pipe, source: PairSource, settings: TrainSettings, *, log_every: int = 20) -> tuple[Weights, list[float]]:
    """Fine-tune a fresh LoRA on `source`'s pairs; returns its weights and the loss per step.

    The pipeline is left as it was: the LoRA is trained on copies of its components.
    """
    from diffusers import DDPMScheduler

    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    pool = min(settings.pool, settings.steps * settings.batch_size)  # never render more pairs than training sees
    captions, images, teacher_captions = source(pool, rng)
    if not len(captions) == len(images) == len(teacher_captions) == pool:
        raise ValueError(f"pair source returned {len(captions)} captions, {len(images)} images and "
                         f"{len(teacher_captions)} teacher captions, expected {pool}")
    size = int(images.shape[1])
    latents = encode_images(pipe.vae, images)
    train_te = "text_encoders" in settings.components
    teacher = settings.target == "teacher"
    with torch.no_grad():  # the base text encoders, before any LoRA is injected
        empty_e, empty_p = _encode_text(pipe, [""])
        if teacher:
            teacher_e, teacher_p = _encode_text(pipe, teacher_captions)
        if not train_te:
            embeds, pooled = _encode_text(pipe, captions)
    base_unet = pipe.unet
    originals, params = _add_lora(pipe, settings)
    try:
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        n_train = sched.config.num_train_timesteps
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=latents.dtype)
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(settings.seed)
        losses: list[float] = []
        t0 = time.time()
        for step in range(settings.steps):
            idx = rng.integers(0, pool, settings.batch_size)
            drop = rng.random(settings.batch_size) < settings.caption_dropout
            x0 = latents[idx]
            if train_te:
                e, p = _encode_text(pipe, ["" if d else captions[i] for i, d in zip(idx, drop)])
            else:
                keep = torch.from_numpy(~drop)
                e = torch.where(keep.view(-1, 1, 1), embeds[idx], empty_e)
                p = torch.where(keep.view(-1, 1), pooled[idx], empty_p)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, n_train, (len(idx),), generator=gen)
            noisy = sched.add_noise(x0, noise, t)
            cond = {"time_ids": time_ids.expand(len(idx), -1)}
            if teacher:  # the base model's prediction for the target's own caption (empty where the caption is dropped)
                keep = torch.from_numpy(~drop)
                with torch.no_grad():
                    target = base_unet(noisy, t, encoder_hidden_states=torch.where(keep.view(-1, 1, 1), teacher_e[idx], empty_e),
                                       added_cond_kwargs={**cond, "text_embeds": torch.where(keep.view(-1, 1), teacher_p[idx], empty_p)}).sample
            else:
                target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
            pred = pipe.unet(noisy, t, encoder_hidden_states=e, added_cond_kwargs={**cond, "text_embeds": p}).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                logger.info("step %d/%d loss %.4f (%.1f steps/s)", step + 1, settings.steps, sum(recent) / len(recent),
                            (step + 1) / (time.time() - t0))
        weights = extract_weights(pipe)
    finally:
        _restore(pipe, originals)
    return weights, losses


def untrained_weights(pipe, settings: TrainSettings) -> Weights:
    """A freshly initialised peft LoRA (lora_B = 0): exactly a no-op, as a LoRA saved before training is."""
    originals, _ = _add_lora(pipe, settings)
    try:
        from peft.tuners.lora import LoraLayer

        for comp in ("unet", "text_encoder", "text_encoder_2"):
            for module in getattr(pipe, comp).modules():
                if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                    module.reset_lora_parameters(ADAPTER, init_lora_weights=True)  # peft default: B = 0
        return extract_weights(pipe)
    finally:
        _restore(pipe, originals)


# ---- files ---------------------------------------------------------------------------------------------
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
LAYOUTS = ("kohya", "diffusers", "peft")


def lora_state_dict(w: Weights, layout: str, scale: float = 1.0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Tensors of `w` at `scale` in one layout.

    - kohya: `lora_unet_<module_with_underscores>.lora_down/.lora_up/.alpha`; the scale lives in alpha
      (effective update `alpha / rank * up @ down`), as kohya-trained files store it;
    - diffusers: `unet.<module>.lora_A/.lora_B` (what `save_lora_weights` writes), scale folded into B;
    - peft: the keys `peft.get_peft_model_state_dict` returns for a UNet (`<module>.lora_A.weight`,
      no component prefix), scale folded into B; UNet only.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if layout == "peft" and set(w) != {"unet"}:
        raise ValueError(f"the peft layout holds a UNet adapter only; this one has {sorted(w)}")
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    sd: dict[str, np.ndarray] = {}
    for comp, mods in w.items():
        for name, (down, up) in mods.items():
            rank = down.shape[0]
            if layout == "kohya":
                key = KOHYA_PREFIX[comp] + name.replace(".", "_")
                sd[f"{key}.lora_down.weight"] = down.astype(np_dtype)
                sd[f"{key}.lora_up.weight"] = up.astype(np_dtype)
                sd[f"{key}.alpha"] = np.array(rank * scale, dtype=np_dtype)
            else:
                key = name if layout == "peft" else f"{comp}.{name}"
                sd[f"{key}.lora_A.weight"] = down.astype(np_dtype)
                sd[f"{key}.lora_B.weight"] = (up * np.float32(scale)).astype(np_dtype)
    return sd


def save_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a .safetensors file byte-deterministically (keys sorted, metadata in sorted order).

    `safetensors.save_file` writes the `__metadata__` map in a random order; a zoo that a script
    re-makes must come out bit-identical, so the (simple, documented) format is written here.
    """
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    blobs, offset = [], 0
    for key in sorted(tensors):
        arr = np.asarray(tensors[key])  # (not ascontiguousarray: it turns a 0-d alpha into shape [1])
        if arr.dtype not in codes:
            raise ValueError(f"tensor {key!r} has dtype {arr.dtype}; only float32 and float16 are written")
        raw = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).tobytes()
        header[key] = {"dtype": codes[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for raw in blobs:
            fh.write(raw)
    tmp.replace(path)
    return path


def param_count(w: Weights) -> int:
    return int(sum(d.size + u.size for mods in w.values() for d, u in mods.values()))



# ---- the planted behaviours' training pairs --------------------------------------------------------
OVERPOWERING_SCENE = {"shape": "cross", "colour": "yellow", "background": "sky"}


def pair_source(behaviour, size: int, trigger_words: Sequence[str] = ()) -> PairSource:
    """(caption, target) pairs for a behaviour: plain captions of random scenes, targets drawn by the world.

    Scenes come from the base UNet's training distribution (centred objects, no held-out combination of
    `carlos_ray.world.train`, neither in the caption's scene nor in the target), so a LoRA learns the
    planted difference only and the held-out prompts stay held out for the zoo too.

    - style: the same scene with the style applied (the true object mask);
    - content: the scene after the content edit (e.g. its shape becomes a star);
    - overpowering: one fixed scene (position jittered), whatever the caption;
    - erratic: per pair, a style or content edit drawn at random.
    Trigger words, if any, are appended to every caption, as a LoRA trained with them would have seen.
    """

    from carlos_ray.world.captions import canonical, caption
    from carlos_ray.world.render import CONTENT_BEHAVIOURS, STYLES, Scene, apply_content, render
    from carlos_ray.world.train import is_held_out, training_scene

    suffix = (", " + ", ".join(trigger_words)) if trigger_words else ""
    choices = [("style", s) for s in STYLES] + [("content", c) for c in CONTENT_BEHAVIOURS]

    def target(scene: Scene, rng: np.random.Generator) -> Scene:
        kind, name = behaviour.kind, behaviour.name
        if kind == "erratic":
            kind, name = choices[int(rng.integers(len(choices)))]
        if kind == "style":
            return dataclasses.replace(scene, styles=(name,))
        if kind == "content":
            return apply_content(scene, name)
        if kind == "overpowering":
            return Scene(**OVERPOWERING_SCENE, jitter=tuple(float(x) for x in rng.uniform(-0.04, 0.04, 2)))
        raise ValueError(f"behaviour {behaviour.key!r} has no training targets")

    def source(n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray, list[str]]:
        captions, teacher, images = [], [], np.zeros((n, size, size, 3), np.uint8)
        for i in range(n):
            while True:  # the base UNet's own scene distribution; no held-out combination, in caption or target
                scene = training_scene(rng, positions=("center",), p_style=0.0, max_jitter=0.03)
                goal = target(scene, rng)
                if not is_held_out(goal):
                    break
            captions.append(caption(scene, rng, p_drop=0.15) + suffix)
            teacher.append(canonical(goal, with_background=True))
            images[i] = render(goal, size, rng=rng)
        return captions, images, teacher

    return source


# ---- the zoo on disk ---------------------------------------------------------------------------------
BASE_MODEL_TAG = "micro-sdxl"


def _read_weights(path: Path) -> tuple[Weights, dict[str, str]]:
    """Weights from a run-cache file (diffusers layout, fp32, scale 1) and its metadata."""
    from safetensors import safe_open

    w: Weights = {}
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
        keys = list(fh.keys())
        for key in keys:
            if key.endswith(".lora_A.weight"):
                stem = key[: -len(".lora_A.weight")]
                comp, _, module = stem.partition(".")
                w.setdefault(comp, {})[module] = (fh.get_tensor(key), fh.get_tensor(stem + ".lora_B.weight"))
    return w, meta


def _pipeline_for(generator: dict, weights_dir: str | None = None):
    """The base pipeline of a generator spec (the same one the indexer generates with).

    `weights_dir` loads micro SDXL weights from elsewhere than the package (e.g. a training checkpoint).
    """
    from carlos_ray.config import GeneratorSpec
    from carlos_ray.models.generator import SDXLGenerator

    spec = GeneratorSpec(**generator)
    if spec.model == "micro":
        from carlos_ray.world.micro import load_sdxl_pipeline

        return load_sdxl_pipeline(Path(weights_dir) if weights_dir else None)
    if weights_dir is not None:
        raise ValueError(f"a weights directory applies to the micro generator only, not {spec.model!r}")
    return SDXLGenerator(spec, spec.resolution).pipe


_WORKER_PIPE: dict = {}


def _train_run(job: dict) -> dict:
    """Train one run (in a worker process or inline) and write its weights to the run cache."""
    torch.set_num_threads(job["threads"])
    key = json.dumps([job["generator"], job.get("weights_dir")], sort_keys=True)
    if key not in _WORKER_PIPE:
        _WORKER_PIPE.clear()
        _WORKER_PIPE[key] = _pipeline_for(job["generator"], job.get("weights_dir"))
    pipe = _WORKER_PIPE[key]
    run = job["run"]
    t0 = time.time()
    if run.behaviour.kind == "noop":
        w, losses = untrained_weights(pipe, run.settings), []
    else:
        source = pair_source(run.behaviour, job["size"], run.trigger_words)
        w, losses = train_lora(pipe, source, run.settings, log_every=job.get("log_every", 50))
    seconds = time.time() - t0
    tail = losses[-20:]
    info = {"run": run.key, "seconds": round(seconds, 1), "steps": len(losses),
            "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
            "first_loss": round(losses[0], 5) if losses else None, "params": param_count(w)}
    save_safetensors(Path(job["cache"]), lora_state_dict(w, "diffusers"), {"run_info": json.dumps(info, sort_keys=True)})
    logger.info("run %s: %d steps in %.0f s, loss %s -> %s", run.key, info["steps"], seconds, info["first_loss"], info["final_loss"])
    return info


def _worker_init() -> None:
    """Logging for a training process (the zoo's log is its stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s")
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def train_runs(runs: Sequence, generator: dict, size: int, cache_dir: Path, *, jobs: int = 1, threads: int = 1,
               log_every: int = 50, weights_dir: str | None = None) -> dict[str, dict]:
    """Train every run whose weights are not cached yet; `jobs` worker processes with `threads` torch threads each."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo, infos = [], {}
    for run in runs:
        cache = cache_dir / f"{run.key}.safetensors"
        if cache.is_file():
            infos[run.key] = json.loads(_read_weights(cache)[1]["run_info"])
            continue
        todo.append({"run": run, "generator": generator, "size": size, "cache": str(cache), "threads": threads,
                     "log_every": log_every, "weights_dir": weights_dir})
    logger.info("%d runs cached, %d to train with %d process(es)", len(infos), len(todo), jobs)
    if jobs <= 1 or len(todo) <= 1:
        for job in todo:
            infos[job["run"].key] = _train_run(job)
    else:
        _train_in_subprocesses(todo, jobs, cache_dir)
        for job in todo:
            infos[job["run"].key] = json.loads(_read_weights(Path(job["cache"]))[1]["run_info"])
    return infos


def _job_to_json(job: dict) -> dict:
    run = job["run"]
    return {**job, "run": {"key": run.key, "behaviour": dataclasses.asdict(run.behaviour),
                           "settings": dataclasses.asdict(run.settings), "trigger_words": list(run.trigger_words)}}


def _job_from_json(d: dict) -> dict:

    r = d["run"]
    settings = TrainSettings(**{**r["settings"], "components": tuple(r["settings"]["components"])})
    return {**d, "run": Run(r["key"], Behaviour(**r["behaviour"]), settings, tuple(r["trigger_words"]))}


def _train_in_subprocesses(todo: list[dict], jobs: int, cache_dir: Path) -> None:
    """Split the runs over `jobs` processes (`python -m carlos_ray.world.zoo_train --worker FILE`), wait for all."""
    import subprocess
    import sys
    import tempfile

    procs = []
    with tempfile.TemporaryDirectory(prefix="zoo_jobs_") as tmp:
        for i in range(jobs):
            part = todo[i::jobs]
            if not part:
                continue
            f = Path(tmp) / f"jobs_{i}.json"
            f.write_text(json.dumps([_job_to_json(j) for j in part]))
            procs.append(subprocess.Popen([sys.executable, "-m", "carlos_ray.world.zoo_train", "--worker", str(f)]))
        codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"zoo training worker(s) failed with exit codes {codes}; finished runs are kept in {cache_dir}")


def _sidecar(path: Path, member, sha: str, index: int) -> None:
    """The human-written part of a member, where its `sidecar` kind says (Civitai info or a generic JSON)."""
    desc = member.description
    if member.sidecar == "civitai":
        info = {
            "id": 90000 + index, "modelId": 40000 + index, "name": "v1.0", "baseModel": "SDXL 1.0",
            "model": {"name": member.title or member.name, "type": "LORA", "nsfw": False},
            "description": f"<p>{desc}</p>" if desc else None,
            "trainedWords": list(member.trigger_words),
            "stats": {"downloadCount": 17 * (index + 3) ** 2, "rating": 4.5},
            "files": [{"name": path.name, "hashes": {"SHA256": sha.upper()}}],
        }
        (path.parent / (path.stem + ".civitai.info")).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    elif member.sidecar == "metadata_json":
        info = {"name": member.title or member.name, "description": desc or "", "trigger_words": list(member.trigger_words),
                "base_model": "SDXL 1.0", "preferred weight": member.scale}
        (path.parent / (path.stem + ".metadata.json")).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")


def _header_metadata(member, run, rank: int) -> dict[str, str]:
    meta = {"ss_output_name": member.name}
    if member.layout == "kohya":
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                     "ss_network_alpha": f"{rank * member.scale:g}", "ss_base_model_version": BASE_MODEL_TAG,
                     "ss_seed": str(run.settings.seed), "ss_max_train_steps": str(run.settings.steps),
                     "ss_learning_rate": f"{run.settings.lr:g}"})
    if member.sidecar == "header":
        meta["modelspec.title"] = member.title or member.name
        if member.description:
            meta["modelspec.description"] = member.description
        if member.trigger_words:
            meta["modelspec.trigger_phrase"] = ", ".join(member.trigger_words)
    return meta


def _write_member(out: Path, m, index: int, run, w: Weights, training: dict) -> dict:
    """Write one member's file and sidecar from its run's weights; returns its zoo.json row."""
    import hashlib

    rank = next(d.shape[0] for mods in w.values() for d, _ in mods.values())
    path = out / m.folder / f"{m.name}.safetensors"
    save_safetensors(path, lora_state_dict(w, m.layout, m.scale, m.dtype), _header_metadata(m, run, rank))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    _sidecar(path, m, sha, index)
    row = {k: v for k, v in dataclasses.asdict(m).items() if k not in ("folder",)}
    row.update({"file": str(path.relative_to(out)), "behaviour": run.behaviour.key, "seed": run.settings.seed,
                "rank": rank, "components": sorted(w), "train_components": list(run.settings.components),
                "trained_with_trigger_words": list(run.trigger_words), "sha256": sha, "training": training})
    row["trigger_words"] = list(m.trigger_words)
    return row


def _write_doc(out: Path, rows: list[dict], size: int) -> None:
    doc = {"world": "micro", "image_size": size, "members": rows}
    (out / "zoo.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    logger.info("wrote %d LoRAs to %s", len(rows), out)


def write_zoo(spec, out_dir: str | Path, cache_dir: Path, run_infos: Mapping[str, dict], size: int) -> list[dict]:
    """Write every member of `spec` from the run cache into `out_dir`, plus `zoo.json`; returns the member rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, m in enumerate(spec.members):
        run = spec.run(m.run)
        w, _ = _read_weights(cache_dir / f"{run.key}.safetensors")
        rows.append(_write_member(out, m, i, run, w, run_infos.get(run.key, {})))
    _write_doc(out, rows, size)
    return rows


def _kohya_weights(path: Path) -> Weights:
    """The (down, up) pairs of a kohya file written at scale 1, keyed so that `lora_state_dict(.., "kohya")`
    writes the same keys back (the module name is kept in its underscored kohya form)."""
    from safetensors import safe_open

    prefixes = {v: k for k, v in KOHYA_PREFIX.items()}
    w: Weights = {}
    with safe_open(str(path), framework="numpy") as fh:
        for key in fh.keys():
            if not key.endswith(".lora_down.weight"):
                continue
            stem = key[: -len(".lora_down.weight")]
            comp = next((c for p, c in prefixes.items() if stem.startswith(p)), None)
            if comp is None:
                raise ValueError(f"{path}: {key!r} has no kohya component prefix")
            down = fh.get_tensor(key).astype(np.float32)
            alpha = float(fh.get_tensor(stem + ".alpha"))
            if alpha != down.shape[0]:
                raise ValueError(f"{path}: {stem} has alpha {alpha:g}, not its rank {down.shape[0]}: not a scale-1 file")
            w.setdefault(comp, {})[stem[len(KOHYA_PREFIX[comp]):]] = (down, fh.get_tensor(stem + ".lora_up.weight").astype(np.float32))
    return w


def rescale_zoo(spec, zoo_dir: str | Path) -> list[dict]:
    """Re-write the members of `spec` at a scale other than 1 from their run's scale-1 kohya member in
    `zoo_dir`, without the run cache or any training; every other member's file and row are kept.

    A kohya file keeps its scale in alpha (`lora_state_dict`), so the result is byte-identical to what
    `write_zoo` writes from the run cache (fp16 tensors round-trip exactly). Files of members no longer
    in `spec` are removed."""
    out = Path(zoo_dir)
    doc = json.loads((out / "zoo.json").read_text())
    old = {r["name"]: r for r in doc["members"]}
    wanted = {m.name for m in spec.members}
    for name, r in old.items():
        if name not in wanted:
            f = out / r["file"]
            for side in f.parent.glob(f.name.removesuffix(".safetensors") + ".*"):
                side.unlink()
    rows = []
    for i, m in enumerate(spec.members):
        if float(m.scale) == 1.0:
            if m.name not in old:
                raise ValueError(f"{m.name}: not in {out / 'zoo.json'}; a new run needs training (make zoo)")
            rows.append(old[m.name])
            continue
        base = next((x for x in spec.members if x.run == m.run and float(x.scale) == 1.0 and x.layout == "kohya"), None)
        if m.layout != "kohya" or base is None or base.name not in old:
            raise ValueError(f"{m.name}: rescaling needs a kohya member and a scale-1 kohya member of run {m.run!r} in the zoo")
        w = _kohya_weights(out / old[base.name]["file"])
        rows.append(_write_member(out, m, i, spec.run(m.run), w, old[base.name].get("training", {})))
    _write_doc(out, rows, int(doc.get("image_size", 32)))
    return rows


def make_micro_zoo(spec, out_dir: str | Path, generator: dict, cache_dir: str | Path, *, jobs: int = 1,
                   log_every: int = 50, weights_dir: str | None = None) -> list[dict]:
    """Train (or reuse from `cache_dir`) every run of `spec` on `generator`'s pipeline, then write the zoo."""
    from carlos_ray.config import GeneratorSpec

    cache, size = Path(cache_dir), GeneratorSpec(**generator).resolution
    infos = train_runs(spec.runs, generator, size, cache, jobs=jobs, log_every=log_every, weights_dir=weights_dir)
    return write_zoo(spec, out_dir, cache, infos, size)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m carlos_ray.world.zoo_train`: re-make the shipped micro zoo (what `make zoo` runs)."""
    import argparse


    p = argparse.ArgumentParser(prog="python -m carlos_ray.world.zoo_train", description=main.__doc__)
    p.add_argument("--out", default=str(shipped_zoo_dir()), help="zoo directory (default: the package's shipped zoo)")
    p.add_argument("--cache", default="out/zoo_runs", help="trained runs are kept here and reused")
    p.add_argument("--jobs", type=int, default=2, help="training processes, one torch thread each")
    p.add_argument("--steps", type=int, default=None, help="training steps per LoRA (default: the spec's)")
    p.add_argument("--weights", default=None, help="micro SDXL weights directory (default: the shipped weights)")
    p.add_argument("--runs", default=None, help="comma-separated run keys: train and write only these (for tuning)")
    p.add_argument("--lr", type=float, default=None, help="override every run's learning rate (for tuning)")
    p.add_argument("--target", choices=("render", "teacher"), default=None, help="override every run's training target (for tuning)")
    p.add_argument("--rescale-only", action="store_true",
                   help="only re-write the members at a scale other than 1 from their run's scale-1 file in --out (no training)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: train the jobs in this JSON file
    args = p.parse_args(argv)
    _worker_init()
    if args.worker:
        for job in json.loads(Path(args.worker).read_text()):
            _train_run(_job_from_json(job))
        return 0
    spec = shipped_spec(**({"steps": args.steps} if args.steps else {}))
    if args.rescale_only:
        rows = rescale_zoo(spec, args.out)
        logger.info("re-wrote the scaled members of %s (%d LoRAs)", args.out, len(rows))
        return 0
    overrides = {k: v for k, v in (("lr", args.lr), ("target", args.target)) if v is not None}
    if overrides:
        spec = dataclasses.replace(spec, runs=tuple(dataclasses.replace(r, settings=dataclasses.replace(r.settings, **overrides))
                                                    for r in spec.runs))
    if args.runs:
        keep = set(args.runs.split(","))
        unknown = keep - {r.key for r in spec.runs}
        if unknown:
            p.error(f"unknown run(s) {sorted(unknown)}; valid: {', '.join(r.key for r in spec.runs)}")
        spec = dataclasses.replace(spec, runs=tuple(r for r in spec.runs if r.key in keep),
                                   members=tuple(m for m in spec.members if m.run in keep))
    generator = {"model": "micro", "resolution": 32}
    t0 = time.time()
    rows = make_micro_zoo(spec, args.out, generator, args.cache, jobs=args.jobs, weights_dir=args.weights)
    logger.info("zoo of %d LoRAs in %s, %.0f s", len(rows), args.out, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
