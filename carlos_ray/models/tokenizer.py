"""A real CLIP BPE tokenizer for transformers, built offline from the vocabulary open_clip ships.

open_clip's `bpe_simple_vocab_16e6.txt.gz` holds the same merges as OpenAI's CLIP; its vocabulary is
the 256 byte symbols, their `</w>` forms, one token per merge, and two specials. open_clip names the
specials `<start_of_text>`/`<end_of_text>`; transformers' CLIPTokenizer expects
`<|startoftext|>`/`<|endoftext|>`, so they are renamed here. Ids are identical to open_clip's.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(token -> id, merges) exactly as open_clip's SimpleTokenizer builds them."""
    path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    with path.open("rb") as fh:
        lines = gzip.decompress(fh.read()).decode("utf-8").split("\n")
    merges = tuple(tuple(m.split()) for m in lines[1 : N_MERGES + 1])
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """transformers CLIPTokenizer with open_clip's vocabulary (SDXL's tokenizer pads with `<|endoftext|>`, tokenizer_2 with `!`)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
