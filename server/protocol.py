"""OpenAI request schemas (pydantic), strict JSON parsing, and request -> SamplingParams."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine import SamplingParams, SamplingParamsError
from engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
)

from .errors import APIError, bad_request, truncate, unsupported

# ---------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_TYPE_TAG = re.compile(
    r"^(str|int|float|bool|list|dict|none|function-[a-z]+|json-or-python)$|[\[(]"
)

Model = TypeVar("Model", bound=BaseModel)


def parse_json(raw: bytes, check: Callable[[Any], None] | None = None) -> Any:
    """Decode a request body: UTF-8 only, no NaN / Infinity / overflowing numbers, no lone
    surrogates. `check` sees the decoded value first (cheap bounds before the walk over it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding"
        ) from None
    if not text.strip():
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            code="invalid_json",
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer beyond int_max_str_digits
        raise bad_request(
            f"malformed JSON: {truncate(str(exc), 200)}", code="invalid_json"
        ) from None
    if check is not None:
        check(data)
    _check_values(data, [])
    return data


def _check_values(value: Any, path: list[str | int]) -> None:
    """Reject NaN / Infinity (including overflowing literals like 1e999) and lone surrogates."""
    stack = [(value, path)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                raise bad_request(
                    f"{format_param(path) or 'value'}: NaN, Infinity and out-of-range numbers are not allowed",
                    param=format_param(path),
                    code="invalid_value",
                )
        elif isinstance(value, str):
            if _SURROGATE.search(value):
                raise bad_request(
                    f"{format_param(path) or 'value'}: string contains a lone UTF-16 surrogate",
                    param=format_param(path),
                    code="invalid_encoding",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise bad_request(
                        "object key contains a lone UTF-16 surrogate",
                        param=format_param(path),
                        code="invalid_encoding",
                    )
                if isinstance(item, float | str | dict | list):
                    stack.append((item, [*path, key]))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, float | str | dict | list):
                    stack.append((item, [*path, index]))


def format_param(loc: list[str | int] | tuple[str | int, ...]) -> str | None:
    """A pydantic / JSON location as OpenAI names a param: `messages[0].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _TYPE_TAG.search(part):
            continue  # a union member's tag such as `list[ContentPart]` or `str`
        else:
            out += f".{part}" if out else part
    return out or None


# pydantic's wrong-JSON-type errors, and what each expected, in OpenAI's words.
_EXPECTED_TYPE = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _json_type(value: Any) -> str:
    """How OpenAI names a JSON value's type in 'but got ... instead'."""
    match value:
        case bool():
            return "a boolean"
        case int():
            return "an integer"
        case float():
            return "a decimal number"
        case str():
            return "a string"
        case list():
            return "an array"
        case dict():
            return "an object"
        case None:
            return "null"
    return type(value).__name__


def validate(model_cls: type[Model], data: Any) -> Model:
    """The request model, or a 400 naming the (deepest) offending field."""
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_type")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # Of a union's alternatives, the deepest error is the one that explains the mistake.
        error = max(errors, key=lambda e: len(e["loc"]))
        param = format_param(list(error["loc"]))
        if error["type"] in _EXPECTED_TYPE:
            # Every alternative of a union that failed on its type at this same field.
            expected = list(dict.fromkeys(
                _EXPECTED_TYPE[e["type"]] for e in errors
                if e["type"] in _EXPECTED_TYPE and format_param(list(e["loc"])) == param
            ))  # fmt: skip
            wanted = expected[0] if len(expected) == 1 else "one of " + " or ".join(expected)
            raise bad_request(
                f"Invalid type for {param!r}: expected {wanted}, but got "
                f"{_json_type(error.get('input'))} instead.",
                param=param,
                code="invalid_type",
            ) from None
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "field required"
        raise bad_request(
            f"invalid {param!r}: {message}" if param else message,
            param=param,
            code="missing_required_parameter" if error["type"] == "missing" else "invalid_value",
        ) from None


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------


# Every request schema is strict: JSON types are enforced as OpenAI enforces them. A string or a
# boolean is never coerced to a number, nor a number or a string to a boolean, nor a float (even
# 5.0) to an integer; an integer is a valid number.


class _Schema(BaseModel):
    # Unknown fields are ignored (as vLLM does); fields that change the output and that
    # Kestrel cannot honour are declared so they can be refused explicitly.
    model_config = ConfigDict(strict=True, extra="ignore")


class _OpenSchema(BaseModel):
    # Unknown fields are kept: some reach the chat template (e.g. `reasoning_content`).
    model_config = ConfigDict(strict=True, extra="allow")


# What /openapi.json says of a field whose value is checked after parsing (SamplingParams, the
# serving checks) rather than by pydantic: the schema states the rule, the messages stay the
# checks' own. (minimum / maximum constrain only a number, so null stays valid.)


def _documented(default: Any = None, **json_schema: Any) -> Any:
    return Field(default=default, json_schema_extra=json_schema)


def _refused(what: str) -> Any:
    """A field declared only to be refused: anything but null is a 400 unsupported_parameter."""
    return Field(default=None, json_schema_extra={"type": "null", "description": f"not supported ({what})"})


class StreamOptions(_Schema):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class TextContentPart(_OpenSchema):
    type: str = _documented(..., enum=["text", "input_text"])
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _only_text(cls, value: str) -> str:
        if value not in ("text", "input_text"):
            raise ValueError(
                f"only text content parts are supported, got type {truncate(value, 40)!r}"
            )
        return value


class FunctionCall(_Schema):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(_OpenSchema):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_OpenSchema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_OpenSchema):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_OpenSchema):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class JsonSchemaFormat(_OpenSchema):
    model_config = ConfigDict(populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_OpenSchema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Schema):
    """vLLM's `structured_outputs` extension: exactly one of json, regex, choice, grammar and
    json_object, plus options."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_: str | dict[str, Any] | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False  # Kestrel has one backend
    disable_additional_properties: bool = False
    # Not implemented; refused rather than ignored.
    structural_tag: str | dict[str, Any] | None = None


class _SamplingFields(_Schema):
    """Fields shared by chat and completions, including vLLM's extensions."""

    model: str | None = None
    temperature: float | None = _documented(minimum=0, maximum=2)
    top_p: float | None = _documented(exclusiveMinimum=0, maximum=1)
    n: Annotated[int, Field(ge=1)] | None = _documented(maximum=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = _documented(minimum=-(2**63), maximum=2**64 - 1)
    presence_penalty: float | None = _documented(minimum=-2, maximum=2)
    frequency_penalty: float | None = _documented(minimum=-2, maximum=2)
    logit_bias: dict[str, float] | None = _documented(
        propertyNames={"pattern": "^[0-9]+$"},
        additionalProperties={"type": "number", "minimum": -100, "maximum": 100},
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = _documented(minimum=-1)
    min_p: float | None = _documented(minimum=0, maximum=1)
    repetition_penalty: float | None = _documented(
        minimum=MIN_REPETITION_PENALTY, maximum=MAX_REPETITION_PENALTY
    )
    min_tokens: int | None = _documented(minimum=0)
    stop_token_ids: list[int] | None = _documented(items={"type": "integer", "minimum": 0})
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    # each prompt token's logprob plus the top k
    prompt_logprobs: int | None = _documented(minimum=0, maximum=MAX_LOGPROBS)
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = _documented(
        description="deprecated alias of max_completion_tokens", minimum=1
    )
    max_completion_tokens: int | None = _documented(minimum=1)
    logprobs: bool | None = False
    top_logprobs: int | None = _documented(minimum=0, maximum=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Not implemented; refused rather than ignored.
    audio: dict[str, Any] | None = _refused("audio output")
    modalities: list[str] | None = _documented(items={"enum": ["text"]})
    functions: list[dict[str, Any]] | None = _refused("deprecated; use tools")
    function_call: str | dict[str, Any] | None = _refused("deprecated; use tool_choice")
    # vLLM extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = _documented(minimum=0)
    logprobs: int | None = _documented(minimum=0, maximum=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = _documented(maxLength=0, description="not supported (fill-in-the-middle)")
    best_of: int | None = None
    # vLLM extension
    add_special_tokens: bool = True


class TokenizeRequest(_Schema):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool | None = None  # default: True for prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Schema):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------------------------
# Request -> engine inputs
# ---------------------------------------------------------------------------------------------


def check_stream_options(request: _SamplingFields) -> None:
    if request.stream_options is not None and not request.stream:
        raise bad_request(
            "stream_options is only allowed when stream is true", param="stream_options"
        )


def check_chat_supported(request: ChatCompletionRequest) -> None:
    """Refuse fields that would change the output but are not implemented."""
    if request.functions is not None or request.function_call is not None:
        raise unsupported(
            "functions" if request.functions is not None else "function_call",
            "the deprecated functions / function_call fields are not supported; use tools",
        )
    if request.audio is not None or (request.modalities and set(request.modalities) != {"text"}):
        raise unsupported("modalities", "only text output is supported")
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    if request.continue_final_message and request.add_generation_prompt:
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true",
            param="continue_final_message",
        )


def check_completion_supported(request: CompletionRequest) -> None:
    if request.suffix:
        raise unsupported("suffix", "suffix (fill-in-the-middle) is not supported")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise unsupported("best_of", "best_of other than n is not supported")


def messages_for_template(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: text parts joined, tool-call arguments as dicts."""
    out = []
    for message in messages:
        data = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            data["content"] = "\n".join(part.text or "" for part in message.content)
        if message.tool_calls:
            for call in data["tool_calls"]:
                function = call["function"]
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"] or "{}")
                    except ValueError:
                        pass  # leave as given: the template may print it verbatim
        out.append(data)
    return out


def tools_for_template(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    return None if tools is None else [tool.model_dump(exclude_none=True) for tool in tools]


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    if not bias:
        return {}
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise bad_request(
                f"logit_bias keys must be token ids, got {truncate(key, 40)!r}", param="logit_bias"
            ) from None
    return out


def to_sampling_params(
    request: ChatCompletionRequest | CompletionRequest,
    defaults: Mapping[str, Any],
    *,
    default_max_tokens: int | None = None,
) -> SamplingParams:
    """User value > `defaults` (server config over the model's generation_config) > OpenAI's."""
    if isinstance(request, ChatCompletionRequest):
        max_tokens = request.max_completion_tokens
        max_tokens_param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, max_tokens_param = request.max_tokens, "max_tokens"
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        logprobs_param = "top_logprobs"
        if max_tokens == 0:  # only completions score a prompt without generating (echo)
            raise APIError(400, f"{max_tokens_param} must be at least 1, got 0", param=max_tokens_param,
                           code="invalid_value")  # fmt: skip
    else:
        max_tokens, max_tokens_param = request.max_tokens, "max_tokens"
        logprobs, logprobs_param = request.logprobs, "logprobs"
    prompt_logprobs = request.prompt_logprobs
    if isinstance(request, CompletionRequest) and request.echo and logprobs is not None:
        # echo with logprobs lists the prompt's tokens too (lm-evaluation-harness scores so).
        prompt_logprobs = max(prompt_logprobs or 0, logprobs)
    merged_defaults = dict(defaults)
    if default_max_tokens is not None:
        merged_defaults.setdefault("max_tokens", default_max_tokens)
    try:
        return SamplingParams.with_defaults(
            merged_defaults,
            n=request.n,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=_logit_bias(request.logit_bias),
            seed=request.seed,
            stop=[request.stop] if isinstance(request.stop, str) else request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
        )
    except SamplingParamsError as exc:
        param = {"max_tokens": max_tokens_param, "logprobs": logprobs_param}.get(
            exc.param, exc.param
        )
        raise APIError(400, str(exc), param=param, code="invalid_value") from None
