"""Bounds on the work one request may ask for, checked on the parsed JSON before validation.

Each bound is a 400 in OpenAI's words, naming the param: "Invalid 'messages': array too long.
Expected an array with maximum length 2048, but got an array with length 100000 instead."
Checked before pydantic builds a model per item, so a huge list costs a count, not a parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import APIError, bad_request


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_prompts: int = 256  # prompts in one /v1/completions request
    max_messages: int = 2048  # messages in one chat or /tokenize request
    max_content_parts: int = 2048  # content parts over all of a request's messages
    max_logit_bias: int = 300  # logit_bias entries (OpenAI's limit)
    max_token_ids: int = 131072  # token ids in /detokenize, or over a completions request's prompts
    max_waiting: int = 0  # the engine's queue: a completions batch beyond it can never fit (0: none)


def too_long(param: str, limit: int, length: int, why: str = "") -> APIError:
    return bad_request(
        f"Invalid {param!r}: array too long. Expected an array with maximum length {limit}, "
        f"but got an array with length {length} instead.{why}",
        param=param,
        code="array_above_max_length",
    )


def check_chat(data: dict[str, Any], limits: RequestLimits) -> None:
    """Chat completions and /tokenize with messages."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        return
    if len(messages) > limits.max_messages:
        raise too_long("messages", limits.max_messages, len(messages))
    num_parts = 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            num_parts += len(content)
            if num_parts > limits.max_content_parts:
                raise bad_request(
                    f"Invalid 'messages[{i}].content': too many content parts. Expected at most "
                    f"{limits.max_content_parts} content parts over all messages, but got "
                    f"{num_parts} by this one.",
                    param=f"messages[{i}].content",
                    code="array_above_max_length",
                )
    _check_logit_bias(data, limits)


def check_completion(data: dict[str, Any], limits: RequestLimits) -> None:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        # A batch: strings, or lists of token ids. Each prompt is one queued engine request.
        num_prompts = len(prompt)
        if limits.max_waiting and num_prompts > limits.max_waiting:
            raise too_long(
                "prompt", limits.max_waiting, num_prompts,
                f" This server queues at most {limits.max_waiting} requests (max_waiting), so a "
                "larger batch could never be admitted; split it.",
            )  # fmt: skip
        if num_prompts > limits.max_prompts:
            raise too_long("prompt", limits.max_prompts, num_prompts)
        num_ids = sum(len(p) for p in prompt if isinstance(p, list))
    else:
        num_ids = len(prompt) if isinstance(prompt, list) else 0
    if num_ids > limits.max_token_ids:
        raise bad_request(
            f"Invalid 'prompt': too many token ids. Expected at most {limits.max_token_ids} token "
            f"ids over all prompts, but got {num_ids} instead.",
            param="prompt",
            code="array_above_max_length",
        )
    _check_logit_bias(data, limits)


def check_detokenize(data: dict[str, Any], limits: RequestLimits) -> None:
    tokens = data.get("tokens")
    if isinstance(tokens, list) and len(tokens) > limits.max_token_ids:
        raise too_long("tokens", limits.max_token_ids, len(tokens))


def _check_logit_bias(data: dict[str, Any], limits: RequestLimits) -> None:
    bias = data.get("logit_bias")
    if isinstance(bias, dict) and len(bias) > limits.max_logit_bias:
        raise bad_request(
            f"Invalid 'logit_bias': too many properties. Expected an object with at most "
            f"{limits.max_logit_bias} properties, but got an object with {len(bias)} properties "
            "instead.",
            param="logit_bias",
            code="object_above_max_properties",
        )
