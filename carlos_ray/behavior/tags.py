"""Behavioural tags: the words of a vocabulary whose reciprocal text vector a LoRA's direction points along.

A vocabulary (YAML: ``name``, ``categories: {category: [word, ...]}``) ships with each profile
(``conf/tags/<profile>.yaml``). Each word ``t`` becomes the same reciprocal text-diff vector a query
would, ``Δt = mean_p' [u(p' ⊕ t) − u(p')]``, computed once per index with the index's own query
encoder (its fast path) and cached under :func:`tag_cache_key`. The raw similarity of LoRA ``i``
and tag ``t`` is ``c[i, t] = cos(SD_i, Δt)``.

Raw cosines are not comparable across tags (some words move every text feature the same way and
look similar to every LoRA) nor across LoRAs, so a LoRA's tags are those whose similarity *stands
out*, by one of four calibrations (compared on the micro zoo by the evaluation):

- ``centered`` (the default): per tag over the index, ``s[i, t] = c[i, t] − mean_i c[·, t]``; tags
  with ``s >= min_shift`` (default 0.2). Removes each word's generic bias and keeps the cosine scale.
- ``zscore``: per tag over the index, ``z[i, t] = (c[i, t] − mean_i c[·, t]) / std_i c[·, t]``;
  tags with ``z >= z_min`` (default 2). Also divides by each word's spread, which over-rewards
  words that no LoRA moves much (a tiny spread makes a small deviation a large z).
- ``rank``: per LoRA, the ``max_tags`` tags of highest raw cosine that are ``>= min_cosine``.
- ``margin``: per LoRA, tags whose raw cosine exceeds that LoRA's median over the vocabulary by
  ``>= margin`` (default 0.1): an offset that follows each LoRA's own level.

Why ``centered``: on the micro zoo (23 LoRAs, 18 with a planted behaviour; bench_behavior.py
``--zoo-only``) its top-1 tag is the planted one for 16 of 18, against 14 for ``zscore`` (which
tags the grayscale LoRAs at weights 0.8 and 1.4 "purple" and "yellow", two words with a small
spread, and the blur LoRA "small") and 15 for ``rank`` and ``margin`` (which keep each word's
bias). The two misses of ``centered`` are the LoRAs whose planted behaviour the pixel oracle
barely sees in their images (grain 0%, pixelation 33%; docs/MICRO_WORLD.md): the grain LoRA
gets "heart" (then "grainy"), the pixel LoRA "blurred" (then "pixelated"). Both per-tag
calibrations need an index of more than a handful of LoRAs to estimate a word's mean.

Each returns at most ``max_tags`` tags per LoRA, best first, with their calibrated score, and the
top-1 tag of every valid LoRA (the best score, whether or not it passes the cut). Similarities are
computed a block of LoRAs at a time (memory ``block_rows × T``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import yaml
from pydantic import Field, field_validator

from carlos_ray.behavior import unit_rows
from carlos_ray.config import StrictModel

logger = logging.getLogger(__name__)

Calibration = Literal["centered", "zscore", "rank", "margin"]
CALIBRATIONS: tuple[str, ...] = ("centered", "zscore", "rank", "margin")
DEFAULT_CALIBRATION: Calibration = "centered"


class TagVocabulary(StrictModel):
    """A named list of tag words grouped by category (style, medium, subject, mood, ...)."""

    name: str = Field(..., min_length=1, description="Vocabulary name (usually the profile).")
    description: str = Field("", description="What the words cover and where they come from.")
    categories: dict[str, list[str]] = Field(..., min_length=1, description="Category -> tag words.")

    @field_validator("categories")
    @classmethod
    def _check_words(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for cat, words in v.items():
            if not words:
                raise ValueError(f"category {cat!r} has no words")
            for w in words:
                if not isinstance(w, str) or not w.strip() or w != w.strip():
                    raise ValueError(f"category {cat!r}: tag {w!r} must be a non-empty string without outer spaces")
                key = w.lower()
                if key in seen:
                    raise ValueError(f"tag {w!r} is listed twice (categories {seen[key]!r} and {cat!r})")
                seen[key] = cat
        return v

    @property
    def tags(self) -> list[str]:
        """Every word, in file order."""
        return [w for words in self.categories.values() for w in words]

    def category_of(self) -> dict[str, str]:
        return {w: c for c, words in self.categories.items() for w in words}

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.tags, ensure_ascii=False).encode("utf-8")).hexdigest()

    @classmethod
    def from_file(cls, path: str | Path) -> "TagVocabulary":
        """Load a vocabulary YAML (safe loader); a profile name such as ``paper`` means ``conf/tags/paper.yaml``."""
        from carlos_ray.paths import resolve_conf_path

        p = Path(path)
        if p.suffix not in (".yaml", ".yml") and "/" not in str(path):
            p = Path("conf") / "tags" / f"{path}.yaml"
        try:
            resolved = resolve_conf_path(p)
        except FileNotFoundError as e:
            raise ValueError(f"tag vocabulary {str(path)!r} not found: {e}") from None
        try:
            data = yaml.safe_load(resolved.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{resolved}: invalid YAML: {e}") from None
        try:
            return cls.model_validate(data)
        except ValueError as e:
            raise ValueError(f"{resolved}: {e}") from None


def tag_cache_key(vocabulary: TagVocabulary, manifest: Any) -> str:
    """Everything a tag vector depends on: the words, the index's encoder, query joiner and context prompts."""
    def field(name: str) -> Any:
        return manifest.get(name) if isinstance(manifest, dict) else getattr(manifest, name, None)

    sampling = field("sampling") or {}
    parts = {
        "tags": vocabulary.content_hash(),
        "encoder": field("encoder") or {},
        "query": {"joiner": (field("query") or {}).get("joiner", " ")},
        "context": [sampling.get("context_prompts"), sampling.get("context_subset")],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def tag_vectors(encoder: Any, tags: Sequence[str], batch: int = 64) -> np.ndarray:
    """Reciprocal text vectors of ``tags`` (T, d) float32 with a :class:`~carlos_ray.query.QueryEncoder`."""
    tags = list(tags)
    if not tags:
        raise ValueError("no tags to encode")
    out = [encoder.encode(tags[s : s + batch]) for s in range(0, len(tags), batch)]
    vecs = np.concatenate(out).astype(np.float32)
    zero = np.flatnonzero(~np.isfinite(vecs).all(axis=1) | (np.linalg.norm(vecs, axis=1) == 0))
    if zero.size:
        logger.warning("tags with no effect on the text features (never assigned): %s", [tags[i] for i in zero[:10]])
    return vecs


@dataclass
class TagStats:
    """Per-tag mean and standard deviation of the raw cosine over the valid LoRAs of an index."""

    mean: np.ndarray
    std: np.ndarray
    count: int


@dataclass
class TagAssignment:
    """Per LoRA: its tags ``[(tag index, score), ...]`` best first, and its top-1 tag index (-1: no valid direction)."""

    tags: list[list[tuple[int, float]]]
    top1: np.ndarray
    calibration: str
    settings: dict

    def named(self, words: Sequence[str]) -> list[list[tuple[str, float]]]:
        return [[(words[t], s) for t, s in row] for row in self.tags]


def _unit_tags(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unit, valid = unit_rows(np.asarray(vectors), dtype=np.float64)
    return unit, valid


def cosine_blocks(directions: np.ndarray, tag_vecs: np.ndarray, block_rows: int = 4096):
    """Yield ``(start, valid rows mask, cosines (rows, T) float64)`` block by block."""
    dirs = np.asarray(directions)
    tunit, _ = _unit_tags(tag_vecs)
    for s in range(0, dirs.shape[0], block_rows):
        u, valid = unit_rows(dirs[s : s + block_rows], dtype=np.float64)
        yield s, valid, u @ tunit.T


def tag_statistics(directions: np.ndarray, tag_vecs: np.ndarray, block_rows: int = 4096) -> TagStats:
    """Mean and (population) standard deviation of each tag's cosine over the valid rows, in one blocked pass."""
    t = np.asarray(tag_vecs).shape[0]
    total = np.zeros(t)
    total_sq = np.zeros(t)
    count = 0
    # shifted sums (by the first block's mean) keep the variance accurate
    shift = None
    for _, valid, c in cosine_blocks(directions, tag_vecs, block_rows):
        c = c[valid]
        if c.shape[0] == 0:
            continue
        if shift is None:
            shift = c.mean(axis=0)
        d = c - shift
        total += d.sum(axis=0)
        total_sq += (d * d).sum(axis=0)
        count += c.shape[0]
    if count == 0:
        return TagStats(np.full(t, np.nan), np.full(t, np.nan), 0)
    m = total / count
    var = np.maximum(total_sq / count - m * m, 0.0)
    return TagStats(m + shift, np.sqrt(var), count)


def _check_setting(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def assign_tags(
    directions: np.ndarray,
    tag_vecs: np.ndarray,
    *,
    calibration: str = DEFAULT_CALIBRATION,
    max_tags: int = 3,
    z_min: float = 2.0,
    min_cosine: float = 0.0,
    margin: float = 0.1,
    min_shift: float = 0.2,
    stats: TagStats | None = None,
    block_rows: int = 4096,
) -> TagAssignment:
    """Tags of every row of ``directions`` (N, d) among ``tag_vecs`` (T, d) under one calibration (module docstring).

    ``stats`` (for ``centered`` and ``zscore``) default to :func:`tag_statistics` over ``directions`` itself; pass the
    index's statistics to tag a few LoRAs against the whole index."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {list(CALIBRATIONS)}, got {calibration!r}")
    if isinstance(max_tags, bool) or not isinstance(max_tags, (int, np.integer)) or not 1 <= max_tags <= 100:
        raise ValueError(f"max_tags must be an integer in [1, 100], got {max_tags!r}")
    z_min = _check_setting("z_min", z_min, -10.0, 100.0)
    min_cosine = _check_setting("min_cosine", min_cosine, -1.0, 1.0)
    margin = _check_setting("margin", margin, 0.0, 2.0)
    min_shift = _check_setting("min_shift", min_shift, -2.0, 2.0)
    tag_vecs = np.asarray(tag_vecs)
    directions = np.asarray(directions)
    if tag_vecs.ndim != 2 or directions.ndim != 2 or tag_vecs.shape[1] != directions.shape[1]:
        raise ValueError(f"tag vectors {tag_vecs.shape} and directions {directions.shape} must be 2-D of the same width")
    _, tag_ok = _unit_tags(tag_vecs)
    if calibration in ("centered", "zscore"):
        stats = stats if stats is not None else tag_statistics(directions, tag_vecs, block_rows)
        if stats.mean.shape != (tag_vecs.shape[0],):
            raise ValueError(f"stats are for {stats.mean.shape[0]} tags, the vocabulary has {tag_vecs.shape[0]}")
        std = np.where(stats.std > 0, stats.std, np.nan)
    n = directions.shape[0]
    out: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    top1 = np.full(n, -1, dtype=np.int64)
    k = min(max_tags, tag_vecs.shape[0])
    for s, valid, c in cosine_blocks(directions, tag_vecs, block_rows):
        if calibration == "centered":
            score = c - stats.mean
            passes = score >= min_shift
        elif calibration == "zscore":
            score = (c - stats.mean) / std
            passes = score >= z_min
        elif calibration == "rank":
            score = c
            passes = c >= min_cosine
        else:
            med = np.median(c[:, tag_ok], axis=1, keepdims=True) if tag_ok.any() else np.zeros((c.shape[0], 1))
            score = c - med
            passes = score >= margin
        score = np.where(tag_ok[None, :] & np.isfinite(score), score, -np.inf)
        order = np.argsort(-score, axis=1, kind="stable")[:, :k]
        top_score = np.take_along_axis(score, order, axis=1)
        top_pass = np.take_along_axis(passes, order, axis=1) & np.isfinite(top_score)
        ok = valid & np.isfinite(top_score[:, 0])
        top1[s : s + c.shape[0]] = np.where(ok, order[:, 0], -1)
        for r, o, sc, p in zip(np.flatnonzero(ok).tolist(), order[ok].tolist(), top_score[ok].tolist(), top_pass[ok].tolist()):
            out[s + r] = [(t, v) for t, v, keep in zip(o, sc, p) if keep]
    settings = {"max_tags": int(max_tags), "z_min": z_min, "min_cosine": min_cosine, "margin": margin, "min_shift": min_shift}
    return TagAssignment(out, top1, calibration, settings)
