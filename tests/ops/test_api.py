"""The public API around the kernels: backend dispatch, input errors, the custom ops' registration
(opcheck, torch.compile) and the float64 reference against torch.nn.functional."""
import pytest
import torch
import torch.nn.functional as F

from mmgpt_engine import ops
from mmgpt_engine.ops import reference
from mmgpt_engine.ops._dispatch import resolve_backend
from tests.helpers import DEVICE, HAS_CUDA

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------- dispatch order
@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch (no CUDA device)")
def test_dispatch_order_explicit_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("MMGPT_BACKEND", raising=False)
    assert resolve_backend(None, CPU) == "torch"  # the CPU default
    monkeypatch.setenv("MMGPT_BACKEND", "triton")
    assert resolve_backend(None, CPU) == "triton"
    assert resolve_backend("torch", CPU) == "torch"  # explicit beats the environment
    # observable in an op: the environment sends float64 to the Triton kernel, which refuses it
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^x: .*float64"):
        ops.softmax(x)
    torch.testing.assert_close(ops.softmax(x, backend="torch"), torch.softmax(x, -1))


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch (no CUDA device)")
def test_available_backends_on_cpu_follow_triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.available_backends("cpu") == ["torch", "triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.available_backends("cpu") == ["torch"]
    assert "TRITON_INTERPRET=1" in ops.unavailable_reason("triton", "cpu")
    assert "CUDA tensors" in ops.unavailable_reason("cuda", "cpu")
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"^backend: backend 'triton' is not available for cpu tensors: .*TRITON_INTERPRET"):
        ops.rms_norm(x, None, backend="triton")
    with pytest.raises(ValueError, match=r"^backend: backend 'cuda' is not available for cpu tensors"):
        ops.rms_norm(x, None, backend="cuda")


def test_bad_backend_names_are_refused(monkeypatch):
    x = torch.randn(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"^backend: expected one of \['torch', 'triton', 'cuda'\], got 'fastest'"):
        ops.softmax(x, backend="fastest")
    with pytest.raises(TypeError, match=r"^backend: expected a str"):
        ops.softmax(x, backend=3)
    monkeypatch.setenv("MMGPT_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"^MMGPT_BACKEND \(environment\): expected one of .* got 'fastest'"):
        ops.softmax(x)


# ------------------------------------------------------------------------------------- bad inputs
def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _t(*shape):
    return torch.zeros(*shape, dtype=torch.long, device=DEVICE)


BAD_INPUTS = [  # (id, call(backend), exception, the argument the message must start with)
    ("layer_norm x not a tensor", lambda b: ops.layer_norm([1.0, 2.0], None, backend=b), TypeError, "x"),
    ("layer_norm int x", lambda b: ops.layer_norm(_t(2, 4), None, backend=b), TypeError, "x"),
    ("layer_norm weight shape", lambda b: ops.layer_norm(_x(2, 8), _x(4), backend=b), ValueError, "weight"),
    ("layer_norm bias shape", lambda b: ops.layer_norm(_x(2, 8), _x(8), _x(7), backend=b), ValueError, "bias"),
    ("layer_norm residual shape", lambda b: ops.layer_norm(_x(2, 8), _x(8), residual=_x(3, 8), backend=b),
     ValueError, "residual"),
    ("rms_norm negative eps", lambda b: ops.rms_norm(_x(2, 8), _x(8), eps=-1.0, backend=b), ValueError, "eps"),
    ("softmax scale not a number", lambda b: ops.softmax(_x(2, 8), scale="2", backend=b), TypeError, "scale"),
    ("softmax mask shape", lambda b: ops.softmax(_x(2, 8), mask=torch.ones(3, 8, dtype=torch.bool, device=DEVICE),
                                                 backend=b), ValueError, "mask"),
    ("softmax causal on 1-d", lambda b: ops.softmax(_x(8), causal=True, backend=b), ValueError, "causal"),
    ("cross_entropy float target", lambda b: ops.cross_entropy(_x(4, 10), _x(4), backend=b), TypeError, "target"),
    ("cross_entropy target shape", lambda b: ops.cross_entropy(_x(4, 10), _t(5), backend=b), ValueError, "target"),
    ("cross_entropy reduction", lambda b: ops.cross_entropy(_x(4, 10), _t(4), reduction="avg", backend=b),
     ValueError, "reduction"),
    ("cross_entropy ignore_index", lambda b: ops.cross_entropy(_x(4, 10), _t(4), ignore_index=1.5, backend=b),
     TypeError, "ignore_index"),
    ("cross_entropy empty vocab", lambda b: ops.cross_entropy(_x(4, 0), _t(4), backend=b), ValueError, "logits"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_name_the_argument(case, backend):
    _, call, exc, name = case
    with pytest.raises(exc, match=rf"^{name}: .*(expected|got|must)"):
        call(backend)


@pytest.mark.parametrize("call", [
    lambda b: ops.layer_norm(_x(2, 8, dtype=torch.float64), None, backend=b),
    lambda b: ops.softmax(_x(2, 8, dtype=torch.float64), backend=b),
    lambda b: ops.cross_entropy(_x(2, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.long, device=DEVICE),
                                backend=b),
], ids=["layer_norm", "softmax", "cross_entropy"])
def test_float64_on_a_kernel_backend_says_to_use_torch(call):
    with pytest.raises(TypeError, match=r"^(x|logits): .*float64"):
        call("triton")
    out = call("torch")  # the reference takes float64
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


# ------------------------------------------------------------------- custom op registration checks
def _opcheck_cases():
    x, r, w, b = _x(6, 32), _x(6, 32), _x(32), _x(32)
    logits = _x(5, 40)
    target = torch.randint(0, 40, (5,), device=DEVICE)
    target[1] = -100
    y, h, mean, rstd = torch.ops.mmgpt.norm_fwd(x, w, b, r, 1e-5, False, "triton")
    sy = torch.ops.mmgpt.softmax_fwd(x, 0.5, None, None, 0, 0, "triton")
    loss, lse = torch.ops.mmgpt.cross_entropy_fwd(logits, target, -100, "triton")
    return [
        (torch.ops.mmgpt.norm_fwd.default, (x, w, b, r, 1e-5, False, "triton")),
        (torch.ops.mmgpt.norm_fwd.default, (x, w, None, None, 1e-6, True, "triton")),
        (torch.ops.mmgpt.norm_bwd.default, (_x(6, 32), _x(6, 32), h, w, b, mean, rstd, False, "triton")),
        (torch.ops.mmgpt.softmax_fwd.default, (x, 0.5, None, None, 0, 6, "triton")),
        (torch.ops.mmgpt.softmax_bwd.default, (_x(6, 32), sy, 0.5, "triton")),
        (torch.ops.mmgpt.cross_entropy_fwd.default, (logits, target, -100, "triton")),
        (torch.ops.mmgpt.cross_entropy_bwd.default, (torch.rand(5, device=DEVICE), logits, target, lse, -100, "triton")),
    ]


def test_custom_ops_pass_opcheck():
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args)


def test_ops_compile_fullgraph_and_match_eager():
    w, b = _x(32), _x(32)
    target = torch.randint(0, 32, (2, 6), device=DEVICE)

    def f(x, r):
        y, h = ops.layer_norm(x, w, b, residual=r, backend="triton")
        z = ops.rms_norm(y, w, backend="triton")
        p = ops.softmax(z, scale=0.5, causal=False, backend="triton")
        return ops.cross_entropy(z + p, target, backend="triton") + h.square().mean()

    x0, r0 = _x(2, 6, 32), _x(2, 6, 32)
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        loss = fn(x, r)
        loss.backward()
        results.append((loss.detach(), x.grad, r.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


# --------------------------------------------------------- reference vs torch.nn.functional (fp64)
def test_reference_matches_torch_functional_in_float64():
    x, r = _x(4, 7, 48, dtype=torch.float64), _x(4, 7, 48, dtype=torch.float64)
    w, b = _x(48, dtype=torch.float64), _x(48, dtype=torch.float64)
    y, h = reference.layer_norm(x, w, b, 1e-5, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (48,), w, b, 1e-5))
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-6), F.rms_norm(x, (48,), w, 1e-6))
    mask = torch.rand(7, 48, device=DEVICE) > 0.3
    mask[:, 0] = True
    want = torch.softmax((x * 0.7).masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(reference.softmax(x, 0.7, mask, False), want)
    logits = _x(9, 30, dtype=torch.float64)
    target = torch.randint(0, 30, (9,), device=DEVICE)
    target[2] = -100
    for red in ("mean", "sum", "none"):
        got = reference.cross_entropy(logits, target, -100, red)
        torch.testing.assert_close(got, F.cross_entropy(logits, target, ignore_index=-100, reduction=red))
    q = _x(2, 16, 4, 32, dtype=torch.float64)
    k, v = _x(2, 16, 2, 32, dtype=torch.float64), _x(2, 16, 2, 32, dtype=torch.float64)
    for causal in (False, True):
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(reference.flash_attention(q, k, v, causal=causal), want)
    # S_q < S_k (decoding against a cache): causal aligned bottom-right, query i at key position i + 12
    q_tail = q[:, -4:]
    keep = torch.ones(4, 16, dtype=torch.bool, device=DEVICE).tril(diagonal=12)
    want = F.scaled_dot_product_attention(q_tail.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=keep, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(reference.flash_attention(q_tail, k, v, causal=True), want)
    # prefix-LM: the first 5 positions see each other both ways, the rest is causal
    keep = torch.ones(16, 16, dtype=torch.bool, device=DEVICE).tril()
    keep[:5, :5] = True
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=keep, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(reference.flash_attention(q, k, v, prefix_len=5), want)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ops.available_backends(DEVICE) if b != "torch"])
def test_softmax_empty_input_backprops_and_the_mask_is_a_constant(backend):
    x = torch.randn(0, 4, device=DEVICE, requires_grad=True)
    ops.softmax(x, backend=backend).sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 4)
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    mask = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    (ops.softmax(x, mask=mask, backend=backend) * torch.randn(3, 4, device=DEVICE)).sum().backward()
    assert x.grad.abs().sum() > 0 and mask.grad is None
