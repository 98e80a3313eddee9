"""Cross-entropy kernels vs the float64 reference: reductions, ignore_index, large vocabularies."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmgpt_engine import ops
from mmgpt_engine.ops import reference
from tests.helpers import DEVICE, check_fwd_bwd, kernel_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _targets(shape, v, ignore_frac=0.25, ignore_index=-100):
    t = torch.randint(0, v, shape, device=DEVICE)
    drop = torch.rand(shape, device=DEVICE) < ignore_frac
    return torch.where(drop, torch.full_like(t, ignore_index), t)


def check_ce(lead, v, dtype, backend, *, reduction="mean", ignore_index=-100, target=None):
    target = _targets(lead, v, ignore_index=ignore_index) if target is None else target

    def kernel(x):
        return ops.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction, backend=backend)

    def ref(x):
        loss = reference.cross_entropy(x, target, ignore_index, reduction)
        return loss if x.dtype == torch.float64 else loss.float()

    (got,), (got_dx,) = check_fwd_bwd(kernel, ref, [torch.randn(*lead, v, device=DEVICE) * 4], dtype, ["ce logits"])
    assert got.dtype == torch.float32 and got_dx.dtype == dtype
    return got


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


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_cross_entropy_out_of_range_target_is_nan(backend):
    loss = ops.cross_entropy(torch.randn(3, 5, device=DEVICE), torch.tensor([1, 5, 2], device=DEVICE),
                             reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


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
