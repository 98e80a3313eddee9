// Calibration kernels for the emulator's global-memory counter (tests/benchmarks/test_io_audit.py):
// each moves a known number of bytes through one path the csrc kernels use (the 16-byte and the
// scalar paths of load_vec / store_vec, cp.async with a partial src-size, 32-bit packed stores,
// local arrays and shared memory in between, lanes that share what they read), and one reads its
// input twice on purpose. The C entry points launch them and return the launch's cudaError_t.
#include "common.cuh"
#include "flash_attn_common.cuh"

namespace {

cudaError_t launched() {
  cudaDeviceSynchronize();
  return cudaGetLastError();
}

// n elements, one vector of Vec<T>::kWidth per thread: 16-byte accesses when aligned, else scalar ones
template <typename T>
MMGPT_KERNEL(256, copy_kernel, const T* src, T* dst, int n, bool aligned) {
  constexpr int VEC = mmgpt::Vec<T>::kWidth;
  const int c0 = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  float v[VEC];
  mmgpt::load_vec<T, VEC>(src, c0, n, aligned, v, 0.f);
  mmgpt::store_vec<T, VEC>(dst, c0, n, aligned, v);
}

// n floats through a local array, a __shared__ array and the dynamic shared memory: none of which counts
MMGPT_KERNEL(128, staged_copy_kernel, const float* src, float* dst, int n) {
  __shared__ float tile[128];
  MMGPT_DYNAMIC_SMEM(float, window);
  float local[4];
  const int t = static_cast<int>(threadIdx.x), i = static_cast<int>(blockIdx.x) * 128 + t;
  local[t % 4] = i < n ? src[i] : 0.f;
  tile[t] = local[t % 4];
  __syncthreads();
  window[127 - t] = tile[127 - t];
  __syncthreads();
  if (i < n) dst[i] = window[t];
}

// a 16-byte chunk per thread: cp.async with src-size `src_bytes` (the rest zero-filled) into shared
// memory, then out as two 32-bit packed pairs and one 8-byte store, as the attention epilogues write
MMGPT_KERNEL(128, cp_async_copy_kernel, const unsigned char* src, unsigned char* dst, int src_bytes) {
  MMGPT_DYNAMIC_SMEM(unsigned char, window);
  const int64_t off = (static_cast<int64_t>(blockIdx.x) * 128 + threadIdx.x) * 16;
  unsigned char* staged = window + threadIdx.x * 16;
  mmgpt::flash::cp_async_16(staged, src + off, src_bytes);
  mmgpt::flash::cp_async_commit();
  mmgpt::flash::cp_async_wait_all();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(staged);
  reinterpret_cast<uint32_t*>(dst + off)[0] = words[0];
  reinterpret_cast<uint32_t*>(dst + off)[1] = words[1];
  reinterpret_cast<uint64_t*>(dst + off)[1] = reinterpret_cast<const uint64_t*>(staged)[1];
}

// lanes of a warp that load the same bytes in one instruction move them once: all 32 read scale[0],
// lanes 2i and 2i+1 read pair[i], lane t reads the 8 bytes at words[t] (overlapping its neighbour's)
MMGPT_KERNEL(256, shared_reads_kernel, const float* scale, const float* pair, const uint32_t* words, float* dst) {
  const int t = static_cast<int>(threadIdx.x), lane = t % 32, warp = t / 32;
  uint64_t w;
  std::memcpy(&w, words + warp * 33 + lane, sizeof w);  // 8 bytes at a 4-byte step (a CPU-only calibration)
  dst[t] = scale[0] * pair[warp * 16 + lane / 2] + static_cast<float>(w & 1);
}

// the input read twice (once reversed): what the audit must catch
MMGPT_KERNEL(256, double_read_kernel, const float* src, float* dst, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) dst[i] = src[i] + src[n - 1 - i];
}

unsigned blocks(int64_t work, int per_block) { return static_cast<unsigned>((work + per_block - 1) / per_block); }

}  // namespace

extern "C" {
// dtype 0: float32, 1: float16
int traffic_copy(int dtype, const void* src, void* dst, int n, bool aligned) {
  if (dtype == 0) {
    auto kernel = copy_kernel<float>;
    MMGPT_LAUNCH(kernel, blocks(n, 256 * 4), 256, 0, nullptr, static_cast<const float*>(src), static_cast<float*>(dst),
                 n, aligned);
  } else {
    auto kernel = copy_kernel<__half>;
    MMGPT_LAUNCH(kernel, blocks(n, 256 * 8), 256, 0, nullptr, static_cast<const __half*>(src),
                 static_cast<__half*>(dst), n, aligned);
  }
  return launched();
}

int traffic_staged_copy(const float* src, float* dst, int n) {
  auto kernel = staged_copy_kernel;
  MMGPT_LAUNCH(kernel, blocks(n, 128), 128, 128 * sizeof(float), nullptr, src, dst, n);
  return launched();
}

// chunks: a multiple of 128 (threads per block)
int traffic_cp_async_copy(const unsigned char* src, unsigned char* dst, int chunks, int src_bytes) {
  auto kernel = cp_async_copy_kernel;
  MMGPT_LAUNCH(kernel, blocks(chunks, 128), 128, 128 * 16, nullptr, src, dst, src_bytes);
  return launched();
}

// 256 threads: pair holds 8 x 16 floats, words 8 x 33 words
int traffic_shared_reads(const float* scale, const float* pair, const uint32_t* words, float* dst) {
  auto kernel = shared_reads_kernel;
  MMGPT_LAUNCH(kernel, 1, 256, 0, nullptr, scale, pair, words, dst);
  return launched();
}

int traffic_double_read(const float* src, float* dst, int n) {
  auto kernel = double_read_kernel;
  MMGPT_LAUNCH(kernel, blocks(n, 256), 256, 0, nullptr, src, dst, n);
  return launched();
}
}
