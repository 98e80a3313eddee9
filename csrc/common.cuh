// Device helpers shared by the memory-bound kernels (norms, softmax, cross-entropy): dtype
// conversion, 16-byte vector loads/stores, warp and block reductions, and the "row group" that
// maps one row onto a warp or a whole block.
//
// Every kernel reads its inputs in the storage dtype and accumulates in float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "launch.cuh"
#include "launchers.h"

namespace mmgpt {

// --------------------------------------------------------------------------------- conversions
// torch builds with __CUDA_NO_HALF_CONVERSIONS__, so every conversion is spelled out.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T and back: what a T tensor holding x would read as.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

constexpr float kNegInf = -INFINITY;

// ------------------------------------------------------------------------- 16-byte vector I/O
template <typename T> struct Vec {
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte access
};

// Reads VEC elements at row[c0..c0+VEC) into v (fill beyond n). `aligned` promises that row is
// 16-byte aligned and n % VEC == 0, so a vector that starts inside the row ends inside it.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* row, int c0, int n, bool aligned, float (&v)[VEC], float fill) {
  static_assert(VEC * sizeof(T) == 16, "one 16-byte access per vector");
  if (aligned && c0 < n) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + c0);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = to_float(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = (c0 + j < n) ? to_float(row[c0 + j]) : fill;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* row, int c0, int n, bool aligned, const float (&v)[VEC]) {
  if (aligned && c0 < n) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] = from_float<T>(v[j]);
    *reinterpret_cast<uint4*>(row + c0) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (c0 + j < n) row[c0 + j] = from_float<T>(v[j]);
  }
}

// --------------------------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum/max, the result in every thread. scratch: 32 floats of shared memory. The
// leading barrier lets a block call these back to back on the same scratch: no warp overwrites
// the partials of the previous call while another still reads them. Every warp then reduces
// the (at most 32) partials itself, which saves the broadcast step.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.f);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : kNegInf);
}

// ---------------------------------------------------------------------------------- row group
// The threads that share one row: one warp (WARP_ROW, for short rows: no block barriers, several
// rows per block) or the whole block (long rows). Thread `lane` of the group owns the vectors
// lane, lane + size, lane + 2 * size, ... of the row.
template <bool WARP_ROW> struct RowGroup {
  int lane, size, index, count;  // position in the group, group size, group index in the block, groups per block
  __device__ __forceinline__ RowGroup() {
    if constexpr (WARP_ROW) {
      lane = threadIdx.x & 31;
      size = 32;
      index = threadIdx.x >> 5;
      count = blockDim.x >> 5;
    } else {
      lane = threadIdx.x;
      size = blockDim.x;
      index = 0;
      count = 1;
    }
  }
  __device__ __forceinline__ float sum(float v, float* scratch) const {
    if constexpr (WARP_ROW) return warp_sum(v); else return block_sum(v, scratch);
  }
  __device__ __forceinline__ float max(float v, float* scratch) const {
    if constexpr (WARP_ROW) return warp_max(v); else return block_max(v, scratch);
  }
};

// The part of one row a thread keeps in registers: NV vectors of Vec<T>::kWidth floats.
template <typename T, int NV> struct RowSlice {
  static constexpr int VEC = Vec<T>::kWidth;
  float v[NV][VEC];

  __device__ __forceinline__ static int col(int i, int j, int lane, int size) { return (i * size + lane) * VEC + j; }

  __device__ __forceinline__ void load(const T* row, int n, int lane, int size, bool aligned, float fill) {
#pragma unroll
    for (int i = 0; i < NV; ++i) load_vec<T, VEC>(row, (i * size + lane) * VEC, n, aligned, v[i], fill);
  }
  __device__ __forceinline__ void store(T* row, int n, int lane, int size, bool aligned) const {
#pragma unroll
    for (int i = 0; i < NV; ++i) store_vec<T, VEC>(row, (i * size + lane) * VEC, n, aligned, v[i]);
  }
};

// ------------------------------------------------------------------------------- launch policy
// How a row of n elements maps onto threads: a warp or a block per row, with NV vectors per
// thread kept in registers; fits == false means the row is too long for registers and the
// kernel's looped path (several passes over global memory / L2) is used instead.
struct RowPlan {
  bool fits;
  bool warp_row;
  int nv;       // vectors per thread
  int threads;  // block size
};

// The launch bound of a block-per-row kernel keeping `elems` floats per row array per thread:
// 1024 threads leave 64 registers per thread, enough only for short slices.
__host__ __device__ constexpr int block_max_threads(int elems) { return elems >= 16 ? 512 : 1024; }

template <bool WARP_ROW, int ELEMS> struct RowBounds {
  static constexpr int kMaxThreads = WARP_ROW ? 128 : block_max_threads(ELEMS);
};

// max_elems: register budget of the kernel in elements per thread (per row array it keeps).
inline RowPlan plan_row(int n, int vec, int max_elems) {
  const int nvec = (n + vec - 1) / vec;
  const int max_nv = max_elems / vec < 8 ? max_elems / vec : 8;
  // short rows: one warp per row (no block barriers), 4 rows per block
  for (int nv = 1; nv <= max_nv && nv <= 4; nv *= 2)
    if (nvec <= 32 * nv) return {true, true, nv, 128};
  // long rows: a block per row; prefer <= 512 threads, take 1024 only with few registers per
  // thread (block_max_threads: what the kernels' launch bounds allow)
  for (int limit : {512, 1024})
    for (int nv = 1; nv <= max_nv; nv *= 2) {
      const int threads = ((nvec + nv - 1) / nv + 31) / 32 * 32;
      if (threads <= limit && threads <= block_max_threads(nv * vec)) return {true, false, nv, threads};
    }
  return {false, false, 0, 1024};
}

// The current device's SM count and shared-memory opt-in (queried once per device, launch.cuh);
// 1 SM and no opt-in where the query fails (the launch then reports the device's error).
inline int sm_count() {
  DeviceLimits d{};
  return device_limits(d) == cudaSuccess && d.sm_count > 0 ? d.sm_count : 1;
}

inline int max_smem_optin() {
  DeviceLimits d{};
  return device_limits(d) == cudaSuccess ? d.smem_optin : 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mmgpt
