"""An OpenAI-compatible ``/v1/chat/completions`` server on 127.0.0.1 with injectable faults.

Replies come from the tiny random Llama (``tiny-random:llama``, greedy, a few tokens), so the
client sees real model output over real HTTP. Image parts (base64 data URLs) are decoded and
checked, then the text model answers the text part. Faults are planned per arrival number
(1-based, over all requests the server receives) or per request id (``X-Request-Id``), and a
``capacity`` mode answers 429 while too many requests are in flight, as a rate-limited server
does. ``echo_authorization`` makes it a proxy that refuses every request with a 401 whose
error body repeats the request's ``Authorization`` header, as some do. Replies carry a ``usage``
block counted with the model's own tokenizer. Every request is
recorded (arrival, request id, attempt, in-flight count, outcome, reply, usage) so tests can check
that nothing was lost or duplicated and watch concurrency over time.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "hang", "malformed", "empty")


@dataclass
class Record:
    arrival: int
    request_id: str | None
    attempt: int | None
    started: float
    in_flight: int  # requests in the server when this one arrived, itself included
    outcome: str = "pending"  # ok | one of FAULTS | throttled | bad_image | unauthorized
    reply: str | None = None
    usage: dict[str, int] | None = None  # what the reply's ``usage`` said
    had_image: bool = False
    finished: float | None = None
    authorization: str | None = None


class TinyChatModel:
    """Greedy replies of the tiny random Llama, serialised under a lock."""

    def __init__(self, max_new_tokens: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pedsynth.engines.tiny_models import tiny_model_dir

        folder = tiny_model_dir("tiny-random:llama")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def reply(self, prompt: str, max_tokens: int) -> str:
        return self.reply_with_usage(prompt, max_tokens)[0]

    def reply_with_usage(self, prompt: str, max_tokens: int) -> tuple[str, int, int]:
        """The reply, the tokens of the chat-templated prompt and the tokens generated."""
        import torch

        with self.lock, torch.inference_mode():
            enc = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_dict=True,
                return_tensors="pt",
            )
            out = self.model.generate(
                **enc,
                max_new_tokens=min(max_tokens, self.max_new_tokens),
                min_new_tokens=1,
                do_sample=False,
            )
        prompt_tokens = enc["input_ids"].shape[1]
        new = out[0, prompt_tokens:]
        return self.tokenizer.decode(new, skip_special_tokens=True), prompt_tokens, len(new)


class FakeOpenAIServer:
    """Start with :meth:`start` (returns the base URL), stop with :meth:`stop`."""

    def __init__(
        self,
        model: TinyChatModel,
        *,
        faults_by_arrival: dict[int, str] | None = None,
        faults_by_request: dict[str, str] | None = None,
        capacity: int | None = None,
        capacity_until: int | None = None,
        latency_s: float = 0.0,
        retry_after_s: float = 0.1,
        hang_s: float = 2.0,
        api_key: str | None = None,
        echo_authorization: bool = False,
        send_usage: bool = True,
    ):
        self.model = model
        self.faults_by_arrival = dict(faults_by_arrival or {})
        self.faults_by_request = dict(faults_by_request or {})
        self.capacity, self.capacity_until = capacity, capacity_until
        self.latency_s, self.retry_after_s, self.hang_s = latency_s, retry_after_s, hang_s
        self.api_key = api_key
        self.echo_authorization = echo_authorization
        self.send_usage = send_usage  # off: replies without ``usage``, as some servers send
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._in_flight = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                server._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # hung handlers must not block stop()
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # ------------------------------------------------------------------ handling

    def _fault(self, record: Record) -> str | None:
        if record.request_id in self.faults_by_request:
            return self.faults_by_request[record.request_id]
        if record.arrival in self.faults_by_arrival:
            return self.faults_by_arrival[record.arrival]
        throttling = self.capacity_until is None or record.arrival <= self.capacity_until
        if self.capacity is not None and throttling and record.in_flight > self.capacity:
            return "throttled"
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self._in_flight += 1
            attempt = h.headers.get("X-Attempt")
            record = Record(
                arrival=len(self.records) + 1,
                request_id=h.headers.get("X-Request-Id"),
                attempt=int(attempt) if attempt is not None else None,
                started=time.monotonic(),
                in_flight=self._in_flight,
                authorization=h.headers.get("Authorization"),
            )
            self.records.append(record)
        try:
            body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
            self._respond(h, record, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a hang past its timeout)
        finally:
            with self._lock:
                self._in_flight -= 1
                record.finished = time.monotonic()

    def _respond(self, h: BaseHTTPRequestHandler, record: Record, raw: bytes) -> None:
        if h.path.rstrip("/") != "/v1/chat/completions":
            return self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
        if self.echo_authorization:
            record.outcome = "unauthorized"
            message = (
                f"invalid credentials in header 'Authorization: {record.authorization}'; "
                f"received headers: {dict(h.headers)}"
            )
            return self._send(h, 401, {"error": {"message": message, "type": "auth_error"}})
        if self.api_key is not None and record.authorization != f"Bearer {self.api_key}":
            record.outcome = "unauthorized"
            return self._send(h, 401, {"error": {"message": "bad api key"}})
        fault = self._fault(record)
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault in ("429", "throttled"):
            record.outcome = fault
            headers = {"Retry-After": f"{self.retry_after_s:g}"}
            return self._send(h, 429, {"error": {"message": "slow down"}}, headers)
        if fault == "500":
            record.outcome = fault
            return self._send(h, 500, {"error": {"message": "boom"}})
        if fault == "hang":
            record.outcome = fault
            time.sleep(self.hang_s)
            return self._send(h, 500, {"error": {"message": "too late"}})
        request = json.loads(raw)
        prompt, problem = self._prompt(request, record)
        if problem:
            record.outcome = "bad_image"
            return self._send(h, 400, {"error": {"message": problem}})
        if fault == "malformed":
            record.outcome = fault
            return self._send_raw(h, 200, b'{"id": "x", "choices": [', "application/json")
        if fault == "empty":
            record.outcome = fault
            return self._send(h, 200, self._completion(request, None, record))
        text, prompt_tokens, completion_tokens = self.model.reply_with_usage(
            prompt, int(request.get("max_tokens") or 16)
        )
        record.outcome, record.reply = "ok", text
        record.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return self._send(h, 200, self._completion(request, text, record))

    def _prompt(self, request: dict, record: Record) -> tuple[str, str | None]:
        """The text of the last user message; images are decoded to prove they arrived whole."""
        from PIL import Image

        content = request["messages"][-1]["content"]
        if isinstance(content, str):
            return content, None
        texts = []
        for part in content:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                header, _, data = url.partition(",")
                if not header.startswith("data:image/") or ";base64" not in header:
                    return "", f"not a base64 image data URL: {header[:40]}"
                try:
                    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
                        im.load()
                except Exception as exc:  # noqa: BLE001 - any decode failure is a 400
                    return "", f"undecodable image: {exc}"
                record.had_image = True
            elif part.get("type") == "text":
                texts.append(part["text"])
        return " ".join(texts), None

    def _completion(self, request: dict, text: str | None, record: Record) -> dict:
        choices = (
            []
            if text is None
            else [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ]
        )
        reply = {
            "id": f"chatcmpl-{record.arrival}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "tiny"),
            "choices": choices,
            "usage": record.usage
            or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        if not self.send_usage:
            del reply["usage"]
        return reply

    def _send(self, h: BaseHTTPRequestHandler, code: int, payload: dict, headers=None) -> None:
        self._send_raw(h, code, json.dumps(payload).encode(), "application/json", headers)

    @staticmethod
    def _send_raw(
        h: BaseHTTPRequestHandler,
        code: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(body)

    # ------------------------------------------------------------------ queries

    def by_request(self) -> dict[str, list[Record]]:
        out: dict[str, list[Record]] = {}
        for r in self.records:
            out.setdefault(r.request_id or "?", []).append(r)
        return out
