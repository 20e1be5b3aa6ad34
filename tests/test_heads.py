import math

import pytest
import torch
from torch import nn

from fastcl.heads import (
    FixedReweightingHead,
    IdentityHead,
    LastLayerEnsemble,
    LinearHead,
    MLPHead,
    last_layer_ensemble_loss,
)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -------------------- projection heads


def test_linear_head():
    head = LinearHead(8, 3)
    assert n_params(head) == 8 * 3 + 3
    h = torch.randn(5, 8)
    torch.testing.assert_close(head(h), h @ head.linear.weight.T + head.linear.bias)
    assert n_params(LinearHead(8, 3, bias=False)) == 24
    with pytest.raises(ValueError, match="h must have shape"):
        head(torch.randn(5, 7))


@pytest.mark.parametrize(
    "num_layers, batchnorm, expected",
    [
        (2, True, 8 * 16 + 2 * 16 + 16 * 4 + 4),  # hidden Linear has no bias before BN
        (2, False, 8 * 16 + 16 + 16 * 4 + 4),
        (3, True, 8 * 16 + 2 * 16 + 16 * 16 + 2 * 16 + 16 * 4 + 4),
        (1, True, 8 * 4 + 4),
    ],
)
def test_mlp_head_structure(num_layers, batchnorm, expected):
    head = MLPHead(8, 16, 4, num_layers=num_layers, batchnorm=batchnorm)
    assert n_params(head) == expected
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == num_layers
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == (num_layers - 1) * batchnorm
    assert head(torch.randn(6, 8)).shape == (6, 4)


def test_mlp_head_matches_manual_computation():
    head = MLPHead(3, 5, 2, batchnorm=False)
    h = torch.randn(4, 3)
    l1, l2 = head.net[0], head.net[2]
    torch.testing.assert_close(head(h), torch.relu(h @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)
    assert head(torch.randn(2, 4, 3)).shape == (2, 4, 2)  # no BN: any leading dims
    with pytest.raises(ValueError, match="BatchNorm1d"):
        MLPHead(3, 5, 2)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="num_layers"):
        MLPHead(3, 5, 2, num_layers=0)


def test_fixed_reweighting_head_numerics():
    head = FixedReweightingHead(4, kappa=2.0)
    h = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 4.0, 8.0, 16.0], [-3.0, 0.0, 3.0, 0.5]])
    expected = torch.tensor([[1.0, 0.5, 0.25, 0.125], [2.0, 2.0, 2.0, 2.0], [-3.0, 0.0, 0.75, 0.0625]])
    torch.testing.assert_close(head(h), expected, rtol=0, atol=0)
    torch.testing.assert_close(FixedReweightingHead(3, kappa=10)(torch.ones(1, 3)),
                               torch.tensor([[1.0, 0.1, 0.01]]))
    # any leading dims, dtype preserved
    z = head(torch.ones(2, 3, 4, dtype=torch.float64))
    assert z.dtype == torch.float64 and z.shape == (2, 3, 4)
    torch.testing.assert_close(z[1, 2], torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64))


def test_fixed_reweighting_head_has_nothing_trainable():
    head = FixedReweightingHead(5, kappa=3.0)
    assert list(head.parameters()) == []
    assert not head.scales.requires_grad
    assert "scales" in head.state_dict()
    h = torch.randn(2, 5, requires_grad=True)
    head(h).sum().backward()  # gradient flows to the encoder, scaled per coordinate
    torch.testing.assert_close(h.grad, (3.0 ** -torch.arange(5.0)).expand(2, 5))
    loaded = FixedReweightingHead(5, kappa=3.0)
    loaded.load_state_dict(head.state_dict())
    assert torch.equal(loaded.scales, head.scales)


def test_fixed_reweighting_head_kappa_one_is_identity():
    h = torch.randn(7, 6)
    assert torch.equal(FixedReweightingHead(6, kappa=1.0)(h), h)


@pytest.mark.parametrize("kappa, err", [(0.0, ValueError), (-2.0, ValueError), (float("inf"), ValueError),
                                        (float("nan"), ValueError), ("2", TypeError), (True, TypeError)])
def test_fixed_reweighting_head_rejects_bad_kappa(kappa, err):
    with pytest.raises(err, match="kappa"):
        FixedReweightingHead(4, kappa)


def test_fixed_reweighting_head_rejects_bad_dim():
    with pytest.raises(ValueError, match="dim"):
        FixedReweightingHead(0, 2.0)
    with pytest.raises(ValueError, match=r"h must have shape \[\.\.\., 4\]"):
        FixedReweightingHead(4, 2.0)(torch.randn(3, 5))


def test_identity_head():
    h = torch.randn(3, 4)
    assert IdentityHead()(h) is h
    assert IdentityHead(4).out_dim == 4
    with pytest.raises(ValueError, match="h must have shape"):
        IdentityHead(5)(h)


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
