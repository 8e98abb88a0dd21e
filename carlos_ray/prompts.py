"""Prompt sets: the indexing set P and the query-context set P', loaded from YAML.

A prompt-set file has a ``name``, a ``version``, ``categories`` (category -> list of prompt texts)
and optional ``subsets`` (subset name -> list of prompt ids). Ids are derived from position: the
n-th prompt (1-based) of category ``c`` is ``c-NN``. Appending to a category is therefore safe;
reordering, inserting or deleting changes ids. ``content_hash()`` covers ids, categories and texts,
so any such change also changes every configuration hash built on it. The subset ``full`` is
implicit and means every prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from carlos_ray.paths import resolve_conf_path

logger = logging.getLogger(__name__)

FULL_SUBSET = "full"
_CATEGORY_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_TOP_LEVEL_KEYS = ("name", "version", "categories", "subsets")


class PromptSetError(ValueError):
    """A prompt-set file or a subset request is invalid; the message names the problem."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: a stable id (``<category>-<NN>``), its category and its text."""

    id: str
    category: str
    text: str


def _normalize(text: str) -> str:
    """Key for duplicate detection: case and runs of whitespace do not make two prompts different."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable set of prompts with named subsets of ids."""

    name: str
    prompts: tuple[Prompt, ...]
    version: str = ""
    subsets: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PromptSetError(f"prompt set {self.name!r} has no prompts")
        seen_ids: set[str] = set()
        seen_texts: dict[str, str] = {}
        for p in self.prompts:
            if p.id in seen_ids:
                raise PromptSetError(f"duplicate prompt id {p.id!r}")
            seen_ids.add(p.id)
            key = _normalize(p.text)
            if key in seen_texts:
                raise PromptSetError(f"duplicate prompt text {p.text!r} (ids {seen_texts[key]!r} and {p.id!r})")
            seen_texts[key] = p.id
        for sub, ids in self.subsets.items():
            if sub == FULL_SUBSET:
                raise PromptSetError(f"subset name {FULL_SUBSET!r} is reserved (it always means every prompt)")
            if not ids:
                raise PromptSetError(f"subset {sub!r} is empty")
            if len(set(ids)) != len(ids):
                dup = sorted({i for i in ids if ids.count(i) > 1})
                raise PromptSetError(f"subset {sub!r} lists ids more than once: {dup}")
            missing = [i for i in ids if i not in seen_ids]
            if missing:
                raise PromptSetError(f"subset {sub!r} names ids not in the prompt set: {missing}")

    @cached_property
    def categories(self) -> tuple[str, ...]:
        """Category names, unique, in order of first appearance."""
        return tuple(dict.fromkeys(p.category for p in self.prompts))

    @cached_property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.prompts)

    @cached_property
    def texts(self) -> tuple[str, ...]:
        return tuple(p.text for p in self.prompts)

    @property
    def category_of_index(self) -> list[str]:
        """``category_of_index[i]`` is the category of prompt ``i``."""
        return [p.category for p in self.prompts]

    @cached_property
    def _position(self) -> dict[str, int]:
        return {pid: i for i, pid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.prompts)

    def index_of(self, prompt_id: str) -> int:
        """Position of a prompt id in this set."""
        try:
            return self._position[prompt_id]
        except KeyError:
            raise KeyError(
                f"prompt id {prompt_id!r} is not in prompt set {self.name!r} ({len(self)} prompts, e.g. {self.ids[:3]})"
            ) from None

    def content_hash(self) -> str:
        """sha256 hex digest over (id, category, text) of every prompt, in order. Name and version excluded."""
        payload = json.dumps([[p.id, p.category, p.text] for p in self.prompts], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def subset(self, name_or_ids: str | Iterable[str]) -> PromptSet:
        """A named subset (``full`` = all) or an explicit list of ids; prompts keep this set's order."""
        if isinstance(name_or_ids, str):
            if name_or_ids == FULL_SUBSET:
                return self
            if name_or_ids not in self.subsets:
                valid = [FULL_SUBSET, *sorted(self.subsets)]
                raise PromptSetError(
                    f"unknown subset {name_or_ids!r} of prompt set {self.name!r}; valid subsets: {valid} "
                    "(to select prompts by id, pass a list of ids)"
                )
            label, wanted = name_or_ids, list(self.subsets[name_or_ids])
        else:
            label, wanted = "custom", list(name_or_ids)
            if not wanted:
                raise PromptSetError(f"empty list of prompt ids for a subset of {self.name!r}")
            unknown = [i for i in wanted if i not in self._position]
            if unknown:
                raise PromptSetError(f"prompt ids not in prompt set {self.name!r}: {unknown}")
            if len(set(wanted)) != len(wanted):
                raise PromptSetError(f"prompt ids listed more than once: {sorted({i for i in wanted if wanted.count(i) > 1})}")
        keep = set(wanted)
        prompts = tuple(p for p in self.prompts if p.id in keep)
        subsets = {k: v for k, v in self.subsets.items() if set(v) <= keep}
        return PromptSet(name=f"{self.name}/{label}", prompts=prompts, version=self.version, subsets=subsets)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (plain safe_load keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (for categories this would give duplicate prompt ids)", key_node.start_mark
                )
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse(data: Any) -> PromptSet:
    if not isinstance(data, dict):
        raise PromptSetError(f"top level must be a mapping with keys {list(_TOP_LEVEL_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_LEVEL_KEYS))
    if unknown:
        raise PromptSetError(f"unknown top-level keys {unknown}; valid keys: {list(_TOP_LEVEL_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PromptSetError(f"'name' must be a non-empty string, got {name!r}")
    version = data.get("version", "")
    if not isinstance(version, (str, int, float)):
        raise PromptSetError(f"'version' must be a string or number, got {version!r}")
    categories = data.get("categories")
    if not isinstance(categories, dict) or not categories:
        raise PromptSetError(f"'categories' must be a non-empty mapping of category -> list of prompts, got {categories!r}")

    prompts: list[Prompt] = []
    for category, texts in categories.items():
        if not isinstance(category, str) or not _CATEGORY_RE.match(category):
            raise PromptSetError(f"category name {category!r} must match {_CATEGORY_RE.pattern} (lowercase, digits, '_')")
        if texts is None or (isinstance(texts, list) and not texts):
            raise PromptSetError(f"category {category!r} is empty")
        if not isinstance(texts, list):
            raise PromptSetError(f"category {category!r} must be a list of prompt strings, got {type(texts).__name__}")
        for n, text in enumerate(texts, start=1):
            if not isinstance(text, str) or not text.strip():
                raise PromptSetError(f"prompt {n} of category {category!r} must be a non-empty string, got {text!r}")
            prompts.append(Prompt(id=f"{category}-{n:02d}", category=category, text=text))

    raw_subsets = data.get("subsets") or {}
    if not isinstance(raw_subsets, dict):
        raise PromptSetError(f"'subsets' must be a mapping of subset name -> list of prompt ids, got {raw_subsets!r}")
    subsets: dict[str, tuple[str, ...]] = {}
    for sub, ids in raw_subsets.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise PromptSetError(f"subset {sub!r} must be a list of prompt id strings, got {ids!r}")
        subsets[str(sub)] = tuple(ids)
    return PromptSet(name=name, prompts=tuple(prompts), version=str(version), subsets=subsets)


def load_prompt_set(path: str | Path, subset: str | None = None) -> PromptSet:
    """Load and validate a prompt-set YAML; ``subset`` picks a named subset (None or ``full`` = all)."""
    resolved = resolve_conf_path(path)
    try:
        data = yaml.load(resolved.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise PromptSetError(f"{resolved}: invalid YAML: {e}") from e
    try:
        prompt_set = _parse(data)
        if subset is not None:
            prompt_set = prompt_set.subset(subset)
    except PromptSetError as e:
        raise PromptSetError(f"{resolved}: {e}") from e
    logger.debug("loaded prompt set %s: %d prompts, %d categories, hash %s",
                 prompt_set.name, len(prompt_set), len(prompt_set.categories), prompt_set.content_hash()[:12])
    return prompt_set
