// Softmax cross-entropy over vocabularies of any size, forward and backward
// (contract: mmgpt_engine/ops/cross_entropy.py, cross_entropy_fwd / cross_entropy_bwd).
//
// Forward: a block per row streams the logits with 16-byte loads keeping a per-thread online
// log-sum-exp (one rescale per vector), merged across the block at the end; only the row's lse
// and loss are written, nothing logits-sized. Backward: one pass writing
// dloss * (exp(x - lse) - onehot); a 2-d grid (row, vocab chunk) keeps every SM busy even for a
// few rows.
#include "common.cuh"
#include "dispatch.cuh"

namespace mmgpt {
namespace {

constexpr int kThreads = 512;
constexpr int kBwdVectorsPerThread = 4;  // vectors of 16 bytes each thread writes per backward block

template <typename T>
MMGPT_KERNEL(kThreads, cross_entropy_fwd_kernel, const CrossEntropyFwdParams p) {
  constexpr int VEC = Vec<T>::kWidth;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.logits) + row * p.vocab;
  const int step = blockDim.x * VEC;
  float m = kNegInf, d = 0.f;
  for (int c0 = threadIdx.x * VEC; c0 < p.vocab; c0 += step) {
    float v[VEC];
    load_vec<T, VEC>(x, c0, p.vocab, p.aligned, v, kNegInf);
    float vm = kNegInf;
#pragma unroll
    for (int j = 0; j < VEC; ++j) vm = fmaxf(vm, v[j]);
    const float m_new = fmaxf(m, vm);
    if (m_new == kNegInf) continue;
    d *= expf(m - m_new);
#pragma unroll
    for (int j = 0; j < VEC; ++j) d += expf(v[j] - m_new);
    m = m_new;
  }
  const float row_m = block_max(m, scratch);
  const float safe_m = row_m == kNegInf ? 0.f : row_m;
  const float row_d = block_sum(m == kNegInf ? 0.f : d * expf(m - safe_m), scratch);
  if (threadIdx.x == 0) {
    const float lse = safe_m + logf(row_d);  // -inf when every logit is -inf
    p.lse[row] = lse;
    const int64_t t = p.target[row];
    float loss;
    if (t == p.ignore_index) loss = 0.f;
    else if (t < 0 || t >= p.vocab) loss = __int_as_float(0x7fc00000);  // NaN: the target is not a class
    else loss = lse - to_float(x[t]);
    p.loss[row] = loss;
  }
}

template <typename T>
MMGPT_KERNEL(kThreads, cross_entropy_bwd_kernel, const CrossEntropyBwdParams p, int chunk) {
  constexpr int VEC = Vec<T>::kWidth;
  const int64_t row = blockIdx.x;
  const int64_t t = p.target[row];
  const float g = t == p.ignore_index ? 0.f : p.dloss[row];
  const float lse = p.lse[row];
  const T* x = static_cast<const T*>(p.logits) + row * p.vocab;
  T* dx = static_cast<T*>(p.dlogits) + row * p.vocab;
  const int begin = blockIdx.y * chunk;
  const int end = begin + chunk < p.vocab ? begin + chunk : p.vocab;
  for (int c0 = begin + threadIdx.x * VEC; c0 < end; c0 += blockDim.x * VEC) {
    float v[VEC];
    load_vec<T, VEC>(x, c0, p.vocab, p.aligned, v, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = g == 0.f ? 0.f : g * (expf(v[j] - lse) - (c0 + j == t ? 1.f : 0.f));
    store_vec<T, VEC>(dx, c0, p.vocab, p.aligned, v);
  }
}

template <typename T> cudaError_t launch_fwd(const CrossEntropyFwdParams& p, cudaStream_t stream) {
  const int nvec = static_cast<int>(ceil_div(p.vocab, Vec<T>::kWidth));
  const int threads = nvec >= kThreads ? kThreads : (nvec + 31) / 32 * 32;
  auto kernel = cross_entropy_fwd_kernel<T>;
  MMGPT_LAUNCH(kernel, static_cast<unsigned>(p.rows), threads, 0, stream, p);
  return cudaGetLastError();
}

template <typename T> cudaError_t launch_bwd(const CrossEntropyBwdParams& p, cudaStream_t stream) {
  constexpr int VEC = Vec<T>::kWidth;
  const int nvec = static_cast<int>(ceil_div(p.vocab, VEC));
  const int threads = nvec >= kThreads ? kThreads : (nvec + 31) / 32 * 32;
  const int chunk = threads * VEC * kBwdVectorsPerThread;  // a multiple of VEC: vectors never straddle chunks
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(ceil_div(p.vocab, chunk)));
  auto kernel = cross_entropy_bwd_kernel<T>;
  MMGPT_LAUNCH(kernel, grid, threads, 0, stream, p, chunk);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_fwd(const CrossEntropyFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  with_float_dtype(dtype, [&](auto tag) { err = launch_fwd<typename decltype(tag)::type>(p, stream); });
  return err;
}

cudaError_t cross_entropy_bwd(const CrossEntropyBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  with_float_dtype(dtype, [&](auto tag) { err = launch_bwd<typename decltype(tag)::type>(p, stream); });
  return err;
}

}  // namespace mmgpt
