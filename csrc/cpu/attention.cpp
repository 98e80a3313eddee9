// The torch backend's CPU attention kernel (part of the `mmgpt_engine_cpu` module; kernels.cpp
// binds it), float32, forward and backward.
#include "common.h"

namespace mmgpt_cpu {
namespace {

// -------------------------------------------------------------------------------- attention
// Attention at the shapes a CPU trains at, in flash-attn's (B, S, H, D) layout with any strides over
// B, S, H (the q / k / v views of one fused projection need no copy), grouped-query heads (H a
// multiple of H_kv), softmax_scale, and per-row key ranges: query row i of batch b sees the keys
// [lo, hi) = ranges[b or 0, i] (every mask the torch backend builds is such a range per row: causal,
// prefix-LM, sliding window, packed sequences; the Python side derives them). A row that sees no key
// gives 0 (and lse -inf).
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
  check_cpu_f32(t, name);
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
  const int32_t* rp = ranges.data_ptr<int32_t>();
  for (int64_t r = 0; r < a.rb * a.sq; ++r) {
    const int32_t lo = rp[2 * r], hi = rp[2 * r + 1];
    TORCH_CHECK(0 <= lo && lo <= hi && hi <= a.sk, "ranges: expected 0 <= lo <= hi <= ", a.sk, " (the keys), got [",
                lo, ", ", hi, ") at batch ", r / a.sq, ", row ", r % a.sq);
  }
  return a;
}

// [lo, hi) of query row i of batch b (checked by check_attention)
inline std::pair<int64_t, int64_t> key_range(const int32_t* rp, const AttnShape& a, int64_t b, int64_t i) {
  const int32_t* r = rp + ((a.rb == 1 ? 0 : b) * a.sq + i) * 2;
  return {r[0], r[1]};
}

// Transposes the (S_k, D) rows of one head into t (D, ld), zero past S_k. ld >= S_k + kW, so a
// vector that starts at any key stays inside t. (at::vec's transpose: 16 x 16 blocks in AVX-512
// registers.)
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

}  // namespace

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

}  // namespace mmgpt_cpu
