"""RMSNorm as Llama defines it, optionally adding the residual stream first."""

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual)."""
        fused = kernels.use_for(x)
        if fused is not None and x.dim() == 2:
            if residual is None:
                return fused.rms_norm(x, None, self.weight, self.eps)
            return fused.rms_norm(x, residual, self.weight, self.eps), residual  # residual += x
        if residual is not None:
            x = residual = x + residual
        # NOTE: normalise in float32 and round to the model dtype before scaling, as the
        # reference implementation does; scaling in float32 first shifts bf16 logits enough to
        # change greedy answers.
        normed = self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        return normed if residual is None else (normed, residual)
