"""Comparison against the float64 reference, the way flash-attn's tests do it: a kernel's error
against the float64 truth must stay within a small multiple of the error that plain PyTorch makes
in the same low precision (plus a small floor for float32, whose PyTorch error is ~0)."""
from __future__ import annotations

import torch

from mmgpt_engine.ops import available_backends

# Floors added to the allowed error, per dtype (an fp32 kernel may sum in another order than torch).
ATOL_FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_truth(name, got, truth, torch_lowp, *, factor=2.0, floor=None):
    """got: the kernel's result; truth: the float64 reference; torch_lowp: the reference run in the
    kernel's dtype. Fails with the three errors in the message."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    if floor is None:
        floor = ATOL_FLOOR.get(torch_lowp.dtype, ATOL_FLOOR[torch.float32])
    scale = max(1.0, truth.detach().abs().max().item()) if truth.numel() else 1.0
    err = max_err(got, truth)
    base = max_err(torch_lowp, truth)
    allowed = factor * base + floor * scale
    assert err <= allowed, f"{name}: kernel error {err:.3e} > allowed {allowed:.3e} (torch low-precision error {base:.3e})"
    assert torch.isfinite(got).all() or not torch.isfinite(truth).all(), f"{name}: non-finite values"


def kernel_backends():
    """The non-reference backends that run here (triton interpreted on CPU, cuda on a GPU)."""
    return [b for b in available_backends() if b != "torch"]
