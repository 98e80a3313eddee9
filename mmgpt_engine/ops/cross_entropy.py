"""Softmax cross-entropy over a large vocabulary: the public function, its checks and the
`mmgpt::cross_entropy_fwd` / `mmgpt::cross_entropy_bwd` custom ops.

Kernel contract (ops.triton.cross_entropy implements all of it, ops.cuda the plain case):
  cross_entropy_fwd(logits, target, ignore_index[, weight, label_smoothing, softcap]) -> (loss, lse)
      logits (R, V) contiguous, target (R,) int64; loss and lse (R,) float32, computed with an
      online log-sum-exp over vocab blocks (no logits-sized temporary). loss = 0 where target ==
      ignore_index (NaN where target is outside [0, V): the public op refuses such targets first).
      weight (V,) float32 or None; softcap 0.0 for none.
  cross_entropy_bwd(dloss, logits, target, lse, ignore_index[, dlse, weight, label_smoothing, softcap])
      -> dlogits, the gradient of dloss * loss + dlse * lse, 0 on ignored rows except for the lse
      term, written in one pass over the logits.
The cuda kernels take none of the bracketed options: `_kernel_backend` sends a call that needs
one to the triton kernels (the one place where that is decided).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from . import eager
from .reference import IGNORE_INDEX
from ._checks import INDEX_DTYPES, check_choice, check_kernel_dtype, check_same_device, check_tensor
from ._dispatch import kernels, resolve_backend, unavailable_reason

REDUCTIONS = ("mean", "sum", "none")
logger = logging.getLogger(__name__)


def check_class_indices(target: Tensor, vocab: int, ignore_index: int) -> None:
    """Refuse a target outside [0, vocab) that is not ignore_index (the kernels would give NaN).

    On the CPU (and wherever a host read is free) it raises ValueError naming the first bad value;
    on a GPU it queues a device-side assert instead, so the hot path never waits for the device
    (as PyTorch's own nll_loss does): the error then surfaces at the next synchronisation."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if target.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"target: expected class indices in [0, {vocab}) (the vocabulary size) "
                                        f"or ignore_index={ignore_index}, got a value outside")
        return
    if bad.any():
        values = target[bad]
        raise ValueError(f"target: expected class indices in [0, {vocab}) (the vocabulary size) or "
                         f"ignore_index={ignore_index}, got {int(values[0])} ({values.numel()} such "
                         f"target{'s' if values.numel() > 1 else ''})")


def _launch_fwd(backend, logits, target, ignore_index, weight, label_smoothing, softcap):
    if backend == "cuda":
        if weight is not None or label_smoothing or softcap:
            raise ValueError("backend: the cuda cross-entropy kernel has no weight/label_smoothing/softcap "
                             "(ops.cross_entropy runs such calls on triton)")
        return kernels(backend, "cross_entropy").cross_entropy_fwd(logits, target, ignore_index)
    return kernels(backend, "cross_entropy").cross_entropy_fwd(logits, target, ignore_index, weight,
                                                               label_smoothing, softcap)


@torch.library.custom_op("mmgpt::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: Tensor, target: Tensor, ignore_index: int, backend: str, weight: Optional[Tensor] = None,
            label_smoothing: float = 0.0, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    # here, inside the op, the check also runs when torch.compile has traced the call
    check_class_indices(target, logits.shape[-1], ignore_index)
    return _launch_fwd(backend, logits, target, ignore_index, weight, label_smoothing, softcap)


@_ce_fwd.register_fake
def _(logits, target, ignore_index, backend, weight=None, label_smoothing=0.0, softcap=0.0):
    r = logits.shape[0]
    return logits.new_empty(r, dtype=torch.float32), logits.new_empty(r, dtype=torch.float32)


@torch.library.custom_op("mmgpt::cross_entropy_bwd", mutates_args=())
def _ce_bwd(dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int, backend: str,
            dlse: Optional[Tensor] = None, weight: Optional[Tensor] = None, label_smoothing: float = 0.0,
            softcap: float = 0.0) -> Tensor:
    if backend == "cuda":
        if dlse is not None or weight is not None or label_smoothing or softcap:
            raise ValueError("backend: the cuda cross-entropy kernel has no dlse/weight/label_smoothing/softcap "
                             "(ops.cross_entropy runs such calls on triton)")
        return kernels(backend, "cross_entropy").cross_entropy_bwd(dloss, logits, target, lse, ignore_index)
    return kernels(backend, "cross_entropy").cross_entropy_bwd(dloss, logits, target, lse, ignore_index, dlse,
                                                               weight, label_smoothing, softcap)


@_ce_bwd.register_fake
def _(dloss, logits, target, lse, ignore_index, backend, dlse=None, weight=None, label_smoothing=0.0, softcap=0.0):
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs, output):
    logits, target, ignore_index, backend, weight, label_smoothing, softcap = inputs
    ctx.args = (ignore_index, backend, label_smoothing, softcap)
    # the lse carries a gradient only for the z-loss, which the cuda kernel lacks (never chosen then)
    if backend == "cuda":
        ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, output[1], weight)


def _ce_backward(ctx, dloss, dlse):
    logits, target, lse, weight = ctx.saved_tensors
    ignore_index, backend, label_smoothing, softcap = ctx.args
    if dloss is None:
        dloss = lse.new_zeros(lse.shape)
    if backend == "cuda":
        dlse = None
    dlogits = torch.ops.mmgpt.cross_entropy_bwd(
        dloss.contiguous().float(), logits, target, lse, ignore_index, backend,
        dlse.contiguous().float() if dlse is not None else None, weight, label_smoothing, softcap)
    return dlogits, None, None, None, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup_context)


_fallback_logged: set = set()


def _kernel_backend(chosen: str, device: torch.device, options: list[str]) -> str:
    """The backend whose kernels run a call that needs `options`: `chosen`, except that the cuda
    kernel has none of them, so such a call runs on triton (logged once per option set)."""
    if chosen != "cuda" or not options:
        return chosen
    reason = unavailable_reason("triton", device)
    if reason is not None:
        raise ValueError(f"{options[0]}: the cuda cross-entropy kernel has no {', '.join(options)}, and the triton "
                         f"kernel that has them is unavailable: {reason}")
    if tuple(options) not in _fallback_logged:
        _fallback_logged.add(tuple(options))
        logger.warning("cross_entropy: the cuda kernel has no %s; using triton", ", ".join(options))
    return "triton"


def _check_float(name: str, value, *, low: float, high: Optional[float] = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    ok = (value > low if low_open else value >= low) and (high is None or value <= high) and value == value
    if not ok or value in (float("inf"), float("-inf")):
        lo = f"({low}" if low_open else f"[{low}"
        hi = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name}: expected a finite number in {lo}, {hi}, got {value}")
    return value


def check_options(logits: Tensor, *, ignore_index, reduction, weight, label_smoothing, lse_square_scale, softcap,
                  return_z_loss) -> tuple[float, float, float]:
    """The checks of the options shared by cross_entropy and linear_cross_entropy; returns
    (label_smoothing, lse_square_scale, softcap) as floats (softcap 0.0 for none)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)
    label_smoothing = _check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    lse_square_scale = _check_float("lse_square_scale", lse_square_scale, low=0.0)
    if softcap is not None:
        softcap = _check_float("softcap", softcap, low=0.0, low_open=True)
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss: expected a bool, got {type(return_z_loss).__name__}")
    if weight is not None:
        v = logits.shape[-1]
        check_tensor("weight", weight, ndim=1)
        check_same_device("weight", weight, "logits", logits)
        if weight.shape[0] != v:
            raise ValueError(f"weight: expected shape ({v},) (one weight per class of logits), got {tuple(weight.shape)}")
        if weight.requires_grad:
            raise ValueError("weight: expected a tensor that does not require grad (no gradient flows to class "
                             "weights, as in torch.nn.functional.cross_entropy), got requires_grad=True")
    return label_smoothing, lse_square_scale, softcap or 0.0


def reduce_rows(ce: Tensor, lse: Tensor, valid: Tensor, w_t: Optional[Tensor], reduction: str,
                lse_square_scale: float, return_z_loss: bool):
    """Per-row cross-entropy (0 on ignored rows) and lse -> the reduced loss (and z-loss).

    mean divides the cross-entropy by the summed weight of the counted rows (their number without
    weights) and the z-loss by the number of counted rows, each 0 (not NaN) when no row counts."""
    z = None
    if lse_square_scale > 0 or return_z_loss:
        z = torch.where(valid, lse_square_scale * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        loss = ce if z is None or lse_square_scale == 0 else ce + z
        return (loss, z) if return_z_loss else loss
    if reduction == "sum":
        loss, z_red = ce.sum(), (z.sum() if z is not None else None)
    else:
        count = valid.sum()
        denom = (w_t * valid).sum().to(ce.dtype) if w_t is not None else count.to(ce.dtype)
        denom = torch.where(count > 0, denom, torch.ones_like(denom))
        loss = ce.sum() / denom
        z_red = z.sum() / count.clamp_min(1).to(z.dtype) if z is not None else None
    if z_red is not None and lse_square_scale > 0:
        loss = loss + z_red
    return (loss, z_red) if return_z_loss else loss


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                  weight: Optional[Tensor] = None, label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                  softcap: Optional[float] = None, return_z_loss: bool = False, backend: Optional[str] = None):
    """Cross-entropy of `logits` (..., V) against integer class indices `target` (...).

    reduction: "mean" (over rows whose target is not `ignore_index`; 0, not NaN, when all are
    ignored), "sum", or "none" (a float32 loss per row, shaped like target). The loss is
    float32 for low-precision logits (float64 for float64 on the torch backend). A target
    outside [0, V) that is not ignore_index is refused (ValueError on the CPU; a device-side
    assert on a GPU, which surfaces at the next synchronisation).

    Options (as torch.nn.functional.cross_entropy and Liger-Kernel define them):
      weight            (V,) per-class weights, no gradient: a row counts w[target] times, and
                        "mean" divides by the summed w[target] of the counted rows.
      label_smoothing   eps in [0, 1]: (1 - eps) * nll + eps / V * sum_c w_c * (-log p_c).
      lse_square_scale  z-loss (PaLM): adds lse_square_scale * logsumexp(logits)**2 per counted
                        row ("mean" averages it over the counted rows, unweighted).
      softcap           logits -> softcap * tanh(logits / softcap) before the softmax (Gemma 2).
      return_z_loss     also return the z-loss part, reduced as the loss: (loss, z_loss).
    The cuda backend has none of these options: a call that uses one runs on triton.
    """
    check_tensor("logits", logits, min_ndim=1)
    check_tensor("target", target, dtypes=INDEX_DTYPES)
    check_same_device("target", target, "logits", logits)
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(logits.shape[:-1])} (logits' shape without the "
                         f"vocab dim), got {tuple(target.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits: expected a non-empty vocab (last) dim, got shape {tuple(logits.shape)}")
    label_smoothing, lse_square_scale, softcap = check_options(
        logits, ignore_index=ignore_index, reduction=reduction, weight=weight, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, softcap=softcap, return_z_loss=return_z_loss)
    v = logits.shape[-1]
    chosen = resolve_backend(backend, logits.device)
    if chosen == "torch":
        # F.cross_entropy (ops.eager's route) refuses an out-of-range target itself, and the error
        # is made ours below; the reference (z-loss, softcap) and a GPU are checked up front
        if lse_square_scale > 0 or softcap > 0 or return_z_loss or logits.is_cuda:
            check_class_indices(target, v, ignore_index)
        try:
            out = eager.cross_entropy(logits, target, ignore_index, reduction, weight=weight,
                                      label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                                      softcap=softcap or None, return_z_loss=return_z_loss)
        except (IndexError, RuntimeError):
            check_class_indices(target, v, ignore_index)  # names the bad target, if that was the error
            raise
        if logits.dtype == torch.float64:
            return out
        return tuple(o.float() for o in out) if return_z_loss else out.float()
    check_kernel_dtype("logits", logits, chosen)
    options = [name for name, used in (("weight", weight is not None), ("label_smoothing", label_smoothing > 0),
                                       ("lse_square_scale", lse_square_scale > 0), ("softcap", softcap > 0)) if used]
    chosen = _kernel_backend(chosen, logits.device, options)
    l2 = logits.reshape(-1, v).contiguous()
    t2 = target.reshape(-1).to(torch.int64).contiguous()
    w32 = weight.detach().float().contiguous() if weight is not None else None
    ce, lse = torch.ops.mmgpt.cross_entropy_fwd(l2, t2, ignore_index, chosen, w32, label_smoothing, softcap)
    valid = t2 != ignore_index
    w_t = w32[t2.clamp(0, v - 1)] if w32 is not None and reduction == "mean" else None
    out = reduce_rows(ce, lse, valid, w_t, reduction, lse_square_scale, return_z_loss)
    if reduction == "none":
        return tuple(o.view(target.shape) for o in out) if return_z_loss else out.view(target.shape)
    return out
