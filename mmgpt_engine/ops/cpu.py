"""The torch backend's compiled CPU kernels: csrc/cpu/kernels.cpp, and the autograd functions
that `ops.eager` calls on float32 CPU tensors.

Eager PyTorch runs LayerNorm, RMSNorm, softmax and cross-entropy on the CPU as several passes with
full-size temporaries (RMSNorm's backward is a chain of elementwise ops; cross-entropy's log-sum-exp
allocates a logits-sized exp), well behind what `torch.compile` makes of the same code. These
kernels read each row once and revisit it while it is in cache, with the ISA's vectors (AVX-512,
AVX2, or scalar, chosen from `torch.backends.cpu.get_cpu_capability()`). Attention reads
flash-attn's (B, S, H, D) layout in place (SDPA wants (B, H, S, D) and runs slower on transposed
views) and takes each query row's visible keys as one run, so masked tiles cost nothing; at the
small shapes a CPU trains at its fixed cost is a fraction of SDPA's.

Built on first use with `torch.utils.cpp_extension.load` (a C++ compiler and ninja; about a minute)
into $MMGPT_CUDA_CACHE, else ~/.cache/mmgpt_engine (one folder per torch version and ISA); `make
install` builds it ahead. Where it cannot be built, `ops.eager` keeps its plain-PyTorch route (a
warning says why, once). MMGPT_CPU_KERNELS=0 turns the kernels off.

What runs here (everything else takes the plain-PyTorch route): float32 tensors on the CPU, outside
`torch.compile` (which fuses the plain route itself); the norms with float32 weight and bias,
softmax without a `mask`, cross-entropy without class weights or label smoothing, attention with
q, k and v of one head dim and without `return_lse`, softcap or ALiBi. Double backward
is not supported (the backward functions are once-differentiable).

    python -m mmgpt_engine.ops.cpu --build     # build now (and say where)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _cuda_build as cfg

ENV_VAR = "MMGPT_CPU_KERNELS"
logger = logging.getLogger(__name__)

# compile flags per ATen CPU capability (the values torch.backends.cpu.get_cpu_capability() gives)
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl",
               "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


class CpuExtensionError(RuntimeError):
    """The CPU kernels cannot be built or loaded here; the message says why."""




def isa() -> str:
    """The vector ISA the kernels are built for here: "AVX512", "AVX2" or "DEFAULT" (scalar)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return "AVX512" if cap.startswith("AVX512") else cap if cap in _ISA_FLAGS else "DEFAULT"


def build(verbose: bool = False):
    """Builds (or loads the cached build of) the extension; returns the module."""
    src = cfg.csrc_dir()
    if src is None:
        raise CpuExtensionError("the csrc/ sources are not found (neither a checkout's csrc/ nor the package copy)")
    import torch.utils.cpp_extension as cpp_extension

    target = isa()
    build_dir = cfg.cache_root() / f"{cfg.CPU_EXTENSION_NAME}-torch{torch.__version__}-{target.lower()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"{cfg.CPU_EXTENSION_NAME}_{target.lower()}"
    if not verbose and not any(build_dir.glob(f"{name}*.so")):
        logger.warning("building the CPU kernels (%s) into %s (first use: about a minute)", target, build_dir)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(src / f) for f in cfg.CPU_SOURCES],
            extra_cflags=["-O3", "-Wall", "-Wno-maybe-uninitialized", "-fopenmp"] + _ISA_FLAGS.get(target, []),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            with_cuda=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError) as e:
        raise CpuExtensionError(f"CPU kernels not built in {build_dir}: {e}") from e


def _load():
    if os.environ.get(ENV_VAR, "1") == "0":
        raise CpuExtensionError(f"{ENV_VAR}=0 turns the CPU kernels off")
    try:
        return build()
    except CpuExtensionError as e:
        logger.warning("the torch backend runs its plain-PyTorch route on the CPU: %s", e)
        raise


_loaded = cfg.LoadOnce(_load, CpuExtensionError)


def extension():
    """The loaded module (built on first use); raises CpuExtensionError."""
    return _loaded.get()


def unavailable_reason() -> Optional[str]:
    """None when the CPU kernels run here, else why not."""
    try:
        extension()
    except CpuExtensionError as e:
        return str(e)
    return None


def enabled() -> bool:
    """Whether `ops.eager` sends eligible calls here (False inside torch.compile's tracing)."""
    if torch.compiler.is_compiling():
        return False
    if _loaded.module is not None:
        return True
    return unavailable_reason() is None


def eligible(*tensors: Optional[Tensor]) -> bool:
    """float32 CPU tensors (None allowed) and the kernels enabled."""
    for t in tensors:
        if t is not None and (t.dtype is not torch.float32 or not t.is_cpu):
            return False
    return _loaded.module is not None and not torch.compiler.is_compiling() or enabled()


def _ext():
    module = _loaded.module
    return module if module is not None else extension()


# ------------------------------------------------------------------------------------------ norms
class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms):
        y, h, mean, rstd = _ext().norm_fwd(x, residual, weight, bias, eps, is_rms)
        has_res = residual is not None
        ctx.save_for_backward(h if has_res else x, weight, mean, rstd)
        ctx.flags = (has_res, bias is not None, is_rms)
        return (y, h) if has_res else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh=None):
        h, weight, mean, rstd = ctx.saved_tensors
        has_res, has_bias, is_rms = ctx.flags
        dh = dh.contiguous() if has_res and dh is not None else None
        dx, dw, db = _ext().norm_bwd(dy.contiguous(), dh, h, weight, has_bias, mean, rstd, is_rms)
        return (dx, dx if has_res else None, dw if weight is not None else None, db if has_bias else None,
                None, None)


def norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
         is_rms: bool):
    """LayerNorm / RMSNorm over the last dim (x and residual any shape); y, or (y, x + residual)."""
    return _Norm.apply(x.contiguous(), residual.contiguous() if residual is not None else None,
                       weight.contiguous() if weight is not None else None,
                       bias.contiguous() if bias is not None else None, float(eps), is_rms)


# ---------------------------------------------------------------------------------------- softmax
class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, causal_rows):
        y = _ext().softmax_fwd(x, scale, causal_rows)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _ext().softmax_bwd(y, dy.contiguous(), ctx.scale), None, None


def softmax(x: Tensor, scale: float, causal: bool) -> Tensor:
    """softmax(scale * x) over the last dim; causal over the last two (bottom-right aligned)."""
    if x.numel() == 0:
        return x * 1.0
    return _Softmax.apply(x.contiguous(), float(scale), x.shape[-2] if causal else 0)


# ---------------------------------------------------------------------------------- cross-entropy
_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction):
        out, lse, counted = _ext().cross_entropy_fwd(logits, target, ignore_index, _REDUCTIONS[reduction])
        ctx.save_for_backward(logits, target, lse)
        ctx.args = (ignore_index, 1.0 / counted if reduction == "mean" and counted > 0 else 1.0)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, target, lse = ctx.saved_tensors
        ignore_index, scale = ctx.args
        dx = _ext().cross_entropy_bwd(logits, target, lse, grad.contiguous(), scale, ignore_index)
        return dx, None, None, None


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Cross-entropy of logits (..., V) against target (...): "mean" over the counted rows (0 when
    none counts), "sum", or "none" (shaped like target). A bad target raises IndexError."""
    return _CrossEntropy.apply(logits.contiguous(), target.to(torch.int64).contiguous(), int(ignore_index), reduction)


# -------------------------------------------------------------------------------------- attention
class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ranges, scale):
        o, lse = _ext().attention_fwd(q, k, v, ranges, scale)
        ctx.save_for_backward(q, k, v, o, lse, ranges)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, ranges = ctx.saved_tensors
        dq, dk, dv = _ext().attention_bwd(q, k, v, o, lse, do.contiguous(), ranges, ctx.scale)
        return dq, dk, dv, None, None


def _heads(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, ranges: Tensor, scale: float) -> Tensor:
    """Attention in flash-attn's layout: q (B, S_q, H, D), k and v (B, S_k, H_kv, D) (any strides but
    the last; H a multiple of H_kv), query row i of batch b seeing the keys [lo, hi) =
    ranges[b, i] (ranges int32 (1 or B, S_q, 2)); a row that sees no key gives 0. Returns o
    (B, S_q, H, D), contiguous."""
    return _Attention.apply(_heads(q), _heads(k), _heads(v), ranges, float(scale))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmgpt_engine.ops.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="build the CPU kernels now")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    start = time.perf_counter()
    try:
        module = build(verbose=args.verbose)
    except CpuExtensionError as e:
        print(f"mmgpt_engine CPU kernels: {e}", file=sys.stderr)
        return 1
    print(f"mmgpt_engine CPU kernels ({isa()}, {module.vector_width()} floats a vector) ready in "
          f"{time.perf_counter() - start:.0f} s: {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
