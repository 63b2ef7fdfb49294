"""Structured outputs: `response_format` and vLLM's `structured_outputs` -> a grammar compiled off
the event loop, with a time limit, cached by spec; every failure is a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine import CompiledGrammar, GrammarCompiler, GrammarError, GrammarSpec

from .errors import APIError, bad_request, unsupported
from .protocol import ChatCompletionRequest, CompletionRequest, StructuredOutputs

logger = logging.getLogger("kestrel.structured_outputs")

# Compiles run on their own threads, so a slow one never holds up tokenization (to_thread).
MAX_COMPILE_THREADS = 2


@dataclass(frozen=True, slots=True)
class GrammarRequest:
    spec: GrammarSpec
    param: str  # the request field errors name
    describe: str | None = None  # what errors call it (default: by kind)
    code: str | None = None  # the error code of an invalid one (default: by kind)


def grammar_request(request: ChatCompletionRequest | CompletionRequest) -> GrammarRequest | None:
    """The grammar a request asks for, or None; 400 for a malformed or ambiguous ask."""
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        if request.structured_outputs is not None:
            raise bad_request(
                "give either response_format or structured_outputs, not both",
                param="structured_outputs",
            )
        if response_format.type == "json_object":
            return GrammarRequest(GrammarSpec("json_object"), "response_format")
        if response_format.json_schema is None:
            raise bad_request(
                "response_format of type json_schema needs a json_schema object",
                param="response_format",
                code="missing_required_parameter",
            )
        # `strict` or not, the schema is enforced (and keywords it cannot enforce are refused).
        schema = response_format.json_schema.schema_
        return GrammarRequest(_schema_spec({} if schema is None else schema), "response_format")
    if request.structured_outputs is not None:
        return GrammarRequest(_structured_outputs_spec(request.structured_outputs), "structured_outputs")
    return None


def grammar_param(
    request: ChatCompletionRequest | CompletionRequest, ask: GrammarRequest | None = None
) -> str | None:
    """The request field that asked for the grammar (`ask`, a forced tool call's, else the
    request's own), which errors name; None without one."""
    ask = ask or grammar_request(request)
    return ask.param if ask is not None else None


def _structured_outputs_spec(so: StructuredOutputs) -> GrammarSpec:
    if so.structural_tag is not None:
        raise unsupported("structured_outputs", "structured_outputs.structural_tag is not supported")
    given = [name for name, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                      ("grammar", so.grammar), ("json_object", so.json_object or None))
             if value is not None]  # fmt: skip
    if len(given) != 1:
        raise bad_request(
            "structured_outputs needs exactly one of json, regex, choice, grammar and json_object"
            + (f"; got {', '.join(given)}" if given else ""),
            param="structured_outputs",
        )
    whitespace = "" if so.disable_any_whitespace else so.whitespace_pattern
    if so.json_ is not None:
        schema = so.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                raise bad_request(
                    "structured_outputs.json is not valid JSON", param="structured_outputs",
                    code="invalid_json_schema",
                ) from None
        if so.disable_additional_properties:
            schema = _closed(schema)
        return _schema_spec(schema, whitespace)
    if so.json_object:
        return GrammarSpec("json_object", whitespace=whitespace)
    if so.regex is not None:
        return GrammarSpec("regex", so.regex)
    if so.choice is not None:
        return GrammarSpec("choice", json.dumps(so.choice))
    return GrammarSpec("grammar", so.grammar or "")


def _schema_spec(schema: Any, whitespace: str | None = None) -> GrammarSpec:
    if not isinstance(schema, dict | bool):
        raise bad_request("a JSON schema must be an object", code="invalid_json_schema")
    # Key order is kept: properties are generated in the schema's order.
    return GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")), whitespace)


def _closed(schema: Any) -> Any:
    """vLLM's disable_additional_properties: objects with properties allow no others."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


class GrammarService:
    """Compiles the grammars of requests on a small thread pool of its own, `timeout` seconds at
    most each (the grammar engine's fuel limits bound the work a timed-out compile goes on
    doing). Compiled grammars are cached by spec; a cached one is handed out without a thread."""

    def __init__(self, compiler: GrammarCompiler, timeout: float) -> None:
        self.compiler = compiler
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(MAX_COMPILE_THREADS, thread_name_prefix="kestrel-grammar")
        self._prepared: Future | None = None

    def start(self) -> None:
        """Prepare the tokenizer tables in the background (seconds on a large vocabulary)."""
        self._prepared = self._pool.submit(self.compiler.prepare)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def compile(
        self, request: ChatCompletionRequest | CompletionRequest, ask: GrammarRequest | None = None
    ) -> CompiledGrammar | None:
        """The grammar of `ask` (a forced tool call's), else the one the request asks for."""
        ask = ask or grammar_request(request)
        if ask is None:
            return None
        cached = self.compiler.cached(ask.spec)
        if cached is not None:
            return cached
        if self._prepared is not None:  # the one-time preparation does not count against the limit
            await asyncio.wrap_future(self._prepared)
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._pool, self.compiler.compile, ask.spec)
        try:
            return await asyncio.wait_for(work, self.timeout)
        except TimeoutError:
            logger.warning("grammar compile exceeded %.1f s: %s", self.timeout, ask.spec.text[:200])
            raise APIError(
                400,
                f"the {ask.describe or _describe(ask.spec)} took longer than {self.timeout:g} s to compile; simplify it",
                param=ask.param,
                code="grammar_too_complex",
            ) from None
        except GrammarError as exc:
            code = ask.code or ("invalid_json_schema" if ask.spec.kind == "json_schema" else "invalid_grammar")
            raise APIError(400, f"invalid {ask.describe or _describe(ask.spec)}: {exc}", param=ask.param,
                           code=code) from None


def _describe(spec: GrammarSpec) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON grammar", "regex": "regex",
            "choice": "choice list", "grammar": "grammar"}[spec.kind]  # fmt: skip
