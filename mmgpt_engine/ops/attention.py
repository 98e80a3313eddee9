"""Fused attention: the public `flash_attention`, its input checks, and the custom ops shared by
the triton and cuda backends. Layout and conventions follow flash-attn (see `flash_attention`).

Kernel contract (ops.triton.flash_attention and ops.cuda implement the base; the options are
triton's only, and `ops.attention_backend` sends every call that uses one to triton):
  flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, **options) -> (out, lse)
      q (B, S_q, H, D), k/v (B, S_k, H_kv, D), any strides with a contiguous last dim;
      cu_seqlens None or int32 (n_seq + 1,) over a packed batch (B == 1); max_seqlen int;
      prefix None or int32 (n_seq,) prefix lengths (one per batch element, or per packed
      sequence) — given only with causal=True; out (B, S_q, H, D) contiguous, lse (B, H, S_q)
      float32 (-inf where a query sees no key, and out is 0 there).
      options, keywords passed only when in use: cu_seqlens_k int32 (n_seq + 1,) and
      max_seqlen_k int (the keys' own offsets in a packed batch), window (left, right) ints, -1
      unbounded, right == -1 when causal; softcap float > 0; alibi_slopes float32 (H,) or (n_seq, H).
  flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, **options)
      -> (dq, dk, dv) shaped like q, k, v; dk/dv summed over the query heads of each KV group.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import eager, reference
from ._checks import check_kernel_dtype, check_same_device, check_same_dtype, check_tensor
from ._dispatch import attention_backend, kernels, resolve_backend

_ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
# Head dims are zero-padded to a multiple of this before the kernels (as flash-attn does), so rows
# stay 16-byte aligned for vectorized, pipelined loads; padded lanes add 0 to every dot product.
HEAD_DIM_MULTIPLE = 8


def _kernel_options(cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap, alibi_slopes) -> dict:
    """The launchers' keyword options that are in use (none for a call the cuda kernels take)."""
    options = {}
    if cu_seqlens_k is not None:
        options.update(cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)
    if window_left >= 0 or window_right >= 0:
        options["window"] = (window_left, window_right)
    if softcap > 0:
        options["softcap"] = softcap
    if alibi_slopes is not None:
        options["alibi_slopes"] = alibi_slopes
    return options


@torch.library.custom_op("mmgpt::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int, prefix: Optional[Tensor],
    causal: bool, softmax_scale: float, cu_seqlens_k: Optional[Tensor], max_seqlen_k: int, window_left: int,
    window_right: int, softcap: float, alibi_slopes: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    options = _kernel_options(cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap, alibi_slopes)
    return kernels(backend, "flash_attention").flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, causal,
                                                              softmax_scale, **options)


@_flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, cu_seqlens_k, max_seqlen_k, window_left,
      window_right, softcap, alibi_slopes, backend):
    b, s_q, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, s_q), dtype=torch.float32)


@torch.library.custom_op("mmgpt::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Optional[Tensor],
    max_seqlen: int, prefix: Optional[Tensor], causal: bool, softmax_scale: float, cu_seqlens_k: Optional[Tensor],
    max_seqlen_k: int, window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    options = _kernel_options(cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap, alibi_slopes)
    return kernels(backend, "flash_attention").flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                              prefix, causal, softmax_scale, **options)


@_flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, cu_seqlens_k, max_seqlen_k,
      window_left, window_right, softcap, alibi_slopes, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_attn_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, cu_seqlens_k, max_seqlen_k, window_left,
     window_right, softcap, alibi_slopes, backend) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (max_seqlen, causal, softmax_scale, max_seqlen_k, window_left, window_right, softcap, backend)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, prefix, cu_seqlens_k, alibi_slopes)


def _flash_attn_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, prefix, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
    max_seqlen, causal, softmax_scale, max_seqlen_k, window_left, window_right, softcap, backend = ctx.args
    dq, dk, dv = torch.ops.mmgpt.flash_attn_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                prefix, causal, softmax_scale, cu_seqlens_k, max_seqlen_k,
                                                window_left, window_right, softcap, alibi_slopes, backend)
    return (dq, dk, dv) + (None,) * 12


_flash_attn_fwd.register_autograd(_flash_attn_backward, setup_context=_flash_attn_setup_context)


class _Checked(NamedTuple):
    """flash_attention's arguments after the checks, in the kernels' normal form: the window's
    right edge 0 is `causal`, bounds that exclude no key are -1, shared key offsets are None."""
    softmax_scale: float
    causal: bool
    max_seqlen: Optional[int]
    cu_seqlens_k: Optional[Tensor]
    max_seqlen_k: Optional[int]
    window: tuple[int, int]
    softcap: float
    alibi_slopes: Optional[Tensor]

    def options(self) -> tuple[str, ...]:
        """The names of the options in use beyond the base kernel contract."""
        used = (("cu_seqlens_k", self.cu_seqlens_k is not None), ("window_size", self.window != (-1, -1)),
                ("softcap", self.softcap > 0), ("alibi_slopes", self.alibi_slopes is not None))
        return tuple(name for name, on in used if on)


def _check_offsets(name: str, cu: Tensor, total: int, what: str) -> list[int]:
    """Eager value checks of packed offsets; returns the sequence lengths."""
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{name}: expected to start at 0 and end at the packed {what} length {total}, "
                         f"got {bounds[0]} ... {bounds[-1]}")
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if min(lengths) <= 0:
        raise ValueError(f"{name}: expected strictly increasing offsets, got {bounds}")
    return lengths


def _check_max_seqlen(name: str, value: Optional[int], lengths: list[int]) -> int:
    if value is None:
        return max(lengths)
    if value < max(lengths):
        raise ValueError(f"{name}: expected >= the longest sequence ({max(lengths)}), got {value}")
    return value


def _check_int_or_none(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name}: expected an int or None, got {type(value).__name__}")


def _check_window(window_size) -> tuple[int, int]:
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)):
        raise TypeError(f"window_size: expected a pair of ints (left, right), -1 = unbounded, got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size: expected values >= -1 (-1 = unbounded), got ({left}, {right})")
    return left, right


def _check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected a float (0 = off), got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap: expected a finite value >= 0 (0 = off), got {softcap}")
    return float(softcap)


def _check_alibi(alibi_slopes, q: Tensor, n_seq: int, packed: bool) -> None:
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), ndim=(1, 2))
    check_same_device("alibi_slopes", alibi_slopes, "q", q)
    h = q.shape[2]
    allowed = [(h,), (n_seq, h)]
    if tuple(alibi_slopes.shape) not in allowed:
        per = "sequence" if packed else "batch element"
        raise ValueError(f"alibi_slopes: expected shape ({h},) or ({n_seq}, {h}) (one row per {per}), "
                         f"got {tuple(alibi_slopes.shape)}")


def _check_prefix(prefix_len, n_seq: int, key_lengths: Optional[list[int]], s_k: int, packed: bool) -> None:
    """prefix_len: an int or one value per sequence, each <= its key length (key_lengths: of the
    packed sequences; None while tracing, where tensor values are not read)."""
    if prefix_len is None:
        return
    if isinstance(prefix_len, torch.Tensor):
        check_tensor("prefix_len", prefix_len, dtypes=(torch.int32, torch.int64), ndim=1)
        if prefix_len.numel() != n_seq:
            raise ValueError(f"prefix_len: expected one value per {'sequence' if packed else 'batch element'} "
                             f"({n_seq}), got {prefix_len.numel()}")
        if torch.compiler.is_compiling():
            return
        values = prefix_len.tolist()
        if packed:
            if any(p > n for p, n in zip(values, key_lengths)):
                raise ValueError(f"prefix_len: expected each value <= its sequence's key length, got {values} "
                                 f"for key lengths {key_lengths}")
        elif max(values) > s_k:
            raise ValueError(f"prefix_len: expected values <= the key length {s_k}, got max {max(values)}")
        if min(values) < 0:
            raise ValueError(f"prefix_len: expected values >= 0, got min {min(values)}")
    elif isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(f"prefix_len: expected an int, an int tensor or None, got {type(prefix_len).__name__}")
    elif not (packed and key_lengths is None):
        limit = min(key_lengths) if packed else s_k
        if prefix_len < 0 or prefix_len > limit:
            raise ValueError(f"prefix_len: expected 0 <= prefix_len <= {limit} (the key length), got {prefix_len}")


def _normal_window(left: int, right: int, causal: bool, s_q: int, s_k: int) -> tuple[bool, tuple[int, int]]:
    """(causal, (left, right)) with the right edge 0 folded into causal and the bounds that cannot
    exclude a key (left >= S_k - 1, right >= S_q - 1, packed totals bounding every sequence) made -1,
    so that a window the kernels need not apply is not an option in use."""
    if causal or right == 0:
        causal, right = True, -1
    if left >= max(s_k - 1, 0):
        left = -1
    if right >= max(s_q - 1, 0):
        right = -1
    return causal, (left, right)


def _check_attention_inputs(q, k, v, causal, prefix_len, cu_seqlens, max_seqlen, softmax_scale, cu_seqlens_k,
                            max_seqlen_k, window_size, softcap, alibi_slopes) -> _Checked:
    """Validate everything up front; returns the arguments in the kernels' normal form."""
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
    if d == 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim in [1, {MAX_HEAD_DIM}], got {d}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    left, right = _check_window(window_size)
    softcap = _check_softcap(softcap)
    s_k = k.shape[1]
    _check_int_or_none("max_seqlen", max_seqlen)
    _check_int_or_none("max_seqlen_k", max_seqlen_k)
    if cu_seqlens_k is not None and cu_seqlens is None:
        raise ValueError("cu_seqlens_k: expected only together with cu_seqlens (the queries' offsets), got it alone")
    if max_seqlen_k is not None and cu_seqlens_k is None:
        raise ValueError(f"max_seqlen_k: expected only together with cu_seqlens_k, got {max_seqlen_k} without it")
    key_lengths = None
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
        check_same_device("cu_seqlens", cu_seqlens, "q", q)
        if b != 1:
            raise ValueError(f"q: with cu_seqlens expected a packed batch of size 1 (1, total, H, D), got batch {b}")
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected at least 2 entries [0, ..., total], got {cu_seqlens.numel()}")
        if cu_seqlens_k is cu_seqlens:
            cu_seqlens_k, max_seqlen_k = None, None
        if cu_seqlens_k is not None:
            check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=(torch.int32,), ndim=1)
            check_same_device("cu_seqlens_k", cu_seqlens_k, "q", q)
            if cu_seqlens_k.numel() != cu_seqlens.numel():
                raise ValueError(f"cu_seqlens_k: expected {cu_seqlens.numel()} entries (as cu_seqlens), "
                                 f"got {cu_seqlens_k.numel()}")
        elif s_k != s_q:
            raise ValueError(f"k: with cu_seqlens (and no cu_seqlens_k) expected the same packed length as q "
                             f"({s_q}), got {s_k}")
        n_seq = cu_seqlens.numel() - 1
        if torch.compiler.is_compiling():
            # the offsets' values, which a traced graph does not have, are checked eagerly only
            for name, offsets, longest in (("max_seqlen", cu_seqlens, max_seqlen),
                                           ("max_seqlen_k", cu_seqlens_k, max_seqlen_k)):
                if offsets is not None and longest is None:
                    raise ValueError(f"{name}: expected an int with cu_seqlens under torch.compile (the longest "
                                     "length cannot be read from the offsets while tracing), got None")
        else:
            lengths = _check_offsets("cu_seqlens", cu_seqlens, s_q, "query")
            max_seqlen = _check_max_seqlen("max_seqlen", max_seqlen, lengths)
            key_lengths = lengths
            if cu_seqlens_k is not None:
                key_lengths = _check_offsets("cu_seqlens_k", cu_seqlens_k, s_k, "key")
                max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, key_lengths)
                if key_lengths == lengths:  # the same offsets: the base contract covers it
                    cu_seqlens_k, max_seqlen_k = None, None
    else:
        n_seq = b
    _check_prefix(prefix_len, n_seq, key_lengths, s_k, cu_seqlens is not None)
    _check_alibi(alibi_slopes, q, n_seq, cu_seqlens is not None)
    causal, window = _normal_window(left, right, causal or prefix_len is not None, s_q, s_k)
    return _Checked(float(softmax_scale), causal, max_seqlen, cu_seqlens_k, max_seqlen_k, window, softcap,
                    alibi_slopes)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, prefix_len=None,
                    cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                    softmax_scale: Optional[float] = None, return_lse: bool = False,
                    backend: Optional[str] = None, cu_seqlens_k: Optional[Tensor] = None,
                    max_seqlen_k: Optional[int] = None, window_size: tuple[int, int] = (-1, -1),
                    softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None):
    """Exact attention softmax(q k^T * scale) v, tiled so no S x S matrix is stored.

    q: (B, S_q, H, D); k, v: (B, S_k, H_kv, D) with H % H_kv == 0 (GQA/MQA); any head dim up to
    256 (the kernels zero-pad it to a multiple of 8, as flash-attn does); fp16/bf16 (fp32 for
    testing). Strided inputs with a contiguous last dim are read as is. Query i sits at position
    pos(i) = i + S_k - S_q (bottom-right aligned; per sequence when packed).
      causal        key j visible from query i when j <= pos(i).
      prefix_len    int or (B,) int tensor, implies causal: the first prefix_len positions (the
                    image tokens) also see each other bidirectionally (prefix-LM), whatever the
                    window.
      cu_seqlens    int32 [0, l1, l1+l2, ..., total] over a packed (1, total, H, D) batch: each
                    sequence attends within itself only; prefix_len then gives one value per
                    sequence. max_seqlen: the longest length (computed when None).
      cu_seqlens_k  the keys' own offsets over a packed (1, total_k, H_kv, D) k/v, where they
                    differ from the queries' (a prefill after a cached prefix: each sequence's
                    queries are its last keys); max_seqlen_k its longest length.
      window_size   (left, right), -1 = unbounded: key j visible only within
                    [pos(i) - left, pos(i) + right] (sliding window, Mistral); causal sets right 0.
      softcap       > 0: scores become softcap * tanh(scores / softcap) before the mask (Gemma-2).
      alibi_slopes  float32 (H,) or (B, H) (one row per sequence when packed): adds
                    -slope * |pos(i) - j| to the scores; the slopes get no gradient.
      return_lse    also return the float32 log-sum-exp (B, H, S_q) (no gradient flows through it).
    A query that sees no key (causal with S_q > S_k) gets output 0 and lse -inf. The cuda kernels
    take none of cu_seqlens_k / window_size / softcap / alibi_slopes: a call using one runs on
    triton (see `ops.attention_backend`).
    """
    checked = _check_attention_inputs(q, k, v, causal, prefix_len, cu_seqlens, max_seqlen, softmax_scale,
                                      cu_seqlens_k, max_seqlen_k, window_size, softcap, alibi_slopes)
    chosen = resolve_backend(backend, q.device)
    if chosen == "torch":
        return eager.flash_attention(q, k, v, causal=checked.causal, prefix_len=prefix_len,
                                         cu_seqlens=cu_seqlens, softmax_scale=checked.softmax_scale,
                                         return_lse=return_lse, cu_seqlens_k=checked.cu_seqlens_k,
                                         window_size=checked.window, softcap=checked.softcap,
                                         alibi_slopes=alibi_slopes)
    check_kernel_dtype("q", q, chosen)
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(f"alibi_slopes: the {chosen} kernels compute no gradient for the slopes; pass "
                                  "them detached (or use backend='torch')")
    d = q.shape[-1]
    d_kernel = -(-d // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    try:
        chosen = attention_backend(d_kernel, q.dtype, chosen, q.device, options=checked.options())
    except ValueError as e:
        raise ValueError(f"q: {e}") from None
    if d_kernel != d:
        q, k, v = (F.pad(t, (0, d_kernel - d)) for t in (q, k, v))
    prefix = None
    if prefix_len is not None:
        n_seq = cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0]
        if isinstance(prefix_len, Tensor):
            prefix = prefix_len.to(device=q.device, dtype=torch.int32)
        else:
            prefix = torch.full((n_seq,), prefix_len, dtype=torch.int32, device=q.device)
    max_seqlen = q.shape[1] if checked.max_seqlen is None else checked.max_seqlen
    max_seqlen_k = max_seqlen if checked.max_seqlen_k is None else checked.max_seqlen_k
    left, right = checked.window
    out, lse = torch.ops.mmgpt.flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, checked.causal,
                                              checked.softmax_scale, checked.cu_seqlens_k, max_seqlen_k, left,
                                              right, checked.softcap, alibi_slopes, chosen)
    if d_kernel != d:
        out = out[..., :d]
    return (out, lse) if return_lse else out
