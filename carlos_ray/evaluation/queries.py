"""Evaluation queries with ground truth: a JSON file of positive and negative queries.

A positive query names a planted behaviour; its `relevance` maps the lora_id of each LoRA that does
it to a grade (2: the behaviour is the LoRA's own, 1: it shows the behaviour as part of another or
weaker). Its `attribute` is what the pixel oracle checks on the generated images. A negative query
asks for something no LoRA of the zoo does: it has no relevant LoRA, and its top score is reported
beside the positives'.

File format (`QuerySet`): ``{"name", "loras": {lora_id: zoo member name}, "queries": [Query, ...]}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from carlos_ray.config import StrictModel, format_validation_error


class Query(StrictModel):
    id: str = Field(description="Unique id of the query.")
    text: str = Field(min_length=1, description="The query text as a user would type it.")
    kind: Literal["positive", "negative"] = Field(description="positive: some LoRA does it; negative: none does.")
    behaviour: str | None = Field(None, description="Planted behaviour the query asks for (positive queries).")
    attribute: str | None = Field(None, description="Attribute the pixel oracle checks on generated images.")
    form: str = Field("", description="How the query was phrased (short, long, synonym, content, ...).")
    relevance: dict[str, int] = Field(default_factory=dict, description="lora_id -> grade (> 0 relevant).")

    @model_validator(mode="after")
    def _check(self) -> "Query":
        if self.kind == "positive" and not any(g > 0 for g in self.relevance.values()):
            raise ValueError(f"positive query {self.id!r} has no relevant LoRA")
        if self.kind == "negative" and any(g > 0 for g in self.relevance.values()):
            raise ValueError(f"negative query {self.id!r} lists relevant LoRAs")
        if any(g < 0 for g in self.relevance.values()):
            raise ValueError(f"query {self.id!r} has a negative relevance grade")
        return self


class QuerySet(StrictModel):
    name: str = Field("queries", description="Name of the query set.")
    loras: dict[str, str] = Field(default_factory=dict, description="lora_id -> zoo member name (display only).")
    queries: list[Query] = Field(description="The queries.")

    @model_validator(mode="after")
    def _unique(self) -> "QuerySet":
        ids = [q.id for q in self.queries]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"query ids must be unique; repeated: {dup[:5]}")
        if not self.queries:
            raise ValueError("a query set needs at least one query")
        return self

    @property
    def positives(self) -> list[Query]:
        return [q for q in self.queries if q.kind == "positive"]

    @property
    def negatives(self) -> list[Query]:
        return [q for q in self.queries if q.kind == "negative"]

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.model_dump_json(indent=1) + "\n", encoding="utf-8")
        return p


class QueryFileError(ValueError):
    """A query file is missing or invalid; the message names the problem."""


def load_queries(path: str | Path) -> QuerySet:
    """Load and validate a query file (JSON)."""
    p = Path(path)
    if not p.is_file():
        raise QueryFileError(f"query file not found: {path}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise QueryFileError(f"{path}: not valid JSON: {e}") from None
    try:
        return QuerySet.model_validate(data)
    except ValidationError as e:
        raise QueryFileError(f"{path}: {format_validation_error(e)}") from None


def check_against_index(qs: QuerySet, lora_ids: set[str]) -> None:
    """Every relevant lora_id must be in the index (else the labels would silently count as misses)."""
    missing = sorted({lid for q in qs.queries for lid in q.relevance if lid not in lora_ids})
    if missing:
        raise QueryFileError(f"the query set names {len(missing)} LoRA(s) the index does not hold, e.g. {missing[:3]}; "
                             "was the index built from the same zoo?")
