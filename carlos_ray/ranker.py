"""Exact filtered top-k retrieval of LoRA signatures by cosine similarity.

:class:`Ranker` keeps the L2-normalized directions in one contiguous float32 matrix (rows sorted
by strength, so a ``max_strength`` filter is a prefix of the matrix) and answers a query in two
passes:

1. a cheap *bound* pass gives every allowed row an approximate score ``a_i`` with a proven bound
   ``|a_i - s_i| <= e`` on its distance to the exact score ``s_i``;
2. with ``L`` a lower bound of the k-th largest ``a_i``, every row of the exact top-k has
   ``a_i >= L - 2e`` (at least k rows have ``s >= L - e``, so the k-th exact score is ``>= L - e``,
   and a row scoring at least that has ``a >= s - e >= L - 2e``). Only those candidates are
   rescored exactly (float64 dot of the stored float32 row with the float64 unit query) and sorted
   by ``(-score, lora_id)``. The result is the exact top-k, ties included.

Bound passes:

- ``float32``: BLAS ``X @ q``; any summation order errs by at most ``gamma_d |x| |q|``
  (``gamma_d = d u / (1 - d u)``, ``u = 2**-24``), plus the rounding of the query to float32.
- ``int8`` (large indexes, needs the ``simsimd`` package): rows and query are quantized to int8
  with per-vector scales, ``x = s_x x8 + r_x`` and ``q = s_q q8 + r_q``; the int8 dot is exact in
  integers and ``x.q - s_x s_q (x8.q8) = x.r_q + r_x.(s_q q8)``, so
  ``e = max|x| |r_q| + max|r_x| |s_q q8|`` (residual norms are measured, not estimated). It reads
  a quarter of the bytes of the float32 pass, which is what bounds a memory-bound scan.

Zero directions score 0. Thresholds keep ``strength <= max_strength`` and
``consistency >= min_consistency``; a NaN strength or consistency fails any active filter.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import Counter
from typing import Any, Literal, NamedTuple

import numpy as np

from carlos_ray.thresholds import (  # noqa: F401 (the paper constants and calibration are re-exported)
    PAPER_KEEP_CONSISTENCY,
    PAPER_KEEP_STRENGTH,
    PAPER_MAX_STRENGTH,
    PAPER_MIN_CONSISTENCY,
    calibrate_thresholds,
    resolve_thresholds,
)
import pyarrow as pa
import pyarrow.compute as pc

from carlos_ray.schema import conform_signatures

logger = logging.getLogger(__name__)

FirstPass = Literal["auto", "float32", "int8"]
INT8_MIN_ROWS = 50_000  # below this the float32 matrix is cache-resident and int8 buys nothing
_BUILD_BLOCK = 4_096  # rows normalized/quantized at a time (small temporaries: no page-fault churn)
_RESCORE_BLOCK = 32_768  # candidates rescored at a time
_MAXIMA_BLOCK = 64  # rows per block when bounding the k-th largest approximate score
_MAXIMA_MIN_ROWS = 65_536  # below this np.partition on all scores is cheap enough
_SLACK = 1e-6  # covers float32 evaluation of a_i (|a| <= ~1.1, 3 roundings) and float64 rescoring



class UnknownLora(KeyError):
    """A lora_id that is not in the index."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class Hit(NamedTuple):
    """One retrieved LoRA: its id, exact cosine score and what a client needs to show it."""

    lora_id: str
    score: float
    strength: float
    consistency: float
    name: str | None
    description: str | None
    trigger_words: list[str]


def _gamma(d: int, unit_roundoff: float) -> float:
    return d * unit_roundoff / (1.0 - d * unit_roundoff)


def _check_threshold(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or None, got {value!r}") from None
    if math.isnan(value):
        raise ValueError(f"{name} must be a number or None, got NaN")
    return value


def _import_simsimd() -> Any:
    try:
        import simsimd
    except ImportError:
        return None
    return simsimd


class Ranker:
    """Exact filtered cosine top-k over a signatures table. Build with :meth:`from_table`."""

    def __init__(self) -> None:
        raise TypeError("use Ranker.from_table(table, ...) to build a Ranker")

    @classmethod
    def from_table(
        cls,
        table: pa.Table,
        *,
        max_strength: float | None = None,
        min_consistency: float | None = None,
        first_pass: FirstPass = "auto",
        threads: int | None = None,
    ) -> Ranker:
        """Build a ranker over a signatures table (see :mod:`carlos_ray.schema`).

        ``max_strength`` / ``min_consistency`` are the default filters (None: no filter), usually
        the index manifest's thresholds. ``first_pass`` picks the bound pass: ``"auto"`` uses
        ``"int8"`` for at least ``INT8_MIN_ROWS`` rows when ``simsimd`` is installed, else
        ``"float32"``. ``threads`` is the thread count of the int8 pass (None: up to 4 of this
        machine's cores; the 1M-row pass is memory-bound and 2 threads halve it on 2 cores).
        """
        if first_pass not in ("auto", "float32", "int8"):
            raise ValueError(f"first_pass must be 'auto', 'float32' or 'int8', got {first_pass!r}")
        if threads is None:
            threads = max(1, min(4, os.cpu_count() or 1))
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        table = conform_signatures(table)
        n = table.num_rows
        if n == 0:
            raise ValueError("cannot build a Ranker from an empty signatures table")
        ids = table["lora_id"].to_pylist()
        if len(set(ids)) != n:
            dup = sorted(i for i, c in Counter(ids).items() if c > 1)
            raise ValueError(f"lora_id must be unique; duplicated: {dup[:10]}")

        direction = table["direction"].combine_chunks()
        widths = np.unique(pc.list_value_length(direction).to_numpy())
        if len(widths) != 1 or widths[0] < 1:
            raise ValueError(f"all directions must have the same positive width, got widths {widths.tolist()[:10]}")
        d = int(widths[0])
        flat = pc.list_flatten(direction)
        if flat.null_count:
            raise ValueError(f"column 'direction' has {flat.null_count} null element(s)")
        raw = flat.to_numpy(zero_copy_only=False).reshape(n, d)

        self = object.__new__(cls)
        self._lock = threading.Lock()
        self._bad_cache: dict[float, np.ndarray] = {}
        self.max_strength = _check_threshold("max_strength", max_strength)
        self.min_consistency = _check_threshold("min_consistency", min_consistency)
        self.threads = threads
        self.dim = d
        self._table = table

        strength = table["strength"].to_numpy()
        order = np.argsort(strength, kind="stable")  # NaN strengths sort last
        self._order = order  # sorted position -> table row
        self._strength = np.ascontiguousarray(strength[order])
        self._consistency = np.ascontiguousarray(table["consistency"].to_numpy()[order])
        self._ids = [ids[i] for i in order]
        self._pos = {lid: p for p, lid in enumerate(self._ids)}
        self._id_rank = np.empty(n, dtype=np.int64)
        self._id_rank[np.argsort(np.array(self._ids, dtype=object), kind="stable")] = np.arange(n)
        names, descriptions, triggers = (table[c].to_pylist() for c in ("name", "description", "trigger_words"))
        self._names = [names[i] for i in order]
        self._descriptions = [descriptions[i] for i in order]
        self._triggers = [triggers[i] for i in order]

        simsimd = _import_simsimd()
        if first_pass == "auto":
            first_pass = "int8" if (simsimd is not None and n >= INT8_MIN_ROWS) else "float32"
        elif first_pass == "int8" and simsimd is None:
            raise ValueError("first_pass='int8' needs the 'simsimd' package; install it or use 'float32'")
        self.first_pass = first_pass
        self._simsimd = simsimd if first_pass == "int8" else None

        x = np.empty((n, d), dtype=np.float32)
        x8 = np.empty((n, d), dtype=np.int8) if first_pass == "int8" else None
        sx = np.empty(n, dtype=np.float32) if first_pass == "int8" else None
        nu_max = rho_max = 0.0
        for start in range(0, n, _BUILD_BLOCK):
            rows = order[start : start + _BUILD_BLOCK]
            block = raw[rows].astype(np.float64)
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad = ids[int(rows[np.flatnonzero(~finite)[0]])]
                raise ValueError(f"direction of {bad!r} has non-finite values")
            peak = np.abs(block).max(axis=1, keepdims=True)
            np.divide(block, peak, out=block, where=peak > 0)  # rescale first: no overflow in the norm
            norm = np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
            np.divide(block, norm, out=block, where=norm > 0)  # zero rows stay zero
            xb = block.astype(np.float32)
            x[start : start + len(rows)] = xb
            xb64 = xb.astype(np.float64)
            nu_max = max(nu_max, float(np.sqrt(np.einsum("ij,ij->i", xb64, xb64)).max()))
            if x8 is not None:
                scale = (np.abs(xb).max(axis=1) / np.float32(127)).astype(np.float32)
                safe = np.where(scale > 0, scale, np.float32(1))
                q8 = np.clip(np.rint(xb / safe[:, None]), -127, 127).astype(np.int8)
                resid = xb64 - scale.astype(np.float64)[:, None] * q8
                rho_max = max(rho_max, float(np.sqrt(np.einsum("ij,ij->i", resid, resid)).max()))
                x8[start : start + len(rows)] = q8
                sx[start : start + len(rows)] = scale
        self._x, self._x8, self._sx = x, x8, sx
        self._nu_max = nu_max * (1 + 1e-12)
        self._rho_max = rho_max * (1 + 1e-12)
        u32 = 2.0**-24
        self._float32_err = self._nu_max * (_gamma(d, u32) * (1 + u32) + u32) * (1 + 1e-12) + _SLACK
        logger.info("Ranker over %d signatures of width %d (first pass %s)", n, d, first_pass)
        return self

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """lora_ids in the ranker (strength order)."""
        return list(self._ids)

    def __contains__(self, lora_id: object) -> bool:
        return lora_id in self._pos

    # -- queries ---------------------------------------------------------------------------

    def search(
        self,
        query_vec: Any,
        k: int = 10,
        max_strength: float | None = None,
        min_consistency: float | None = None,
    ) -> list[Hit] | list[list[Hit]]:
        """Exact top-``k`` LoRAs by cosine to ``query_vec`` among those passing the filters.

        ``query_vec`` is ``(d,)`` (returns ``list[Hit]``) or ``(B, d)`` (one list per query).
        Thresholds given here override the ranker's defaults; pass ``math.inf`` / ``-math.inf``
        to switch a default filter off. Ordered by score descending, then lora_id ascending.
        """
        k = self._check_k(k)
        max_s, min_c = self._thresholds(max_strength, min_consistency)
        q = np.asarray(query_vec)
        single = q.ndim == 1
        if q.ndim not in (1, 2) or q.shape[-1] != self.dim:
            raise ValueError(f"query_vec must have shape ({self.dim},) or (B, {self.dim}), got {q.shape}")
        if q.dtype.kind not in "fiu":
            raise ValueError(f"query_vec must be real numbers, got dtype {q.dtype}")
        q = q.reshape(-1, self.dim).astype(np.float64)
        if not np.isfinite(q).all():
            raise ValueError("query_vec has non-finite values (NaN or inf)")
        results = []
        for i, row in enumerate(q):
            norm = math.sqrt(row @ row)
            if norm == 0.0:
                raise ValueError(f"query vector {i} has zero norm; cosine similarity is undefined")
            results.append(self._search_one(row / norm, k, max_s, min_c, exclude=None))
        return results[0] if single else results

    def similar(
        self,
        lora_id: str,
        k: int = 10,
        max_strength: float | None = None,
        min_consistency: float | None = None,
    ) -> list[Hit]:
        """The ``k`` other LoRAs whose directions are closest (cosine) to ``lora_id``'s."""
        k = self._check_k(k)
        max_s, min_c = self._thresholds(max_strength, min_consistency)
        pos = self._position(lora_id)
        q = self._x[pos].astype(np.float64)
        norm = float(np.sqrt(q @ q))
        if norm == 0.0:
            raise ValueError(f"LoRA {lora_id!r} has a zero direction; similarity to it is undefined")
        return self._search_one(q / norm, k, max_s, min_c, exclude=pos)

    def get(self, lora_id: str) -> dict[str, Any]:
        """The signatures-table row of ``lora_id`` as a dict."""
        row = int(self._order[self._position(lora_id)])
        return self._table.slice(row, 1).to_pylist()[0]

    # -- internals -------------------------------------------------------------------------

    def _position(self, lora_id: str) -> int:
        try:
            return self._pos[lora_id]
        except (KeyError, TypeError):
            raise UnknownLora(f"unknown lora_id {lora_id!r}; the index holds {len(self._ids)} LoRAs") from None

    @staticmethod
    def _check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return int(k)

    def _thresholds(
        self, max_strength: float | None, min_consistency: float | None
    ) -> tuple[float | None, float | None]:
        t = resolve_thresholds(_check_threshold("max_strength", max_strength),
                               _check_threshold("min_consistency", min_consistency),
                               stored={"max_strength": self.max_strength, "min_consistency": self.min_consistency})
        return t.max_strength, t.min_consistency

    def _bad_mask(self, min_consistency: float) -> np.ndarray:
        """Rows (in sorted order) failing ``consistency >= min_consistency``; cached per threshold."""
        bad = self._bad_cache.get(min_consistency)
        if bad is None:
            bad = ~(self._consistency >= min_consistency)
            with self._lock:
                if len(self._bad_cache) >= 16:
                    self._bad_cache.pop(next(iter(self._bad_cache)))
                self._bad_cache[min_consistency] = bad
        return bad

    def _approx(self, q: np.ndarray, m: int) -> tuple[np.ndarray, float]:
        """Approximate scores of rows ``[0, m)`` (float32, fresh array) and their error bound."""
        d = self.dim
        if self._x8 is None:
            # |q| = 1, so rounding q to float32 moves it by at most u and |q32| <= 1 + u.
            return self._x[:m] @ q.astype(np.float32), self._float32_err
        scale = float(np.abs(q).max()) / 127.0
        q8 = np.clip(np.rint(q / scale), -127, 127).astype(np.int8)
        quantized = scale * q8.astype(np.float64)
        err = self._nu_max * float(np.linalg.norm(q - quantized)) + self._rho_max * float(np.linalg.norm(quantized))
        if m == 0:
            return np.empty(0, dtype=np.float32), err + _SLACK
        exact_in_f32 = 127 * 127 * d < 2**24  # integer dot products stay exact in float32
        # (simsimd's `out=` argument is avoided on purpose: it corrupts the refcount of None.)
        out_dtype = "float32" if exact_in_f32 else "float64"
        dots = self._simsimd.cdist(q8[None], self._x8[:m], metric="dot", out_dtype=out_dtype, threads=self.threads)
        approx = np.multiply(np.asarray(dots)[0], self._sx[:m], dtype=np.float32)
        approx *= np.float32(scale)
        return approx, err + _SLACK

    def _search_one(
        self, q: np.ndarray, k: int, max_s: float | None, min_c: float | None, exclude: int | None
    ) -> list[Hit]:
        n = len(self._ids)
        # Rows are sorted by strength (NaN last), so strength <= max_s is a prefix [0, m).
        no_max = max_s is None or max_s == math.inf
        m = n if no_max else int(np.searchsorted(self._strength, max_s, side="right"))
        approx, err = self._approx(q, m)
        if min_c is not None and min_c != -math.inf:
            np.putmask(approx, self._bad_mask(min_c)[:m], -np.inf)
        if exclude is not None and exclude < m:
            approx[exclude] = -np.inf
        lower = self._kth_lower_bound(approx, k)
        candidates = np.flatnonzero(approx >= max(lower - 2.0 * err, -3.0))  # disallowed rows are -inf
        return self._exact_top_k(candidates, q, k)

    @staticmethod
    def _kth_lower_bound(approx: np.ndarray, k: int) -> float:
        """A lower bound of the k-th largest value (-inf if there are fewer than k finite ones)."""
        m = len(approx)
        if m < k:
            return -math.inf
        if m < _MAXIMA_MIN_ROWS:
            return float(np.partition(approx, m - k)[m - k])
        # Block maxima are distinct elements, so the k-th largest of them is <= the k-th largest.
        full = m // _MAXIMA_BLOCK * _MAXIMA_BLOCK
        maxima = approx[:full].reshape(-1, _MAXIMA_BLOCK).max(axis=1)
        if full < m:
            maxima = np.append(maxima, approx[full:].max())
        if len(maxima) < k:
            return float(np.partition(approx, m - k)[m - k])
        return float(np.partition(maxima, len(maxima) - k)[len(maxima) - k])

    def _exact_top_k(self, candidates: np.ndarray, q: np.ndarray, k: int) -> list[Hit]:
        best_pos = np.empty(0, dtype=np.int64)
        best_score = np.empty(0, dtype=np.float64)
        for start in range(0, len(candidates), _RESCORE_BLOCK):
            pos = candidates[start : start + _RESCORE_BLOCK]
            # Elementwise product and row sums: identical rows always get identical scores.
            score = (self._x[pos].astype(np.float64) * q).sum(axis=1)
            if start:
                pos = np.concatenate([best_pos, pos])
                score = np.concatenate([best_score, score])
            keep = np.lexsort((self._id_rank[pos], -score))[:k]
            best_pos, best_score = pos[keep], score[keep]
        return [
            Hit(
                lora_id=self._ids[p],
                score=float(s),
                strength=float(self._strength[p]),
                consistency=float(self._consistency[p]),
                name=self._names[p],
                description=self._descriptions[p],
                trigger_words=list(self._triggers[p] or []),
            )
            for p, s in zip(best_pos.tolist(), best_score.tolist())
        ]
