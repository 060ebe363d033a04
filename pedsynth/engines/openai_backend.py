"""Any OpenAI-compatible chat endpoint (vLLM's server, OpenAI, others) via the ``openai`` client.

A batch is sent with many requests in flight under :class:`AdaptiveLimit`, an AIMD limit: it
halves on a 429 (once per congestion episode, not once per 429) and grows by one after as many
successes in a row as the limit, up to ``max_concurrency``. Failed attempts are retried
(``retries`` times) with full-jitter exponential backoff on 429, 5xx, 408/409, timeouts,
connection errors, malformed bodies and empty choices; a 429's ``Retry-After`` is honoured up
to ``max_backoff_s``. Other 4xx are final. A request still failing becomes a result with
``error`` ("reason: detail"), never an exception, so the stage writes it as a reject row.

Images travel as base64 data URLs. The API key is read from the environment variable named by
``openai.api_key_env`` when the engine is built; it is kept only inside the client, never put in
a result, a log line or the config.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pedsynth.engines.text import (
    ChatRequest,
    EngineError,
    GenerationResult,
    Kind,
    check_unique_ids,
    failure,
    openai_messages,
)
from pedsynth.schemas.text import EngineConfig

REQUEST_ID_HEADER = "X-Request-Id"
ATTEMPT_HEADER = "X-Attempt"


class AdaptiveLimit:
    """A concurrency limit for asyncio tasks that backs off on throttling and recovers.

    ``acquire`` returns the congestion epoch the slot was taken in; a throttled release
    halves the limit only if no halving happened since that epoch, so a burst of 429s from
    one overload counts once.
    """

    def __init__(self, initial: int, maximum: int, minimum: int = 1):
        self.maximum, self.minimum = maximum, minimum
        self.limit = max(minimum, min(initial, maximum))
        self.in_flight = 0
        self.peak_in_flight = 0
        self.epoch = 0
        self._successes = 0
        self._cond = asyncio.Condition()
        self.history: list[tuple[float, int]] = [(time.monotonic(), self.limit)]

    async def acquire(self) -> int:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return self.epoch

    async def release(self, epoch: int, outcome: str) -> None:
        """``outcome``: ``ok`` (counts toward growth), ``throttled`` (halve) or ``failed``."""
        async with self._cond:
            self.in_flight -= 1
            if outcome == "throttled":
                self._successes = 0
                if epoch == self.epoch:
                    self.epoch += 1
                    self._set(max(self.minimum, self.limit // 2))
            elif outcome == "ok":
                self._successes += 1
                if self._successes >= self.limit and self.limit < self.maximum:
                    self._successes = 0
                    self._set(self.limit + 1)
            self._cond.notify_all()

    def _set(self, limit: int) -> None:
        self.limit = limit
        self.history.append((time.monotonic(), limit))


@dataclass
class RunStats:
    """What the last ``generate`` call did: attempts, the limit over time, peak in flight."""

    requests: int = 0
    attempts: int = 0
    retried: int = 0
    failed: int = 0
    limit_history: list[tuple[float, int]] = field(default_factory=list)
    peak_in_flight: int = 0


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str, wait: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.wait = reason, detail, wait


def _retry_after(headers: Any) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds; None if absent or a date."""
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAIGenerator:
    def __init__(self, config: EngineConfig, kind: Kind):
        import openai  # noqa: F401  (fail now, with a clear message, if it is missing)

        self.config, self.kind = config, kind
        opts = config.openai
        if opts.api_key_env is None:
            self._api_key = "none"  # a server without auth; the client insists on a value
        else:
            key = os.environ.get(opts.api_key_env)
            if not key:
                raise EngineError(
                    f"{config.generator_id}: set the environment variable {opts.api_key_env} "
                    "to the API key, or set openai.api_key_env: null for a server without auth"
                )
            self._api_key = key
        self.last_stats = RunStats()

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIGenerator({self.generator_id!r}, base_url={self.config.openai.base_url!r})"

    @property
    def generator_id(self) -> str:
        return self.config.generator_id

    def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        check_unique_ids(requests)
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._run(list(requests)))
        # Called from inside an event loop: run ours on a thread of its own.
        box: list[Any] = []
        thread = threading.Thread(target=lambda: box.append(asyncio.run(self._run(requests))))
        thread.start()
        thread.join()
        return box[0]

    # ------------------------------------------------------------------ internals

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` for one request."""
        cfg = self.config
        body: dict[str, Any] = {
            "model": cfg.model,
            "messages": openai_messages(request),
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        return body

    async def _run(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        import openai

        opts = self.config.openai
        limit = AdaptiveLimit(
            opts.initial_concurrency or opts.max_concurrency, opts.max_concurrency
        )
        stats = RunStats(requests=len(requests))
        async with openai.AsyncOpenAI(
            api_key=self._api_key, base_url=opts.base_url, max_retries=0, timeout=opts.timeout_s
        ) as client:
            results = await asyncio.gather(*(self._one(client, limit, r, stats) for r in requests))
        stats.limit_history = limit.history
        stats.peak_in_flight = limit.peak_in_flight
        stats.failed = sum(not r.ok for r in results)
        self.last_stats = stats
        return list(results)

    def _backoff(self, attempt: int) -> float:
        opts = self.config.openai
        return random.uniform(0, min(opts.max_backoff_s, opts.backoff_s * 2**attempt))

    async def _one(
        self, client: Any, limit: AdaptiveLimit, request: ChatRequest, stats: RunStats
    ) -> GenerationResult:
        opts = self.config.openai
        if self.kind == "text" and request.image is not None:
            return failure(request, "unsupported", "a text engine got an image")
        if self.kind == "vision" and request.image is None:
            return failure(request, "bad_request", "a vision request needs an image")
        try:
            body = self.request_body(request)
        except ValueError as exc:
            return failure(request, "bad_image", str(exc))
        last: _Retryable | None = None
        for attempt in range(opts.retries + 1):
            if attempt:
                stats.retried += 1
                wait = self._backoff(attempt - 1)
                if last is not None and last.wait is not None:
                    wait = max(wait, min(last.wait, opts.max_backoff_s))
                await asyncio.sleep(wait)
            stats.attempts += 1
            epoch = await limit.acquire()
            outcome = "failed"
            try:
                result = await self._attempt(client, request, body, attempt)
                outcome = "ok"
                return result
            except _Retryable as exc:
                last = exc
                outcome = "throttled" if exc.reason == "rate_limited" else "failed"
            except _Final as exc:
                return failure(request, exc.reason, exc.detail)
            finally:
                await limit.release(epoch, outcome)
        assert last is not None
        attempts = opts.retries + 1
        return failure(request, last.reason, f"{last.detail} (after {attempts} attempts)")

    async def _attempt(
        self, client: Any, request: ChatRequest, body: dict[str, Any], attempt: int
    ) -> GenerationResult:
        import openai

        headers = {REQUEST_ID_HEADER: request.request_id, ATTEMPT_HEADER: str(attempt)}
        try:
            response = await client.chat.completions.create(
                **body, extra_headers=headers, timeout=self.config.openai.timeout_s
            )
        except openai.RateLimitError as exc:
            wait = _retry_after(exc.response.headers)
            raise _Retryable("rate_limited", "HTTP 429", wait) from None
        except openai.APITimeoutError:
            raise _Retryable("timeout", f"no reply in {self.config.openai.timeout_s} s") from None
        except openai.APIConnectionError as exc:
            raise _Retryable("connection_error", type(exc).__name__) from None
        except openai.APIResponseValidationError as exc:
            raise _Retryable("malformed_response", str(exc)[:200]) from None
        except openai.APIStatusError as exc:
            code = exc.status_code
            if code >= 500 or code in (408, 409):
                raise _Retryable("server_error", f"HTTP {code}") from None
            raise _Final("http_error", f"HTTP {code}: {str(exc.message)[:200]}") from None
        except ValueError as exc:  # a body that is not JSON
            raise _Retryable("malformed_response", f"{type(exc).__name__}: {exc}"[:200]) from None
        choices = getattr(response, "choices", None)
        if not choices or choices[0].message is None or choices[0].message.content is None:
            raise _Retryable("empty_choice", "the reply had no choice with content")
        choice = choices[0]
        return GenerationResult(
            request.request_id, choice.message.content, finish_reason=choice.finish_reason
        )


class _Final(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
