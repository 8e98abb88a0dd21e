"""Pixel oracles for the judge: images -> the set of attributes each image shows, without a learned model.

An oracle has `attributes(images: uint8 (B, H, W, 3)) -> list[set[str]]`; an attribute is a string
that a query's `attribute` field names (for the micro world: the caption grammar's attribute ids).
Registry: `create_oracle(name)`; an unknown name raises with the valid ones.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np


class Oracle(Protocol):
    def attributes(self, images: np.ndarray) -> list[set[str]]:
        ...


def _micro() -> Oracle:
    from carlos_ray.evaluation.micro import MicroOracle

    return MicroOracle()


ORACLES: dict[str, Callable[[], Oracle]] = {"micro": _micro}


def list_oracles() -> list[str]:
    return sorted(ORACLES)


def create_oracle(name: str) -> Oracle:
    """The oracle registered under `name`."""
    if name not in ORACLES:
        raise ValueError(f"unknown oracle {name!r}; valid: {list_oracles()}")
    return ORACLES[name]()
