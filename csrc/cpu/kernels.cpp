// The torch backend's compiled CPU kernels (the `mmgpt_engine_cpu` JIT module, built by
// mmgpt_engine/ops/cpu.py): LayerNorm / RMSNorm with the fused residual add, softmax (scale,
// causal rows), cross-entropy and attention (flash-attn's layout, per-row key ranges), forward
// and backward, float32.
//
// Why: eager PyTorch runs these ops on the CPU as several passes with full-size temporaries
// (each a fresh allocation the kernel then faults in page by page), and its autograd backward
// of F.rms_norm is a chain of elementwise ops. Here each row is read once from memory and
// revisited while it is in cache; the only allocations are the outputs. Rows are split over
// at::parallel_for's threads; the weight/bias gradients are reduced over fixed blocks of rows in
// a fixed order, so every result is the same whatever the thread count.
//
// Vectorised with ATen's at::vec (the ISA is chosen at build time from
// torch.backends.cpu.get_cpu_capability()); exp is at::vec's exp_u20, the polynomial exp that
// torch.compile's CPU code uses. Accumulation in float32 in several vector lanes.
//
// Every op works on the rows of a contiguous tensor's last dim, any leading shape; the outputs take
// the inputs' shapes. The Python side (ops/cpu.py) checks the user's inputs; the checks here guard
// the contract.
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

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kBlockRows = 64;  // rows per weight-gradient partial (the reduction order)

void check_f32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// (rows, n) of a tensor taken as rows of its last dim
std::pair<int64_t, int64_t> rows_of(const Tensor& t, const char* name) {
  check_f32(t, name);
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) > 0, name, ": expected a non-empty last dim, got shape ", t.sizes());
  return {t.numel() / t.size(-1), t.size(-1)};
}

void check_same(const Tensor& t, const char* name, const Tensor& ref) {
  check_f32(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), ", got ", t.sizes());
}

const float* opt_ptr(const OptTensor& t, const char* name, int64_t n) {
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
std::vector<Tensor> carve(const Tensor& like, const std::vector<std::vector<int64_t>>& shapes) {
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
void for_row_blocks(int64_t rows, int64_t n, const F& f) {
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  // at least ~32k elements per task, so a small op does not pay for waking threads
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kBlockRows * n));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b, b * kBlockRows, std::min(rows, (b + 1) * kBlockRows));
  });
}

// ------------------------------------------------------------------------------------ norms
// norm_fwd(x, residual, weight, bias, eps, is_rms) -> [y, h, mean, rstd]
//   x, residual: (..., N), R rows; h = x + residual (empty without residual); mean (R,) (empty for
//   RMS); rstd (R,)
std::vector<Tensor> norm_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                             const OptTensor& bias, double eps, bool is_rms) {
  const auto [rows, n] = rows_of(x, "x");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_same(*residual, "residual", x);
  const float* w = opt_ptr(weight, "weight", n);
  const float* bb = opt_ptr(bias, "bias", n);
  const std::vector<int64_t> shape = x.sizes().vec();
  auto outs = carve(x, {shape, has_res ? shape : std::vector<int64_t>{0}, {is_rms ? 0 : rows}, {rows}});
  Tensor y = outs[0], h = outs[1], mean = outs[2], rstd = outs[3];
  const float* xp = x.data_ptr<float>();
  const float* rp = has_res ? residual->data_ptr<float>() : nullptr;
  float* hp = has_res ? h.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  float* mp = is_rms ? nullptr : mean.data_ptr<float>();
  float* sp = rstd.data_ptr<float>();
  const float fe = static_cast<float>(eps), inv_n = 1.f / static_cast<float>(n);
  for_row_blocks(rows, n, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      // one pass: h = x + residual written, and the sums of d = h - K and d * d, K = the row's
      // first value for LayerNorm (a shift, so E[d^2] - E[d]^2 does not cancel), 0 for RMSNorm
      const float* a = xp + i * n;
      const float* r = has_res ? rp + i * n : nullptr;
      float* hr = has_res ? hp + i * n : nullptr;
      const float* src = has_res ? hr : a;
      const float k0 = is_rms ? 0.f : (has_res ? a[0] + r[0] : a[0]);
      const Vec vk(k0), zero(0.f);
      Vec s1[2] = {zero, zero}, s2[2] = {zero, zero};
      for_vec_2way(n, [&](int64_t j, int64_t c, int k) {
        Vec hv = ld(a + j, c);
        if (r) {
          hv = hv + ld(r + j, c);
          st(hv, hr + j, c);
        }
        Vec d = hv - vk;
        if (c != kW) d = Vec::set(zero, d, c);
        s1[k] = s1[k] + d;
        s2[k] = s2[k] + d * d;
      });
      const float m1 = hsum(s1[0] + s1[1]) * inv_n;
      float ss = hsum(s2[0] + s2[1]);  // n * E[d^2]
      float mu = 0.f;
      if (!is_rms) {
        mu = k0 + m1;
        mp[i] = mu;
        ss = std::max(ss - static_cast<float>(n) * m1 * m1, 0.f);  // n * var
      }
      const Vec vmu(mu);
      const float rs = 1.f / std::sqrt(ss * inv_n + fe);
      sp[i] = rs;
      const Vec vrs(rs);
      float* yr = yp + i * n;
      for_vec(n, [&](int64_t j, int64_t c) {
        Vec v = (ld(src + j, c) - vmu) * vrs;
        if (w) v = v * ld(w + j, c);
        if (bb) v = v + ld(bb + j, c);
        st(v, yr + j, c);
      });
    }
  });
  return {y, h, mean, rstd};
}

// norm_bwd(dy, dh, h, weight, has_bias, mean, rstd, is_rms) -> [dx, dweight, dbias]
//   h: the normalised input; dh: the gradient reaching the residual output h (empty: none), added
//   to dx. dweight / dbias empty when there is no weight / bias.
std::vector<Tensor> norm_bwd(const Tensor& dy, const OptTensor& dh, const Tensor& h, const OptTensor& weight,
                             bool has_bias, const Tensor& mean, const Tensor& rstd, bool is_rms) {
  const auto [rows, n] = rows_of(h, "h");
  check_same(dy, "dy", h);
  const bool has_dh = dh.has_value() && dh->defined() && dh->numel() > 0;
  if (has_dh) check_same(*dh, "dh", h);
  const float* w = opt_ptr(weight, "weight", n);
  check_f32(rstd, "rstd");
  TORCH_CHECK(rstd.numel() == rows, "rstd: expected ", rows, " values, got ", rstd.numel());
  if (!is_rms) {
    check_f32(mean, "mean");
    TORCH_CHECK(mean.numel() == rows, "mean: expected ", rows, " values, got ", mean.numel());
  }
  const bool want_dw = w != nullptr;
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  Tensor dx = at::empty_like(h);
  Tensor part_w = want_dw ? at::zeros({blocks, n}, h.options()) : h.new_empty({0});
  Tensor part_b = has_bias ? at::zeros({blocks, n}, h.options()) : h.new_empty({0});
  const float* dyp = dy.data_ptr<float>();
  const float* dhp = has_dh ? dh->data_ptr<float>() : nullptr;
  const float* hp = h.data_ptr<float>();
  const float* mp = is_rms ? nullptr : mean.data_ptr<float>();
  const float* sp = rstd.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* pw = want_dw ? part_w.data_ptr<float>() : nullptr;
  float* pb = has_bias ? part_b.data_ptr<float>() : nullptr;
  const float inv_n = 1.f / static_cast<float>(n);
  for_row_blocks(rows, n, [&](int64_t b, int64_t r0, int64_t r1) {
    float* bw = want_dw ? pw + b * n : nullptr;
    float* bbias = has_bias ? pb + b * n : nullptr;
    for (int64_t i = r0; i < r1; ++i) {
      const float* g = dyp + i * n;
      const float* hr = hp + i * n;
      const float mu = is_rms ? 0.f : mp[i], rs = sp[i];
      const Vec vmu(mu), vrs(rs);
      // xhat = (h - mu) * rstd; gw = dy * w; c1 = mean(gw * xhat); c2 = mean(gw). Lanes past the
      // row load as 0, so gw is 0 there and so are the products summed.
      auto xhat = [&](int64_t j, int64_t c) { return (ld(hr + j, c) - vmu) * vrs; };
      auto gw = [&](int64_t j, int64_t c) { return w ? ld(g + j, c) * ld(w + j, c) : ld(g + j, c); };
      float c1, c2 = 0.f;
      if (is_rms) {
        c1 = row_sum(n, [&](int64_t j, int64_t c) { return gw(j, c) * xhat(j, c); }) * inv_n;
      } else {  // both sums in one pass
        const Vec zero(0.f);
        Vec p1[2] = {zero, zero}, p2[2] = {zero, zero};
        for_vec_2way(n, [&](int64_t j, int64_t c, int k) {
          const Vec gv = gw(j, c);
          p1[k] = p1[k] + gv * xhat(j, c);
          p2[k] = p2[k] + gv;
        });
        c1 = hsum(p1[0] + p1[1]) * inv_n;
        c2 = hsum(p2[0] + p2[1]) * inv_n;
      }
      const Vec vc1(c1), vc2(c2);
      float* d = dxp + i * n;
      const float* e = has_dh ? dhp + i * n : nullptr;
      for_vec(n, [&](int64_t j, int64_t c) {
        const Vec xh = xhat(j, c);
        Vec v = (gw(j, c) - vc2 - xh * vc1) * vrs;
        if (e) v = v + ld(e + j, c);
        st(v, d + j, c);
        if (bw) st(ld(bw + j, c) + ld(g + j, c) * xh, bw + j, c);
        if (bbias) st(ld(bbias + j, c) + ld(g + j, c), bbias + j, c);
      });
    }
  });
  // the per-block partials summed in block order
  auto reduce = [&](const Tensor& part) {
    Tensor out = at::zeros({n}, h.options());
    const float* p = part.data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, n, 4096, [&](int64_t c0, int64_t c1) {
      for (int64_t b = 0; b < blocks; ++b) {
        const float* row = p + b * n;
        for_vec(c1 - c0, [&](int64_t j, int64_t c) { st(ld(o + c0 + j, c) + ld(row + c0 + j, c), o + c0 + j, c); });
      }
    });
    return out;
  };
  Tensor dw = want_dw ? reduce(part_w) : h.new_empty({0});
  Tensor db = has_bias ? reduce(part_b) : h.new_empty({0});
  return {dx, dw, db};
}

// --------------------------------------------------------------------------------- softmax
// softmax_fwd(x (..., N), scale, causal_rows) -> y: softmax(scale * x) over each row; with
// causal_rows = M > 0, row r is row i = r % M of an (M, N) matrix and sees columns
// j <= i + N - M (bottom-right aligned); masked columns and rows that see nothing are 0.
int64_t visible_cols(int64_t r, int64_t n, int64_t causal_rows) {
  if (causal_rows <= 0) return n;
  return std::clamp<int64_t>(r % causal_rows + n - causal_rows + 1, 0, n);
}

Tensor softmax_fwd(const Tensor& x, double scale, int64_t causal_rows) {
  const auto [rows, n] = rows_of(x, "x");
  TORCH_CHECK(causal_rows >= 0 && (causal_rows == 0 || rows % causal_rows == 0), "causal_rows: expected 0 or a "
              "divisor of the row count ", rows, ", got ", causal_rows);
  Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float s = static_cast<float>(scale);
  for_row_blocks(rows, n, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* a = xp + i * n;
      float* o = yp + i * n;
      const int64_t k = visible_cols(i, n, causal_rows);
      if (k > 0) {
        const float m = row_max(a, k, s);
        const Vec vs(s), vm(m);
        // o = exp(s * a - m), summed as it is written (lanes past the row: exp(-inf) = 0)
        const float total = row_sum(k, [&](int64_t j, int64_t c) {
          const Vec scaled = ld(a + j, c) * vs;  // -inf past the row after scaling (scale may be < 0)
          const Vec e = ((c == kW ? scaled : Vec::set(Vec(-std::numeric_limits<float>::infinity()), scaled, c)) - vm)
                            .exp_u20();
          st(e, o + j, c);
          return e;
        });
        const Vec inv(1.f / total);
        for_vec(k, [&](int64_t j, int64_t c) { st(ld(o + j, c) * inv, o + j, c); });
      }
      std::fill(o + k, o + n, 0.f);
    }
  });
  return y;
}

// softmax_bwd(y, dy, scale) -> dx = scale * y * (dy - sum(dy * y))
Tensor softmax_bwd(const Tensor& y, const Tensor& dy, double scale) {
  const auto [rows, n] = rows_of(y, "y");
  check_same(dy, "dy", y);
  Tensor dx = at::empty_like(y);
  const float* yp = y.data_ptr<float>();
  const float* gp = dy.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  const float s = static_cast<float>(scale);
  for_row_blocks(rows, n, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* a = yp + i * n;
      const float* g = gp + i * n;
      float* d = dp + i * n;
      const float dot = row_sum(n, [&](int64_t j, int64_t c) { return ld(a + j, c) * ld(g + j, c); });
      const Vec vdot(dot), vs(s);
      for_vec(n, [&](int64_t j, int64_t c) { st(ld(a + j, c) * (ld(g + j, c) - vdot) * vs, d + j, c); });
    }
  });
  return dx;
}

// ---------------------------------------------------------------------------- cross-entropy
// the number of rows that are not ignored
int64_t check_targets(const Tensor& target, int64_t rows, int64_t v, int64_t ignore_index) {
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.is_contiguous() &&
                  target.numel() == rows,
              "target: expected a contiguous int64 CPU tensor of ", rows, " values, got ", target.scalar_type(), " ",
              target.sizes());
  const int64_t* t = target.data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (t[i] == ignore_index) continue;
    TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < v, "target: expected class indices in [0, ", v, ") or ignore_index=",
                      ignore_index, ", got ", t[i], " at row ", i);
    ++valid;
  }
  return valid;
}

// cross_entropy_fwd(logits (..., V), target (...), ignore_index, reduction) -> (loss, lse (R,), counted rows)
//   per row lse and lse - logits[target] (0 on ignored rows); reduction 0: loss is those values (target's shape),
//   1: their sum, 2: their mean over the counted rows (0 when none counts), summed in row order
constexpr int64_t kSmallVocab = 1024;     // a block of rows this short stays in L1/L2: three passes over it
constexpr int64_t kLaneVocab = 2 * kW;     // rows shorter than this: one row per vector lane
using IVec = at::vec::Vectorized<int32_t>;
static_assert(IVec::size() == kW, "a gather index vector per float vector");

std::tuple<Tensor, Tensor, int64_t> cross_entropy_fwd(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                                      int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction: expected 0 (none), 1 (sum) or 2 (mean), got ", reduction);
  const auto [rows, v] = rows_of(logits, "logits");
  const int64_t valid = check_targets(target, rows, v, ignore_index);
  auto outs = carve(logits, {target.sizes().vec(), {rows}});
  Tensor loss = outs[0], lse = outs[1];
  const float* xp = logits.data_ptr<float>();
  const int64_t* tp = target.data_ptr<int64_t>();
  float* lp = loss.data_ptr<float>();
  float* sp = lse.data_ptr<float>();
  const float inf = std::numeric_limits<float>::infinity();
  auto sum_exp = [&](const float* a, float m) {
    const Vec vm(m);
    return row_sum(v, [&](int64_t j, int64_t c) { return (ld(a + j, c, -inf) - vm).exp_u20(); });
  };
  for_row_blocks(rows, v, [&](int64_t, int64_t r0, int64_t r1) {
    if (v < kLaneVocab) {
      // rows of a few vectors: the horizontal max / sum of each row would be the whole cost, so
      // kW rows go in the lanes of one vector, gathered column by column
      alignas(64) float cols[kLaneVocab * kW];
      alignas(64) int32_t idx[kW];
      for (int64_t g0 = r0; g0 < r1; g0 += kW) {
        const int64_t cnt = std::min(kW, r1 - g0);
        for (int64_t k = 0; k < kW; ++k) idx[k] = static_cast<int32_t>((k < cnt ? k : 0) * v);
        const IVec vi = IVec::loadu(idx);
        const float* base = xp + g0 * v;
        Vec m(-inf);
        for (int64_t j = 0; j < v; ++j) {
          const Vec col = at::vec::gather<sizeof(float)>(base + j, vi);
          col.store(cols + j * kW);
          m = at::vec::maximum(m, col);
        }
        Vec total(0.f);
        for (int64_t j = 0; j < v; ++j) total = total + (Vec::loadu(cols + j * kW) - m).exp_u20();
        st(m + total.log(), sp + g0, cnt);
      }
    } else if (v <= kSmallVocab) {
      // short rows: each pass over the block's rows at once, so the rows' latency chains
      // (max, exp-sum, log) overlap instead of running one after another
      alignas(64) float m[kBlockRows], t[kBlockRows];
      const int64_t nr = r1 - r0;
      for (int64_t k = 0; k < nr; ++k) m[k] = row_max(xp + (r0 + k) * v, v, 1.f);
      for (int64_t k = 0; k < nr; ++k) t[k] = sum_exp(xp + (r0 + k) * v, m[k]);
      for_vec(nr, [&](int64_t k, int64_t c) { st(ld(m + k, c) + ld(t + k, c, 1.f).log(), sp + r0 + k, c); });
    } else {
      for (int64_t i = r0; i < r1; ++i) {
        const float* a = xp + i * v;
        const float m = row_max(a, v, 1.f);
        sp[i] = m + std::log(sum_exp(a, m));
      }
    }
    for (int64_t i = r0; i < r1; ++i) lp[i] = tp[i] == ignore_index ? 0.f : sp[i] - xp[i * v + tp[i]];
  });
  if (reduction == 0) return {loss, lse, valid};
  double total = 0.0;
  for (int64_t i = 0; i < rows; ++i) total += lp[i];
  if (reduction == 2 && valid > 0) total /= static_cast<double>(valid);
  Tensor out = at::empty({}, logits.options());
  out.data_ptr<float>()[0] = static_cast<float>(total);
  return {out, lse, valid};
}

// cross_entropy_bwd(logits, target, lse, grad (R,) or one value, scale, ignore_index) ->
//   dlogits = (softmax(logits) - onehot(target)) * grad[row] * scale, 0 on ignored rows
Tensor cross_entropy_bwd(const Tensor& logits, const Tensor& target, const Tensor& lse, const Tensor& grad_rows,
                         double scale, int64_t ignore_index) {
  const auto [rows, v] = rows_of(logits, "logits");
  check_targets(target, rows, v, ignore_index);
  check_f32(lse, "lse");
  check_f32(grad_rows, "grad_rows");
  TORCH_CHECK(lse.numel() == rows, "lse: expected ", rows, " values, got ", lse.numel());
  TORCH_CHECK(grad_rows.numel() == rows || grad_rows.numel() == 1, "grad_rows: expected ", rows,
              " values or one, got ", grad_rows.numel());
  const bool one_grad = grad_rows.numel() == 1 && rows != 1;
  const float fscale = static_cast<float>(scale);
  Tensor dx = at::empty_like(logits);
  const float* xp = logits.data_ptr<float>();
  const int64_t* tp = target.data_ptr<int64_t>();
  const float* sp = lse.data_ptr<float>();
  const float* gp = grad_rows.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  for_row_blocks(rows, v, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      float* d = dp + i * v;
      if (tp[i] == ignore_index) {
        std::fill(d, d + v, 0.f);
        continue;
      }
      const float* a = xp + i * v;
      const float l = sp[i], g = gp[one_grad ? 0 : i] * fscale;
      const Vec vl(l), vg(g);
      for_vec(v, [&](int64_t j, int64_t c) { st((ld(a + j, c) - vl).exp_u20() * vg, d + j, c); });
      d[tp[i]] -= g;
    }
  });
  return dx;
}

// -------------------------------------------------------------------------------- attention
// Attention at the small shapes a CPU trains at (a few hundred keys, head dim <= 256), in
// flash-attn's (B, S, H, D) layout with any strides over B, S, H (the q / k / v views of one fused
// projection need no copy), grouped-query heads (H a multiple of H_kv), softmax_scale, and per-row
// key ranges: query row i of batch b sees the keys [lo, hi) = ranges[b or 0, i] (every mask the
// torch backend builds is such a range per row: causal, prefix-LM, sliding window, packed
// sequences; the Python side derives them). A row that sees no key gives 0 (and lse -inf).
//
// One task per (batch, kv head): K (and V for the backward) is transposed into a (D, S_k) block so
// that a query's scores over a run of keys are vector FMAs over the keys, with no horizontal sums;
// P V and the gradients' rank-1 updates are vector FMAs over D. Each task runs its rows in a fixed
// order and owns its slices of the outputs, so results do not depend on the thread count.
struct Heads {  // a (B, S, H, D) tensor's strides, D contiguous
  const float* p;
  int64_t sb, ss, sh;
  const float* row(int64_t b, int64_t s, int64_t h) const { return p + b * sb + s * ss + h * sh; }
};

Heads heads_of(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, ": expected (B, S, H, D), got shape ", t.sizes());
  TORCH_CHECK(t.size(3) == 1 || t.stride(3) == 1, name, ": expected a contiguous last dim, got strides ",
              t.strides());
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

struct AttnShape {
  int64_t b, sq, sk, h, hk, d, rb;  // rb: batches of ranges (1 or b)
};

AttnShape check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ranges) {
  AttnShape a{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), ranges.size(0)};
  TORCH_CHECK(k.dim() == 4 && k.size(0) == a.b && k.size(3) == a.d, "k: expected (", a.b, ", S_k, H_kv, ", a.d,
              "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(a.hk > 0 && a.h % a.hk == 0, "k: expected H_kv dividing H = ", a.h, ", got ", a.hk);
  TORCH_CHECK(a.d > 0 && a.sk > 0, "k: expected a non-empty (S_k, D), got ", k.sizes());
  TORCH_CHECK(ranges.device().is_cpu() && ranges.scalar_type() == at::kInt && ranges.is_contiguous() &&
                  ranges.dim() == 3 && (a.rb == 1 || a.rb == a.b) && ranges.size(1) == a.sq && ranges.size(2) == 2,
              "ranges: expected contiguous int32 (1 or ", a.b, ", ", a.sq, ", 2), got ", ranges.scalar_type(), " ",
              ranges.sizes());
  return a;
}

// [lo, hi) of query row i of batch b, clamped to the keys
inline std::pair<int64_t, int64_t> key_range(const int32_t* rp, const AttnShape& a, int64_t b, int64_t i) {
  const int32_t* r = rp + ((a.rb == 1 ? 0 : b) * a.sq + i) * 2;
  const int64_t lo = std::clamp<int64_t>(r[0], 0, a.sk), hi = std::clamp<int64_t>(r[1], 0, a.sk);
  return {lo, std::max(lo, hi)};
}

// Transposes the (S_k, D) rows of one head into t (D, ld), zero past S_k. ld >= S_k + kW, so a
// vector that starts at any key stays inside t.
// (at::vec's transpose, 16 x 16 blocks in AVX-512 registers)
void transpose_head(const Heads& x, int64_t b, int64_t h, int64_t sk, int64_t d, int64_t ld, float* t) {
  at::vec::transpose_mxn<float>(x.row(b, 0, h), x.ss, t, ld, static_cast<int>(sk), static_cast<int>(d));
  for (int64_t c = 0; c < d; ++c) std::fill(t + c * ld + sk, t + (c + 1) * ld, 0.f);
}

int64_t transposed_ld(int64_t sk) { return (sk + kW - 1) / kW * kW + kW; }

// Query rows go in blocks of kR, so that each key vector loaded serves kR rows and the FMAs form
// independent chains (one query row alone is a chain of D dependent FMAs per vector of keys).
constexpr int kR = 4;

// out[r][0, n) (whole vectors) = sum_c x[r][c] * t[c, lo + j] for the block's kR rows: two vectors
// of keys at a time, 2 kR accumulators
void scores_block(const float* const* x, const float* t, int64_t d, int64_t ld, int64_t lo, int64_t n, float* out,
                  int64_t lo_out) {
  const int64_t nv = (n + kW - 1) / kW;
  int64_t v0 = 0;
  for (; v0 + 2 <= nv; v0 += 2) {
    Vec a[kR][2];
    for (int r = 0; r < kR; ++r) a[r][0] = a[r][1] = Vec(0.f);
    const float* tc = t + lo + v0 * kW;
    for (int64_t c = 0; c < d; ++c, tc += ld) {
      const Vec t0 = Vec::loadu(tc), t1 = Vec::loadu(tc + kW);
      for (int r = 0; r < kR; ++r) {
        const Vec xr(x[r][c]);
        a[r][0] = at::vec::fmadd(xr, t0, a[r][0]);
        a[r][1] = at::vec::fmadd(xr, t1, a[r][1]);
      }
    }
    for (int r = 0; r < kR; ++r) {
      a[r][0].store(out + r * lo_out + v0 * kW);
      a[r][1].store(out + r * lo_out + (v0 + 1) * kW);
    }
  }
  if (v0 < nv) {  // one vector of keys: even and odd c in separate accumulators, 2 kR chains
    Vec a[kR][2];
    for (int r = 0; r < kR; ++r) a[r][0] = a[r][1] = Vec(0.f);
    const float* tc = t + lo + v0 * kW;
    int64_t c = 0;
    for (; c + 2 <= d; c += 2, tc += 2 * ld) {
      const Vec t0 = Vec::loadu(tc), t1 = Vec::loadu(tc + ld);
      for (int r = 0; r < kR; ++r) {
        a[r][0] = at::vec::fmadd(Vec(x[r][c]), t0, a[r][0]);
        a[r][1] = at::vec::fmadd(Vec(x[r][c + 1]), t1, a[r][1]);
      }
    }
    if (c < d) {
      const Vec t0 = Vec::loadu(tc);
      for (int r = 0; r < kR; ++r) a[r][0] = at::vec::fmadd(Vec(x[r][c]), t0, a[r][0]);
    }
    for (int r = 0; r < kR; ++r) (a[r][0] + a[r][1]).store(out + r * lo_out + v0 * kW);
  }
}

// out[r][0, d) = sum_j w[r][j] * rows(j)[0, d) over j in [0, n) for the block's kR rows: two
// vectors of d at a time, 2 kR accumulators
template <typename Rows>
void weighted_block(const float* w, int64_t lw, int64_t n, int64_t d, const Rows& rows, float* const* out) {
  int64_t c0 = 0;
  for (; c0 + 2 * kW <= d; c0 += 2 * kW) {
    Vec a[kR][2];
    for (int r = 0; r < kR; ++r) a[r][0] = a[r][1] = Vec(0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float* x = rows(j) + c0;
      const Vec x0 = Vec::loadu(x), x1 = Vec::loadu(x + kW);
      for (int r = 0; r < kR; ++r) {
        const Vec wr(w[r * lw + j]);
        a[r][0] = at::vec::fmadd(wr, x0, a[r][0]);
        a[r][1] = at::vec::fmadd(wr, x1, a[r][1]);
      }
    }
    for (int r = 0; r < kR; ++r) {
      a[r][0].store(out[r] + c0);
      a[r][1].store(out[r] + c0 + kW);
    }
  }
  for (; c0 < d; c0 += kW) {
    const int64_t cnt = std::min<int64_t>(kW, d - c0);
    Vec a[kR];
    for (int r = 0; r < kR; ++r) a[r] = Vec(0.f);
    for (int64_t j = 0; j < n; ++j) {
      const Vec x0 = ld(rows(j) + c0, cnt);
      for (int r = 0; r < kR; ++r) a[r] = at::vec::fmadd(Vec(w[r * lw + j]), x0, a[r]);
    }
    for (int r = 0; r < kR; ++r) st(a[r], out[r] + c0, cnt);
  }
}

// One block of up to kR query rows [i0, i0 + nr) of head h: their key ranges, the union [lo, lo + n)
// and, per row, where its own range sits inside the union. Rows past nr (the last block's) repeat
// row i0 and see nothing.
struct RowBlock {
  int64_t lo = 0, n = 0, off[kR], len[kR];
  RowBlock(const int32_t* rp, const AttnShape& a, int64_t b, int64_t i0, int64_t nr) {
    int64_t lo_r[kR], hi_r[kR];
    int64_t hi = 0;
    lo = a.sk;
    for (int r = 0; r < kR; ++r) {
      if (r < nr) {
        std::tie(lo_r[r], hi_r[r]) = key_range(rp, a, b, i0 + r);
      } else {
        lo_r[r] = hi_r[r] = 0;
      }
      if (hi_r[r] > lo_r[r]) {
        lo = std::min(lo, lo_r[r]);
        hi = std::max(hi, hi_r[r]);
      }
    }
    if (hi <= lo) lo = hi = 0;
    n = hi - lo;
    for (int r = 0; r < kR; ++r) {
      len[r] = hi_r[r] - lo_r[r];
      off[r] = len[r] > 0 ? lo_r[r] - lo : 0;
    }
  }
};

// s[0, n): each row's scores outside its own range to -inf, then exp(s - m) with m the row's max
// (or its lse, given); returns the row's sum; a row that sees nothing becomes 0
float exp_masked(float* s, int64_t n, int64_t off, int64_t len, float* m, bool have_lse) {
  const float inf = std::numeric_limits<float>::infinity();
  if (len == 0) {
    std::fill(s, s + n, 0.f);
    return 0.f;
  }
  std::fill(s, s + off, 0.f);
  std::fill(s + off + len, s + n, 0.f);
  float* x = s + off;
  if (!have_lse) {
    Vec mx(-inf);
    for_vec(len, [&](int64_t j, int64_t c) { mx = at::vec::maximum(mx, ld(x + j, c, -inf)); });
    *m = hmax(mx);
  }
  const Vec vm(*m);
  return row_sum(len, [&](int64_t j, int64_t c) {
    const Vec e = (ld(x + j, c, -inf) - vm).exp_u20();
    st(e, x + j, c);
    return e;
  });
}

// attention_fwd(q (B, S_q, H, D), k, v (B, S_k, H_kv, D), ranges, scale) -> [o (B, S_q, H, D), lse (B, H, S_q)]
std::vector<Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ranges,
                                  double scale) {
  const Heads hq = heads_of(q, "q"), hk = heads_of(k, "k"), hv = heads_of(v, "v");
  const AttnShape a = check_attention(q, k, v, ranges);
  auto outs_ = carve(q, {{a.b, a.sq, a.h, a.d}, {a.b, a.h, a.sq}});
  Tensor o = outs_[0], lse = outs_[1];
  float* op = o.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int32_t* rp = ranges.data_ptr<int32_t>();
  const int64_t group = a.h / a.hk, ld_t = transposed_ld(a.sk);
  const float fs = static_cast<float>(scale);
  const int64_t work = a.sq * a.sk * a.d * group;  // FMAs a task, about
  at::parallel_for(0, a.b * a.hk, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work)), [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(a.d * ld_t), s(kR * ld_t), qs(kR * a.d), spare(kR * a.d);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / a.hk, g = task % a.hk;
      transpose_head(hk, b, g, a.sk, a.d, ld_t, kt.data());
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < a.sq; i0 += kR) {
          const int64_t nr = std::min<int64_t>(kR, a.sq - i0);
          const RowBlock blk(rp, a, b, i0, nr);
          const float* xs[kR];
          float* outs[kR];
          for (int r = 0; r < kR; ++r) {
            const float* qrow = hq.row(b, i0 + (r < nr ? r : 0), h);
            for (int64_t c = 0; c < a.d; ++c) qs[r * a.d + c] = qrow[c] * fs;
            xs[r] = qs.data() + r * a.d;
            outs[r] = r < nr ? op + ((b * a.sq + i0 + r) * a.h + h) * a.d : spare.data() + r * a.d;
          }
          float total[kR], m[kR];
          if (blk.n > 0) scores_block(xs, kt.data(), a.d, ld_t, blk.lo, blk.n, s.data(), ld_t);
          for (int r = 0; r < kR; ++r) total[r] = exp_masked(s.data() + r * ld_t, blk.n, blk.off[r], blk.len[r], &m[r], false);
          weighted_block(s.data(), ld_t, blk.n, a.d, [&](int64_t j) { return hv.row(b, blk.lo + j, g); }, outs);
          for (int r = 0; r < nr; ++r) {
            float* orow = outs[r];
            const float inv = total[r] > 0.f ? 1.f / total[r] : 0.f;
            const Vec vinv(inv);
            for_vec(a.d, [&](int64_t c, int64_t cnt) { st(ld(orow + c, cnt) * vinv, orow + c, cnt); });
            lp[(b * a.h + h) * a.sq + i0 + r] =
                blk.len[r] > 0 ? m[r] + std::log(total[r]) : -std::numeric_limits<float>::infinity();
          }
        }
      }
    }
  });
  return {o, lse};
}

// attention_bwd(q, k, v, o, lse, do, ranges, scale) -> [dq (B, S_q, H, D), dk, dv (B, S_k, H_kv, D)]
std::vector<Tensor> attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                  const Tensor& lse, const Tensor& dout, const Tensor& ranges, double scale) {
  const Heads hq = heads_of(q, "q"), hk = heads_of(k, "k"), hv = heads_of(v, "v");
  const Heads ho = heads_of(o, "o"), hdo = heads_of(dout, "dout");
  const AttnShape a = check_attention(q, k, v, ranges);
  TORCH_CHECK(o.sizes() == q.sizes(), "o: expected the shape of q ", q.sizes(), ", got ", o.sizes());
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout: expected the shape of q ", q.sizes(), ", got ", dout.sizes());
  check_f32(lse, "lse");
  TORCH_CHECK(lse.numel() == a.b * a.h * a.sq, "lse: expected (", a.b, ", ", a.h, ", ", a.sq, "), got ", lse.sizes());
  auto grads = carve(q, {{a.b, a.sq, a.h, a.d}, {a.b, a.sk, a.hk, a.d}, {a.b, a.sk, a.hk, a.d}});
  Tensor dq = grads[0], dk = grads[1].zero_(), dv = grads[2].zero_();
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const int32_t* rp = ranges.data_ptr<int32_t>();
  const int64_t group = a.h / a.hk, ld_t = transposed_ld(a.sk);
  const float fs = static_cast<float>(scale);
  const int64_t work = 3 * a.sq * a.sk * a.d * group;
  at::parallel_for(0, a.b * a.hk, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work)), [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(a.d * ld_t), vt(a.d * ld_t), p(kR * ld_t), dp(kR * ld_t), qs(kR * a.d), spare(kR * a.d);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / a.hk, g = task % a.hk;
      transpose_head(hk, b, g, a.sk, a.d, ld_t, kt.data());
      transpose_head(hv, b, g, a.sk, a.d, ld_t, vt.data());
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < a.sq; i0 += kR) {
          const int64_t nr = std::min<int64_t>(kR, a.sq - i0);
          const RowBlock blk(rp, a, b, i0, nr);
          const float *xs[kR], *dos[kR], *qrows[kR];
          float* dqs[kR];
          float di[kR], m[kR];
          for (int r = 0; r < kR; ++r) {
            const int64_t i = i0 + (r < nr ? r : 0);
            qrows[r] = hq.row(b, i, h);
            dos[r] = hdo.row(b, i, h);
            const float* orow = ho.row(b, i, h);
            for (int64_t c = 0; c < a.d; ++c) qs[r * a.d + c] = qrows[r][c] * fs;
            xs[r] = qs.data() + r * a.d;
            dqs[r] = r < nr ? dqp + ((b * a.sq + i0 + r) * a.h + h) * a.d : spare.data() + r * a.d;
            di[r] = row_sum(a.d, [&](int64_t c, int64_t cnt) { return ld(dos[r] + c, cnt) * ld(orow + c, cnt); });
            m[r] = lp[(b * a.h + h) * a.sq + i];
          }
          const int64_t n = blk.n;
          if (n > 0) {
            // P = exp(S - lse) and dP = dO V^T over the block's keys
            scores_block(xs, kt.data(), a.d, ld_t, blk.lo, n, p.data(), ld_t);
            scores_block(dos, vt.data(), a.d, ld_t, blk.lo, n, dp.data(), ld_t);
          }
          // dS = scale * P * (dP - D_i)  (0 where P is)
          for (int r = 0; r < kR; ++r) {
            float* pr = p.data() + r * ld_t;
            float* dr = dp.data() + r * ld_t;
            exp_masked(pr, n, blk.off[r], blk.len[r], &m[r], true);
            const Vec vdi(di[r]), vfs(fs);
            for_vec(n, [&](int64_t j, int64_t cnt) { st(ld(pr + j, cnt) * (ld(dr + j, cnt) - vdi) * vfs, dr + j, cnt); });
          }
          // dQ = dS K; dK_j += sum_r dS_rj q_r; dV_j += sum_r P_rj dO_r
          weighted_block(dp.data(), ld_t, n, a.d, [&](int64_t j) { return hk.row(b, blk.lo + j, g); }, dqs);
          for (int64_t j = 0; j < n; ++j) {
            float* dkr = dkp + ((b * a.sk + blk.lo + j) * a.hk + g) * a.d;
            float* dvr = dvp + ((b * a.sk + blk.lo + j) * a.hk + g) * a.d;
            Vec ds[kR], pj[kR];
            for (int r = 0; r < kR; ++r) {
              ds[r] = Vec(dp[r * ld_t + j]);
              pj[r] = Vec(p[r * ld_t + j]);
            }
            for_vec(a.d, [&](int64_t c, int64_t cnt) {
              Vec gk = ld(dkr + c, cnt), gv = ld(dvr + c, cnt);
              for (int r = 0; r < kR; ++r) {
                gk = at::vec::fmadd(ds[r], ld(qrows[r] + c, cnt), gk);
                gv = at::vec::fmadd(pj[r], ld(dos[r] + c, cnt), gv);
              }
              st(gk, dkr + c, cnt);
              st(gv, dvr + c, cnt);
            });
          }
        }
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmgpt_engine's compiled CPU kernels (the torch backend on CPU tensors)";
  m.def("norm_fwd", &norm_fwd, "LayerNorm / RMSNorm (+ residual) forward");
  m.def("norm_bwd", &norm_bwd, "LayerNorm / RMSNorm (+ residual) backward");
  m.def("softmax_fwd", &softmax_fwd, "softmax forward (scale, causal rows)");
  m.def("softmax_bwd", &softmax_bwd, "softmax backward");
  m.def("cross_entropy_fwd", &cross_entropy_fwd, "cross-entropy forward: per-row loss and lse");
  m.def("cross_entropy_bwd", &cross_entropy_bwd, "cross-entropy backward");
  m.def("attention_fwd", &attention_fwd, "attention forward over per-row key ranges: o and lse");
  m.def("attention_bwd", &attention_bwd, "attention backward: dq, dk, dv");
  m.def("vector_width", [] { return kW; }, "floats per at::vec register in this build");
}
