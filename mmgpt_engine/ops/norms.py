"""LayerNorm and RMSNorm, with an optional fused residual add: the public functions, their input
checks, and the `mmgpt::norm_fwd` / `mmgpt::norm_bwd` custom ops shared by the triton and cuda
backends (so torch.compile traces them as opaque ops).

Kernel contract (ops.triton.norms and ops.cuda implement both):
  norm_fwd(x, weight, bias, residual, eps, is_rms) -> (y, h, mean, rstd)
      x, residual: (R, N) contiguous; weight/bias: (N,) or None.
      h = x + residual (an empty tensor when residual is None), mean/rstd: (R,) float32
      (mean is empty for RMSNorm).
  norm_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms) -> (dx, dweight, dbias)
      h: the normalised input (x + residual, or x); dh: the gradient flowing into the residual
      output (empty when none), added to dx. dweight/dbias empty when weight/bias is None.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._checks import check_kernel_dtype, check_like, check_param, check_positive, check_tensor
from ._dispatch import kernels, resolve_backend

def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("mmgpt::norm_fwd", mutates_args=())
def _norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    eps: float, is_rms: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels(backend, "norms").norm_fwd(x, weight, bias, residual, eps, is_rms)


@_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, is_rms, backend):
    r = x.shape[0]
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if is_rms else r, dtype=torch.float32)
    return torch.empty_like(x), h, mean, x.new_empty(r, dtype=torch.float32)


@torch.library.custom_op("mmgpt::norm_bwd", mutates_args=())
def _norm_bwd(
    dy: Tensor, dh: Tensor, h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    mean: Tensor, rstd: Tensor, is_rms: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend, "norms").norm_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms)


@_norm_bwd.register_fake
def _(dy, dh, h, weight, bias, mean, rstd, is_rms, backend):
    dw = torch.empty_like(weight) if weight is not None else h.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else h.new_empty(0)
    return torch.empty_like(h), dw, db


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms, backend = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.is_rms = is_rms
    ctx.backend = backend
    ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)


def _norm_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    if dh is None or not ctx.has_residual:
        dh = _empty(h)
    dx, dw, db = torch.ops.mmgpt.norm_bwd(dy.contiguous(), dh.contiguous(), h, weight, bias, mean, rstd,
                                          ctx.is_rms, ctx.backend)
    return (dx, dw if weight is not None else None, db if bias is not None else None,
            dx if ctx.has_residual else None, None, None, None)


_norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context)


def _check_norm_inputs(x, weight, bias, residual, eps):
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"x: expected a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    check_param("weight", weight, n, "x", x)
    check_param("bias", bias, n, "x", x)
    if residual is not None:
        check_like("residual", residual, "x", x)
    return check_positive("eps", eps)


def _norm(x, weight, bias, residual, eps, is_rms, backend):
    chosen = resolve_backend(backend, x.device)
    if chosen == "torch":
        if is_rms:
            return reference.rms_norm(x, weight, eps, residual=residual)
        return reference.layer_norm(x, weight, bias, eps, residual=residual)
    check_kernel_dtype("x", x, chosen)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    r2 = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else None
    # the kernels index weight/bias as dense vectors; a strided or expanded one is copied (its
    # gradient still reaches the original through the copy)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    y, h, _, _ = torch.ops.mmgpt.norm_fwd(x2, weight, bias, r2, eps, is_rms, chosen)
    y = y.view(shape)
    return y if residual is None else (y, h.view(shape))


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               residual: Optional[Tensor] = None, backend: Optional[str] = None):
    """LayerNorm over the last dim of `x` (any leading dims), float32 statistics.

    With `residual` (same shape and dtype as x) it normalises h = x + residual and returns
    (y, h), so a pre-norm block can carry h on as the next residual stream without another pass.
    weight/bias: (N,) or None. Gradients flow to x, residual, weight and bias.
    """
    eps = _check_norm_inputs(x, weight, bias, residual, eps)
    return _norm(x, weight, bias, residual, eps, False, backend)


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6, *,
             residual: Optional[Tensor] = None, backend: Optional[str] = None):
    """RMSNorm over the last dim of `x`; with `residual`, returns (y, x + residual) like layer_norm."""
    eps = _check_norm_inputs(x, weight, None, residual, eps)
    return _norm(x, weight, None, residual, eps, True, backend)
