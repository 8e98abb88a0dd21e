"""The one owner of filter-threshold resolution: request > stored (manifest or config) > calibration.

Every caller asks :func:`resolve_thresholds`: the indexing run (the config's values, else calibrated from the
index's own distribution, written to the manifest), the ranker and the service (a request's override, else
the manifest's default), and the report (the manifest's, else calibrated). Each threshold is resolved on its
own; ``source`` says where the pair came from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)

# The paper's thresholds (ViT-B/32 raw features) and the fraction of the 740 published reference
# LoRAs each one keeps: strength <= 9.8 keeps 719 of 740, consistency >= 0.041 keeps 536 of 740.
PAPER_MAX_STRENGTH = 9.8
PAPER_MIN_CONSISTENCY = 0.041
PAPER_KEEP_STRENGTH = 719 / 740
PAPER_KEEP_CONSISTENCY = 536 / 740


@dataclass(frozen=True)
class Thresholds:
    """Filter thresholds (``None``: no filter on that statistic) and where they came from."""

    max_strength: float | None
    min_consistency: float | None
    source: str
    rule: str | None = None

    def describe(self) -> str:
        def fmt(v: float | None) -> str:
            return "none" if v is None else f"{v:.4g}"

        return f"strength <= {fmt(self.max_strength)}, consistency >= {fmt(self.min_consistency)} ({self.source})"

    def as_manifest(self) -> dict[str, Any]:
        """The manifest's ``thresholds`` entry."""
        out: dict[str, Any] = {"max_strength": self.max_strength, "min_consistency": self.min_consistency,
                               "source": self.source}
        if self.rule is not None:
            out["rule"] = self.rule
        return out

    def for_display(self) -> tuple[float | None, float | None]:
        """(max_strength, min_consistency) as responses show them: an infinite strength limit is no limit (None)."""
        ms = self.max_strength
        return (None if ms is None or math.isinf(ms) else ms), self.min_consistency


def resolve_thresholds(
    max_strength: float | None = None,
    min_consistency: float | None = None,
    *,
    stored: Mapping[str, Any] | None = None,
    calibrate_from: tuple[Any, Any] | None = None,
) -> Thresholds:
    """Each threshold from the request (the two arguments), else ``stored`` (a manifest's ``thresholds`` or a
    config's defaults, with its ``source``), else calibrated from ``calibrate_from = (strength, consistency)``
    (:func:`calibrate_thresholds`), else None."""
    stored = stored or {}
    picked: dict[str, tuple[float | None, str]] = {}
    for key, requested in (("max_strength", max_strength), ("min_consistency", min_consistency)):
        if requested is not None:
            picked[key] = (float(requested), "request")
        elif stored.get(key) is not None:
            picked[key] = (float(stored[key]), "stored")
        else:
            picked[key] = (None, "missing")
    missing = [k for k, (_, where) in picked.items() if where == "missing"]
    rule = None
    if missing and calibrate_from is not None:
        try:
            cal = calibrate_thresholds(*calibrate_from)
        except ValueError as e:
            logger.warning("thresholds cannot be calibrated: %s", e)
        else:
            rule = cal["rule"]
            for key in missing:
                picked[key] = (float(cal[key]), "calibrated")
    return Thresholds(picked["max_strength"][0], picked["min_consistency"][0],
                      _source(picked, stored.get("source")), rule)


def _source(picked: dict[str, tuple[float | None, str]], stored_source: str | None) -> str:
    wheres = [where for _, where in picked.values()]
    if all(w == "missing" for w in wheres):
        return "none"
    if all(w == "calibrated" for w in wheres):
        return "calibrated"
    if all(w in ("stored", "missing") for w in wheres):
        return stored_source or "manifest"
    if "request" in wheres:
        return "request"
    parts = [stored_source or "manifest"] if "stored" in wheres else []
    parts += [f"{key.split('_')[1]} calibrated" for key, (_, w) in picked.items() if w == "calibrated"]
    return ", ".join(parts)


def calibrate_thresholds(strength: Any, consistency: Any) -> dict[str, Any]:
    """Thresholds for a new index that keep the same fractions the paper's thresholds keep.

    Rule: the paper's ``max_strength = 9.8`` keeps 719/740 (97.2%) of the published reference
    LoRAs and ``min_consistency = 0.041`` keeps 536/740 (72.4%). On a new index (other encoder,
    generator or prompt set, where the feature scale differs) we keep the same fractions:
    each keeps the count of LoRAs nearest to its fraction, ``round(f n)`` (at least 1): ``max_strength``
    is the ``round(f_s n)``-th smallest strength, ``min_consistency`` the ``round(f_c n)``-th largest
    consistency (order statistics, so on the reference itself they keep exactly 719 and 536 LoRAs).
    Nearest, not "at least": on a small index (23 LoRAs keep 22.3 by strength) rounding up would keep
    every LoRA and filter nothing.
    Non-finite values are ignored; raises ``ValueError`` if nothing finite is left.
    """
    result: dict[str, Any] = {}
    for key, values, keep in (
        ("max_strength", strength, PAPER_KEEP_STRENGTH),
        ("min_consistency", consistency, PAPER_KEEP_CONSISTENCY),
    ):
        arr = np.asarray(values, dtype=np.float64).ravel()
        arr = np.sort(arr[np.isfinite(arr)])
        if arr.size == 0:
            raise ValueError(f"cannot calibrate {key}: no finite values among {np.size(values)} given")
        count = math.floor(keep * arr.size + 0.5 + 1e-9)  # rows to keep: the nearest count, at least 1
        count = min(max(count, 1), arr.size)
        result[key] = float(arr[count - 1] if key == "max_strength" else arr[arr.size - count])
    result["source"] = "calibrated"
    result["rule"] = (
        f"keep the paper's fractions of the reference LoRAs: strength <= the {PAPER_KEEP_STRENGTH:.4f} "
        f"order-statistic quantile, consistency >= the {1 - PAPER_KEEP_CONSISTENCY:.4f} one"
    )
    return result
