"""engine.stopping: token-level stop checks and the stop-string helpers."""

from __future__ import annotations

import pytest

from engine.request import FinishReason, RequestStatus, Sequence
from engine.stopping import check_token_stop, find_stop_string, num_held_back_chars
from tests.engine.factories import make_seq

EOS = frozenset({2, 9})
MAX_MODEL_LEN = 64


def checked(output_token_ids: list[int], max_model_len: int = MAX_MODEL_LEN, **params) -> Sequence:
    seq = make_seq([5, 6, 7], output_token_ids, **params)
    check_token_stop(seq, EOS, max_model_len)
    return seq


def assert_running(seq: Sequence) -> None:
    assert seq.status == RequestStatus.WAITING
    assert (seq.finish_reason, seq.stop_reason) == (None, None)


@pytest.mark.parametrize("eos", sorted(EOS))
def test_any_eos_id_stops(eos):
    seq = checked([11, eos])
    assert seq.status == RequestStatus.FINISHED_STOPPED
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.STOP, None)


def test_ordinary_token_does_not_stop():
    assert_running(checked([11, 12]))


def test_eos_in_prompt_or_earlier_output_is_not_rechecked():
    assert_running(checked([2, 12]))


def test_ignore_eos_keeps_going_past_eos():
    assert_running(checked([2], ignore_eos=True))


def test_stop_token_id_stops_with_it_as_stop_reason():
    seq = checked([11, 40], stop_token_ids=[39, 40])
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.STOP, 40)


def test_stop_token_id_stops_even_with_ignore_eos():
    seq = checked([40], stop_token_ids=[40], ignore_eos=True)
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.STOP, 40)


def test_min_tokens_delays_eos():
    assert_running(checked([11, 2], min_tokens=3))
    seq = checked([11, 12, 2], min_tokens=3)
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.STOP, None)


def test_min_tokens_delays_stop_token_ids():
    assert_running(checked([40], min_tokens=2, stop_token_ids=[40]))
    seq = checked([11, 40], min_tokens=2, stop_token_ids=[40])
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.STOP, 40)


def test_max_tokens_finishes_with_length_exactly_at_the_limit():
    assert_running(checked([11, 12], max_tokens=3))
    seq = checked([11, 12, 13], max_tokens=3)
    assert seq.status == RequestStatus.FINISHED_LENGTH
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.LENGTH, None)


def test_eos_on_the_last_allowed_token_is_a_stop_not_length():
    seq = checked([11, 2], max_tokens=2)
    assert seq.finish_reason == FinishReason.STOP


def test_context_length_finishes_with_length():
    assert_running(checked([11, 12], max_model_len=6))
    seq = checked([11, 12, 13], max_model_len=6)
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.LENGTH, None)


def test_find_stop_string_spanning_old_and_new_text():
    text = "hello wor" + "ld!"
    assert find_stop_string(text, 9, ["world"]) == (6, "world")


def test_find_stop_string_inside_the_new_text():
    assert find_stop_string("ab" + "cSTOPd", 2, ["STOP"]) == (3, "STOP")


def test_find_stop_string_earliest_of_several_wins():
    text = "one END two STOP"
    assert find_stop_string(text, 0, ["STOP", "END"]) == (4, "END")
    assert find_stop_string(text, 0, ["two S", "STOP"]) == (8, "two S")


def test_find_stop_string_absent_returns_none():
    assert find_stop_string("nothing to see", 5, ["STOP", "xyz"]) is None
    assert find_stop_string("", 0, ["STOP"]) is None
    assert find_stop_string("STOP", 0, []) is None


def test_find_stop_string_ignores_matches_wholly_in_old_text():
    assert find_stop_string("END and more", 8, ["END"]) is None
    assert find_stop_string("END and END", 8, ["END"]) == (8, "END")


def test_find_stop_string_at_the_very_end():
    assert find_stop_string("abc</s>", 6, ["</s>"]) == (3, "</s>")


@pytest.mark.parametrize(
    "stops, expected", [([], 0), (["x"], 0), (["ab", "abcd", "a"], 3), (["\n\n"], 1)]
)
def test_num_held_back_chars_is_longest_stop_minus_one(stops, expected):
    assert num_held_back_chars(stops) == expected
