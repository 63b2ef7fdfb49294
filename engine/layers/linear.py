"""Linear layers: oneDNN pre-packed weights on CPU (an AMX kernel for steps of a few rows), and
projections fused along the output dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels

# Up to this many rows (a decode step of up to 64 sequences), the AMX small-batch kernel is
# faster than oneDNN's packed matmul (whose fixed cost per call dominates at a few rows) or as fast.
SMALL_BATCH_ROWS = 64


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN's pre-packed bf16 matmul: ~5x faster than F.linear for a few rows on this CPU."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


class Linear(nn.Linear):
    """nn.Linear that can swap its weight for a pre-packed copy once loading is done."""

    packed_weight: torch.Tensor | None = None
    small_weight: torch.Tensor | None = None  # the plain weight, kept for the small-batch kernel

    def pack(self, keep_plain: bool = True) -> None:
        """Replace the weight by oneDNN's packed layout where that is faster (bf16 on CPU), and
        (with `keep_plain`) keep the plain one too where the small-batch kernel takes its shape."""
        if self.packed_weight is None and can_pack(self.weight):
            weight = self.weight.detach()
            # The batch-size hint only tunes the layout; any number of rows works.
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            if keep_plain and kernels.small_linear_fits(weight):
                self.small_weight = weight
            self.weight = None  # forward needs only these (a tied embedding keeps its own)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.small_weight is not None and x.shape[0] <= SMALL_BATCH_ROWS and x.is_contiguous():
            fused = kernels.ops()
            if fused is not None:
                return fused.small_linear(x, self.small_weight, self.bias)
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


def pack_linear_weights(model: nn.Module, plain_copy_budget: int | None = None) -> None:
    """Pack every Linear; keep plain weights for the small-batch kernel unless together they
    take more than `plain_copy_budget` bytes (None: no limit)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    plain_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears if m.weight is not None)
    keep_plain = plain_copy_budget is None or plain_bytes <= plain_copy_budget
    for module in linears:
        module.pack(keep_plain)
