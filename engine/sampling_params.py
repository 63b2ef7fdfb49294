"""Per-request sampling and stopping parameters, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the core stays free of torch
    from engine.grammar import CompiledGrammar, GrammarSpec

MAX_N = 16
MAX_LOGPROBS = 20
# Numeric floors, so that finite logits stay finite through every processor (the sampler works
# in float32, whose largest value is 3.4e38):
# - a temperature below MIN_TEMPERATURE samples greedily (vLLM's _SAMPLING_EPS): dividing the
#   logits by 1e-300 would overflow them to inf and the softmax to NaN;
# - repetition_penalty divides or multiplies seen tokens' logits, so it is refused outside
#   [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY];
# - every other number has a bounded range below, and NaN / Infinity are refused.
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0

# Keys of generation_config.json that set sampling defaults, by SamplingParams field.
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class SamplingParamsError(ValueError):
    """An invalid parameter; `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = None  # None: up to the context length
    min_tokens: int = 0
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers semantics, over prompt + output
    presence_penalty: float = 0.0  # OpenAI semantics, over output
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's plus the top k
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's plus the top k
    skip_special_tokens: bool = True
    # Structured output: the grammar the output must match. The engine compiles a spec when it
    # adds the request; a server compiles it beforehand, off the engine thread.
    grammar: GrammarSpec | CompiledGrammar | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = _checked_logit_bias(self.logit_bias)
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0

    @classmethod
    def with_defaults(cls, defaults: dict[str, Any], **values: Any) -> SamplingParams:
        """Fields from `values` where not None, else from `defaults` (e.g. generation_config)."""
        names = {f.name for f in fields(cls)}
        merged = {k: v for k, v in defaults.items() if k in names and v is not None}
        merged.update({k: v for k, v in values.items() if v is not None})
        return cls(**merged)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def _validate(self) -> None:
        _check_int(self.n, "n", 1, MAX_N)
        if self.max_tokens is not None:  # 0: score the prompt only (prompt_logprobs)
            _check_int(self.max_tokens, "max_tokens", 0, None)
        _check_int(self.min_tokens, "min_tokens", 0, self.max_tokens)
        _check_float(self.temperature, "temperature", 0.0, 2.0)
        _check_float(self.top_p, "top_p", 0.0, 1.0)
        if self.top_p == 0.0:
            raise SamplingParamsError("top_p", "top_p must be in (0, 1], got 0")
        _check_int(self.top_k, "top_k", 0, None)
        _check_float(self.min_p, "min_p", 0.0, 1.0)
        _check_float(self.repetition_penalty, "repetition_penalty", MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        _check_float(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        _check_float(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"{name} must be a boolean")
        if self.seed is not None:
            _check_int(self.seed, "seed", -(2**63), 2**64 - 1)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingParamsError("stop", "stop must be non-empty strings")
        for token_id in self.stop_token_ids:
            _check_int(token_id, "stop_token_ids", 0, None)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, 0, MAX_LOGPROBS)


def _checked_logit_bias(logit_bias: dict) -> dict[int, float]:
    """Token id -> bias; ids may be given as decimal strings (JSON object keys)."""
    if not isinstance(logit_bias, dict):
        raise SamplingParamsError("logit_bias", "logit_bias must map token ids to numbers")
    checked = {}
    for key, bias in logit_bias.items():
        token_id = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        _check_int(token_id, "logit_bias", 0, None)
        _check_float(bias, "logit_bias", -100.0, 100.0)
        checked[token_id] = float(bias)
    return checked


def _check_int(value: Any, name: str, low: int | None, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SamplingParamsError(name, f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value}")


def _check_float(value: Any, name: str, low: float | None, high: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SamplingParamsError(name, f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SamplingParamsError(name, f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value}")
