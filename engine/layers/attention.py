"""Attention over a paged KV cache, and the metadata that describes one step's batch.

A step packs every scheduled token into one stream of `num_tokens` rows: first one token per
decoding sequence, then the prompt chunks of prefilling sequences. New keys/values are written
into the cache through `slot_mapping`; each sequence then reads its whole context back through
its block table, into rectangles of sequences of similar length.

Prefill chunks that continue a cached prefix are left-padded, so every sequence's newest token
sits in the last column and the causal mask is one diagonal for all rows:

    kv_len = 5, max_kv_len = 8          columns: 0   1   2   3   4   5   6   7
    positions read                               -   -   -   0   1   2   3   4
    mask                                         0   0   0   1   1   1   1   1

On the CPU no rectangle is formed at all: the fused kernel (engine/kernels) reads every
sequence's keys and values straight from its blocks, decodes, draft rows and prompt chunks
alike, and computes each row the same way whatever else is in the step. Elsewhere, decode
rectangles are right-padded instead, to a width rounded up to DECODE_WIDTH_MULTIPLE, which
keeps each row's arithmetic identical to a batch of one:

    kv_len = 5, width 16                columns: 0   1   2   3   4   5 ... 15
    positions read                               0   1   2   3   4   -     -
    mask                                         1   1   1   1   1   0     0

A whole prompt with nothing cached attends to its own keys with a causal kernel, no rectangle.
A slot is `block_id * block_size + offset`: position p of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import kernels
from engine.layers.rotary import RotaryInputs, apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]  # K and V, [num_blocks, block_size, num_kv_heads, head_dim]


# Splitting a decode rectangle in two costs a group's fixed overhead (a gather and an attention
# call per layer, ~40 us); it pays when it saves more padded key slots (~90 ns each) than that.
DECODE_GROUP_COST = 512
# Decode rectangles put each context first (right padding) and round their width up to this
# multiple: then the CPU attention kernel reduces every row exactly as it would alone, so a
# greedy sequence's tokens do not depend on what else is in the batch.
DECODE_WIDTH_MULTIPLE = 16


@dataclass(slots=True)
class AttentionGroup:
    """Sequences read as one left-padded rectangle: rows [start, end) of the step's tokens.

    A whole prompt with nothing cached (`kv_slots` None) attends to its own new keys with a
    plain causal mask instead: no gather, and the kernel skips the masked half.
    """

    start: int
    end: int
    max_query_len: int  # 1 for a group of decodes
    query_rows: torch.Tensor | None  # [end - start] row of each token in [num_seqs * max_query_len]
    kv_slots: torch.Tensor | None  # [num_seqs, max_kv_len]
    mask: torch.Tensor | None  # [num_seqs, 1, max_query_len, max_kv_len] bool


@dataclass(slots=True)
class PagedBatch:
    """Every sequence of the step, read by the fused kernel straight from its blocks: no
    rectangle, no padding. Sequence i's rows are [query_starts[i], query_starts[i + 1]), the
    newest tokens of its context: a decode's one token, a decode with draft tokens after it
    (engine/speculation.py), or a prompt chunk."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64
    query_starts: torch.Tensor  # [num_seqs + 1] int64
    context_lens: torch.Tensor  # [num_seqs] int64, the new tokens included


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    groups: list[AttentionGroup]  # the rectangles, where the fused kernel does not run
    num_kv_slots_read: int  # key slots the rectangles read, padding included
    num_kv_slots_used: int  # of which real context tokens
    paged: PagedBatch | None = None  # set instead of groups where the fused kernel runs


@dataclass(slots=True)
class _TokenLayout:
    """Where each of a step's tokens sits: its sequence, position and cache slot."""

    tables: torch.Tensor  # [num_seqs, max_blocks] int64, block tables padded with block 0
    new: torch.Tensor  # [num_seqs] new tokens per sequence
    kv_lens: torch.Tensor  # [num_seqs] context lengths, the new tokens included
    token_starts: torch.Tensor  # [num_seqs] first row of each sequence's tokens
    offsets: torch.Tensor  # [num_tokens] index of each token among its sequence's new ones
    positions: torch.Tensor  # [num_tokens]
    slot_mapping: torch.Tensor  # [num_tokens]


def _token_layout(
    block_tables: list[list[int]], num_computed_tokens: list[int], num_new_tokens: list[int], block_size: int
) -> _TokenLayout:
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor(
        [t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int64
    )  # [num_seqs, max_blocks]
    computed = torch.tensor(num_computed_tokens, dtype=torch.int64)
    new = torch.tensor(num_new_tokens, dtype=torch.int64)
    seq_of_token = torch.repeat_interleave(torch.arange(len(block_tables)), new)  # [num_tokens]
    token_starts = torch.cumsum(new, 0) - new
    offsets = torch.arange(len(seq_of_token)) - token_starts[seq_of_token]
    positions = computed[seq_of_token] + offsets
    slot_mapping = _slots(tables[seq_of_token], positions, block_size)
    return _TokenLayout(tables, new, computed + new, token_starts, offsets, positions, slot_mapping)


def build_paged_metadata(
    block_tables: list[list[int]], num_computed_tokens: list[int], num_new_tokens: list[int],
    block_size: int, device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions [num_tokens] and attention metadata for one step run by the fused kernel
    (where `kernels.use_for(kv cache)` holds). The sequences come in any order, and several new
    tokens may follow a decode (a draft to verify).

    Built in plain Python, then one tensor each: the dozen small torch ops this took before cost
    0.37 ms a step in the engine loop (SmolLM2, one sequence decoding), the lists 0.07 ms."""
    max_blocks = max(len(t) for t in block_tables)
    positions: list[int] = []
    slots: list[int] = []
    query_starts = [0]
    for table, computed, new in zip(block_tables, num_computed_tokens, num_new_tokens, strict=True):
        span = range(computed, computed + new)
        positions += span
        slots += [table[p // block_size] * block_size + p % block_size for p in span]
        query_starts.append(query_starts[-1] + new)

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    paged = PagedBatch(
        tensor([t + [0] * (max_blocks - len(t)) for t in block_tables]),
        tensor(query_starts),
        tensor([c + n for c, n in zip(num_computed_tokens, num_new_tokens)]),
    )
    total = sum(num_computed_tokens) + sum(num_new_tokens)
    return tensor(positions), AttentionMetadata(tensor(slots), [], total, total, paged)


def build_rectangle_metadata(
    block_tables: list[list[int]], num_computed_tokens: list[int], num_new_tokens: list[int],
    block_size: int, device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions [num_tokens] and attention metadata for one step read as rectangles (eager
    torch, other devices). Decoding sequences (one new token) must come before prefilling
    ones; consecutive sequences of one kind share a rectangle until padding would cost more
    than a new one, so ordering each kind by context length (longest first) keeps padding low.
    """
    num_seqs = len(block_tables)
    num_decodes = 0
    while num_decodes < num_seqs and num_new_tokens[num_decodes] == 1:
        num_decodes += 1
    if any(n == 1 for n in num_new_tokens[num_decodes:]):
        raise ValueError("decoding sequences must precede prefilling ones")
    layout = _token_layout(block_tables, num_computed_tokens, num_new_tokens, block_size)
    starts = layout.token_starts.tolist()
    groups, num_read = [], 0
    for first, last in _split(num_computed_tokens, num_new_tokens, num_decodes):
        group_new = layout.new[first:last]
        start = starts[first]
        end = start + int(group_new.sum())
        if first >= num_decodes and num_computed_tokens[first] == 0:  # a fresh prompt, alone
            groups.append(AttentionGroup(start, end, end - start, None, None, None))
            num_read += end - start
            continue
        is_decode = first < num_decodes
        kv_slots, valid = _context_slots(
            layout.tables[first:last], layout.kv_lens[first:last], block_size, left_padded=not is_decode
        )
        num_read += kv_slots.numel()
        if is_decode:
            group = AttentionGroup(start, end, 1, None, kv_slots, valid[:, None, None, :])
        else:
            group = _prefill_group(start, end, group_new, layout.offsets[start:end], kv_slots, valid)
        groups.append(group)

    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    for group in groups:
        group.query_rows, group.kv_slots, group.mask = (
            to(group.query_rows), to(group.kv_slots), to(group.mask)
        )
    num_used = sum(num_computed_tokens) + sum(num_new_tokens)
    meta = AttentionMetadata(to(layout.slot_mapping), groups, num_read, num_used)
    return layout.positions.to(device), meta


def _split(num_computed: list[int], num_new: list[int], num_decodes: int) -> list[tuple[int, int]]:
    """[first, last) sequence ranges, each read as one rectangle (or one fresh prompt).

    Decodes, ordered longest first, share a rectangle until the context length halves and the
    padding the rest would carry outweighs a group's fixed cost, so there are at most ~log2 of
    them. A prompt with nothing cached is a range of its own; chunks continuing a cached prefix
    share one rectangle.
    """
    ranges = []
    first, max_kv = 0, 0
    for i in range(num_decodes):
        kv_len = num_computed[i] + 1
        if i > first and 2 * kv_len < max_kv and (max_kv - kv_len) * (num_decodes - i) > DECODE_GROUP_COST:
            ranges.append((first, i))
            first, max_kv = i, 0
        max_kv = max(max_kv, kv_len)
    if num_decodes:
        ranges.append((first, num_decodes))
    chunks = [i for i in range(num_decodes, len(num_new)) if num_computed[i]]
    ranges += [(i, i + 1) for i in range(num_decodes, len(num_new)) if not num_computed[i]]
    ranges += _contiguous_runs(chunks)
    return sorted(ranges)


def _contiguous_runs(indices: list[int]) -> list[tuple[int, int]]:
    runs = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _prefill_group(
    start: int, end: int, new: torch.Tensor, offsets: torch.Tensor, kv_slots: torch.Tensor, valid: torch.Tensor
) -> AttentionGroup:
    """Prompt chunks left-padded to max_query_len rows, each row seeing its causal past."""
    num_seqs, max_kv_len = kv_slots.shape
    max_query_len = int(new.max())
    seq = torch.repeat_interleave(torch.arange(num_seqs), new)  # [end - start]
    query_rows = seq * max_query_len + (max_query_len - new[seq]) + offsets
    rows = torch.arange(max_query_len)[:, None]  # [max_query_len, 1]
    cols = torch.arange(max_kv_len)[None, :]  # [1, max_kv_len]
    # Row r holds the token at column r + (max_kv_len - max_query_len): see it and all before.
    causal = cols <= rows + (max_kv_len - max_query_len)  # [max_query_len, max_kv_len]
    mask = valid[:, None, :] & causal[None]  # [num_seqs, max_query_len, max_kv_len]
    # Padding rows see only the newest key, so no softmax row is empty (their output is dropped).
    pad_rows = rows[None] < (max_query_len - new)[:, None, None]  # [num_seqs, max_query_len, 1]
    mask = torch.where(pad_rows, cols[None] == max_kv_len - 1, mask)
    return AttentionGroup(start, end, max_query_len, query_rows, kv_slots, mask[:, None])


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of `positions` given each row's block table (same leading shape)."""
    blocks = tables.gather(-1, (positions // block_size).unsqueeze(-1)).squeeze(-1)
    return blocks * block_size + positions % block_size


def _context_slots(
    tables: torch.Tensor, kv_lens: torch.Tensor, block_size: int, left_padded: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of every sequence's whole context and their validity, [num_seqs, max_kv_len]."""
    max_kv_len = int(kv_lens.max())
    if not left_padded:
        max_kv_len = -(-max_kv_len // DECODE_WIDTH_MULTIPLE) * DECODE_WIDTH_MULTIPLE
    columns = torch.arange(max_kv_len)[None, :]  # [1, max_kv_len]
    if left_padded:
        positions = kv_lens[:, None] - max_kv_len + columns
        valid = positions >= 0
        positions = positions.clamp(min=0)
    else:
        valid = columns < kv_lens[:, None]
        positions = columns.minimum(kv_lens[:, None] - 1)  # padding re-reads the last token
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


def _fresh_prompt_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: AttentionGroup, scale: float
) -> torch.Tensor:
    """Causal attention of one whole prompt over its own keys, [prompt_len, num_heads, head_dim]."""
    rows = slice(group.start, group.end)
    qg = q[rows].transpose(0, 1).unsqueeze(0)  # [1, num_heads, prompt_len, head_dim]
    kg = k[rows].transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, prompt_len, head_dim]
    vg = v[rows].transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def rotate_and_cache(
    qkv: torch.Tensor,
    rope: RotaryInputs,
    num_heads: int,
    num_kv_heads: int,
    kv_cache: KVCache,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q and k of the fused projection [num_tokens, (num_heads + 2 * num_kv_heads) *
    head_dim] and write k, v into the cache slots. Returns q [num_tokens, num_heads, head_dim]
    and k, v [num_tokens, num_kv_heads, head_dim]."""
    k_cache, v_cache = kv_cache
    num_tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    num_qk_heads = num_heads + num_kv_heads
    heads = qkv.view(num_tokens, num_qk_heads + num_kv_heads, head_dim)
    fused = kernels.use_for(qkv)
    if fused is not None:
        fused.rotary_and_store(
            qkv, rope.positions, rope.cos_table, rope.sin_table, num_heads, num_kv_heads,
            k_cache, v_cache, slot_mapping,
        )  # rotates q and k in place
        return heads[:, :num_heads], heads[:, num_heads:num_qk_heads], heads[:, num_qk_heads:]
    qk = apply_rotary(heads[:, :num_qk_heads], *rope.per_token())
    q, k, v = qk[:, :num_heads], qk[:, num_heads:], heads[:, num_qk_heads:]
    store_kv(k, v, kv_cache, slot_mapping)
    return q, k, v


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Write new k, v [num_tokens, num_kv_heads, head_dim] into their cache slots."""
    for new, cache in zip((k, v), kv_cache):
        cache.view(-1, *new.shape[1:]).index_copy_(0, slot_mapping, new)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attend each query to its sequence's context, the new tokens' k/v already cached.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
    Returns [num_tokens, num_heads, head_dim].
    """
    k_cache, v_cache = kv_cache
    if meta.paged is not None:
        p = meta.paged
        return kernels.ops().paged_attention(q, k_cache, v_cache, p.block_tables, p.query_starts, p.context_lens, scale)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, num_kv_heads, head_dim]
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    outputs = []
    for group in meta.groups:
        if group.kv_slots is None:
            outputs.append(_fresh_prompt_attention(q, k, v, group, scale))
            continue
        num_seqs = group.kv_slots.shape[0]
        k_rect = gather_slots(k_flat, group.kv_slots)  # [num_seqs, num_kv_heads, max_kv_len, head_dim]
        v_rect = gather_slots(v_flat, group.kv_slots)
        q_group = q[group.start : group.end]
        if group.max_query_len == 1:
            # Each query head group shares one kv head: fold the group into the query-length axis.
            qd = q_group.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
            out = F.scaled_dot_product_attention(qd, k_rect, v_rect, attn_mask=group.mask, scale=scale)
            outputs.append(out.reshape(num_seqs, num_heads, head_dim))
            continue
        max_q = group.max_query_len
        qp = q.new_zeros(num_seqs * max_q, num_heads, head_dim)
        qp.index_copy_(0, group.query_rows, q_group)
        qp = qp.view(num_seqs, max_q, num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qp, k_rect, v_rect, attn_mask=group.mask, scale=scale, enable_gqa=True
        )  # [num_seqs, num_heads, max_q, head_dim]
        out = out.transpose(1, 2).reshape(num_seqs * max_q, num_heads, head_dim)
        outputs.append(out.index_select(0, group.query_rows))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
