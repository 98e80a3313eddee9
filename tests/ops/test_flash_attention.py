"""Flash attention kernels vs the float64 reference: forward, lse and dq/dk/dv, with causal
(bottom-right), prefix-LM, packed varlen, GQA/MQA, odd lengths and head dims, strided inputs;
torch.compile/opcheck of the custom ops; every bad input named in the error.

Interpreted Triton is slow, so the cases below cover each feature once or twice rather than the
cross product; the interpreted kernels use BLOCK_M != BLOCK_N so tile edges are uneven."""
import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmgpt_engine import ops
from mmgpt_engine.ops import attention, reference
from tests.helpers import DEVICE, check_fwd_bwd, kernel_backends

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _make(b, s_q, s_k, h, h_kv, d, *, strided=False):
    """Fresh random q, k, v in float32; strided: q/k/v are views into one fused qkv-like buffer."""
    if strided:
        assert s_q == s_k and h == h_kv
        qkv = torch.randn(b, s_q, 3, h, d + 8, device=DEVICE)
        return qkv[:, :, 0, :, :d], qkv[:, :, 1, :, :d], qkv[:, :, 2, :, :d]
    return (torch.randn(b, s_q, h, d, device=DEVICE), torch.randn(b, s_k, h_kv, d, device=DEVICE),
            torch.randn(b, s_k, h_kv, d, device=DEVICE))


def check_attention(backend, dtype, b, s_q, s_k, h, h_kv, d, *, strided=False, **kwargs):
    """out, lse (-inf exactly where a query sees no key) and dq/dk/dv against the float64 reference."""
    qkv = _make(b, s_q, s_k, h, h_kv, d, strided=strided)

    def kernel(q, k, v):
        if strided:
            assert not q.is_contiguous()
        return ops.flash_attention(q, k, v, return_lse=True, backend=backend, **kwargs)

    def ref(q, k, v):
        return reference.flash_attention(q, k, v, return_lse=True, **kwargs)

    (got, got_lse), _ = check_fwd_bwd(kernel, ref, qkv, dtype, "qkv", n_grad_outputs=1)
    assert got.dtype == dtype and got.shape == (b, s_q, h, d) and got_lse.shape == (b, h, s_q)
    assert got_lse.dtype == torch.float32 and not got_lse.requires_grad
    return got, got_lse


# (b, s_q, s_k, h, h_kv, d, dtype, causal): each length, head dim, dtype and GQA ratio at least once
SHAPES = [
    (2, 1, 1, 2, 2, 64, F32, False),
    (2, 1, 1, 4, 2, 32, F16, True),
    (2, 77, 77, 2, 2, 80, F32, False),
    (2, 77, 77, 4, 2, 64, F16, True),      # GQA 4:2
    (1, 257, 257, 2, 2, 128, F32, True),
    (1, 257, 257, 8, 1, 32, F16, False),   # MQA 8:1
    (2, 77, 77, 4, 2, 64, BF16, True),
    (1, 130, 130, 2, 1, 16, BF16, False),
    (1, 45, 45, 2, 2, 8, F32, True),       # head dim 8: padded to the 16-wide dot
    (1, 40, 40, 1, 1, 256, F16, True),
    (1, 65, 65, 2, 2, 40, F32, True),      # head dim not a power of two
]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("b,s_q,s_k,h,h_kv,d,dtype,causal", SHAPES, ids=str)
def test_flash_attention_matches_float64_reference(b, s_q, s_k, h, h_kv, d, dtype, causal, backend):
    check_attention(backend, dtype, b, s_q, s_k, h, h_kv, d, causal=causal)


# S_q != S_k: decode (one query), chunked prefill, more queries than keys, non-causal cross-attention
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("s_q,s_k,causal,dtype", [
    (1, 257, True, F16), (77, 257, True, F32), (257, 77, True, F32), (77, 130, False, F16), (3, 77, True, BF16),
    (47, 77, True, F16),  # S_k - S_q = 30: the diagonal ends one key short of a 32-key tile edge
], ids=str)
def test_flash_attention_unequal_lengths_bottom_right(s_q, s_k, causal, dtype, backend):
    got, lse = check_attention(backend, dtype, 2, s_q, s_k, 4, 2, 64, causal=causal)
    if causal and s_q > s_k:  # the first s_q - s_k queries see no key: zero output, lse -inf
        assert torch.all(got[:, : s_q - s_k] == 0)
        assert torch.all(torch.isneginf(lse[:, :, : s_q - s_k]))


@pytest.mark.parametrize("backend", kernel_backends())
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s_q=st.integers(1, 100), s_k=st.integers(1, 100), mode=st.sampled_from(["none", "causal", "prefix"]),
       prefix_frac=st.floats(0, 1), heads=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2)]), d=st.sampled_from([16, 24, 32]))
def test_flash_attention_random_shapes(backend, s_q, s_k, mode, prefix_frac, heads, d):
    """Random lengths put the causal diagonal and the prefix edge at every offset within a tile."""
    kwargs = {"causal": mode == "causal"}
    if mode == "prefix":
        kwargs["prefix_len"] = round(prefix_frac * s_k)
    check_attention(backend, F32, 1, s_q, s_k, heads[0], heads[1], d, **kwargs)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("prefix", ["0", "1", "S//3", "S", "tensor"])
def test_flash_attention_prefix_lm(prefix, backend):
    s = 77
    if prefix == "tensor":
        prefix_len = torch.tensor([63, 31, 0], dtype=torch.int64, device=DEVICE)  # 1 short of tile edges
    else:
        prefix_len = {"0": 0, "1": 1, "S//3": s // 3, "S": s}[prefix]
    check_attention(backend, F32, 3, s, s, 4, 2, 64, prefix_len=prefix_len)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("s_q,s_k,prefix_len", [(33, 77, 40), (33, 77, 20), (100, 70, 50)], ids=str)
def test_flash_attention_prefix_with_unequal_lengths(s_q, s_k, prefix_len, backend):
    """The prefix is in absolute positions: queries before it (even ones with no causal key) see it."""
    check_attention(backend, F16, 2, s_q, s_k, 2, 1, 32, prefix_len=prefix_len)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("lengths,kwargs,dtype", [
    ([1, 77, 30, 130], {"causal": True}, F32),
    ([50, 1, 96], {}, F16),
    ([40, 1, 70, 33], {"prefix_len": torch.tensor([10, 1, 70, 0], dtype=torch.int32)}, F32),
    ([64, 35], {"prefix_len": 12, "max_seqlen": 80}, BF16),
], ids=str)
def test_flash_attention_varlen(lengths, kwargs, dtype, backend):
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("prefix_len"), torch.Tensor):
        kwargs["prefix_len"] = kwargs["prefix_len"].to(DEVICE)
    total = sum(lengths)
    check_attention(backend, dtype, 1, total, total, 4, 2, 64, cu_seqlens=_cu(lengths), **kwargs)


@pytest.mark.parametrize("backend", kernel_backends())
def test_flash_attention_varlen_equals_separate_sequences(backend):
    """Packing must not leak across sequences: each one equals its own unpacked call."""
    lengths = [19, 1, 44]
    q, k, v = _make(1, sum(lengths), sum(lengths), 2, 2, 32)
    packed = ops.flash_attention(q, k, v, causal=True, cu_seqlens=_cu(lengths), backend=backend)
    start = 0
    for n in lengths:
        alone = ops.flash_attention(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n],
                                    causal=True, backend=backend)
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=0, atol=1e-6)
        start += n


# ------------------------------------------------------------- flash-attn's options, vs float64
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("b,s_q,s_k,h,h_kv,d,dtype,causal", [
    (1, 77, 77, 2, 1, 59, F16, True),      # padded to 64 inside ops
    (2, 33, 45, 2, 2, 111, F32, False),    # to 112, and 128 in the kernel
    (1, 40, 40, 2, 2, 3, BF16, True),      # to 8, and 16 in the kernel
], ids=str)
def test_flash_attention_any_head_dim(b, s_q, s_k, h, h_kv, d, dtype, causal, backend):
    check_attention(backend, dtype, b, s_q, s_k, h, h_kv, d, causal=causal)


# (s_q, s_k, window_size, causal, dtype): the window relative to the bottom-right diagonal
WINDOWS = [
    (150, 150, (40, -1), True, F16),       # Mistral: causal sliding window, edges off the tile grid
    (77, 150, (20, 10), False, F32),       # both edges, S_q < S_k
    (130, 77, (5, 7), False, F32),         # S_q > S_k: the first queries see no key
    (1, 257, (63, -1), True, BF16),        # decode with a window
    (100, 100, (0, 0), False, F32),        # the diagonal only
    (90, 90, (-1, 3), False, F16),         # right edge only
]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("s_q,s_k,window,causal,dtype", WINDOWS, ids=str)
def test_flash_attention_sliding_window(s_q, s_k, window, causal, dtype, backend):
    got, lse = check_attention(backend, dtype, 1, s_q, s_k, 2, 1, 32, causal=causal, window_size=window)
    if s_q > s_k:  # query i sees keys only up to i + S_k - S_q + right
        blind = s_q - s_k - window[1]
        assert torch.all(got[:, :blind] == 0) and torch.all(torch.isneginf(lse[:, :, :blind]))


@pytest.mark.parametrize("backend", kernel_backends())
def test_flash_attention_window_with_prefix(backend):
    """The image prefix stays bidirectional whatever the window; text rows see their window only."""
    prefix = torch.tensor([70, 0], dtype=torch.int64, device=DEVICE)
    check_attention(backend, F32, 2, 150, 150, 2, 1, 32, prefix_len=prefix, window_size=(20, -1))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("softcap,causal,dtype", [(1.5, True, F16), (4.0, False, BF16), (0.7, True, F32)], ids=str)
def test_flash_attention_softcap(softcap, causal, dtype, backend):
    """Caps small enough that tanh saturates for many scores (their variance is ~2 here)."""
    check_attention(backend, dtype, 1, 77, 90, 2, 1, 64, causal=causal, softcap=softcap, softmax_scale=0.18)


def alibi_slopes(h):
    """The ALiBi paper's geometric slopes 2^(-8i/h)."""
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=DEVICE)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("s_q,s_k,causal,per_batch,dtype", [
    (77, 77, True, False, F16), (50, 130, False, True, F32), (130, 50, True, True, BF16),
], ids=str)
def test_flash_attention_alibi(s_q, s_k, causal, per_batch, dtype, backend):
    slopes = torch.rand(2, 4, device=DEVICE) if per_batch else alibi_slopes(4)
    check_attention(backend, dtype, 2, s_q, s_k, 4, 2, 32, causal=causal, alibi_slopes=slopes)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("lengths_q,lengths_k,kwargs,dtype", [
    # prefill after a cached prefix: each sequence's queries are its last keys
    ([1, 30, 77], [40, 30, 150], {"causal": True}, F16),
    ([20, 1, 64], [20, 65, 64], {"causal": True, "prefix_len": torch.tensor([10, 33, 64], dtype=torch.int32)}, F32),
    ([45, 7], [90, 100], {}, F32),                                     # cross-attention, packed
    ([33, 77], [100, 77], {"causal": True, "window_size": (24, -1), "softcap": 2.0, "alibi_slopes": "per sequence"},
     BF16),
], ids=str)
def test_flash_attention_varlen_separate_key_offsets(lengths_q, lengths_k, kwargs, dtype, backend):
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("prefix_len"), torch.Tensor):
        kwargs["prefix_len"] = kwargs["prefix_len"].to(DEVICE)
    if kwargs.get("alibi_slopes") == "per sequence":
        kwargs["alibi_slopes"] = torch.rand(len(lengths_q), 4, device=DEVICE)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    check_attention(backend, dtype, 1, total_q, total_k, 4, 2, 64, cu_seqlens=_cu(lengths_q),
                    cu_seqlens_k=_cu(lengths_k), **kwargs)


@pytest.mark.parametrize("backend", kernel_backends())
def test_flash_attention_every_option_at_once(backend):
    """Window, softcap, per-batch ALiBi, GQA, S_q != S_k and a padded head dim in one call."""
    check_attention(backend, F16, 2, 45, 100, 6, 2, 44, causal=True, window_size=(30, -1), softcap=3.0,
                    alibi_slopes=torch.rand(2, 6, device=DEVICE))


@pytest.mark.parametrize("kwargs,causal,window,options", [
    ({"window_size": (-1, 0)}, True, (-1, -1), ()),                      # right edge 0 is causal
    ({"window_size": (10, 0)}, True, (10, -1), ("window_size",)),
    ({"window_size": (10, 5), "causal": True}, True, (10, -1), ("window_size",)),  # causal: right 0
    ({"window_size": (40, 40)}, False, (-1, -1), ()),                    # wider than the sequences
    ({"window_size": (4, 40)}, False, (4, -1), ("window_size",)),
    ({"softcap": 0.0}, False, (-1, -1), ()),
    ({"softcap": 2.0, "alibi_slopes": "slopes"}, False, (-1, -1), ("softcap", "alibi_slopes")),
], ids=str)
def test_flash_attention_options_in_normal_form(monkeypatch, kwargs, causal, window, options):
    """What reaches the dispatch and the kernels: equivalent masks in one form, so a window that
    excludes no key (or is plain causal) is no option and the cuda kernels can still take it."""
    seen = {}

    def spy(head_dim, dtype, backend, device=None, options=()):
        seen["options"] = options
        return backend

    def op(q, k, v, cu, max_seqlen, prefix, causal_, scale, cu_k, max_k, left, right, softcap, alibi, backend):
        seen.update(causal=causal_, window=(left, right))
        return torch.zeros_like(q), q.new_zeros((q.shape[0], q.shape[2], q.shape[1]))

    monkeypatch.setattr(attention, "attention_backend", spy)
    monkeypatch.setattr(torch.ops.mmgpt, "flash_attn_fwd", op)
    kwargs = dict(kwargs)
    if kwargs.get("alibi_slopes") == "slopes":
        kwargs["alibi_slopes"] = alibi_slopes(2)
    q, k, v = _make(1, 33, 33, 2, 2, 16)
    monkeypatch.setattr(attention, "resolve_backend", lambda backend, device: "triton")
    ops.flash_attention(q, k, v, **kwargs)
    assert seen == {"options": options, "causal": causal, "window": window}


@pytest.fixture
def cuda_router(monkeypatch, caplog):
    """ops.attention_backend with the cuda kernels built for head dims 64 and 128, its once-only
    fallback log cleared and captured."""
    from mmgpt_engine.ops import _dispatch
    from mmgpt_engine.ops import cuda as cuda_backend

    if "triton" not in ops.available_backends(DEVICE):
        pytest.skip("triton is not available here")
    monkeypatch.setattr(cuda_backend, "FLASH_HEAD_DIMS", (64, 128), raising=False)
    monkeypatch.setattr(_dispatch, "_attention_fallback_logged", set())
    with caplog.at_level(logging.INFO, logger=_dispatch.__name__):
        yield caplog


def test_cuda_backend_runs_the_options_it_lacks_on_triton(cuda_router, monkeypatch):
    from mmgpt_engine.ops import _dispatch

    caplog, f16 = cuda_router, torch.float16
    for _ in range(2):
        assert ops.attention_backend(64, f16, "cuda", DEVICE, options=("window_size",)) == "triton"
        assert ops.attention_backend(64, f16, "cuda", DEVICE, options=("softcap", "alibi_slopes")) == "triton"
    assert sum("does not implement" in r.getMessage() for r in caplog.records) == 2  # once per set
    assert ops.attention_backend(64, f16, "cuda", DEVICE, options=()) == "cuda"
    assert ops.attention_backend(64, f16, "triton", DEVICE, options=("cu_seqlens_k",)) == "triton"
    with pytest.raises(ValueError, match=r"^options: expected names among .*got \['dropout_p'\]"):
        ops.attention_backend(64, f16, "cuda", DEVICE, options=("dropout_p",))
    monkeypatch.setattr(_dispatch, "unavailable_reason", lambda b, d=None: None if b == "cuda" else "triton is gone")
    with pytest.raises(NotImplementedError, match=r"^window_size: the cuda flash attention does not implement "
                                                  r"window_size, softcap, and the triton fallback is unavailable: "
                                                  r"triton is gone"):
        ops.attention_backend(64, f16, "cuda", DEVICE, options=("window_size", "softcap"))


@pytest.mark.parametrize("backend", kernel_backends())
def test_flash_attention_alibi_slopes_that_need_a_gradient_are_refused(backend):
    q, k, v = _make(1, 9, 9, 2, 2, 16)
    slopes = alibi_slopes(2).requires_grad_()
    with pytest.raises(NotImplementedError, match=r"^alibi_slopes: .*no gradient"):
        ops.flash_attention(q, k, v, alibi_slopes=slopes, backend=backend)
    with torch.no_grad():  # nothing to differentiate: fine
        ops.flash_attention(q, k, v, alibi_slopes=slopes, backend=backend)
    ops.flash_attention(q, k, v, alibi_slopes=slopes.detach(), backend=backend)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_flash_attention_strided_inputs_and_scale(dtype, backend):
    """q/k/v as views into a fused projection (non-contiguous, padded head dim) with a custom scale."""
    check_attention(backend, dtype, 2, 77, 77, 2, 2, 64, strided=True, causal=True, softmax_scale=0.3)


@pytest.mark.parametrize("backend", kernel_backends())
def test_flash_attention_empty_keys(backend):
    q, k, v = _make(1, 5, 0, 2, 2, 32)
    out, lse = ops.flash_attention(q, k, v, return_lse=True, backend=backend)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("backend", kernel_backends())
def test_flash_attention_return_lse_false_and_lse_not_differentiable(backend):
    q, k, v = (t.requires_grad_() for t in _make(1, 9, 9, 2, 2, 32))
    out = ops.flash_attention(q, k, v, causal=True, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    _, lse = ops.flash_attention(q, k, v, return_lse=True, backend=backend)
    assert not lse.requires_grad


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", ["dense", "varlen", "options"])
def test_flash_attention_torch_compile_fullgraph(backend, case):
    q0, k0, v0 = _make(1 if case != "dense" else 2, 33, 33 if case != "options" else 40, 4, 2, 30)
    packed = dict(cu_seqlens=_cu([9, 24]), max_seqlen=24) if case != "dense" else {}
    if case == "options":  # separate key offsets, window, softcap, ALiBi and a padded head dim
        packed.update(cu_seqlens_k=_cu([16, 24]), max_seqlen_k=24, window_size=(7, -1), softcap=2.0,
                      alibi_slopes=alibi_slopes(4))

    def f(q, k, v):
        out, lse = ops.flash_attention(q, k, v, prefix_len=5, return_lse=True, backend=backend, **packed)
        return (out.float() ** 2).sum() + lse.sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        loss = fn(q, k, v)
        loss.backward()
        grads.append([loss.detach(), q.grad, k.grad, v.grad])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", ["dense", "varlen", "options"])
def test_flash_attention_opcheck(case, backend):
    """The custom ops' schema, fake kernels and autograd registration, without and with the
    triton-only options (separate key offsets, window, softcap, ALiBi)."""
    window, softcap, alibi, cu_k, max_k = (-1, -1), 0.0, None, None, 11
    if case == "dense":
        q, k, v = _make(2, 11, 17, 4, 2, 16)
        cu, max_seqlen, prefix = None, 11, torch.tensor([4, 0], dtype=torch.int32, device=DEVICE)
    else:
        q, k, v = _make(1, 20, 20 if case == "varlen" else 31, 4, 2, 16)
        cu, max_seqlen, prefix = _cu([7, 13]), 13, torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
        max_k = max_seqlen
        if case == "options":
            cu_k, max_k = _cu([10, 21]), 21
            window, softcap, alibi = (5, -1), 2.0, torch.rand(2, 4, device=DEVICE)
    rest = (max_seqlen, prefix, True, 0.25, cu_k, max_k, *window, softcap, alibi, backend)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, *rest)
    torch.library.opcheck(torch.ops.mmgpt.flash_attn_fwd.default, args)
    out, lse = torch.ops.mmgpt.flash_attn_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    torch.library.opcheck(torch.ops.mmgpt.flash_attn_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cu, *rest))


def test_cuda_backend_falls_back_to_triton_for_unsupported_head_dims(cuda_router, monkeypatch):
    from mmgpt_engine.ops import _dispatch

    caplog, f16 = cuda_router, torch.float16
    assert ops.attention_backend(80, f16, "cuda", DEVICE) == "triton"
    assert ops.attention_backend(80, f16, "cuda", DEVICE) == "triton"
    assert sum("head dim" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert ops.attention_backend(64, f16, "cuda", DEVICE) == "cuda"
    assert ops.attention_backend(64, torch.float32, "cuda", DEVICE) == "triton"  # float32: not built for it
    assert ops.attention_backend(80, f16, "triton", DEVICE) == "triton"
    assert ops.attention_backend(80, f16, "torch", DEVICE) == "torch"
    with pytest.raises(ValueError, match=r"^backend: expected one of \['torch', 'triton', 'cuda'\], got 'flash'"):
        ops.attention_backend(64, f16, "flash", DEVICE)
    if DEVICE == "cpu":  # where triton cannot run, flash_attention's error names q and says why
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=r"^the cuda flash attention is built for head dims \(64, 128\) "
                                             r"in \['float16', 'bfloat16'\], got head dim 80 in float16, and the "
                                             r"triton fallback is unavailable: .*TRITON_INTERPRET"):
            ops.attention_backend(80, f16, "cuda", DEVICE)
        monkeypatch.setattr(_dispatch, "unavailable_reason",
                            lambda b, d=None: None if b == "cuda" else "triton is gone")
        q = torch.randn(1, 4, 2, 80, device=DEVICE, dtype=f16)
        with pytest.raises(ValueError, match=r"^q: the cuda flash attention is built for .*triton is gone"):
            ops.flash_attention(q, q, q, backend="cuda")


# ------------------------------------------------------------------------------------ bad input
def _bad_cases():
    q, k, v = (torch.randn(2, 8, 4, 32) for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q1, k1, v1 = q[:1], k[:1], v[:1]
    return [
        ("rank", (q[0], k, v), {}, ValueError, "q"),
        ("k rank", (q, k[0], v), {}, ValueError, "k"),
        ("head dim mismatch", (q, k[..., :16], v[..., :16]), {}, ValueError, "k"),
        ("v shape", (q, k, v[:, :5]), {}, ValueError, "v"),
        ("heads not divisible", (q, k[:, :, :3], v[:, :, :3]), {}, ValueError, "k"),
        ("head dim over 256", tuple(torch.randn(1, 2, 1, 264) for _ in range(3)), {}, ValueError, "q"),
        ("int q", (q.long(), k, v), {}, TypeError, "q"),
        ("mixed dtypes", (q, k.half(), v), {}, TypeError, "k"),
        ("last dim not contiguous", (torch.randn(2, 8, 32, 4).transpose(2, 3), k, v), {}, ValueError, "q"),
        ("batch mismatch", (q, k[:1], v[:1]), {}, ValueError, "k"),
        ("cu_seqlens int64", (q1, k1, v1), {"cu_seqlens": cu.long()}, TypeError, "cu_seqlens"),
        ("cu_seqlens not increasing", (q1, k1, v1), {"cu_seqlens": torch.tensor([0, 5, 5, 8], dtype=torch.int32)},
         ValueError, "cu_seqlens"),
        ("cu_seqlens wrong end", (q1, k1, v1), {"cu_seqlens": torch.tensor([0, 3, 7], dtype=torch.int32)},
         ValueError, "cu_seqlens"),
        ("cu_seqlens with batch 2", (q, k, v), {"cu_seqlens": cu}, ValueError, "q"),
        ("max_seqlen too small", (q1, k1, v1), {"cu_seqlens": cu, "max_seqlen": 4}, ValueError, "max_seqlen"),
        ("max_seqlen float", (q1, k1, v1), {"cu_seqlens": cu, "max_seqlen": 5.0}, TypeError, "max_seqlen"),
        ("prefix_len > S", (q, k, v), {"prefix_len": 9}, ValueError, "prefix_len"),
        ("prefix_len < 0", (q, k, v), {"prefix_len": -1}, ValueError, "prefix_len"),
        ("prefix tensor > S", (q, k, v), {"prefix_len": torch.tensor([2, 9])}, ValueError, "prefix_len"),
        ("prefix tensor length", (q, k, v), {"prefix_len": torch.tensor([2, 3, 4])}, ValueError, "prefix_len"),
        ("prefix tensor float", (q, k, v), {"prefix_len": torch.tensor([2.0, 3.0])}, TypeError, "prefix_len"),
        ("prefix float", (q, k, v), {"prefix_len": 2.5}, TypeError, "prefix_len"),
        ("prefix > a varlen sequence", (q1, k1, v1), {"cu_seqlens": cu, "prefix_len": torch.tensor([4, 1])},
         ValueError, "prefix_len"),
        ("causal not bool", (q, k, v), {"causal": 1}, TypeError, "causal"),
        ("window str", (q, k, v), {"window_size": "4"}, TypeError, "window_size"),
        ("window of 3", (q, k, v), {"window_size": (1, 2, 3)}, TypeError, "window_size"),
        ("window bool", (q, k, v), {"window_size": (True, 1)}, TypeError, "window_size"),
        ("window < -1", (q, k, v), {"window_size": (-2, 0)}, ValueError, "window_size"),
        ("softcap str", (q, k, v), {"softcap": "1"}, TypeError, "softcap"),
        ("softcap < 0", (q, k, v), {"softcap": -1.0}, ValueError, "softcap"),
        ("softcap nan", (q, k, v), {"softcap": float("nan")}, ValueError, "softcap"),
        ("alibi fp16", (q, k, v), {"alibi_slopes": torch.rand(4).half()}, TypeError, "alibi_slopes"),
        ("alibi shape", (q, k, v), {"alibi_slopes": torch.rand(3)}, ValueError, "alibi_slopes"),
        ("alibi batch", (q, k, v), {"alibi_slopes": torch.rand(3, 4)}, ValueError, "alibi_slopes"),
        ("alibi list", (q, k, v), {"alibi_slopes": [0.5] * 4}, TypeError, "alibi_slopes"),
        ("cu_seqlens_k alone", (q1, k1, v1), {"cu_seqlens_k": cu}, ValueError, "cu_seqlens_k"),
        ("max_seqlen_k alone", (q1, k1, v1), {"cu_seqlens": cu, "max_seqlen_k": 5}, ValueError, "max_seqlen_k"),
        ("cu_seqlens_k int64", (q1, k1, v1), {"cu_seqlens": cu, "cu_seqlens_k": cu.long()}, TypeError,
         "cu_seqlens_k"),
        ("cu_seqlens_k entries", (q1, k1, v1), {"cu_seqlens": cu, "cu_seqlens_k": cu[:2]}, ValueError,
         "cu_seqlens_k"),
        ("cu_seqlens_k wrong end", (q1, k1, v1), {"cu_seqlens": cu, "cu_seqlens_k": torch.tensor([0, 3, 9],
                                                   dtype=torch.int32)}, ValueError, "cu_seqlens_k"),
        ("cu_seqlens_k not increasing", (q1, k1, v1), {"cu_seqlens": cu, "cu_seqlens_k": torch.tensor(
            [0, 0, 8], dtype=torch.int32)}, ValueError, "cu_seqlens_k"),
        ("max_seqlen_k too small", (q1, k1, v1), {"cu_seqlens": cu, "cu_seqlens_k": torch.tensor(
            [0, 6, 8], dtype=torch.int32), "max_seqlen_k": 5}, ValueError, "max_seqlen_k"),
        ("max_seqlen_k float", (q1, k1, v1), {"cu_seqlens": cu, "cu_seqlens_k": cu, "max_seqlen_k": 5.0},
         TypeError, "max_seqlen_k"),
        ("varlen k length without cu_seqlens_k", (q1, k1[:, :6], v1[:, :6]), {"cu_seqlens": cu}, ValueError, "k"),
        ("prefix > a key length", (q1, k1, v1), {"cu_seqlens": cu, "cu_seqlens_k": torch.tensor(
            [0, 6, 8], dtype=torch.int32), "prefix_len": torch.tensor([2, 3])}, ValueError, "prefix_len"),
        ("softmax_scale str", (q, k, v), {"softmax_scale": "0.1"}, TypeError, "softmax_scale"),
        ("unknown backend", (q, k, v), {"backend": "flash"}, ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_flash_attention_bad_inputs_name_the_argument(case):
    _, args, kwargs, exc, name = case
    with pytest.raises(exc, match=rf"^{name}: .*expected.*got"):
        ops.flash_attention(*(a.to(DEVICE) for a in args),
                            **{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})


@pytest.mark.parametrize("backend", kernel_backends())
def test_flash_attention_float64_is_for_the_torch_backend(backend):
    q = torch.randn(1, 4, 2, 16, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="^q: "):
        ops.flash_attention(q, q, q, backend=backend)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("b,s,h,h_kv,d,kwargs", [
    (2, 1024, 8, 8, 128, {"causal": False}),
    (2, 1024, 8, 2, 64, {"causal": True}),
    (1, 2048, 4, 4, 128, {"prefix_len": 576}),
    (1, 4096, 4, 2, 128, {"causal": True}),
    (1, 3000, 2, 1, 96, {"causal": False}),
], ids=str)
def test_flash_attention_large_gpu(b, s, h, h_kv, d, kwargs, backend):
    check_attention(backend, BF16, b, s, s, h, h_kv, d, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
def test_flash_attention_varlen_large_gpu(backend):
    lengths = [1, 1500, 700, 2048, 33]
    total = sum(lengths)
    check_attention(backend, BF16, 1, total, total, 8, 2, 128, cu_seqlens=_cu(lengths),
                    prefix_len=torch.tensor([0, 576, 576, 256, 33], dtype=torch.int32, device=DEVICE))
