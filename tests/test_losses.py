"""The nn.Module API: a drop-in for SupContrast's SupConLoss, and the NT-Xent / InfoNCE modules."""

import pytest
import torch
import torch.nn.functional as F
from float64_reference import supcon_float64

import fastcl
from fastcl import InfoNCELoss, NTXentLoss, SupConLoss
from fastcl import functional as FF
from fastcl.ops.reference import supcon_loss_reference


def test_public_api():
    assert {"SupConLoss", "NTXentLoss", "InfoNCELoss", "functional"} <= set(fastcl.__all__)
    assert fastcl.functional.supcon_loss is FF.supcon_loss


def test_supcon_constructor_is_supcontrast_compatible():
    """Positional constructor and forward(features, labels=None, mask=None), as SupContrast's."""
    criterion = SupConLoss(0.1, "one", 0.2)
    assert (criterion.temperature, criterion.contrast_mode, criterion.base_temperature) == (0.1, "one", 0.2)
    features = F.normalize(torch.randn(8, 2, 16, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 3, (8,))
    expected = supcon_float64(features, labels, temperature=0.1, contrast_mode="one", base_temperature=0.2)
    torch.testing.assert_close(criterion(features, labels), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(criterion(features, labels=labels), expected, rtol=1e-10, atol=0)
    assert "contrast_mode='one'" in repr(criterion)


@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
def test_supcon_module_backends_agree(backend):
    features = F.normalize(torch.randn(10, 3, 5, dtype=torch.float64), dim=-1)
    mask = torch.rand(10, 10, dtype=torch.float64)
    loss = SupConLoss(backend=backend)(features, mask=mask)
    torch.testing.assert_close(loss, supcon_float64(features, mask=mask), rtol=1e-10, atol=0)


def test_supcon_default_matches_reference_in_float32():
    features = F.normalize(torch.randn(64, 2, 128), dim=-1)
    labels = torch.randint(0, 10, (64,))
    ours = SupConLoss()(features, labels)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(supcon_loss_reference(features, labels).item(), rel=1e-5)


def test_supcon_normalize_flag():
    raw = torch.randn(6, 2, 4, dtype=torch.float64) * 5
    torch.testing.assert_close(SupConLoss(normalize=True)(raw), SupConLoss()(F.normalize(raw, dim=-1)))


def test_nt_xent_module():
    z_a, z_b = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    loss = NTXentLoss(temperature=0.3)(z_a, z_b)
    stacked = F.normalize(torch.stack([z_a, z_b], 1), dim=-1)
    torch.testing.assert_close(loss, supcon_float64(stacked, temperature=0.3, base_temperature=0.3), rtol=1e-10, atol=0)
    unnormalized = NTXentLoss(temperature=0.3, normalize=False)(z_a, z_b)
    assert not torch.isclose(loss, unnormalized)


def test_info_nce_module_is_clip_loss():
    query, key = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    q, k = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    logits = q @ k.T / 0.07
    target = torch.arange(9)
    clip = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    torch.testing.assert_close(InfoNCELoss()(query, key), clip, rtol=1e-10, atol=0)
    one_way = InfoNCELoss(symmetric=False)(query, key)
    torch.testing.assert_close(one_way, F.cross_entropy(logits, target), rtol=1e-10, atol=0)


def test_losses_train_a_model():
    """A few SGD steps with the fused loss reduce it (gradients flow into parameters)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    data = torch.randn(32, 8)
    labels = torch.arange(32) % 4
    criterion = SupConLoss(temperature=0.5, normalize=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        views = torch.stack([model(data + 0.1 * torch.randn_like(data)) for _ in range(2)], 1)
        loss = criterion(views, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_batch_negatives=False), "in_batch_negatives=False"),
        (dict(false_negative_margin=0.1), "false_negative_margin"),
    ],
)
def test_info_nce_module_query_direction_settings_need_one_direction(kwargs, match):
    """``in_batch_negatives=False`` and ``false_negative_margin`` are query -> key settings: refused in the constructor
    with the default ``symmetric=True``, and with ``symmetric=False`` the functional form's numbers."""
    with pytest.raises(ValueError, match=match) as refused:
        InfoNCELoss(**kwargs)
    assert "symmetric=False" in str(refused.value)
    query, key = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    negatives = torch.randn(4, 5, dtype=torch.float64)
    loss = InfoNCELoss(symmetric=False, **kwargs)(query, key, negatives=negatives)
    expected = FF.info_nce_loss(query, key, negatives=negatives, symmetric=False, **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    if "in_batch_negatives" in kwargs:  # MoCo: its own key and the negatives
        q, k, n = (F.normalize(x, dim=-1) for x in (query, key, negatives))
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ n.T], 1) / 0.07
        torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(7, dtype=torch.long)), rtol=1e-10, atol=0)
