"""Stopping criteria: token-level checks and stop strings on decoded text (pure Python)."""

from __future__ import annotations

from engine.request import FinishReason, Sequence


def check_token_stop(seq: Sequence, eos_token_ids: frozenset[int], max_model_len: int) -> None:
    """Finish `seq` if its newest token ends it: eos, a stop token id, max_tokens or context length."""
    params = seq.request.params
    token = seq.token_ids[-1]
    num_generated = seq.num_generated_tokens
    if num_generated >= params.min_tokens:
        if not params.ignore_eos and token in eos_token_ids:
            seq.finish(FinishReason.STOP, None)
            return
        if token in params.stop_token_ids:
            seq.finish(FinishReason.STOP, token)
            return
    reached_max_tokens = params.max_tokens is not None and num_generated >= params.max_tokens
    if reached_max_tokens or len(seq.token_ids) >= max_model_len:
        seq.finish(FinishReason.LENGTH)


def find_stop_string(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string in `text` that ends after `new_from`: (its start index, the string).

    Only text from `new_from - len(stop) + 1` on is searched: earlier matches were found before.
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def num_held_back_chars(stops: list[str]) -> int:
    """Characters a stream must withhold so that no prefix of a stop string is emitted."""
    return max((len(s) for s in stops), default=1) - 1
