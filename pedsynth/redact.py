"""Secrets out of every text a build writes: reject details, log lines, artifacts.

Servers and proxies copy what they were sent into their error bodies (a 401 that echoes the
``Authorization`` header), and those bodies become reject details and log lines. :func:`redact`
removes, from any text:

- the values of the API key variables the build uses (:func:`register_secret`, called when an
  engine is built and by the preflight for every configured ``openai.api_key_env``);
- ``Authorization`` / ``Proxy-Authorization`` / ``api-key`` style headers and ``api_key=`` style
  fields, whatever quoting or JSON they sit in;
- ``Bearer <token>`` and ``sk-...`` keys wherever they appear;
- credentials in URLs (``user:password@``, ``?api_key=...``, ``&token=...``).

:func:`install_log_redaction` makes every log record of the process pass through it. It wraps
the log record factory rather than filtering one logger: a filter on the root logger never
sees records that propagate from child loggers (``prefect.*``, ``openai``, ``httpx``), and
Prefect's own handlers sit on loggers of their own; a record factory sees every record once,
before any handler (terminal, log file, Prefect's API) formats it.
"""

from __future__ import annotations

import logging
import os
import re
import threading

MASK = "[redacted]"
MIN_SECRET_LEN = 8  # shorter values are not real keys, and masking them would maim the text

_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False

_TOKEN = r"[A-Za-z0-9\-._~+/]{8,}=*"  # shorter words after "bearer" are prose
_VALUE = r"(?:(?:bearer|basic|token|apikey)\s+)?[^\s\"',;}&<>\\]+"
_NAMED = re.compile(
    r"(?i)([\w-]*(?:authorization|api[-_]?key|access[-_]?token|client[-_]?secret|password|secret)"
    r"\\?[\"']?\s*[:=]\s*\\?[\"']?)" + f"({_VALUE})"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)" + _TOKEN)
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")
_URL_PASSWORD = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@")
_QUERY = re.compile(
    r"(?i)([?&](?:api[-_]?key|key|access[-_]?token|token|auth|secret|password|sig|signature)=)"
    r"[^&\s\"'#]+"
)


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it appears from now on (values under 8 characters are ignored)."""
    if value and len(value) >= MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)


def register_env(name: str | None) -> None:
    """Register the value of the environment variable ``name``, when it is set."""
    if name:
        register_secret(os.environ.get(name))


def forget_secrets() -> None:
    """Drop every registered value (tests)."""
    with _lock:
        _secrets.clear()


def redact(text: str) -> str:
    """``text`` without registered secrets, credential headers and fields, bearer tokens and
    ``sk-`` keys. Safe on any string; cut text down only after redacting it, never before."""
    if not text:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _NAMED.sub(lambda m: m.group(1) + MASK if m.group(2) != MASK else m.group(0), text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    text = _SK_KEY.sub(MASK, text)
    text = _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", text)
    return _QUERY.sub(lambda m: m.group(1) + MASK, text)


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact a log record in place: its message (with its args) and its traceback text."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a record whose args do not fit its format
        message = f"{record.msg} {record.args!r}"
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[0] is not None:
        trace = record.exc_text or logging.Formatter().formatException(record.exc_info)
        record.exc_text = redact(trace)
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class RedactingFilter(logging.Filter):
    """A filter for handlers that did not come through :func:`install_log_redaction`."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def install_log_redaction() -> None:
    """Make every log record of this process redacted when it is made (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            return redact_record(previous(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        logging.getLogger().addFilter(RedactingFilter())
        _installed = True
