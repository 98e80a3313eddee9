"""LayerNorm and RMSNorm, with an optional fused residual add: the public functions, their input
checks, and the `mmgpt::norm_fwd` / `mmgpt::norm_bwd` custom ops shared by the triton and cuda
backends (so torch.compile traces them as opaque ops).

Kernel contract (ops.triton.norms implements all of it, ops.cuda the calls without the bracketed
options, which `_kernel_backend` sends to triton):
  norm_fwd(x, weight, bias, residual, eps, is_rms[, offset, cast_xhat, out_dtype]) -> (y, h, mean, rstd)
      x, residual: (R, N) contiguous; weight/bias: (N,) or None.
      h = x + residual (an empty tensor when residual is None), mean/rstd: (R,) float32
      (mean is empty for RMSNorm). y = xhat * (weight + offset) [+ bias], xhat rounded to x's
      dtype first when cast_xhat ("llama" casting); y in out_dtype (default x's).
  norm_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms[, offset, cast_xhat, dx_out]) -> (dx, dweight, dbias)
      h: the normalised input (x + residual, or x); dh: the gradient flowing into the residual
      output (empty when none), added to dx. dweight/dbias empty when weight/bias is None.
      dx_out: where dx goes (default a new tensor; dy's own memory for in_place).
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Optional

import torch
from torch import Tensor

from . import eager
from ._checks import check_choice, check_kernel_dtype, check_like, check_param, check_positive, check_tensor
from ._dispatch import kernels, resolve_backend, unavailable_reason

CASTING_MODES = ("gemma", "llama")
logger = logging.getLogger(__name__)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _out_dtype(x: Tensor, weight: Optional[Tensor], llama_cast: bool) -> torch.dtype:
    # "llama" casting multiplies the weight by the row in x's dtype, so torch's type promotion
    # decides the output dtype (a float32 weight on bfloat16 activations gives float32)
    if llama_cast and weight is not None:
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype


@torch.library.custom_op("mmgpt::norm_fwd", mutates_args=())
def _norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    eps: float, is_rms: bool, backend: str, offset: float = 0.0, llama_cast: bool = False, in_place: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # in_place concerns the backward only (see _norm_backward)
    launch = kernels(backend, "norms").norm_fwd
    if backend == "cuda":
        if offset or llama_cast:
            raise ValueError("backend: the cuda norm kernel has no offset/casting_mode (ops.rms_norm runs such "
                             "calls on triton)")
        return launch(x, weight, bias, residual, eps, is_rms)
    return launch(x, weight, bias, residual, eps, is_rms, offset, llama_cast, _out_dtype(x, weight, llama_cast))


@_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, is_rms, backend, offset=0.0, llama_cast=False, in_place=False):
    r = x.shape[0]
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if is_rms else r, dtype=torch.float32)
    y = torch.empty_like(x, dtype=_out_dtype(x, weight, llama_cast))
    return y, h, mean, x.new_empty(r, dtype=torch.float32)


@torch.library.custom_op("mmgpt::norm_bwd", mutates_args=())
def _norm_bwd(
    dy: Tensor, dh: Tensor, h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    mean: Tensor, rstd: Tensor, is_rms: bool, backend: str, offset: float = 0.0, llama_cast: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    launch = kernels(backend, "norms").norm_bwd
    if backend == "cuda":
        if offset or llama_cast:
            raise ValueError("backend: the cuda norm kernel has no offset/casting_mode (ops.rms_norm runs such "
                             "calls on triton)")
        return launch(dy, dh, h, weight, bias, mean, rstd, is_rms)
    return launch(dy, dh, h, weight, bias, mean, rstd, is_rms, offset, llama_cast)


@_norm_bwd.register_fake
def _(dy, dh, h, weight, bias, mean, rstd, is_rms, backend, offset=0.0, llama_cast=False):
    dw = torch.empty_like(weight) if weight is not None else h.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else h.new_empty(0)
    return torch.empty_like(h), dw, db


# ------------------------------------------------------------------------------- in_place backward
# in_place writes dx into the memory of the gradient arriving at y. That is only right when
# nothing else reads that gradient afterwards, which is not the case when, e.g., y is added to a
# tensor that also feeds this norm (AddBackward hands the same gradient to both) or a hook keeps
# it: Liger's in_place RMSNorm broke Gemma 2 that way (its PR 376). So the backward checks that it
# holds the only references to that memory, in the autograd engine (use counts) and in Python
# (reference counts), and otherwise writes a new tensor: in_place saves memory where it can and
# is never wrong. The counts an exclusively held gradient has are measured once per device, by a
# backward through this same op whose gradient nobody else holds, so no number of this torch
# version's internals is written down here. The gradient always arrives as a view (of what the
# consumer of y produced), as the op's output is reshaped to x's shape.
_exclusive_counts: dict = {}
_calibrating: list = []


def _counts(dy: Tensor):
    """(use count, Python reference count) of dy and of its base."""
    base = dy._base
    return dy._use_count(), sys.getrefcount(dy), base._use_count(), sys.getrefcount(base)


def _calibrate(device: torch.device) -> None:
    if device in _exclusive_counts or _calibrating or torch.compiler.is_compiling():
        return
    measured = []
    _calibrating.append(measured)
    try:
        with torch.enable_grad():
            x = torch.randn(2, 3, 8, device=device, requires_grad=True)
            y = rms_norm(x, None, in_place=True, backend="triton")
            (y.reshape(-1, 8) @ torch.ones(8, 8, device=device)).sum().backward()
    finally:
        _calibrating.pop()
    if len(measured) != 1:
        raise RuntimeError(f"rms_norm(in_place=True): the calibrating backward saw {len(measured)} exclusive "
                           "gradients, expected 1")
    _exclusive_counts[device] = measured[0]


def _grad_is_exclusive(dy: Tensor, dx_like: Tensor) -> bool:
    if torch.compiler.is_compiling() or dy.dtype != dx_like.dtype or not dy.is_contiguous() or dy._base is None:
        return False
    if dy.storage_offset() != 0 or dy._base.untyped_storage().nbytes() != dy.numel() * dy.element_size():
        return False  # dy is part of a larger buffer that other tensors may see
    counts = _counts(dy)
    if _calibrating:
        _calibrating[-1].append(counts)
        return False
    expected = _exclusive_counts.get(dy.device)
    return expected is not None and all(c <= e for c, e in zip(counts, expected))


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms, backend, offset, llama_cast, in_place = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.args = (is_rms, backend, offset, llama_cast)
    ctx.in_place = in_place
    ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)


def _norm_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    is_rms, backend, offset, llama_cast = ctx.args
    if dh is None or not ctx.has_residual:
        dh = _empty(h)
    if ctx.in_place and backend == "triton" and _grad_is_exclusive(dy, h):
        dx, dw, db = kernels(backend, "norms").norm_bwd(dy, dh.contiguous(), h, weight, bias, mean, rstd, is_rms,
                                                        offset, llama_cast, dx_out=dy)
    else:
        dx, dw, db = torch.ops.mmgpt.norm_bwd(dy.contiguous(), dh.contiguous(), h, weight, bias, mean, rstd, is_rms,
                                              backend, offset, llama_cast)
    return (dx, dw if weight is not None else None, db if bias is not None else None,
            dx if ctx.has_residual else None, None, None, None, None, None, None)


_norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context)


# ------------------------------------------------------------------------------------ public API
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


_fallback_logged: set = set()


def _kernel_backend(chosen: str, device: torch.device, options: list[str]) -> str:
    """The backend whose kernels run a norm that needs `options`: `chosen`, except that the cuda
    kernel has none of them, so such a call runs on triton (logged once per option set)."""
    if chosen != "cuda" or not options:
        return chosen
    reason = unavailable_reason("triton", device)
    if reason is not None:
        raise ValueError(f"{options[0]}: the cuda norm kernel has no {', '.join(options)}, and the triton kernel "
                         f"that has them is unavailable: {reason}")
    if tuple(options) not in _fallback_logged:
        _fallback_logged.add(tuple(options))
        logger.warning("rms_norm: the cuda kernel has no %s; using triton", ", ".join(options))
    return "triton"


def _norm(x, weight, bias, residual, eps, is_rms, backend, offset=0.0, llama_cast=False, in_place=False):
    chosen = resolve_backend(backend, x.device)
    if chosen == "torch":
        if is_rms:
            return eager.rms_norm(x, weight, eps, residual=residual, offset=offset,
                                  casting_mode="llama" if llama_cast else "gemma")
        return eager.layer_norm(x, weight, bias, eps, residual=residual)
    check_kernel_dtype("x", x, chosen)
    options = [name for name, used in (("offset", offset != 0), ("casting_mode", llama_cast),
                                       ("in_place", in_place)) if used]
    chosen = _kernel_backend(chosen, x.device, options)
    if in_place and chosen == "triton":
        _calibrate(x.device)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    r2 = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else None
    # the kernels index weight/bias as dense vectors; a strided or expanded one is copied (its
    # gradient still reaches the original through the copy)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    y, h, _, _ = torch.ops.mmgpt.norm_fwd(x2, weight, bias, r2, eps, is_rms, chosen, offset, llama_cast, in_place)
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


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6, *, residual: Optional[Tensor] = None,
             offset: float = 0.0, casting_mode: str = "gemma", in_place: bool = False, backend: Optional[str] = None):
    """RMSNorm over the last dim of `x`; with `residual`, returns (y, x + residual) like layer_norm.

    weight: (N,) or None (no affine scale). Options (Liger-Kernel's names):
      offset        y = xhat * (offset + weight): Gemma stores weight - 1 and uses offset=1.0.
      casting_mode  "gemma" (default): all arithmetic in float32, y rounded once to x's dtype;
                    "llama": xhat is rounded to x's dtype before the weight multiplies it, and y
                    takes the promoted dtype of x and weight, exactly as transformers' Llama,
                    Mistral and Qwen2 RMSNorm compute `weight * xhat.to(input_dtype)`.
      in_place      the backward writes dx into the memory of y's incoming gradient (one
                    activation-sized allocation less), where that gradient is held by nothing
                    else; where it is (a hook, y added to its own input...), dx is a new tensor.
    The cuda backend has none of these options: a call that uses one runs on triton.
    """
    eps = _check_norm_inputs(x, weight, None, residual, eps)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset: expected a float, got {type(offset).__name__}")
    if not math.isfinite(offset):
        raise ValueError(f"offset: expected a finite number, got {offset}")
    if offset != 0 and weight is None:
        raise ValueError(f"offset: expected 0.0 without a weight (it is added to the weight), got {offset}")
    check_choice("casting_mode", casting_mode, CASTING_MODES)
    if not isinstance(in_place, bool):
        raise TypeError(f"in_place: expected a bool, got {type(in_place).__name__}")
    return _norm(x, weight, None, residual, eps, True, backend, float(offset), casting_mode == "llama", in_place)
