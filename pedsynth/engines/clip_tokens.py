"""CLIP BPE tokens as the ``tokens`` column stores them, for the score stage and the trainer.

A stored token is the text of one BPE token: its bytes decoded as UTF-8 (a character split
over two tokens gives U+FFFD in each) with the end-of-word marker ``</w>`` removed, so
``"A man, carrying"`` is stored as ``["a", "man", ",", "carrying"]``. Start, end and padding
are not stored; ``token_noise`` has one value per stored token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

END_OF_WORD = "</w>"
BPE_ATTRIBUTES = ("encode", "decoder", "byte_decoder", "sot_token_id", "eot_token_id")


@dataclass(frozen=True)
class TokenizedTexts:
    """CLIP token ids plus, per text, its content tokens (no start/end/padding) as strings."""

    ids: torch.Tensor  # (N, context_length) int64, exactly as open_clip's tokenizer builds it
    eot_positions: list[int]  # index of the end-of-text token in each row
    tokens: list[list[str]]  # content tokens, positions 1 .. eot-1
    truncated: list[bool]  # the caption did not fit the context and was cut


def is_clip_bpe(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is open_clip's CLIP BPE tokenizer (what the strings come from)."""
    return all(hasattr(tokenizer, attr) for attr in BPE_ATTRIBUTES)


def clip_token_strings(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """The stored form of CLIP BPE token ids (content tokens only; see the module)."""
    out = []
    for token_id in token_ids:
        raw = bytearray(tokenizer.byte_decoder[c] for c in tokenizer.decoder[int(token_id)])
        out.append(raw.decode("utf-8", errors="replace").replace(END_OF_WORD, ""))
    return out


def tokenize(tokenizer: Any, texts: Sequence[str], context_length: int) -> TokenizedTexts:
    """Token ids as open_clip builds them (SOT, BPE…, EOT, zero padding; cut to fit)."""
    ids = torch.zeros(len(texts), context_length, dtype=torch.long)
    eot_positions, tokens, truncated = [], [], []
    for i, text in enumerate(texts):
        body = tokenizer.encode(text)
        cut = len(body) + 2 > context_length
        body = body[: context_length - 2]
        row = [tokenizer.sot_token_id, *body, tokenizer.eot_token_id]
        ids[i, : len(row)] = torch.tensor(row)
        eot_positions.append(len(row) - 1)
        tokens.append(clip_token_strings(tokenizer, body))
        truncated.append(cut)
    return TokenizedTexts(ids, eot_positions, tokens, truncated)
