"""Tags, groups and duplicates of an index: what the CLI, the HTTP service and the report call.

- :func:`tag_index` computes the vocabulary's reciprocal text vectors with the index's own query
  encoder (cached in the index's ``tag_vectors`` table under :func:`~carlos_ray.behavior.tags.tag_cache_key`),
  tags every LoRA and stores the result in the ``tags`` table (one row per LoRA, replaced as a whole);
- :class:`BehaviorView` answers per-index questions on one loaded version: a LoRA's tags, the
  groups (computed once per version, lazily), a LoRA's duplicates, the index-wide duplicate list.
  It reads the unit-direction matrix the ranker already holds (no second copy).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa

from carlos_ray.behavior.duplicates import DuplicateCriteria, DuplicateReport, behavioural_duplicates, duplicates_of
from carlos_ray.behavior.groups import Grouping, group_directions, shared_tags
from carlos_ray.behavior.tags import (
    DEFAULT_CALIBRATION,
    TagVocabulary,
    assign_tags,
    tag_cache_key,
    tag_vectors,
)

logger = logging.getLogger(__name__)

TAGS_SCHEMA = pa.schema([
    ("lora_id", pa.string()),
    ("tags", pa.list_(pa.string())),
    ("tag_scores", pa.list_(pa.float64())),
    ("top1", pa.string()),
    ("calibration", pa.string()),
    ("vocabulary", pa.string()),
])
TAG_VECTORS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("vocabulary", pa.string()),
    ("tag", pa.string()),
    ("category", pa.string()),
    ("vector", pa.list_(pa.float32())),
])
ALIASES_SCHEMA = pa.schema([("sha256", pa.string()), ("lora_id", pa.string()), ("path", pa.string())])

DEFAULT_MIN_COSINE = 0.95
DEFAULT_MIN_STRENGTH_RATIO = 0.8


def default_vocabulary_name(manifest: Any) -> str:
    """``conf/tags/<config_name>.yaml`` when the index's profile ships one, else ``paper``."""
    from carlos_ray.paths import resolve_conf_path

    name = str(manifest.config_name or "")
    if name and "/" not in name:
        try:
            resolve_conf_path(Path("conf") / "tags" / f"{name}.yaml")
            return name
        except FileNotFoundError:
            pass
    return "paper"


def aliases_table(rows: list[dict]) -> pa.Table:
    """Table of exact duplicates found while indexing: ``{"sha256", "lora_id", "path"}`` per skipped copy."""
    return pa.Table.from_pylist([{k: r.get(k) for k in ("sha256", "lora_id", "path")} for r in rows], schema=ALIASES_SCHEMA)


def tag_index(
    index_uri: str,
    *,
    vocabulary: str | None = None,
    calibration: str = DEFAULT_CALIBRATION,
    load_encoder: Callable[[Any], Any] | None = None,
    **settings: Any,
) -> dict:
    """Tag every LoRA of the index and store the tags (and the cached tag vectors) in it.

    The tag vectors come from the index's cache, else from the query encoder ``load_encoder(manifest)``
    returns (called only when needed; the service layer passes
    :func:`carlos_ray.serving.loading.load_query_encoder`, which raises ``EncoderUnavailable`` when
    the weights are not on this machine). ``settings`` go
    to :func:`~carlos_ray.behavior.tags.assign_tags` (``max_tags``, ``min_shift``, ``z_min``, ``margin``, ``min_cosine``)."""
    from carlos_ray.store import Index

    index = Index(index_uri)
    snap = index.snapshot()
    manifest = snap.manifest
    vocab = TagVocabulary.from_file(vocabulary or default_vocabulary_name(manifest))
    table = snap.signatures()
    if table is None or table.num_rows == 0:
        raise ValueError(f"index {index_uri} holds no signatures; index some LoRAs first")
    key = tag_cache_key(vocab, manifest)
    vectors = cached_tag_vectors(snap, key, vocab)
    cached = vectors is not None
    if vectors is None:
        if load_encoder is None:
            raise ValueError(f"index {index_uri} has no cached vectors for the {vocab.name!r} tag vocabulary "
                             "and no query encoder was given to compute them")
        vectors = tag_vectors(load_encoder(manifest), vocab.tags)
    ids = table["lora_id"].to_pylist()
    directions = _directions(table)
    result = assign_tags(directions, vectors, calibration=calibration, **settings)
    words = vocab.tags
    rows = {
        "lora_id": ids,
        "tags": [[words[t] for t, _ in row] for row in result.tags],
        "tag_scores": [[float(s) for _, s in row] for row in result.tags],
        "top1": [words[t] if t >= 0 else None for t in result.top1.tolist()],
        "calibration": [calibration] * len(ids),
        "vocabulary": [vocab.name] * len(ids),
    }
    tagging = {"vocabulary": vocab.name, "calibration": calibration, "key": key, "settings": result.settings,
               "tags": len(words)}
    with index:
        if not cached:
            cat = vocab.category_of()
            vt = pa.table({"key": [key] * len(words), "vocabulary": [vocab.name] * len(words), "tag": words,
                           "category": [cat[w] for w in words],
                           "vector": pa.array(list(vectors.astype(np.float32)), type=pa.list_(pa.float32()))},
                          schema=TAG_VECTORS_SCHEMA)
            index.replace_table("tag_vectors", vt)
        m = index.replace_table("tags", pa.table(rows, schema=TAGS_SCHEMA), fields={"tagging": tagging})
    tagged = sum(1 for r in result.tags if r)
    logger.info("tagged %d of %d LoRAs with %d %s tags (%s; tag vectors %s)", tagged, len(ids), len(words), vocab.name,
                calibration, "cached" if cached else "computed")
    return {"index_version": int(m.version), "loras": len(ids), "tagged": tagged, "vectors_cached": cached, **tagging}


def cached_tag_vectors(snapshot: Any, key: str, vocab: TagVocabulary) -> np.ndarray | None:
    """The cached vectors of ``vocab`` under ``key`` (in vocabulary order), or None."""
    t = snapshot.table("tag_vectors")
    if t is None or t.num_rows == 0:
        return None
    import pyarrow.compute as pc

    rows = t.filter(pc.equal(t["key"], key))
    if rows.num_rows != len(vocab.tags):
        return None
    pos = {w: i for i, w in enumerate(rows["tag"].to_pylist())}
    if set(pos) != set(vocab.tags):
        return None
    vecs = np.array(rows["vector"].to_pylist(), dtype=np.float32)
    return vecs[[pos[w] for w in vocab.tags]]


def _directions(table: pa.Table) -> np.ndarray:
    import pyarrow.compute as pc

    col = table["direction"].combine_chunks()
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return flat.reshape(table.num_rows, -1)


if TYPE_CHECKING:
    from carlos_ray.config import BehaviorSpec


def behavior_settings(manifest: Any) -> "BehaviorSpec":
    """The index's :class:`~carlos_ray.config.BehaviorSpec` (its profile's, from the manifest; else the defaults)."""
    from carlos_ray.config import BehaviorSpec

    return BehaviorSpec.model_validate(getattr(manifest, "behavior", None) or {})


@dataclass
class GroupInfo:
    group: int
    members: list[str]
    tags: list[tuple[str, float]]
    cohesion: float


class BehaviorView:
    """Tags, groups and duplicates over one loaded index version (thread-safe; groups computed on first use)."""

    def __init__(self, ids: list[str], unit: np.ndarray, strength: np.ndarray, consistency: np.ndarray,
                 names: list[str | None], snapshot: Any, max_strength: float | None, min_consistency: float | None,
                 seed: int = 0):
        self.ids = ids
        self.unit = unit
        self.strength = np.asarray(strength, dtype=np.float64)
        self.consistency = np.asarray(consistency, dtype=np.float64)
        self.names = names
        self.pos = {lid: i for i, lid in enumerate(ids)}
        self.seed = seed
        self.tagging = snapshot.manifest.tagging if snapshot is not None else None
        self.settings = behavior_settings(snapshot.manifest if snapshot is not None else None)
        self.tags: dict[str, list[tuple[str, float]]] | None = None
        self.top1: dict[str, str | None] = {}
        t = snapshot.table("tags") if snapshot is not None else None
        if t is not None and t.num_rows:
            self.tags = {}
            for lid, words, scores, top in zip(t["lora_id"].to_pylist(), t["tags"].to_pylist(), t["tag_scores"].to_pylist(),
                                               t["top1"].to_pylist()):
                self.tags[lid] = list(zip(words or [], scores or []))
                self.top1[lid] = top
        self.vocabulary: list[str] | None = None
        v = snapshot.table("tag_vectors", columns=["key", "tag"]) if snapshot is not None and self.tags is not None else None
        if v is not None:
            key = (self.tagging or {}).get("key")
            self.vocabulary = [w for k, w in zip(v["key"].to_pylist(), v["tag"].to_pylist()) if k == key]
        self.aliases: dict[str, list[str]] = {}
        a = snapshot.table("aliases") if snapshot is not None else None
        if a is not None:
            for lid, path in zip(a["lora_id"].to_pylist(), a["path"].to_pylist()):
                if path not in self.aliases.setdefault(lid, []):
                    self.aliases[lid].append(path)
        ms = math.inf if max_strength is None else float(max_strength)
        mc = -math.inf if min_consistency is None else float(min_consistency)
        self.inside = (self.strength <= ms) & (self.consistency >= mc)
        self.thresholds = (max_strength, min_consistency)
        self._lock = threading.Lock()
        self._grouping: Grouping | None = None

    @classmethod
    def from_ranker(cls, ranker: Any, snapshot: Any, seed: int = 0) -> "BehaviorView":
        ids, unit, strength, consistency, names = ranker.matrix()
        return cls(ids, unit, strength, consistency, names, snapshot, ranker.max_strength, ranker.min_consistency, seed)

    # ---- tags ----------------------------------------------------------------------------------------
    @property
    def tagged(self) -> bool:
        return self.tags is not None

    def tags_of(self, lora_id: str) -> list[tuple[str, float]] | None:
        """The LoRA's tags, best first, or None when the index has no tags."""
        if self.tags is None:
            return None
        return list(self.tags.get(lora_id, []))

    def vocabulary_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in (self.tags or {}).values():
            for t, _ in row:
                counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items(), key=lambda x: (-x[1], x[0])))

    def with_tag(self, tag: str) -> set[str]:
        """lora_ids carrying ``tag`` (the index must be tagged)."""
        return {lid for lid, row in (self.tags or {}).items() if any(t == tag for t, _ in row)}

    # ---- groups --------------------------------------------------------------------------------------
    def grouping(self) -> Grouping:
        with self._lock:
            if self._grouping is None:
                # in lora_id order, so every view of the same index (service, report) numbers the groups alike
                order = np.argsort(np.array(self.ids, dtype=object), kind="stable")
                g = group_directions(self.unit[order], include=self.inside[order], seed=self.seed,
                                     max_distance=self.settings.group_max_distance)
                labels = np.empty_like(g.labels)
                labels[order] = g.labels
                g.labels = labels
                self._grouping = g
            return self._grouping

    def groups(self) -> tuple[Grouping, list[GroupInfo]]:
        """The grouping of the LoRAs inside the thresholds, each group with its shared tags and cohesion."""
        g = self.grouping()
        member_tags = [[t for t, _ in (self.tags or {}).get(lid, [])] for lid in self.ids]
        labelled = shared_tags(g.labels, member_tags) if self.tags is not None else {}
        out = []
        for k in range(g.n_groups):
            rows = g.members(k)
            cohesion = float((self.unit[rows].astype(np.float64) @ g.centroids[k].astype(np.float64)).mean())
            out.append(GroupInfo(k, [self.ids[r] for r in rows], labelled.get(k, []), cohesion))
        return g, out

    def group_of(self, lora_id: str) -> int:
        return int(self.grouping().labels[self.pos[lora_id]])

    # ---- duplicates ----------------------------------------------------------------------------------
    def duplicates(self, lora_id: str, min_cosine: float = DEFAULT_MIN_COSINE,
                   min_strength_ratio: float = DEFAULT_MIN_STRENGTH_RATIO) -> tuple[list, list]:
        """(behavioural duplicates, scale relatives) of one LoRA as (other lora_id, pair) lists."""
        row = self.pos[lora_id]
        dups, rel = duplicates_of(row, self.unit, self.strength, self.criteria(min_cosine, min_strength_ratio), unit=self.unit)

        def other(p):
            return self.ids[p.b if p.a == row else p.a]

        return [(other(p), p) for p in dups], [(other(p), p) for p in rel]

    def all_duplicates(self, min_cosine: float = DEFAULT_MIN_COSINE,
                       min_strength_ratio: float = DEFAULT_MIN_STRENGTH_RATIO) -> DuplicateReport:
        return behavioural_duplicates(self.unit, self.strength, self.criteria(min_cosine, min_strength_ratio))

    def criteria(self, min_cosine: float, min_strength_ratio: float) -> DuplicateCriteria:
        """A request's duplicate thresholds with this index's scale-family cosine."""
        return DuplicateCriteria(min_cosine, min_strength_ratio, self.family_cosine(min_cosine))

    def family_cosine(self, min_cosine: float) -> float:
        """The cosine that makes two LoRAs one scale family: the profile's, or a request's looser duplicate cosine."""
        return min(float(min_cosine), self.settings.family_min_cosine)


def evaluate_index(index_uri: str, zoo_doc: dict, vocabulary: str = "micro") -> dict:
    """:func:`carlos_ray.behavior.evaluate.evaluate` on a tagged index against a zoo's ``zoo.json`` document:
    groups over the LoRAs inside the index's default thresholds, tags from its cached vectors."""
    from carlos_ray.behavior.evaluate import evaluate, truth_from_zoo
    from carlos_ray.store import Index

    snap = Index(index_uri).snapshot()
    table = snap.signatures()
    vocab = TagVocabulary.from_file(vocabulary)
    vectors = cached_tag_vectors(snap, tag_cache_key(vocab, snap.manifest), vocab)
    if vectors is None:
        raise ValueError(f"index {index_uri} has no cached {vocab.name!r} tag vectors; run tag_index first")
    ids = table["lora_id"].to_pylist()
    s, c = table["strength"].to_numpy(), table["consistency"].to_numpy()
    th = dict(snap.manifest.thresholds or {})
    inside = (s <= (th.get("max_strength") or np.inf)) & (c >= (th.get("min_consistency") or -np.inf))
    b = behavior_settings(snap.manifest)
    return evaluate(ids, _directions(table), s, vectors, vocab.tags, truth_from_zoo(zoo_doc, ids), include=inside,
                    family_min_cosine=b.family_min_cosine, max_distance=b.group_max_distance)
