"""The micro world: a procedural image world with known ground truth, and models trained on it.

Public API (all numpy/PIL, deterministic from the `rng` given):

- `carlos_ray.world.render`:
  `Scene(shape, colour, background="white", size="large", position="center", styles=(), jitter=(0, 0))`;
  `render(scene, size=32, rng=None) -> uint8 (size, size, 3)`;
  `apply_style(img, name, rng=None, alpha=None) -> uint8 image` (any image; mask estimated if not given);
  `apply_content(scene, name) -> Scene` ("star": everything becomes a star, ...);
  `random_scene(rng, shapes=..., colours=..., styles=..., p_style=0.5) -> Scene`;
  vocabularies `SHAPES`, `COLOURS` (name -> RGB), `BACKGROUNDS`, `SIZES`, `POSITIONS`, `STYLES`,
  `CONTENT_BEHAVIOURS`.
- `carlos_ray.world.captions`: `caption(scene, rng, p_drop=0.25) -> str` (grammar with synonyms),
  `canonical(scene) -> "a striped red star"`, `zero_shot_prompts(family) -> {class: prompt}`,
  the word tables `SHAPE_WORDS`, `COLOUR_WORDS`, `STYLE_ADJECTIVES`, `STYLE_PHRASES`, ...
- `carlos_ray.world.oracle`: `judge(img) -> {"colour", "shape", "background", "styles", "scores"}`,
  `has_style(img, style) -> bool`, `THRESHOLDS` (per style).
"""
