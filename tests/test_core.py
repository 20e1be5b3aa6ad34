"""The shared op of fastcl._core directly: rank-local anchors against a larger contrast set (self_offset)."""

import pytest
import torch
from conftest import triton_usable

from fastcl._core import contrastive_loss


def _float64_rows(anchor, contrast, anchor_labels, contrast_labels, self_offset, temperature, scale):
    losses = []
    for i in range(anchor.shape[0]):
        keep = torch.ones(contrast.shape[0], dtype=torch.bool)
        if self_offset is not None:
            keep[i + self_offset] = False
        logits = (contrast[keep] @ anchor[i]) / temperature
        positive = (contrast_labels[keep] == anchor_labels[i]).double()
        log_prob = logits - torch.logsumexp(logits, 0)
        count = positive.sum()
        losses.append(-scale * (positive * log_prob).sum() / (count if count > 0 else 1.0))
    return torch.stack(losses).mean()


BACKENDS = ["chunked"] + (["triton"] if triton_usable() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("self_offset", [None, 0, 7, 20])
def test_local_anchors_against_global_contrast(backend, self_offset):
    n_contrast, n_anchor, dim = 37, 17, 5
    dtype = torch.float64 if backend == "chunked" else torch.float32
    contrast = torch.nn.functional.normalize(torch.randn(n_contrast, dim, dtype=torch.float64), dim=1)
    contrast_labels = torch.randint(0, 4, (n_contrast,))
    start = 0 if self_offset is None else self_offset
    anchor = contrast[start : start + n_anchor].clone()
    anchor_labels = contrast_labels[start : start + n_anchor].clone()

    a = anchor.to(dtype).detach().clone().requires_grad_()
    c = contrast.to(dtype).detach().clone().requires_grad_()
    loss = contrastive_loss(
        a, c, anchor_labels, contrast_labels, None, self_offset=self_offset, temperature=0.3, scale=0.9, backend=backend
    )
    (loss * 1.5).backward()

    ra, rc = anchor.clone().requires_grad_(), contrast.clone().requires_grad_()
    ref = _float64_rows(ra, rc, anchor_labels, contrast_labels, self_offset, 0.3, 0.9)
    (ref * 1.5).backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    for ours, expected in ((a.grad, ra.grad), (c.grad, rc.grad)):
        assert ((ours.double() - expected).norm() / expected.norm()).item() < 5 * tol
