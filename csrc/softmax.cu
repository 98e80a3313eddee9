// Softmax over the last dim with scale, causal and a broadcast mask, forward and backward
// (contract: mmgpt_engine/ops/softmax.py, softmax_fwd / softmax_bwd).
//
// A warp (short rows) or a block (long rows) per row, the row in registers: one read, one
// write. Longer rows take a looped kernel: an online max/sum pass (one rescale per vector, not
// per element), then a normalise-and-write pass that re-reads the row (from L2).
// The mask is read at mask + row_offsets[row] + c * col_stride (elements), which covers every
// broadcast pattern of the user's mask without materialising it.
#include "common.cuh"
#include "dispatch.cuh"

namespace mmgpt {
namespace {

constexpr int kMaxElems = 32;  // register budget, floats per thread per row array
constexpr int kLoopedThreads = 512;

__device__ __forceinline__ float mask_value(const void* mask, DType dtype, int64_t idx) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(mask)[idx];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(mask)[idx]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(mask)[idx]);
    case DType::kFloat64: return static_cast<float>(static_cast<const double*>(mask)[idx]);
    default: return 0.f;
  }
}

// scale * x (+ mask), -inf where the mask, the causal limit or the row end hides column c.
struct Scorer {
  const void* mask;
  int64_t mask_off, mask_col_stride, causal_limit;
  DType mask_dtype;
  float scale;
  bool causal;
  int n;

  __device__ __forceinline__ Scorer(const SoftmaxFwdParams& p, int64_t row)
      : mask(p.mask), mask_off(p.mask != nullptr ? p.mask_row_offsets[row] : 0), mask_col_stride(p.mask_col_stride),
        causal_limit(p.causal_rows > 0 ? row % p.causal_rows + p.n - p.causal_rows : 0), mask_dtype(p.mask_dtype),
        scale(p.scale), causal(p.causal_rows > 0), n(p.n) {}

  __device__ __forceinline__ float operator()(float x, int c) const {
    if (c >= n || (causal && c > causal_limit)) return kNegInf;
    float s = x * scale;
    if (mask != nullptr) {
      const int64_t idx = mask_off + c * mask_col_stride;
      if (mask_dtype == DType::kBool) {
        if (static_cast<const uint8_t*>(mask)[idx] == 0) s = kNegInf;
      } else {
        s += mask_value(mask, mask_dtype, idx);
      }
    }
    return s;
  }
};

template <typename T, int NV, bool WARP_ROW>
MMGPT_KERNEL((RowBounds<WARP_ROW, NV * Vec<T>::kWidth>::kMaxThreads), softmax_fwd_kernel,
             const SoftmaxFwdParams p) {
  constexpr int VEC = Vec<T>::kWidth;
  __shared__ float scratch[32];
  const RowGroup<WARP_ROW> g;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * g.count + g.index;
  if (row >= p.rows) return;  // a whole warp (warp rows) or nobody (a block per row)
  const int64_t off = row * p.n;
  const Scorer score(p, row);
  RowSlice<T, NV> s;
  s.load(static_cast<const T*>(p.x) + off, p.n, g.lane, g.size, p.aligned, 0.f);
  float m = kNegInf;
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s.v[i][j] = score(s.v[i][j], RowSlice<T, NV>::col(i, j, g.lane, g.size));
      m = fmaxf(m, s.v[i][j]);
    }
  m = g.max(m, scratch);
  if (m == kNegInf) m = 0.f;  // nothing visible: every exp below is exp(-inf) = 0
  float d = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s.v[i][j] = expf(s.v[i][j] - m);
      d += s.v[i][j];
    }
  d = g.sum(d, scratch);
  const float inv = d > 0.f ? 1.f / d : 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) s.v[i][j] *= inv;
  s.store(static_cast<T*>(p.y) + off, p.n, g.lane, g.size, p.aligned);
}

template <typename T>
MMGPT_KERNEL(kLoopedThreads, softmax_fwd_looped_kernel, const SoftmaxFwdParams p) {
  constexpr int VEC = Vec<T>::kWidth;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.n;
  T* y = static_cast<T*>(p.y) + row * p.n;
  const Scorer score(p, row);
  const int step = blockDim.x * VEC;
  float m = kNegInf, d = 0.f;  // this thread's running max and sum of exp(s - m)
  for (int c0 = threadIdx.x * VEC; c0 < p.n; c0 += step) {
    float s[VEC];
    load_vec<T, VEC>(x, c0, p.n, p.aligned, s, 0.f);
    float block_m = kNegInf;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s[j] = score(s[j], c0 + j);
      block_m = fmaxf(block_m, s[j]);
    }
    const float m_new = fmaxf(m, block_m);
    if (m_new == kNegInf) continue;
    d *= expf(m - m_new);
#pragma unroll
    for (int j = 0; j < VEC; ++j) d += expf(s[j] - m_new);
    m = m_new;
  }
  float row_m = block_max(m, scratch);
  if (row_m == kNegInf) row_m = 0.f;
  const float row_d = block_sum(m == kNegInf ? 0.f : d * expf(m - row_m), scratch);
  const float inv = row_d > 0.f ? 1.f / row_d : 0.f;
  for (int c0 = threadIdx.x * VEC; c0 < p.n; c0 += step) {
    float s[VEC];
    load_vec<T, VEC>(x, c0, p.n, p.aligned, s, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s[j] = expf(score(s[j], c0 + j) - row_m) * inv;
    store_vec<T, VEC>(y, c0, p.n, p.aligned, s);
  }
}

template <typename T, int NV, bool WARP_ROW>
MMGPT_KERNEL((RowBounds<WARP_ROW, NV * Vec<T>::kWidth>::kMaxThreads), softmax_bwd_kernel,
             const SoftmaxBwdParams p) {
  constexpr int VEC = Vec<T>::kWidth;
  __shared__ float scratch[32];
  const RowGroup<WARP_ROW> g;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * g.count + g.index;
  if (row >= p.rows) return;
  const int64_t off = row * p.n;
  RowSlice<T, NV> y, dy;
  y.load(static_cast<const T*>(p.y) + off, p.n, g.lane, g.size, p.aligned, 0.f);
  dy.load(static_cast<const T*>(p.dy) + off, p.n, g.lane, g.size, p.aligned, 0.f);
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dot += y.v[i][j] * dy.v[i][j];  // padding loaded as 0
  dot = g.sum(dot, scratch);
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[i][j] = p.scale * y.v[i][j] * (dy.v[i][j] - dot);
  y.store(static_cast<T*>(p.dx) + off, p.n, g.lane, g.size, p.aligned);
}

template <typename T>
MMGPT_KERNEL(kLoopedThreads, softmax_bwd_looped_kernel, const SoftmaxBwdParams p) {
  constexpr int VEC = Vec<T>::kWidth;
  __shared__ float scratch[32];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * p.n;
  const T* y = static_cast<const T*>(p.y) + off;
  const T* dy = static_cast<const T*>(p.dy) + off;
  const int step = blockDim.x * VEC;
  float dot = 0.f;
  for (int c0 = threadIdx.x * VEC; c0 < p.n; c0 += step) {
    float yv[VEC], dv[VEC];
    load_vec<T, VEC>(y, c0, p.n, p.aligned, yv, 0.f);
    load_vec<T, VEC>(dy, c0, p.n, p.aligned, dv, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dot += yv[j] * dv[j];
  }
  dot = block_sum(dot, scratch);
  for (int c0 = threadIdx.x * VEC; c0 < p.n; c0 += step) {
    float yv[VEC], dv[VEC];
    load_vec<T, VEC>(y, c0, p.n, p.aligned, yv, 0.f);
    load_vec<T, VEC>(dy, c0, p.n, p.aligned, dv, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) yv[j] = p.scale * yv[j] * (dv[j] - dot);
    store_vec<T, VEC>(static_cast<T*>(p.dx) + off, c0, p.n, p.aligned, yv);
  }
}

template <typename T> cudaError_t launch_fwd(const SoftmaxFwdParams& p, cudaStream_t stream) {
  const RowPlan plan = plan_row(p.n, Vec<T>::kWidth, kMaxElems);
  if (!plan.fits) {
    auto kernel = softmax_fwd_looped_kernel<T>;
    MMGPT_LAUNCH(kernel, static_cast<unsigned>(p.rows), kLoopedThreads, 0, stream, p);
    return cudaGetLastError();
  }
  const unsigned blocks = static_cast<unsigned>(ceil_div(p.rows, plan.warp_row ? plan.threads / 32 : 1));
  with_nv<T, kMaxElems>(plan.nv, [&](auto nv) {
    auto launch = [&](auto kernel) { MMGPT_LAUNCH(kernel, blocks, plan.threads, 0, stream, p); };
    if (plan.warp_row) launch(softmax_fwd_kernel<T, decltype(nv)::value, true>);
    else launch(softmax_fwd_kernel<T, decltype(nv)::value, false>);
  });
  return cudaGetLastError();
}

template <typename T> cudaError_t launch_bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  const RowPlan plan = plan_row(p.n, Vec<T>::kWidth, kMaxElems);
  if (!plan.fits) {
    auto kernel = softmax_bwd_looped_kernel<T>;
    MMGPT_LAUNCH(kernel, static_cast<unsigned>(p.rows), kLoopedThreads, 0, stream, p);
    return cudaGetLastError();
  }
  const unsigned blocks = static_cast<unsigned>(ceil_div(p.rows, plan.warp_row ? plan.threads / 32 : 1));
  with_nv<T, kMaxElems>(plan.nv, [&](auto nv) {
    auto launch = [&](auto kernel) { MMGPT_LAUNCH(kernel, blocks, plan.threads, 0, stream, p); };
    if (plan.warp_row) launch(softmax_bwd_kernel<T, decltype(nv)::value, true>);
    else launch(softmax_bwd_kernel<T, decltype(nv)::value, false>);
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t softmax_fwd(const SoftmaxFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  with_float_dtype(dtype, [&](auto tag) { err = launch_fwd<typename decltype(tag)::type>(p, stream); });
  return err;
}

cudaError_t softmax_bwd(const SoftmaxBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  with_float_dtype(dtype, [&](auto tag) { err = launch_bwd<typename decltype(tag)::type>(p, stream); });
  return err;
}

}  // namespace mmgpt
