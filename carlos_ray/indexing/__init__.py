"""Indexing a LoRA zoo on Ray Data, one room per job:

- ``sources``: directories, files and manifests -> inspected :class:`LoraJob` s and reject records;
- ``plan``: :class:`IndexPlan`, everything derived from a config before a model runs (prompts, seeds, hashes,
  rows), and the tables a LoRA's result becomes;
- ``stages``: the Ray Data stages :class:`GenerateImages` and :class:`EmbedDiff` and their actor pools;
- ``quarantine``: the registry actor that quarantines LoRAs crashing their generation actor;
- ``driver``: :class:`IndexDriver` (skip lists, base pass, the streaming :class:`LoraPass`, commits, retries)
  and :func:`run_index`;
- ``inprocess``: :func:`signatures_in_process`, the same signatures by a plain loop (tests, benchmarks).
"""

from carlos_ray.indexing.driver import (
    COMPACT_AFTER_PARTS,
    IncompletePass,
    IndexDriver,
    IndexSummary,
    LoraPass,
    is_system_failure,
    retry_passes,
    run_index,
)
from carlos_ray.indexing.inprocess import signatures_in_process
from carlos_ray.indexing.plan import IndexPlan, base_array, lora_prompt
from carlos_ray.indexing.quarantine import REGISTRY_PREFIX, WORKER_CRASHED
from carlos_ray.indexing.sources import LoraJob, collect_sources, inspect_paths
from carlos_ray.indexing.stages import EmbedDiff, GenerateImages

__all__ = [
    "COMPACT_AFTER_PARTS", "EmbedDiff", "GenerateImages", "IncompletePass", "IndexDriver", "IndexPlan", "IndexSummary",
    "LoraJob", "LoraPass", "REGISTRY_PREFIX", "WORKER_CRASHED", "base_array", "collect_sources", "inspect_paths",
    "is_system_failure", "lora_prompt", "retry_passes", "run_index", "signatures_in_process",
]
