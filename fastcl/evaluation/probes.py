"""Linear probes on frozen features.

* :func:`linear_probe`: multinomial logistic regression on frozen features (full-batch L-BFGS in
  float64, deterministic), with standardisation and L2 weight decay.
* :func:`group_balanced_linear_probe`: last-layer retraining on group-balanced subsets of a small
  held-out set, averaged over subsets, as in DFR (Kirichenko et al., 2023).
* :func:`linear_probe_layers`: one probe per layer, e.g. on the output of
  :func:`fastcl.models.collect_representations`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl.evaluation._inputs import _accuracy, _features, _labels, _positive_int

__all__ = ["LinearProbeResult", "group_balanced_linear_probe", "linear_probe", "linear_probe_layers"]


@dataclass
class LinearProbeResult:
    """A fitted linear probe.

    The classifier acts on standardised features: ``logits = ((x - mean) / std) @ weight.T + bias``.

    Attributes:
        train_acc: accuracy on the training features, in ``[0, 1]``.
        test_acc: accuracy on the test features, in ``[0, 1]``.
        test_pred: predicted test labels ``[N_test]``.
        weight: ``[C, D]``.
        bias: ``[C]``.
        mean: ``[D]`` training-feature mean (zeros if not standardised).
        std: ``[D]`` training-feature std (ones if not standardised; constant features get 1).
    """

    train_acc: float
    test_acc: float
    test_pred: Tensor
    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor

    def logits(self, feats: Tensor) -> Tensor:
        """Class logits ``[N, C]`` for features ``[N, D]``."""
        feats = _features(feats, "feats")
        if feats.shape[1] != self.weight.shape[1]:
            raise ValueError(f"feats must have {self.weight.shape[1]} columns, got {feats.shape[1]}")
        x = (feats.to(self.weight) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, feats: Tensor) -> Tensor:
        """Predicted labels ``[N]`` for features ``[N, D]``."""
        return self.logits(feats).argmax(dim=1)


def _standardizer(x: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    d = x.shape[1]
    if not standardize:
        return x.new_zeros(d), x.new_ones(d)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    return mean, std


def _fit_logistic(
    x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    """Minimise ``mean CE(x W^T + b, y) + weight_decay / 2 * ||W||^2`` with L-BFGS, from zero."""
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _check_probe_args(weight_decay: float, max_iter: int, tol: float, dtype: torch.dtype) -> None:
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not (
        math.isfinite(weight_decay) and weight_decay >= 0
    ):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    _positive_int(max_iter, "max_iter")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def _prepare(train_feats: Any, train_y: Any, test_feats: Any, test_y: Any,
             num_classes: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    xtr = _features(train_feats, "train_feats")
    xte = _features(test_feats, "test_feats")
    if xtr.shape[0] == 0:
        raise ValueError("train_feats must contain at least one sample")
    if xte.shape[1] != xtr.shape[1]:
        raise ValueError(f"test_feats has {xte.shape[1]} features but train_feats has {xtr.shape[1]}")
    ytr = _labels(train_y, xtr.shape[0], "train_y").to(xtr.device)
    yte = _labels(test_y, xte.shape[0], "test_y").to(xtr.device)
    xte = xte.to(xtr.device)
    seen = max(int(ytr.max()), int(yte.max()) if yte.numel() else 0) + 1
    if num_classes is None:
        num_classes = seen
    else:
        num_classes = _positive_int(num_classes, "num_classes")
        if seen > num_classes:
            raise ValueError(f"labels go up to {seen - 1} but num_classes={num_classes}")
    return xtr, ytr, xte, yte, num_classes



def linear_probe(
    train_feats: Tensor,
    train_y: Tensor,
    test_feats: Tensor,
    test_y: Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    standardize: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-7,
    dtype: torch.dtype = torch.float64,
) -> LinearProbeResult:
    """Multinomial logistic regression on frozen features.

    Features are standardised with the training mean/std, then
    ``mean CE + weight_decay / 2 * ||W||^2`` (bias not penalised) is minimised from zero with
    full-batch L-BFGS (strong-Wolfe line search) in ``dtype``, on the features' device. There is no
    randomness: the same inputs give the same result.

    Args:
        train_feats: ``[N, D]`` training features.
        train_y: ``[N]`` integer labels.
        test_feats: ``[M, D]`` test features.
        test_y: ``[M]`` integer labels.
        num_classes: number of classes; default ``max label + 1``.
        weight_decay: L2 coefficient on the weights.
        standardize: z-score features with the training statistics.
        max_iter: maximum L-BFGS iterations.
        tol: stop once the largest absolute gradient entry is below ``tol``.
        dtype: floating dtype of the optimisation.

    Returns:
        A :class:`LinearProbeResult` with ``train_acc``, ``test_acc``, ``test_pred`` and the fit.
    """
    _check_probe_args(weight_decay, max_iter, tol, dtype)
    xtr, ytr, xte, yte, num_classes = _prepare(train_feats, train_y, test_feats, test_y, num_classes)
    xtr = xtr.to(dtype)
    mean, std = _standardizer(xtr, standardize)
    w, b = _fit_logistic((xtr - mean) / std, ytr, num_classes, float(weight_decay), max_iter, tol)
    result = LinearProbeResult(float("nan"), float("nan"), torch.empty(0, dtype=torch.long), w, b, mean, std)
    result.train_acc = _accuracy(result.predict(xtr), ytr)
    result.test_pred = result.predict(xte)
    result.test_acc = _accuracy(result.test_pred, yte)
    return result


def group_balanced_linear_probe(
    train_feats: Tensor,
    train_y: Tensor,
    train_groups: Tensor,
    test_feats: Tensor,
    test_y: Tensor,
    *,
    num_repeats: int = 10,
    seed: int = 0,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    standardize: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-7,
    dtype: torch.dtype = torch.float64,
) -> LinearProbeResult:
    """Last-layer retraining on group-balanced data, as in DFR (Kirichenko et al., ICLR 2023).

    ``train_*`` is typically a small held-out set with group annotations. Features are
    standardised with the statistics of the whole set; then ``num_repeats`` times every group is
    subsampled without replacement to the size of the smallest group, a :func:`linear_probe`
    classifier is fitted on that balanced subset, and the weights and biases are averaged over the
    repeats. Deterministic for a given ``seed``.

    Args:
        train_feats: ``[N, D]``; train_y: ``[N]``; train_groups: ``[N]`` integer group ids (e.g.
            from :func:`group_ids`); test_feats: ``[M, D]``; test_y: ``[M]``.
        num_repeats: number of balanced subsets averaged.
        seed: seed of the subsampling.
        num_classes, weight_decay, standardize, max_iter, tol, dtype: as in :func:`linear_probe`.

    Returns:
        A :class:`LinearProbeResult` for the averaged classifier; ``train_acc`` is measured on the
        whole (unbalanced) training set.
    """
    _check_probe_args(weight_decay, max_iter, tol, dtype)
    num_repeats = _positive_int(num_repeats, "num_repeats")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    xtr, ytr, xte, yte, num_classes = _prepare(train_feats, train_y, test_feats, test_y, num_classes)
    groups = _labels(train_groups, xtr.shape[0], "train_groups").to(xtr.device)
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    per_group = int(counts.min())
    members = [torch.nonzero(inverse == g).flatten() for g in range(len(counts))]

    xtr = xtr.to(dtype)
    mean, std = _standardizer(xtr, standardize)
    xs = (xtr - mean) / std
    gen = torch.Generator().manual_seed(seed)
    w_sum = torch.zeros(num_classes, xtr.shape[1], dtype=dtype, device=xtr.device)
    b_sum = torch.zeros(num_classes, dtype=dtype, device=xtr.device)
    for _ in range(num_repeats):
        idx = torch.cat([m[torch.randperm(len(m), generator=gen)[:per_group].to(m.device)] for m in members])
        w, b = _fit_logistic(xs[idx], ytr[idx], num_classes, float(weight_decay), max_iter, tol)
        w_sum += w
        b_sum += b
    result = LinearProbeResult(float("nan"), float("nan"), torch.empty(0, dtype=torch.long),
                               w_sum / num_repeats, b_sum / num_repeats, mean, std)
    result.train_acc = _accuracy(result.predict(xtr), ytr)
    result.test_pred = result.predict(xte)
    result.test_acc = _accuracy(result.test_pred, yte)
    return result


def linear_probe_layers(
    train_reps: Mapping[str, Tensor],
    train_y: Tensor,
    test_reps: Mapping[str, Tensor],
    test_y: Tensor,
    **kwargs: Any,
) -> dict[str, LinearProbeResult]:
    """Fit one :func:`linear_probe` per layer: ``{name: [N, D_name]}`` dicts -> ``{name: result}``.

    ``train_reps`` and ``test_reps`` must have the same keys (e.g. two calls of
    :func:`fastcl.models.collect_representations`); ``kwargs`` go to :func:`linear_probe`.
    """
    if not isinstance(train_reps, Mapping) or not isinstance(test_reps, Mapping):
        raise TypeError("train_reps and test_reps must be mappings {layer name: features}")
    if set(train_reps) != set(test_reps):
        raise ValueError(f"train_reps and test_reps have different layers: "
                         f"{sorted(train_reps)} vs {sorted(test_reps)}")
    return {name: linear_probe(train_reps[name], train_y, test_reps[name], test_y, **kwargs)
            for name in train_reps}
