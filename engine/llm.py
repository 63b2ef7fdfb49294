"""Offline batch generation: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class Completion:
    """One finished sequence."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs


class LLM:
    """Runs the engine to completion on a list of prompts (strings or token id lists)."""

    def __init__(self, model: str, **config) -> None:
        self.engine = LLMEngine(dataclasses.replace(EngineConfig(model=model), **config))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        results: dict[str, GenerationResult] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"offline-{i}"
            self.engine.add_request(request_id, ids, p)
            results[request_id] = GenerationResult(request_id, ids, [Completion(j) for j in range(p.n)])
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                accumulate(results[output.request_id], output)
        return list(results.values())

    def chat(
        self, conversations: list[list[dict]], params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        return self.generate([self.tokenizer.encode_chat(c) for c in conversations], params)


def accumulate(result: GenerationResult, output: RequestOutput) -> None:
    """Fold one step's deltas into a result."""
    result.error = result.error or output.error
    if output.prompt_logprobs is not None:
        result.prompt_logprobs = output.prompt_logprobs
    for delta in output.outputs:
        c = result.completions[delta.index]
        c.text += delta.text
        c.token_ids += delta.token_ids
        if delta.logprobs is not None:
            c.logprobs = (c.logprobs or []) + delta.logprobs
        c.finish_reason = delta.finish_reason or c.finish_reason
        c.stop_reason = delta.stop_reason if delta.stop_reason is not None else c.stop_reason
