"""Softmax cross-entropy over a large vocabulary: the public function, its checks and the
`mmgpt::cross_entropy_fwd` / `mmgpt::cross_entropy_bwd` custom ops.

Kernel contract (ops.triton.cross_entropy and ops.cuda implement both):
  cross_entropy_fwd(logits, target, ignore_index) -> (loss, lse)
      logits (R, V) contiguous, target (R,) int64; loss and lse (R,) float32, computed with an
      online log-sum-exp over vocab blocks (no logits-sized temporary). loss = 0 where target ==
      ignore_index, NaN where target is outside [0, V) otherwise.
  cross_entropy_bwd(dloss, logits, target, lse, ignore_index) -> dlogits
      dlogits[r] = dloss[r] * (softmax(logits[r]) - onehot(target[r])), 0 on ignored rows, written
      in one pass over the logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .reference import IGNORE_INDEX
from ._checks import INDEX_DTYPES, check_choice, check_kernel_dtype, check_same_device, check_tensor
from ._dispatch import kernels, resolve_backend

REDUCTIONS = ("mean", "sum", "none")


@torch.library.custom_op("mmgpt::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: Tensor, target: Tensor, ignore_index: int, backend: str) -> tuple[Tensor, Tensor]:
    return kernels(backend, "cross_entropy").cross_entropy_fwd(logits, target, ignore_index)


@_ce_fwd.register_fake
def _(logits, target, ignore_index, backend):
    r = logits.shape[0]
    return logits.new_empty(r, dtype=torch.float32), logits.new_empty(r, dtype=torch.float32)


@torch.library.custom_op("mmgpt::cross_entropy_bwd", mutates_args=())
def _ce_bwd(dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int, backend: str) -> Tensor:
    return kernels(backend, "cross_entropy").cross_entropy_bwd(dloss, logits, target, lse, ignore_index)


@_ce_bwd.register_fake
def _(dloss, logits, target, lse, ignore_index, backend):
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs, output):
    logits, target, ignore_index, backend = inputs
    ctx.ignore_index, ctx.backend = ignore_index, backend
    ctx.save_for_backward(logits, target, output[1])


def _ce_backward(ctx, dloss, _dlse):
    logits, target, lse = ctx.saved_tensors
    dlogits = torch.ops.mmgpt.cross_entropy_bwd(dloss.contiguous().float(), logits, target, lse,
                                                ctx.ignore_index, ctx.backend)
    return dlogits, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                  backend: Optional[str] = None) -> Tensor:
    """Cross-entropy of `logits` (..., V) against integer class indices `target` (...).

    reduction: "mean" (over rows whose target is not `ignore_index`; 0, not NaN, when all are
    ignored), "sum", or "none" (a float32 loss per row, shaped like target). The loss is
    float32 for low-precision logits (float64 for float64 on the torch backend).
    """
    check_tensor("logits", logits, min_ndim=1)
    check_tensor("target", target, dtypes=INDEX_DTYPES)
    check_same_device("target", target, "logits", logits)
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(logits.shape[:-1])} (logits' shape without the "
                         f"vocab dim), got {tuple(target.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits: expected a non-empty vocab (last) dim, got shape {tuple(logits.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)
    chosen = resolve_backend(backend, logits.device)
    if chosen == "torch":
        out = reference.cross_entropy(logits, target, ignore_index, reduction)
        return out if logits.dtype == torch.float64 else out.float()
    check_kernel_dtype("logits", logits, chosen)
    v = logits.shape[-1]
    l2 = logits.reshape(-1, v).contiguous()
    t2 = target.reshape(-1).to(torch.int64).contiguous()
    loss, _ = torch.ops.mmgpt.cross_entropy_fwd(l2, t2, ignore_index, chosen)
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (t2 != ignore_index).sum().clamp_min(1).to(loss.dtype)
