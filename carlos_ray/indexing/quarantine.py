"""Quarantine of LoRAs that crash their generation actor: a small registry actor of who works on what.

An actor that Ray restarts reports in from `__init__`; the LoRA its previous incarnation had in flight gets a
crash. A LoRA with `max_crashes` crashes is quarantined: the generation stage emits an error for it instead of
running it again, and the driver rejects it as `worker_crashed` while the rest of the job goes on.
"""

from __future__ import annotations

from collections import defaultdict


class InflightRegistry:
    """Which LoRA each generation actor is working on, kept by a small actor on the driver's node.

    An actor that Ray restarts reports in from `__init__`; the LoRA its previous incarnation had in flight
    gets a crash. A LoRA with `max_crashes` crashes is quarantined: the stage emits an error for it instead of
    running it again, and the driver rejects it as `worker_crashed` while the rest of the job goes on."""

    def __init__(self, max_crashes: int):
        self.max_crashes = max_crashes
        self.inflight: dict[str, tuple[str, int]] = {}  # Ray actor id (stable across restarts) -> (lora_id, pid)
        self.crashes: dict[str, int] = defaultdict(int)

    def actor_started(self, actor_id: str) -> str | None:
        previous = self.inflight.pop(actor_id, None)
        if previous is None:
            return None
        self.crashes[previous[0]] += 1
        return previous[0]

    def begin(self, actor_id: str, pid: int, lora_id: str) -> int | None:
        """None: go ahead; else the LoRA's crash count (it is quarantined, do not run it)."""
        if self.crashes[lora_id] >= self.max_crashes:
            return self.crashes[lora_id]
        self.inflight[actor_id] = (lora_id, pid)
        return None

    def end(self, actor_id: str, lora_id: str) -> None:
        if self.inflight.get(actor_id, ("",))[0] == lora_id:
            del self.inflight[actor_id]

    def state(self) -> dict:
        return {"inflight": dict(self.inflight), "crashes": dict(self.crashes)}


REGISTRY_PREFIX = "carlos-ray-inflight-"
WORKER_CRASHED = "worker_crashed"


def start_registry(max_crashes: int):
    """The registry actor of one indexing run, pinned to the driver's node (it lives and dies with the job)."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(InflightRegistry).options(
        name=REGISTRY_PREFIX + uuid.uuid4().hex[:12], num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(max_crashes)
