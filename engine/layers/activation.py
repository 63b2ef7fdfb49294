"""The SwiGLU MLP with its gate and up projections fused into one matmul."""

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.layers.linear import Linear, MergedLinear


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [num_tokens, 2 * intermediate] holding gate then up."""
    fused = kernels.use_for(gate_up)
    if fused is not None:
        return fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
