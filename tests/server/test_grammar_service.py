"""server.structured_outputs without a model: request fields -> GrammarSpec, and GrammarService's
time limit, cache and error mapping over a stand-in compiler."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from engine import GrammarError, GrammarSpec
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.structured_outputs import GrammarService, grammar_request

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


@pytest.mark.parametrize(
    ("fields", "spec", "param"),
    [
        ({}, None, None),
        ({"response_format": {"type": "text"}}, None, None),
        ({"response_format": {"type": "json_object"}}, GrammarSpec("json_object"), "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                     "schema": {"type": "object", "b": 1, "a": 2}}}},
         GrammarSpec("json_schema", '{"type":"object","b":1,"a":2}'), "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         GrammarSpec("json_schema", "{}"), "response_format"),
        ({"structured_outputs": {"choice": ["a", "b"]}}, GrammarSpec("choice", '["a", "b"]'), "structured_outputs"),
        ({"structured_outputs": {"regex": "[0-9]+"}}, GrammarSpec("regex", "[0-9]+"), "structured_outputs"),
        ({"structured_outputs": {"json": '{"type": "string"}', "whitespace_pattern": " ?"}},
         GrammarSpec("json_schema", '{"type":"string"}', " ?"), "structured_outputs"),
        ({"structured_outputs": {"json_object": True, "disable_any_whitespace": True}},
         GrammarSpec("json_object", whitespace=""), "structured_outputs"),
        ({"structured_outputs": {"json": {"properties": {"a": {"properties": {}}}},
                                 "disable_additional_properties": True}},
         GrammarSpec("json_schema", json.dumps({"properties": {"a": {"properties": {}, "additionalProperties": False}},
                                                "additionalProperties": False}, separators=(",", ":"))),
         "structured_outputs"),
        ({"structured_outputs": {"grammar": 'start: "x"'}}, GrammarSpec("grammar", 'start: "x"'), "structured_outputs"),
    ],
)  # fmt: skip
def test_grammar_request_from_fields(fields, spec, param) -> None:
    ask = grammar_request(chat(**fields))
    assert (ask.spec, ask.param) == (spec, param) if spec else ask is None


def test_completions_take_both_fields_too() -> None:
    request = CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}})
    assert grammar_request(request).spec == GrammarSpec("json_object")


class SlowCompiler:
    """Stands in for engine.GrammarCompiler: `slow` specs take `delay` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.cache: dict[GrammarSpec, object] = {}
        self.release = threading.Event()

    def prepare(self) -> None:
        pass

    def cached(self, spec: GrammarSpec) -> object | None:
        return self.cache.get(spec)

    def compile(self, spec: GrammarSpec) -> object:
        if spec.text == "slow":
            self.release.wait(self.delay)
        if spec.text == "bad":
            raise GrammarError("no such type")
        self.cache[spec] = f"compiled {spec.text}"
        return self.cache[spec]


def regex(pattern: str) -> ChatCompletionRequest:
    return chat(structured_outputs={"regex": pattern})


def test_a_slow_compile_times_out_with_a_400_and_stalls_no_other_request() -> None:
    compiler = SlowCompiler(delay=5.0)
    service = GrammarService(compiler, timeout=0.3)

    async def main() -> None:
        service.start()
        assert await service.compile(regex("fast")) == "compiled fast"  # now cached
        slow = asyncio.create_task(service.compile(regex("slow")))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        assert await service.compile(regex("fast")) == "compiled fast"  # a cache hit: no thread
        assert await service.compile(regex("other")) == "compiled other"  # the second thread
        assert time.monotonic() - start < 0.25
        with pytest.raises(APIError) as caught:
            await slow
        error = caught.value
        assert (error.status, error.param, error.code) == (400, "structured_outputs", "grammar_too_complex")

    try:
        asyncio.run(main())
    finally:
        compiler.release.set()
        service.shutdown()


def test_a_compile_error_is_a_400_naming_the_field() -> None:
    service = GrammarService(SlowCompiler(delay=0), timeout=5)

    async def main() -> None:
        with pytest.raises(APIError) as caught:
            await service.compile(regex("bad"))
        assert (caught.value.param, caught.value.code) == ("structured_outputs", "invalid_grammar")
        request = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bad"}}})
        service.compiler.compile = lambda spec: (_ for _ in ()).throw(GrammarError("Invalid type: bad"))
        with pytest.raises(APIError) as caught:
            await service.compile(request)
        assert (caught.value.param, caught.value.code) == ("response_format", "invalid_json_schema")
        assert "Invalid type: bad" in caught.value.message

    try:
        asyncio.run(main())
    finally:
        service.shutdown()
