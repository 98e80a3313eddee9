"""Backend choice: an explicit `backend=` argument > the MMGPT_BACKEND environment variable > the
best backend available for the tensors' device (triton, then cuda on a GPU; torch on the CPU).

Backends:
  torch   pure PyTorch (`ops.reference`), runs everywhere, differentiable by autograd.
  triton  the Triton kernels; on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
  cuda    the CUDA C++ extension built from csrc/; CUDA tensors only.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Optional

import torch

from ._interpret import triton_interpreted

BACKENDS = ("torch", "triton", "cuda")
BACKEND_ENV_VAR = "MMGPT_BACKEND"
logger = logging.getLogger(__name__)


# Looked up once at import (a plain constant, which torch.compile traces without a cache wrapper).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def unavailable_reason(backend: str, device: torch.device | str | None = None) -> Optional[str]:
    """None when `backend` can run on `device`, else a sentence saying why not."""
    device = torch.device(device) if device is not None else _default_device()
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if device.type == "cuda":
            if triton_interpreted():
                return "TRITON_INTERPRET=1 is set, so Triton runs on CPU tensors only"
            return None
        if device.type == "cpu":
            if triton_interpreted():
                return None
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (not set)"
        return f"Triton does not run on {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        if not torch.cuda.is_available():
            return "no CUDA device"
        from . import cuda as cuda_backend

        return cuda_backend.unavailable_reason()
    return f"unknown backend {backend!r}"


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on `device` (default: the current CUDA device, else the CPU)."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Pick the backend for tensors on `device` (see the module docstring for the order)."""
    source = "backend"
    if backend is None:
        env = os.environ.get(BACKEND_ENV_VAR, "").strip()
        if env:
            backend, source = env, f"{BACKEND_ENV_VAR} (environment)"
    if backend is None:
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if unavailable_reason(candidate, device) is None:
                    return candidate
        return "torch"
    if not isinstance(backend, str):
        raise TypeError(f"{source}: expected a str, one of {list(BACKENDS)}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"{source}: expected one of {list(BACKENDS)}, got {backend!r}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"{source}: backend {backend!r} is not available for {device.type} tensors: {reason}")
    return backend


def kernels(backend: str, op_module: str):
    """The module holding `backend`'s launchers for one op family (e.g. 'norms').

    triton -> mmgpt_engine.ops.triton.<op_module>; cuda -> mmgpt_engine.ops.cuda (one extension).
    Imported lazily so that TRITON_INTERPRET is read when the kernels are first needed.
    """
    if backend == "triton":
        return importlib.import_module(f"{__package__}.triton.{op_module}")
    if backend == "cuda":
        return importlib.import_module(f"{__package__}.cuda")
    raise ValueError(f"backend: expected 'triton' or 'cuda' for a kernel launcher, got {backend!r}")


_attention_fallback_logged: set = set()
# flash_attention's options beyond the cuda kernels' contract (ops/attention.py): triton has them all
ATTENTION_TRITON_ONLY_OPTIONS = ("cu_seqlens_k", "window_size", "softcap", "alibi_slopes")


def attention_backend(head_dim: int, dtype: torch.dtype, backend: str, device: torch.device | str | None = None,
                      options: tuple[str, ...] = ()) -> str:
    """The backend that runs `flash_attention` where `backend` runs the other ops.

    That is `backend` itself, except for the cuda kernels, which are built for the head dims in
    `cuda.FLASH_HEAD_DIMS` in float16/bfloat16 and take none of ATTENTION_TRITON_ONLY_OPTIONS
    (separate key offsets, a sliding window, softcap, ALiBi): other head dims and dtypes, and a
    call that uses any of `options` (the names of those in use), run on triton (logged once per
    case). When that fallback cannot run on `device`, raises ValueError for the head dim / dtype
    and NotImplementedError naming the option, saying why."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    unknown = [o for o in options if o not in ATTENTION_TRITON_ONLY_OPTIONS]
    if unknown:
        raise ValueError(f"options: expected names among {list(ATTENTION_TRITON_ONLY_OPTIONS)}, got {unknown}")
    if backend != "cuda":
        return backend
    from .cuda import FLASH_DTYPES, FLASH_HEAD_DIMS

    built_for_it = head_dim in FLASH_HEAD_DIMS and dtype in FLASH_DTYPES
    if built_for_it and not options:
        return backend
    name = str(dtype).replace("torch.", "")
    built = f"head dims {FLASH_HEAD_DIMS} in {[str(t).replace('torch.', '') for t in FLASH_DTYPES]}"
    reason = unavailable_reason("triton", device)
    if reason is not None:
        if not built_for_it:
            raise ValueError(f"the cuda flash attention is built for {built}, got head dim {head_dim} in {name}, "
                             f"and the triton fallback is unavailable: {reason}")
        raise NotImplementedError(f"{options[0]}: the cuda flash attention does not implement {', '.join(options)}, "
                                  f"and the triton fallback is unavailable: {reason}")
    case = (head_dim, dtype) if not built_for_it else tuple(options)
    if case not in _attention_fallback_logged:
        _attention_fallback_logged.add(case)
        if not built_for_it:
            logger.warning("flash_attention: the cuda backend is built for %s, got head dim %d in %s; using triton",
                           built, head_dim, name)
        else:
            logger.warning("flash_attention: the cuda backend does not implement %s; using triton", ", ".join(options))
    return "triton"
