"""The one bridge from scheduler decisions to tensors: builds a step's inputs, runs the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine import kernels
from engine.block_manager import BlockManager
from engine.layers.attention import KVCache, build_paged_metadata, build_rectangle_metadata
from engine.scheduler import ScheduledSequence


@dataclass(slots=True)
class ModelRunnerOutput:
    """One step's logits for the entries that sample a token.

    `sampled` lists, in step order, the indices (into the scheduled entries) of those whose
    known tokens are now all computed. Each owns 1 + len(entry.draft) consecutive rows of
    `logits`: its new token's, then one per draft token (engine/speculation.py).
    """

    logits: torch.Tensor  # float32 [num_rows, vocab_size]
    sampled: list[int]
    prompt_logits: list[PromptLogits] = field(default_factory=list)


@dataclass(slots=True)
class PromptLogits:
    """The logits that score prompt tokens [first_token, first_token + len(logits)) of the
    request of scheduled entry `entry` (prompt_logprobs): row j predicts token first_token + j."""

    entry: int
    first_token: int
    logits: torch.Tensor  # float32 [num_tokens, vocab_size]


class ModelRunner:
    def __init__(
        self, model: nn.Module, kv_caches: list[KVCache], block_manager: BlockManager, device: torch.device
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_manager = block_manager
        self.device = device
        self.fused_attention = kernels.use_for(kv_caches[0][0]) is not None  # reads the blocks directly
        self.build_metadata = build_paged_metadata if self.fused_attention else build_rectangle_metadata
        # Rectangular-batch accounting for the benchmarks: key slots read vs. real context tokens.
        self.num_kv_slots_read = 0
        self.num_kv_slots_used = 0

    def execute(self, scheduled: list[ScheduledSequence]) -> ModelRunnerOutput:
        """Run one step: each entry's new tokens, then its draft tokens, are rows of the input."""
        input_ids: list[int] = []
        tables, computed, new = [], [], []
        sample_rows, sampled = [], []
        prompt_rows, prompt_spans = [], []  # prompt_logprobs: rows, and (entry, first token, count)
        row = -1
        for i, entry in enumerate(scheduled):
            seq, n, draft = entry.seq, entry.num_new_tokens, entry.draft
            start = seq.num_computed_tokens
            if seq.request.params.prompt_logprobs is not None and seq.index == 0:
                # The row at position p predicts token p + 1; the last prompt position's row
                # predicts the first generated token and is sampled instead.
                end = min(start + n, seq.num_prompt_tokens - 1)
                if end > start:
                    prompt_rows += range(row + 1, row + 1 + end - start)
                    prompt_spans.append((i, start + 1, end - start))
            input_ids += seq.token_ids[start : start + n] + draft
            tables.append(self.block_manager.block_tables[seq.seq_id])
            computed.append(start)
            new.append(n + len(draft))
            row += n + len(draft)
            if start + n == len(seq.token_ids):
                sample_rows += range(row - len(draft), row + 1)
                sampled.append(i)
        positions, meta = self.build_metadata(tables, computed, new, self.block_manager.block_size, self.device)
        self.num_kv_slots_read += meta.num_kv_slots_read
        self.num_kv_slots_used += meta.num_kv_slots_used
        ids = torch.tensor(input_ids, device=self.device)
        hidden = self.model(ids, positions, self.kv_caches, meta)  # [num_tokens, hidden_size]
        prompt_logits = []
        if prompt_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(prompt_rows, device=self.device)]).cpu()
            chunks = logits.split([count for _, _, count in prompt_spans])
            prompt_logits = [PromptLogits(i, first, chunk) for (i, first, _), chunk in zip(prompt_spans, chunks)]
        if not sample_rows:
            return ModelRunnerOutput(hidden.new_empty(0, 0, dtype=torch.float32), [], prompt_logits)
        rows = torch.tensor(sample_rows, device=self.device)
        return ModelRunnerOutput(self.model.compute_logits(hidden[rows]).cpu(), sampled, prompt_logits)

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks, (source, destination) pairs, in every layer."""
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]
