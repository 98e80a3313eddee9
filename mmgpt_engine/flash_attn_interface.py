"""flash-attn 2.x's Python interface over our kernels: switch by changing one import.

    from mmgpt_engine.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Same functions, argument order, defaults and meaning as `flash_attn.flash_attn_interface` (2.x),
so positional calls work; each is a layout conversion around `ops.flash_attention`, which checks
the inputs and picks the backend (triton, cuda, or the PyTorch reference on the CPU).

    q: (batch, seqlen_q, nheads, headdim)    k, v: (batch, seqlen_k, nheads_k, headdim)
    varlen: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim), int32 cu_seqlens
    qkv: (batch, seqlen, 3, nheads, headdim)  kv: (batch, seqlen_k, 2, nheads_k, headdim)
    (varlen: (total, 3, nheads, headdim) and (total_k, 2, nheads_k, headdim))

Supported as flash-attn defines them: softmax_scale (default 1/sqrt(headdim)); causal aligned to
the bottom-right corner when seqlen_q != seqlen_k (a row that sees no key outputs 0); GQA/MQA
(nheads % nheads_k == 0); window_size (left, right), -1 = infinite, query i attending to keys
[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; softcap (> 0 on, <= 0 off);
alibi_slopes float32 (nheads,) or (batch, nheads), adding -slope * |i + seqlen_k - seqlen_q - j|
(the slopes get no gradient); any head dim up to 256 (padded to a multiple of 8 inside, as
flash-attn does); deterministic (our backward is always deterministic: accepted, either value);
return_attn_probs: returns (out, softmax_lse, S_dmask) with the true log-sum-exp, (batch, nheads,
seqlen_q) or, varlen, (nheads, total_q), and S_dmask an empty tensor, which is what flash-attn
returns at dropout_p = 0 (it fills S_dmask only when dropout is on).

Refused with NotImplementedError naming the argument: dropout_p != 0 (our kernels have no
dropout), block_table (paged KV cache) other than None.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops


def _refuse_unsupported(dropout_p, block_table=None) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise NotImplementedError(f"dropout_p: expected 0.0 (the kernels have no attention dropout), got {dropout_p}")
    if block_table is not None:
        raise NotImplementedError("block_table: expected None (the kernels take no paged KV cache), got a "
                                  f"{type(block_table).__name__}")


def _check_deterministic(deterministic) -> None:
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(deterministic).__name__}")


def _softcap(softcap):
    # flash-attn: anything <= 0 turns it off; other types go on to ops' check
    if isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and softcap <= 0:
        return 0.0
    return softcap


def _attention(q, k, v, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
               return_attn_probs, block_table=None, **varlen):
    """(B, S, H, D) attention through ops.flash_attention: (out, lse, S_dmask)."""
    _refuse_unsupported(dropout_p, block_table)
    _check_deterministic(deterministic)
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs: expected a bool, got {type(return_attn_probs).__name__}")
    out, lse = ops.flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                                   softcap=_softcap(softcap), alibi_slopes=alibi_slopes, return_lse=True, **varlen)
    return out, lse, q.new_empty((0,))


def _unpacked(name: str, t: Tensor, n: int, dim: int) -> tuple[Tensor, ...]:
    """The n tensors packed in dim `dim` of t, as strided views (dim 2 of a batch, dim 1 varlen)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim + 3 or t.shape[dim] != n:
        raise ValueError(f"{name}: expected a {dim + 3}-d tensor with {n} packed tensors in dim {dim}, got shape "
                         f"{tuple(t.shape)}")
    return t.unbind(dim)


def _packed_batch(name: str, t: Tensor) -> Tensor:
    """A varlen (total, H, D) tensor as the packed batch (1, total, H, D) ops takes."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name}: expected a 3-d (total, nheads, headdim) tensor, got shape {tuple(t.shape)}")
    return t.unsqueeze(0)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table=None):
    out, lse, s_dmask = _attention(
        _packed_batch("q", q), _packed_batch("k", k), _packed_batch("v", v), dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_attn_probs=return_attn_probs, block_table=block_table,
        cu_seqlens=cu_seqlens_q, max_seqlen=max_seqlen_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)
    # back to (total_q, nheads, headdim); lse (nheads, total_q), as flash-attn's varlen functions
    return (out[0], lse[0], s_dmask) if return_attn_probs else out[0]


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).
    Returns out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask) with
    return_attn_probs (see the module docstring)."""
    out, lse, s_dmask = _attention(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                                   window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                   deterministic=deterministic, return_attn_probs=return_attn_probs)
    return (out, lse, s_dmask) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv: (batch, seqlen, 3, nheads, headdim); q, k and v are read in place (strided views) and
    the gradient lands in qkv's layout."""
    q, k, v = _unpacked("qkv", qkv, 3, 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); kv: (batch, seqlen_k, 2, nheads_k, headdim)."""
    k, v = _unpacked("kv", kv, 2, 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table: Optional[Tensor] = None):
    """q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); cu_seqlens_q/_k int32
    (batch + 1,) offsets (sequence b's queries are q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]], and its
    causal diagonal / window are bottom-right aligned to its own lengths); max_seqlen_q/_k the
    longest lengths. Returns out (total_q, nheads, headdim), or (out, softmax_lse (nheads,
    total_q), S_dmask) with return_attn_probs."""
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                             return_attn_probs, block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv: (total, 3, nheads, headdim) with int32 cu_seqlens (batch + 1,)."""
    q, k, v = _unpacked("qkv", qkv, 3, 1)
    return _varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                             causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (total_q, nheads, headdim); kv: (total_k, 2, nheads_k, headdim)."""
    k, v = _unpacked("kv", kv, 2, 1)
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                             return_attn_probs)


__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]
