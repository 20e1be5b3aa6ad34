"""The dense reference is the ground truth: half-precision inputs are computed in fp32 and the loss is fp32."""

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
