"""HTTP/CLI shapes of tags, groups and duplicates: request checks (ServiceError, 4xx) and response models.

The ranker side of the service calls :func:`groups_response`, :func:`duplicates_response`,
:func:`tags_response` and :func:`check_tag` with the :class:`~carlos_ray.behavior.index.BehaviorView`
of the index version it serves; the CLI prints the same dicts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from carlos_ray.behavior.duplicates import DuplicateCriteria
from carlos_ray.behavior.index import DEFAULT_MIN_COSINE, DEFAULT_MIN_STRENGTH_RATIO, BehaviorView

TAGS_NOT_COMPUTED = ("this index has no tags yet; compute them once with `carlos-ray tags --index INDEX` "
                     "(it needs the index's text encoder)")


# ---- models ----------------------------------------------------------------------------------------
class TagModel(BaseModel):
    tag: str
    score: float = Field(..., description="Calibrated score (z-score, cosine or margin, see `calibration`).")


class TagCount(BaseModel):
    tag: str
    loras: int = Field(..., description="LoRAs carrying this tag.")


class TagsResponse(BaseModel):
    index_version: int
    vocabulary: str | None = None
    calibration: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict, description="Cut-offs of the calibration (min_shift, z_min, margin, ...).")
    tagged_loras: int = Field(..., description="LoRAs with at least one tag.")
    tags: list[TagCount] = Field(..., description="Tags in use, most frequent first.")


class GroupMember(BaseModel):
    lora_id: str
    name: str | None = None


class SharedTag(BaseModel):
    tag: str
    share: float = Field(..., description="Fraction of the group's members carrying the tag.")


class GroupModel(BaseModel):
    group: int = Field(..., description="Group number (0 = largest).")
    size: int
    cohesion: float = Field(..., description="Mean cosine of the members' directions to the group centroid.")
    tags: list[SharedTag] = Field(default_factory=list, description="Tags at least half the members carry (empty if untagged).")
    members: list[GroupMember]


class GroupsResponse(BaseModel):
    index_version: int
    n_groups: int = Field(..., description="Groups found (the number comes from the data, see `method`).")
    method: str
    silhouette: float | None = None
    grouped: int = Field(..., description="LoRAs in a group: those inside the index thresholds with a non-zero direction.")
    ungrouped: int = Field(..., description="LoRAs outside the thresholds or with a zero direction.")
    groups: list[GroupModel]


class DuplicateModel(BaseModel):
    lora_id: str
    name: str | None = None
    cosine: float = Field(..., description="Cosine of the two directions.")
    strength_ratio: float = Field(..., description="Smaller over larger strength.")
    score: float = Field(..., description="cosine × strength_ratio (1 = identical signatures).")


class DuplicatesResponse(BaseModel):
    lora_id: str
    index_version: int
    min_cosine: float
    min_strength_ratio: float
    family_min_cosine: float = Field(..., description="Cosine of the scale relatives: the index profile's family cosine "
                                     "or min_cosine, whichever is lower.")
    exact_copies: list[str] = Field(default_factory=list, description="Other paths of this very file (same SHA-256), indexed once.")
    duplicates: list[DuplicateModel] = Field(..., description="Parallel direction and similar strength, best score first.")
    scale_relatives: list[DuplicateModel] = Field(
        ..., description="Parallel at the family cosine and not a duplicate: the same effect at another scale, or a "
                         "looser variant of it.")


# ---- checks ----------------------------------------------------------------------------------------
def _service_error(status: int, error: str, detail: str) -> Exception:
    from carlos_ray.serving.errors import ServiceError

    return ServiceError(status, error, detail)


def check_duplicate_thresholds(min_cosine: Any, min_strength_ratio: Any) -> tuple[float, float]:
    """Defaults for None; otherwise numbers in (0, 1] (:class:`DuplicateCriteria`'s check), or ServiceError 422 naming
    the parameter."""
    try:
        c = DuplicateCriteria(DEFAULT_MIN_COSINE if min_cosine is None else min_cosine,
                              DEFAULT_MIN_STRENGTH_RATIO if min_strength_ratio is None else min_strength_ratio)
    except ValueError as e:
        raise _service_error(422, "invalid_threshold", str(e)) from None
    return float(c.min_cosine), float(c.min_strength_ratio)


def check_positive(name: str, value: Any, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= high:
        raise _service_error(422, f"invalid_{name}", f"{name} must be an integer from 1 to {high}, got {value!r}")
    return int(value)


def require_tags(view: BehaviorView) -> None:
    if not view.tagged:
        raise _service_error(409, "tags_not_computed", TAGS_NOT_COMPUTED)


def check_tag(view: BehaviorView, tag: Any) -> str:
    """A tag of the index's vocabulary, or 409 (no tags yet) / 422 (not a tag of the vocabulary)."""
    require_tags(view)
    if not isinstance(tag, str) or not tag.strip():
        raise _service_error(422, "invalid_tag", f"tag must be a non-empty string, got {tag!r}")
    tag = tag.strip()
    words = view.vocabulary or []
    if tag not in words:
        lower = {w.lower(): w for w in words}
        if tag.lower() in lower:
            return lower[tag.lower()]
        raise _service_error(422, "unknown_tag", f"{tag!r} is not a tag of the index's vocabulary "
                             f"{(view.tagging or {}).get('vocabulary')!r} ({len(words)} words, e.g. {words[:8]}); see GET /tags")
    return tag


def _unknown(view: BehaviorView, lora_id: str) -> None:
    if lora_id not in view.pos:
        raise _service_error(404, "unknown_lora", f"unknown lora_id {lora_id!r}; the index holds {len(view.ids)} LoRAs")


# ---- responses -------------------------------------------------------------------------------------
def tag_models(view: BehaviorView, lora_id: str) -> list[dict] | None:
    tags = view.tags_of(lora_id)
    return None if tags is None else [TagModel(tag=t, score=float(s)).model_dump() for t, s in tags]


def tags_response(view: BehaviorView, version: int) -> dict:
    require_tags(view)
    tagging = view.tagging or {}
    counts = view.vocabulary_counts()
    return TagsResponse(index_version=version, vocabulary=tagging.get("vocabulary"), calibration=tagging.get("calibration"),
                        settings=tagging.get("settings") or {}, tagged_loras=sum(1 for r in view.tags.values() if r),
                        tags=[TagCount(tag=t, loras=n) for t, n in counts.items()]).model_dump()


def groups_response(view: BehaviorView, version: int, min_size: int = 1, limit: int = 100) -> dict:
    g, infos = view.groups()
    groups = [
        GroupModel(group=i.group, size=len(i.members), cohesion=i.cohesion,
                   tags=[SharedTag(tag=t, share=s) for t, s in i.tags],
                   members=[GroupMember(lora_id=m, name=view.names[view.pos[m]]) for m in i.members])
        for i in infos if len(i.members) >= min_size
    ][:limit]
    grouped = int((g.labels >= 0).sum())
    return GroupsResponse(index_version=version, n_groups=g.n_groups, method=g.method, silhouette=g.silhouette,
                          grouped=grouped, ungrouped=len(view.ids) - grouped, groups=groups).model_dump()


def duplicates_response(view: BehaviorView, version: int, lora_id: str, min_cosine: float, min_strength_ratio: float) -> dict:
    _unknown(view, lora_id)
    dups, rel = view.duplicates(lora_id, min_cosine, min_strength_ratio)

    def model(other: str, p: Any) -> DuplicateModel:
        return DuplicateModel(lora_id=other, name=view.names[view.pos[other]], cosine=p.cosine,
                              strength_ratio=p.strength_ratio, score=p.score)

    return DuplicatesResponse(lora_id=lora_id, index_version=version, min_cosine=min_cosine,
                              min_strength_ratio=min_strength_ratio, family_min_cosine=view.family_cosine(min_cosine),
                              exact_copies=view.aliases.get(lora_id, []),
                              duplicates=[model(o, p) for o, p in dups],
                              scale_relatives=[model(o, p) for o, p in rel]).model_dump()
