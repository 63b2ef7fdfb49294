"""Rotary position embeddings (default, linear and llama3 frequency scaling)."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import RopeConfig


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies, [head_dim // 2] float32, after the configured scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    if rope.freq_factors:
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are slowed down by `factor`, short ones kept, and the band between the
    # two cut-offs interpolated linearly in 1 / wavelength.
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    long_cutoff = old_len / rope.low_freq_factor
    short_cutoff = old_len / rope.high_freq_factor
    scaled = torch.where(wavelen > long_cutoff, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = (wavelen >= short_cutoff) & (wavelen <= long_cutoff)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos / sin tables indexed by position.

    The table is built on first use on the device of the positions, so the module can be
    created on the meta device and materialised later.
    """

    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.rope = rope
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _build(self, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq = rope_inv_freq(self.head_dim, self.rope).to(device)
        positions = torch.arange(self.max_position, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim // 2]
        cos, sin = freqs.cos(), freqs.sin()
        self._cos = torch.cat((cos, cos), dim=-1).to(dtype)  # [max_position, head_dim]
        # The sign of rotate_half is folded into the table: x * cos + swap_halves(x) * sin.
        self._sin = torch.cat((-sin, sin), dim=-1).to(dtype)

    def tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for every position, [max_position, head_dim] each."""
        if self._cos is None or self._cos.device != device or self._cos.dtype != dtype:
            self._build(device, dtype)
        return self._cos, self._sin

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryInputs:
        cos, sin = self.tables(positions.device, dtype)
        return RotaryInputs(positions, cos, sin)


class RotaryInputs:
    """One step's rotary angles: the whole tables plus each token's position. The fused kernel
    reads the tables; the eager path gathers per-token rows once per step, on first use."""

    def __init__(self, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor) -> None:
        self.positions = positions
        self.cos_table = cos_table
        self.sin_table = sin_table
        self._per_token: tuple[torch.Tensor, torch.Tensor] | None = None

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of each token, [num_tokens, 1, head_dim] each."""
        if self._per_token is None:
            self._per_token = (
                self.cos_table[self.positions].unsqueeze(1),
                self.sin_table[self.positions].unsqueeze(1),
            )
        return self._per_token


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [num_tokens, num_heads, head_dim] by the angles in cos / sin (rotate_half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin
