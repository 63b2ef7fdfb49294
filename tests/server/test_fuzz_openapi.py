"""/openapi.json says what the server answers."""

from __future__ import annotations

import httpx

from engine.sampling_params import MAX_N


def test_the_document_says_what_the_server_answers(http: httpx.Client) -> None:
    """What the fuzzer found the document missing: every error status an operation answers with,
    in the OpenAI envelope (and no FastAPI 422, never sent: validation errors are 400s); the
    streamed and Prometheus media types; the bodies; the value ranges the server checks."""
    spec = http.get("/openapi.json").json()
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status, response in responses.items():
                if int(status) >= 400 and path != "/health":  # /health's 503 is its own body
                    assert response["content"] == envelope, (method, path, status)
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert schemas["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "415", "429", "500", "503"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    fields = schemas["ChatCompletionRequest"]["properties"]
    assert (fields["n"]["maximum"], fields["temperature"]["maximum"]) == (MAX_N, 2)
    assert fields["functions"]["type"] == "null"  # refused with a 400 unless null
    assert schemas["TextContentPart"]["properties"]["type"]["enum"] == ["text", "input_text"]
