
import numpy as np
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


def float64_scales(dim: int, kappa: float) -> torch.Tensor:
    return torch.tensor([kappa ** -i for i in range(dim)], dtype=torch.float64)


def test_fixed_reweighting_head_float64_input_gets_float64_scales():
    h = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = h * float64_scales(6, 3.0)
    torch.testing.assert_close(FixedReweightingHead(6, kappa=3.0)(h), ref, rtol=1e-15, atol=0)
    torch.testing.assert_close(FixedReweightingHead(6, kappa=3.0).double()(h), ref, rtol=1e-15, atol=0)


def test_fixed_reweighting_head_dtype_round_trip_keeps_exact_scales():
    head = FixedReweightingHead(6, kappa=3.0)
    exact32 = head.scales.clone()
    head.to(torch.bfloat16)
    assert head.scales.dtype == torch.bfloat16
    torch.testing.assert_close(head.scales, float64_scales(6, 3.0).bfloat16(), rtol=0, atol=0)
    head.float()
    assert head.scales.dtype == torch.float32 and torch.equal(head.scales, exact32)
    head.double()
    torch.testing.assert_close(head.scales, float64_scales(6, 3.0), rtol=1e-15, atol=0)
    h = torch.randn(2, 6)
    torch.testing.assert_close(head.float()(h), h * exact32, rtol=0, atol=0)
    loaded = FixedReweightingHead(6, kappa=3.0)
    loaded.load_state_dict(head.state_dict())
    assert torch.equal(loaded.scales, exact32)


def test_fixed_reweighting_head_integer_input_is_promoted():
    z = FixedReweightingHead(3, kappa=2.0)(torch.tensor([[4, 4, 4], [1, 2, 3]]))
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, torch.tensor([[4.0, 2.0, 1.0], [1.0, 1.0, 0.75]]), rtol=0, atol=0)


def test_fixed_reweighting_head_kappa_below_one_and_numpy_kappa():
    torch.testing.assert_close(FixedReweightingHead(4, kappa=0.5)(torch.ones(1, 4)),
                               torch.tensor([[1.0, 2.0, 4.0, 8.0]]), rtol=0, atol=0)
    head = FixedReweightingHead(3, kappa=np.float32(2.0))
    assert head.kappa == 2.0 and isinstance(head.kappa, float)
    torch.testing.assert_close(head(torch.ones(1, 3)), torch.tensor([[1.0, 0.5, 0.25]]), rtol=0, atol=0)


def test_fixed_reweighting_head_rejects_overflowing_scales():
    # 0.5**-199 = 8.0e59 is finite in float64 but not in float32 (the default dtype of the buffer)
    with pytest.raises(ValueError, match=r"kappa\*\*-\(dim-1\) = 8\.0\d*e\+59 overflows torch\.float32"):
        FixedReweightingHead(200, kappa=0.5)
    with pytest.raises(ValueError, match=r"kappa\*\*-\(dim-1\) = inf overflows"):
        FixedReweightingHead(2000, kappa=0.5)  # beyond float64 too
    head = FixedReweightingHead(20, kappa=0.5)  # 2**19 = 524288: fits float32, not float16 (max 65504)
    assert torch.isfinite(head.scales).all()
    with pytest.raises(ValueError, match="overflows torch.float16"):
        head(torch.ones(1, 20, dtype=torch.float16))
    with pytest.raises(ValueError, match="overflows torch.float16"):
        head.half()
    # large kappa underflows the last scales to 0 (documented), it does not raise
    assert FixedReweightingHead(64, kappa=1e10).scales[-1] == 0


def test_fixed_reweighting_head_compiles_fullgraph_for_every_input_dtype():
    head = FixedReweightingHead(5, kappa=3.0)
    compiled = torch.compile(head, fullgraph=True)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        h = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
        assert compiled(h).dtype == dtype
        torch.testing.assert_close(compiled(h), head(h))  # bf16: Inductor multiplies in float32, then rounds
    h64 = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(compiled(h64), h64 * float64_scales(5, 3.0), rtol=1e-15, atol=0)


def test_mlp_head_single_sample_needs_eval_mode():
    head = MLPHead(4, 8, 2)
    with pytest.raises(ValueError, match="MLPHead needs at least 2 samples per batch in train mode"):
        head(torch.randn(1, 4))
    h = torch.randn(5, 4)
    head(h)
    head.eval()
    torch.testing.assert_close(head(h[:1]), head(h)[:1])
    assert MLPHead(4, 8, 2, batchnorm=False)(h[:1]).shape == (1, 2)
    assert MLPHead(4, 8, 2, num_layers=1)(h[:1]).shape == (1, 2)
