"""Errors the engine raises to its callers; each maps to one OpenAI error."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine can never serve as asked (a client mistake)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthExceeded(RequestError):
    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting; retry later."""


class EngineDead(RuntimeError):
    """The engine loop has stopped."""
