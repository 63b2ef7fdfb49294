"""Tool-call parsing without a model: each syntax (Hermes/Qwen, Llama 3 JSON, Mistral, fenced JSON)
whole and streamed character by character, held-back markup, invalid calls as content, forced
grammars that llguidance accepts, and the checks of tools / tool_choice."""

from __future__ import annotations

import jsonschema
import pytest
from llguidance import LLMatcher, grammar_from

from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.tool_calls import (
    PARSERS,
    FencedJsonParser,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ToolCalling,
    ToolParser,
    ToolPlan,
)

WEATHER = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
TIME = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
VALIDATORS = {"get_weather": jsonschema.Draft202012Validator(WEATHER),
              "get_time": jsonschema.Draft202012Validator(TIME)}  # fmt: skip
PARIS = '{"location": "Paris"}'


def plan(family: type[ToolParser] = HermesParser, parallel: bool = True, forced: bool = False) -> ToolPlan:
    parsers = [family()] if forced else [family(), FencedJsonParser(), Llama3JsonParser()]
    return ToolPlan(parsers, VALIDATORS, parallel, is_forced=forced)


def calls_of(message: dict) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]


def streamed(p: ToolPlan, text: str, finish: str = "stop", step: int = 1) -> tuple[dict, str | None, list[dict]]:
    """Feed `text` in pieces of `step` characters; the message the deltas reassemble to."""
    stream = p.stream()
    deltas: list[dict] = []
    pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
    for k, piece in enumerate(pieces):
        deltas += stream.feed(piece, k == len(pieces) - 1)
    content, calls = "", []
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] == len(calls):
                assert set(call) == {"index", "id", "type", "function"} and call["id"].startswith("call_")
                assert call["function"]["arguments"] == ""
                calls.append([call["function"]["name"], ""])
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                calls[call["index"]][1] += call["function"]["arguments"]
    message = {"content": content or None}
    if calls:
        message["tool_calls"] = [{"function": {"name": n, "arguments": a}} for n, a in calls]
    return message, stream.finish_reason(finish), deltas


def assert_stream_matches(p: ToolPlan, text: str, finish: str = "stop") -> dict:
    whole, whole_finish = p.message(text, finish)
    for step in (1, 3, len(text) or 1):
        message, stream_finish, _ = streamed(p, text, finish, step)
        assert calls_of(message) == calls_of(whole), (step, text)
        assert message["content"] == (whole["content"] or None), (step, text)
        assert stream_finish == whole_finish
    return whole


CASES = [
    # (family, text, content, calls)
    (HermesParser, f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>',
     None, [("get_weather", PARIS)]),
    (HermesParser, f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>\n'
     '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_time"}\n</tool_call>',
     "Let me check.", [("get_weather", PARIS), ("get_time", '{"city": "Oslo"}')]),
    (HermesParser, f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}', None, [("get_weather", PARIS)]),
    (Llama3JsonParser, f'{{"name": "get_weather", "parameters": {PARIS}}}', None, [("get_weather", PARIS)]),
    (Llama3JsonParser, f'<|python_tag|>{{"name": "get_weather", "parameters": {PARIS}}}; '
     '{"name": "get_time", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", PARIS), ("get_time", '{"city": "Oslo"}')]),
    (MistralParser, f'Sure. [TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}, '
     '{"name": "get_time", "arguments": {"city": "Oslo"}}]', "Sure.",
     [("get_weather", PARIS), ("get_time", '{"city": "Oslo"}')]),
    (MistralParser, f"[TOOL_CALLS]get_weather[ARGS]{PARIS}", None, [("get_weather", PARIS)]),
    # the fenced JSON small models write (Qwen2.5-Coder-0.5B), whatever the family
    (HermesParser, f'Here:\n```json\n{{"name": "get_weather", "arguments": {PARIS}}}\n```\nThis returns it.',
     "Here:", [("get_weather", PARIS)]),
    (MistralParser, f'```\n{{"name": "get_weather", "arguments": {PARIS}}}\n```', None, [("get_weather", PARIS)]),
    # arguments given as a JSON string
    (HermesParser, '<tool_call>{"name": "get_weather", "arguments": "{\\"location\\": \\"Paris\\"}"}</tool_call>',
     None, [("get_weather", PARIS)]),
]  # fmt: skip


@pytest.mark.parametrize(("family", "text", "content", "calls"), CASES)
def test_each_syntax_parses_whole_and_streamed_alike(family, text, content, calls) -> None:
    message = assert_stream_matches(plan(family), text)
    assert message["content"] == content
    assert calls_of(message) == calls
    assert plan(family).message(text, "stop")[1] == "tool_calls"


NOT_CALLS = [
    "Paris is sunny today.",
    "```python\nprint('hello')\n```",
    '```json\n{"name": "Ada", "age": 36}\n```',  # JSON, but no declared tool
    '<tool_call>\n{"name": "get_stock", "arguments": {}}\n</tool_call>',  # undeclared tool
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',  # schema violated
    '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Par',  # cut off
    '{"name": "get_weather", "arguments": {"location": 1}}',
    "a < b and c ` d ``",
    "   ",
    "",
]


@pytest.mark.parametrize("text", NOT_CALLS)
def test_what_is_not_a_valid_call_stays_content(text: str) -> None:
    message = assert_stream_matches(plan(), text)
    assert message == {"role": "assistant", "content": text}
    assert plan().message(text, "length")[1] == "length"


def test_markup_is_held_back_while_it_may_be_a_call() -> None:
    stream = plan().stream()
    assert stream.feed("The weather:\n<tool", False) == [{"content": "The weather:"}]
    assert stream.feed('_call>\n{"name": "get_weather", "arguments": {"location"', False) == []
    deltas = stream.feed(': "Paris"}}\n</tool_call>', False)
    assert [list(d) for d in deltas] == [["tool_calls"], ["tool_calls"]]
    assert deltas[1]["tool_calls"][0]["function"]["arguments"] == PARIS
    # a held-back start that turns out not to be markup is sent as content
    stream = plan().stream()
    assert stream.feed("x ``", False) == [{"content": "x"}]
    assert stream.feed("` is a fence", True) == [{"content": " ``` is a fence"}]


def test_forced_calls_stream_argument_by_argument_and_keep_a_truncated_call() -> None:
    text = f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>'
    _, _, deltas = streamed(plan(forced=True), text)
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]]
    assert len(fragments) > 5 and "".join(fragments) == PARIS
    cut = text[: text.index("Paris") + 2]  # max_tokens ended it inside the arguments
    message, finish = plan(forced=True).message(cut, "length")
    assert finish == "length" and calls_of(message) == [("get_weather", '{"location": "Pa')]
    assert calls_of(streamed(plan(forced=True), cut, "length")[0]) == calls_of(message)


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = CASES[1][1]
    for p in (plan(parallel=False), plan(parallel=False, forced=True)):
        assert calls_of(p.message(text, "stop")[0]) == [("get_weather", PARIS)]
        assert calls_of(streamed(p, text)[0]) == [("get_weather", PARIS)]


@pytest.mark.parametrize("family", list(PARSERS.values()))
@pytest.mark.parametrize("parallel", [False, True])
def test_forced_grammars_are_valid_lark_and_spell_what_the_parser_reads(family, parallel) -> None:
    functions = [{"name": "get_weather", "parameters": WEATHER}, {"name": "get_time", "parameters": TIME}]
    grammar = family().grammar(functions, parallel)
    assert LLMatcher.validate_grammar(grammar_from("grammar", grammar)) == ""
    # the literal parts around the arguments, filled in by hand, parse back as the same calls
    p = family()
    one = p.call_prefix("get_weather") + PARIS + p.call_suffix
    two = p.call_prefix("get_time") + '{"city": "Oslo"}' + p.call_suffix
    text = p.open + one + p.separator + two + p.close
    expected = [("get_weather", PARIS), ("get_time", '{"city": "Oslo"}')]
    assert calls_of(plan(family, forced=True).message(text, "stop")[0]) == expected


class FakeTokenizer:
    def __init__(self, template: str, tokens: dict[str, int] | None = None) -> None:
        self.template, self.tokens = template, tokens or {}

    def chat_template_source(self, tools=None) -> str:
        return self.template

    def token_to_id(self, token: str) -> int | None:
        return self.tokens.get(token)


QWEN_LIKE = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>{% endif %}{{ messages }}"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]  # fmt: skip


def request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})


def test_the_family_comes_from_the_template_and_markers_become_tokens() -> None:
    calling = ToolCalling(FakeTokenizer(QWEN_LIKE, {"<tool_call>": 7, "</tool_call>": 8}))
    assert isinstance(calling.family, HermesParser) and calling.renders_tools
    forced = calling.plan(request(tools=TOOLS, tool_choice="required"))
    assert forced.is_forced and forced.grammar.param == "tools"
    assert "<[7]>" in forced.grammar.spec.text and "<[8]>" in forced.grammar.spec.text
    assert "{0,7}" in forced.grammar.spec.text  # parallel by default
    named = calling.plan(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert "get_weather" not in named.grammar.spec.text and not named.parallel
    assert calling.plan(request(tools=TOOLS, tool_choice="none")) is None
    assert calling.plan(request(tools=TOOLS)).is_forced is False
    mistral = ToolCalling(FakeTokenizer("{{ tools }}[TOOL_CALLS]", {"[TOOL_CALLS]": 5}))
    assert isinstance(mistral.family, MistralParser) and mistral.plan(request(tools=TOOLS)).keeps_special_tokens
    llama = ToolCalling(FakeTokenizer('{{ tools }}<|start_header_id|>"parameters"'))
    assert isinstance(llama.family, Llama3JsonParser)
    assert isinstance(ToolCalling(FakeTokenizer("{{ tools }}"), "mistral").family, MistralParser)


@pytest.mark.parametrize(("template", "body", "param"), [
    (QWEN_LIKE, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    (QWEN_LIKE, {"tool_choice": "required"}, "tool_choice"),
    (QWEN_LIKE, {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    (QWEN_LIKE, {"tools": [*TOOLS, TOOLS[0]]}, "tools[2].function.name"),
    (QWEN_LIKE, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    (QWEN_LIKE, {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ("{{ messages }}", {"tools": TOOLS}, "tools"),  # SmolLM2's template cannot render tools
])  # fmt: skip
def test_bad_tool_requests_are_400s_naming_the_field(template: str, body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        ToolCalling(FakeTokenizer(template)).plan(request(**body))
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_a_template_without_tools_still_takes_tool_choice_none() -> None:
    assert ToolCalling(FakeTokenizer("{{ messages }}")).plan(request(tools=TOOLS, tool_choice="none")) is None


def test_settings_name_every_parser() -> None:
    from server.settings import KNOBS_BY_NAME

    for name in ["auto", *PARSERS]:
        assert KNOBS_BY_NAME["tool_call_parser"].parse(name) == name
