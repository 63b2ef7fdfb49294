"""Tool calls through the real server on Qwen2.5-Coder-0.5B-Instruct, with the `openai` SDK and
LangChain: a forced named call, `required`, `auto` (the model answers with a fenced JSON call),
streamed calls that reassemble to the non-streamed ones, a multi-turn exchange with a tool
result, and 400s. Greedy, max_tokens small: each answer is a few seconds on 2 cores."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from engine import Tokenizer
from server.protocol import ChatMessage, messages_for_template

from .conftest import ServerProcess

pytestmark = pytest.mark.slow  # a real model and server

MODEL = "qwen2.5-coder-0.5b-instruct"
MAX_TOKENS = 60  # a call is 20-40 tokens
WEATHER = {
    "type": "object",
    "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["location"],
}
TIME = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city", "parameters": TIME}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def sdk(qwen: ServerProcess) -> OpenAI:
    return qwen.sdk()


def create(sdk: OpenAI, **kwargs: Any) -> Any:
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": MAX_TOKENS, **kwargs}
    return sdk.chat.completions.create(**kwargs)


def assert_valid_calls(message: Any) -> list[tuple[str, dict]]:
    calls = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


def streamed(sdk: OpenAI, **kwargs: Any) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish_reason) reassembled from the chunks, each chunk
    checked for OpenAI's shape: a call's first delta has its index, id, type and name."""
    content, calls, finish = "", [], None
    for chunk in create(sdk, stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            assert "<tool_call>" not in (delta.content or "") and "```" not in (delta.content or "")
            for call in delta.tool_calls or []:
                if call.index == len(calls):
                    assert call.id.startswith("call_") and call.type == "function" and call.function.name
                    calls.append([call.function.name, call.function.arguments or ""])
                else:
                    assert call.id is None and call.function.name is None
                    calls[call.index][1] += call.function.arguments
            finish = choice.finish_reason or finish
    return content or None, [tuple(c) for c in calls], finish


def test_a_named_function_is_called_with_valid_arguments(sdk: OpenAI) -> None:
    response = create(sdk, tool_choice=NAMED)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [(name, arguments)] = assert_valid_calls(choice.message)
    assert name == "get_time" and arguments["city"] == "Paris"


def test_required_calls_one_of_the_tools(sdk: OpenAI) -> None:
    response = create(sdk, tool_choice="required", parallel_tool_calls=False)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    [(name, arguments)] = assert_valid_calls(choice.message)
    assert name == "get_weather" and arguments["location"] == "Paris"


@pytest.mark.parametrize("tool_choice", ["auto", NAMED], ids=["auto", "named"])
def test_a_streamed_call_reassembles_to_the_non_streamed_one(sdk: OpenAI, tool_choice: Any) -> None:
    whole = create(sdk, tool_choice=tool_choice).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert calls, whole.message  # auto: Qwen2.5-Coder-0.5B writes a fenced ```json call
    assert_valid_calls(whole.message)
    assert streamed(sdk, tool_choice=tool_choice) == (whole.message.content, calls, whole.finish_reason)
    assert whole.finish_reason == "tool_calls"


def test_a_tool_result_is_rendered_and_answered(sdk: OpenAI, qwen: ServerProcess) -> None:
    first = create(sdk, tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0].message
    [call] = first.tool_calls
    messages = [
        *ASK,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
        # Without this turn the 0.5B model repeats its call rather than reading the result.
        {"role": "user", "content": "So, what is the weather in Paris? Answer in words."},
    ]
    answer = create(sdk, messages=messages, max_tokens=40)
    choice = answer.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert "21" in choice.message.content and "sunny" in choice.message.content.lower(), choice.message.content
    # The call went back into the prompt as Qwen's template writes it: arguments as an object.
    tokenizer = Tokenizer.from_pretrained(qwen_model_dir())
    rendered = tokenizer.apply_chat_template(
        messages_for_template([ChatMessage.model_validate(m) for m in messages]), tools=TOOLS
    )
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(json.loads(call.function.arguments))}}}\n</tool_call>' in rendered
    assert "<tool_response>\n" + messages[-2]["content"] + "\n</tool_response>" in rendered
    assert answer.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def qwen_model_dir():
    from engine.assets import resolve_model

    return resolve_model(MODEL)


def test_bad_tools_are_400s(sdk: OpenAI) -> None:
    import openai

    for kwargs, param in [
        ({"tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "format": "weird"}}}}}],
          "tool_choice": "required"}, "tools"),
    ]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as info:
            create(sdk, **kwargs)
        assert info.value.body["param"] == param, info.value.body


# -- LangChain -------------------------------------------------------------------------------


class Weather(BaseModel):
    """Get the current weather in a city."""

    location: str = Field(description="the city")


class Capital(BaseModel):
    """The capital city of a country."""

    country: str
    capital: str


def chat_model(qwen: ServerProcess) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    return langchain_openai.ChatOpenAI(
        base_url=f"{qwen.base_url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=MAX_TOKENS,
        max_retries=0,
    )  # fmt: skip


def test_langchain_bind_tools(qwen: ServerProcess) -> None:
    llm = chat_model(qwen)
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "Weather" and call["args"]["location"] == "Paris" and call["id"].startswith("call_")
    auto = llm.bind_tools([Weather]).invoke("What is the weather in Paris?")
    assert [c["name"] for c in auto.tool_calls] == ["Weather"], auto


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(qwen: ServerProcess, method: str) -> None:
    answer = chat_model(qwen).with_structured_output(Capital, method=method).invoke("What is the capital of France?")
    assert isinstance(answer, Capital) and answer.capital == "Paris", answer
