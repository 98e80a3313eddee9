// CPU emulation of the CUDA features the csrc kernels use, so that the kernels themselves (the
// same .cu sources) run on machines without a GPU: benchmarks/cuda_emulator.py compiles them with
// the host compiler, this header force-included (-include emulation/emu.h).
//
// Every CUDA thread of a block is a fiber on one OS thread. Fibers switch only at synchronisation
// points: __syncthreads, and the warp-collective operations (__shfl_xor_sync, ldmatrix, mma.sync),
// each of which is a warp barrier around an exchange through per-warp buffers, with the PTX ISA's
// fragment layouts. cp.async lands at the wait. Blocks run one after another, so `__shared__`
// variables become function statics (shared by the block's fibers) and dynamic shared memory one
// buffer per launch.
//
// The emulator refuses what the hardware refuses (runtime.cpp, warp.cpp, device.cpp): launches
// outside the device's limits (block and grid sizes, the kernel's __launch_bounds__, dynamic shared
// memory above 48 KB without the opt-in attribute or above the opt-in maximum of the emulated
// architecture); ldmatrix and cp.async on addresses that are not 16-byte aligned or not in the right
// memory space; a warp collective that some lane of the warp misses (exited, or at another
// instruction). A refused launch does not run and sets the launch error; a fault inside a kernel
// stops it and sticks until the emulator is reset, as a GPU context does.
//
// What this checks: indexing, masking, reductions, tiling, fragment plumbing, numerics, the launch
// plans under each architecture's limits; built with AddressSanitizer, out-of-bounds accesses; with
// ThreadSanitizer, shared-memory races between threads that no barrier orders, including a cp.async
// destination; built to count (traffic.cpp), the global-memory bytes each launch reads and writes in
// each tensor, for the IO audit. What it cannot: timing, registers, static shared memory sizes, and
// whether the PTX fragment layouts it implements match the hardware (they follow the ISA).
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
#include <tuple>
#include <type_traits>
#include <vector>

// Kernels are declared with MMGPT_KERNEL (launch.cuh), which carries the bound into the emulator.
#undef __launch_bounds__
#define __launch_bounds__(...) declare_kernels_with_MMGPT_KERNEL_so_the_emulator_sees_their_launch_bounds

#define MMGPT_EMU_INLINE inline __attribute__((always_inline))

namespace emu {

struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// A kernel's __launch_bounds__: the last parameter of every kernel under the emulator.
template <int N> struct MaxThreads {
  static constexpr int value = N;
};

// Where a kernel was launched from, for the messages.
struct LaunchSite {
  const char* file;
  int line;
  const char* function;
};

ThreadCtx& ctx();  // the running fiber's indices
void* dynamic_smem();
// The warp collectives and the block barrier tell the instructions of a kernel apart by their return
// address, so every wrapper between a kernel and them is inlined (here MMGPT_EMU_INLINE, in the
// kernels __forceinline__): lanes at different instructions are then seen as diverged.
void block_barrier();
float shfl_xor(unsigned mask, float v, int lane_mask);
void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans);
void mma_m16n8k16_f32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void check_cp_async(const void* dst, const void* src, int src_bytes);
void run_grid(const void* kernel, int max_threads, dim3 grid, dim3 block, size_t smem, const LaunchSite& site,
              const std::function<void()>& body);

template <typename T>
MMGPT_EMU_INLINE void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
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
  check_cp_async(dst, src, src_bytes);
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
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, const LaunchSite& site, const A&... args) {
  static_assert(sizeof...(P) == sizeof...(A) + 1,
                "declare kernels with MMGPT_KERNEL (launch.cuh): the emulator takes their launch bound as a "
                "last parameter");
  using Bound = std::remove_cv_t<std::tuple_element_t<sizeof...(P) - 1, std::tuple<P...>>>;
  run_grid(reinterpret_cast<const void*>(kernel), Bound::value, grid, block, smem, site,
           [&] { kernel(args..., Bound{}); });
}

}  // namespace emu

#define threadIdx (::emu::ctx().thread_idx)
#define blockIdx (::emu::ctx().block_idx)
#define blockDim (::emu::ctx().block_dim)
#define gridDim (::emu::ctx().grid_dim)

MMGPT_EMU_INLINE void __syncthreads() { ::emu::block_barrier(); }
MMGPT_EMU_INLINE float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  return ::emu::shfl_xor(mask, v, lane_mask);
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
