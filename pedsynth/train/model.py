"""The dual encoder: an open_clip model plus IRRA's shared identity classifier.

Image feature = the pooled (CLS) embedding, text feature = the end-of-text token's embedding,
both projected; :meth:`DualEncoder.forward` returns them unnormalised (the ID classifier
sees them as IRRA does) and losses and retrieval normalise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pedsynth.schemas.train import ModelConfig


def create_clip(cfg: ModelConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Build the open_clip model and its tokenizer from a config, by the one weights rule of
    :mod:`pedsynth.engines.clip_weights` (a tag, a hub id, a local ``.safetensors`` file or a
    train-retriever checkpoint; null for a random init; never a pickle)."""
    from pedsynth.engines.clip_weights import create_clip_model, load_clip_tokenizer

    # seed=None: a random init follows the global RNG, which the trainer seeds.
    model, tokenizer_name = create_clip_model(
        cfg.name, cfg.pretrained, image_size=cfg.image_size, seed=None
    )
    tokenizer = load_clip_tokenizer(tokenizer_name, context_length=cfg.context_length)
    return model.to(device), tokenizer


def image_size_of(clip: nn.Module) -> tuple[int, int]:
    size = clip.visual.image_size
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def embed_dim_of(clip: nn.Module) -> int:
    return int(clip.visual.output_dim)


def encode_text_trimmed(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` over only the columns up to the batch's last token.

    Under the causal mask, positions after end-of-text cannot change the end-of-text feature,
    so cutting the all-padding tail gives the same result at a fraction of the cost (person
    descriptions use ~30 of 77 positions). Other model classes use their own method.
    """
    supported = all(
        hasattr(clip, name)
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final")
    )
    if not supported or getattr(clip, "text_pool_type", "argmax") != "argmax":
        return clip.encode_text(tokens, normalize=False)
    used = torch.nonzero(tokens.ne(0).any(dim=0)).flatten()
    length = int(used[-1]) + 1 if len(used) else 1
    tokens = tokens[:, :length]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = clip.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class DualEncoder(nn.Module):
    """open_clip image and text towers + one linear identity classifier shared by both.

    With ``text_stream`` (TextReID's BiGRU, :mod:`pedsynth.train.text_stream`) texts go
    through it instead of the CLIP text transformer, which is then never run.
    """

    def __init__(
        self, clip: nn.Module, num_identities: int, text_stream: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.clip = clip
        self.text_stream = text_stream
        self.classifier = nn.Linear(embed_dim_of(clip), max(1, num_identities))
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=False)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_stream is not None:
            return self.text_stream(tokens)
        return encode_text_trimmed(self.clip, tokens)

    def head_parameters(self) -> list[nn.Parameter]:
        """New layers (not in the pretrained CLIP): trained at ``head_lr_factor`` × the rate."""
        heads = list(self.classifier.parameters())
        if self.text_stream is not None:
            heads += [p for p in self.text_stream.parameters() if p.requires_grad]
        return heads


class MomentumEncoder(nn.Module):
    """A frozen copy of the image and text towers updated by EMA (CM-MoCo's key encoders)."""

    def __init__(self, clip: nn.Module, text_stream: nn.Module | None = None) -> None:
        super().__init__()
        import copy

        self.clip = copy.deepcopy(clip)
        self.text_stream = copy.deepcopy(text_stream)
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = self.clip.encode_image(images, normalize=True)
        if self.text_stream is not None:
            return image, nn.functional.normalize(self.text_stream(tokens), dim=-1)
        return image, self.clip.encode_text(tokens, normalize=True)
