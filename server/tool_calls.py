"""Tool calls: `tools` / `tool_choice` -> what the chat template renders and, for forced calls, a
grammar in the model's own call syntax; the model's output -> OpenAI `tool_calls`, whole or as
stream deltas.

A syntax is one `ToolParser` subclass, listed in PARSERS: it finds where a call may start, scans
the calls there, and spells a forced call for the grammar. A new model family's syntax is a new
subclass there. The parser is chosen by the chat template (`speaks`), or named in the config.

    ToolCalling (one per server) --plan(request)--> ToolPlan (one per request)
    ToolPlan.message(text, finish)       the non-streamed message
    ToolPlan.stream() -> ToolCallStream  per choice: feed(text so far) -> OpenAI deltas
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

import jinja2
import jinja2.meta
import jsonschema

from engine import GrammarSpec, Tokenizer

from .errors import APIError, bad_request
from .protocol import ChatCompletionRequest
from .structured_outputs import GrammarRequest

# Whitespace a forced call's arguments may hold between JSON tokens: bounded, so a model cannot
# loop on newlines (as engine.grammar.JSON_WHITESPACE).
ARGS_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
MAX_PARALLEL_CALLS = 8  # calls one forced answer may hold when parallel_tool_calls is true


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ---------------------------------------------------------------------------------------------
# JSON scanning: where values end in text that may still be growing
# ---------------------------------------------------------------------------------------------

_WS = " \t\r\n"
_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*', re.S)
_SCALAR = re.compile(r"[A-Za-z0-9.+\-]+")


@dataclass(slots=True)
class RawCall:
    """A call as the model wrote it: `arguments` is the raw JSON text (so far, while incomplete)."""

    name: str | None = None
    arguments: str = ""
    is_complete: bool = False


class _Incomplete(Exception):
    """The text ends inside what may still become a call; `calls`: the calls so far."""

    def __init__(self, calls: list[RawCall] | None = None) -> None:
        self.calls = calls or []


class _Invalid(Exception):
    """Not a call, whatever text follows."""


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _expect(text: str, i: int, literal: str) -> int:
    """The index after `literal` at text[i]; _Incomplete if text ends in a prefix of it."""
    if text.startswith(literal, i):
        return i + len(literal)
    if literal.startswith(text[i:]):
        raise _Incomplete()
    raise _Invalid()


def _string_end(text: str, i: int) -> int:
    """text[i] is '"': the index after the closing quote."""
    end = _STRING_BODY.match(text, i + 1).end()
    if end < len(text) and text[end] == '"':
        return end + 1
    raise _Incomplete()


def _value_end(text: str, i: int) -> int:
    """The index after the JSON value starting at text[i] (validity is json.loads' job)."""
    n = len(text)
    if i >= n:
        raise _Incomplete()
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth, j = 0, i
        while j < n:
            c = text[j]
            if c == '"':
                j = _string_end(text, j)
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        raise _Incomplete()
    m = _SCALAR.match(text, i)
    if m is None:
        raise _Invalid()
    if m.end() == n:
        raise _Incomplete()  # a number may go on
    return m.end()


def _scan_call(text: str, i: int, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[RawCall, int]:
    """The call object `{"name": ..., "arguments": {...}}` at text[i]: (call, index after it).
    While incomplete, the partial call is on the _Incomplete (arguments as far as written)."""
    call = RawCall()
    n = len(text)
    if i >= n:
        raise _Incomplete([call])
    if text[i] != "{":
        raise _Invalid()
    j, has_arguments = i + 1, False
    try:
        while True:
            j = _skip_ws(text, j)
            if j >= n:
                raise _Incomplete()
            if text[j] != '"':
                raise _Invalid()
            key_end = _string_end(text, j)
            key = json.loads(text[j:key_end])
            j = _skip_ws(text, key_end)
            if j >= n:
                raise _Incomplete()
            if text[j] != ":":
                raise _Invalid()
            j = _skip_ws(text, j + 1)
            try:
                value_end = _value_end(text, j)
            except _Incomplete:
                if key in argument_keys and text[j:j + 1] == "{":
                    call.arguments = text[j:]
                raise
            raw = text[j:value_end]
            if key == "name":
                call.name = _loads(raw)
                if not isinstance(call.name, str):
                    raise _Invalid()
            elif key in argument_keys:
                if has_arguments:
                    raise _Invalid()
                has_arguments = True
                # Some models write the arguments as a JSON string holding the object.
                call.arguments = _loads(raw) if raw.startswith('"') else raw
            j = _skip_ws(text, value_end)
            if j >= n:
                raise _Incomplete()
            if text[j] == "}":
                break
            if text[j] != ",":
                raise _Invalid()
            j += 1
    except _Incomplete:
        raise _Incomplete([call]) from None
    if call.name is None or not isinstance(call.arguments, str):
        raise _Invalid()
    if not has_arguments:
        call.arguments = "{}"
    call.is_complete = True
    return call, j + 1


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise _Invalid() from None


def _find_marker(text: str, pos: int, marker: str) -> int | None:
    """The first `marker` at or after `pos`, or a prefix of it that ends the text."""
    found = text.find(marker, pos)
    if found >= 0:
        return found
    for k in range(min(len(marker) - 1, len(text) - pos), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return None


def _lark(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Parsers: one class per syntax
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Scan:
    calls: list[RawCall]
    end: int  # the index after the calls' markup


class ToolParser:
    """One tool-call syntax.

    `find(text, pos, after_call)`: where a call may start at or after `pos` (a partial marker at
    the end of the text counts), or None. `scan(text, start, final)`: the calls at `start`;
    raises _Incomplete while more text could make them calls, _Invalid when none can.
    Both depend only on the text seen, so a verdict, once given, never changes as text grows.
    Forced calls are spelled `open call (separator call)* close`, each call
    `call_prefix(name) ARGS call_suffix` with ARGS the parameters' JSON schema.
    """

    name: ClassVar[str]
    keeps_special_tokens: ClassVar[bool] = False  # the markup is a special token
    open: ClassVar[str] = ""
    close: ClassVar[str] = ""
    separator: ClassVar[str] = "\n"
    call_suffix: ClassVar[str] = "}"
    markers: ClassVar[tuple[str, ...]] = ()  # markup that may be one (added) token

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def speaks(cls, template: str) -> bool:
        """Whether a chat template prompts for this syntax."""
        return False

    def find(self, text: str, pos: int, after_call: bool) -> int | None:
        raise NotImplementedError

    def scan(self, text: str, start: int, final: bool) -> Scan:
        raise NotImplementedError

    def call_prefix(self, name: str) -> str:
        return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '

    def lark(self, text: str) -> str:
        """`text` as a Lark sequence; a marker that is one token of the vocabulary as that token
        (`<[id]>`): llguidance reads an added token only so, even one not marked special."""
        ids = {m: self.tokenizer.token_to_id(m) for m in self.markers} if self.tokenizer else {}
        pattern = "|".join(re.escape(m) for m, token_id in ids.items() if token_id is not None)
        pieces = re.split(f"({pattern})", text) if pattern else [text]
        return " ".join(f"<[{ids[p]}]>" if p in ids else _lark(p) for p in pieces if p)

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar of forced calls to `tools` (function definitions), one or up to
        MAX_PARALLEL_CALLS."""
        rules, alternatives = [], []
        for k, function in enumerate(tools):
            schema = dict(function.get("parameters") or {"type": "object"})
            schema["x-guidance"] = {"whitespace_pattern": ARGS_WHITESPACE}
            rules.append(f"args_{k}: %json {json.dumps(schema, ensure_ascii=False)}")
            alternatives.append(f"{self.lark(self.call_prefix(function['name']))} args_{k} {self.lark(self.call_suffix)}")
        calls = "call"
        if parallel:
            calls = f"call ({self.lark(self.separator)} call){{0,{MAX_PARALLEL_CALLS - 1}}}"
        start = " ".join(part for part in (self.lark(self.open), calls, self.lark(self.close)) if part)
        return "\n".join([f"start: {start}", "call: " + " | ".join(alternatives), *rules])


class HermesParser(ToolParser):
    """Hermes and Qwen2.5: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` per call."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    call_suffix = "}\n</tool_call>"
    markers = (START, END)

    @classmethod
    def speaks(cls, template: str) -> bool:
        return cls.START in template

    def call_prefix(self, name: str) -> str:
        return "<tool_call>\n" + super().call_prefix(name)

    def find(self, text: str, pos: int, after_call: bool) -> int | None:
        return _find_marker(text, pos, self.START)

    def scan(self, text: str, start: int, final: bool) -> Scan:
        i = _skip_ws(text, _expect(text, start, self.START))
        call, j = _scan_call(text, i)
        j = _skip_ws(text, j)
        try:
            return Scan([call], _expect(text, j, self.END))
        except _Incomplete:
            if final and j == len(text):
                return Scan([call], j)  # the answer ended before the closing tag
            raise _Incomplete([call]) from None


class Llama3JsonParser(ToolParser):
    """Llama 3.x: the answer is `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` if
    special tokens are kept), calls separated by `;`. Also the bare JSON call small models write."""

    name = "llama3_json"
    TAG = "<|python_tag|>"
    separator = "; "

    @classmethod
    def speaks(cls, template: str) -> bool:
        return cls.TAG in template or ("<|start_header_id|>" in template and '"parameters"' in template)

    def call_prefix(self, name: str) -> str:
        return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "parameters": '

    def find(self, text: str, pos: int, after_call: bool) -> int | None:
        if after_call:
            i = pos
            while i < len(text) and text[i] in _WS + ";":
                i += 1
        elif pos == 0:
            i = _skip_ws(text, 0)  # only a whole answer is a bare call
        else:
            return None
        if i > len(text):
            return None
        if i == len(text) or text[i] == "{" or self.TAG.startswith(text[i:i + len(self.TAG)]):
            return i
        return None

    def scan(self, text: str, start: int, final: bool) -> Scan:
        i = start
        if text.startswith(self.TAG, i) or (i < len(text) and text[i] == "<"):
            i = _expect(text, i, self.TAG)
        call, end = _scan_call(text, _skip_ws(text, i))
        return Scan([call], end)


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or (tokenizer v11+)
    `[TOOL_CALLS]name[ARGS]{...}` per call. [TOOL_CALLS] is a special token: kept in the text."""

    name = "mistral"
    START, ARGS = "[TOOL_CALLS]", "[ARGS]"
    keeps_special_tokens = True
    open, close, separator = "[TOOL_CALLS][", "]", ", "
    markers = (START,)
    _NAME = re.compile(r"[A-Za-z0-9_.\-]+")

    @classmethod
    def speaks(cls, template: str) -> bool:
        return cls.START in template

    def find(self, text: str, pos: int, after_call: bool) -> int | None:
        return _find_marker(text, pos, self.START)

    def scan(self, text: str, start: int, final: bool) -> Scan:
        i = _skip_ws(text, _expect(text, start, self.START))
        if i >= len(text):
            raise _Incomplete()
        if text[i] == "[":
            calls: list[RawCall] = []
            j = i + 1
            while True:
                try:
                    call, j = _scan_call(text, _skip_ws(text, j))
                except _Incomplete as exc:
                    raise _Incomplete(calls + exc.calls) from None
                calls.append(call)
                j = _skip_ws(text, j)
                if j >= len(text):
                    raise _Incomplete(calls)
                if text[j] == "]":
                    return Scan(calls, j + 1)
                if text[j] != ",":
                    raise _Invalid()
                j += 1
        m = self._NAME.match(text, i)
        if m is None:
            raise _Invalid()
        if m.end() == len(text):
            raise _Incomplete()
        call = RawCall(m.group())
        j = _expect(text, m.end(), self.ARGS)
        try:
            end = _value_end(text, j)
        except _Incomplete:
            call.arguments = text[j:] if text[j:j + 1] == "{" else ""
            raise _Incomplete([call]) from None
        call.arguments, call.is_complete = text[j:end], True
        return Scan([call], end)


class FencedJsonParser(ToolParser):
    """A fenced ```json block holding one call object, as small models write instead of their
    template's syntax. Tried after the family's parser; a call only if it names a declared tool
    with valid arguments (as every call in `auto`)."""

    name = "fenced_json"
    FENCE = "```"
    _LANGUAGE = re.compile(r"[A-Za-z]*")

    def find(self, text: str, pos: int, after_call: bool) -> int | None:
        return _find_marker(text, pos, self.FENCE)

    def scan(self, text: str, start: int, final: bool) -> Scan:
        i = _expect(text, start, self.FENCE)
        m = self._LANGUAGE.match(text, i)
        if m.end() == len(text):
            raise _Incomplete()
        if m.group().lower() not in ("", "json"):
            raise _Invalid()
        call, j = _scan_call(text, _skip_ws(text, m.end()))
        j = _skip_ws(text, j)
        try:
            return Scan([call], _expect(text, j, self.FENCE))
        except _Incomplete:
            if final and j == len(text):
                return Scan([call], j)
            raise _Incomplete([call]) from None


# The family parsers, chosen by the chat template in this order (or by name in the config), and
# the fallbacks tried after the family's in `auto`.
PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesParser, MistralParser, Llama3JsonParser)
}
FALLBACK_PARSERS: tuple[type[ToolParser], ...] = (FencedJsonParser, Llama3JsonParser)
DEFAULT_PARSER = HermesParser  # a template that renders tools in no syntax we know


# ---------------------------------------------------------------------------------------------
# Per request: the plan, the non-streamed message, the stream
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Parsed:
    content: str  # the content so far (safe to send: never the start of a call)
    calls: list[RawCall]  # complete calls; when forced, also the one being written


@dataclass
class ToolPlan:
    """How one request's tool calls are made and read. `is_forced`: required or a named function,
    decoded under `grammar`, so every call is valid and streams argument by argument; otherwise
    (`auto`) a call counts only once complete, naming a declared tool, its arguments valid."""

    parsers: list[ToolParser]
    validators: dict[str, Any]  # tool name -> jsonschema validator
    parallel: bool
    is_forced: bool = False
    grammar: GrammarRequest | None = None

    @property
    def keeps_special_tokens(self) -> bool:
        """The markup is a special token, so the text must keep special tokens."""
        return self.parsers[0].keeps_special_tokens

    def accept(self, calls: list[RawCall]) -> bool:
        if self.is_forced:
            return True
        for call in calls:
            validator = self.validators.get(call.name or "")
            if validator is None:
                return False
            try:
                arguments = json.loads(call.arguments)
            except ValueError:
                return False
            if not isinstance(arguments, dict) or not validator.is_valid(arguments):
                return False
        return True

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message of a whole answer, and its finish_reason."""
        parsed = ToolCallExtractor(self).parse(text, final=True)
        calls = [call for call in parsed.calls if call.name is not None][: None if self.parallel else 1]
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        tool_calls = [{"id": new_call_id(), "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}} for call in calls]  # fmt: skip
        message = {"role": "assistant", "content": parsed.content or None, "tool_calls": tool_calls}
        return message, _finish(finish_reason)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


def _finish(finish_reason: str | None) -> str | None:
    return "tool_calls" if finish_reason == "stop" else finish_reason


class ToolCallExtractor:
    """One choice's text -> content and calls. Fed the whole text so far each time; what is
    settled (content, complete calls) is kept, so each call scans only the unsettled part.

    Content is the text before the first call, less trailing whitespace; while streaming, text
    that may be the start of a call is held back. Text after the first call is not content.
    Of parsers that find a start at the same place, the first (the family's) that accepts wins.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._pos = 0  # text before this is settled
        self._first: int | None = None  # where the first call starts
        self._calls: list[RawCall] = []

    def parse(self, text: str, final: bool) -> Parsed:
        partial: list[RawCall] = []
        hold = len(text)
        while True:
            after_call = bool(self._calls)
            starts = [(p.find(text, self._pos, after_call), rank, p) for rank, p in enumerate(self.plan.parsers)]
            starts = sorted((s, rank, p) for s, rank, p in starts if s is not None)
            if not starts:
                break
            start = starts[0][0]
            scan, held = None, False
            for s, _, parser in starts:
                if s != start:
                    break
                try:
                    candidate = parser.scan(text, start, final)
                except _Invalid:
                    continue
                except _Incomplete as exc:
                    if final and not self.plan.is_forced:
                        continue
                    held, partial = True, exc.calls
                    break
                if self.plan.accept(candidate.calls):
                    scan = candidate
                    break
            if held:
                hold = start
                break
            if scan is None:
                self._pos = start + 1
                continue
            if self._first is None:
                self._first = start
            self._calls.extend(scan.calls)
            self._pos = max(scan.end, start + 1)
        calls = list(self._calls)
        if self.plan.is_forced:
            calls += [call for call in partial if call.name is not None]
        if self._first is not None:
            content = text[: self._first].rstrip()
        else:
            content = text if final else text[:hold].rstrip()
        return Parsed(content, calls)


class ToolCallStream:
    """One streamed choice: the text so far -> OpenAI deltas. A call's first delta carries index,
    id, type, name and empty arguments; later ones argument fragments. Reassembled, the deltas
    equal the non-streamed message (ids aside)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._extractor = ToolCallExtractor(plan)
        self._text = ""
        self._num_content_sent = 0
        self._num_arguments_sent: list[int] = []  # per call sent

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        self._text += text
        parsed = self._extractor.parse(self._text, final)
        deltas: list[dict[str, Any]] = []
        content = parsed.content
        if len(content) > self._num_content_sent:
            deltas.append({"content": content[self._num_content_sent :]})
            self._num_content_sent = len(content)
        calls = parsed.calls if self.plan.parallel else parsed.calls[:1]
        for index, call in enumerate(calls):
            if index == len(self._num_arguments_sent):
                if call.name is None:
                    break
                self._num_arguments_sent.append(0)
                deltas.append({"tool_calls": [{"index": index, "id": new_call_id(), "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})  # fmt: skip
            sent = self._num_arguments_sent[index]
            if len(call.arguments) > sent:
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments[sent:]}}]})
                self._num_arguments_sent[index] = len(call.arguments)
        return deltas

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return _finish(finish_reason) if self._num_arguments_sent else finish_reason


# ---------------------------------------------------------------------------------------------
# Per server: which syntax, and what a request asks for
# ---------------------------------------------------------------------------------------------


def _template_variables(template: str | None) -> set[str]:
    if not template:
        return set()
    try:
        return jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:
        return set()


class ToolCalling:
    """The tool-call syntax of the served model and the checks of `tools` / `tool_choice`.

    The parser is PARSERS[`parser_name`], or ("auto") the first whose syntax the chat template
    prompts for. A template that never mentions `tools` cannot tell the model about them: then
    tools with tool_choice other than "none" are a 400 (tool_choice "none" needs no rendering).
    """

    def __init__(self, tokenizer: Tokenizer, parser_name: str = "auto") -> None:
        template = tokenizer.chat_template_source(tools=[]) or ""
        self.renders_tools = "tools" in _template_variables(template)
        if parser_name == "auto":
            family = next((p for p in PARSERS.values() if p.speaks(template)), DEFAULT_PARSER)
        elif parser_name in PARSERS:
            family = PARSERS[parser_name]
        else:
            raise ValueError(f"unknown tool_call_parser {parser_name!r}; known: auto, {', '.join(PARSERS)}")
        self.family = family(tokenizer)
        fallbacks = [p(tokenizer) for p in FALLBACK_PARSERS if p is not family]
        self.parsers = [self.family, *fallbacks]
        self._validators: dict[str, Any] = {}  # parameters schema (JSON) -> validator

    def plan(self, request: ChatCompletionRequest) -> ToolPlan | None:
        """The request's tool plan, or None when its output is plain content (no tools, or
        tool_choice "none"); 400 for a bad tool_choice, tool or schema."""
        choice = request.tool_choice
        tools = request.tools or []
        named = _named_choice(choice)
        if choice not in (None, "none", "auto", "required") and named is None:
            raise bad_request(
                'tool_choice must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}', param="tool_choice", code="invalid_value"
            )
        if not tools:
            if choice == "required" or named is not None:
                raise bad_request(f"tool_choice {json.dumps(choice)} needs tools", param="tool_choice",
                                  code="invalid_value")  # fmt: skip
            return None
        if choice == "none":
            return None
        if not self.renders_tools:
            raise bad_request(
                "this model's chat template does not render tools, so the model cannot be told "
                'about them; tool calls need a template that does (tool_choice "none" is accepted)',
                param="tools", code="unsupported_parameter",
            )  # fmt: skip
        functions = [tool.function.model_dump(exclude_none=True) for tool in tools]
        validators: dict[str, Any] = {}
        for k, function in enumerate(functions):
            if function["name"] in validators:
                raise bad_request(f"tool names must be unique; {function['name']!r} is given twice",
                                  param=f"tools[{k}].function.name", code="invalid_value")  # fmt: skip
            validators[function["name"]] = self._validator(function.get("parameters"), k)
        forced = functions if choice == "required" else [f for f in functions if f["name"] == named]
        if named is not None and not forced:
            raise bad_request(f"tool_choice names the function {named!r}, which is not in tools",
                              param="tool_choice", code="invalid_value")  # fmt: skip
        parallel = request.parallel_tool_calls is not False
        if choice in (None, "auto"):
            return ToolPlan(self.parsers, validators, parallel)
        if (request.response_format is not None and request.response_format.type != "text") or request.structured_outputs:
            raise bad_request("a forced tool call cannot also have response_format or structured_outputs",
                              param="tool_choice")  # fmt: skip
        # A named function: exactly one call, as OpenAI does.
        spec = GrammarSpec("grammar", self.family.grammar(forced, parallel and named is None))
        grammar = GrammarRequest(spec, "tools", "tool grammar (the functions' parameters schemas)",
                                 "invalid_json_schema")
        return ToolPlan([self.family], validators, parallel and named is None, True, grammar)

    def _validator(self, schema: dict[str, Any] | None, index: int) -> Any:
        schema = schema if schema is not None else {"type": "object"}
        key = json.dumps(schema, sort_keys=True)
        validator = self._validators.get(key)
        if validator is None:
            cls = jsonschema.validators.validator_for(schema)
            try:
                cls.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise APIError(400, f"invalid parameters schema: {exc.message}",
                               param=f"tools[{index}].function.parameters", code="invalid_json_schema") from None  # fmt: skip
            validator = cls(schema)
            if len(self._validators) < 1024:
                self._validators[key] = validator
        return validator


def _named_choice(choice: Any) -> str | None:
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None
