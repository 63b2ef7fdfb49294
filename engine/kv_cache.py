"""The preallocated paged K/V pool: one K and one V tensor per layer."""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.layers.attention import KVCache


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[KVCache]:
    """Per layer (K, V), each [num_blocks, block_size, num_kv_heads, head_dim], zero-filled."""
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_hidden_layers)
    ]


def num_kv_blocks(config: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    """How many blocks fit in `memory_bytes` across all layers."""
    bytes_per_block = block_size * config.kv_bytes_per_token(dtype.itemsize)
    return memory_bytes // bytes_per_block
