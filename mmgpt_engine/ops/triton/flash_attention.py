"""Flash attention in Triton, forward and backward (contract: `ops/attention.py`).

Design
- Layout (B, S, H, D) read through strides (last dim contiguous), so q/k/v slices of a fused qkv
  projection are used without a copy. The head dim is padded to a power of two >= 16 inside the
  kernel (masked loads, `other=0`): padded lanes add 0 to every dot product.
- Forward: one program per (batch-or-sequence, head, BLOCK_M query rows). It streams BLOCK_N-key
  tiles with an online softmax in base 2 (the scale folded into log2(e)), accumulates in fp32 and
  stores out and the natural-log lse, O(B*H*S) extra memory and no S x S tensor.
- Masks are decided per tile, not per element. For a query block the visible keys are
  [0, hi) with hi = min(S_k, max(last_row_pos + 1, prefix)); tiles past hi are never loaded
  (fully masked, skipped). Tiles ending before max(first_row_pos + 1, prefix) are visible to every
  row of the block (a key tile inside the image prefix is seen by prefix rows bidirectionally and
  by every later row causally), so they run a mask-free loop; only the few tiles on the diagonal,
  the prefix edge or the ragged key end pay for the mask arithmetic.
- Backward (recompute, FA2 style): a pre-pass writes delta = rowsum(dO * O); then one kernel per
  (batch, KV head, BLOCK_N keys) walks every query head of its GQA group and the query blocks that
  see its tile, keeping dK/dV in registers (the sum over the group needs no atomics); a second
  kernel per (batch, head, BLOCK_M queries) accumulates dQ over the key tiles it sees. Both use the
  same full/masked tile split as the forward. No atomics, so gradients are deterministic.
- Scheduling: heads and batch on grid axis 0, blocks on axis 1; for causal the query blocks are
  issued last-first (the longest rows start first, the short ones fill the tail of the wave).
  dK/dV tiles are issued first-first, which is already longest-first under a causal mask.
- Block sizes are autotuned per head dim (keyed on the padded head dim, causal, dtype and a
  power-of-two sequence bucket so a varlen batch does not retune every step). Under
  TRITON_INTERPRET=1 one config is pinned (the interpreter would run them all).
- lse is -inf for a query that sees no key (out 0 there); the backward reads it as +inf so the
  recomputed probabilities of such rows (and of padding rows) are exactly 0.
- bf16 `tl.dot` is wrong in the interpreter, so dot operands are upcast to fp32 when interpreted;
  fp32 inputs use IEEE dots (not tf32) so fp32 results match a float32 reference.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._interpret import triton_interpreted

# the online softmax runs in base 2 (exp2/log2 are the fast units); lse is stored in base e
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------ helpers
@triton.jit
def _load_rows(ptrs, rows, n_rows, cols, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr,
               PAD_D: tl.constexpr):
    """A (rows, head dim) tile; masks only what can be out of bounds so full tiles load plainly."""
    if CHECK_ROWS:
        if PAD_D:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_tile_pair(a_base, stride_a, b_base, stride_b, rows, n_rows, cols, HEAD_DIM: tl.constexpr,
                    CHECK_ROWS: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr):
    """Two (rows, head dim) tiles that share their rows (k and v, or q and do), upcast to float32 for
    the interpreter's dots when UPCAST."""
    a = _load_rows(a_base + rows[:, None] * stride_a + cols[None, :], rows, n_rows, cols, HEAD_DIM, CHECK_ROWS, PAD_D)
    b = _load_rows(b_base + rows[:, None] * stride_b + cols[None, :], rows, n_rows, cols, HEAD_DIM, CHECK_ROWS, PAD_D)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _visible(q_pos, k_idx, len_k, prefix, CAUSAL: tl.constexpr):
    """Key k_idx visible from the query at absolute position q_pos (broadcast shapes)."""
    ok = k_idx < len_k
    if CAUSAL:
        ok = ok & ((k_idx <= q_pos) | ((k_idx < prefix) & (q_pos < prefix)))
    return ok


@triton.jit
def _seq_bounds(CU, PREFIX, bz, S_q, S_k, IS_VARLEN: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """For batch element / packed sequence bz: (batch index into the tensors (int64), first row
    (int64), query length, key length, prefix length). A packed batch is batch 0 of the tensors."""
    if IS_VARLEN:
        start = tl.load(CU + bz)
        length = tl.load(CU + bz + 1) - start
        batch = bz.to(tl.int64) * 0
        row0 = start.to(tl.int64)
        len_q = length
        len_k = length
    else:
        batch = bz.to(tl.int64)
        row0 = batch * 0
        len_q = S_q + bz * 0
        len_k = S_k + bz * 0
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + bz)
    else:
        prefix = bz * 0
    return batch, row0, len_q, len_k, prefix


@triton.jit
def _query_block_key_ranges(m0, len_q, len_k, prefix, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            CAUSAL: tl.constexpr):
    """For queries [m0, m0 + BLOCK_M): (end of the mask-free key tiles, end of the visible keys)."""
    if CAUSAL:
        off = len_k - len_q
        hi = tl.minimum(len_k, tl.maximum(m0 + BLOCK_M + off, prefix))
        full_hi = tl.minimum(len_k, tl.maximum(m0 + off + 1, prefix))
    else:
        hi = len_k
        full_hi = len_k
    return (full_hi // BLOCK_N) * BLOCK_N, hi


# ------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
               lo, hi, len_k, off, prefix, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_tile_pair(k_base, stride_kn, v_base, stride_vn, offs_n, len_k, offs_d,
                               HEAD_DIM, MASKED, PAD_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            s = tl.where(_visible(offs_m[:, None] + off, offs_n[None, :], len_k, prefix, CAUSAL), s,
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE, CU, PREFIX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    H, GROUP, S_q, S_k, lse_len, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
    IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    bz = pid_bh // H
    h = pid_bh % H
    if CAUSAL:
        m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # longest rows first
    else:
        m0 = tl.program_id(1) * BLOCK_M
    batch, row0, len_q, len_k, prefix = _seq_bounds(CU, PREFIX, bz, S_q, S_k, IS_VARLEN, HAS_PREFIX)
    if m0 >= len_q:
        return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    off = len_k - len_q
    q_base = Q + batch * stride_qb + row0 * stride_qs + h * stride_qh
    k_base = K + batch * stride_kb + row0 * stride_ks + (h // GROUP) * stride_kh
    v_base = V + batch * stride_vb + row0 * stride_vs + (h // GROUP) * stride_vh
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, len_q, offs_d,
                   HEAD_DIM, True, PAD_D)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    n_full, hi = _query_block_key_ranges(m0, len_q, len_k, prefix, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               0, n_full, len_k, off, prefix, qk_scale,
                               False, CAUSAL, HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               n_full, hi, len_k, off, prefix, qk_scale,
                               True, CAUSAL, HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # back from base 2 to the natural-log lse of the contract (times ln 2)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    o_base = O + batch * stride_ob + row0 * stride_os + h * stride_oh
    o_mask = (offs_m[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), mask=o_mask)
    lse_base = LSE + (batch * H + h) * lse_len + row0
    tl.store(lse_base + offs_m, lse, mask=offs_m < len_q)


# ----------------------------------------------------------------------------------- backward
@triton.jit
def attention_bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
    H, S_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    bz = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    # int64 rows: a long packed batch times its row stride can pass 2**31
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < S_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + bz * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + bz * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * S_q + offs_m, tl.sum(o * do, 1), mask=offs_m < S_q)


@triton.jit
def _bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                     offs_n, offs_d, lo, hi, len_q, len_k, off, prefix, qk_scale,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    # scores are computed transposed, (keys, queries), so dK and dV need no transposed stores
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_q = offs_m < len_q
        q, do = _load_tile_pair(q_base, stride_qs, do_base, stride_dos, offs_m, len_q, offs_d,
                                HEAD_DIM, True, PAD_D, UPCAST)
        lse = tl.load(lse_base + offs_m, mask=in_q, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        delta = tl.load(delta_base + offs_m, mask=in_q, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(_visible(offs_m[None, :] + off, offs_n[:, None], len_k, prefix, CAUSAL), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, PREFIX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    H, H_KV, GROUP, S_q, S_k, lse_len, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
    IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    bz = pid_bh // H_KV
    hk = pid_bh % H_KV
    n0 = tl.program_id(1) * BLOCK_N
    batch, row0, len_q, len_k, prefix = _seq_bounds(CU, PREFIX, bz, S_q, S_k, IS_VARLEN, HAS_PREFIX)
    if n0 >= len_k:
        return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    off = len_k - len_q
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + batch * stride_kb + row0 * stride_ks + hk * stride_kh
    v_base = V + batch * stride_vb + row0 * stride_vs + hk * stride_vh
    k, v = _load_tile_pair(k_base, stride_ks, v_base, stride_vs, offs_n, len_k, offs_d,
                           HEAD_DIM, True, PAD_D, UPCAST)
    # Query rows that see some key of the tile start at q_lo; from q_full on, every row sees all of it.
    if CAUSAL:
        q_lo = tl.where(n0 < prefix, 0, tl.maximum(n0 - off, 0))
        q_full = tl.where(n0 + BLOCK_N <= prefix, 0, tl.maximum(n0 + BLOCK_N - 1 - off, 0))
    else:
        q_lo = n0 * 0
        q_full = n0 * 0
    q_end = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
    q_full = tl.where(n0 + BLOCK_N <= len_k, q_full, q_end)  # a ragged last key tile is always masked
    m_lo = tl.minimum((q_lo // BLOCK_M) * BLOCK_M, q_end)
    m_full = tl.minimum(tl.cdiv(q_full, BLOCK_M) * BLOCK_M, q_end)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + batch * stride_qb + row0 * stride_qs + h * stride_qh
        do_base = DO + batch * stride_dob + row0 * stride_dos + h * stride_doh
        lse_base = LSE + (batch * H + h) * lse_len + row0
        delta_base = DELTA + (batch * H + h) * lse_len + row0
        dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                  offs_n, offs_d, m_lo, m_full, len_q, len_k, off, prefix, qk_scale,
                                  True, CAUSAL, HEAD_DIM, PAD_D, BLOCK_M, UPCAST, DOT_PREC)
        dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                  offs_n, offs_d, m_full, q_end, len_q, len_k, off, prefix, qk_scale,
                                  False, CAUSAL, HEAD_DIM, PAD_D, BLOCK_M, UPCAST, DOT_PREC)
    mask = (offs_n[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
    dk_base = DK + batch * stride_dkb + row0 * stride_dks + hk * stride_dkh
    dv_base = DV + batch * stride_dvb + row0 * stride_dvs + hk * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                  lo, hi, len_k, off, prefix, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_tile_pair(k_base, stride_kn, v_base, stride_vn, offs_n, len_k, offs_d,
                               HEAD_DIM, MASKED, PAD_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None] + off, offs_n[None, :], len_k, prefix, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, PREFIX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    H, GROUP, S_q, S_k, lse_len, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
    IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    bz = pid_bh // H
    h = pid_bh % H
    if CAUSAL:
        m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    else:
        m0 = tl.program_id(1) * BLOCK_M
    batch, row0, len_q, len_k, prefix = _seq_bounds(CU, PREFIX, bz, S_q, S_k, IS_VARLEN, HAS_PREFIX)
    if m0 >= len_q:
        return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    off = len_k - len_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_m < len_q
    q, do = _load_tile_pair(Q + batch * stride_qb + row0 * stride_qs + h * stride_qh, stride_qs,
                            DO + batch * stride_dob + row0 * stride_dos + h * stride_doh, stride_dos,
                            offs_m, len_q, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    row_base = (batch * H + h) * lse_len + row0
    lse = tl.load(LSE + row_base + offs_m, mask=in_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=in_q, other=0.0)
    k_base = K + batch * stride_kb + row0 * stride_ks + (h // GROUP) * stride_kh
    v_base = V + batch * stride_vb + row0 * stride_vs + (h // GROUP) * stride_vh
    n_full, hi = _query_block_key_ranges(m0, len_q, len_k, prefix, BLOCK_M, BLOCK_N, CAUSAL)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                       0, n_full, len_k, off, prefix, qk_scale,
                       False, CAUSAL, HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                       n_full, hi, len_k, off, prefix, qk_scale,
                       True, CAUSAL, HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    dq_base = DQ + batch * stride_dqb + row0 * stride_dqs + h * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=in_q[:, None] & (offs_d[None, :] < HEAD_DIM))


# ------------------------------------------------------------------------------ configs + launch
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Hopper has 228 KB of shared memory per SM and wgmma
# wants 128-row tiles with 8 warps; Ampere (164 KB on A100) favours 4-warp 128x64 tiles. Each head
# dim up to 256 keeps, after `_pruner`, at least one config without register spills, and every kept
# config's loads are software-pipelined (cp.async): tests/ops/test_triton_compile.py compiles them
# for sm_80/sm_90 and checks both (`python -m benchmarks.resources` prints the report). The
# autotuner measures the survivors.
_FWD_CONFIGS = {
    "hopper": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 32, 8, 3),
               (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 8, 2)],
    "ampere": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3),
               (64, 32, 4, 2), (64, 32, 8, 2)],
}
# dK/dV: a tall key tile (BLOCK_N) stays in registers while short query blocks stream past.
_DKDV_CONFIGS = {
    "hopper": [(32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (32, 64, 8, 3), (64, 64, 8, 2), (16, 64, 8, 3),
               (32, 64, 4, 3), (32, 32, 8, 2)],
    "ampere": [(32, 128, 8, 2), (16, 64, 8, 3), (32, 64, 8, 2), (32, 64, 4, 3), (64, 64, 8, 2), (32, 32, 8, 2)],
}
# dQ: the mirror image, a tall query block with short key tiles streaming past.
_DQ_CONFIGS = {
    "hopper": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 8, 3), (64, 32, 4, 3)],
    "ampere": [(128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 8, 3), (64, 32, 4, 2)],
}
# Pinned under TRITON_INTERPRET=1: BLOCK_M != BLOCK_N so the tests exercise unequal tile edges.
_INTERPRETED = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}
DELTA_BLOCK_M = 64


# Opt-in shared memory per block (bytes) where the device cannot be asked: A100, H100/H200.
SMEM_LIMIT = {"ampere": 163 * 1024, "hopper": 227 * 1024}
SMEM_SCRATCH = 2048  # beyond the operand tiles (reductions, barriers); benchmarks.resources reports the real use
CONFIG_TABLES = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}


def _arch() -> str:
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        return "hopper"
    return "ampere"


def _configs(kind: str) -> list:
    if triton_interpreted():
        bm, bn = _INTERPRETED[kind]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in CONFIG_TABLES[kind][_arch()]]


@functools.lru_cache(maxsize=None)
def _smem_limit() -> int:
    if not torch.cuda.is_available():
        return SMEM_LIMIT[_arch()]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT[_arch()])


def smem_estimate(kind: str, block_m: int, block_n: int, num_stages: int, block_d: int, elt: int) -> int:
    """Bytes of shared memory a config needs at most: the pipelined operand tiles, the tiles held
    for the whole program, and a reduction scratch (an upper bound on what Triton allocates for
    these kernels; `python -m benchmarks.resources` compares)."""
    stages = max(num_stages, 1)
    if kind == "fwd":
        tiles = stages * 2 * block_n * block_d + block_m * block_d
    elif kind == "dkdv":
        tiles = stages * 2 * block_m * block_d + 2 * block_n * block_d
    else:
        tiles = stages * 2 * block_n * block_d + 2 * block_m * block_d
    return tiles * elt + SMEM_SCRATCH


def config_fits(kind: str, block_m: int, block_n: int, num_warps: int, num_stages: int, block_d: int,
                elt: int, smem_limit: int) -> bool:
    """Whether a config can fit: `smem_estimate` within the limit, and the fp32 accumulators in at
    most 64 registers a thread for 16-bit inputs, 32 for float32 ones (the operand tiles held in
    registers beside them grow with the element size, and float32's IEEE dots run on the CUDA
    cores with the score tile in registers too; past that the compiled kernels spill)."""
    acc = (2 * block_n if kind == "dkdv" else block_m) * block_d
    if elt >= 4:
        acc += block_m * block_n
    return (smem_estimate(kind, block_m, block_n, num_stages, block_d, elt) <= smem_limit
            and acc * elt <= 128 * 32 * num_warps)


def _pruner(kind: str):
    """Drop configs that `config_fits` rules out (keeping the smallest tile if none is left)."""
    def prune(configs, named_args, **kwargs):
        bd, elt = kwargs["BLOCK_D"], named_args["Q"].element_size()
        kept = [c for c in configs if config_fits(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                  c.num_stages, bd, elt, _smem_limit())]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return prune


_KEY = ["HEAD_DIM", "CAUSAL", "HAS_PREFIX", "IS_VARLEN", "seq_bucket"]
_fwd = triton.autotune(_configs("fwd"), key=_KEY,
                       prune_configs_by={"early_config_prune": _pruner("fwd")})(attention_fwd_kernel)
_dkdv = triton.autotune(_configs("dkdv"), key=_KEY,
                        prune_configs_by={"early_config_prune": _pruner("dkdv")})(attention_bwd_dkdv_kernel)
_dq = triton.autotune(_configs("dq"), key=_KEY,
                      prune_configs_by={"early_config_prune": _pruner("dq")})(attention_bwd_dq_kernel)


def _launch_meta(q, cu_seqlens, max_seqlen, prefix, causal, s_k):
    """Grid sizes and the constexprs shared by the three main kernels."""
    b, s_q, _, d = q.shape
    varlen = cu_seqlens is not None
    n_batch = cu_seqlens.numel() - 1 if varlen else b
    rows_q, rows_k = (max_seqlen, max_seqlen) if varlen else (s_q, s_k)
    interpreted = triton_interpreted()
    meta = dict(
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=bool(causal or prefix is not None),
        HAS_PREFIX=prefix is not None, IS_VARLEN=varlen,
        UPCAST=interpreted and q.dtype == torch.bfloat16,
        DOT_PREC="ieee" if q.dtype == torch.float32 or interpreted else "tf32",
    )
    bucket = triton.next_power_of_2(max(rows_q, rows_k, 1))
    return n_batch, rows_q, rows_k, bucket, meta


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale):
    b, s_q, h, _ = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    out = q.new_empty(q.shape)
    lse = q.new_empty((b, h, s_q), dtype=torch.float32)
    if out.numel() == 0 or s_k == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    n_batch, rows_q, _, bucket, meta = _launch_meta(q, cu_seqlens, max_seqlen, prefix, causal, s_k)
    dummy = lse
    _fwd[lambda c: (n_batch * h, triton.cdiv(rows_q, c["BLOCK_M"]))](
        q, k, v, out, lse, cu_seqlens if cu_seqlens is not None else dummy, prefix if prefix is not None else dummy,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        h, h // h_kv, s_q, s_k, s_q, softmax_scale * LOG2E.value, bucket, **meta,
    )
    return out, lse


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, causal, softmax_scale):
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    n_batch, rows_q, rows_k, bucket, meta = _launch_meta(q, cu_seqlens, max_seqlen, prefix, causal, s_k)
    delta = torch.empty_like(lse)
    attention_bwd_delta_kernel[(b * h, triton.cdiv(s_q, DELTA_BLOCK_M))](
        out, dout, delta, *_strides(out), *_strides(dout), h, s_q,
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=DELTA_BLOCK_M,
    )
    cu = cu_seqlens if cu_seqlens is not None else lse
    pre = prefix if prefix is not None else lse
    _dkdv[lambda c: (n_batch * h_kv, triton.cdiv(rows_k, c["BLOCK_N"]))](
        q, k, v, dout, lse, delta, dk, dv, cu, pre,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
        h, h_kv, h // h_kv, s_q, s_k, s_q, softmax_scale * LOG2E.value, softmax_scale, bucket, **meta,
    )
    _dq[lambda c: (n_batch * h, triton.cdiv(rows_q, c["BLOCK_M"]))](
        q, k, v, dout, lse, delta, dq, cu, pre,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
        h, h // h_kv, s_q, s_k, s_q, softmax_scale * LOG2E.value, softmax_scale, bucket, **meta,
    )
    return dq, dk, dv
