"""Input checks shared by every op and every backend.

Each failure raises TypeError (wrong type or dtype) or ValueError (wrong shape, device, value)
with a message that names the argument, what was expected and what was received.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    ndim: Optional[int | Sequence[int]] = None,
    min_ndim: Optional[int] = None,
    last_dim_contiguous: bool = False,
) -> torch.Tensor:
    """Check that `t` is a tensor of one of `dtypes` with the given rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name}: expected a {want}-d tensor, got shape {tuple(t.shape)} ({t.dim()}-d)")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension (stride 1), got strides {t.stride()}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: expected dtype {str(ref.dtype).replace('torch.', '')} (the dtype of {ref_name}), "
            f"got {str(t.dtype).replace('torch.', '')}"
        )


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same shape, dtype and device as `ref`."""
    check_tensor(name, t)
    check_same_dtype(name, t, ref_name, ref)
    check_same_device(name, t, ref_name, ref)
    check_shape(name, t, ref.shape, f"the shape of {ref_name}")


def check_param(name: str, t: Optional[torch.Tensor], n: int, ref_name: str, ref: torch.Tensor) -> None:
    """A 1-d per-feature parameter (norm weight/bias) of length n on ref's device."""
    if t is None:
        return
    check_tensor(name, t, ndim=1)
    check_same_device(name, t, ref_name, ref)
    if t.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) (the last dim of {ref_name}), got {tuple(t.shape)}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not (value > 0 or (allow_zero and value == 0)) or value != value:
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value}")
    return float(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_kernel_dtype(name: str, t: torch.Tensor, backend: str) -> None:
    """The kernels take float32/float16/bfloat16; float64 is for the torch backend (the reference)."""
    if backend != "torch" and t.dtype == torch.float64:
        raise TypeError(f"{name}: the {backend} backend expects float32, float16 or bfloat16, got float64 "
                        "(float64 runs on backend='torch')")
