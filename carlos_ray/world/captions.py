"""Captions from a small grammar with synonyms ("striped", "with stripes", "stripe pattern").

`caption(scene, rng)` draws a sentence that names the scene's attributes with random synonyms and
word order, randomly leaving some attributes out (`p_drop`), so a model trained on these captions
also understands short prompts ("a star", "something striped"). `canonical(scene)` is the one
deterministic caption used for evaluation prompts.
"""

from __future__ import annotations

import numpy as np

from carlos_ray.world.render import Scene

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "pyramid"),
    "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign"),
    "heart": ("heart", "love heart"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson"),
    "orange": ("orange",),
    "yellow": ("yellow", "golden"),
    "green": ("green", "leaf green"),
    "cyan": ("cyan", "turquoise"),
    "blue": ("blue", "navy"),
    "purple": ("purple", "violet"),
    "pink": ("pink", "rose"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "white": ("white", "plain white"),
    "beige": ("beige", "cream"),
    "sky": ("light blue", "sky blue"),
    "mint": ("mint", "light green"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "center": ("in the middle", "in the centre"),
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}
# each style: adjectives (before the noun) and phrases (after it).
STYLE_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "polka-dot"),
    "checkered": ("checkered", "chequered"),
    "grayscale": ("grayscale", "black and white"),
    "sepia": ("sepia", "sepia-toned"),
    "inverted": ("inverted", "negative"),
    "outline": ("outlined", "hollow"),
    "blurred": ("blurred", "blurry"),
    "pixelated": ("pixelated", "blocky"),
    "framed": ("framed",),
    "grainy": ("grainy", "noisy"),
    "tiled": ("tiled", "repeated"),
}
STYLE_PHRASES: dict[str, tuple[str, ...]] = {
    "striped": ("with stripes", "stripe pattern"),
    "dotted": ("with polka dots", "dot pattern"),
    "checkered": ("with a checkerboard pattern", "checker pattern"),
    "grayscale": ("in grayscale", "in black and white"),
    "sepia": ("in sepia", "sepia tone"),
    "inverted": ("with inverted colours", "colour negative"),
    "outline": ("outline only", "drawn as an outline"),
    "blurred": ("out of focus", "with blur"),
    "pixelated": ("in pixel art", "pixelated look"),
    "framed": ("with a frame", "in a dark border"),
    "grainy": ("with film grain", "with noise"),
    "tiled": ("in a 2x2 grid", "tiled four times"),
}
GENERIC_NOUNS = ("shape", "object")
OPENERS = ("a", "an image of a", "a picture of a", "a drawing of a", "a render of a")


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def caption(
    scene: Scene,
    rng: np.random.Generator,
    p_drop: float = 0.25,
    keep: tuple[str, ...] = (),
    name_style: bool = True,
) -> str:
    """A random caption of `scene`; each attribute outside `keep` is left out with probability `p_drop`.

    The style is named when present (it is what a LoRA is queried by) unless `name_style` is false,
    as real captions often leave it out; a dropped shape is named "shape" or "object", and an
    unstyled scene is sometimes called "plain".
    """
    def has(attr: str) -> bool:
        return attr in keep or rng.random() >= p_drop

    noun = _pick(rng, SHAPE_WORDS[scene.shape]) if has("shape") or rng.random() < 0.6 else _pick(rng, GENERIC_NOUNS)
    adj = ["plain"] if not scene.styles and rng.random() < 0.15 else []
    named_styles = scene.styles if name_style else ()
    if scene.size != "large" and has("size") or (scene.size == "large" and rng.random() < 0.3 and has("size")):
        adj.append(_pick(rng, SIZE_WORDS[scene.size]))
    styles_before, styles_after = [], []
    for s in named_styles:
        (styles_before if rng.random() < 0.5 else styles_after).append(s)
    adj += [_pick(rng, STYLE_ADJECTIVES[s]) for s in styles_before]
    if has("colour"):
        adj.append(_pick(rng, COLOUR_WORDS[scene.colour]))
    head = " ".join(adj + [noun])
    opener = _pick(rng, OPENERS)
    text = (_article(head) if opener == "a" else opener[:-1] + _article(head)).strip()
    tail = []
    if has("background"):
        tail.append("on a " + _pick(rng, BACKGROUND_WORDS[scene.background]) + " background")
    if scene.position != "center" and has("position") or (scene.position == "center" and rng.random() < 0.15):
        tail.append(_pick(rng, POSITION_WORDS[scene.position]))
    tail += [_pick(rng, STYLE_PHRASES[s]) for s in styles_after]
    order = rng.permutation(len(tail))
    parts = [text] + [tail[i] for i in order]
    return ", ".join(parts) if rng.random() < 0.5 else " ".join(parts)


def canonical(scene: Scene, with_background: bool = False) -> str:
    """The deterministic caption of a scene: 'a striped red star' (optionally '... on a beige background')."""
    words = [STYLE_ADJECTIVES[s][0] for s in scene.styles] + [COLOUR_WORDS[scene.colour][0], SHAPE_WORDS[scene.shape][0]]
    text = _article(" ".join(words))
    if with_background:
        text += " on a " + BACKGROUND_WORDS[scene.background][0] + " background"
    return text


def zero_shot_prompts(family: str) -> dict[str, str]:
    """One prompt per class of an attribute family, for zero-shot classification with a CLIP."""
    if family == "colour":
        return {c: f"a {w[0]} shape" for c, w in COLOUR_WORDS.items()}
    if family == "shape":
        return {s: _article(w[0]) for s, w in SHAPE_WORDS.items()}
    if family == "background":
        return {b: f"a shape on a {w[0]} background" for b, w in BACKGROUND_WORDS.items()}
    if family == "style":
        return {s: f"a {w[0]} shape" for s, w in STYLE_ADJECTIVES.items()} | {"none": "a plain shape"}
    raise ValueError(f"unknown attribute family {family!r}; valid: colour, shape, background, style")
