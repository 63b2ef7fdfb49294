"""A minimal greedy driver for a bare model: contiguous block tables, no scheduler."""

from __future__ import annotations

import torch

from engine import kernels
from engine.kv_cache import allocate_kv_cache
from engine.layers.attention import build_paged_metadata, build_rectangle_metadata


@torch.inference_mode()
def prefill_logits(model, prompts: list[list[int]], block_size: int = 16) -> list[torch.Tensor]:
    """Logits at every prompt position, all prompts in one step: [len(prompt), vocab] each."""
    cache, tables = _cache_for(model, [len(p) for p in prompts], block_size)
    build_metadata = _metadata_builder(cache)
    positions, meta = build_metadata(tables, [0] * len(prompts), [len(p) for p in prompts], block_size)
    input_ids = torch.tensor([t for p in prompts for t in p])
    logits = model.compute_logits(model(input_ids, positions, cache, meta))
    return list(logits.split([len(p) for p in prompts]))


@torch.inference_mode()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, block_size: int = 16) -> list[list[int]]:
    """Prefill all prompts in one step, then decode them together."""
    lengths = [len(p) for p in prompts]
    cache, tables = _cache_for(model, [n + max_new_tokens for n in lengths], block_size)
    build_metadata = _metadata_builder(cache)
    positions, meta = build_metadata(tables, [0] * len(prompts), lengths, block_size)
    hidden = model(torch.tensor([t for p in prompts for t in p]), positions, cache, meta)
    last_rows = torch.tensor(lengths).cumsum(0) - 1
    next_ids = model.compute_logits(hidden[last_rows]).argmax(-1)
    outputs = [[int(t)] for t in next_ids]
    computed = list(lengths)
    for _ in range(max_new_tokens - 1):
        positions, meta = build_metadata(tables, computed, [1] * len(prompts), block_size)
        next_ids = model.compute_logits(model(next_ids, positions, cache, meta)).argmax(-1)
        computed = [n + 1 for n in computed]
        for out, t in zip(outputs, next_ids):
            out.append(int(t))
    return outputs


def _metadata_builder(cache):
    """The builder the runner would use for this cache: the fused kernel's where it runs."""
    return build_paged_metadata if kernels.use_for(cache[0][0]) is not None else build_rectangle_metadata


def _cache_for(model, max_lens: list[int], block_size: int):
    blocks_per_seq = [-(-n // block_size) for n in max_lens]
    param = next(model.parameters())
    cache = allocate_kv_cache(model.config, sum(blocks_per_seq) + 1, block_size, param.dtype, param.device)
    tables, next_block = [], 1  # block 0 is left unused, so a wrong slot would read zeros
    for n in blocks_per_seq:
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    return cache, tables
