"""Shortcut metrics: group ids, the UrbanCars multi-shortcut metrics and the watermark metrics."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl.evaluation.shortcut_metrics import group_ids, multi_shortcut_metrics, watermark_metrics


def test_group_ids():
    y = torch.tensor([1, 0, 1, 0, 1])
    bg = torch.tensor([True, True, False, True, False])
    # present (y, bg) pairs in lexicographic order: (0, 1) -> 0, (1, 0) -> 1, (1, 1) -> 2
    assert group_ids(y, bg).tolist() == [2, 0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"attributes\[1\]"):
        group_ids(y, bg[:3])


# -------------------- UrbanCars metrics

# (bg aligned, coobj aligned) -> {class: (n samples, n correct)}
CELLS = {
    (1, 1): {0: (10, 10), 1: (10, 10)},  # 1.0
    (0, 1): {0: (10, 9), 1: (30, 15)},  # class-balanced 0.7, pooled 24/40 = 0.6
    (1, 0): {0: (10, 8), 1: (10, 8)},  # 0.8
    (0, 0): {0: (10, 6), 1: (10, 2)},  # 0.4, worst class cell 0.2
}


def build_predictions():
    pred, y, bg, co = [], [], [], []
    for (b, c), per_class in CELLS.items():
        for cls, (n, n_correct) in per_class.items():
            y += [cls] * n
            pred += [cls] * n_correct + [1 - cls] * (n - n_correct)
            bg += [b] * n
            co += [c] * n
    return torch.tensor(pred), torch.tensor(y), torch.tensor(bg, dtype=torch.bool), torch.tensor(co)


def test_multi_shortcut_metrics_against_hand_computation():
    pred, y, bg, co = build_predictions()
    m = multi_shortcut_metrics(pred, y, bg, co, train_ratio=0.95)
    id_acc = 0.95 * 0.95 * 1.0 + 0.05 * 0.95 * 0.7 + 0.95 * 0.05 * 0.8 + 0.05 * 0.05 * 0.4
    assert id_acc == pytest.approx(0.97475)
    assert m["id_acc"] == pytest.approx(id_acc)
    assert m["bg_gap"] == pytest.approx(0.7 - id_acc)
    assert m["coobj_gap"] == pytest.approx(0.8 - id_acc)
    assert m["both_gap"] == pytest.approx(0.4 - id_acc)
    assert m["worst_group_acc"] == pytest.approx(0.2)
    assert (m["acc_aligned"], m["acc_bg_conflict"], m["acc_coobj_conflict"], m["acc_both_conflict"]) == \
        pytest.approx((1.0, 0.7, 0.8, 0.4))
    assert m["bg_gap"] < 0 and m["both_gap"] < m["bg_gap"]


def test_multi_shortcut_metrics_options_and_input_forms():
    pred, y, bg, co = build_predictions()
    pooled = multi_shortcut_metrics(pred, y, bg, co, class_balanced=False)
    assert pooled["acc_bg_conflict"] == pytest.approx(0.6)
    uniform = multi_shortcut_metrics(pred, y, bg, co, train_ratio=0.5)
    assert uniform["id_acc"] == pytest.approx((1.0 + 0.7 + 0.8 + 0.4) / 4)
    logits = F.one_hot(pred, 2).float() * 3.0 - 1.0  # [N, C] logits: argmax == pred
    from_logits = multi_shortcut_metrics(logits, y, bg.long(), co, train_ratio=0.95)
    ref = multi_shortcut_metrics(pred, y, bg, co)
    assert from_logits == pytest.approx(ref)
    from_numpy = multi_shortcut_metrics(pred.numpy(), y.numpy(), bg.numpy(), co.numpy().astype(np.int64))
    assert from_numpy == pytest.approx(ref)


def test_perfect_and_shortcut_models():
    _, y, bg, co = build_predictions()
    perfect = multi_shortcut_metrics(y.clone(), y, bg, co)
    assert perfect["id_acc"] == pytest.approx(1.0)
    assert perfect["bg_gap"] == perfect["coobj_gap"] == perfect["both_gap"] == pytest.approx(0.0)
    # a model that only reads the background cue: right iff the background is aligned
    bg_only = torch.where(bg, y, 1 - y)
    m = multi_shortcut_metrics(bg_only, y, bg, co)
    assert m["id_acc"] == pytest.approx(0.95)
    assert m["bg_gap"] == pytest.approx(-0.95) and m["both_gap"] == pytest.approx(-0.95)
    assert m["coobj_gap"] == pytest.approx(0.05)
    assert m["worst_group_acc"] == 0.0


def test_empty_group_gives_nan_with_warning():
    pred, y, bg, co = build_predictions()
    keep = ~(~bg & ~co.bool())  # drop the (conflict, conflict) group
    with pytest.warns(RuntimeWarning, match="bg_aligned=False, coobj_aligned=False"):
        m = multi_shortcut_metrics(pred[keep], y[keep], bg[keep], co[keep])
    assert math.isnan(m["acc_both_conflict"]) and math.isnan(m["id_acc"])
    assert math.isnan(m["bg_gap"]) and math.isnan(m["worst_group_acc"])
    assert m["acc_bg_conflict"] == pytest.approx(0.7)
    # with train_ratio=1 only the aligned group has prior mass, so I.D. accuracy is still defined
    aligned = bg & co.bool()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m1 = multi_shortcut_metrics(pred[aligned], y[aligned], bg[aligned], co[aligned], train_ratio=1.0)
    assert m1["id_acc"] == pytest.approx(1.0)


def test_worst_group_is_the_minimum_over_class_bg_coobj_cells():
    """Three classes: the worst group is the worst (class, BG cue class, CoObj cue class) cell, not the pooled
    conflicting cue classes; for two classes the cue classes change nothing."""
    g = torch.Generator().manual_seed(0)
    k, per = 3, 10
    cells = [(c, b, o) for c in range(k) for b in range(k) for o in range(k)]
    y = torch.tensor([c for c, _, _ in cells]).repeat_interleave(per)
    bg = torch.tensor([b for _, b, _ in cells]).repeat_interleave(per)
    co = torch.tensor([o for _, _, o in cells]).repeat_interleave(per)
    acc_of_cell = torch.randint(3, per + 1, (len(cells),), generator=g)  # correct samples per cell
    acc_of_cell[cells.index((1, 2, 0))] = 1  # one bad cell: class 1, background of class 2, co-object of class 0
    pred = y.clone()
    for i, n_ok in enumerate(acc_of_cell.tolist()):
        pred[i * per + n_ok:(i + 1) * per] = (y[i * per] + 1) % k
    m = multi_shortcut_metrics(pred, y, bg == y, co == y, bg=bg, coobj=co)
    assert m["worst_group_acc"] == pytest.approx(0.1)
    ref = min(float((pred[(y == c) & (bg == b) & (co == o)] == c).double().mean()) for c, b, o in cells)
    assert m["worst_group_acc"] == pytest.approx(ref)
    pooled = multi_shortcut_metrics(pred, y, bg == y, co == y)  # without cue classes: the 2 conflicting pooled
    assert pooled["worst_group_acc"] > 0.1
    assert {k2: v for k2, v in m.items() if k2 != "worst_group_acc"} == pytest.approx(
        {k2: v for k2, v in pooled.items() if k2 != "worst_group_acc"})
    pred2, y2, bg2, co2 = build_predictions()
    cue_bg, cue_co = torch.where(bg2, y2, 1 - y2), torch.where(co2.bool(), y2, 1 - y2)
    assert multi_shortcut_metrics(pred2, y2, bg2, co2, bg=cue_bg, coobj=cue_co) == multi_shortcut_metrics(
        pred2, y2, bg2, co2)
    with pytest.raises(ValueError, match="bg \\(the cue classes\\) must equal y"):
        multi_shortcut_metrics(pred2, y2, bg2, co2, bg=1 - cue_bg)
    with pytest.raises(ValueError, match="coobj must have shape"):
        multi_shortcut_metrics(pred2, y2, bg2, co2, coobj=cue_co[:3])


def test_multi_shortcut_metrics_bad_inputs():
    pred, y, bg, co = build_predictions()
    with pytest.raises(ValueError, match="bg_aligned must have shape"):
        multi_shortcut_metrics(pred, y, bg[:-1], co)
    with pytest.raises(ValueError, match="y must have shape"):
        multi_shortcut_metrics(pred, y[:-1], bg, co)
    with pytest.raises(ValueError, match="coobj_aligned must contain only 0 and 1"):
        multi_shortcut_metrics(pred, y, bg, co * 2)
    with pytest.raises(TypeError, match="coobj_aligned must be a bool"):
        multi_shortcut_metrics(pred, y, bg, co.float())
    with pytest.raises(TypeError, match="pred labels must be an integer"):
        multi_shortcut_metrics(pred.float(), y, bg, co)
    with pytest.raises(ValueError, match="train_ratio"):
        multi_shortcut_metrics(pred, y, bg, co, train_ratio=1.5)
    with pytest.raises(ValueError, match="pred must have shape"):
        multi_shortcut_metrics(pred.reshape(1, 1, -1), y, bg, co)


# ------------------------------------------------------------------ metrics and Last Layer Ensemble


def test_watermark_metrics_by_hand():
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    clean = torch.tensor([0, 0, 1, 1, 0, 2, 2, 1])  # 6/8 right, 3 predicted as 0
    marked = torch.tensor([0, 0, 0, 0, 0, 2, 0, 1])  # 3/8 right, 6 predicted as 0
    m = watermark_metrics(clean, marked, y, watermark_class=0)
    assert m["wm_clean_acc"] == 0.75 and m["wm_acc"] == 0.375
    assert m["wm_gap"] == pytest.approx(-0.375) and m["wm_shift"] == pytest.approx(3 / 8)
    logits = F.one_hot(marked, 3).float()
    assert watermark_metrics(clean, logits, y, 0) == m
    with pytest.raises(ValueError, match="same shape"):
        watermark_metrics(clean, marked[:4], y, 0)


def test_nan_logits_are_rejected():
    pred, y, bg, co = build_predictions()
    logits = F.one_hot(pred, 2).double()
    logits[3, int(pred[3])] = float("inf")  # an infinite logit is a valid, confident prediction
    assert multi_shortcut_metrics(logits, y, bg, co) == pytest.approx(multi_shortcut_metrics(pred, y, bg, co))
    logits[3] = torch.tensor([0.0, float("nan")], dtype=torch.float64)  # argmax would count the row as class 1
    with pytest.raises(ValueError, match="pred contains NaN"):
        multi_shortcut_metrics(logits, y, bg, co)
    with pytest.raises(ValueError, match="pred_marked contains NaN"):
        watermark_metrics(pred, logits, y, 0)


def test_single_column_pred_is_rejected():
    # one column is neither [N] labels nor [N, C >= 2] logits: its argmax is always 0
    pred, y, bg, co = build_predictions()
    with pytest.raises(ValueError, match=r"pred has shape \[100, 1\]"):
        multi_shortcut_metrics(pred[:, None], y, bg, co)
    with pytest.raises(ValueError, match=r"pred_clean has shape \[100, 1\]"):
        watermark_metrics(pred[:, None].float(), pred, y, 0)


def test_numpy_views_and_scalars():
    pred, y, bg, co = build_predictions()
    ref = multi_shortcut_metrics(pred, y, bg, co)
    flipped = [t.numpy()[::-1] for t in (pred, y, bg, co)]  # negative strides
    assert multi_shortcut_metrics(*flipped) == pytest.approx(ref)
    assert multi_shortcut_metrics(pred, y, bg, co, train_ratio=np.float64(0.95)) == pytest.approx(ref)
    assert multi_shortcut_metrics(pred, y, bg, co, train_ratio=np.float32(0.5))["id_acc"] == pytest.approx(
        (1.0 + 0.7 + 0.8 + 0.4) / 4)
    clean, marked = pred.numpy()[::-1], y.numpy()[::-1]
    assert watermark_metrics(clean, marked, marked, np.int64(0))["wm_clean_acc"] == pytest.approx(
        float((pred == y).double().mean()))
