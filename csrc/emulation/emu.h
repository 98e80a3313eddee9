// CPU emulation of the CUDA features the csrc kernels use, so that the kernels themselves (the
// same .cu sources) run on machines without a GPU: tests/ops/test_cuda_emulated.py compiles
// them with the host compiler, this header force-included (-include emulation/emu.h).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread. Fibers switch only at
// synchronisation points: __syncthreads, and the warp-collective operations (__shfl_xor_sync,
// ldmatrix, mma.sync), each of which is a warp barrier around an exchange through per-warp
// buffers, with the PTX ISA's fragment layouts. cp.async lands at the wait. Blocks run one
// after another, so `__shared__` variables become function statics (shared by the block's
// fibers) and dynamic shared memory one buffer per launch.
//
// What this checks: indexing, masking, reductions, tiling, fragment plumbing, numerics; built with
// AddressSanitizer, out-of-bounds accesses; with ThreadSanitizer (runtime.cpp), shared-memory races
// between threads that no barrier orders, including a cp.async destination. What it cannot: timing,
// and whether the PTX fragment layouts it implements match the hardware (they follow the ISA).
#pragma once

#define MMGPT_CPU_EMULATION 1
#define __shared__ static

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {

struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

ThreadCtx& ctx();  // the running fiber's indices
void block_barrier();
float shfl_xor(float v, int lane_mask);
void* dynamic_smem();
void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans);
void mma_m16n8k16_f32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_m16n8k16_f32(c, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
}

// cp.async.cg 16 bytes: the source is read when the copy is issued, the destination written only
// when the issuing thread waits for its committed groups (cp.async.wait_group 0), so a tile read
// before that wait sees the old bytes, as it may on the GPU. Under ThreadSanitizer the destination
// counts as written from the issue on.
struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
  bool committed;
};
std::vector<PendingCopy>& pending_copies();  // the running thread's

#ifdef MMGPT_EMU_TSAN
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#endif

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  PendingCopy copy{dst, {}, false};
  if (src_bytes > 0) std::memcpy(copy.bytes, src, static_cast<size_t>(src_bytes));  // the rest is zero-filled
#ifdef MMGPT_EMU_TSAN
  __tsan_write_range(dst, 16);
#endif
  pending_copies().push_back(copy);
}

inline void cp_async_commit() {
  for (PendingCopy& copy : pending_copies()) copy.committed = true;
}

inline void cp_async_wait_all() {
  std::vector<PendingCopy>& pending = pending_copies();
  size_t kept = 0;
  for (PendingCopy& copy : pending) {
    if (copy.committed) std::memcpy(copy.dst, copy.bytes, 16);
    else pending[kept++] = copy;  // not in a group yet: wait_group does not wait for it
  }
  pending.resize(kept);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, const A&... args) {
  run_grid(grid, block, smem, [&] { kernel(args...); });
}

}  // namespace emu

#define threadIdx (::emu::ctx().thread_idx)
#define blockIdx (::emu::ctx().block_idx)
#define blockDim (::emu::ctx().block_dim)
#define gridDim (::emu::ctx().grid_dim)

inline void __syncthreads() { ::emu::block_barrier(); }
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) { return ::emu::shfl_xor(v, lane_mask); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
// the function-pointer overload nvcc's cuda_runtime.h provides only when compiling with nvcc
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
