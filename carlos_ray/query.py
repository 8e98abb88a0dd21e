"""Query encoder: a text query becomes a reciprocal text-diff vector over a context prompt set P'.

    Δq = mean over p' in P' of [ u(p' + joiner + q) − u(p') ]

with `u` the raw (un-normalized) CLIP text features (`model.encode_text(tokens, normalize=False)`).

The plain way costs 2·|P'| full text-tower passes over 77 padded tokens per query. The fast path
gives the same numbers (to float32 rounding) for a fraction of the work, using three facts about
the CLIP text tower:

(a) `u(p')` does not depend on the query: it is computed once, at construction;
(b) the tower is causal and pools at the end-of-text token, so positions after the pooled one
    (the padding) never influence the result and are never computed;
(c) `p' + joiner + q` tokenizes as `tokens(p') + tokens(joiner + q)` whenever BPE splits at the
    boundary (true for a whitespace joiner). The keys and values of the shared prefix
    `[SOT] + tokens(p')` are computed once per layer; a query only runs its suffix tokens
    (`tokens(q)` and the end token, at positions starting after each prefix) through the layers,
    attending to the cached prefix keys/values plus its own causal keys/values.

The boundary split is verified per (prompt, query) on the tokenizer's own output (which also
applies the 77-token truncation exactly as the plain path); a pair that does not split cleanly is
computed exactly without the prefix cache (path (b) only).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_PLAIN_BATCH = 64  # sequences per encode_text call on the plain path


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding/positional_embedding/transformer/ln_final/text_projection."""
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer

    if isinstance(model, CLIP):
        return model
    if isinstance(model, CustomTextCLIP):
        if isinstance(model.text, TextTransformer):
            return model.text
        raise NotImplementedError(
            f"fast query path supports open_clip TextTransformer text towers; this CustomTextCLIP has "
            f"{type(model.text).__name__} (e.g. a HuggingFace tower)"
        )
    raise NotImplementedError(
        f"fast query path supports open_clip CLIP and CustomTextCLIP models, got {type(model).__name__}"
    )


@dataclass
class _Tower:
    """The pieces of an open_clip causal text tower the fast path needs, checked once."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    blocks: list
    ln_final: nn.Module
    text_projection: Any
    pool_type: str
    eos_id: int | None
    heads: int
    width: int
    dtype: torch.dtype

    @classmethod
    def from_model(cls, model: nn.Module) -> "_Tower":
        from open_clip.transformer import ResidualAttentionBlock

        tower = _text_tower(model)
        if getattr(tower, "cls_emb", None) is not None:
            raise NotImplementedError("fast query path does not support text towers with an appended CLS embedding (CoCa)")
        pool_type = tower.text_pool_type if hasattr(tower, "text_pool_type") else tower.pool_type
        if pool_type not in ("argmax", "eos", "last", "first"):
            raise NotImplementedError(
                f"fast query path supports text pool types 'argmax', 'eos', 'last', 'first'; got {pool_type!r}"
            )
        eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        mask = tower.attn_mask
        n_pos = tower.positional_embedding.shape[0]
        if mask is None:
            raise NotImplementedError("fast query path needs a causal text tower; this one has no attention mask (bidirectional)")
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=mask.device).triu(1)
        if mask.shape != (n_pos, n_pos) or not torch.equal(torch.isneginf(mask), causal) or bool((mask[~causal] != 0).any()):
            raise NotImplementedError("fast query path needs the standard additive causal attention mask")
        blocks = list(tower.transformer.resblocks)
        for i, blk in enumerate(blocks):
            if type(blk) is not ResidualAttentionBlock:
                raise NotImplementedError(
                    f"fast query path supports ResidualAttentionBlock layers; layer {i} is {type(blk).__name__}"
                )
            attn = blk.attn
            if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
                raise NotImplementedError(f"layer {i}: attention must be nn.MultiheadAttention with a packed in_proj_weight")
            if attn.bias_k is not None or attn.add_zero_attn:
                raise NotImplementedError(f"layer {i}: attention with bias_k/bias_v or add_zero_attn is not supported")
        attn0 = blocks[0].attn
        return cls(
            token_embedding=tower.token_embedding,
            positional_embedding=tower.positional_embedding,
            blocks=blocks,
            ln_final=tower.ln_final,
            text_projection=tower.text_projection,
            pool_type=pool_type,
            eos_id=eos_id,
            heads=attn0.num_heads,
            width=attn0.embed_dim,
            dtype=tower.transformer.get_cast_dtype(),
        )

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token per row, by the same rule as open_clip's `text_global_pool`."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full(tokens.shape[:-1], tokens.shape[-1] - 1, dtype=torch.long, device=tokens.device)
        return torch.zeros(tokens.shape[:-1], dtype=torch.long, device=tokens.device)  # 'first'

    def forward(
        self,
        tokens: torch.Tensor,
        offsets: torch.Tensor,
        pool_idx: torch.Tensor,
        prefix: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None,
        store_kv: int = 0,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Run token blocks through the tower, continuing cached prefixes.

        tokens (G, B, S): B token blocks per group g, each continuing group g's prefix at position
        offsets[g] (blocks do not see each other); pool_idx (G, B) indexes S. prefix = (keys per
        layer, transposed (G*H, hd, Lp), values per layer (G*H, Lp, hd), pad mask (G, Lp) True where not a real prefix
        token) or None. Returns the projected pooled features (G, B, D) and, if store_kv > 0, the
        keys (transposed) and values of the first store_kv positions (B must be 1) per layer.
        """
        G, B, S = tokens.shape
        T, H, D = B * S, self.heads, self.width
        hd = D // H
        scale = hd**-0.5
        dev = tokens.device
        t = torch.arange(S, device=dev)
        pos = (offsets[:, None, None] + t).clamp_(max=self.context_length - 1).expand(G, B, S).reshape(G, T)
        x = self.token_embedding(tokens.view(G, T)).to(self.dtype) + self.positional_embedding.to(self.dtype)[pos]
        # additive masks: causal within each block, blocks independent of each other, prefix padding hidden
        blk_id = torch.arange(B, device=dev).repeat_interleave(S)
        tt = t.repeat(B)
        visible = (blk_id[:, None] == blk_id[None, :]) & (tt[:, None] >= tt[None, :])  # (T, T)
        self_mask = torch.zeros(T, T, dtype=self.dtype, device=dev).masked_fill_(~visible, float("-inf"))
        if prefix is not None:
            pad = prefix[2]
            lp = pad.shape[1]
            pre_mask = torch.zeros(G, 1, 1, lp, dtype=self.dtype, device=dev).masked_fill_(pad[:, None, None], float("-inf"))
            pre_mask = pre_mask.expand(G, H, 1, lp).reshape(G * H, 1, lp)
        keys_t: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for li, blk in enumerate(self.blocks):
            attn = blk.attn
            qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(G, T, 3, H, hd).permute(2, 0, 3, 1, 4).reshape(3, G * H, T, hd).unbind(0)
            if store_kv:
                keys_t.append(k[:, :store_kv].transpose(1, 2).contiguous())  # (G*H, hd, L)
                values.append(v[:, :store_kv].contiguous())  # (G*H, L, hd)
            scores = torch.baddbmm(self_mask, q, k.transpose(1, 2), alpha=scale)  # (G*H, T, T)
            if prefix is None:
                out = torch.bmm(scores.softmax(dim=-1), v)
            else:
                scores = torch.cat([torch.baddbmm(pre_mask, q, prefix[0][li], alpha=scale), scores], dim=-1)
                probs = scores.softmax(dim=-1)
                out = torch.baddbmm(torch.bmm(probs[:, :, :lp], prefix[1][li]), probs[:, :, lp:], v)
            out = out.view(G, H, T, hd).transpose(1, 2).reshape(G, T, D)
            x = x + blk.ls_1(attn.out_proj(out))
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        rows = pool_idx + torch.arange(B, device=dev) * S  # (G, B) into T
        pooled = x.gather(1, rows[:, :, None].expand(G, B, D))
        pooled = self.ln_final(pooled)
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                pooled = self.text_projection(pooled)
            else:
                pooled = pooled @ self.text_projection
        return pooled, keys_t, values


class QueryEncoder:
    """Text query -> reciprocal text-diff vector Δq (float32, raw CLIP text-feature scale).

    `encode` batches several queries per pass and keeps an LRU cache of finished vectors (safe to
    share between threads). The fast path (prefix KV cache, no padding) is used when the text tower
    is an open_clip causal TextTransformer-style tower; otherwise the encoder logs why and computes
    the plain way. `plain_encode` is the reference computation, kept for checks and benchmarks.

    `model` must already be on `device` and in eval mode; `max_tokens_per_pass` (token positions
    per fast-path tower pass) bounds peak activation memory; a few thousand keeps activations
    cache-sized (measured ~15% faster per query than 16384 on CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        context_texts: Sequence[str],
        joiner: str = " ",
        cache_size: int = 1024,
        device: str | torch.device = "cpu",
        max_tokens_per_pass: int = 4096,
    ) -> None:
        if isinstance(context_texts, str) or len(context_texts) == 0:
            raise ValueError(f"context_texts must be a non-empty sequence of strings, got {context_texts!r:.80}")
        bad = [t for t in context_texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"context_texts must all be strings; got {type(bad[0]).__name__} {bad[0]!r:.80}")
        if not isinstance(joiner, str):
            raise TypeError(f"joiner must be a string, got {type(joiner).__name__}")
        if not isinstance(max_tokens_per_pass, int) or max_tokens_per_pass < 1:
            raise ValueError(f"max_tokens_per_pass must be an int >= 1, got {max_tokens_per_pass!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0 (0 disables the cache), got {cache_size!r}")
        self.device = torch.device(device)
        param = next(model.parameters())
        if param.device.type != self.device.type or (
            self.device.index is not None and param.device.index != self.device.index
        ):
            raise ValueError(f"model lives on {param.device} but device={self.device}; move the model first")
        if model.training:
            logger.warning("QueryEncoder got a model in training mode; call model.eval() for deterministic features")
        self.model = model
        self.tokenizer = tokenizer
        self.context_texts = list(context_texts)
        self.joiner = joiner
        self.cache_size = cache_size
        self.max_tokens_per_pass = max_tokens_per_pass
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

        context_tokens = self._tokenize(self.context_texts)
        self.fast_path = False
        self.fast_path_disabled_reason: str | None = None
        try:
            self._tower = _Tower.from_model(model)
            if context_tokens.shape[1] != self._tower.context_length:
                raise NotImplementedError(
                    f"tokenizer gives {context_tokens.shape[1]} positions, the text tower has {self._tower.context_length}"
                )
            eot = getattr(tokenizer, "eot_token_id", None)
            if eot is None:
                raise NotImplementedError(f"tokenizer {type(tokenizer).__name__} has no eot_token_id")
            self._eot_id = int(eot)
            self._build_prefix_cache(context_tokens)
            self.fast_path = True
        except NotImplementedError as err:
            self.fast_path_disabled_reason = str(err)
            logger.warning("QueryEncoder: fast path disabled, computing the plain way: %s", err)
            self._context_features = self._encode_text(context_tokens).double()
        feats = self._context_features
        if feats.ndim != 2 or feats.shape[0] != len(self.context_texts):
            raise ValueError(f"text encoder must return one feature vector per text; got shape {tuple(feats.shape)}")
        self.dim = int(feats.shape[1])
        self._context_mean = feats.mean(dim=0)

    # ------------------------------------------------------------------ public API

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        """Δq for each query, shape (len(queries), d), float32; repeated queries come from the LRU cache."""
        queries = self._check_queries(queries)
        out = np.empty((len(queries), self.dim), dtype=np.float32)
        missing: dict[str, None] = {}  # ordered set
        with self._lock:
            for i, q in enumerate(queries):
                hit = self._cache.get(q) if self.cache_size else None
                if hit is not None:
                    self._cache.move_to_end(q)
                    out[i] = hit
                    self.cache_hits += 1
                else:
                    self.cache_misses += 1
                    missing[q] = None
        if missing:
            computed = self._compute(list(missing))
            by_query = dict(zip(missing, computed))
            for i, q in enumerate(queries):
                if q in by_query:
                    out[i] = by_query[q]
            if self.cache_size:
                with self._lock:
                    for q, vec in by_query.items():
                        vec = vec.copy()
                        vec.setflags(write=False)
                        self._cache[q] = vec
                        self._cache.move_to_end(q)
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        return out

    def encode_one(self, query: str) -> np.ndarray:
        """Δq for one query, shape (d,), float32."""
        return self.encode([query])[0]

    def plain_encode(self, queries: Sequence[str]) -> np.ndarray:
        """Reference Δq: encode_text on P' and on every p' ⊕ q, padded to the full context; no caches."""
        queries = self._check_queries(queries)
        if not queries:
            return np.empty((0, self.dim), dtype=np.float32)
        u_ctx = self._encode_text(self._tokenize(self.context_texts)).double()
        u_full = self._encode_text(self._tokenize(self._concat(queries))).double()
        diff = u_full.view(len(queries), len(self.context_texts), -1) - u_ctx[None]
        return diff.mean(dim=1).float().cpu().numpy()

    def cache_info(self) -> dict[str, int]:
        """Hits, misses, current size and capacity of the LRU cache."""
        with self._lock:
            return {"hits": self.cache_hits, "misses": self.cache_misses, "size": len(self._cache), "maxsize": self.cache_size}

    # ------------------------------------------------------------------ internals

    def _check_queries(self, queries: Sequence[str]) -> list[str]:
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings, not a single string; use encode_one for one query")
        queries = list(queries)
        for q in queries:
            if not isinstance(q, str):
                raise TypeError(f"every query must be a string; got {type(q).__name__} {q!r:.80}")
        return queries

    def _concat(self, queries: Sequence[str]) -> list[str]:
        """Query-major list of p' + joiner + q."""
        return [p + self.joiner + q for q in queries for p in self.context_texts]

    def _tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        chunks = [
            self.model.encode_text(tokens[i : i + _PLAIN_BATCH], normalize=False)
            for i in range(0, tokens.shape[0], _PLAIN_BATCH)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def _build_prefix_cache(self, context_tokens: torch.Tensor) -> None:
        """u(p') and the per-layer keys/values of every prefix [SOT] + tokens(p'), in one pass."""
        tower = self._tower
        n = context_tokens.shape[0]
        is_eot = context_tokens == self._eot_id
        if not bool(is_eot.any(dim=1).all()):
            raise NotImplementedError("tokenizer output has a row without its eot_token_id; cannot locate prefixes")
        prefix_len = is_eot.int().argmax(dim=1)  # first end token
        pool = tower.pool_positions(context_tokens)
        lmax = int(prefix_len.max())
        steps = max(int(pool.max()) + 1, lmax)
        feats, keys, values = [], [], []
        step = max(1, self.max_tokens_per_pass // steps)
        for g in range(0, n, step):  # keys/values are (G*H, ...), G-major: chunks concatenate along dim 0
            f, k, v = tower.forward(
                context_tokens[g : g + step, None, :steps],
                torch.zeros(len(context_tokens[g : g + step]), dtype=torch.long, device=self.device),
                pool[g : g + step, None],
                store_kv=lmax,
            )
            feats.append(f[:, 0])
            keys.append(k)
            values.append(v)
        keys = [torch.cat(layer) for layer in zip(*keys)]
        values = [torch.cat(layer) for layer in zip(*values)]
        self._context_features = torch.cat(feats).double()
        self._prefix_len = prefix_len
        self._prefix_tokens = context_tokens[:, :lmax]
        self._prefix_pad = torch.arange(lmax, device=self.device)[None] >= prefix_len[:, None]
        self._prefix_kv = (keys, values)
        mb = sum(t.numel() * t.element_size() for t in keys + values) / 2**20
        logger.info("QueryEncoder: cached %d prefixes (max %d tokens), %.1f MiB of keys/values", n, lmax, mb)

    def _compute(self, queries: list[str]) -> np.ndarray:
        if not self.fast_path:
            u_full = self._encode_text(self._tokenize(self._concat(queries))).double()
            u_full = u_full.view(len(queries), len(self.context_texts), -1)
            return (u_full.mean(dim=1) - self._context_mean).float().cpu().numpy()
        return self._fast_compute(queries)

    @torch.no_grad()
    def _fast_compute(self, queries: list[str]) -> np.ndarray:
        tower = self._tower
        n, nq = len(self.context_texts), len(queries)
        full = self._tokenize(self._concat(queries)).view(nq, n, -1).transpose(0, 1)  # (N, Q, ctx)
        ctx = full.shape[-1]
        pool = tower.pool_positions(full)  # (N, Q)
        plen = self._prefix_len[:, None]  # (N, 1)
        lmax = self._prefix_tokens.shape[1]
        same_prefix = ((full[:, :, :lmax] == self._prefix_tokens[:, None]) | self._prefix_pad[:, None]).all(dim=-1)
        ok = same_prefix & (pool >= plen)  # (N, Q)
        suffix_len = torch.where(ok, pool - plen + 1, torch.ones_like(pool))
        per_query = suffix_len.max(dim=0).values.tolist()

        feats = torch.empty(n, nq, self.dim, dtype=torch.float64, device=self.device)
        start = 0
        while start < nq:  # greedy chunks of queries within the token budget
            stop, smax = start + 1, per_query[start]
            while stop < nq and n * (stop - start + 1) * max(smax, per_query[stop]) <= self.max_tokens_per_pass:
                smax = max(smax, per_query[stop])
                stop += 1
            idx = (plen[:, :, None] + torch.arange(smax, device=self.device)).clamp_(max=ctx - 1)  # (N, 1, S)
            tokens = full[:, start:stop].gather(2, idx.expand(-1, stop - start, -1))  # suffix tokens (N, B, S)
            pool_idx = (pool[:, start:stop] - plen).clamp(0, smax - 1)
            step = max(1, self.max_tokens_per_pass // ((stop - start) * smax))
            heads = tower.heads
            for g0 in range(0, n, step):  # prompt chunks, only when one query chunk exceeds the budget
                g1 = min(n, g0 + step)
                prefix = (
                    [k[g0 * heads : g1 * heads] for k in self._prefix_kv[0]],
                    [v[g0 * heads : g1 * heads] for v in self._prefix_kv[1]],
                    self._prefix_pad[g0:g1],
                )
                out, _, _ = tower.forward(tokens[g0:g1], self._prefix_len[g0:g1], pool_idx[g0:g1], prefix=prefix)
                feats[g0:g1, start:stop] = out.double()
            start = stop

        bad = (~ok).nonzero().tolist()
        if bad:
            logger.debug("QueryEncoder: %d (prompt, query) pairs do not split at the joiner; computing them exactly", len(bad))
            rows = torch.tensor(bad, device=self.device)
            steps = int(pool[rows[:, 0], rows[:, 1]].max()) + 1
            step = max(1, self.max_tokens_per_pass // steps)
            for i in range(0, len(bad), step):
                r = rows[i : i + step]
                tokens = full[r[:, 0], r[:, 1], :steps][:, None]
                out, _, _ = tower.forward(
                    tokens, torch.zeros(len(r), dtype=torch.long, device=self.device), pool[r[:, 0], r[:, 1]][:, None]
                )
                feats[r[:, 0], r[:, 1]] = out[:, 0].double()

        return (feats.mean(dim=0) - self._context_mean).float().cpu().numpy()
