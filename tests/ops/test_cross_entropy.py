"""Cross-entropy kernels vs the float64 reference: reductions, ignore_index, large vocabularies,
the options (class weights, label smoothing, z-loss, softcap) and the refusal of bad targets."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmgpt_engine import ops
from mmgpt_engine.ops import reference
from tests.helpers import DEVICE, HAS_CUDA, check_fwd_bwd, kernel_backends

ce_module = importlib.import_module("mmgpt_engine.ops.cross_entropy")  # the module, not the function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _targets(shape, v, ignore_frac=0.25, ignore_index=-100):
    t = torch.randint(0, v, shape, device=DEVICE)
    drop = torch.rand(shape, device=DEVICE) < ignore_frac
    return torch.where(drop, torch.full_like(t, ignore_index), t)


def check_ce(lead, v, dtype, backend, *, reduction="mean", ignore_index=-100, target=None, scale=4.0, **options):
    """ops.cross_entropy with `options` vs the float64 reference, forward and backward; a weight
    option is given in float64 (the kernel reads it in float32, the truth in float64)."""
    target = _targets(lead, v, ignore_index=ignore_index) if target is None else target
    weight = options.pop("weight", None)

    def kernel(x):
        w = weight.float() if weight is not None else None
        return ops.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction, weight=w,
                                 backend=backend, **options)

    def ref(x):
        out = reference.cross_entropy(x, target, ignore_index, reduction, weight=weight, **options)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o if x.dtype == torch.float64 else o.float() for o in out)

    got, (got_dx,) = check_fwd_bwd(kernel, ref, [torch.randn(*lead, v, device=DEVICE) * scale], dtype, ["ce logits"])
    assert all(o.dtype == torch.float32 for o in got) and got_dx.dtype == dtype
    return got[0] if len(got) == 1 else got


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead,v", [((1,), 1), ((7,), 77), ((2, 3), 257), ((2, 2, 3), 1000), ((5,), 4097)], ids=str)
def test_cross_entropy_matches_float64_reference(lead, v, reduction, dtype, backend):
    check_ce(lead, v, dtype, backend, reduction=reduction)


@pytest.mark.parametrize("backend", kernel_backends())
def test_cross_entropy_matches_torch_nn_functional(backend):
    """An independent check of the semantics: torch's own cross_entropy in float64."""
    logits = torch.randn(9, 50, device=DEVICE, dtype=torch.float64)
    target = _targets((9,), 50)
    want = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    got = ops.cross_entropy(logits.float(), target, backend=backend)
    assert abs(got.item() - want.item()) < 1e-5


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("v", [20000, 65536])
def test_cross_entropy_large_vocab_loops_over_blocks(v, backend):
    check_ce((3,), v, torch.float32, backend, reduction="sum")
    check_ce((2,), v, torch.bfloat16, backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_cross_entropy_all_ignored_is_zero_not_nan(backend):
    target = torch.full((4,), -100, device=DEVICE)
    loss = check_ce((4,), 33, torch.float32, backend, target=target)
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend", kernel_backends())
def test_cross_entropy_custom_ignore_index_and_int32_targets(backend):
    target = _targets((6,), 40, ignore_index=3).to(torch.int32)
    check_ce((6,), 40, torch.float16, backend, ignore_index=3, target=target)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU raises at once; a GPU asserts on the device (test below)")
@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("bad", [5, 6, -1, -101])
def test_cross_entropy_out_of_range_target_is_refused(backend, bad):
    """As PyTorch and Liger do, instead of the NaN the kernels would give (the value, the vocab)."""
    target = torch.tensor([1, bad, 2, -100, bad], device=DEVICE)
    for reduction in ("none", "mean"):
        with pytest.raises(ValueError, match=rf"^target: expected class indices in \[0, 5\) \(the vocabulary size\) "
                                             rf"or ignore_index=-100, got {bad} \(2 such targets\)"):
            ops.cross_entropy(torch.randn(5, 5, device=DEVICE), target, reduction=reduction, backend=backend)
    # the same values are fine where they are the ignore_index
    target = torch.tensor([1, bad, 2, 0, bad], device=DEVICE)
    loss = ops.cross_entropy(torch.randn(5, 5, device=DEVICE), target, ignore_index=bad, reduction="none",
                             backend=backend)
    assert torch.isfinite(loss).all() and loss[1] == 0 and loss[4] == 0


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors")
def test_out_of_range_target_is_refused_inside_a_compiled_graph():
    """The check sits inside the custom op, so a torch.compile'd loss refuses the bad target too."""
    f = torch.compile(lambda x, t: ops.cross_entropy(x, t, backend="triton"), fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 6, requires_grad=True)
    assert torch.isfinite(f(x, torch.tensor([0, 5, -100])))
    with pytest.raises(ValueError, match=r"target: .*\[0, 6\).* got 6"):
        f(x, torch.tensor([0, 6, 1]))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
def test_out_of_range_target_fails_on_the_device_without_a_host_sync(backend):
    """On a GPU the check is a device-side assert: the call returns at once, the error comes at the
    next synchronisation. Run in a child process, as a device assert ends the CUDA context."""
    import subprocess
    import sys

    code = ("import torch; from mmgpt_engine import ops\n"
            "x = torch.randn(4, 10, device='cuda'); t = torch.tensor([1, 10, 2, 3], device='cuda')\n"
            f"loss = ops.cross_entropy(x, t, backend='{backend}')\n"
            "print('returned', flush=True)\n"
            "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "returned" in proc.stdout and proc.returncode != 0
    assert "assert" in proc.stderr.lower()


@pytest.mark.parametrize("backend", kernel_backends())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 8), v=st.integers(1, 5000), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_random_shapes(backend, rows, v, reduction):
    check_ce((rows,), v, torch.float32, backend, reduction=reduction)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("v", [32000, 128256, 262144])
def test_cross_entropy_large_vocab_gpu(v, backend):
    check_ce((512,), v, torch.bfloat16, backend)


# ------------------------------------------------------------------------------------- options
OPTION_SETS = {
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.1),
    "weight+smoothing": dict(weight=True, label_smoothing=0.25),
    "z-loss": dict(lse_square_scale=1e-2),
    "softcap": dict(softcap=3.0),
    "all": dict(weight=True, label_smoothing=0.1, lse_square_scale=1e-3, softcap=5.0),
}


def _options(name, v):
    opts = dict(OPTION_SETS[name])
    if opts.get("weight"):
        opts["weight"] = torch.rand(v, device=DEVICE, dtype=torch.float64) * 2 + 0.1
    return opts


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTION_SETS))
def test_cross_entropy_options_match_float64_reference(option, reduction, dtype, backend):
    v = 77 if dtype == torch.float32 else 1000
    check_ce((3, 5), v, dtype, backend, reduction=reduction, **_options(option, v))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("v", [1, 4097])
def test_cross_entropy_options_at_vocab_edges(v, backend):
    """One class (smoothing then equals nll), and a vocab one past a block."""
    check_ce((4,), v, torch.float32, backend, **_options("all", v))
    check_ce((2,), v, torch.bfloat16, backend, reduction="sum", **_options("weight+smoothing", v))


@pytest.mark.parametrize("backend", kernel_backends())
def test_softcap_saturates_large_logits(backend):
    """Logits far beyond the cap (tanh at +-1, gradient ~0 there) and tiny ones (tanh ~ x)."""
    check_ce((6,), 300, torch.float32, backend, scale=60.0, softcap=2.0)
    check_ce((6,), 300, torch.float32, backend, scale=1e-3, softcap=30.0)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_and_smoothing_match_torch_nn_functional(reduction, backend):
    """The semantics of weight and label_smoothing are PyTorch's: checked against
    F.cross_entropy itself in float64 (reference) and float32 (our kernels)."""
    logits = torch.randn(2, 9, 50, device=DEVICE, dtype=torch.float64)
    target = _targets((2, 9), 50)
    weight = torch.rand(50, device=DEVICE, dtype=torch.float64) + 0.2
    for kwargs in (dict(weight=weight), dict(label_smoothing=0.3), dict(weight=weight, label_smoothing=0.15)):
        want = F.cross_entropy(logits.transpose(1, 2), target, reduction=reduction, **kwargs)
        truth = reference.cross_entropy(logits, target, -100, reduction, **kwargs)
        torch.testing.assert_close(truth, want, rtol=1e-12, atol=1e-12)
        k32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        got = ops.cross_entropy(logits.float(), target, reduction=reduction, backend=backend, **k32)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_z_loss_is_returned_on_request_and_is_palm_s(backend):
    """loss = cross-entropy + s * mean(lse^2) over counted rows, z_loss = that second term."""
    logits = torch.randn(8, 33, device=DEVICE) * 3
    target = _targets((8,), 33)
    s = 1e-2
    loss, z = ops.cross_entropy(logits, target, lse_square_scale=s, return_z_loss=True, backend=backend)
    counted = target != -100
    lse = torch.logsumexp(logits.double(), -1)[counted]
    assert z.item() == pytest.approx((s * lse.square()).mean().item(), rel=1e-5)
    plain = ops.cross_entropy(logits, target, backend=backend)
    assert loss.item() == pytest.approx(plain.item() + z.item(), rel=1e-5)
    rows, z_rows = ops.cross_entropy(logits, target, lse_square_scale=s, reduction="none", return_z_loss=True,
                                     backend=backend)
    assert rows.shape == z_rows.shape == (8,) and torch.all(z_rows[~counted] == 0)
    torch.testing.assert_close(z_rows[counted].double(), s * lse.square(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", kernel_backends())
def test_weighted_mean_with_every_counted_weight_zero_is_nan_as_in_torch(backend):
    """0/0 is not hidden: F.cross_entropy gives NaN there too (all rows ignored still gives 0)."""
    logits = torch.randn(4, 6, device=DEVICE)
    target = torch.tensor([1, 1, -100, 1], device=DEVICE)
    weight = torch.ones(6, device=DEVICE)
    weight[1] = 0
    assert torch.isnan(F.cross_entropy(logits, target, weight=weight))
    assert torch.isnan(ops.cross_entropy(logits, target, weight=weight, backend=backend))


@pytest.mark.skipif(HAS_CUDA, reason="CPU routing check")
def test_the_cuda_backend_sends_option_calls_to_triton():
    """The one place that decides: the cuda kernel has none of the options."""
    cpu = torch.device("cpu")
    assert ce_module._kernel_backend("cuda", cpu, []) == "cuda"
    assert ce_module._kernel_backend("cuda", cpu, ["weight", "softcap"]) == "triton"
    assert ce_module._kernel_backend("triton", cpu, ["weight"]) == "triton"


BAD_OPTIONS = [  # (kwargs, exception, message start)
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing: expected a finite number in \[0.0, 1.0\], got -0.1"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing: expected .* got 1.5"),
    (dict(label_smoothing="0.1"), TypeError, r"label_smoothing: expected a float, got str"),
    (dict(lse_square_scale=-1.0), ValueError, r"lse_square_scale: expected .* got -1.0"),
    (dict(lse_square_scale=float("nan")), ValueError, r"lse_square_scale: expected .* got nan"),
    (dict(softcap=0.0), ValueError, r"softcap: expected a finite number in \(0.0, inf\), got 0.0"),
    (dict(softcap=True), TypeError, r"softcap: expected a float, got bool"),
    (dict(return_z_loss=1), TypeError, r"return_z_loss: expected a bool, got int"),
    (dict(weight=torch.ones(9)), ValueError, r"weight: expected shape \(10,\) .* got \(9,\)"),
    (dict(weight=torch.ones(10, dtype=torch.long)), TypeError, r"weight: expected dtype"),
    (dict(weight=torch.ones(10, requires_grad=True)), ValueError, r"weight: expected a tensor that does not require grad"),
    (dict(weight=[1.0] * 10), TypeError, r"weight: expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
@pytest.mark.parametrize("case", BAD_OPTIONS, ids=[c[2].split(":")[0] + str(i) for i, c in enumerate(BAD_OPTIONS)])
def test_bad_options_name_the_argument(case, backend):
    kwargs, exc, message = case
    kwargs = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match="^" + message):
        ops.cross_entropy(torch.randn(4, 10, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE),
                          backend=backend, **kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors")
def test_options_compile_fullgraph_and_match_eager():
    weight = torch.rand(40) + 0.5
    target = _targets((2, 7), 40)

    def f(x):
        loss, z = ops.cross_entropy(x, target, weight=weight, label_smoothing=0.1, lse_square_scale=1e-3,
                                    softcap=4.0, return_z_loss=True, backend="triton")
        return loss + z

    x0 = torch.randn(2, 7, 40) * 3
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        x = x0.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
