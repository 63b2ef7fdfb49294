"""engine.scheduler: FCFS admission, token budget, chunked prefill, preemption, no starvation, no leaks."""

from __future__ import annotations

from engine.request import FinishReason, RequestStatus, Sequence
from engine.scheduler import Scheduler, SchedulerOutput
from tests.engine.factories import make_scheduler, make_seq

NEXT_TOKEN = 7


def entries(out: SchedulerOutput) -> list[tuple[Sequence, int]]:
    return [(e.seq, e.num_new_tokens) for e in out.scheduled]


def advance(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """What the engine does after a step: count computed tokens, sample, finish at max_tokens."""
    for entry in out.scheduled:
        seq = entry.seq
        seq.num_computed_tokens += entry.num_new_tokens
        if seq.num_computed_tokens == len(seq.token_ids):
            seq.token_ids.append(NEXT_TOKEN)
            max_tokens = seq.request.params.max_tokens
            if max_tokens is not None and seq.num_generated_tokens >= max_tokens:
                seq.finish(FinishReason.LENGTH)
                scheduler.remove(seq)


def step(scheduler: Scheduler) -> SchedulerOutput:
    out = scheduler.schedule()
    advance(scheduler, out)
    return out


def add(scheduler: Scheduler, *num_prompt_tokens: int, **params) -> list[Sequence]:
    seqs = [make_seq(num_prompt_tokens=n, **params) for n in num_prompt_tokens]
    for seq in seqs:
        scheduler.add(seq)
    return seqs


def assert_no_leak(scheduler: Scheduler) -> None:
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert sorted(bm.free_blocks) == list(range(bm.num_blocks))
    assert bm.ref_counts == [0] * bm.num_blocks
    assert bm.block_tables == {}


def test_admits_waiting_sequences_in_arrival_order():
    s = make_scheduler(num_blocks=8, block_size=4)
    a, b, c = add(s, 3, 5, 2)
    out = s.schedule()
    # Admitted (and given blocks) in arrival order; the step lists them longest first.
    assert entries(out) == [(b, 5), (a, 3), (c, 2)]
    assert s.block_manager.block_tables == {a.seq_id: [0], b.seq_id: [1, 2], c.seq_id: [3]}
    assert s.running == [a, b, c]
    assert not s.waiting
    assert all(seq.status == RequestStatus.RUNNING for seq in (a, b, c))


def test_token_budget_caps_every_step_and_chunks_the_last_admitted():
    s = make_scheduler(max_num_batched_tokens=6)
    a, b, c = add(s, 4, 4, 4)
    first = step(s)
    assert entries(first) == [(a, 4), (b, 2)]
    assert list(s.waiting) == [c]
    second = step(s)
    assert entries(second) == [(a, 1), (b, 2), (c, 3)]
    assert second.num_batched_tokens == 6


def test_max_num_seqs_caps_running_sequences():
    s = make_scheduler(max_num_seqs=2)
    a, b, c = add(s, 2, 2, 2)
    assert entries(step(s)) == [(a, 2), (b, 2)]
    assert list(s.waiting) == [c]
    assert entries(step(s)) == [(a, 1), (b, 1)]
    s.remove(a)
    assert entries(step(s)) == [(b, 1), (c, 2)]


def test_long_prompt_is_prefilled_in_chunks_over_several_steps():
    s = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=4)
    (seq,) = add(s, 10)
    num_new, tables, num_generated = [], [], []
    for _ in range(5):
        out = step(s)
        num_new.append(out.scheduled[0].num_new_tokens)
        tables.append(list(s.block_manager.block_tables[seq.seq_id]))
        num_generated.append(seq.num_generated_tokens)
    assert num_new == [4, 4, 2, 1, 1]
    assert tables == [[0], [0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert num_generated == [0, 0, 1, 2, 3]
    assert entries(step(s)) == [(seq, 1)]
    assert s.block_manager.block_tables[seq.seq_id] == [0, 1, 2, 3]


def test_one_token_entries_come_first_in_scheduled():
    s = make_scheduler(max_num_batched_tokens=8)
    (long,) = add(s, 10)
    step(s)
    (short,) = add(s, 1)
    assert entries(step(s)) == [(short, 1), (long, 2)]


def test_decodes_precede_new_prefills():
    s = make_scheduler(num_blocks=16)
    a, b = add(s, 3, 2)
    step(s)
    (c,) = add(s, 5)
    assert entries(step(s)) == [(a, 1), (b, 1), (c, 5)]


def preempting_scheduler(**params) -> tuple[Scheduler, list[Sequence]]:
    """Three 4-token prompts fill 3 of 4 blocks; after their first step all need a second block."""
    s = make_scheduler(num_blocks=4, block_size=4)
    a, b, c = add(s, 4, 4, 4, **params)
    step(s)
    assert s.block_manager.block_tables == {a.seq_id: [0], b.seq_id: [1], c.seq_id: [2]}
    return s, [a, b, c]


def test_preemption_evicts_the_most_recently_admitted_sequence():
    s, (a, b, c) = preempting_scheduler()
    add(s, 4)
    out = step(s)
    assert entries(out) == [(a, 1), (b, 1)]
    assert out.preempted == [c]
    assert s.num_preemptions == 1
    assert s.block_manager.block_tables == {a.seq_id: [0, 3], b.seq_id: [1, 2]}
    assert not s.block_manager.free_blocks


def test_preempted_sequence_goes_to_the_front_of_waiting_with_nothing_computed():
    s, (a, b, c) = preempting_scheduler()
    (d,) = add(s, 4)
    step(s)
    assert list(s.waiting) == [c, d]
    assert s.running == [a, b]
    assert c.status == RequestStatus.WAITING
    assert c.num_computed_tokens == 0
    assert c.seq_id not in s.block_manager.block_tables


def test_preempted_sequence_is_recomputed_from_prompt_and_output():
    s, (a, b, c) = preempting_scheduler()
    step(s)
    s.remove(a)
    s.remove(b)
    assert sorted(s.block_manager.free_blocks) == [0, 1, 2, 3]
    out = step(s)
    assert entries(out) == [(c, 5)]
    assert s.block_manager.block_tables == {c.seq_id: [0, 1]}  # lowest free ids first
    assert c.num_generated_tokens == 2


def test_newest_running_sequence_preempts_itself_when_nothing_else_can_go():
    s = make_scheduler(num_blocks=3, block_size=4)
    a, b = add(s, 4, 4)
    step(s)
    out = step(s)
    assert entries(out) == [(a, 1)]
    assert out.preempted == [b]
    assert list(s.waiting) == [b]
    assert s.block_manager.block_tables == {a.seq_id: [0, 2]}
    assert sorted(s.block_manager.free_blocks) == [1]


def test_later_preemption_goes_ahead_of_earlier_one_in_waiting():
    s, (a, b, c) = preempting_scheduler()
    for _ in range(4):
        step(s)
    assert (len(a.token_ids), a.num_computed_tokens) == (9, 8)
    out = step(s)
    assert entries(out) == [(a, 1)]
    assert out.preempted == [b]
    assert list(s.waiting) == [b, c]
    assert s.num_preemptions == 2
    assert s.block_manager.block_tables == {a.seq_id: [0, 3, 1]}
    assert sorted(s.block_manager.free_blocks) == [2]


def test_oldest_sequence_progresses_every_step_under_memory_pressure():
    s = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    prompts, max_tokens = [5, 3, 7, 2, 6, 4], [12, 10, 8, 9, 7, 11]
    seqs = [add(s, p, max_tokens=m)[0] for p, m in zip(prompts, max_tokens)]
    for _ in range(300):
        unfinished = [seq for seq in seqs if not seq.is_finished]
        if not unfinished:
            break
        out = step(s)
        assert unfinished[0] in [seq for seq, _ in entries(out)]
        assert out.num_batched_tokens <= 8
        assert len(s.running) <= 4
    assert [seq.num_generated_tokens for seq in seqs] == max_tokens
    assert s.num_preemptions > 0
    assert s.num_unfinished == 0
    assert_no_leak(s)


def test_sequence_outgrowing_the_whole_pool_finishes_with_length():
    s = make_scheduler(num_blocks=2, block_size=4)
    (seq,) = add(s, 3)
    for _ in range(6):
        step(s)
    assert (len(seq.token_ids), seq.num_computed_tokens) == (9, 8)
    out = s.schedule()
    assert out.finished == [seq]
    assert out.scheduled == []
    assert seq.finish_reason == FinishReason.LENGTH
    assert seq.status == RequestStatus.FINISHED_LENGTH
    assert s.num_unfinished == 0
    assert_no_leak(s)


def test_remove_frees_blocks_of_a_running_sequence():
    s = make_scheduler(num_blocks=8, block_size=4)
    a, b, c = add(s, 3, 5, 2)
    s.schedule()
    s.remove(b)
    assert s.running == [a, c]
    assert sorted(s.block_manager.free_blocks) == [1, 2, 4, 5, 6, 7]
    assert b.seq_id not in s.block_manager.block_tables


def test_remove_drops_a_waiting_sequence():
    s = make_scheduler(max_num_seqs=1)
    a, b = add(s, 3, 3)
    s.schedule()
    s.remove(b)
    assert not s.waiting
    assert s.running == [a]
    assert s.num_unfinished == 1


def test_remove_mid_prefill_frees_the_blocks_of_the_computed_chunks():
    s = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=4)
    (seq,) = add(s, 10)
    step(s)
    step(s)
    s.remove(seq)
    assert sorted(s.block_manager.free_blocks) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert_no_leak(s)


def test_no_block_leaked_after_requests_finish_or_are_removed():
    s, (a, b, c) = preempting_scheduler(max_tokens=6)
    d, e = add(s, 9, 3, max_tokens=6)
    step(s)
    assert list(s.waiting) == [c, d, e]
    s.remove(c)
    s.remove(e)
    for _ in range(50):
        if not s.num_unfinished:
            break
        step(s)
    assert [seq.num_generated_tokens for seq in (a, b, d)] == [6, 6, 6]
    assert s.num_unfinished == 0
    assert_no_leak(s)


def cached_step(scheduler: Scheduler) -> SchedulerOutput:
    """`step`, registering full computed blocks in the prefix cache as the engine does."""
    out = scheduler.schedule()
    for entry in out.scheduled:
        seq = entry.seq
        computed = seq.num_computed_tokens + entry.num_new_tokens
        scheduler.block_manager.cache_blocks(seq.seq_id, seq.token_ids, computed)
    advance(scheduler, out)
    return out


def run_to_the_end(scheduler: Scheduler, seq: Sequence) -> None:
    scheduler.add(seq)
    while scheduler.num_unfinished:
        cached_step(scheduler)


def test_a_prompt_sharing_cached_blocks_starts_after_them():
    s = make_scheduler(num_blocks=8, block_size=4, prefix_caching=True)
    first = make_seq(range(1, 11), max_tokens=1)  # 10 tokens: blocks of 4, 4, 2
    run_to_the_end(s, first)
    second = make_seq(list(range(1, 11)) + [50, 51], max_tokens=1)
    s.add(second)
    out = s.schedule()
    # Tokens 0-7 come from the cache: only the 4 after them are computed, on a fresh block.
    assert entries(out) == [(second, 4)]
    assert second.num_computed_tokens == 8 and second.request.num_cached_tokens == 8
    assert s.block_manager.block_tables[second.seq_id][:2] == s.block_manager.match_prefix(first.token_ids)
    assert (s.num_prefix_queried_tokens, s.num_prefix_hit_tokens) == (10 + 12, 8)


def test_admission_counts_cached_free_blocks_it_takes():
    """Adopting cached blocks nobody holds uses up free blocks too: with 2 cached blocks and 2
    never-used ones free, a prompt sharing both cached blocks fits in 3 blocks, not in 5."""
    s = make_scheduler(num_blocks=4, block_size=4, prefix_caching=True)
    run_to_the_end(s, make_seq(range(1, 10), max_tokens=1))
    assert s.block_manager.num_free_blocks == 4 and len(s.block_manager.evictable) == 2
    big = make_seq(list(range(1, 9)) + list(range(20, 29)), max_tokens=1)  # 17 tokens: 5 blocks
    s.add(big)
    assert s.schedule().scheduled == []
    s.remove(big)
    fits = make_seq(list(range(1, 9)) + [20, 21, 22], max_tokens=1)  # 11 tokens: 3 blocks
    s.add(fits)
    assert entries(s.schedule()) == [(fits, 3)]
    assert s.block_manager.num_free_blocks == 1


def test_a_preempted_sequence_resumes_from_its_cached_blocks():
    s = make_scheduler(num_blocks=4, block_size=4, prefix_caching=True)
    seq = make_seq(range(1, 10), max_tokens=20)
    s.add(seq)
    cached_step(s)  # 9 prompt tokens computed, one sampled
    s._preempt(seq)
    out = cached_step(s)
    assert entries(out) == [(seq, 2)]  # the 8 tokens of its two full blocks were kept


def test_prompt_chunks_are_bounded_by_their_attention_and_decodes_run_every_step():
    """A chunk of c tokens after p computed ones attends over c * (p + c) query-key pairs: a
    long prompt is cut so each step's chunks stay within max_prefill_attention (the first
    chunk of a step gets at least one token), while the running decode is scheduled every step."""
    budget = 10_000
    s = make_scheduler(num_blocks=200, block_size=16, max_prefill_attention=budget)
    (decode,) = add(s, 4)
    step(s)  # its prompt; it decodes from here on
    (long_prompt,) = add(s, 600)
    chunks = []
    while long_prompt.num_computed_tokens < 600:
        before = long_prompt.num_computed_tokens
        out = step(s)
        assert (decode, 1) in entries(out)
        (n,) = [n for seq, n in entries(out) if seq is long_prompt]
        assert n >= 1 and n * (before + n) <= max(budget, before + 1)
        chunks.append(n)
    # 100 tokens at first (100 * 100), then shorter as the context grows.
    assert chunks[0] == 100 and chunks == sorted(chunks, reverse=True) and len(chunks) > 10


def test_prompt_chunks_share_one_steps_attention():
    s = make_scheduler(num_blocks=200, block_size=16, max_prefill_attention=10_000)
    a, b = add(s, 80, 80)
    out = s.schedule()
    # a takes 80 * 80 = 6,400 pairs; b gets the largest c with c * c <= 3,600.
    assert entries(out) == [(a, 80), (b, 60)]


def test_no_attention_bound_prefills_within_the_token_budget():
    s = make_scheduler(num_blocks=200, block_size=16, max_prefill_attention=None)
    (a,) = add(s, 600)
    assert entries(s.schedule()) == [(a, 600)]
