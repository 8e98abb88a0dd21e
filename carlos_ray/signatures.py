"""Exact, mergeable statistics of CLIP diff vectors and the LoRA signature built from them.

A LoRA's signature (direction, strength, consistency, plus per-prompt and per-category
breakdowns) depends on its N diff vectors only through a few sums. :class:`PartialStats`
holds those sums for any subset of the diffs; partials of disjoint subsets are merged by
addition (plus Chan's pairwise update for the spread of the norms) in any order and grouping,
and :meth:`PartialStats.finalize` turns the merged sums into a :class:`Signature`.

Consistency (mean pairwise cosine over all pairs i < j) comes from the |P|x|P| Gram matrix
``G = S Sᵀ`` of the per-prompt sums of unit diffs ``S``, never from the NxN matrix:
``Cons = (1ᵀ G 1 − N₊) / (N (N − 1))`` where N₊ is the number of non-zero diffs (a zero diff
is a zero unit vector and has cosine 0 with everything). Seed consistency uses G's diagonal,
per-category consistency its block sums; all of these are sums of G over sets of prompts,
``1_Aᵀ G 1_B = (Sᵀ1_A)·(Sᵀ1_B)``, so they cost O(|P| d) and G is never materialized.
Everything is accumulated in float64 whatever the input dtype, and the temporary memory used
while building a partial is bounded by a fixed chunk of rows, independent of N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Rows of diffs converted to float64 at a time in ``from_diffs``: bounds temporary memory
# to about this many bytes regardless of N.
_CHUNK_BYTES = 8 * 1024 * 1024
# Below this squared norm a row's norm is recomputed with scaling, so tiny non-zero diffs
# are not mistaken for zero diffs by underflow.
_TINY_SQ = 1e-280

_FLOAT_KEYS = ("sum_norm", "norm_m2")
_FLOAT_LIST_KEYS = ("sum_diff", "prompt_unit_sum", "prompt_norm_sum", "odd_unit_sum", "odd_norm_sum")
_INT_LIST_KEYS = ("prompt_count", "prompt_nonzero", "odd_count")
ROW_KEYS: tuple[str, ...] = (
    "d",
    "n_prompts",
    "count",
    *_FLOAT_KEYS,
    *_FLOAT_LIST_KEYS,
    *_INT_LIST_KEYS,
)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _add_rows_by_prompt(acc: np.ndarray, p: np.ndarray, x: np.ndarray) -> None:
    """``acc[q] += sum of x[i] over rows i with p[i] == q``, for every prompt q.

    One stable sort makes each prompt's rows contiguous. Then either each run is summed with
    a contiguous ``sum(axis=0)`` (one step per prompt), or rows are taken by their rank inside
    their run, so that each step holds distinct prompts and a fancy-indexed add is exact (one
    step per seed); whichever needs fewer steps. (``np.add.at`` and ``np.add.reduceat`` along
    axis 0 are several times slower here: they walk the array column by column.)
    """
    n = len(p)
    order = None
    if n > 1 and np.any(p[1:] < p[:-1]):
        order = np.argsort(p, kind="stable")
        p = p[order]
    first = np.concatenate(([True], p[1:] != p[:-1]))
    starts = np.flatnonzero(first)
    lengths = np.diff(np.append(starts, n))
    if len(starts) <= lengths.max():
        if order is not None:
            x = x[order]
        for start, stop, q in zip(starts.tolist(), (starts + lengths).tolist(), p[starts].tolist()):
            acc[q] += x[start:stop].sum(axis=0)
        return
    rank = np.arange(n) - np.repeat(starts, lengths)  # position of each row inside its run
    by_rank = np.argsort(rank, kind="stable")
    level_starts = np.searchsorted(rank[by_rank], np.arange(lengths.max() + 1))
    rows = by_rank if order is None else order[by_rank]
    p, x = p[by_rank], x[rows]
    for start, stop in zip(level_starts[:-1].tolist(), level_starts[1:].tolist()):
        acc[p[start:stop]] += x[start:stop]  # distinct prompts within one level


def _combine_m2(n_a: int, sum_a: float, m2_a: float, n_b: int, sum_b: float, m2_b: float) -> float:
    """Sum of squared deviations of the union of two samples (Chan et al.), symmetric in a, b."""
    if n_a == 0 or n_b == 0:
        return m2_a + m2_b
    delta = sum_b / n_b - sum_a / n_a
    return (m2_a + m2_b) + delta * delta * (n_a * n_b / (n_a + n_b))


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


@dataclass(frozen=True, eq=False)
class Signature:
    """The finalized signature of one LoRA.

    Per-prompt arrays have length ``n_prompts``; per-category arrays follow
    ``category_names`` (order of first appearance in the ``categories`` given to
    ``finalize``; a category whose prompts have no samples gets NaN). Means of pairwise
    cosines are NaN when they have no pair to average over.
    """

    direction: np.ndarray  # (d,) float64, mean diff
    strength: float  # mean diff norm
    consistency: float  # mean pairwise cosine over all pairs i < j
    n: int  # number of diffs
    n_nonzero: int  # number of non-zero diffs
    strength_std: float  # population std (ddof=0) of the diff norms
    prompt_count: np.ndarray  # (n_prompts,) int64 samples per prompt
    prompt_seed_consistency: np.ndarray  # (n_prompts,) mean cosine among a prompt's seeds
    prompt_strength: np.ndarray  # (n_prompts,) mean norm per prompt
    category_names: list[str]
    category_strength: np.ndarray  # (n_categories,) mean norm per category
    category_within: np.ndarray  # (n_categories,) mean cosine over pairs inside the category
    category_cross: np.ndarray  # (n_categories,) mean cosine over pairs (inside, outside)


def pair_mix_consistency(g_sum, g_diag_sum, within_sum, n, m_sq_sum, n_prompts: int, full_seeds: int, plain):
    """Consistency of a partial sample weighted to the full protocol's mix of pairs (arrays broadcast).

    The full protocol's consistency is the mean cosine over all pairs of its |P|·S samples, a fraction
    ``λ = (S − 1)/(|P|S − 1)`` of every sample's partners being the same prompt under another seed. Those
    within-prompt pairs are far more alike than pairs of different prompts, and a prefix of the adaptive
    order holds fewer of them (none during the first sweep), so its own all-pairs mean is biased low.
    Here the within-prompt mean ``c_w = Σ_p(G_pp − m⁺_p) / Σ_p m_p(m_p − 1)`` and the cross-prompt mean
    ``c_x = (1ᵀG1 − Σ_p G_pp) / (N² − Σ_p m_p²)`` are weighted ``(1 − λ) c_x + λ c_w``; where no prompt
    has two samples yet (``c_w`` unknown) the sample's own mean (``plain``) is kept. On a complete
    protocol (every m_p = S) it equals the plain mean."""
    g_sum, g_diag_sum, within_sum, n, m_sq_sum = (np.asarray(v, dtype=np.float64) for v in (g_sum, g_diag_sum, within_sum, n, m_sq_sum))
    with np.errstate(invalid="ignore", divide="ignore"):
        within_pairs = m_sq_sum - n
        cross_pairs = n * n - m_sq_sum
        lam = (full_seeds - 1) / (n_prompts * full_seeds - 1) if n_prompts * full_seeds > 1 else 0.0
        c_w = within_sum / within_pairs
        c_x = (g_sum - g_diag_sum) / cross_pairs
        mixed = (1.0 - lam) * c_x + lam * c_w
        ok = (within_pairs > 0) & (cross_pairs > 0)
    out = np.where(ok, mixed, plain)
    return float(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True, eq=False)
class PartialStats:
    """Sufficient statistics of a set of diff vectors of one LoRA (all float64/int64).

    Build with :meth:`from_diffs`, combine with :meth:`merge` / :meth:`merge_all`,
    serialize with :meth:`to_row` / :meth:`from_row`, and turn into a :class:`Signature`
    with :meth:`finalize`. Arrays are read-only.
    """

    d: int
    n_prompts: int
    count: int  # N
    sum_norm: float  # Σ |diff|
    # Σ (|diff| − mean |diff|)², merged with Chan's update rather than kept as a raw Σ |diff|²:
    # the raw moment loses the std to cancellation when the norms are nearly equal.
    norm_m2: float
    sum_diff: np.ndarray  # (d,) Σ diff
    prompt_unit_sum: np.ndarray  # (n_prompts, d) Σ diff/|diff| per prompt (0 for zero diffs)
    prompt_norm_sum: np.ndarray  # (n_prompts,) Σ |diff| per prompt
    prompt_count: np.ndarray  # (n_prompts,) int64 samples per prompt
    prompt_nonzero: np.ndarray  # (n_prompts,) int64 non-zero samples per prompt
    # The same per-prompt sums over the samples with an odd seed index only (the even half is the total minus
    # these). Two independent halves of every prompt's seeds give the seed-to-seed error of a signature whose
    # prompts are fixed (carlos_ray.uncertainty); without seed indices every sample counts as even.
    odd_unit_sum: np.ndarray  # (n_prompts, d)
    odd_norm_sum: np.ndarray  # (n_prompts,)
    odd_count: np.ndarray  # (n_prompts,) int64

    @property
    def n_nonzero(self) -> int:
        """Number of non-zero diffs (N₊)."""
        return int(self.prompt_nonzero.sum())

    @classmethod
    def empty(cls, d: int, n_prompts: int) -> PartialStats:
        """Statistics of no diffs: the identity of :meth:`merge`."""
        d = _check_positive_int("d", d)
        n_prompts = _check_positive_int("n_prompts", n_prompts)
        return cls(
            d=d,
            n_prompts=n_prompts,
            count=0,
            sum_norm=0.0,
            norm_m2=0.0,
            sum_diff=_readonly(np.zeros(d)),
            prompt_unit_sum=_readonly(np.zeros((n_prompts, d))),
            prompt_norm_sum=_readonly(np.zeros(n_prompts)),
            prompt_count=_readonly(np.zeros(n_prompts, dtype=np.int64)),
            prompt_nonzero=_readonly(np.zeros(n_prompts, dtype=np.int64)),
            odd_unit_sum=_readonly(np.zeros((n_prompts, d))),
            odd_norm_sum=_readonly(np.zeros(n_prompts)),
            odd_count=_readonly(np.zeros(n_prompts, dtype=np.int64)),
        )

    @classmethod
    def from_diffs(cls, diffs: Any, prompt_idx: Any, n_prompts: int, seed_idx: Any = None) -> PartialStats:
        """Statistics of a batch: ``diffs`` (N, d) of any float dtype, ``prompt_idx`` (N,) ints, and optionally
        ``seed_idx`` (N,) non-negative ints (the sample's seed index; it only decides the odd/even half).

        Rows are processed in float64 chunks of bounded size (so temporary memory does not
        grow with N) and grouped by prompt with one sort per chunk.
        """
        n_prompts = _check_positive_int("n_prompts", n_prompts)
        diffs = np.asarray(diffs)
        if diffs.ndim != 2:
            raise ValueError(f"diffs must be a 2-D array (N, d), got shape {diffs.shape}")
        if not (np.issubdtype(diffs.dtype, np.floating) or np.issubdtype(diffs.dtype, np.integer)):
            raise ValueError(f"diffs must have a real (float or integer) dtype, got {diffs.dtype}")
        n, d = diffs.shape
        if d < 1:
            raise ValueError(f"diffs must have at least one column (d >= 1), got shape {diffs.shape}")
        prompt_idx = np.asarray(prompt_idx)
        if prompt_idx.ndim != 1 or prompt_idx.shape[0] != n:
            raise ValueError(
                f"prompt_idx must have shape ({n},) to match diffs {diffs.shape}, got {prompt_idx.shape}"
            )
        if n and not np.issubdtype(prompt_idx.dtype, np.integer):
            raise ValueError(f"prompt_idx must hold integers, got dtype {prompt_idx.dtype}")
        if n:
            lo, hi = int(prompt_idx.min()), int(prompt_idx.max())
            if lo < 0 or hi >= n_prompts:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"prompt_idx out of range: found {bad}, valid prompt ids are 0..{n_prompts - 1}"
                )
        if seed_idx is None:
            odd_rows = np.zeros(n, dtype=bool)
        else:
            seed_idx = np.asarray(seed_idx)
            if seed_idx.shape != (n,):
                raise ValueError(f"seed_idx must have shape ({n},) to match diffs {diffs.shape}, got {seed_idx.shape}")
            if n and not np.issubdtype(seed_idx.dtype, np.integer):
                raise ValueError(f"seed_idx must hold integers, got dtype {seed_idx.dtype}")
            if n and int(seed_idx.min()) < 0:
                raise ValueError(f"seed_idx must be >= 0, found {int(seed_idx.min())}")
            odd_rows = (seed_idx % 2).astype(bool)

        sum_diff = np.zeros(d)
        unit_sum = np.zeros((n_prompts, d))
        prompt_norm_sum = np.zeros(n_prompts)
        prompt_count = np.zeros(n_prompts, dtype=np.int64)
        prompt_nonzero = np.zeros(n_prompts, dtype=np.int64)
        odd_unit_sum = np.zeros((n_prompts, d))
        odd_norm_sum = np.zeros(n_prompts)
        odd_count = np.zeros(n_prompts, dtype=np.int64)
        sum_norm = 0.0
        norm_m2 = 0.0
        step = max(1, _CHUNK_BYTES // (8 * d))
        for start in range(0, n, step):
            stop = min(start + step, n)
            x = np.array(diffs[start:stop], dtype=np.float64)  # own copy, scaled in place below
            p = prompt_idx[start:stop].astype(np.int64, copy=False)
            sq = np.einsum("ij,ij->i", x, x)
            if not np.isfinite(sq).all():
                row = int(np.flatnonzero(~np.isfinite(sq))[0])
                if not np.isfinite(x[row]).all():
                    raise ValueError(
                        f"diffs contain non-finite values (NaN or inf), first in row {start + row}"
                    )
                raise ValueError(f"diffs row {start + row} is too large: its squared norm overflows float64")
            norms = np.sqrt(sq)
            tiny = np.flatnonzero(sq < _TINY_SQ)  # zero rows, or a squared norm that underflows
            if tiny.size:
                top = np.abs(x[tiny]).max(axis=1)
                tiny, top = tiny[top > 0], top[top > 0]
                norms[tiny] = top * np.sqrt(np.sum((x[tiny] / top[:, None]) ** 2, axis=1))
            nonzero = norms > 0
            sum_diff += x.sum(axis=0)
            chunk_sum = float(norms.sum())
            chunk_m2 = float(np.sum((norms - chunk_sum / len(norms)) ** 2))
            norm_m2 = _combine_m2(start, sum_norm, norm_m2, stop - start, chunk_sum, chunk_m2)
            sum_norm += chunk_sum
            prompt_norm_sum += np.bincount(p, weights=norms, minlength=n_prompts)
            prompt_count += np.bincount(p, minlength=n_prompts)
            prompt_nonzero += np.bincount(p[nonzero], minlength=n_prompts)
            inv = np.zeros_like(norms)
            np.divide(1.0, norms, out=inv, where=nonzero)
            x *= inv[:, None]  # unit vectors; zero rows stay zero
            _add_rows_by_prompt(unit_sum, p, x)
            odd = odd_rows[start:stop]
            if odd.any():
                po = p[odd]
                odd_norm_sum += np.bincount(po, weights=norms[odd], minlength=n_prompts)
                odd_count += np.bincount(po, minlength=n_prompts)
                _add_rows_by_prompt(odd_unit_sum, po, x[odd])

        return cls(
            d=d,
            n_prompts=n_prompts,
            count=n,
            sum_norm=sum_norm,
            norm_m2=norm_m2,
            sum_diff=_readonly(sum_diff),
            prompt_unit_sum=_readonly(unit_sum),
            prompt_norm_sum=_readonly(prompt_norm_sum),
            prompt_count=_readonly(prompt_count),
            prompt_nonzero=_readonly(prompt_nonzero),
            odd_unit_sum=_readonly(odd_unit_sum),
            odd_norm_sum=_readonly(odd_norm_sum),
            odd_count=_readonly(odd_count),
        )

    def merge(self, other: PartialStats) -> PartialStats:
        """Statistics of the union of two disjoint sets of diffs.

        Bitwise commutative; associative up to float64 rounding (relative ~1e-16).
        """
        if not isinstance(other, PartialStats):
            raise ValueError(f"can only merge PartialStats, got {type(other).__name__}")
        if (self.d, self.n_prompts) != (other.d, other.n_prompts):
            raise ValueError(
                "cannot merge PartialStats with different shapes: "
                f"(d={self.d}, n_prompts={self.n_prompts}) vs (d={other.d}, n_prompts={other.n_prompts})"
            )
        return PartialStats(
            d=self.d,
            n_prompts=self.n_prompts,
            count=self.count + other.count,
            sum_norm=self.sum_norm + other.sum_norm,
            norm_m2=_combine_m2(
                self.count, self.sum_norm, self.norm_m2, other.count, other.sum_norm, other.norm_m2
            ),
            sum_diff=_readonly(self.sum_diff + other.sum_diff),
            prompt_unit_sum=_readonly(self.prompt_unit_sum + other.prompt_unit_sum),
            prompt_norm_sum=_readonly(self.prompt_norm_sum + other.prompt_norm_sum),
            prompt_count=_readonly(self.prompt_count + other.prompt_count),
            prompt_nonzero=_readonly(self.prompt_nonzero + other.prompt_nonzero),
            odd_unit_sum=_readonly(self.odd_unit_sum + other.odd_unit_sum),
            odd_norm_sum=_readonly(self.odd_norm_sum + other.odd_norm_sum),
            odd_count=_readonly(self.odd_count + other.odd_count),
        )

    @classmethod
    def merge_all(cls, parts: Sequence[PartialStats]) -> PartialStats:
        """Merge a non-empty sequence of partials (left to right)."""
        parts = list(parts)
        if not parts:
            raise ValueError("merge_all needs at least one PartialStats, got an empty sequence")
        out = parts[0]
        if not isinstance(out, PartialStats):
            raise ValueError(f"can only merge PartialStats, got {type(out).__name__}")
        for part in parts[1:]:
            out = out.merge(part)
        return out

    def to_row(self) -> dict[str, Any]:
        """A flat dict of Python ints, floats and flat lists of them (Arrow/Parquet friendly).

        ``prompt_unit_sum`` is flattened row-major (prompt-major). Floats are float64 and
        round-trip bitwise through ``pyarrow.Table.from_pylist`` / ``to_pylist``.
        """
        return {
            "d": self.d,
            "n_prompts": self.n_prompts,
            "count": self.count,
            "sum_norm": float(self.sum_norm),
            "norm_m2": float(self.norm_m2),
            "sum_diff": self.sum_diff.tolist(),
            "prompt_unit_sum": self.prompt_unit_sum.ravel().tolist(),
            "prompt_norm_sum": self.prompt_norm_sum.tolist(),
            "prompt_count": self.prompt_count.tolist(),
            "prompt_nonzero": self.prompt_nonzero.tolist(),
            "odd_unit_sum": self.odd_unit_sum.ravel().tolist(),
            "odd_norm_sum": self.odd_norm_sum.tolist(),
            "odd_count": self.odd_count.tolist(),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PartialStats:
        """Inverse of :meth:`to_row`. Keys other than :data:`ROW_KEYS` are ignored."""
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"PartialStats row is missing keys {missing}; expected keys {list(ROW_KEYS)}")
        d = _check_positive_int("d", row["d"])
        n_prompts = _check_positive_int("n_prompts", row["n_prompts"])
        count = row["count"]
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"count must be a non-negative int, got {count!r}")
        expected_len = {
            "sum_diff": d,
            "prompt_unit_sum": n_prompts * d,
            "prompt_norm_sum": n_prompts,
            "prompt_count": n_prompts,
            "prompt_nonzero": n_prompts,
            "odd_unit_sum": n_prompts * d,
            "odd_norm_sum": n_prompts,
            "odd_count": n_prompts,
        }
        arrays: dict[str, np.ndarray] = {}
        for key, length in expected_len.items():
            value = row[key]
            if value is None:
                raise ValueError(f"{key} is None; expected a list of length {length}")
            dtype = np.int64 if key in _INT_LIST_KEYS else np.float64
            try:
                a = np.array(value, dtype=dtype)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{key} must be a flat list of {np.dtype(dtype).name}: {e}") from None
            if a.ndim != 1 or a.shape[0] != length:
                raise ValueError(f"{key} must be a flat list of length {length}, got shape {a.shape}")
            if dtype is np.float64 and not np.isfinite(a).all():
                raise ValueError(f"{key} contains non-finite values")
            arrays[key] = a
        scalars = {}
        for key in _FLOAT_KEYS:
            try:
                v = float(row[key])
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a float, got {row[key]!r}") from None
            if not np.isfinite(v):
                raise ValueError(f"{key} must be finite, got {v}")
            scalars[key] = v
        if scalars["norm_m2"] < 0:
            raise ValueError(f"norm_m2 must be >= 0, got {scalars['norm_m2']}")
        pc, pnz = arrays["prompt_count"], arrays["prompt_nonzero"]
        if (pc < 0).any() or (pnz < 0).any() or (pnz > pc).any():
            raise ValueError("prompt counts must satisfy 0 <= prompt_nonzero <= prompt_count")
        if int(pc.sum()) != count:
            raise ValueError(f"sum of prompt_count ({int(pc.sum())}) does not equal count ({count})")
        oc = arrays["odd_count"]
        if (oc < 0).any() or (oc > pc).any():
            raise ValueError("odd counts must satisfy 0 <= odd_count <= prompt_count")
        return cls(
            d=d,
            n_prompts=n_prompts,
            count=int(count),
            sum_norm=scalars["sum_norm"],
            norm_m2=scalars["norm_m2"],
            sum_diff=_readonly(arrays["sum_diff"]),
            prompt_unit_sum=_readonly(arrays["prompt_unit_sum"].reshape(n_prompts, d)),
            prompt_norm_sum=_readonly(arrays["prompt_norm_sum"]),
            prompt_count=_readonly(pc),
            prompt_nonzero=_readonly(pnz),
            odd_unit_sum=_readonly(arrays["odd_unit_sum"].reshape(n_prompts, d)),
            odd_norm_sum=_readonly(arrays["odd_norm_sum"]),
            odd_count=_readonly(oc),
        )

    def finalize(self, categories: Sequence[str] | None = None, full_seeds: int | None = None) -> Signature:
        """Turn the sums into a :class:`Signature`.

        ``categories`` gives the category name of each prompt index (length ``n_prompts``);
        without it the per-category fields are empty. ``full_seeds`` (adaptive sampling): the seeds per
        prompt of the full protocol this sample is a prefix of; consistency then estimates the full
        protocol's value (:func:`pair_mix_consistency`) instead of the mean over this sample's own pairs.
        """
        n = self.count
        if n < 2:
            raise ValueError(
                f"a signature needs at least 2 diff samples (consistency is a mean over pairs), got {n}"
            )
        if categories is not None:
            if isinstance(categories, str) or len(categories) != self.n_prompts:
                got = "a str" if isinstance(categories, str) else f"length {len(categories)}"
                raise ValueError(
                    f"categories must be a sequence of n_prompts={self.n_prompts} names, got {got}"
                )
            bad = [c for c in categories if not isinstance(c, str)]
            if bad:
                raise ValueError(f"category names must be str, got {bad[0]!r}")

        m = self.prompt_count.astype(np.float64)
        m_nz = self.prompt_nonzero.astype(np.float64)
        n_nonzero = int(self.prompt_nonzero.sum())
        s = self.prompt_unit_sum  # rows of prompts without samples are zero and add nothing
        # G = S Sᵀ is only needed through sums over sets A, B of prompts, and
        # 1_Aᵀ G 1_B = (Sᵀ 1_A)·(Sᵀ 1_B): the whole sum, the diagonal and the category blocks
        # come from prompt and category sums in O(|P| d), without building G (O(|P|² d)).
        total = s.sum(axis=0)
        g_sum = float(total @ total)  # 1ᵀ G 1
        g_diag = np.einsum("pd,pd->p", s, s)  # G_pp
        consistency = (g_sum - n_nonzero) / (n * (n - 1))
        if full_seeds is not None:
            consistency = pair_mix_consistency(g_sum, float(g_diag.sum()), float((g_diag - m_nz).sum()), n,
                                               float(m @ m), self.n_prompts, full_seeds, consistency)
        mean_norm = self.sum_norm / n
        strength_std = float(np.sqrt(self.norm_m2 / n))

        with np.errstate(invalid="ignore", divide="ignore"):
            prompt_strength = np.where(m > 0, self.prompt_norm_sum / m, np.nan)
            seed_cons = np.where(m >= 2, (g_diag - m_nz) / (m * (m - 1)), np.nan)

        names: list[str] = []
        cat_strength = cat_within = cat_cross = np.empty(0)
        if categories is not None:
            names = list(dict.fromkeys(categories))
            code_of = {c: i for i, c in enumerate(names)}
            codes = np.array([code_of[c] for c in categories], dtype=np.int64)
            k = len(names)
            cat_sums = np.stack([s[codes == i].sum(axis=0) for i in range(k)])  # (k, d)
            inside = np.einsum("kd,kd->k", cat_sums, cat_sums)  # Σ of G over the category block
            with_all = cat_sums @ total  # Σ of G over the category's rows
            mc = np.bincount(codes, weights=m, minlength=k)
            mc_nz = np.bincount(codes, weights=m_nz, minlength=k)
            norm_c = np.bincount(codes, weights=self.prompt_norm_sum, minlength=k)
            cross_pairs = mc * (n - mc)
            with np.errstate(invalid="ignore", divide="ignore"):
                cat_strength = np.where(mc > 0, norm_c / mc, np.nan)
                cat_within = np.where(mc >= 2, (inside - mc_nz) / (mc * (mc - 1)), np.nan)
                cat_cross = np.where(cross_pairs > 0, (with_all - inside) / cross_pairs, np.nan)

        return Signature(
            direction=_readonly(self.sum_diff / n),
            strength=float(mean_norm),
            consistency=float(consistency),
            n=int(n),
            n_nonzero=n_nonzero,
            strength_std=strength_std,
            prompt_count=_readonly(self.prompt_count.copy()),
            prompt_seed_consistency=_readonly(seed_cons),
            prompt_strength=_readonly(prompt_strength),
            category_names=names,
            category_strength=_readonly(np.asarray(cat_strength, dtype=np.float64)),
            category_within=_readonly(np.asarray(cat_within, dtype=np.float64)),
            category_cross=_readonly(np.asarray(cat_cross, dtype=np.float64)),
        )
