"""The fused CPU kernels against the eager torch code they replace."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.config import RopeConfig
from engine.layers.linear import AMX_MAX_ROWS
from engine.layers.rotary import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.slow  # real or tiny model weights, kernel builds or servers



def test_the_kernels_build_where_a_compiler_is():
    """Everything below skips without the kernels: a broken build must fail here instead."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None or not kernels.enabled():
        pytest.skip("no C++ compiler, or kernels disabled")
    assert kernels.ops() is not None, "the kernels did not build: see the warning logged by engine.kernels"
    flags = kernels._cpu_flags().split()
    if b"amx_bf16" in flags:
        assert kernels.amx_linear_fits(torch.zeros(16, 32, dtype=torch.bfloat16)), "this CPU has AMX"
    if b"avx2" in flags and b"fma" in flags:
        assert kernels.fma_linear_fits(torch.zeros(16, 32, dtype=torch.bfloat16)), "this CPU has AVX2"


DTYPES = [torch.bfloat16, torch.float32]


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 results must be bit-identical (the kernels round where eager ops do); float32 ones
    may differ in the last bits from summation order."""
    if got.dtype == torch.bfloat16:
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 584])  # whole vectors, and a tail of 8
def test_rms_norm_with_and_without_residual(ops, dtype, hidden):
    torch.manual_seed(0)
    x, residual = torch.randn(7, hidden, dtype=dtype), torch.randn(7, hidden, dtype=dtype)
    weight = torch.randn(hidden, dtype=dtype)

    def eager(h):
        return weight * F.rms_norm(h.float(), (hidden,), None, 1e-5).to(dtype)

    assert_same(ops.rms_norm(x, None, weight, 1e-5), eager(x))
    updated = residual.clone()
    out = ops.rms_norm(x, updated, weight, 1e-5)
    assert torch.equal(updated, residual + x)  # the residual stream, updated in place
    assert_same(out, eager(residual + x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1536, 1544])  # whole vectors, and a tail of 8
def test_silu_and_mul(ops, dtype, width):
    torch.manual_seed(0)
    gate_up = torch.randn(64, 2 * width, dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert_same(ops.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 48])  # the vectorised path and the generic one
def test_rotary_and_store(ops, dtype, head_dim):
    torch.manual_seed(0)
    heads, kv_heads, tokens = 9, 3, 6
    rope = RotaryEmbedding(head_dim, 4096, RopeConfig(theta=100000.0))(torch.tensor([0, 1, 7, 100, 2047, 4095]), dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    eager = qkv.view(tokens, -1, head_dim).clone()
    rotated = apply_rotary(eager[:, : heads + kv_heads], *rope.per_token())
    k_cache = torch.zeros(8, 4, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([31, 0, 5, 6, 17, 12])

    ops.rotary_and_store(qkv, rope.positions, rope.cos_table, rope.sin_table, heads, kv_heads, k_cache, v_cache, slots)

    got = qkv.view(tokens, -1, head_dim)
    assert_same(got[:, : heads + kv_heads], rotated)
    assert torch.equal(got[:, heads + kv_heads :], eager[:, heads + kv_heads :])  # v untouched
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[slots], got[:, heads : heads + kv_heads])
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[slots], eager[:, heads + kv_heads :])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == tokens  # nothing else written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 48])  # the vectorised path and the generic one
@pytest.mark.parametrize("heads", [6, 14])  # 3 and 7 query heads per kv head (SmolLM2, Qwen2.5)
def test_paged_attention(ops, dtype, head_dim, heads):
    """Decodes, a draft, prompt chunks and whole prompts in one call: every row equals causal
    attention over its prefix, and equals to the bit the same row computed alone as a decode."""
    torch.manual_seed(0)
    kv_heads, block_size, num_blocks = 2, 16, 160
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    # (context length, query rows): decodes, a decode with 3 draft tokens, a chunk after a
    # cached prefix, whole prompts (several tiles of rows, and a long one with small tiles).
    shape = [(1, 1), (17, 1), (300, 1), (45, 4), (65, 20), (40, 40), (1000, 9)]
    lens = torch.tensor([n for n, _ in shape])
    starts = torch.tensor([0] + [r for _, r in shape]).cumsum(0)
    tables = torch.stack([torch.randperm(num_blocks)[:63] for _ in shape])  # scattered blocks
    q_rows = torch.randn(int(starts[-1]), heads + 7, head_dim, dtype=dtype)  # strided, as in the model
    q = q_rows[:, :heads]
    scale = head_dim**-0.5

    out = ops.paged_attention(q, k_cache, v_cache, tables, starts, lens, scale)

    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for s, (length, rows) in enumerate(shape):
        p = torch.arange(length)
        slots = tables[s, p // block_size] * block_size + p % block_size
        k = k_cache.view(-1, kv_heads, head_dim)[slots].float().repeat_interleave(heads // kv_heads, 1)
        v = v_cache.view(-1, kv_heads, head_dim)[slots].float().repeat_interleave(heads // kv_heads, 1)
        mine = q[starts[s] : starts[s + 1]]
        causal = p[None, :] <= p[length - rows :, None]  # [rows, length]
        want = F.scaled_dot_product_attention(
            mine.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=causal, scale=scale
        ).transpose(0, 1)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]].float(), want, atol=tolerance, rtol=tolerance)
        for r in range(rows):
            alone = ops.paged_attention(
                mine[r : r + 1], k_cache, v_cache, tables[s : s + 1], torch.tensor([0, 1]),
                torch.tensor([length - rows + r + 1]), scale,
            )
            assert torch.equal(alone[0], out[starts[s] + r])


def test_bad_arguments_raise_instead_of_reading_out_of_bounds(ops):
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    one_each = torch.tensor([0, 1, 2])

    def attend(tables, lens, starts=one_each):
        return ops.paged_attention(q, cache, cache, tables, starts, lens, 1.0)

    with pytest.raises(RuntimeError, match="int64"):
        attend(torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="one table and length per sequence"):
        attend(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        attend(torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 17]))
    with pytest.raises(RuntimeError, match="block id outside the cache"):
        attend(torch.tensor([[0], [4]]), torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="query starts"):
        attend(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long), torch.tensor([0, 1, 3]))
    with pytest.raises(RuntimeError, match="2 query rows and a context of 1"):
        attend(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), torch.tensor([0, 2]))
    qkv = torch.zeros(1, 8 * 64, dtype=torch.bfloat16)
    table = torch.zeros(10, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        ops.rotary_and_store(qkv, torch.tensor([10]), table, table, 4, 2, cache, cache, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rotary_and_store(qkv, torch.tensor([0]), table, table, 4, 2, cache, cache, torch.tensor([64]))
    with pytest.raises(RuntimeError, match="qkv's dtype"):
        ops.rotary_and_store(qkv, torch.tensor([0]), table, table, 4, 2, cache.float(), cache.float(), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        ops.silu_and_mul(torch.zeros(2, 8, dtype=torch.float64))


def test_a_failed_build_falls_back_to_eager_ops(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KESTREL_HOME", str(tmp_path))
    monkeypatch.setenv("KESTREL_KERNELS", "native")  # not a prebuilt library, if there is one
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that always fails
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.ops() is None
    assert not kernels.available_on(torch.device("cpu"))
    assert "fused CPU kernels unavailable" in caplog.text


# Conditions as strings: evaluated when a test runs, not when the module is collected.
amx = pytest.mark.skipif(
    "not kernels.amx_linear_fits(torch.zeros(16, 32, dtype=torch.bfloat16))", reason="no AMX linear"
)


@amx
def test_amx_linear_matches_onednn_bit_for_bit(ops, default_model_dir):
    """The AMX kernel must give exactly oneDNN's packed result on the real weights, at one row
    and past AMX_MAX_ROWS where the engine switches to oneDNN: a sequence's greedy tokens must
    not depend on what else is in the batch. (oneDNN's down_proj at 197-254 rows sums in
    another order: those steps run on the AMX kernel.)"""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    tensors = load_file(str(default_model_dir / "model.safetensors"))
    names = [n for n in tensors if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    assert len(names) == 7
    for name in names + ["model.embed_tokens.weight"]:
        weight = tensors[name].to(torch.bfloat16).contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        tiles = kernels.amx_tiles(weight)
        bias = torch.randn(weight.shape[0], dtype=torch.bfloat16)
        for rows in (1, 5, 16, 17, 64, 100, AMX_MAX_ROWS + 1, 512):
            x = torch.randn(rows, weight.shape[1], dtype=torch.bfloat16)
            for b in (None, bias):
                want = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
                assert torch.equal(ops.amx_linear(x, tiles, b), want), (name, rows)


@amx
def test_amx_linear_rows_do_not_depend_on_each_other(ops):
    torch.manual_seed(0)
    weight = torch.randn(96, 128, dtype=torch.bfloat16)
    tiles = kernels.amx_tiles(weight)
    x = torch.randn(70, 128, dtype=torch.bfloat16)
    batch = ops.amx_linear(x, tiles, None)
    alone = torch.cat([ops.amx_linear(x[i : i + 1], tiles, None) for i in range(70)])
    assert torch.equal(batch, alone)
    torch.testing.assert_close(batch.float(), x.float() @ weight.float().T, atol=0.05, rtol=0.02)
    wide = torch.randn(70, 200, dtype=torch.bfloat16)[:, :128]  # rows 200 apart
    assert torch.equal(ops.amx_linear(wide, tiles, None), ops.amx_linear(wide.contiguous(), tiles, None))


@amx
def test_amx_linear_rejects_what_it_cannot_take(ops):
    tiles = torch.zeros(2, 2, 16, 16, 2, dtype=torch.bfloat16)  # a [32, 64] weight
    with pytest.raises(RuntimeError, match="the weight 64"):
        ops.amx_linear(torch.zeros(1, 96, dtype=torch.bfloat16), tiles, None)
    with pytest.raises(RuntimeError, match="bf16 only"):
        ops.amx_linear(torch.zeros(1, 64), tiles.float(), None)
    assert not kernels.amx_linear_fits(torch.zeros(24, 64, dtype=torch.bfloat16))  # 24 % 16
    assert not kernels.amx_linear_fits(torch.zeros(32, 48, dtype=torch.bfloat16))  # 48 % 32
    assert not kernels.amx_linear_fits(torch.zeros(32, 64))  # float32


@amx
def test_amx_copies_are_made_only_within_the_budget():
    from torch import nn

    from engine.layers.linear import Linear, pack_linear_weights

    def model():
        torch.manual_seed(0)
        return nn.Sequential(Linear(64, 32, bias=True), Linear(32, 48)).to(torch.bfloat16)  # 48 % 16 == 0

    x = torch.randn(3, 64, dtype=torch.bfloat16)
    roomy, tight = model(), model()
    pack_linear_weights(roomy, amx_copy_budget=None)
    pack_linear_weights(tight, amx_copy_budget=1024)  # less than the weights take
    assert all(m.amx_weight is not None for m in roomy)
    assert all(m.amx_weight is None and m.packed_weight is not None for m in tight)
    assert torch.equal(roomy(x), tight(x))  # the two paths agree bit for bit


fma = pytest.mark.skipif(
    "not kernels.fma_linear_fits(torch.zeros(16, 32, dtype=torch.bfloat16))", reason="no FMA linear (AVX2)"
)


@fma
@pytest.mark.parametrize("out_features, in_features", [(16, 7), (96, 64), (112, 200), (960, 576)])
def test_fma_linear_rounds_the_exact_sum_once(ops, out_features, in_features):
    """Every output is the float32 sum of its products rounded once to bf16: within half a bf16
    step of the exact value, plus float32 summation error. 112 outputs leave a last group of
    one panel; 7 and 200 columns are no multiple of any vector width."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    bias = torch.randn(out_features, dtype=torch.bfloat16)
    panels = kernels.fma_panels(weight)
    for rows in (1, 2, 3, 4, 5, 6, 7, 13, 64, 100):
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        for b in (None, bias):
            exact = x.double() @ weight.double().T + (b.double() if b is not None else 0)
            got = ops.fma_linear(x, panels, b).double()
            half_step = exact.abs() * 2.0**-8  # bf16 keeps 8 significant bits
            summation = 1e-6 * (x.double().abs() @ weight.double().abs().T + 1)
            assert ((got - exact).abs() <= half_step + summation).all(), (rows, b is not None)


@fma
def test_fma_linear_rows_do_not_depend_on_each_other(ops):
    torch.manual_seed(0)
    weight = torch.randn(208, 96, dtype=torch.bfloat16)  # 13 panels: two groups of 6 and one
    panels = kernels.fma_panels(weight)
    x = torch.randn(70, 96, dtype=torch.bfloat16)
    batch = ops.fma_linear(x, panels, None)
    alone = torch.cat([ops.fma_linear(x[i : i + 1], panels, None) for i in range(70)])
    assert torch.equal(batch, alone)
    wide = torch.randn(70, 200, dtype=torch.bfloat16)[:, :96]  # rows 200 apart
    assert torch.equal(ops.fma_linear(wide, panels, None), ops.fma_linear(wide.contiguous(), panels, None))
    nan = x.clone()
    nan[3, 5] = float("nan")
    out = ops.fma_linear(nan, panels, None)
    assert out[3].isnan().all() and torch.equal(out[4:], batch[4:])


@fma
def test_fma_linear_rejects_what_it_cannot_take(ops):
    panels = torch.zeros(2, 64, 16, dtype=torch.bfloat16)  # a [32, 64] weight
    with pytest.raises(RuntimeError, match="the weight 64"):
        ops.fma_linear(torch.zeros(1, 96, dtype=torch.bfloat16), panels, None)
    with pytest.raises(RuntimeError, match="bf16 only"):
        ops.fma_linear(torch.zeros(1, 64), panels.float(), None)
    assert not kernels.fma_linear_fits(torch.zeros(24, 64, dtype=torch.bfloat16))  # 24 % 16
    assert not kernels.fma_linear_fits(torch.zeros(32, 64))  # float32


@fma
@pytest.mark.parametrize("onednn_bf16", [False, True])  # an AVX2-only CPU; AVX-512 without AMX
def test_linear_takes_the_fma_kernel_where_there_is_no_amx(ops, monkeypatch, onednn_bf16):
    from engine.layers import linear

    monkeypatch.setattr(linear, "can_pack", lambda weight: onednn_bf16)
    monkeypatch.setattr(kernels, "amx_linear_fits", lambda weight: False)
    torch.manual_seed(0)
    layer = linear.Linear(64, 48, bias=True).to(torch.bfloat16)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    layer.pack()
    assert layer.weight is None and layer.fma_weight is not None
    assert torch.equal(layer(x), ops.fma_linear(x, kernels.fma_panels(weight), bias))
    batched = torch.randn(2, 5, 80, dtype=torch.bfloat16)[..., :64]  # 3-d, rows 80 apart
    assert torch.equal(layer(batched), layer(batched.reshape(10, 64).contiguous()).view(2, 5, 48))


def test_a_float16_model_runs_on_the_eager_ops(default_model_dir):
    """The kernels take float32 and bf16 only: a float16 engine must route around them."""
    from engine import LLM, SamplingParams

    assert kernels.use_for(torch.zeros(1, dtype=torch.float16)) is None
    llm = LLM(str(default_model_dir), dtype="float16")
    assert not llm.engine.runner.fused_attention
    [result] = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert result.error is None and len(result.completions[0].token_ids) == 8
    assert "Paris" in result.completions[0].text


def test_a_build_killed_half_way_does_not_block_the_next_one(ops, tmp_path, monkeypatch):
    """A build interrupted earlier leaves its directory and torch's lock file behind; the next
    process must build anyway, not wait on that lock forever, and clear the dead directory
    (not one a build running alongside may be using). Runs in a fresh process with an empty
    $KESTREL_HOME, so this compiles the kernels once more (about 10 s)."""
    import subprocess
    import sys

    monkeypatch.setenv("KESTREL_HOME", str(tmp_path))
    monkeypatch.setenv("KESTREL_KERNELS", "native")
    library = kernels.library_path()
    library.parent.mkdir(parents=True)
    (library.parent / "lock").write_text("")  # what torch's build leaves while it runs
    killed, running = library.parent / "build-killed", library.parent / "build-running"
    killed.mkdir()
    running.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(killed, (two_hours_ago, two_hours_ago))
    code = "from engine import kernels; print(kernels.ops() is not None)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True", done.stderr
    assert library.exists()
    assert not killed.exists() and running.exists()
