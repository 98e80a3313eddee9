// Kernel launches and dynamic shared memory, spelled once so that the same sources also compile
// for the CPU emulator (emulation/emu.h, defines MMGPT_CPU_EMULATION), which runs the kernels
// with one fiber per CUDA thread in `make test` where there is no GPU.
#pragma once

#ifdef MMGPT_CPU_EMULATION
#define MMGPT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(kernel, dim3(grid), dim3(block), static_cast<size_t>(smem), __VA_ARGS__)
#define MMGPT_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_smem())
#else
// kernel: a __global__ function (pointer) without template commas, e.g. `auto k = f<T, 4>;`
#define MMGPT_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define MMGPT_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif
