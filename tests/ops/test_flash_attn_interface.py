"""mmgpt_engine.flash_attn_interface in flash-attn's own test style, against the float64 reference:
bottom-right causal with seqlen_q != seqlen_k, GQA/MQA, head dims that are not multiples of 8,
sliding windows, softcap and ALiBi; the packed (qkv / kv) layouts with their gradients; varlen
built from random padding masks (unpad -> kernel -> pad, against each sequence computed alone);
positional calls; return_attn_probs, deterministic; what is refused, by name.

The interface has no backend argument: the backend under test is chosen through MMGPT_BACKEND, as
a user switching from flash-attn would."""
import pytest
import torch

from mmgpt_engine import ops
from mmgpt_engine.flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                               flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                               flash_attn_varlen_qkvpacked_func)
from mmgpt_engine.ops import reference
from tests.helpers import DEVICE, check_fwd_bwd, kernel_backends

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(params=kernel_backends())
def backend(request, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, request.param)
    return request.param


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


# ------------------------------------------------------------- padding masks, as flash-attn's tests
def generate_random_padding_mask(max_seqlen, batch_size, mode="random"):
    """(batch, max_seqlen) bool, True on each sequence's tokens (flash-attn's helper's modes)."""
    if mode == "full":
        lengths = torch.full((batch_size, 1), max_seqlen)
    elif mode == "random":
        lengths = torch.randint(max(1, max_seqlen - 20), max_seqlen + 1, (batch_size, 1))
    else:  # "third"
        lengths = torch.randint(max(1, max_seqlen // 3), max_seqlen + 1, (batch_size, 1))
    return (torch.arange(max_seqlen).unsqueeze(0) < lengths).to(DEVICE)


def unpad_input(x, mask):
    """(batch, seqlen, ...) -> (total, ...), its row indices, int32 cu_seqlens and max_seqlen."""
    lengths = mask.sum(-1, dtype=torch.int32)
    indices = mask.flatten().nonzero().flatten()
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1)[indices], indices, cu, int(lengths.max())


def pad_input(x, indices, batch, seqlen):
    out = x.new_zeros((batch * seqlen, *x.shape[1:]))
    out[indices] = x
    return out.view(batch, seqlen, *x.shape[1:])


def per_sequence_reference(q, k, v, q_mask, k_mask, slopes=None, **kwargs):
    """The float64 truth for a padded batch: each sequence computed alone on its own tokens (the
    causal diagonal / window bottom-right aligned to its own lengths), zeros on padding."""
    out = q.new_zeros(q.shape)
    for b in range(q.shape[0]):
        lq, lk = int(q_mask[b].sum()), int(k_mask[b].sum())
        per = dict(kwargs, alibi_slopes=None if slopes is None else slopes[b])
        out[b:b + 1, :lq] = reference.flash_attention(q[b:b + 1, :lq], k[b:b + 1, :lk], v[b:b + 1, :lk], **per)
    return out


# --------------------------------------------------------------------------------- dense batches
@pytest.mark.parametrize("seqlen_q,seqlen_k,nheads,nheads_k,d,dtype,kwargs", [
    (65, 130, 4, 2, 59, F16, {"causal": True}),                        # bottom-right, GQA, padded head dim
    (130, 65, 4, 1, 64, BF16, {"causal": True}),                       # seqlen_q > seqlen_k (zero rows), MQA
    (128, 217, 2, 2, 32, F16, {"window_size": (20, 5)}),
    (77, 77, 4, 2, 40, F16, {"causal": True, "softcap": 2.0}),
    (77, 100, 4, 4, 32, F32, {"causal": True, "alibi_slopes": "per batch"}),
], ids=str)
def test_flash_attn_func(seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, kwargs, backend):
    kwargs = dict(kwargs)
    if kwargs.get("alibi_slopes") == "per batch":
        kwargs["alibi_slopes"] = torch.rand(2, nheads, device=DEVICE)
    qkv = (_randn(2, seqlen_q, nheads, d), _randn(2, seqlen_k, nheads_k, d), _randn(2, seqlen_k, nheads_k, d))
    (out,), _ = check_fwd_bwd(lambda q, k, v: flash_attn_func(q, k, v, **kwargs),
                              lambda q, k, v: reference.flash_attention(q, k, v, **kwargs), qkv, dtype, "qkv")
    if kwargs.get("causal") and seqlen_q > seqlen_k:
        assert torch.all(out[:, : seqlen_q - seqlen_k] == 0)


def test_flash_attn_func_positional_arguments(backend):
    """flash-attn 2.x's order: q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
    alibi_slopes, deterministic, return_attn_probs."""
    q, k, v = _randn(1, 50, 4, 32).half(), _randn(1, 70, 2, 32).half(), _randn(1, 70, 2, 32).half()
    slopes = torch.rand(4, device=DEVICE)
    out, lse, s_dmask = flash_attn_func(q, k, v, 0.0, 0.3, True, (15, -1), 3.0, slopes, True, True)
    want, want_lse = ops.flash_attention(q, k, v, softmax_scale=0.3, causal=True, window_size=(15, -1), softcap=3.0,
                                         alibi_slopes=slopes, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse) and s_dmask.numel() == 0


def test_flash_attn_packed_layouts(backend):
    """qkv (batch, seqlen, 3, nheads, d) and kv (batch, seqlen_k, 2, nheads_k, d): read in place,
    gradients in the packed layout."""
    qkv = _randn(1, 77, 3, 4, 48)
    check_fwd_bwd(lambda t: flash_attn_qkvpacked_func(t, causal=True),
                  lambda t: reference.flash_attention(t[:, :, 0], t[:, :, 1], t[:, :, 2], causal=True), [qkv], F16,
                  ["qkv"])
    q, kv = _randn(1, 40, 6, 32), _randn(1, 90, 2, 2, 32)
    check_fwd_bwd(lambda a, b: flash_attn_kvpacked_func(a, b, causal=True, window_size=(30, -1)),
                  lambda a, b: reference.flash_attention(a, b[:, :, 0], b[:, :, 1], causal=True, window_size=(30, -1)),
                  [q, kv], F16, ["q", "kv"])


# --------------------------------------------------------------------------------------- varlen
@pytest.mark.parametrize("seqlen_q,seqlen_k,mode,nheads,nheads_k,d,dtype,kwargs", [
    (77, 130, "random", 4, 2, 64, F16, {"causal": True}),
    (90, 90, "third", 4, 1, 40, F32, {}),
    (60, 140, "third", 4, 2, 32, BF16, {"causal": True, "window_size": (24, -1), "softcap": 2.5,
                                        "alibi_slopes": "per batch"}),
], ids=str)
def test_flash_attn_varlen_func_with_padding_masks(seqlen_q, seqlen_k, mode, nheads, nheads_k, d, dtype, kwargs,
                                                   backend):
    batch = 3
    kwargs = dict(kwargs)
    slopes = torch.rand(batch, nheads, device=DEVICE) if kwargs.pop("alibi_slopes", None) else None
    q_mask = generate_random_padding_mask(seqlen_q, batch, mode)
    k_mask = generate_random_padding_mask(seqlen_k, batch, mode)

    def varlen(q, k, v):
        q_unpad, indices_q, cu_q, max_q = unpad_input(q, q_mask)
        k_unpad, _, cu_k, max_k = unpad_input(k, k_mask)
        v_unpad, _, _, _ = unpad_input(v, k_mask)
        out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes,
                                     **kwargs)
        assert out.shape == q_unpad.shape
        return pad_input(out, indices_q, batch, seqlen_q)

    def truth(q, k, v):
        return per_sequence_reference(q, k, v, q_mask, k_mask, slopes, **kwargs)

    qkv = (_randn(batch, seqlen_q, nheads, d), _randn(batch, seqlen_k, nheads_k, d),
           _randn(batch, seqlen_k, nheads_k, d))
    check_fwd_bwd(varlen, truth, qkv, dtype, "qkv")


def test_flash_attn_varlen_packed_layouts_and_lse(backend):
    lengths = [30, 1, 64]
    cu = torch.tensor([0, 30, 31, 95], dtype=torch.int32, device=DEVICE)
    qkv = _randn(sum(lengths), 3, 4, 32)
    out, lse, s_dmask = flash_attn_varlen_qkvpacked_func(qkv.half(), cu, max(lengths), causal=True,
                                                         return_attn_probs=True)
    want, want_lse = reference.flash_attention(*(qkv.double()[None, :, i] for i in range(3)), causal=True,
                                               cu_seqlens=cu, return_lse=True)
    assert out.shape == (95, 4, 32) and lse.shape == (4, 95) and s_dmask.numel() == 0
    assert (out.double() - want[0]).abs().max() < 2e-3 and (lse.double() - want_lse[0]).abs().max() < 2e-3
    lengths_k = [50, 9, 64]
    cu_k = torch.tensor([0, 50, 59, 123], dtype=torch.int32, device=DEVICE)
    q, kv = _randn(95, 4, 32), _randn(sum(lengths_k), 2, 2, 32)
    check_fwd_bwd(lambda a, b: flash_attn_varlen_kvpacked_func(a, b, cu, cu_k, 64, 64, causal=True),
                  lambda a, b: reference.flash_attention(a[None], b[None, :, 0], b[None, :, 1], causal=True,
                                                         cu_seqlens=cu, cu_seqlens_k=cu_k)[0],
                  [q, kv], F16, ["q", "kv"])


# ---------------------------------------------------------------------- outputs, flags, refusals
def test_return_attn_probs_gives_the_true_lse(backend):
    q, k, v = (_randn(2, s, 4, 32).half() for s in (45, 80, 80))
    out, lse, s_dmask = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(out, flash_attn_func(q, k, v, causal=True))
    _, want = reference.flash_attention(q.double(), k.double(), v.double(), causal=True, return_lse=True)
    assert lse.shape == (2, 4, 45) and lse.dtype == torch.float32 and (lse.double() - want).abs().max() < 1e-3
    assert s_dmask.numel() == 0  # flash-attn's S_dmask at dropout_p = 0


def test_deterministic_is_accepted_and_the_backward_is_deterministic(backend):
    q0, k0, v0 = (_randn(1, 70, 4, 32).half() for _ in range(3))
    grads = []
    for deterministic in (True, False, True):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        flash_attn_func(q, k, v, causal=True, deterministic=deterministic).float().square().sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))


def test_softcap_at_or_below_zero_is_off(backend):
    q, k, v = (_randn(1, 20, 2, 16) for _ in range(3))
    plain = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(flash_attn_func(q, k, v, causal=True, softcap=-1.0), plain)
    assert torch.equal(flash_attn_func(q, k, v, causal=True, softcap=0.0), plain)


def _refused():
    q = torch.randn(1, 8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return [
        ("dropout", lambda: flash_attn_func(q, q, q, 0.1), NotImplementedError, "dropout_p"),
        ("dropout qkvpacked", lambda: flash_attn_qkvpacked_func(torch.stack([q] * 3, 2), dropout_p=0.5),
         NotImplementedError, "dropout_p"),
        ("dropout varlen", lambda: flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 5, 5, dropout_p=0.1),
         NotImplementedError, "dropout_p"),
        ("block_table", lambda: flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 5, 5,
                                                       block_table=torch.zeros(2, 1, dtype=torch.int32)),
         NotImplementedError, "block_table"),
        ("dropout str", lambda: flash_attn_func(q, q, q, "0"), TypeError, "dropout_p"),
        ("deterministic str", lambda: flash_attn_func(q, q, q, deterministic="yes"), TypeError, "deterministic"),
        ("return_attn_probs int", lambda: flash_attn_func(q, q, q, return_attn_probs=1), TypeError,
         "return_attn_probs"),
        ("qkv not packed", lambda: flash_attn_qkvpacked_func(torch.stack([q] * 2, 2)), ValueError, "qkv"),
        ("varlen qkv 5-d", lambda: flash_attn_varlen_qkvpacked_func(torch.stack([q] * 3, 2), cu, 5), ValueError,
         "qkv"),
        ("kv not packed", lambda: flash_attn_kvpacked_func(q, q), ValueError, "kv"),
        ("varlen q 4-d", lambda: flash_attn_varlen_func(q, q[0], q[0], cu, cu, 5, 5), ValueError, "q"),
        ("window from ops", lambda: flash_attn_func(q, q, q, window_size=(-3, 0)), ValueError, "window_size"),
        ("alibi from ops", lambda: flash_attn_func(q, q, q, alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes"),
        ("varlen offsets from ops", lambda: flash_attn_varlen_func(q[0], q[0], q[0], cu, cu.long(), 5, 5), TypeError,
         "cu_seqlens_k"),
    ]


@pytest.mark.parametrize("case", _refused(), ids=lambda c: c[0])
def test_refused_arguments_are_named(case):
    _, call, exc, name = case
    with pytest.raises(exc, match=rf"^{name}: .*expected.*got"):
        call()
