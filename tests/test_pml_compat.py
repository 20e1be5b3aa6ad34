"""The README's "coming from pytorch-metric-learning" table, checked against PML itself (skipped when it is not
installed: ``pip install --no-deps pytorch-metric-learning tqdm``)."""

from __future__ import annotations

import pytest
import torch

import fastcl
from fastcl import functional as FF

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning is not installed")


def _with_positive(labels: torch.Tensor) -> int:
    """Anchors that have at least one other sample with their label (PML averages over these only), at least 1 (the
    README's ``max(N_pos, 1)``: with no positive pair both losses are 0)."""
    same = labels[:, None] == labels[None, :]
    return max(int((same.sum(1) > 1).sum()), 1)


@pytest.mark.parametrize(
    "labels",
    [[0, 1, 0, 2, 1, 3, 0, 4, 5], [0, 0, 1, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 4, 5]],
    ids=["some-alone", "pairs", "no-positive"],
)
def test_supcon_single_view(labels):
    """PML SupConLoss(t) on [N, D] = fastcl supcon_loss([N, 1, D], t, base_t = t, normalize) * N / N_with_positive."""
    torch.manual_seed(0)
    labels = torch.tensor(labels)
    emb = torch.randn(len(labels), 16, dtype=torch.float64)
    expected = pml_losses.SupConLoss(temperature=0.1)(emb, labels)
    ours = FF.supcon_loss(emb[:, None], labels, temperature=0.1, base_temperature=0.1, normalize=True)
    ours = ours * len(labels) / _with_positive(labels)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    # the module form with the same arguments
    module = fastcl.SupConLoss(temperature=0.1, base_temperature=0.1, normalize=True)
    torch.testing.assert_close(module(emb[:, None], labels) * len(labels) / _with_positive(labels), expected)


def test_supcon_two_views():
    """Two views stacked view-major with repeated labels: every anchor has a positive, so the factor is 1."""
    torch.manual_seed(1)
    features = torch.randn(7, 2, 12, dtype=torch.float64)
    labels = torch.randint(0, 3, (7,))
    expected = pml_losses.SupConLoss(temperature=0.2)(torch.cat(features.unbind(1)), labels.repeat(2))
    ours = FF.supcon_loss(features, labels, temperature=0.2, base_temperature=0.2, normalize=True)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_supcon_all_labels_equal_is_zero_in_pml():
    emb, labels = torch.randn(6, 8, dtype=torch.float64), torch.zeros(6, dtype=torch.int64)
    assert pml_losses.SupConLoss()(emb, labels).item() == 0.0  # no negatives: PML returns 0
    assert FF.supcon_loss(emb[:, None], labels, temperature=0.1, base_temperature=0.1, normalize=True).item() > 0


def test_ntxent_with_pair_labels_is_nt_xent():
    """PML NTXentLoss(t) on cat(z_a, z_b) with labels arange(B).repeat(2) = fastcl nt_xent_loss(z_a, z_b, t)."""
    torch.manual_seed(2)
    z_a, z_b = torch.randn(8, 10, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)
    expected = pml_losses.NTXentLoss(temperature=0.07)(torch.cat([z_a, z_b]), torch.arange(8).repeat(2))
    torch.testing.assert_close(FF.nt_xent_loss(z_a, z_b, temperature=0.07), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fastcl.NTXentLoss(temperature=0.07)(z_a, z_b), expected, rtol=1e-10, atol=1e-12)
    # PML's default temperature is 0.07, fastcl's 0.5: the defaults differ
    assert pml_losses.NTXentLoss().temperature == 0.07 and fastcl.NTXentLoss().temperature == 0.5


def test_ntxent_with_class_labels_is_another_loss():
    """With several positives per anchor PML's NTXent puts only negatives in each denominator: not SupCon."""
    torch.manual_seed(3)
    emb, labels = torch.randn(8, 6, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    pml = pml_losses.NTXentLoss(temperature=0.1)(emb, labels)
    ours = FF.supcon_loss(emb[:, None], labels, temperature=0.1, base_temperature=0.1, normalize=True)
    assert abs(pml.item() - ours.item()) > 1e-3
