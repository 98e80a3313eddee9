"""ops.linear_cross_entropy against F.cross_entropy(hidden @ weight.T + bias) in float64, forward and
the gradients of hidden, weight and bias; that no logits-sized tensor is ever allocated; the
gradients asked for only; and its input errors."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmgpt_engine import ops
from mmgpt_engine.ops import reference
from mmgpt_engine.ops.linear_cross_entropy import default_chunk_size
from tests.helpers import DEVICE, HAS_CUDA, check_fwd_bwd, kernel_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch"] + kernel_backends()


def _targets(shape, v, ignore_frac=0.25):
    t = torch.randint(0, v, shape, device=DEVICE)
    return torch.where(torch.rand(shape, device=DEVICE) < ignore_frac, torch.full_like(t, -100), t)


def check_lce(lead, h_dim, v, dtype, backend, *, reduction="mean", bias=True, label_smoothing=0.0, chunk_size=None,
              target=None):
    target = _targets(lead, v) if target is None else target

    def kernel(hidden, weight, b):
        return ops.linear_cross_entropy(hidden, weight, target, bias=b, reduction=reduction,
                                        label_smoothing=label_smoothing, chunk_size=chunk_size, backend=backend)

    def ref(hidden, weight, b):
        logits = F.linear(hidden, weight, b)  # an LM head's matmul (one rounding with the bias, as addmm)
        if hidden.dtype == torch.float64:  # the truth: PyTorch's own cross-entropy in float64
            return F.cross_entropy(logits.reshape(-1, v), target.reshape(-1), reduction=reduction,
                                   label_smoothing=label_smoothing).reshape(target.shape if reduction == "none" else ())
        # what a user runs instead in low precision: the logits in `dtype`, a float32 cross-entropy
        return reference.cross_entropy(logits, target, -100, reduction, label_smoothing=label_smoothing).float()

    inputs = [torch.randn(*lead, h_dim, device=DEVICE), torch.randn(v, h_dim, device=DEVICE) / h_dim ** 0.5,
              torch.randn(v, device=DEVICE) if bias else None]
    names = ["hidden", "weight", "bias"][:3 if bias else 2]
    (got,), grads = check_fwd_bwd(kernel, ref, inputs, dtype, names, round_inputs=True)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype for g in grads)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_cross_entropy_of_the_logits(reduction, dtype, backend):
    """Several chunks (the last one short), bias; once a vocab past a kernel block (4096)."""
    v = 4099 if dtype == torch.float32 and reduction == "mean" else 301
    check_lce((3, 14), 24, v, dtype, backend, reduction=reduction, chunk_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_label_smoothing_and_no_bias(dtype, backend):
    check_lce((37,), 16, 257, dtype, backend, reduction="sum", bias=False, label_smoothing=0.1, chunk_size=5)
    check_lce((2, 9), 32, 77, dtype, backend, reduction="none", label_smoothing=0.25, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_on_the_torch_backend_is_exact(backend):
    if backend != "torch":
        pytest.skip("float64 runs on the torch backend only")
    h = torch.randn(20, 12, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 12, device=DEVICE, dtype=torch.float64, requires_grad=True)
    t = _targets((20,), 50)
    loss = ops.linear_cross_entropy(h, w, t, chunk_size=3, backend="torch")
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = F.cross_entropy(h2 @ w2.t(), t)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_chunk_size_gives_the_same_result(backend):
    h, w = torch.randn(11, 8, device=DEVICE), torch.randn(40, 8, device=DEVICE)
    t = _targets((11,), 40)
    results = []
    for chunk in (1, 3, 11, 100, None):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = ops.linear_cross_entropy(hh, ww, t, chunk_size=chunk, backend=backend)
        loss.backward()
        results.append((loss.detach(), hh.grad, ww.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunks", [1, 4, 16])
def test_dweight_in_bfloat16_adds_one_rounding_per_chunk(chunks, backend):
    """d weight is summed chunk by chunk in weight's dtype (a float32 accumulator would cost more
    than the chunks of logits saved): its error is the logits path's plus at most half a bf16 ulp
    of |d weight| per chunk (measured: about 3x the logits path's at 4 chunks, 4.5x at 16, 7.7x at
    64, with sum over 1024 tokens); d hidden, one matmul per chunk, stays at the logits path's."""
    n, h_dim, v = 128, 32, 300
    h = torch.randn(n, h_dim, device=DEVICE).bfloat16()
    w = (torch.randn(v, h_dim, device=DEVICE) / h_dim ** 0.5).bfloat16()
    t = _targets((n,), v, ignore_frac=0.0)

    def grads(fn, dt):
        hh, ww = h.to(dt).detach().clone().requires_grad_(), w.to(dt).detach().clone().requires_grad_()
        fn(hh, ww).backward()
        return hh.grad.double(), ww.grad.double()

    truth = grads(lambda a, b: F.cross_entropy(a @ b.t(), t, reduction="sum"), torch.float64)
    stock = grads(lambda a, b: reference.cross_entropy(F.linear(a, b), t, -100, "sum"), torch.bfloat16)
    got = grads(lambda a, b: ops.linear_cross_entropy(a, b, t, reduction="sum", chunk_size=n // chunks,
                                                      backend=backend), torch.bfloat16)
    err = [(g - x).abs().max().item() for g, x in zip(got, truth)]
    base = [(s - x).abs().max().item() for s, x in zip(stock, truth)]
    magnitude = truth[1].abs().max().item()
    half_ulp = torch.finfo(torch.bfloat16).eps / 2 * 2 ** torch.tensor(magnitude).log2().floor().item()
    assert err[0] <= 2 * base[0] + 1e-6, f"d hidden: {err[0]:.3e} vs the logits path's {base[0]:.3e}"
    allowed = 2 * base[1] + chunks * half_ulp
    assert err[1] <= allowed, f"d weight: {err[1]:.3e} > {allowed:.3e} (logits path {base[1]:.3e}, {chunks} chunks)"


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns (numel)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_as_large_as_the_logits_is_ever_allocated(reduction, backend):
    """Forward and backward: nothing bigger than one chunk of logits, the weight or the hidden states."""
    n, h_dim, v, chunk = 64, 8, 500, 8
    hidden = torch.randn(n, h_dim, device=DEVICE, requires_grad=True)
    weight = torch.randn(v, h_dim, device=DEVICE, requires_grad=True)
    bias = torch.randn(v, device=DEVICE, requires_grad=True)
    target = _targets((n,), v)
    with _LargestAllocation() as probe:
        loss = ops.linear_cross_entropy(hidden, weight, target, bias=bias, reduction=reduction, chunk_size=chunk,
                                        backend=backend)
        loss.backward(torch.ones_like(loss))
    assert probe.largest == max(chunk * v, v * h_dim, n * h_dim), probe.largest
    with _LargestAllocation() as stock:
        F.cross_entropy(hidden @ weight.t() + bias, target).backward()
    assert stock.largest == n * v  # the probe sees what the logits path allocates


def test_default_chunk_size_makes_a_chunk_of_logits_about_the_hidden_states():
    assert default_chunk_size(8192, 4096, 128256) == 512   # Llama 3: 8192 * 4096 / 128256 = 261.6 -> 512
    assert default_chunk_size(65536, 4096, 32000) == 16384  # a chunk of logits the size of the hidden states
    assert default_chunk_size(8192, 896, 151936) == 256    # Qwen2-0.5B: 48 rows would be a thin matmul
    assert default_chunk_size(10, 4096, 32000) == 10       # never more than the tokens
    assert default_chunk_size(1, 8, 1000) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gradients_asked_for_are_computed(backend):
    """A frozen LM head (LLaVA stage 1 trains the connector only) gets no gradient, and the
    hidden states still get the right one; under no_grad only the loss is computed."""
    h, w = torch.randn(9, 16, device=DEVICE), torch.randn(30, 16, device=DEVICE)
    t = _targets((9,), 30)
    hh = h.clone().requires_grad_()
    ops.linear_cross_entropy(hh, w, t, chunk_size=4, backend=backend).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ops.linear_cross_entropy(h2, w2, t, chunk_size=4, backend=backend).backward()
    torch.testing.assert_close(hh.grad, h2.grad)
    with torch.no_grad():
        loss = ops.linear_cross_entropy(h2, w2, t, backend=backend)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored_gives_zero_loss_and_zero_gradients(backend):
    h = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    loss = ops.linear_cross_entropy(h, w, torch.full((5,), -100, device=DEVICE), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_backward_through_the_graph_is_refused_for_mean(backend):
    """mean/sum hand over gradients computed in the forward: retain_graph cannot run twice (a
    clear error, not gradients scaled twice); none recomputes, so it can."""
    h = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    t = _targets((6,), 20)
    loss = ops.linear_cross_entropy(h, w, t, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"^linear_cross_entropy: .*\(retain_graph=True\) cannot run"):
        loss.backward()
    rows = ops.linear_cross_entropy(h, w, t, reduction="none", backend=backend)
    h.grad = None
    rows.sum().backward(retain_graph=True)
    first = h.grad.clone()
    rows.sum().backward()
    torch.testing.assert_close(h.grad, 2 * first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_is_refused(backend):
    if HAS_CUDA:
        pytest.skip("on a GPU the check is a device-side assert (tested for cross_entropy)")
    with pytest.raises(ValueError, match=r"^target: expected class indices in \[0, 20\) .* got 20"):
        ops.linear_cross_entropy(torch.randn(3, 8), torch.randn(20, 8), torch.tensor([1, 20, 2]), backend=backend)


def _h(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


BAD_INPUTS = [
    (lambda b: ops.linear_cross_entropy(_h(3, 8).long(), _h(20, 8), _t(3), backend=b), TypeError, r"hidden: expected dtype"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 7), _t(3), backend=b), ValueError,
     r"weight: expected shape \(vocab, 8\) \(hidden's last dim\), got \(20, 7\)"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8, 1), _t(3), backend=b), ValueError, r"weight: expected a 2-d"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8).half(), _t(3), backend=b), TypeError,
     r"weight: expected dtype float32 \(the dtype of hidden\), got float16"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(0, 8), _t(3), backend=b), ValueError, r"weight: expected a non-empty"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8), _t(4), backend=b), ValueError,
     r"target: expected shape \(3,\) .* got \(4,\)"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8), _h(3), backend=b), TypeError, r"target: expected dtype"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8), _t(3), bias=_h(19), backend=b), ValueError,
     r"bias: expected shape \(20,\) .* got \(19,\)"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8), _t(3), chunk_size=0, backend=b), ValueError,
     r"chunk_size: expected a positive number of tokens, got 0"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8), _t(3), chunk_size=2.0, backend=b), TypeError,
     r"chunk_size: expected an int or None, got float"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8), _t(3), reduction="avg", backend=b), ValueError,
     r"reduction: expected one of"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8), _t(3), label_smoothing=2.0, backend=b), ValueError,
     r"label_smoothing: expected"),
    (lambda b: ops.linear_cross_entropy(_h(3, 8), _h(20, 8), _t(3), ignore_index=None, backend=b), TypeError,
     r"ignore_index: expected an int"),
]


def _t(*shape):
    return torch.zeros(*shape, dtype=torch.long, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[2].split(":")[0] + str(i) for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_name_the_argument(case, backend):
    call, exc, message = case
    with pytest.raises(exc, match="^" + message):
        call(backend)


def test_float64_on_a_kernel_backend_says_to_use_torch():
    if not kernel_backends():
        pytest.skip("no kernel backend here")
    with pytest.raises(TypeError, match=r"^hidden: .*float64"):
        ops.linear_cross_entropy(_h(3, 8, dtype=torch.float64), _h(20, 8, dtype=torch.float64), _t(3),
                                 backend=kernel_backends()[0])


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_fullgraph_and_matches_eager(reduction):
    t = _targets((2, 5), 30)

    def f(h, w):
        out = ops.linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=4, backend="triton")
        return out if reduction == "mean" else out.square().sum()

    h0, w0 = torch.randn(2, 5, 16), torch.randn(30, 16)
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
