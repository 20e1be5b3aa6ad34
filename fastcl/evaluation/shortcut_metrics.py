"""Shortcut metrics on the predictions of a classifier.

* :func:`group_ids`: per-sample attributes (labels, cue flags) -> group ids, e.g. UrbanCars' class x BG x CoObj groups.
* :func:`multi_shortcut_metrics`: I.D. accuracy, BG / CoObj / BG+CoObj gaps and worst-group
  accuracy of UrbanCars (Li et al., "A Whac-A-Mole Dilemma", CVPR 2023).
* :func:`watermark_metrics`: ImageNet-W's accuracy gap and prediction shift under a watermark.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor

from fastcl.evaluation._inputs import _accuracy, _as_tensor, _binary, _labels

__all__ = ["group_ids", "multi_shortcut_metrics", "watermark_metrics"]


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
    bg: Tensor | None = None,
    coobj: Tensor | None = None,
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
    * ``worst_group_acc``: the lowest accuracy over the (class, BG cue class, CoObj cue class) cells that have
      samples, as UrbanCars defines it (8 cells for two classes). It needs the cue classes ``bg`` and ``coobj``
      when there are more than two classes; without them the cells are (class, BG aligned, CoObj aligned), which
      is the same for two classes but pools the conflicting cue classes for more;
    * ``acc_aligned``, ``acc_bg_conflict``, ``acc_coobj_conflict``, ``acc_both_conflict``: the four
      ``acc(bg, co)``.

    With ``class_balanced=True`` (default, as the official UrbanCars evaluation does) ``acc(bg, co)``
    is the mean over the classes present in the group of the per-class accuracy; otherwise it is
    the plain accuracy over the group's samples (identical on a class-balanced test set).

    A cue group with no samples gets accuracy NaN (with a ``RuntimeWarning``), and every metric
    that depends on it (``id_acc`` unless its prior is 0, its gap, ``worst_group_acc``) is NaN.

    Args:
        pred: ``[N]`` predicted labels or ``[N, C]`` logits with ``C >= 2`` (argmax is taken; NaN logits raise
            ``ValueError``).
        y: ``[N]`` true labels.
        bg_aligned: ``[N]`` bool or 0/1: background cue agrees with the class.
        coobj_aligned: ``[N]`` bool or 0/1: co-occurring-object cue agrees with the class.
        train_ratio: cue-class agreement probability in training, in ``[0, 1]``.
        class_balanced: average per-class accuracies within each group.
        bg, coobj: optional ``[N]`` integer cue classes (the class each cue points to); they must agree with
            ``bg_aligned`` / ``coobj_aligned`` (``bg == y`` exactly where aligned).

    Returns:
        Dict of Python floats with the keys above.
    """
    pred = _predicted_labels(pred, "pred")
    if pred.ndim != 1:
        raise ValueError(f"pred must have shape [N] (labels) or [N, C] (logits), got {tuple(pred.shape)}")
    n = pred.shape[0]
    if pred.dtype.is_floating_point or pred.dtype.is_complex or pred.dtype == torch.bool:
        raise TypeError(f"pred labels must be an integer tensor, got {pred.dtype} (pass [N, C] logits "
                        "to take the argmax)")
    y = _labels(y, n, "y").to(pred.device)
    bg_al = _binary(bg_aligned, n, "bg_aligned").to(pred.device)
    co_al = _binary(coobj_aligned, n, "coobj_aligned").to(pred.device)
    if isinstance(train_ratio, bool) or not isinstance(train_ratio, numbers.Real) or not (
        0.0 <= train_ratio <= 1.0
    ):
        raise ValueError(f"train_ratio must be a number in [0, 1], got {train_ratio!r}")
    train_ratio = float(train_ratio)
    cells = group_ids(y, _cue_classes(bg, bg_al, y, "bg"), _cue_classes(coobj, co_al, y, "coobj"))

    correct = (pred == y).double()
    out: dict[str, float] = {}
    any_empty = False
    id_acc = 0.0
    for key, bg_want, co_want in _CUE_GROUPS:
        mask = (bg_al == bg_want) & (co_al == co_want)
        if not mask.any():
            warnings.warn(f"multi_shortcut_metrics: no samples with bg_aligned={bg_want}, "
                          f"coobj_aligned={co_want}; {key} is NaN", RuntimeWarning, stacklevel=2)
            acc = float("nan")
            any_empty = True
        else:
            per_class = [float(correct[mask & (y == c)].mean()) for c in torch.unique(y[mask]).tolist()]
            acc = sum(per_class) / len(per_class) if class_balanced else float(correct[mask].mean())
        out[key] = acc
        prior = (train_ratio if bg_want else 1 - train_ratio) * (train_ratio if co_want else 1 - train_ratio)
        if prior > 0:
            id_acc += prior * acc
    out["id_acc"] = id_acc
    out["bg_gap"] = out["acc_bg_conflict"] - id_acc
    out["coobj_gap"] = out["acc_coobj_conflict"] - id_acc
    out["both_gap"] = out["acc_both_conflict"] - id_acc
    cell_accs = torch.zeros(int(cells.max()) + 1 if n else 0, dtype=torch.float64, device=pred.device)
    cell_accs = cell_accs.index_add(0, cells, correct) / torch.bincount(cells, minlength=len(cell_accs))
    out["worst_group_acc"] = float("nan") if any_empty else float(cell_accs.min())
    return out


def _predicted_labels(p: Tensor, name: str) -> Tensor:
    """``[N]`` labels as they are, or the argmax of ``[N, C]`` logits (``C >= 2``, no NaN: a NaN logit would be
    taken as the largest and counted as a prediction)."""
    p = _as_tensor(p, name)
    if p.ndim == 2:
        if p.shape[1] < 2:
            raise ValueError(f"{name} has shape {list(p.shape)}: pass [N] labels or [N, C] logits with C >= 2 "
                             "(the argmax of a single column is always 0)")
        if (p.is_floating_point() or p.is_complex()) and torch.isnan(p).any():
            raise ValueError(f"{name} contains NaN logits")
        p = p.argmax(dim=1)
    return p


def _cue_classes(cue: Tensor | None, aligned: Tensor, y: Tensor, name: str) -> Tensor:
    """The cue's class per sample, or, without it, the aligned flag (enough to tell the cells apart for two
    classes); checked against the flag."""
    if cue is None:
        return aligned
    cue = _labels(cue, y.shape[0], name).to(y.device)
    if not torch.equal(cue == y, aligned):
        raise ValueError(f"{name} (the cue classes) must equal y exactly where {name}_aligned is true")
    return cue


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
        pred_clean, pred_marked: ``[N]`` predicted labels or ``[N, C]`` logits with ``C >= 2`` (argmax is taken;
            NaN logits raise ``ValueError``).
        y: ``[N]`` true labels.
        watermark_class: the class the watermark co-occurs with in training.

    Returns:
        Dict of Python floats with the keys above.
    """
    preds = []
    for name, p in (("pred_clean", pred_clean), ("pred_marked", pred_marked)):
        p = _predicted_labels(p, name)
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
    if isinstance(watermark_class, bool) or not isinstance(watermark_class, numbers.Integral) or watermark_class < 0:
        raise ValueError(f"watermark_class must be a non-negative int, got {watermark_class!r}")
    watermark_class = int(watermark_class)
    clean, marked = preds[0], preds[1].to(preds[0].device)
    out = {"wm_clean_acc": _accuracy(clean, y), "wm_acc": _accuracy(marked, y)}
    out["wm_gap"] = out["wm_acc"] - out["wm_clean_acc"]
    out["wm_shift"] = float((marked == watermark_class).double().mean() - (clean == watermark_class).double().mean())
    return out
