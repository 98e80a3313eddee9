// Host launchers of the csrc kernels: plain C++ (no torch headers), so the .cu files compile
// quickly with nvcc alone and bindings.cpp is the only file that sees at::Tensor.
// Pointers are device pointers; element counts and strides are in elements; every launcher
// returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mmgpt {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kBool = 4 };

// ------------------------------------------------------------------------------------- norms
// weight and bias are read, and their gradients written, in param_dtype: x's dtype, or float32
// (mixed precision: a float32 weight on float16 / bfloat16 activations).
struct NormFwdParams {
  const void* x;         // (rows, n)
  const void* residual;  // (rows, n) or nullptr
  const void* weight;    // (n,) or nullptr
  const void* bias;      // (n,) or nullptr
  void* y;               // (rows, n)
  void* h;               // (rows, n) x + residual, written only with a residual
  float* mean;           // (rows,), unused for RMSNorm
  float* rstd;           // (rows,)
  int64_t rows;
  int n;
  float eps;
  DType param_dtype;
  bool is_rms;
  bool aligned;  // every row pointer 16-byte aligned (n * element size % 16 == 0, 16-byte aligned bases,
                 // weight and bias included)
};

struct NormBwdParams {
  const void* dy;       // (rows, n)
  const void* dh;       // (rows, n) or nullptr: gradient of the residual output, added to dx
  const void* h;        // (rows, n) the normalised input
  const void* weight;   // (n,) or nullptr
  const float* mean;    // (rows,), unused for RMSNorm
  const float* rstd;    // (rows,)
  void* dx;             // (rows, n)
  void* dweight;        // (n,) or nullptr
  void* dbias;          // (n,) or nullptr
  float* partials;      // workspace, norm_bwd_workspace_floats(...) floats
  int64_t rows;
  int n;
  DType param_dtype;
  bool is_rms;
  bool aligned;         // as NormFwdParams::aligned (dy, dh, h, dx and weight)
};

int64_t norm_bwd_workspace_floats(const NormBwdParams& p, DType dtype);
cudaError_t norm_fwd(const NormFwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t norm_bwd(const NormBwdParams& p, DType dtype, cudaStream_t stream);

// ----------------------------------------------------------------------------------- softmax
struct SoftmaxFwdParams {
  const void* x;                   // (rows, n)
  void* y;                         // (rows, n)
  const void* mask;                // nullptr, or read at mask + mask_row_offsets[r] + c * mask_col_stride
  const int64_t* mask_row_offsets; // (rows,)
  int64_t mask_col_stride;
  DType mask_dtype;                // kBool (True = keep) or a float dtype (additive)
  int64_t causal_rows;             // M > 0: row r is row r % M of an (M, n) causal matrix
  int64_t rows;
  int n;
  float scale;
  bool aligned;
};

struct SoftmaxBwdParams {
  const void* dy;
  const void* y;
  void* dx;
  int64_t rows;
  int n;
  float scale;
  bool aligned;
};

cudaError_t softmax_fwd(const SoftmaxFwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t softmax_bwd(const SoftmaxBwdParams& p, DType dtype, cudaStream_t stream);

// ----------------------------------------------------------------------------- cross-entropy
struct CrossEntropyFwdParams {
  const void* logits;     // (rows, vocab)
  const int64_t* target;  // (rows,)
  float* loss;            // (rows,)
  float* lse;             // (rows,)
  int64_t rows;
  int vocab;
  int64_t ignore_index;
  bool aligned;
};

struct CrossEntropyBwdParams {
  const float* dloss;     // (rows,)
  const void* logits;     // (rows, vocab)
  const int64_t* target;  // (rows,)
  const float* lse;       // (rows,)
  void* dlogits;          // (rows, vocab)
  int64_t rows;
  int vocab;
  int64_t ignore_index;
  bool aligned;
};

cudaError_t cross_entropy_fwd(const CrossEntropyFwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t cross_entropy_bwd(const CrossEntropyBwdParams& p, DType dtype, cudaStream_t stream);

// ------------------------------------------------------------------------------- attention
// Layout (B, S, H, D) with any batch/row/head strides and a contiguous head dim; all strides are
// multiples of 8 elements and all bases 16-byte aligned (bindings.cpp copies otherwise).
struct FlashParams {
  const void *q, *k, *v;
  void* out;        // (B, S_q, H, D)
  float* lse;       // (B, H, S_q)
  const void* dout; // backward only, same strides as out_*
  void *dq, *dk, *dv;
  float* delta;     // backward workspace (B, H, S_q): rowsum(dout * out)

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;      // out, dout and dq (all (B, S_q, H, D))
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;   // dk and dv
  int64_t do_batch_stride, do_row_stride, do_head_stride;   // dout

  int batch;            // B, or the number of packed sequences with cu_seqlens
  int heads, kv_heads;
  int seqlen_q, seqlen_k;  // tensor lengths (the packed total with cu_seqlens)
  const int* cu_seqlens;   // nullptr or (batch + 1,)
  int max_seqlen;          // with cu_seqlens: the longest sequence
  const int* prefix;       // nullptr or (batch,) prefix-LM lengths (implies causal)
  bool causal;
  float scale;             // softmax scale
  int head_dim;
};

bool flash_supports_head_dim(int head_dim);
cudaError_t flash_attn_fwd(const FlashParams& p, DType dtype, cudaStream_t stream);
cudaError_t flash_attn_bwd(const FlashParams& p, DType dtype, cudaStream_t stream);

}  // namespace mmgpt
