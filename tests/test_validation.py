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
            lambda: FF.supcon_loss(_features(), torch.tensor([0, 1, 0, 1j])),
            TypeError,
            "labels must be a real-valued",
        ),
        (
            lambda: FF.supcon_loss(_features(), mask=-torch.eye(4)),
            ValueError,
            r"mask must hold non-negative weights .*mask\[0, 0\] = -1",
        ),
        (
            lambda: FF.info_nce_loss(
                torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.0, 1, 2, 3]), symmetric=False
            ),
            TypeError,
            "labels must be an integer",
        ),
        (lambda: FF.supcon_loss(_features(), temperature="0.1"), TypeError, "temperature must be a real number"),
        (lambda: FF.supcon_loss(_features(), temperature=True), TypeError, "temperature must be a real number"),
        (lambda: FF.nt_xent_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=False), TypeError, "real number"),
        (lambda: FF.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), temperature="hot"), TypeError, "real number"),
        (lambda: SupConLoss(temperature=True), TypeError, "temperature must be a real number"),
        (lambda: SupConLoss(base_temperature="0.07"), TypeError, "base_temperature must be a real number"),
        (lambda: NTXentLoss(temperature=torch.tensor([0.5])), ValueError, "temperature must be a Python number or a 0-dim"),
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
        (lambda: FF.supcon_loss(_features(), temperature="hot"), TypeError, "temperature must be a real number"),
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


def test_real_temperatures_are_accepted():
    import numpy as np

    features = _features().double()
    expected = FF.supcon_loss(features, temperature=0.5)
    for value in (np.float32(0.5), np.float64(0.5), 0.5):
        torch.testing.assert_close(FF.supcon_loss(features, temperature=value), expected)
    assert SupConLoss(temperature=1).temperature == 1.0  # an int is a real number


@pytest.mark.parametrize("backend", ["chunked", "reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_float_and_bool_labels_mean_what_supcontrast_means(backend):
    """Equal values are positives (torch.eq), whatever the dtype: same loss as the equivalent integer labels."""
    features = torch.nn.functional.normalize(torch.randn(9, 2, 5), dim=-1)
    if backend != "triton":
        features = features.double()
    floats = torch.tensor([0.5, -1.0, 0.5, 2.25, -0.0, 0.0, 2.25, 1e-7, 0.5])  # -0.0 == 0.0; 1e-7 != 0
    ints = torch.tensor([1, 2, 1, 3, 4, 4, 3, 5, 1])
    expected = FF.supcon_loss(features, ints, backend=backend)
    for labels in (floats, floats.double(), floats.half(), floats.view(-1, 1)):
        torch.testing.assert_close(FF.supcon_loss(features, labels, backend=backend), expected)
    bools = torch.tensor([True, False, True, True, False, False, True, True, False])
    torch.testing.assert_close(
        FF.supcon_loss(features, bools, backend=backend), FF.supcon_loss(features, bools.long(), backend=backend)
    )
    # against SupContrast's formulation (mask = torch.eq(labels, labels.T)) directly
    eq_mask = torch.eq(floats[:, None], floats[None, :]).float()
    torch.testing.assert_close(FF.supcon_loss(features, mask=eq_mask, backend=backend), expected)


def test_dense_label_ids_and_nan_labels():
    from fastcl._validation import dense_label_ids

    ids = dense_label_ids(torch.tensor([3.5, -2.0, 3.5, 0.0, -0.0, float("nan"), float("nan")]))
    assert ids[:5].tolist() == [2, 0, 2, 1, 1]
    assert ids[5] != ids[6] and ids[5] > 2 and ids[6] > 2  # NaN equals nothing: one class per NaN-labelled sample
    ints = torch.tensor([7, -3, 7, 100])
    assert dense_label_ids(ints).tolist() == [1, 0, 1, 2]


def test_chunked_label_positives_take_float_and_bool_labels_directly():
    """The backend itself (no functional layer): float labels, int labels and dense ids give the same numbers."""
    from fastcl.ops.dispatch import contrastive_loss

    contrast = torch.nn.functional.normalize(torch.randn(12, 4, dtype=torch.float64), dim=1)
    int_labels = torch.tensor([5, 9, 5, 0, 9, 9, 1, 1, 5, 0, 7, 5])
    common = dict(self_offset=0, temperature=0.2, scale=1.0, backend="chunked")
    expected = contrastive_loss(contrast, contrast, int_labels, int_labels, None, **common)
    for labels in (int_labels.double() / 3, int_labels.to(torch.int16)):
        torch.testing.assert_close(contrastive_loss(contrast, contrast, labels, labels, None, **common), expected)
    bools = int_labels > 4
    torch.testing.assert_close(
        contrastive_loss(contrast, contrast, bools, bools, None, **common),
        contrastive_loss(contrast, contrast, bools.long(), bools.long(), None, **common),
    )


def test_negative_mask_weight_is_an_error_but_zero_and_fractional_weights_are_fine():
    features = _features().double()
    mask = torch.tensor([[0.0, 0.5, 0.0, 1.0]] * 4)
    loss = FF.supcon_loss(features, mask=mask)
    assert loss.item() > 0
    with pytest.raises(ValueError, match=r"mask\[2, 1\] = -0.25"):
        FF.supcon_loss(features, mask=mask.index_put((torch.tensor(2), torch.tensor(1)), torch.tensor(-0.25)))
