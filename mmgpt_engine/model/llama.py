"""The Llama family's own pieces (Llama 2/3, SmolLM2, Mistral, Qwen2): the SwiGLU MLP and RoPE's
frequencies, Llama-3's long-context rescaling included.

A Llama-family text block is `blocks.Block(..., norm="rmsnorm", mlp="swiglu")` with rope on q/k and
grouped-query attention; Qwen2 adds q/k/v biases (`qkv_bias`). RoPE rotates the two halves of each
head (`blocks.apply_rope`), the layout of Hugging Face's Llama checkpoints.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up in one matmul (`gate_up` = [gate; up])."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.down.is_residual_projection = True

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None, device=None) -> Tensor:
    """RoPE's inverse frequencies theta^(-2i / head_dim), float32, (head_dim / 2,).

    scaling {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings} (Llama 3.1's long context): wavelengths longer than
    original / low_freq_factor are slowed by `factor`, shorter than original / high_freq_factor
    kept, and those in between interpolated smoothly between the two."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"scaling: expected rope_type 'default' or 'llama3', got {kind!r}")
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, slowed)
