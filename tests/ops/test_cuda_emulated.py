"""The csrc CUDA kernels, run without a GPU: the same .cu sources compiled for the CPU emulator
(benchmarks/cuda_emulator.py, csrc/emulation), driven through the public ops with backend="cuda" on
CPU tensors and compared with the float64 reference, forward and backward.

The emulated device refuses what the GPU of its architecture refuses (launch limits, the opt-in
shared memory, alignment and memory spaces of ldmatrix / cp.async, warp collectives every lane
takes part in; tests/ops/test_cuda_emulator_strict.py shows each refusal). Every test runs on an
sm_90 device; the cases whose launch plan depends on the device (attention tiles, shared-memory
plans) run on sm_80 and sm_86 as well. This checks the kernels' logic (indexing, masks, reductions,
tiling, fragment plumbing, the launch plans); timing remains for the GPU tests, and the sanitized
reruns at the end stand in for compute-sanitizer.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cuda_emulator
from mmgpt_engine import ops
from mmgpt_engine.ops import reference
from tests.helpers import assert_close_to_truth, check_fwd_bwd

pytestmark = pytest.mark.xdist_group("cuda_emulated")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ARCHS = ("sm_80", "sm_86", "sm_90")  # A100 (163 KB opt-in), RTX 3090 / 4090 class (99 KB), H100 (227 KB)


@pytest.fixture(scope="module")
def emulator():
    try:
        return cuda_emulator.EmulatedExtension(cuda_emulator.build())
    except cuda_emulator.EmulatorUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def arch():
    """The emulated architecture; tests parametrize it to run on several."""
    return "sm_90"


@pytest.fixture
def emulated_cuda(emulator, arch):
    """backend="cuda" runs the emulated kernels on CPU tensors, on an `arch` device with 4 SMs."""
    emulator.use_device(arch)
    with cuda_emulator.emulated_cuda(emulator):
        yield emulator


# ------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("kind,shape,dtype,unaligned", [
    ("layer", (7, 100), F16, False),     # a warp per row, 4 rows per block, a partial last block
    ("rms", (5, 1030), BF16, True),      # a block per row, scalar loads
    ("layer", (3, 4096), F32, False),    # a block per row, vector loads
    ("layer", (2, 9000), F32, False),    # backward longer than float32's register budget: looped
    ("rms", (2, 17000), F16, True),      # forward and backward looped, scalar loads
], ids=str)
def test_norms(emulated_cuda, kind, shape, dtype, unaligned):
    n = shape[-1]
    x, r = torch.randn(shape), torch.randn(shape)
    w, b = 1 + 0.5 * torch.randn(n), torch.randn(n)
    if kind == "layer":
        check_fwd_bwd(lambda x, r, w, b: ops.layer_norm(x, w, b, residual=r, backend="cuda"),
                      lambda x, r, w, b: reference.layer_norm(x, w, b, 1e-5, residual=r), [x, r, w, b], dtype,
                      unaligned=unaligned)
    else:
        check_fwd_bwd(lambda x, r, w: ops.rms_norm(x, w, residual=r, backend="cuda"),
                      lambda x, r, w: reference.rms_norm(x, w, 1e-6, residual=r), [x, r, w], dtype,
                      unaligned=unaligned)


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_backward_keeps_partial_sums_in_opted_in_shared_memory(emulated_cuda, arch):
    """8192 float32 columns, weight and bias: 64 KB of partial sums per block, above the 48 KB default,
    so the backward opts in (every arch has room) instead of taking the looped path."""
    x, w, b = torch.randn(2, 8192), torch.randn(8192), torch.randn(8192)
    check_fwd_bwd(lambda x, w, b: ops.layer_norm(x, w, b, backend="cuda"),
                  lambda x, w, b: reference.layer_norm(x, w, b), [x, w, b], F32)
    assert emulated_cuda.calls(f"launch with {2 * 8192 * 4} B") >= 1


def test_norm_backward_without_room_for_shared_partials_takes_the_looped_path(emulated_cuda):
    emulated_cuda.use_device("sm_90", sm_count=3, smem_optin=8 * 1024)  # too little for the partial sums
    x, w, b = torch.randn(6, 2048), torch.randn(2048), torch.randn(2048)
    check_fwd_bwd(lambda x, w, b: ops.layer_norm(x, w, b, backend="cuda"),
                  lambda x, w, b: reference.layer_norm(x, w, b), [x, w, b], BF16)


def test_norm_without_affine_params(emulated_cuda):
    check_fwd_bwd(lambda x: ops.layer_norm(x, None, None, backend="cuda"), lambda x: reference.layer_norm(x),
                  [torch.randn(9, 33)], F32)


def _layer_norm_case(shape, dtype, unaligned=False):
    n = shape[-1]
    x, r, w, b = torch.randn(shape), torch.randn(shape), 1 + 0.5 * torch.randn(n), torch.randn(n)
    check_fwd_bwd(lambda x, r, w, b: ops.layer_norm(x, w, b, residual=r, backend="cuda"),
                  lambda x, r, w, b: reference.layer_norm(x, w, b, 1e-5, residual=r), [x, r, w, b], dtype,
                  unaligned=unaligned)


@pytest.mark.parametrize("shape,dtype,smem_optin,unaligned,fwd_smem,bwd_smem", [
    # warp rows: 16 blocks of 4 warps on the SM, 66 rows; weight and bias staged (2 x 192 B), the
    # backward's partial sums (8192 B) then its weight
    ((66, 96), F16, None, False, 384, 8192 + 192),
    ((66, 96), F16, 8192 + 100, True, 384, 8192),   # room for the partial sums only: the weight from global
    ((66, 96), F16, 256, False, 0, None),           # no room to stage: from global; backward looped
    # block rows: 4 blocks of 512 threads, 6 rows
    ((6, 4096), BF16, None, False, 2 * 8192, 2 * 4096 * 4 + 8192),
], ids=str)
def test_norm_blocks_walk_rows_reading_the_parameters_once(emulated_cuda, shape, dtype, smem_optin, unaligned,
                                                           fwd_smem, bwd_smem):
    """More rows than the one SM's blocks: each block (warp) walks several rows with the weight and
    bias it staged in shared memory (or, where the device has no room, read from global memory)."""
    emulated_cuda.use_device("sm_90", sm_count=1, smem_optin=smem_optin)
    before = {b: emulated_cuda.calls(f"launch with {b} B") for b in (fwd_smem, bwd_smem) if b is not None}
    _layer_norm_case(shape, dtype, unaligned)
    for b, count in before.items():
        assert emulated_cuda.calls(f"launch with {b} B") > count, f"no launch with {b} B of shared memory"


@pytest.mark.parametrize("kind,shape,dtypes", [
    ("layer", (6, 1024), (BF16, F32, F32)),   # warp rows: float32 weight and bias read as float32
    ("layer", (3, 2050), (F16, BF16, F32)),   # block rows, unaligned: a bfloat16 weight beside a float32 bias
    ("rms", (1, 16500), (BF16, F32, None)),   # looped (above 16384 bfloat16 elements)
], ids=str)
def test_norm_mixed_precision_parameters(emulated_cuda, kind, shape, dtypes):
    """Half activations with float32 parameters: the kernels read them, and write their gradients, as
    float32 (a parameter in another dtype beside them is converted to float32 first). Against the
    float64 reference on the same rounded inputs, forward and backward; each gradient in its
    parameter's dtype."""
    x_dtype, w_dtype, b_dtype = dtypes
    n = shape[-1]
    inputs = [torch.randn(shape).to(x_dtype), torch.randn(shape).to(x_dtype), (1 + 0.5 * torch.randn(n)).to(w_dtype)]
    inputs += [torch.randn(n).to(b_dtype)] if b_dtype is not None else []
    grads = [torch.randn(shape).to(x_dtype) for _ in range(2)]

    def run(fn, cast):
        leaves = [cast(t).requires_grad_() for t in inputs]
        outs = fn(*leaves)
        torch.autograd.backward(outs, [cast(g) for g in grads])
        return outs, [t.grad for t in leaves]

    def norm(impl, backend=None):
        def fn(x, r, w, b=None):
            kw = {} if backend is None else {"backend": backend}
            if kind == "layer":
                return impl.layer_norm(x, w, b, 1e-5, residual=r, **kw)
            return impl.rms_norm(x, w, 1e-6, residual=r, **kw)
        return fn

    got, got_g = run(norm(ops, "cuda"), lambda t: t.clone())
    truth, truth_g = run(norm(reference), lambda t: t.double())
    lowp, lowp_g = run(norm(reference), lambda t: t.clone())
    for name, a, t, c in zip(("y", "h"), got, truth, lowp):
        assert a.dtype == x_dtype
        assert_close_to_truth(name, a, t, c)
    for name, a, t, c, inp in zip(("dx", "dresidual", "dweight", "dbias"), got_g, truth_g, lowp_g, inputs):
        assert a.dtype == inp.dtype, (name, a.dtype)
        assert_close_to_truth(name, a, t, c)


# ----------------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("shape,dtype,mask,causal", [
    ((2, 7, 77), F16, "bool", True),         # a warp per row
    ((3, 1000), F32, "float64", False),      # a block per row, additive float64 mask
    ((2, 3, 300), BF16, "half", True),       # broadcast (3, 1, 300)-like mask per row
    ((2, 20000), BF16, "bool", False),       # looped forward and backward
], ids=str)
def test_softmax(emulated_cuda, shape, dtype, mask, causal):
    n = shape[-1]
    m = {"bool": torch.rand(n) > 0.3, "float64": torch.randn(n).double(),
         "half": torch.randn(shape[-2], 1, n).half().squeeze(1) if len(shape) > 2 else None}[mask]
    check_fwd_bwd(lambda x: ops.softmax(x, scale=0.7, mask=m, causal=causal, backend="cuda"),
                  lambda x: reference.softmax(x, 0.7, m, causal), [torch.randn(shape)], dtype)


def test_softmax_fully_masked_rows_are_zero(emulated_cuda):
    mask = torch.rand(4, 9) > 0.5
    mask[1] = False
    check_fwd_bwd(lambda x: ops.softmax(x, mask=mask, backend="cuda"), lambda x: reference.softmax(x, 1.0, mask),
                  [torch.randn(4, 9)], F32, unaligned=True)


# ----------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("rows,v,dtype", [(5, 1, F32), (9, 1000, BF16), (3, 70001, F32)], ids=str)
def test_cross_entropy(emulated_cuda, rows, v, dtype):
    target = torch.randint(0, v, (rows,))
    target[0] = -100
    check_fwd_bwd(lambda x: ops.cross_entropy(x, target, reduction="none", backend="cuda"),
                  lambda x: reference.cross_entropy(x, target, reduction="none").float(), [4 * torch.randn(rows, v)],
                  dtype)


def test_cross_entropy_kernel_gives_nan_for_an_out_of_range_target(emulated_cuda):
    """The launcher's contract (ops.cross_entropy refuses such targets before they get here)."""
    loss, lse = emulated_cuda.cross_entropy_fwd(torch.randn(3, 5), torch.tensor([1, 5, -1]), -100)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all() and torch.isfinite(lse).all()


# ----------------------------------------------------------------------------- attention
def _attention_case(b, s_q, s_k, h, h_kv, d, dtype, **kwargs):
    q, k, v = torch.randn(b, s_q, h, d), torch.randn(b, s_k, h_kv, d), torch.randn(b, s_k, h_kv, d)
    check_fwd_bwd(lambda q, k, v: ops.flash_attention(q, k, v, return_lse=True, backend="cuda", **kwargs),
                  lambda q, k, v: reference.flash_attention(q, k, v, return_lse=True, **kwargs), [q, k, v], dtype,
                  n_grad_outputs=1)  # lse carries no gradient


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("s_q,s_k,d,dtype,kwargs", [
    (70, 70, 64, F16, {}),                                  # a partial query and key block
    (40, 100, 128, BF16, {"causal": True}),                 # bottom-right causal, more keys
    (100, 40, 64, F16, {"causal": True}),                   # queries that see no key
    (90, 90, 64, BF16, {"prefix_len": 70}),                 # the prefix crosses a key block
    (30, 80, 64, F16, {"prefix_len": 50, "softmax_scale": 0.3}),
    (65, 130, 128, F16, {"causal": False}),
], ids=str)
def test_flash_attention(emulated_cuda, arch, s_q, s_k, d, dtype, kwargs):
    _attention_case(1, s_q, s_k, 2, 1, d, dtype, **kwargs)


def test_flash_attention_varlen_with_per_sequence_prefix(emulated_cuda):
    lengths = [5, 66, 20]
    cu = torch.tensor([0, 5, 71, 91], dtype=torch.int32)
    prefix = torch.tensor([2, 65, 0], dtype=torch.int32)
    _attention_case(1, sum(lengths), sum(lengths), 2, 2, 64, BF16, cu_seqlens=cu, prefix_len=prefix)


def test_flash_attention_per_batch_prefix_and_gqa(emulated_cuda):
    _attention_case(2, 33, 33, 4, 2, 64, F16, prefix_len=torch.tensor([0, 20]))


def test_flash_attention_strided_and_misaligned_inputs(emulated_cuda):
    qkv = torch.randn(1, 20, 3, 2, 65).half()

    def run(q, k, v):
        return ops.flash_attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    packed = qkv[..., 1:].unbind(2)  # views with strides, rows 2 bytes past 16-byte alignment
    out, lse = run(*packed)
    ref_out, ref_lse = reference.flash_attention(*(t.double() for t in packed), causal=True, return_lse=True)
    low_out, low_lse = reference.flash_attention(*packed, causal=True, return_lse=True)
    assert_close_to_truth("out", out, ref_out, low_out)
    assert_close_to_truth("lse", lse, ref_lse, low_lse)


def test_flash_attention_no_keys(emulated_cuda):
    q, k = torch.randn(1, 5, 2, 64).half(), torch.randn(1, 0, 2, 64).half()
    out, lse = ops.flash_attention(q, k, k, return_lse=True, backend="cuda")
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_flash_attention_backward_without_queries_gives_zero_key_gradients(emulated_cuda):
    """seqlen_q = 0, seqlen_k > 0: the dK/dV blocks have no query block; they write zeros and exit
    with no cp.async in flight (the emulator refuses a thread that exits before waiting for its copies)."""
    q, k, v = torch.randn(1, 0, 2, 64).half(), torch.randn(1, 70, 2, 64).half(), torch.randn(1, 70, 2, 64).half()
    out, lse = emulated_cuda.flash_attn_fwd(q, k, v, None, None, None, False, 0.125)
    dq, dk, dv = emulated_cuda.flash_attn_bwd(torch.empty_like(out), q, k, v, out, lse, None, None, None, False, 0.125)
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


def _dq_launches(ext, d, keys):
    """Launches with the dynamic shared memory of the dQ kernel at head dim d with `keys` per block."""
    return ext.calls(f"launch with {(2 * 64 + 4 * keys) * (d + 8) * 2} B")


@pytest.mark.parametrize("arch,keys", [("sm_80", 64), ("sm_86", 32), ("sm_90", 64)])
def test_dq_tiles_follow_the_devices_shared_memory(emulated_cuda, arch, keys):
    """Head dim 128: the 64-key dQ tiles take 104,448 B, more than the 101,376 B an sm_86 block may
    opt in to, so that card gets 32-key tiles (69,632 B); sm_80 and sm_90 keep 64."""
    before = {n: _dq_launches(emulated_cuda, 128, n) for n in (32, 64)}
    _attention_case(1, 70, 70, 2, 2, 128, F16, causal=True)
    after = {n: _dq_launches(emulated_cuda, 128, n) for n in (32, 64)}
    assert after[keys] > before[keys] and after[96 - keys] == before[96 - keys], (arch, before, after)


def test_launchers_query_each_device_once_and_opt_each_kernel_in_once(emulated_cuda):
    """Head dim 128 forward + backward: the dQ launcher reads the device's SM count and opt-in shared
    memory, and the forward, dK/dV and dQ kernels opt in to theirs, on the first run on a device only."""
    def asked():
        return emulated_cuda.calls("cudaDeviceGetAttribute"), emulated_cuda.calls("cudaFuncSetAttribute")

    for sm_count in (7, 9):  # devices no other test uses
        emulated_cuda.use_device("sm_86", sm_count=sm_count)
        deltas = []
        for _ in range(3):
            start = asked()
            _attention_case(1, 70, 70, 2, 2, 128, BF16, causal=True)
            deltas.append(tuple(a - b for a, b in zip(asked(), start)))
        assert deltas == [(2, 3), (0, 0), (0, 0)], (sm_count, deltas)


class _PackedAttention(torch.autograd.Function):
    """The emulated extension's forward and backward on a packed batch that may hold empty sequences
    (which the public op refuses, and the kernels' contract takes)."""

    @staticmethod
    def forward(ctx, ext, cu, max_seqlen, q, k, v):
        out, lse = ext.flash_attn_fwd(q, k, v, cu, max_seqlen, None, True, q.shape[-1] ** -0.5)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ext, ctx.cu, ctx.max_seqlen = ext, cu, max_seqlen
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = ctx.ext.flash_attn_bwd(dout.contiguous(), q, k, v, out, lse, ctx.cu, ctx.max_seqlen, None, True,
                                       q.shape[-1] ** -0.5)
        return (None, None, None) + tuple(grads)


def test_flash_attention_over_70000_packed_sequences(emulated_cuda):
    """grid.z counts the sequences and stops at 65,535 on every GPU: 70,000 sequences launch in slices.
    The emulator refuses a larger grid.z and runs every block, so most sequences are empty (cheap
    blocks) and the rest sit at both ends of each slice, compared with the float64 reference,
    forward and backward."""
    n = 70_000
    lengths = torch.zeros(n, dtype=torch.int32)
    at = [0, 1, 65_533, 65_534, 65_535, 65_536, 69_999]
    lengths[at] = torch.tensor([3, 1, 5, 2, 4, 6, 2], dtype=torch.int32)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    cu_nonempty = torch.cat([torch.zeros(1, dtype=torch.int32), lengths[at].cumsum(0).int()])
    total = int(cu[-1])
    q, k, v = torch.randn(1, total, 2, 64), torch.randn(1, total, 1, 64), torch.randn(1, total, 1, 64)
    launches = emulated_cuda.calls("launch")
    check_fwd_bwd(lambda q, k, v: _PackedAttention.apply(emulated_cuda, cu, 6, q, k, v),
                  lambda q, k, v: reference.flash_attention(q, k, v, causal=True, cu_seqlens=cu_nonempty,
                                                            return_lse=True),
                  [q, k, v], F16, n_grad_outputs=1)
    assert emulated_cuda.calls("launch") - launches == 7  # forward, dK/dV and dQ in two slices each; delta once


# ------------------------------------------------------------------------------- under sanitizers
@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param("address", marks=pytest.mark.xdist_group("cuda_emulated_asan")),
                                  pytest.param("thread", marks=pytest.mark.xdist_group("cuda_emulated_tsan"))])
def test_every_kernel_under_a_sanitizer(mode, tmp_path):
    """Every test above again (but the 70,000-sequence one, for time), on kernels built for a sanitizer
    (benchmarks.cuda_emulator.SANITIZE_BUILDS). address: no access outside a tensor, a __shared__
    array or the dynamic shared memory, no undefined behaviour. thread: no shared-memory access
    unordered by a barrier against another thread's write (a missing __syncthreads, even one the
    emulator's fixed schedule would forgive)."""
    try:
        sanitizer = cuda_emulator.sanitizer_env(mode, tmp_path / "report")
    except cuda_emulator.EmulatorUnavailable as e:
        pytest.skip(str(e))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(sanitizer, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                           "-k", "not under_a_sanitizer and not 70000"], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=1800)
    reports = "".join(p.read_text() for p in tmp_path.glob("report*"))
    found = [marker for marker in cuda_emulator.SANITIZER_RUNS[mode][2] if marker in reports]
    assert proc.returncode == 0 and not found, f"{reports[-8000:]}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
