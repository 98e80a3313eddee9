"""The torch backend's fast path (`ops.eager`) against the reference: the same op in float64 to
rounding, and in float32/bfloat16 within the reference's own low-precision error, forward and
backward, over every mask, GQA, packed sequences and the rows that see nothing."""
import pytest
import torch

from mmgpt_engine.ops import eager, reference
from tests.helpers import check_fwd_bwd

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def _same_in_float64(fn, ref, inputs, grads=None):
    leaves = [t.double().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    twins = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t
             for t in leaves]
    a, b = fn(*leaves), ref(*twins)
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    gs = grads or [torch.randn_like(x) for x in a]
    torch.autograd.backward(a, gs)
    torch.autograd.backward(b, gs)
    for x, y in zip(leaves, twins):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-10)


ATTENTION_CASES = [
    dict(),                                       # no mask
    dict(causal=True),
    dict(causal=True, s_q=5),                     # decode-like: 5 queries, bottom-right aligned
    dict(causal=True, s_q=40),                    # more queries than keys: the first ones see nothing
    dict(prefix_len=11),
    dict(prefix_len=torch.tensor([3, 0, 30])),
    dict(heads=(6, 2)),                           # GQA
    dict(packed=[5, 1, 14], causal=True),
    dict(packed=[7, 12, 11], prefix_len=torch.tensor([3, 12, 0], dtype=torch.int32)),
    dict(causal=True, window_size=(6, 0)),        # Mistral's sliding window
    dict(window_size=(4, 3), s_q=20),             # two-sided, S_q < S_k
    dict(prefix_len=9, window_size=(5, 0)),       # the image prefix keeps seeing itself past the window
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_attention_matches_the_reference(case):
    case = dict(case)
    h, h_kv = case.pop("heads", (4, 2))
    packed = case.pop("packed", None)
    s_k = 30
    s_q = case.pop("s_q", s_k)
    b = 3
    if packed is not None:
        b, s_q = 1, sum(packed)
        s_k = s_q
        case["cu_seqlens"] = torch.tensor([0] + torch.tensor(packed).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = torch.randn(b, s_q, h, 16), torch.randn(b, s_k, h_kv, 16), torch.randn(b, s_k, h_kv, 16)

    def fast(q, k, v):
        return eager.flash_attention(q, k, v, **case)

    def ref(q, k, v):
        return reference.flash_attention(q, k, v, **case)

    _same_in_float64(fast, ref, [q, k, v])
    for dtype in (F32, BF16):
        check_fwd_bwd(fast, ref, [q, k, v], dtype, "qkv")
    if case.get("causal") and s_q > s_k:
        assert torch.all(fast(q, k, v)[:, : s_q - s_k] == 0)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("residual", [False, True])
def test_norms_match_the_reference(kind, residual):
    x, r = torch.randn(7, 96), torch.randn(7, 96)
    w, bias = 1 + 0.3 * torch.randn(96), torch.randn(96)
    if kind == "layer":
        def fast(x, w, b, r):
            return eager.layer_norm(x, w, b, 1e-5, residual=r)

        def ref(x, w, b, r):
            return reference.layer_norm(x, w, b, 1e-5, residual=r)
        inputs = [x, w, bias, r if residual else None]
    else:
        def fast(x, w, r):
            return eager.rms_norm(x, w, 1e-6, residual=r)

        def ref(x, w, r):
            return reference.rms_norm(x, w, 1e-6, residual=r)
        inputs = [x, w, r if residual else None]
    _same_in_float64(fast, ref, inputs)
    for dtype in (F32, BF16):
        check_fwd_bwd(fast, ref, inputs, dtype, round_inputs=True)


@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
def test_softmax_matches_the_reference_and_zeroes_rows_that_see_nothing(mask):
    x = torch.randn(6, 5, 9) * 3
    m = {"bool": torch.rand(5, 9) > 0.4, "float": torch.randn(9), None: None, "causal": None}[mask]
    if mask == "bool":
        m[2] = False  # a row that sees nothing
    causal = mask == "causal"
    x_rows = x[:, :7] if causal else x

    def fast(x):
        return eager.softmax(x, 0.7, m, causal)

    def ref(x):
        return reference.softmax(x, 0.7, m.double() if m is not None and m.is_floating_point() and x.dtype == F64
                                 else m, causal)

    _same_in_float64(fast, ref, [x_rows])
    check_fwd_bwd(fast, ref, [x_rows], F32)
    if mask == "bool":
        assert torch.all(fast(x)[:, 2] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_the_reference(reduction):
    logits, target = torch.randn(13, 50) * 3, torch.randint(0, 50, (13,))
    target[::4] = -100

    def fast(x):
        return eager.cross_entropy(x, target, -100, reduction)

    def ref(x):
        return reference.cross_entropy(x, target, -100, reduction)

    _same_in_float64(fast, ref, [logits])
    check_fwd_bwd(fast, ref, [logits], F32)
    all_ignored = torch.full((4,), -100)
    assert eager.cross_entropy(torch.randn(4, 50), all_ignored, -100, "mean").item() == 0.0
