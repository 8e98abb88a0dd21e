"""Duplicate LoRAs: the same file under several names, and different files that do the same thing.

*Exact* duplicates share a SHA-256: indexing keeps the first copy it meets and indexes it once;
:func:`exact_duplicates` lists every copy per hash.

*Behavioural* duplicates have directions that are nearly parallel (``cosine >= min_cosine``) **and**
similar strengths (``min(s_a, s_b) / max(s_a, s_b) >= min_strength_ratio``). Each pair gets
``score = cosine * strength_ratio`` (1 for identical signatures). Parallel directions with clearly
different strengths are the same effect at another scale, not a duplicate: the connected components
of the "parallel" graph (``cosine >= family_min_cosine``, by default ``min_cosine``) whose strengths
span more than ``1 / min_strength_ratio`` are reported as *scale families* (members in strength
order). A profile whose model turns a LoRA's direction as its weight changes sets a lower family
cosine (``behavior.family_min_cosine``; the micro world: 0.88, from benchmarks/bench_scale_response.py:
its grayscale LoRA at weights 0.8 / 1.4 has cosine 0.903 / 0.915 to itself at 1, while the two
closest LoRAs of different behaviours, grayscale and sepia, reach 0.85).

Parallel pairs come from a blocked scan of the unit-direction matrix: one block of ``block_rows``
rows against the rows after it (upper triangle only), float32 BLAS, candidates kept above the
threshold minus a rounding slack and rescored in float64. Peak extra memory is
``block_rows × N × 4`` bytes (256 rows × 100K = 100 MB), never N×N. Each LoRA keeps at most
``max_neighbors`` partners (the most similar; a warning says when the cap cut any).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from carlos_ray.behavior import connected_components, included_unit_rows, unit_rows

logger = logging.getLogger(__name__)

_SLACK = 1e-5  # float32 cosine error bound for d <= ~4096 unit vectors, with margin


@dataclass(frozen=True)
class ExactDuplicate:
    """Copies of one file (same SHA-256): ``indexed_path`` is the one indexed, ``other_paths`` the rest."""

    sha256: str
    indexed_path: str
    other_paths: list[str]


@dataclass(frozen=True)
class DuplicatePair:
    """Two LoRAs (row positions ``a < b``) that do the same thing at the same strength."""

    a: int
    b: int
    cosine: float
    strength_ratio: float
    score: float


@dataclass(frozen=True)
class ScaleFamily:
    """LoRAs with parallel directions and different strengths, in increasing strength."""

    members: list[int]
    strengths: list[float]
    min_cosine: float  # the smallest cosine of the parallel pairs that join the family

    @property
    def strength_span(self) -> float:
        """Largest over smallest strength of the family."""
        lo = self.strengths[0]
        return float("inf") if lo <= 0 else self.strengths[-1] / lo


@dataclass
class DuplicateReport:
    """Behavioural duplicate pairs (best score first) and scale families (largest first)."""

    pairs: list[DuplicatePair]
    families: list[ScaleFamily]
    parallel_pairs: int = 0
    capped_rows: int = 0
    settings: dict = field(default_factory=dict)


def exact_duplicates(records: Iterable[tuple[str, str]]) -> list[ExactDuplicate]:
    """Group ``(path, sha256)`` records (in indexing order) by hash; hashes with more than one path.

    The first path of a hash is the copy that is indexed; repeated identical paths count once."""
    by_hash: dict[str, list[str]] = {}
    for item in records:
        try:
            path, sha = item
        except (TypeError, ValueError):
            raise ValueError(f"each record must be a (path, sha256) pair, got {item!r:.80}") from None
        if not isinstance(sha, str) or not sha:
            raise ValueError(f"record for {path!r} has no sha256")
        paths = by_hash.setdefault(sha.lower(), [])
        if str(path) not in paths:
            paths.append(str(path))
    return [ExactDuplicate(sha, paths[0], paths[1:]) for sha, paths in by_hash.items() if len(paths) > 1]


@dataclass(frozen=True)
class DuplicateCriteria:
    """What makes two LoRAs behavioural duplicates (cosine >= ``min_cosine`` and strength ratio >=
    ``min_strength_ratio``) and what makes them parallel, one scale family (cosine >= ``family_min_cosine``;
    ``None``: ``min_cosine``). Checked on construction: a bad value raises ValueError naming it."""

    min_cosine: float = 0.95
    min_strength_ratio: float = 0.8
    family_min_cosine: float | None = None

    def __post_init__(self) -> None:
        for name, v in (("min_cosine", self.min_cosine), ("min_strength_ratio", self.min_strength_ratio),
                        ("family_min_cosine", self.family_min_cosine)):
            if v is None and name == "family_min_cosine":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not 0.0 < float(v) <= 1.0:
                what = " (smaller over larger strength)" if name == "min_strength_ratio" else ""
                raise ValueError(f"{name} must be a number in (0, 1]{what}, got {v!r}")

    @property
    def family(self) -> float:
        """The cosine that makes two LoRAs parallel."""
        return float(self.min_cosine if self.family_min_cosine is None else self.family_min_cosine)

    @property
    def scan(self) -> float:
        """The smallest cosine either test needs: the candidate pairs' floor."""
        return min(float(self.min_cosine), self.family)

    def settings(self) -> dict:
        return {"min_cosine": float(self.min_cosine), "min_strength_ratio": float(self.min_strength_ratio),
                "family_min_cosine": self.family}


def parallel_pairs(
    unit: np.ndarray, min_cosine: float, *, max_neighbors: int = 64, block_rows: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """All pairs ``i < j`` of rows of ``unit`` (unit vectors, invalid rows zero) with float32 cosine >= ``min_cosine - slack``.

    Returns ``(i, j, approximate cosine, rows capped)``; at most ``max_neighbors`` partners ``j`` per ``i``."""
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine!r}")
    if max_neighbors < 1 or block_rows < 1:
        raise ValueError(f"max_neighbors and block_rows must be >= 1, got {max_neighbors}, {block_rows}")
    u = np.ascontiguousarray(unit, dtype=np.float32)
    n = u.shape[0]
    thr = np.float32(min_cosine - _SLACK)
    out_i, out_j, out_c = [], [], []
    capped = 0
    for s in range(0, n, block_rows):
        e = min(n, s + block_rows)
        sims = u[s:e] @ u[s:].T  # (rows, n - s): the upper part only
        local = np.arange(e - s)
        diag = sims[:, : e - s]  # a view: j <= i inside the diagonal block
        diag[local[:, None] >= local[None, :]] = -np.inf
        rows, cols = np.nonzero(sims >= thr)
        if rows.size == 0:
            continue
        vals = sims[rows, cols]
        counts = np.bincount(rows, minlength=e - s)
        if counts.max() > max_neighbors:
            keep = np.ones(rows.size, dtype=bool)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            for r in np.flatnonzero(counts > max_neighbors):
                seg = slice(starts[r], starts[r] + counts[r])
                order = np.argsort(-vals[seg], kind="stable")
                drop = order[max_neighbors:] + starts[r]
                keep[drop] = False
                capped += 1
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        out_i.append(rows + s)
        out_j.append(cols + s)
        out_c.append(vals)
    if capped:
        logger.warning("%d LoRAs have more than %d parallel partners; kept the %d most similar of each",
                       capped, max_neighbors, max_neighbors)
    if not out_i:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32), capped
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_c), capped


def _exact_cosines(directions: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """float64 cosines of the given row pairs, from the raw directions (``chunk`` pairs at a time: bounded memory)."""
    out = np.empty(len(i), dtype=np.float64)
    for s in range(0, len(i), chunk):
        a = np.asarray(directions[i[s : s + chunk]], dtype=np.float64)
        b = np.asarray(directions[j[s : s + chunk]], dtype=np.float64)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        out[s : s + chunk] = np.einsum("ij,ij->i", a, b)
    return out


def strength_ratio(sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """min/max of two strength arrays (1 when both are 0, NaN when either is NaN or negative)."""
    sa, sb = np.asarray(sa, dtype=np.float64), np.asarray(sb, dtype=np.float64)
    lo, hi = np.minimum(sa, sb), np.maximum(sa, sb)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(hi > 0, lo / hi, np.where(hi == 0, 1.0, np.nan))
    return np.where((lo < 0) | np.isnan(sa) | np.isnan(sb), np.nan, r)


def behavioural_duplicates(
    directions: np.ndarray, strengths: np.ndarray, criteria: DuplicateCriteria = DuplicateCriteria(), *,
    include: np.ndarray | None = None, max_neighbors: int = 64, block_rows: int = 256,
) -> DuplicateReport:
    """Behavioural duplicate pairs and scale families among the rows of ``directions`` (N, d), by ``criteria``.

    ``include`` (bool, N) restricts the scan (e.g. to LoRAs inside the index thresholds); zero or
    non-finite directions never pair."""
    min_cosine, min_strength_ratio, fam_cos = criteria.min_cosine, criteria.min_strength_ratio, criteria.family
    directions = np.asarray(directions)
    strengths = np.asarray(strengths, dtype=np.float64)
    if directions.ndim != 2 or strengths.shape != (directions.shape[0],):
        raise ValueError(f"directions must be (N, d) and strengths (N,); got {directions.shape} and {strengths.shape}")
    unit, valid = included_unit_rows(directions, include)
    unit[~valid] = 0.0
    scan = criteria.scan
    i, j, _, capped = parallel_pairs(unit, scan, max_neighbors=max_neighbors, block_rows=block_rows)
    cos = _exact_cosines(directions, i, j)
    keep = cos >= scan
    i, j, cos = i[keep], j[keep], cos[keep]
    ratio = strength_ratio(strengths[i], strengths[j])

    dup = (cos >= min_cosine) & (ratio >= min_strength_ratio)
    pairs = [DuplicatePair(int(a), int(b), float(c), float(r), float(c * r))
             for a, b, c, r in zip(i[dup], j[dup], cos[dup], ratio[dup])]
    pairs.sort(key=lambda p: (-p.score, p.a, p.b))

    par = cos >= fam_cos
    families = _families(i[par], j[par], cos[par], strengths, min_strength_ratio)
    settings = {**criteria.settings(), "max_neighbors": int(max_neighbors)}
    return DuplicateReport(pairs, families, parallel_pairs=int(par.sum()), capped_rows=capped, settings=settings)


def _families(i: np.ndarray, j: np.ndarray, cos: np.ndarray, strengths: np.ndarray, min_ratio: float) -> list[ScaleFamily]:
    """Connected components of the parallel graph whose strengths span more than 1 / min_ratio."""
    comps = connected_components(zip(i.tolist(), j.tolist()))
    comp_of = {x: k for k, members in enumerate(comps) for x in members}
    min_cos: dict[int, float] = {}
    for a, c in zip(i.tolist(), cos.tolist()):
        k = comp_of[a]
        min_cos[k] = min(min_cos.get(k, 1.0), c)
    families = []
    for root, members in enumerate(comps):
        s = strengths[members]
        if len(members) < 2 or not np.isfinite(s).all():
            continue
        lo, hi = float(s.min()), float(s.max())
        if hi <= 0 or lo / hi >= min_ratio:  # all the same strength: duplicates, not a family
            continue
        order = np.argsort(s, kind="stable")
        fam = [members[k] for k in order]
        families.append(ScaleFamily(fam, [float(strengths[m]) for m in fam], float(min_cos[root])))
    families.sort(key=lambda f: (-len(f.members), f.members[0]))
    return families


def duplicates_of(
    row: int, directions: np.ndarray, strengths: np.ndarray, criteria: DuplicateCriteria = DuplicateCriteria(), *,
    include: np.ndarray | None = None, unit: np.ndarray | None = None,
) -> tuple[list[DuplicatePair], list[DuplicatePair]]:
    """(duplicates, scale relatives) of one row, by ``criteria``: other rows with ``cosine >= min_cosine`` and a
    similar strength, and the other rows parallel to it at ``cosine >= family_min_cosine``:
    the same effect at another strength, or a looser variant of it (its scale family's neighbours).

    ``unit`` may pass precomputed unit directions (e.g. the ranker's matrix) to skip normalizing."""
    min_cosine, min_strength_ratio, fam_cos, scan = criteria.min_cosine, criteria.min_strength_ratio, criteria.family, criteria.scan
    directions = np.asarray(directions)
    strengths = np.asarray(strengths, dtype=np.float64)
    n = directions.shape[0]
    if not 0 <= row < n:
        raise IndexError(f"row {row} out of range for {n} LoRAs")
    if unit is None:
        unit, valid = unit_rows(directions)
    else:
        valid = np.linalg.norm(unit, axis=1) > 0
    if include is not None:
        valid = valid & np.asarray(include, dtype=bool)
    if not valid[row]:
        return [], []
    sims = unit @ unit[row].astype(unit.dtype)
    sims[~valid] = -np.inf
    sims[row] = -np.inf
    cand = np.flatnonzero(sims >= scan - _SLACK)
    cos = _exact_cosines(directions, np.full(cand.size, row), cand)
    keep = cos >= scan
    cand, cos = cand[keep], cos[keep]
    ratio = strength_ratio(np.full(cand.size, strengths[row]), strengths[cand])
    dups, rel = [], []
    for b, c, r in zip(cand.tolist(), cos.tolist(), ratio.tolist()):
        if not np.isfinite(r):  # a NaN strength: neither a duplicate nor a relative
            continue
        a, bb = min(row, b), max(row, b)
        pair = DuplicatePair(a, bb, float(c), float(r), float(c * r))
        if r >= min_strength_ratio and c >= min_cosine:
            dups.append(pair)
        elif c >= fam_cos:
            rel.append(pair)
    dups.sort(key=lambda p: (-p.score, p.a, p.b))
    rel.sort(key=lambda p: (-p.cosine, p.a, p.b))
    return dups, rel


# ---- names -------------------------------------------------------------------------------------------
_BRACKETS = re.compile(r"[\(\[\{（【《「『<][^\)\]\}）】》」』>]*[\)\]\}）】》」』>]")
_MARKERS = {
    "xl", "sdxl", "sd", "sd1", "sd15", "sd1.5", "1.5", "lora", "loras", "lycoris", "locon", "loha", "lokr", "dora",
    "pony", "illustrious", "illu", "il", "flux", "f1d", "for", "by", "and", "the", "a", "of", "style", "model",
    "final", "real", "v", "version", "full", "base", "turbo", "1.0", "10",
}
_VERSION = re.compile(r"^(v|ver)?\d+([._]\d+)*[a-z]?$")
NAME_STEM_DEFINITION = (
    "name stem = the first word of the name that is not a marker: lower-cased, bracketed parts removed "
    "((), [], 【】, 《》, ...), split on anything that is not a letter or digit, dropping version tokens "
    "(v2, 1.0, 244808) and the words " + ", ".join(sorted(_MARKERS)) + ", and an 'xl' / 'sdxl' glued to the end "
    "of a word (ParchartXL -> parchart); two LoRAs share a stem when both stems are non-empty and equal"
)


def name_stem(name: str | None) -> str:
    """The stem of a LoRA name (see ``NAME_STEM_DEFINITION``); '' when nothing is left."""
    if not name:
        return ""
    text = _BRACKETS.sub(" ", str(name).lower())
    for token in re.split(r"[^\w.]+|_", text):
        token = token.strip(".")
        if not token or token in _MARKERS or _VERSION.match(token):
            continue
        for suffix in ("sdxl", "xl"):
            if token.endswith(suffix) and len(token) > len(suffix) + 2:
                token = token[: -len(suffix)]
                break
        if token and token not in _MARKERS:
            return token
    return ""
