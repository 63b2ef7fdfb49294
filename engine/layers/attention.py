"""Attention over a paged KV cache, and the metadata that describes one step's batch.

A step packs every scheduled token into one stream of `num_tokens` rows: first one token per
decoding sequence, then the prompt chunks of prefilling sequences. New keys/values are written
into the cache through `slot_mapping`; each sequence then reads its whole context back through
its block table. Reads form rectangular batches, left-padded so that every sequence's newest
token sits in the last column:

    kv_len = 5, max_kv_len = 8          columns: 0   1   2   3   4   5   6   7
    positions read                               -   -   -   0   1   2   3   4
    mask                                         0   0   0   1   1   1   1   1

A slot is `block_id * block_size + offset`: position p of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KVCache = tuple[torch.Tensor, torch.Tensor]  # K and V, [num_blocks, block_size, num_kv_heads, head_dim]


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_decode_tokens: int  # the first rows of the step, one per decoding sequence
    decode_kv_slots: torch.Tensor | None  # [num_decodes, max_kv_len]
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_kv_len] bool
    prefill_query_rows: torch.Tensor | None  # [num_prefill_tokens] row in [num_prefills * max_query_len]
    prefill_max_query_len: int
    prefill_kv_slots: torch.Tensor | None  # [num_prefills, max_kv_len]
    prefill_mask: torch.Tensor | None  # [num_prefills, 1, max_query_len, max_kv_len] bool


def build_attention_metadata(
    block_tables: list[list[int]],
    num_computed_tokens: list[int],
    num_new_tokens: list[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions [num_tokens] and attention metadata for one step.

    Sequences with one new token (decodes) must come before those with several (prefills).
    """
    num_seqs = len(block_tables)
    num_decodes = 0
    while num_decodes < num_seqs and num_new_tokens[num_decodes] == 1:
        num_decodes += 1
    if any(n == 1 for n in num_new_tokens[num_decodes:]):
        raise ValueError("decoding sequences must precede prefilling ones")

    max_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor(
        [t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int64
    )  # [num_seqs, max_blocks]
    computed = torch.tensor(num_computed_tokens, dtype=torch.int64)
    new = torch.tensor(num_new_tokens, dtype=torch.int64)
    kv_lens = computed + new

    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), new)  # [num_tokens]
    token_starts = torch.cumsum(new, 0) - new
    offsets = torch.arange(len(seq_of_token)) - token_starts[seq_of_token]
    positions = computed[seq_of_token] + offsets
    slot_mapping = _slots(tables[seq_of_token], positions, block_size)

    decode_kv_slots = decode_mask = None
    if num_decodes:
        decode_kv_slots, valid = _context_slots(
            tables[:num_decodes], kv_lens[:num_decodes], block_size
        )
        decode_mask = valid[:, None, None, :]

    query_rows = prefill_kv_slots = prefill_mask = None
    max_query_len = 0
    if num_decodes < num_seqs:
        p_new = new[num_decodes:]
        max_query_len = int(p_new.max())
        p_seq = seq_of_token[seq_of_token >= num_decodes] - num_decodes
        p_offsets = offsets[seq_of_token >= num_decodes]
        # Left-pad each prompt chunk to max_query_len rows.
        query_rows = p_seq * max_query_len + (max_query_len - p_new[p_seq]) + p_offsets
        prefill_kv_slots, valid = _context_slots(
            tables[num_decodes:], kv_lens[num_decodes:], block_size
        )
        max_kv_len = prefill_kv_slots.shape[1]
        rows = torch.arange(max_query_len)[:, None]  # [max_query_len, 1]
        cols = torch.arange(max_kv_len)[None, :]  # [1, max_kv_len]
        # Row r holds the token at column r + (max_kv_len - max_query_len): see it and all before.
        causal = cols <= rows + (max_kv_len - max_query_len)  # [max_query_len, max_kv_len]
        mask = valid[:, None, :] & causal[None]  # [num_prefills, max_query_len, max_kv_len]
        # Padding rows see only the newest key, so no softmax row is empty (their output is dropped).
        pad_rows = rows[None] < (max_query_len - p_new)[:, None, None]  # [num_prefills, max_query_len, 1]
        mask = torch.where(pad_rows, cols[None] == max_kv_len - 1, mask)
        prefill_mask = mask[:, None]

    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    meta = AttentionMetadata(
        slot_mapping=to(slot_mapping),
        num_decode_tokens=num_decodes,
        decode_kv_slots=to(decode_kv_slots),
        decode_mask=to(decode_mask),
        prefill_query_rows=to(query_rows),
        prefill_max_query_len=max_query_len,
        prefill_kv_slots=to(prefill_kv_slots),
        prefill_mask=to(prefill_mask),
    )
    return positions.to(device), meta


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of `positions` given each row's block table (same leading shape)."""
    blocks = tables.gather(-1, (positions // block_size).unsqueeze(-1)).squeeze(-1)
    return blocks * block_size + positions % block_size


def _context_slots(
    tables: torch.Tensor, kv_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded slots of every sequence's whole context and their validity, [num_seqs, max_kv_len]."""
    max_kv_len = int(kv_lens.max())
    positions = kv_lens[:, None] - max_kv_len + torch.arange(max_kv_len)[None, :]
    valid = positions >= 0
    positions = positions.clamp(min=0)
    # Position p of row i is in block tables[i, p // block_size].
    blocks = tables.gather(1, positions // block_size)
    return blocks * block_size + positions % block_size, valid


def gather_slots(flat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows `slots` [num_seqs, max_kv_len] of a [num_slots, num_kv_heads, head_dim] cache, as
    [num_seqs, num_kv_heads, max_kv_len, head_dim] (a transposed view)."""
    num_slots, num_kv_heads, head_dim = flat.shape
    rows = flat.view(num_slots, -1)
    # NOTE: index_select copies whole rows fastest as 8-byte words (bf16 indexing is ~5x slower).
    if rows.shape[1] * rows.element_size() % 8 == 0:
        rows = rows.view(torch.int64)
    picked = rows.index_select(0, slots.view(-1)).view(flat.dtype)
    return picked.view(*slots.shape, num_kv_heads, head_dim).transpose(1, 2)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store k/v for the new tokens, then attend each query to its sequence's context.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
    Returns [num_tokens, num_heads, head_dim].
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_cache, v_cache = kv_cache
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, num_kv_heads, head_dim]
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    k_flat.index_copy_(0, meta.slot_mapping, k)
    v_flat.index_copy_(0, meta.slot_mapping, v)

    outputs = []
    num_decodes = meta.num_decode_tokens
    if num_decodes:
        # Each query head group shares one kv head: fold the group into the query-length axis.
        group = num_heads // num_kv_heads
        qd = q[:num_decodes].reshape(num_decodes, num_kv_heads, group, head_dim)
        kd = gather_slots(k_flat, meta.decode_kv_slots)  # [num_decodes, num_kv_heads, max_kv_len, head_dim]
        vd = gather_slots(v_flat, meta.decode_kv_slots)
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        outputs.append(out.reshape(num_decodes, num_heads, head_dim))
    if num_decodes < num_tokens:
        num_prefills, max_q = meta.prefill_kv_slots.shape[0], meta.prefill_max_query_len
        qp = q.new_zeros(num_prefills * max_q, num_heads, head_dim)
        qp.index_copy_(0, meta.prefill_query_rows, q[num_decodes:])
        qp = qp.view(num_prefills, max_q, num_heads, head_dim).transpose(1, 2)
        kp = gather_slots(k_flat, meta.prefill_kv_slots)  # [num_prefills, num_kv_heads, max_kv_len, head_dim]
        vp = gather_slots(v_flat, meta.prefill_kv_slots)
        out = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=meta.prefill_mask, scale=scale, enable_gqa=True
        )  # [num_prefills, num_heads, max_q, head_dim]
        out = out.transpose(1, 2).reshape(num_prefills * max_q, num_heads, head_dim)
        outputs.append(out.index_select(0, meta.prefill_query_rows))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
