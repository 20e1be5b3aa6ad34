"""Last Layer Ensemble (LLE) of Li et al., "A Whac-A-Mole Dilemma: Shortcuts Come in Multiples Where Mitigating One
Amplifies Others" (CVPR 2023): one linear head per distribution shift and a shift classifier, on frozen features.

* :class:`LastLayerEnsemble`: the head (per-shift logits and shift logits, or their weighted sum);
* :func:`last_layer_ensemble_loss`: its training loss;
* :func:`fit_last_layer_ensemble`: a deterministic full-batch fit on frozen features.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl._validation import check_positive_int as _check_positive_int
from fastcl.evaluation._inputs import _features, _labels, _positive_int
from fastcl.evaluation.probes import _check_probe_args, _standardizer
from fastcl.models.heads import _check_features

__all__ = ["LastLayerEnsemble", "fit_last_layer_ensemble", "last_layer_ensemble_loss"]


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
        """``x [B, in_features] -> (logits [B, K, C], shift_logits [B, K])``; integer ``x`` is cast to the
        parameters' dtype."""
        _check_features(x, self.in_features)
        if x.ndim != 2:
            raise ValueError(f"x must have shape [B, {self.in_features}], got {tuple(x.shape)}")
        if not (x.is_floating_point() or x.is_complex()):
            x = x.to(self.weight.dtype)  # integer features (e.g. those fit_last_layer_ensemble was fitted on)
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
    b, k = logits.shape[:2]
    if shift_logits.shape != (b, k):
        raise ValueError(f"shift_logits must have shape [{b}, {k}], got {tuple(shift_logits.shape)}")
    for name, t in (("targets", targets), ("shifts", shifts)):
        if t.shape != (b,):
            raise ValueError(f"{name} must have shape [{b}], got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    c = logits.shape[2]
    for name, t, bound in (("targets", targets, c), ("shifts", shifts, k)):
        if b > 0 and (t.min() < 0 or t.max() >= bound):
            raise ValueError(f"{name} must lie in [0, {bound}), got values in [{int(t.min())}, {int(t.max())}]")
    targets, shifts = targets.to(logits.device), shifts.to(logits.device)
    own = logits[torch.arange(b, device=logits.device), shifts]  # [B, C]
    return F.cross_entropy(own, targets) + shift_weight * F.cross_entropy(shift_logits, shifts)


def fit_last_layer_ensemble(
    feats: Tensor,
    y: Tensor,
    shifts: Tensor,
    num_shifts: int,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    shift_weight: float = 1.0,
    standardize: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-7,
    dtype: torch.dtype = torch.float64,
) -> LastLayerEnsemble:
    """Fit a :class:`LastLayerEnsemble` on frozen features, deterministically.

    Minimises the ensemble's training loss (:func:`last_layer_ensemble_loss`: each sample's class
    cross-entropy through the head of its own shift, plus ``shift_weight`` times the cross-entropy of the shift
    predictor on the shift index) plus ``weight_decay / 2`` times the squared norm of all weights (biases not
    penalised), with full-batch L-BFGS from zero on standardised features, as :func:`.linear_probe`. The problem is
    convex, so the result does not depend on an initialisation. The standardisation is folded into the returned
    module, which takes raw features.

    Args:
        feats: ``[N, D]`` frozen features of the samples of every shift.
        y: ``[N]`` class labels.
        shifts: ``[N]`` shift index of each sample in ``[0, num_shifts)`` (e.g. 0 original data, 1 background
            augmented, ...).
        num_shifts: number of shifts ``K`` (heads).
        num_classes: number of classes; default ``max label + 1``.
        weight_decay, standardize, max_iter, tol, dtype: as in :func:`.linear_probe`.
        shift_weight: weight of the shift-prediction term.

    Returns:
        A :class:`LastLayerEnsemble` in eval mode (``module(x)`` gives the shift-weighted logits),
        with parameters in ``feats.dtype`` (float32 for integer features).
    """
    _check_probe_args(weight_decay, max_iter, tol, dtype)
    num_shifts = _positive_int(num_shifts, "num_shifts")
    x = _features(feats, "feats")
    n, d = x.shape
    if n == 0:
        raise ValueError("feats must contain at least one sample")
    y = _labels(y, n, "y").to(x.device)
    s = _labels(shifts, n, "shifts").to(x.device)
    if int(s.max()) >= num_shifts:
        raise ValueError(f"shifts must lie in [0, {num_shifts}), got max {int(s.max())}")
    seen = int(y.max()) + 1
    if num_classes is None:
        num_classes = seen
    else:
        num_classes = _positive_int(num_classes, "num_classes")
        if seen > num_classes:
            raise ValueError(f"labels go up to {seen - 1} but num_classes={num_classes}")
    if not isinstance(shift_weight, numbers.Real) or isinstance(shift_weight, bool) or not (
        math.isfinite(shift_weight) and shift_weight >= 0
    ):
        raise ValueError(f"shift_weight must be a finite number >= 0, got {shift_weight!r}")
    shift_weight = float(shift_weight)
    out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    xd = x.to(dtype)
    mean, std = _standardizer(xd, standardize)
    xs = (xd - mean) / std
    k, c = num_shifts, num_classes
    w = torch.zeros(k, c, d, dtype=dtype, device=x.device, requires_grad=True)
    b = torch.zeros(k, c, dtype=dtype, device=x.device, requires_grad=True)
    v = torch.zeros(k, d, dtype=dtype, device=x.device, requires_grad=True)
    a = torch.zeros(k, dtype=dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b, v, a], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        own = torch.einsum("nd,ncd->nc", xs, w[s]) + b[s]  # each sample through its own shift's head
        loss = F.cross_entropy(own, y) + shift_weight * F.cross_entropy(xs @ v.T + a, s)
        loss = loss + 0.5 * float(weight_decay) * ((w * w).sum() + (v * v).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    module = LastLayerEnsemble(d, c, k).to(device=x.device, dtype=out_dtype)
    with torch.no_grad():
        wf = w.detach() / std  # fold the standardisation: ((x - m) / s) W^T + b = x (W / s)^T + (b - (W / s) m)
        vf = v.detach() / std
        module.weight.copy_(wf)
        module.bias.copy_(b.detach() - wf @ mean)
        module.shift_predictor.weight.copy_(vf)
        module.shift_predictor.bias.copy_(a.detach() - vf @ mean)
    return module.eval()
