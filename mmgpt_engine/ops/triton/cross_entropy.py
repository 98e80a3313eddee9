"""Softmax cross-entropy in Triton over vocabularies of any size (contract: `ops/cross_entropy.py`).

Forward: one program per row streams the logits in BLOCK_V chunks keeping per-lane running
maxima and sums (an online log-sum-exp), so nothing logits-sized is allocated; it saves only the
row's lse. Backward: one more pass over the row writes dlogits = a * softmax - b * onehot - c * w
(the coefficients below), which covers plain, class-weighted and label-smoothed cross-entropy and
the lse's own gradient (the z-loss) in one expression.

Options are constexpr flags, so a call without them compiles to the plain kernel:
  HAS_WEIGHT     per-class weights w (V,) float32, and their sum W (a 1-element tensor, read on
                 the device so that no host sync is needed)
  HAS_SMOOTHING  label smoothing eps: loss = (1 - eps) * nll + eps / V * sum_c w_c * (lse - x_c)
  HAS_SOFTCAP    logits soft-capped first: x -> softcap * tanh(x / softcap) (Gemma 2)
  HAS_DLSE       (backward) a gradient flows into lse too (the z-loss lse_square_scale * lse**2)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096


@triton.jit
def _tanh(x):
    # libdevice's tanh does not run under the interpreter, so tanh is built from exp: e = exp(-2|x|)
    # lies in (0, 1] and never overflows; below |x| = 1/16 the Taylor series (error < 3e-9
    # relative) avoids the cancellation in 1 - e
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    small = tl.abs(x) < 0.0625
    xs = tl.where(small, x, 0.0)  # keeps the unused branch finite for x = -inf (masked lanes)
    x2 = xs * xs
    return tl.where(small, xs * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0))), t)


@triton.jit
def cross_entropy_fwd_kernel(
    LOGITS, TARGET, LOSS, LSE, stride_row, V, ignore_index,
    CLASS_WEIGHT, CLASS_WEIGHT_SUM, label_smoothing, softcap,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    m_lane = tl.full((BLOCK,), float("-inf"), tl.float32)
    d_lane = tl.zeros((BLOCK,), tl.float32)
    wx_lane = tl.zeros((BLOCK,), tl.float32)  # sum_c w_c * x_c, for label smoothing
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            x = tl.where(inside, softcap * _tanh(x / softcap), float("-inf"))
        if HAS_SMOOTHING:
            x_in = tl.where(inside, x, 0.0)  # not -inf: 0 * -inf would be NaN
            if HAS_WEIGHT:
                wx_lane += tl.load(CLASS_WEIGHT + cols, mask=inside, other=0.0) * x_in
            else:
                wx_lane += x_in
        m_new = tl.maximum(m_lane, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d_lane = d_lane * tl.exp(m_lane - m_safe) + tl.exp(x - m_safe)
        m_lane = m_new
    m = tl.max(m_lane, axis=0)
    lse = m + tl.log(tl.sum(d_lane * tl.exp(m_lane - m), axis=0))
    tl.store(LSE + row, lse)
    t = tl.load(TARGET + row)
    in_range = (t >= 0) & (t < V)
    safe_t = tl.where(in_range, t, 0)
    x_t = tl.load(base + safe_t).to(tl.float32)
    if HAS_SOFTCAP:
        x_t = softcap * _tanh(x_t / softcap)
    loss = lse - x_t
    if HAS_WEIGHT:
        loss = loss * tl.load(CLASS_WEIGHT + safe_t)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w_sum = tl.load(CLASS_WEIGHT_SUM)
        else:
            w_sum = V * 1.0
        smooth = w_sum * lse - tl.sum(wx_lane, axis=0)
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / V) * smooth
    # the public op refuses such targets first; a direct call still never reads outside the row
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(t == ignore_index, 0.0, loss)
    tl.store(LOSS + row, loss)


@triton.jit
def cross_entropy_bwd_kernel(
    DLOSS, LOGITS, TARGET, LSE, DLOGITS, stride_row, stride_drow, V, ignore_index,
    DLSE, CLASS_WEIGHT, CLASS_WEIGHT_SUM, label_smoothing, softcap,
    BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(TARGET + row)
    dloss = tl.load(DLOSS + row)
    dloss = tl.where(t == ignore_index, 0.0, dloss)
    lse = tl.load(LSE + row)
    # dlogits_j = a * p_j - b * [j == t] - c * w_j, with p = softmax(x) (of the capped logits)
    if HAS_WEIGHT:
        w_t = tl.load(CLASS_WEIGHT + tl.where((t >= 0) & (t < V), t, 0))
    else:
        w_t = 1.0
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w_sum = tl.load(CLASS_WEIGHT_SUM)
        else:
            w_sum = V * 1.0
        b = dloss * (1.0 - label_smoothing) * w_t
        c = dloss * (label_smoothing / V)
        a = b + c * w_sum
    else:
        b = dloss * w_t
        c = 0.0
        a = b
    if HAS_DLSE:
        a += tl.load(DLSE + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(LOGITS + row * stride_row + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            capped = softcap * _tanh(x / softcap)
        else:
            capped = x
        g = a * tl.exp(capped - lse) - tl.where(cols == t, b, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= c * tl.load(CLASS_WEIGHT + cols, mask=inside, other=0.0)
            else:
                g -= c
        if HAS_SOFTCAP:
            tanh = capped / softcap
            g = g * (1.0 - tanh * tanh)
        tl.store(DLOGITS + row * stride_drow + cols, g.to(DLOGITS.dtype.element_ty), mask=inside)


def _block(v: int) -> tuple[int, int]:
    block = min(BLOCK_V, triton.next_power_of_2(v))
    return block, min(max(block // 256, 1), 16)


def _weight_args(logits, weight):
    """(weight, its sum) as the kernels read them; dummies (never read) without weights."""
    if weight is None:
        return logits, logits
    return weight, weight.sum().reshape(1)


def cross_entropy_fwd(logits, target, ignore_index, weight=None, label_smoothing=0.0, softcap=0.0):
    r, v = logits.shape
    loss = logits.new_empty(r, dtype=torch.float32)
    lse = logits.new_empty(r, dtype=torch.float32)
    if r:
        block, warps = _block(v)
        w, w_sum = _weight_args(logits, weight)
        cross_entropy_fwd_kernel[(r,)](
            logits, target, loss, lse, logits.stride(0), v, ignore_index,
            w, w_sum, float(label_smoothing), float(softcap or 1.0),
            BLOCK=block, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0,
            HAS_SOFTCAP=bool(softcap), num_warps=warps)
    return loss, lse


def cross_entropy_bwd(dloss, logits, target, lse, ignore_index, dlse=None, weight=None, label_smoothing=0.0,
                      softcap=0.0, dlogits=None):
    """dlogits: where to write (default a new tensor like logits); the logits themselves may be
    given, as each element is read before its gradient overwrites it."""
    r, v = logits.shape
    if dlogits is None:
        dlogits = torch.empty_like(logits)
    if r:
        block, warps = _block(v)
        w, w_sum = _weight_args(logits, weight)
        cross_entropy_bwd_kernel[(r,)](
            dloss, logits, target, lse, dlogits, logits.stride(0), dlogits.stride(0), v, ignore_index,
            dlse if dlse is not None else dloss, w, w_sum, float(label_smoothing), float(softcap or 1.0),
            BLOCK=block, HAS_DLSE=dlse is not None, HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing > 0, HAS_SOFTCAP=bool(softcap), num_warps=warps)
    return dlogits
