"""Softmax kernels vs the float64 reference: scale, causal, bool/additive broadcast masks, long rows."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmgpt_engine import ops
from mmgpt_engine.ops import reference
from tests.helpers import DEVICE, check_fwd_bwd, kernel_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_softmax(shape, dtype, backend, *, scale=1.0, mask=None, causal=False):
    m64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask

    def kernel(x):
        return ops.softmax(x, scale=scale, mask=mask, causal=causal, backend=backend)

    def ref(x):
        return reference.softmax(x, scale, m64 if x.dtype == torch.float64 else mask, causal)

    (got,), _ = check_fwd_bwd(kernel, ref, [torch.randn(shape, device=DEVICE) * 3], dtype, ["softmax x"])
    assert got.dtype == dtype
    return got


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (77,), (3, 257), (2, 3, 769), (4, 1000), (2, 4097)], ids=str)
def test_softmax_matches_float64_reference(shape, dtype, backend):
    check_softmax(shape, dtype, backend, scale=0.37)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (2, 7, 13), (2, 13, 7), (3, 77, 77)], ids=str)
def test_softmax_causal_bottom_right(shape, dtype, backend):
    y = check_softmax(shape, dtype, backend, causal=True)
    m, n = shape[-2:]
    if m > n:  # rows that see no column come out as zeros, not NaN
        assert torch.all(y[..., : m - n, :] == 0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("mask_shape", [(33,), (5, 1), (3, 1, 33), (2, 3, 5, 33), (2, 1, 1, 1)], ids=str)
def test_softmax_broadcast_masks(mask_shape, kind, backend):
    shape = (2, 3, 5, 33)
    if kind == "bool":
        mask = torch.rand(mask_shape, device=DEVICE) > 0.4
    else:
        mask = torch.randn(mask_shape, device=DEVICE) * 2
        mask[mask < -2] = float("-inf")
    check_softmax(shape, torch.float32, backend, mask=mask, scale=0.5)
    check_softmax(shape, torch.float16, backend, mask=mask, causal=True)


@pytest.mark.parametrize("backend", kernel_backends())
def test_softmax_fully_masked_rows_are_zero(backend):
    mask = torch.ones(4, 9, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    y = check_softmax((4, 9), torch.float32, backend, mask=mask)
    assert torch.all(y[1] == 0) and torch.allclose(y[0].sum(), torch.tensor(1.0, device=DEVICE))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("n", [16385, 20000, 32768])
def test_softmax_long_rows_take_the_looped_path(n, backend):
    check_softmax((2, n), torch.float32, backend, scale=2.0)
    check_softmax((3, n), torch.bfloat16, backend, mask=torch.rand(n, device=DEVICE) > 0.5)
    check_softmax((2, 2, n), torch.float16, backend, causal=True)


@pytest.mark.parametrize("backend", kernel_backends())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 9), cols=st.integers(1, 400), causal=st.booleans(), masked=st.booleans(),
       scale=st.floats(0.05, 4.0))
def test_softmax_random_shapes(backend, rows, cols, causal, masked, scale):
    mask = (torch.rand(cols, device=DEVICE) > 0.3) if masked else None
    check_softmax((2, rows, cols), torch.float32, backend, scale=scale, mask=mask, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("n", [1024, 4096, 16384, 32768])
def test_softmax_large_gpu(n, backend):
    check_softmax((256, n), torch.bfloat16, backend, scale=0.125)
    check_softmax((4, 64, n), torch.float16, backend, causal=True, mask=torch.rand(n, device=DEVICE) > 0.1)
