// Kernel declarations, launches and dynamic shared memory, spelled once so that the same sources also
// compile for the CPU emulator (emulation/emu.h, defines MMGPT_CPU_EMULATION), which runs the kernels
// with one fiber per CUDA thread in `make test` where there is no GPU; and the per-device facts the
// launchers plan with, queried once per device.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

// MMGPT_KERNEL(max_threads, name, params...) declares `__global__ void __launch_bounds__(max_threads)
// name(params...)`. Under the emulator the bound is a last parameter of the kernel's type, so that the
// emulator refuses a launch with a larger block, as the GPU does.
// MMGPT_LAUNCH(kernel, grid, block, smem, stream, args...): kernel is a pointer without template
// commas, e.g. `auto k = f<T, 4>;`.
#ifdef MMGPT_CPU_EMULATION
#define MMGPT_KERNEL(max_threads, name, ...) void name(__VA_ARGS__, ::emu::MaxThreads<(max_threads)>)
#define MMGPT_LAUNCH(kernel, grid, block, smem, stream, ...)                                        \
  ::emu::launch(kernel, dim3(grid), dim3(block), static_cast<size_t>(smem),                         \
                ::emu::LaunchSite{__FILE__, __LINE__, __PRETTY_FUNCTION__}, __VA_ARGS__)
#define MMGPT_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_smem())
#else
#define MMGPT_KERNEL(max_threads, name, ...) __global__ void __launch_bounds__(max_threads) name(__VA_ARGS__)
#define MMGPT_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define MMGPT_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace mmgpt {

constexpr unsigned kMaxGridYZ = 65535;  // grid.y and grid.z on every GPU (grid.x: 2^31 - 1)
// The least shared memory a block may opt in to on compute capability >= 8.0: 99 KB on 8.6, 8.9 and
// 12.0 (8.0: 163 KB, 9.0: 227 KB). Tiles that fit it launch on every card.
constexpr int kMinSmemOptin = 99 * 1024;

struct DeviceLimits {
  int sm_count;
  int smem_optin;  // bytes of shared memory a block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin)
};

// The current device's limits, queried once per device: the launchers plan with them on every call.
inline cudaError_t device_limits(DeviceLimits& out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<int, DeviceLimits> known;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it == known.end()) {
    DeviceLimits d{};
    err = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    it = known.emplace(device, d).first;
  }
  out = it->second;
  return cudaSuccess;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device. A kernel gets
// 48 KB minus its static shared memory unless it opts in to more (cudaFuncSetAttribute, per device);
// this opts in once per (kernel, device), again only when a launch needs more than before.
inline cudaError_t allow_dynamic_smem(const void* kernel, int bytes) {
  if (bytes <= 0) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  int& current = allowed[{kernel, device}];
  if (current >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) current = bytes;
  return err;
}

template <typename Kernel> cudaError_t allow_dynamic_smem(Kernel* kernel, int bytes) {
  return allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

// What a kernel launched in slices adds to blockIdx.y and blockIdx.z.
struct GridOffset {
  unsigned y, z;
};

// Launches `grid` as slices of at most 65535 along y and z (heads, sequences: a batch of 70,000
// sequences is two launches): launch(slice, offset) launches one slice.
template <typename LaunchSlice> cudaError_t launch_sliced(dim3 grid, LaunchSlice&& launch) {
  for (unsigned z0 = 0; z0 < grid.z; z0 += kMaxGridYZ)
    for (unsigned y0 = 0; y0 < grid.y; y0 += kMaxGridYZ) {
      launch(dim3(grid.x, std::min(grid.y - y0, kMaxGridYZ), std::min(grid.z - z0, kMaxGridYZ)), GridOffset{y0, z0});
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  return cudaSuccess;
}

}  // namespace mmgpt
