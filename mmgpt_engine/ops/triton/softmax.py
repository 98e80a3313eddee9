"""Softmax over the last dim in Triton, with scale, causal and a broadcast mask (contract:
`ops/softmax.py`).

One program per row. Rows up to SINGLE_TILE_MAX columns stay in registers (one read, one write);
longer rows take two passes: an online max/sum over column blocks (per-lane running maxima, so
each block costs one exp per element), then a normalise-and-write pass.
The mask is read through per-row element offsets plus a column stride, which covers every
broadcast pattern of the user's mask without materialising it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SINGLE_TILE_MAX = 16384
LOOP_BLOCK = 2048


@triton.jit
def _masked_scores(X, MASK, mask_row_off, row, stride_x, cols, N, causal_limit, mask_col_stride, scale,
                   HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, CAUSAL: tl.constexpr):
    """scale * x + mask for one block of a row, -inf where masked or outside the row."""
    inside = cols < N
    s = tl.load(X + row * stride_x + cols, mask=inside, other=float("-inf")).to(tl.float32) * scale
    if HAS_MASK:
        m = tl.load(MASK + mask_row_off + cols * mask_col_stride, mask=inside, other=0)
        if MASK_IS_BOOL:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32)
    if CAUSAL:
        s = tl.where(cols <= causal_limit, s, float("-inf"))
    return tl.where(inside, s, float("-inf"))


@triton.jit
def softmax_fwd_kernel(
    X, Y, MASK, MASK_OFFSETS,
    stride_x, stride_y, N, causal_rows, mask_col_stride, scale,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    causal_limit = 0
    if CAUSAL:
        causal_limit = row % causal_rows + N - causal_rows
    mask_row_off = 0
    if HAS_MASK:
        mask_row_off = tl.load(MASK_OFFSETS + row)
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        s = _masked_scores(X, MASK, mask_row_off, row, stride_x, cols, N, causal_limit, mask_col_stride, scale,
                           HAS_MASK, MASK_IS_BOOL, CAUSAL)
        m = tl.max(s, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # a fully masked row: exp(-inf) = 0 everywhere
        e = tl.exp(s - m)
        d = tl.sum(e, axis=0)
        y = e / tl.where(d > 0, d, 1.0)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=cols < N)
    else:
        m_lane = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        d_lane = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            s = _masked_scores(X, MASK, mask_row_off, row, stride_x, cols, N, causal_limit, mask_col_stride,
                               scale, HAS_MASK, MASK_IS_BOOL, CAUSAL)
            m_new = tl.maximum(m_lane, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            d_lane = d_lane * tl.exp(m_lane - m_safe) + tl.exp(s - m_safe)
            m_lane = m_new
        m = tl.max(m_lane, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        d = tl.sum(d_lane * tl.exp(m_lane - m), axis=0)
        inv_d = tl.where(d > 0, 1.0 / d, 0.0)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            s = _masked_scores(X, MASK, mask_row_off, row, stride_x, cols, N, causal_limit, mask_col_stride,
                               scale, HAS_MASK, MASK_IS_BOOL, CAUSAL)
            y = tl.exp(s - m) * inv_d
            tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=cols < N)


@triton.jit
def softmax_bwd_kernel(
    DY, Y, DX, stride_dy, stride_y, stride_dx, N, scale,
    BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        inside = cols < N
        dy = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
        y = tl.load(Y + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
        dot = tl.sum(dy * y, axis=0)
        tl.store(DX + row * stride_dx + cols, (scale * y * (dy - dot)).to(DX.dtype.element_ty), mask=inside)
    else:
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            inside = cols < N
            dy = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
            y = tl.load(Y + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
            acc += dy * y
        dot = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            inside = cols < N
            dy = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
            y = tl.load(Y + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, (scale * y * (dy - dot)).to(DX.dtype.element_ty), mask=inside)


def _tiling(n: int) -> tuple[int, bool, int]:
    if n <= SINGLE_TILE_MAX:
        block = triton.next_power_of_2(n)
        return block, True, min(max(block // 256, 1), 16)
    return LOOP_BLOCK, False, 8


def softmax_fwd(x, scale, mask, mask_row_offsets, mask_col_stride, causal_rows):
    r, n = x.shape
    y = torch.empty_like(x)
    if r == 0 or n == 0:
        return y
    block, single, warps = _tiling(n)
    has_mask = mask is not None
    is_bool = has_mask and mask.dtype == torch.bool
    mask_arg = (mask.view(torch.uint8) if is_bool else mask) if has_mask else x
    softmax_fwd_kernel[(r,)](
        x, y, mask_arg, mask_row_offsets if has_mask else x,
        x.stride(0), y.stride(0), n, max(causal_rows, 1), mask_col_stride, scale,
        HAS_MASK=has_mask, MASK_IS_BOOL=is_bool, CAUSAL=causal_rows > 0,
        BLOCK_N=block, SINGLE_TILE=single, num_warps=warps,
    )
    return y


def softmax_bwd(dy, y, scale):
    r, n = y.shape
    dx = torch.empty_like(y)
    if r == 0 or n == 0:
        return dx
    block, single, warps = _tiling(n)
    softmax_bwd_kernel[(r,)](dy, y, dx, dy.stride(0), y.stride(0), dx.stride(0), n, scale,
                             BLOCK_N=block, SINGLE_TILE=single, num_warps=warps)
    return dx
