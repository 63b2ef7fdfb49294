"""What /openapi.json says: the hand-read request bodies, the response bodies, and every error
status an operation answers with, each in the OpenAI error envelope.

The response models here only document: endpoints build their JSON by hand (serving.py), and
tests/server/test_fuzz_openapi.py checks the real responses against this document.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

# -- the error envelope ---------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers every error."""

    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, a wrong type or value, a prompt too long",
    401: "Missing or wrong API key (when the server has one)",
    404: "Unknown model",
    413: "Request body larger than max_request_bytes",
    415: "Content-Type is not application/json",
    429: "Too many requests waiting; retry after Retry-After seconds",
    500: "Internal error",
    503: "The server is shutting down or its engine has stopped",
}


_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, each the OpenAI envelope (as JSON, whatever
    the route's own media type: `install` adds the schema)."""
    return {
        status: {"description": _ERROR_DESCRIPTIONS[status], "content": _ERROR_CONTENT}
        for status in statuses
    }


# Every operation: a wrong API key, an internal error, a request cut off by shutdown.
_ANY = (401, 500, 503)
BODY_ERRORS = errors(400, 404, 413, 415, *_ANY)  # endpoints that read a JSON body
GENERATE_ERRORS = errors(400, 404, 413, 415, 429, *_ANY)  # ... and queue engine requests
MODEL_ERRORS = errors(404, *_ANY)
ERRORS = errors(*_ANY)

# -- responses ------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: str | int | None = None


class _CompletionResponse(BaseModel):
    """What chat and text completions both answer with, besides `object` and `choices`."""

    id: str
    created: int
    model: str
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletion(_CompletionResponse):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class Completion(_CompletionResponse):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]


class VersionResponse(BaseModel):
    version: str


def streaming(description: str) -> dict[int | str, dict[str, Any]]:
    """The 200 of an endpoint that streams with `stream: true`: server-sent events, each
    `data: <chunk JSON>` (an error chunk if the call fails midway), the last `data: [DONE]`."""
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    return {200: {"description": description, "content": {"text/event-stream": {"schema": event}}}}


# -- the document ---------------------------------------------------------------------------------


def install(app: FastAPI, request_models: tuple[type[BaseModel], ...]) -> None:
    """/openapi.json with the hand-read request bodies' schemas (see routes.read_request), and
    without FastAPI's 422: a request that fails validation is a 400 in the OpenAI envelope."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (*request_models, ErrorResponse):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
