"""The OpenAI error envelope and the mapping from every failure to one status, type, param and code."""

from __future__ import annotations

from typing import Any

from engine import (
    ChatTemplateError,
    ContextLengthExceeded,
    EngineDead,
    EngineOverloaded,
    RequestError,
    SamplingParamsError,
)

MAX_MESSAGE_CHARS = 500

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Error messages never echo a huge input back."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} chars)"


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = truncate(message)
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def from_exception(exc: BaseException, *, retry_after: int = 1) -> APIError:
    """The API error for an exception raised while serving a request (unknown ones are 500s)."""
    match exc:
        case APIError():
            return exc
        case SamplingParamsError():
            return APIError(400, str(exc), param=exc.param, code="invalid_value")
        case ContextLengthExceeded():
            return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
        case RequestError():
            return APIError(400, str(exc), param=exc.param, code=exc.code)
        case ChatTemplateError():
            return APIError(
                400, f"chat template error: {exc}", param=exc.param, code="invalid_messages"
            )
        case EngineOverloaded():
            return APIError(
                429,
                str(exc) or "too many requests are waiting; retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
        case EngineDead():
            return APIError(
                503, str(exc) or "the engine has stopped", type=SERVER_ERROR, code="engine_dead"
            )
    return APIError(
        500, f"internal error: {type(exc).__name__}", type=SERVER_ERROR, code="internal_error"
    )
