"""Flash attention in Triton, forward and backward (contract: `ops/attention.py`).

Design
- Layout (B, S, H, D) read through strides (last dim contiguous), so q/k/v slices of a fused qkv
  projection are used without a copy. The head dim is padded to a power of two >= 16 inside the
  kernel (masked loads, `other=0`): padded lanes add 0 to every dot product.
- Forward: one program per (batch-or-sequence, head, BLOCK_M query rows). It streams BLOCK_N-key
  tiles with an online softmax in base 2 (the scale folded into log2(e)), accumulates in fp32 and
  stores out and the natural-log lse, O(B*H*S) extra memory and no S x S tensor.
- Masks are decided per tile, not per element. Query i sits at position i + S_k - S_q (per
  sequence when packed; keys and queries have their own offsets CU_K / CU_Q); key j is visible
  within [pos - win_left, pos + win_right] where a bound is set (RIGHT_BOUND: causal, win_right
  = 0, or a sliding window's right edge; LEFT_BOUND: a sliding window's left edge), or when both
  are inside the image prefix. For a query block, `_query_block_key_ranges` gives the union of its
  rows' visible keys [lo, hi): tiles outside it are never loaded (before the window's left edge,
  past the diagonal or the prefix edge); and the keys every row sees [full_lo, full_hi), whose
  tiles run a mask-free loop (a key tile inside the image prefix is seen by prefix rows
  bidirectionally and, without a left bound, by every later row causally). Only the few tiles on
  the diagonal, the window's left edge, the prefix edge or the ragged key end pay for the mask.
- Scores: softcap * tanh(qk * scale / softcap) when softcap > 0 (Gemma-2), then the ALiBi bias
  -slope * |pos - j|, in base 2 (flash-attn's order); the backward multiplies dS by 1 - tanh^2.
- Backward (recompute, FA2 style): a pre-pass writes delta = rowsum(dO * O); then one kernel per
  (batch, KV head, BLOCK_N keys) walks every query head of its GQA group and the query blocks that
  see its tile, keeping dK/dV in registers (the sum over the group needs no atomics); a second
  kernel per (batch, head, BLOCK_M queries) accumulates dQ over the key tiles it sees. Both use the
  same full/masked tile split as the forward (for dK/dV: the query blocks [q_lo, q_hi) that see
  some key of the tile, and within them those that see all of it). No atomics, so gradients are
  deterministic.
- Scheduling: heads and batch on grid axis 0, blocks on axis 1; with a right bound (causal) the
  query blocks are issued last-first (the longest rows start first, the short ones fill the tail of the wave).
  dK/dV tiles are issued first-first, which is already longest-first under a causal mask.
- Block sizes are autotuned per head dim (keyed on the padded head dim, the mask and score
  options, dtype and a power-of-two sequence bucket so a varlen batch does not retune every
  step). Under TRITON_INTERPRET=1 one config is pinned (the interpreter would run them all).
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
def _tanh(x):
    # libdevice's tanh does not run under the interpreter; exp2 of -2|x| lies in (0, 1], never overflows
    e = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(qk, q_pos, k_idx, qk_scale, cap_in, cap_out, slope, HAS_SOFTCAP: tl.constexpr,
            HAS_ALIBI: tl.constexpr):
    """Base-2 scores from the raw dot products qk (positions broadcast to its shape), in flash-attn's
    order: softcap * tanh(qk * scale / softcap) (cap_in = scale / softcap, cap_out = softcap * log2 e),
    then the ALiBi bias -slope * |q_pos - k_idx| (slope in base 2). Also returns the tanh, whose
    1 - tanh^2 the backward needs."""
    if HAS_SOFTCAP:
        t = _tanh(qk * cap_in)
        s = t * cap_out
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        s = s - slope * tl.abs(q_pos - k_idx).to(tl.float32)
    return s, t


@triton.jit
def _visible(q_pos, k_idx, len_k, prefix, win_left, win_right, RIGHT_BOUND: tl.constexpr,
             LEFT_BOUND: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Key k_idx visible from the query at absolute position q_pos (broadcast shapes): within
    [q_pos - win_left, q_pos + win_right] where bounded, or both inside the prefix."""
    ok = k_idx < len_k
    if RIGHT_BOUND:
        band = k_idx <= q_pos + win_right
        if LEFT_BOUND:
            band = band & (k_idx >= q_pos - win_left)
        if HAS_PREFIX:
            band = band | ((k_idx < prefix) & (q_pos < prefix))
        ok = ok & band
    elif LEFT_BOUND:
        ok = ok & (k_idx >= q_pos - win_left)
    return ok


@triton.jit
def _seq_bounds(CU_Q, CU_K, PREFIX, ALIBI, stride_alibi_b, stride_alibi_h, bz, h, S_q, S_k,
                IS_VARLEN: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """For batch element / packed sequence bz: (batch index into the tensors (int64), first query
    row and first key row (int64), query length, key length, prefix length, head h's ALiBi slope in
    base 2). A packed batch is batch 0 of the tensors; its keys have their own offsets CU_K (the
    queries' CU_Q when they are the same)."""
    if IS_VARLEN:
        start_q = tl.load(CU_Q + bz)
        start_k = tl.load(CU_K + bz)
        len_q = tl.load(CU_Q + bz + 1) - start_q
        len_k = tl.load(CU_K + bz + 1) - start_k
        batch = bz.to(tl.int64) * 0
        row0_q = start_q.to(tl.int64)
        row0_k = start_k.to(tl.int64)
    else:
        batch = bz.to(tl.int64)
        row0_q = batch * 0
        row0_k = batch * 0
        len_q = S_q + bz * 0
        len_k = S_k + bz * 0
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + bz)
    else:
        prefix = bz * 0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + bz * stride_alibi_b + h * stride_alibi_h).to(tl.float32) * LOG2E
    else:
        slope = 0.0
    return batch, row0_q, row0_k, len_q, len_k, prefix, slope


@triton.jit
def _query_block_key_ranges(m0, len_q, len_k, prefix, win_left, win_right, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, RIGHT_BOUND: tl.constexpr, LEFT_BOUND: tl.constexpr,
                            HAS_PREFIX: tl.constexpr):
    """For queries [m0, m0 + BLOCK_M): key tile bounds (lo, full_lo, full_hi, hi). No key outside
    [lo, hi) is visible to any row of the block (those tiles are never loaded); the tiles in
    [full_lo, full_hi) are visible to every row (no mask); the rest of [lo, hi) is masked."""
    off = len_k - len_q
    first = m0 + off  # absolute position of the block's first row
    last = m0 + BLOCK_M - 1 + off  # and of its last (a ragged block's padding rows only widen the ranges)
    lo = m0 * 0
    full_lo = lo
    hi = len_k + lo
    full_hi = hi
    if RIGHT_BOUND:
        hi = tl.minimum(hi, last + win_right + 1)
        full_hi = tl.minimum(full_hi, first + win_right + 1)
    if LEFT_BOUND:
        lo = tl.maximum(first - win_left, 0)
        full_lo = tl.maximum(last - win_left, 0)
    if HAS_PREFIX:  # rows before the prefix edge also see every key before it (prefix <= len_k)
        hi = tl.maximum(hi, prefix)
        lo = tl.where(first < prefix, 0, lo)
        if LEFT_BOUND:  # the prefix keys are then seen by every row only if every row is in the prefix
            whole = last < prefix
            full_lo = tl.where(whole, 0, full_lo)
            full_hi = tl.where(whole, tl.maximum(full_hi, prefix), full_hi)
        else:  # later rows see them causally
            full_hi = tl.maximum(full_hi, prefix)
    hi = tl.maximum(hi, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo), hi)
    full_hi = tl.maximum((tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


# ------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
               lo, hi, len_k, off, prefix, win_left, win_right, qk_scale, cap_in, cap_out, slope,
               MASKED: tl.constexpr, RIGHT_BOUND: tl.constexpr, LEFT_BOUND: tl.constexpr,
               HAS_PREFIX: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PREC: tl.constexpr):
    q_pos = offs_m[:, None] + off
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_tile_pair(k_base, stride_kn, v_base, stride_vn, offs_n, len_k, offs_d,
                               HEAD_DIM, MASKED, PAD_D, UPCAST)
        s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), q_pos, offs_n[None, :], qk_scale,
                       cap_in, cap_out, slope, HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            s = tl.where(_visible(q_pos, offs_n[None, :], len_k, prefix, win_left, win_right, RIGHT_BOUND,
                                  LEFT_BOUND, HAS_PREFIX), s, float("-inf"))
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
    Q, K, V, O, LSE, CU_Q, CU_K, PREFIX, ALIBI,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_alibi_b, stride_alibi_h,
    H, GROUP, S_q, S_k, lse_len, qk_scale, cap_in, cap_out, win_left, win_right, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RIGHT_BOUND: tl.constexpr, LEFT_BOUND: tl.constexpr,
    HAS_PREFIX: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    bz = pid_bh // H
    h = pid_bh % H
    if RIGHT_BOUND:
        m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # longest rows first
    else:
        m0 = tl.program_id(1) * BLOCK_M
    batch, row0_q, row0_k, len_q, len_k, prefix, slope = _seq_bounds(
        CU_Q, CU_K, PREFIX, ALIBI, stride_alibi_b, stride_alibi_h, bz, h, S_q, S_k, IS_VARLEN, HAS_PREFIX, HAS_ALIBI)
    if m0 >= len_q:
        return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    off = len_k - len_q
    q_base = Q + batch * stride_qb + row0_q * stride_qs + h * stride_qh
    k_base = K + batch * stride_kb + row0_k * stride_ks + (h // GROUP) * stride_kh
    v_base = V + batch * stride_vb + row0_k * stride_vs + (h // GROUP) * stride_vh
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, len_q, offs_d,
                   HEAD_DIM, True, PAD_D)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_block_key_ranges(m0, len_q, len_k, prefix, win_left, win_right, BLOCK_M,
                                                       BLOCK_N, RIGHT_BOUND, LEFT_BOUND, HAS_PREFIX)
    if LEFT_BOUND:  # the tiles entering the window
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                                   lo, full_lo, len_k, off, prefix, win_left, win_right, qk_scale, cap_in, cap_out,
                                   slope, True, RIGHT_BOUND, LEFT_BOUND, HAS_PREFIX, HAS_SOFTCAP, HAS_ALIBI,
                                   HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               full_lo, full_hi, len_k, off, prefix, win_left, win_right, qk_scale, cap_in, cap_out,
                               slope, False, RIGHT_BOUND, LEFT_BOUND, HAS_PREFIX, HAS_SOFTCAP, HAS_ALIBI,
                               HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                               full_hi, hi, len_k, off, prefix, win_left, win_right, qk_scale, cap_in, cap_out,
                               slope, True, RIGHT_BOUND, LEFT_BOUND, HAS_PREFIX, HAS_SOFTCAP, HAS_ALIBI,
                               HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # back from base 2 to the natural-log lse of the contract (times ln 2)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    o_base = O + batch * stride_ob + row0_q * stride_os + h * stride_oh
    o_mask = (offs_m[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), mask=o_mask)
    lse_base = LSE + (batch * H + h) * lse_len + row0_q
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
                     offs_n, offs_d, lo, hi, len_q, len_k, off, prefix, win_left, win_right,
                     qk_scale, cap_in, cap_out, slope,
                     MASKED: tl.constexpr, RIGHT_BOUND: tl.constexpr, LEFT_BOUND: tl.constexpr,
                     HAS_PREFIX: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
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
        q_pos = offs_m[None, :] + off
        s_t, t_t = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), q_pos, offs_n[:, None], qk_scale,
                           cap_in, cap_out, slope, HAS_SOFTCAP, HAS_ALIBI)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(_visible(q_pos, offs_n[:, None], len_k, prefix, win_left, win_right, RIGHT_BOUND,
                                    LEFT_BOUND, HAS_PREFIX), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:  # through softcap * tanh(x / softcap)
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, PREFIX, ALIBI,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_alibi_b, stride_alibi_h,
    H, H_KV, GROUP, S_q, S_k, lse_len, qk_scale, sm_scale, cap_in, cap_out, win_left, win_right, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RIGHT_BOUND: tl.constexpr, LEFT_BOUND: tl.constexpr,
    HAS_PREFIX: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    bz = pid_bh // H_KV
    hk = pid_bh % H_KV
    n0 = tl.program_id(1) * BLOCK_N
    batch, row0_q, row0_k, len_q, len_k, prefix, _ = _seq_bounds(
        CU_Q, CU_K, PREFIX, ALIBI, stride_alibi_b, stride_alibi_h, bz, 0, S_q, S_k, IS_VARLEN, HAS_PREFIX, False)
    if n0 >= len_k:
        return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    off = len_k - len_q
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + batch * stride_kb + row0_k * stride_ks + hk * stride_kh
    v_base = V + batch * stride_vb + row0_k * stride_vs + hk * stride_vh
    k, v = _load_tile_pair(k_base, stride_ks, v_base, stride_vs, offs_n, len_k, offs_d,
                           HEAD_DIM, True, PAD_D, UPCAST)
    # Query rows [q_lo, q_hi) see some key of the tile (row i sits at position i + off); the rows in
    # [qf_lo, qf_hi) see all of it. Query blocks outside [q_lo, q_hi) are never loaded.
    q_end = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
    q_lo = n0 * 0
    qf_lo = q_lo
    q_hi = q_end
    qf_hi = q_end
    if RIGHT_BOUND:
        q_lo = tl.maximum(n0 - win_right - off, 0)
        qf_lo = tl.maximum(n0 + BLOCK_N - 1 - win_right - off, 0)
    if LEFT_BOUND:
        q_hi = tl.maximum(n0 + BLOCK_N + win_left - off, 0)
        qf_hi = tl.maximum(n0 + win_left + 1 - off, 0)
    if HAS_PREFIX:  # rows before the prefix edge see the tile's prefix keys too
        q_lo = tl.where(n0 < prefix, 0, q_lo)
        whole = n0 + BLOCK_N <= prefix
        qf_lo = tl.where(whole, 0, qf_lo)
        if LEFT_BOUND:
            q_hi = tl.where(n0 < prefix, tl.maximum(q_hi, prefix - off), q_hi)
            qf_hi = tl.where(whole, tl.maximum(qf_hi, prefix - off), qf_hi)
    # rows past len_q read lse = +inf (p = 0): a ragged last query block can take the mask-free path
    qf_hi = tl.where(qf_hi >= len_q, q_end, qf_hi)
    qf_lo = tl.where(n0 + BLOCK_N <= len_k, qf_lo, q_end)  # a ragged last key tile is always masked
    m_lo = tl.minimum((q_lo // BLOCK_M) * BLOCK_M, q_end)
    m_hi = tl.minimum(tl.cdiv(q_hi, BLOCK_M) * BLOCK_M, q_end)
    m_full_lo = tl.minimum(tl.maximum(tl.cdiv(qf_lo, BLOCK_M) * BLOCK_M, m_lo), m_hi)
    m_full_hi = tl.maximum(tl.minimum((qf_hi // BLOCK_M) * BLOCK_M, m_hi), m_full_lo)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + batch * stride_qb + row0_q * stride_qs + h * stride_qh
        do_base = DO + batch * stride_dob + row0_q * stride_dos + h * stride_doh
        lse_base = LSE + (batch * H + h) * lse_len + row0_q
        delta_base = DELTA + (batch * H + h) * lse_len + row0_q
        if HAS_ALIBI:
            slope = tl.load(ALIBI + bz * stride_alibi_b + h * stride_alibi_h).to(tl.float32) * LOG2E
        else:
            slope = 0.0
        dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                  offs_n, offs_d, m_lo, m_full_lo, len_q, len_k, off, prefix, win_left, win_right,
                                  qk_scale, cap_in, cap_out, slope, True, RIGHT_BOUND, LEFT_BOUND, HAS_PREFIX,
                                  HAS_SOFTCAP, HAS_ALIBI, HEAD_DIM, PAD_D, BLOCK_M, UPCAST, DOT_PREC)
        dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                  offs_n, offs_d, m_full_lo, m_full_hi, len_q, len_k, off, prefix, win_left,
                                  win_right, qk_scale, cap_in, cap_out, slope, False, RIGHT_BOUND, LEFT_BOUND,
                                  HAS_PREFIX, HAS_SOFTCAP, HAS_ALIBI, HEAD_DIM, PAD_D, BLOCK_M, UPCAST, DOT_PREC)
        if LEFT_BOUND:  # the query blocks leaving the window
            dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                                      offs_n, offs_d, m_full_hi, m_hi, len_q, len_k, off, prefix, win_left,
                                      win_right, qk_scale, cap_in, cap_out, slope, True, RIGHT_BOUND, LEFT_BOUND,
                                      HAS_PREFIX, HAS_SOFTCAP, HAS_ALIBI, HEAD_DIM, PAD_D, BLOCK_M, UPCAST,
                                      DOT_PREC)
    mask = (offs_n[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
    dk_base = DK + batch * stride_dkb + row0_k * stride_dks + hk * stride_dkh
    dv_base = DV + batch * stride_dvb + row0_k * stride_dvs + hk * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                  lo, hi, len_k, off, prefix, win_left, win_right, qk_scale, cap_in, cap_out, slope,
                  MASKED: tl.constexpr, RIGHT_BOUND: tl.constexpr, LEFT_BOUND: tl.constexpr,
                  HAS_PREFIX: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    q_pos = offs_m[:, None] + off
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_tile_pair(k_base, stride_kn, v_base, stride_vn, offs_n, len_k, offs_d,
                               HEAD_DIM, MASKED, PAD_D, UPCAST)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), q_pos, offs_n[None, :], qk_scale,
                       cap_in, cap_out, slope, HAS_SOFTCAP, HAS_ALIBI)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(q_pos, offs_n[None, :], len_k, prefix, win_left, win_right, RIGHT_BOUND,
                                  LEFT_BOUND, HAS_PREFIX), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:  # through softcap * tanh(x / softcap)
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, PREFIX, ALIBI,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh, stride_alibi_b, stride_alibi_h,
    H, GROUP, S_q, S_k, lse_len, qk_scale, sm_scale, cap_in, cap_out, win_left, win_right, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RIGHT_BOUND: tl.constexpr, LEFT_BOUND: tl.constexpr,
    HAS_PREFIX: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    bz = pid_bh // H
    h = pid_bh % H
    if RIGHT_BOUND:
        m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    else:
        m0 = tl.program_id(1) * BLOCK_M
    batch, row0_q, row0_k, len_q, len_k, prefix, slope = _seq_bounds(
        CU_Q, CU_K, PREFIX, ALIBI, stride_alibi_b, stride_alibi_h, bz, h, S_q, S_k, IS_VARLEN, HAS_PREFIX, HAS_ALIBI)
    if m0 >= len_q:
        return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    off = len_k - len_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_m < len_q
    q, do = _load_tile_pair(Q + batch * stride_qb + row0_q * stride_qs + h * stride_qh, stride_qs,
                            DO + batch * stride_dob + row0_q * stride_dos + h * stride_doh, stride_dos,
                            offs_m, len_q, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    row_base = (batch * H + h) * lse_len + row0_q
    lse = tl.load(LSE + row_base + offs_m, mask=in_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=in_q, other=0.0)
    k_base = K + batch * stride_kb + row0_k * stride_ks + (h // GROUP) * stride_kh
    v_base = V + batch * stride_vb + row0_k * stride_vs + (h // GROUP) * stride_vh
    lo, full_lo, full_hi, hi = _query_block_key_ranges(m0, len_q, len_k, prefix, win_left, win_right, BLOCK_M,
                                                       BLOCK_N, RIGHT_BOUND, LEFT_BOUND, HAS_PREFIX)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if LEFT_BOUND:
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                           lo, full_lo, len_k, off, prefix, win_left, win_right, qk_scale, cap_in, cap_out, slope,
                           True, RIGHT_BOUND, LEFT_BOUND, HAS_PREFIX, HAS_SOFTCAP, HAS_ALIBI,
                           HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                       full_lo, full_hi, len_k, off, prefix, win_left, win_right, qk_scale, cap_in, cap_out, slope,
                       False, RIGHT_BOUND, LEFT_BOUND, HAS_PREFIX, HAS_SOFTCAP, HAS_ALIBI,
                       HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                       full_hi, hi, len_k, off, prefix, win_left, win_right, qk_scale, cap_in, cap_out, slope,
                       True, RIGHT_BOUND, LEFT_BOUND, HAS_PREFIX, HAS_SOFTCAP, HAS_ALIBI,
                       HEAD_DIM, PAD_D, BLOCK_N, UPCAST, DOT_PREC)
    dq_base = DQ + batch * stride_dqb + row0_q * stride_dqs + h * stride_dqh
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


_KEY = ["HEAD_DIM", "RIGHT_BOUND", "LEFT_BOUND", "HAS_PREFIX", "IS_VARLEN", "HAS_SOFTCAP", "HAS_ALIBI", "seq_bucket"]
_fwd = triton.autotune(_configs("fwd"), key=_KEY,
                       prune_configs_by={"early_config_prune": _pruner("fwd")})(attention_fwd_kernel)
_dkdv = triton.autotune(_configs("dkdv"), key=_KEY,
                        prune_configs_by={"early_config_prune": _pruner("dkdv")})(attention_bwd_dkdv_kernel)
_dq = triton.autotune(_configs("dq"), key=_KEY,
                      prune_configs_by={"early_config_prune": _pruner("dq")})(attention_bwd_dq_kernel)


def _launch_args(q, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, s_k, cu_seqlens_k, max_seqlen_k, window,
                 softcap, alibi_slopes, dummy):
    """Grid sizes, the pointer and scalar arguments after the tensors' strides, and the constexprs
    shared by the three main kernels."""
    b, s_q, h, d = q.shape
    varlen = cu_seqlens is not None
    n_batch = cu_seqlens.numel() - 1 if varlen else b
    if varlen:
        rows_q = max_seqlen
        rows_k = max_seqlen if cu_seqlens_k is None else max_seqlen_k
    else:
        rows_q, rows_k = s_q, s_k
    win_left, win_right = window
    right_bound = bool(causal or prefix is not None or win_right >= 0)
    win_right = 0 if (causal or prefix is not None) else win_right
    interpreted = triton_interpreted()
    meta = dict(
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), RIGHT_BOUND=right_bound, LEFT_BOUND=win_left >= 0,
        HAS_PREFIX=prefix is not None, IS_VARLEN=varlen, HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        UPCAST=interpreted and q.dtype == torch.bfloat16,
        DOT_PREC="ieee" if q.dtype == torch.float32 or interpreted else "tf32",
    )
    pointers = (cu_seqlens if varlen else dummy, (cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens)
                if varlen else dummy, prefix if prefix is not None else dummy,
                alibi_slopes if alibi_slopes is not None else dummy)
    if alibi_slopes is None:
        alibi_strides = (0, 0)
    elif alibi_slopes.dim() == 1:  # (H,): the same slopes for every batch element
        alibi_strides = (0, alibi_slopes.stride(0))
    else:
        alibi_strides = (alibi_slopes.stride(0), alibi_slopes.stride(1))
    # softcap * tanh(qk * scale / softcap) in base 2: the tanh's argument scale and the result's
    cap_in, cap_out = (softmax_scale / softcap, softcap * LOG2E.value) if softcap > 0 else (0.0, 0.0)
    bucket = triton.next_power_of_2(max(rows_q, rows_k, 1))
    return n_batch, rows_q, rows_k, pointers, alibi_strides, (cap_in, cap_out, win_left, win_right, bucket), meta


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, *, cu_seqlens_k=None,
                   max_seqlen_k=None, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """The kernel contract of ops/attention.py, plus the options only these kernels have: the keys'
    own offsets cu_seqlens_k (max_seqlen_k their longest), window (left, right) with -1 unbounded,
    softcap (> 0 on), alibi_slopes (H,) or (n_seq, H) float32."""
    b, s_q, h, _ = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    out = q.new_empty(q.shape)
    lse = q.new_empty((b, h, s_q), dtype=torch.float32)
    if out.numel() == 0 or s_k == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    n_batch, rows_q, _, pointers, alibi_strides, scalars, meta = _launch_args(
        q, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, s_k, cu_seqlens_k, max_seqlen_k, window, softcap,
        alibi_slopes, lse)
    _fwd[lambda c: (n_batch * h, triton.cdiv(rows_q, c["BLOCK_M"]))](
        q, k, v, out, lse, *pointers,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *alibi_strides,
        h, h // h_kv, s_q, s_k, s_q, softmax_scale * LOG2E.value, *scalars, **meta,
    )
    return out, lse


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, *,
                   cu_seqlens_k=None, max_seqlen_k=None, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    n_batch, rows_q, rows_k, pointers, alibi_strides, scalars, meta = _launch_args(
        q, cu_seqlens, max_seqlen, prefix, causal, softmax_scale, s_k, cu_seqlens_k, max_seqlen_k, window, softcap,
        alibi_slopes, lse)
    delta = torch.empty_like(lse)
    attention_bwd_delta_kernel[(b * h, triton.cdiv(s_q, DELTA_BLOCK_M))](
        out, dout, delta, *_strides(out), *_strides(dout), h, s_q,
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=DELTA_BLOCK_M,
    )
    qk_scale = softmax_scale * LOG2E.value
    _dkdv[lambda c: (n_batch * h_kv, triton.cdiv(rows_k, c["BLOCK_N"]))](
        q, k, v, dout, lse, delta, dk, dv, *pointers,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv), *alibi_strides,
        h, h_kv, h // h_kv, s_q, s_k, s_q, qk_scale, softmax_scale, *scalars, **meta,
    )
    _dq[lambda c: (n_batch * h, triton.cdiv(rows_q, c["BLOCK_M"]))](
        q, k, v, dout, lse, delta, dq, *pointers,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq), *alibi_strides,
        h, h // h_kv, s_q, s_k, s_q, qk_scale, softmax_scale, *scalars, **meta,
    )
    return dq, dk, dv
