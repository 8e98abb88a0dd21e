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
  once every prompt is in, the prompts are the full protocol's own and only seeds vary: the same
  errors are then conservative against the full protocol's value, and with per-prompt seeds
  (``sampling.seed_layout``) the seed errors of :mod:`carlos_ray.uncertainty` replace them;
- every prefix is balanced across categories, and every LoRA sees the same prefix, so LoRAs that
  stop at the same round are measured on the same prompts.

The order depends only on the prompt categories, the number of seeds and the config's ``order_seed``;
round r of a LoRA is the same samples in every run, so a resumed job redoes a killed round exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from carlos_ray.signatures import PartialStats
from carlos_ray.uncertainty import SignatureErrors

if TYPE_CHECKING:
    import pyarrow as pa


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
    """A LoRA stops when every standard error is under its bound, after at least ``min_rounds`` rounds and
    ``min_samples`` samples (NaN-free, finite samples: ``errs.n``)."""

    max_direction_rse: float
    max_strength_rse: float
    max_consistency_se: float
    min_rounds: int = 1
    min_samples: int = 2

    def settled(self, errs: SignatureErrors, rounds_done: int) -> bool:
        """True when the signature is precise enough to stop; a NaN error (too few samples) is never settled."""
        if rounds_done < self.min_rounds or errs.n < self.min_samples:
            return False
        checks = ((errs.direction_rse, self.max_direction_rse), (errs.strength_rse, self.max_strength_rse),
                  (errs.consistency_se, self.max_consistency_se))
        return all(not math.isnan(v) and v <= bound for v, bound in checks)


# ---- state carried between rounds ---------------------------------------------------------------------
@dataclass(frozen=True)
class Carry:
    """What a LoRA has after ``rounds_done`` finished rounds: its merged statistics and its non-finite count."""

    rounds_done: int
    partial: PartialStats | None
    n_nonfinite: int = 0


def partials_table(rows: list[dict], config_hash: str) -> "pa.Table":
    """Rows ``{lora_id, rounds_done, n_nonfinite, **PartialStats.to_row()}`` as the index's `partials` table."""
    import pyarrow as pa

    return pa.Table.from_pylist([{**r, "config_hash": config_hash} for r in rows], schema=PARTIALS_SCHEMA)


def _partials_schema():
    import pyarrow as pa

    return pa.schema([
        ("lora_id", pa.string()), ("config_hash", pa.string()), ("rounds_done", pa.int32()),
        ("n_nonfinite", pa.int64()), ("d", pa.int64()), ("n_prompts", pa.int64()), ("count", pa.int64()),
        ("sum_norm", pa.float64()), ("norm_m2", pa.float64()), ("sum_diff", pa.list_(pa.float64())),
        ("prompt_unit_sum", pa.list_(pa.float64())), ("prompt_norm_sum", pa.list_(pa.float64())),
        ("prompt_count", pa.list_(pa.int64())), ("prompt_nonzero", pa.list_(pa.int64())),
        ("odd_unit_sum", pa.list_(pa.float64())), ("odd_norm_sum", pa.list_(pa.float64())),
        ("odd_count", pa.list_(pa.int64())),
    ])


PARTIALS_SCHEMA = _partials_schema()


class AdaptiveRounds:
    """The round schedule, the stopping rule and every running LoRA's carried statistics.

    Built from the index snapshot, so a resumed job continues each LoRA after its last committed round
    (the commit that stores a round's merged statistics is the same atomic manifest swap as any other)."""

    def __init__(self, plan: RoundPlan, rule: StoppingRule, config_hash: str, partials: "pa.Table | None" = None):
        self.plan = plan
        self.rule = rule
        self.config_hash = config_hash
        self.carry: dict[str, Carry] = {}
        self.running: set[str] = set()  # LoRAs whose last committed round did not settle them
        if partials is not None and partials.num_rows:
            for row in partials.to_pylist():
                if row.get("config_hash") != config_hash or row.get("odd_count") is None:
                    continue  # another configuration's, or written before the seed halves were kept: that LoRA restarts
                have = self.carry.get(row["lora_id"])
                if have is None or row["rounds_done"] > have.rounds_done:
                    self.carry[row["lora_id"]] = Carry(int(row["rounds_done"]), PartialStats.from_row(row),
                                                       int(row["n_nonfinite"]))

    def get(self, lora_id: str) -> Carry:
        return self.carry.get(lora_id, Carry(0, None, 0))

    def next_samples(self, lora_id: str) -> np.ndarray:
        """(prompt_idx, seed_idx) of the LoRA's next round."""
        return self.plan.samples(self.get(lora_id).rounds_done)

    def advance(self, lora_id: str, partial: PartialStats, n_nonfinite: int) -> Carry:
        """The carry after one more round (not yet recorded: see :meth:`record`)."""
        c = self.get(lora_id)
        merged = partial if c.partial is None else c.partial.merge(partial)
        return Carry(c.rounds_done + 1, merged, c.n_nonfinite + n_nonfinite)

    def record(self, lora_id: str, carry: Carry | None) -> None:
        """Remember a LoRA's carry once the commit holding it is in the index (None: it stopped or was rejected)."""
        if carry is None:
            self.carry.pop(lora_id, None)
            self.running.discard(lora_id)
        else:
            self.carry[lora_id] = carry
            self.running.add(lora_id)

    def is_last(self, carry: Carry) -> bool:
        return carry.rounds_done >= self.plan.n_rounds

    def row(self, lora_id: str, carry: Carry) -> dict:
        return {"lora_id": lora_id, "rounds_done": carry.rounds_done, "n_nonfinite": carry.n_nonfinite,
                **carry.partial.to_row()}


def live_partials(partials: "pa.Table", indexed_ids: set[str]) -> "pa.Table":
    """The rows of a `partials` table a resumed job can still use: the latest round of each LoRA not yet indexed
    (compaction keeps only these)."""
    import pyarrow as pa

    ids = partials.column("lora_id").to_pylist()
    rounds = partials.column("rounds_done").to_pylist()
    best: dict[str, int] = {}
    for i, (lid, r) in enumerate(zip(ids, rounds)):
        if lid not in indexed_ids and (lid not in best or r > rounds[best[lid]]):
            best[lid] = i
    return partials.take(pa.array(sorted(best.values()), pa.int64()))
