"""The quantized linear kernels (engine/kernels/quant_ops.cpp) against the gguf package's reference
dequantization: weights decode to the bit, linears agree with float64 within float32 summation
error, and every output row is the same to the bit whatever the batch and thread count."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from engine import assets

pytestmark = pytest.mark.slow  # builds the kernels; reads the catalogue's GGUF files


SUPPORTED = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# Byte offsets of each block's fp16 fields (d, and m / dmin where there is one).
HALF_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
FLOAT_TYPES = {T.F32: np.float32, T.F16: np.float16}


def random_blocks(qtype: T, rows: int, in_features: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """uint8 [rows, row_bytes]: random bytes with every fp16 field a finite value (or random finite
    weights for the float types)."""
    rng = np.random.default_rng(seed)
    if qtype in FLOAT_TYPES or qtype == T.BF16:
        values = (rng.standard_normal((rows, in_features)) * scale).astype(np.float32)
        if qtype == T.BF16:
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return values.astype(FLOAT_TYPES[qtype]).view(np.uint8)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, in_features // block_size, type_size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        halves = (rng.standard_normal(blocks.shape[:2]) * scale).astype(np.float16)  # [rows, blocks]
        blocks[:, :, offset : offset + 2] = halves.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def reference(blocks: np.ndarray, qtype: T) -> torch.Tensor:
    """[rows, in_features] float32: gguf's numpy dequantization."""
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks, qtype)).reshape(blocks.shape[0], -1))


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    same = got.view(torch.int32) == want.view(torch.int32)
    assert bool(same.all()), f"{int((~same).sum())} values differ, first at {(~same).nonzero()[0].tolist()}"


def in_features_for(qtype: T) -> int:
    # several passes of 512 columns; for 32-element blocks, a chunk of 32 blocks' scales and a rest
    return 1280 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 1120


# ---- dequantization ----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_dequantize_equals_the_gguf_reference(ops, qtype):
    in_features = in_features_for(qtype)
    blocks = random_blocks(qtype, 37, in_features, scale=1.0)
    want = reference(blocks, qtype)
    weights = torch.from_numpy(blocks)
    assert_bits_equal(ops.quant_dequantize(weights, int(qtype), in_features, None, torch.float32), want)
    row_ids = torch.tensor([5, 0, 36, 5])  # any order, repeats
    assert_bits_equal(ops.quant_dequantize(weights, int(qtype), in_features, row_ids, torch.float32), want[row_ids])
    assert torch.equal(
        ops.quant_dequantize(weights, int(qtype), in_features, row_ids.int(), torch.bfloat16),
        want[row_ids].to(torch.bfloat16),
    )


CATALOGUE_TYPES = {
    "smollm2-135m-instruct": {T.Q4_1, T.Q8_0, T.F32},
    "qwen2.5-coder-0.5b-instruct": {T.Q5_0, T.Q4_K, T.Q6_K, T.Q8_0, T.F32},
}


@pytest.mark.parametrize("name", list(CATALOGUE_TYPES))
def test_dequantize_real_tensors(ops, name):
    """Two tensors of each type in the catalogue's GGUF files; of big ones (embeddings), 256 rows
    at random. Then a few rows through the linear."""
    path = assets.gguf_path(name)
    if not path.exists():
        pytest.skip(f"{path} absent")
    reader = gguf.GGUFReader(path)
    seen: dict[T, int] = {}
    for tensor in reader.tensors:
        qtype = T(tensor.tensor_type)
        if seen.get(qtype, 0) >= 2:
            continue
        seen[qtype] = seen.get(qtype, 0) + 1
        in_features, out_features = int(tensor.shape[0]), int(np.prod(tensor.shape[1:]))  # GGUF: ne0 fastest
        # [out_features, row_bytes], a writable copy
        blocks = torch.from_numpy(np.array(tensor.data).view(np.uint8).reshape(out_features, -1))
        row_ids = None
        if blocks.shape[0] > 2048:
            row_ids = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(0))[:256]
        want = reference(blocks.numpy() if row_ids is None else blocks[row_ids].numpy(), qtype)
        got = ops.quant_dequantize(blocks, int(qtype), in_features, row_ids, torch.float32)
        assert_bits_equal(got, want)
        if blocks.shape[0] > 1:
            rows = blocks if row_ids is None else blocks[row_ids]  # [out_features or 256, row_bytes]
            x = torch.randn(3, in_features)
            check_linear(ops.quant_linear(x, rows, int(qtype), in_features, None), x, want, None)
    assert set(seen) == CATALOGUE_TYPES[name]


# ---- the linear --------------------------------------------------------------------------------


def check_linear(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """got == x @ weight.T + bias within float32 summation error: each output sums its products in
    lanes of 8 or 16 (in_features / 8 at most each), then adds the lanes in 3-4 levels and the
    bias, each step off by at most 2^-24 of the sum of magnitudes; bf16 adds one rounding."""
    x64, w64 = x.double(), weight.double()
    want = x64 @ w64.T
    magnitude = x64.abs() @ w64.abs().T
    if bias is not None:
        want = want + bias.double()
        magnitude = magnitude + bias.double().abs()
    bound = (x.shape[1] / 8 + 6) * 2.0**-24 * magnitude
    if got.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * want.abs()
    error = (got.double() - want).abs()
    assert bool((error <= bound).all()), f"worst error / bound: {float((error / bound.clamp_min(1e-300)).max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_linear_equals_float64_reference(ops, qtype, dtype):
    in_features, out_features = in_features_for(qtype), 45  # 45: groups of outputs with a remainder
    blocks = random_blocks(qtype, out_features, in_features, seed=1)
    weight = reference(blocks, qtype)
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 5, 16, 64):
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        bias32 = torch.randn(out_features, generator=generator)
        for bias in (None, bias32.to(dtype), bias32):  # none, x's dtype, float32
            got = ops.quant_linear(x, torch.from_numpy(blocks), int(qtype), in_features, bias)
            assert got.dtype == dtype and got.shape == (rows, out_features)
            check_linear(got, x.float(), weight, None if bias is None else bias.float())


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_each_row_is_the_same_whatever_the_batch(ops, qtype):
    """Decodes (1-4 rows, weights decoded in registers) and prompts (decoded once per panel) give
    every row the same bits, alone or in a batch of 70, on one thread or all."""
    in_features, out_features = in_features_for(qtype), 37
    blocks = torch.from_numpy(random_blocks(qtype, out_features, in_features, seed=2))
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(70, in_features, generator=generator).to(dtype)
        bias = torch.randn(out_features, generator=generator).to(dtype)
        batch = ops.quant_linear(x, blocks, int(qtype), in_features, bias)
        for row in range(70):
            alone = ops.quant_linear(x[row : row + 1], blocks, int(qtype), in_features, bias)
            assert torch.equal(alone, batch[row : row + 1]), row
        for rows in (2, 3, 4, 5, 6, 16):
            assert torch.equal(ops.quant_linear(x[:rows], blocks, int(qtype), in_features, bias), batch[:rows]), rows
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(ops.quant_linear(x, blocks, int(qtype), in_features, bias), batch)
        finally:
            torch.set_num_threads(threads)


# ---- the integer-dot linear (quant_dot.h) ------------------------------------------------------

DOT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.fixture
def dot_linear(ops):
    if not hasattr(ops, "quant_dot_linear"):
        pytest.skip("the integer-dot linear needs AVX2, FMA and F16C")
    return ops.quant_dot_linear


def check_dot_linear(
    got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x_levels: int = 127
) -> None:
    """got == x @ weight.T + bias but for rounding x per 32 columns to integers of at most
    x_levels (int8: 127; 16 bits: 32512), each element off by at most half a step, max|x| /
    (2 x_levels) of its unit, plus float32 rounding of the scaled sums."""
    x64, w64 = x.double(), weight.double()
    want = x64 @ w64.T + (0 if bias is None else bias.double())
    rows, in_features = x.shape
    half_step = x64.abs().view(rows, -1, 32).amax(-1) / (2 * x_levels)  # [rows, units]
    units = w64.abs().view(w64.shape[0], -1, 32).sum(-1)  # [out, units]: sum of |w| per unit
    bound = half_step @ units.T * 1.001 + 2.0**-20 * (x64.abs() @ w64.abs().T) + 1e-30
    if got.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * want.abs()
    error = (got.double() - want).abs()
    assert bool((error <= bound).all()), f"worst error / bound: {float((error / bound).max()):.3g}"


def check_repacked_linear(ops, packed: torch.Tensor, qtype: int, weight: torch.Tensor, rows_list, x_levels: int) -> None:
    """quant_linear over repacked blocks (type id qtype) against their decoded `weight`, within
    check_dot_linear's bound, for each row count: float32 and bfloat16 x, with and without bias."""
    out_features, in_features = weight.shape
    generator = torch.Generator().manual_seed(0)
    for rows in rows_list:
        x = torch.randn(rows, in_features, generator=generator)
        x[0, :32] = 0.0  # an all-zero unit has no scale
        x[-1, 40] = 30.0  # an outlier coarsens its unit only
        for dtype in (torch.float32, torch.bfloat16):
            for bias in (None, torch.randn(out_features, generator=generator)):
                got = ops.quant_linear(x.to(dtype), packed, qtype, in_features, bias)
                assert got.dtype == dtype and got.shape == (rows, out_features)
                check_dot_linear(got, x.to(dtype).float(), weight, bias, x_levels)


def check_rows_whatever_the_batch(ops, packed: torch.Tensor, qtype: int, in_features: int, rows: int, counts) -> None:
    """Each of `rows` rows alone, the first `counts` together and all of them on one thread give
    the bits of one batch of all."""
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    batch = ops.quant_linear(x, packed, qtype, in_features, None)
    for row in range(rows):
        assert torch.equal(ops.quant_linear(x[row : row + 1], packed, qtype, in_features, None), batch[row : row + 1])
    for count in counts:
        assert torch.equal(ops.quant_linear(x[:count], packed, qtype, in_features, None), batch[:count]), count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(ops.quant_linear(x, packed, qtype, in_features, None), batch)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("qtype", DOT_TYPES, ids=lambda t: t.name)
def test_dot_linear_is_within_the_int8_rounding_bound(dot_linear, qtype):
    in_features = in_features_for(qtype) + (0 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 64)  # 21 units: a part chunk
    out_features = 44  # groups of outputs with a remainder
    blocks = random_blocks(qtype, out_features, in_features, seed=3)
    weight = reference(blocks, qtype)
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 5, 16, 64):
        x = torch.randn(rows, in_features, generator=generator)
        x[0, :32] = 0.0  # an all-zero unit has no scale
        x[-1, 40] = 30.0  # an outlier coarsens its unit only
        for dtype in (torch.float32, torch.bfloat16):
            bias = torch.randn(out_features, generator=generator)
            got = dot_linear(x.to(dtype), torch.from_numpy(blocks), int(qtype), in_features, bias)
            assert got.dtype == dtype and got.shape == (rows, out_features)
            check_dot_linear(got, x.to(dtype).float(), weight, bias)


@pytest.mark.parametrize("qtype", DOT_TYPES, ids=lambda t: t.name)
def test_dot_linear_rows_are_the_same_whatever_the_batch(dot_linear, qtype):
    in_features, out_features = in_features_for(qtype), 37
    blocks = torch.from_numpy(random_blocks(qtype, out_features, in_features, seed=4))
    x = torch.randn(70, in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    batch = dot_linear(x, blocks, int(qtype), in_features, None)
    for row in (0, 1, 2, 3, 35, 69):
        assert torch.equal(dot_linear(x[row : row + 1], blocks, int(qtype), in_features, None), batch[row : row + 1])
    for rows in (2, 3, 4, 5, 7, 16):
        assert torch.equal(dot_linear(x[:rows], blocks, int(qtype), in_features, None), batch[:rows]), rows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(dot_linear(x, blocks, int(qtype), in_features, None), batch)
    finally:
        torch.set_num_threads(threads)


def test_dot_linear_refuses_types_it_has_no_kernel_for(dot_linear):
    blocks = torch.from_numpy(random_blocks(T.Q2_K, 4, 256))
    with pytest.raises(RuntimeError, match="no integer kernel for Q2_K"):
        dot_linear(torch.randn(1, 256), blocks, int(T.Q2_K), 256, None)


# ---- the interleaved linear on 16-bit activations (quant_interleaved.h) --------------------------

INTERLEAVED_BASE = 2000  # engine.layers.quantized.INTERLEAVED_TYPE_BASE


@pytest.fixture
def pack(ops):
    if not hasattr(ops, "quant_pack"):
        pytest.skip("the interleaved linear needs AVX2 (with FMA, F16C) or AVX-512 (BW, VL)")
    return ops.quant_pack


INTERLEAVABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K]
# 3 and 5 groups of 16 outputs: tiles of 2 and 4 groups with one left over
INTERLEAVED_OUT_FEATURES = [48, 80]


@pytest.mark.parametrize("out_features", INTERLEAVED_OUT_FEATURES)
@pytest.mark.parametrize("qtype", INTERLEAVABLE, ids=lambda t: t.name)
def test_interleaved_linear_is_within_the_16_bit_rounding_bound(ops, pack, qtype, out_features):
    in_features = 768  # 24 units, 3 super-blocks
    blocks = random_blocks(qtype, out_features, in_features, seed=7)
    packed = pack(torch.from_numpy(blocks), INTERLEAVED_BASE + int(qtype), in_features)
    rows = (1, 2, 3, 5, 16, 64, 130)  # 130: two passes of rows
    check_repacked_linear(ops, packed, INTERLEAVED_BASE + int(qtype), reference(blocks, qtype), rows, 32512)


@pytest.mark.parametrize("block_type", INTERLEAVABLE, ids=lambda t: t.name)
def test_interleaved_linear_rows_are_the_same_whatever_the_batch(ops, pack, block_type):
    """Rows alone, in tiles of 1-4, in batches of any size and across passes of 128 rows give the
    same bits, on one thread or all."""
    blocks = torch.from_numpy(random_blocks(block_type, 80, 256, seed=8))
    qtype = INTERLEAVED_BASE + int(block_type)
    check_rows_whatever_the_batch(ops, pack(blocks, qtype, 256), qtype, 256, 140, (2, 3, 4, 5, 6, 7, 9, 16, 129))


@pytest.mark.parametrize("block_type", INTERLEAVABLE, ids=lambda t: t.name)
def test_interleaved_rows_dequantize_as_the_files_do(ops, pack, block_type):
    """An output projection tied to the embedding is one copy of the blocks, interleaved: its rows
    looked up give the file's values, bit for bit."""
    blocks = torch.from_numpy(random_blocks(block_type, 48, 512, seed=9))
    packed = pack(blocks, INTERLEAVED_BASE + int(block_type), 512)
    ids = torch.tensor([0, 47, 17, 17, 31, 5])
    for dtype in (torch.float32, torch.bfloat16):
        want = ops.quant_dequantize(blocks, int(block_type), 512, None, dtype)
        assert torch.equal(ops.quant_dequantize(packed, INTERLEAVED_BASE + int(block_type), 512, None, dtype), want)
        got = ops.quant_dequantize(packed, INTERLEAVED_BASE + int(block_type), 512, ids, dtype)
        assert torch.equal(got, want[ids])


def test_interleaved_layout_keeps_the_size_and_refuses_what_it_cannot_hold(ops, pack):
    for block_type in INTERLEAVABLE:
        blocks = torch.from_numpy(random_blocks(block_type, 32, 512))
        extra = 2 * 4 if block_type == T.Q4_K else 0  # the 6-bit scales and mins as bytes: 4 more a row per super-block
        assert pack(blocks, INTERLEAVED_BASE + int(block_type), 512).shape == (32, blocks.shape[1] + extra)
    q4_0 = torch.from_numpy(random_blocks(T.Q4_0, 40, 64))
    cases = [
        (lambda: pack(torch.from_numpy(random_blocks(T.Q5_K, 16, 256)), INTERLEAVED_BASE + int(T.Q5_K), 256),
         "no interleaved layout 2013 (Q5_K); the layouts: 2000 + the id of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K or Q6_K"),
        (lambda: pack(q4_0, INTERLEAVED_BASE + int(T.Q4_0), 64),
         "interleaved Q4_0 weights need out_features a multiple of 16, got 40"),
        (lambda: ops.quant_linear(torch.randn(1, 64), q4_0, INTERLEAVED_BASE + int(T.Q4_0), 64, None),
         "interleaved Q4_0 weights need out_features a multiple of 16, got 40"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError) as raised:
            call()
        assert message in str(raised.value), (message, str(raised.value).splitlines()[0])


# ---- errors ------------------------------------------------------------------------------------


def test_errors_name_the_problem(ops):
    q4_0 = torch.from_numpy(random_blocks(T.Q4_0, 8, 64))  # [8, 36]
    x = torch.randn(2, 64)
    cases = [
        (lambda: ops.quant_linear(x, q4_0, 16, 64, None), "unsupported qtype 16 (IQ2_XXS)"),
        (lambda: ops.quant_linear(x, q4_0, 99, 64, None), "unsupported qtype 99 (unknown)"),
        (lambda: ops.quant_linear(torch.randn(2, 48), q4_0, int(T.Q4_0), 48, None),
         "in_features 48 is not a positive multiple of Q4_0's block size 32"),
        (lambda: ops.quant_linear(torch.randn(2, 896), torch.zeros(8, 504, dtype=torch.uint8), int(T.Q4_K), 896, None),
         "in_features 896 is not a positive multiple of Q4_K's block size 256"),
        (lambda: ops.quant_linear(x, q4_0[:, :20].contiguous(), int(T.Q4_0), 64, None),
         "blocks have 20 bytes per row, but Q4_0 with in_features 64 needs 36"),
        (lambda: ops.quant_linear(torch.randn(2, 32), q4_0, int(T.Q4_0), 64, None),
         "x must be [rows, in_features=64], got [2, 32]"),
        (lambda: ops.quant_linear(x.half(), q4_0, int(T.Q4_0), 64, None), "x must be float32 or bfloat16, got Half"),
        (lambda: ops.quant_linear(x, q4_0.view(torch.int8), int(T.Q4_0), 64, None), "blocks must be uint8, got Char"),
        (lambda: ops.quant_linear(x, q4_0, int(T.Q4_0), 64, torch.zeros(8, dtype=torch.float16)),
         "bias must be float32 or x's dtype (Float), got Half"),
        (lambda: ops.quant_linear(x, q4_0, int(T.Q4_0), 64, torch.zeros(7)), "bias must be [out_features=8]"),
        (lambda: ops.quant_linear(torch.randn(64, 2).t(), q4_0, int(T.Q4_0), 64, None), "x must be contiguous"),
        (lambda: ops.quant_linear(x, torch.zeros(36, 8, dtype=torch.uint8).t(), int(T.Q4_0), 64, None),
         "blocks must be contiguous"),
        (lambda: ops.quant_dequantize(q4_0, int(T.Q4_0), 64, None, torch.float16), "dtype must be float32 or bfloat16"),
        (lambda: ops.quant_dequantize(q4_0, int(T.Q4_0), 64, torch.tensor([3, 8]), torch.float32),
         "row id 8 is out of range for 8 rows"),
        (lambda: ops.quant_dequantize(q4_0, int(T.Q4_0), 64, torch.tensor([0.0]), torch.float32),
         "row_ids must be int64 or int32"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError) as raised:
            call()
        assert message in str(raised.value), (message, str(raised.value).splitlines()[0])
