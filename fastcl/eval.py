"""Evaluation: linear probes on frozen features and multi-shortcut (UrbanCars) metrics.

* :func:`linear_probe`: multinomial logistic regression on frozen features (full-batch L-BFGS in
  float64, deterministic), with standardisation and L2 weight decay.
* :func:`group_balanced_linear_probe`: last-layer retraining on group-balanced subsets of a small
  held-out set, averaged over subsets, as in DFR (Kirichenko et al., 2023).
* :func:`linear_probe_layers`: one probe per layer, e.g. on the output of
  :func:`fastcl.models.collect_representations`.
* :func:`multi_shortcut_metrics`: I.D. accuracy, BG / CoObj / BG+CoObj gaps and worst-group
  accuracy of UrbanCars (Li et al., "A Whac-A-Mole Dilemma", CVPR 2023).
* :func:`watermark_metrics`: ImageNet-W's accuracy gap and prediction shift under a watermark.
* :func:`fit_last_layer_ensemble`: Last Layer Ensemble (one head per distribution shift and a shift
  predictor) fitted on frozen features.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LinearProbeResult",
    "fit_last_layer_ensemble",
    "group_balanced_linear_probe",
    "group_ids",
    "linear_probe",
    "linear_probe_layers",
    "multi_shortcut_metrics",
    "watermark_metrics",
]


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        import numpy as np

        if isinstance(x, np.ndarray):
            return torch.from_numpy(x)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    raise TypeError(f"{name} must be a torch.Tensor (or numpy array), got {type(x).__name__}")


def _features(x: Any, name: str) -> Tensor:
    x = _as_tensor(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
    if not (x.dtype.is_floating_point or x.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must be a real-valued tensor, got {x.dtype}")
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
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


# --------------------------------------------------------------------------------------------------
# Linear probes
# --------------------------------------------------------------------------------------------------


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
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (
        math.isfinite(weight_decay) and weight_decay >= 0
    ):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    _positive_int(max_iter, "max_iter")
    if not isinstance(tol, (int, float)) or not tol > 0:
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
        _positive_int(num_classes, "num_classes")
        if seen > num_classes:
            raise ValueError(f"labels go up to {seen - 1} but num_classes={num_classes}")
    return xtr, ytr, xte, yte, num_classes


def _accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred == y).double().mean()) if y.numel() else float("nan")


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


def group_ids(*attributes: Tensor) -> Tensor:
    """Combine discrete per-sample attributes ``[N]`` (labels, cue flags, ...) into group ids ``[N]``.

    Group ids are ``0 .. G-1`` for the ``G`` attribute tuples that occur, numbered in
    lexicographic order of the tuples, e.g.
    ``group_ids(y, bg_aligned, coobj_aligned)`` gives the class x BG x CoObj groups of UrbanCars.
    """
    if not attributes:
        raise ValueError("group_ids needs at least one attribute tensor")
    cols = []
    for i, a in enumerate(attributes):
        a = _as_tensor(a, f"attributes[{i}]")
        if a.ndim != 1 or a.shape != _as_tensor(attributes[0], "attributes[0]").shape:
            raise ValueError(f"attributes[{i}] must have shape [N] like attributes[0], got {tuple(a.shape)}")
        if a.dtype.is_floating_point or a.dtype.is_complex:
            raise TypeError(f"attributes[{i}] must be an integer or bool tensor, got {a.dtype}")
        cols.append(a.long().to(cols[0].device if cols else a.device))
    _, inverse = torch.unique(torch.stack(cols, dim=1), dim=0, return_inverse=True)
    return inverse


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
    _positive_int(num_repeats, "num_repeats")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
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


# --------------------------------------------------------------------------------------------------
# Multi-shortcut metrics (UrbanCars)
# --------------------------------------------------------------------------------------------------

# (key, bg aligned, coobj aligned)
_CUE_GROUPS = (
    ("acc_aligned", True, True),
    ("acc_bg_conflict", False, True),
    ("acc_coobj_conflict", True, False),
    ("acc_both_conflict", False, False),
)


def multi_shortcut_metrics(
    pred: Tensor,
    y: Tensor,
    bg_aligned: Tensor,
    coobj_aligned: Tensor,
    train_ratio: float = 0.95,
    *,
    class_balanced: bool = True,
) -> dict[str, float]:
    """UrbanCars metrics for two shortcuts: background (BG) and co-occurring object (CoObj).

    A sample's cue is *aligned* when it agrees with the class (e.g. an urban background behind an
    urban car). In training each cue is aligned with probability ``train_ratio``, independently,
    so the four cue groups have training prior ``p(bg, co) = p_bg * p_co`` with
    ``p = train_ratio`` if aligned else ``1 - train_ratio``. With ``acc(bg, co)`` the accuracy of a
    group (all values are fractions in ``[0, 1]``):

    * ``id_acc`` (I.D. Acc) ``= sum over groups of p(bg, co) * acc(bg, co)``;
    * ``bg_gap = acc(bg conflicting, co aligned) - id_acc``;
    * ``coobj_gap = acc(bg aligned, co conflicting) - id_acc``;
    * ``both_gap = acc(both conflicting) - id_acc``;
      gaps are negative when the model relies on the shortcut(s);
    * ``worst_group_acc``: the lowest accuracy over the class x BG x CoObj groups (8 for
      UrbanCars' two classes) that have samples;
    * ``acc_aligned``, ``acc_bg_conflict``, ``acc_coobj_conflict``, ``acc_both_conflict``: the four
      ``acc(bg, co)``.

    With ``class_balanced=True`` (default, as the official UrbanCars evaluation does) ``acc(bg, co)``
    is the mean over the classes present in the group of the per-class accuracy; otherwise it is
    the plain accuracy over the group's samples (identical on a class-balanced test set).

    A cue group with no samples gets accuracy NaN (with a ``RuntimeWarning``), and every metric
    that depends on it (``id_acc`` unless its prior is 0, its gap, ``worst_group_acc``) is NaN.

    Args:
        pred: ``[N]`` predicted labels or ``[N, C]`` logits (argmax is taken).
        y: ``[N]`` true labels.
        bg_aligned: ``[N]`` bool or 0/1: background cue agrees with the class.
        coobj_aligned: ``[N]`` bool or 0/1: co-occurring-object cue agrees with the class.
        train_ratio: cue-class agreement probability in training, in ``[0, 1]``.
        class_balanced: average per-class accuracies within each group.

    Returns:
        Dict of Python floats with the keys above.
    """
    pred = _as_tensor(pred, "pred")
    if pred.ndim == 2:
        pred = pred.argmax(dim=1)
    if pred.ndim != 1:
        raise ValueError(f"pred must have shape [N] (labels) or [N, C] (logits), got {tuple(pred.shape)}")
    n = pred.shape[0]
    if pred.dtype.is_floating_point or pred.dtype.is_complex or pred.dtype == torch.bool:
        raise TypeError(f"pred labels must be an integer tensor, got {pred.dtype} (pass [N, C] logits "
                        "to take the argmax)")
    y = _labels(y, n, "y").to(pred.device)
    bg = _binary(bg_aligned, n, "bg_aligned").to(pred.device)
    co = _binary(coobj_aligned, n, "coobj_aligned").to(pred.device)
    if isinstance(train_ratio, bool) or not isinstance(train_ratio, (int, float)) or not (
        0.0 <= train_ratio <= 1.0
    ):
        raise ValueError(f"train_ratio must be a number in [0, 1], got {train_ratio!r}")

    correct = (pred == y).double()
    out: dict[str, float] = {}
    cell_accs: list[float] = []
    any_empty = False
    id_acc = 0.0
    for key, bg_al, co_al in _CUE_GROUPS:
        mask = (bg == bg_al) & (co == co_al)
        if not mask.any():
            warnings.warn(f"multi_shortcut_metrics: no samples with bg_aligned={bg_al}, "
                          f"coobj_aligned={co_al}; {key} is NaN", RuntimeWarning, stacklevel=2)
            acc = float("nan")
            any_empty = True
        else:
            per_class = [float(correct[mask & (y == c)].mean()) for c in torch.unique(y[mask]).tolist()]
            cell_accs.extend(per_class)
            acc = sum(per_class) / len(per_class) if class_balanced else float(correct[mask].mean())
        out[key] = acc
        prior = (train_ratio if bg_al else 1 - train_ratio) * (train_ratio if co_al else 1 - train_ratio)
        if prior > 0:
            id_acc += prior * acc
    out["id_acc"] = id_acc
    out["bg_gap"] = out["acc_bg_conflict"] - id_acc
    out["coobj_gap"] = out["acc_coobj_conflict"] - id_acc
    out["both_gap"] = out["acc_both_conflict"] - id_acc
    out["worst_group_acc"] = float("nan") if any_empty else min(cell_accs)
    return out


# --------------------------------------------------------------------------------------------------
# Watermark metrics (ImageNet-W) and Last Layer Ensemble fitting
# --------------------------------------------------------------------------------------------------


def watermark_metrics(pred_clean: Tensor, pred_marked: Tensor, y: Tensor, watermark_class: int) -> dict[str, float]:
    """ImageNet-W's two quantities (Li et al., CVPR 2023) for one test set seen clean and with a watermark.

    Every test image is classified twice: as it is (``pred_clean``) and with the watermark inserted
    (``pred_marked``). All values are fractions in ``[0, 1]`` or differences of them:

    * ``wm_clean_acc``, ``wm_acc``: accuracy on the clean and on the watermarked images;
    * ``wm_gap = wm_acc - wm_clean_acc`` (ImageNet-W's "IN-W gap"): negative when the watermark costs accuracy;
    * ``wm_shift``: share of predictions that are ``watermark_class`` on the watermarked images minus that share on
      the clean ones (ImageNet-W's "carton gap"): positive when the watermark pulls predictions to its class.

    Args:
        pred_clean, pred_marked: ``[N]`` predicted labels or ``[N, C]`` logits (argmax is taken).
        y: ``[N]`` true labels.
        watermark_class: the class the watermark co-occurs with in training.

    Returns:
        Dict of Python floats with the keys above.
    """
    preds = []
    for name, p in (("pred_clean", pred_clean), ("pred_marked", pred_marked)):
        p = _as_tensor(p, name)
        if p.ndim == 2:
            p = p.argmax(dim=1)
        if p.ndim != 1 or p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
            raise ValueError(f"{name} must be [N] integer labels or [N, C] logits, got {p.dtype} {tuple(p.shape)}")
        preds.append(p)
    if preds[0].shape != preds[1].shape:
        raise ValueError(f"pred_clean and pred_marked must have the same shape, got {tuple(preds[0].shape)} and "
                         f"{tuple(preds[1].shape)}")
    n = preds[0].shape[0]
    if n == 0:
        raise ValueError("watermark_metrics needs at least one sample")
    y = _labels(y, n, "y").to(preds[0].device)
    if isinstance(watermark_class, bool) or not isinstance(watermark_class, int) or watermark_class < 0:
        raise ValueError(f"watermark_class must be a non-negative int, got {watermark_class!r}")
    clean, marked = preds[0], preds[1].to(preds[0].device)
    out = {"wm_clean_acc": _accuracy(clean, y), "wm_acc": _accuracy(marked, y)}
    out["wm_gap"] = out["wm_acc"] - out["wm_clean_acc"]
    out["wm_shift"] = float((marked == watermark_class).double().mean() - (clean == watermark_class).double().mean())
    return out


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
):
    """Fit a :class:`fastcl.heads.LastLayerEnsemble` on frozen features, deterministically.

    Minimises the ensemble's training loss (:func:`fastcl.heads.last_layer_ensemble_loss`: each sample's class
    cross-entropy through the head of its own shift, plus ``shift_weight`` times the cross-entropy of the shift
    predictor on the shift index) plus ``weight_decay / 2`` times the squared norm of all weights (biases not
    penalised), with full-batch L-BFGS from zero on standardised features, as :func:`linear_probe`. The problem is
    convex, so the result does not depend on an initialisation. The standardisation is folded into the returned
    module, which takes raw features.

    Args:
        feats: ``[N, D]`` frozen features of the samples of every shift.
        y: ``[N]`` class labels.
        shifts: ``[N]`` shift index of each sample in ``[0, num_shifts)`` (e.g. 0 original data, 1 background
            augmented, ...).
        num_shifts: number of shifts ``K`` (heads).
        num_classes: number of classes; default ``max label + 1``.
        weight_decay, standardize, max_iter, tol, dtype: as in :func:`linear_probe`.
        shift_weight: weight of the shift-prediction term.

    Returns:
        A :class:`fastcl.heads.LastLayerEnsemble` in eval mode (``module(x)`` gives the shift-weighted logits),
        with parameters in ``feats.dtype`` (float32 for integer features).
    """
    from fastcl.heads import LastLayerEnsemble

    _check_probe_args(weight_decay, max_iter, tol, dtype)
    _positive_int(num_shifts, "num_shifts")
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
        _positive_int(num_classes, "num_classes")
        if seen > num_classes:
            raise ValueError(f"labels go up to {seen - 1} but num_classes={num_classes}")
    if not isinstance(shift_weight, (int, float)) or isinstance(shift_weight, bool) or not shift_weight >= 0:
        raise ValueError(f"shift_weight must be a number >= 0, got {shift_weight!r}")
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
