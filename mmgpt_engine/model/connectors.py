"""Connectors: the vision encoder's features (N, T, vision_width) -> image tokens (N, P, n_embd).

  mlp2x_gelu       Linear -> GELU -> Linear (LLaVA-1.5's `mm_projector`)
  mlp2x_gelu_tanh  the same with tanh GELU (the built-in encoders' projector)
  linear           one Linear (LLaVA-1's)
  pixel_shuffle    space-to-depth: each factor x factor block of neighbouring tokens becomes one
                   token of factor^2 x the width, then one Linear without bias (nanoVLM's modality
                   projector, Idefics3's connector): factor^2 fewer image tokens
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class MLP2x(nn.Module):
    def __init__(self, width: int, dim: int, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.fc1 = nn.Linear(width, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class LinearConnector(nn.Module):
    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def pixel_shuffle(x: Tensor, factor: int) -> Tensor:
    """(N, G*G, W) tokens of a row-major G x G grid -> (N, (G/f)^2, f*f*W): token (i, j) of the
    output holds the f x f block at rows f*i.., columns f*j.., row-major inside the block."""
    n, t, w = x.shape
    g = int(round(t ** 0.5))
    if g * g != t or g % factor:
        raise ValueError(f"x: expected a square grid of tokens whose side divides by {factor}, got {t} tokens")
    x = x.reshape(n, g // factor, factor, g // factor, factor, w).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (g // factor) ** 2, factor * factor * w)


class PixelShuffleConnector(nn.Module):
    def __init__(self, width: int, dim: int, factor: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(width * factor * factor, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(pixel_shuffle(x, self.factor))


def build_connector(c: ModelConfig) -> nn.Module:
    w, d = c.vision_width, c.n_embd
    if c.connector == "mlp2x_gelu":
        return MLP2x(w, d, approximate="none")
    if c.connector == "mlp2x_gelu_tanh":
        return MLP2x(w, d, approximate="tanh")
    if c.connector == "linear":
        return LinearConnector(w, d)
    if c.connector == "pixel_shuffle":
        return PixelShuffleConnector(w, d, c.pixel_shuffle_factor)
    raise ValueError(f"connector: expected one of 'mlp2x_gelu', 'mlp2x_gelu_tanh', 'linear', 'pixel_shuffle', "
                     f"got {c.connector!r}")
