"""Standard errors of a LoRA signature, from the same mergeable sums as the signature itself.

Every number here is computed from a (merged) :class:`~carlos_ray.signatures.PartialStats`, never
from the diffs, so it is available after every round of adaptive sampling at O(|P| d) cost:

- **Direction** (a mean of N vectors): its expected squared error is ``tr Cov(d) / N``, estimated
  without bias by ``(mean|d|² − |mean d|²) / (N − 1)``. The squared norms are not kept as a raw
  moment; ``Σ|d|² − N|mean d|² = M2 + N (mean|d| − |mean d|)(mean|d| + |mean d|)`` with ``M2`` the
  spread of the norms (kept with Chan's update), which avoids cancelling two large numbers when the
  diffs are nearly equal. ``direction_se`` is the root of that, ``direction_rse`` the same relative
  to ``|mean d|`` (the direction is only used through its angle, so the relative error is what a
  ranking feels; about the angle in radians between the estimate and the truth).
- **Strength** (a mean of N norms): ``sqrt(M2 / (N − 1) / N)``.
- **Consistency** (a mean over pairs, not a plain mean): a delete-one-prompt jackknife. Leaving out
  prompt p changes the Gram sums in closed form — with ``T = Σ_q s_q`` the total unit sum,
  ``1ᵀG1 ↦ |T|² − 2 s_p·T + |s_p|²``, ``N ↦ N − m_p``, ``N₊ ↦ N₊ − m⁺_p`` — so all |P| leave-one-out
  values cost one ``(|P|, d) @ (d,)`` product and the diffs are never touched.

These are the errors of the signature as an estimate over its population of (prompt, seed) samples:
the right ones while the prompts are themselves a sample (adaptive sampling before every prompt has a
sample). **Once every prompt has a sample**, the prompts are the full protocol's own and only the seeds
are random, so prompt-to-prompt spread is no error at all; strength and consistency then get the
*seed* error for these fixed prompts, from two independent halves of every prompt's seeds (odd and
even seed index, kept as ``odd_*`` sums in the partial):

- a prompt p with samples in both halves, ``m_a`` even and ``m_b`` odd, gives one unbiased estimate of
  the seed variance of a sample's contribution, ``v_p = w_p² / (1/m_a + 1/m_b)`` with ``w_p`` the
  difference of the two half-means (of the norms for strength; of the unit diffs projected on ``T``
  for consistency, whose gradient in ``s_p`` is ``2T / (N(N − 1))``, the delta method);
- prompts with samples in one half only take the mean ``v`` of the others;
- ``Var = Σ_p m_p v_p / N²`` (strength), ``(2 / (N(N − 1)))² Σ_p m_p v_p`` (consistency).

That needs :data:`MIN_SPLIT_PROMPTS` prompts with both halves, and seeds that no two prompts share
(``sampling.seed_layout: per_prompt``): the sum over prompts assumes their seed noise independent. With
the paper's shared seeds, the samples of all prompts under one seed move together (the seed fixes the
layout of every image), and on the micro zoo the split errors came out 2-3x smaller than a jackknife
over seeds; so with shared seeds the population errors above are kept throughout.
The direction keeps the population error (a split would need per-prompt diff sums), which is
conservative. Against the full protocol's value, which shares every sample the estimate used, all of
them are conservative (no finite-population correction is applied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from carlos_ray.signatures import PartialStats

MIN_SPLIT_PROMPTS = 3  # prompts with samples in both seed halves before the seed errors replace the population ones
Z95 = 1.959963984540054  # two-sided 95% normal quantile: the "±" shown to users is Z95 standard errors


@dataclass(frozen=True)
class SignatureErrors:
    """Standard errors of one signature (NaN where there are too few samples to estimate one)."""

    n: int  # samples used
    direction_se: float  # sqrt(E|mean d − μ|²), feature units
    direction_rse: float  # direction_se / |mean d| (0 if direction_se is 0, inf for a zero direction)
    strength_se: float
    strength_rse: float  # strength_se / strength (same conventions)
    consistency_se: float  # delete-one-prompt jackknife, or the seed error once every prompt has a sample
    basis: str = "prompts"  # "seeds": strength/consistency errors are over seeds for these prompts (module doc)

    def as_row(self) -> dict[str, float]:
        return {"direction_se": self.direction_se, "direction_rse": self.direction_rse,
                "strength_se": self.strength_se, "consistency_se": self.consistency_se}


def direction_sq_error(p: PartialStats) -> float:
    """Unbiased estimate of the expected squared error ``E|mean d − μ|²`` of the direction (NaN for N < 2)."""
    n = p.count
    if n < 2:
        return math.nan
    mean_norm = p.sum_norm / n
    mean_len = float(np.linalg.norm(p.sum_diff / n))
    # Σ|d − mean d|² = Σ|d|² − N|mean d|², and Σ|d|² = M2 + N mean|d|²; mean|d| >= |mean d| always.
    spread = p.norm_m2 + n * max(mean_norm - mean_len, 0.0) * (mean_norm + mean_len)
    return max(spread, 0.0) / (n - 1) / n


def strength_se(p: PartialStats) -> float:
    """Standard error of the mean diff norm (NaN for N < 2)."""
    n = p.count
    if n < 2:
        return math.nan
    return math.sqrt(max(p.norm_m2, 0.0) / (n - 1) / n)


def consistency_leave_one_prompt_out(p: PartialStats, full_seeds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt indices with samples, consistency of the signature without each of them).

    A leave-one-out value is NaN when fewer than 2 samples remain without that prompt. ``full_seeds``: the
    estimate is :func:`~carlos_ray.signatures.pair_mix_consistency` (``finalize(full_seeds=...)``), over
    the protocol without that prompt.
    """
    m = p.prompt_count.astype(np.float64)
    have = np.flatnonzero(p.prompt_count > 0)
    s = p.prompt_unit_sum[have]
    total = p.prompt_unit_sum.sum(axis=0)
    g_sum = float(total @ total)
    diag = np.einsum("pd,pd->p", p.prompt_unit_sum, p.prompt_unit_sum)  # G_pp
    g_rest = g_sum - 2.0 * (s @ total) + diag[have]
    n_rest = p.count - m[have]
    nz_rest = p.n_nonzero - p.prompt_nonzero[have].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(n_rest >= 2, (g_rest - nz_rest) / (n_rest * (n_rest - 1)), np.nan)
    if full_seeds is not None:
        from carlos_ray.signatures import pair_mix_consistency

        within = diag - p.prompt_nonzero.astype(np.float64)
        values = np.where(n_rest >= 2, pair_mix_consistency(
            g_rest, diag.sum() - diag[have], within.sum() - within[have], n_rest, float(m @ m) - m[have] ** 2,
            p.n_prompts - 1, full_seeds, values), np.nan)
    return have, values


def consistency_se(p: PartialStats, full_seeds: int | None = None) -> float:
    """Delete-one-prompt jackknife standard error of the consistency (NaN with fewer than 2 usable prompts)."""
    _, values = consistency_leave_one_prompt_out(p, full_seeds)
    values = values[np.isfinite(values)]
    g = len(values)
    if g < 2:
        return math.nan
    return math.sqrt((g - 1) / g * float(np.sum((values - values.mean()) ** 2)))


def _seed_halves(p: PartialStats) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(m, m_even, m_odd) per prompt when the seed errors apply (every prompt sampled, enough split prompts), else None."""
    m = p.prompt_count.astype(np.float64)
    mb = p.odd_count.astype(np.float64)
    ma = m - mb
    if (m == 0).any() or int(np.count_nonzero((ma > 0) & (mb > 0))) < MIN_SPLIT_PROMPTS:
        return None
    return m, ma, mb


def _seed_variance_sum(m: np.ndarray, ma: np.ndarray, mb: np.ndarray, w: np.ndarray) -> float:
    """``Σ_p m_p v_p`` with ``v_p = w_p² / (1/m_a + 1/m_b)`` where both halves exist, their mean elsewhere."""
    both = (ma > 0) & (mb > 0)
    v = np.zeros_like(m)
    v[both] = w[both] ** 2 / (1.0 / ma[both] + 1.0 / mb[both])
    v[~both] = v[both].mean()
    return float(np.sum(m * v))


def seed_strength_se(p: PartialStats) -> float:
    """Strength's seed error for fixed prompts (module doc); NaN when the halves do not allow it."""
    halves = _seed_halves(p)
    if halves is None:
        return math.nan
    m, ma, mb = halves
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.nan_to_num((p.prompt_norm_sum - p.odd_norm_sum) / ma) - np.nan_to_num(p.odd_norm_sum / mb)
    return math.sqrt(_seed_variance_sum(m, ma, mb, w)) / p.count


def seed_consistency_se(p: PartialStats) -> float:
    """Consistency's seed error for fixed prompts (delta method on the halves, module doc); NaN when not available."""
    halves = _seed_halves(p)
    if halves is None:
        return math.nan
    m, ma, mb = halves
    total = p.prompt_unit_sum.sum(axis=0)
    odd = p.odd_unit_sum @ total
    even = p.prompt_unit_sum @ total - odd
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.nan_to_num(even / ma) - np.nan_to_num(odd / mb)
    n = p.count
    return 2.0 * math.sqrt(_seed_variance_sum(m, ma, mb, w)) / (n * (n - 1))


def _relative(se: float, value: float) -> float:
    """se / |value|; 0 when the value is known exactly (se == 0, e.g. a LoRA that changes nothing), inf for 0."""
    if math.isnan(se):
        return math.nan
    if se == 0.0:
        return 0.0
    return se / abs(value) if value != 0 else math.inf


def standard_errors(p: PartialStats, independent_seeds: bool = False, full_seeds: int | None = None) -> SignatureErrors:
    """All standard errors of the signature that ``p.finalize(full_seeds=full_seeds)`` gives.

    With ``full_seeds`` the jackknife is of the pair-mix consistency; the seed error (``basis`` "seeds")
    stays the delta method of the sample's own mean, whose gradient differs from the pair-mix one's by the
    within-prompt weight λ (3.7% at 24 prompts x 8 seeds, 0.3% at 280 x 16).

    ``independent_seeds``: no two prompts shared a seed (``sampling.seed_layout: per_prompt``); only then are the
    seed errors used once every prompt has a sample (module doc). With shared seeds, samples of different prompts
    that share a seed are correlated and the split errors would be too small (measured: 2-3x on the micro zoo)."""
    n = p.count
    mean_len = float(np.linalg.norm(p.sum_diff / n)) if n else 0.0
    d_se = math.sqrt(direction_sq_error(p)) if n >= 2 else math.nan
    basis = "seeds" if independent_seeds and _seed_halves(p) is not None else "prompts"
    s_se = strength_se(p) if basis == "prompts" else seed_strength_se(p)
    c_se = consistency_se(p, full_seeds) if basis == "prompts" else seed_consistency_se(p)
    strength = p.sum_norm / n if n else 0.0
    d_rse = _relative(d_se, mean_len)
    s_rse = _relative(s_se, strength)
    return SignatureErrors(n=int(n), direction_se=d_se, direction_rse=float(d_rse), strength_se=s_se,
                           strength_rse=float(s_rse), consistency_se=c_se, basis=basis)


def format_estimate(value: float | None, se: float | None, z: float = Z95) -> str:
    """``"4.12 ± 0.39"``: the value and its ``z``-standard-error half-width (95% by default), the half-width to two
    significant digits and the value to the same decimal place; just the value when there is no finite error."""
    if value is None:
        return ""
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else str(value)
    if se is None or not math.isfinite(se):
        return f"{value:.4g}"
    half = z * se
    if half == 0:
        return f"{value:.4g} ± 0"
    decimals = max(0, 1 - math.floor(math.log10(half)))
    return f"{value:.{decimals}f} ± {half:.{decimals}f}"


def stated_intervals(row: dict) -> dict:
    """The 95% intervals of a signatures-table row as text and numbers (for `/loras/{id}` and the CLI)."""
    def half(key: str) -> float | None:
        v = row.get(key)
        return None if v is None or not math.isfinite(v) else Z95 * v

    return {
        "confidence": 0.95,
        "samples": row.get("n"),
        "rounds": row.get("n_rounds"),
        "strength": format_estimate(row.get("strength"), row.get("strength_se")),
        "consistency": format_estimate(row.get("consistency"), row.get("consistency_se")),
        "strength_half_width": half("strength_se"),
        "consistency_half_width": half("consistency_se"),
        "direction_rse": row.get("direction_rse"),
    }
