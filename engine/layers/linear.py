"""Linear layers on CPU: oneDNN pre-packed weights with an AMX kernel for decode-sized steps
where the CPU has AMX, an AVX2 FMA kernel where it does not; and projections fused along the
output dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.layers.quantized import QuantizedWeight, quantized_linear

# Up to this many rows (decode steps, and decodes with prompts joining them) the AMX kernel
# beats oneDNN's packed matmul, whose fixed cost per call dominates with few rows. Measured on a
# 2-core Sapphire Rapids, SmolLM2's 120 layer linears: 10.4 vs 11.9 ms at 16 rows, 13.4 vs 18.0
# at 64, 25.3 vs 29.9 at 192, even at 256; beyond, oneDNN's blocking wins (2,048 rows: 221 vs
# 171 ms). Other CPUs with AMX may move the crossover. The AMX kernel gives every row the same
# result whatever the row count; oneDNN does not always (SmolLM2's down_proj at 197-254 rows,
# Qwen2.5-0.5B's from 37 rows sum in another order), so this bound also decides which steps are
# batch-invariant to the bit.
AMX_MAX_ROWS = 256


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN's pre-packed bf16 matmul, on a CPU with AVX-512 (oneDNN refuses bf16 weights
    without it): ~5x faster than F.linear for a few rows on the Sapphire Rapids it was measured on."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class Linear(nn.Linear):
    """nn.Linear that can swap its weight for a pre-packed copy once loading is done."""

    packed_weight: torch.Tensor | None = None
    amx_weight: torch.Tensor | None = None  # the same weight in the AMX kernel's tile layout
    fma_weight: torch.Tensor | None = None  # in the FMA kernel's panels, where there is no AMX
    quant_parts: list[QuantizedWeight] | None = None  # GGUF blocks, kept quantized

    def pack(self, with_amx: bool = True) -> None:
        """Replace a bf16 weight on CPU by the layout of the kernel that will run it:
        - with AMX, oneDNN's packed layout plus (`with_amx`) a copy in the AMX kernel's tiles
          for steps of up to AMX_MAX_ROWS rows;
        - elsewhere, the FMA kernel's panels: its rows never depend on each other, where
          oneDNN's sums do (on an AVX-512 EPYC without AMX, greedy tokens changed with the
          batch), and torch's own bf16 matmul was 5-10x slower on an AVX2-only EPYC;
        - oneDNN's packed layout where neither kernel takes the weight."""
        if self.weight is None:
            return
        weight = self.weight.detach()
        has_amx = kernels.amx_linear_fits(weight)
        if can_pack(weight) and (has_amx or not kernels.fma_linear_fits(weight)):
            # The batch-size hint only tunes the layout; any number of rows works.
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            if with_amx and has_amx:
                self.amx_weight = kernels.amx_tiles(weight)
        elif kernels.fma_linear_fits(weight):
            self.fma_weight = kernels.fma_panels(weight)
        else:
            return
        self.weight = None  # forward needs only these (a tied embedding keeps its own)

    def weight_tensors(self) -> list[torch.Tensor]:
        """What the layer computes with besides its parameters (see loader.weight_bytes)."""
        held = [self.packed_weight, self.amx_weight, self.fma_weight]
        held += [part.blocks for part in self.quant_parts or []]
        return [t for t in held if t is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_parts is not None:
            out = quantized_linear(x.reshape(-1, x.shape[-1]).contiguous(), self.quant_parts, self.bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        if self.fma_weight is not None:
            if x.dim() == 2 and x.stride(-1) == 1:  # the model's [tokens, features]
                return kernels.ops().fma_linear(x, self.fma_weight, self.bias)
            out = kernels.ops().fma_linear(x.reshape(-1, x.shape[-1]).contiguous(), self.fma_weight, self.bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        if self.amx_weight is not None and x.shape[0] <= AMX_MAX_ROWS and x.stride(-1) == 1:
            fused = kernels.ops()
            if fused is not None:
                return fused.amx_linear(x, self.amx_weight, self.bias)
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """One matmul for several projections of the same input (q/k/v, gate/up).

    `output_sizes[i]` rows of the weight, in order, belong to shard i; the loader copies each
    checkpoint tensor into its shard's rows.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)

    def shard_rows(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])


def pack_linear_weights(model: nn.Module, amx_copy_budget: int | None = None) -> None:
    """Pack every Linear; add the AMX kernel's copies unless together they would take more
    than `amx_copy_budget` bytes (None: no limit)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    copy_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears if m.weight is not None)
    with_amx = amx_copy_budget is None or copy_bytes <= amx_copy_budget
    for module in linears:
        module.pack(with_amx)
