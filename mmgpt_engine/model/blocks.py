"""Transformer pieces shared by the text stacks and the vision encoders: norm, attention, MLP, block.

Every hot path goes through `mmgpt_engine.ops` with the module's `backend` (None = the ops'
own dispatch), so one model runs on the torch, triton and cuda kernels.

Blocks are pre-norm and carry the residual stream as a pair (h, delta): the next norm adds the
branch output to the stream and normalises in one fused call (`ops.layer_norm(delta,
residual=h)` returns (norm(h + delta), h + delta)), so the add never costs its own pass.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .llama import SwiGLU, rope_inv_freq


class Norm(nn.Module):
    """LayerNorm (weight + bias) or RMSNorm (weight) over the last dim, optionally fusing a residual add."""

    def __init__(self, dim: int, kind: str = "layernorm", eps: float = 1e-5):
        super().__init__()
        self.kind, self.eps, self.backend = kind, eps, None
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps, residual=residual, backend=self.backend)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, backend=self.backend)


def rope_tables(positions: Tensor, head_dim: int, theta: float, scaling: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (..., S, 1, head_dim / 2) in float32 for integer `positions` (..., S);
    `scaling`: a rope_scaling mapping (llama3), see llama.rope_inv_freq."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of each head (the GPT-NeoX/LLaMA layout); x: (B, S, H, D)."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention through `ops.flash_attention`.

    One fused q/k/v projection laid out [q heads | k heads | v heads], so with n_kv_head == n_head
    it is GPT-2's c_attn (and Llama's q_proj, k_proj, v_proj stacked). Attention has no dropout of
    its own (the kernels take none). `qkv_bias` (None -> `bias`): Qwen2 has q/k/v biases only.
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int, bias: bool, qkv_bias: Optional[bool] = None):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.qkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(n_head * self.head_dim, dim, bias=bias)
        self.proj.is_residual_projection = True
        self.backend = None

    def forward(self, x: Tensor, *, causal: bool = False, prefix_len=None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, rope: Optional[tuple[Tensor, Tensor]] = None,
                cache=None, layer_idx: int = 0, window_size: Optional[tuple[int, int]] = None) -> Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        window = {} if window_size is None else {"window_size": window_size}  # Mistral's sliding window
        y = ops.flash_attention(q, k, v, causal=causal, prefix_len=prefix_len, cu_seqlens=cu_seqlens,
                                max_seqlen=max_seqlen, backend=self.backend, **window)
        return self.proj(y.reshape(b, s, self.n_head * self.head_dim))


def activation(x: Tensor, kind: str) -> Tensor:
    """gelu_tanh: GPT-2's and SigLIP's GELU; gelu: the exact (erf) one; quick_gelu: CLIP's x * sigmoid(1.702 x)."""
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "gelu":
        return F.gelu(x)
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"kind: expected 'gelu_tanh', 'gelu' or 'quick_gelu', got {kind!r}")


class MLP(nn.Module):
    """fc -> activation -> proj (GPT-2's c_fc / c_proj, CLIP's and SigLIP's fc1 / fc2)."""

    def __init__(self, dim: int, hidden: int, bias: bool, act: str = "gelu_tanh"):
        super().__init__()
        self.act = act
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.proj.is_residual_projection = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(activation(self.fc(x), self.act))


class Block(nn.Module):
    """Pre-norm transformer block over the residual pair (h, delta); see the module docstring.
    `mlp`: an activation for the two-layer MLP, or "swiglu" (the Llama family's gate/up/down)."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, mlp_hidden: int, *, norm: str, eps: float,
                 bias: bool, dropout: float, qkv_bias: Optional[bool] = None, mlp: str = "gelu_tanh"):
        super().__init__()
        self.norm1 = Norm(dim, norm, eps)
        self.attn = Attention(dim, n_head, n_kv_head, bias, qkv_bias)
        self.norm2 = Norm(dim, norm, eps)
        self.mlp = SwiGLU(dim, mlp_hidden, bias) if mlp == "swiglu" else MLP(dim, mlp_hidden, bias, act=mlp)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, delta: Optional[Tensor], **attn_kwargs) -> tuple[Tensor, Tensor]:
        if delta is None:
            y = self.norm1(h)
        else:
            y, h = self.norm1(delta, residual=h)
        a = self.drop(self.attn(y, **attn_kwargs))
        y, h = self.norm2(a, residual=h)
        return h, self.drop(self.mlp(y))


def encoder_blocks(n: int, dim: int, heads: int, mlp_hidden: int, *, norm: str, eps: float, bias: bool, act: str,
                   dropout: float = 0.0) -> nn.ModuleList:
    """`n` bidirectional pre-norm blocks of a vision encoder (multi-head: as many k/v heads as q)."""
    return nn.ModuleList(Block(dim, heads, heads, mlp_hidden, norm=norm, eps=eps, bias=bias, dropout=dropout, mlp=act)
                         for _ in range(n))


def run_encoder(blocks: nn.ModuleList, h: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The residual pair (h, delta) after `blocks` (no mask: every token sees every other);
    the hidden state is h + delta (delta None when there are no blocks)."""
    delta = None
    for block in blocks:
        h, delta = block(h, delta, causal=False)
    return h, delta


def init_weights(module: nn.Module, std: float, n_residual_layers: int) -> None:
    """GPT-2 initialisation: N(0, std) weights, zero biases, unit norms; residual projections get
    std / sqrt(2 * layers) so the residual stream's variance does not grow with depth."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            s = std / math.sqrt(2 * n_residual_layers) if getattr(m, "is_residual_projection", False) else std
            nn.init.normal_(m.weight, mean=0.0, std=s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, Norm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
