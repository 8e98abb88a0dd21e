"""A static HTML report of an index: where its LoRAs sit in the Strength/Consistency plane.

:func:`build_report` writes, into one directory::

    index.html              the page (relative links only; open it from disk)
    scatter.png             Strength vs Consistency, filter thresholds, quadrant labels
    histograms.png          distributions of Strength and Consistency
    categories.png          per-category strength / within-category consistency (when the index has them)
    categories.csv          the same values, long format
    near_duplicates.csv     groups of LoRAs with nearly parallel directions and similar strengths
    signatures.csv          every signature (without the direction vector) with its quadrant
    grids/*.png             base vs LoRA thumbnails per LoRA (when the index kept thumbnails)

Quadrants are defined by the filter thresholds (the manifest's, else calibrated with
:func:`carlos_ray.thresholds.resolve_thresholds`): the filter keeps exactly the "focused" quadrant.
Matplotlib is used through ``Figure`` objects and the Agg canvas only, never ``pyplot``, so building
a report changes no global plotting state.

Rooms: ``analysis`` (thresholds, quadrants, near-duplicates, categories, the :class:`ReportPage` gathered),
``figures`` (the PNGs), ``html`` (the page and the CSV files), ``build`` (:func:`build_report`).
"""

from carlos_ray.report.analysis import (
    NEAR_DUPLICATE_MIN_COSINE,
    NEAR_DUPLICATE_STRENGTH_TOLERANCE,
    QUADRANTS,
    ReportPage,
    near_duplicate_groups,
    quadrant_labels,
    report_thresholds,
)
from carlos_ray.report.build import MAX_GRIDS, build_report
from carlos_ray.report.figures import draw_grid

__all__ = [
    "MAX_GRIDS", "NEAR_DUPLICATE_MIN_COSINE", "NEAR_DUPLICATE_STRENGTH_TOLERANCE", "QUADRANTS", "ReportPage",
    "build_report", "draw_grid", "near_duplicate_groups", "quadrant_labels", "report_thresholds",
]
