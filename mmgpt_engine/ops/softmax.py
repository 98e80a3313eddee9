"""Softmax over the last dim with scale, causal and an optional broadcast mask: the public function,
its checks, and the `mmgpt::softmax_fwd` / `mmgpt::softmax_bwd` custom ops.

Kernel contract (ops.triton.softmax and ops.cuda implement both):
  softmax_fwd(x, scale, mask, mask_row_offsets, mask_col_stride, causal_rows) -> y
      x: (R, N) contiguous. mask: None, or a tensor (bool: True = keep, or additive float) read at
      mask.data_ptr() + mask_row_offsets[r] + c * mask_col_stride (elements; offsets int64 (R,)),
      which covers any broadcast pattern without materialising it. causal_rows M > 0: row r is
      row i = r % M of an (M, N) matrix and column c is masked when c > i + N - M.
      A row with nothing visible gives 0.
  softmax_bwd(dy, y, scale) -> dx = scale * y * (dy - sum(dy * y))
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import eager
from ._checks import FLOAT_DTYPES, check_kernel_dtype, check_same_device, check_tensor
from ._dispatch import kernels, resolve_backend


@torch.library.custom_op("mmgpt::softmax_fwd", mutates_args=())
def _softmax_fwd(x: Tensor, scale: float, mask: Optional[Tensor], mask_row_offsets: Optional[Tensor],
                 mask_col_stride: int, causal_rows: int, backend: str) -> Tensor:
    return kernels(backend, "softmax").softmax_fwd(x, scale, mask, mask_row_offsets, mask_col_stride, causal_rows)


@_softmax_fwd.register_fake
def _(x, scale, mask, mask_row_offsets, mask_col_stride, causal_rows, backend):
    return torch.empty_like(x)


@torch.library.custom_op("mmgpt::softmax_bwd", mutates_args=())
def _softmax_bwd(dy: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    return kernels(backend, "softmax").softmax_bwd(dy, y, scale)


@_softmax_bwd.register_fake
def _(dy, y, scale, backend):
    return torch.empty_like(y)


def _softmax_setup_context(ctx, inputs, output):
    ctx.scale, ctx.backend = inputs[1], inputs[6]
    ctx.save_for_backward(output)


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return torch.ops.mmgpt.softmax_bwd(dy.contiguous(), y, ctx.scale, ctx.backend), None, None, None, None, None, None


_softmax_fwd.register_autograd(_softmax_backward, setup_context=_softmax_setup_context)


def mask_row_offsets(mask: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor, int]:
    """For `mask` broadcast to `shape`: (the broadcast view, the element offset of each row, the
    column stride). Rows are the flattened leading dims of `shape`."""
    view = mask.expand(shape)
    lead = shape[:-1]
    offsets = torch.zeros(lead, dtype=torch.int64, device=mask.device)
    for d, size in enumerate(lead):
        if view.stride(d) and size > 1:
            idx_shape = [1] * len(lead)
            idx_shape[d] = size
            offsets = offsets + torch.arange(size, device=mask.device).view(idx_shape) * view.stride(d)
    return view, offsets.reshape(-1), view.stride(-1) if shape[-1] > 1 else 0


def softmax(x: Tensor, *, scale: float = 1.0, mask: Optional[Tensor] = None, causal: bool = False,
            backend: Optional[str] = None) -> Tensor:
    """softmax(scale * x + mask) over the last dim of `x`.

    mask: broadcastable to x; bool (True = keep, as torch SDPA) or an additive float mask (no
    gradient flows to it). causal: over the last two dims (M, N) of x, column j of row i is masked
    when j > i + N - M (bottom-right aligned). Rows with nothing visible come out as zeros.
    """
    check_tensor("x", x, min_ndim=1)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if causal and x.dim() < 2:
        raise ValueError(f"causal: needs x with at least 2 dims (rows, columns), got shape {tuple(x.shape)}")
    if mask is not None:
        check_tensor("mask", mask, dtypes=FLOAT_DTYPES + (torch.bool,))
        check_same_device("mask", mask, "x", x)
        try:
            broadcastable = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
        except RuntimeError:
            broadcastable = False
        if not broadcastable:
            raise ValueError(f"mask: expected a shape broadcastable to x's {tuple(x.shape)}, "
                             f"got {tuple(mask.shape)}") from None
    chosen = resolve_backend(backend, x.device)
    if chosen == "torch":
        # as on the kernel backends, the mask is a constant (no gradient to it)
        return eager.softmax(x, scale, mask.detach() if mask is not None else None, causal)
    check_kernel_dtype("x", x, chosen)
    if x.numel() == 0:
        return x * 1.0  # empty, but part of the graph, so backward works as on the torch backend
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    m_view = offsets = None
    col_stride = 0
    if mask is not None:
        m_view, offsets, col_stride = mask_row_offsets(mask.detach(), x.shape)
    causal_rows = x.shape[-2] if causal else 0
    y = torch.ops.mmgpt.softmax_fwd(x2, float(scale), m_view, offsets, col_stride, causal_rows, chosen)
    return y.view(x.shape)
