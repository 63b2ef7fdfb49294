"""The linears of one decode step under every matmul torch ships for CPU (issue 12, item 3).

    .venv/bin/python benchmarks/quant_linears.py --model smollm2 --rows 1,16,64 --threads 2 --repeats 30
    .venv/bin/python benchmarks/quant_linears.py --model qwen --threads 2 --repeats 15
    .venv/bin/python benchmarks/quant_linears.py --model smollm2 --candidates int4,fbgemm   # a subset

(About 10 minutes for SmolLM2 and 40 for Qwen2.5-0.5B on 2 busy cores; up to ~9 GB of weights for
Qwen. Two candidates are scalar fallbacks on x86, `_weight_int8pack_mm` with float32 activations
and `_dyn_quant_matmul_4bit` without KleidiAI: --budget caps the time they take.)

Every layer gets its own random weights (distinct tensors, so a step streams them from DRAM
as a real one does). For each number of activation rows, the candidates take turns, one whole
step each (all the layer linears timed together, then lm_head on its own), the starting
candidate rotating from one repeat to the next so that load on a shared machine spreads over
all of them. Reports the minimum and median ms per step, the bytes of weights each candidate
reads and the GB/s that gives at 1 row; a candidate whose samples use up --budget seconds at
one row count stops early (its cell shows n=). Activations are created in each candidate's
input dtype outside the timing, as a bf16 model would already hold them.

The "floor" row does no product: it reads the same Q4_1 bytes with torch.sum, call for call, so a
linear's distance to it is what is left above the DRAM on this host.

A check on one shape (gate_up, 16 rows) gives each candidate's relative error against float32,
and against the weights it actually holds (after its rounding or quantization): the first is
the accuracy cost, the second exposes a broken call (~1 instead of ~1e-3..1e-2).

To add a candidate, append a Candidate to `candidates()`: `prepare` turns a float32 [out, in]
weight into what `run` reads plus its byte count, `effective` gives the float32 weight it
really multiplies by. (torchao is used only if installed; it is not a dependency.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import kernels  # noqa: E402
from engine.layers.quantized import QuantizedWeight, interleave  # noqa: E402
from engine.quantize import quantize_weight  # noqa: E402

Tensor = torch.Tensor


@dataclass(frozen=True)
class ModelShapes:
    """The linears of one decoder layer, [out, in] each in step order, and lm_head."""

    name: str
    num_layers: int
    layer_linears: tuple[tuple[str, int, int], ...]  # (name, out_features, in_features)
    lm_head: tuple[int, int]


MODELS = {
    # hidden 576, intermediate 1536, 9 heads / 3 kv heads of 64
    "smollm2": ModelShapes(
        "SmolLM2-135M", 30,
        (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)),
        lm_head=(49152, 576),
    ),
    # hidden 896, intermediate 4864, 14 heads / 2 kv heads of 64
    "qwen": ModelShapes(
        "Qwen2.5-0.5B", 24,
        (("qkv", 1152, 896), ("o", 896, 896), ("gate_up", 9728, 896), ("down", 896, 4864)),
        lm_head=(151936, 896),
    ),
}  # fmt: skip


# ---- Quantizers: float32 weight [out, in] -> integer codes and scales ----------------------


def int8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: w ~ q * scale[:, None]. q int8 [out, in], scale [out]."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_asymmetric(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit per group of `group_size` inputs, torch's int4pack convention:
    w ~ (q - 8) * scale + zero, q in 0..15. q int32 [out, in]; scale, zero [out, in / group]."""
    out_features, in_features = w.shape
    groups = w.view(out_features, in_features // group_size, group_size)  # [out, in / group, group]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (high - low).clamp(min=1e-8) / 15
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.int32).view(out_features, in_features), scale, low + 8 * scale


def int4_symmetric(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric 4-bit per group: w ~ (q - 8) * scale, q uint8 in 0..15 [out, in]; scale [out, in / group]."""
    out_features, in_features = w.shape
    groups = w.view(out_features, in_features // group_size, group_size)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-8) / 7
    q = torch.round(groups / scale[..., None]).clamp(-8, 7) + 8
    return q.to(torch.uint8).view(out_features, in_features), scale


def int4_asymmetric_weight(w: Tensor, group_size: int) -> Tensor:
    q, scale, zero = int4_asymmetric(w, group_size)
    scale, zero = scale.bfloat16().float(), zero.bfloat16().float()  # as the int4pack op holds them
    groups = q.view(*scale.shape, group_size).float()
    return ((groups - 8) * scale[..., None] + zero[..., None]).view_as(w)


def int4_symmetric_weight(w: Tensor, group_size: int) -> Tensor:
    q, scale = int4_symmetric(w, group_size)
    return ((q.view(*scale.shape, group_size).float() - 8) * scale[..., None]).view_as(w)


def int8_weight(w: Tensor, scale_dtype: torch.dtype = torch.float32) -> Tensor:
    q, scale = int8_per_channel(w)
    return q.float() * scale.to(scale_dtype).float()[:, None]


# ---- Candidates -----------------------------------------------------------------------------

Prepared = tuple[Any, int]  # (what `run` reads, bytes of weights it reads per call)


@dataclass(frozen=True)
class Candidate:
    """One way to compute x @ w.T."""

    name: str
    input_dtype: torch.dtype
    prepare: Callable[[Tensor], Prepared]  # float32 [out, in] -> packed weight
    run: Callable[[Tensor, Any], Tensor]  # (x [rows, in] in input_dtype, packed) -> [rows, out]
    effective: Callable[[Tensor], Tensor]  # the float32 weight it really multiplies by
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run on this host
    misfit: Callable[[int, int], str | None] = lambda out, in_: None  # why it cannot take [out, in]
    floor: bool = False  # a reference that only reads the weights: no product, no error check


def nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bf16_weight(w: Tensor) -> Tensor:
    return w.bfloat16().float()


# Per family: why it cannot run here (None: it can), how it packs a weight, how it multiplies.


def plain_prepare(dtype: torch.dtype) -> Callable[[Tensor], Prepared]:
    def prepare(w: Tensor) -> Prepared:
        weight = w.to(dtype)  # the float32 candidate keeps the very tensor it was given
        return weight, nbytes(weight)

    return prepare


def plain_run(x: Tensor, w: Tensor) -> Tensor:
    return F.linear(x, w)


def fma_unavailable() -> str | None:
    library = kernels.ops()
    if library is None:
        return "the Kestrel kernel library did not build or load (see the warning above)"
    return None if hasattr(library, "fma_linear") else "built without fma_linear (no AVX2 + FMA)"


def fma_prepare(w: Tensor) -> Prepared:
    w16 = w.bfloat16()
    return kernels.fma_panels(w16), nbytes(w16)


def fma_run(x: Tensor, panels: Tensor) -> Tensor:
    return kernels.ops().fma_linear(x, panels, None)


def onednn_unavailable() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "torch built without mkldnn"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "_is_mkldnn_bf16_supported() is False"
    return None


def onednn_prepare(w: Tensor) -> Prepared:
    w16 = w.bfloat16()
    # Batch-size hint 1, as engine/layers/linear.py packs: it tunes the layout, any rows work.
    return torch.ops.mkldnn._reorder_linear_weight(w16, 1), nbytes(w16)


def onednn_run(x: Tensor, packed: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def fbgemm_unavailable() -> str | None:
    engine = torch.backends.quantized.engine
    return None if engine in ("fbgemm", "x86") else f"quantized engine is {engine}"


def fbgemm_prepare(w: Tensor) -> Prepared:
    q, scale = int8_per_channel(w)
    zero_points = torch.zeros_like(scale, dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm still takes them
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(qw, None), nbytes(q, scale)


def fbgemm_run(x: Tensor, packed: Any) -> Tensor:
    # Activations quantized per call to uint8 (7 bits: reduce_range, as nn.quantized.dynamic.Linear).
    return torch.ops.quantized.linear_dynamic(x, packed, True)


def int8pack_prepare(dtype: torch.dtype) -> Callable[[Tensor], Prepared]:
    def prepare(w: Tensor) -> Prepared:
        q, scale = int8_per_channel(w)
        scale = scale.to(dtype)  # the op wants scales in the activations' dtype
        return (q, scale), nbytes(q, scale)

    return prepare


def int8pack_run(x: Tensor, packed: tuple[Tensor, Tensor]) -> Tensor:
    return torch.ops.aten._weight_int8pack_mm(x, *packed)


def int4pack_prepare(group_size: int) -> Callable[[Tensor], Prepared]:
    def prepare(w: Tensor) -> Prepared:
        q, scale, zero = int4_asymmetric(w, group_size)
        scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [in / group, out, 2]
        scale_zero = scale_zero.bfloat16()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [out, in / 2] uint8
        return (packed, scale_zero), nbytes(packed, scale_zero)

    return prepare


def int4pack_run(group_size: int) -> Callable[[Tensor, Any], Tensor]:
    def run(x: Tensor, packed: tuple[Tensor, Tensor]) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[0], group_size, packed[1])

    return run


def dyn_quant_prepare(group_size: int) -> Callable[[Tensor], Prepared]:
    def prepare(w: Tensor) -> Prepared:
        out_features, in_features = w.shape
        q, scale = int4_symmetric(w, group_size)
        nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # [out, in / 2], even k low
        packed = torch.ops.aten._dyn_quant_pack_4bit_weight(
            nibbles, scale, None, group_size, in_features, out_features
        )  # NOTE: without KleidiAI (x86) this is float32, one element per byte of nibbles, + scales
        return (packed, in_features, out_features), nbytes(packed)

    return prepare


def dyn_quant_run(group_size: int) -> Callable[[Tensor, Any], Tensor]:
    def run(x: Tensor, packed: tuple[Tensor, int, int]) -> Tensor:
        weight, in_features, out_features = packed
        return torch.ops.aten._dyn_quant_matmul_4bit(x, weight, group_size, in_features, out_features)

    return run


def gguf_prepare(qtype: str) -> Callable[[Tensor], Prepared]:
    def prepare(w: Tensor) -> Prepared:
        weight = quantize_weight(w, qtype)
        return weight, weight.num_bytes

    return prepare


def gguf_effective(qtype: str) -> Callable[[Tensor], Tensor]:
    def effective(w: Tensor) -> Tensor:
        weight = quantize_weight(w, qtype)
        return kernels.ops().quant_dequantize(weight.blocks, weight.qtype, weight.in_features, None, torch.float32)

    return effective


def gguf_interleaved_prepare(qtype: str) -> Callable[[Tensor], Prepared]:
    """The blocks interleaved for integer dot products on 16-bit x (quant_interleaved.h), as GGUF
    models hold them on AVX2 and AVX-512 hosts."""

    def prepare(w: Tensor) -> Prepared:
        weight = quantize_weight(w, qtype)
        return interleave(weight), weight.num_bytes

    return prepare


def read_floor_run(x: Tensor, weight: QuantizedWeight) -> Tensor:
    """Reads every byte of the blocks once (torch.sum over them as float32 words), in the same
    order of calls: the DRAM time a linear of those bytes cannot go below on this host."""
    weight.blocks.view(torch.float32).sum()
    return x.new_zeros(x.shape[0], weight.out_features)


def gguf_run(op: str) -> Callable[[Tensor, Any], Tensor]:
    def run(x: Tensor, weight: QuantizedWeight) -> Tensor:
        return getattr(kernels.ops(), op)(x, weight.blocks, weight.qtype, weight.in_features, None)

    return run


def has_op(name: str) -> Callable[[], str | None]:
    return lambda: None if hasattr(torch.ops.aten, name) else f"torch.ops.aten.{name} is not in this build"


def kestrel_op(name: str) -> Callable[[], str | None]:
    def unavailable() -> str | None:
        library = kernels.ops()
        return None if library is not None and hasattr(library, name) else f"no kestrel.{name} in this build"

    return unavailable


def outputs_multiple_of(n: int) -> Callable[[int, int], str | None]:
    return lambda out, in_: None if out % n == 0 else f"out_features {out} % {n} != 0"


def groups_fit(group_size: int) -> Callable[[int, int], str | None]:
    return lambda out, in_: None if in_ % group_size == 0 else f"in_features {in_} % group {group_size} != 0"


def candidates() -> list[Candidate]:
    bf16, fp32 = torch.bfloat16, torch.float32
    table = [
        Candidate("torch fp32 F.linear", fp32, plain_prepare(fp32), plain_run, effective=lambda w: w),
        Candidate("torch bf16 F.linear", bf16, plain_prepare(bf16), plain_run, effective=bf16_weight),
        Candidate(
            "kestrel fma_linear bf16", bf16, fma_prepare, fma_run, effective=bf16_weight,
            unavailable=fma_unavailable, misfit=outputs_multiple_of(16),
        ),
        Candidate(
            "oneDNN packed bf16", bf16, onednn_prepare, onednn_run, effective=bf16_weight,
            unavailable=onednn_unavailable,
        ),
        Candidate(
            "fbgemm dynamic int8", fp32, fbgemm_prepare, fbgemm_run, effective=int8_weight,
            unavailable=fbgemm_unavailable,
        ),
    ]
    for qtype in ("Q4_1", "Q8_0"):
        table.append(Candidate(
            f"kestrel quant_linear {qtype} bf16", bf16, gguf_prepare(qtype), gguf_run("quant_linear"),
            effective=gguf_effective(qtype), unavailable=kestrel_op("quant_linear"),
        ))
        table.append(Candidate(
            f"kestrel quant_dot_linear {qtype} bf16", bf16, gguf_prepare(qtype), gguf_run("quant_dot_linear"),
            effective=gguf_effective(qtype), unavailable=kestrel_op("quant_dot_linear"),
        ))
    table.append(Candidate(
        "kestrel quant_linear Q4_1 interleaved, 16-bit x", bf16, gguf_interleaved_prepare("Q4_1"),
        gguf_run("quant_linear"), effective=gguf_effective("Q4_1"), unavailable=kestrel_op("quant_pack"),
    ))
    table.append(Candidate(
        "floor: read the Q4_1 blocks (torch.sum)", bf16, gguf_prepare("Q4_1"), read_floor_run,
        effective=gguf_effective("Q4_1"), floor=True,
    ))
    for dtype, name in ((bf16, "bf16"), (fp32, "fp32")):
        table.append(Candidate(
            f"_weight_int8pack_mm {name}", dtype, int8pack_prepare(dtype), int8pack_run,
            effective=lambda w, dtype=dtype: int8_weight(w, dtype), unavailable=has_op("_weight_int8pack_mm"),
        ))
    for g in (32, 128):
        table.append(Candidate(
            f"_weight_int4pack_mm_for_cpu g{g} bf16", bf16, int4pack_prepare(g), int4pack_run(g),
            effective=lambda w, g=g: int4_asymmetric_weight(w, g),
            unavailable=has_op("_weight_int4pack_mm_for_cpu"), misfit=groups_fit(g),
        ))
    table.append(Candidate(
        "_dyn_quant_matmul_4bit g32 fp32", fp32, dyn_quant_prepare(32), dyn_quant_run(32),
        effective=lambda w: int4_symmetric_weight(w, 32),
        unavailable=has_op("_dyn_quant_matmul_4bit"), misfit=groups_fit(32),
    ))
    return table  # fmt: skip


# ---- Measuring ------------------------------------------------------------------------------


@dataclass
class Packed:
    """A candidate's weights for the whole model: the layer linears in step order, and lm_head."""

    layers: list[tuple[Any, int]]  # (packed weight, in_features)
    lm_head: Any
    layer_bytes: int = 0
    lm_head_bytes: int = 0


def relative_error(y: Tensor, reference: Tensor) -> float:
    return ((y.float() - reference).norm() / reference.norm()).item()


def check(candidate: Candidate, out_features: int, in_features: int, rows: int = 16) -> tuple[float, float]:
    """Relative error of the candidate on one random [out, in] weight: against float32, and
    against the float32 product with the weight it really holds."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
    x = torch.randn(rows, in_features, generator=generator).to(candidate.input_dtype)
    y = candidate.run(x, candidate.prepare(w)[0])
    assert y.shape == (rows, out_features), f"output shape {tuple(y.shape)}"
    x32 = x.float()  # the activations it was given, so bf16 inputs cost nothing in the second figure
    return relative_error(y, F.linear(x32, w)), relative_error(y, F.linear(x32, candidate.effective(w)))


def pack_model(model: ModelShapes, chosen: list[Candidate]) -> dict[str, Packed]:
    """Random float32 weights, each packed by every candidate, generated one at a time."""
    generator = torch.Generator().manual_seed(0)
    packed = {c.name: Packed([], None) for c in chosen}
    shapes = [(out, in_) for _ in range(model.num_layers) for _, out, in_ in model.layer_linears]
    for index, (out_features, in_features) in enumerate([*shapes, model.lm_head]):
        w = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5  # [out, in]
        for candidate in chosen:
            weight, size = candidate.prepare(w)
            entry = packed[candidate.name]
            if index < len(shapes):
                entry.layers.append((weight, in_features))
                entry.layer_bytes += size
            else:
                entry.lm_head, entry.lm_head_bytes = weight, size
    return packed


def time_layers(candidate: Candidate, packed: Packed, inputs: dict[int, Tensor]) -> float:
    start = time.perf_counter()
    for weight, in_features in packed.layers:
        candidate.run(inputs[in_features], weight)
    return time.perf_counter() - start


def time_lm_head(candidate: Candidate, packed: Packed, inputs: dict[int, Tensor]) -> float:
    x = inputs[next(iter(inputs))]  # the hidden size is the first layer's input
    start = time.perf_counter()
    candidate.run(x, packed.lm_head)
    return time.perf_counter() - start


Samples = tuple[list[float], list[float]]  # seconds per step: (all layer linears, lm_head)


def measure(
    chosen: list[Candidate], packed: dict[str, Packed], model: ModelShapes, rows: int, repeats: int,
    budget: float,
) -> dict[str, Samples]:  # fmt: skip
    """Each candidate's step times at `rows`, the candidates taking turns."""
    generator = torch.Generator().manual_seed(rows)
    in_sizes = dict.fromkeys(in_ for _, _, in_ in model.layer_linears)  # hidden first, in order
    x32 = {in_: torch.randn(rows, in_, generator=generator) for in_ in in_sizes}  # [rows, in]
    inputs = {c.name: {in_: x.to(c.input_dtype) for in_, x in x32.items()} for c in chosen}
    times: dict[str, Samples] = {c.name: ([], []) for c in chosen}
    for candidate in chosen:  # warm-up: first calls allocate, oneDNN builds its primitives
        time_layers(candidate, packed[candidate.name], inputs[candidate.name])
        time_lm_head(candidate, packed[candidate.name], inputs[candidate.name])
    for repeat in range(repeats):
        turn = repeat % len(chosen)
        for candidate in chosen[turn:] + chosen[:turn]:
            layers, head = times[candidate.name]
            if layers and sum(layers) + sum(head) > budget:
                continue
            layers.append(time_layers(candidate, packed[candidate.name], inputs[candidate.name]))
            head.append(time_lm_head(candidate, packed[candidate.name], inputs[candidate.name]))
    return times


Errors = dict[str, tuple[float, float]]  # candidate -> (vs float32, vs the weights it holds)


def select(table: list[Candidate], model: ModelShapes) -> tuple[list[Candidate], dict[str, str], Errors]:
    """The candidates that run here on every shape of the model and pass the check (with their
    errors), and why the others do not."""
    chosen, skipped, errors = [], {}, {}
    shapes = [(out, in_) for _, out, in_ in model.layer_linears] + [model.lm_head]
    for candidate in table:
        reason = candidate.unavailable() or next(filter(None, (candidate.misfit(*s) for s in shapes)), None)
        if reason is None and not candidate.floor:
            try:
                errors[candidate.name] = check(candidate, *model.layer_linears[2][1:])
            except Exception as exc:  # a call that raises is a result: report it, measure the rest
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        if reason is None:
            chosen.append(candidate)
        else:
            skipped[candidate.name] = reason
    return chosen, skipped, errors


# ---- Reporting ------------------------------------------------------------------------------


def host_summary() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx512", "amx")) or "vnni" in f)
    kleidiai = getattr(torch.backends, "kleidiai", None)
    return "\n".join([
        f"CPU: {fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}), "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        f"flags: {' '.join(flags) or 'no avx512 / amx / vnni'}",
        f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}, "
        f"KleidiAI {kleidiai.is_available() if kleidiai else 'n/a'}, "
        f"torchao {'installed (no candidate for it yet)' if importlib.util.find_spec('torchao') else 'not installed'}",
    ])  # fmt: skip


def cell(samples: list[float], repeats: int) -> str:
    text = f"{min(samples) * 1e3:.1f} / {statistics.median(samples) * 1e3:.1f}"
    return text + (f" (n={len(samples)})" if len(samples) < repeats else "")


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def print_timings(
    model: ModelShapes, chosen: list[Candidate], packed: dict[str, Packed],
    results: dict[int, dict[str, Samples]], repeats: int,
) -> None:  # fmt: skip
    num_linears = model.num_layers * len(model.layer_linears)
    print(f"\n### {model.name}: ms per decode step, min / median; {num_linears} layer linears, lm_head apart\n")
    header = ["candidate"]
    for rows in results:
        header += [f"{rows} row{'s' * (rows > 1)}: layers", "lm_head"]
    print(markdown_row([*header, "weights MB (layers + lm_head)", "GB/s at 1 row (layers, lm_head)"]))
    print("|" + "---|" * (len(header) + 2))
    for candidate in chosen:
        entry, line = packed[candidate.name], [candidate.name]
        for by_candidate in results.values():
            layers, head = by_candidate[candidate.name]
            line += [cell(layers, repeats), cell(head, repeats)]
        line.append(f"{entry.layer_bytes / 1e6:.0f} + {entry.lm_head_bytes / 1e6:.0f}")
        if 1 in results:
            layers, head = results[1][candidate.name]
            line.append(f"{entry.layer_bytes / min(layers) / 1e9:.1f}, {entry.lm_head_bytes / min(head) / 1e9:.1f}")
        print(markdown_row(line))


def print_errors(model: ModelShapes, chosen: list[Candidate], errors: Errors) -> None:
    print(f"\nRelative error (Frobenius norm) on a random gate_up {list(model.layer_linears[2][1:])}, 16 rows:\n")
    print("| candidate | vs float32 | vs the weights it holds |\n|---|---|---|")
    for candidate in (c for c in chosen if not c.floor):
        vs_fp32, vs_own = errors[candidate.name]
        print(f"| {candidate.name} | {vs_fp32:.2e} | {vs_own:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--rows", default="1,16,64", help="rows of activations, comma-separated")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per candidate and row count")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds a candidate may use per row count")
    parser.add_argument("--candidates", default="", help="comma-separated parts of candidate names (default: all)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"  # what quantized.linear_dynamic runs on x86
    model = MODELS[args.model]
    wanted = [part.strip().lower() for part in args.candidates.split(",") if part.strip()]
    table = [c for c in candidates() if not wanted or any(part in c.name.lower() for part in wanted)]

    print(host_summary())
    chosen, skipped, errors = select(table, model)
    for name, reason in skipped.items():
        print(f"not measured: {name}: {reason}")
    print(f"packing {model.name} weights for {len(chosen)} candidates ...", file=sys.stderr, flush=True)
    packed = pack_model(model, chosen)
    results, loads = {}, []
    for rows in [int(r) for r in args.rows.split(",")]:
        print(f"timing {rows} rows ...", file=sys.stderr, flush=True)
        before = os.getloadavg()[0]
        results[rows] = measure(chosen, packed, model, rows, args.repeats, args.budget)
        loads.append(f"{rows} rows {before:.1f} -> {os.getloadavg()[0]:.1f}")
    print_timings(model, chosen, packed, results, args.repeats)
    print_errors(model, chosen, errors)
    print(f"\n1-minute load average before -> after each row count: {', '.join(loads)}")


if __name__ == "__main__":
    main()
