"""The csrc CUDA kernels, run without a GPU: the same .cu sources compiled with the host compiler
against a CPU emulation of the CUDA features they use (csrc/emulation: one fiber per thread,
barriers, shuffles, ldmatrix and mma.sync with the PTX ISA's fragment layouts), driven through
the public ops with backend="cuda" on CPU tensors and compared with the float64 reference,
forward and backward.

This checks the kernels' logic (indexing, masks, reductions, tiling, fragment plumbing, the
launch plans) on every machine; timing and memory-model hazards remain for the GPU tests and
compute-sanitizer. `EmulatedExtension` stands in for the pybind module (csrc/bindings.cpp) and
mirrors what it does: allocations, dtype conversions, the alignment flag.
"""
import concurrent.futures
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgpt_engine import ops
from mmgpt_engine.ops import _cuda_build as cfg
from mmgpt_engine.ops import _dispatch, cuda, reference
from tests.helpers import assert_close_to_truth, check_fwd_bwd

pytestmark = pytest.mark.xdist_group("cuda_emulated")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_CODE = {F32: 0, F16: 1, BF16: 2, torch.float64: 3, torch.bool: 4}
P, I64, I32, F, B = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_bool


# MMGPT_EMU_SANITIZE selects a sanitized build, run with the sanitizer's runtime preloaded (as the
# last tests of this file do), the emulator's stand-ins for compute-sanitizer:
# - address: the kernels and the runtime under AddressSanitizer and UndefinedBehaviorSanitizer: an
#   access outside a tensor, a __shared__ array or the dynamic shared memory, or undefined behaviour
#   such as a signed index overflow, stops the run (memcheck);
# - thread: the kernels under ThreadSanitizer with every CUDA thread a TSan fiber, ordered only by
#   barriers and warp collectives (runtime.cpp, MMGPT_EMU_TSAN): a shared-memory access that no
#   barrier orders against another thread's write is a reported race (racecheck).
SANITIZE = os.environ.get("MMGPT_EMU_SANITIZE", "")
_ASAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
_SANITIZE_BUILDS = {  # (kernels, runtime, link)
    "": ([], [], []),
    "address": (_ASAN, _ASAN, _ASAN),
    "thread": (["-fsanitize=thread", "-DMMGPT_EMU_TSAN"], ["-DMMGPT_EMU_TSAN"], ["-fsanitize=thread"]),
}
if SANITIZE not in _SANITIZE_BUILDS:
    raise ValueError(f"MMGPT_EMU_SANITIZE: expected unset, 'address' or 'thread', got {SANITIZE!r}")
SANITIZE_FLAGS = _SANITIZE_BUILDS[SANITIZE]


# ------------------------------------------------------------------------------ the library
def _build_emulator() -> Path:
    """Compiles csrc/*.cu + csrc/emulation/runtime.cpp into one shared library, cached by content."""
    csrc, cuda_home, cxx = cfg.csrc_dir(), cfg.find_cuda_home(), shutil.which("g++") or shutil.which("c++")
    if csrc is None or cuda_home is None or cxx is None:
        pytest.skip("needs csrc/, the CUDA headers (a toolkit) and a host C++ compiler")
    units = [csrc / f for f in cfg.SOURCES if f.endswith(".cu")] + [csrc / "emulation" / "runtime.cpp"]
    # -O0 for the kernels: their threads are fibers the optimiser cannot see, so it must not keep
    # `__shared__` values (function statics) in registers or move their accesses across barriers
    flags = ["-std=c++20", "-fPIC", "-Wall", "-Wno-unknown-pragmas", f"-I{cuda_home}/include", f"-I{csrc}",
             "-include", str(csrc / "emulation" / "emu.h")]
    kernel_flags, runtime_flags, link_flags = SANITIZE_FLAGS
    digest = hashlib.sha256(" ".join(flags[:-1] + ["-O0", "-Bsymbolic", repr(SANITIZE_FLAGS)]).encode())
    for f in sorted(list(csrc.glob("*")) + list((csrc / "emulation").glob("*"))):
        if f.is_file():
            digest.update(f.name.encode() + f.read_bytes())
    out = cfg.cache_root() / f"emulator-{digest.hexdigest()[:16]}"
    lib = out / "libmmgpt_emu.so"
    if lib.is_file():
        return lib
    out.mkdir(parents=True, exist_ok=True)

    def compile_unit(unit):
        obj = out / f"{unit.stem}.{os.getpid()}.o"
        lang = ["-x", "c++", "-O0", *kernel_flags] if unit.suffix == ".cu" else ["-O2", *runtime_flags]
        subprocess.run([cxx, *flags, *lang, "-c", str(unit), "-o", str(obj)], check=True, capture_output=True, text=True)
        return obj

    jobs = int(os.environ.get("MAX_JOBS", "2"))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        objects = list(pool.map(compile_unit, units))
    tmp = out / f"libmmgpt_emu.{os.getpid()}.so"
    # -Bsymbolic: the CUDA runtime stubs bind inside the library, not to the libcudart torch loaded
    subprocess.run([cxx, "-shared", "-Wl,-Bsymbolic", *link_flags, "-o", str(tmp), *map(str, objects)],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, lib)  # atomic: a concurrent build never exposes half a library
    for obj in objects:
        obj.unlink()
    return lib


class NormFwdParams(ctypes.Structure):
    _fields_ = [(n, P) for n in ("x", "residual", "weight", "bias", "y", "h", "mean", "rstd")] + [
        ("rows", I64), ("n", I32), ("eps", F), ("is_rms", B), ("aligned", B)]


class NormBwdParams(ctypes.Structure):
    _fields_ = [(n, P) for n in ("dy", "dh", "h", "weight", "mean", "rstd", "dx", "dweight", "dbias", "partials")] + [
        ("rows", I64), ("n", I32), ("is_rms", B), ("aligned", B)]


class SoftmaxFwdParams(ctypes.Structure):
    _fields_ = [("x", P), ("y", P), ("mask", P), ("mask_row_offsets", P), ("mask_col_stride", I64),
                ("mask_dtype", I32), ("causal_rows", I64), ("rows", I64), ("n", I32), ("scale", F), ("aligned", B)]


class SoftmaxBwdParams(ctypes.Structure):
    _fields_ = [("dy", P), ("y", P), ("dx", P), ("rows", I64), ("n", I32), ("scale", F), ("aligned", B)]


class CrossEntropyFwdParams(ctypes.Structure):
    _fields_ = [("logits", P), ("target", P), ("loss", P), ("lse", P), ("rows", I64), ("vocab", I32),
                ("ignore_index", I64), ("aligned", B)]


class CrossEntropyBwdParams(ctypes.Structure):
    _fields_ = [("dloss", P), ("logits", P), ("target", P), ("lse", P), ("dlogits", P), ("rows", I64),
                ("vocab", I32), ("ignore_index", I64), ("aligned", B)]


class FlashParams(ctypes.Structure):
    _fields_ = ([(n, P) for n in ("q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv", "delta")]
                + [(f"{t}_{s}_stride", I64) for t in ("q", "k", "v", "o", "dk", "do") for s in ("batch", "row", "head")]
                + [(n, I32) for n in ("batch", "heads", "kv_heads", "seqlen_q", "seqlen_k")]
                + [("cu_seqlens", P), ("max_seqlen", I32), ("prefix", P), ("causal", B), ("scale", F),
                   ("head_dim", I32)])


STRUCTS = [NormFwdParams, NormBwdParams, SoftmaxFwdParams, SoftmaxBwdParams, CrossEntropyFwdParams,
           CrossEntropyBwdParams, FlashParams]


def _ptr(t):
    return t.data_ptr() if t is not None and t.numel() > 0 else None


def _rows_aligned(n, tensors):
    tensors = [t for t in tensors if t is not None]
    return (n * tensors[0].element_size()) % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


class EmulatedExtension:
    """The pybind module's functions (csrc/bindings.cpp) over the emulated launchers."""

    def __init__(self, lib):
        self.lib = lib
        lib.mmgpt_emu_norm_bwd_workspace.restype = ctypes.c_int64
        lib.mmgpt_emu_sizeof.restype = ctypes.c_int64

    def _call(self, name, params, dtype):
        rc = getattr(self.lib, f"mmgpt_emu_{name}")(ctypes.byref(params), DTYPE_CODE[dtype])
        assert rc == 0, f"{name}: launcher returned cudaError {rc}"

    def norm_fwd(self, x, weight, bias, residual, eps, is_rms):
        rows, n = x.shape
        w = weight.float().contiguous() if weight is not None else None
        b = bias.float().contiguous() if bias is not None else None
        y, h = torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0)
        mean = x.new_empty(0 if is_rms else rows, dtype=F32)
        rstd = x.new_empty(rows, dtype=F32)
        if rows and n:
            res = residual.contiguous() if residual is not None else None
            p = NormFwdParams(_ptr(x), _ptr(res), _ptr(w), _ptr(b), _ptr(y), _ptr(h) if res is not None else None,
                              None if is_rms else _ptr(mean), _ptr(rstd), rows, n, eps, is_rms,
                              _rows_aligned(n, [x, y, res, h if res is not None else None]))
            self._call("norm_fwd", p, x.dtype)
        return y, h, mean, rstd

    def norm_bwd(self, dy, dh, h, weight, bias, mean, rstd, is_rms):
        rows, n = h.shape
        dy = dy.to(h.dtype).reshape(rows, n).contiguous()
        dh = dh.to(h.dtype).reshape(rows, n).contiguous() if dh.numel() else None
        w = weight.float().contiguous() if weight is not None else None
        dw = torch.zeros(n, dtype=F32) if weight is not None else None
        db = torch.zeros(n, dtype=F32) if bias is not None else None
        dx = torch.empty_like(h)
        if rows and n:
            p = NormBwdParams(_ptr(dy), _ptr(dh), _ptr(h), _ptr(w), None if is_rms else _ptr(mean), _ptr(rstd),
                              _ptr(dx), _ptr(dw), _ptr(db), None, rows, n, is_rms, _rows_aligned(n, [h, dy, dx, dh]))
            work = torch.empty(max(1, self.lib.mmgpt_emu_norm_bwd_workspace(ctypes.byref(p), DTYPE_CODE[h.dtype])),
                               dtype=F32)
            p.partials = work.data_ptr()
            self._call("norm_bwd", p, h.dtype)
        return (dx, dw.to(weight.dtype) if weight is not None else h.new_empty(0),
                db.to(bias.dtype) if bias is not None else h.new_empty(0))

    def softmax_fwd(self, x, scale, mask, mask_row_offsets, mask_col_stride, causal_rows):
        rows, n = x.shape
        y = torch.empty_like(x)
        if rows and n:
            offsets = mask_row_offsets.to(torch.int64).contiguous() if mask is not None else None
            p = SoftmaxFwdParams(_ptr(x), _ptr(y), mask.data_ptr() if mask is not None else None, _ptr(offsets),
                                 mask_col_stride, DTYPE_CODE[mask.dtype] if mask is not None else 0, causal_rows,
                                 rows, n, scale, _rows_aligned(n, [x, y]))
            self._call("softmax_fwd", p, x.dtype)
        return y

    def softmax_bwd(self, dy, y, scale):
        dy, dx = dy.to(y.dtype).reshape(y.shape).contiguous(), torch.empty_like(y)
        if y.numel():
            p = SoftmaxBwdParams(_ptr(dy), _ptr(y), _ptr(dx), y.shape[0], y.shape[1], scale,
                                 _rows_aligned(y.shape[1], [dy, y, dx]))
            self._call("softmax_bwd", p, y.dtype)
        return dx

    def cross_entropy_fwd(self, logits, target, ignore_index):
        rows, v = logits.shape
        target = target.to(torch.int64).contiguous()
        loss, lse = logits.new_empty(rows, dtype=F32), logits.new_empty(rows, dtype=F32)
        if rows:
            p = CrossEntropyFwdParams(_ptr(logits), _ptr(target), _ptr(loss), _ptr(lse), rows, v, ignore_index,
                                      _rows_aligned(v, [logits]))
            self._call("cross_entropy_fwd", p, logits.dtype)
        return loss, lse

    def cross_entropy_bwd(self, dloss, logits, target, lse, ignore_index):
        rows, v = logits.shape
        dloss, target = dloss.float().contiguous(), target.to(torch.int64).contiguous()
        lse, dlogits = lse.float().contiguous(), torch.empty_like(logits)
        if logits.numel():
            p = CrossEntropyBwdParams(_ptr(dloss), _ptr(logits), _ptr(target), _ptr(lse), _ptr(dlogits), rows, v,
                                      ignore_index, _rows_aligned(v, [logits, dlogits]))
            self._call("cross_entropy_bwd", p, logits.dtype)
        return dlogits

    @staticmethod
    def _operand(t):
        ok = t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(t.stride(d) % 8 == 0 or t.shape[d] == 1
                                                                 for d in range(3))
        return t if ok else t.clone(memory_format=torch.contiguous_format)

    def _flash_params(self, q, k, v, cu_seqlens, max_seqlen, prefix, causal, scale):
        b, s_q, h, d = q.shape
        p = FlashParams(q=_ptr(q), k=_ptr(k), v=_ptr(v), batch=b, heads=h, kv_heads=k.shape[2], seqlen_q=s_q,
                        seqlen_k=k.shape[1], causal=causal, scale=scale, head_dim=d)
        for name, t in (("q", q), ("k", k), ("v", v)):
            for i, s in enumerate(("batch", "row", "head")):
                setattr(p, f"{name}_{s}_stride", t.stride(i))
        keep = []
        if cu_seqlens is not None:
            cu = cu_seqlens.contiguous()
            keep.append(cu)
            p.cu_seqlens, p.batch = cu.data_ptr(), cu.numel() - 1
            p.max_seqlen = max_seqlen if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
        if prefix is not None:
            pre = prefix.to(torch.int32).contiguous()
            keep.append(pre)
            p.prefix = pre.data_ptr()
        return p, keep

    def flash_attn_fwd(self, q, k, v, cu_seqlens, max_seqlen, prefix, causal, scale):
        q, k, v = (self._operand(t) for t in (q, k, v))
        out = torch.empty(q.shape, dtype=q.dtype)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=F32)
        if out.numel():
            p, _keep = self._flash_params(q, k, v, cu_seqlens, max_seqlen, prefix, causal, scale)
            p.out, p.lse = out.data_ptr(), lse.data_ptr()
            p.o_batch_stride, p.o_row_stride, p.o_head_stride = out.stride()[:3]
            self._call("flash_attn_fwd", p, q.dtype)
        return out, lse

    def flash_attn_bwd(self, dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, causal, scale):
        q, k, v = (self._operand(t) for t in (q, k, v))
        out, dout = self._operand(out).contiguous(), self._operand(dout.to(q.dtype))
        lse = lse.contiguous()
        dq, dk, dv = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=q.dtype), torch.empty(
            v.shape, dtype=q.dtype)
        if dq.numel() or dk.numel():
            delta = torch.empty_like(lse)
            p, _keep = self._flash_params(q, k, v, cu_seqlens, max_seqlen, prefix, causal, scale)
            p.out, p.lse, p.dout, p.dq, p.dk, p.dv, p.delta = map(_ptr, (out, lse, dout, dq, dk, dv, delta))
            p.o_batch_stride, p.o_row_stride, p.o_head_stride = dq.stride()[:3]
            p.do_batch_stride, p.do_row_stride, p.do_head_stride = dout.stride()[:3]
            p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride = dk.stride()[:3]
            self._call("flash_attn_bwd", p, q.dtype)
        return dq, dk, dv


@pytest.fixture(scope="module")
def emulator():
    lib = ctypes.CDLL(str(_build_emulator()))
    ext = EmulatedExtension(lib)
    for i, struct in enumerate(STRUCTS):
        assert lib.mmgpt_emu_sizeof(i) == ctypes.sizeof(struct), f"{struct.__name__}: layout differs from launchers.h"
    return ext


@pytest.fixture
def emulated_cuda(emulator, monkeypatch):
    """backend="cuda" runs the emulated kernels on CPU tensors, through the real ops and launchers."""
    real = _dispatch.unavailable_reason
    monkeypatch.setattr(_dispatch, "unavailable_reason",
                        lambda backend, device=None: None if backend == "cuda" else real(backend, device))
    monkeypatch.setattr(cuda, "extension", lambda: emulator)
    emulator.lib.mmgpt_emu_set_device(4, 227 * 1024)  # an H100's shared memory, 4 SMs
    return emulator


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
              lambda x, r, w: reference.rms_norm(x, w, 1e-6, residual=r), [x, r, w], dtype, unaligned=unaligned)


def test_norm_backward_without_room_for_shared_partials_takes_the_looped_path(emulated_cuda):
    emulated_cuda.lib.mmgpt_emu_set_device(3, 8 * 1024)  # too little shared memory for the partial sums
    x, w, b = torch.randn(6, 2048), torch.randn(2048), torch.randn(2048)
    check_fwd_bwd(lambda x, w, b: ops.layer_norm(x, w, b, backend="cuda"), lambda x, w, b: reference.layer_norm(x, w, b),
          [x, w, b], BF16)


def test_norm_without_affine_params(emulated_cuda):
    check_fwd_bwd(lambda x: ops.layer_norm(x, None, None, backend="cuda"), lambda x: reference.layer_norm(x),
          [torch.randn(9, 33)], F32)


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
          lambda x: reference.cross_entropy(x, target, reduction="none").float(), [4 * torch.randn(rows, v)], dtype)


def test_cross_entropy_out_of_range_target_is_nan(emulated_cuda):
    loss = ops.cross_entropy(torch.randn(3, 5), torch.tensor([1, 5, -1]), reduction="none", backend="cuda")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()


# ----------------------------------------------------------------------------- attention
def _attention_case(b, s_q, s_k, h, h_kv, d, dtype, **kwargs):
    q, k, v = torch.randn(b, s_q, h, d), torch.randn(b, s_k, h_kv, d), torch.randn(b, s_k, h_kv, d)
    check_fwd_bwd(lambda q, k, v: ops.flash_attention(q, k, v, return_lse=True, backend="cuda", **kwargs),
          lambda q, k, v: reference.flash_attention(q, k, v, return_lse=True, **kwargs), [q, k, v], dtype,
          n_grad_outputs=1)  # lse carries no gradient


@pytest.mark.parametrize("s_q,s_k,d,dtype,kwargs", [
    (70, 70, 64, F16, {}),                                  # a partial query and key block
    (40, 100, 128, BF16, {"causal": True}),                 # bottom-right causal, more keys
    (100, 40, 64, F16, {"causal": True}),                   # queries that see no key
    (90, 90, 64, BF16, {"prefix_len": 70}),                 # the prefix crosses a key block
    (30, 80, 64, F16, {"prefix_len": 50, "softmax_scale": 0.3}),
    (65, 130, 128, F16, {"causal": False}),
], ids=str)
def test_flash_attention(emulated_cuda, s_q, s_k, d, dtype, kwargs):
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


# ------------------------------------------------------------------------------- under sanitizers
def _runtime_library(name):
    cxx = shutil.which("g++")
    if cxx is None:
        return None
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


# runtime library, environment ({log}: the report path), what a report starts with
SANITIZER_RUNS = {
    "address": ("libasan.so", {"ASAN_OPTIONS": "detect_leaks=0:log_path={log}", "UBSAN_OPTIONS": "print_stacktrace=1"},
                ("ERROR:", "runtime error")),
    # one torch thread: libgomp's own synchronisation is invisible to TSan and would be reported
    "thread": ("libtsan.so", {"TSAN_OPTIONS": "log_path={log}:report_signal_unsafe=0", "OMP_NUM_THREADS": "1"},
               ("WARNING: ThreadSanitizer",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param("address", marks=pytest.mark.xdist_group("cuda_emulated_asan")),
                                  pytest.param("thread", marks=pytest.mark.xdist_group("cuda_emulated_tsan"))])
def test_every_kernel_under_a_sanitizer(mode, tmp_path):
    """Every test above again, on kernels built for a sanitizer (MMGPT_EMU_SANITIZE, see the top of
    this file). address: no access outside a tensor, a __shared__ array or the dynamic shared memory,
    no undefined behaviour. thread: no shared-memory access unordered by a barrier against another
    thread's write (a missing __syncthreads, even one the emulator's fixed schedule would forgive)."""
    runtime, options, markers = SANITIZER_RUNS[mode]
    preload, stdcxx = _runtime_library(runtime), _runtime_library("libstdc++.so.6")
    if preload is None or stdcxx is None:
        pytest.skip(f"g++'s {runtime} is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    # libstdc++ loaded with the sanitizer's runtime, so its exception interceptor finds its target
    env.update({k: v.format(log=tmp_path / "report") for k, v in options.items()},
               MMGPT_EMU_SANITIZE=mode, LD_PRELOAD=f"{preload} {stdcxx}", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                           "-k", "not under_a_sanitizer"], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=1800)
    reports = "".join(p.read_text() for p in tmp_path.glob("report*"))
    found = [marker for marker in markers if marker in reports]
    assert proc.returncode == 0 and not found, f"{reports[-8000:]}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
