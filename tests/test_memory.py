"""No backend but 'reference' allocates anything N x N: every tensor created during forward + backward is
recorded through a dispatch mode and its size checked against the O(N * D + block * N) bound."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcl.chunked
from fastcl import functional as FF


class LargestTensor(TorchDispatchMode):
    """Records the size in fp32 elements (bytes / 4) of the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size() // 4)
        return out


def _largest_tensor(backend, n_views=2, bsz=300, dim=8, use_mask=False):
    features = torch.randn(bsz, n_views, dim, requires_grad=True)
    labels = torch.randint(0, 7, (bsz,))
    mask = (labels[:, None] == labels[None, :]).float() if use_mask else None
    with LargestTensor() as mode:
        loss = FF.supcon_loss(features, None if use_mask else labels, mask, backend=backend)
        loss.backward()
    return mode.largest, bsz * n_views


@pytest.mark.parametrize("use_mask", [False, True])
def test_chunked_allocates_at_most_block_rows_by_n(monkeypatch, use_mask):
    block_rows = 32
    monkeypatch.setattr(fastcl.chunked, "_BLOCK_BYTES", block_rows * 4 * 600)
    monkeypatch.setattr(fastcl.chunked, "_MIN_BLOCK_ROWS", 8)
    largest, n = _largest_tensor("chunked", use_mask=use_mask)
    assert largest <= block_rows * n  # 32 x 600 = 19,200 elements, vs N x N = 360,000
    assert largest < n * n // 10


@pytest.mark.triton
def test_triton_allocates_nothing_n_by_n():
    largest, n = _largest_tensor("triton", bsz=40, dim=8)
    assert largest <= n * 8  # the [N, D] embeddings and gradients are the largest tensors


def test_reference_is_dense():
    """The check above can fail: the dense reference does allocate N x N."""
    largest, n = _largest_tensor("reference", bsz=50)
    assert largest >= n * n
