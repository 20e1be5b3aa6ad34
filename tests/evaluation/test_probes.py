
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl.evaluation.probes import (
    LinearProbeResult,
    group_balanced_linear_probe,
    linear_probe,
    linear_probe_layers,
)
from fastcl.evaluation.shortcut_metrics import group_ids


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny full-batch problems: thread hand-offs cost more than they save on a shared CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def clusters(n: int, means: torch.Tensor, g: torch.Generator, noise: float = 1.0):
    y = torch.arange(n) % means.shape[0]
    return means[y] + noise * torch.randn(n, means.shape[1], generator=g), y


# -------------------- linear_probe


def test_probe_separable_data_reaches_full_accuracy():
    g = torch.Generator().manual_seed(0)
    means = 6.0 * torch.eye(4, 16)  # 4 classes, 8.5 noise std between class means
    xtr, ytr = clusters(400, means, g)
    xte, yte = clusters(400, means, g)
    res = linear_probe(xtr, ytr, xte, yte)
    assert isinstance(res, LinearProbeResult)
    assert res.train_acc == 1.0
    assert res.test_acc >= 0.99
    assert res.weight.shape == (4, 16) and res.bias.shape == (4,)
    assert torch.equal(res.test_pred, res.predict(xte))
    assert res.test_acc == pytest.approx((res.test_pred == yte).double().mean().item())


def test_probe_random_labels_is_at_chance():
    g = torch.Generator().manual_seed(1)
    xtr, xte = torch.randn(2000, 20, generator=g), torch.randn(4000, 20, generator=g)
    ytr, yte = torch.randint(0, 4, (2000,), generator=g), torch.randint(0, 4, (4000,), generator=g)
    res = linear_probe(xtr, ytr, xte, yte)
    assert abs(res.test_acc - 0.25) < 0.03  # std of the estimate is ~0.007
    assert res.train_acc > res.test_acc  # it does fit (overfit) the training labels a little


def test_probe_solves_the_regularised_problem():
    g = torch.Generator().manual_seed(2)
    xtr, ytr = clusters(300, torch.randn(3, 5, generator=g), g, noise=1.5)
    wd = 1e-2
    res = linear_probe(xtr, ytr, xtr[:10], ytr[:10], weight_decay=wd)
    # stationarity: the gradient of mean CE + wd/2 ||W||^2 vanishes at the returned solution
    w = res.weight.clone().requires_grad_()
    b = res.bias.clone().requires_grad_()
    xs = (xtr.double() - res.mean) / res.std
    loss = F.cross_entropy(xs @ w.T + b, ytr) + 0.5 * wd * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-5 and gb.abs().max() < 1e-5
    # standardisation statistics are the training ones
    torch.testing.assert_close(res.mean, xtr.double().mean(0))
    torch.testing.assert_close(res.std, xtr.double().std(0, unbiased=False))


def test_probe_is_deterministic_and_invariant_to_feature_scaling():
    g = torch.Generator().manual_seed(3)
    xtr, ytr = clusters(300, torch.randn(3, 8, generator=g), g, noise=2.0)
    xte, yte = clusters(300, torch.randn(3, 8, generator=g), g, noise=2.0)
    xtr, xte = xtr.double(), xte.double()  # so that the rescaled copies lose no precision
    a = linear_probe(xtr, ytr, xte, yte)
    b = linear_probe(xtr.clone(), ytr.clone(), xte, yte)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    scale = torch.logspace(-3, 3, 8, dtype=torch.float64)
    shift = torch.linspace(-50, 50, 8, dtype=torch.float64)
    c = linear_probe(xtr * scale + shift, ytr, xte * scale + shift, yte)
    torch.testing.assert_close(c.weight, a.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(c.test_pred, a.test_pred)


def test_weight_decay_shrinks_weights_and_constant_features_are_safe():
    g = torch.Generator().manual_seed(4)
    xtr, ytr = clusters(200, torch.randn(2, 4, generator=g), g)
    xtr = torch.cat([xtr, torch.full((200, 1), 7.0)], dim=1)  # a constant column: std 0 -> 1
    small = linear_probe(xtr, ytr, xtr, ytr, weight_decay=1e-4)
    large = linear_probe(xtr, ytr, xtr, ytr, weight_decay=1.0)
    assert large.weight.norm() < 0.5 * small.weight.norm()
    assert small.std[-1] == 1.0 and torch.all(small.weight[:, -1] == 0)
    assert linear_probe(xtr, ytr, xtr, ytr, num_classes=5).weight.shape == (5, 5)


def test_probe_accepts_numpy_and_float32():
    g = torch.Generator().manual_seed(5)
    xtr, ytr = clusters(120, 6.0 * torch.eye(3, 6), g)
    a = linear_probe(xtr.numpy(), ytr.numpy(), xtr.numpy(), ytr.numpy())
    b = linear_probe(xtr, ytr, xtr, ytr, dtype=torch.float32)
    assert a.test_acc == 1.0 and b.test_acc == 1.0 and b.weight.dtype == torch.float32


def test_probe_bad_inputs():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="train_y must have shape"):
        linear_probe(x, y[:9], x, y)
    with pytest.raises(TypeError, match="train_y must be an integer"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ValueError, match="test_feats has 4 features"):
        linear_probe(x, y, torch.randn(10, 4), y)
    with pytest.raises(ValueError, match="train_feats must have shape"):
        linear_probe(x[0], y, x, y)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="train_feats contains NaN"):
        linear_probe(bad, y, x, y)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(x, y + 2, x, y, num_classes=2)
    with pytest.raises(ValueError, match="weight_decay"):
        linear_probe(x, y, x, y, weight_decay=-1.0)
    with pytest.raises(ValueError, match="test_y must be non-negative"):
        linear_probe(x, y, x, y - 1)
    with pytest.raises(TypeError, match=r"train_feats must be a torch\.Tensor"):
        linear_probe(x.tolist(), y, x, y)


def test_linear_probe_layers():
    g = torch.Generator().manual_seed(6)
    xtr, ytr = clusters(200, 6.0 * torch.eye(2, 4), g)
    xte, yte = clusters(200, 6.0 * torch.eye(2, 4), g)
    noise_tr, noise_te = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
    res = linear_probe_layers({"good": xtr, "noise": noise_tr}, ytr, {"good": xte, "noise": noise_te}, yte)
    assert set(res) == {"good", "noise"}
    assert res["good"].test_acc == 1.0 and res["noise"].test_acc < 0.65
    with pytest.raises(ValueError, match="different layers"):
        linear_probe_layers({"a": xtr}, ytr, {"b": xte}, yte)


# -------------------- group-balanced probe


def spurious_data(n: int, minority: float, g: torch.Generator):
    """Binary task; feature 0 is the noisy core signal, feature 1 a clean spurious cue that agrees with
    the label except on a ``minority`` fraction (in a class-balanced way)."""
    y = torch.arange(n) % 2
    conflict = torch.rand(n, generator=g) < minority
    a = torch.where(conflict, 1 - y, y)
    x = torch.stack([(2.0 * y - 1.0) + 1.0 * torch.randn(n, generator=g),
                     (2.0 * a - 1.0) + 0.1 * torch.randn(n, generator=g),
                     torch.randn(n, generator=g)], dim=1)
    return x, y, a


def worst_group_acc(pred, y, a):
    return min((pred[(y == i) & (a == j)] == i).double().mean().item() for i in (0, 1) for j in (0, 1))


def test_group_balanced_probe_removes_spurious_reliance():
    g = torch.Generator().manual_seed(7)
    xtr, ytr, atr = spurious_data(2000, 0.05, g)
    xte, yte, ate = spurious_data(4000, 0.5, g)
    groups = group_ids(ytr, atr)
    plain = linear_probe(xtr, ytr, xte, yte)
    balanced = group_balanced_linear_probe(xtr, ytr, groups, xte, yte, num_repeats=5, seed=0)
    wga_plain = worst_group_acc(plain.test_pred, yte, ate)
    wga_bal = worst_group_acc(balanced.test_pred, yte, ate)
    assert wga_plain < 0.5  # the imbalanced fit follows the spurious cue
    assert wga_bal > 0.75  # core feature alone gives ~0.84
    # the balanced classifier weights the core feature more than the spurious one
    w = balanced.weight[1] - balanced.weight[0]
    assert w[0] > w[1] > -0.1
    again = group_balanced_linear_probe(xtr, ytr, groups, xte, yte, num_repeats=5, seed=0)
    assert torch.equal(again.weight, balanced.weight)


def test_group_balanced_probe_on_balanced_groups_equals_plain_probe():
    g = torch.Generator().manual_seed(8)
    x, y, a = spurious_data(400, 0.5, g)
    idx = torch.cat([torch.nonzero((y == i) & (a == j)).flatten()[:60] for i in (0, 1) for j in (0, 1)])
    x, y, a = x[idx], y[idx], a[idx]
    bal = group_balanced_linear_probe(x, y, group_ids(y, a), x, y, num_repeats=1)
    plain = linear_probe(x, y, x, y)  # same data up to a permutation: same convex problem
    torch.testing.assert_close(bal.weight, plain.weight, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="train_groups must have shape"):
        group_balanced_linear_probe(x, y, y[:5], x, y)


def test_probe_accepts_reversed_numpy_views():
    g = torch.Generator().manual_seed(9)
    xtr, ytr = clusters(90, 6.0 * torch.eye(3, 4), g)
    flipped = linear_probe(xtr.numpy()[::-1], ytr.numpy()[::-1], xtr.numpy()[:, ::-1][:, ::-1], ytr.numpy())
    ref = linear_probe(xtr.flip(0), ytr.flip(0), xtr, ytr)
    assert torch.equal(flipped.weight, ref.weight) and torch.equal(flipped.test_pred, ref.test_pred)
    assert flipped.test_acc == ref.test_acc == 1.0


def test_probe_accepts_numpy_scalar_arguments():
    g = torch.Generator().manual_seed(10)
    x, y = clusters(90, 6.0 * torch.eye(3, 4), g)
    groups = group_ids(y, torch.arange(90) % 2)
    ref = linear_probe(x, y, x, y, num_classes=4, weight_decay=1e-3, max_iter=50, tol=1e-6)
    res = linear_probe(x, y, x, y, num_classes=np.int64(4), weight_decay=np.float64(1e-3), max_iter=np.int64(50),
                       tol=np.float64(1e-6))
    assert torch.equal(res.weight, ref.weight) and res.weight.shape == (4, 4) and res.test_acc == ref.test_acc == 1.0
    assert linear_probe(x, y, x, y, weight_decay=np.float32(1e-3)).test_acc == 1.0
    bal = group_balanced_linear_probe(x, y, groups, x, y, num_repeats=np.int64(2), seed=np.int64(3))
    assert torch.equal(bal.weight, group_balanced_linear_probe(x, y, groups, x, y, num_repeats=2, seed=3).weight)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        linear_probe(x, y, x, y, num_classes=np.float64(4.0))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
def test_probe_accepts_integer_features(dtype):
    g = torch.Generator().manual_seed(11)
    x, y = clusters(60, 6.0 * torch.eye(2, 3), g)
    scaled = (x.clamp(-10, 10) * 10).round()  # in [-100, 100]
    xi = (scaled + 100 if dtype == torch.uint8 else scaled).to(dtype)
    res = linear_probe(xi, y, xi, y)
    ref = linear_probe(xi.double(), y, xi.double(), y)
    assert torch.equal(res.weight, ref.weight) and res.test_acc == ref.test_acc == 1.0
    assert torch.equal(res.predict(xi), ref.test_pred)


def test_probe_rejects_bool_and_complex_features_by_name():
    x, y = torch.randn(6, 2), torch.tensor([0, 1] * 3)
    with pytest.raises(TypeError, match=r"test_feats must be a floating-point or integer tensor, got torch\.bool"):
        linear_probe(x, y, x > 0, y)
    with pytest.raises(TypeError, match=r"train_feats must be a floating-point or integer tensor, got torch\.complex"):
        linear_probe(x.to(torch.complex64), y, x, y)
