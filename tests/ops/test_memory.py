"""No backend but 'reference' allocates anything N x N: every tensor created during forward + backward is
recorded through a dispatch mode and its size checked against the O(N * D + block * N) bound."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcl.ops.chunked.passes as chunked_passes
from fastcl import functional as FF


class LargestTensor(TorchDispatchMode):
    """Records the size in fp32 elements (bytes / 4) of the largest tensor any op creates; a view of one of the op's
    inputs (``mask.T``) shares its storage and allocates nothing, so it is not counted."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, t.numel() * t.element_size() // 4)
        return out


def _largest_tensor(backend, n_views=2, bsz=300, dim=8, use_mask=False, normalized=False):
    features = torch.randn(bsz, n_views, dim)
    features = (torch.nn.functional.normalize(features, dim=-1) if normalized else features).requires_grad_()
    labels = torch.randint(0, 7, (bsz,))
    mask = (labels[:, None] == labels[None, :]).float() if use_mask else None
    with LargestTensor() as mode:
        loss = FF.supcon_loss(features, None if use_mask else labels, mask, backend=backend)
        loss.backward()
    return mode.largest, bsz * n_views


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("normalized", [False, True], ids=["row-blocks", "half-matrix"])
def test_chunked_allocates_at_most_block_rows_by_n(monkeypatch, use_mask, normalized):
    """Raw features at t = 0.07 take the row-block pass (|s| unbounded), normalised ones the half-matrix route."""
    block_rows = 32
    monkeypatch.setattr(chunked_passes, "_BLOCK_BYTES", block_rows * 4 * 600)
    monkeypatch.setattr(chunked_passes, "_MIN_BLOCK_ROWS", 8)
    route = chunked_passes._half_matrix_pass if normalized else chunked_passes._fused_pass
    taken = []

    def recorded(*args):
        result = route(*args)
        taken.append(result is not None)  # (the half-matrix route returns None when it does not apply)
        return result

    monkeypatch.setattr(chunked_passes, route.__name__, recorded)
    largest, n = _largest_tensor("chunked", use_mask=use_mask, normalized=normalized)
    assert taken and all(taken)  # the route named in the id ran
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
