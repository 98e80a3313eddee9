"""Fused linear + cross-entropy: the loss of `hidden @ weight.T (+ bias)` against class indices,
without ever holding the (tokens, vocab) logits.

It walks the tokens in chunks: each chunk's logits are computed (a matmul), their loss and
gradient written by the cross-entropy kernels (the gradient over the logits themselves), and the
chunk's share of d hidden and d weight taken from that gradient before the next chunk reuses the
memory. So at any time one chunk of logits lives (plus, on the torch backend, a float32 copy of
half a chunk), where logits + cross_entropy hold all of them and their gradient. With reduction
"mean" or "sum" the gradients are computed in the forward (Liger-Kernel's approach: the output
gradient is a scalar, applied in the backward), so nothing is computed twice; with "none" the
per-row output gradient is known only in the backward, which then recomputes the chunks.

Custom ops (kernels: the cross-entropy ones of ops.triton / ops.cuda, and torch matmuls):
  mmgpt::linear_cross_entropy_fwd(hidden, weight, target, bias, ...) -> (loss, dhidden, dweight, dbias)
  mmgpt::linear_cross_entropy_bwd(dloss_rows, hidden, weight, target, bias, ...) -> (dhidden, dweight, dbias)
      hidden (N, H) contiguous, weight (V, H), target (N,) int64, bias (V,) or None; a gradient
      not asked for is an empty tensor.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._checks import INDEX_DTYPES, check_kernel_dtype, check_same_device, check_same_dtype, check_tensor
from ._dispatch import kernels, resolve_backend
from .cross_entropy import _kernel_backend, check_class_indices, check_options
from .reference import IGNORE_INDEX


MIN_CHUNK_ROWS = 256


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: a power of two near tokens * hidden / vocab, so that one chunk of logits
    is about as large as the hidden states themselves (Liger-Kernel's choice), but at least
    MIN_CHUNK_ROWS (a thinner matmul runs well below the machine's rate: 1.7x the time of the
    unchunked path on a CPU at 64 rows, 1.17x at 256) and at most all the tokens."""
    rows = max(MIN_CHUNK_ROWS, math.ceil(tokens * hidden / max(vocab, 1)))
    return max(1, min(tokens, 1 << (rows - 1).bit_length()))


# ------------------------------------------------------------------------------- one chunk's loss
def _torch_chunk(logits, target, dloss, ignore_index, label_smoothing):
    """The torch backend's chunk: loss rows (float32, float64 for float64) and, with dloss, the
    gradient written over `logits`. The float arithmetic runs on half a chunk of rows at a time,
    so its float32 copy of bfloat16 logits takes no more memory than the chunk itself."""
    rows, v = logits.shape
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = logits.new_empty(rows, dtype=cd)
    step = max(1, rows // 2) if logits.dtype != cd else max(rows, 1)
    for s in range(0, rows, step):
        e = min(rows, s + step)
        x = logits[s:e].to(cd)
        t = target[s:e]
        valid = t != ignore_index
        safe_t = torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1)
        lse = torch.logsumexp(x, dim=-1)
        ce = lse - x.gather(1, safe_t).squeeze(1)
        if label_smoothing > 0:
            ce = (1 - label_smoothing) * ce + (label_smoothing / v) * (v * lse - x.sum(-1))
        loss[s:e] = torch.where(valid, ce, torch.zeros_like(ce))
        if dloss is not None:
            g = torch.where(valid, dloss[s:e].to(cd), torch.zeros_like(lse))
            x.sub_(lse.unsqueeze(1)).exp_()  # x is now softmax (in place, x may be logits' own rows)
            if label_smoothing > 0:
                x.sub_(label_smoothing / v)
            x.scatter_add_(1, safe_t, torch.full_like(x[:, :1], -(1 - label_smoothing)))
            x.mul_(g.unsqueeze(1))
            logits[s:e].copy_(x)
    return loss


def _chunk_loss(backend, logits, target, dloss, ignore_index, label_smoothing):
    """Loss rows of one chunk and, with dloss (per-row output gradients), dlogits over the logits
    (a new tensor on the cuda backend, whose kernel has no output argument)."""
    if backend == "torch":
        return _torch_chunk(logits, target, dloss, ignore_index, label_smoothing), logits
    ce = kernels(backend, "cross_entropy")
    if backend == "cuda":
        loss, lse = ce.cross_entropy_fwd(logits, target, ignore_index)
        if dloss is None:
            return loss, None
        return loss, ce.cross_entropy_bwd(dloss, logits, target, lse, ignore_index)
    loss, lse = ce.cross_entropy_fwd(logits, target, ignore_index, None, label_smoothing, 0.0)
    if dloss is None:
        return loss, None
    return loss, ce.cross_entropy_bwd(dloss, logits, target, lse, ignore_index, None, None, label_smoothing, 0.0,
                                      dlogits=logits)


def _walk_chunks(hidden, weight, target, bias, dloss_rows, ignore_index, label_smoothing, chunk_size, backend,
                 need_dhidden, need_dweight, need_dbias):
    """The chunk loop: loss rows, and the gradients asked for (dloss_rows given)."""
    n = hidden.shape[0]
    loss = hidden.new_empty(n, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    grads = dloss_rows is not None
    dhidden = torch.empty_like(hidden) if grads and need_dhidden else hidden.new_empty(0)
    # dweight accumulates chunk by chunk in weight's dtype (one rounding per chunk, as Liger): a
    # float32 accumulator would cost 2 bytes per weight more than one chunk of logits
    dweight = torch.zeros_like(weight) if grads and need_dweight else weight.new_empty(0)
    dbias = torch.zeros(weight.shape[0], dtype=torch.float32 if bias is None or bias.dtype != torch.float64
                        else torch.float64, device=weight.device) if grads and need_dbias else weight.new_empty(0)
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        rows, dlogits = _chunk_loss(backend, logits, target[start:end],
                                    dloss_rows[start:end] if grads else None, ignore_index, label_smoothing)
        loss[start:end] = rows
        if grads:
            if need_dhidden:
                torch.mm(dlogits, weight, out=dhidden[start:end])
            if need_dweight:
                dweight.addmm_(dlogits.t(), h)
            if need_dbias:
                dbias += dlogits.sum(0, dtype=dbias.dtype)
        del logits, dlogits
    if need_dbias and grads and bias is not None:
        dbias = dbias.to(bias.dtype)
    return loss, dhidden, dweight, dbias


# ------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("mmgpt::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
             reduction: str, label_smoothing: float, chunk_size: int, backend: str, need_dhidden: bool,
             need_dweight: bool, need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_class_indices(target, weight.shape[0], ignore_index)
    valid = target != ignore_index
    dloss_rows = None
    if reduction != "none" and (need_dhidden or need_dweight or need_dbias):
        # the gradient of the reduced loss per row, known before any chunk: 1 (sum) or 1/count (mean)
        scale = valid.to(torch.float32 if hidden.dtype != torch.float64 else torch.float64)
        dloss_rows = scale / valid.sum().clamp_min(1).to(scale.dtype) if reduction == "mean" else scale
    rows, dh, dw, db = _walk_chunks(hidden, weight, target, bias, dloss_rows, ignore_index, label_smoothing,
                                    chunk_size, backend, need_dhidden, need_dweight, need_dbias)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / valid.sum().clamp_min(1).to(rows.dtype)
    return loss, dh, dw, db


@_lce_fwd.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, chunk_size, backend, need_dhidden,
      need_dweight, need_dbias):
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = hidden.new_empty(hidden.shape[0] if reduction == "none" else (), dtype=cd)
    grads = reduction != "none"
    dh = torch.empty_like(hidden) if grads and need_dhidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if grads and need_dweight else weight.new_empty(0)
    db = torch.empty_like(bias) if grads and need_dbias and bias is not None else weight.new_empty(0)
    return loss, dh, dw, db


@torch.library.custom_op("mmgpt::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(dloss_rows: Tensor, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
             ignore_index: int, label_smoothing: float, chunk_size: int, backend: str, need_dhidden: bool,
             need_dweight: bool, need_dbias: bool) -> tuple[Tensor, Tensor, Tensor]:
    _, dh, dw, db = _walk_chunks(hidden, weight, target, bias, dloss_rows, ignore_index, label_smoothing,
                                 chunk_size, backend, need_dhidden, need_dweight, need_dbias)
    return dh, dw, db


@_lce_bwd.register_fake
def _(dloss_rows, hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size, backend, need_dhidden,
      need_dweight, need_dbias):
    dh = torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    db = torch.empty_like(bias) if need_dbias and bias is not None else weight.new_empty(0)
    return dh, dw, db


def _lce_setup_context(ctx, inputs, output):
    (hidden, weight, target, bias, ignore_index, reduction, label_smoothing, chunk_size, backend, need_dhidden,
     need_dweight, need_dbias) = inputs
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    # no zeros for the gradient outputs' own (unused) gradients: those would be a d weight-sized
    # allocation at the start of the backward
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.needs = (need_dhidden, need_dweight, need_dbias)
    ctx.has_bias = bias is not None
    ctx.handed_over = False
    if reduction == "none":
        ctx.args = (ignore_index, label_smoothing, chunk_size, backend)
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(dh, dw, db)


def _lce_backward(ctx, dloss, _ddh, _ddw, _ddb):
    need_dhidden, need_dweight, need_dbias = ctx.needs
    if dloss is None:  # the loss itself took no part in what is differentiated
        return (None,) * 12
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        ignore_index, label_smoothing, chunk_size, backend = ctx.args
        dh, dw, db = torch.ops.mmgpt.linear_cross_entropy_bwd(
            dloss.contiguous(), hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size, backend,
            need_dhidden, need_dweight, need_dbias)
    else:
        if ctx.handed_over:
            raise RuntimeError("linear_cross_entropy: with reduction 'mean' or 'sum' the gradients are computed in "
                               "the forward and handed over, scaled, by the first backward, so a second backward "
                               "through the same graph (retain_graph=True) cannot run; reduction='none' recomputes "
                               "them in its backward instead")
        ctx.handed_over = True
        dh, dw, db = ctx.saved_tensors
        # scaled in place: a scaled copy of dweight would cost a whole weight-sized buffer
        for g in (dh, dw, db):
            if g.numel():
                g.mul_(dloss)
    return (dh if need_dhidden else None, dw if need_dweight else None, None,
            db if need_dbias and ctx.has_bias else None, None, None, None, None, None, None, None, None)


_lce_fwd.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# ------------------------------------------------------------------------------------ public API
def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean", label_smoothing: float = 0.0,
                         chunk_size: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """cross_entropy(hidden @ weight.T + bias, target) without materialising the logits.

    hidden (..., H); weight (V, H) (an LM head's, or tied embeddings), bias (V,) or None, both
    in hidden's dtype and on its device; target (...) class indices or ignore_index. reduction,
    ignore_index and label_smoothing as in `ops.cross_entropy` (the loss is float32 for
    low-precision inputs). chunk_size: tokens per chunk (default `default_chunk_size`: one chunk
    of logits about the size of hidden). Gradients flow to hidden, weight and bias; d weight is
    summed chunk by chunk in weight's dtype. With "mean"/"sum" they are computed in the forward,
    so one backward per forward (no retain_graph); "none" recomputes the chunks in its backward.
    The cuda backend's kernel has no label smoothing: such a call runs on triton.
    """
    check_tensor("hidden", hidden, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_same_dtype("weight", weight, "hidden", hidden)
    check_same_device("weight", weight, "hidden", hidden)
    h_dim = hidden.shape[-1]
    if weight.shape[1] != h_dim:
        raise ValueError(f"weight: expected shape (vocab, {h_dim}) (hidden's last dim), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight: expected a non-empty vocab (first) dim, got shape {tuple(weight.shape)}")
    check_tensor("target", target, dtypes=INDEX_DTYPES)
    check_same_device("target", target, "hidden", hidden)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(hidden.shape[:-1])} (hidden's shape without the last "
                         f"dim), got {tuple(target.shape)}")
    vocab = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same_dtype("bias", bias, "hidden", hidden)
        check_same_device("bias", bias, "hidden", hidden)
        if bias.shape[0] != vocab:
            raise ValueError(f"bias: expected shape ({vocab},) (weight's vocab dim), got {tuple(bias.shape)}")
    label_smoothing, _, _ = check_options(weight, ignore_index=ignore_index, reduction=reduction, weight=None,
                                          label_smoothing=label_smoothing, lse_square_scale=0.0, softcap=None,
                                          return_z_loss=False)
    n = target.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n, h_dim, vocab)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected an int or None, got {type(chunk_size).__name__}")
    elif chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive number of tokens, got {chunk_size}")
    chosen = resolve_backend(backend, hidden.device)
    if chosen != "torch":
        check_kernel_dtype("hidden", hidden, chosen)
        chosen = _kernel_backend(chosen, hidden.device, ["label_smoothing"] if label_smoothing > 0 else [])
    grad = torch.is_grad_enabled()
    need = (grad and hidden.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    h2 = hidden.reshape(n, h_dim).contiguous()
    t2 = target.reshape(n).to(torch.int64).contiguous()
    loss, _, _, _ = torch.ops.mmgpt.linear_cross_entropy_fwd(
        h2, weight.contiguous(), t2, bias.contiguous() if bias is not None else None, ignore_index, reduction,
        label_smoothing, max(1, min(chunk_size, max(n, 1))), chosen, *need)
    if reduction == "none":
        return loss.view(target.shape)
    return loss
