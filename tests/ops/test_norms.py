"""LayerNorm / RMSNorm kernels vs the float64 reference, forward and backward."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmgpt_engine import ops
from mmgpt_engine.ops import reference
from tests.helpers import DEVICE, assert_close_to_truth, check_fwd_bwd, kernel_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# leading dims of rank 1-3 and odd column counts, 4096+1 included
SHAPES = [(1,), (77,), (3, 257), (2, 3, 769), (5, 1000), (2, 4097)]


def _make(shape, *, residual, weight, bias, device=DEVICE):
    n = shape[-1]
    return {
        "x": torch.randn(*shape, device=device),
        "weight": 1 + 0.5 * torch.randn(n, device=device) if weight else None,
        "bias": torch.randn(n, device=device) if bias else None,
        "residual": torch.randn(*shape, device=device) if residual else None,
    }


def check_norm(kind, shape, dtype, backend, *, residual, weight=True, bias=True):
    inputs = _make(shape, residual=residual, weight=weight, bias=bias and kind == "layer")
    if kind == "layer":
        kernel = lambda x, weight, bias, residual: ops.layer_norm(x, weight, bias, residual=residual, backend=backend)  # noqa: E731
        ref = lambda x, weight, bias, residual: reference.layer_norm(x, weight, bias, 1e-5, residual=residual)  # noqa: E731
    else:
        inputs.pop("bias")
        kernel = lambda x, weight, residual: ops.rms_norm(x, weight, residual=residual, backend=backend)  # noqa: E731
        ref = lambda x, weight, residual: reference.rms_norm(x, weight, 1e-6, residual=residual)  # noqa: E731
    names = [f"{kind} {k}" for k, v in inputs.items() if v is not None]
    outs = 2 if residual else 1
    grads = [torch.randn(shape, device=DEVICE) for _ in range(outs)]
    got, _ = check_fwd_bwd(kernel, ref, list(inputs.values()), dtype, names, grad_outputs=grads, round_inputs=True)
    assert all(a.dtype == dtype for a in got)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_matches_float64_reference(kind, shape, dtype, backend):
    check_norm(kind, shape, dtype, backend, residual=False)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(77,), (2, 3, 257), (3, 4097)], ids=str)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_fused_residual(kind, shape, dtype, backend):
    check_norm(kind, shape, dtype, backend, residual=True)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_layer_norm_without_affine_params(weight, bias, backend):
    check_norm("layer", (4, 33), torch.float32, backend, residual=True, weight=weight, bias=bias)


@pytest.mark.parametrize("backend", kernel_backends())
def test_norm_mixed_precision_weight(backend):
    """bf16 activations with a float32 weight (as under autocast-free mixed precision)."""
    x = torch.randn(6, 129, device=DEVICE).bfloat16()
    w = torch.randn(129, device=DEVICE)
    got = ops.rms_norm(x, w, backend=backend)
    assert got.dtype == torch.bfloat16
    assert_close_to_truth("rms mixed", got, reference.rms_norm(x.double(), w.double()), reference.rms_norm(x, w))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_strided_and_expanded_params(kind, backend):
    """weight/bias that are views (every other element, or one value expanded) are read as such."""
    n = 48
    x = torch.randn(5, n, device=DEVICE)
    base_w = (1 + 0.5 * torch.randn(2 * n, device=DEVICE)).requires_grad_()
    base_b = torch.randn(1, device=DEVICE).requires_grad_()
    dy = torch.randn(5, n, device=DEVICE)

    def run(fn, dt):
        w, b = base_w.detach().to(dt).requires_grad_(), base_b.detach().to(dt).requires_grad_()
        xs = x.to(dt)
        y = fn(xs, w[::2], b.expand(n)) if kind == "layer" else fn(xs, w[::2], None)
        y.backward(dy.to(dt))
        return y, w.grad, (b.grad if kind == "layer" else None)

    if kind == "layer":
        kernel = lambda x, w, b: ops.layer_norm(x, w, b, backend=backend)  # noqa: E731
        ref = lambda x, w, b: reference.layer_norm(x, w, b, 1e-5)  # noqa: E731
    else:
        kernel = lambda x, w, b: ops.rms_norm(x, w, backend=backend)  # noqa: E731
        ref = lambda x, w, b: reference.rms_norm(x, w, 1e-6)  # noqa: E731
    got, truth, lowp = run(kernel, torch.float32), run(ref, torch.float64), run(ref, torch.float32)
    for name, a, b, c in zip(("y", "dweight", "dbias"), got, truth, lowp):
        if a is not None:
            assert_close_to_truth(f"{kind} {name}", a, b, c)
    assert got[1][1::2].abs().max() == 0  # the skipped elements get no gradient


@pytest.mark.parametrize("backend", kernel_backends())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 6), cols=st.integers(1, 300), kind=st.sampled_from(["layer", "rms"]),
       residual=st.booleans(), lead=st.integers(0, 2))
def test_norm_random_shapes(backend, rows, cols, kind, residual, lead):
    shape = (2,) * lead + (rows, cols)
    check_norm(kind, shape, torch.float32, backend, residual=residual)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("n", [1024, 4096, 8192, 16384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_norm_large_hidden_gpu(n, dtype, backend):
    check_norm("layer", (64, n), dtype, backend, residual=True)
    check_norm("rms", (64, n), dtype, backend, residual=True)
