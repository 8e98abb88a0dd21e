"""What a LoRA does, from its signature alone: behavioural tags, content groups and duplicates.

Pure functions over numpy arrays (directions, strengths, tag vectors); nothing here reads an index
or builds a model. Memory stays bounded at 100K signatures: similarities are computed a block of
rows at a time and never as an N×N matrix.

- :mod:`carlos_ray.behavior.duplicates`: exact (same SHA-256) and behavioural duplicates, scale families;
- :mod:`carlos_ray.behavior.groups`: cosine clustering of directions, the number of groups from the data;
- :mod:`carlos_ray.behavior.tags`: tag vocabularies, their reciprocal text vectors, calibrated tags.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["connected_components", "included_unit_rows", "unit_rows"]


def unit_rows(directions: np.ndarray, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(unit directions, valid mask): rows scaled to norm 1; zero or non-finite rows become 0 and invalid.

    Normalizes in float64 after dividing by each row's peak (no overflow), then casts to ``dtype``."""
    x = np.asarray(directions)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"directions must be a 2-D array (N, d) with d >= 1, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"directions must be real numbers, got dtype {x.dtype}")
    out = np.zeros(x.shape, dtype=dtype)
    valid = np.zeros(x.shape[0], dtype=bool)
    block = 8192
    for s in range(0, x.shape[0], block):
        b = x[s : s + block].astype(np.float64)
        finite = np.isfinite(b).all(axis=1)
        b[~finite] = 0.0
        peak = np.abs(b).max(axis=1, keepdims=True)
        np.divide(b, peak, out=b, where=peak > 0)
        norm = np.sqrt(np.einsum("ij,ij->i", b, b))[:, None]
        np.divide(b, norm, out=b, where=norm > 0)
        out[s : s + block] = b
        valid[s : s + block] = finite & (norm[:, 0] > 0)
    return out, valid


def included_unit_rows(directions: np.ndarray, include: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`unit_rows`, with the valid mask further restricted to ``include`` (bool, N) when given."""
    unit, valid = unit_rows(directions)
    if include is not None:
        include = np.asarray(include, dtype=bool)
        if include.shape != valid.shape:
            raise ValueError(f"include must have shape {valid.shape}, got {include.shape}")
        valid &= include
    return unit, valid


def connected_components(pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """The connected components of the graph with these edges (nodes that appear in no pair are not
    listed): each component sorted, components ordered by their smallest member. Union-find with path
    halving; the smaller root wins, so the result does not depend on the order of the pairs."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for x in list(parent):
        members.setdefault(find(x), []).append(x)
    return sorted((sorted(m) for m in members.values()), key=lambda m: m[0])
