// Flash attention backward on tensor cores (contract: mmgpt_engine/ops/attention.py, flash_attn_bwd).
// Why mma.sync/ldmatrix: see flash_attn_common.cuh.
//
// Three kernels, all recomputing P = exp(scale * Q K^T - lse) from the saved log-sum-exp:
//  1. delta = rowsum(dO * O), one warp per (row, head);
//  2. dK/dV: a block owns 64 keys of one KV head (each warp 16 keys) and walks every query head
//     of its GQA group and every query block that sees those keys, computing the transposed
//     tiles S^T = K Q^T and dP^T = V dO^T so that P^T and dS^T come out in registers already in
//     the A-operand layout of dV += P^T dO and dK += dS^T Q. dK/dV are summed over the group
//     inside the block: no atomics, no reduction pass.
//  3. dQ: a block owns 64 queries (like the forward) and walks their visible key blocks (64 keys, or
//     32 on cards whose shared memory cannot hold the 64-key tiles at head dim 128): dQ += dS K.
//     Recomputing S and dP here costs two extra matmuls per tile compared with a fused kernel that
//     adds dQ with float atomics, and buys determinism and simplicity.
#include "flash_attn_common.cuh"

namespace mmgpt {
namespace flash {
namespace {

constexpr int kBlockKeys = 64;     // keys per dK/dV block, 16 per warp
constexpr int kBlockQueries = 64;  // queries per dQ block, 16 per warp
constexpr float kPosInf = INFINITY;

// Query tile of the dK/dV kernel: fewer queries for the wide head dim keep the two D-wide
// accumulators (dK, dV) plus the score tiles within the register file.
template <int D> __host__ __device__ constexpr int dkdv_block_m() { return D <= 64 ? 64 : 32; }

template <int D> constexpr int dkdv_smem_bytes() {
  return (2 * kBlockKeys + 4 * dkdv_block_m<D>()) * Tile<D>::kPitch * 2 + 4 * dkdv_block_m<D>() * 4;
}
// Q and dO, and two buffers each of K and V with BN keys.
template <int D, int BN> constexpr int dq_smem_bytes() { return (2 * kBlockQueries + 4 * BN) * Tile<D>::kPitch * 2; }

// lse in the log2 domain, +inf for a query that sees nothing (or does not exist): exp2(x - lse) = 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == kNegInf ? kPosInf : lse * kLog2e; }

template <typename T, int D>
MMGPT_KERNEL(kThreads, flash_bwd_delta_kernel, const FlashParams p, int64_t rows) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);  // (batch, row, head)
  if (idx >= rows) return;
  const int lane = threadIdx.x & 31;
  const int h = static_cast<int>(idx % p.heads);
  const int64_t bs = idx / p.heads;
  const int64_t s = bs % p.seqlen_q, b = bs / p.seqlen_q;
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + s * p.o_row_stride + h * p.o_head_stride;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_batch_stride + s * p.do_row_stride + h * p.do_head_stride;
  float acc = 0.f;
  for (int c = lane; c < D; c += 32) acc += to_f32(o[c]) * to_f32(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[(b * p.heads + h) * p.seqlen_q + s] = acc;
}

template <typename T, int D>
MMGPT_KERNEL(kThreads, flash_bwd_dkdv_kernel, const FlashParams p, const GridOffset off) {
  constexpr int BM = dkdv_block_m<D>();
  constexpr int P = Tile<D>::kPitch;
  constexpr int DT = D / 8, NT = BM / 8;
  MMGPT_DYNAMIC_SMEM(unsigned char, smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockKeys * P;
  T* sQ = sV + kBlockKeys * P;  // [2][BM][P]
  T* sdO = sQ + 2 * BM * P;     // [2][BM][P]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * P);  // [2][BM], log2 domain
  float* sDelta = sLse + 2 * BM;                              // [2][BM]

  const SeqView seq(p, static_cast<int>(blockIdx.z + off.z));
  const int n0 = blockIdx.x * kBlockKeys;
  if (n0 >= seq.len_k) return;
  const int kvh = static_cast<int>(blockIdx.y + off.y);
  const int group = p.heads / p.kv_heads;
  const T* k = static_cast<const T*>(p.k) + seq.batch * p.k_batch_stride + (seq.start + n0) * p.k_row_stride +
               kvh * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + seq.batch * p.v_batch_stride + (seq.start + n0) * p.v_row_stride +
               kvh * p.v_head_stride;
  const int m_first = seq.query_begin(n0) / BM;
  const int m_count = (seq.len_q + BM - 1) / BM - m_first;
  const int iters = m_count > 0 ? group * m_count : 0;  // (query head, query block) pairs

  // queues the Q, dO, lse and delta tiles of iteration `it` into buffer `buf`
  auto issue = [&](int it, int buf) {
    const int h = kvh * group + it / m_count;
    const int m0 = (m_first + it % m_count) * BM;
    const int64_t q_off = seq.batch * p.q_batch_stride + (seq.start + m0) * p.q_row_stride + h * p.q_head_stride;
    const int64_t do_off = seq.batch * p.do_batch_stride + (seq.start + m0) * p.do_row_stride + h * p.do_head_stride;
    load_tile_async<BM, D>(sQ + buf * BM * P, static_cast<const T*>(p.q) + q_off, p.q_row_stride, seq.len_q - m0);
    load_tile_async<BM, D>(sdO + buf * BM * P, static_cast<const T*>(p.dout) + do_off, p.do_row_stride, seq.len_q - m0);
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      const int i = m0 + r;
      const int64_t idx = (seq.batch * p.heads + h) * static_cast<int64_t>(p.seqlen_q) + seq.start + i;
      sLse[buf * BM + r] = i < seq.len_q ? lse_log2(p.lse[idx]) : kPosInf;
      sDelta[buf * BM + r] = i < seq.len_q ? p.delta[idx] : 0.f;
    }
  };

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[t][e] = dv[t][e] = 0.f;

  // without a query block (no queries: seqlen_q = 0) dK = dV = 0 and nothing is loaded, so that no
  // copy is still in flight when the block exits
  if (iters > 0) {
    load_tile_async<kBlockKeys, D>(sK, k, p.k_row_stride, seq.len_k - n0);
    load_tile_async<kBlockKeys, D>(sV, v, p.v_row_stride, seq.len_k - n0);
    issue(0, 0);
    cp_async_commit();
  }

  for (int it = 0; it < iters; ++it) {
    const int buf = it & 1;
    cp_async_wait_all();
    __syncthreads();  // tiles of `it` landed (and its lse/delta stores are visible); buffer buf ^ 1 is free
    if (it + 1 < iters) {
      issue(it + 1, buf ^ 1);
      cp_async_commit();
    }
    const int m0 = (m_first + it % m_count) * BM;
    const T* tQ = sQ + buf * BM * P;
    const T* tdO = sdO + buf * BM * P;
    const float* tLse = sLse + buf * BM;
    const float* tDelta = sDelta + buf * BM;

    // S^T = K Q^T for this warp's 16 keys (rows) x BM queries (columns)
    float s[NT][4];
    mma_strip_times_nk<T, D>(s, sK, warp * 16, tQ);
    // P^T = exp(scale * S^T - lse[query])
    const bool masked = seq.needs_mask(m0, n0, kBlockKeys);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = t * 8 + qd * 2 + (e & 1);
        const int j = n0 + warp * 16 + g + (e >> 1) * 8;
        const bool hidden = masked && !seq.visible(m0 + col, j);
        s[t][e] = hidden ? 0.f : exp2f(s[t][e] * scale_log2 - tLse[col]);
      }
    // dV += P^T dO
    mma_acc_frag_kn<T, D>(dv, s, tdO);
    // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta[query]) in place
    float ds[NT][4];
    mma_strip_times_nk<T, D>(ds, sV, warp * 16, tdO);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[t][e] = s[t][e] * (ds[t][e] - tDelta[t * 8 + qd * 2 + (e & 1)]);
    // dK += dS^T Q (the softmax scale is applied once at the end)
    mma_acc_frag_kn<T, D>(dk, ds, tQ);
  }

  // dk/dv: (B, S_k, H_kv, D) with the dk_* strides
  const int64_t base = seq.batch * p.dk_batch_stride + (seq.start + n0) * p.dk_row_stride + kvh * p.dk_head_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = warp * 16 + g + r * 8;
    if (n0 + key >= seq.len_k) continue;
    T* dk_row = static_cast<T*>(p.dk) + base + static_cast<int64_t>(key) * p.dk_row_stride;
    T* dv_row = static_cast<T*>(p.dv) + base + static_cast<int64_t>(key) * p.dk_row_stride;
#pragma unroll
    for (int t = 0; t < DT; ++t) {
      const int c = t * 8 + qd * 2;
      *reinterpret_cast<uint32_t*>(dk_row + c) = Mma<T>::pack(dk[t][2 * r] * p.scale, dk[t][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_row + c) = Mma<T>::pack(dv[t][2 * r], dv[t][2 * r + 1]);
    }
  }
}

template <typename T, int D, int BN>
MMGPT_KERNEL(kThreads, flash_bwd_dq_kernel, const FlashParams p, const GridOffset off) {
  constexpr int P = Tile<D>::kPitch;
  constexpr int KD = D / 16, DT = D / 8, NT = BN / 8;
  MMGPT_DYNAMIC_SMEM(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockQueries * P;
  T* sK = sdO + kBlockQueries * P;  // [2][BN][P]
  T* sV = sK + 2 * BN * P;          // [2][BN][P]

  const SeqView seq(p, static_cast<int>(blockIdx.z + off.z));
  const int m0 = blockIdx.x * kBlockQueries;
  if (m0 >= seq.len_q) return;
  const int h = static_cast<int>(blockIdx.y + off.y);
  const int kvh = h / (p.heads / p.kv_heads);
  const T* q = static_cast<const T*>(p.q) + seq.batch * p.q_batch_stride + (seq.start + m0) * p.q_row_stride +
               h * p.q_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + seq.batch * p.do_batch_stride +
                  (seq.start + m0) * p.do_row_stride + h * p.do_head_stride;
  const T* k = static_cast<const T*>(p.k) + seq.batch * p.k_batch_stride + seq.start * p.k_row_stride +
               kvh * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + seq.batch * p.v_batch_stride + seq.start * p.v_row_stride +
               kvh * p.v_head_stride;
  const int n_blocks = (seq.key_end(m0, kBlockQueries) + BN - 1) / BN;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + warp * 16 + g + r * 8;
    const int64_t idx = (seq.batch * p.heads + h) * static_cast<int64_t>(p.seqlen_q) + seq.start + i;
    row_lse[r] = i < seq.len_q ? lse_log2(p.lse[idx]) : kPosInf;
    row_delta[r] = i < seq.len_q ? p.delta[idx] : 0.f;
  }
  float dq[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[t][e] = 0.f;

  if (n_blocks > 0) {
    load_tile_async<kBlockQueries, D>(sQ, q, p.q_row_stride, seq.len_q - m0);
    load_tile_async<kBlockQueries, D>(sdO, dout, p.do_row_stride, seq.len_q - m0);
    load_tile_async<BN, D>(sK, k, p.k_row_stride, seq.len_k);
    load_tile_async<BN, D>(sV, v, p.v_row_stride, seq.len_k);
    cp_async_commit();
  }
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int buf = nb & 1;
    const int n0 = nb * BN;
    cp_async_wait_all();
    __syncthreads();
    if (nb + 1 < n_blocks) {
      const int n1 = n0 + BN;
      load_tile_async<BN, D>(sK + (buf ^ 1) * BN * P, k + n1 * p.k_row_stride, p.k_row_stride, seq.len_k - n1);
      load_tile_async<BN, D>(sV + (buf ^ 1) * BN * P, v + n1 * p.v_row_stride, p.v_row_stride, seq.len_k - n1);
      cp_async_commit();
    }
    const T* tK = sK + buf * BN * P;
    const T* tV = sV + buf * BN * P;

    // S = Q K^T and dP = dO V^T for this warp's 16 queries x BN keys
    float s[NT][4], ds[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[t][e] = ds[t][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t qa[4], oa[4];
      load_a<D>(qa, sQ, warp * 16, kk * 16);
      load_a<D>(oa, sdO, warp * 16, kk * 16);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t bk[4], bv[4];
        load_b_nk<D>(bk, tK, np * 16, kk * 16);
        load_b_nk<D>(bv, tV, np * 16, kk * 16);
        Mma<T>::run(s[2 * np], qa, bk[0], bk[1]);
        Mma<T>::run(s[2 * np + 1], qa, bk[2], bk[3]);
        Mma<T>::run(ds[2 * np], oa, bv[0], bv[1]);
        Mma<T>::run(ds[2 * np + 1], oa, bv[2], bv[3]);
      }
    }
    // dS = P * (dP - delta), P = exp(scale * S - lse)
    const bool masked = seq.needs_mask(m0, n0, BN);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int i = m0 + warp * 16 + g + r * 8;
        const int j = n0 + t * 8 + qd * 2 + (e & 1);
        const bool hidden = masked && !seq.visible(i, j);
        const float pr = hidden ? 0.f : exp2f(s[t][e] * scale_log2 - row_lse[r]);
        ds[t][e] = pr * (ds[t][e] - row_delta[r]);
      }
    // dQ += dS K
    mma_acc_frag_kn<T, D>(dq, ds, tK);
  }

  // dq: (B, S_q, H, D) with the o_* strides
  T* dq_base = static_cast<T*>(p.dq) + seq.batch * p.o_batch_stride + seq.start * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + warp * 16 + g + r * 8;
    if (i >= seq.len_q) continue;
    T* row = dq_base + static_cast<int64_t>(i) * p.o_row_stride;
#pragma unroll
    for (int t = 0; t < DT; ++t)
      *reinterpret_cast<uint32_t*>(row + t * 8 + qd * 2) = Mma<T>::pack(dq[t][2 * r] * p.scale, dq[t][2 * r + 1] * p.scale);
  }
}

template <typename T, int D, int BN> cudaError_t launch_dq(const FlashParams& p, dim3 grid, cudaStream_t stream) {
  constexpr int smem = dq_smem_bytes<D, BN>();
  auto kernel = flash_bwd_dq_kernel<T, D, BN>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  return launch_sliced(grid, [&](dim3 slice, GridOffset off) {
    MMGPT_LAUNCH(kernel, slice, kThreads, smem, stream, p, off);
  });
}

template <typename T, int D> cudaError_t launch_bwd(const FlashParams& p, cudaStream_t stream) {
  const int64_t tensor_batch = p.cu_seqlens != nullptr ? 1 : p.batch;
  const int64_t rows = tensor_batch * p.seqlen_q * p.heads;
  if (rows > 0) {
    auto kernel = flash_bwd_delta_kernel<T, D>;
    MMGPT_LAUNCH(kernel, static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream, p, rows);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int max_q = p.cu_seqlens != nullptr ? p.max_seqlen : p.seqlen_q;
  const int max_k = p.cu_seqlens != nullptr ? p.max_seqlen : p.seqlen_k;
  const dim3 kv_grid((max_k + kBlockKeys - 1) / kBlockKeys, p.kv_heads, p.batch);
  if (kv_grid.x > 0 && kv_grid.y > 0 && kv_grid.z > 0) {
    constexpr int smem = dkdv_smem_bytes<D>();
    static_assert(smem <= kMinSmemOptin, "the dK/dV tiles fit every card of compute capability >= 8.0");
    auto kernel = flash_bwd_dkdv_kernel<T, D>;
    cudaError_t err = allow_dynamic_smem(kernel, smem);
    if (err == cudaSuccess)
      err = launch_sliced(kv_grid, [&](dim3 slice, GridOffset off) {
        MMGPT_LAUNCH(kernel, slice, kThreads, smem, stream, p, off);
      });
    if (err != cudaSuccess) return err;
  }
  const dim3 q_grid((max_q + kBlockQueries - 1) / kBlockQueries, p.heads, p.batch);
  if (q_grid.x == 0 || q_grid.y == 0 || q_grid.z == 0) return cudaSuccess;
  // 64 keys per block where they fit in every card's shared memory (head dim 64), else where they fit
  // in this one's (head dim 128: 102 KB, above the 99 KB of sm_86 / sm_89 / sm_120), else 32
  static_assert(dq_smem_bytes<D, 32>() <= kMinSmemOptin, "the 32-key dQ tiles fit every card of compute capability 8+");
  if constexpr (dq_smem_bytes<D, 64>() <= kMinSmemOptin) {
    return launch_dq<T, D, 64>(p, q_grid, stream);
  } else {
    DeviceLimits device{};
    const cudaError_t err = device_limits(device);
    if (err != cudaSuccess) return err;
    if (dq_smem_bytes<D, 64>() <= device.smem_optin) return launch_dq<T, D, 64>(p, q_grid, stream);
    return launch_dq<T, D, 32>(p, q_grid, stream);
  }
}

template <typename T> cudaError_t launch_bwd_dtype(const FlashParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_bwd<T, 64>(p, stream);
    case 128: return launch_bwd<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace flash

cudaError_t flash_attn_bwd(const FlashParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return flash::launch_bwd_dtype<__half>(p, stream);
    case DType::kBFloat16: return flash::launch_bwd_dtype<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mmgpt
