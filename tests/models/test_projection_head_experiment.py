"""Paper A's mechanism in a small experiment (Xue et al., "Investigating the Benefits of Projection Head
for Representation Learning", ICLR 2024).

A two-layer linear network ``h = W1 x`` (encoder), ``z = W2 h`` (projection head) is trained with fastcl's
NT-Xent loss on synthetic data: ``x = sum_k c_k u_k + noise`` with K latent features ``c_k ~ N(0, 1)``
along orthonormal directions ``u_k``. Each augmented view re-draws feature k with probability
``drop[k]`` (0 for the first feature, up to 0.8 for the last), so features differ only in how much the
augmentation disrupts them. The weight of feature k in a layer is ``||W1 u_k||`` for ``h`` and
``||W2 W1 u_k||`` for ``z``.

Prediction: the loss favours the invariant features, and it does so progressively with depth: the
post-projection ``z`` weights features very unequally while the pre-projection ``h`` keeps them more even.
With a balanced initialisation (``W1 W1^T = W2^T W2``, the regime of the paper's analysis, which gradient
descent preserves) the relation is exact: ``w_z = w_h ** 2``.
"""

import math

import pytest
import torch
from torch import nn

from fastcl.functional import nt_xent_loss
from fastcl.models.contrastive import ContrastiveModel
from fastcl.models.heads import LinearHead

K, D_IN, D_HID, D_OUT = 6, 12, 12, 12
DROP = torch.linspace(0.0, 0.8, K)  # per-feature probability that augmentation re-draws it


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_feature_weights(seed: int, init: str, drop: torch.Tensor = DROP, steps: int = 300,
                          batch: int = 128, lr: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Train h = W1 x, z = W2 h with NT-Xent; return per-feature weights of h and z, each scaled to max 1."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))[0][:, :K]  # orthonormal feature directions
    torch.manual_seed(seed)
    model = ContrastiveModel(nn.Linear(D_IN, D_HID, bias=False), LinearHead(D_HID, D_OUT, bias=False))
    W1, W2 = model.encoder.weight, model.head.linear.weight
    if init == "balanced":  # orthonormal rows / columns: W1 W1^T = W2^T W2 = I
        with torch.no_grad():
            W1.copy_(torch.linalg.qr(torch.randn(D_IN, D_HID, generator=g))[0].T)
            W2.copy_(torch.linalg.qr(torch.randn(D_OUT, D_HID, generator=g))[0])
    else:
        assert init == "default"  # PyTorch's nn.Linear initialisation
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def view(c: torch.Tensor) -> torch.Tensor:
        redraw = torch.rand(c.shape, generator=g) < drop
        c = torch.where(redraw, torch.randn(c.shape, generator=g), c)
        return c @ U.T + 0.05 * torch.randn(c.shape[0], D_IN, generator=g)

    for _ in range(steps):
        c = torch.randn(batch, K, generator=g)
        _, z = model.forward_views([view(c), view(c)])
        loss = nt_xent_loss(z[:, 0], z[:, 1], temperature=0.5)  # fastcl's fused loss (chunked on CPU)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w_h = (W1 @ U).norm(dim=0)
        w_z = (W2 @ W1 @ U).norm(dim=0)
    return w_h / w_h.max(), w_z / w_z.max()


def evenness(w: torch.Tensor) -> float:
    """Normalised entropy of the feature weights: 1 = all features equally weighted, 0 = a single feature."""
    p = w / w.sum()
    return float(-(p * p.log()).sum() / math.log(len(w)))


def log_slope(w_h: torch.Tensor, w_z: torch.Tensor) -> float:
    """Least-squares slope of log w_z against log w_h (2 means w_z = w_h ** 2)."""
    a, b = w_h.log() - w_h.log().mean(), w_z.log() - w_z.log().mean()
    return float((a * b).sum() / (a * a).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pre_projection_weights_features_more_evenly_balanced_init(seed):
    w_h, w_z = train_feature_weights(seed, "balanced")
    # measured (seeds 0, 1, 2): evenness h 0.928 / 0.931 / 0.932, z 0.769 / 0.778 / 0.777;
    # weakest/strongest feature h 0.228 / 0.239 / 0.233, z 0.052 / 0.059 / 0.055; slope 1.99 / 1.99 / 2.00
    assert torch.all(w_z[1:] < w_z[:-1])  # z ranks features by invariance ...
    assert torch.all(w_h[1:] < w_h[:-1])  # ... and so does h, but less steeply:
    assert evenness(w_h) > evenness(w_z) + 0.1
    assert w_h.min() > 3 * w_z.min()
    assert 1.8 < log_slope(w_h, w_z) < 2.2  # progressive weighting: w_z ~ w_h ** 2
    torch.testing.assert_close(w_z, w_h**2, atol=0.02, rtol=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pre_projection_weights_features_more_evenly_default_init(seed):
    w_h, w_z = train_feature_weights(seed, "default")
    # measured (seeds 0, 1, 2): evenness h 0.933 / 0.926 / 0.975, z 0.708 / 0.713 / 0.719;
    # weakest/strongest feature h 0.260 / 0.209 / 0.364, z 0.020 / 0.023 / 0.013
    assert w_z.argmax() == 0 and w_h.argmax() == 0  # the invariant feature dominates both layers
    assert torch.all(w_z[1:] < w_z[0])
    assert evenness(w_h) > evenness(w_z) + 0.15
    assert w_h.min() > 4 * w_z.min()


def test_control_without_disruptive_augmentation_keeps_both_layers_even():
    # Same training, but the augmentation disrupts no feature: no reason to reweight, both stay even.
    w_h, w_z = train_feature_weights(0, "balanced", drop=torch.zeros(K))
    assert evenness(w_z) > 0.98 and evenness(w_h) > 0.98
