"""The vision side: image (N, C, H, W) -> `n_image_tokens` tokens of the text width (N, P, n_embd).

    model.vision.features(pixel_values)   # the encoder's (selected) hidden states (N, T, vision_width)
    model.vision(pixel_values)            # the connector applied to them: the image tokens

`VisionEncoder` = a tower + a connector (connectors.py). Towers, by `vision_type`:
  vit     ours, trained from scratch: patch embedding (a strided convolution, one token per patch) +
          a learned position table + `vision_layers` bidirectional pre-norm blocks + a final norm
  cnn     ours: log2(patch_size) stride-2 3x3 convolutions (the same (image / patch)^2 grid) + a norm
  clip    Hugging Face CLIPVisionModel (clip.py)
  siglip  Hugging Face SiglipVisionModel (siglip.py)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import Norm, encoder_blocks, init_weights, run_encoder
from .config import ModelConfig
from .connectors import build_connector


def sincos_2d(grid: int, width: int, base: float = 10000.0) -> Tensor:
    """(grid * grid, width): per patch, sin/cos of its row in the first half of the channels and of
    its column in the second (MAE's fixed 2-d embedding); width must be a multiple of 4."""
    if width % 4:
        raise ValueError(f"vision_width: sincos positions need a multiple of 4, got {width}")
    freq = 1.0 / base ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    parts = [f(axis.reshape(-1, 1) * freq) for axis in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


class ViTTower(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        w = c.vision_width
        self.patch_embed = nn.Conv2d(c.in_channels, w, kernel_size=c.patch_size, stride=c.patch_size)
        if c.vision_pos_embedding == "sincos":
            # fixed 2-d sin-cos positions: a patch's row and column are readable from the first step
            self.register_buffer("pos_embed", sincos_2d(c.image_size // c.patch_size, w), persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(c.vision_seq_len, w))
        self.blocks = encoder_blocks(c.vision_layers, w, c.vision_heads, c.vision_mlp_hidden, norm=c.norm,
                                     eps=c.vision_norm_eps, bias=c.bias, act=c.vision_act, dropout=c.dropout)
        self.norm = Norm(w, c.norm, c.vision_norm_eps)

    def reset_embeddings(self, std: float) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=std)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2) + self.pos_embed  # (N, P, W)
        h, delta = run_encoder(self.blocks, h)
        return self.norm(h) if delta is None else self.norm(delta, residual=h)[0]


class CNNTower(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        chans = c._cnn_channels()
        stride = 2 if c.patch_size > 1 else 1
        self.convs = nn.ModuleList(
            nn.Conv2d(ci, co, kernel_size=3, stride=stride, padding=1) for ci, co in zip(chans[:-1], chans[1:])
        )
        self.norm = Norm(c.vision_width, c.norm, c.vision_norm_eps)

    def reset_embeddings(self, std: float) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.convs[0].weight.dtype)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.gelu(x)
        return self.norm(x.flatten(2).transpose(1, 2).contiguous())


def build_tower(c: ModelConfig) -> nn.Module:
    if c.vision_type == "vit":
        return ViTTower(c)
    if c.vision_type == "cnn":
        return CNNTower(c)
    if c.vision_type == "clip":
        from .clip import CLIPVisionTower

        return CLIPVisionTower(c)
    if c.vision_type == "siglip":
        from .siglip import SiglipVisionTower

        return SiglipVisionTower(c)
    raise ValueError(f"vision_type: expected one of 'vit', 'cnn', 'clip', 'siglip', got {c.vision_type!r}")


class VisionEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tower = build_tower(config)
        self.connector = build_connector(config)

    def reset_parameters(self) -> None:
        """Random initialisation (a pretrained tower's weights are loaded over it, see hf.py)."""
        c = self.config
        init_weights(self, c.init_std, max(c.vision_layers_used, 1))
        self.tower.reset_embeddings(c.init_std)

    def features(self, pixel_values: Tensor) -> Tensor:
        """The tower's hidden states that feed the connector (N, T, vision_width): for clip/siglip
        Hugging Face's `hidden_states[vision_feature_layer]`, class token dropped unless
        vision_feature_select is 'full'."""
        return self.tower(pixel_values)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.connector(self.features(pixel_values))
