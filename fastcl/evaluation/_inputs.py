"""Input checks shared by the evaluation functions: frozen features ``[N, D]``, integer labels ``[N]``, 0/1 flags."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        import numpy as np

        if isinstance(x, np.ndarray):
            # torch.from_numpy shares memory and cannot take negative strides (a reversed view, x[::-1])
            return torch.from_numpy(x.copy() if any(s < 0 for s in x.strides) else x)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    raise TypeError(f"{name} must be a torch.Tensor (or numpy array), got {type(x).__name__}")


def _features(x: Any, name: str) -> Tensor:
    x = _as_tensor(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
    if x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be a floating-point or integer tensor, got {x.dtype}")
    if x.dtype.is_floating_point and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _labels(y: Any, n: int, name: str) -> Tensor:
    y = _as_tensor(y, name)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {tuple(y.shape)}")
    if n > 0 and y.min() < 0:
        raise ValueError(f"{name} must be non-negative, got min {int(y.min())}")
    return y.long()


def _binary(a: Any, n: int, name: str) -> Tensor:
    a = _as_tensor(a, name)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {tuple(a.shape)}")
    if a.dtype != torch.bool:
        if a.dtype.is_floating_point or a.dtype.is_complex:
            raise TypeError(f"{name} must be a bool or 0/1 integer tensor, got {a.dtype}")
        if n > 0 and not ((a == 0) | (a == 1)).all():
            raise ValueError(f"{name} must contain only 0 and 1")
        a = a.bool()
    return a


def _positive_int(v: Any, name: str) -> int:
    """A positive Python or numpy integer (not bool), returned as a Python int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred == y).double().mean()) if y.numel() else float("nan")
