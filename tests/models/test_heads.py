
import pytest
import torch
from torch import nn

from fastcl.models.heads import FixedReweightingHead, IdentityHead, LinearHead, MLPHead


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
