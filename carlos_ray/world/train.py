"""Training of the micro world's models, deterministic from seeds: VAE, micro CLIP, then the UNet
with both SDXL text encoders trained jointly.

`python -m carlos_ray.world.train all` (what `make world` runs) trains the VAE and the CLIP in two
parallel single-thread processes and, once the VAE is done, the UNet on two threads, and writes the safetensors into the
package's `weights/` folder. Each stage shows a tqdm bar with its loss. Held-out combinations
(`HELD_OUT_*`) never appear in any training set; `carlos_ray.world.evaluate` measures on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from carlos_ray.world import captions as C
from carlos_ray.world import micro
from carlos_ray.world import render as R

logger = logging.getLogger(__name__)

_COLOURS = list(R.COLOURS)
# (shape, colour) and (shape, style) pairs never rendered for training.
HELD_OUT_COLOUR_SHAPE: frozenset[tuple[str, str]] = frozenset(
    (s, _COLOURS[(3 * i + 1) % len(_COLOURS)]) for i, s in enumerate(R.SHAPES)
)
HELD_OUT_STYLE_SHAPE: frozenset[tuple[str, str]] = frozenset(
    (s, R.STYLES[(5 * i + 2) % len(R.STYLES)]) for i, s in enumerate(R.SHAPES)
)
ADD_TIME_IDS = (32, 32, 0, 0, 32, 32)  # SDXL micro-conditioning: original size, crop, target size


def is_held_out(scene: R.Scene) -> bool:
    return (scene.shape, scene.colour) in HELD_OUT_COLOUR_SHAPE or any(
        (scene.shape, st) in HELD_OUT_STYLE_SHAPE for st in scene.styles
    )


def training_scene(rng: np.random.Generator, **kw) -> R.Scene:
    """A random scene outside the held-out combinations."""
    while True:
        s = R.random_scene(rng, **kw)
        if not is_held_out(s):
            return s


def held_out_scenes(n: int, seed: int, **kw) -> list[R.Scene]:
    """Random scenes that contain a held-out (shape, colour) or (shape, style) pair."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        s = R.random_scene(rng, **kw)
        if is_held_out(s):
            out.append(s)
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_batch(scenes: list[R.Scene], rng: np.random.Generator) -> np.ndarray:
    return np.stack([R.render(s, rng=rng) for s in scenes])


def _bar(steps: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(range(steps), desc=desc, disable=not enabled, mininterval=2.0, dynamic_ncols=True)


def _lr(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@dataclasses.dataclass
class StageConfig:
    steps: int
    batch: int
    lr: float
    seed: int = 0
    progress: bool = True
    style_drop: float = 0.0  # CLIP: share of captions that leave a shared (nuisance) style unnamed


DEFAULTS = {
    "vae": StageConfig(steps=700, batch=32, lr=1e-3),
    "clip": StageConfig(steps=2000, batch=128, lr=1e-3),
    "clip-refine": StageConfig(steps=1000, batch=128, lr=3e-4),
    # captions that leave the style unnamed where it is not what a batch group varies: "a star" then
    # matches styled stars too (after two phases it matched plain ones only). Zero-shot shape on held-out
    # renders: 0.75 after two phases; 1000 steps at style_drop 0.35: 0.81; 2000 at 0.5: 0.87 (shipped)
    "clip-nuisance": StageConfig(steps=2000, batch=128, lr=3e-4, style_drop=0.5),
    "unet": StageConfig(steps=2500, batch=32, lr=8e-4),
}
CLIP_PHASES = ("clip", "clip-refine", "clip-nuisance")


# ---- VAE ------------------------------------------------------------------------------------------
def train_vae(out: Path, cfg: StageConfig) -> dict:
    """AutoencoderKL reconstructing renders of every style; writes the VAE with its latent scaling factor."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vae = micro.build_vae(cfg.seed).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    t0 = time.time()
    bar = _bar(cfg.steps, "vae", cfg.progress)
    loss_v = float("nan")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.steps, cfg.lr, 50)
        scenes = [R.random_scene(rng, p_style=0.6) for _ in range(cfg.batch)]
        x = to_tensor(render_batch(scenes, rng))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = torch.nn.functional.mse_loss(rec, x) + 0.2 * (rec - x).abs().mean() + 1e-7 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        bar.set_postfix(loss=f"{loss_v:.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        scenes = [R.random_scene(rng, p_style=0.5) for _ in range(256)]
        lat = vae.encode(to_tensor(render_batch(scenes, rng))).latent_dist.mean
    scaling = float(1.0 / lat.std())
    micro.save_module(vae, out / micro.WEIGHT_FILES["vae"], {"scaling_factor": repr(scaling), "seed": str(cfg.seed)})
    info = {"stage": "vae", "steps": cfg.steps, "seconds": round(time.time() - t0, 1), "final_loss": loss_v,
            "scaling_factor": scaling}
    logger.info("vae: %s", info)
    return info


# ---- CLIP -----------------------------------------------------------------------------------------
def clip_batch(rng: np.random.Generator, n: int, with_families: bool = False):
    """Scenes in groups that differ in one attribute only (shape, colour or style): hard negatives.

    With `with_families`, also the family each scene's group varies (`shape`, `colour`, `style`, `single`)."""
    scenes: list[R.Scene] = []
    families: list[str] = []
    while len(scenes) < n:
        base = training_scene(rng, p_style=0.6)
        family = ("shape", "shape", "shape", "colour", "colour", "style", "style", "single")[int(rng.integers(8))]
        if family == "single":
            group = [base]
        elif family == "shape":
            group = [dataclasses.replace(base, shape=s) for s in rng.permutation(R.SHAPES)]
        elif family == "colour":
            group = [dataclasses.replace(base, colour=c) for c in rng.permutation(_COLOURS)[:6]]
        else:
            opts = [()] + [(s,) for s in R.STYLES]
            group = [dataclasses.replace(base, styles=opts[i]) for i in rng.permutation(len(opts))[:6]]
        kept = [s for s in group if not is_held_out(s)]
        scenes += kept
        families += [family] * len(kept)
    return (scenes[:n], families[:n]) if with_families else scenes[:n]


def train_clip(out: Path, cfg: StageConfig, init: Path | None = None, phase: int = 0) -> dict:
    """Contrastive training of the micro open_clip CLIP on renders and grammar captions.

    With `init` (a weights folder), training starts from its CLIP with a fresh optimizer and its own
    data stream (from `phase`): the later, lower-lr phases of the `clip` stage (cosine warm restarts)."""
    import open_clip

    offset = 100 * phase if init else 0
    torch.manual_seed(cfg.seed + offset)
    rng = np.random.default_rng(cfg.seed + 1 + offset)
    model = micro.build_clip(cfg.seed)
    if init is not None:
        micro.load_module(model, Path(init) / micro.WEIGHT_FILES["clip"])
    model.train()
    tokenizer = open_clip.get_tokenizer(micro.register_clip_config())
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    emb = [p for n, p in model.named_parameters() if "token_embedding" in n]
    rest = [p for n, p in model.named_parameters() if "token_embedding" not in n]
    opt = torch.optim.AdamW([{"params": rest, "weight_decay": 0.05}, {"params": emb, "weight_decay": 0.0}], lr=cfg.lr)
    t0 = time.time()
    bar = _bar(cfg.steps, "clip", cfg.progress)
    loss_v = float("nan")
    labels = torch.arange(cfg.batch)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.steps, cfg.lr, 60)
        scenes, families = clip_batch(rng, cfg.batch, with_families=True)
        imgs = torch.from_numpy(render_batch(scenes, rng)).permute(0, 3, 1, 2).float().div(255.0)
        imgs = (imgs - mean) / std
        unnamed = [cfg.style_drop > 0 and f != "style" and rng.random() < cfg.style_drop for f in families]
        texts = tokenizer([C.caption(s, rng, name_style=not u) for s, u in zip(scenes, unnamed)])
        img_f, txt_f, scale = model(imgs, texts)[:3]  # normalized features and exp(logit_scale)
        logits = scale * img_f @ txt_f.T
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_v = float(loss.detach())
        bar.set_postfix(loss=f"{loss_v:.3f}", refresh=False)
    model.eval()
    micro.save_module(model, out / micro.WEIGHT_FILES["clip"], {"seed": str(cfg.seed)})
    info = {"stage": CLIP_PHASES[phase if init else 0], "steps": cfg.steps, "seconds": round(time.time() - t0, 1), "final_loss": loss_v}
    logger.info("clip: %s", info)
    return info


# ---- UNet + text encoders ---------------------------------------------------------------------------
def encode_text(te1, te2, tok1, tok2, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) exactly as `StableDiffusionXLPipeline.encode_prompt` builds them."""
    ids1 = tok1(texts, padding="max_length", max_length=tok1.model_max_length, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(texts, padding="max_length", max_length=tok2.model_max_length, truncation=True, return_tensors="pt").input_ids
    h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
    o2 = te2(ids2, output_hidden_states=True)
    return torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2[0]


def unet_scene(rng: np.random.Generator) -> R.Scene:
    """The generator's training distribution: centred objects (small jitter), half of them styled."""
    return training_scene(rng, positions=("center",), p_style=0.5, max_jitter=0.03)


def train_unet(out: Path, cfg: StageConfig, vae_dir: Path | None = None, pool: int = 4096, save_every: int = 0) -> dict:
    """UNet (eps-prediction, DDPM noise schedule, min-SNR-5 loss weights) on VAE latents of renders, both text
    encoders trained jointly; constant learning rate after warm-up, EMA weights saved (every `save_every` steps too)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 2)
    vae = micro.build_vae(0)
    meta = micro.load_module(vae, Path(vae_dir or out) / micro.WEIGHT_FILES["vae"])
    scaling = float(meta["scaling_factor"])
    vae.eval().requires_grad_(False)
    t0 = time.time()
    scenes = [unet_scene(rng) for _ in range(pool)]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, pool, 256):
            post = vae.encode(to_tensor(render_batch(scenes[i : i + 256], rng))).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    mean_t, std_t = torch.cat(means), torch.cat(stds)
    logger.info("unet: %d latents in %.0f s", pool, time.time() - t0)

    unet = micro.build_unet(cfg.seed).train()
    te1, te2 = micro.build_text_encoders(cfg.seed + 10)
    te1.train()
    te2.train()
    tok1, tok2 = micro.build_tokenizers()
    sched_cfg = micro.config("micro_sdxl.json")["scheduler"]
    noise_sched = DDPMScheduler(num_train_timesteps=sched_cfg["num_train_timesteps"], beta_start=sched_cfg["beta_start"],
                                beta_end=sched_cfg["beta_end"], beta_schedule=sched_cfg["beta_schedule"])
    alphas = noise_sched.alphas_cumprod
    modules = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    emb = [p for m in (te1, te2) for n, p in m.named_parameters() if "token_embedding" in n]
    rest = [p for m in modules.values() for n, p in m.named_parameters() if "token_embedding" not in n]
    opt = torch.optim.AdamW([{"params": rest, "weight_decay": 0.01}, {"params": emb, "weight_decay": 0.0}], lr=cfg.lr)
    ema = {k: [p.detach().clone() for p in m.parameters()] for k, m in modules.items()}
    time_ids = torch.tensor([ADD_TIME_IDS], dtype=torch.float32).repeat(cfg.batch, 1)
    bar = _bar(cfg.steps, "unet", cfg.progress)
    loss_ema = None
    t1 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 100)
        idx = torch.from_numpy(rng.integers(0, pool, cfg.batch))
        latents = (mean_t[idx] + std_t[idx] * torch.randn_like(mean_t[idx])) * scaling
        texts = [C.caption(scenes[int(i)], rng, p_drop=0.15) if rng.random() >= 0.1 else "" for i in idx]
        enc, pooled = encode_text(te1, te2, tok1, tok2, texts)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,))
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, enc, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=5.0) / snr  # min-SNR weighting (Hang et al. 2023): faster convergence
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rest, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, m in modules.items():
                for e, p in zip(ema[k], m.parameters()):
                    e.lerp_(p.detach(), 1 - decay)
        loss_ema = float(loss.detach()) if loss_ema is None else 0.98 * loss_ema + 0.02 * float(loss.detach())
        bar.set_postfix(loss=f"{loss_ema:.4f}", refresh=False)
        if save_every and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
            _save_ema(modules, ema, out, {"seed": str(cfg.seed), "ema": "0.999", "step": str(step + 1)})
            logger.info("unet: EMA checkpoint at step %d (loss %.4f, %.0f s)", step + 1, loss_ema, time.time() - t1)
    _save_ema(modules, ema, out, {"seed": str(cfg.seed), "ema": "0.999", "step": str(cfg.steps)})
    info = {"stage": "unet", "steps": cfg.steps, "seconds": round(time.time() - t0, 1),
            "train_seconds": round(time.time() - t1, 1), "final_loss_ema": loss_ema, "pool": pool}
    logger.info("unet: %s", info)
    return info


def _save_ema(modules: dict, ema: dict, out: Path, meta: dict[str, str]) -> None:
    """Write the EMA weights of every module (the training weights are left as they are)."""
    import copy

    for k, m in modules.items():
        shadow = copy.deepcopy(m)
        with torch.no_grad():
            for e, p in zip(ema[k], shadow.parameters()):
                p.copy_(e)
        micro.save_module(shadow.eval(), out / micro.WEIGHT_FILES[k], meta)


# ---- command line -------------------------------------------------------------------------------------
def _stage_cfg(name: str, args: argparse.Namespace) -> StageConfig:
    cfg = dataclasses.replace(DEFAULTS[name], seed=args.seed, progress=not args.no_progress)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.batch is not None:
        cfg.batch = args.batch
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m carlos_ray.world.train", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["vae", *CLIP_PHASES, "unet", "all"],
                   help="clip = all three CLIP phases; clip-refine / clip-nuisance = that phase only, from the CLIP in --out")
    p.add_argument("--out", type=Path, default=None, help="weights folder (default: the package's weights/)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--pool", type=int, default=4096, help="UNet: number of pre-encoded training scenes")
    p.add_argument("--save-every", type=int, default=250, help="UNet: write EMA weights every N steps (0 = only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = args.out or micro.default_weights_dir()
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "all":
        t0 = time.time()
        base = [sys.executable, "-m", "carlos_ray.world.train", "--out", str(out), "--seed", str(args.seed), "--threads", "1"]
        if args.no_progress:
            base.append("--no-progress")
        # the UNet needs only the VAE: it starts as soon as the VAE is done, while the CLIP trains on
        vae, clip = (subprocess.Popen(base[:3] + [st] + base[3:]) for st in ("vae", "clip"))
        if vae.wait():
            clip.terminate()
            logger.error("the vae stage failed with exit code %s", vae.returncode)
            return 1
        rc = main(["unet", "--out", str(out), "--seed", str(args.seed), "--threads", str(args.threads or 2),
                   "--pool", str(args.pool)] + (["--no-progress"] if args.no_progress else []))
        if clip.wait():
            logger.error("the clip stage failed with exit code %s", clip.returncode)
            return 1
        logger.info("all stages: %.1f min", (time.time() - t0) / 60)
        return rc
    torch.set_num_threads(args.threads or 1)
    if args.stage == "vae":
        train_vae(out, _stage_cfg("vae", args))
    elif args.stage in CLIP_PHASES:
        first = CLIP_PHASES.index(args.stage)
        for phase in range(first, len(CLIP_PHASES) if args.stage == "clip" else first + 1):
            train_clip(out, _stage_cfg(CLIP_PHASES[phase], args), init=out if phase else None, phase=phase)
    else:
        train_unet(out, _stage_cfg("unet", args), pool=args.pool, save_every=args.save_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
