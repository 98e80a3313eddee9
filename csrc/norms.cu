// LayerNorm / RMSNorm with the residual add fused in, forward and backward
// (contract: mmgpt_engine/ops/norms.py, norm_fwd / norm_bwd).
//
// Forward: a warp (short rows) or a block (long rows) per row, the row held in registers
// (16-byte loads), two reductions (mean, then the centred sum of squares: no E[x^2] - E[x]^2
// cancellation). The grid is what the device holds at once and each block walks rows, so the
// weight and bias are read from global memory once per block: copied into shared memory in their
// own dtype, where every row of the block reads them (where the device has no room for the copy,
// each row reads them from global memory, L2 hits after the first). Rows longer than the register
// budget take a three-pass looped kernel, a block per row.
// Backward: a fixed number of blocks walk the rows, the weight staged the same way; each thread
// keeps the weight/bias gradient sums of the columns it owns in shared memory (16-byte slots,
// slot-major: no bank conflicts), each block then writes one float32 partial row, and a second
// kernel sums the partial rows per column into the gradients, in the parameters' dtype. No atomics,
// so the gradients are deterministic.
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "dispatch.cuh"

namespace mmgpt {
namespace {

constexpr int kFwdMaxElems = 32;  // register budget, floats per thread for the row
// per row array; the backward keeps two (h and dy): 32 + 32 floats spill for float32 rows
template <typename T> constexpr int bwd_max_elems() { return sizeof(T) == 4 ? 16 : 32; }
constexpr int kLoopedThreads = 512;

template <typename T> constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kFloat32;
  else if constexpr (std::is_same_v<T, __half>) return DType::kFloat16;
  else return DType::kBFloat16;
}

// f(Tag<P>{}) for the parameters' storage type P on rows of T: T itself, or float (mixed
// precision); false for any other.
template <typename T, typename F> bool with_param_type(DType param_dtype, F&& f) {
  if (param_dtype == dtype_of<T>()) {
    f(Tag<T>{});
    return true;
  }
  if constexpr (!std::is_same_v<T, float>) {
    if (param_dtype == DType::kFloat32) {
      f(Tag<float>{});
      return true;
    }
  }
  return false;
}

// Shared-memory bytes of one staged parameter vector, rounded up so that the next starts 16-byte aligned.
__host__ __device__ constexpr int staged_bytes(int n, int elem_bytes) { return (n * elem_bytes + 15) / 16 * 16; }

// Copies a parameter vector (n elements, nullptr for none) into shared memory with every thread of
// the block, in 16-byte chunks where `aligned` (then n * sizeof(P) % 16 == 0: P is at least as wide
// as the row type); returns the copy. The caller synchronises before reading it.
template <typename P>
__device__ __forceinline__ const P* stage_param(const P* src, P* dst, int n, bool aligned) {
  if (src == nullptr) return nullptr;
  constexpr int W = Vec<P>::kWidth;
  for (int c = threadIdx.x * W; c < n; c += blockDim.x * W) {
    if (aligned) {
      *reinterpret_cast<uint4*>(dst + c) = *reinterpret_cast<const uint4*>(src + c);
    } else {
      for (int j = 0; j < W && c + j < n; ++j) dst[c + j] = src[c + j];
    }
  }
  return dst;
}

// The VEC parameters from column c0 as floats (fill beyond n): one 16-byte access per Vec<P> where
// `aligned`, two per row vector for float32 parameters on half rows.
template <typename P, int VEC>
__device__ __forceinline__ void load_param(const P* src, int c0, int n, bool aligned, float (&v)[VEC], float fill) {
  constexpr int W = Vec<P>::kWidth;
  static_assert(VEC % W == 0, "whole 16-byte parameter accesses per row vector");
#pragma unroll
  for (int k = 0; k < VEC / W; ++k) {
    float part[W];
    load_vec<P, W>(src, c0 + k * W, n, aligned, part, fill);
#pragma unroll
    for (int j = 0; j < W; ++j) v[k * W + j] = part[j];
  }
}

template <typename P, int VEC>
__device__ __forceinline__ void load_param_or(const P* src, int c0, int n, bool aligned, float (&v)[VEC],
                                              float absent) {
  if (src != nullptr) {
    load_param<P, VEC>(src, c0, n, aligned, v, absent);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = absent;
  }
}

// Dynamic shared memory: the staged weight, then the staged bias (forward).
template <typename T, typename P, int NV, bool WARP_ROW>
MMGPT_KERNEL((RowBounds<WARP_ROW, NV * Vec<T>::kWidth>::kMaxThreads), norm_fwd_kernel, const NormFwdParams p,
             const bool staged) {
  constexpr int VEC = RowSlice<T, NV>::VEC;
  MMGPT_DYNAMIC_SMEM(float, norm_smem);
  __shared__ float scratch[32];
  const RowGroup<WARP_ROW> g;
  const int n = p.n;
  // where every row reads the parameters: the block's shared-memory copy, or global memory
  const P* const weight = staged ? stage_param(static_cast<const P*>(p.weight), reinterpret_cast<P*>(norm_smem), n,
                                               p.aligned)
                                 : static_cast<const P*>(p.weight);
  const int bias_at = p.weight != nullptr ? staged_bytes(n, sizeof(P)) / static_cast<int>(sizeof(P)) : 0;
  const P* const bias = staged ? stage_param(static_cast<const P*>(p.bias), reinterpret_cast<P*>(norm_smem) + bias_at,
                                             n, p.aligned)
                               : static_cast<const P*>(p.bias);
  if (staged) __syncthreads();
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * g.count;
  // block rows: every thread of the block on the same row, so the barriers of g.sum are uniform
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * g.count + g.index; row < p.rows; row += row_step) {
    const int64_t off = row * n;
    RowSlice<T, NV> x;
    x.load(static_cast<const T*>(p.x) + off, n, g.lane, g.size, p.aligned, 0.f);
    if (p.residual != nullptr) {
      // one vector of the residual at a time: the row stays the only row-sized register array
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int c0 = (i * g.size + g.lane) * VEC;
        float r[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.residual) + off, c0, n, p.aligned, r, 0.f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) x.v[i][j] = round_to<T>(x.v[i][j] + r[j]);
        // h is normalised as stored, so the backward (which reads h back) sees the same values
        store_vec<T, VEC>(static_cast<T*>(p.h) + off, c0, n, p.aligned, x.v[i]);
      }
    }
    float mean = 0.f;
    if (!p.is_rms) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < NV; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += x.v[i][j];  // padding loaded as 0
      mean = g.sum(s, scratch) / n;
    }
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (RowSlice<T, NV>::col(i, j, g.lane, g.size) < n) {
          const float d = x.v[i][j] - mean;
          ss += d * d;
        }
    const float rstd = rsqrtf(g.sum(ss, scratch) / n + p.eps);
    if (g.lane == 0) {
      p.rstd[row] = rstd;
      if (!p.is_rms) p.mean[row] = mean;
    }
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c0 = (i * g.size + g.lane) * VEC;
      float w[VEC], b[VEC];
      load_param_or<P, VEC>(weight, c0, n, p.aligned, w, 1.f);
      load_param_or<P, VEC>(bias, c0, n, p.aligned, b, 0.f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) x.v[i][j] = (x.v[i][j] - mean) * rstd * w[j] + b[j];
    }
    x.store(static_cast<T*>(p.y) + off, n, g.lane, g.size, p.aligned);
  }
}

// Rows too long for registers: three passes over the row (the later ones hit L2).
template <typename T, typename P>
MMGPT_KERNEL(1024, norm_fwd_looped_kernel, const NormFwdParams p) {
  constexpr int VEC = Vec<T>::kWidth;
  __shared__ float scratch[32];
  const int n = p.n;
  const int64_t row = blockIdx.x;
  const int64_t off = row * n;
  const T* x = static_cast<const T*>(p.x) + off;
  T* h = p.residual != nullptr ? static_cast<T*>(p.h) + off : nullptr;
  const T* src = h != nullptr ? h : x;  // each thread re-reads only the columns it wrote itself
  const P* weight = static_cast<const P*>(p.weight);
  const P* bias = static_cast<const P*>(p.bias);
  const int step = blockDim.x * VEC;
  float s = 0.f;
  for (int c0 = threadIdx.x * VEC; c0 < n; c0 += step) {
    float v[VEC];
    load_vec<T, VEC>(x, c0, n, p.aligned, v, 0.f);
    if (h != nullptr) {
      float r[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.residual) + off, c0, n, p.aligned, r, 0.f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = round_to<T>(v[j] + r[j]);
      store_vec<T, VEC>(h, c0, n, p.aligned, v);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += v[j];
  }
  const float mean = p.is_rms ? 0.f : block_sum(s, scratch) / n;
  float ss = 0.f;
  for (int c0 = threadIdx.x * VEC; c0 < n; c0 += step) {
    float v[VEC];
    load_vec<T, VEC>(src, c0, n, p.aligned, v, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (c0 + j < n) ss += (v[j] - mean) * (v[j] - mean);
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / n + p.eps);
  if (threadIdx.x == 0) {
    p.rstd[row] = rstd;
    if (!p.is_rms) p.mean[row] = mean;
  }
  for (int c0 = threadIdx.x * VEC; c0 < n; c0 += step) {
    float v[VEC], w[VEC], b[VEC];
    load_vec<T, VEC>(src, c0, n, p.aligned, v, 0.f);
    load_param_or<P, VEC>(weight, c0, n, p.aligned, w, 1.f);
    load_param_or<P, VEC>(bias, c0, n, p.aligned, b, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = (v[j] - mean) * rstd * w[j] + b[j];
    store_vec<T, VEC>(static_cast<T*>(p.y) + off, c0, n, p.aligned, v);
  }
}

__device__ __forceinline__ void add4(float4& a, const float* v) {
  a.x += v[0];
  a.y += v[1];
  a.z += v[2];
  a.w += v[3];
}

// Backward, rows in registers. Dynamic shared memory: per row group, n_acc arrays of `slots`
// floats in float4 quads (quad q * size + lane holds the thread's slice elements 4q .. 4q + 3, slice
// element k = i * VEC + j being column col(i, j, lane, size): 16-byte accesses, no bank conflicts,
// NV * VEC / 4 addresses a thread), then the staged weight.
template <typename T, typename P, int NV, bool WARP_ROW>
MMGPT_KERNEL((RowBounds<WARP_ROW, NV * Vec<T>::kWidth>::kMaxThreads), norm_bwd_kernel, const NormBwdParams p,
             float* dw_part, float* db_part, const bool staged) {
  constexpr int VEC = RowSlice<T, NV>::VEC;
  constexpr int QUADS = VEC / 4;  // per row vector
  MMGPT_DYNAMIC_SMEM(float, norm_smem);
  __shared__ float scratch[32];
  const RowGroup<WARP_ROW> g;
  const int n = p.n;
  const int slots = NV * VEC * g.size;
  const int n_acc = (dw_part != nullptr) + (db_part != nullptr);
  float4* dw_acc = reinterpret_cast<float4*>(norm_smem + g.index * n_acc * slots) + g.lane;
  float4* db_acc = dw_acc + (dw_part != nullptr ? slots / 4 : 0);
#pragma unroll
  for (int q = 0; q < NV * QUADS; ++q) {
    if (dw_part != nullptr) dw_acc[q * g.size] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (db_part != nullptr) db_acc[q * g.size] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const P* const weight = staged ? stage_param(static_cast<const P*>(p.weight),
                                               reinterpret_cast<P*>(norm_smem + g.count * n_acc * slots), n, p.aligned)
                                 : static_cast<const P*>(p.weight);
  if (staged) __syncthreads();
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * g.count;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * g.count + g.index; row < p.rows; row += row_step) {
    const int64_t off = row * n;
    RowSlice<T, NV> h, dy;
    h.load(static_cast<const T*>(p.h) + off, n, g.lane, g.size, p.aligned, 0.f);
    dy.load(static_cast<const T*>(p.dy) + off, n, g.lane, g.size, p.aligned, 0.f);
    const float rstd = p.rstd[row];
    const float mean = p.is_rms ? 0.f : p.mean[row];
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      float w[VEC], dw[VEC], db[VEC];
      load_param_or<P, VEC>(weight, (i * g.size + g.lane) * VEC, n, p.aligned, w, 1.f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (h.v[i][j] - mean) * rstd;
        const float d = dy.v[i][j];
        const float wdy = d * w[j];
        if (RowSlice<T, NV>::col(i, j, g.lane, g.size) < n) {
          c1 += xhat * wdy;
          c2 += wdy;
        }
        dw[j] = d * xhat;  // d == 0 on padding
        db[j] = d;
        h.v[i][j] = xhat;
        dy.v[i][j] = wdy;
      }
#pragma unroll
      for (int u = 0; u < QUADS; ++u) {
        const int q = (i * QUADS + u) * g.size;
        if (dw_part != nullptr) add4(dw_acc[q], dw + 4 * u);
        if (db_part != nullptr) add4(db_acc[q], db + 4 * u);
      }
    }
    c1 = g.sum(c1, scratch) / n;
    c2 = p.is_rms ? 0.f : g.sum(c2, scratch) / n;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      float dres[VEC];
      const int c0 = (i * g.size + g.lane) * VEC;
      if (p.dh != nullptr) {
        load_vec<T, VEC>(static_cast<const T*>(p.dh) + off, c0, n, p.aligned, dres, 0.f);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dres[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) h.v[i][j] = (dy.v[i][j] - h.v[i][j] * c1 - c2) * rstd + dres[j];
    }
    h.store(static_cast<T*>(p.dx) + off, n, g.lane, g.size, p.aligned);
  }
  __syncthreads();
  // this block's partial row: the sum over its row groups
  for (int s = threadIdx.x; s < slots; s += blockDim.x) {
    const int lane = (s / 4) % g.size, k = s / 4 / g.size * 4 + s % 4;  // float s of the quads
    const int c = ((k / VEC) * g.size + lane) * VEC + k % VEC;
    if (c >= n) continue;
    for (int a = 0; a < n_acc; ++a) {
      float total = 0.f;
      for (int grp = 0; grp < g.count; ++grp) total += norm_smem[(grp * n_acc + a) * slots + s];
      float* part = (a == 0 && dw_part != nullptr) ? dw_part : db_part;
      part[static_cast<int64_t>(blockIdx.x) * n + c] = total;
    }
  }
}

// Backward for rows too long for registers: two passes over the row; the partial sums live in
// this block's partial row in global memory (each thread owns its columns, so no races).
template <typename T, typename P>
MMGPT_KERNEL(1024, norm_bwd_looped_kernel, const NormBwdParams p, float* dw_part, float* db_part) {
  constexpr int VEC = Vec<T>::kWidth;
  __shared__ float scratch[32];
  const int n = p.n;
  const int step = blockDim.x * VEC;
  const P* weight = static_cast<const P*>(p.weight);
  float* dw_row = dw_part != nullptr ? dw_part + static_cast<int64_t>(blockIdx.x) * n : nullptr;
  float* db_row = db_part != nullptr ? db_part + static_cast<int64_t>(blockIdx.x) * n : nullptr;
  for (int c = threadIdx.x * VEC; c < n; c += step)
    for (int j = 0; j < VEC && c + j < n; ++j) {
      if (dw_row != nullptr) dw_row[c + j] = 0.f;
      if (db_row != nullptr) db_row[c + j] = 0.f;
    }
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t off = row * n;
    const T* h = static_cast<const T*>(p.h) + off;
    const T* dy = static_cast<const T*>(p.dy) + off;
    const float rstd = p.rstd[row];
    const float mean = p.is_rms ? 0.f : p.mean[row];
    float c1 = 0.f, c2 = 0.f;
    for (int c0 = threadIdx.x * VEC; c0 < n; c0 += step) {
      float hv[VEC], dv[VEC], w[VEC];
      load_vec<T, VEC>(h, c0, n, p.aligned, hv, 0.f);
      load_vec<T, VEC>(dy, c0, n, p.aligned, dv, 0.f);
      load_param_or<P, VEC>(weight, c0, n, p.aligned, w, 1.f);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (c0 + j < n) {
          const float wdy = dv[j] * w[j];
          c1 += (hv[j] - mean) * rstd * wdy;
          c2 += wdy;
        }
    }
    c1 = block_sum(c1, scratch) / n;
    c2 = p.is_rms ? 0.f : block_sum(c2, scratch) / n;
    for (int c0 = threadIdx.x * VEC; c0 < n; c0 += step) {
      float hv[VEC], dv[VEC], dres[VEC], w[VEC];
      load_vec<T, VEC>(h, c0, n, p.aligned, hv, 0.f);
      load_vec<T, VEC>(dy, c0, n, p.aligned, dv, 0.f);
      load_param_or<P, VEC>(weight, c0, n, p.aligned, w, 1.f);
      if (p.dh != nullptr) {
        load_vec<T, VEC>(static_cast<const T*>(p.dh) + off, c0, n, p.aligned, dres, 0.f);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dres[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (hv[j] - mean) * rstd;
        if (c0 + j < n) {
          if (dw_row != nullptr) dw_row[c0 + j] += dv[j] * xhat;
          if (db_row != nullptr) db_row[c0 + j] += dv[j];
        }
        hv[j] = (dv[j] * w[j] - xhat * c1 - c2) * rstd + dres[j];
      }
      store_vec<T, VEC>(static_cast<T*>(p.dx) + off, c0, n, p.aligned, hv);
    }
  }
}

// Second stage of the weight/bias gradient: out[c] = sum over the partial rows of column c, in the
// parameter's dtype. A 32 x 8 block: x picks the column (coalesced), y strides over the partial rows.
template <typename P>
MMGPT_KERNEL(256, column_sum_kernel, const float* __restrict__ part, int64_t rows, int n, P* __restrict__ out) {
  __shared__ float tile[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < n)
    for (int64_t r = threadIdx.y; r < rows; r += 8) s += part[r * n + c];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
#pragma unroll
    for (int k = 1; k < 8; ++k) s += tile[k][threadIdx.x];
    out[c] = from_float<P>(s);
  }
}

// Blocks of `threads` threads with `smem` bytes of dynamic shared memory that one SM runs at once:
// 2048 threads (sm_80, sm_90; 1536 on sm_86 / sm_89, whose grid is then a little more than one wave)
// and about the opt-in shared memory. Registers are not counted.
inline int blocks_per_sm(int threads, int smem) {
  int per_sm = std::max(1, 2048 / threads);
  if (smem > 0) per_sm = std::max(1, std::min(per_sm, max_smem_optin() / smem));
  return per_sm;
}

struct FwdPlan {
  RowPlan row;
  int blocks;   // register path: at most what the device holds at once, each block walking rows
  int smem;     // dynamic shared memory bytes: the staged weight and bias
  bool staged;  // false: no room for them in shared memory, every row reads them from global memory
};

FwdPlan plan_fwd(const NormFwdParams& p, int vec, int param_bytes) {
  FwdPlan plan{plan_row(p.n, vec, kFwdMaxElems), 0, 0, false};
  if (!plan.row.fits) return plan;
  const int stage = (p.weight != nullptr ? staged_bytes(p.n, param_bytes) : 0) +
                    (p.bias != nullptr ? staged_bytes(p.n, param_bytes) : 0);
  plan.staged = stage > 0 && stage <= max_smem_optin();
  plan.smem = plan.staged ? stage : 0;
  const int groups = plan.row.warp_row ? plan.row.threads / 32 : 1;
  const int64_t resident = int64_t{sm_count()} * blocks_per_sm(plan.row.threads, plan.smem);
  plan.blocks = static_cast<int>(std::min<int64_t>(ceil_div(p.rows, groups), resident));
  return plan;
}

struct BwdPlan {
  RowPlan row;
  int blocks;
  int smem;     // dynamic shared memory bytes (register path): the partial sums, then the staged weight
  bool staged;  // as FwdPlan::staged
};

BwdPlan plan_bwd(const NormBwdParams& p, int vec, int max_elems, int param_bytes) {
  const int n_acc = (p.dweight != nullptr) + (p.dbias != nullptr);
  BwdPlan plan{plan_row(p.n, vec, max_elems), 1, 0, false};
  const int sms = sm_count();
  if (plan.row.fits) {
    const int groups = plan.row.warp_row ? plan.row.threads / 32 : 1;
    const int slots = plan.row.nv * vec * (plan.row.warp_row ? 32 : plan.row.threads);
    const int acc = groups * n_acc * slots * static_cast<int>(sizeof(float));
    const int stage = p.weight != nullptr ? staged_bytes(p.n, param_bytes) : 0;
    const int optin = max_smem_optin();
    if (acc <= optin) {
      plan.staged = stage > 0 && acc + stage <= optin;
      plan.smem = acc + (plan.staged ? stage : 0);
      const int64_t resident = int64_t{sms} * blocks_per_sm(plan.row.threads, plan.smem);
      plan.blocks = static_cast<int>(std::min<int64_t>(ceil_div(p.rows, groups), resident));
      return plan;
    }
    plan.row.fits = false;
  }
  plan.row.threads = kLoopedThreads;
  plan.blocks = static_cast<int>(std::min<int64_t>(p.rows, int64_t{sms} * 2));
  return plan;
}

template <typename T, typename P> cudaError_t launch_norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  const FwdPlan plan = plan_fwd(p, Vec<T>::kWidth, sizeof(P));
  if (!plan.row.fits) {
    auto kernel = norm_fwd_looped_kernel<T, P>;
    MMGPT_LAUNCH(kernel, static_cast<unsigned>(p.rows), 1024, 0, stream, p);
    return cudaGetLastError();
  }
  cudaError_t err = cudaSuccess;
  with_nv<T, kFwdMaxElems>(plan.row.nv, [&](auto nv) {
    auto launch = [&](auto kernel) {
      err = allow_dynamic_smem(kernel, plan.smem);
      if (err != cudaSuccess) return;
      MMGPT_LAUNCH(kernel, plan.blocks, plan.row.threads, plan.smem, stream, p, plan.staged);
    };
    if (plan.row.warp_row) launch(norm_fwd_kernel<T, P, decltype(nv)::value, true>);
    else launch(norm_fwd_kernel<T, P, decltype(nv)::value, false>);
  });
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T, typename P> cudaError_t launch_norm_bwd(const NormBwdParams& p, cudaStream_t stream) {
  const BwdPlan plan = plan_bwd(p, Vec<T>::kWidth, bwd_max_elems<T>(), sizeof(P));
  float* dw_part = p.dweight != nullptr ? p.partials : nullptr;
  float* db_part = p.dbias != nullptr ? p.partials + (dw_part != nullptr ? int64_t{plan.blocks} * p.n : 0) : nullptr;
  if (!plan.row.fits) {
    auto kernel = norm_bwd_looped_kernel<T, P>;
    MMGPT_LAUNCH(kernel, plan.blocks, plan.row.threads, 0, stream, p, dw_part, db_part);
  } else {
    cudaError_t err = cudaSuccess;
    with_nv<T, bwd_max_elems<T>()>(plan.row.nv, [&](auto nv) {
      auto launch = [&](auto kernel) {
        err = allow_dynamic_smem(kernel, plan.smem);
        if (err != cudaSuccess) return;
        MMGPT_LAUNCH(kernel, plan.blocks, plan.row.threads, plan.smem, stream, p, dw_part, db_part, plan.staged);
      };
      if (plan.row.warp_row) launch(norm_bwd_kernel<T, P, decltype(nv)::value, true>);
      else launch(norm_bwd_kernel<T, P, decltype(nv)::value, false>);
    });
    if (err != cudaSuccess) return err;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 block(32, 8), grid(static_cast<unsigned>(ceil_div(p.n, 32)));
  auto reduce = column_sum_kernel<P>;
  if (dw_part != nullptr)
    MMGPT_LAUNCH(reduce, grid, block, 0, stream, dw_part, int64_t{plan.blocks}, p.n, static_cast<P*>(p.dweight));
  if (db_part != nullptr)
    MMGPT_LAUNCH(reduce, grid, block, 0, stream, db_part, int64_t{plan.blocks}, p.n, static_cast<P*>(p.dbias));
  return cudaGetLastError();
}

// f(Tag<T>{}, Tag<P>{}) for the row and parameter storage types; cudaErrorInvalidValue for a pair
// the kernels do not take.
template <typename F> cudaError_t with_norm_types(DType dtype, DType param_dtype, F&& f) {
  cudaError_t err = cudaErrorInvalidValue;
  with_float_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_param_type<T>(param_dtype, [&](auto ptag) { err = f(tag, ptag); });
  });
  return err;
}

}  // namespace

int64_t norm_bwd_workspace_floats(const NormBwdParams& p, DType dtype) {
  int64_t blocks = 0;
  with_norm_types(dtype, p.param_dtype, [&](auto tag, auto ptag) {
    using T = typename decltype(tag)::type;
    blocks = plan_bwd(p, Vec<T>::kWidth, bwd_max_elems<T>(), sizeof(typename decltype(ptag)::type)).blocks;
    return cudaSuccess;
  });
  const int n_acc = (p.dweight != nullptr) + (p.dbias != nullptr);
  return n_acc * blocks * p.n;
}

cudaError_t norm_fwd(const NormFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return with_norm_types(dtype, p.param_dtype, [&](auto tag, auto ptag) {
    return launch_norm_fwd<typename decltype(tag)::type, typename decltype(ptag)::type>(p, stream);
  });
}

cudaError_t norm_bwd(const NormBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return with_norm_types(dtype, p.param_dtype, [&](auto tag, auto ptag) {
    return launch_norm_bwd<typename decltype(tag)::type, typename decltype(ptag)::type>(p, stream);
  });
}

}  // namespace mmgpt
