// Small kernels that break, on purpose, a rule the GPU enforces, for tests/ops/test_cuda_emulator_strict.py:
// each C entry point launches one (a `mode` argument picks the broken or the correct variant) and
// returns the launch's cudaError_t; the test reads the emulator's message. They use the wrappers of
// the real kernels (flash_attn_common.cuh), so what they get refused is what a kernel would.
#include "flash_attn_common.cuh"

namespace {

using mmgpt::flash::cp_async_16;
using mmgpt::flash::cp_async_commit;
using mmgpt::flash::cp_async_wait_all;
using mmgpt::flash::ldmatrix_x4;

cudaError_t launched() {
  cudaDeviceSynchronize();
  return cudaGetLastError();
}

// ----------------------------------------------------------------------------- launch limits
MMGPT_KERNEL(1024, touch_smem_kernel, int bytes) {
  MMGPT_DYNAMIC_SMEM(unsigned char, smem);
  if (threadIdx.x == 0 && bytes > 0) smem[0] = smem[bytes - 1] = 1;
}

MMGPT_KERNEL(64, bounded_64_kernel, int* out) {
  if (threadIdx.x == 0) out[0] = static_cast<int>(blockDim.x);
}

MMGPT_KERNEL(1024, count_blocks_kernel, int* blocks) {
  if (threadIdx.x == 0) ++*blocks;
}

// ----------------------------------------------------------------------------- ldmatrix, cp.async
// mode 0: every lane's row address 16-byte aligned in shared memory; 1: 8 bytes off; 2: a thread's
// local array; 3: global memory.
MMGPT_KERNEL(32, ldmatrix_kernel, int mode, const uint16_t* global) {
  MMGPT_DYNAMIC_SMEM(uint16_t, smem);
  alignas(16) uint16_t local[8 * 32];
  const int lane = threadIdx.x;
  const int row = lane * 8;
  const void* address = smem + row;
  if (mode == 1) address = smem + row + 4;
  if (mode == 2) address = local;
  if (mode == 3) address = global + row;
  uint32_t r[4];
  ldmatrix_x4(r, address);
}

// mode 0: a correct copy; 1: destination 8 bytes off; 2: source 2 bytes off; 3: destination in global
// memory; 4: source in shared memory; 5: src-size 17; 6: the thread exits without waiting.
MMGPT_KERNEL(32, cp_async_kernel, int mode, unsigned char* global) {
  MMGPT_DYNAMIC_SMEM(unsigned char, smem);
  unsigned char* dst = smem + threadIdx.x * 16;
  const unsigned char* src = global + threadIdx.x * 16;
  int src_bytes = 16;
  if (mode == 1) dst += 8;
  if (mode == 2) src += 2;
  if (mode == 3) dst = global + threadIdx.x * 16;
  if (mode == 4) src = smem + 512 + threadIdx.x * 16;
  if (mode == 5) src_bytes = 17;
  cp_async_16(dst, src, src_bytes);
  cp_async_commit();
  if (mode != 6) cp_async_wait_all();
}

// ----------------------------------------------------------------------------- warp collectives
// op 0: shfl, 1: ldmatrix, 2: mma. fault 0: every lane there; 1: lane 31 has exited; 2: lanes 16-31
// at another instruction of the same kind; 3: a shuffle over half the warp's mask.
MMGPT_KERNEL(32, collective_kernel, int op, int fault, float* out) {
  MMGPT_DYNAMIC_SMEM(uint16_t, smem);
  const int lane = threadIdx.x;
  if (fault == 1 && lane == 31) return;
  float v = static_cast<float>(lane);
  uint32_t r[4] = {0, 0, 0, 0};
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  const unsigned mask = fault == 3 ? 0x0000ffffu : 0xffffffffu;
  if (fault == 2 && lane >= 16) {
    if (op == 0) v = __shfl_xor_sync(mask, v, 1);
    if (op == 1) ldmatrix_x4(r, smem + lane * 8);
    if (op == 2) mmgpt::flash::Mma<__half>::run(c, r, 0u, 0u);
  } else {
    if (op == 0) v = __shfl_xor_sync(mask, v, 1);
    if (op == 1) ldmatrix_x4(r, smem + lane * 8);
    if (op == 2) mmgpt::flash::Mma<__half>::run(c, r, 0u, 0u);
  }
  out[lane] = v + c[0] + static_cast<float>(r[0]);
}

// lanes 0-15 at a shuffle, lanes 16-31 at __syncthreads: neither completes
MMGPT_KERNEL(32, deadlock_kernel, float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else __syncthreads();
  out[threadIdx.x] = v;
}

}  // namespace

extern "C" {
// opt_in > 0: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, opt_in) first (its error returned)
int emu_fault_dynamic_smem(int bytes, int opt_in) {
  auto kernel = touch_smem_kernel;
  if (opt_in > 0) {
    const cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in);
    if (err != cudaSuccess) return err;
  }
  MMGPT_LAUNCH(kernel, 1, 32, bytes, nullptr, bytes);
  return launched();
}

int emu_fault_launch_bounds(int threads, int* out) {
  auto kernel = bounded_64_kernel;
  MMGPT_LAUNCH(kernel, 1, threads, 0, nullptr, out);
  return launched();
}

int emu_fault_block(unsigned x, unsigned y, unsigned z, int* blocks) {
  auto kernel = count_blocks_kernel;
  MMGPT_LAUNCH(kernel, 1, dim3(x, y, z), 0, nullptr, blocks);
  return launched();
}

int emu_fault_grid(unsigned x, unsigned y, unsigned z, int* blocks) {
  auto kernel = count_blocks_kernel;
  MMGPT_LAUNCH(kernel, dim3(x, y, z), 32, 0, nullptr, blocks);
  return launched();
}

int emu_fault_ldmatrix(int mode, const uint16_t* global) {
  auto kernel = ldmatrix_kernel;
  MMGPT_LAUNCH(kernel, 1, 32, 32 * 8 * 2, nullptr, mode, global);
  return launched();
}

int emu_fault_cp_async(int mode, unsigned char* global) {
  auto kernel = cp_async_kernel;
  MMGPT_LAUNCH(kernel, 1, 32, 1024, nullptr, mode, global);
  return launched();
}

int emu_fault_collective(int op, int fault, float* out) {
  auto kernel = collective_kernel;
  MMGPT_LAUNCH(kernel, 1, 32, 32 * 8 * 2, nullptr, op, fault, out);
  return launched();
}

int emu_fault_deadlock(float* out) {
  auto kernel = deadlock_kernel;
  MMGPT_LAUNCH(kernel, 1, 32, 0, nullptr, out);
  return launched();
}
}
