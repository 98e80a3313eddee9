"""Comparison against the float64 reference, the way flash-attn's tests do it: a kernel's error
against the float64 truth must stay within a small multiple of the error that plain PyTorch makes
in the same low precision (plus a small floor for float32, whose PyTorch error is ~0)."""
from __future__ import annotations

import torch

from mmgpt_engine.ops import available_backends

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

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


def count_dense_attention(monkeypatch) -> None:
    """The torch backend's attention as the reference's two dense matmuls (the fast path runs SDPA,
    which torch's FLOP counter counts its own way): what FLOP formulas are checked against."""
    from mmgpt_engine.ops import eager, reference

    monkeypatch.setattr(eager, "flash_attention", reference.flash_attention)


def kernel_backends():
    """The non-reference backends that run here (triton interpreted on CPU, cuda on a GPU)."""
    return [b for b in available_backends() if b != "torch"]


def unaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a tensor whose data starts one element past a 16-byte boundary (so kernels
    take their scalar-load paths)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def check_fwd_bwd(fn, ref, inputs, dtype, names=None, *, unaligned=False, n_grad_outputs=None, grad_outputs=None,
                  round_inputs=False):
    """fn vs ref, forward and backward, the one harness of the kernel tests: fn runs in `dtype`,
    ref in float64 (the truth) and in `dtype` (for the allowed error, see assert_close_to_truth).

    inputs: tensors (floating ones become leaves that take gradients, keeping their strides, so a
    view into a fused buffer stays one) or None; round_inputs: round them (and the output
    gradients) to `dtype` first, so the truth is computed on exactly what the kernel reads;
    unaligned: fn gets copies that start one element past a 16-byte boundary. Gradients flow back
    through the first n_grad_outputs outputs (default all), with `grad_outputs` (default random);
    an output's non-finite entries must sit where the truth's are. names: one per floating input,
    for the messages. Returns fn's outputs and its input gradients."""
    if round_inputs:
        inputs = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs]

    def leaf(t, dt, misalign):
        if misalign:
            return unaligned_copy(t.to(dt)).requires_grad_()
        x = torch.empty_strided(t.shape, t.stride(), dtype=dt, device=t.device)
        x.copy_(t)
        return x.requires_grad_()

    def run(f, dt, misalign):
        leaves = [leaf(t, dt, misalign) if t is not None and t.is_floating_point() else t for t in inputs]
        outs = f(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        with_grad = list(outs[:n_grad_outputs])
        torch.autograd.backward(with_grad, [g.to(o.dtype) for g, o in zip(grads, with_grad)])
        return outs, [x.grad for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]

    if grad_outputs is None:
        with torch.no_grad():
            probe = ref(*[t.double() if t is not None and t.is_floating_point() else t for t in inputs])
        probe = probe if isinstance(probe, tuple) else (probe,)
        grad_outputs = [torch.randn(o.shape, device=o.device) for o in probe[:n_grad_outputs]]
    grads = [g.to(dtype) if round_inputs else g for g in grad_outputs]
    got, got_g = run(fn, dtype, unaligned)
    truth, truth_g = run(ref, torch.float64, False)
    lowp, lowp_g = run(ref, dtype, False)
    for i, (a, b, c) in enumerate(zip(got, truth, lowp)):
        assert a.shape == b.shape, f"out[{i}]: shape {tuple(a.shape)} != {tuple(b.shape)}"
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"out[{i}]: non-finite pattern differs from the reference"
        assert_close_to_truth(f"out[{i}]", a[finite], b[finite], c[finite])
    for i, (a, b, c) in enumerate(zip(got_g, truth_g, lowp_g)):
        assert_close_to_truth(f"d{names[i]}" if names else f"grad[{i}]", a, b, c)
    return got, got_g
