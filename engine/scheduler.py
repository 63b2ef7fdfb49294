"""Which sequences run in the next step: FCFS admission under a token budget and a bound on prompt
attention, with preemption."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import FinishReason, RequestStatus, Sequence
from engine.speculation import Speculator


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes, from seq.num_computed_tokens on
    draft: list[int] = field(default_factory=list)  # guessed next tokens, verified in this step


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]  # one-token entries first, then prefill chunks; longest first
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # outgrew the whole KV pool

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Keeps `waiting` (FCFS, preempted sequences at the front) and `running` (admission order).

    Every step schedules each running sequence's next token (or its next prefill chunk), then
    admits waiting sequences while the token budget, `max_num_seqs` and free blocks allow. When
    blocks run out, the most recently admitted running sequence is preempted: its blocks are
    freed and it is recomputed from its tokens when readmitted, so the oldest always progress.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        speculative_tokens: int | None = None,
    ) -> None:
        """`speculative_tokens`: draft tokens per sequence and step, None for the config's (the
        engine passes 0 where drafts cannot be verified)."""
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        if speculative_tokens is None:
            speculative_tokens = config.speculative_tokens
        self.speculator = Speculator(speculative_tokens, config.speculative_max_seqs, max_model_len)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Prefix caching: tokens of admitted sequences looked up, and of them found cached.
        self.num_prefix_queried_tokens = 0
        self.num_prefix_hit_tokens = 0
        # Blocks kept free when admitting, so admission does not force an immediate preemption.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)
        self._attention_left: int | None = None  # of max_prefill_attention, in this schedule()

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose cache is already filled (a fork of a running one)."""
        seq.status = RequestStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq.seq_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(scheduled=[])
        self._attention_left = self.config.max_prefill_attention
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        self._admit_waiting(out, budget)
        # Decodes, then chunks continuing a cached prefix, then fresh prompts; each longest
        # context first, so attention reads neighbours of similar length as one rectangle
        # (see engine/layers/attention.py).
        out.scheduled.sort(
            key=lambda s: (
                s.num_new_tokens != 1,
                s.seq.num_computed_tokens == 0,
                -(s.seq.num_computed_tokens + s.num_new_tokens),
            )
        )
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Schedule each running sequence's next token (with a draft where speculation is on) or
        next prompt chunk, preempting the newest when blocks run out. Returns the budget left."""
        bm = self.block_manager
        speculate = self.speculator.is_active(len(self.running))
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._chunk(seq.num_computed_tokens, seq.num_uncomputed_tokens, budget)
            if num_new == 0:  # a prompt chunk with no attention left this step: the next one
                i += 1
                continue
            num_tokens = seq.num_computed_tokens + num_new
            draft = self.speculator.propose(seq, budget - 1) if speculate and num_new == 1 else []
            if draft and bm.can_allocate(seq.seq_id, num_tokens + len(draft)):  # never preempts for it
                num_tokens += len(draft)
            else:
                draft = []
            if bm.blocks_for(num_tokens) > bm.num_blocks:
                seq.finish(FinishReason.LENGTH)
                self.remove(seq)
                out.finished.append(seq)
                continue
            while not bm.can_allocate(seq.seq_id, num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status == RequestStatus.WAITING:  # preempted itself
                break
            bm.allocate(seq.seq_id, num_tokens)
            out.scheduled.append(ScheduledSequence(seq, num_new, draft))
            budget -= num_new + len(draft)
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting sequences, FCFS, while the budget, max_num_seqs and free blocks allow,
        each starting after the whole blocks of its prompt that the prefix cache holds."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]  # holds no blocks yet
            # A prompt to score needs its logits at every position: nothing comes from the cache.
            scores_prompt = seq.request.params.prompt_logprobs is not None
            cached = [] if scores_prompt else bm.match_prefix(seq.token_ids)
            num_cached = len(cached) * bm.block_size
            num_new = self._chunk(num_cached, len(seq.token_ids) - num_cached, budget)
            if num_new == 0:
                break
            num_tokens = num_cached + num_new
            reserve = self.watermark_blocks if self.running else 0
            # Adopting a cached block that no table holds takes it out of the free pool too.
            needed = bm.blocks_for(num_tokens) - len(cached) + bm.num_evictable(cached)
            if needed + reserve > bm.num_free_blocks:
                break
            self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            bm.adopt(seq.seq_id, cached)
            bm.allocate(seq.seq_id, num_tokens)
            seq.num_computed_tokens = num_cached
            self.num_prefix_queried_tokens += len(seq.token_ids)
            self.num_prefix_hit_tokens += num_cached
            if seq.request.num_cached_tokens is None:
                seq.request.num_cached_tokens = min(num_cached, seq.request.num_prompt_tokens)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

    def _chunk(self, num_computed: int, num_uncomputed: int, budget: int) -> int:
        """Tokens to compute for a sequence this step: all it has, within the token budget and,
        for a prompt chunk, the attention left (the first chunk of a step gets at least one
        token, so every prompt advances). Takes the chunk's attention from what is left."""
        num_new = min(num_uncomputed, budget)
        left = self._attention_left
        if num_new <= 1 or left is None:
            return num_new
        # The largest c with c * (p + c) <= left.
        p = num_computed
        fits = (math.isqrt(p * p + 4 * left) - p) // 2
        if left == self.config.max_prefill_attention:
            fits = max(fits, 1)
        num_new = min(num_new, fits)
        self._attention_left = max(0, left - num_new * (p + num_new))
        return num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.status = RequestStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
