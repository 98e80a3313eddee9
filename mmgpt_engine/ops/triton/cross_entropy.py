"""Softmax cross-entropy in Triton over vocabularies of any size (contract: `ops/cross_entropy.py`).

Forward: one program per row streams the logits in BLOCK_V chunks keeping per-lane running
maxima and sums (an online log-sum-exp), so nothing logits-sized is allocated; it saves only the
row's lse. Backward: one more pass over the row writes dlogits = dloss * (exp(x - lse) - onehot).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096


@triton.jit
def cross_entropy_fwd_kernel(
    LOGITS, TARGET, LOSS, LSE, stride_row, V, ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    m_lane = tl.full((BLOCK,), float("-inf"), tl.float32)
    d_lane = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_lane, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d_lane = d_lane * tl.exp(m_lane - m_safe) + tl.exp(x - m_safe)
        m_lane = m_new
    m = tl.max(m_lane, axis=0)
    lse = m + tl.log(tl.sum(d_lane * tl.exp(m_lane - m), axis=0))
    tl.store(LSE + row, lse)
    t = tl.load(TARGET + row)
    in_range = (t >= 0) & (t < V)
    x_t = tl.load(base + tl.where(in_range, t, 0)).to(tl.float32)
    loss = tl.where(in_range, lse - x_t, float("nan"))
    loss = tl.where(t == ignore_index, 0.0, loss)
    tl.store(LOSS + row, loss)


@triton.jit
def cross_entropy_bwd_kernel(
    DLOSS, LOGITS, TARGET, LSE, DLOGITS, stride_row, stride_drow, V, ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(TARGET + row)
    dloss = tl.load(DLOSS + row)
    dloss = tl.where(t == ignore_index, 0.0, dloss)
    lse = tl.load(LSE + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(LOGITS + row * stride_row + cols, mask=inside, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
        tl.store(DLOGITS + row * stride_drow + cols, (g * dloss).to(DLOGITS.dtype.element_ty), mask=inside)


def _block(v: int) -> tuple[int, int]:
    block = min(BLOCK_V, triton.next_power_of_2(v))
    return block, min(max(block // 256, 1), 16)


def cross_entropy_fwd(logits, target, ignore_index):
    r, v = logits.shape
    loss = logits.new_empty(r, dtype=torch.float32)
    lse = logits.new_empty(r, dtype=torch.float32)
    if r:
        block, warps = _block(v)
        cross_entropy_fwd_kernel[(r,)](logits, target, loss, lse, logits.stride(0), v, ignore_index,
                                       BLOCK=block, num_warps=warps)
    return loss, lse


def cross_entropy_bwd(dloss, logits, target, lse, ignore_index):
    r, v = logits.shape
    dlogits = torch.empty_like(logits)
    if r:
        block, warps = _block(v)
        cross_entropy_bwd_kernel[(r,)](dloss, logits, target, lse, dlogits, logits.stride(0), dlogits.stride(0),
                                       v, ignore_index, BLOCK=block, num_warps=warps)
    return dlogits
