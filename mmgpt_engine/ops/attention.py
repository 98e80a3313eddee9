"""Fused attention: the public `flash_attention`, its input checks, and the custom ops shared by
the triton and cuda backends. Layout and conventions follow flash-attn (see `flash_attention`).

Kernel contract (ops.triton.flash_attention and ops.cuda implement both):
  flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale) -> (out, lse)
      q (B, S_q, H, D), k/v (B, S_k, H_kv, D), any strides with a contiguous last dim;
      cu_seqlens None or int32 (n_seq + 1,) over a packed batch (B == 1); max_seqlen int;
      prefix None or int32 (n_seq,) prefix lengths (one per batch element, or per packed
      sequence) — given only with causal=True; out (B, S_q, H, D) contiguous, lse (B, H, S_q)
      float32 (-inf where a query sees no key, and out is 0 there).
  flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, causal, softmax_scale)
      -> (dq, dk, dv) shaped like q, k, v; dk/dv summed over the query heads of each KV group.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._checks import check_kernel_dtype, check_same_device, check_same_dtype, check_tensor
from ._dispatch import attention_backend, kernels, resolve_backend

_ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.library.custom_op("mmgpt::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int, prefix: Optional[Tensor],
    causal: bool, softmax_scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    return kernels(backend, "flash_attention").flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, causal,
                                                              softmax_scale)


@_flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, backend):
    b, s_q, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, s_q), dtype=torch.float32)


@torch.library.custom_op("mmgpt::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Optional[Tensor],
    max_seqlen: int, prefix: Optional[Tensor], causal: bool, softmax_scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend, "flash_attention").flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                              prefix, causal, softmax_scale)


@_flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_attn_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (max_seqlen, causal, softmax_scale, backend)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, prefix)


def _flash_attn_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, prefix = ctx.saved_tensors
    max_seqlen, causal, softmax_scale, backend = ctx.args
    dq, dk, dv = torch.ops.mmgpt.flash_attn_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                prefix, causal, softmax_scale, backend)
    return dq, dk, dv, None, None, None, None, None, None


_flash_attn_fwd.register_autograd(_flash_attn_backward, setup_context=_flash_attn_setup_context)

def _check_attention_inputs(q, k, v, causal, prefix_len, cu_seqlens, max_seqlen, softmax_scale):
    """Validate everything up front; returns (softmax_scale, prefix_len normalised)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=_ATTN_DTYPES, ndim=4, last_dim_contiguous=True)
    for name, t in (("k", k), ("v", v)):
        check_same_dtype(name, t, "q", q)
        check_same_device(name, t, "q", q)
    b, s_q, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"k: expected batch size {b} (q's), got {k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"k: expected head dim {d} (q's), got {k.shape[3]}")
    h_kv = k.shape[2]
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"k: expected a number of heads dividing q's {h} (GQA/MQA), got {h_kv}")
    if d == 0 or d > 256 or d % 8 != 0:
        raise ValueError(f"q: expected a head dim that is a multiple of 8 in [8, 256], got {d}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    s_k = k.shape[1]
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
        raise TypeError(f"max_seqlen: expected an int or None, got {type(max_seqlen).__name__}")
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
        check_same_device("cu_seqlens", cu_seqlens, "q", q)
        if b != 1:
            raise ValueError(f"q: with cu_seqlens expected a packed batch of size 1 (1, total, H, D), got batch {b}")
        if s_k != s_q:
            raise ValueError(f"k: with cu_seqlens expected the same packed length as q ({s_q}), got {s_k}")
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected at least 2 entries [0, ..., total], got {cu_seqlens.numel()}")
        if torch.compiler.is_compiling():
            # the checks below read the offsets' values, which a traced graph does not have
            if max_seqlen is None:
                raise ValueError("max_seqlen: expected an int with cu_seqlens under torch.compile (the longest "
                                 "length cannot be read from cu_seqlens while tracing), got None")
            if prefix_len is not None and not isinstance(prefix_len, (int, torch.Tensor)):
                raise TypeError(f"prefix_len: expected an int, an int tensor or None, got {type(prefix_len).__name__}")
            return float(softmax_scale), max_seqlen
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != s_q:
            raise ValueError(f"cu_seqlens: expected to start at 0 and end at the packed length {s_q}, "
                             f"got {bounds[0]} ... {bounds[-1]}")
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        if min(lengths) <= 0:
            raise ValueError(f"cu_seqlens: expected strictly increasing offsets, got {bounds}")
        if max_seqlen is None:
            max_seqlen = max(lengths)
        elif max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen: expected >= the longest sequence ({max(lengths)}), got {max_seqlen}")
        n_seq, seq_min = len(lengths), min(lengths)
    else:
        n_seq, seq_min = b, min(s_q, s_k)
    if prefix_len is not None:
        limit = seq_min if cu_seqlens is not None else s_k
        if isinstance(prefix_len, torch.Tensor):
            check_tensor("prefix_len", prefix_len, dtypes=(torch.int32, torch.int64), ndim=1)
            if prefix_len.numel() != n_seq:
                raise ValueError(f"prefix_len: expected one value per {'sequence' if cu_seqlens is not None else 'batch element'} "
                                 f"({n_seq}), got {prefix_len.numel()}")
            lo, hi = int(prefix_len.min()), int(prefix_len.max())
            if cu_seqlens is not None:
                over = [p > n for p, n in zip(prefix_len.tolist(), lengths)]
                if any(over):
                    raise ValueError(f"prefix_len: expected each value <= its sequence length, got {prefix_len.tolist()} "
                                     f"for lengths {lengths}")
            elif hi > limit:
                raise ValueError(f"prefix_len: expected values <= the key length {limit}, got max {hi}")
            if lo < 0:
                raise ValueError(f"prefix_len: expected values >= 0, got min {lo}")
        elif isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
            raise TypeError(f"prefix_len: expected an int, an int tensor or None, got {type(prefix_len).__name__}")
        elif prefix_len < 0 or prefix_len > limit:
            raise ValueError(f"prefix_len: expected 0 <= prefix_len <= {limit} (the sequence length), got {prefix_len}")
    return float(softmax_scale), max_seqlen


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, prefix_len=None,
                    cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                    softmax_scale: Optional[float] = None, return_lse: bool = False,
                    backend: Optional[str] = None):
    """Exact attention softmax(q k^T * scale) v, tiled so no S x S matrix is stored.

    q: (B, S_q, H, D); k, v: (B, S_k, H_kv, D) with H % H_kv == 0 (GQA/MQA); D a multiple of 8 up
    to 256; fp16/bf16 (fp32 for testing). Strided inputs with a contiguous last dim are read as is.
      causal      key j visible from query i when j <= i + S_k - S_q (bottom-right aligned).
      prefix_len  int or (B,) int tensor, implies causal: the first prefix_len positions (the
                  image tokens) also see each other bidirectionally (prefix-LM).
      cu_seqlens  int32 [0, l1, l1+l2, ..., total] over a packed (1, total, H, D) batch: each
                  sequence attends within itself only; prefix_len then gives one value per
                  sequence. max_seqlen: the longest length (computed when None).
      return_lse  also return the float32 log-sum-exp (B, H, S_q) (no gradient flows through it).
    A query that sees no key (causal with S_q > S_k) gets output 0 and lse -inf.
    """
    softmax_scale, max_seqlen = _check_attention_inputs(q, k, v, causal, prefix_len, cu_seqlens, max_seqlen,
                                                        softmax_scale)
    chosen = resolve_backend(backend, q.device)
    if chosen == "torch":
        return reference.flash_attention(q, k, v, causal=causal, prefix_len=prefix_len, cu_seqlens=cu_seqlens,
                                         max_seqlen=max_seqlen, softmax_scale=softmax_scale, return_lse=return_lse)
    check_kernel_dtype("q", q, chosen)
    try:
        chosen = attention_backend(q.shape[-1], q.dtype, chosen, q.device)
    except ValueError as e:
        raise ValueError(f"q: {e}") from None
    prefix = None
    if prefix_len is not None:
        causal = True
        n_seq = cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0]
        if isinstance(prefix_len, Tensor):
            prefix = prefix_len.to(device=q.device, dtype=torch.int32)
        else:
            prefix = torch.full((n_seq,), prefix_len, dtype=torch.int32, device=q.device)
    if max_seqlen is None:
        max_seqlen = q.shape[1]
    out, lse = torch.ops.mmgpt.flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, chosen)
    return (out, lse) if return_lse else out
