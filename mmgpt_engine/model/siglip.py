"""SigLIP's vision tower (Hugging Face `SiglipVisionModel`: LLaVA-NeXT, nanoVLM, PaliGemma) on our
blocks: patch convolution with bias, learned positions, no class token, pre-norm blocks with
tanh-GELU MLPs, and a post-layernorm (applied to the selected features with `vision_post_norm`,
which at vision_feature_layer -1 gives Hugging Face's `last_hidden_state`).

Its attention-pooling head serves image-text matching and is not built. Only the layers up to
`vision_feature_layer` are. The weights' names: hf.py.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import Norm, encoder_blocks, run_encoder
from .config import ModelConfig


class SiglipVisionTower(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        w = c.vision_width
        self.patch_embed = nn.Conv2d(c.in_channels, w, kernel_size=c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(c.vision_seq_len, w))
        self.blocks = encoder_blocks(c.vision_layers_used, w, c.vision_heads, c.vision_mlp_hidden, norm="layernorm",
                                     eps=c.vision_norm_eps, bias=True, act=c.vision_act)
        self.post_norm = Norm(w, "layernorm", c.vision_norm_eps) if c.vision_post_norm else None

    def reset_embeddings(self, std: float) -> None:
        nn.init.normal_(self.pos_embed, std=std)

    def forward(self, pixel_values: Tensor) -> Tensor:
        h = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2) + self.pos_embed
        h, delta = run_encoder(self.blocks, h)
        if self.post_norm is not None:
            return self.post_norm(h) if delta is None else self.post_norm(delta, residual=h)[0]
        return h if delta is None else h + delta
