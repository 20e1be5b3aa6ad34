"""Projection heads and the Last Layer Ensemble classifier.

Projection heads map a representation ``h [B, in_dim]`` to the embedding ``z [B, out_dim]`` that the
contrastive loss sees; after training the head is discarded and ``h`` is used downstream.

* :class:`LinearHead`, :class:`MLPHead` (SimCLR / SupCon style), :class:`IdentityHead` (no head).
* :class:`FixedReweightingHead`: the fixed, parameter-free alternative of Xue et al., "Investigating
  the Benefits of Projection Head for Representation Learning" (ICLR 2024).
* :class:`LastLayerEnsemble` and :func:`last_layer_ensemble_loss`: Last Layer Ensemble of Li et al.,
  "A Whac-A-Mole Dilemma: Shortcuts Come in Multiples Where Mitigating One Amplifies Others"
  (CVPR 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl._validation import check_positive_int as _check_positive_int

__all__ = [
    "FixedReweightingHead",
    "IdentityHead",
    "LastLayerEnsemble",
    "LinearHead",
    "MLPHead",
    "last_layer_ensemble_loss",
]


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
        return self.net(h)


class FixedReweightingHead(nn.Module):
    """Fixed reweighting head of Xue et al. (ICLR 2024): ``z_i = h_i * kappa**(-i)``.

    Coordinate ``i`` (0-based, so ``z_0 = h_0``) is scaled by ``kappa**-i``; the scales are a fixed
    buffer (``scales``, shape ``[dim]``) and the head has no trainable parameters. ``kappa > 1``
    makes later coordinates progressively less weighted in the loss, mimicking what a trained
    projection head does, so the pre-head ``h`` keeps features more evenly weighted.
    ``kappa == 1`` is the identity. (A 1-based convention only rescales ``z`` by ``1/kappa``, which a
    normalised contrastive loss ignores.) Very large ``kappa**dim`` underflows the last scales to 0.

    Shapes: ``h [..., dim] -> z [..., dim]``.
    """

    scales: Tensor

    def __init__(self, dim: int, kappa: float) -> None:
        super().__init__()
        self.in_dim = self.out_dim = self.dim = _check_positive_int(dim, "dim")
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
            raise TypeError(f"kappa must be a real number, got {type(kappa).__name__}")
        if not math.isfinite(kappa) or kappa <= 0:
            raise ValueError(f"kappa must be positive and finite, got {kappa}")
        self.kappa = float(kappa)
        exponents = -torch.arange(dim, dtype=torch.float64)
        self.register_buffer("scales", torch.pow(torch.tensor(self.kappa, dtype=torch.float64), exponents)
                             .to(torch.get_default_dtype()))

    def forward(self, h: Tensor) -> Tensor:
        _check_features(h, self.dim, "h")
        return h * self.scales.to(h.dtype)

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


class LastLayerEnsemble(nn.Module):
    """Last Layer Ensemble (Li et al., CVPR 2023): one linear classifier per distribution shift.

    Each of the ``num_shifts`` heads is trained only on samples of its shift (e.g. augmentation
    type); a shift predictor learns which shift a sample comes from. At test time the heads'
    logits are averaged with the predicted shift probabilities.

    * training mode: ``forward(x) -> (logits [B, K, C], shift_logits [B, K])``, to be fed to
      :meth:`loss` / :func:`last_layer_ensemble_loss`;
    * eval mode: ``forward(x) -> sum_k softmax(shift_logits)[:, k] * logits[:, k]`` of shape ``[B, C]``.

    ``K = num_shifts``, ``C = num_classes``, ``x [B, in_features]``. Head ``k`` has weight
    ``self.weight[k]`` ``[C, in_features]`` and bias ``self.bias[k]`` ``[C]``.
    Use :meth:`forward_all` / :meth:`predict` to get either output regardless of the mode.
    """

    def __init__(self, in_features: int, num_classes: int, num_shifts: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = _check_positive_int(in_features, "in_features")
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.num_shifts = _check_positive_int(num_shifts, "num_shifts")
        self.weight = nn.Parameter(torch.empty(num_shifts, num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(num_shifts, num_classes)) if bias else None
        self.shift_predictor = nn.Linear(in_features, num_shifts, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every head like ``nn.Linear``: U(-1/sqrt(in_features), 1/sqrt(in_features))."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        self.shift_predictor.reset_parameters()

    def forward_all(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, in_features] -> (logits [B, K, C], shift_logits [B, K])``."""
        _check_features(x, self.in_features)
        if x.ndim != 2:
            raise ValueError(f"x must have shape [B, {self.in_features}], got {tuple(x.shape)}")
        logits = torch.einsum("bd,kcd->bkc", x, self.weight)
        if self.bias is not None:
            logits = logits + self.bias
        return logits, self.shift_predictor(x)

    @staticmethod
    def combine(logits: Tensor, shift_logits: Tensor) -> Tensor:
        """Shift-probability-weighted sum of head logits: ``[B, K, C], [B, K] -> [B, C]``."""
        if logits.ndim != 3 or shift_logits.shape != logits.shape[:2]:
            raise ValueError(f"expected logits [B, K, C] and shift_logits [B, K], got "
                             f"{tuple(logits.shape)} and {tuple(shift_logits.shape)}")
        weights = shift_logits.softmax(dim=1)
        return torch.einsum("bk,bkc->bc", weights, logits)

    def predict(self, x: Tensor) -> Tensor:
        """Ensembled logits ``[B, C]`` (the eval-mode output), in any mode."""
        return self.combine(*self.forward_all(x))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.forward_all(x) if self.training else self.predict(x)

    def loss(self, logits: Tensor, shift_logits: Tensor, targets: Tensor, shifts: Tensor,
             shift_weight: float = 1.0) -> Tensor:
        """See :func:`last_layer_ensemble_loss`."""
        return last_layer_ensemble_loss(logits, shift_logits, targets, shifts, shift_weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"num_shifts={self.num_shifts}, bias={self.bias is not None}")


def last_layer_ensemble_loss(
    logits: Tensor, shift_logits: Tensor, targets: Tensor, shifts: Tensor, shift_weight: float = 1.0
) -> Tensor:
    """Training loss of :class:`LastLayerEnsemble`.

    ``CE(logits[b, shifts[b]], targets[b]) + shift_weight * CE(shift_logits[b], shifts[b])``, each
    averaged over the batch: every sample trains only the head of its own shift, plus the shift
    predictor.

    Args:
        logits: ``[B, K, C]`` per-head class logits.
        shift_logits: ``[B, K]`` shift-predictor logits.
        targets: ``[B]`` class labels in ``[0, C)``.
        shifts: ``[B]`` shift labels in ``[0, K)``.
        shift_weight: weight of the shift-prediction term.

    Returns:
        Scalar loss.
    """
    named = (("logits", logits), ("shift_logits", shift_logits), ("targets", targets), ("shifts", shifts))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape [B, K, C], got {tuple(logits.shape)}")
    b, k, _ = logits.shape
    if shift_logits.shape != (b, k):
        raise ValueError(f"shift_logits must have shape [{b}, {k}], got {tuple(shift_logits.shape)}")
    for name, t in (("targets", targets), ("shifts", shifts)):
        if t.shape != (b,):
            raise ValueError(f"{name} must have shape [{b}], got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if b > 0 and (shifts.min() < 0 or shifts.max() >= k):
        raise ValueError(f"shifts must lie in [0, {k}), got values in "
                         f"[{int(shifts.min())}, {int(shifts.max())}]")
    own = logits[torch.arange(b, device=logits.device), shifts.to(logits.device)]  # [B, C]
    return F.cross_entropy(own, targets) + shift_weight * F.cross_entropy(shift_logits, shifts)
