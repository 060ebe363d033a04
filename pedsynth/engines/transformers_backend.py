"""A local Hugging Face model: ``AutoModelForCausalLM`` or ``AutoModelForImageTextToText``.

Batched ``generate`` with left padding, on CPU or GPU; ``tiny-random:NAME`` models are built
in code (``tiny_models``) and then loaded exactly like a hub id or a local folder. Hub access
follows ``HF_HUB_OFFLINE``; remote code runs only with ``trust_remote_code: true``.

Seeding: HF ``generate`` draws from one global generator, so per-request seeds cannot be
honoured one by one inside a batch. Each batch is seeded from its requests' seeds, which makes
a run reproducible for the same requests and ``batch_size`` (vLLM honours each seed exactly).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from pedsynth.engines.device import resolve_device, resolve_dtype
from pedsynth.engines.text import (
    ChatRequest,
    EngineError,
    GenerationResult,
    GeneratorBase,
    Kind,
    derive_seed,
    open_image,
)
from pedsynth.engines.tiny_models import is_tiny, tiny_model_dir
from pedsynth.schemas.text import EngineConfig


class TransformersGenerator(GeneratorBase):
    """Loads the model once; ``generate`` runs batches of ``batch_size`` under a lock."""

    structured_output = False

    def __init__(self, config: EngineConfig, kind: Kind):
        import torch
        import transformers

        super().__init__(config, kind)
        self.device = resolve_device(config.device)
        if config.cpu_threads is not None and self.device.type == "cpu":
            # Process-wide: small models run fastest on one thread per worker, and two OpenMP
            # threads per worker thrash when Prefect runs several workers on a few cores.
            torch.set_num_threads(config.cpu_threads)
        source = str(tiny_model_dir(config.model)) if is_tiny(config.model) else config.model
        options: dict[str, Any] = {
            "revision": config.revision,
            "trust_remote_code": config.trust_remote_code,
        }
        try:
            if kind == "vision":
                self.processor = transformers.AutoProcessor.from_pretrained(source, **options)
                self.tokenizer = self.processor.tokenizer
                model_cls = transformers.AutoModelForImageTextToText
            else:
                self.processor = None
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, **options)
                model_cls = transformers.AutoModelForCausalLM
            self.model = model_cls.from_pretrained(
                source, dtype=resolve_dtype(config.dtype, self.device), **options
            ).to(self.device)
        except (OSError, ValueError, ImportError) as exc:
            raise EngineError(f"cannot load {config.generator_id} ({kind}): {exc}") from exc
        self.model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._torch = torch
        self._lock = threading.Lock()

    def _generate(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        size = self.config.batch_size
        results: list[GenerationResult] = []
        for start in range(0, len(requests), size):
            results += self._generate_batch(requests[start : start + size])
        return results

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _conversation(req: ChatRequest) -> list[dict[str, Any]]:
        """The HF chat messages of one request; the image goes in decoded."""
        content: Any = req.prompt
        if req.image is not None:
            image = open_image(req.image)
            content = [{"type": "image", "image": image}, {"type": "text", "text": req.prompt}]
        messages = [{"role": "system", "content": req.system}] if req.system else []
        return [*messages, {"role": "user", "content": content}]

    def _sampling(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}

    def _generate_batch(self, batch: Sequence[ChatRequest]) -> list[GenerationResult]:
        torch = self._torch
        conversations = [self._conversation(req) for req in batch]
        seed = derive_seed(*(r.seed if r.seed is not None else r.request_id for r in batch))
        with self._lock, torch.inference_mode():
            # A processor takes the padding among its own kwargs; a tokenizer takes it directly.
            padding: dict[str, Any] = {"padding": True}
            encoded = (self.processor or self.tokenizer).apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                **({"processor_kwargs": padding} if self.processor is not None else padding),
            )
            inputs = encoded.to(self.device)
            torch.manual_seed(seed)
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.config.max_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **self._sampling(),
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].cpu()
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        # Prompt tokens per row: the attention mask, as left padding pads every row to the
        # longest (image tokens included for a vision model: they are in the input ids).
        mask = inputs.get("attention_mask")
        width = inputs["input_ids"].shape[1]
        prompt_lengths = mask.sum(dim=1).tolist() if mask is not None else [width] * len(batch)
        eos = self.tokenizer.eos_token_id
        stops = self._stop_ids()
        results = []
        for req, tokens, text, prompt_length in zip(
            batch, new_tokens.tolist(), texts, prompt_lengths, strict=True
        ):
            stopped = eos in tokens or self.tokenizer.pad_token_id in tokens
            results.append(
                GenerationResult(
                    req.request_id,
                    text.strip(),
                    finish_reason="stop" if stopped else "length",
                    prompt_tokens=int(prompt_length),
                    completion_tokens=_generated(tokens, stops),
                )
            )
        return results

    def _stop_ids(self) -> frozenset[int]:
        """The token ids that end a generation: the model's EOS ids and the tokenizer's."""
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = configured if isinstance(configured, list | tuple) else [configured]
        return frozenset(i for i in [*ids, self.tokenizer.eos_token_id] if isinstance(i, int))


def _generated(tokens: Sequence[int], stops: frozenset[int]) -> int:
    """Tokens a row generated: up to and including its first stop token (the padding that
    ``generate`` adds after a row has stopped is not generated), else all of them."""
    for i, token in enumerate(tokens):
        if token in stops:
            return i + 1
    return len(tokens)
