"""The csrc/ CUDA kernels on the CPU: the same .cu sources compiled with the host compiler against
csrc/emulation (one fiber per CUDA thread, barriers, shuffles, ldmatrix and mma.sync with the PTX
ISA's fragment layouts, cp.async), on an emulated device that refuses what the GPU of its
architecture refuses (see csrc/emulation/emu.h).

    lib = cuda_emulator.build(arch="sm_86")          # compile (cached by content) and load
    ext = cuda_emulator.EmulatedExtension(lib)
    with cuda_emulator.emulated_cuda(ext):           # backend="cuda" on CPU tensors runs the kernels
        out = ops.flash_attention(q, k, v, backend="cuda")
    ext.use_device("sm_90")                          # another architecture's limits, same library

`build(sanitize="address" | "thread")` compiles the kernels for AddressSanitizer + UBSan (memcheck's
stand-in) or ThreadSanitizer (racecheck's: every CUDA thread a TSan fiber ordered only by barriers);
such a library loads only in a process started with `sanitizer_env(mode, log)` in its environment.
`build(sanitize="count")` instruments every load and store of the kernels (csrc/emulation/traffic.cpp)
and loads anywhere: within `ext.counting()` each call records the global-memory bytes every launch
reads and writes in each tensor of the call (the IO audit, benchmarks/io_audit.py).
`build(sources=[...])` emulates other .cu files (e.g. test kernels) instead of csrc's.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, TypeVar

import torch

from mmgpt_engine.ops import _cuda_build as cfg
from mmgpt_engine.ops._checks import check_choice

SANITIZE_ENV_VAR = "MMGPT_EMU_SANITIZE"
_ASAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
# count: GCC's kernel-address instrumentation as plain calls (no shadow memory, no stack or global
# redzones), which the runtime's hooks turn into byte counts; the link proves every hook is defined
_COUNT = ["-fsanitize=kernel-address", "--param=asan-instrumentation-with-call-threshold=0", "--param=asan-stack=0",
          "--param=asan-globals=0"]
# flags of the kernels, of the emulator runtime, of the link
SANITIZE_BUILDS = {
    "": ([], [], []),
    "address": (_ASAN, _ASAN, _ASAN),
    "thread": (["-fsanitize=thread", "-DMMGPT_EMU_TSAN"], ["-DMMGPT_EMU_TSAN"], ["-fsanitize=thread"]),
    "count": (_COUNT, ["-DMMGPT_EMU_COUNT"], ["-Wl,--no-undefined"]),
}
# the sanitizer's runtime library, its environment ({log}: where reports go), what a report starts with
SANITIZER_RUNS = {
    "address": ("libasan.so", {"ASAN_OPTIONS": "detect_leaks=0:log_path={log}", "UBSAN_OPTIONS": "print_stacktrace=1"},
                ("ERROR:", "runtime error")),
    # one torch thread: libgomp's own synchronisation is invisible to TSan and would be reported
    "thread": ("libtsan.so", {"TSAN_OPTIONS": "log_path={log}:report_signal_unsafe=0", "OMP_NUM_THREADS": "1"},
               ("WARNING: ThreadSanitizer",)),
}
RUNTIME_UNITS = ("runtime.cpp", "warp.cpp", "device.cpp", "traffic.cpp")  # csrc/emulation: the emulator itself
KERNEL_ENTRY_POINTS = "entry_points.cpp"                     # csrc/emulation: the launchers for ctypes

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.bool: 4}
_P, _I64, _I32, _F, _B = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_bool


class EmulatorUnavailable(RuntimeError):
    """The emulator cannot be built here (no csrc/, no CUDA headers or no host compiler)."""


def sanitize_from_env() -> str:
    """$MMGPT_EMU_SANITIZE: '' (unset), 'address', 'thread' or 'count'."""
    mode = os.environ.get(SANITIZE_ENV_VAR, "")
    if mode not in SANITIZE_BUILDS:
        raise ValueError(f"{SANITIZE_ENV_VAR}: expected unset, 'address', 'thread' or 'count', got {mode!r}")
    return mode


# ------------------------------------------------------------------------------------- build
def library_path(sanitize: Optional[str] = None, sources: Optional[Iterable[Path]] = None) -> Path:
    """Compiles the kernels (csrc/*.cu, or `sources`) with the emulator into one shared library, cached
    by content under the build cache (cfg.cache_root()); returns its path."""
    sanitize = sanitize_from_env() if sanitize is None else sanitize
    if sanitize not in SANITIZE_BUILDS:
        raise ValueError(f"sanitize: expected '', 'address', 'thread' or 'count', got {sanitize!r}")
    csrc, cuda_home, cxx = cfg.csrc_dir(), cfg.find_cuda_home(), shutil.which("g++") or shutil.which("c++")
    if csrc is None or cuda_home is None or cxx is None:
        raise EmulatorUnavailable("the CUDA emulator needs csrc/, the CUDA headers (a toolkit) and a host C++ compiler")
    emulation = csrc / "emulation"
    kernels = [csrc / f for f in cfg.SOURCES if f.endswith(".cu")] if sources is None else [Path(s) for s in sources]
    runtime = [emulation / f for f in RUNTIME_UNITS] + ([emulation / KERNEL_ENTRY_POINTS] if sources is None else [])
    # -O0 for the kernels: their threads are fibers the optimiser cannot see, so it must not keep
    # `__shared__` values (function statics) in registers or move their accesses across barriers
    # -fno-gnu-unique: the launchers' per-device caches (function statics of inline functions) stay
    # per library; as GNU unique symbols every emulator build loaded in a process would share one
    flags = ["-std=c++20", "-fPIC", "-fno-gnu-unique", "-Wall", "-Wno-unknown-pragmas",
             f"-I{cuda_home}/include", f"-I{csrc}",
             "-include", str(emulation / "emu.h")]
    kernel_flags, runtime_flags, link_flags = SANITIZE_BUILDS[sanitize]
    digest = hashlib.sha256(" ".join(flags[:-1] + ["-O0", "-Bsymbolic", repr(SANITIZE_BUILDS[sanitize])]).encode())
    for f in sorted(list(csrc.glob("*")) + list(emulation.glob("*"))) + kernels:
        if f.is_file():
            digest.update(f.name.encode() + f.read_bytes())
    out = cfg.cache_root() / f"emulator-{digest.hexdigest()[:16]}"
    lib = out / "libmmgpt_emu.so"
    if lib.is_file():
        return lib
    out.mkdir(parents=True, exist_ok=True)

    def compile_unit(unit: Path) -> Path:
        obj = out / f"{unit.stem}.{os.getpid()}.o"
        lang = ["-x", "c++", "-O0", *kernel_flags] if unit.suffix == ".cu" else ["-O2", *runtime_flags]
        proc = subprocess.run([cxx, *flags, *lang, "-c", str(unit), "-o", str(obj)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulator build: {unit.name} does not compile:\n{proc.stderr[-6000:]}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(int(os.environ.get("MAX_JOBS", "2"))) as pool:
        objects = list(pool.map(compile_unit, kernels + runtime))
    tmp = out / f"libmmgpt_emu.{os.getpid()}.so"
    # -Bsymbolic: the CUDA runtime stubs bind inside the library, not to the libcudart torch loaded
    subprocess.run([cxx, "-shared", "-Wl,-Bsymbolic", *link_flags, "-o", str(tmp), *map(str, objects)],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, lib)  # atomic: a concurrent build never exposes half a library
    for obj in objects:
        obj.unlink()
    return lib


def build(sanitize: Optional[str] = None, arch: str = "sm_90", *, sm_count: int = 4,
          sources: Optional[Iterable[Path]] = None) -> ctypes.CDLL:
    """The emulator library (see library_path), loaded, with an `arch` device current.

    sanitize: None ($MMGPT_EMU_SANITIZE), '', 'address', 'thread' or 'count'; arch: 'sm_80', 'sm_86', ...
    (archs(lib) lists them), a cheap runtime setting of the same library (use_device)."""
    lib = ctypes.CDLL(str(library_path(sanitize, sources)))
    for name, restype in (("mmgpt_emu_error_message", ctypes.c_char_p), ("mmgpt_emu_calls", ctypes.c_int64)):
        getattr(lib, name).restype = restype
    if hasattr(lib, "mmgpt_emu_sizeof"):
        lib.mmgpt_emu_sizeof.restype = ctypes.c_int64
        lib.mmgpt_emu_norm_bwd_workspace.restype = ctypes.c_int64
    lib.mmgpt_emu_traffic_watch.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.mmgpt_emu_traffic_launches.restype = ctypes.c_int64
    lib.mmgpt_emu_traffic_bytes.restype = ctypes.c_int64
    use_device(lib, arch, sm_count)
    return lib


def archs(lib: ctypes.CDLL) -> list[str]:
    """The architectures the emulator has the limits of, e.g. ['sm_80', 'sm_86', 'sm_89', 'sm_90', 'sm_120']."""
    out, i = [], 0
    while (cc := lib.mmgpt_emu_arch(i)) != 0:
        out.append(f"sm_{cc}")
        i += 1
    return out


def use_device(lib: ctypes.CDLL, arch: str, sm_count: int = 4, smem_optin: Optional[int] = None) -> int:
    """Makes an emulated device of `arch` with `sm_count` SMs current (smem_optin: less opt-in shared
    memory than the architecture's, to force a launch plan); returns its index. A device is created
    once per set of properties, so what the launchers cache per device stays true."""
    m = re.fullmatch(r"sm_(\d+)", arch) if isinstance(arch, str) else None
    index = lib.mmgpt_emu_use_device(int(m.group(1)), int(sm_count), int(smem_optin or 0)) if m else -1
    if index == -1:
        raise ValueError(f"arch: expected one of {archs(lib)}, got {arch!r}")
    if index == -2:
        raise ValueError(f"sm_count, smem_optin: expected sm_count >= 1 and smem_optin at most {arch}'s, got "
                         f"{sm_count} and {smem_optin}")
    return index


def take_error(lib: ctypes.CDLL) -> Optional[str]:
    """The first error the emulator recorded since the last call (a refused launch, a kernel fault,
    a failed cudaFuncSetAttribute), and clears them all; None when there was none."""
    if lib.mmgpt_emu_error_code() == 0:
        return None
    message = lib.mmgpt_emu_error_message().decode()
    lib.mmgpt_emu_reset()
    return message


def sanitizer_env(mode: str, log: Path) -> dict:
    """The environment a process needs to load a library built with sanitize=mode: the sanitizer's
    runtime preloaded (with libstdc++, so that its exception interceptor finds its target), its
    reports written to `log`.*, and MMGPT_EMU_SANITIZE=mode. Raises EmulatorUnavailable when g++'s
    runtime for it is not installed."""
    check_choice("mode", mode, list(SANITIZER_RUNS))
    runtime, options, _ = SANITIZER_RUNS[mode]
    preload, stdcxx = _gcc_library(runtime), _gcc_library("libstdc++.so.6")
    if preload is None or stdcxx is None:
        raise EmulatorUnavailable(f"g++'s {runtime} is not installed")
    env = {k: v.format(log=log) for k, v in options.items()}
    env.update({SANITIZE_ENV_VAR: mode, "LD_PRELOAD": f"{preload} {stdcxx}"})
    return env


def _gcc_library(name: str) -> Optional[str]:
    cxx = shutil.which("g++")
    if cxx is None:
        return None
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


# ----------------------------------------------------------------------- global-memory traffic
class _TrafficLaunch(ctypes.Structure):  # csrc/emulation/traffic.cpp
    _fields_ = [("kernel_offset", _I64), ("file", ctypes.c_char_p), ("line", _I32), ("grid", ctypes.c_uint * 3),
                ("block", ctypes.c_uint * 3), ("smem", _I64)]


@dataclass
class Launch:
    """One emulated launch and the global-memory bytes it read and wrote, per tensor of its call."""
    call: str                 # the launcher, e.g. 'norm_fwd'
    kernel: str               # e.g. 'norm_fwd_kernel<__half, 2, true>'
    site: str                 # where it was launched, e.g. 'norms.cu:318'
    grid: tuple
    block: tuple
    smem: int                 # dynamic shared memory, bytes
    read: dict = field(default_factory=dict)     # tensor label -> bytes
    written: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.read.values()) + sum(self.written.values())


_R = TypeVar("_R")


class Traffic:
    """The launches recorded by `record` (EmulatedExtension.counting records every call): per launch,
    the bytes each watched tensor had read and written by the kernel (counting build only)."""

    def __init__(self, lib: ctypes.CDLL):
        if not lib.mmgpt_emu_traffic_counting():
            raise ValueError("lib: expected an emulator built to count memory accesses (build(sanitize='count')), "
                             "got one whose kernels are not instrumented")
        self.lib = lib
        self.launches: list[Launch] = []

    def record(self, call: str, tensors: Mapping[str, Optional[torch.Tensor]], run: Callable[[], _R]) -> _R:
        """run(), counting the bytes its launches move in each of `tensors` (label -> tensor; None and
        empty ones skipped; where two overlap, the first holding an access's first byte counts it).
        Ranges are watched for this call only: memory freed and reused later is not mistaken for
        these tensors."""
        lib = self.lib
        lib.mmgpt_emu_traffic_start()
        labels = []
        for label, t in tensors.items():
            if t is not None and t.numel() > 0:
                lib.mmgpt_emu_traffic_watch(ctypes.c_void_p(t.data_ptr()), ctypes.c_int64(_span_bytes(label, t)))
                labels.append(label)
        try:
            return run()
        finally:
            lib.mmgpt_emu_traffic_stop()
            names = kernel_symbols(lib._name)
            for i in range(lib.mmgpt_emu_traffic_launches()):
                info = _TrafficLaunch()
                lib.mmgpt_emu_traffic_launch(ctypes.c_int64(i), ctypes.byref(info))
                site = f"{Path(info.file.decode()).name}:{info.line}"
                launch = Launch(call, names.get(info.kernel_offset, f"kernel at {site}"), site, tuple(info.grid),
                                tuple(info.block), info.smem)
                for w, label in enumerate(labels):
                    launch.read[label] = lib.mmgpt_emu_traffic_bytes(ctypes.c_int64(i), w, 0)
                    launch.written[label] = lib.mmgpt_emu_traffic_bytes(ctypes.c_int64(i), w, 1)
                self.launches.append(launch)

    @property
    def read(self) -> int:
        return sum(sum(x.read.values()) for x in self.launches)

    @property
    def written(self) -> int:
        return sum(sum(x.written.values()) for x in self.launches)

    @property
    def total(self) -> int:
        return self.read + self.written

    def by_kernel(self) -> list[dict]:
        """{kernel, launches, blocks, read, written} per kernel, in launch order (a sliced grid or a
        repeated call is one entry); blocks: over all its launches; read and written in bytes."""
        out: dict[str, dict] = {}
        for x in self.launches:
            e = out.setdefault(x.kernel, {"kernel": x.kernel, "launches": 0, "blocks": 0, "read": 0, "written": 0})
            e["launches"] += 1
            e["blocks"] += x.grid[0] * x.grid[1] * x.grid[2]
            e["read"] += sum(x.read.values())
            e["written"] += sum(x.written.values())
        return list(out.values())

    def by_tensor(self) -> dict[str, list[int]]:
        """label -> [bytes read, bytes written] over every launch."""
        out: dict[str, list[int]] = {}
        for x in self.launches:
            for label in x.read:
                e = out.setdefault(label, [0, 0])
                e[0] += x.read[label]
                e[1] += x.written[label]
        return out


def _span_bytes(label: str, t: torch.Tensor) -> int:
    """The bytes from t's first element to one past its last (a broadcast or strided view included)."""
    if any(st < 0 for st in t.stride()):
        raise ValueError(f"{label}: expected non-negative strides, got {t.stride()}")
    return (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


@functools.lru_cache(maxsize=None)
def kernel_symbols(library: str) -> dict[int, str]:
    """Offset in `library` -> short demangled name, for its kernels (functions whose last parameter is
    the emulator's launch bound), read from its symbol table with nm; empty without nm."""
    nm = shutil.which("nm")
    if nm is None:
        return {}
    proc = subprocess.run([nm, "-C", "--defined-only", library], capture_output=True, text=True)
    out = {}
    for line in proc.stdout.splitlines():
        address, kind, name = (line.split(" ", 2) + ["", ""])[:3]
        if kind.lower() == "t" and "emu::MaxThreads<" in name:
            out[int(address, 16)] = _short_name(name)
    return out


def _short_name(demangled: str) -> str:
    """'void mmgpt::(anonymous namespace)::norm_fwd_kernel<__half, 2, true>(mmgpt::NormFwdParams, ...)'
    -> 'norm_fwd_kernel<__half, 2, true>'."""
    s = demangled.replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            s = s[:i]
            break
    s = s.removeprefix("void ")
    depth, start = 0, 0
    for i, ch in enumerate(s):
        depth += ch == "<"
        depth -= ch == ">"
        if depth == 0 and s.startswith("::", i):
            start = i + 2
    return s[start:]


# ------------------------------------------------------------------- the extension's stand-in
class NormFwdParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("x", "residual", "weight", "bias", "y", "h", "mean", "rstd")] + [
        ("rows", _I64), ("n", _I32), ("eps", _F), ("param_dtype", _I32), ("is_rms", _B), ("aligned", _B)]


class NormBwdParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("dy", "dh", "h", "weight", "mean", "rstd", "dx", "dweight", "dbias", "partials")] + [
        ("rows", _I64), ("n", _I32), ("param_dtype", _I32), ("is_rms", _B), ("aligned", _B)]


class SoftmaxFwdParams(ctypes.Structure):
    _fields_ = [("x", _P), ("y", _P), ("mask", _P), ("mask_row_offsets", _P), ("mask_col_stride", _I64),
                ("mask_dtype", _I32), ("causal_rows", _I64), ("rows", _I64), ("n", _I32), ("scale", _F),
                ("aligned", _B)]


class SoftmaxBwdParams(ctypes.Structure):
    _fields_ = [("dy", _P), ("y", _P), ("dx", _P), ("rows", _I64), ("n", _I32), ("scale", _F), ("aligned", _B)]


class CrossEntropyFwdParams(ctypes.Structure):
    _fields_ = [("logits", _P), ("target", _P), ("loss", _P), ("lse", _P), ("rows", _I64), ("vocab", _I32),
                ("ignore_index", _I64), ("aligned", _B)]


class CrossEntropyBwdParams(ctypes.Structure):
    _fields_ = [("dloss", _P), ("logits", _P), ("target", _P), ("lse", _P), ("dlogits", _P), ("rows", _I64),
                ("vocab", _I32), ("ignore_index", _I64), ("aligned", _B)]


class FlashParams(ctypes.Structure):
    _fields_ = ([(n, _P) for n in ("q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv", "delta")]
                + [(f"{t}_{s}_stride", _I64) for t in ("q", "k", "v", "o", "dk", "do") for s in ("batch", "row", "head")]
                + [(n, _I32) for n in ("batch", "heads", "kv_heads", "seqlen_q", "seqlen_k")]
                + [("cu_seqlens", _P), ("max_seqlen", _I32), ("prefix", _P), ("causal", _B), ("scale", _F),
                   ("head_dim", _I32)])


# in the order of mmgpt_emu_sizeof's cases (csrc/emulation/entry_points.cpp)
STRUCTS = (NormFwdParams, NormBwdParams, SoftmaxFwdParams, SoftmaxBwdParams, CrossEntropyFwdParams,
           CrossEntropyBwdParams, FlashParams)


def _ptr(t):
    return t.data_ptr() if t is not None and t.numel() > 0 else None


def _rows_aligned(n, tensors):
    tensors = [t for t in tensors if t is not None]
    return (n * tensors[0].element_size()) % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


def _norm_param_dtype(x, *params):
    """The dtype the norm kernels read weight and bias in (bindings.cpp's norm_param_type): x's where
    every given parameter has it, else float32."""
    return x.dtype if all(t is None or t.dtype == x.dtype for t in params) else torch.float32


class EmulatedExtension:
    """The pybind module's functions (csrc/bindings.cpp) over the emulated launchers, on CPU tensors:
    the same allocations, dtype conversions and alignment flags; a launcher error, or any error the
    emulator recorded during the call, raises RuntimeError("<launcher>: CUDA kernel launch failed: ...")
    as the bindings' check_launch does."""

    def __init__(self, lib: ctypes.CDLL):
        if not hasattr(lib, "mmgpt_emu_sizeof"):
            raise ValueError("lib: expected the emulator library of csrc's kernels (build() without sources)")
        for i, struct in enumerate(STRUCTS):
            if lib.mmgpt_emu_sizeof(i) != ctypes.sizeof(struct):
                raise RuntimeError(f"{struct.__name__}: the ctypes mirror's layout differs from launchers.h")
        self.lib = lib
        self._traffic: Optional[Traffic] = None
        take_error(lib)

    @contextlib.contextmanager
    def counting(self):
        """Within: every call records its launches' global-memory bytes per tensor into the Traffic
        yielded (a library built with sanitize='count')."""
        traffic = Traffic(self.lib)
        self._traffic = traffic
        try:
            yield traffic
        finally:
            self._traffic = None

    def use_device(self, arch: str, sm_count: int = 4, smem_optin: Optional[int] = None) -> int:
        return use_device(self.lib, arch, sm_count, smem_optin)

    def calls(self, what: str) -> int:
        """How often the launchers called `what` ('cudaDeviceGetAttribute', 'cudaFuncSetAttribute', 'launch')."""
        return self.lib.mmgpt_emu_calls(what.encode())

    def _call(self, name, params, dtype, tensors: Mapping[str, Optional[torch.Tensor]]):
        """Runs launcher `name`; tensors: every tensor whose pointer is in params, by name (what the
        counting build counts the traffic of)."""
        launcher = getattr(self.lib, f"mmgpt_emu_{name}")
        run = lambda: launcher(ctypes.byref(params), DTYPE_CODE[dtype])  # noqa: E731
        rc = run() if self._traffic is None else self._traffic.record(name, tensors, run)
        message = take_error(self.lib)
        if rc != 0 or message is not None:
            raise RuntimeError(f"{name}: CUDA kernel launch failed: {message or f'cudaError {rc}'}")

    def norm_fwd(self, x, weight, bias, residual, eps, is_rms):
        rows, n = x.shape
        pt = _norm_param_dtype(x, weight, bias)
        w = weight.to(pt).contiguous() if weight is not None else None
        b = bias.to(pt).contiguous() if bias is not None else None
        y, h = torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0)
        mean = x.new_empty(0 if is_rms else rows, dtype=torch.float32)
        rstd = x.new_empty(rows, dtype=torch.float32)
        if rows and n:
            res = residual.contiguous() if residual is not None else None
            p = NormFwdParams(_ptr(x), _ptr(res), _ptr(w), _ptr(b), _ptr(y), _ptr(h) if res is not None else None,
                              None if is_rms else _ptr(mean), _ptr(rstd), rows, n, eps, DTYPE_CODE[pt], is_rms,
                              _rows_aligned(n, [x, y, res, h if res is not None else None, w, b]))
            self._call("norm_fwd", p, x.dtype, dict(x=x, residual=res, weight=w, bias=b, y=y,
                                                     h=h if res is not None else None, mean=mean, rstd=rstd))
        return y, h, mean, rstd

    def norm_bwd(self, dy, dh, h, weight, bias, mean, rstd, is_rms):
        rows, n = h.shape
        dy = dy.to(h.dtype).reshape(rows, n).contiguous()
        dh = dh.to(h.dtype).reshape(rows, n).contiguous() if dh.numel() else None
        pt = _norm_param_dtype(h, weight, bias)
        w = weight.to(pt).contiguous() if weight is not None else None
        grad = torch.empty if rows and n else torch.zeros  # the kernels write every column
        dw = grad(n, dtype=pt) if weight is not None else None
        db = grad(n, dtype=pt) if bias is not None else None
        dx = torch.empty_like(h)
        if rows and n:
            p = NormBwdParams(_ptr(dy), _ptr(dh), _ptr(h), _ptr(w), None if is_rms else _ptr(mean), _ptr(rstd),
                              _ptr(dx), _ptr(dw), _ptr(db), None, rows, n, DTYPE_CODE[pt], is_rms,
                              _rows_aligned(n, [h, dy, dx, dh, w]))
            floats = self.lib.mmgpt_emu_norm_bwd_workspace(ctypes.byref(p), DTYPE_CODE[h.dtype])
            work = torch.empty(max(1, floats), dtype=torch.float32)
            p.partials = work.data_ptr()
            self._call("norm_bwd", p, h.dtype, dict(dy=dy, dh=dh, h=h, weight=w, mean=mean, rstd=rstd, dx=dx,
                                                     dweight=dw, dbias=db, partials=work))
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
            self._call("softmax_fwd", p, x.dtype, dict(x=x, y=y, mask=mask, mask_row_offsets=offsets))
        return y

    def softmax_bwd(self, dy, y, scale):
        dy, dx = dy.to(y.dtype).reshape(y.shape).contiguous(), torch.empty_like(y)
        if y.numel():
            p = SoftmaxBwdParams(_ptr(dy), _ptr(y), _ptr(dx), y.shape[0], y.shape[1], scale,
                                 _rows_aligned(y.shape[1], [dy, y, dx]))
            self._call("softmax_bwd", p, y.dtype, dict(dy=dy, y=y, dx=dx))
        return dx

    def cross_entropy_fwd(self, logits, target, ignore_index):
        rows, v = logits.shape
        target = target.to(torch.int64).contiguous()
        loss, lse = logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)
        if rows:
            p = CrossEntropyFwdParams(_ptr(logits), _ptr(target), _ptr(loss), _ptr(lse), rows, v, ignore_index,
                                      _rows_aligned(v, [logits]))
            self._call("cross_entropy_fwd", p, logits.dtype, dict(logits=logits, target=target, loss=loss, lse=lse))
        return loss, lse

    def cross_entropy_bwd(self, dloss, logits, target, lse, ignore_index):
        rows, v = logits.shape
        dloss, target = dloss.float().contiguous(), target.to(torch.int64).contiguous()
        lse, dlogits = lse.float().contiguous(), torch.empty_like(logits)
        if logits.numel():
            p = CrossEntropyBwdParams(_ptr(dloss), _ptr(logits), _ptr(target), _ptr(lse), _ptr(dlogits), rows, v,
                                      ignore_index, _rows_aligned(v, [logits, dlogits]))
            self._call("cross_entropy_bwd", p, logits.dtype,
                       dict(dloss=dloss, logits=logits, target=target, lse=lse, dlogits=dlogits))
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
        keep = {}  # what params point to besides q, k, v (alive until the call returns)
        if cu_seqlens is not None:
            cu = cu_seqlens.contiguous()
            keep["cu_seqlens"] = cu
            p.cu_seqlens, p.batch = cu.data_ptr(), cu.numel() - 1
            p.max_seqlen = max_seqlen if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
        if prefix is not None:
            pre = prefix.to(torch.int32).contiguous()
            keep["prefix"] = pre
            p.prefix = pre.data_ptr()
        return p, keep

    def flash_attn_fwd(self, q, k, v, cu_seqlens, max_seqlen, prefix, causal, scale):
        q, k, v = (self._operand(t) for t in (q, k, v))
        out = torch.empty(q.shape, dtype=q.dtype)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        if out.numel():
            p, keep = self._flash_params(q, k, v, cu_seqlens, max_seqlen, prefix, causal, scale)
            p.out, p.lse = out.data_ptr(), lse.data_ptr()
            p.o_batch_stride, p.o_row_stride, p.o_head_stride = out.stride()[:3]
            self._call("flash_attn_fwd", p, q.dtype, dict(q=q, k=k, v=v, out=out, lse=lse, **keep))
        return out, lse

    def flash_attn_bwd(self, dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, causal, scale):
        q, k, v = (self._operand(t) for t in (q, k, v))
        out, dout = self._operand(out).contiguous(), self._operand(dout.to(q.dtype))
        lse = lse.contiguous()
        dq, dk, dv = (torch.empty(t.shape, dtype=q.dtype) for t in (q, k, v))
        if dq.numel() or dk.numel():
            delta = torch.empty_like(lse)
            p, keep = self._flash_params(q, k, v, cu_seqlens, max_seqlen, prefix, causal, scale)
            p.out, p.lse, p.dout, p.dq, p.dk, p.dv, p.delta = map(_ptr, (out, lse, dout, dq, dk, dv, delta))
            p.o_batch_stride, p.o_row_stride, p.o_head_stride = dq.stride()[:3]
            p.do_batch_stride, p.do_row_stride, p.do_head_stride = dout.stride()[:3]
            p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride = dk.stride()[:3]
            self._call("flash_attn_bwd", p, q.dtype, dict(q=q, k=k, v=v, out=out, lse=lse, dout=dout, dq=dq, dk=dk,
                                                          dv=dv, delta=delta, **keep))
        return dq, dk, dv


@contextlib.contextmanager
def emulated_cuda(extension: EmulatedExtension):
    """Within: backend="cuda" is available for CPU tensors and runs `extension`, through the real ops
    and launchers (ops._dispatch.unavailable_reason and ops.cuda.extension are routed to it)."""
    from mmgpt_engine.ops import _dispatch, cuda

    real_reason, real_extension = _dispatch.unavailable_reason, cuda.extension

    def unavailable_reason(backend, device=None):
        return None if backend == "cuda" else real_reason(backend, device)

    _dispatch.unavailable_reason, cuda.extension = unavailable_reason, lambda: extension
    try:
        yield extension
    finally:
        _dispatch.unavailable_reason, cuda.extension = real_reason, real_extension
