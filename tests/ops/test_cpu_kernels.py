"""The torch backend's compiled CPU kernels (csrc/cpu/kernels.cpp through `ops.cpu`) against the
float64 reference, forward and backward, on fresh random inputs: every code path (vector tails,
several row blocks, short rows in vector lanes, the vocab sizes of each cross-entropy path), plus
when the torch backend takes them, when it does not, and that their results do not depend on the
thread count."""
import os
import subprocess
import sys

import pytest
import torch

from mmgpt_engine import ops
from mmgpt_engine.ops import cpu, reference
from tests.helpers import check_fwd_bwd

F32 = torch.float32


@pytest.fixture(scope="module", autouse=True)
def built():
    reason = cpu.unavailable_reason()
    assert reason is None, f"the CPU kernels do not build here: {reason}"


# shapes: (rows...) x hidden; 130 rows are three row blocks of the weight-gradient reduction; 129 and
# 33 leave a vector tail; 7 is shorter than one vector
NORM_SHAPES = [(3, 7, 129), (130, 33), (2, 1000), (5, 7)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norm_kernels_match_the_reference(kind, residual, affine, shape):
    n = shape[-1]
    is_rms = kind == "rms_norm"
    x = torch.randn(shape) * 2 + 0.5
    r = torch.randn(shape) if residual else None
    w = 1 + 0.3 * torch.randn(n) if affine != "none" else None
    b = torch.randn(n) if affine == "weight+bias" and not is_rms else None
    eps = 1e-5

    def kernel(x, r, w, b):
        out = cpu.norm(x, w, b, r, eps, is_rms)
        y = out[0] if residual else out
        assert type(y.grad_fn).__name__ == "_NormBackward"
        return out

    def ref(x, r, w, b):
        if is_rms:
            return reference.rms_norm(x, w, eps, residual=r)
        return reference.layer_norm(x, w, b, eps, residual=r)

    check_fwd_bwd(kernel, ref, [x, r, w, b], F32)


SOFTMAX_CASES = [((3, 7, 11), False), ((3, 7, 11), True), ((2, 9, 5), True), ((5, 3, 40), True),
                 ((4, 100), False), ((6, 1), False), ((2, 66, 130), False)]


@pytest.mark.parametrize("scale", [1.0, 0.7, -1.3])
@pytest.mark.parametrize("shape,causal", SOFTMAX_CASES, ids=lambda c: str(c))
def test_softmax_kernels_match_the_reference(shape, causal, scale):
    x = torch.randn(shape) * 3

    def kernel(x):
        y = cpu.softmax(x, scale, causal)
        assert type(y.grad_fn).__name__ == "_SoftmaxBackward"
        return y

    (y,), _ = check_fwd_bwd(kernel, lambda x: reference.softmax(x, scale, causal=causal), [x], F32)
    if causal and shape[-2] > shape[-1]:  # the first rows see nothing: zeros, as the reference gives
        assert y[:, : shape[-2] - shape[-1]].abs().max() == 0


# vocab sizes: below two vectors (a row per vector lane), up to 1024 (rows in cache, three passes),
# beyond (a row at a time); 70 rows leave a partial lane group and a partial row block
VOCABS = [1, 5, 21, 31, 32, 33, 259, 1024, 1500]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("vocab", VOCABS)
def test_cross_entropy_kernels_match_the_reference(vocab, reduction):
    target = torch.randint(0, vocab, (7, 10))
    target[::3, ::4] = -100
    logits = torch.randn(7, 10, vocab) * 4

    def kernel(logits):
        loss = cpu.cross_entropy(logits, target, -100, reduction)
        assert type(loss.grad_fn).__name__ == "_CrossEntropyBackward"
        return loss

    check_fwd_bwd(kernel, lambda x: reference.cross_entropy(x, target, reduction=reduction), [logits], F32)


def test_cross_entropy_kernel_mean_over_no_counted_row_is_zero_with_a_zero_gradient():
    for vocab in (21, 300):
        logits = torch.randn(9, vocab, requires_grad=True)
        loss = cpu.cross_entropy(logits, torch.full((9,), -100), -100, "mean")
        loss.backward()
        assert loss.item() == 0.0 and logits.grad.abs().max().item() == 0.0


def test_cross_entropy_kernel_refuses_a_target_out_of_range():
    logits = torch.randn(4, 21)
    with pytest.raises(IndexError, match=r"target: expected class indices in \[0, 21\).*got 21 at row 2"):
        cpu.cross_entropy(logits, torch.tensor([0, 3, 21, -100]), -100, "mean")
    with pytest.raises(ValueError, match="target"):  # the public op names it its own way
        ops.cross_entropy(logits, torch.tensor([0, 3, 21, -100]), backend="torch")


def test_the_kernels_guard_their_contract():
    ext = cpu.extension()
    with pytest.raises(RuntimeError, match="x: expected float32, got Double"):
        ext.norm_fwd(torch.randn(3, 4, dtype=torch.float64), None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="residual: expected shape"):
        ext.norm_fwd(torch.randn(3, 4), torch.randn(4, 3), None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="x: expected a contiguous tensor"):
        ext.softmax_fwd(torch.randn(4, 6).t(), 1.0, 0)
    with pytest.raises(RuntimeError, match="causal_rows: expected 0 or a divisor"):
        ext.softmax_fwd(torch.randn(10, 6), 1.0, 3)


def _backward_name(out):
    return type((out[0] if isinstance(out, tuple) else out).grad_fn).__name__


def test_the_torch_backend_runs_them_on_float32_cpu_tensors_and_the_plain_route_otherwise():
    x = torch.randn(4, 6, 32, requires_grad=True)
    r = torch.randn(4, 6, 32)
    w = torch.randn(32, requires_grad=True)
    t = torch.randint(0, 32, (4, 6))
    assert _backward_name(ops.rms_norm(x, w, residual=r, backend="torch")) == "_NormBackward"
    assert _backward_name(ops.layer_norm(x, w, w, backend="torch")) == "_NormBackward"
    assert _backward_name(ops.softmax(x, causal=True, backend="torch")) == "_SoftmaxBackward"
    assert _backward_name(ops.cross_entropy(x, t, backend="torch")) == "_CrossEntropyBackward"
    heads = x.view(4, 6, 2, 16)
    assert _backward_name(ops.flash_attention(heads, heads, heads, prefix_len=2, backend="torch")) == \
        "_AttentionBackward"
    # what the kernels do not cover goes the plain-PyTorch way, with the same meaning
    plain = [ops.rms_norm(x.bfloat16(), w.bfloat16(), backend="torch"),
             ops.rms_norm(x.double(), w.double(), backend="torch"),
             ops.rms_norm(x, w, offset=1.0, backend="torch"),
             ops.layer_norm(x, w.bfloat16(), backend="torch"),
             ops.softmax(x, mask=torch.rand(6, 32) > 0.3, backend="torch"),
             ops.cross_entropy(x, t, label_smoothing=0.1, backend="torch"),
             ops.cross_entropy(x, t, weight=torch.rand(32), backend="torch"),
             ops.flash_attention(x.view(4, 6, 2, 16).bfloat16(), x.view(4, 6, 2, 16).bfloat16(),
                                 x.view(4, 6, 2, 16).bfloat16(), causal=True, backend="torch")]
    for out in plain:
        assert not _backward_name(out).startswith("_")


def test_torch_compile_traces_the_plain_route_without_a_graph_break():
    def block(x, w, t):
        y, h = ops.rms_norm(x, w, residual=x, backend="torch")
        a = ops.flash_attention(*(y.view(3, 5, 2, 8),) * 3, prefix_len=2, backend="torch").reshape(3, 5, 16)
        return ops.cross_entropy(ops.softmax(y + a, backend="torch"), t, backend="torch") + h.sum()

    x, w, t = torch.randn(3, 5, 16), torch.randn(16), torch.randint(0, 16, (3, 5))
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, t), block(x, w, t))


def test_results_do_not_depend_on_the_thread_count():
    x = torch.randn(300, 96)
    w = torch.randn(96, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    logits, target = torch.randn(300, 500), torch.randint(0, 500, (300,))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xx = x.clone().requires_grad_()
            y = cpu.norm(xx, w, b, None, 1e-5, False)
            dx, dw, db = torch.autograd.grad(y, [xx, w, b], torch.ones_like(y) + x)
            loss = cpu.cross_entropy(logits, target, -100, "mean")
            qkv = torch.randn(4, 40, 3, 4, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
            o = ops.flash_attention(*qkv.unbind(2), prefix_len=9, backend="torch")
            (dqkv,) = torch.autograd.grad(o, [qkv], torch.ones_like(o))
            results.append([y.detach(), dx, dw, db, loss.detach(), o.detach(), dqkv])
    finally:
        torch.set_num_threads(before)
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_switched_off_by_the_environment():
    code = ("import torch; from mmgpt_engine import ops; from mmgpt_engine.ops import cpu\n"
            "x = torch.randn(3, 8, requires_grad=True)\n"
            "print(type(ops.rms_norm(x, None, backend='torch').grad_fn).__name__)\n"
            "print(cpu.unavailable_reason())\n")
    env = dict(os.environ, MMGPT_CPU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    name, reason = out.stdout.strip().splitlines()
    assert not name.startswith("_") and "MMGPT_CPU_KERNELS=0" in reason


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_kernel_keeps_its_precision_far_from_zero(residual):
    """Rows whose mean is far larger than their spread: the one-pass statistics are shifted by the
    row's first value, so they do not cancel."""
    x = 500 + 0.05 * torch.randn(6, 300)
    r = 0.05 * torch.randn(6, 300) if residual else None
    w, b = 1 + 0.3 * torch.randn(300), torch.randn(300)
    check_fwd_bwd(lambda x, r, w, b: cpu.norm(x, w, b, r, 1e-5, False),
                  lambda x, r, w, b: reference.layer_norm(x, w, b, 1e-5, residual=r), [x, r, w, b], F32)


# attention: (B, S_q, S_k, H, H_kv, D, mask options); 37 query rows leave a partial row block, D 40
# and 8 a vector tail (and 8 less than one vector), S_q > S_k bottom-right causal rows that see nothing
ATTENTION_CASES = [
    ((2, 16, 16, 4, 4, 32), {}),
    ((2, 37, 37, 4, 2, 40), {"causal": True}),
    ((3, 26, 26, 4, 4, 32), {"prefix_len": 8}),
    ((2, 21, 21, 6, 2, 8), {"prefix_len": torch.tensor([3, 21])}),
    ((1, 40, 40, 2, 1, 64), {"window_size": (5, 3)}),
    ((2, 19, 19, 2, 2, 16), {"causal": True, "window_size": (4, -1), "softmax_scale": 0.31}),
    ((2, 12, 7, 4, 4, 16), {"causal": True}),
    ((2, 7, 12, 4, 1, 24), {"prefix_len": 9}),
    ((1, 70, 70, 3, 3, 130), {"causal": True}),
]


@pytest.mark.parametrize("shape,options", ATTENTION_CASES, ids=lambda c: str(c))
def test_attention_kernel_matches_the_reference(shape, options):
    b, s_q, s_k, h, h_kv, d = shape
    q, k, v = torch.randn(b, s_q, h, d), torch.randn(b, s_k, h_kv, d), torch.randn(b, s_k, h_kv, d)

    def kernel(q, k, v):
        out = ops.flash_attention(q, k, v, backend="torch", **options)
        assert type(out.grad_fn).__name__ == "_AttentionBackward"
        return out

    (out,), _ = check_fwd_bwd(kernel, lambda q, k, v: reference.flash_attention(q, k, v, **options), [q, k, v], F32)
    if s_q > s_k:  # causal bottom-right: the first rows see nothing and give 0, as the reference's
        assert out[:, : s_q - s_k].abs().max() == 0


def test_attention_kernel_reads_the_views_of_a_fused_projection():
    b, s, h, h_kv, d = 2, 30, 4, 2, 32
    qkv = torch.randn(b, s, h + 2 * h_kv, d)
    q, k, v = qkv.split([h, h_kv, h_kv], dim=2)  # strided views, as the model's Attention passes them
    assert not q.is_contiguous()
    check_fwd_bwd(lambda q, k, v: ops.flash_attention(q, k, v, prefix_len=6, backend="torch"),
                  lambda q, k, v: reference.flash_attention(q, k, v, prefix_len=6), [q, k, v], F32)


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"prefix_len": 3}, {"prefix_len": torch.tensor([2, 0, 6])}],
                         ids=["full", "causal", "prefix", "prefix-per-sequence"])
def test_attention_kernel_on_packed_sequences(options):
    cu = torch.tensor([0, 5, 9, 20], dtype=torch.int32)
    q, k, v = torch.randn(1, 20, 4, 16), torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16)

    def kernel(q, k, v):
        out = ops.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=11, backend="torch", **options)
        assert type(out.grad_fn).__name__ == "_AttentionBackward"
        return out

    check_fwd_bwd(kernel, lambda q, k, v: reference.flash_attention(q, k, v, cu_seqlens=cu, **options), [q, k, v], F32)


def test_key_ranges_of_a_mask():
    from mmgpt_engine.ops.eager import key_ranges

    keep = reference.attention_keep_mask(5, 7, causal=True, window_size=(2, -1))
    assert key_ranges(keep, 5, 7).tolist() == [[[0, 3], [1, 4], [2, 5], [3, 6], [4, 7]]]
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    assert key_ranges(nothing, 2, 3).tolist() == [[[0, 0], [0, 0]]]
    assert key_ranges(None, 2, 3).tolist() == [[[0, 3], [0, 3]]]
    gap = torch.tensor([[True, False, True]])
    assert key_ranges(gap, 1, 3) is None  # not one run: the kernel cannot take it


def test_attention_kernel_guards_its_contract():
    ext = cpu.extension()
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8)
    ranges = torch.zeros(1, 4, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="k: expected H_kv dividing H = 3, got 2"):
        ext.attention_fwd(q, k, k, ranges, 1.0)
    with pytest.raises(RuntimeError, match=r"ranges: expected contiguous int32 \(1 or 1, 4, 2\)"):
        ext.attention_fwd(q, q, q, ranges[:, :3], 1.0)
    with pytest.raises(RuntimeError, match="q: expected a contiguous last dim"):
        ext.attention_fwd(q.transpose(2, 3), q, q, ranges, 1.0)
    bad = torch.tensor([[[0, 2], [1, 5], [0, 4], [0, 0]]], dtype=torch.int32)
    expected = r"ranges: expected 0 <= lo <= hi <= 4 \(the keys\), got \[1, 5\) at batch 0, row 1"
    with pytest.raises(RuntimeError, match=expected):
        ext.attention_fwd(q, q, q, bad, 1.0)
