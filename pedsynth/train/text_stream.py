"""TextReID's text stream ("Text-Based Person Search with Limited Data", Han et al., BMVC'21):
a bidirectional GRU over frozen CLIP word vectors, max-pooled over time, projected to the
joint embedding.

The word vectors are computed once, before training, into a dictionary: every word of the
training captions maps to the mean of its CLIP BPE tokens' rows of the CLIP text tower's token
embedding table (one row for most words). The CLIP text encoder is never run: training and
evaluation look words up in the frozen table (a buffer, so it is saved in checkpoints with the
GRU) and only the GRU and the projection learn. Words not in the dictionary (evaluation
captions) and NAM's mask get a zero vector.

:class:`WordTokenizer` has the call interface of open_clip's tokenizers (texts → a (N, L) id
tensor, SOT first, EOT after the last word, zero padding), so the dataset, NAM and the
evaluator use it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD, UNK, MASK, SOT, EOT = 0, 1, 2, 3, 4
SPECIALS = ("<pad>", "<unk>", "<mask>", "<sot>", "<eot>")  # EOT is the largest special id
FIRST_WORD = len(SPECIALS)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def split_words(text: str) -> list[str]:
    """Lower-cased words (letters and digits, with an apostrophe suffix); punctuation dropped."""
    return _WORD.findall(text.lower())


def build_vocabulary(captions: Iterable[str]) -> list[str]:
    """The sorted distinct words of ``captions`` (the training captions)."""
    return sorted({w for caption in captions for w in split_words(caption)})


class WordTokenizer:
    """Captions → word ids of a fixed vocabulary, laid out as open_clip lays out BPE ids."""

    mask_token = MASK
    first_word = FIRST_WORD  # NAM's random replacements are ordinary words
    vocab_size = None  # set per vocabulary; NAM draws random replacements below it

    def __init__(self, vocabulary: Sequence[str], context_length: int = 77) -> None:
        self.vocabulary = list(vocabulary)
        self.ids = {w: i + FIRST_WORD for i, w in enumerate(self.vocabulary)}
        self.context_length = context_length
        self.vocab_size = FIRST_WORD + len(self.vocabulary)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, UNK) for w in split_words(text)]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Any:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT, *self.encode(text)[: length - 2], EOT]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def _token_table(clip: nn.Module) -> torch.Tensor:
    for owner in (clip, getattr(clip, "text", None)):
        table = getattr(owner, "token_embedding", None)
        if isinstance(table, nn.Embedding):
            return table.weight
    raise ValueError(
        "model.text_stream = bigru needs the CLIP text tower's token embedding table "
        f"(token_embedding); {type(clip).__name__} has none"
    )


@torch.no_grad()
def word_vectors(clip: nn.Module, clip_tokenizer: Any, vocabulary: Sequence[str]) -> torch.Tensor:
    """The (specials + words, D) dictionary: each word's mean CLIP token-embedding row.

    Reads the embedding table's weights; runs no part of the text encoder. Special rows are 0.
    """
    table = _token_table(clip).detach().float().cpu()
    vectors = torch.zeros(FIRST_WORD + len(vocabulary), table.shape[1])
    eot = int(clip_tokenizer("")[0].max())
    for start in range(0, len(vocabulary), 1024):
        chunk = list(vocabulary[start : start + 1024])
        tokens = clip_tokenizer(chunk)
        for offset, row in enumerate(tokens):
            ends = torch.nonzero(row == eot).flatten()
            body = row[1 : int(ends[0]) if len(ends) else len(row)]
            if len(body):
                vectors[FIRST_WORD + start + offset] = table[body].mean(0)
    return vectors


class BiGRUTextStream(nn.Module):
    """Frozen word vectors → BiGRU → max-pool over the words → linear to ``embed_dim``."""

    def __init__(
        self, vectors: torch.Tensor, embed_dim: int, hidden: int = 512, layers: int = 1
    ) -> None:
        super().__init__()
        self.register_buffer("word_vectors", vectors.float().clone())
        self.gru = nn.GRU(
            vectors.shape[1], hidden, num_layers=layers, batch_first=True, bidirectional=True
        )
        self.projection = nn.Linear(2 * hidden, embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        words = ids[:, 1:]  # drop SOT
        valid = (words != PAD) & (words != EOT)
        lengths = valid.sum(1)
        width = max(1, int(lengths.max())) if len(lengths) else 1
        words, valid = words[:, :width], valid[:, :width]
        x = self.word_vectors[words.clamp(max=len(self.word_vectors) - 1)]
        x = x * valid.unsqueeze(-1)  # words past the end (EOT, padding) are zero
        packed = pack_padded_sequence(
            x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=width)
        keep = valid.clone()
        keep[:, 0] |= lengths == 0  # an empty caption pools its one (zero-input) step
        pooled = out.masked_fill(~keep.unsqueeze(-1), float("-inf")).max(dim=1).values
        return self.projection(pooled)


def build_text_stream(
    clip: nn.Module, clip_tokenizer: Any, captions: Iterable[str], cfg: Any
) -> tuple[BiGRUTextStream, WordTokenizer]:
    """The stream and its tokenizer for the training captions (``cfg``: the model config)."""
    vocabulary = build_vocabulary(captions)
    vectors = word_vectors(clip, clip_tokenizer, vocabulary)
    stream = BiGRUTextStream(
        vectors, int(clip.visual.output_dim), hidden=cfg.gru_hidden, layers=cfg.gru_layers
    )
    return stream, WordTokenizer(vocabulary, cfg.context_length)


def restore_text_stream(
    vocabulary: Sequence[str], vector_dim: int, embed_dim: int, cfg: Any
) -> tuple[BiGRUTextStream, WordTokenizer]:
    """An empty stream of a checkpoint's shape (its tensors are loaded afterwards)."""
    vectors = torch.zeros(FIRST_WORD + len(vocabulary), vector_dim)
    stream = BiGRUTextStream(vectors, embed_dim, hidden=cfg.gru_hidden, layers=cfg.gru_layers)
    return stream, WordTokenizer(vocabulary, cfg.context_length)
