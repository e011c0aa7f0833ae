"""Input validation shared by the ops: every failure is a ValueError naming the input, what was
expected and what was given."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Values are the ABI's oe_dtype codes (csrc/common/oe.h).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def tensor(
    name: str,
    t,
    *,
    dtype: Optional[Iterable[torch.dtype] | torch.dtype] = None,
    ndim: Optional[int | Sequence[int]] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Check one tensor argument. `shape` entries of None match any size."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise ValueError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed_nd = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed_nd:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed_nd))} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides {t.stride()}")
    return t


def same_device(**named: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it."""
    devices = {n: t.device for n, t in named.items() if t is not None}
    first = next(iter(devices.values()))
    for n, d in devices.items():
        if d != first:
            listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
            raise ValueError(f"all inputs must be on one device; got {listing}")
    if first.type not in ("cpu", "cuda"):
        raise ValueError(f"tensors must live on cpu or cuda, got {first}")
    return first


def positive(name: str, value: int, *, multiple_of: int = 1) -> int:
    if not isinstance(value, int) or value <= 0 or value % multiple_of:
        extra = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
        raise ValueError(f"{name}: expected a positive integer{extra}, got {value!r}")
    return value


def cuda_stream(device: torch.device) -> int:
    """The current CUDA stream of `device` as an integer handle (0 on CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
