"""engine.sampler: logits processors against transformers, and the Sampler's choices over a batch."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.request import Sequence
from engine.sampler import Sampler, apply_min_p, apply_repetition_penalty, apply_top_k_top_p
from engine.sampling_params import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, MIN_TEMPERATURE
from tests.engine.factories import make_seq

VOCAB = 32
EOS = [2, 4]
NEG_INF = float("-inf")


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale  # [rows, vocab]


def sample(logits: torch.Tensor, seqs: list[Sequence], eos: list[int] = EOS):
    return Sampler(eos)(logits.clone(), seqs)


def processed(logits: torch.Tensor, seqs: list[Sequence], eos: list[int] = EOS) -> torch.Tensor:
    """The logits after penalties, bias and min_tokens masking: what greedy rows take the argmax of."""
    return Sampler(eos)._process(logits.clone(), seqs)


def hf(processor, logits_row: torch.Tensor, input_ids: list[int] | None = None) -> torch.Tensor:
    ids = None if input_ids is None else torch.tensor([input_ids])
    return processor(ids, logits_row.unsqueeze(0)).squeeze(0)


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


# -- processors vs transformers --------------------------------------------------------------


def test_top_k_top_p_equal_transformers_warpers():
    settings = [
        (VOCAB, 1.0),
        (5, 1.0),
        (VOCAB, 0.9),
        (10, 0.5),
        (1, 1.0),
        (VOCAB, 0.05),
        (3, 0.95),
        (20, 0.7),
    ]
    logits = random_logits(len(settings))
    top_k = torch.tensor([k for k, _ in settings])
    top_p = torch.tensor([p for _, p in settings])
    ours = apply_top_k_top_p(logits.clone(), top_k, top_p)
    for row, (k, p) in enumerate(settings):
        expected = hf(TopPLogitsWarper(p), hf(TopKLogitsWarper(k), logits[row]))
        assert torch.equal(ours[row], expected), (k, p)
    assert (ours[1] > NEG_INF).sum() == 5
    assert (ours[4] > NEG_INF).sum() == 1
    assert 1 < (ours[2] > NEG_INF).sum() < VOCAB


def test_min_p_equals_transformers_warper():
    min_ps = [0.0, 0.01, 0.1, 0.3, 0.7, 1.0]
    logits = random_logits(len(min_ps), seed=1)
    ours = apply_min_p(logits.clone(), torch.tensor(min_ps))
    for row, min_p in enumerate(min_ps):
        assert torch.equal(ours[row], hf(MinPLogitsWarper(min_p), logits[row])), min_p
    assert (ours[0] > NEG_INF).all()
    assert 1 < (ours[2] > NEG_INF).sum() < VOCAB


def test_repetition_penalty_equals_transformers_processor():
    token_ids = [[1, 1, 5, 7, 5, 30], [0, 3, 3, 3, 3, 3], [31, 2, 9, 2, 31, 17]]
    penalties = [1.3, 0.7, 2.0]
    logits = random_logits(3, seed=2)
    ours = apply_repetition_penalty(
        logits.clone(), torch.tensor(token_ids), torch.tensor(penalties)
    )
    for row, (ids, penalty) in enumerate(zip(token_ids, penalties)):
        expected = hf(RepetitionPenaltyLogitsProcessor(penalty), logits[row], ids)
        torch.testing.assert_close(ours[row], expected, rtol=0, atol=0)
    seen = logits[:, [1, 5, 7, 30]]
    assert (seen[0] > 0).any() and (seen[0] < 0).any()


def test_sampler_repetition_penalty_covers_prompt_and_output_of_rows_of_any_length():
    seqs = [
        make_seq([1, 5, 5], [7, 1], repetition_penalty=1.5),
        make_seq([3], [], repetition_penalty=0.8),
        make_seq([9, 10, 11, 12, 13], [14], repetition_penalty=1.0),
        make_seq([20, 21], [22, 20, 23, 24, 25], repetition_penalty=3.0),
    ]
    logits = random_logits(len(seqs), seed=3)
    ours = processed(logits, seqs)
    for row, seq in enumerate(seqs):
        penalty = seq.request.params.repetition_penalty
        expected = hf(RepetitionPenaltyLogitsProcessor(penalty), logits[row], seq.token_ids)
        torch.testing.assert_close(ours[row], expected, rtol=0, atol=0)


def test_temperature_sampling_frequencies_match_transformers_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, -0.5, 0.0]])
    num_draws = 20_000
    torch.manual_seed(0)
    for temperature in (0.5, 1.0, 1.7):
        seq = make_seq(temperature=temperature)
        tokens, _ = sample(logits.expand(num_draws, -1), [seq] * num_draws)
        expected = hf(TemperatureLogitsWarper(temperature), logits[0]).softmax(-1)
        assert (frequencies(tokens, 5) - expected).abs().max() < 0.015, temperature


def test_combined_warpers_sample_from_transformers_distribution():
    logits = random_logits(1, vocab=8, seed=12, scale=1.0)[0]
    params = {"temperature": 0.8, "top_k": 6, "top_p": 0.9, "min_p": 0.2}
    expected = logits
    for warper in (
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(6),
        TopPLogitsWarper(0.9),
        MinPLogitsWarper(0.2),
    ):
        expected = hf(warper, expected)
    expected_probs = expected.softmax(-1)
    num_draws = 20_000
    torch.manual_seed(1)
    tokens, _ = sample(logits.expand(num_draws, -1), [make_seq(**params)] * num_draws)
    freqs = frequencies(tokens, 8)
    assert set(tokens) == set(torch.nonzero(expected_probs).flatten().tolist())
    assert len(set(tokens)) == 4
    assert (freqs - expected_probs).abs().max() < 0.015


@pytest.mark.parametrize(
    "params, allowed",
    [({"top_k": 3}, 3), ({"top_k": 1}, 1), ({"top_p": 0.5}, None), ({"min_p": 0.3}, None)],
    ids=["top_k=3", "top_k=1", "top_p=0.5", "min_p=0.3"],
)
def test_filtered_tokens_are_never_sampled(params, allowed):
    logits = random_logits(1, seed=5)[0]
    warper = {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper, "min_p": MinPLogitsWarper}
    ((name, value),) = params.items()
    kept = set(torch.nonzero(hf(warper[name](value), logits) > NEG_INF).flatten().tolist())
    if allowed is not None:
        assert len(kept) == allowed
    num_draws = 4_000
    torch.manual_seed(2)
    tokens, _ = sample(
        logits.expand(num_draws, -1), [make_seq(temperature=1.5, **params)] * num_draws
    )
    assert set(tokens) == kept


def test_top_k_one_gives_argmax_at_any_temperature():
    logits = random_logits(6, seed=6)
    seqs = [make_seq(temperature=t, top_k=1) for t in (0.1, 0.5, 1.0, 1.5, 2.0, 2.0)]
    tokens, _ = sample(logits, seqs)
    assert tokens == logits.argmax(-1).tolist()


# -- the Sampler over a batch ------------------------------------------------------------------


def test_greedy_rows_take_the_argmax_amid_sampled_rows():
    logits = random_logits(6, seed=7, scale=0.5)
    seqs = [make_seq(temperature=0.0 if row % 2 == 0 else 2.0) for row in range(6)]
    tokens, logprobs = sample(logits, seqs)
    argmax = logits.argmax(-1).tolist()
    assert [tokens[r] for r in (0, 2, 4)] == [argmax[r] for r in (0, 2, 4)]
    assert logprobs == [None] * 6


def test_all_greedy_batch_is_the_argmax():
    logits = random_logits(5, seed=8)
    tokens, _ = sample(logits, [make_seq(temperature=0) for _ in range(5)])
    assert tokens == logits.argmax(-1).tolist()


def test_presence_and_frequency_penalties_follow_openai_over_generated_tokens_only():
    seqs = [
        make_seq([7, 3], [3, 3, 5], presence_penalty=0.5, frequency_penalty=0.25),
        make_seq([9], [9], presence_penalty=-1.0),
        make_seq([1], [], presence_penalty=2.0, frequency_penalty=2.0),
        make_seq([6], [6, 8], frequency_penalty=-0.5),
        make_seq([3], [3]),
    ]
    logits = random_logits(len(seqs), seed=9)
    expected = logits.clone()
    expected[0, 3] -= 0.25 * 2 + 0.5
    expected[0, 5] -= 0.25 + 0.5
    expected[1, 9] += 1.0
    expected[3, 6] += 0.5
    expected[3, 8] += 0.5
    torch.testing.assert_close(processed(logits, seqs), expected)


def test_frequency_penalty_changes_the_greedy_choice():
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11] = 3.0, 2.0
    seq = make_seq([10, 10, 10], [10, 10], temperature=0, frequency_penalty=1.0)
    assert sample(logits, [seq])[0] == [11]
    assert sample(logits, [make_seq([10], [10, 10], temperature=0)])[0] == [10]


def test_logit_bias_is_added_per_row():
    seqs = [
        make_seq(logit_bias={3: 5.0, 10: -100.0}),
        make_seq(logit_bias={3: -2.5}),
        make_seq(),
    ]
    logits = random_logits(3, seed=10)
    expected = logits.clone()
    expected[0, 3] += 5.0
    expected[0, 10] -= 100.0
    expected[1, 3] -= 2.5
    torch.testing.assert_close(processed(logits, seqs), expected)


def test_logit_bias_decides_a_greedy_choice():
    logits = random_logits(1, seed=11)
    target = int(logits.argmin())
    assert sample(logits, [make_seq(temperature=0, logit_bias={target: 100})])[0] == [target]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(4, VOCAB)
    logits[:, [2, 4, 6]] = 50.0
    seqs = [
        make_seq([1], [8], min_tokens=3, stop_token_ids=[6]),
        make_seq([1], [8], min_tokens=3, stop_token_ids=[6], ignore_eos=True),
        make_seq([1], [8, 8, 8], min_tokens=3, stop_token_ids=[6]),
        make_seq([1], [8]),
    ]
    out = processed(logits, seqs)
    assert out[0, [2, 4, 6]].tolist() == [NEG_INF] * 3
    assert out[1, [2, 4, 6]].tolist() == [50.0, 50.0, NEG_INF]
    assert out[2, [2, 4, 6]].tolist() == [50.0] * 3
    assert torch.equal(out[3], logits[3])
    assert (out[:, [0, 1, 3, 5, 7]] == 0).all()


def test_tokens_masked_by_min_tokens_are_never_chosen():
    logits = random_logits(1, seed=12)
    logits[0, [2, 4, 6]] = 20.0
    num_draws = 2_000
    seq = make_seq([1], [], min_tokens=1, stop_token_ids=[6], temperature=2.0)
    greedy = make_seq([1], [], min_tokens=1, stop_token_ids=[6], temperature=0)
    torch.manual_seed(3)
    tokens, _ = sample(logits.expand(num_draws + 1, -1), [seq] * num_draws + [greedy])
    assert not {2, 4, 6} & set(tokens)


def seeded_draws(seed: int, others: list[Sequence] | None, num_draws: int = 50) -> list[int]:
    seq = make_seq(temperature=1.3, top_p=0.95, seed=seed)
    others = others or []
    batch = others[:4] + [seq] + others[4:]
    logits = random_logits(9, seed=13, scale=1.0)
    logits = logits if others else logits[4:5]
    row = batch.index(seq)
    draws = []
    for _ in range(num_draws):
        tokens, _ = sample(logits, batch)
        draws.append(tokens[row])
    return draws


def batch_neighbours() -> list[Sequence]:
    return [
        make_seq(temperature=1.0),
        make_seq(temperature=0.7, seed=1),
        make_seq(temperature=0),
        make_seq(temperature=1.5, top_k=5, seed=99),
        make_seq(temperature=1.0, min_p=0.1),
        make_seq(temperature=0.9, repetition_penalty=1.2, seed=7),
        make_seq(temperature=2.0, top_p=0.5),
        make_seq(temperature=1.0, logit_bias={3: 4.0}, seed=123),
    ]


def test_seeded_sequence_draws_the_same_tokens_alone_and_in_a_batch_of_eight():
    torch.manual_seed(4)
    alone = seeded_draws(1234, None)
    torch.manual_seed(5)
    in_batch = seeded_draws(1234, batch_neighbours())
    assert in_batch == alone
    assert len(set(alone)) > 5


def test_different_seeds_draw_different_tokens():
    assert seeded_draws(1234, None) != seeded_draws(1235, None)


def test_logprobs_are_raw_log_softmax_with_sorted_top_alternatives():
    logprob_counts = [None, 0, 3, 5, 20]
    seqs = [
        make_seq(logprobs=None),
        make_seq(logprobs=0, temperature=0),
        make_seq(logprobs=3, temperature=0.5, repetition_penalty=1.3),
        make_seq(logprobs=5, temperature=1.0, logit_bias={0: 50}),
        make_seq(logprobs=20, temperature=0, presence_penalty=2.0),
    ]
    logits = random_logits(len(seqs), seed=14)
    tokens, logprobs = sample(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert logprobs[0] is None
    assert tokens[3] == 0
    for row in range(1, len(seqs)):
        entry, k = logprobs[row], logprob_counts[row]
        assert entry.token_id == tokens[row]
        assert entry.logprob == pytest.approx(raw[row, tokens[row]].item(), abs=1e-6)
        assert len(entry.top) == k
        top_values, top_ids = raw[row].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_values.tolist(), abs=1e-6)
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)


def test_tied_logprobs_list_the_greedy_choice_first():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, [20, 9, 30]] = 3.0  # an exact three-way tie, as bf16 logits often have
    tokens, logprobs = sample(logits, [make_seq(logprobs=4, temperature=0)])
    assert tokens == [9]  # the first of the tied ids
    assert [t for t, _ in logprobs[0].top[:3]] == [9, 20, 30]


def test_no_logprobs_requested_gives_none_rows():
    logits = random_logits(3, seed=15)
    _, logprobs = sample(logits, [make_seq(temperature=t) for t in (0, 0.5, 1.0)])
    assert logprobs == [None, None, None]


def test_extreme_accepted_values_keep_logits_finite():
    """The numeric floors (engine.sampling_params) keep every processed logit finite or -inf
    (masked), so the softmax never sees NaN: each row draws its argmax-like token."""
    seen = [[1, 5, 5, 9], [7, 1, 30]]  # prompt, generated
    extremes = [
        dict(temperature=1e-300),  # below the floor: greedy
        dict(temperature=MIN_TEMPERATURE, top_p=1e-300, min_p=1.0),
        dict(temperature=2.0, repetition_penalty=MIN_REPETITION_PENALTY, top_k=1),
        dict(temperature=MIN_TEMPERATURE, repetition_penalty=MAX_REPETITION_PENALTY),
        dict(temperature=MIN_TEMPERATURE, presence_penalty=-2.0, frequency_penalty=-2.0,
             logit_bias={3: 100.0, 4: -100.0}, min_tokens=5),
    ]  # fmt: skip
    seqs = [make_seq(*seen, **values) for values in extremes]
    logits = random_logits(len(seqs), seed=16, scale=40.0)  # beyond real models' logits
    out = processed(logits, seqs)
    assert not out.isnan().any() and not (out == float("inf")).any()
    for _ in range(5):
        tokens, _ = sample(logits, seqs)
        assert tokens == out.argmax(-1).tolist()
