"""Human-written information about a LoRA: Civitai-style sidecar files and safetensors metadata.

This is the text the CARLoS method deliberately does *not* rank by, but the trigger words are part
of the LoRA prompt and names/descriptions are shown to users. Sidecars are untrusted and optional:
a missing, oversized or malformed sidecar is logged and ignored, never a reason to reject a LoRA.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIDECAR_BYTES = 1 << 20
MAX_TEXT_CHARS = 8000
MAX_NAME_CHARS = 300
MAX_TRIGGER_WORDS = 64
MAX_TRIGGER_CHARS = 300


@dataclass(frozen=True)
class SidecarInfo:
    """Merged sidecar information; ``extra["sources"]`` lists where each part came from, best first."""

    name: str | None = None
    description: str | None = None
    trigger_words: list[str] = field(default_factory=list)
    source_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML fragment; block elements become line breaks."""

    _BLOCK = {
        "p", "br", "div", "li", "ul", "ol", "tr", "table", "blockquote", "pre", "hr",
        "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "header", "footer",
    }  # fmt: skip
    _SKIP = {"script", "style"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def strip_html(text: str | None, max_chars: int | None = None) -> str | None:
    """Plain text of an HTML fragment: tags and scripts dropped, entities decoded, whitespace tidied.

    Block elements (``<p>``, ``<br>``, headings, list items...) become line breaks; runs of
    spaces collapse to one and blank lines to a single empty line. None stays None.
    """
    if text is None:
        return None
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    raw = "".join(parser.parts).replace("\xa0", " ")
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in raw.split("\n")]
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return out if max_chars is None else out[:max_chars]


def _clean_text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    text = strip_html(value, limit)
    text = "".join(ch for ch in text if ch == "\n" or ch.isprintable())
    return text or None


def clean_name(value: Any) -> str | None:
    """A display name from untrusted text (a sidecar, a manifest row): HTML stripped, non-printables dropped,
    whitespace collapsed, at most MAX_NAME_CHARS; None if nothing is left."""
    text = _clean_text(value, MAX_NAME_CHARS)
    return " ".join(text.split()) if text else None


def clean_description(value: Any) -> str | None:
    """A description from untrusted text: HTML stripped, non-printables dropped, at most MAX_TEXT_CHARS."""
    return _clean_text(value, MAX_TEXT_CHARS)


def clean_trigger_words(value: Any) -> list[str]:
    """Trigger words from untrusted text: a list of strings or a comma/semicolon-separated string, each cleaned."""
    return _words(value.replace(";", ",") if isinstance(value, str) else value)


def _words(value: Any) -> list[str]:
    """Trigger words from a list of strings, or a comma-separated string."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list):
        items = [v for v in value if isinstance(v, str)]
    else:
        return []
    out: list[str] = []
    for item in items:
        word = " ".join(strip_html(item, MAX_TRIGGER_CHARS).split())
        if word and word not in out:
            out.append(word)
    return out[:MAX_TRIGGER_WORDS]


def _load_json(path: Path, max_bytes: int) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("ignoring sidecar %s: %s", path, exc)
        return None
    if len(raw) > max_bytes:
        logger.warning("ignoring sidecar %s: larger than %d bytes", path, max_bytes)
        return None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        logger.warning("ignoring sidecar %s: not valid JSON (%s)", path, str(exc)[:120])
        return None
    if not isinstance(data, dict):
        logger.warning("ignoring sidecar %s: expected a JSON object, got %s", path, type(data).__name__)
        return None
    return data


def _from_civitai(d: Mapping[str, Any]) -> dict[str, Any]:
    model = d.get("model") if isinstance(d.get("model"), dict) else {}
    stats = d.get("stats") if isinstance(d.get("stats"), dict) else {}
    model_id, version_id = d.get("modelId"), d.get("id")
    url = None
    if isinstance(model_id, int) and not isinstance(model_id, bool):
        url = f"https://civitai.com/models/{model_id}"
        if isinstance(version_id, int) and not isinstance(version_id, bool):
            url += f"?modelVersionId={version_id}"
    extra = {
        "civitai_model_id": model_id,
        "civitai_version_id": version_id,
        "download_count": stats.get("downloadCount"),
        "base_model": d.get("baseModel"),
        "version_name": d.get("name") if model.get("name") else None,
    }
    return {
        "name": model.get("name") or d.get("name"),
        "description": model.get("description") or d.get("description"),
        "trigger_words": d.get("trainedWords"),
        "source_url": url,
        "extra": extra,
    }


def _from_generic(d: Mapping[str, Any]) -> dict[str, Any]:
    def first(*keys: str) -> Any:
        return next((d[k] for k in keys if d.get(k)), None)

    return {
        "name": first("name", "title", "model_name"),
        "description": first("description", "notes"),
        "trigger_words": first("trigger_words", "trained_words", "trainedWords", "activation text", "activation_text", "trigger"),
        "source_url": first("source_url", "url", "source"),
        "extra": {
            "base_model": first("base_model", "baseModel", "sd version"),
            "preferred_weight": first("preferred weight", "preferred_weight"),
        },
    }


def _from_metadata(md: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": md.get("modelspec.title") or md.get("ss_output_name"),
        "description": md.get("modelspec.description"),
        "trigger_words": md.get("modelspec.trigger_phrase"),
        "source_url": None,
        "extra": {
            "architecture": md.get("modelspec.architecture"),
            "base_model": md.get("ss_base_model_version"),
            "author": md.get("modelspec.author"),
            "license": md.get("modelspec.license"),
        },
    }


def read_sidecar(
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    max_bytes: int = DEFAULT_MAX_SIDECAR_BYTES,
) -> SidecarInfo:
    """Merge ``NAME.civitai.info`` > ``NAME.metadata.json`` > ``NAME.json`` > safetensors ``__metadata__``.

    For a LoRA at ``dir/NAME.safetensors``. Each field takes the first non-empty value in that
    order (trigger words: the first source that has any). ``metadata`` is the file's
    ``__metadata__`` if already known (e.g. ``LoraInfo.metadata``); otherwise the header is read.
    HTML in names and descriptions is stripped; ``ss_tag_frequency`` and other bulky keys are ignored.
    """
    p = Path(path)
    base = p.with_suffix("") if p.suffix.lower() == ".safetensors" else p
    candidates: list[tuple[str, dict[str, Any]]] = []
    for suffix, parse in ((".civitai.info", _from_civitai), (".metadata.json", _from_generic), (".json", _from_generic)):
        side = base.parent / (base.name + suffix)
        data = _load_json(side, max_bytes)
        if data is not None:
            try:
                candidates.append((side.name, parse(data)))
            except (AttributeError, TypeError) as exc:  # structurally odd but valid JSON
                logger.warning("ignoring sidecar %s: unexpected structure (%s)", side, exc)
    if metadata is None and p.suffix.lower() == ".safetensors" and p.is_file():
        from carlos_ray.lora.inspect import LoraRejected, read_metadata

        try:
            metadata = read_metadata(p)
        except (LoraRejected, OSError) as exc:
            logger.warning("no safetensors metadata for %s: %s", p, exc)
    if metadata:
        candidates.append(("__metadata__", _from_metadata(metadata)))

    name = description = url = None
    words: list[str] = []
    extra: dict[str, Any] = {}
    for _, c in candidates:
        name = name or clean_name(c["name"])
        description = description or clean_description(c["description"])
        url = url or (c["source_url"] if isinstance(c["source_url"], str) and c["source_url"].strip() else None)
        words = words or _words(c["trigger_words"])
        for k, v in c["extra"].items():
            if k not in extra and isinstance(v, (str, int, float)) and not isinstance(v, bool):
                extra[k] = v[:MAX_NAME_CHARS] if isinstance(v, str) else v
    extra["sources"] = [src for src, _ in candidates]
    return SidecarInfo(name=name, description=description, trigger_words=words, source_url=url, extra=extra)
