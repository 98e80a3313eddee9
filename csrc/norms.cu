// LayerNorm / RMSNorm with the residual add fused in, forward and backward
// (contract: mmgpt_engine/ops/norms.py, norm_fwd / norm_bwd).
//
// Forward: a warp (short rows) or a block (long rows) per row, the row held in registers
// (16-byte loads), two reductions (mean, then the centred sum of squares: no E[x^2] - E[x]^2
// cancellation). Rows longer than the register budget take a three-pass looped kernel.
// Backward: a fixed number of blocks walk the rows; each thread keeps the weight/bias gradient
// sums of the columns it owns in shared memory (slot-major: no bank conflicts), each block then
// writes one partial row, and a second kernel sums the partial rows per column. No atomics, so
// the gradients are deterministic.
#include <algorithm>

#include "common.cuh"
#include "dispatch.cuh"

namespace mmgpt {
namespace {

constexpr int kFwdMaxElems = 32;  // register budget, floats per thread for the row
// per row array; the backward keeps two (h and dy): 32 + 32 floats spill for float32 rows
template <typename T> constexpr int bwd_max_elems() { return sizeof(T) == 4 ? 16 : 32; }
constexpr int kLoopedThreads = 512;

template <typename T, int NV, bool WARP_ROW>
MMGPT_KERNEL((RowBounds<WARP_ROW, NV * Vec<T>::kWidth>::kMaxThreads), norm_fwd_kernel, const NormFwdParams p) {
  __shared__ float scratch[32];
  const RowGroup<WARP_ROW> g;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * g.count + g.index;
  if (row >= p.rows) return;  // a whole warp (warp rows) or nobody (a block per row, grid == rows)
  const int n = p.n;
  const int64_t off = row * n;
  RowSlice<T, NV> x;
  x.load(static_cast<const T*>(p.x) + off, n, g.lane, g.size, p.aligned, 0.f);
  if (p.residual != nullptr) {
    // one vector of the residual at a time: the row stays the only row-sized register array
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      constexpr int VEC = RowSlice<T, NV>::VEC;
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
      for (int j = 0; j < RowSlice<T, NV>::VEC; ++j) s += x.v[i][j];  // padding loaded as 0
    mean = g.sum(s, scratch) / n;
  }
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < RowSlice<T, NV>::VEC; ++j)
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
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < RowSlice<T, NV>::VEC; ++j) {
      const int c = RowSlice<T, NV>::col(i, j, g.lane, g.size);
      if (c < n) {
        float y = (x.v[i][j] - mean) * rstd;
        if (p.weight != nullptr) y *= p.weight[c];
        if (p.bias != nullptr) y += p.bias[c];
        x.v[i][j] = y;
      }
    }
  x.store(static_cast<T*>(p.y) + off, n, g.lane, g.size, p.aligned);
}

// Rows too long for registers: three passes over the row (the later ones hit L2).
template <typename T>
MMGPT_KERNEL(1024, norm_fwd_looped_kernel, const NormFwdParams p) {
  constexpr int VEC = Vec<T>::kWidth;
  __shared__ float scratch[32];
  const int n = p.n;
  const int64_t row = blockIdx.x;
  const int64_t off = row * n;
  const T* x = static_cast<const T*>(p.x) + off;
  T* h = p.residual != nullptr ? static_cast<T*>(p.h) + off : nullptr;
  const T* src = h != nullptr ? h : x;  // each thread re-reads only the columns it wrote itself
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
    float v[VEC];
    load_vec<T, VEC>(src, c0, n, p.aligned, v, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int c = c0 + j < n ? c0 + j : n - 1;
      float y = (v[j] - mean) * rstd;
      if (p.weight != nullptr) y *= p.weight[c];
      if (p.bias != nullptr) y += p.bias[c];
      v[j] = y;
    }
    store_vec<T, VEC>(static_cast<T*>(p.y) + off, c0, n, p.aligned, v);
  }
}

// Backward, rows in registers. Shared memory: per row group, n_acc arrays of `slots` floats
// (slot (i * VEC + j) * size + lane holds column col(i, j, lane, size) of this thread).
template <typename T, int NV, bool WARP_ROW>
MMGPT_KERNEL((RowBounds<WARP_ROW, NV * Vec<T>::kWidth>::kMaxThreads), norm_bwd_kernel, const NormBwdParams p,
             float* dw_part, float* db_part) {
  constexpr int VEC = RowSlice<T, NV>::VEC;
  MMGPT_DYNAMIC_SMEM(float, acc);
  __shared__ float scratch[32];
  const RowGroup<WARP_ROW> g;
  const int n = p.n;
  const int slots = NV * VEC * g.size;
  const int n_acc = (dw_part != nullptr) + (db_part != nullptr);
  float* dw_acc = acc + g.index * n_acc * slots;
  float* db_acc = dw_acc + (dw_part != nullptr ? slots : 0);
#pragma unroll
  for (int k = 0; k < NV * VEC; ++k) {
    if (dw_part != nullptr) dw_acc[k * g.size + g.lane] = 0.f;
    if (db_part != nullptr) db_acc[k * g.size + g.lane] = 0.f;
  }
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
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int c = RowSlice<T, NV>::col(i, j, g.lane, g.size);
        const float xhat = (h.v[i][j] - mean) * rstd;
        const float d = dy.v[i][j];
        const float wdy = p.weight != nullptr && c < n ? d * p.weight[c] : d;
        if (c < n) {
          c1 += xhat * wdy;
          c2 += wdy;
        }
        const int slot = (i * VEC + j) * g.size + g.lane;
        if (dw_part != nullptr) dw_acc[slot] += d * xhat;  // d == 0 on padding
        if (db_part != nullptr) db_acc[slot] += d;
        h.v[i][j] = xhat;
        dy.v[i][j] = wdy;
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
    const int lane = s % g.size, k = s / g.size;
    const int c = ((k / VEC) * g.size + lane) * VEC + k % VEC;
    if (c >= n) continue;
    for (int a = 0; a < n_acc; ++a) {
      float total = 0.f;
      for (int grp = 0; grp < g.count; ++grp) total += acc[(grp * n_acc + a) * slots + s];
      float* part = (a == 0 && dw_part != nullptr) ? dw_part : db_part;
      part[static_cast<int64_t>(blockIdx.x) * n + c] = total;
    }
  }
}

// Backward for rows too long for registers: two passes over the row; the partial sums live in
// this block's partial row in global memory (each thread owns its columns, so no races).
template <typename T>
MMGPT_KERNEL(1024, norm_bwd_looped_kernel, const NormBwdParams p, float* dw_part, float* db_part) {
  constexpr int VEC = Vec<T>::kWidth;
  __shared__ float scratch[32];
  const int n = p.n;
  const int step = blockDim.x * VEC;
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
      float hv[VEC], dv[VEC];
      load_vec<T, VEC>(h, c0, n, p.aligned, hv, 0.f);
      load_vec<T, VEC>(dy, c0, n, p.aligned, dv, 0.f);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (c0 + j < n) {
          const float wdy = p.weight != nullptr ? dv[j] * p.weight[c0 + j] : dv[j];
          c1 += (hv[j] - mean) * rstd * wdy;
          c2 += wdy;
        }
    }
    c1 = block_sum(c1, scratch) / n;
    c2 = p.is_rms ? 0.f : block_sum(c2, scratch) / n;
    for (int c0 = threadIdx.x * VEC; c0 < n; c0 += step) {
      float hv[VEC], dv[VEC], dres[VEC];
      load_vec<T, VEC>(h, c0, n, p.aligned, hv, 0.f);
      load_vec<T, VEC>(dy, c0, n, p.aligned, dv, 0.f);
      if (p.dh != nullptr) {
        load_vec<T, VEC>(static_cast<const T*>(p.dh) + off, c0, n, p.aligned, dres, 0.f);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dres[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int c = c0 + j < n ? c0 + j : n - 1;
        const float xhat = (hv[j] - mean) * rstd;
        const float wdy = p.weight != nullptr ? dv[j] * p.weight[c] : dv[j];
        if (c0 + j < n) {
          if (dw_row != nullptr) dw_row[c] += dv[j] * xhat;
          if (db_row != nullptr) db_row[c] += dv[j];
        }
        hv[j] = (wdy - xhat * c1 - c2) * rstd + dres[j];
      }
      store_vec<T, VEC>(static_cast<T*>(p.dx) + off, c0, n, p.aligned, hv);
    }
  }
}

// Second stage of the weight/bias gradient: out[c] = sum over the partial rows of column c.
// A 32 x 8 block: x picks the column (coalesced), y strides over the partial rows.
MMGPT_KERNEL(256, column_sum_kernel, const float* __restrict__ part, int64_t rows, int n,
             float* __restrict__ out) {
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
    out[c] = s;
  }
}

struct BwdPlan {
  RowPlan row;
  int blocks;
  int smem;  // dynamic shared memory bytes (register path)
};

BwdPlan plan_bwd(const NormBwdParams& p, int vec, int max_elems) {
  const int n_acc = (p.dweight != nullptr) + (p.dbias != nullptr);
  BwdPlan plan{plan_row(p.n, vec, max_elems), 1, 0};
  const int sms = sm_count();
  if (plan.row.fits) {
    const int groups = plan.row.warp_row ? plan.row.threads / 32 : 1;
    const int slots = plan.row.nv * vec * (plan.row.warp_row ? 32 : plan.row.threads);
    plan.smem = groups * n_acc * slots * static_cast<int>(sizeof(float));
    if (plan.smem <= max_smem_optin()) {
      int per_sm = std::max(1, 2048 / plan.row.threads);
      if (plan.smem > 0) per_sm = std::max(1, std::min(per_sm, 200 * 1024 / plan.smem));
      plan.blocks = static_cast<int>(std::min<int64_t>(ceil_div(p.rows, groups), int64_t{sms} * per_sm));
      return plan;
    }
    plan.row.fits = false;
  }
  plan.row.threads = kLoopedThreads;
  plan.smem = 0;
  plan.blocks = static_cast<int>(std::min<int64_t>(p.rows, int64_t{sms} * 2));
  return plan;
}

template <typename T> cudaError_t launch_norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  const RowPlan plan = plan_row(p.n, Vec<T>::kWidth, kFwdMaxElems);
  if (!plan.fits) {
    auto kernel = norm_fwd_looped_kernel<T>;
    MMGPT_LAUNCH(kernel, static_cast<unsigned>(p.rows), 1024, 0, stream, p);
    return cudaGetLastError();
  }
  const int rows_per_block = plan.warp_row ? plan.threads / 32 : 1;
  const unsigned blocks = static_cast<unsigned>(ceil_div(p.rows, rows_per_block));
  with_nv<T, kFwdMaxElems>(plan.nv, [&](auto nv) {
    auto launch = [&](auto kernel) { MMGPT_LAUNCH(kernel, blocks, plan.threads, 0, stream, p); };
    if (plan.warp_row) launch(norm_fwd_kernel<T, decltype(nv)::value, true>);
    else launch(norm_fwd_kernel<T, decltype(nv)::value, false>);
  });
  return cudaGetLastError();
}

template <typename T> cudaError_t launch_norm_bwd(const NormBwdParams& p, cudaStream_t stream) {
  const BwdPlan plan = plan_bwd(p, Vec<T>::kWidth, bwd_max_elems<T>());
  float* dw_part = p.dweight != nullptr ? p.partials : nullptr;
  float* db_part = p.dbias != nullptr ? p.partials + (dw_part != nullptr ? int64_t{plan.blocks} * p.n : 0) : nullptr;
  if (!plan.row.fits) {
    auto kernel = norm_bwd_looped_kernel<T>;
    MMGPT_LAUNCH(kernel, plan.blocks, plan.row.threads, 0, stream, p, dw_part, db_part);
  } else {
    cudaError_t err = cudaSuccess;
    with_nv<T, bwd_max_elems<T>()>(plan.row.nv, [&](auto nv) {
      auto launch = [&](auto kernel) {
        err = allow_dynamic_smem(kernel, plan.smem);
        if (err != cudaSuccess) return;
        MMGPT_LAUNCH(kernel, plan.blocks, plan.row.threads, plan.smem, stream, p, dw_part, db_part);
      };
      if (plan.row.warp_row) launch(norm_bwd_kernel<T, decltype(nv)::value, true>);
      else launch(norm_bwd_kernel<T, decltype(nv)::value, false>);
    });
    if (err != cudaSuccess) return err;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 block(32, 8), grid(static_cast<unsigned>(ceil_div(p.n, 32)));
  auto reduce = column_sum_kernel;
  if (dw_part != nullptr) MMGPT_LAUNCH(reduce, grid, block, 0, stream, dw_part, int64_t{plan.blocks}, p.n, p.dweight);
  if (db_part != nullptr) MMGPT_LAUNCH(reduce, grid, block, 0, stream, db_part, int64_t{plan.blocks}, p.n, p.dbias);
  return cudaGetLastError();
}

}  // namespace

int64_t norm_bwd_workspace_floats(const NormBwdParams& p, DType dtype) {
  int64_t blocks = 0;
  with_float_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    blocks = plan_bwd(p, Vec<T>::kWidth, bwd_max_elems<T>()).blocks;
  });
  const int n_acc = (p.dweight != nullptr) + (p.dbias != nullptr);
  return n_acc * blocks * p.n;
}

cudaError_t norm_fwd(const NormFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  with_float_dtype(dtype, [&](auto tag) { err = launch_norm_fwd<typename decltype(tag)::type>(p, stream); });
  return err;
}

cudaError_t norm_bwd(const NormBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  with_float_dtype(dtype, [&](auto tag) { err = launch_norm_bwd<typename decltype(tag)::type>(p, stream); });
  return err;
}

}  // namespace mmgpt
