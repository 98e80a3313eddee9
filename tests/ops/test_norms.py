"""LayerNorm / RMSNorm kernels vs the float64 reference, forward and backward; RMSNorm's options
(offset, casting mode, no weight, in_place) against the reference and transformers' own norms."""
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmgpt_engine import ops
from mmgpt_engine.ops import reference
from mmgpt_engine.ops._interpret import triton_interpreted
from tests.helpers import DEVICE, HAS_CUDA, assert_close_to_truth, check_fwd_bwd, kernel_backends

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


# --------------------------------------------------------------------------------- RMSNorm options
norms_module = importlib.import_module("mmgpt_engine.ops.norms")


def check_rms_options(shape, dtype, backend, *, residual, weight=True, offset=0.0, casting_mode="gemma",
                      in_place=False):
    inputs = _make(shape, residual=residual, weight=weight, bias=False)
    inputs.pop("bias")

    def kernel(x, weight, residual):
        return ops.rms_norm(x, weight, residual=residual, offset=offset, casting_mode=casting_mode,
                            in_place=in_place, backend=backend)

    def ref(x, weight, residual):
        return reference.rms_norm(x, weight, 1e-6, residual=residual, offset=offset, casting_mode=casting_mode)

    names = [f"rms {k}" for k, v in inputs.items() if v is not None]
    grads = [torch.randn(shape, device=DEVICE) for _ in range(2 if residual else 1)]
    got, _ = check_fwd_bwd(kernel, ref, list(inputs.values()), dtype, names, grad_outputs=grads, round_inputs=True)
    assert all(a.dtype == dtype for a in got)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("casting_mode", ["gemma", "llama"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_offset_and_casting_mode_match_float64(residual, offset, casting_mode, dtype, backend):
    check_rms_options((3, 257), dtype, backend, residual=residual, offset=offset, casting_mode=casting_mode)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("casting_mode", ["gemma", "llama"])
def test_rms_norm_without_weight(casting_mode, dtype, backend):
    check_rms_options((2, 3, 129), dtype, backend, residual=True, weight=False, casting_mode=casting_mode)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_in_place_matches_float64(dtype, backend):
    check_rms_options((5, 1000), dtype, backend, residual=False, in_place=True)
    check_rms_options((4, 77), dtype, backend, residual=True, offset=1.0, casting_mode="llama", in_place=True)


@pytest.mark.parametrize("backend", kernel_backends())
def test_llama_casting_with_a_float32_weight_promotes_like_transformers(backend):
    """bf16 activations, float32 weight: transformers' `weight * xhat.to(bf16)` is float32."""
    x = torch.randn(6, 129, device=DEVICE).bfloat16()
    w = 1 + 0.5 * torch.randn(129, device=DEVICE)
    got = ops.rms_norm(x, w, casting_mode="llama", backend=backend)
    assert got.dtype == torch.float32
    want = reference.rms_norm(x, w, casting_mode="llama")
    assert want.dtype == torch.float32
    # the only low-precision step is xhat's rounding to bf16, which the Triton interpreter does
    # toward zero (up to 1 ulp) where torch and a GPU round to nearest (1/2 ulp): twice the error
    factor = 2.5 if backend == "triton" and triton_interpreted() else 2.0
    assert_close_to_truth("rms llama mixed", got, reference.rms_norm(x.double(), w.double()), want, factor=factor)


def _hf_norm(cls_path, n, dtype, weight):
    module_name, cls_name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    norm = cls(n, eps=1e-6).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls_path,options", [
    ("transformers.models.llama.modeling_llama.LlamaRMSNorm", dict(casting_mode="llama")),
    ("transformers.models.gemma.modeling_gemma.GemmaRMSNorm", dict(offset=1.0, casting_mode="gemma")),
], ids=["llama", "gemma"])
def test_rms_norm_options_reproduce_transformers_norms(cls_path, options, dtype, backend):
    """The real modules: Llama's (llama casting) and Gemma's (1 + weight, float32 throughout),
    forward and both gradients, against the same module's float64 copy."""
    n = 96
    x0, w0, dy = torch.randn(4, 7, n, device=DEVICE), 0.3 * torch.randn(n, device=DEVICE), torch.randn(4, 7, n, device=DEVICE)
    x0, w0 = x0.to(dtype), w0.to(dtype)

    def run(fn, dt):
        x, w = x0.to(dt).detach().clone().requires_grad_(), w0.to(dt).detach().clone().requires_grad_()
        y = fn(x, w)
        y.backward(dy.to(y.dtype))
        return y, x.grad, w.grad

    def hf(dt):
        x = x0.to(dt).detach().clone().requires_grad_()
        norm = _hf_norm(cls_path, n, dt, w0.to(dt))
        y = norm(x)
        y.backward(dy.to(y.dtype))
        return y, x.grad, norm.weight.grad

    got = run(lambda x, w: ops.rms_norm(x, w, backend=backend, **options), dtype)
    truth, lowp = hf(torch.float64), hf(dtype)
    for name, a, b, c in zip(("y", "dx", "dweight"), got, truth, lowp):
        assert a.dtype == c.dtype, name
        assert_close_to_truth(f"{cls_path.rsplit('.', 1)[1]} {name}", a, b, c)


class _EmitGrad(torch.autograd.Function):
    """Identity whose backward hands on a gradient it made and records its address (not the
    tensor: holding it would make it shared), so a test can see where the norm's dx was written."""
    emitted = []

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        out = g.clone()
        _EmitGrad.emitted.append(out.data_ptr())
        return out


@pytest.mark.parametrize("backend", kernel_backends())
def test_in_place_writes_dx_into_the_incoming_gradient_when_nothing_else_holds_it(backend):
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    _EmitGrad.emitted.clear()
    y = _EmitGrad.apply(ops.rms_norm(x, w, in_place=True, backend=backend))
    y.backward(torch.randn_like(y))
    (emitted,) = _EmitGrad.emitted
    _EmitGrad.emitted.clear()
    assert x.grad.data_ptr() == emitted  # dx took dy's memory
    # and gives what the out-of-place run gives, with the same incoming gradient
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    g = torch.randn(6, 40, device=DEVICE)
    x.grad = w.grad = None
    _EmitGrad.apply(ops.rms_norm(x, w, in_place=True, backend=backend)).backward(g)
    _EmitGrad.apply(ops.rms_norm(x2, w2, backend=backend)).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


HAZARDS = {
    # y's gradient is also routed to x itself (AddBackward hands the same tensor to both)
    "added to its own input": lambda y, x, keep: (y + x).square().sum(),
    # y used twice: the engine sums the two gradients into a new tensor (exclusive, still right)
    "used twice": lambda y, x, keep: (y * 2 + y.square()).sum(),
    # a hook keeps the gradient that arrives at y
    "hook keeps it": lambda y, x, keep: (y.register_hook(lambda g: keep.append(g)), y.square().sum())[1],
    # y.retain_grad(): y.grad must stay dL/dy
    "retain_grad": lambda y, x, keep: (y.retain_grad(), keep.append(y), y.square().sum())[2],
}


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("hazard", list(HAZARDS))
def test_in_place_is_never_wrong_where_the_gradient_is_shared(hazard, backend):
    """Where something else holds the gradient that reaches y, dx gets its own memory: every
    gradient (x's, w's, and what the hazard keeps) equals the out-of-place run's."""
    x0, w0 = torch.randn(5, 33, device=DEVICE), torch.randn(33, device=DEVICE)

    def run(in_place):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        keep = []
        loss = HAZARDS[hazard](ops.rms_norm(x, w, in_place=in_place, backend=backend), x, keep)
        loss.backward()
        kept = [k.grad if k.requires_grad else k for k in keep]  # retain_grad keeps y; a hook its gradient
        return [x.grad, w.grad] + [k.clone() for k in kept]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", kernel_backends())
def test_in_place_with_autograd_grad_keeps_the_requested_output_gradient(backend):
    x = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    y = ops.rms_norm(x, None, in_place=True, backend=backend)
    z = y * 3
    dz = torch.randn_like(z)
    dy, dx = torch.autograd.grad(z, [y, x], dz)
    torch.testing.assert_close(dy, 3 * dz)
    x2 = x.detach().clone().requires_grad_()
    (dx2,) = torch.autograd.grad(ops.rms_norm(x2, None, backend=backend) * 3, [x2], dz)
    torch.testing.assert_close(dx, dx2, rtol=0, atol=0)


@pytest.mark.skipif(HAS_CUDA, reason="CPU routing check")
def test_the_cuda_backend_sends_rms_options_to_triton():
    cpu = torch.device("cpu")
    assert norms_module._kernel_backend("cuda", cpu, []) == "cuda"
    assert norms_module._kernel_backend("cuda", cpu, ["offset", "in_place"]) == "triton"


BAD_RMS_OPTIONS = [
    (dict(offset="1"), TypeError, r"offset: expected a float, got str"),
    (dict(offset=float("inf")), ValueError, r"offset: expected a finite number, got inf"),
    (dict(offset=1.0, weight=None), ValueError, r"offset: expected 0.0 without a weight .* got 1.0"),
    (dict(casting_mode="none"), ValueError, r"casting_mode: expected one of \['gemma', 'llama'\], got 'none'"),
    (dict(in_place=1), TypeError, r"in_place: expected a bool, got int"),
]


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("case", BAD_RMS_OPTIONS, ids=[c[2].split(":")[0] + str(i) for i, c in enumerate(BAD_RMS_OPTIONS)])
def test_bad_rms_options_name_the_argument(case, backend):
    kwargs, exc, message = dict(case[0]), case[1], case[2]
    weight = kwargs.pop("weight", torch.ones(16, device=DEVICE))
    with pytest.raises(exc, match="^" + message):
        ops.rms_norm(torch.randn(3, 16, device=DEVICE), weight, backend=backend, **kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors")
def test_rms_options_compile_fullgraph_and_match_eager():
    w = torch.randn(32)

    def f(x, r):
        y, h = ops.rms_norm(x, w, residual=r, offset=1.0, casting_mode="llama", in_place=True, backend="triton")
        return (y * h).sum()

    x0, r0 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        loss = fn(x, r)
        loss.backward()
        results.append((loss.detach(), x.grad, r.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
