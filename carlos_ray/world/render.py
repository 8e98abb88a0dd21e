"""The procedural renderer: scenes, style transforms and content behaviours (numpy + PIL only).

A `Scene` is one object (shape, colour, size, position) on a plain background, plus an ordered tuple
of style names. `render(scene)` draws it as a uint8 (H, W, 3) array; `apply_style(img, name)` applies
one style to any image (the object mask is estimated from the border colour when it is not given);
`apply_content(scene, name)` applies a content behaviour ("everything becomes a star") to a scene.
Everything is deterministic given the scene. `grainy` adds a fixed film-grain field (the same
pseudo-random pattern for every image of a size), so a decoder can learn to draw it; pass `rng` to
`apply_style` to draw fresh grain instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 55),
    "cyan": (30, 195, 205),
    "blue": (35, 60, 215),
    "purple": (135, 45, 185),
    "pink": (250, 115, 185),
}
# light backgrounds only: `inverted` is then recognisable from a dark background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "beige": (232, 216, 184),
    "sky": (185, 212, 240),
    "mint": (190, 235, 200),
}
SIZES: dict[str, float] = {"small": 0.30, "large": 0.40}  # half-extent as a fraction of the image width
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.0, 0.0),
    "left": (-0.08, 0.0),
    "right": (0.08, 0.0),
    "top": (0.0, -0.08),
    "bottom": (0.0, 0.08),
}
# style transforms, each recognisable from pixels by `carlos_ray.world.oracle`.
STYLES: tuple[str, ...] = (
    "striped", "dotted", "checkered", "grayscale", "sepia", "inverted",
    "outline", "blurred", "pixelated", "framed", "grainy", "tiled",
)
PATTERN_INK = (25, 25, 25)
FRAME_COLOUR = (60, 40, 30)
FRAME_WIDTH = 3  # pixels at 32 px, scaled with the image
STRIPE_PERIOD = 4
DOT_PERIOD = 8
CHECK_CELL = 4
PIXEL_BLOCK = 4
GRAIN_SIGMA = 45.0
BLUR_SIGMA = 2.2
# content behaviours: scene -> scene (what a content LoRA plants).
CONTENT_BEHAVIOURS: dict[str, dict[str, str]] = {
    "star": {"shape": "star"},
    "circle": {"shape": "circle"},
    "heart": {"shape": "heart"},
    "red": {"colour": "red"},
    "blue": {"colour": "blue"},
    "small": {"size": "small"},
}
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Scene:
    """One object on a plain background; `jitter` is an extra (dx, dy) offset in image-width units."""

    shape: str
    colour: str
    background: str = "white"
    size: str = "large"
    position: str = "center"
    styles: tuple[str, ...] = ()
    jitter: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for field, value, valid in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("background", self.background, BACKGROUNDS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")
        for s in self.styles:
            if s not in STYLES:
                raise ValueError(f"unknown style {s!r}; valid: {', '.join(STYLES)}")
        object.__setattr__(self, "styles", tuple(self.styles))


def random_scene(
    rng: np.random.Generator,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    sizes: Sequence[str] = tuple(SIZES),
    positions: Sequence[str] = tuple(POSITIONS),
    styles: Sequence[str] = STYLES,
    p_style: float = 0.5,
    max_jitter: float = 0.04,
) -> Scene:
    """A scene drawn uniformly from the given vocabularies; one style with probability `p_style`."""
    st = (str(rng.choice(list(styles))),) if len(styles) and rng.random() < p_style else ()
    return Scene(
        shape=str(rng.choice(list(shapes))),
        colour=str(rng.choice(list(colours))),
        background=str(rng.choice(list(backgrounds))),
        size=str(rng.choice(list(sizes))),
        position=str(rng.choice(list(positions))),
        styles=st,
        jitter=tuple(float(x) for x in rng.uniform(-max_jitter, max_jitter, 2)),
    )


def _polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices in unit coordinates ([-1, 1], y down); None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.86
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.05 if k % 2 == 0 else 0.42
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((r * np.cos(a), r * np.sin(a) + 0.08))
        return pts
    if shape == "cross":
        a, b = 0.32, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        x, y = x / 16.5, (y + 2.5) / 15.0
        return list(zip(x.tolist(), y.tolist()))
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def shape_mask(shape: str, size: int, half_extent: float = 0.42, center: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Anti-aliased coverage (float32 in [0, 1], size x size) of one shape; `half_extent`/`center` in image-width units."""
    big = size * SUPERSAMPLE
    im = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(im)
    cx, cy, r = center[0] * big, center[1] * big, half_extent * big
    poly = _polygon(shape)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in poly], fill=255)
    small = im.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _pattern(name: str, size: int) -> np.ndarray:
    """Ink coverage (H, W) in {0, 1} of a surface pattern, scaled with the image (periods are for 32 px)."""
    k = max(1, size // 32)
    yy, xx = np.mgrid[0:size, 0:size] // k
    if name == "striped":
        return ((yy % STRIPE_PERIOD) < STRIPE_PERIOD // 2).astype(np.float32)
    if name == "checkered":
        return (((yy // CHECK_CELL) + (xx // CHECK_CELL)) % 2 == 0).astype(np.float32)
    if name == "dotted":
        c = (DOT_PERIOD - 1) / 2.0
        d2 = ((yy % DOT_PERIOD) - c + 0.5) ** 2 + ((xx % DOT_PERIOD) - c + 0.5) ** 2
        return (d2 <= 2.3 ** 2).astype(np.float32)
    raise ValueError(name)


def estimate_mask(img: np.ndarray, threshold: float = 40.0) -> np.ndarray:
    """Object coverage of an image whose border is background: distance from the border's median colour."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    bg = np.median(border, axis=0)
    d = np.linalg.norm(img.astype(np.float32) - bg, axis=-1)
    return np.clip((d - threshold * 0.5) / threshold, 0.0, 1.0).astype(np.float32)


def _outline(alpha: np.ndarray, width: int) -> np.ndarray:
    """The band of the mask within `width` pixels of its edge."""
    from scipy import ndimage

    inside = alpha > 0.5
    eroded = ndimage.binary_erosion(inside, iterations=width)
    band = inside & ~eroded
    return band.astype(np.float32)


def apply_style(img: np.ndarray, name: str, rng: np.random.Generator | None = None, alpha: np.ndarray | None = None) -> np.ndarray:
    """One style on a uint8 (H, W, 3) image; `alpha` is the object coverage (estimated if None)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; valid: {', '.join(STYLES)}")
    h, w, _ = img.shape
    k = max(1, w // 32)
    x = img.astype(np.float32)
    if name in ("striped", "dotted", "checkered", "outline"):
        a = estimate_mask(img) if alpha is None else alpha.astype(np.float32)
        if name == "outline":
            border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
            bg = np.median(border, axis=0)
            band = _outline(a, 2 * k)
            keep = band * a
            out = bg * (1 - keep[..., None]) + x * keep[..., None]
        else:
            ink = _pattern(name, w)[:h] * a
            out = x * (1 - ink[..., None]) + np.array(PATTERN_INK, np.float32) * ink[..., None]
    elif name == "grayscale":
        lum = x @ np.array([0.299, 0.587, 0.114], np.float32)
        out = np.repeat(lum[..., None], 3, axis=-1)
    elif name == "sepia":
        m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
        out = x @ m.T
    elif name == "inverted":
        out = 255.0 - x
    elif name == "blurred":
        out = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(BLUR_SIGMA * k)), np.float32)
    elif name == "pixelated":
        b = PIXEL_BLOCK * k
        small = Image.fromarray(img).resize((max(1, w // b), max(1, h // b)), Image.Resampling.BOX)
        out = np.asarray(small.resize((w, h), Image.Resampling.NEAREST), np.float32)
    elif name == "framed":
        out = x.copy()
        f = FRAME_WIDTH * k
        out[:f] = FRAME_COLOUR
        out[-f:] = FRAME_COLOUR
        out[:, :f] = FRAME_COLOUR
        out[:, -f:] = FRAME_COLOUR
    elif name == "grainy":
        grain = _grain_field(h, w) if rng is None else rng.normal(0.0, GRAIN_SIGMA, size=(h, w, 1)).astype(np.float32)
        out = x + grain
    elif name == "tiled":
        half = np.asarray(Image.fromarray(img).resize((w // 2, h // 2), Image.Resampling.BOX), np.float32)
        out = np.tile(half, (2, 2, 1))[:h, :w]
        if out.shape[:2] != (h, w):  # odd sizes: pad with the edge
            out = np.pad(out, ((0, h - out.shape[0]), (0, w - out.shape[1]), (0, 0)), mode="edge")
    else:  # pragma: no cover - guarded above
        raise ValueError(name)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _grain_field(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(20261201).normal(0.0, GRAIN_SIGMA, size=(h, w, 1)).astype(np.float32)


def apply_content(scene: Scene, name: str) -> Scene:
    """A content behaviour on a scene (e.g. 'star': every object becomes a star)."""
    if name not in CONTENT_BEHAVIOURS:
        raise ValueError(f"unknown content behaviour {name!r}; valid: {', '.join(CONTENT_BEHAVIOURS)}")
    return dataclasses.replace(scene, **CONTENT_BEHAVIOURS[name])


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw a scene as uint8 (size, size, 3); styles are applied in order, with the true object mask.

    The result depends on the scene only (`rng` is accepted for call compatibility and unused)."""
    dx, dy = POSITIONS[scene.position]
    center = (0.5 + dx + scene.jitter[0], 0.5 + dy + scene.jitter[1])
    alpha = shape_mask(scene.shape, size, SIZES[scene.size], center)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    fg = np.array(COLOURS[scene.colour], np.float32)
    img = np.clip(np.round(bg * (1 - alpha[..., None]) + fg * alpha[..., None]), 0, 255).astype(np.uint8)
    for i, style in enumerate(scene.styles):
        # the true mask is valid until a style moves pixels around
        mask_ok = all(s not in ("tiled", "pixelated", "blurred") for s in scene.styles[:i])
        img = apply_style(img, style, alpha=alpha if mask_ok else None)
    return img


@functools.lru_cache(maxsize=64)
def shape_template(shape: str, size: int = 16) -> np.ndarray:
    """A shape's mask cropped to its bounding box and resized to size x size (for the oracle)."""
    return crop_resize(shape_mask(shape, 64, 0.42) > 0.5, size)


def crop_resize(mask: np.ndarray, size: int = 16) -> np.ndarray:
    """A boolean mask cropped to its bounding box and resized to size x size (float in [0, 1])."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros((size, size), np.float32)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
