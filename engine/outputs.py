"""What the engine hands back: per-step deltas of each sequence of a request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the `logprobs` most likely (token_id, logprob), best first
    rank: int | None = None  # 1 + how many tokens were more likely (prompt tokens only)


@dataclass(slots=True)
class CompletionOutput:
    """One sequence's delta since the previous output of its request."""

    index: int
    text: str  # new text; stop strings are never included
    token_ids: list[int]  # new token ids
    # When requested: one per token of the new text (never the eos / stop token that ended it).
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_generated_tokens: int = 0  # cumulative


@dataclass(slots=True)
class RequestOutput:
    """Deltas of the sequences of one request that changed in one engine step."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False  # every sequence of the request has finished
    error: str | None = None  # set when the engine failed the request
    # The error is the request's grammar, not an engine fault: no token could continue it.
    grammar_failed: bool = False
    num_cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # With prompt_logprobs: one per prompt token (None for the first), in the first output
    # after the whole prompt was computed; None in every other output.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine. A request is one prompt of a call with its `n` sequences: it is
    running while any of its sequences is in the batch, waiting while none is."""

    num_requests_running: int
    num_requests_waiting: int
    num_seqs_running: int  # sequences in the running batch
    # Sequences not in the batch: queued, preempted, or siblings of an n > 1 request that start
    # once its first sequence has prefilled.
    num_seqs_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_prompt_tokens: int  # processed since start
    num_generated_tokens: int
    num_preemptions: int
    num_draft_tokens: int = 0  # speculative decoding: tokens guessed since start
    num_accepted_draft_tokens: int = 0  # of which the model confirmed
    num_prefix_queried_tokens: int = 0  # prefix caching: tokens of sequences looked up at admission
    num_prefix_hit_tokens: int = 0  # of which found cached
    num_weight_bytes: int = 0  # the model's weights as they run (quantized blocks, packed copies)
