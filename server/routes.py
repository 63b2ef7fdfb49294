"""Thin endpoint functions: read and validate the body, hand it to Serving, return the response."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.responses import PlainTextResponse, Response

from . import limits, openapi
from .errors import APIError, truncate
from .limits import RequestLimits
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_json,
    validate,
)
from .serving import Serving, json_response

Model = TypeVar("Model", bound=BaseModel)
router = APIRouter()
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
)

try:
    VERSION = importlib.metadata.version("kestrel")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0+unknown"


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body read by hand (see `read_body`); app.py registers the schemas."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }


async def read_request(
    request: Request, model: type[Model], check: Callable[[dict[str, Any], RequestLimits], None]
) -> Model:
    """The body as `model`: read here, then parsed, bounded (`check`, see limits.py) and validated
    off the event loop."""
    serving = _serving(request)
    raw = await read_body(request)
    return await serving.off_loop(_parse_request, raw, model, check, serving.limits)


def _parse_request(
    raw: bytes,
    model: type[Model],
    check: Callable[[dict[str, Any], RequestLimits], None],
    limits: RequestLimits,
) -> Model:
    def bounded(data: Any) -> None:
        if isinstance(data, dict):
            check(data, limits)

    return validate(model, parse_json(raw, bounded))


def _no_check(data: dict[str, Any], limits: RequestLimits) -> None:
    pass


async def read_body(request: Request) -> bytes:
    """The raw JSON body; 415 unless the Content-Type is JSON, 413 past max_request_bytes
    (declared or streamed).

    NOTE: read and parsed here rather than by FastAPI so that NaN/Infinity, invalid UTF-8, lone
    surrogates and a wrong or missing Content-Type are handled the same way on every endpoint.
    """
    _check_content_type(request.headers.get("content-type"))
    limit: int = request.app.state.config.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_content_type(header: str | None) -> None:
    """415 unless the body is declared `application/json` (UTF-8, the only charset JSON has).

    A form-encoded or text/plain body is refused rather than read as JSON: `curl -d` without
    `-H 'Content-Type: application/json'` sends a form.
    """
    media_type, _, params = (header or "").partition(";")
    charset = ""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if media_type.strip().lower() != "application/json" or charset not in ("", "utf-8", "utf8"):
        given = repr(truncate(header, 80)) if header else "none"
        raise APIError(
            415,
            f"Content-Type must be application/json, got {given}",
            code="unsupported_media_type",
        )


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"request body exceeds the limit of {limit} bytes", code="request_too_large"
    )


@router.post(
    "/v1/chat/completions",
    openapi_extra=_json_body(ChatCompletionRequest),
    response_model=openapi.ChatCompletion,
    responses={**openapi.GENERATE_ERRORS, **openapi.streaming("A chat completion, or its chunks")},
    summary="Create a chat completion (streaming with `stream: true`)",
)
async def chat_completions(request: Request) -> Response:
    body = await read_request(request, ChatCompletionRequest, limits.check_chat)
    return await _serving(request).chat(body, request)


@router.post(
    "/v1/completions",
    openapi_extra=_json_body(CompletionRequest),
    response_model=openapi.Completion,
    responses={**openapi.GENERATE_ERRORS, **openapi.streaming("A completion, or its chunks")},
    summary="Create a text completion (streaming with `stream: true`)",
)
async def completions(request: Request) -> Response:
    body = await read_request(request, CompletionRequest, limits.check_completion)
    return await _serving(request).completion(body, request)


@router.get(
    "/v1/models",
    response_model=openapi.ModelList,
    responses=openapi.ERRORS,
    summary="List the served model names",
)
async def list_models(request: Request) -> Response:
    return json_response(_serving(request).list_models())


@router.get(
    "/v1/models/{model:path}",
    response_model=openapi.ModelCard,
    responses=openapi.MODEL_ERRORS,
    summary="Describe one served model",
)
async def retrieve_model(request: Request, model: str) -> Response:
    serving = _serving(request)
    return json_response(serving.model_card(serving.resolve_model(model)))


@router.post(
    "/tokenize",
    openapi_extra=_json_body(TokenizeRequest),
    response_model=openapi.TokenizeResponse,
    responses=openapi.BODY_ERRORS,
    summary="Text or messages -> token ids",
)
async def tokenize(request: Request) -> Response:
    body = await read_request(request, TokenizeRequest, limits.check_chat)
    serving = _serving(request)
    return await serving.off_loop(json_response, await serving.tokenize(body))


@router.post(
    "/detokenize",
    openapi_extra=_json_body(DetokenizeRequest),
    response_model=openapi.DetokenizeResponse,
    responses=openapi.BODY_ERRORS,
    summary="Token ids -> text",
)
async def detokenize(request: Request) -> Response:
    body = await read_request(request, DetokenizeRequest, limits.check_detokenize)
    serving = _serving(request)
    return await serving.off_loop(json_response, await serving.detokenize(body))


@router.api_route(
    "/health",
    methods=["GET", "HEAD"],
    response_model=openapi.HealthResponse,
    responses={503: {"model": openapi.HealthResponse, "description": "The engine has stopped"}},
    summary="200 while the engine loop runs, else 503",
)
async def health(request: Request) -> Response:
    if request.app.state.engine.is_alive:
        return json_response({"status": "ok"})
    return json_response({"status": "unavailable"}, status=503)


@router.get(
    "/version",
    response_model=openapi.VersionResponse,
    responses=openapi.ERRORS,
    summary="Kestrel's version",
)
async def version() -> Response:
    return json_response({"version": VERSION})


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses=openapi.ERRORS,
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
