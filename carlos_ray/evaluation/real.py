"""What the published reference signatures say without a text encoder (directions, strength, consistency, metadata).

Definitions (printed with the figures by `benchmarks/bench_real_signatures.py`):

- **name tokens** of a LoRA: lower-cased ASCII words of its name, 3+ letters, minus `NAME_STOPWORDS`
  (base-model, format and version words: "sdxl", "lora", "style", "v2", ...);
- **name family** of a token: the LoRAs whose names hold it, for tokens held by 2 to `MAX_FAMILY`
  names (a rarer token is no family, a commoner one is a generic word);
- **model family**: LoRAs with the same Civitai model id (several versions of one published model);
- **similar precision@k**: for a LoRA in a family, the fraction of its k most similar directions
  (`Ranker.similar`, filters off) that are in one of its families; chance is the family's share of
  the other LoRAs;
- **different-looking name**: the nearest direction's name shares no name token with the LoRA's.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

NAME_STOPWORDS = frozenset(
    "sdxl sd15 lora loras lycoris locon model models style styles version final pony illustrious noob flux "
    "the and for with from by of xl1 xl10 base slider sliders concept".split())
MAX_FAMILY = 12


def name_tokens(name: str | None) -> frozenset[str]:
    words = re.findall(r"[a-z][a-z0-9]*", (name or "").lower())
    return frozenset(w for w in words if len(w) >= 3 and w not in NAME_STOPWORDS and not re.fullmatch(r"v\d+\w*|xl\w*|\d+\w*", w))


def families(table: pa.Table) -> tuple[list[set[int]], list[set[int]]]:
    """Per row: (name-family members, model-family members), each excluding the row itself."""
    names = table.column("name").to_pylist()
    tokens = [name_tokens(n) for n in names]
    holders: dict[str, list[int]] = defaultdict(list)
    for i, ts in enumerate(tokens):
        for t in ts:
            holders[t].append(i)
    name_fam: list[set[int]] = [set() for _ in names]
    for t, rows in holders.items():
        if 2 <= len(rows) <= MAX_FAMILY:
            for i in rows:
                name_fam[i].update(r for r in rows if r != i)
    models = table.column("civitai_model_id").to_pylist()
    by_model: dict[Any, list[int]] = defaultdict(list)
    for i, m in enumerate(models):
        if m is not None:
            by_model[m].append(i)
    model_fam = [set(r for r in by_model[m] if r != i) if m is not None else set() for i, m in enumerate(models)]
    return name_fam, model_fam


def real_signature_figures(table: pa.Table, max_strength: float = 9.8, min_consistency: float = 0.041,
                           k: int = 5) -> dict[str, Any]:
    """The figures of the module docstring for a signatures table (e.g. the imported reference)."""
    from carlos_ray.ranker import Ranker

    n = table.num_rows
    ranker = Ranker.from_table(table)
    ids = table.column("lora_id").to_pylist()
    row_of = {lid: i for i, lid in enumerate(ids)}
    names = table.column("name").to_pylist()
    tokens = [name_tokens(x) for x in names]
    strength = np.asarray(table.column("strength").to_numpy(zero_copy_only=False), float)
    consistency = np.asarray(table.column("consistency").to_numpy(zero_copy_only=False), float)
    name_fam, model_fam = families(table)
    inf = float("inf")

    nearest: dict[int, list[int]] = {}
    for i, lid in enumerate(ids):
        try:
            hits = ranker.similar(lid, k=k, max_strength=inf, min_consistency=-inf)
        except ValueError:  # a zero direction has no neighbours
            continue
        nearest[i] = [row_of[h.lora_id] for h in hits]

    def precision(fam: list[set[int]]) -> dict[str, float]:
        rows = [i for i in nearest if fam[i]]
        at1 = [float(nearest[i][0] in fam[i]) for i in rows]
        atk = [np.mean([j in fam[i] for j in nearest[i][:k]]) for i in rows]
        chance = [len(fam[i]) / (n - 1) for i in rows]
        return {"loras": len(rows), "P@1": float(np.mean(at1)) if rows else float("nan"),
                f"P@{k}": float(np.mean(atk)) if rows else float("nan"),
                "chance": float(np.mean(chance)) if rows else float("nan")}

    any_fam = [a | b for a, b in zip(name_fam, model_fam)]
    named = [i for i in nearest if tokens[i] and tokens[nearest[i][0]]]
    different = [i for i in named if not (tokens[i] & tokens[nearest[i][0]])]
    rng = np.random.default_rng(0)
    pairs = [(int(a), int(b)) for a, b in rng.integers(0, n, (20000, 2)) if a != b and tokens[a] and tokens[b]]
    chance_diff = float(np.mean([not (tokens[a] & tokens[b]) for a, b in pairs]))
    examples = [(names[i], names[nearest[i][0]]) for i in different[:8]]
    keep_s = strength <= max_strength
    keep_c = consistency >= min_consistency
    return {
        "n": n, "k": k,
        "thresholds": {"max_strength": max_strength, "min_consistency": min_consistency},
        "pass_strength": int(keep_s.sum()), "pass_consistency": int(keep_c.sum()), "pass_both": int((keep_s & keep_c).sum()),
        "zero_directions": n - len(nearest),
        "similar_name_family": precision(name_fam), "similar_model_family": precision(model_fam),
        "similar_any_family": precision(any_fam),
        "nearest_different_name": {"loras": len(named), "share": len(different) / len(named) if named else float("nan"),
                                   "chance": chance_diff, "examples": examples},
    }
