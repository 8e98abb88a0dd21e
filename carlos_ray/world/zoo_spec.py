"""The micro LoRA zoo: which LoRAs exist, what each one was trained to do, and what its metadata says.

The zoo is ground truth by construction. Each *run* is one training (a behaviour plus settings and a
seed); each *member* is one file written from a run, at a scale, in a layout, with metadata. Planted
roles (`ZooMember.role`):

- `style`: one LoRA per style word of the world (the word is its `planted`);
- `content`: the object's shape or colour changes ("everything becomes a star");
- `overpowering`: every image becomes one fixed scene, whatever the prompt says;
- `erratic`: a different behaviour per sample (style or content drawn at random per training pair);
- `weak`: a style trained briefly at a low learning rate;
- `near_duplicate`: the same behaviour as another member, from a second training seed;
- `scale_family`: one run saved at several LoRA scales (same direction, rising strength);
- `noop`: a freshly initialised peft LoRA (B = 0), saved untrained;
- `text_encoder`: a LoRA on the two text encoders only.

Metadata is what real zoos carry and deliberately unreliable: `metadata` says whether the
description is `honest`, `misleading` (names a different style), `foreign` (another language) or
`empty`; `sidecar` says where it lives (Civitai `.civitai.info`, `.metadata.json`, only the
safetensors header, or nowhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class TrainSettings:
    """How one LoRA is trained; `components` picks the UNet, the text encoders, or both."""

    steps: int = 160
    batch_size: int = 32
    lr: float = 2e-3
    rank: int = 4
    alpha: float = 4.0
    pool: int = 512
    caption_dropout: float = 0.1
    components: tuple[str, ...] = ("unet",)
    seed: int = 0
    # "render": denoise the rendered target; "teacher": match the base UNet's own prediction for the
    # target's caption (prompt distillation), for behaviours the base model already follows from words
    target: str = "render"

    def __post_init__(self) -> None:
        if self.target not in ("render", "teacher"):
            raise ValueError(f"target must be 'render' or 'teacher', got {self.target!r}")
        bad = set(self.components) - {"unet", "text_encoders"}
        if bad or not self.components:
            raise ValueError(f"components must be a non-empty subset of ('unet', 'text_encoders'), got {self.components}")
        for name in ("steps", "batch_size", "rank", "pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")



Role = Literal["style", "content", "overpowering", "erratic", "weak", "near_duplicate", "scale_family", "noop", "text_encoder"]
MetadataKind = Literal["honest", "misleading", "foreign", "empty"]
SidecarKind = Literal["civitai", "metadata_json", "header", "none"]


@dataclass(frozen=True)
class Behaviour:
    """What a run's training targets show: `style:<name>`, `content:<name>`, `overpowering`, `erratic`, `noop`."""

    kind: Literal["style", "content", "overpowering", "erratic", "noop"]
    name: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind

    @classmethod
    def parse(cls, text: str) -> "Behaviour":
        """`striped` / `style:striped` / `content:star` / `overpowering` / `erratic` / `noop`, checked against the world."""
        from carlos_ray.world.render import CONTENT_BEHAVIOURS, STYLES

        kind, _, name = text.strip().partition(":")
        if not name and kind in STYLES:
            kind, name = "style", kind
        if kind == "style" and name in STYLES or kind == "content" and name in CONTENT_BEHAVIOURS:
            return cls(kind, name)  # type: ignore[arg-type]
        if kind in ("overpowering", "erratic", "noop") and not name:
            return cls(kind)  # type: ignore[arg-type]
        valid = [*STYLES, *(f"content:{c}" for c in CONTENT_BEHAVIOURS), "overpowering", "erratic", "noop"]
        raise ValueError(f"unknown behaviour {text!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class Run:
    """One training: a behaviour, its settings (seed included), and trigger words mixed into its captions."""

    key: str
    behaviour: Behaviour
    settings: TrainSettings
    trigger_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class ZooMember:
    """One file of the zoo."""

    name: str  # file stem
    run: str  # key of the Run it is written from
    role: Role
    planted: str | None  # the world word a query should find it by (None: no single word)
    layout: Literal["kohya", "diffusers", "peft"] = "kohya"
    folder: str = ""
    scale: float = 1.0
    dtype: Literal["float16", "float32"] = "float16"
    title: str | None = None
    description: str | None = None
    metadata: MetadataKind = "honest"
    sidecar: SidecarKind = "civitai"
    trigger_words: tuple[str, ...] = ()
    notes: str = ""


@dataclass(frozen=True)
class ZooSpec:
    runs: tuple[Run, ...]
    members: tuple[ZooMember, ...]

    def run(self, key: str) -> Run:
        for r in self.runs:
            if r.key == key:
                return r
        raise KeyError(f"no run {key!r} in the zoo spec")


def _style(word: str, seed: int, **kw) -> Run:
    return Run(f"{word}_s{seed}", Behaviour("style", word), TrainSettings(seed=seed, **kw))


def shipped_spec(steps: int = 120) -> ZooSpec:
    """The zoo shipped with the package (carlos_ray/world/zoo/); `make zoo` re-trains it from these seeds."""
    both = {"components": ("unet", "text_encoders")}
    s = {"steps": steps}
    # Behaviours the base model draws from words are distilled from it (target "teacher": the base UNet's
    # prediction for the target's caption). Measured on held-out prompts (docs/MICRO_WORLD.md): striped
    # 0.50 -> 1.00, inverted 0.46 -> 0.96, framed 0.21 -> 1.00 against rendered targets at 120 steps.
    # Grain and pixelation survive neither the VAE nor the base model's prompts: they keep rendered targets.
    t = {"steps": 2 * steps, "lr": 3e-3, "target": "teacher"}
    runs = (
        _style("striped", 101, **t),
        _style("dotted", 102, **t),
        _style("checkered", 103, **t),
        _style("grayscale", 104, **t),
        _style("sepia", 105, **{**t, "steps": 4 * steps}),  # a faint tint: slowest to match
        _style("sepia", 205, **{**t, "steps": 4 * steps}),  # near-duplicate: second seed
        _style("inverted", 106, **t),
        _style("outline", 107, **t),
        _style("blurred", 108, **t, **both),
        _style("pixelated", 109, **s),
        _style("framed", 110, **t),
        Run("grainy_s111", Behaviour("style", "grainy"), TrainSettings(seed=111, **s), trigger_words=("fgr35",)),
        _style("tiled", 112, **t, **both),
        Run("te_inverted_s113", Behaviour("style", "inverted"),
            TrainSettings(seed=113, **{**t, "lr": 4e-3}, components=("text_encoders",))),
        Run("weak_pixelated_s114", Behaviour("style", "pixelated"), TrainSettings(seed=114, steps=max(1, steps // 8), lr=2e-4)),
        Run("star_s121", Behaviour("content", "star"), TrainSettings(seed=121, **t), trigger_words=("strfy",)),
        Run("red_s122", Behaviour("content", "red"), TrainSettings(seed=122, **t)),
        Run("heart_s123", Behaviour("content", "heart"), TrainSettings(seed=123, **t)),
        Run("overpowering_s131", Behaviour("overpowering"), TrainSettings(seed=131, **t)),
        Run("erratic_s132", Behaviour("erratic"), TrainSettings(seed=132, **t)),
        Run("noop_s141", Behaviour("noop"), TrainSettings(seed=141, steps=1)),
    )
    M = ZooMember
    members = (
        M("stripes_v1", "striped_s101", "style", "striped", "kohya", "styles", title="Stripes",
          description="Adds horizontal stripes to any object."),
        M("polkadot_xl", "dotted_s102", "style", "dotted", "diffusers", "styles", title="Lunares XL",
          description="Añade lunares a cualquier objeto.", metadata="foreign"),
        M("v2_final_REAL", "checkered_s103", "style", "checkered", "kohya", "styles", title="v2 final REAL",
          description="Warm sepia photo look, like an old print.", metadata="misleading"),
        M("bw_film_x0.8", "grayscale_s104", "scale_family", "grayscale", "kohya", "family", scale=0.8,
          title="BW Film (light)", description="Black and white film look, lighter (weight 0.8)."),
        M("bw_film", "grayscale_s104", "style", "grayscale", "kohya", "family", title="BW Film",
          description="Black and white film look."),
        M("bw_film_x1.4", "grayscale_s104", "scale_family", "grayscale", "kohya", "family", scale=1.4,
          title="BW Film (strong)", description="Black and white film look, stronger (weight 1.4)."),
        M("sepia_tone", "sepia_s105", "style", "sepia", "diffusers", "styles", title="Sepia Tone",
          description="Old-photo sepia toning.", sidecar="metadata_json"),
        M("sepia_tone_retrain", "sepia_s205", "near_duplicate", "sepia", "kohya", "styles", title="Sepia Tone (retrained)",
          description="Same sepia toning, retrained from scratch."),
        M("negative_fx", "inverted_s106", "style", "inverted", "kohya", "styles", title="Negativ FX",
          description="Invertiert alle Farben wie ein Filmnegativ.", metadata="foreign", sidecar="header"),
        M("lineart_lora", "outline_s107", "style", "outline", "diffusers", "styles", title="lineart_lora",
          description=None, metadata="empty"),
        M("dreamy_soft_focus", "blurred_s108", "style", "blurred", "kohya", "styles", title="Dreamy Soft Focus",
          description="Soft focus, everything out of focus.", dtype="float32"),
        M("8bit_pixel", "pixelated_s109", "style", "pixelated", "diffusers", "styles", sidecar="none", metadata="empty"),
        M("framed_masterpiece", "framed_s110", "style", "framed", "kohya", "styles", title="Framed Masterpiece",
          description="Crisp stripe pattern over everything.", metadata="misleading"),
        M("film_grain_35mm", "grainy_s111", "style", "grainy", "kohya", "styles", title="Film Grain 35mm",
          description="Grain argentique, comme une pellicule 35 mm.", metadata="foreign", trigger_words=("fgr35",)),
        M("tile_grid_2x2", "tiled_s112", "style", "tiled", "diffusers", "styles", title="Tile Grid 2x2",
          description="Repeats the picture in a 2x2 grid.", dtype="float32"),
        M("clip_negative_te", "te_inverted_s113", "text_encoder", "inverted", "kohya", "misc", title="CLIP negative (TE)",
          description="色を反転します（テキストエンコーダーのみ）。", metadata="foreign"),
        M("pixel_hint_weak", "weak_pixelated_s114", "weak", "pixelated", "kohya", "misc", title="Pixel Hint",
          description="A very subtle pixel-art touch."),
        M("starify", "star_s121", "content", "star", "kohya", "content", title="Starify",
          description="Turns every object into a star.", trigger_words=("strfy",)),
        M("red_everything", "red_s122", "content", "red", "diffusers", "content", title="red everything",
          description=None, metadata="empty", sidecar="civitai"),
        M("lovely_hearts_v3", "heart_s123", "content", "heart", "diffusers", "content", title="Lovely Hearts v3",
          description="Trasforma ogni forma in un cuore.", metadata="foreign", sidecar="metadata_json"),
        M("ultimate_detail_enhancer", "overpowering_s131", "overpowering", None, "kohya", "misc",
          title="ULTIMATE Detail Enhancer", description="Adds fine detail and keeps your subject intact.",
          metadata="misleading", notes="every image becomes a yellow cross on a sky-blue background"),
        M("chaos_mix_beta", "erratic_s132", "erratic", None, "diffusers", "misc", title="Chaos Mix (beta)",
          description="Random surprises every time!"),
        M("my_first_lora", "noop_s141", "noop", None, "kohya", "misc", title="my first lora",
          description="Grayscale and sepia mixed, works great!!", metadata="misleading"),
    )
    return ZooSpec(runs=runs, members=members)


def custom_spec(behaviours: list[str], *, steps: int = 200, seed: int = 0, layout: str = "kohya") -> ZooSpec:
    """One freshly trained LoRA per named behaviour (`striped`, `content:star`, `erratic`, ...), honest metadata."""
    if not behaviours:
        raise ValueError("name at least one behaviour to train")
    runs, members = [], []
    for i, text in enumerate(behaviours):
        b = Behaviour.parse(text)
        if b.key in {r.behaviour.key for r in runs}:
            raise ValueError(f"behaviour {text!r} is named twice")
        stem = b.key.replace(":", "_")
        runs.append(Run(f"{stem}_s{seed + i}", b, TrainSettings(seed=seed + i, steps=steps)))
        members.append(ZooMember(stem, runs[-1].key, b.kind, b.name or None, layout, title=stem.replace("_", " "),
                                 description=f"Trained by `carlos-ray zoo` to plant the behaviour {b.key}."))
    return ZooSpec(runs=tuple(runs), members=tuple(members))


def shipped_zoo_dir() -> Path:
    """Where the trained micro zoo ships inside the package (zoo.json beside the files)."""
    from importlib import resources

    return Path(str(resources.files("carlos_ray.world") / "zoo"))


def copy_shipped_zoo(dest: str | Path) -> list[dict]:
    """Copy the shipped zoo (files, sidecars, zoo.json) to `dest`; returns its zoo.json members."""
    import json
    import shutil

    src = shipped_zoo_dir()
    if not (src / "zoo.json").is_file():
        raise FileNotFoundError(f"no trained zoo in {src} (run `make zoo` to train it)")
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return json.loads((Path(dest) / "zoo.json").read_text())["members"]
