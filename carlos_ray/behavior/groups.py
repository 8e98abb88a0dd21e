"""Content groups: LoRAs whose directions point the same way, found without a number of groups given.

How (and why):

1. **Sample.** At most ``sample_size`` valid directions (default 3000) are drawn with a seeded
   generator; below that every LoRA is in the sample. The sample's cosine-distance matrix
   (``sample_size² × 8`` bytes, 72 MB at 3000) is the only quadratic object, so memory is bounded
   whatever the index size.
2. **One tree, every cut.** scikit-learn's ``AgglomerativeClustering`` (average linkage on cosine
   distance, full tree) merges the sample once; cutting the tree after the first ``n - k`` merges
   gives the k-group partition for any k without re-clustering. Average linkage suits directions: a
   group is a set whose *mean* pairwise cosine is high, it does not chain like single linkage and,
   unlike k-means, needs no k up front.
3. **k from the data.** Each candidate k (all k up to 40, then a geometric grid up to
   ``max_groups``) is scored by the silhouette coefficient on the precomputed distances
   (``sklearn.metrics.silhouette_score``); the best k wins (the smallest on ties). Silhouette
   compares each LoRA's mean distance to its own group with the nearest other group: it rewards
   tight, separated groups and punishes both splitting a real group and merging two. Only cuts
   whose every merge lies within ``max_distance`` (average cosine distance, default 0.15, i.e. a
   mean cosine of at least 0.85 between merged groups) are candidates: silhouette alone would pair
   up unrelated loners (two LoRAs at cosine 0.2 still score above 0 when the rest are further), and
   a LoRA that does something nobody else does should stay alone. Why 0.15: on the micro zoo the
   LoRAs of one behaviour (two training seeds, a scale family at weights 0.8 / 1 / 1.4) have mean
   cosines of 0.87–0.98, while different behaviours that look alike reach 0.75–0.85 (grayscale and
   sepia, blur and pixelation, outline and tiling). Swept on that index (bench_behavior.py
   ``--zoo-only``), the adjusted Rand index against the planted behaviours is 0.66 / 1.00 / 0.56 /
   0.40 at 0.10 / 0.15 / 0.20 / 0.50. A fixed ``distance_threshold`` can be given instead (cut
   where average-linkage distance exceeds it).
4. **Assign the rest.** Group centroids are the normalized means of the sample members' unit
   directions; every LoRA outside the sample joins the centroid with the highest cosine, in
   blocks of ``block_rows`` rows (memory ``block_rows × k``).

Groups are numbered by size (largest first, ties by first member), so the result is a function of
the data and the seed alone. Zero or non-finite directions, and rows outside ``include``, get -1.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from carlos_ray.behavior import included_unit_rows

logger = logging.getLogger(__name__)

DENSE_GRID_MAX = 40


@dataclass
class Grouping:
    """Group label per row (-1: not grouped), unit centroids, and how k was chosen."""

    labels: np.ndarray
    centroids: np.ndarray
    silhouette: float | None
    sample_size: int
    method: str
    candidates: list[tuple[int, float]] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return int(self.centroids.shape[0])

    def members(self, group: int) -> np.ndarray:
        """Row positions of a group's members."""
        return np.flatnonzero(self.labels == group)


def _candidate_ks(n: int, max_groups: int) -> list[int]:
    top = min(max_groups, n - 1)
    if top < 2:
        return []
    ks = list(range(2, min(top, DENSE_GRID_MAX) + 1))
    k = float(DENSE_GRID_MAX)
    while k < top:
        k *= 1.15
        ks.append(min(top, int(round(k))))
    return sorted(set(ks))


def _cuts(children: np.ndarray, n: int, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Leaf labels (0..k-1 by first leaf) after the first n-k merges of a full agglomerative tree, for each k."""
    parent = list(range(2 * n - 1))

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    want = set(ks)
    out: dict[int, np.ndarray] = {}
    if n in want:
        out[n] = np.arange(n)
    for m, (a, b) in enumerate(children.tolist()):
        parent[find(a)] = n + m
        parent[find(b)] = n + m
        k = n - m - 1
        if k in want:
            roots = np.array([find(x) for x in range(n)])
            _, labels = np.unique(roots, return_inverse=True)
            out[k] = labels
        if k <= min(want, default=1):
            break
    return out


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered by group size (desc), ties by the first row of the group; -1 kept."""
    out = np.full(labels.shape, -1, dtype=np.int64)
    ids = [g for g in np.unique(labels) if g >= 0]
    key = sorted(ids, key=lambda g: (-int((labels == g).sum()), int(np.flatnonzero(labels == g)[0])))
    for new, g in enumerate(key):
        out[labels == g] = new
    return out


def group_directions(
    directions: np.ndarray,
    *,
    include: np.ndarray | None = None,
    sample_size: int = 3000,
    max_groups: int = 500,
    max_distance: float = 0.15,
    distance_threshold: float | None = None,
    seed: int = 0,
    block_rows: int = 8192,
) -> Grouping:
    """Cluster the rows of ``directions`` (N, d) by cosine (see the module docstring for the method)."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    if isinstance(sample_size, bool) or not isinstance(sample_size, (int, np.integer)) or sample_size < 2:
        raise ValueError(f"sample_size must be an integer >= 2, got {sample_size!r}")
    if isinstance(max_groups, bool) or not isinstance(max_groups, (int, np.integer)) or max_groups < 2:
        raise ValueError(f"max_groups must be an integer >= 2, got {max_groups!r}")
    if not (0.0 < float(max_distance) <= 2.0):
        raise ValueError(f"max_distance must be a cosine distance in (0, 2], got {max_distance!r}")
    if distance_threshold is not None and not (0.0 < float(distance_threshold) < 2.0):
        raise ValueError(f"distance_threshold must be a cosine distance in (0, 2), got {distance_threshold!r}")
    unit, valid = included_unit_rows(directions, include)
    pool = np.flatnonzero(valid)
    n_all = unit.shape[0]
    labels = np.full(n_all, -1, dtype=np.int64)
    if pool.size == 0:
        return Grouping(labels, np.zeros((0, unit.shape[1]), np.float32), None, 0, "empty")
    rng = np.random.default_rng(seed)
    sample = pool if pool.size <= sample_size else np.sort(rng.choice(pool, size=sample_size, replace=False))
    n = sample.size
    if n < 3:  # nothing to compare: each valid LoRA is its own group
        labels[sample] = np.arange(n)
        return Grouping(_renumber(labels), unit[sample].copy(), None, n, "trivial")

    s = unit[sample].astype(np.float64)
    dist = np.clip(1.0 - s @ s.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    dist = (dist + dist.T) / 2  # exactly symmetric for the tree and the silhouette

    candidates: list[tuple[int, float]] = []
    if distance_threshold is not None:
        model = AgglomerativeClustering(n_clusters=None, distance_threshold=float(distance_threshold),
                                        metric="precomputed", linkage="average")
        sample_labels = model.fit_predict(dist)
        k = int(sample_labels.max()) + 1
        sil = float(silhouette_score(dist, sample_labels, metric="precomputed")) if 2 <= k < n else None
        method = f"average linkage cut at cosine distance {float(distance_threshold):g}"
    else:
        model = AgglomerativeClustering(n_clusters=1, compute_full_tree=True, compute_distances=True,
                                        metric="precomputed", linkage="average")
        model.fit(dist)
        # no group may be looser than max_distance: only cuts at or below that merge height are candidates
        k_floor = max(1, n - int(np.searchsorted(np.maximum.accumulate(model.distances_), float(max_distance), side="right")))
        ks = [k for k in _candidate_ks(n, int(max_groups)) if k >= k_floor]
        if 2 <= k_floor <= n - 1 and k_floor not in ks:
            ks.insert(0, k_floor)
        cuts = _cuts(model.children_, n, ks or [k_floor])
        best_k, sil, sample_labels = None, -np.inf, None
        for k in ks:
            score = float(silhouette_score(dist, cuts[k], metric="precomputed"))
            candidates.append((k, score))
            if score > sil + 1e-12:
                best_k, sil, sample_labels = k, score, cuts[k]
        if sample_labels is None:  # no cut has 2..n-1 groups (e.g. nothing is within max_distance)
            best_k, sil, sample_labels = k_floor, None, cuts[k_floor]
        method = (f"average linkage, k = {best_k} by the best silhouette of {len(ks)} cuts with every merge "
                  f"within cosine distance {float(max_distance):g}")
    k = int(sample_labels.max()) + 1
    centroids = np.zeros((k, unit.shape[1]), dtype=np.float64)
    np.add.at(centroids, sample_labels, s)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids = np.divide(centroids, norms, out=np.zeros_like(centroids), where=norms > 0).astype(np.float32)

    labels[sample] = sample_labels
    rest = np.setdiff1d(pool, sample, assume_unique=True)
    for b in range(0, rest.size, block_rows):
        rows = rest[b : b + block_rows]
        labels[rows] = np.argmax(unit[rows] @ centroids.T, axis=1)
    new = _renumber(labels)
    # reorder centroids to the new numbering
    order = np.empty(k, dtype=np.int64)
    for old in range(k):
        hit = np.flatnonzero(labels == old)
        order[new[hit[0]]] = old
    logger.info("grouped %d directions (sample %d) into %d groups: %s", pool.size, n, k, method)
    return Grouping(new, centroids[order], None if sil is None or not np.isfinite(sil) else float(sil), n, method, candidates)


def shared_tags(
    labels: np.ndarray, member_tags: Sequence[Sequence[str]], *, min_share: float = 0.5, max_tags: int = 3
) -> dict[int, list[tuple[str, float]]]:
    """For each group, the tags carried by at least ``min_share`` of its members: ``[(tag, share), ...]``, most shared first."""
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f"min_share must be in (0, 1], got {min_share!r}")
    labels = np.asarray(labels)
    if len(member_tags) != labels.shape[0]:
        raise ValueError(f"member_tags has {len(member_tags)} entries for {labels.shape[0]} labels")
    out: dict[int, list[tuple[str, float]]] = {}
    for g in sorted(int(x) for x in np.unique(labels) if x >= 0):
        rows = np.flatnonzero(labels == g)
        counts = Counter(t for r in rows for t in set(member_tags[r]))
        shares = sorted(((t, c / rows.size) for t, c in counts.items()), key=lambda x: (-x[1], x[0]))
        out[g] = [(t, float(sh)) for t, sh in shares if sh >= min_share][:max_tags]
    return out
