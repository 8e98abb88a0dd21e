"""Following an index: the current loaded version, swapped as a whole when the manifest's version changes.

:class:`IndexWatcher` polls the manifest (one ``stat`` per period) and, when its ``version`` changes, builds
the new ranker completely before swapping one reference: a request that already holds the old state finishes
on it, the next one sees the new index. :class:`FixedIndex` is one version that never changes (the CLI).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from carlos_ray.behavior.index import BehaviorView
from carlos_ray.ranker import Ranker
from carlos_ray.serving.loading import ranker_from_snapshot
from carlos_ray.store import MANIFEST, Index, Manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexState:
    """One loaded index version: swapped as a whole, never mutated."""

    ranker: Ranker
    manifest: Manifest
    loaded_at: float
    behavior: BehaviorView | None = None

    @property
    def version(self) -> int:
        return self.manifest.version


class IndexWatcher:
    """Holds the current :class:`IndexState` of an index and swaps in newer versions.

    ``refresh()`` stats the manifest (one metadata call); only when it changed is the manifest read,
    and only when its ``version`` differs is a new Ranker built, completely, before the reference
    swap. Readers take ``watcher.state`` once per request and keep using it."""

    def __init__(self, index_uri: str, poll_seconds: float = 2.0):
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds!r}")
        self.index = Index(index_uri)
        self.poll_seconds = float(poll_seconds)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.reloads = 0
        stamp = self._stamp()
        snap = self.index.snapshot()
        ranker = ranker_from_snapshot(snap, index_uri)
        self._state = IndexState(ranker, snap.manifest, time.time(), BehaviorView.from_ranker(ranker, snap))
        self._seen = stamp

    @property
    def state(self) -> IndexState:
        return self._state

    def _stamp(self) -> tuple | None:
        import pyarrow.fs as pafs

        info = self.index.fs.get_file_info(f"{self.index.root}/{MANIFEST}")
        if info.type != pafs.FileType.File or info.mtime_ns is None:
            return None  # unknown: read the manifest every time
        return (info.mtime_ns, info.size)

    def refresh(self, force: bool = False) -> bool:
        """Load a newer index version if there is one (``force``: rebuild even at the same version). True if swapped."""
        with self._lock:
            stamp = self._stamp()
            if not force and stamp is not None and stamp == self._seen:
                return False
            snap = self.index.snapshot()
            if not force and snap.manifest.version == self._state.manifest.version:
                self._seen = stamp
                return False
            t0 = time.perf_counter()
            ranker = ranker_from_snapshot(snap, self.index.uri)
            behavior = BehaviorView.from_ranker(ranker, snap)
            self._state = IndexState(ranker, snap.manifest, time.time(), behavior)  # the swap: one reference assignment
            self._seen = stamp
            self.reloads += 1
            self.last_error = None
            logger.info("index %s: now serving version %s (%d LoRAs, built in %.2f s)", self.index.uri,
                        snap.manifest.version, len(ranker), time.perf_counter() - t0)
            return True

    def start(self) -> None:
        """Poll in a daemon thread every ``poll_seconds``; failures keep the current version and are retried."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.refresh()
                except Exception as e:  # keep serving the version we have
                    msg = f"{type(e).__name__}: {e}"
                    if msg != self.last_error:
                        logger.warning("index %s: reload failed, still serving version %s: %s", self.index.uri,
                                       self._state.version, msg)
                    self.last_error = msg

        self._thread = threading.Thread(target=loop, name="carlos-ray-index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class FixedIndex:
    """One loaded index version that never changes (the CLI answers a single request from it)."""

    def __init__(self, ranker: Ranker, manifest: Manifest, snapshot: Any = None):
        self.state = IndexState(ranker, manifest, time.time(), BehaviorView.from_ranker(ranker, snapshot))
        self.last_error: str | None = None

    def refresh(self, force: bool = False) -> bool:
        return False


def load_fixed_index(index_uri: str) -> FixedIndex:
    """One consistent snapshot of the index as a FixedIndex: its ranker, manifest, tags and exact copies."""
    snap = Index(index_uri).snapshot()
    return FixedIndex(ranker_from_snapshot(snap, index_uri), snap.manifest, snap)
