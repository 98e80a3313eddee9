"""How the csrc/ extension is built, in one place for `setup.py` (ahead of time) and
`ops/cuda.py` (JIT): sources, compiler flags, the arch list and where the CUDA toolkit is.

Imports nothing outside the standard library, so setup.py can load it by path before torch
or the package is importable.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Callable, Optional

EXTENSION_NAME = "mmgpt_engine_C"        # the JIT module
AOT_MODULE = "mmgpt_engine._C"           # the module setup.py builds
SOURCES = (
    "bindings.cpp",
    "norms.cu",
    "softmax.cu",
    "cross_entropy.cu",
    "flash_attn_fwd.cu",
    "flash_attn_bwd.cu",
)
CPU_EXTENSION_NAME = "mmgpt_engine_cpu"  # the torch backend's CPU kernels (ops/cpu.py, JIT only)
CPU_SOURCES = ("cpu/kernels.cpp", "cpu/attention.cpp")
CPU_HEADERS = ("cpu/common.h",)
HEADERS = ("common.cuh", "dispatch.cuh", "flash_attn_common.cuh", "launch.cuh", "launchers.h")
DEFAULT_ARCH_LIST = "8.0;9.0"
MIN_ARCH = (8, 0)  # bf16 mma.sync, cp.async and ldmatrix need sm_80
LAUNCHERS = (
    "norm_fwd", "norm_bwd", "softmax_fwd", "softmax_bwd",
    "cross_entropy_fwd", "cross_entropy_bwd", "flash_attn_fwd", "flash_attn_bwd",
)

_PACKAGE_CSRC = Path(__file__).resolve().parent / "_csrc"           # shipped inside a wheel
_REPO_CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"  # a source checkout


def csrc_dir() -> Optional[Path]:
    """The folder holding the sources: the checkout's csrc/, else the copy a wheel ships."""
    for d in (_REPO_CSRC, _PACKAGE_CSRC):
        if all((d / f).is_file() for f in SOURCES + CPU_SOURCES + CPU_HEADERS):
            return d
    return None


def nvcc_flags(strict: bool = False) -> list[str]:
    """Flags for nvcc (torch adds -std=c++20 and the -gencode flags from TORCH_CUDA_ARCH_LIST).

    strict: warnings are errors, for our own sources (the CI build test uses it)."""
    flags = ["-O3", "-lineinfo", "-Xcompiler=-Wall"]
    if strict:
        flags += ["-Werror=all-warnings", "-Xcompiler=-Werror"]
    return flags


def cxx_flags(strict: bool = False) -> list[str]:
    """Flags for the host compiler (bindings.cpp, which includes torch's headers)."""
    flags = ["-O3", "-Wall"]
    if strict:
        flags += ["-Werror"]
    return flags


def parse_arch_list(value: Optional[str]) -> list[str]:
    """'8.0;9.0' (also space or comma separated, '+PTX' allowed) -> ['8.0', '9.0'].

    Raises ValueError for an entry that is not MAJOR.MINOR or that is older than sm_80."""
    value = DEFAULT_ARCH_LIST if not value or not value.strip() else value
    archs = []
    for entry in re.split(r"[;, ]+", value.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if not m:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: expected entries like '8.0' or '9.0', got {entry!r}")
        if (int(m.group(1)), int(m.group(2))) < MIN_ARCH:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: the csrc kernels need sm_80 or newer "
                             f"(bf16 mma.sync, cp.async), got {entry!r}")
        archs.append(entry)
    return archs


def arch_tag(archs: list[str]) -> str:
    """A folder-name-safe tag of an arch list: ['8.0', '9.0'] -> 'sm80-sm90'."""
    return "-".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in archs)


def parse_nvcc_top(dryrun_output: str) -> Optional[str]:
    """The toolkit root from `nvcc --dryrun` output (its '#$ TOP=<root>/bin/..' line)."""
    for line in dryrun_output.splitlines():
        m = re.match(r"#\$ TOP=(.+)$", line.strip())
        if m:
            return os.path.realpath(m.group(1).strip())
    return None


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH when they hold bin/nvcc, else asked of the
    nvcc on PATH (which may be a wrapper script outside the toolkit), else None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.realpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
        top = parse_nvcc_top(out.stdout + out.stderr)
    except (OSError, subprocess.SubprocessError):
        top = None
    if top and os.path.isfile(os.path.join(top, "bin", "nvcc")):
        return top
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return root if os.path.isfile(os.path.join(root, "bin", "nvcc")) else None


def cache_root() -> Path:
    """$MMGPT_CUDA_CACHE, else $XDG_CACHE_HOME/mmgpt_engine, else ~/.cache/mmgpt_engine."""
    env = os.environ.get("MMGPT_CUDA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mmgpt_engine"


class LoadOnce:
    """A compiled extension loaded on first use, once per process (thread-safe): `get()` returns the
    module, or raises again the `error_type` error the first attempt raised. The cuda backend and the
    CPU kernels each hold one."""

    def __init__(self, load: Callable[[], object], error_type: type):
        self._load, self._error_type = load, error_type
        self._lock = threading.Lock()
        self.module = None            # set once a load succeeded
        self.error: Optional[Exception] = None

    def get(self):
        with self._lock:
            if self.module is None and self.error is None:
                try:
                    self.module = self._load()
                except self._error_type as e:
                    self.error = e
            if self.error is not None:
                raise self.error
            return self.module
