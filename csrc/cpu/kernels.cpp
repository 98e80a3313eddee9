// The torch backend's compiled CPU kernels (the `mmgpt_engine_cpu` JIT module, built by
// mmgpt_engine/ops/cpu.py): LayerNorm / RMSNorm with the fused residual add, softmax (scale,
// causal rows), cross-entropy (here) and attention (attention.cpp: flash-attn's layout, per-row key
// ranges), forward and backward, float32; common.h holds what they share.
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
#include "common.h"

namespace mmgpt_cpu {
namespace {

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

}  // namespace
}  // namespace mmgpt_cpu


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mmgpt_cpu;
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
