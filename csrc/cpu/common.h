// Shared by the torch backend's CPU kernels (kernels.cpp: norms, softmax, cross-entropy and the
// module; attention.cpp): at::vec helpers, the contract checks, the one-allocation outputs.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <utility>
#include <tuple>
#include <vector>

namespace mmgpt_cpu {


using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kBlockRows = 64;  // rows per weight-gradient partial (the reduction order)

inline void check_cpu_f32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
}

inline void check_f32(const Tensor& t, const char* name) {
  check_cpu_f32(t, name);
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// (rows, n) of a tensor taken as rows of its last dim
inline std::pair<int64_t, int64_t> rows_of(const Tensor& t, const char* name) {
  check_f32(t, name);
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) > 0, name, ": expected a non-empty last dim, got shape ", t.sizes());
  return {t.numel() / t.size(-1), t.size(-1)};
}

inline void check_same(const Tensor& t, const char* name, const Tensor& ref) {
  check_f32(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), ", got ", t.sizes());
}

inline const float* opt_ptr(const OptTensor& t, const char* name, int64_t n) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return nullptr;
  check_f32(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, ": expected shape (", n, "), got ", t->sizes());
  return t->data_ptr<float>();
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// `cnt` floats from p (cnt <= kW); the other lanes 0, or `fill`
inline Vec ld(const float* p, int64_t cnt) { return cnt == kW ? Vec::loadu(p) : Vec::loadu(p, cnt); }
inline Vec ld(const float* p, int64_t cnt, float fill) {
  return cnt == kW ? Vec::loadu(p) : Vec::set(Vec(fill), Vec::loadu(p, cnt), cnt);
}
inline void st(const Vec& v, float* p, int64_t cnt) {
  if (cnt == kW) v.store(p); else v.store(p, cnt);
}

// calls f(j, cnt) over [0, n) in vectors of cnt = kW floats, the last one shorter
template <typename F>
inline void for_vec(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) f(j, kW);
  if (j < n) f(j, n - j);
}

// calls f(j, cnt, k) over [0, n) in vectors of cnt = kW floats (the last one shorter), k alternating
// 0, 1 so that two sets of accumulators take turns and their adds overlap
template <typename F>
inline void for_vec_2way(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    f(j, kW, 0);
    f(j + kW, kW, 1);
  }
  for (; j + kW <= n; j += kW) f(j, kW, 0);
  if (j < n) f(j, n - j, 1);
}

// sum over [0, n) of the vectors fv(j, cnt) returns (lanes past cnt must be 0): four independent
// accumulators, so the adds overlap
template <typename FV>
inline float row_sum(int64_t n, const FV& fv) {
  Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t j = 0;
  for (; j + 4 * kW <= n; j += 4 * kW) {
    a0 = a0 + fv(j, kW);
    a1 = a1 + fv(j + kW, kW);
    a2 = a2 + fv(j + 2 * kW, kW);
    a3 = a3 + fv(j + 3 * kW, kW);
  }
  for (; j + kW <= n; j += kW) a0 = a0 + fv(j, kW);
  if (j < n) a1 = a1 + fv(j, n - j);
  return hsum((a0 + a1) + (a2 + a3));
}

// max over [0, n) of scale * p[j]
inline float row_max(const float* p, int64_t n, float scale) {
  const float inf = std::numeric_limits<float>::infinity();
  const Vec vs(scale);
  Vec m0(-inf), m1(-inf);
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    m0 = at::vec::maximum(m0, Vec::loadu(p + j) * vs);
    m1 = at::vec::maximum(m1, Vec::loadu(p + j + kW) * vs);
  }
  for (; j + kW <= n; j += kW) m0 = at::vec::maximum(m0, Vec::loadu(p + j) * vs);
  if (j < n) m1 = at::vec::maximum(m1, Vec::set(Vec(-inf), Vec::loadu(p + j, n - j) * vs, n - j));
  return hmax(at::vec::maximum(m0, m1));
}

// Tensors of the given shapes (float32) carved out of one allocation, each 64-byte aligned. The norm
// forward's outputs come from one malloc: its several same-size buffers, freed together, otherwise
// tip glibc's heap over its dynamic trim threshold, and every call faults its outputs in afresh.
inline std::vector<Tensor> carve(const Tensor& like, const std::vector<std::vector<int64_t>>& shapes) {
  constexpr int64_t kAlign = 16;  // floats
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (const auto& shape : shapes) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    offsets.push_back(total);
    total += (numel + kAlign - 1) / kAlign * kAlign;
  }
  auto buffer = std::make_shared<Tensor>(at::empty({std::max<int64_t>(total, 1)}, like.options()));
  float* base = buffer->data_ptr<float>();
  std::vector<Tensor> out;
  for (size_t k = 0; k < shapes.size(); ++k) {
    out.push_back(at::from_blob(base + offsets[k], shapes[k], [buffer](void*) {}, like.options()));
  }
  return out;
}

// row blocks [b * kBlockRows, ...) handed to at::parallel_for, one block per task index
template <typename F>
inline void for_row_blocks(int64_t rows, int64_t n, const F& f) {
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  // at least ~32k elements per task, so a small op does not pay for waking threads
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kBlockRows * n));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b, b * kBlockRows, std::min(rows, (b + 1) * kBlockRows));
  });
}


// attention.cpp
std::vector<Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ranges,
                                  double scale);
std::vector<Tensor> attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                  const Tensor& lse, const Tensor& dout, const Tensor& ranges, double scale);

}  // namespace mmgpt_cpu
