"""Retrievers compared by the evaluation, all behind one interface (`rank(queries, k) -> list[Ranking]`).

CARLoS and its ablations go through the service's own code: the index's `QueryEncoder`
(reciprocal suffix vectors, `carlos_ray.query`) and `RankerService.search` over the index's
`Ranker` (filters, exact top-k, tie order). The ablations change one thing each:

| name | query vector | filters |
| --- | --- | --- |
| `carlos` | Δq = mean_p' [u(p' ⊕ q) − u(p')] (the service's encoder) | index defaults |
| `carlos-no-strength` | same | strength filter off |
| `carlos-no-consistency` | same | consistency filter off |
| `carlos-no-filter` | same | both off |
| `carlos-prefix` | mean_p' [u(q ⊕ p') − u(p')] | index defaults |
| `carlos-query-alone` | u(q), no context | index defaults |

The metadata baselines rank every LoRA (no filters) by its human-written text: name, description,
trigger words and tags (Civitai sidecar `model.tags`, when the file is still there):

| `bm25-metadata` | BM25 (`bm25s`, English stop words, Snowball English stemmer) over the metadata text |
| `dense-metadata` | cosine of u(q) and u(metadata text), the index encoder's text tower |
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

TEXT_BATCH = 64  # texts per encode_text call
MAX_SIDECAR_BYTES = 1 << 20


@dataclass(frozen=True)
class Ranking:
    """One query's ranked LoRA ids (best first) and their scores (the retriever's own scale)."""

    ids: tuple[str, ...]
    scores: tuple[float, ...]

    @property
    def top_score(self) -> float:
        return self.scores[0] if self.scores else math.nan


class Retriever(Protocol):
    name: str

    def rank(self, queries: Sequence[str], k: int) -> list[Ranking]:
        """The top ``k`` LoRAs of each query."""
        ...


# ---- text features --------------------------------------------------------------------------------------
def encode_texts(model: Any, tokenizer: Any, texts: Sequence[str], device: str = "cpu") -> np.ndarray:
    """Raw (un-normalized) CLIP text features u(t) of each text, float64 (n, d)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), TEXT_BATCH):
            tokens = tokenizer(list(texts[i : i + TEXT_BATCH])).to(device)
            out.append(model.encode_text(tokens, normalize=False).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def text_diff_vectors(model: Any, tokenizer: Any, context: Sequence[str], queries: Sequence[str], *,
                      position: str = "suffix", joiner: str = " ", device: str = "cpu") -> np.ndarray:
    """mean_p' [u(join(p', q)) − u(p')] with q after (``suffix``) or before (``prefix``) each context prompt.

    The plain computation (full padded passes); the service's fast encoder gives the suffix form."""
    if position not in ("suffix", "prefix"):
        raise ValueError(f"position must be 'suffix' or 'prefix', got {position!r}")
    ctx = list(context)
    u_ctx = encode_texts(model, tokenizer, ctx, device).mean(axis=0)
    texts = [(p + joiner + q) if position == "suffix" else (q + joiner + p) for q in queries for p in ctx]
    u = encode_texts(model, tokenizer, texts, device).reshape(len(queries), len(ctx), -1)
    return u.mean(axis=1) - u_ctx


# ---- CARLoS through the service ----------------------------------------------------------------------------
class CarlosRetriever:
    """A CARLoS variant: a query-vector function plus the service's ranker with optional filter overrides.

    ``max_strength`` / ``min_consistency``: None keeps the index's default, ``inf`` / ``-inf`` turns it off."""

    def __init__(self, name: str, service: Any, vectors: Callable[[list[str]], np.ndarray],
                 max_strength: float | None = None, min_consistency: float | None = None):
        self.name = name
        self.service = service
        self.vectors = vectors
        self.max_strength = max_strength
        self.min_consistency = min_consistency

    def rank(self, queries: Sequence[str], k: int) -> list[Ranking]:
        queries = list(queries)
        vec = np.asarray(self.vectors(queries), dtype=np.float64)
        norms = np.linalg.norm(vec, axis=1) if len(vec) else np.zeros(0)
        usable = np.flatnonzero(np.isfinite(norms) & (norms > 0))
        out = [Ranking((), ())] * len(queries)  # a query with no effect on the text features retrieves nothing
        if len(usable):
            res = self.service.search(vec[usable], k, self.max_strength, self.min_consistency)
            for i, hits in zip(usable.tolist(), res["hits"]):
                out[i] = Ranking(tuple(h["lora_id"] for h in hits), tuple(float(h["score"]) for h in hits))
        for i in sorted(set(range(len(queries))) - set(usable.tolist())):
            logger.warning("%s: query %r has a zero vector; it retrieves nothing", self.name, queries[i])
        return out


# ---- metadata baselines -----------------------------------------------------------------------------------
def sidecar_tags(source_path: str | None) -> list[str]:
    """Tags of a Civitai sidecar (``NAME.civitai.info``: ``model.tags``) beside a LoRA file; [] if none."""
    if not source_path:
        return []
    p = Path(source_path)
    side = p.parent / (p.name[: -len(".safetensors")] + ".civitai.info" if p.name.endswith(".safetensors") else p.name)
    try:
        if not side.is_file() or side.stat().st_size > MAX_SIDECAR_BYTES:
            return []
        data = json.loads(side.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return []
    model = data.get("model") if isinstance(data, dict) else None
    tags = (model or {}).get("tags") if isinstance(model, dict) else None
    if not isinstance(tags, list):
        tags = data.get("tags") if isinstance(data, dict) else None
    return [str(t).strip() for t in tags or [] if str(t).strip()][:64]


def metadata_texts(table: pa.Table) -> tuple[list[str], list[str]]:
    """(lora_ids, metadata text) of a signatures table: name, description, trigger words and tags."""
    ids = table.column("lora_id").to_pylist()
    texts = []
    for name, desc, words, path in zip(*(table.column(c).to_pylist() for c in ("name", "description", "trigger_words", "source_path"))):
        parts = [name or "", desc or "", ", ".join(words or []), ", ".join(sidecar_tags(path))]
        texts.append(". ".join(p.strip() for p in parts if p and p.strip()))
    return ids, texts


def _top_k(ids: Sequence[str], scores: np.ndarray, k: int) -> Ranking:
    """Top k by score descending, ties by lora_id ascending (the ranker's tie order)."""
    order = sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))[:k]
    return Ranking(tuple(ids[i] for i in order), tuple(float(scores[i]) for i in order))


class BM25Retriever:
    """BM25 over each LoRA's metadata text (`bm25s`, default k1/b, English stop words, Snowball stemmer)."""

    def __init__(self, table: pa.Table, name: str = "bm25-metadata"):
        import bm25s
        import Stemmer

        self.name = name
        self.ids, self.texts = metadata_texts(table)
        self._bm25s = bm25s
        self._stemmer = Stemmer.Stemmer("english")
        self._model = bm25s.BM25()
        self._model.index(self._tokenize(self.texts, return_ids=True), show_progress=False)

    def _tokenize(self, texts: list[str], return_ids: bool) -> Any:
        return self._bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, show_progress=False, return_ids=return_ids)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every LoRA (index order) for one query; zeros when no query term is in the corpus."""
        tokens = self._tokenize([query], return_ids=False)[0]
        known = [t for t in tokens if t in self._model.vocab_dict]
        if not known:
            return np.zeros(len(self.ids))
        return np.asarray(self._model.get_scores(known), dtype=np.float64)

    def rank(self, queries: Sequence[str], k: int) -> list[Ranking]:
        return [_top_k(self.ids, self.scores(q), k) for q in queries]


class DenseTextRetriever:
    """Cosine of u(q) and u(metadata text) with the index encoder's text tower."""

    def __init__(self, table: pa.Table, model: Any, tokenizer: Any, device: str = "cpu", name: str = "dense-metadata"):
        self.name = name
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.ids, self.texts = metadata_texts(table)
        self._docs = _unit(encode_texts(model, tokenizer, self.texts, device))

    def rank(self, queries: Sequence[str], k: int) -> list[Ranking]:
        q = _unit(encode_texts(self.model, self.tokenizer, list(queries), self.device))
        return [_top_k(self.ids, self._docs @ row, k) for row in q]


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


# ---- the standard set ---------------------------------------------------------------------------------------
RETRIEVER_NAMES = ("carlos", "carlos-no-strength", "carlos-no-consistency", "carlos-no-filter", "carlos-prefix",
                   "carlos-query-alone", "bm25-metadata", "dense-metadata")


def build_retrievers(table: pa.Table, manifest: Any, encoder: Any, names: Sequence[str] = RETRIEVER_NAMES) -> list[Any]:
    """The named retrievers over one snapshot of an index (its signatures table and manifest), sharing
    the service's ranker and the index's query encoder (`carlos_ray.serving.loading.load_query_encoder`)."""
    from carlos_ray.ranker import Ranker
    from carlos_ray.serving.loading import context_texts_from_manifest
    from carlos_ray.serving.services import RankerService
    from carlos_ray.serving.watcher import FixedIndex

    unknown = [n for n in names if n not in RETRIEVER_NAMES]
    if unknown:
        raise ValueError(f"unknown retriever(s) {unknown}; valid: {list(RETRIEVER_NAMES)}")
    th = manifest.thresholds or {}
    ranker = Ranker.from_table(table, max_strength=th.get("max_strength"), min_consistency=th.get("min_consistency"))
    service = RankerService(FixedIndex(ranker, manifest))
    enc = encoder
    dev = str(enc.device)
    context = context_texts_from_manifest(manifest)

    def suffix(qs: list[str]) -> np.ndarray:
        return enc.encode(qs)

    def prefix(qs: list[str]) -> np.ndarray:
        return text_diff_vectors(enc.model, enc.tokenizer, context, qs, position="prefix", joiner=enc.joiner, device=dev)

    def alone(qs: list[str]) -> np.ndarray:
        return encode_texts(enc.model, enc.tokenizer, qs, dev)

    inf = math.inf
    make = {
        "carlos": lambda: CarlosRetriever("carlos", service, suffix),
        "carlos-no-strength": lambda: CarlosRetriever("carlos-no-strength", service, suffix, max_strength=inf),
        "carlos-no-consistency": lambda: CarlosRetriever("carlos-no-consistency", service, suffix, min_consistency=-inf),
        "carlos-no-filter": lambda: CarlosRetriever("carlos-no-filter", service, suffix, inf, -inf),
        "carlos-prefix": lambda: CarlosRetriever("carlos-prefix", service, prefix),
        "carlos-query-alone": lambda: CarlosRetriever("carlos-query-alone", service, alone),
        "bm25-metadata": lambda: BM25Retriever(table),
        "dense-metadata": lambda: DenseTextRetriever(table, enc.model, enc.tokenizer, dev),
    }
    return [make[n]() for n in names]
