"""Pure-PyTorch reference of every op: the ground truth in tests (run in float64) and the `torch`
backend (the CPU path). Differentiable by autograd. Low-precision inputs are computed in float32
and the result cast back, as the kernels do; float64 inputs stay float64.

No input checks here: the public functions in `mmgpt_engine.ops` check once for every backend.
"""
from __future__ import annotations

from typing import Optional

import torch

# the target value that cross-entropy skips (PyTorch's and Hugging Face's convention)
IGNORE_INDEX = -100


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------- norms
def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with `residual`, returns (y, x + residual)."""
    h = x if residual is None else x + residual
    hc = h.to(_compute_dtype(x.dtype))
    mean = hc.mean(dim=-1, keepdim=True)
    var = (hc - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (hc - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(hc.dtype)
    if bias is not None:
        y = y + bias.to(hc.dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm(x, weight=None, eps=1e-6, residual=None, *, offset=0.0, casting_mode="gemma"):
    """RMSNorm over the last dim; with `residual`, returns (y, x + residual).

    y = xhat * (weight + offset). casting_mode "gemma": one rounding, of y to x's dtype; "llama":
    xhat is first rounded to x's dtype (transformers' `weight * xhat.to(input_dtype)`) and y
    takes the promoted dtype of x and weight."""
    h = x if residual is None else x + residual
    hc = h.to(_compute_dtype(x.dtype))
    y = hc * torch.rsqrt(hc.pow(2).mean(dim=-1, keepdim=True) + eps)
    out_dtype = x.dtype
    if casting_mode == "llama":
        y = y.to(x.dtype).to(hc.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if weight is not None:
        y = y * (weight.to(hc.dtype) + offset)
    y = y.to(out_dtype)
    return y if residual is None else (y, h)


# --------------------------------------------------------------------------------------- softmax
def causal_keep(m: int, n: int, device) -> torch.Tensor:
    """(m, n) bool, True where column j is visible from row i: j <= i + n - m (bottom-right aligned)."""
    i = torch.arange(m, device=device).unsqueeze(1)
    j = torch.arange(n, device=device).unsqueeze(0)
    return j <= i + (n - m)


def softmax(x, scale=1.0, mask=None, causal=False):
    """softmax(scale * x + mask) over the last dim.

    `mask` broadcasts to x: bool (True = keep, as in PyTorch SDPA) or additive float. `causal` masks
    column j of row i (over the last two dims) when j > i + n - m. A row with nothing visible is 0.
    """
    xc = x.to(_compute_dtype(x.dtype)) * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            xc = xc + mask.to(xc.dtype)
    if causal:
        c = causal_keep(x.shape[-2], x.shape[-1], x.device)
        keep = c if keep is None else keep & c
    if keep is not None:
        xc = xc.masked_fill(~keep, float("-inf"))
    row_max = xc.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(xc - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    y = torch.where(denom > 0, e / denom.clamp_min(torch.finfo(xc.dtype).tiny), torch.zeros_like(e))
    return y.to(x.dtype)


# --------------------------------------------------------------------------------- cross-entropy
def cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="mean", *, weight=None, label_smoothing=0.0,
                  lse_square_scale=0.0, softcap=None, return_z_loss=False):
    """Softmax cross-entropy over the last dim of `logits` (..., V) with integer `target` (...).

    Rows whose target is `ignore_index` contribute 0. `mean` divides by the number of
    non-ignored rows (by their summed weight[target] with `weight`) and is 0 (not NaN) when every
    row is ignored. A target outside [0, V) that is not `ignore_index` gives a NaN loss for its
    row (the public op refuses it first). Options as `ops.cross_entropy` documents them:
    weight (V,), label_smoothing (torch.nn.functional.cross_entropy's), lse_square_scale (the
    z-loss, averaged over the counted rows unweighted), softcap (softcap * tanh(x / softcap)),
    return_z_loss (also return the reduced z-loss).
    """
    v = logits.shape[-1]
    lc = logits.reshape(-1, v).to(_compute_dtype(logits.dtype))
    if softcap is not None:
        lc = softcap * torch.tanh(lc / softcap)
    t = target.reshape(-1)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < v)
    safe_t = torch.where(in_range, t, torch.zeros_like(t))
    lse = torch.logsumexp(lc, dim=-1)
    picked = lc.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    w = weight.to(lc.dtype) if weight is not None else None
    w_t = w[safe_t] if w is not None else None
    loss = lse - picked if w is None else w_t * (lse - picked)
    if label_smoothing > 0:
        # -sum_c w_c log p_c = (sum_c w_c) * lse - sum_c w_c x_c
        smooth = v * lse - lc.sum(-1) if w is None else w.sum() * lse - (lc * w).sum(-1)
        loss = (1 - label_smoothing) * loss + (label_smoothing / v) * smooth
    loss = torch.where(in_range | ~valid, loss, torch.full_like(loss, float("nan")))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    z = torch.where(valid, lse_square_scale * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        out, z_out = (loss + z).reshape(target.shape), z.reshape(target.shape)
    elif reduction == "sum":
        out, z_out = loss.sum() + z.sum(), z.sum()
    else:
        count = valid.sum()
        denom = count.to(loss.dtype) if w is None else torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
        z_out = z.sum() / count.clamp_min(1).to(z.dtype)
        out = loss.sum() / torch.where(count > 0, denom, torch.ones_like(denom)) + z_out
    return (out, z_out) if return_z_loss else out


# ------------------------------------------------------------------------------------- attention
def attention_keep_mask(
    s_q: int,
    s_k: int,
    *,
    causal: bool = False,
    prefix_len=None,
    window_size=(-1, -1),
    device=None,
) -> Optional[torch.Tensor]:
    """Bool mask, True = visible, of shape (s_q, s_k) or (B, s_q, s_k) for a per-batch prefix_len.

    Query i sits at absolute position pos(i) = i + s_k - s_q (bottom-right alignment, as flash-attn
    >= 2.1). window_size (left, right), -1 = unbounded: key j visible iff
    pos(i) - left <= j <= pos(i) + right. causal sets right = 0. prefix_len P (implies causal):
    additionally visible iff j < P and pos(i) < P, i.e. the first P positions (the image) see each
    other both ways whatever the window.
    """
    left, right = window_size
    if causal or prefix_len is not None:
        right = 0
    if left < 0 and right < 0:
        return None
    i = torch.arange(s_q, device=device).view(-1, 1) + (s_k - s_q)
    j = torch.arange(s_k, device=device).view(1, -1)
    keep = torch.ones(s_q, s_k, dtype=torch.bool, device=device)
    if right >= 0:
        keep = keep & (j <= i + right)
    if left >= 0:
        keep = keep & (j >= i - left)
    if prefix_len is not None:
        if isinstance(prefix_len, torch.Tensor):
            p = prefix_len.to(device=device, dtype=torch.long).view(-1, 1, 1)
            keep = keep.unsqueeze(0) | ((j < p) & (i < p))
        else:
            keep = keep | ((j < prefix_len) & (i < prefix_len))
    return keep


def alibi_bias(slopes: torch.Tensor, s_q: int, s_k: int, dtype: torch.dtype) -> torch.Tensor:
    """-slope * |pos(i) - j| (flash-attn's ALiBi, pos bottom-right aligned) for slopes (H,) or
    (B, H): shape (1 or B, H, s_q, s_k) in `dtype`."""
    i = torch.arange(s_q, device=slopes.device).view(-1, 1) + (s_k - s_q)
    j = torch.arange(s_k, device=slopes.device).view(1, -1)
    dist = (i - j).abs().to(dtype)
    return -slopes.to(dtype).reshape(-1, slopes.shape[-1], 1, 1) * dist


def _attention_dense(q, k, v, keep, scale, softcap=0.0, bias=None):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D), keep broadcastable to (B, H, Sq, Sk) or None.

    Scores as flash-attn orders them: q k^T * scale, then softcap * tanh(scores / softcap), then
    the mask, then the additive bias (ALiBi)."""
    cd = _compute_dtype(q.dtype)
    h, h_kv = q.shape[2], k.shape[2]
    qc, kc, vc = (t.to(cd).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    if h != h_kv:
        kc = kc.repeat_interleave(h // h_kv, dim=1)
        vc = vc.repeat_interleave(h // h_kv, dim=1)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1)  # -inf on rows with no visible key
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe_lse.unsqueeze(-1))
    if keep is not None:
        p = p.masked_fill(~keep, 0.0)
    out = torch.matmul(p, vc).transpose(1, 2).to(q.dtype)  # (B, Sq, H, D)
    return out, lse


def flash_attention(
    q,
    k,
    v,
    causal=False,
    prefix_len=None,
    cu_seqlens=None,
    max_seqlen=None,
    softmax_scale=None,
    return_lse=False,
    *,
    cu_seqlens_k=None,
    max_seqlen_k=None,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
):
    """Attention with the same conventions as `ops.flash_attention`, materialising the masks.

    q (B, Sq, H, D); k, v (B, Sk, Hkv, D). Returns out (B, Sq, H, D) and, with return_lse, the
    log-sum-exp (B, H, Sq) in float32 (float64 for float64 inputs); a query that sees no key gets
    out = 0 and lse = -inf. With cu_seqlens, B == 1 and each packed sequence attends within itself
    (causal / prefix_len / window / ALiBi applied per sequence, bottom-right aligned to its own
    lengths; a tensor prefix_len or 2-d alibi_slopes give one row per sequence); cu_seqlens_k
    gives the keys' offsets where they differ from the queries'. window_size (left, right),
    softcap (> 0 on) and alibi_slopes ((H,) or (B, H)) as in flash-attn (see attention_keep_mask,
    _attention_dense, alibi_bias). max_seqlen / max_seqlen_k are not needed here.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    cd = _compute_dtype(q.dtype)
    if cu_seqlens is None:
        keep = attention_keep_mask(q.shape[1], k.shape[1], causal=causal, prefix_len=prefix_len,
                                   window_size=window_size, device=q.device)
        if keep is not None and keep.dim() == 3:
            keep = keep.unsqueeze(1)  # (B, 1, Sq, Sk)
        bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, q.shape[1], k.shape[1], cd)
        out, lse = _attention_dense(q, k, v, keep, scale, softcap, bias)
    else:
        bounds_q = cu_seqlens.tolist()
        bounds_k = bounds_q if cu_seqlens_k is None else cu_seqlens_k.tolist()
        outs, lses = [], []
        for idx in range(len(bounds_q) - 1):
            a, b = bounds_q[idx], bounds_q[idx + 1]
            c, d = bounds_k[idx], bounds_k[idx + 1]
            p = prefix_len
            if isinstance(prefix_len, torch.Tensor):
                p = int(prefix_len[idx])
            keep = attention_keep_mask(b - a, d - c, causal=causal, prefix_len=p, window_size=window_size,
                                       device=q.device)
            bias = None
            if alibi_slopes is not None:
                slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[idx]
                bias = alibi_bias(slopes, b - a, d - c, cd)
            o, l_ = _attention_dense(q[:, a:b], k[:, c:d], v[:, c:d], keep, scale, softcap, bias)
            outs.append(o)
            lses.append(l_)
        out = torch.cat(outs, dim=1)
        lse = torch.cat(lses, dim=2)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (out, lse.to(lse_dtype)) if return_lse else out
