"""Bad input raises ValueError / TypeError naming the argument and the expected shape."""

import pytest
import torch

from fastcl import InfoNCELoss, NTXentLoss, SupConLoss
from fastcl import functional as FF


def _features(bsz=4, n_views=2, dim=3):
    return torch.randn(bsz, n_views, dim)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: FF.supcon_loss(torch.randn(4, 3)), ValueError, r"features must be \[bsz, n_views, \.\.\.\]"),
        (lambda: FF.supcon_loss(torch.randint(0, 3, (4, 2, 3))), TypeError, "features must be a floating-point"),
        (lambda: FF.supcon_loss([[1.0]]), TypeError, "features must be a torch.Tensor"),
        (lambda: FF.supcon_loss(torch.randn(0, 2, 3)), ValueError, "features must be non-empty"),
        (lambda: FF.supcon_loss(torch.randn(4, 0, 3)), ValueError, "features must be non-empty"),
        (lambda: FF.supcon_loss(_features(), torch.tensor([0, 1, 2])), ValueError, r"labels must have shape \[4\]"),
        (
            lambda: FF.supcon_loss(_features(), torch.tensor([0.0, 1.0, 0.0, 1.0])),
            TypeError,
            "labels must be an integer",
        ),
        (
            lambda: FF.supcon_loss(_features(), mask=torch.ones(4, 3)),
            ValueError,
            r"mask must have shape \[bsz, bsz\] = \[4, 4\]",
        ),
        (
            lambda: FF.supcon_loss(_features(), torch.tensor([0, 1, 0, 1]), torch.ones(4, 4)),
            ValueError,
            "Cannot define both `labels` and `mask`",
        ),
        (lambda: FF.supcon_loss(_features(), contrast_mode="two"), ValueError, "contrast_mode must be one of"),
        (lambda: FF.supcon_loss(_features(), backend="cuda"), ValueError, "backend must be one of"),
        (lambda: FF.supcon_loss(_features(), temperature=0.0), ValueError, "temperature must be a positive"),
        (lambda: FF.supcon_loss(_features(), temperature=-1), ValueError, "temperature must be a positive"),
        (lambda: FF.supcon_loss(_features(), base_temperature=float("nan")), ValueError, "base_temperature must be"),
        (lambda: FF.supcon_loss(_features(), temperature="hot"), TypeError, "temperature must be a number"),
        (
            lambda: FF.nt_xent_loss(torch.randn(4, 3), torch.randn(5, 3)),
            ValueError,
            r"z_a and z_b must have the same shape",
        ),
        (lambda: FF.nt_xent_loss(torch.randn(4, 3), torch.randn(4, 3).double()), TypeError, "same dtype"),
        (
            lambda: FF.nt_xent_loss(torch.randn(4, 3, 1), torch.randn(4, 3, 1)),
            ValueError,
            r"z_a must have shape \[N, D\]",
        ),
        (
            lambda: FF.info_nce_loss(torch.randn(4, 3), torch.randn(5, 3)),
            ValueError,
            "symmetric=True needs as many keys",
        ),
        (lambda: FF.info_nce_loss(torch.randn(4, 3), torch.randn(4, 2)), ValueError, "same feature dim"),
        (
            lambda: FF.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3).half()),
            TypeError,
            "query and key must have the same dtype",
        ),
        (
            lambda: FF.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4)),
            ValueError,
            "symmetric=True uses the default pairing",
        ),
        (
            lambda: FF.info_nce_loss(torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 6]), symmetric=False),
            ValueError,
            r"labels must index keys in \[0, 6\)",
        ),
        (
            lambda: FF.info_nce_loss(torch.randn(4, 3), torch.randn(3, 3), symmetric=False),
            ValueError,
            "needs key",
        ),
        (lambda: FF.info_nce_loss(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "query must be non-empty"),
        (lambda: SupConLoss(contrast_mode="none"), ValueError, "contrast_mode"),
        (lambda: SupConLoss(temperature=0), ValueError, "temperature"),
        (lambda: NTXentLoss(backend="fast"), ValueError, "backend"),
        (lambda: InfoNCELoss(temperature=-0.1), ValueError, "temperature"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_mismatched_devices_are_an_error():
    meta_key = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="query and key must be on the same device"):
        FF.info_nce_loss(torch.randn(4, 3), meta_key)


def test_triton_backend_on_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        FF.supcon_loss(_features(), backend="triton")


def test_labels_of_shape_n_by_1_and_bool_mask_are_accepted():
    features = _features().double()
    labels = torch.tensor([0, 1, 0, 1])
    a = FF.supcon_loss(features, labels.view(-1, 1))
    b = FF.supcon_loss(features, labels)
    c = FF.supcon_loss(features, mask=labels[:, None] == labels[None, :])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_triton_backend_rejects_float64():
    with pytest.raises(TypeError, match="backend='triton' takes float32, float16 or bfloat16"):
        FF.supcon_loss(_features().double(), backend="triton")
