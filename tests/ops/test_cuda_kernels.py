"""CUDA-specific paths of the csrc kernels (GPU only), beyond the shared per-backend tests in
test_norms / test_softmax / test_cross_entropy / test_flash_attention: rows longer than the
register budget (looped kernels), unaligned rows (scalar loads instead of 16-byte vectors),
warp-per-row vs block-per-row boundaries, very large vocabularies, and the flash attention
kernels themselves (both head dims, both dtypes, every mask mode, strided and misaligned
inputs, determinism). Every case is checked against the float64 reference, forward and backward.
"""
import pytest
import torch

from mmgpt_engine import ops
from mmgpt_engine.ops import reference
from tests.helpers import assert_close_to_truth, check_fwd_bwd

pytestmark = pytest.mark.gpu
DEV = "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    reason = ops.unavailable_reason("cuda", DEV) if torch.cuda.is_available() else "no CUDA device"
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")


# ------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("n", [32, 1024, 1025, 8192, 16384, 20000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_register_warp_block_and_looped_paths(kind, dtype, n):
    rows = 67  # not a multiple of the 4 rows a warp-per-row block takes
    x, r = torch.randn(rows, n, device=DEV), torch.randn(rows, n, device=DEV)
    w, b = 1 + 0.5 * torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    if kind == "layer":
        check_fwd_bwd(lambda x, r, w, b: ops.layer_norm(x, w, b, residual=r, backend="cuda"),
                 lambda x, r, w, b: reference.layer_norm(x, w, b, 1e-5, residual=r), [x, r, w, b], dtype, "xrwb")
    else:
        check_fwd_bwd(lambda x, r, w: ops.rms_norm(x, w, residual=r, backend="cuda"),
                 lambda x, r, w: reference.rms_norm(x, w, 1e-6, residual=r), [x, r, w], dtype, "xrw")


@pytest.mark.parametrize("n", [512, 4096, 20000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_norm_unaligned_rows_take_the_scalar_path(dtype, n):
    x, w, b = torch.randn(9, n, device=DEV), 1 + torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    check_fwd_bwd(lambda x, w, b: ops.layer_norm(x, w, b, backend="cuda"),
             lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), [x, w, b], dtype, "xwb", unaligned=True)


def test_norm_weight_gradient_is_deterministic():
    x = torch.randn(4096, 1024, device=DEV, dtype=BF16, requires_grad=True)
    w = torch.randn(1024, device=DEV, requires_grad=True)
    dy = torch.randn_like(x)
    grads = []
    for _ in range(2):
        w.grad = None
        ops.rms_norm(x, w, backend="cuda").backward(dy)
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


# ----------------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("n", [1000, 1024, 16384, 20000, 32768, 40000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
def test_softmax_register_and_looped_paths(dtype, n):
    mask = torch.rand(n, device=DEV) > 0.2
    check_fwd_bwd(lambda x: ops.softmax(x, scale=0.3, mask=mask, backend="cuda"),
             lambda x: reference.softmax(x, 0.3, mask), [torch.randn(2, 3, n, device=DEV)], dtype, "x")
    check_fwd_bwd(lambda x: ops.softmax(x, causal=True, backend="cuda"),
             lambda x: reference.softmax(x, causal=True), [torch.randn(5, n, device=DEV)], dtype, "x")


@pytest.mark.parametrize("mask_dtype", [torch.bool, F16, BF16, F32, torch.float64], ids=str)
def test_softmax_mask_dtypes_and_unaligned_rows(mask_dtype):
    n = 1001
    mask = torch.randn(3, 1, n, device=DEV)
    mask = mask > 0 if mask_dtype == torch.bool else mask.to(mask_dtype)
    check_fwd_bwd(lambda x: ops.softmax(x, mask=mask, backend="cuda"), lambda x: reference.softmax(x, 1.0, mask),
             [torch.randn(3, 4, n, device=DEV)], F16, "x", unaligned=True)


# ----------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("v", [50257, 131072, 262144], ids=lambda v: f"v{v}")
@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_cross_entropy_large_vocab(dtype, v):
    target = torch.randint(0, v, (37,), device=DEV)
    target[::5] = -100
    check_fwd_bwd(lambda x: ops.cross_entropy(x, target, reduction="none", backend="cuda"),
             lambda x: reference.cross_entropy(x, target, reduction="none"),
             [4 * torch.randn(37, v, device=DEV)], dtype, "x")


def test_cross_entropy_unaligned_rows():
    target = torch.randint(0, 999, (8,), device=DEV)
    check_fwd_bwd(lambda x: ops.cross_entropy(x, target, backend="cuda"), lambda x: reference.cross_entropy(x, target),
             [torch.randn(8, 999, device=DEV)], F16, "x", unaligned=True)


# ----------------------------------------------------------------------------- attention
def _attention(q, k, v, **kwargs):
    return ops.flash_attention(q, k, v, return_lse=True, backend="cuda", **kwargs)


def _attention_ref(q, k, v, **kwargs):
    return reference.flash_attention(q, k, v, return_lse=True, **kwargs)


def _check_attention(b, s_q, s_k, h, h_kv, d, dtype, **kwargs):
    from mmgpt_engine.ops import cuda

    q = torch.randn(b, s_q, h, d, device=DEV)
    k, v = torch.randn(b, s_k, h_kv, d, device=DEV), torch.randn(b, s_k, h_kv, d, device=DEV)
    assert cuda._flash_kernels(q.to(dtype)) is None, "this case must run the CUDA kernels, not the fallback"
    out, lse = _attention(q.to(dtype), k.to(dtype), v.to(dtype), **kwargs)
    ref_lse = _attention_ref(q.double(), k.double(), v.double(), **kwargs)[1]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: -inf where a query sees no key"
    # out and the gradients (lse carries no gradient: compare out only through the backward)
    check_fwd_bwd(lambda q, k, v: _attention(q, k, v, **kwargs)[0], lambda q, k, v: _attention_ref(q, k, v, **kwargs)[0],
             [q, k, v], dtype, "qkv")
    live = ~torch.isneginf(ref_lse)
    assert_close_to_truth("lse", lse[live], ref_lse[live], _attention_ref(q.to(dtype), k.to(dtype), v.to(dtype),
                                                                          **kwargs)[1][live])


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("s_q,s_k,kwargs", [
    (1, 1, {}), (65, 65, {}), (200, 333, {}), (333, 200, {"causal": False}),
    (129, 129, {"causal": True}), (100, 300, {"causal": True}), (300, 100, {"causal": True}),  # no key for some
    (190, 190, {"prefix_len": 70}), (64, 150, {"prefix_len": 100}),
], ids=str)
def test_flash_attention_cuda_kernels(s_q, s_k, kwargs, d, dtype):
    _check_attention(2, s_q, s_k, 4, 2, d, dtype, **kwargs)


@pytest.mark.parametrize("d", [64, 128])
def test_flash_attention_varlen_prefix_gqa(d):
    lengths = [1, 63, 64, 65, 200, 7]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    prefix = torch.tensor([1, 10, 64, 0, 150, 3], dtype=torch.int32, device=DEV)
    _check_attention(1, sum(lengths), sum(lengths), 8, 2, d, BF16, cu_seqlens=cu, prefix_len=prefix)


def test_flash_attention_per_batch_prefix_and_mqa():
    prefix = torch.tensor([0, 17, 128], dtype=torch.int32, device=DEV)
    _check_attention(3, 150, 150, 6, 1, 64, F16, prefix_len=prefix)


@pytest.mark.parametrize("layout", ["packed_qkv", "misaligned"])
def test_flash_attention_strided_and_misaligned_inputs(layout):
    b, s, h, d = 2, 100, 4, 128
    if layout == "packed_qkv":  # views into one (B, S, 3, H, D) projection: strides, no copies needed
        qkv = torch.randn(b, s, 3, h, d, device=DEV, dtype=BF16)
        q, k, v = qkv.unbind(2)
    else:  # head-dim offset by one element: rows are not 16-byte aligned, the binding copies them
        buf = torch.randn(b, s, h, d + 1, device=DEV, dtype=BF16)
        q = k = v = buf[..., 1:]
    out, lse = _attention(q, k, v, causal=True, softmax_scale=0.2)
    ref_out, ref_lse = _attention_ref(q.double(), k.double(), v.double(), causal=True, softmax_scale=0.2)
    low_out, low_lse = _attention_ref(q, k, v, causal=True, softmax_scale=0.2)
    assert_close_to_truth("out", out, ref_out, low_out)
    assert_close_to_truth("lse", lse, ref_lse, low_lse)


def test_flash_attention_backward_is_deterministic():
    q, k, v = (torch.randn(2, 500, 4, 64, device=DEV, dtype=F16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        ops.flash_attention(q, k, v, causal=True, backend="cuda").backward(dout)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_flash_attention_unsupported_cases_fall_back_to_triton():
    from mmgpt_engine.ops import cuda

    assert cuda._flash_kernels(torch.empty(1, 1, 1, 96, device=DEV, dtype=F16)) is not None
    assert cuda._flash_kernels(torch.empty(1, 1, 1, 64, device=DEV, dtype=F32)) is not None
    check_fwd_bwd(lambda q, k, v: ops.flash_attention(q, k, v, causal=True, backend="cuda"),
             lambda q, k, v: reference.flash_attention(q, k, v, causal=True),
             [torch.randn(1, 50, 2, 64, device=DEV) for _ in range(3)], F32, "qkv")
