"""Paged attention against plain per-sequence causal attention, and its grouping of rectangles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import kernels  # noqa: F401  (read by the skip condition below)
from engine.layers.attention import build_paged_metadata, build_rectangle_metadata, paged_attention, store_kv

BLOCK = 4
HEADS, KV_HEADS, DIM = 4, 2, 8


def reference(q_all, k_all, v_all, scale):
    """Causal attention of one sequence's last len(q_all) tokens over all its tokens."""
    num_new = q_all.shape[0]
    k = k_all.repeat_interleave(HEADS // KV_HEADS, 1).transpose(0, 1)  # [heads, kv_len, dim]
    v = v_all.repeat_interleave(HEADS // KV_HEADS, 1).transpose(0, 1)
    kv_len = k.shape[1]
    mask = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - num_new, kv_len)[:, None]
    out = F.scaled_dot_product_attention(q_all.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


# The fused kernel reads every sequence straight from its blocks; without it they share rectangles.
PATHS = [
    False,
    pytest.param(True, marks=[  # a condition string is evaluated when the test runs: no build at collection
        pytest.mark.slow, pytest.mark.skipif("not kernels.available_on(torch.device('cpu'))", reason="no fused kernels"),
    ]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", PATHS)
def test_mixed_step_matches_per_sequence_attention(fused, dtype):
    torch.manual_seed(0)
    # (tokens already cached, new tokens): decodes of very different lengths, then prefills
    # (a chunk continuing a cached prefix, and a fresh prompt).
    seqs = [(300, 1), (3, 1), (2, 1), (5, 3), (0, 9)]
    tables, next_block = [], 0
    for cached, new in seqs:
        n = -(-(cached + new) // BLOCK)
        tables.append(list(range(next_block + n - 1, next_block - 1, -1)))  # scattered order
        next_block += n
    k_cache = torch.zeros(next_block, BLOCK, KV_HEADS, DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    full_k = [torch.randn(c + n, KV_HEADS, DIM, dtype=dtype) for c, n in seqs]
    full_v = [torch.randn(c + n, KV_HEADS, DIM, dtype=dtype) for c, n in seqs]
    for (cached, _), table, k, v in zip(seqs, tables, full_k, full_v):  # the cached prefixes
        for pos in range(cached):
            k_cache[table[pos // BLOCK], pos % BLOCK] = k[pos]
            v_cache[table[pos // BLOCK], pos % BLOCK] = v[pos]
    build_metadata = build_paged_metadata if fused else build_rectangle_metadata
    positions, meta = build_metadata(tables, [c for c, _ in seqs], [n for _, n in seqs], BLOCK)
    q = torch.randn(sum(n for _, n in seqs), HEADS, DIM, dtype=dtype)
    new_k = torch.cat([k[c:] for (c, _), k in zip(seqs, full_k)])
    new_v = torch.cat([v[c:] for (c, _), v in zip(seqs, full_v)])
    store_kv(new_k, new_v, (k_cache, v_cache), meta.slot_mapping)
    out = paged_attention(q, new_k, new_v, (k_cache, v_cache), meta, scale=0.3)
    row = 0
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for (cached, new), k, v in zip(seqs, full_k, full_v):
        want = reference(q[row : row + new].float(), k.float(), v.float(), 0.3)
        torch.testing.assert_close(out[row : row + new].float(), want, atol=tolerance, rtol=tolerance)
        assert positions[row : row + new].tolist() == list(range(cached, cached + new))
        row += new
    assert meta.num_kv_slots_used == sum(c + n for c, n in seqs)
    if fused:  # one kernel call, no padding
        assert meta.groups == [] and meta.paged.query_starts.tolist() == [0, 1, 2, 3, 6, 15]
        assert meta.num_kv_slots_read == meta.num_kv_slots_used
    else:  # the 301-token decode apart from the short ones, right-padded; 2 prefills
        assert meta.paged is None and len(meta.groups) == 4
        assert meta.groups[-1].kv_slots is None  # the fresh prompt reads its own new keys
        assert meta.num_kv_slots_read == 304 + 2 * 16 + 8 + 9


def test_similar_lengths_share_one_rectangle():
    tables = [[i] * 10 for i in range(6)]
    _, meta = build_rectangle_metadata(tables, [30, 29, 28, 27, 26, 25], [1] * 6, BLOCK)
    assert len(meta.groups) == 1
    assert meta.groups[0].kv_slots.shape == (6, 32)  # right-padded to a multiple of 16
