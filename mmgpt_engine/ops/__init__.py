"""mmgpt_engine.ops: the kernel library (the only public kernel API).

    from mmgpt_engine import ops
    out = ops.flash_attention(q, k, v, causal=True)          # q: (B, S, H, D), k/v: (B, S, H_kv, D)
    y, h = ops.layer_norm(x, w, b, residual=r)                 # fused residual add
    loss = ops.cross_entropy(logits, target)                   # online log-sum-exp over the vocab
    loss = ops.linear_cross_entropy(hidden, lm_head.weight, target)  # never holds the logits

Every op takes `backend=` ("torch", "triton", "cuda"); without it the MMGPT_BACKEND environment
variable decides, else the best backend available for the tensors' device (see `_dispatch`).
"""
from . import reference
from ._dispatch import BACKEND_ENV_VAR, BACKENDS, attention_backend, available_backends, unavailable_reason
from .attention import flash_attention
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .reference import IGNORE_INDEX
from .norms import layer_norm, rms_norm
from .softmax import softmax

__all__ = [
    "BACKEND_ENV_VAR",
    "IGNORE_INDEX",
    "BACKENDS",
    "attention_backend",
    "available_backends",
    "cross_entropy",
    "flash_attention",
    "layer_norm",
    "linear_cross_entropy",
    "reference",
    "rms_norm",
    "softmax",
    "unavailable_reason",
]
