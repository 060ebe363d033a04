"""Tiny random-weight chat models built in code: offline tests and the offline config.

``tiny-random:llama`` is a 2-layer Llama text model; ``tiny-random:llava`` a LLaVA
vision-language model (2-layer CLIP vision tower + that Llama). Both share a byte-level BPE
tokenizer trained here on its own pedestrian-caption words, the prompts and the caption
templates, with a short chat template. They are saved with ``save_pretrained`` to a local
folder and loaded by the transformers backend through the same ``Auto*`` classes as any hub
model, so the offline config exercises the real code path.

Their weights are random: what they write is word salad (captions are noise). Their generation
config suppresses tokens that decode to control or non-ASCII characters and the role/image
markers, so the noise at least looks like words; ``min_new_tokens`` keeps it from being empty.
The build is deterministic (fixed seed) and takes about a second; the folder is built once per
machine under ``$PEDSYNTH_CACHE`` (default ``~/.cache/pedsynth``) and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

TINY_PREFIX = "tiny-random:"
TINY_MODELS = ("llama", "llava")
BUILD_VERSION = "1"  # bump when the recipe changes, so stale folders are not reused

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS.append(IMAGE_TOKEN)

# Role markers, then the content: plain strings, or lists of image/text parts (OpenAI style or
# HF style). Images become one <image> marker that the LLaVA processor expands.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_COLOURS = (
    "black",
    "white",
    "grey",
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "pink",
    "purple",
    "brown",
    "beige",
)
# Pedestrian-caption words the tokenizer learns, grouped by what they describe; each kind of
# garment or belonging is followed by the colours it comes in.
_CAPTION_WORDS: tuple[tuple[str, ...], ...] = (
    ("man", "woman"),
    ("short", "long", "ponytail", "bun", "bald", "curly"),
    ("black", "brown", "blonde", "grey", "red"),
    ("t-shirt", "shirt", "jacket", "coat", "hoodie", "sweater", "tank top", "dress"),
    _COLOURS,
    ("trousers", "jeans", "shorts", "skirt", "leggings"),
    _COLOURS,
    ("sneakers", "boots", "leather shoes", "sandals", "heels"),
    _COLOURS,
    ("backpack", "handbag", "shoulder bag"),
    _COLOURS,
    ("cap", "beanie", "hat"),
    _COLOURS,
)

_lock = threading.Lock()


def cache_root() -> Path:
    return Path(os.environ.get("PEDSYNTH_CACHE") or Path.home() / ".cache" / "pedsynth")


def is_tiny(model: str) -> bool:
    return model.startswith(TINY_PREFIX)


def _corpus() -> list[str]:
    """Sentences the tokenizer is trained on: caption words, the prompts and the templates."""
    from pedsynth.prompts import PROMPT_NAMES, load_prompt, load_templates

    words = [word for group in _CAPTION_WORDS for word in group]
    lines = [load_prompt(n).text for n in PROMPT_NAMES]
    lines += [t.text for t in load_templates().templates]
    lines += [
        f"a {g} with {h} hair wears a {c} {u} and {lc} {lo}"
        for g in ("man", "woman", "person")
        for h in ("short black", "long brown", "curly blonde")
        for c, u in (("red", "coat"), ("white", "shirt"), ("blue", "jacket"))
        for lc, lo in (("black", "trousers"), ("grey", "jeans"))
    ]
    return lines + [" ".join(words)] * 4


def build_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer with the chat template, padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _suppressed_ids(tokenizer) -> list[int]:
    """Token ids that must not be generated: markers, and pieces that are not printable ASCII."""
    eos = tokenizer.eos_token_id
    bad = []
    for token_id in range(len(tokenizer)):
        if token_id == eos:
            continue
        piece = tokenizer.decode([token_id])
        special = tokenizer.convert_ids_to_tokens(token_id) in SPECIAL_TOKENS
        if special or not piece or any(not (32 <= ord(ch) < 127) for ch in piece):
            bad.append(token_id)
    return bad


def _text_config(tokenizer):
    from transformers import LlamaConfig

    # head_dim 64 (hidden 128, 2 heads): the smallest that vLLM's kernels also accept.
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=_suppressed_ids(tokenizer),
        min_new_tokens=6,
    )


def _save_llama(folder: Path) -> None:
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(_text_config(tokenizer))
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def tiny_vision_config(**extra):
    """The 2-layer CLIP vision tower of the tiny models (32-pixel input, 8-pixel patches):
    LLaVA's, and the tiny Paint-by-Example's image encoder."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        **extra,
    )


def tiny_image_processor():
    """The CLIP image processor of :func:`tiny_vision_config` (32x32 input)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _save_llava(folder: Path) -> None:
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer()
    vision = tiny_vision_config()
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = _generation_config(tokenizer)
    processor = LlavaProcessor(
        image_processor=tiny_image_processor(),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


_BUILDERS = {"llama": _save_llama, "llava": _save_llava}


def tiny_model_dir(model: str) -> Path:
    """The local folder of ``tiny-random:NAME``, built (deterministically) on first use."""
    name = model.removeprefix(TINY_PREFIX)
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny model {model!r}; known: {', '.join(TINY_MODELS)}")
    folder = cache_root() / "tiny-models" / f"{name}-v{BUILD_VERSION}"
    if (folder / "config.json").exists():
        return folder
    with _lock:
        if (folder / "config.json").exists():
            return folder
        import torch

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{uuid.uuid4().hex[:6]}-", dir=folder.parent))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                _BUILDERS[name](tmp)
            try:
                os.replace(tmp, folder)  # another process may have won the race: keep theirs
            except OSError:
                if not (folder / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
