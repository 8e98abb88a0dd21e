"""Measure tags, groups and duplicates against planted ground truth (the micro zoo's ``zoo.json``).

Targets (issue 15): top-1 tag = planted behaviour for >= 90% of behaviour LoRAs; groups against
planted behaviours reach adjusted Rand index >= 0.8; every planted near-duplicate pair is found and
no two LoRAs with different behaviours are called duplicates; the scale family is one family.
:func:`evaluate` computes every figure for every tag calibration, and :func:`choose_calibration`
picks the calibration by that measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from carlos_ray.behavior.duplicates import DuplicateCriteria, behavioural_duplicates
from carlos_ray.behavior.groups import group_directions
from carlos_ray.behavior.tags import CALIBRATIONS, assign_tags

TOP1_TARGET = 0.9
ARI_TARGET = 0.8


@dataclass
class Truth:
    """Planted ground truth by lora_id: behaviour per LoRA, near-duplicate pairs, scale families."""

    behaviour: dict[str, str]
    near_duplicates: list[tuple[str, str]] = field(default_factory=list)
    scale_families: list[list[str]] = field(default_factory=list)


def evaluate(
    ids: Sequence[str],
    directions: np.ndarray,
    strengths: np.ndarray,
    tag_vecs: np.ndarray,
    words: Sequence[str],
    truth: Truth,
    *,
    include: np.ndarray | None = None,
    min_cosine: float = 0.95,
    min_strength_ratio: float = 0.8,
    family_min_cosine: float | None = None,
    max_distance: float = 0.15,
    seed: int = 0,
) -> dict:
    """Every figure of the targets; ``include`` is the grouping's mask (e.g. inside the thresholds)."""
    from sklearn.metrics import adjusted_rand_score

    ids = list(ids)
    pos = {lid: i for i, lid in enumerate(ids)}
    missing = [lid for lid in truth.behaviour if lid not in pos]
    if missing:
        raise ValueError(f"{len(missing)} ground-truth LoRAs are not in the index, e.g. {missing[:3]}")
    rows = np.array([pos[lid] for lid in truth.behaviour])
    planted = [truth.behaviour[ids[r]] for r in rows]
    out: dict = {"behaviour_loras": len(rows), "tags": {}}
    for cal in CALIBRATIONS:
        res = assign_tags(directions, tag_vecs, calibration=cal)
        top1 = [words[t] if t >= 0 else None for t in res.top1[rows]]
        hits = [a == b for a, b in zip(top1, planted)]
        out["tags"][cal] = {"top1_accuracy": float(np.mean(hits)),
                            "misses": {ids[r]: {"planted": p, "top1": t} for r, p, t, h in zip(rows, planted, top1, hits) if not h}}
    g = group_directions(directions, include=include, seed=seed, max_distance=max_distance)
    labels = g.labels[rows]
    grouped = labels >= 0
    # an ungrouped LoRA (outside the thresholds) counts as its own singleton group
    labels = np.where(grouped, labels, -1 - np.arange(labels.size))
    out["groups"] = {"n_groups": g.n_groups, "ari": float(adjusted_rand_score(planted, labels)), "method": g.method,
                     "ungrouped_behaviour_loras": int((~grouped).sum())}
    rep = behavioural_duplicates(directions, strengths, DuplicateCriteria(min_cosine, min_strength_ratio, family_min_cosine))
    found = {frozenset((ids[p.a], ids[p.b])) for p in rep.pairs}
    planted_pairs = {frozenset(p) for p in truth.near_duplicates}
    wrong = [tuple(sorted(p)) for p in found if len({truth.behaviour.get(x) for x in p} - {None}) > 1]
    fam_found = []
    for fam in truth.scale_families:
        fset = set(fam)
        fam_found.append(any(fset <= {ids[m] for m in f.members} for f in rep.families))
    fam_as_dups = [tuple(sorted(p)) for p in found for fam in truth.scale_families if set(p) <= set(fam)]
    out["duplicates"] = {"pairs": len(found), "planted_pairs": len(planted_pairs),
                         "planted_found": len(found & planted_pairs), "missed": [tuple(sorted(p)) for p in planted_pairs - found],
                         "different_behaviour_pairs": wrong, "families": len(rep.families),
                         "scale_families_found": sum(fam_found), "scale_families_planted": len(truth.scale_families),
                         "scale_family_pairs_called_duplicates": fam_as_dups}
    out["calibration"] = choose_calibration(out)
    d = out["duplicates"]
    out["targets"] = {
        "top1": out["tags"][out["calibration"]]["top1_accuracy"] >= TOP1_TARGET,
        "ari": out["groups"]["ari"] >= ARI_TARGET,
        "duplicates": d["planted_found"] == d["planted_pairs"] and not d["different_behaviour_pairs"],
        "scale_family": d["scale_families_found"] == d["scale_families_planted"] and not d["scale_family_pairs_called_duplicates"],
    }
    return out


def choose_calibration(result: dict) -> str:
    """The calibration with the best top-1 accuracy (ties: the order of CALIBRATIONS, the default first)."""
    return max(CALIBRATIONS, key=lambda c: (result["tags"][c]["top1_accuracy"], -CALIBRATIONS.index(c)))


BEHAVIOUR_ROLES = ("style", "content", "near_duplicate", "scale_family")


def truth_from_zoo(doc: dict, index_ids: Sequence[str]) -> Truth:
    """Ground truth from a micro zoo's ``zoo.json`` (members with ``sha256``, ``role``, ``planted``, ``run``,
    ``behaviour``, ``scale``); a member's lora_id is its SHA-256's first 16 hex digits, as indexing names it.

    Behaviour LoRAs are the style, content, near-duplicate and scale-family members (label: the planted
    word); a near-duplicate pairs with the scale-1 member of the same behaviour from another run; a scale
    family is one run written at several scales."""
    members = doc.get("members")
    if not isinstance(members, list) or not members:
        raise ValueError("zoo.json has no 'members' list")
    have = set(index_ids)
    rows = []
    for m in members:
        lid = str(m["sha256"])[:16]
        if lid in have:
            rows.append({**m, "lora_id": lid})
    behaviour = {m["lora_id"]: m["planted"] for m in rows if m.get("role") in BEHAVIOUR_ROLES and m.get("planted")}
    pairs = []
    for m in rows:
        if m.get("role") != "near_duplicate":
            continue
        for o in rows:
            if (o["behaviour"] == m["behaviour"] and o["run"] != m["run"] and o.get("role") in ("style", "content")
                    and float(o.get("scale", 1.0)) == 1.0):
                pairs.append((m["lora_id"], o["lora_id"]))
    by_run: dict[str, list[dict]] = {}
    for m in rows:
        by_run.setdefault(m["run"], []).append(m)
    families = [[m["lora_id"] for m in sorted(ms, key=lambda m: float(m.get("scale", 1.0)))]
                for ms in by_run.values() if len({float(m.get("scale", 1.0)) for m in ms}) > 1]
    return Truth(behaviour, pairs, families)
