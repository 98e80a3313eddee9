"""CLIP's vision tower (Hugging Face `CLIPVisionModel`, OpenAI's ViT-L/14-336 in LLaVA-1.5) on our
blocks: patch convolution without bias, a class token, learned positions, a LayerNorm before the
blocks ("pre_layrnorm"), pre-norm blocks with quick-GELU MLPs.

Only the layers up to `vision_feature_layer` are built (LLaVA reads hidden_states[-2], so the last
layer would never run); the post-layernorm acts on the pooled class token alone, which a VLM does
not use. The weights' names: hf.py.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import Norm, encoder_blocks, run_encoder
from .config import ModelConfig


class CLIPVisionTower(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        w = c.vision_width
        self.keep_class_token = c.vision_feature_select == "full"
        self.patch_embed = nn.Conv2d(c.in_channels, w, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.pos_embed = nn.Parameter(torch.zeros(c.vision_seq_len, w))
        self.pre_norm = Norm(w, "layernorm", c.vision_norm_eps)
        self.blocks = encoder_blocks(c.vision_layers_used, w, c.vision_heads, c.vision_mlp_hidden, norm="layernorm",
                                     eps=c.vision_norm_eps, bias=True, act=c.vision_act)

    def reset_embeddings(self, std: float) -> None:
        nn.init.normal_(self.pos_embed, std=std)
        nn.init.normal_(self.class_embedding, std=std)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        h = self.pre_norm(torch.cat([cls, patches], dim=1) + self.pos_embed)
        h, delta = run_encoder(self.blocks, h)
        if delta is not None:
            h = h + delta
        return h if self.keep_class_token else h[:, 1:]
