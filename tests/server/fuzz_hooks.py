"""Schemathesis hooks for tests/server/test_fuzz_openapi.py (loaded by `st run` through
SCHEMATHESIS_HOOKS): the OpenAI error envelope as a check."""

from __future__ import annotations

import json

import schemathesis


@schemathesis.check
def openai_error_envelope(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """Every error body is exactly `{"error": {"message", "type", "param", "code"}}`."""
    if response.status_code < 400 or case.method.upper() == "HEAD":  # HEAD: no body
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {response.content[:200]!r}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, f"not the OpenAI envelope: {body}"
    error = body["error"]
    assert isinstance(error, dict), f"error is not an object: {error!r}"
    assert set(error) == {"message", "type", "param", "code"}, f"error keys: {sorted(error)}"
    assert isinstance(error["message"], str) and error["message"], f"no message: {error}"
    assert isinstance(error["type"], str) and error["type"], f"no type: {error}"
    for key in ("param", "code"):
        assert error[key] is None or isinstance(error[key], str), f"{key}: {error[key]!r}"
