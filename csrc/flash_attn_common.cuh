// Building blocks of the flash-attention kernels (flash_attn_fwd.cu, flash_attn_bwd.cu).
//
// Why mma.sync + ldmatrix (inline PTX) rather than WMMA or CuTe:
//  * the m16n8k16 fragment layouts are documented in the PTX ISA, so the online softmax works on
//    the score accumulators in registers and a score tile turns into the A operand of the next
//    matmul without a trip through shared memory (WMMA's fragment layout is opaque: every
//    softmax would go through shared memory);
//  * it needs no CUTLASS headers: the kernels compile in about a minute on a CPU-only CI machine,
//    where CuTe's template depth would multiply the build time of `make test`;
//  * one instruction shape serves sm_80 and sm_90 (Hopper runs mma.sync at Ampere-class rates;
//    wgmma/TMA would be the next step for speed and is deliberately left out for clarity).
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, q = lane % 4), two 16-bit values per register:
//   A (16 x 16, row-major): a0 = A[g][2q..2q+1]   a1 = A[g+8][2q..]   a2 = A[g][2q+8..]   a3 = A[g+8][2q+8..]
//   B (16 x 8, "col"):      b0 = B[2q..2q+1][g]   b1 = B[2q+8..2q+9][g]
//   C (16 x 8, float):      c0, c1 = C[g][2q..2q+1]   c2, c3 = C[g+8][2q..2q+1]
// So two neighbouring C tiles (columns 16t..16t+15) packed to 16 bits are exactly the A
// fragment of k-slice t of the next product (see to_a_frag).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "launch.cuh"
#include "launchers.h"

namespace mmgpt {
namespace flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// --------------------------------------------------------------------------------- PTX wrappers
#ifdef MMGPT_CPU_EMULATION  // the CPU emulator (emulation/emu.h) gives these their PTX semantics
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  ::emu::cp_async_16(smem, gmem, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_async_commit(); }
__device__ __forceinline__ void cp_async_wait_all() { ::emu::cp_async_wait_all(); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ::emu::ldmatrix_x4(r, smem, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ::emu::ldmatrix_x4(r, smem, true);
}
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without a register round trip; src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i
// receives matrix i in the A/B fragment layout (the .trans form transposes each matrix).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem))
               : "memory");
}

#endif

template <typename T> struct Mma;

template <> struct Mma<__half> {
  // c += a * b, fp32 accumulators
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef MMGPT_CPU_EMULATION
    ::emu::mma_m16n8k16<__half>(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef MMGPT_CPU_EMULATION
    ::emu::mma_m16n8k16<__nv_bfloat16>(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// A fragment of k-slice t from the float accumulators of C tiles 2t and 2t+1 (see the header).
template <typename T, int NT>
__device__ __forceinline__ void to_a_frag(uint32_t (&a)[4], const float (&c)[NT][4], int t) {
  a[0] = Mma<T>::pack(c[2 * t][0], c[2 * t][1]);
  a[1] = Mma<T>::pack(c[2 * t][2], c[2 * t][3]);
  a[2] = Mma<T>::pack(c[2 * t + 1][0], c[2 * t + 1][1]);
  a[3] = Mma<T>::pack(c[2 * t + 1][2], c[2 * t + 1][3]);
}

// ------------------------------------------------------------------------------ shared tiles
// A tile of ROWS x D 16-bit values, rows padded by 8 elements (16 bytes): the 8 row addresses
// of one ldmatrix then fall in different banks (no swizzle needed), and every row stays 16-byte
// aligned for cp.async.
template <int D> struct Tile {
  static constexpr int kPitch = D + 8;
};

// Rows [0, rows_valid) of a ROWS x D tile from global memory (row stride in elements), rows
// beyond filled with zeros so that padded keys/queries contribute exact zeros, never garbage.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int rows_valid) {
  constexpr int kChunks = D / 8;
  static_assert(ROWS * kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / kThreads; ++it) {
    const int idx = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks, c = idx % kChunks;
    const bool ok = r < rows_valid;
    cp_async_16(smem + r * Tile<D>::kPitch + c * 8, gmem + (ok ? r : 0) * row_stride + c * 8, ok ? 16 : 0);
  }
}

// A fragments of a 16-row strip (rows row0..row0+15, columns k0..k0+15) of a row-major tile.
template <int D, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * Tile<D>::kPitch + k0 + (lane >> 4) * 8);
}

// B fragments for two n-tiles (n0..n0+7 -> b[0], b[1]; n0+8..n0+15 -> b[2], b[3]) and k-slice
// k0..k0+15, where the tile stores B transposed: tile[n][k] (e.g. K for S = Q K^T).
template <int D, typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * Tile<D>::kPitch + k0 + ((lane >> 3) & 1) * 8);
}

// The same for a tile storing B as is: tile[k][n] (e.g. V for O = P V), via ldmatrix.trans.
template <int D, typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * Tile<D>::kPitch + n0 + (lane >> 4) * 8);
}

// C = A B^T for this warp's 16-row strip of A (rows row0.., a row-major 16-bit tile with D columns)
// and the NT*8 rows of `b` (stored as is, B^T's rows): S^T = K Q^T, dP^T = V dO^T.
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_strip_times_nk(float (&c)[NT][4], const T* a, int row0, const T* b) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[t][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    load_a<D>(af, a, row0, kk * 16);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      load_b_nk<D>(bf, b, np * 16, kk * 16);
      Mma<T>::run(c[2 * np], af, bf[0], bf[1]);
      Mma<T>::run(c[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (this warp's 16 x D) += C (16 x 8*NT, the float accumulators of an earlier product, rounded
// to T as the A operand) times the NT*8 x D tile stored as is (P V, dS K, P^T dO, dS^T Q).
template <typename T, int D, int NT, int DT>
__device__ __forceinline__ void mma_acc_frag_kn(float (&acc)[DT][4], const float (&c)[NT][4], const T* tile) {
  static_assert(DT * 8 == D, "acc holds D / 8 tiles");
#pragma unroll
  for (int kt = 0; kt < NT / 2; ++kt) {
    uint32_t a[4];
    to_a_frag<T>(a, c, kt);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bf[4];
      load_b_kn<D>(bf, tile, kt * 16, dp * 16);
      Mma<T>::run(acc[2 * dp], a, bf[0], bf[1]);
      Mma<T>::run(acc[2 * dp + 1], a, bf[2], bf[3]);
    }
  }
}

// ----------------------------------------------------------------------- sequences and masks
// Where sequence `b` lives: with cu_seqlens, rows [start, start + len) of batch 0; otherwise
// batch b from row 0. Also which keys each query sees.
struct SeqView {
  int64_t batch;      // batch index into the tensors
  int64_t start;      // first row of the sequence in the tensors
  int len_q, len_k;
  int offset;         // len_k - len_q: query i sits at key position i + offset (bottom-right causal)
  int prefix;         // prefix-LM length (0: none)
  bool causal;

  __device__ __forceinline__ SeqView(const FlashParams& p, int b) {
    if (p.cu_seqlens != nullptr) {
      batch = 0;
      start = p.cu_seqlens[b];
      len_q = len_k = p.cu_seqlens[b + 1] - p.cu_seqlens[b];
    } else {
      batch = b;
      start = 0;
      len_q = p.seqlen_q;
      len_k = p.seqlen_k;
    }
    offset = len_k - len_q;
    prefix = p.prefix != nullptr ? p.prefix[b] : 0;
    causal = p.causal || p.prefix != nullptr;
  }

  __device__ __forceinline__ bool visible(int i, int j) const {
    if (j >= len_k) return false;
    if (!causal) return true;
    const int pos = i + offset;
    return j <= pos || (j < prefix && pos < prefix);
  }

  // One past the last key any query in [m0, m0 + rows) sees.
  __device__ __forceinline__ int key_end(int m0, int rows) const {
    if (!causal) return len_k;
    const int last_q = (m0 + rows < len_q ? m0 + rows : len_q) - 1;
    int end = last_q + offset + 1;
    if (prefix > 0 && m0 + offset < prefix && end < prefix) end = prefix;
    if (end > len_k) end = len_k;
    return end > 0 ? end : 0;
  }

  // The first query that sees any key in [n0, ...): queries before it see none of them.
  __device__ __forceinline__ int query_begin(int n0) const {
    if (!causal || n0 < prefix) return 0;
    const int q = n0 - offset;
    return q > 0 ? q : 0;
  }

  // True when some (query, key) pair of the block may be hidden (else the mask is skipped).
  __device__ __forceinline__ bool needs_mask(int m0, int n0, int block_n) const {
    if (n0 + block_n > len_k) return true;
    return causal && n0 + block_n - 1 > m0 + offset;
  }
};

}  // namespace flash
}  // namespace mmgpt
