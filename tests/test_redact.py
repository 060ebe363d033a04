"""Secrets out of error details and log lines: redact() on the texts servers really send."""

from __future__ import annotations

import json
import logging

import pytest

from pedsynth import redact as redaction
from pedsynth.redact import MASK, install_log_redaction, redact, register_env, register_secret

KEY = "sk-proj-Zq81LmX0aaBBccDDeeFF11223344"
OPAQUE = "c2VjcmV0LXRva2VuLWZyb20tdmF1bHQ"  # a key with no recognisable shape


@pytest.fixture(autouse=True)
def _fresh_registry():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()


def test_an_echoed_authorization_header_loses_its_token():
    text = "401 Unauthorized: invalid credentials in header 'Authorization: Bearer " + KEY + "'"
    assert (
        redact(text)
        == "401 Unauthorized: invalid credentials in header 'Authorization: [redacted]'"
    )


def test_a_json_error_body_keeps_its_shape_and_message():
    body = json.dumps(
        {
            "error": {
                "message": "proxy refused the request",
                "request_headers": {"authorization": f"Bearer {OPAQUE}", "x-api-key": OPAQUE},
                "code": 401,
            }
        }
    )
    cleaned = redact(body)
    assert OPAQUE not in cleaned
    parsed = json.loads(cleaned)  # still valid JSON
    assert parsed["error"]["message"] == "proxy refused the request"
    assert parsed["error"]["request_headers"] == {"authorization": MASK, "x-api-key": MASK}
    assert parsed["error"]["code"] == 401


def test_a_key_in_a_url_query_or_userinfo_is_masked_and_the_rest_kept():
    text = "GET https://gw.example.com/v1/chat?model=m&api_key=abc123SECRETxyz&stream=false 401"
    assert (
        redact(text)
        == "GET https://gw.example.com/v1/chat?model=m&api_key=[redacted]&stream=false 401"
    )
    assert redact("connect to https://bob:hunter2hunter2@proxy.internal:3128 failed") == (
        "connect to https://bob:[redacted]@proxy.internal:3128 failed"
    )


def test_sdk_style_error_text_with_a_bare_sk_key():
    text = (
        "Error code: 401 - {'error': {'message': 'Incorrect API key provided: "
        + KEY
        + ". You can find your API key at https://platform.openai.com.', "
        "'code': 'invalid_api_key'}}"
    )
    cleaned = redact(text)
    assert KEY not in cleaned and "Incorrect API key provided: [redacted]." in cleaned
    assert cleaned.startswith("Error code: 401")


def test_registered_values_are_masked_anywhere_even_without_a_recognisable_shape(monkeypatch):
    assert redact(f"token was {OPAQUE}.") == f"token was {OPAQUE}."  # not known yet
    monkeypatch.setenv("PEDSYNTH_VAULT_KEY", OPAQUE)
    register_env("PEDSYNTH_VAULT_KEY")
    assert redact(f"token was {OPAQUE}.") == "token was [redacted]."
    assert redact(f"{OPAQUE[:10]}...") == f"{OPAQUE[:10]}..."  # a fragment is not the key


def test_ordinary_text_is_left_alone():
    texts = [
        "server_error: HTTP 500 (after 4 attempts)",
        "a bearer of bad news",
        "rewrite.engine.openai.api_key_env: the environment variable OPENAI_API_KEY is not set",
        "a woman in a red coat carrying a desk-lamp",
        "",
    ]
    register_secret("short")  # too short to be a key: never masked
    for text in texts + ["short answer"]:
        assert redact(text) == text


def test_log_records_are_redacted_whatever_logger_and_handler(caplog, tmp_path):
    install_log_redaction()
    register_secret(OPAQUE)
    path = tmp_path / "run.log"
    handler = logging.FileHandler(path)  # added after the install, on a child logger
    child = logging.getLogger("pedsynth.tests.redact.child")
    child.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG):
            child.warning("server said %s", {"Authorization": f"Bearer {KEY}"})
            child.info("plain %s of %d", "args", 3)
            try:
                raise RuntimeError(f"request failed with key {OPAQUE}")
            except RuntimeError:
                child.exception("call failed")
    finally:
        child.removeHandler(handler)
        handler.close()
    written = path.read_text()
    shown = caplog.text + written + "".join(r.getMessage() for r in caplog.records)
    assert KEY not in shown and OPAQUE not in shown
    assert "server said {'Authorization': '[redacted]'}" in written
    assert "plain args of 3" in written  # untouched records keep their args
    assert "RuntimeError: request failed with key [redacted]" in written  # traceback too
    plain = next(r for r in caplog.records if r.getMessage() == "plain args of 3")
    assert plain.args == ("args", 3)
