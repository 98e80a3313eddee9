"""The `cuda` backend: the C++/CUDA extension built from csrc/, and its launchers.

The launchers below have the names and signatures of the kernel contracts in `ops/norms.py`,
`ops/softmax.py`, `ops/cross_entropy.py` and `ops/attention.py`; the `mmgpt::*` custom ops call
them through `_dispatch.kernels("cuda", ...)`.

Where the extension comes from, first hit wins:
  1. `mmgpt_engine._C`, built ahead of time by `setup.py` (pip install with nvcc and a CUDA torch);
  2. a JIT build with `torch.utils.cpp_extension.load` (ninja) into a cache folder:
     $MMGPT_CUDA_CACHE, else ~/.cache/mmgpt_engine (one sub-folder per torch / CUDA / arch list;
     ninja rebuilds only what changed). At run time a cached build that covers the current
     device is reused (e.g. the one `python -m mmgpt_engine.ops.cuda --build` made); otherwise it
     builds for TORCH_CUDA_ARCH_LIST when that covers the device, else for the device's arch.
     MMGPT_CUDA_JIT=0 turns the JIT build off.
The build is attempted the first time the backend is needed on a machine with a CUDA device;
`unavailable_reason()` then says why the backend cannot run (None when it can).

The flash attention kernels are built for float16/bfloat16 and the head dims in FLASH_HEAD_DIMS;
`ops.attention_backend` sends every other case to triton before it reaches these launchers.

    python -m mmgpt_engine.ops.cuda --build     # build for TORCH_CUDA_ARCH_LIST (default 8.0;9.0)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import _cuda_build as cfg

# Head dims and dtypes the CUDA flash attention is compiled for (see ops.attention_backend).
FLASH_HEAD_DIMS = (64, 128)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
logger = logging.getLogger(__name__)


class CudaExtensionError(RuntimeError):
    """The extension cannot be loaded or built here; the message says why."""




# --------------------------------------------------------------------------------------- build
def _build_dir(archs: list[str], strict: bool) -> Path:
    cuda = (torch.version.cuda or "cpu").replace(".", "")
    flavour = "-strict" if strict else ""
    return cfg.cache_root() / f"{cfg.EXTENSION_NAME}{flavour}-torch{torch.__version__}-cu{cuda}-{cfg.arch_tag(archs)}"


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(arch_list: Optional[str] = None, *, strict: bool = False, verbose: bool = False):
    """JIT-build (or reuse the cached build of) the extension and import it.

    arch_list: e.g. "8.0;9.0" (default: $TORCH_CUDA_ARCH_LIST, else 8.0;9.0). strict: compiler
    warnings are errors. Raises CudaExtensionError with the reason when it cannot build."""
    if torch.version.cuda is None:
        raise CudaExtensionError("csrc extension not built: torch is a CPU-only build (torch.version.cuda is None)")
    src = cfg.csrc_dir()
    if src is None:
        raise CudaExtensionError("csrc extension not built: its sources (csrc/*.cu) were not found next to the "
                                 "package; reinstall mmgpt_engine or run from a source checkout")
    cuda_home = cfg.find_cuda_home()
    if cuda_home is None:
        raise CudaExtensionError("csrc extension not built: nvcc not found (install the CUDA toolkit, put nvcc on "
                                 "PATH or set CUDA_HOME)")
    try:
        archs = cfg.parse_arch_list(arch_list if arch_list is not None else os.environ.get("TORCH_CUDA_ARCH_LIST"))
    except ValueError as e:
        raise CudaExtensionError(f"csrc extension not built: {e}") from None
    # torch looks for the toolkit once, when cpp_extension is imported, from the nvcc on PATH,
    # which may be a wrapper script outside the toolkit (then the link cannot find -lcudart):
    # point it at the real root, before that import when it has not happened yet.
    if not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    build_dir = _build_dir(archs, strict)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = cfg.EXTENSION_NAME + ("_strict_" if strict else "_") + cfg.arch_tag(archs).replace("-", "_")
    env = {"TORCH_CUDA_ARCH_LIST": ";".join(archs), "CUDA_HOME": cuda_home}
    if not verbose and not any(build_dir.glob(f"{name}*.so")):
        logger.warning("building the csrc CUDA extension for %s into %s (first use: this takes minutes)",
                       ";".join(archs), build_dir)
    try:
        with _environ(**env):
            module = cpp_extension.load(
                name=name,
                sources=[str(src / f) for f in cfg.SOURCES],
                extra_cflags=cfg.cxx_flags(strict),
                extra_cuda_cflags=cfg.nvcc_flags(strict),
                extra_include_paths=[str(src)],
                build_directory=str(build_dir),
                with_cuda=True,
                verbose=verbose,
            )
    except (RuntimeError, OSError, ImportError) as e:
        raise CudaExtensionError(f"csrc extension build failed in {build_dir}: {e}") from e
    (build_dir / "archs.txt").write_text(";".join(archs) + "\n")
    return module


def _device_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _covers(archs: list[str], device_arch: str) -> bool:
    return any(a.split("+")[0].rstrip("a") == device_arch for a in archs)


def _runtime_arch_list() -> str:
    """The arch list to load at run time: a cached build covering this device, else
    TORCH_CUDA_ARCH_LIST when it covers the device, else the device's own arch."""
    device_arch = _device_arch()
    if tuple(int(x) for x in device_arch.split(".")) < cfg.MIN_ARCH:
        raise CudaExtensionError(f"the csrc kernels need sm_80 or newer, this device is sm_{device_arch.replace('.', '')}")
    root = cfg.cache_root()
    prefix = f"{cfg.EXTENSION_NAME}-torch{torch.__version__}-"
    if root.is_dir():
        built = sorted((d for d in root.iterdir() if d.name.startswith(prefix) and (d / "archs.txt").is_file()),
                       key=lambda d: (d / "archs.txt").stat().st_mtime, reverse=True)
        for d in built:
            archs = (d / "archs.txt").read_text().strip()
            if _covers(archs.split(";"), device_arch):
                return archs
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        with contextlib.suppress(ValueError):
            if _covers(cfg.parse_arch_list(env), device_arch):
                return env
    return device_arch


def _load():
    try:
        module = importlib.import_module(cfg.AOT_MODULE)
        if all(hasattr(module, f) for f in cfg.LAUNCHERS):
            return module
        logger.warning("%s lacks some launchers (an older build?); JIT-building instead", cfg.AOT_MODULE)
    except ModuleNotFoundError:
        pass
    except ImportError as e:  # installed but built against another torch / CUDA
        logger.warning("%s does not load (%s); JIT-building instead", cfg.AOT_MODULE, e)
    if os.environ.get("MMGPT_CUDA_JIT", "1") == "0":
        raise CudaExtensionError(f"csrc extension not built: {cfg.AOT_MODULE} is not installed and MMGPT_CUDA_JIT=0 "
                                 "turns the JIT build off")
    return build(_runtime_arch_list())


_loaded = cfg.LoadOnce(lambda: _load(), CudaExtensionError)


def extension():
    """The loaded extension module (built on first use); raises CudaExtensionError."""
    return _loaded.get()


def unavailable_reason() -> Optional[str]:
    """None when the cuda backend can run here, else why not (no device, no nvcc, build error)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        extension()
    except CudaExtensionError as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------- launchers
def norm_fwd(x, weight, bias, residual, eps, is_rms):
    return extension().norm_fwd(x, weight, bias, residual, float(eps), bool(is_rms))


def norm_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms):
    return extension().norm_bwd(dy, dh, h, weight, bias, mean, rstd, bool(is_rms))


def softmax_fwd(x, scale, mask, mask_row_offsets, mask_col_stride, causal_rows):
    return extension().softmax_fwd(x, float(scale), mask, mask_row_offsets, int(mask_col_stride), int(causal_rows))


def softmax_bwd(dy, y, scale):
    return extension().softmax_bwd(dy, y, float(scale))


def cross_entropy_fwd(logits, target, ignore_index):
    return extension().cross_entropy_fwd(logits, target, int(ignore_index))


def cross_entropy_bwd(dloss, logits, target, lse, ignore_index):
    return extension().cross_entropy_bwd(dloss, logits, target, lse, int(ignore_index))


def flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, causal, softmax_scale):
    return extension().flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, prefix, bool(causal), float(softmax_scale))


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, causal, softmax_scale):
    return extension().flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix, bool(causal),
                                      float(softmax_scale))


# ------------------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmgpt_engine.ops.cuda",
                                     description="Build or inspect the csrc/ CUDA extension.")
    parser.add_argument("--build", action="store_true",
                        help="build for TORCH_CUDA_ARCH_LIST (default 8.0;9.0) into the cache and print where it is")
    parser.add_argument("--strict", action="store_true", help="treat compiler warnings as errors")
    parser.add_argument("--quiet", action="store_true", help="do not echo the compiler output")
    args = parser.parse_args(argv)
    if not args.build:
        reason = unavailable_reason()
        print("cuda backend: available" if reason is None else f"cuda backend: unavailable ({reason})")
        return 0
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or cfg.DEFAULT_ARCH_LIST
    start = time.perf_counter()
    try:
        module = build(archs, strict=args.strict, verbose=not args.quiet)
    except CudaExtensionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"built {module.__file__} for TORCH_CUDA_ARCH_LIST={archs} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
