"""Adaptive sampling: which (prompt, seed) samples a LoRA gets in each round, and when it stops.

Rounds are *stratified prompt subsets*, one seed each: the protocol's P x S samples are put in one fixed
order — seed-major (every prompt gets seed 0 before any prompt gets seed 1), and within a sweep the
prompts interleaved across categories (one per category in turn, shuffled inside each category with a
fixed seed) — and round r takes the next ``round_size`` samples of that order. Why this and not "one
more seed for every prompt":

- granularity: a round is a fraction of |P| (paper: 70 of 280 prompts), so a settled LoRA can stop
  after 70 or 140 samples instead of after 280 at the least — a tenth of 4,480 is 448 samples,
  about 1.6 seeds per prompt;
- validity: until the first sweep ends, the samples are a stratified sample of prompts (one seed
  each), exactly the exchangeable draws the standard errors of :mod:`carlos_ray.uncertainty` assume;
  once every prompt is in, the prompts are the full protocol's own and only seeds vary, so the same
  errors are conservative against the full protocol's value;
- every prefix is balanced across categories, and every LoRA sees the same prefix, so LoRAs that
  stop at the same round are measured on the same prompts.

The order depends only on the prompt categories, the number of seeds and the config's ``order_seed``;
round r of a LoRA is the same samples in every run, so a resumed job redoes a killed round exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from carlos_ray.uncertainty import SignatureErrors


def sample_order(categories: Sequence[str], n_seeds: int, seed: int = 0) -> np.ndarray:
    """All (prompt_idx, seed_idx) pairs, shape (P * n_seeds, 2), in the adaptive order (see module doc)."""
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
    if not len(categories):
        raise ValueError("sample_order needs at least one prompt")
    rng = np.random.default_rng(seed)
    names = list(dict.fromkeys(categories))
    queues = [list(rng.permutation([i for i, c in enumerate(categories) if c == name])) for name in names]
    sweep: list[int] = []
    depth = 0
    while len(sweep) < len(categories):
        sweep.extend(int(q[depth]) for q in queues if depth < len(q))
        depth += 1
    prompts = np.array(sweep, dtype=np.int64)
    seeds = np.repeat(np.arange(n_seeds, dtype=np.int64), len(prompts))
    return np.stack([np.tile(prompts, n_seeds), seeds], axis=1)


def round_size(n_prompts: int, n_categories: int, fraction: float) -> int:
    """Samples per round: ``fraction`` of the prompts, rounded up to a whole number per category, at most |P|."""
    if not 0 < fraction <= 1:
        raise ValueError(f"round fraction must be in (0, 1], got {fraction}")
    per_category = math.ceil(fraction * n_prompts / n_categories)
    return min(n_prompts, per_category * n_categories)


@dataclass(frozen=True)
class RoundPlan:
    """The round schedule of one configuration: round r is ``order[r * size : (r + 1) * size]``."""

    order: np.ndarray  # (P * S, 2) prompt_idx, seed_idx
    size: int

    @classmethod
    def build(cls, categories: Sequence[str], n_seeds: int, fraction: float, seed: int) -> "RoundPlan":
        return cls(order=sample_order(categories, n_seeds, seed),
                   size=round_size(len(categories), len(set(categories)), fraction))

    @property
    def total(self) -> int:
        return len(self.order)

    @property
    def n_rounds(self) -> int:
        return math.ceil(self.total / self.size)

    def samples(self, r: int) -> np.ndarray:
        """(prompt_idx, seed_idx) rows of round r (0-based)."""
        if not 0 <= r < self.n_rounds:
            raise ValueError(f"round {r} out of range: this schedule has rounds 0..{self.n_rounds - 1}")
        return self.order[r * self.size : (r + 1) * self.size]

    def used(self, rounds_done: int) -> int:
        """Samples taken after ``rounds_done`` rounds."""
        return min(self.total, rounds_done * self.size)


@dataclass(frozen=True)
class StoppingRule:
    """A LoRA stops when every standard error is under its bound (and at least ``min_rounds`` rounds ran)."""

    max_direction_rse: float
    max_strength_rse: float
    max_consistency_se: float
    min_rounds: int = 1

    def settled(self, errs: SignatureErrors, rounds_done: int) -> bool:
        """True when the signature is precise enough to stop; a NaN error (too few samples) is never settled."""
        if rounds_done < self.min_rounds:
            return False
        checks = ((errs.direction_rse, self.max_direction_rse), (errs.strength_rse, self.max_strength_rse),
                  (errs.consistency_se, self.max_consistency_se))
        return all(not math.isnan(v) and v <= bound for v, bound in checks)
