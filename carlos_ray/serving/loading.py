"""Loading what the service answers from: a ranker over one index snapshot and the index's own query encoder.

Weights that are not on this machine fail fast with :class:`EncoderUnavailable` (nothing is downloaded unless
asked), so a service can still answer ``similar`` and ``/loras`` requests.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from carlos_ray.config import EncoderSpec, QuerySpec, SamplingSpec
from carlos_ray.ranker import Ranker
from carlos_ray.serving.errors import EncoderUnavailable
from carlos_ray.store import Index, IndexError_, Manifest

if TYPE_CHECKING:  # pragma: no cover
    from carlos_ray.query import QueryEncoder


def resolve_index_uri(uri: str) -> str:
    """A local index path made absolute (so remote replicas and other working directories agree); URIs unchanged."""
    return str(uri) if "://" in str(uri) else os.path.abspath(os.path.expanduser(str(uri)))


def ranker_from_snapshot(snapshot: Any, where: str) -> Ranker:
    """A Ranker over a snapshot's signatures, the manifest's thresholds as default filters."""
    table = snapshot.signatures()
    if table is None or table.num_rows == 0:
        raise IndexError_(f"index {where} holds no signatures (version {snapshot.manifest.version}); index some LoRAs first")
    th = snapshot.manifest.thresholds
    return Ranker.from_table(table, max_strength=th.get("max_strength"), min_consistency=th.get("min_consistency"))


def load_ranker(index_uri: str) -> tuple[Ranker, Manifest]:
    """A Ranker over one consistent snapshot of the index (manifest thresholds as default filters) and its manifest."""
    snap = Index(index_uri).snapshot()
    return ranker_from_snapshot(snap, index_uri), snap.manifest


def encoder_spec_from_manifest(manifest: Manifest, device: str | None = None) -> EncoderSpec:
    """The EncoderSpec the index was built with (``device`` overrides where it runs)."""
    raw = dict(manifest.encoder)
    if device is not None:
        raw["device"] = device
    try:
        return EncoderSpec.model_validate(raw)
    except ValueError as e:
        raise EncoderUnavailable(f"the index manifest's encoder {raw!r} is not a valid encoder spec: {e}") from None


def query_spec_from_manifest(manifest: Manifest) -> QuerySpec:
    return QuerySpec.model_validate(manifest.query or {})


def context_texts_from_manifest(manifest: Manifest) -> list[str]:
    """The context prompt set P' named by the manifest (paths relative to the repo resolve there)."""
    from carlos_ray.prompts import load_prompt_set

    raw = manifest.sampling or {}
    defaults = SamplingSpec()
    path = raw.get("context_prompts") or defaults.context_prompts
    subset = raw.get("context_subset", defaults.context_subset)
    return list(load_prompt_set(path, subset).texts)


def load_query_encoder(manifest: Manifest, device: str | None = None, allow_download: bool = False) -> "QueryEncoder":
    """The index's own query encoder: its CLIP text tower, its context prompts P' and its joiner.

    Raises :class:`EncoderUnavailable` at once (no network wait) when the weights are not on this
    machine and ``allow_download`` is off, or when the encoder cannot be built for another reason."""
    from carlos_ray.models import create_encoder
    from carlos_ray.models.encoder import encoder_unavailable_reason, hub_offline
    from carlos_ray.query import QueryEncoder

    spec = encoder_spec_from_manifest(manifest, device)
    reason = encoder_unavailable_reason(spec, allow_download)
    if reason is not None:
        raise EncoderUnavailable(reason)
    query = query_spec_from_manifest(manifest)
    try:
        texts = context_texts_from_manifest(manifest)
    except (OSError, ValueError) as e:
        raise EncoderUnavailable(f"cannot load the index's context prompt set: {e}") from None
    try:
        with contextlib.nullcontext() if allow_download else hub_offline():
            enc = create_encoder(spec)
    except Exception as e:  # any failure to build the model means: no /search on this machine
        raise EncoderUnavailable(f"cannot build the index's encoder {spec.arch}/{spec.pretrained}: {type(e).__name__}: {e}") from None
    return QueryEncoder(enc.model, enc.tokenizer, texts, joiner=query.joiner, cache_size=query.cache_size, device=spec.device)
