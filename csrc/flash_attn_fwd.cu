// Flash attention forward on tensor cores (contract: mmgpt_engine/ops/attention.py, flash_attn_fwd).
// Why mma.sync/ldmatrix: see flash_attn_common.cuh.
//
// FlashAttention-2 structure: a block of 4 warps owns 64 queries of one (sequence, head), each
// warp 16 of them; it walks the key blocks (64 keys) its queries can see, with K/V tiles
// double-buffered in shared memory (cp.async prefetch of block j+1 while block j is computed).
// Per key block: S = Q K^T (fp32 accumulators), scale + mask, online softmax on the registers
// (running row max and sum, rescaling the output accumulators), then O += P V with P taken
// straight from the score registers. Causal / prefix-LM blocks past the last visible key are
// never loaded; the element mask is only evaluated on blocks that cross a boundary.
#include "flash_attn_common.cuh"

namespace mmgpt {
namespace flash {
namespace {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

template <int D> constexpr int fwd_smem_bytes() { return (kBlockM + 4 * kBlockN) * Tile<D>::kPitch * 2; }

template <typename T, int D>
MMGPT_KERNEL(kThreads, flash_fwd_kernel, const FlashParams p, const GridOffset off) {
  constexpr int P = Tile<D>::kPitch;
  constexpr int KD = D / 16;        // k-slices of the head dim
  constexpr int NT = kBlockN / 8;   // score tiles per key block
  constexpr int DT = D / 8;         // output tiles
  MMGPT_DYNAMIC_SMEM(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * P;     // [2][kBlockN][P]
  T* sV = sK + 2 * kBlockN * P; // [2][kBlockN][P]

  const SeqView seq(p, static_cast<int>(blockIdx.z + off.z));
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.len_q) return;  // a short sequence of a packed batch
  const int h = static_cast<int>(blockIdx.y + off.y);
  const int kvh = h / (p.heads / p.kv_heads);
  const T* q = static_cast<const T*>(p.q) + seq.batch * p.q_batch_stride + (seq.start + m0) * p.q_row_stride +
               h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + seq.batch * p.k_batch_stride + seq.start * p.k_row_stride +
               kvh * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + seq.batch * p.v_batch_stride + seq.start * p.v_row_stride +
               kvh * p.v_head_stride;
  const int n_blocks = (seq.key_end(m0, kBlockM) + kBlockN - 1) / kBlockN;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, qd = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  float acc[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
  float row_max[2] = {kNegInf, kNegInf};  // log2 domain, rows g and g + 8 of this warp's strip
  float row_sum[2] = {0.f, 0.f};          // this thread's share of the row sums (quad-reduced at the end)
  uint32_t qf[KD][4];

  if (n_blocks > 0) {
    load_tile_async<kBlockM, D>(sQ, q, p.q_row_stride, seq.len_q - m0);
    load_tile_async<kBlockN, D>(sK, k, p.k_row_stride, seq.len_k);
    load_tile_async<kBlockN, D>(sV, v, p.v_row_stride, seq.len_k);
    cp_async_commit();
  }
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int buf = nb & 1;
    const int n0 = nb * kBlockN;
    cp_async_wait_all();
    __syncthreads();  // block nb is in shared memory and every warp is done with block nb - 1
    if (nb + 1 < n_blocks) {
      const int n1 = n0 + kBlockN;
      load_tile_async<kBlockN, D>(sK + (buf ^ 1) * kBlockN * P, k + n1 * p.k_row_stride, p.k_row_stride, seq.len_k - n1);
      load_tile_async<kBlockN, D>(sV + (buf ^ 1) * kBlockN * P, v + n1 * p.v_row_stride, p.v_row_stride, seq.len_k - n1);
      cp_async_commit();
    }
    if (nb == 0) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) load_a<D>(qf[kk], sQ, warp * 16, kk * 16);
    }
    const T* tK = sK + buf * kBlockN * P;
    const T* tV = sV + buf * kBlockN * P;

    float s[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[t][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk)
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t bf[4];
        load_b_nk<D>(bf, tK, np * 16, kk * 16);
        Mma<T>::run(s[2 * np], qf[kk], bf[0], bf[1]);
        Mma<T>::run(s[2 * np + 1], qf[kk], bf[2], bf[3]);
      }

    const bool masked = seq.needs_mask(m0, n0, kBlockN);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = m0 + warp * 16 + g + (e >> 1) * 8;
        const int j = n0 + t * 8 + qd * 2 + (e & 1);
        s[t][e] = (masked && !seq.visible(i, j)) ? kNegInf : s[t][e] * scale_log2;
      }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = kNegInf;
#pragma unroll
      for (int t = 0; t < NT; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 threads of a quad share the row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(row_max[r], mx);
      const float m_use = m_new == kNegInf ? 0.f : m_new;  // nothing visible yet: exp2(-inf) = 0 below
      const float alpha = exp2f(row_max[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[t][e] = exp2f(s[t][e] - m_use);
          sum += s[t][e];
        }
      row_sum[r] = row_sum[r] * alpha + sum;
      row_max[r] = m_new;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        acc[t][2 * r] *= alpha;
        acc[t][2 * r + 1] *= alpha;
      }
    }

    mma_acc_frag_kn<T, D>(acc, s, tV);
  }

  T* out = static_cast<T*>(p.out) + seq.batch * p.o_batch_stride + seq.start * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int i = m0 + warp * 16 + g + r * 8;
    if (i >= seq.len_q) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;  // a query that sees no key: output 0
    T* o_row = out + static_cast<int64_t>(i) * p.o_row_stride;
#pragma unroll
    for (int t = 0; t < DT; ++t)
      *reinterpret_cast<uint32_t*>(o_row + t * 8 + qd * 2) = Mma<T>::pack(acc[t][2 * r] * inv, acc[t][2 * r + 1] * inv);
    if (qd == 0) {
      const int64_t lse_idx = (seq.batch * p.heads + h) * static_cast<int64_t>(p.seqlen_q) + seq.start + i;
      p.lse[lse_idx] = l > 0.f ? row_max[r] * kLn2 + logf(l) : kNegInf;
    }
  }
}

template <typename T, int D> cudaError_t launch_fwd(const FlashParams& p, cudaStream_t stream) {
  const int max_q = p.cu_seqlens != nullptr ? p.max_seqlen : p.seqlen_q;
  const dim3 grid((max_q + kBlockM - 1) / kBlockM, p.heads, p.batch);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  constexpr int smem = fwd_smem_bytes<D>();
  static_assert(smem <= kMinSmemOptin, "the forward tiles fit every card of compute capability >= 8.0");
  auto kernel = flash_fwd_kernel<T, D>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  return launch_sliced(grid, [&](dim3 slice, GridOffset off) {
    MMGPT_LAUNCH(kernel, slice, kThreads, smem, stream, p, off);
  });
}

template <typename T> cudaError_t launch_fwd_dtype(const FlashParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_fwd<T, 64>(p, stream);
    case 128: return launch_fwd<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace flash

bool flash_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t flash_attn_fwd(const FlashParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return flash::launch_fwd_dtype<__half>(p, stream);
    case DType::kBFloat16: return flash::launch_fwd_dtype<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mmgpt
