"""The chunked backend's symmetric (two-way) route against an independent dense float64 formula."""

import pytest
import torch

import fastcl.chunked
from fastcl.chunked import chunked_forward


def _dense_two_way(anchor, contrast, anchor_labels, contrast_labels, self_offset, inv_temperature, scale):
    """Mean of both directions' SupCon-style losses from the full ``[Na, Nc]`` logits (float64, autograd)."""
    logits = anchor @ contrast.T * inv_temperature
    positive = (anchor_labels[:, None] == contrast_labels[None, :]).to(logits.dtype)
    if self_offset is not None:
        excluded = torch.zeros_like(positive, dtype=torch.bool)
        idx = torch.arange(anchor.shape[0])
        excluded[idx, idx + self_offset] = True
        logits = logits.masked_fill(excluded, float("-inf"))
        positive = positive.masked_fill(excluded, 0.0)

    def one_way(s, w):
        log_prob = s - torch.logsumexp(s, dim=1, keepdim=True)
        count = w.sum(1)
        pos = torch.where(w > 0, log_prob, torch.zeros_like(log_prob)).sum(1)
        return (-scale * pos / count.clamp_min(1.0)).mean()

    return 0.5 * (one_way(logits, positive) + one_way(logits.T, positive.T))


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize(
    "n_anchor,n_contrast,self_offset,n_classes",
    [(13, 13, None, None), (11, 19, None, None), (17, 17, 0, 5), (9, 23, None, 4), (21, 21, None, 3)],
)
def test_two_way_matches_dense_float64(monkeypatch, blocks, n_anchor, n_contrast, self_offset, n_classes):
    if blocks == "many":
        monkeypatch.setattr(fastcl.chunked, "_BLOCK_BYTES", 1)
        monkeypatch.setattr(fastcl.chunked, "_MIN_BLOCK_ROWS", 4)
    gen = torch.Generator().manual_seed(n_anchor * 100 + n_contrast)
    anchor = torch.randn(n_anchor, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    contrast = torch.randn(n_contrast, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    if n_classes is None:  # InfoNCE: query i's positive is key i
        anchor_labels, contrast_labels = torch.arange(n_anchor), torch.arange(n_contrast)
    else:
        anchor_labels = torch.randint(n_classes, (n_anchor,), generator=gen)
        contrast_labels = anchor_labels.clone() if self_offset == 0 else torch.randint(n_classes, (n_contrast,), generator=gen)
    inv_t, scale = 1 / 0.3, 0.7

    loss, grad_anchor, grad_contrast = chunked_forward(
        anchor.detach(), contrast.detach(), anchor_labels, contrast_labels, None, self_offset, inv_t, scale, True, True
    )
    ref = _dense_two_way(anchor, contrast, anchor_labels, contrast_labels, self_offset, inv_t, scale)
    ref_grad_anchor, ref_grad_contrast = torch.autograd.grad(ref, (anchor, contrast))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_anchor, ref_grad_anchor, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_contrast, ref_grad_contrast, rtol=1e-9, atol=1e-12)

    # the blockwise two-pass route directly (chunked_forward takes the dense single-block route when one block fits)
    loss2, grad_anchor2, grad_contrast2 = fastcl.chunked._two_way_pass(
        anchor.detach(), contrast.detach(), anchor_labels, contrast_labels, self_offset, inv_t, scale, True
    )
    torch.testing.assert_close(loss2, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_anchor2, ref_grad_anchor, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_contrast2, ref_grad_contrast, rtol=1e-9, atol=1e-12)

    loss_only, none_a, none_c = chunked_forward(
        anchor.detach(), contrast.detach(), anchor_labels, contrast_labels, None, self_offset, inv_t, scale, True, False
    )
    assert none_a is None and none_c is None
    torch.testing.assert_close(loss_only, loss, rtol=1e-12, atol=0)


def test_two_way_large_logits_stay_finite():
    """Unnormalized inputs at a low temperature: the online column log-sum-exp must not overflow or underflow."""
    gen = torch.Generator().manual_seed(3)
    anchor = (torch.randn(40, 16, generator=gen, dtype=torch.float64) * 6).requires_grad_()
    contrast = (torch.randn(40, 16, generator=gen, dtype=torch.float64) * 6).requires_grad_()
    labels = torch.arange(40)
    fastcl.chunked._BLOCK_BYTES, saved = 1, fastcl.chunked._BLOCK_BYTES
    try:
        loss, grad_anchor, _ = chunked_forward(
            anchor.detach(), contrast.detach(), labels, labels, None, None, 1 / 0.05, 1.0, True, True
        )
    finally:
        fastcl.chunked._BLOCK_BYTES = saved
    ref = _dense_two_way(anchor, contrast, labels, labels, None, 1 / 0.05, 1.0)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_anchor, torch.autograd.grad(ref, anchor)[0], rtol=1e-9, atol=1e-12)


def test_two_way_nan_propagates():
    anchor = torch.randn(6, 4, dtype=torch.float64)
    anchor[2, 1] = float("nan")
    labels = torch.arange(6)
    loss, grad_anchor, grad_contrast = chunked_forward(
        anchor, torch.randn(6, 4, dtype=torch.float64), labels, labels, None, None, 2.0, 1.0, True, True
    )
    assert torch.isnan(loss) and torch.isnan(grad_anchor).any() and torch.isnan(grad_contrast).any()
