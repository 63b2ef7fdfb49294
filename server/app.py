"""create_app(engine, config): the FastAPI app, its middleware, error handlers and lifespan."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import (
    AsyncEngine,
    ChatTemplateError,
    EngineDead,
    EngineOverloaded,
    RequestError,
    SamplingParamsError,
)

from . import openapi
from .errors import APIError, from_exception
from .logs import format_fields
from .metrics import Metrics
from .protocol import format_param
from .routes import REQUEST_MODELS, VERSION, router
from .serving import ClientDisconnected, Serving
from .settings import ServerConfig
from .shutdown import ABORTED, Drain, shutdown_error

logger = logging.getLogger("kestrel.server")
access_logger = logging.getLogger("kestrel.access")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # a client X-Request-Id we echo and log
_UNAUTHENTICATED_PATHS = frozenset({"/health"})


def error_response(error: APIError) -> Response:
    return Response(
        json.dumps(error.body()).encode(),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers,
    )


class RequestContextMiddleware:
    """Per request: id (a safe X-Request-Id honoured, else generated; echoed back), API key check,
    one `key=value` access line (escaped, see logs.format_fields) and the request counter. Turns
    any escaped exception into a JSON 500.

    The logged status is the outcome: a stream that ended with an in-band error is logged with
    that error's status, not the 200 its headers carried."""

    def __init__(self, app: ASGIApp, config: ServerConfig, metrics: Metrics, drain: Drain) -> None:
        self.app = app
        self.config = config
        self.metrics = metrics
        self.drain = drain
        self._api_key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["start_time"] = start
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", ()),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            await send(message)

        try:
            if not self._is_authorized(scope, headers):
                error = APIError(
                    401,
                    "Incorrect API key provided; pass it as 'Authorization: Bearer <key>'",
                    param=None,
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error_response(error)(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if not self.drain.is_draining:
                raise
            # uvicorn's backstop cancelled a response the drain could not end: log it, no traceback.
            state["aborted"] = ABORTED
            if status == 0:
                await error_response(shutdown_error())(scope, receive, send_with_id)
            else:
                status = 503
        except Exception as exc:
            logger.exception("request %s failed", request_id)
            if status == 0:
                await error_response(from_exception(exc))(scope, receive, send_with_id)
            else:
                status = 500
        finally:
            in_band = state.get("in_band_error")
            if in_band is not None:
                status = in_band.status
            self._record(scope, state, request_id, status, start)

    def _is_authorized(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        if self._api_key is None or scope["path"] in _UNAUTHENTICATED_PATHS:
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._api_key)

    def _record(
        self, scope: Scope, state: dict[str, Any], request_id: str, status: int, start: float
    ) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if self.config.access_log:
            # NOTE: the percent-decoded path, as routed; format_fields escapes what it decodes to.
            fields: dict[str, object] = {
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"][:200],
                "status": status,
            }
            if "aborted" in state:
                fields["aborted"] = state["aborted"]
            if "prompt_tokens" in state:
                fields["prompt_tokens"] = state["prompt_tokens"]
                fields["completion_tokens"] = state.get("completion_tokens", 0)
            fields["latency_ms"] = f"{(time.perf_counter() - start) * 1000:.1f}"
            access_logger.info(format_fields(fields))


def _install_error_handlers(app: FastAPI, config: ServerConfig) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        return error_response(from_exception(exc, retry_after=config.retry_after))

    for exc_type in (
        APIError,
        SamplingParamsError,
        RequestError,
        ChatTemplateError,
        EngineOverloaded,
        EngineDead,
    ):
        app.add_exception_handler(exc_type, api_error)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        if status == 404:
            error = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif status == 405:
            error = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                             code="method_not_allowed")  # fmt: skip
        else:
            error = APIError(
                status,
                str(exc.detail),
                type="invalid_request_error" if status < 500 else "server_error",
            )
        error.headers.update(exc.headers or {})
        return error_response(error)

    app.add_exception_handler(StarletteHTTPException, http_error)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [p for p in first["loc"] if p not in ("body", "query", "path", "header")]
        param = format_param(loc)
        return error_response(
            APIError(400, f"invalid {param!r}: {first['msg']}", param=param, code="invalid_value")
        )

    app.add_exception_handler(RequestValidationError, validation_error)

    async def disconnected(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.add_exception_handler(ClientDisconnected, disconnected)
    app.add_exception_handler(ClientDisconnect, disconnected)


def create_app(engine: AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    """The app for a loaded engine; its lifespan starts and stops the engine loop."""
    config = config or ServerConfig()
    metrics = Metrics(engine.stats)
    serving = Serving(engine, config, metrics)
    drain = Drain(serving.abort_all)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        serving.grammars.start()
        drain.bind(asyncio.get_running_loop())
        logger.info("serving %s as %s", engine.model_name, ", ".join(serving.model_names))
        try:
            yield
        finally:
            serving.grammars.shutdown()
            await engine.shutdown()

    middleware = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["X-Request-Id"],
            )
        )
    middleware.append(Middleware(RequestContextMiddleware, config=config, metrics=metrics, drain=drain))
    app = FastAPI(
        title="Kestrel",
        description="An OpenAI-compatible LLM inference server.",
        version=VERSION,
        lifespan=lifespan,
        middleware=middleware,
    )
    app.state.engine = engine
    app.state.config = config
    app.state.metrics = metrics
    app.state.serving = serving
    app.state.drain = drain
    app.include_router(router)
    _install_error_handlers(app, config)
    openapi.install(app, REQUEST_MODELS)
    # NOTE: sse-starlette would cancel open streams as soon as SIGTERM arrives; Kestrel lets them
    # finish within drain_timeout, then ends them itself (server/shutdown.py).
    AppStatus.disable_automatic_graceful_drain()
    return app
