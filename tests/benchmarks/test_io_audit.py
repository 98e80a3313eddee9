"""The IO audit's counts (deterministic: interpreted Triton kernels and emulated CUDA kernels, every
load and store counted): the memory-bound kernels move close to the minimum their op needs,
attention stays within the FlashAttention-2 bound, and the tiles a mask hides are never read.

The cuda rows run csrc's kernels on the emulator's counting build (an sm_90 with 132 SMs; the norms
on one of its SMs, see benchmarks/io_audit.py); the counter itself is calibrated first on small
kernels (io_audit_kernels.cu) whose bytes are known."""
import ctypes
import json
from pathlib import Path

import pytest
import torch

from benchmarks import cuda_emulator, io_audit
from mmgpt_engine.ops import available_backends

needs_triton = pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs interpreted Triton")
# one worker builds and runs every emulated case (the builds are cached by content across runs)
emulated = pytest.mark.xdist_group("io_audit_cuda")
HIDDEN = [1024, 4096, 16384]
F16, BF16 = torch.float16, torch.bfloat16


def _by_pass(rows):
    return {r.pass_: r for r in rows}


# ------------------------------------------------------------------------------------ triton
@needs_triton
@pytest.mark.parametrize("n", HIDDEN)
def test_softmax_reads_and_writes_each_row_once(n):
    rows = _by_pass(io_audit.audit_softmax(8, n, F16))
    assert rows["fwd"].ratio <= 1.05 and rows["bwd"].ratio <= 1.15, rows


@needs_triton
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("kind,dtype,residual", [("layer", F16, True), ("rms", BF16, False)])
def test_triton_norms_read_each_row_once_and_their_parameters_once_a_program(kind, dtype, residual, n):
    """64 rows over the interpreter's 4 programs: the weight (and bias) is read 4 times, each row
    once; a kernel that read the parameters once per row would be at ~1.33 (LayerNorm + residual)."""
    rows = _by_pass(io_audit.audit_norm(kind, 64, n, dtype, residual))
    assert rows["fwd"].ratio <= 1.05 and rows["bwd"].ratio <= 1.15, rows


@needs_triton
@pytest.mark.parametrize("n", HIDDEN)
def test_cross_entropy_reads_the_logits_once_a_pass(n):
    rows = _by_pass(io_audit.audit_cross_entropy(8, n, BF16))
    assert rows["fwd"].ratio <= 1.05 and rows["bwd"].ratio <= 1.15, rows


def _check_attention(got: dict, fwd_ratio: float, bwd_ratio: float):
    for mask, rows in got.items():
        assert rows["fwd"].ratio <= fwd_ratio and rows["bwd"].ratio <= bwd_ratio, (mask, rows)
    fwd = {mask: rows["fwd"].bytes for mask, rows in got.items()}
    # a causal mask hides about half the key tiles, the prefix mask fewer: never loaded, never counted
    assert fwd["causal"] < fwd["prefix"] < fwd["none"]
    assert fwd["causal"] < 0.8 * fwd["none"]


@needs_triton
def test_attention_stays_within_the_flash_attention_2_bound_and_skips_hidden_tiles():
    got = {mask: _by_pass(io_audit.audit_attention(1, 200, 2, 1, 32, F16, mask, 70))
           for mask in ("none", "causal", "prefix")}
    _check_attention(got, 1.02, 1.10)


@needs_triton
def test_the_counter_sees_every_byte_of_a_plain_copy():
    """A calibration: a kernel that copies n elements reads and writes exactly n each."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(X, Y, N, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + cols, tl.load(X + cols, mask=cols < N), mask=cols < N)

    x = torch.randn(1000)
    y = torch.empty_like(x)
    traffic = io_audit.TritonTraffic()
    with traffic.counting():
        copy_kernel[(4,)](x, y, 1000, BLOCK=256)
    assert torch.equal(x, y) and traffic.read == traffic.written == 4000


@needs_triton
def test_the_command_writes_json_rows(tmp_path, capsys):
    assert io_audit.main(["--only", "softmax,cross_entropy", "--backend", "triton", "--quick",
                          "--json", str(tmp_path / "a.json")]) == 0
    rows = json.loads((tmp_path / "a.json").read_text())
    assert {r["op"] for r in rows} == {"softmax", "cross_entropy"}
    assert set(rows[0]) >= {"op", "pass", "backend", "shape", "bytes", "min_bytes", "ratio", "predicted_us"}
    assert "predicted" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        io_audit.main(["--only", "softmaxx"])
    with pytest.raises(SystemExit):
        io_audit.main(["--backend", "cudaa"])


# --------------------------------------------------------------------- cuda: the calibration
@pytest.fixture(scope="module")
def calibration():
    """The calibration kernels on the counting build of the emulator."""
    try:
        lib = cuda_emulator.build("count", sources=[Path(__file__).with_name("io_audit_kernels.cu")])
    except cuda_emulator.EmulatorUnavailable as e:
        pytest.skip(str(e))
    for name in ("copy", "staged_copy", "cp_async_copy", "shared_reads", "double_read"):
        getattr(lib, f"traffic_{name}").restype = ctypes.c_int
    lib.traffic_copy.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_bool]
    return lib


def _count(lib, name, tensors, *args):
    """traffic_<name>(*args) on the emulator: {tensor label: (bytes read, bytes written)}."""
    traffic = cuda_emulator.Traffic(lib)
    ptrs = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
    assert traffic.record(name, tensors, lambda: getattr(lib, f"traffic_{name}")(*ptrs)) == 0
    assert cuda_emulator.take_error(lib) is None
    return {label: tuple(v) for label, v in traffic.by_tensor().items()}


@emulated
@pytest.mark.parametrize("dtype,n,aligned", [(torch.float32, 1024, True), (torch.float32, 1001, False),
                                             (F16, 1024, True), (F16, 1001, False)], ids=str)
def test_the_counter_sees_each_byte_of_vector_and_scalar_copies(calibration, dtype, n, aligned):
    """load_vec / store_vec: 16-byte accesses when aligned, one element at a time otherwise."""
    x = torch.randn(n).to(dtype)
    y = torch.empty_like(x)
    got = _count(calibration, "copy", dict(src=x, dst=y), 0 if dtype == torch.float32 else 1, x, y, n, aligned)
    assert torch.equal(x, y)
    assert got == {"src": (n * x.element_size(), 0), "dst": (0, n * x.element_size())}


@emulated
def test_the_counter_leaves_out_local_arrays_and_shared_memory(calibration):
    x = torch.randn(1000)
    y = torch.empty_like(x)
    assert _count(calibration, "staged_copy", dict(src=x, dst=y), x, y, 1000) == {"src": (4000, 0), "dst": (0, 4000)}
    assert torch.equal(x, y)


@emulated
@pytest.mark.parametrize("src_bytes", [16, 8, 0])
def test_cp_async_reads_its_src_size_at_issue(calibration, src_bytes):
    """cp.async reads src-size bytes of global memory (the rest of the 16 is zero-filled); the
    32- and 64-bit stores out of shared memory count at their sizes."""
    chunks = 256
    x = torch.randint(0, 255, (chunks * 16,), dtype=torch.uint8)
    y = torch.empty_like(x)
    got = _count(calibration, "cp_async_copy", dict(src=x, dst=y), x, y, chunks, src_bytes)
    assert got == {"src": (chunks * src_bytes, 0), "dst": (0, chunks * 16)}
    kept = x.view(chunks, 16)[:, :src_bytes]
    assert torch.equal(y.view(chunks, 16)[:, :src_bytes], kept) and not y.view(chunks, 16)[:, src_bytes:].any()


@emulated
def test_lanes_that_read_the_same_bytes_in_one_instruction_move_them_once(calibration):
    """8 warps: all 32 lanes read one float (a broadcast: 4 B a warp), lane pairs one float each
    (64 B), lanes 8 bytes at a 4-byte step (overlapping: 33 words, 132 B)."""
    scale, pair = torch.randn(1), torch.randn(8 * 16)
    words, out = torch.zeros(8 * 33, dtype=torch.int32), torch.empty(256)
    got = _count(calibration, "shared_reads", dict(scale=scale, pair=pair, words=words, dst=out),
                 scale, pair, words, out)
    assert got == {"scale": (8 * 4, 0), "pair": (8 * 64, 0), "words": (8 * 132, 0), "dst": (0, 256 * 4)}


@emulated
def test_a_kernel_that_reads_its_input_twice_is_caught(calibration):
    """The check the audit makes, failing where it should: a copy that reads its input twice moves
    1.5x a copy's minimum (each input read once, each output written once)."""
    x = torch.randn(1000)
    y = torch.empty_like(x)
    got = _count(calibration, "double_read", dict(src=x, dst=y), x, y, 1000)
    assert got == {"src": (8000, 0), "dst": (0, 4000)}  # 1.5x the copy's 8000 B: over the 1.05 bound


@pytest.mark.xdist_group("cuda_emulated")  # the plain build's tests (tests/ops/test_cuda_emulated.py): built once
def test_counting_needs_the_counting_build():
    try:
        plain = cuda_emulator.EmulatedExtension(cuda_emulator.build(""))
    except cuda_emulator.EmulatorUnavailable as e:
        pytest.skip(str(e))
    with pytest.raises(ValueError, match="lib: expected an emulator built to count"):
        with plain.counting():
            pass


@pytest.mark.xdist_group("cuda_emulated")
def test_emulator_builds_in_one_process_keep_their_own_device_caches():
    """The launchers cache each device's limits; with the plain build's sm_80 (4 SMs) queried first,
    the counting build still plans for its own device (one SM of an sm_90), not for the cached sm_80."""
    from mmgpt_engine import ops

    try:
        plain, counter = cuda_emulator.EmulatedExtension(cuda_emulator.build("")), io_audit.cuda_counter()
    except cuda_emulator.EmulatorUnavailable as e:
        pytest.skip(str(e))
    plain.use_device("sm_80")
    with cuda_emulator.emulated_cuda(plain):
        ops.rms_norm(torch.randn(8, 1024).bfloat16(), torch.randn(1024).bfloat16(), backend="cuda")
    rows = io_audit.cuda_norm_rows(1024)
    got = _by_pass(io_audit.audit_norm("rms", rows, 1024, BF16, False, backend="cuda", sm_count=io_audit.CUDA_NORM_SMS))
    # one sm_90 SM holds 16 blocks of 128 threads; four sm_80 SMs would launch all rows / 4 = 64
    assert _blocks(got["fwd"], "norm_fwd_kernel") == 16, got["fwd"].kernels


# --------------------------------------------------------------------------- cuda: the ops
@pytest.fixture(scope="module")
def counter():
    try:
        return io_audit.cuda_counter()
    except cuda_emulator.EmulatorUnavailable as e:
        pytest.skip(str(e))


@emulated
@pytest.mark.parametrize("n", HIDDEN)
def test_cuda_softmax_reads_and_writes_each_row_once(counter, n):
    rows = _by_pass(io_audit.audit_softmax(8, n, F16, backend="cuda"))
    assert rows["fwd"].ratio <= 1.05 and rows["bwd"].ratio <= 1.15, rows
    assert rows["fwd"].device == "sm_90 emulated, 132 SMs"


@emulated
@pytest.mark.parametrize("n", HIDDEN)
def test_cuda_cross_entropy_reads_the_logits_once_a_pass(counter, n):
    rows = _by_pass(io_audit.audit_cross_entropy(8, n, BF16, backend="cuda"))
    assert rows["fwd"].ratio <= 1.05 and rows["bwd"].ratio <= 1.15, rows
    logits = 8 * n * 2
    # the forward reads each row's target logit once more, for the loss
    assert rows["fwd"].tensors["logits"] == [logits + 8 * 2, 0], rows["fwd"].tensors
    assert rows["bwd"].tensors["logits"] == [logits, 0] and rows["bwd"].tensors["dlogits"] == [0, logits]


NORMS = [("layer", F16, True), ("rms", BF16, False)]


def _blocks(row, kernel):
    return next(k["blocks"] for k in row.kernels if k["kernel"].startswith(kernel))


@emulated
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("kind,dtype,residual", NORMS, ids=str)
def test_cuda_norms_meet_the_minimum(counter, kind, dtype, residual, n):
    """On one SM of the sm_90 (io_audit.cuda_norm_rows: 16 rows a block): x, residual, dy, dh and h
    read once, y, h and dx written once, the statistics once a row, the weight (and bias) once per
    block in their own dtype, the gradients once in it; within 1.05 forward and 1.15 backward of the
    minimum. Reading the parameters once per row, as float32 copies (as the kernels did), would not be."""
    rows, elem = io_audit.cuda_norm_rows(n), dtype.itemsize
    got = _by_pass(io_audit.audit_norm(kind, rows, n, dtype, residual, backend="cuda", sm_count=io_audit.CUDA_NORM_SMS))
    fwd, bwd = got["fwd"].tensors, got["bwd"].tensors
    act = rows * n * elem
    assert fwd["x"] == [act, 0] and fwd["y"] == [0, act]
    stats = ["rstd"] + (["mean"] if kind == "layer" else [])
    assert all(fwd[s] == [0, rows * 4] for s in stats), fwd
    assert bwd["dy"] == bwd["h"] == [act, 0] and bwd["dx"] == [0, act], bwd
    if residual:
        assert fwd["residual"] == [act, 0] and fwd["h"] == [0, act] and bwd["dh"] == [act, 0]
    params = ["weight"] + (["bias"] if kind == "layer" else [])
    blocks_f, blocks_b = _blocks(got["fwd"], "norm_fwd_kernel"), _blocks(got["bwd"], "norm_bwd_kernel")
    assert 1 <= blocks_f <= rows / 16 and 1 <= blocks_b <= rows / 16, (blocks_f, blocks_b)  # 16+ rows a block
    assert all(fwd[w] == [blocks_f * n * elem, 0] for w in params), fwd
    assert bwd["weight"] == [blocks_b * n * elem, 0], bwd
    assert all(bwd[f"d{w}"] == [0, n * elem] for w in params), bwd
    assert bwd["partials"] == [blocks_b * n * 4 * len(params)] * 2, bwd
    assert got["fwd"].ratio <= 1.05 and got["bwd"].ratio <= 1.15, got
    per_row = got["fwd"].bytes + sum(rows * n * 4 - fwd[w][0] for w in params)
    assert per_row / got["fwd"].min_bytes > 1.05, per_row / got["fwd"].min_bytes


@emulated
def test_cuda_norms_read_float32_parameters_of_half_activations_as_float32(counter):
    """Mixed precision: a float32 weight and bias on bfloat16 rows are read (and their gradients
    written) at 4 bytes, once per block."""
    from mmgpt_engine import ops

    x, r = torch.randn(64, 1024).bfloat16(), torch.randn(64, 1024).bfloat16()
    w, b = torch.randn(1024, requires_grad=True), torch.randn(1024, requires_grad=True)
    fwd, bwd = io_audit.measure(lambda: ops.layer_norm(x, w, b, residual=r, backend="cuda"),
                                lambda out: torch.autograd.backward(out, [torch.randn_like(o) for o in out]),
                                "cuda", io_audit.CUDA_NORM_SMS)
    blocks_f = next(k["blocks"] for k in fwd.kernels() if k["kernel"].startswith("norm_fwd_kernel<__nv_bfloat16, float"))
    assert fwd.tensors()["weight"] == fwd.tensors()["bias"] == [blocks_f * 1024 * 4, 0]
    assert bwd.tensors()["dweight"] == bwd.tensors()["dbias"] == [0, 1024 * 4]
    assert w.grad.dtype == b.grad.dtype == torch.float32


def _cuda_attention(s, d, dtype, mask, prefix_len=70):
    return _by_pass(io_audit.audit_attention(1, s, 2, 1, d, dtype, mask, prefix_len, backend="cuda"))


@emulated
def test_cuda_attention_stays_within_the_flash_attention_2_bound_and_skips_hidden_tiles(counter):
    d = 64
    got = {mask: _cuda_attention(200, d, F16, mask) for mask in ("none", "causal", "prefix")}
    # the bound with the kernels' own tiles: beyond it, only the per-sequence prefix lengths (4 B a warp)
    _check_attention(got, 1.001, 1.001)
    # k and v are read once per query block for the keys its rows see (whole 64-key tiles), no more
    elem, h = 2, 2
    for mask, rows in got.items():
        keys = sum(min(200, -(-io_audit.visible_keys(200, 200, mask, 70, range(m0, min(m0 + 64, 200))) // 64) * 64)
                   for m0 in range(0, 200, 64))
        assert rows["fwd"].tensors["k"] == rows["fwd"].tensors["v"] == [h * keys * d * elem, 0], (mask, rows)


@emulated
def test_cuda_attention_bound_follows_the_devices_tiles(counter, monkeypatch):
    """Head dim 128: the dQ kernel takes 64 keys a block on sm_90 (227 KB of shared memory), 32 on
    sm_86 (99 KB), and each meets the bound with its own tiles."""
    tiles = {}
    for arch in ("sm_90", "sm_86"):
        monkeypatch.setattr(io_audit, "CUDA_ARCH", arch)
        rows = _cuda_attention(130, 128, BF16, "causal")
        assert rows["bwd"].ratio <= 1.001 and rows["bwd"].device.startswith(arch), rows
        tiles[arch] = [k["kernel"] for k in rows["bwd"].kernels if k["kernel"].startswith("flash_bwd_dq")]
    assert tiles == {"sm_90": ["flash_bwd_dq_kernel<__nv_bfloat16, 128, 64>"],
                     "sm_86": ["flash_bwd_dq_kernel<__nv_bfloat16, 128, 32>"]}


@emulated
def test_cuda_counts_are_deterministic(counter):
    """Other random inputs, the same bytes, per kernel and per tensor."""
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append([(r.bytes, r.kernels, r.tensors) for r in _cuda_attention(130, 64, F16, "prefix").values()])
    assert runs[0] == runs[1]


@emulated
def test_the_command_writes_cuda_rows_with_a_predicted_time_per_kernel(counter, tmp_path, capsys):
    assert io_audit.main(["--only", "norms", "--backend", "cuda", "--quick", "--json", str(tmp_path / "a.json")]) == 0
    rows = json.loads((tmp_path / "a.json").read_text())
    assert {r["backend"] for r in rows} == {"cuda"} and {r["device"] for r in rows} == {"sm_90 emulated, 1 SM"}
    bwd = next(r for r in rows if r["op"] == "layer_norm" and r["pass"] == "bwd")
    # the partial rows, then a column sum each for the weight and the bias gradients
    assert [(k["kernel"].split("<")[0], k["launches"]) for k in bwd["kernels"]] == [("norm_bwd_kernel", 1),
                                                                                   ("column_sum_kernel", 2)]
    assert bwd["tensors"]["partials"][0] > 0 and all(k["predicted_us"]["h100"] > 0 for k in bwd["kernels"])
    assert bwd["predicted_us"]["h100"] == pytest.approx(sum(k["predicted_us"]["h100"] for k in bwd["kernels"]),
                                                        abs=0.01)
    out = capsys.readouterr().out
    assert "predicted" in out and "column_sum_kernel" in out and "devices: cuda: sm_90 emulated, 1 SM" in out
