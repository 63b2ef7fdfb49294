"""The one bridge from scheduler decisions to tensors: builds a step's inputs, runs the model."""

from __future__ import annotations

import torch
from torch import nn

from engine import kernels
from engine.block_manager import BlockManager
from engine.layers.attention import KVCache, build_attention_metadata
from engine.scheduler import ScheduledSequence


class ModelRunner:
    def __init__(
        self, model: nn.Module, kv_caches: list[KVCache], block_manager: BlockManager, device: torch.device
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_manager = block_manager
        self.device = device
        self.fused_attention = kernels.use_for(kv_caches[0][0]) is not None  # reads the blocks directly
        # Rectangular-batch accounting for the benchmarks: key slots read vs. real context tokens.
        self.num_kv_slots_read = 0
        self.num_kv_slots_used = 0

    def execute(self, scheduled: list[ScheduledSequence]) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns float32 logits [num_sampled, vocab] and the indices (into
        `scheduled`) of the entries they belong to: those whose known tokens are now all computed.
        An entry with a draft has a row for its new token and one for each draft token after it."""
        input_ids: list[int] = []
        tables, computed, new = [], [], []
        sample_rows, sampled = [], []
        row = -1
        for i, entry in enumerate(scheduled):
            seq, n, draft = entry.seq, entry.num_new_tokens, entry.draft
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + n] + draft
            tables.append(self.block_manager.block_tables[seq.seq_id])
            computed.append(start)
            new.append(n + len(draft))
            row += n + len(draft)
            if start + n == len(seq.token_ids):
                sample_rows += range(row - len(draft), row + 1)
                sampled.append(i)
        positions, meta = build_attention_metadata(
            tables, computed, new, self.block_manager.block_size, self.device, self.fused_attention
        )
        self.num_kv_slots_read += meta.num_kv_slots_read
        self.num_kv_slots_used += meta.num_kv_slots_used
        ids = torch.tensor(input_ids, device=self.device)
        hidden = self.model(ids, positions, self.kv_caches, meta)  # [num_tokens, hidden_size]
        if not sample_rows:
            return hidden.new_empty(0, 0, dtype=torch.float32), []
        rows = torch.tensor(sample_rows, device=self.device)
        return self.model.compute_logits(hidden[rows]).cpu(), sampled

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks, (source, destination) pairs, in every layer."""
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]
