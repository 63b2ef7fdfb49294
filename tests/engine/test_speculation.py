"""engine.speculation: prompt-lookup drafts, their acceptance, and the same tokens as plain decoding."""

from __future__ import annotations

import pytest

from engine.config import SchedulerConfig
from engine.layers.attention import build_paged_metadata, build_rectangle_metadata
from engine.scheduler import Scheduler
from engine.speculation import accepted_tokens, can_speculate, propose_draft
from tests.engine.factories import make_block_manager, make_seq


def test_draft_follows_the_latest_occurrence_of_the_last_tokens():
    #           0  1  2  3  4  5  6  7  8  9 10 11
    history = [5, 6, 7, 1, 5, 6, 7, 2, 3, 9, 5, 6, 7]
    assert propose_draft(history, 3) == [2, 3, 9]  # [5, 6, 7] last seen at 4, not 0
    assert propose_draft(history, 1) == [2]
    assert propose_draft(history, 0) == []


def test_draft_prefers_a_longer_match_and_needs_two_tokens():
    history = [1, 2, 3, 8, 2, 3, 9, 1, 2, 3]
    assert propose_draft(history, 2) == [8, 2]  # [1, 2, 3] at 0 beats the later [2, 3] at 4
    assert propose_draft([4, 1, 2, 3], 4) == []  # nothing repeats
    assert propose_draft([7, 1, 2, 7], 4) == []  # a single repeated token is too weak a hint
    assert propose_draft([1, 2, 1, 2], 4) == [1, 2]  # the draft may run into the tail itself


def test_accepted_tokens_stop_at_the_first_wrong_guess():
    # choices[j]: the model's token after the real one and draft[:j]
    assert accepted_tokens([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all right, plus one more
    assert accepted_tokens([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # second guess wrong: model's 9
    assert accepted_tokens([4, 5, 6], [3, 5, 6, 7]) == [3]  # first guess wrong
    assert accepted_tokens([], [3]) == [3]


@pytest.mark.parametrize(
    "params, allowed",
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 0.7}, False),
        ({"temperature": 0.0, "logprobs": 2}, False),
        ({"temperature": 0.0, "repetition_penalty": 1.2}, False),
        ({"temperature": 0.0, "presence_penalty": 0.5}, False),
        ({"temperature": 0.0, "frequency_penalty": 0.5}, False),
        ({"temperature": 0.0, "logit_bias": {3: 5.0}}, False),
        ({"temperature": 0.0, "n": 2}, False),
        ({"temperature": 0.0, "min_tokens": 3}, False),  # eos masked for 3 more tokens
        ({"temperature": 0.0, "top_k": 5, "top_p": 0.5}, True),  # keep the argmax anyway
    ],
)
def test_only_sequences_decided_by_the_argmax_alone_speculate(params, allowed):
    assert can_speculate(make_seq(**params)) is allowed


def scheduler_with(config: SchedulerConfig, max_model_len: int = 1 << 20) -> Scheduler:
    return Scheduler(config, make_block_manager(num_blocks=64, block_size=4), max_model_len)


def running(scheduler: Scheduler, seq) -> None:
    """`seq` admitted with all but its last token computed, as after a decode step."""
    scheduler.add(seq)
    scheduler.schedule()
    seq.num_computed_tokens = len(seq.token_ids) - 1


def test_scheduler_attaches_drafts_within_every_limit():
    repeating = [1, 2, 3, 4] * 4  # prompt lookup can guess 1, 2, 3, 4 ... forever
    scheduler = scheduler_with(SchedulerConfig(speculative_tokens=3, max_num_batched_tokens=64))
    seq = make_seq(repeating, temperature=0.0)
    running(scheduler, seq)
    (entry,) = scheduler.schedule().scheduled
    assert (entry.num_new_tokens, entry.draft) == (1, [1, 2, 3])
    assert len(scheduler.block_manager.block_tables[seq.seq_id]) * 4 >= len(seq.token_ids) + 3

    # max_tokens: the draft never reaches past the last token the request may have
    limited = make_seq(repeating, [1, 2], temperature=0.0, max_tokens=4)
    scheduler = scheduler_with(SchedulerConfig(speculative_tokens=3))
    running(scheduler, limited)
    assert scheduler.schedule().scheduled[0].draft == [3]  # 2 generated, 1 + 1 draft to come

    # context length: no draft position past max_model_len
    scheduler = scheduler_with(SchedulerConfig(speculative_tokens=3), max_model_len=len(repeating) + 2)
    running(scheduler, make_seq(repeating, temperature=0.0))
    assert scheduler.schedule().scheduled[0].draft == [1, 2]


def test_scheduler_speculates_only_for_few_running_sequences():
    config = SchedulerConfig(speculative_tokens=2, speculative_max_seqs=2)
    scheduler = scheduler_with(config)
    seqs = [make_seq([1, 2, 3, 1, 2, 3], temperature=0.0) for _ in range(3)]
    for seq in seqs:
        running(scheduler, seq)
    assert all(not e.draft for e in scheduler.schedule().scheduled)  # three run
    scheduler.remove(seqs[2])
    out = scheduler.schedule()
    assert [e.draft for e in out.scheduled] == [[1, 2], [1, 2]]
    assert out.num_batched_tokens == 2  # drafts are not counted as the sequences' new tokens

    scheduler = scheduler_with(SchedulerConfig(speculative_tokens=0))
    running(scheduler, make_seq([1, 2, 3, 1, 2, 3], temperature=0.0))
    assert not scheduler.schedule().scheduled[0].draft


def test_draft_rows_attend_each_to_its_own_prefix():
    """Sequence 0 decodes with two draft tokens after its new one, sequence 1 plainly: for the
    fused kernel the draft rows are three query rows of sequence 0, the newest of its context."""
    tables = [[3, 7], [5]]
    positions, meta = build_paged_metadata(tables, [5, 2], [3, 1], block_size=4)
    assert positions.tolist() == [5, 6, 7, 2]
    assert meta.paged.query_starts.tolist() == [0, 3, 4]
    assert meta.paged.context_lens.tolist() == [8, 3]
    assert meta.paged.block_tables.tolist() == [[3, 7], [5, 0]]
    assert meta.slot_mapping.tolist() == [7 * 4 + 1, 7 * 4 + 2, 7 * 4 + 3, 5 * 4 + 2]
    with pytest.raises(ValueError, match="must precede"):  # the rectangles cannot read a draft
        build_rectangle_metadata(tables, [5, 2], [3, 1], block_size=4)


@pytest.mark.parametrize("stop", [[], ["bird", "Output"]])
def test_real_model_gives_the_same_tokens_with_and_without_drafts(default_model_dir, stop):
    """Greedy decoding with drafts verified (most are accepted: these answers copy their
    prompts) yields exactly the tokens of plain decoding, stop strings and max_tokens included."""
    from engine import LLMEngine, SamplingParams
    from engine.config import EngineConfig

    prompts = [
        "Copy this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank.",
        "Fix the typo and write the sentence again: The cat sat on teh mat and looked at the bird in the tree.",
        "def add(a, b):\n    return a + b\n\nWrite the same function again but name it plus.",
    ]
    params = SamplingParams(temperature=0.0, max_tokens=60, stop=stop)
    results = {}
    for k in (0, 4):
        engine = LLMEngine(EngineConfig(model=str(default_model_dir), scheduler=SchedulerConfig(speculative_tokens=k, speculative_max_seqs=3)))
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), engine.tokenizer.encode_chat([{"role": "user", "content": prompt}]), params)
        outputs = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                done = outputs.setdefault(out.request_id, {"ids": [], "text": ""})
                done["ids"] += out.outputs[0].token_ids
                done["text"] += out.outputs[0].text
                done["finish"] = out.outputs[0].finish_reason
        results[k] = outputs
        if k:
            assert engine.speculator.num_accepted_tokens > 0
        assert engine.block_manager.num_used_blocks == 0
    assert results[4] == results[0]
    assert all(len(o["ids"]) <= 60 for o in results[4].values())


def test_a_draft_never_takes_blocks_another_sequence_holds():
    scheduler = Scheduler(SchedulerConfig(speculative_tokens=4), make_block_manager(num_blocks=5, block_size=4), 1 << 20)
    seq = make_seq([1, 2, 3, 1, 2, 3, 1, 2], temperature=0.0)  # two full blocks
    other = make_seq([9, 8, 7, 6], temperature=0.0)
    for s in (seq, other):
        scheduler.add(s)
    scheduler.schedule()
    for s in (seq, other):
        s.num_computed_tokens = len(s.token_ids) - 1
    bm = scheduler.block_manager
    bm.allocate(seq_id=999, num_tokens=bm.num_free_blocks * bm.block_size)  # a third sequence fills the pool
    out = scheduler.schedule()
    assert [(e.seq, e.draft) for e in out.scheduled] == [(seq, []), (other, [])]
    assert not out.preempted
