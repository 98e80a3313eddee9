"""The vision encoder: image (N, C, H, W) -> `n_image_tokens` tokens of the text width (N, P, n_embd).

  vit  patch embedding (a strided convolution, one token per patch) + a learned position table +
       `vision_layers` bidirectional pre-norm blocks (ops.flash_attention, causal=False)
  cnn  log2(patch_size) stride-2 3x3 convolutions, which leave the same (image / patch)^2 grid
then a norm and a two-layer MLP projector to the model width (LLaVA-1.5's connector).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import Block, Norm
from .config import ModelConfig


class VisionEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c, w = config, config.vision_width
        self.config = config
        if c.vision_type == "vit":
            self.patch_embed = nn.Conv2d(c.in_channels, w, kernel_size=c.patch_size, stride=c.patch_size)
            self.pos_embed = nn.Parameter(torch.zeros(c.n_image_tokens, w))
            self.blocks = nn.ModuleList(
                Block(w, c.vision_heads, c.vision_heads, c.vision_mlp_hidden, norm=c.norm, eps=c.norm_eps, bias=c.bias,
                      dropout=c.dropout)
                for _ in range(c.vision_layers)
            )
            self.convs = nn.ModuleList()
        else:
            chans = c._cnn_channels()
            stride = 2 if c.patch_size > 1 else 1
            self.convs = nn.ModuleList(
                nn.Conv2d(ci, co, kernel_size=3, stride=stride, padding=1) for ci, co in zip(chans[:-1], chans[1:])
            )
            self.blocks = nn.ModuleList()
        self.norm = Norm(w, c.norm, c.norm_eps)
        self.proj_fc = nn.Linear(w, c.n_embd)
        self.proj_out = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, images: Tensor) -> Tensor:
        weight = self.patch_embed.weight if self.config.vision_type == "vit" else self.convs[0].weight
        x = images.to(weight.dtype)
        if self.config.vision_type == "vit":
            h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, P, W)
            delta = None
            for block in self.blocks:
                h, delta = block(h, delta, causal=False)
            y = self.norm(h) if delta is None else self.norm(delta, residual=h)[0]
        else:
            for i, conv in enumerate(self.convs):
                x = conv(x)
                if i < len(self.convs) - 1:
                    x = F.gelu(x)
            y = self.norm(x.flatten(2).transpose(1, 2).contiguous())
        return self.proj_out(F.gelu(self.proj_fc(y), approximate="tanh"))
