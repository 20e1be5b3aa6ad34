"""The dense reference is the ground truth: half-precision inputs are computed in fp32 and the loss is fp32; a lone
sample (no contrast column) gives 0 as on the fused backends; NaN in gives NaN out."""

import pytest
import torch
import torch.nn.functional as F
from float64_reference import info_nce_float64, supcon_float64

from fastcl import functional as FF


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_supcon_half_inputs_computed_in_fp32(dtype):
    features = F.normalize(torch.randn(12, 2, 16), dim=-1).to(dtype)  # t = 0.01: logits up to 100, exp overflows fp16
    labels = torch.randint(0, 3, (12,))
    loss = FF.supcon_loss(features, labels, temperature=0.01, backend="reference")
    assert loss.dtype == torch.float32
    expected = supcon_float64(features.double(), labels, temperature=0.01)
    assert abs(loss.item() - expected.item()) < 1e-5 * abs(expected.item())
    chunked = FF.supcon_loss(features, labels, temperature=0.01, backend="chunked")
    assert abs(loss.item() - chunked.item()) < 1e-4 * abs(expected.item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_info_nce_half_inputs_computed_in_fp32(dtype):
    query, key = torch.randn(9, 8).to(dtype), torch.randn(13, 8).to(dtype)
    labels = torch.randint(0, 13, (9,))
    loss = FF.info_nce_loss(query, key, labels, temperature=0.01, symmetric=False, backend="reference")
    assert loss.dtype == torch.float32
    expected = info_nce_float64(
        F.normalize(query.double(), dim=-1), F.normalize(key.double(), dim=-1), labels, 0.01, False
    )
    # the reference normalizes in the input dtype's fp32 upcast: agreement to fp32 accuracy of half inputs
    assert abs(loss.item() - expected.item()) < 1e-3 * abs(expected.item())


def test_reference_float64_stays_float64():
    features = torch.randn(6, 2, 5, dtype=torch.float64)
    assert FF.supcon_loss(features, backend="reference").dtype == torch.float64


@pytest.mark.parametrize("positives", ["none", "labels", "mask"])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_one_sample_with_one_view_gives_zero_on_every_backend(positives, contrast_mode):
    """One sample, one view: no contrast column at all, so the loss is the documented 0 (not 0 * inf = NaN), with a
    gradient of zeros, on the reference as on the fused backend."""
    kwargs = {"labels": torch.tensor([3])} if positives == "labels" else {}
    if positives == "mask":
        kwargs = {"mask": torch.ones(1, 1)}
    for backend in ("reference", "chunked"):
        features = torch.randn(1, 1, 5, requires_grad=True)
        loss = FF.supcon_loss(features, contrast_mode=contrast_mode, backend=backend, **kwargs)
        loss.backward()
        assert loss.item() == 0.0, (backend, loss)
        assert torch.equal(features.grad, torch.zeros_like(features)), backend


def test_nan_features_still_give_nan_on_the_reference():
    features = torch.randn(3, 2, 5)
    features[1, 0, 2] = float("nan")
    assert torch.isnan(FF.supcon_loss(features, torch.tensor([0, 1, 0]), backend="reference"))
