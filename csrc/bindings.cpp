// Python bindings of the csrc kernels (the `mmgpt_engine._C` / JIT module): tensor checks,
// output allocation, and the calls into the torch-free launchers of launchers.h.
//
// A plain pybind11 module: the torch.library custom ops are registered in Python
// (mmgpt_engine/ops/*.py) and reach these functions through mmgpt_engine/ops/cuda.py. The
// public functions have already checked the user's inputs; the checks here guard the contract
// (layouts, dtypes, devices) so that a wrong call raises instead of reading out of bounds.
// Only the headers used (not torch/extension.h): this file is the slowest of the build to compile.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "launchers.h"

namespace {

using at::Tensor;
using mmgpt::DType;
using OptTensor = std::optional<Tensor>;

DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    case at::kBool: return DType::kBool;
    default: TORCH_CHECK(false, "unsupported dtype ", st);
  }
}

DType dtype_of(const Tensor& t) { return dtype_of(t.scalar_type()); }

// float32, float16 or bfloat16: the storage dtypes of the memory-bound kernels
DType kernel_dtype(const Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              ": expected float32, float16 or bfloat16, got ", st);
  return dtype_of(t);
}

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
}

void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, ": expected a contiguous 2-d (rows, n) tensor, got sizes ",
              t.sizes(), " strides ", t.strides());
  TORCH_CHECK(t.size(1) <= INT_MAX, name, ": rows longer than 2^31 - 1 elements are not supported");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

bool aligned16(const Tensor& t) { return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// rows of n elements of t's dtype all start 16-byte aligned in every tensor given
bool rows_aligned(int64_t n, const std::vector<Tensor>& ts) {
  if (ts.empty() || (n * static_cast<int64_t>(ts[0].element_size())) % 16 != 0) return false;
  for (const auto& t : ts)
    if (!aligned16(t)) return false;
  return true;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T> const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.data_ptr()) : nullptr;
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// The dtype the norm kernels read weight and bias in and write their gradients in: x's where every
// given parameter has it, else float32 (mixed precision: float32 parameters on half activations).
at::ScalarType norm_param_type(const Tensor& x, const OptTensor& weight, const OptTensor& bias) {
  for (const OptTensor* t : {&weight, &bias})
    if (given(*t) && (*t)->scalar_type() != x.scalar_type()) return at::kFloat;
  return x.scalar_type();
}

// weight or bias as the norm kernels read it: (n,), contiguous, in `type` (a copy only for a
// parameter in another dtype, e.g. a float64 one, or a bfloat16 weight beside a float32 bias).
Tensor norm_param(const OptTensor& t, const char* name, const Tensor& x, at::ScalarType type) {
  if (!given(t)) return Tensor();
  check_cuda(*t, name, x);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), name, ": expected shape (", x.size(1), "), got ", t->sizes());
  return t->to(type).contiguous();
}

// ---------------------------------------------------------------------------------- norms
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                    const OptTensor& residual, double eps, bool is_rms) {
  check_rows(x, "x");
  const DType dt = kernel_dtype(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  const at::ScalarType pt = norm_param_type(x, weight, bias);
  const Tensor w = norm_param(weight, "weight", x, pt), b = norm_param(bias, "bias", x, pt);
  Tensor res;
  if (given(residual)) {
    res = *residual;
    check_rows(res, "residual");
    TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(),
                "residual: expected the shape and dtype of x");
    check_cuda(res, "residual", x);
  }
  Tensor y = at::empty_like(x);
  Tensor h = res.defined() ? at::empty_like(x) : x.new_empty({0});
  Tensor mean = at::empty({is_rms ? 0 : rows}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return {y, h, mean, rstd};
  mmgpt::NormFwdParams p{};
  p.x = x.data_ptr();
  p.residual = res.defined() ? res.data_ptr() : nullptr;
  p.weight = ptr_or_null<void>(w);
  p.bias = ptr_or_null<void>(b);
  p.param_dtype = dtype_of(pt);
  p.y = y.data_ptr();
  p.h = res.defined() ? h.data_ptr() : nullptr;
  p.mean = is_rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.n = static_cast<int>(n);
  p.eps = static_cast<float>(eps);
  p.is_rms = is_rms;
  p.aligned = rows_aligned(n, {x, y, res, res.defined() ? h : Tensor(), w, b});
  check_launch(mmgpt::norm_fwd(p, dt, current_stream()), "norm_fwd");
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy_in, const Tensor& dh_in, const Tensor& h,
                                            const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
                                            const Tensor& rstd, bool is_rms) {
  check_rows(h, "h");
  const DType dt = kernel_dtype(h, "h");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t rows = h.size(0), n = h.size(1);
  check_cuda(dy_in, "dy", h);
  TORCH_CHECK(dy_in.numel() == h.numel(), "dy: expected ", h.numel(), " elements (the shape of h), got ", dy_in.sizes());
  const Tensor dy = dy_in.to(h.scalar_type()).reshape({rows, n}).contiguous();
  Tensor dh;
  if (dh_in.defined() && dh_in.numel() > 0) {
    check_cuda(dh_in, "dh", h);
    TORCH_CHECK(dh_in.numel() == h.numel(), "dh: expected ", h.numel(), " elements or none, got ", dh_in.sizes());
    dh = dh_in.to(h.scalar_type()).reshape({rows, n}).contiguous();
  }
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == at::kFloat, "rstd: expected (", rows, ",) float32");
  TORCH_CHECK(is_rms || (mean.numel() == rows && mean.scalar_type() == at::kFloat), "mean: expected (", rows,
              ",) float32");
  const at::ScalarType pt = norm_param_type(h, weight, bias);
  const Tensor w = norm_param(weight, "weight", h, pt);
  const bool has_w = w.defined(), has_b = given(bias);
  const bool run = rows > 0 && n > 0;
  Tensor dx = at::empty_like(h);
  // the kernels write every column of the gradients; no rows: zero gradients
  auto grad = [&] { return run ? at::empty({n}, h.options().dtype(pt)) : at::zeros({n}, h.options().dtype(pt)); };
  Tensor dw = has_w ? grad() : Tensor();
  Tensor db = has_b ? grad() : Tensor();
  if (run) {
    const Tensor rstd_c = rstd.contiguous(), mean_c = is_rms ? Tensor() : mean.contiguous();
    mmgpt::NormBwdParams p{};
    p.dy = dy.data_ptr();
    p.dh = dh.defined() ? dh.data_ptr() : nullptr;
    p.h = h.data_ptr();
    p.weight = ptr_or_null<void>(w);
    p.mean = is_rms ? nullptr : mean_c.data_ptr<float>();
    p.rstd = rstd_c.data_ptr<float>();
    p.dx = dx.data_ptr();
    p.dweight = has_w ? dw.data_ptr() : nullptr;
    p.dbias = has_b ? db.data_ptr() : nullptr;
    p.rows = rows;
    p.n = static_cast<int>(n);
    p.param_dtype = dtype_of(pt);
    p.is_rms = is_rms;
    p.aligned = rows_aligned(n, {h, dy, dx, dh, w});
    const int64_t ws = mmgpt::norm_bwd_workspace_floats(p, dt);
    Tensor work = at::empty({ws > 0 ? ws : 1}, h.options().dtype(at::kFloat));
    p.partials = work.data_ptr<float>();
    check_launch(mmgpt::norm_bwd(p, dt, current_stream()), "norm_bwd");
  }
  Tensor dweight = has_w ? dw.to(weight->scalar_type()) : h.new_empty({0});
  Tensor dbias = has_b ? db.to(bias->scalar_type()) : h.new_empty({0});
  return {dx, dweight, dbias};
}

// -------------------------------------------------------------------------------- softmax
Tensor softmax_fwd(const Tensor& x, double scale, const OptTensor& mask, const OptTensor& mask_row_offsets,
                   int64_t mask_col_stride, int64_t causal_rows) {
  check_rows(x, "x");
  const DType dt = kernel_dtype(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  Tensor y = at::empty_like(x);
  if (rows == 0 || n == 0) return y;
  mmgpt::SoftmaxFwdParams p{};
  Tensor offsets;
  if (mask.has_value() && mask->defined()) {
    check_cuda(*mask, "mask", x);
    TORCH_CHECK(mask_row_offsets.has_value() && mask_row_offsets->defined(), "mask_row_offsets: required with a mask");
    offsets = mask_row_offsets->to(at::kLong).contiguous();
    check_cuda(offsets, "mask_row_offsets", x);
    TORCH_CHECK(offsets.numel() == rows, "mask_row_offsets: expected ", rows, " entries (one per row), got ",
                offsets.numel());
    p.mask = mask->data_ptr();  // the broadcast view: offsets and strides index its storage directly
    p.mask_dtype = dtype_of(*mask);
    p.mask_row_offsets = offsets.data_ptr<int64_t>();
    p.mask_col_stride = mask_col_stride;
  }
  TORCH_CHECK(causal_rows >= 0, "causal_rows: expected >= 0, got ", causal_rows);
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.causal_rows = causal_rows;
  p.rows = rows;
  p.n = static_cast<int>(n);
  p.scale = static_cast<float>(scale);
  p.aligned = rows_aligned(n, {x, y});
  check_launch(mmgpt::softmax_fwd(p, dt, current_stream()), "softmax_fwd");
  return y;
}

Tensor softmax_bwd(const Tensor& dy_in, const Tensor& y, double scale) {
  check_rows(y, "y");
  const DType dt = kernel_dtype(y, "y");
  const c10::cuda::CUDAGuard guard(y.device());
  check_cuda(dy_in, "dy", y);
  TORCH_CHECK(dy_in.numel() == y.numel(), "dy: expected the shape of y ", y.sizes(), ", got ", dy_in.sizes());
  const Tensor dy = dy_in.to(y.scalar_type()).reshape(y.sizes()).contiguous();
  Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  mmgpt::SoftmaxBwdParams p{};
  p.dy = dy.data_ptr();
  p.y = y.data_ptr();
  p.dx = dx.data_ptr();
  p.rows = y.size(0);
  p.n = static_cast<int>(y.size(1));
  p.scale = static_cast<float>(scale);
  p.aligned = rows_aligned(y.size(1), {dy, y, dx});
  check_launch(mmgpt::softmax_bwd(p, dt, current_stream()), "softmax_bwd");
  return dx;
}

// -------------------------------------------------------------------------- cross-entropy
std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& target_in, int64_t ignore_index) {
  check_rows(logits, "logits");
  const DType dt = kernel_dtype(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  check_cuda(target_in, "target", logits);
  TORCH_CHECK(target_in.numel() == rows, "target: expected ", rows, " entries (one per row), got ", target_in.sizes());
  const Tensor target = target_in.to(at::kLong).contiguous();
  Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {loss, lse};
  TORCH_CHECK(logits.size(1) > 0, "logits: expected a non-empty vocab dim");
  mmgpt::CrossEntropyFwdParams p{};
  p.logits = logits.data_ptr();
  p.target = target.data_ptr<int64_t>();
  p.loss = loss.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.rows = rows;
  p.vocab = static_cast<int>(logits.size(1));
  p.ignore_index = ignore_index;
  p.aligned = rows_aligned(logits.size(1), {logits});
  check_launch(mmgpt::cross_entropy_fwd(p, dt, current_stream()), "cross_entropy_fwd");
  return {loss, lse};
}

Tensor cross_entropy_bwd(const Tensor& dloss_in, const Tensor& logits, const Tensor& target_in, const Tensor& lse_in,
                         int64_t ignore_index) {
  check_rows(logits, "logits");
  const DType dt = kernel_dtype(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  auto check_per_row = [&](const Tensor& t, const char* name) {
    check_cuda(t, name, logits);
    TORCH_CHECK(t.numel() == rows, name, ": expected ", rows, " entries (one per row), got ", t.sizes());
  };
  check_per_row(dloss_in, "dloss");
  check_per_row(target_in, "target");
  check_per_row(lse_in, "lse");
  const Tensor dloss = dloss_in.to(at::kFloat).contiguous();
  const Tensor target = target_in.to(at::kLong).contiguous();
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  Tensor dlogits = at::empty_like(logits);
  if (logits.numel() == 0) return dlogits;
  mmgpt::CrossEntropyBwdParams p{};
  p.dloss = dloss.data_ptr<float>();
  p.logits = logits.data_ptr();
  p.target = target.data_ptr<int64_t>();
  p.lse = lse.data_ptr<float>();
  p.dlogits = dlogits.data_ptr();
  p.rows = rows;
  p.vocab = static_cast<int>(logits.size(1));
  p.ignore_index = ignore_index;
  p.aligned = rows_aligned(logits.size(1), {logits, dlogits});
  check_launch(mmgpt::cross_entropy_bwd(p, dt, current_stream()), "cross_entropy_bwd");
  return dlogits;
}

// ------------------------------------------------------------------------------ attention
// The kernels copy 16-byte chunks of each row with cp.async: every row start must be 16-byte
// aligned (contiguous head dim, strides multiple of 8 elements, aligned base). Anything else is
// copied into a fresh contiguous tensor.
Tensor attention_operand(const Tensor& t, const char* name, const Tensor& q) {
  check_cuda(t, name, q);
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-d (batch, seqlen, heads, head_dim) tensor, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), ", got ", t.scalar_type());
  bool ok = t.stride(3) == 1 && aligned16(t);
  for (int d = 0; d < 3 && ok; ++d) ok = t.stride(d) % 8 == 0 || t.size(d) == 1;
  if (ok) return t;
  return t.is_contiguous() ? t.clone() : t.contiguous();  // a contiguous clone: a fresh, aligned allocation
}

struct AttentionSetup {
  mmgpt::FlashParams p{};
  DType dtype;
  Tensor q, k, v, cu, prefix;
};

AttentionSetup setup_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const OptTensor& cu_seqlens,
                               std::optional<int64_t> max_seqlen, const OptTensor& prefix, bool causal,
                               double softmax_scale) {
  TORCH_CHECK(q_in.is_cuda(), "q: expected a CUDA tensor, got one on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto st = q_in.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16,
              "q: the cuda flash attention takes float16 or bfloat16, got ", st, " (float32 runs on triton)");
  AttentionSetup s;
  s.dtype = dtype_of(q_in);
  s.q = attention_operand(q_in, "q", q_in);
  s.k = attention_operand(k_in, "k", q_in);
  s.v = attention_operand(v_in, "v", q_in);
  const int64_t b = s.q.size(0), sq = s.q.size(1), h = s.q.size(2), d = s.q.size(3);
  const int64_t sk = s.k.size(1), hkv = s.k.size(2);
  TORCH_CHECK(mmgpt::flash_supports_head_dim(static_cast<int>(d)), "q: the cuda flash attention takes head dims 64 "
              "and 128, got ", d);
  TORCH_CHECK(s.k.size(0) == b && s.k.size(3) == d && s.v.sizes() == s.k.sizes(),
              "k, v: expected shape (", b, ", S_k, H_kv, ", d, ") for both, got ", s.k.sizes(), " and ", s.v.sizes());
  TORCH_CHECK(hkv > 0 && h % hkv == 0, "k: expected a number of heads dividing q's ", h, ", got ", hkv);
  TORCH_CHECK(sq < INT_MAX && sk < INT_MAX, "q: sequence lengths beyond 2^31 - 1 are not supported");
  auto& p = s.p;
  p.q = s.q.data_ptr();
  p.k = s.k.data_ptr();
  p.v = s.v.data_ptr();
  p.q_batch_stride = s.q.stride(0), p.q_row_stride = s.q.stride(1), p.q_head_stride = s.q.stride(2);
  p.k_batch_stride = s.k.stride(0), p.k_row_stride = s.k.stride(1), p.k_head_stride = s.k.stride(2);
  p.v_batch_stride = s.v.stride(0), p.v_row_stride = s.v.stride(1), p.v_head_stride = s.v.stride(2);
  p.heads = static_cast<int>(h);
  p.kv_heads = static_cast<int>(hkv);
  p.seqlen_q = static_cast<int>(sq);
  p.seqlen_k = static_cast<int>(sk);
  p.batch = static_cast<int>(b);
  p.head_dim = static_cast<int>(d);
  p.causal = causal;
  p.scale = static_cast<float>(softmax_scale);
  if (cu_seqlens.has_value() && cu_seqlens->defined()) {
    check_cuda(*cu_seqlens, "cu_seqlens", q_in);
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2,
                "cu_seqlens: expected an int32 (n_seq + 1,) tensor, got ", cu_seqlens->scalar_type(), " ",
                cu_seqlens->sizes());
    TORCH_CHECK(b == 1 && sk == sq, "q: with cu_seqlens expected a packed batch (1, total, H, D) and k of the same "
                "length, got q ", s.q.sizes(), " k ", s.k.sizes());
    s.cu = cu_seqlens->contiguous();
    p.cu_seqlens = s.cu.data_ptr<int>();
    p.batch = static_cast<int>(s.cu.numel() - 1);
    p.max_seqlen = max_seqlen.has_value() ? static_cast<int>(*max_seqlen)
                                          : static_cast<int>(s.cu.slice(0, 1).sub(s.cu.slice(0, 0, -1)).max().item().toInt());
  }
  if (prefix.has_value() && prefix->defined()) {
    check_cuda(*prefix, "prefix", q_in);
    s.prefix = prefix->to(at::kInt).contiguous();
    TORCH_CHECK(s.prefix.numel() == p.batch, "prefix: expected one length per ",
                p.cu_seqlens != nullptr ? "sequence" : "batch element", " (", p.batch, "), got ", s.prefix.numel());
    p.prefix = s.prefix.data_ptr<int>();
  }
  return s;
}

std::tuple<Tensor, Tensor> flash_attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const OptTensor& cu_seqlens, std::optional<int64_t> max_seqlen,
                                          const OptTensor& prefix, bool causal, double softmax_scale) {
  AttentionSetup s = setup_attention(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty(s.q.sizes(), s.q.options());
  Tensor lse = at::empty({s.q.size(0), s.q.size(2), s.q.size(1)}, s.q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  auto& p = s.p;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  check_launch(mmgpt::flash_attn_fwd(p, s.dtype, current_stream()), "flash_attn_fwd");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                  const Tensor& v, const Tensor& out, const Tensor& lse,
                                                  const OptTensor& cu_seqlens, std::optional<int64_t> max_seqlen,
                                                  const OptTensor& prefix, bool causal, double softmax_scale) {
  AttentionSetup s = setup_attention(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(out.sizes() == s.q.sizes() && dout.sizes() == s.q.sizes(), "out, dout: expected the shape of q ",
              s.q.sizes(), ", got ", out.sizes(), " and ", dout.sizes());
  TORCH_CHECK(lse.numel() == s.q.size(0) * s.q.size(2) * s.q.size(1) && lse.scalar_type() == at::kFloat,
              "lse: expected a float32 (B, H, S_q) tensor, got ", lse.scalar_type(), " ", lse.sizes());
  check_cuda(lse, "lse", q);
  // out must share dq's (contiguous) strides: the kernels index both with the o_* strides
  const Tensor out_c = attention_operand(out, "out", q).contiguous();
  const Tensor dout_c = attention_operand(dout.to(q.scalar_type()), "dout", q);
  const Tensor lse_c = lse.contiguous();
  Tensor dq = at::empty(s.q.sizes(), s.q.options());
  Tensor dk = at::empty(s.k.sizes(), s.k.options());
  Tensor dv = at::empty(s.v.sizes(), s.v.options());
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  Tensor delta = at::empty_like(lse_c);
  auto& p = s.p;
  p.out = out_c.data_ptr();
  p.lse = lse_c.data_ptr<float>();
  p.dout = dout_c.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.o_batch_stride = dq.stride(0), p.o_row_stride = dq.stride(1), p.o_head_stride = dq.stride(2);
  p.do_batch_stride = dout_c.stride(0), p.do_row_stride = dout_c.stride(1), p.do_head_stride = dout_c.stride(2);
  p.dk_batch_stride = dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
  check_launch(mmgpt::flash_attn_bwd(p, s.dtype, current_stream()), "flash_attn_bwd");
  return {dq, dk, dv};
}

std::vector<int64_t> flash_head_dims() {
  std::vector<int64_t> dims;
  for (int d = 8; d <= 256; d += 8)
    if (mmgpt::flash_supports_head_dim(d)) dims.push_back(d);
  return dims;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmgpt_engine CUDA kernels (csrc/): norms, softmax, cross-entropy, flash attention";
  m.def("norm_fwd", &norm_fwd, "LayerNorm/RMSNorm forward -> (y, h, mean, rstd)");
  m.def("norm_bwd", &norm_bwd, "LayerNorm/RMSNorm backward -> (dx, dweight, dbias)");
  m.def("softmax_fwd", &softmax_fwd, "softmax(scale * x + mask) over the last dim");
  m.def("softmax_bwd", &softmax_bwd, "softmax backward: scale * y * (dy - sum(dy * y))");
  m.def("cross_entropy_fwd", &cross_entropy_fwd, "cross-entropy forward -> (loss, lse)");
  m.def("cross_entropy_bwd", &cross_entropy_bwd, "cross-entropy backward -> dlogits");
  m.def("flash_attn_fwd", &flash_attn_fwd, "flash attention forward -> (out, lse)");
  m.def("flash_attn_bwd", &flash_attn_bwd, "flash attention backward -> (dq, dk, dv)");
  m.def("flash_head_dims", &flash_head_dims, "the head dims the flash attention kernels are built for");
}
