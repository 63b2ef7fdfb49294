"""Requests and the sequences they generate: the engine's per-request state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered so that every finished state compares greater than every live one."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"

    def __str__(self) -> str:
        return self.value


FINISHED_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
}


@dataclass(slots=True, eq=False)
class Sequence:
    """One generated continuation of a request's prompt: the scheduler's unit of work.

    Invariant: `num_computed_tokens <= len(token_ids)`; tokens past it have no K/V in the cache.
    """

    seq_id: int
    request: Request
    index: int  # choice index within the request
    token_ids: list[int]  # prompt followed by generated tokens
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # n > 1: sequences 1..n-1 wait for sequence 0's prefill and then share its prompt blocks.
    is_awaiting_fork: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # Text bookkeeping: LLMEngine appends detokenized text and reports what is not yet emitted.
    output_text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    # Logprobs of the tokens that are part of output_text, and where the text each one completes
    # ends in it (non-decreasing; missing for the last tokens while their text is held back, e.g.
    # a split UTF-8 character). A token is reported once that end is inside the emitted text.
    logprobs: list = field(default_factory=list)
    logprob_text_ends: list[int] = field(default_factory=list)
    num_emitted_logprobs: int = 0
    detokenizer: object | None = None
    generator: object | None = None  # torch.Generator for seeded sampling
    grammar: object | None = None  # engine.grammar.GrammarMatcher of a structured output

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        self.status = FINISHED_STATUS[reason]
        self.finish_reason = reason
        self.stop_reason = stop_reason


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    sequences: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at admission
    # prompt_logprobs: the prompt's tokens scored so far (None for the first), and whether they
    # were handed out.
    prompt_logprobs: list = field(default_factory=lambda: [None])
    has_reported_prompt_logprobs: bool = False
    error: str | None = None  # why the engine ended the request early (reported as an error)
    grammar_failed: bool = False  # the error: its structured output could not be continued

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)
