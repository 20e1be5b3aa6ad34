"""Projection heads.

Projection heads map a representation ``h [B, in_dim]`` to the embedding ``z [B, out_dim]`` that the
contrastive loss sees; after training the head is discarded and ``h`` is used downstream.

* :class:`LinearHead`, :class:`MLPHead` (SimCLR / SupCon style), :class:`IdentityHead` (no head).
* :class:`FixedReweightingHead`: the fixed, parameter-free alternative of Xue et al., "Investigating
  the Benefits of Projection Head for Representation Learning" (ICLR 2024).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from fastcl._validation import check_positive_int as _check_positive_int
from fastcl.models.encoders import _check_batchnorm_batch

__all__ = ["FixedReweightingHead", "IdentityHead", "LinearHead", "MLPHead"]


def _check_features(x: object, dim: int, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape [..., {dim}], got {tuple(x.shape)}")


class LinearHead(nn.Module):
    """Linear projection ``z = h W^T + b``. Shapes: ``h [..., in_dim] -> z [..., out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_dim = _check_positive_int(in_dim, "in_dim")
        self.out_dim = _check_positive_int(out_dim, "out_dim")
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, h: Tensor) -> Tensor:
        _check_features(h, self.in_dim, "h")
        return self.linear(h)


class MLPHead(nn.Module):
    """MLP projection head as in SimCLR / SupCon.

    ``num_layers - 1`` hidden blocks ``Linear(bias=not batchnorm) -> [BatchNorm1d] -> ReLU`` of width
    ``hidden_dim``, then a final ``Linear(hidden_dim, out_dim)`` with bias. ``num_layers=1`` is a
    single linear layer (``hidden_dim`` unused). Shapes: ``h [B, in_dim] -> z [B, out_dim]``
    (``[..., in_dim]`` is also accepted when there is no BatchNorm).
    With BatchNorm, a batch of one sample in train mode raises ``ValueError`` (no batch statistics).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batchnorm: bool = True
    ) -> None:
        super().__init__()
        self.in_dim = _check_positive_int(in_dim, "in_dim")
        self.hidden_dim = _check_positive_int(hidden_dim, "hidden_dim")
        self.out_dim = _check_positive_int(out_dim, "out_dim")
        self.num_layers = _check_positive_int(num_layers, "num_layers")
        self.batchnorm = bool(batchnorm)
        layers: list[nn.Module] = []
        prev = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(prev, hidden_dim, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            prev = hidden_dim
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        _check_features(h, self.in_dim, "h")
        if self.batchnorm and self.num_layers > 1 and h.ndim != 2:
            raise ValueError(f"h must have shape [B, {self.in_dim}] (BatchNorm1d), got {tuple(h.shape)}")
        if h.ndim == 2:
            _check_batchnorm_batch(self, h.shape[0], "MLPHead")
        return self.net(h)


class FixedReweightingHead(nn.Module):
    """Fixed reweighting head of Xue et al. (ICLR 2024): ``z_i = h_i * kappa**(-i)``.

    Coordinate ``i`` (0-based, so ``z_0 = h_0``) is scaled by ``kappa**-i``; the scales are a fixed
    buffer (``scales``, shape ``[dim]``) and the head has no trainable parameters. ``kappa > 1``
    makes later coordinates progressively less weighted in the loss, mimicking what a trained
    projection head does, so the pre-head ``h`` keeps features more evenly weighted.
    ``kappa == 1`` is the identity. (A 1-based convention only rescales ``z`` by ``1/kappa``, which a
    normalised contrastive loss ignores.) Very large ``kappa**dim`` underflows the last scales to 0; with
    ``kappa < 1`` a scale that overflows the dtype (``kappa**-(dim-1)`` above its largest finite value) raises
    ``ValueError``.

    The scales are computed in float64 and rounded once to the buffer's dtype (again on every ``.to(dtype)``); a
    floating input of another dtype is multiplied by the scales rounded to its own dtype, so ``z`` keeps the dtype
    and the precision of ``h``. An integer ``h`` gives ``z`` in the buffer's dtype.

    Shapes: ``h [..., dim] -> z [..., dim]``.
    """

    scales: Tensor

    def __init__(self, dim: int, kappa: float) -> None:
        super().__init__()
        self.in_dim = self.out_dim = self.dim = _check_positive_int(dim, "dim")
        if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real):
            raise TypeError(f"kappa must be a real number, got {type(kappa).__name__}")
        if not math.isfinite(kappa) or kappa <= 0:
            raise ValueError(f"kappa must be positive and finite, got {kappa}")
        self.kappa = float(kappa)
        self.register_buffer("scales", self._exact_scales(torch.get_default_dtype()))
        self._scales_by_dtype: dict = {}  # (dtype, device) -> scales for inputs of another dtype (eager calls)

    def _exact_scales(self, dtype: torch.dtype) -> Tensor:
        """``kappa**-i`` computed in float64 on the CPU and rounded once to ``dtype``; checked for overflow except
        while compiling (the check reads values: a graph break)."""
        exact = torch.pow(torch.tensor(self.kappa, dtype=torch.float64), -torch.arange(self.dim, dtype=torch.float64))
        scales = exact.to(dtype)
        if not torch.compiler.is_compiling() and not torch.isfinite(scales).all():
            raise ValueError(f"FixedReweightingHead(dim={self.dim}, kappa={self.kappa}): the last scale "
                             f"kappa**-(dim-1) = {float(exact[-1]):.3g} overflows {dtype}; use a kappa closer to 1 "
                             "or a smaller dim")
        return scales

    def _apply(self, fn, *args, **kwargs):
        # A dtype conversion (``.to(dtype)``, ``.half()``, ...) rounds the scales from float64 again instead of
        # converting the old rounded values, so a round trip through a low precision leaves them exact.
        super()._apply(fn, *args, **kwargs)
        if self.scales.is_floating_point():
            self.scales = self._exact_scales(self.scales.dtype).to(self.scales.device)
        self._scales_by_dtype.clear()
        return self

    def _scales_for(self, h: Tensor) -> Tensor:
        """The scales rounded to ``h``'s dtype on its device: the buffer when it has that dtype, else computed once
        per (dtype, device) and kept (a bf16 ``h`` under autocast takes no float64 computation and no host-to-device
        copy per call); computed afresh while compiling (the graph holds them as constants)."""
        if self.scales.dtype == h.dtype:
            return self.scales
        if torch.compiler.is_compiling():
            return self._exact_scales(h.dtype).to(h.device)
        key = (h.dtype, h.device)
        if key not in self._scales_by_dtype:
            self._scales_by_dtype[key] = self._exact_scales(h.dtype).to(h.device)
        return self._scales_by_dtype[key]

    def forward(self, h: Tensor) -> Tensor:
        _check_features(h, self.dim, "h")
        if not (h.is_floating_point() or h.is_complex()):
            return h * self.scales  # integer h: promoted to the scales' dtype
        return h * self._scales_for(h)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kappa={self.kappa}"


class IdentityHead(nn.Module):
    """No projection: ``z = h``. ``dim`` is optional and only sets ``in_dim`` / ``out_dim``."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.in_dim = self.out_dim = None if dim is None else _check_positive_int(dim, "dim")

    def forward(self, h: Tensor) -> Tensor:
        if self.in_dim is not None:
            _check_features(h, self.in_dim, "h")
        return h
