"""The `torch` backend's production path: each op through the fastest route on the tensors' device,
with the semantics of `ops.reference`: on float32 CPU tensors the norms, softmax, cross-entropy
and attention run the compiled CPU kernels of `ops.cpu` (csrc/cpu/kernels.cpp); everything else
(and everywhere those kernels cannot be built) a plain-PyTorch route (SDPA, `F.layer_norm`,
`F.cross_entropy`, ...).

`ops.reference` stays the obviously-right ground truth (float64-capable, every option, what the
tests compare against); this module is what a CPU run (or `backend="torch"` anywhere) executes.
Each function handles the common cases itself and hands anything else (an option the fast route
cannot express exactly) to the reference, so the two never disagree on what an op means:
  - 16-bit inputs are computed in float32 and cast back, as the reference and the kernels do;
  - attention: on float32 CPU tensors the CPU kernel (`ops.cpu.attention`: flash-attn's layout
    read in place, each query row's visible keys as one run [lo, hi), which every mask here is);
    elsewhere SDPA with a boolean mask (causal bottom-right, prefix-LM, sliding window,
    per-sequence blocks of a packed batch); GQA without repeating k/v in both; `return_lse`,
    softcap, ALiBi, separate key offsets and a window over packed sequences go to the reference;
  - a softmax row or an attention query that sees nothing gives 0 (SDPA's own rule on the CPU);
  - cross-entropy's mean over no scored row is 0, not NaN.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import reference

_cpu_module = None


def _cpu():
    """ops.cpu, imported on first use (so that `python -m mmgpt_engine.ops.cpu` runs it as __main__
    without the package having imported it first)."""
    global _cpu_module
    if _cpu_module is None:
        from . import cpu

        _cpu_module = cpu
    return _cpu_module

_LOW = (torch.float16, torch.bfloat16)


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _LOW else t


# ----------------------------------------------------------------------------------------- norms
def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    if _cpu().eligible(x, residual, weight, bias):
        return _cpu().norm(x, weight, bias, residual, eps, is_rms=False)
    h = x if residual is None else x + residual
    hc = _compute(h)
    w = weight.to(hc.dtype) if weight is not None else None
    b = bias.to(hc.dtype) if bias is not None else None
    y = F.layer_norm(hc, (h.shape[-1],), w, b, eps).to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm(x, weight=None, eps=1e-6, residual=None, *, offset=0.0, casting_mode="gemma"):
    if offset or casting_mode != "gemma":
        return reference.rms_norm(x, weight, eps, residual=residual, offset=offset, casting_mode=casting_mode)
    if _cpu().eligible(x, residual, weight):
        return _cpu().norm(x, weight, None, residual, eps, is_rms=True)
    h = x if residual is None else x + residual
    hc = _compute(h)
    w = weight.to(hc.dtype) if weight is not None else None
    y = F.rms_norm(hc, (h.shape[-1],), w, eps).to(x.dtype)
    return y if residual is None else (y, h)


# --------------------------------------------------------------------------------------- softmax
def softmax(x, scale=1.0, mask=None, causal=False):
    if mask is None and _cpu().eligible(x):
        return _cpu().softmax(x, scale, causal)
    xc = _compute(x)
    s = xc * scale if scale != 1.0 else xc
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            s = s + mask.to(s.dtype)
    if causal:
        c = _causal_keep(x.shape[-2], x.shape[-1], x.device)
        keep = c if keep is None else keep & c
    if keep is None:
        return torch.softmax(s, dim=-1).to(x.dtype)
    s = s.masked_fill(~keep, float("-inf"))
    # a row with every column masked is 0, not NaN (as the reference and the kernels give): the
    # slower safe softmax only where the (broadcast, small) mask has such a row
    if bool(keep.any(-1).all()):
        return torch.softmax(s, dim=-1).to(x.dtype)
    return torch._safe_softmax(s, -1).to(x.dtype)


@functools.lru_cache(maxsize=64)
def _causal_keep(m: int, n: int, device) -> torch.Tensor:
    return reference.causal_keep(m, n, device)


@functools.lru_cache(maxsize=64)
def _keep_mask(s_q: int, s_k: int, causal: bool, prefix_len: Optional[int], window: tuple, device):
    return reference.attention_keep_mask(s_q, s_k, causal=causal, prefix_len=prefix_len, window_size=window,
                                         device=device)


# --------------------------------------------------------------------------------- cross-entropy
def cross_entropy(logits, target, ignore_index=reference.IGNORE_INDEX, reduction="mean", **options):
    """options: reference.cross_entropy's keywords (weight, label_smoothing, lse_square_scale,
    softcap, return_z_loss)."""
    if any(options.get(k) for k in ("lse_square_scale", "softcap", "return_z_loss")):
        return reference.cross_entropy(logits, target, ignore_index, reduction, **options)
    smoothing = float(options.get("label_smoothing", 0.0) or 0.0)
    weight = options.get("weight")
    if weight is None and not smoothing and _cpu().eligible(logits):
        return _cpu().cross_entropy(logits, target, ignore_index, reduction)
    v = logits.shape[-1]
    lc = _compute(logits).reshape(-1, v)
    t = target.reshape(-1)
    w = weight.to(lc.dtype) if weight is not None else None
    kw = dict(weight=w, ignore_index=ignore_index, label_smoothing=smoothing)
    if reduction == "mean":
        valid = t != ignore_index
        # a host read is free on the CPU (not under torch.compile, where it would break the graph):
        # PyTorch's own mean, unless nothing is scored
        if logits.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(valid.any()):
                return F.cross_entropy(lc, t, reduction="mean", **kw)
            return lc.narrow(-1, 0, 0).sum()  # 0 with a zero gradient, where PyTorch's mean is NaN
        total = F.cross_entropy(lc, t, reduction="sum", **kw)
        denom = valid.sum().to(lc.dtype) if w is None else w[t.clamp_min(0)].masked_fill(~valid, 0).sum()
        return total / torch.where(denom > 0, denom, torch.ones_like(denom))
    loss = F.cross_entropy(lc, t, reduction=reduction, **kw)
    return loss.reshape(target.shape) if reduction == "none" else loss


# ------------------------------------------------------------------------------------- attention
def _packed_keep(cu_seqlens: torch.Tensor, causal: bool, prefix) -> torch.Tensor:
    """(total, total) bool: each packed sequence sees only itself, causally (+ its prefix block)."""
    total = int(cu_seqlens[-1])
    cu = cu_seqlens.to(torch.long)
    pos_all = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], pos_all, right=True)
    pos = pos_all - cu[seq]
    keep = seq.unsqueeze(1) == seq.unsqueeze(0)
    if causal:
        visible = pos.unsqueeze(0) <= pos.unsqueeze(1)
        if prefix is not None:
            p = prefix.to(device=cu.device, dtype=torch.long)[seq] if isinstance(prefix, torch.Tensor) \
                else torch.full_like(seq, int(prefix))
            visible = visible | ((pos.unsqueeze(0) < p.unsqueeze(1)) & (pos.unsqueeze(1) < p.unsqueeze(1)))
        keep = keep & visible
    return keep


def key_ranges(keep: Optional[torch.Tensor], s_q: int, s_k: int) -> Optional[torch.Tensor]:
    """The CPU attention kernel's form of a keep mask (None, (S_q, S_k) or (B, S_q, S_k) bool):
    int32 (1 or B, S_q, 2), row i's visible keys [lo, hi) ([0, 0) for a row that sees none); None
    where some row's visible keys are not one contiguous run (the kernel cannot express it)."""
    if keep is None:
        return torch.tensor([0, s_k], dtype=torch.int32).expand(1, s_q, 2).contiguous()
    keep = keep.reshape(-1, s_q, s_k).cpu()
    seen = keep.any(-1)
    as_int = keep.to(torch.int8)
    lo = torch.where(seen, as_int.argmax(-1), 0)
    hi = torch.where(seen, s_k - as_int.flip(-1).argmax(-1), 0)
    if not bool((keep.sum(-1) == hi - lo).all()):
        return None
    return torch.stack((lo, hi), dim=-1).to(torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _dense_ranges(s_q: int, s_k: int, causal: bool, prefix_len: Optional[int], window: tuple):
    return key_ranges(_keep_mask(s_q, s_k, causal, prefix_len, window, torch.device("cpu")), s_q, s_k)


def _attention_kernel_ranges(q, k, v, causal, prefix_len, cu_seqlens, window) -> Optional[torch.Tensor]:
    """ranges for ops.cpu.attention where it runs this call (float32 CPU q, k, v of one head dim,
    4-d, keys present, every row's keys one run), else None."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k.shape[1] == 0 or q.shape[-1] != k.shape[-1] \
            or not _cpu().eligible(q, k, v):
        return None
    s_q, s_k = q.shape[1], k.shape[1]
    if cu_seqlens is not None:
        return key_ranges(_packed_keep(cu_seqlens, causal, prefix_len), s_q, s_k)
    if isinstance(prefix_len, torch.Tensor):
        return key_ranges(reference.attention_keep_mask(s_q, s_k, causal=causal, prefix_len=prefix_len,
                                                        window_size=window), s_q, s_k)
    return _dense_ranges(s_q, s_k, causal, prefix_len, window)


def flash_attention(q, k, v, *, causal=False, prefix_len=None, cu_seqlens=None, max_seqlen=None,
                    softmax_scale=None, return_lse=False, **options):
    window = tuple(options.get("window_size") or (-1, -1))
    plain = not return_lse and not options.get("softcap") and options.get("alibi_slopes") is None \
        and options.get("cu_seqlens_k") is None and (window == (-1, -1) or cu_seqlens is None)
    if not plain:
        return reference.flash_attention(q, k, v, causal=causal, prefix_len=prefix_len, cu_seqlens=cu_seqlens,
                                         max_seqlen=max_seqlen, softmax_scale=softmax_scale,
                                         return_lse=return_lse, **options)
    if prefix_len is not None:
        causal = True
    ranges = _attention_kernel_ranges(q, k, v, causal, prefix_len, cu_seqlens, window)
    if ranges is not None:
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return _cpu().attention(q, k, v, ranges, scale)
    s_q, s_k = q.shape[1], k.shape[1]
    if cu_seqlens is not None:
        keep = _packed_keep(cu_seqlens, causal, prefix_len)
    elif causal or window != (-1, -1):
        if isinstance(prefix_len, torch.Tensor) or torch.compiler.is_compiling():  # (compiling: traced into the graph)
            keep = reference.attention_keep_mask(s_q, s_k, causal=causal, prefix_len=prefix_len, window_size=window,
                                                 device=q.device)
        else:  # the same few masks every step: built once
            keep = _keep_mask(s_q, s_k, causal, prefix_len, window, q.device)
        if keep is not None and keep.dim() == 3:
            keep = keep.unsqueeze(1)  # (B, 1, S_q, S_k): one prefix per batch element
    else:
        keep = None
    qc, kc, vc = (_compute(t).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=keep, scale=softmax_scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).to(q.dtype)
