"""Last Layer Ensemble: the head (train and eval outputs), its loss, and its deterministic fit on frozen features."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastcl.evaluation.lle import LastLayerEnsemble, fit_last_layer_ensemble, last_layer_ensemble_loss
from fastcl.evaluation.probes import linear_probe

# -------------------- Last Layer Ensemble


def make_lle() -> LastLayerEnsemble:
    lle = LastLayerEnsemble(in_features=2, num_classes=2, num_shifts=2)
    with torch.no_grad():
        lle.weight.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]],    # head 0: logits = x
                                       [[0.0, 1.0], [1.0, 0.0]]]))  # head 1: logits = swap(x) + b
        lle.bias.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
        lle.shift_predictor.weight.copy_(torch.eye(2))
        lle.shift_predictor.bias.zero_()
    return lle


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])


def test_lle_parameters():
    lle = LastLayerEnsemble(in_features=8, num_classes=3, num_shifts=4)
    assert lle.weight.shape == (4, 3, 8) and lle.bias.shape == (4, 3)
    assert n_params(lle) == 4 * (8 * 3 + 3) + (8 * 4 + 4)


def test_lle_train_mode_outputs_per_head_logits():
    lle = make_lle().train()
    logits, shift_logits = lle(X)
    expected = torch.tensor([[[1.0, 2.0], [3.0, 0.0]],
                             [[3.0, -1.0], [0.0, 2.0]]])
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(shift_logits, X)


def test_lle_eval_mode_is_shift_weighted_sum_of_head_logits():
    lle = make_lle().eval()
    out = lle(X)
    # sample 0: shift probs softmax([1, 2]); heads [1, 2] and [3, 0]
    p1 = math.e ** 2 / (math.e + math.e ** 2)
    p0 = 1 - p1
    row0 = [p0 * 1 + p1 * 3, p0 * 2 + p1 * 0]
    # sample 1: shift probs softmax([3, -1]); heads [3, -1] and [0, 2]
    q0 = math.e ** 3 / (math.e ** 3 + math.e ** -1)
    q1 = 1 - q0
    row1 = [q0 * 3 + q1 * 0, q0 * -1 + q1 * 2]
    torch.testing.assert_close(out, torch.tensor([row0, row1]))
    torch.testing.assert_close(make_lle().train().predict(X), out)  # predict works in any mode


def test_lle_with_one_shift_is_a_linear_classifier():
    lle = LastLayerEnsemble(5, 3, 1).eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(lle(x), x @ lle.weight[0].T + lle.bias[0])


def test_lle_loss_against_hand_computation():
    lle = make_lle().train()
    logits, shift_logits = lle(X)
    targets, shifts = torch.tensor([1, 0]), torch.tensor([1, 0])
    # sample 0 uses head 1 ([3, 0], target 1); sample 1 uses head 0 ([3, -1], target 0)
    ce_cls = ((math.log(math.e ** 3 + 1) - 0.0) + (math.log(math.e ** 3 + math.e ** -1) - 3.0)) / 2
    ce_shift = ((math.log(math.e + math.e ** 2) - 2.0) + (math.log(math.e ** 3 + math.e ** -1) - 3.0)) / 2
    loss = lle.loss(logits, shift_logits, targets, shifts)
    assert loss.item() == pytest.approx(ce_cls + ce_shift, rel=1e-6)
    half = last_layer_ensemble_loss(logits, shift_logits, targets, shifts, shift_weight=0.5)
    assert half.item() == pytest.approx(ce_cls + 0.5 * ce_shift, rel=1e-6)


def test_lle_loss_trains_only_the_head_of_each_sample_shift():
    lle = LastLayerEnsemble(4, 3, 3).train()
    x = torch.randn(6, 4)
    logits, shift_logits = lle(x)
    lle.loss(logits, shift_logits, torch.randint(0, 3, (6,)), torch.tensor([0, 2, 0, 2, 2, 0])).backward()
    assert torch.count_nonzero(lle.weight.grad[1]) == 0 and torch.count_nonzero(lle.bias.grad[1]) == 0
    assert torch.count_nonzero(lle.weight.grad[0]) > 0 and torch.count_nonzero(lle.weight.grad[2]) > 0
    assert torch.count_nonzero(lle.shift_predictor.weight.grad) > 0


def test_lle_training_learns_shift_specific_rules():
    # Shift 0: class = sign of feature 0; shift 1: class = sign of feature 1; the shift is told by feature 2.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, generator=g)
    shifts = (torch.arange(512) % 2)
    x[:, 2] = torch.where(shifts == 0, -2.0, 2.0) + 0.1 * x[:, 2]
    y = torch.where(shifts == 0, x[:, 0] > 0, x[:, 1] > 0).long()
    lle = LastLayerEnsemble(3, 2, 2)
    opt = torch.optim.SGD(lle.parameters(), lr=0.5, momentum=0.9)
    for _ in range(200):
        lle.train()
        loss = lle.loss(*lle(x), y, shifts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lle.eval()
    with torch.no_grad():
        acc = (lle(x).argmax(1) == y).float().mean().item()
        shift_acc = (lle.forward_all(x)[1].argmax(1) == shifts).float().mean().item()
    assert shift_acc == 1.0
    assert acc > 0.95


def test_lle_bad_inputs():
    lle = make_lle()
    logits, shift_logits = lle.forward_all(X)
    with pytest.raises(ValueError, match="shifts must lie in"):
        lle.loss(logits, shift_logits, torch.tensor([0, 1]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="targets must lie in"):
        lle.loss(logits, shift_logits, torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must lie in"):
        lle.loss(logits, shift_logits, torch.tensor([-1, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must have shape"):
        lle.loss(logits, shift_logits, torch.tensor([0, 1, 1]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="targets must be an integer"):
        lle.loss(logits, shift_logits, torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shift_logits must have shape"):
        lle.loss(logits, shift_logits[:, :1], torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x must have shape"):
        lle(torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_shifts"):
        LastLayerEnsemble(2, 2, 0)


def _shift_data(n_per=400, seed=0):
    """Three shifts with 4 features: feature 3 tells the shift (its mean is -4, 0 or +4); the class is the sign of
    feature k in shift k (the other two features are noise there)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, ss = [], [], []
    for k in range(3):
        x = torch.randn(n_per, 4, generator=g, dtype=torch.float64)
        x[:, 3] = 4.0 * (k - 1) + 0.5 * torch.randn(n_per, generator=g, dtype=torch.float64)
        xs.append(x)
        ys.append((x[:, k] > 0).long())
        ss.append(torch.full((n_per,), k))
    return torch.cat(xs), torch.cat(ys), torch.cat(ss)


def test_lle_recovers_each_shift_head_and_the_shift_classifier():
    x, y, s = _shift_data()
    ens = fit_last_layer_ensemble(x, y, s, 3, weight_decay=1e-2)
    assert isinstance(ens, LastLayerEnsemble) and not ens.training and ens.weight.dtype == torch.float64
    logits, shift_logits = ens.forward_all(x)
    assert (shift_logits.argmax(1) == s).double().mean() > 0.99
    for k in range(3):
        own = logits[s == k, k].argmax(1)
        assert (own == y[s == k]).double().mean() > 0.97  # head k solves shift k ...
        direction = ens.weight[k, 1] - ens.weight[k, 0]
        assert direction[k].abs() > 4 * direction[[j for j in range(3) if j != k]].abs().max()  # ... with feature k
    # eval mode: the shift-probability-weighted combination of the heads
    manual = torch.einsum("bk,bkc->bc", shift_logits.softmax(1), logits)
    assert torch.allclose(ens(x), manual, rtol=0, atol=1e-12)
    assert (ens(x).argmax(1) == y).double().mean() > 0.95
    # one head on everything cannot: the class feature depends on the shift
    single = linear_probe(x, y, x, y, weight_decay=1e-2)
    assert single.test_acc < 0.85


def test_lle_fit_equals_independent_per_shift_problems():
    # Without standardisation the objective splits: head k is a logistic regression on shift k alone with the
    # weight decay scaled by N / N_k, the shift predictor one on the shift index with weight decay / shift_weight.
    x, y, s = _shift_data(n_per=150, seed=1)
    keep = torch.cat([torch.arange(0, 150), torch.arange(150, 250), torch.arange(300, 450)])  # uneven shifts
    x, y, s = x[keep], y[keep], s[keep]
    n, wd, sw = len(y), 5e-2, 0.5
    ens = fit_last_layer_ensemble(x, y, s, 3, weight_decay=wd, shift_weight=sw, standardize=False, tol=1e-10)
    for k in range(3):
        m = s == k
        ref = linear_probe(x[m], y[m], x[m], y[m], weight_decay=wd * n / int(m.sum()), standardize=False, tol=1e-10)
        assert torch.allclose(ens.weight[k], ref.weight, atol=1e-5), k
        assert torch.allclose(ens.bias[k], ref.bias, atol=1e-5), k
    ref = linear_probe(x, s, x, s, weight_decay=wd / sw, standardize=False, tol=1e-10)
    assert torch.allclose(ens.shift_predictor.weight, ref.weight, atol=1e-5)
    assert torch.allclose(ens.shift_predictor.bias, ref.bias, atol=1e-5)


def test_lle_standardisation_is_folded_into_the_module():
    x, y, s = _shift_data(n_per=100, seed=2)
    x32 = (x * torch.tensor([100.0, 0.01, 3.0, 1.0], dtype=torch.float64) + 7).float()
    ens = fit_last_layer_ensemble(x32, y, s, 3)
    assert ens.weight.dtype == torch.float32
    assert (ens(x32).argmax(1) == y).double().mean() > 0.95
    with pytest.raises(ValueError, match="shifts must lie"):
        fit_last_layer_ensemble(x32, y, s, 2)
    with pytest.raises(ValueError, match="shift_weight"):
        fit_last_layer_ensemble(x32, y, s, 3, shift_weight=-1.0)


def test_lle_fit_rejects_infinite_shift_weight():
    x, y, s = _shift_data(n_per=20, seed=3)
    with pytest.raises(ValueError, match="shift_weight must be a finite number >= 0"):
        fit_last_layer_ensemble(x, y, s, 3, shift_weight=float("inf"))
    with pytest.raises(ValueError, match="shift_weight must be a finite number >= 0"):
        fit_last_layer_ensemble(x, y, s, 3, shift_weight=float("nan"))


def test_lle_fit_accepts_numpy_scalar_arguments():
    x, y, s = _shift_data(n_per=30, seed=4)
    ens = fit_last_layer_ensemble(x, y, s, np.int64(3), num_classes=np.int64(3), shift_weight=np.float32(0.5),
                                  max_iter=np.int64(100))
    ref = fit_last_layer_ensemble(x, y, s, 3, num_classes=3, shift_weight=0.5, max_iter=100)
    assert (ens.num_shifts, ens.num_classes) == (3, 3) and isinstance(ens.num_shifts, int)
    assert torch.equal(ens.weight, ref.weight) and torch.equal(ens.shift_predictor.weight, ref.shift_predictor.weight)


def test_lle_loss_takes_labels_on_another_device():
    # labels on the CPU, logits on another device (the meta device stands in for an accelerator)
    logits, shift_logits = make_lle().train()(X)
    targets, shifts = torch.tensor([1, 0]), torch.tensor([1, 0])
    loss = last_layer_ensemble_loss(logits.to("meta"), shift_logits.to("meta"), targets, shifts)
    assert loss.device.type == "meta" and loss.shape == ()
    ce_cls = ((math.log(math.e ** 3 + 1) - 0.0) + (math.log(math.e ** 3 + math.e ** -1) - 3.0)) / 2
    ce_shift = ((math.log(math.e + math.e ** 2) - 2.0) + (math.log(math.e ** 3 + math.e ** -1) - 3.0)) / 2
    cpu = last_layer_ensemble_loss(logits, shift_logits, targets, shifts)
    assert cpu.item() == pytest.approx(ce_cls + ce_shift, rel=1e-6)


def test_lle_fitted_on_integer_features_takes_them_raw():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 10, (60, 3), generator=g)
    y, s = (x[:, 0] > 4).long(), torch.arange(60) % 2
    ens = fit_last_layer_ensemble(x, y, s, 2)
    assert ens.weight.dtype == torch.float32
    out = ens(x)
    assert out.dtype == torch.float32 and torch.equal(out, ens(x.float()))
    assert (out.argmax(1) == y).double().mean() == 1.0
    logits, shift_logits = ens.forward_all(x.to(torch.uint8))
    assert torch.equal(logits, ens.forward_all(x.float())[0])
