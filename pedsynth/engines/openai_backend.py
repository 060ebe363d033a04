"""Any OpenAI-compatible chat endpoint (vLLM's server, OpenAI, others) via the ``openai`` client.

A batch is sent with many requests in flight under :class:`AdaptiveLimit`, an AIMD limit: it
halves on a 429 (once per congestion episode, not once per 429) and grows by one after as many
successes in a row as the limit, up to ``max_concurrency``. A request holds its slot through
all its attempts and the waits between them.

Retries are the SDK's: it decides what is retried (429, 5xx, 408/409, timeouts, connection
errors; other 4xx are final), reads ``Retry-After`` (seconds, milliseconds or a date) and
reuses one idempotency key across the attempts. Three parts it does not offer are kept here:
its waits are fixed (0.5 s doubling to 8 s, openai-python#1167), so :class:`_Client` sets them
from ``backoff_s`` / ``max_backoff_s``; it treats a 200 with a malformed body or no choice as
done, so those are retried here within the same ``retries`` budget; and it neither counts
attempts nor reports a 429 it retried, so an httpx event hook on its HTTP client does (the
count, the ``X-Attempt`` header, and the 429 that halves the limit). A request still failing
becomes a result with ``error`` ("reason: detail"), never an exception, so the stage writes
it as a reject row.

Images travel as base64 data URLs. The API key is read when the engine is built, from the
variable :meth:`OpenAIOptions.key_rule` names (the same rule the preflight applies: a loopback
endpoint needs none unless one is named); it is kept only inside the client and registered with
:mod:`pedsynth.redact`, so server text copied into a result (a 401 that echoes the
``Authorization`` header) and log lines never carry it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import openai

from pedsynth.engines.text import (
    DATA_URL_FORMATS,
    ChatRequest,
    EngineError,
    GenerationResult,
    GeneratorBase,
    Kind,
    failure,
    openai_messages,
)
from pedsynth.redact import install_log_redaction, redact, register_secret
from pedsynth.schemas.text import NO_API_KEY, EngineConfig, OpenAIOptions

REQUEST_ID_HEADER = "X-Request-Id"
ATTEMPT_HEADER = "X-Attempt"
DETAIL_CHARS = 200  # of server text kept in a result's error, after redaction

log = logging.getLogger(__name__)


class AdaptiveLimit:
    """A concurrency limit for asyncio tasks that backs off on throttling and recovers.

    ``acquire`` returns the congestion epoch the slot was taken in; :meth:`throttled` halves
    the limit only if no halving happened since that epoch, so a burst of 429s from one
    overload (retries of requests admitted before the halving included) counts once.
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

    async def throttled(self, epoch: int) -> None:
        """A 429 to a request admitted in ``epoch``."""
        async with self._cond:
            self._successes = 0
            if epoch == self.epoch:
                self.epoch += 1
                self._set(max(self.minimum, self.limit // 2))

    async def release(self, ok: bool) -> None:
        """Give the slot back; a success counts toward growth."""
        async with self._cond:
            self.in_flight -= 1
            if ok:
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


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential waits; a ``Retry-After`` is honoured up to ``max_backoff_s``."""

    retries: int  # the attempt budget of one request, after its first attempt
    backoff_s: float
    max_backoff_s: float

    def wait(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds before retry number ``retry`` (0 for the first retry)."""
        wait = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**retry))
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            wait = max(wait, min(retry_after, self.max_backoff_s))
        return wait


class _Client(openai.AsyncOpenAI):
    """The SDK client with its waits taken from :class:`Backoff`.

    ``_calculate_retry_timeout`` is the one method the SDK calls for every wait, with the
    retries it has left; overriding it is the only way to set the waits. Should an SDK stop
    calling it, its own jittered schedule applies and everything else still holds.
    """

    def __init__(self, *, backoff: Backoff, **kwargs: Any):
        super().__init__(**kwargs)
        self._backoff = backoff

    def _calculate_retry_timeout(
        self, remaining_retries: int, options: Any, response_headers: Any = None
    ) -> float:
        # A client is built with the budget a request has left, so the retries used so far,
        # over every call for that request, are the whole budget minus what remains.
        retry = self._backoff.retries - remaining_retries
        return self._backoff.wait(retry, self._parse_retry_after_header(response_headers))


class _Attempts:
    """Per request id: HTTP attempts sent and the epoch its slot was taken in (event hooks)."""

    def __init__(self, limit: AdaptiveLimit):
        self.limit = limit
        self.sent: dict[str, int] = {}
        self.epochs: dict[str, int] = {}

    async def on_request(self, request: Any) -> None:
        request_id = request.headers.get(REQUEST_ID_HEADER)
        attempt = self.sent.get(request_id, 0)
        self.sent[request_id] = attempt + 1
        request.headers[ATTEMPT_HEADER] = str(attempt)

    async def on_response(self, response: Any) -> None:
        if response.status_code == 429:
            request_id = response.request.headers.get(REQUEST_ID_HEADER)
            await self.limit.throttled(self.epochs.get(request_id, self.limit.epoch))


class _Failed(Exception):
    """Why one ``create`` call gave no text. ``retryable``: a failure of a kind that is retried
    (so its detail says after how many attempts); ``ours``: one the SDK does not retry."""

    def __init__(self, reason: str, detail: str, *, retryable: bool = True, ours: bool = False):
        super().__init__(detail)
        self.reason, self.detail, self.retryable, self.ours = reason, detail, retryable, ours


class _Clients:
    """SDK clients over one HTTP client, one per retry budget a request can have left."""

    def __init__(self, api_key: str, opts: OpenAIOptions, http_client: Any):
        self.api_key, self.opts, self.http_client = api_key, opts, http_client
        self.backoff = Backoff(opts.retries, opts.backoff_s, opts.max_backoff_s)
        self._by_budget: dict[int, _Client] = {}

    def with_budget(self, retries: int) -> _Client:
        if retries not in self._by_budget:
            self._by_budget[retries] = _Client(
                backoff=self.backoff,
                api_key=self.api_key,
                base_url=self.opts.base_url,
                max_retries=retries,
                timeout=self.opts.timeout_s,
                http_client=self.http_client,
            )
        return self._by_budget[retries]


class OpenAIGenerator(GeneratorBase):
    image_formats = DATA_URL_FORMATS

    def __init__(self, config: EngineConfig, kind: Kind):
        super().__init__(config, kind)
        install_log_redaction()
        variable, required = config.openai.key_rule()
        key = os.environ.get(variable) if variable else None
        if not key and required:
            raise EngineError(
                f"{config.generator_id}: set the environment variable {variable} to the API "
                f"key, or set openai.api_key_env: {NO_API_KEY} for a server without auth"
            )
        register_secret(key)
        self._api_key = key or "none"  # a server without auth; the client insists on a value
        self.last_stats = RunStats()

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIGenerator({self.generator_id!r}, base_url={self.config.openai.base_url!r})"

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
        if cfg.seed_per_request and request.seed is not None:
            body["seed"] = request.seed
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        return body

    def _generate(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._run(requests))
        # Called from inside an event loop: run ours on a thread of its own.
        box: list[Any] = []
        thread = threading.Thread(target=lambda: box.append(asyncio.run(self._run(requests))))
        thread.start()
        thread.join()
        return box[0]

    # ------------------------------------------------------------------ internals

    async def _run(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        opts = self.config.openai
        limit = AdaptiveLimit(
            opts.initial_concurrency or opts.max_concurrency, opts.max_concurrency
        )
        attempts = _Attempts(limit)
        hooks = {"request": [attempts.on_request], "response": [attempts.on_response]}
        async with openai.DefaultAsyncHttpxClient(event_hooks=hooks) as http_client:
            clients = _Clients(self._api_key, opts, http_client)
            results = await asyncio.gather(
                *(self._one(clients, limit, attempts, r) for r in requests)
            )
        sent = attempts.sent.values()
        self.last_stats = RunStats(
            requests=len(requests),
            attempts=sum(sent),
            retried=sum(n - 1 for n in sent if n > 1),
            failed=sum(not r.ok for r in results),
            limit_history=limit.history,
            peak_in_flight=limit.peak_in_flight,
        )
        failed = [r for r in results if not r.ok]
        if failed:
            log.warning(
                "%s: %d of %d requests failed (first: %s)",
                self.generator_id,
                len(failed),
                len(results),
                failed[0].error,
            )
        return list(results)

    async def _one(
        self, clients: _Clients, limit: AdaptiveLimit, attempts: _Attempts, request: ChatRequest
    ) -> GenerationResult:
        retries = self.config.openai.retries
        body = self.request_body(request)
        headers = {REQUEST_ID_HEADER: request.request_id}
        attempts.epochs[request.request_id] = await limit.acquire()
        ok = False
        try:
            while True:
                used = attempts.sent.get(request.request_id, 0)
                try:
                    result = await self._attempt(clients.with_budget(retries - used), body, headers)
                except _Failed as exc:
                    used = attempts.sent.get(request.request_id, 0)
                    if exc.ours and used <= retries:
                        await asyncio.sleep(clients.backoff.wait(used - 1))
                        continue
                    detail = (
                        f"{exc.detail} (after {used} attempts)" if exc.retryable else exc.detail
                    )
                    return failure(request, exc.reason, redact(detail))
                ok = True
                text, finish_reason, prompt_tokens, completion_tokens = result
                return GenerationResult(
                    request.request_id,
                    text,
                    finish_reason=finish_reason,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
        finally:
            await limit.release(ok)

    async def _attempt(
        self, client: _Client, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[str, str | None, int | None, int | None]:
        """One ``create`` call, the SDK's retries inside it: (text, finish reason, prompt
        tokens, completion tokens), or raise. The counts are the reply's ``usage``, None where
        the server sends none."""
        try:
            response = await client.chat.completions.create(**body, extra_headers=headers)
        except openai.RateLimitError:
            raise _Failed("rate_limited", "HTTP 429") from None
        except openai.APIStatusError as exc:
            code = exc.status_code
            if code >= 500 or code in (408, 409):
                raise _Failed("server_error", f"HTTP {code}") from None
            detail = f"HTTP {code}: {redact(str(exc.message))[:DETAIL_CHARS]}"
            raise _Failed("http_error", detail, retryable=False) from None
        except openai.APITimeoutError:
            raise _Failed("timeout", f"no reply in {self.config.openai.timeout_s} s") from None
        except openai.APIConnectionError as exc:
            raise _Failed("connection_error", type(exc).__name__) from None
        except openai.APIResponseValidationError as exc:
            detail = redact(str(exc))[:DETAIL_CHARS]
            raise _Failed("malformed_response", detail, ours=True) from None
        except ValueError as exc:  # a body that is not JSON
            detail = redact(f"{type(exc).__name__}: {exc}")[:DETAIL_CHARS]
            raise _Failed("malformed_response", detail, ours=True) from None
        choices = getattr(response, "choices", None)
        if not choices or choices[0].message is None or choices[0].message.content is None:
            raise _Failed("empty_choice", "the reply had no choice with content", ours=True)
        usage = getattr(response, "usage", None)
        return (
            choices[0].message.content,
            choices[0].finish_reason,
            _count(getattr(usage, "prompt_tokens", None)),
            _count(getattr(usage, "completion_tokens", None)),
        )


def _count(value: Any) -> int | None:
    """A token count from a reply's ``usage``; None for a missing or nonsensical one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
