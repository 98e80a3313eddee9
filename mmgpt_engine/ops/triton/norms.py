"""LayerNorm / RMSNorm in Triton, with the residual add fused in (contract: `ops/norms.py`).

One kernel pair serves both norms (IS_RMS drops the mean) so the two cannot drift apart.
Options: `offset` is added to the weight as it is read (Gemma's RMSNorm scales by 1 + weight);
CAST_XHAT rounds the normalised row to the input's dtype before the weight multiplies it (the
"llama" casting of Llama/Mistral/Qwen2's RMSNorm in transformers; without it, all arithmetic is
float32 and the output is rounded once, Gemma's casting).
Forward and backward: a fixed number of programs each walks a contiguous slab of rows, the whole
row in registers (hidden sizes up to MAX_N), the weight and bias read once per program rather than
once per row (benchmarks.io_audit counts it); the backward writes dx per row and keeps its
weight/bias gradient partial sums in registers; the (programs, N) partials are then
summed by torch: a parallel two-stage reduction with no atomics, so results are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_N = 65536


@triton.jit
def norm_fwd_kernel(
    X, RES, W, B, Y, H, MEAN, RSTD,
    stride_x, stride_res, stride_y, stride_h,
    R, N, rows_per_program, eps, offset,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_N: tl.constexpr, CAST_XHAT: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    row_start = pid.to(tl.int64) * rows_per_program  # int64 loop index: no offset overflow
    row_end = tl.minimum(row_start + rows_per_program, R)
    # the parameters are read once per program, not once per row
    if HAS_W:
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32) + offset
    if HAS_B:
        b = tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0)
        if HAS_RES:
            r = tl.load(RES + row * stride_res + cols, mask=inside, other=0.0)
            # round h to the input dtype before normalising, so forward and backward see the same h
            h = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + row * stride_h + cols, h, mask=inside)
            x = h
        x = x.to(tl.float32)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(inside, x - mean, 0.0)
            tl.store(MEAN + row, mean)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        y = xc * rstd
        if CAST_XHAT:
            y = y.to(X.dtype.element_ty).to(tl.float32)
        if HAS_W:
            y = y * w
        if HAS_B:
            y = y + b
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=inside)


@triton.jit
def norm_bwd_kernel(
    DY, DH, H, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    stride_dy, stride_dh, stride_h, stride_dx,
    R, N, rows_per_program, offset,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_N: tl.constexpr, CAST_XHAT: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    row_start = pid.to(tl.int64) * rows_per_program  # int64 loop index: no offset overflow
    row_end = tl.minimum(row_start + rows_per_program, R)
    if HAS_W:
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(row_start, row_end):
        h = tl.load(H + row * stride_h + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(inside, (h - tl.load(MEAN + row)) * rstd, 0.0)
        if HAS_W:
            wdy = dy * w
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DH:
            dx += tl.load(DH + row * stride_dh + cols, mask=inside, other=0.0).to(tl.float32)
        # DX may be DY's memory (in_place): the row's dy is all in registers by now
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=inside)
        if HAS_W:
            if CAST_XHAT:
                # the weight multiplied the rounded row in the forward (the rounding passes the
                # gradient through unchanged, as autograd's cast does)
                dw_acc += dy * xhat.to(H.dtype.element_ty).to(tl.float32)
            else:
                dw_acc += dy * xhat
        if HAS_B:
            db_acc += dy
    if HAS_W:
        tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=inside)
    if HAS_B:
        tl.store(DB_PARTIAL + pid * N + cols, db_acc, mask=inside)


def _block_and_warps(n: int) -> tuple[int, int]:
    if n > MAX_N:
        raise ValueError(f"x: the triton norm kernels take hidden sizes up to {MAX_N}, got {n}")
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


def _num_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))  # the interpreter runs programs one after another


def norm_fwd(x, weight, bias, residual, eps, is_rms, offset=0.0, cast_xhat=False, out_dtype=None):
    """out_dtype: y's dtype (default x's)."""
    r, n = x.shape
    block, warps = _block_and_warps(n)
    y = torch.empty_like(x, dtype=out_dtype or x.dtype)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if is_rms else r, dtype=torch.float32)
    rstd = x.new_empty(r, dtype=torch.float32)
    if r == 0:
        return y, h, mean, rstd
    res = residual if residual is not None else x
    programs = _num_programs(r, x.device)
    norm_fwd_kernel[(programs,)](
        x, res, weight if weight is not None else x, bias if bias is not None else x, y,
        h if residual is not None else y, mean if not is_rms else rstd, rstd,
        x.stride(0), res.stride(0), y.stride(0), h.stride(0) if residual is not None else y.stride(0),
        r, n, triton.cdiv(r, programs), eps, float(offset),
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, IS_RMS=is_rms,
        BLOCK_N=block, CAST_XHAT=cast_xhat, num_warps=warps,
    )
    return y, h, mean, rstd


def norm_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms, offset=0.0, cast_xhat=False, dx_out=None):
    """dx_out: where to write dx (default a new tensor); dy itself may be given (in_place)."""
    r, n = h.shape
    block, warps = _block_and_warps(n)
    dx = torch.empty_like(h) if dx_out is None else dx_out
    programs = _num_programs(r, h.device)
    rows_per_program = triton.cdiv(r, programs) if r else 0
    has_dh = dh.numel() > 0
    dw_partial = h.new_empty((programs, n), dtype=torch.float32) if weight is not None else None
    db_partial = h.new_empty((programs, n), dtype=torch.float32) if bias is not None else None
    if r > 0:
        norm_bwd_kernel[(programs,)](
            dy, dh if has_dh else dy, h, weight if weight is not None else h, mean if not is_rms else rstd, rstd,
            dx, dw_partial if dw_partial is not None else rstd, db_partial if db_partial is not None else rstd,
            dy.stride(0), dh.stride(0) if has_dh else dy.stride(0), h.stride(0), dx.stride(0),
            r, n, rows_per_program, float(offset),
            HAS_DH=has_dh, HAS_W=weight is not None, HAS_B=bias is not None, IS_RMS=is_rms,
            BLOCK_N=block, CAST_XHAT=cast_xhat, num_warps=warps,
        )
    elif dw_partial is not None or db_partial is not None:
        for p in (dw_partial, db_partial):
            if p is not None:
                p.zero_()
    dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else h.new_empty(0)
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else h.new_empty(0)
    return dx, dw, db
