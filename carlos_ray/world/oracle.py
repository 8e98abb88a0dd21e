"""The pixel oracle: plain functions that read a micro-world image's attributes from its pixels.

Independent of every learned model, it is the ground-truth judge of the micro CLIP, the micro SDXL
and the LoRA zoo. `judge(img)` returns the object's colour, shape and background, a score per style
(higher = more of it) and the set of styles whose score passes its threshold. Images of any size are
resized to 32 x 32 first (the world's native size).

How each attribute is read:
- background: median of a ring just inside where a frame would be; `inverted` = a dark background
  (every background of the world is light), and an inverted image is un-inverted before the rest.
- object mask: pixels far from the background after a 3x3 median (which removes grain), without
  the frame ring when framed; shape = the largest blob (holes filled), cropped, resized to 16 x 16,
  nearest template by IoU; colour = majority nearest palette colour of its saturated pixels
  (None for grayscale/sepia images, where the colour is gone).
- patterns (striped/dotted/checkered): energy of the ink (darkness) map inside the object at the
  pattern's frequencies; grayscale/sepia from chroma; outline from the blob's fill ratio; blurred
  from the steepest edge relative to the contrast; pixelated from how much of the gradient energy
  lies on a 4-px grid; grainy from the median-filter residual; tiled from the 16-px self-similarity;
  framed from the outer ring's colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from carlos_ray.world import render as R

SIZE = 32
# a style is present when its score passes the threshold (calibrated on clean vs styled renders).
THRESHOLDS: dict[str, float] = {
    "striped": 0.22,
    "dotted": 0.16,
    "checkered": 0.2,
    "grayscale": 0.45,
    "sepia": 0.8,
    "inverted": 0.5,
    "outline": 0.3,
    "blurred": 0.9,
    "pixelated": 0.6,
    "framed": 0.7,
    "grainy": 0.5,
    "tiled": 0.5,
}
_LUM = np.array([0.299, 0.587, 0.114], np.float32)
_SEPIA_DIR = np.array([1.0, 0.89, 0.69], np.float32) - np.mean([1.0, 0.89, 0.69])
_SEPIA_DIR /= np.linalg.norm(_SEPIA_DIR)


def _to32(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    if img.shape[:2] != (SIZE, SIZE):
        img = np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.Resampling.BOX))
    return img.astype(np.float32)


def _ring(x: np.ndarray, depth: int, width: int = 1) -> np.ndarray:
    h, w = x.shape[:2]
    m = np.zeros((h, w), bool)
    m[depth : h - depth, depth : w - depth] = True
    m[depth + width : h - depth - width, depth + width : w - depth - width] = False
    return x[m]


def _median3(x: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.median_filter(x, size=(3, 3, 1), mode="nearest")


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = np.linalg.norm(np.array([palette[n] for n in names], np.float32) - colour, axis=-1)
    return names[int(np.argmin(d))]


def _background(ring: np.ndarray) -> np.ndarray:
    """The most common colour of a ring of pixels (median of its most populated 32-level bin)."""
    q = (ring // 32).astype(np.int64)
    key = q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2]
    top = np.bincount(key).argmax()
    return np.median(ring[key == top], axis=0)


def _band_energy(power: np.ndarray, freqs: list[tuple[int, int]]) -> float:
    n = power.shape[0]
    total = 0.0
    seen = set()
    for fy, fx in freqs:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                key = ((fy + dy) % n, (fx + dx) % n)
                if key not in seen:
                    seen.add(key)
                    total += float(power[key])
    return total


def _pattern_scores(x: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """Fraction of the ink map's (non-DC) energy at the stripe, dot and checker frequencies."""
    n = x.shape[0]
    ink = np.clip((0.6 - x.max(axis=-1) / 255.0) / 0.3, 0.0, 1.0)
    sig = np.where(region, ink - ink[region].mean() if region.any() else 0.0, 0.0)
    power = np.abs(np.fft.fft2(sig)) ** 2
    power[0, 0] = 0.0
    total = float(power.sum()) + 1e-6
    fs = n // R.STRIPE_PERIOD
    fd = n // R.DOT_PERIOD
    fc = n // (2 * R.CHECK_CELL)
    striped = _band_energy(power, [(fs, 0), (-fs, 0)]) / total
    axial = min(_band_energy(power, [(fd, 0), (-fd, 0)]), _band_energy(power, [(0, fd), (0, -fd)])) / total
    diag = _band_energy(power, [(fc, fc), (-fc, -fc), (fc, -fc), (-fc, fc)]) / total
    return {"striped": striped, "dotted": 2 * axial, "checkered": max(0.0, diag - 2 * axial)}


def judge(img: np.ndarray) -> dict:
    """Attributes of one image: colour, shape, background (names or None), style scores and the styles present."""
    from scipy import ndimage

    raw = _to32(img)
    n = SIZE
    f = R.FRAME_WIDTH
    scores: dict[str, float] = {}

    # grain: robust spread of the median-filter residual (computed first: grainy images get smoothed);
    # over the whole image, and over the background alone (patterns live on the object, grain everywhere)
    resid = (raw - _median3(raw)) @ _LUM
    mad = float(np.median(np.abs(resid))) * 1.4826
    scores["grainy"] = float(np.clip((mad - 6.0) / 12.0, 0.0, 1.0))
    grainy = scores["grainy"] >= THRESHOLDS["grainy"]
    smooth = _median3(_median3(raw)) if grainy else raw.copy()
    # frame: the outer ring has the frame colour and differs from what is just inside it
    outer = np.concatenate([_ring(raw, 0), _ring(raw, 1)])
    inner = np.median(_ring(smooth, f + 1, 1), axis=0)
    near = float(np.mean(np.linalg.norm(outer - np.array(R.FRAME_COLOUR, np.float32), axis=-1) < 70))
    differs = float(np.linalg.norm(np.median(outer, axis=0) - inner)) > 40
    scores["framed"] = near if differs else 0.0
    framed = scores["framed"] >= THRESHOLDS["framed"]

    bg = _background(_ring(smooth, f, 2) if framed else _ring(smooth, 0, 2))
    bg_lum = float(bg @ _LUM) / 255.0
    scores["inverted"] = float(np.clip((0.7 - bg_lum) / 0.4, 0.0, 1.0))
    inverted = scores["inverted"] >= THRESHOLDS["inverted"]
    x = 255.0 - raw if inverted else raw
    smooth = 255.0 - smooth if inverted else smooth
    bg = 255.0 - bg if inverted else bg

    # colour statistics
    chroma = x.max(axis=-1) - x.min(axis=-1)
    scores["grayscale"] = float(np.clip(1.0 - np.percentile(chroma, 95) / 70.0, 0.0, 1.0))
    grayscale = scores["grayscale"] >= THRESHOLDS["grayscale"]
    v = x - x.mean(axis=-1, keepdims=True)
    vn = np.linalg.norm(v, axis=-1)
    cos = (v @ _SEPIA_DIR) / (vn + 1e-6)
    sepia_like = ((cos > 0.85) | (vn < 10)) & (chroma < 125)
    toned = float(np.mean(chroma)) > 10 and float(np.mean(chroma > 110)) < 0.02
    scores["sepia"] = float(np.mean(sepia_like)) if toned else 0.0
    sepia = scores["sepia"] >= THRESHOLDS["sepia"] and not grayscale

    # object mask
    dist = np.linalg.norm(smooth - bg, axis=-1)
    floor = 40.0 if grainy else 20.0
    far = dist[dist > floor]
    thr = float(np.clip(0.45 * np.median(far), floor, 110)) if len(far) else floor
    mask = dist > thr
    if framed:
        mask[: f + 1] = mask[-f - 1 :] = False
        mask[:, : f + 1] = mask[:, -f - 1 :] = False
    closed = ndimage.binary_closing(mask, iterations=1) | mask
    labels, count = ndimage.label(closed)
    if count:
        sizes = ndimage.sum(closed, labels, index=np.arange(1, count + 1))
        blob = labels == (1 + int(np.argmax(sizes)))
    else:
        blob = np.zeros_like(mask)
    filled = ndimage.binary_fill_holes(blob)
    interior = ndimage.binary_erosion(filled, iterations=2)
    hollow = float((interior & (dist < thr)).sum()) / max(1.0, float(interior.sum()))
    scores["outline"] = hollow if interior.sum() >= 6 else 0.0

    shape = None
    if filled.sum() >= 12:
        crop = R.crop_resize(filled, 16)
        ious = {}
        for s in R.SHAPES:
            t = R.shape_template(s)
            inter = np.minimum(crop, t).sum()
            ious[s] = float(inter / (np.maximum(crop, t).sum() + 1e-6))
        shape = max(ious, key=ious.get)

    colour = None
    if not grayscale and not sepia:
        sat = mask & (chroma > 60)
        if sat.sum() >= 4:
            names = list(R.COLOURS)
            pal = np.array([R.COLOURS[c] for c in names], np.float32)
            d = np.linalg.norm(x[sat][:, None, :] - pal[None], axis=-1)
            votes = np.bincount(np.argmin(d, axis=1), minlength=len(names))
            colour = names[int(np.argmax(votes))]
    background = _nearest(bg, R.BACKGROUNDS) if not grayscale and not sepia else None

    # surface patterns inside the object (dilated a little so edge stripes count)
    region = filled if filled.any() else np.ones((n, n), bool)
    scores.update(_pattern_scores(x, region))

    # blur: steepest neighbour step relative to the object/background contrast
    contrast = float(np.percentile(dist, 97))
    step = np.maximum(
        np.pad(np.linalg.norm(np.diff(smooth, axis=1), axis=-1), ((0, 0), (0, 1))),
        np.pad(np.linalg.norm(np.diff(smooth, axis=0), axis=-1), ((0, 1), (0, 0))),
    )
    sharp = float(np.percentile(step, 99)) / (contrast + 1e-6) if contrast > 30 else 1.0
    scores["blurred"] = float(np.clip((0.75 - sharp) / 0.4, 0.0, 1.0)) if not grainy else 0.0

    # pixelation: share of gradient energy on the best-phase 4-px grid
    lum = raw @ _LUM
    gx = np.diff(lum, axis=1) ** 2
    gy = np.diff(lum, axis=0) ** 2
    b = R.PIXEL_BLOCK
    best = 0.0
    tot = gx.sum() + gy.sum() + 1e-6
    for p in range(b):
        on_x = gx[:, [i for i in range(n - 1) if (i + 1 - p) % b == 0]].sum()
        for q in range(b):
            on_y = gy[[i for i in range(n - 1) if (i + 1 - q) % b == 0], :].sum()
            best = max(best, float((on_x + on_y) / tot))
    scores["pixelated"] = float(np.clip((best - 0.45) / 0.5, 0.0, 1.0)) if tot > 2000 else 0.0

    # tiling: the image equals itself shifted by half its size
    h = n // 2
    dev = np.abs(x - np.median(x.reshape(-1, 3), axis=0)).mean() + 1e-6
    shift = 0.5 * (np.abs(x - np.roll(x, h, axis=0)).mean() + np.abs(x - np.roll(x, h, axis=1)).mean())
    scores["tiled"] = float(np.clip(1.0 - shift / (1.2 * dev), 0.0, 1.0)) if dev > 5 else 0.0

    if not grainy and filled.any():  # faint grain (a decoder's) shows on the flat background
        from scipy import ndimage as _nd

        flat = ~_nd.binary_dilation(filled, iterations=2)
        flat[: f + 1] = flat[-f - 1 :] = False
        flat[:, : f + 1] = flat[:, -f - 1 :] = False
        if flat.sum() >= 40:
            bg_mad = float(np.median(np.abs(resid[flat]))) * 1.4826
            scores["grainy"] = max(scores["grainy"], float(np.clip((bg_mad - 1.5) / 4.0, 0.0, 1.0)))
    if scores["checkered"] >= THRESHOLDS["checkered"]:  # a checkerboard is 4-px aligned by construction
        scores["pixelated"] = 0.0
    styles = sorted(s for s in R.STYLES if scores[s] >= THRESHOLDS[s] and not (s == "sepia" and not sepia))
    return {"colour": colour, "shape": shape, "background": background, "styles": styles, "scores": scores}


def has_style(img: np.ndarray, style: str) -> bool:
    """Whether the oracle sees `style` in the image."""
    if style not in R.STYLES:
        raise ValueError(f"unknown style {style!r}; valid: {', '.join(R.STYLES)}")
    return style in judge(img)["styles"]
