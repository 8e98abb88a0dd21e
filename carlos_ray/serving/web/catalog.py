"""What the search page shows about an index version, beyond ranking: scatter points, LoRA profiles, thumbnails.

A :class:`Catalog` is built once per index version from one :class:`~carlos_ray.store.Snapshot`:

- every LoRA's strength, consistency and quadrant (the quadrants of :func:`carlos_ray.report.quadrant_labels`
  under the manifest's thresholds, the same thresholds the ranker filters with);
- near-duplicate groups (:func:`carlos_ray.report.near_duplicate_groups`);
- per-category strength and within-category consistency, when the index has them;
- base-vs-LoRA thumbnail grids (PNG, drawn by :func:`carlos_ray.report.draw_grid`, cached), when the
  index kept thumbnails;
- the *metadata check*: the LoRA's own words (name, description, trigger words) used as a text query;
  where that query ranks the LoRA among all LoRAs (no filters) says whether its metadata agrees with
  what it does. The encoding happens on the encoder side; :meth:`Catalog.description_rank` only ranks.
"""

from __future__ import annotations

import html
import io
import logging
import math
import re
import threading
from collections import OrderedDict
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from carlos_ray.report.analysis import near_duplicate_groups, quadrant_labels
from carlos_ray.serving.errors import ServiceError
from carlos_ray.store import Snapshot
from carlos_ray.thresholds import Thresholds

logger = logging.getLogger(__name__)

THUMB_CACHE_SIZE = 256
AGREES_MAX_FRACTION = 0.25  # own words rank the LoRA in the best quarter: metadata agrees with behaviour
DISAGREES_MIN_FRACTION = 0.5  # in the worse half (no better than a random guess): metadata disagrees
Quadrant = Literal["focused", "overpowering", "chaotic", "erratic", "undefined"]


# ---- response models ---------------------------------------------------------------------------------
class ThresholdsModel(BaseModel):
    max_strength: float | None = Field(None, description="The index's strength filter (keeps strength <= this; null: none).")
    min_consistency: float | None = Field(None, description="The index's consistency filter (keeps consistency >= this; null: none).")
    source: str | None = Field(None, description="Where the thresholds come from (paper, calibrated, ...).")


class LoraPoint(BaseModel):
    lora_id: str
    name: str | None = None
    strength: float | None = Field(None, description="Null if not finite.")
    consistency: float | None = Field(None, description="Null if not finite.")
    quadrant: Quadrant = Field(..., description="Position against the index's thresholds; the default filter keeps `focused`.")
    thumbnails: bool = Field(False, description="Whether GET /loras/{id}/thumbnails has an image for this LoRA.")


class LoraListResponse(BaseModel):
    index_version: int
    total: int = Field(..., description="LoRAs in the index.")
    offset: int
    thresholds: ThresholdsModel
    quadrant_counts: dict[str, int] = Field(..., description="LoRAs per quadrant over the whole index.")
    items: list[LoraPoint] = Field(..., description="LoRAs in name order, from `offset`, at most `limit`.")


class CategoryValue(BaseModel):
    category: str
    strength: float | None = Field(None, description="Mean diff norm over the category's prompts (null: not finite).")
    consistency: float | None = Field(None, description="Mean pairwise cosine within the category (null: not finite).")


class Neighbour(BaseModel):
    lora_id: str
    name: str | None = None
    cosine: float = Field(..., description="Cosine of the two directions.")
    strength: float | None = None


class MetadataCheck(BaseModel):
    status: Literal["agrees", "weak", "disagrees", "no_text", "unavailable"] = Field(
        ..., description="`agrees`: the LoRA's own words rank it in the best quarter of the index; `disagrees`: in the "
        "worse half; `weak`: in between; `no_text`: it has no name/description/trigger words; `unavailable`: the "
        "server cannot encode text (see `detail`).")
    query: str | None = Field(None, description="The text used as a query (plain text of name, trigger words, description).")
    rank: int | None = Field(None, description="1-based rank of this LoRA for that query among all LoRAs, no filters.")
    total: int | None = Field(None, description="LoRAs ranked.")
    score: float | None = Field(None, description="Cosine of the query direction and the LoRA's direction.")
    detail: str = Field(..., description="The verdict in words.")


class LoraProfile(BaseModel):
    lora_id: str
    index_version: int
    name: str | None = None
    description: str | None = None
    trigger_words: list[str] = Field(default_factory=list)
    source_url: str | None = None
    sha256: str | None = None
    format: str | None = None
    rank: int | None = Field(None, description="LoRA rank (r) of the file.")
    civitai_model_id: int | None = None
    civitai_version_id: int | None = None
    download_count: int | None = None
    indexed_at: str | None = None
    n: int | None = Field(None, description="Diff vectors the signature was computed from.")
    strength: float | None = None
    strength_std: float | None = None
    consistency: float | None = None
    quadrant: Quadrant
    thresholds: ThresholdsModel
    categories: list[CategoryValue] = Field(default_factory=list, description="Per-category values (empty: not in the index).")
    thumbnails: bool = Field(..., description="Whether GET /loras/{id}/thumbnails has an image for this LoRA.")
    thumbnail_prompts: list[str] = Field(default_factory=list, description="Prompt ids of the thumbnail columns.")
    duplicates: list[Neighbour] = Field(default_factory=list, description="Its near-duplicate group (nearly parallel "
                                        "directions, similar strength), without itself.")
    metadata_check: MetadataCheck | None = Field(None, description="Whether the LoRA's words agree with its behaviour.")


# ---- helpers -------------------------------------------------------------------------------------------
def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def plain_text(text: str | None) -> str:
    """HTML tags dropped, entities decoded, whitespace collapsed."""
    if not text:
        return ""
    return _SPACE.sub(" ", html.unescape(_TAG.sub(" ", str(text)))).strip()


def metadata_text(name: str | None, trigger_words: list[str] | None, description: str | None, max_chars: int) -> str:
    """The LoRA's own words as one query: name, trigger words, description (plain text, cut at a word end)."""
    parts = [plain_text(name), ", ".join(plain_text(t) for t in (trigger_words or []) if plain_text(t)), plain_text(description)]
    text = ". ".join(p for p in parts if p)
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text.strip()


def metadata_verdict(rank: int, total: int) -> tuple[str, str]:
    """``(status, words)`` for a LoRA its own words put at ``rank`` of ``total``."""
    frac = 0.0 if total <= 1 else (rank - 1) / (total - 1)
    where = f"its own words rank it {rank} of {total} LoRAs"
    if frac <= AGREES_MAX_FRACTION:
        return "agrees", f"The metadata agrees with the behaviour: {where}."
    if frac > DISAGREES_MIN_FRACTION:
        return "disagrees", (f"The metadata disagrees with the behaviour: {where}; the description does not say what the "
                             "LoRA does (see its similar LoRAs).")
    return "weak", f"The metadata only loosely matches the behaviour: {where}."


THUMB_MIN_CELL = 64
THUMB_GAP = 2
MISSING_GREY = (221, 221, 221)


def _decode(data: bytes | None):
    from PIL import Image

    if data is None:
        return None
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.convert("RGB")
    except Exception as e:  # a damaged thumbnail is drawn as missing
        logger.warning("unreadable thumbnail: %s", e)
        return None


def thumbnail_strip(base: list[bytes | None], lora: list[bytes | None]) -> bytes:
    """Two rows of square cells on white, base above LoRA, ``THUMB_GAP`` px apart; a missing image is grey.

    Each thumbnail is enlarged by the whole factor ``max(1, THUMB_MIN_CELL // size)`` with nearest-neighbour
    sampling, so every stored pixel becomes an exact block."""
    from PIL import Image

    images = [[_decode(b) for b in base], [_decode(x) for x in lora]]
    size = max((im.size[0] for row in images for im in row if im is not None), default=THUMB_MIN_CELL)
    cell = size * max(1, THUMB_MIN_CELL // size)
    cols = max(len(base), len(lora))
    canvas = Image.new("RGB", (cols * (cell + THUMB_GAP) + THUMB_GAP, 2 * (cell + THUMB_GAP) + THUMB_GAP), "white")
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            xy = (THUMB_GAP + c * (cell + THUMB_GAP), THUMB_GAP + r * (cell + THUMB_GAP))
            if im is None:
                canvas.paste(MISSING_GREY, (*xy, xy[0] + cell, xy[1] + cell))
            else:
                canvas.paste(im.resize((cell, cell), Image.NEAREST), xy)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# ---- the catalog -------------------------------------------------------------------------------------
class Catalog:
    """Page data of one index version (read-only; build a new one for a new version)."""

    def __init__(self, snapshot: Snapshot):
        m = snapshot.manifest
        self.version = int(m.version)
        self.manifest = m
        table = snapshot.signatures()
        if table is None or table.num_rows == 0:
            raise ValueError(f"index version {self.version} holds no signatures")
        cols = [c for c in table.column_names if c != "direction"]
        self.rows: list[dict] = table.select(cols).to_pylist()
        self.ids = [r["lora_id"] for r in self.rows]
        self.pos = {lid: i for i, lid in enumerate(self.ids)}
        self.strength = np.array([np.nan if r["strength"] is None else r["strength"] for r in self.rows], dtype=np.float64)
        self.consistency = np.array([np.nan if r["consistency"] is None else r["consistency"] for r in self.rows],
                                    dtype=np.float64)
        th = m.thresholds or {}
        self.thresholds = Thresholds(_finite(th.get("max_strength")), _finite(th.get("min_consistency")),
                                     str(th.get("source") or "manifest"))
        self.quadrants = quadrant_labels(self.strength, self.consistency, self.thresholds)
        directions = table["direction"].to_pylist()
        width = max((len(d) for d in directions), default=0)
        x = np.zeros((len(directions), width))
        for i, d in enumerate(directions):
            if len(d) == width:
                x[i] = d
        x[~np.isfinite(x).all(axis=1)] = 0.0
        norms = np.linalg.norm(x, axis=1)
        self.unit = np.divide(x, norms[:, None], out=np.zeros_like(x), where=norms[:, None] > 0)
        groups, edges = near_duplicate_groups(x, self.strength)
        self.group_of = {i: g for g, members in enumerate(groups) for i in members}
        self.groups = groups
        self.order = sorted(range(len(self.rows)), key=lambda i: ((self.rows[i]["name"] or "").lower(), self.ids[i]))
        self._thumb_table = snapshot.table("thumbs")
        self._thumb_rows: dict[str, dict[int, bytes]] = {}
        if self._thumb_table is not None:
            cols_ = (self._thumb_table[c].to_pylist() for c in ("lora_id", "prompt_idx", "png"))
            for lid, p, png in zip(*cols_):
                if png is not None:
                    self._thumb_rows.setdefault(str(lid), {})[int(p)] = png
        self._base_thumbs: dict[int, bytes] = {}
        base_key = m.base_key
        base = snapshot.base(base_key) if base_key and self._thumb_rows else None
        if base is not None and "thumb" in base.column_names:
            for p, s, t in zip(base["prompt_idx"].to_pylist(), base["seed_idx"].to_pylist(), base["thumb"].to_pylist()):
                if s == 0 and t is not None:
                    self._base_thumbs[int(p)] = t
        self._prompt_ids = list((m.prompt_set or {}).get("ids") or [])
        self._png_cache: OrderedDict[str, bytes] = OrderedDict()
        self._png_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.rows)

    def _row(self, lora_id: str) -> int:
        i = self.pos.get(lora_id)
        if i is None:
            raise ServiceError(404, "unknown_lora", f"no LoRA with id {lora_id!r} in this index (version {self.version})")
        return i

    def thresholds_model(self) -> dict:
        t = self.thresholds
        return {"max_strength": t.max_strength, "min_consistency": t.min_consistency, "source": t.source}

    def points(self, offset: int = 0, limit: int | None = None) -> dict:
        """Every LoRA's place in the Strength-Consistency plane, in name order (LoraListResponse)."""
        order = self.order[offset: None if limit is None else offset + limit]
        counts = {q: 0 for q in ("focused", "overpowering", "chaotic", "erratic", "undefined")}
        for q in self.quadrants:
            counts[q] += 1
        items = [{"lora_id": self.ids[i], "name": self.rows[i]["name"], "strength": _finite(self.strength[i]),
                  "consistency": _finite(self.consistency[i]), "quadrant": self.quadrants[i],
                  "thumbnails": self.ids[i] in self._thumb_rows} for i in order]
        return {"index_version": self.version, "total": len(self.rows), "offset": offset,
                "thresholds": self.thresholds_model(), "quadrant_counts": counts, "items": items}

    def profile(self, lora_id: str) -> dict:
        """Everything the LoRA page shows except the metadata check (LoraProfile without it)."""
        i = self._row(lora_id)
        r = self.rows[i]
        cats = []
        names, cs, cw = r.get("category_names") or [], r.get("category_strength") or [], r.get("category_within") or []
        for j, c in enumerate(names):
            cats.append({"category": str(c), "strength": _finite(cs[j]) if j < len(cs) else None,
                         "consistency": _finite(cw[j]) if j < len(cw) else None})
        dups = []
        if i in self.group_of:
            for j in self.groups[self.group_of[i]]:
                if j != i:
                    dups.append({"lora_id": self.ids[j], "name": self.rows[j]["name"],
                                 "cosine": float(min(1.0, self.unit[i] @ self.unit[j])), "strength": _finite(self.strength[j])})
            dups.sort(key=lambda d: -d["cosine"])
        thumbs = self._thumb_rows.get(lora_id, {})
        keys = ("name", "description", "source_url", "sha256", "format", "rank", "civitai_model_id", "civitai_version_id",
                "download_count", "indexed_at", "n")
        return {
            "lora_id": lora_id, "index_version": self.version, **{k: r.get(k) for k in keys},
            "trigger_words": [str(t) for t in (r.get("trigger_words") or [])],
            "strength": _finite(self.strength[i]), "consistency": _finite(self.consistency[i]),
            "strength_std": _finite(r.get("strength_std")), "quadrant": self.quadrants[i],
            "thresholds": self.thresholds_model(), "categories": cats, "thumbnails": bool(thumbs),
            "thumbnail_prompts": [self._prompt_name(p) for p in sorted(thumbs)], "duplicates": dups,
        }

    def metadata_query(self, lora_id: str, max_chars: int) -> str:
        r = self.rows[self._row(lora_id)]
        return metadata_text(r.get("name"), r.get("trigger_words"), r.get("description"), max_chars)

    def description_rank(self, lora_id: str, vector: np.ndarray) -> dict:
        """Where a query direction ranks this LoRA among all of them (cosine, no filters): MetadataCheck fields."""
        i = self._row(lora_id)
        q = np.asarray(vector, dtype=np.float64).reshape(-1)
        nq = np.linalg.norm(q)
        if q.shape[0] != self.unit.shape[1] or not np.isfinite(nq) or nq == 0:
            return {"status": "unavailable", "detail": "the LoRA's words give no usable query direction"}
        cos = self.unit @ (q / nq)
        rank = 1 + int(np.sum(cos > cos[i]))
        status, words = metadata_verdict(rank, len(cos))
        return {"status": status, "rank": rank, "total": len(cos), "score": float(cos[i]), "detail": words}

    def _prompt_name(self, p: int) -> str:
        return str(self._prompt_ids[p]) if p < len(self._prompt_ids) else f"prompt {p}"

    def thumbnails_png(self, lora_id: str) -> bytes:
        """A PNG, base images above the LoRA's, one column per kept prompt (see :func:`thumbnail_strip`; cached per LoRA)."""
        self._row(lora_id)
        with self._png_lock:
            if lora_id in self._png_cache:
                self._png_cache.move_to_end(lora_id)
                return self._png_cache[lora_id]
        thumbs = self._thumb_rows.get(lora_id)
        if not thumbs:
            why = "this index kept no thumbnails" if not self._thumb_rows else "this LoRA has no thumbnails in the index"
            raise ServiceError(404, "no_thumbnails", f"{why} (indexing.keep_thumbnails); the signature is still available")
        pidx = sorted(thumbs)
        png = thumbnail_strip([self._base_thumbs.get(p) for p in pidx], [thumbs[p] for p in pidx])
        with self._png_lock:
            self._png_cache[lora_id] = png
            while len(self._png_cache) > THUMB_CACHE_SIZE:
                self._png_cache.popitem(last=False)
        return png
