"""fastcl.MemoryQueue: FIFO contents against a plain list model, exact resume, dtype/device, errors, and the same
queue on every rank of a gloo run (2 and 3 ranks, uneven and empty shards)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import join_gloo, spawn_ranks

from fastcl import MemoryQueue


def _fifo_model(batches, size):
    """The queue's content as a multiset model: the last `size` (key row, label) pairs enqueued."""
    rows = [(tuple(k.tolist()), int(lab)) for keys, labels in batches for k, lab in zip(keys, labels)]
    return sorted(rows[-size:])


def _content(queue):
    return sorted((tuple(k.tolist()), int(lab)) for k, lab in zip(queue.negatives, queue.labels))


def _batches(sizes, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for n in sizes:
        # distinct rows (a running index in column 0), so the multiset comparison sees every key
        keys = torch.randn(n, dim, generator=g, dtype=torch.float64)
        keys[:, 0] = torch.arange(start, start + n, dtype=torch.float64)
        out.append((keys, torch.randint(0, 5, (n,), generator=g)))
        start += n
    return out


@pytest.mark.parametrize("sizes", [[3, 4, 2, 6, 1, 9], [0, 2, 0, 5], [12], [13, 1], [7, 7, 7]])
def test_keeps_the_last_size_keys_with_their_labels(sizes):
    queue = MemoryQueue(7, 3, dtype=torch.float64)
    seen = []
    for keys, labels in _batches(sizes):
        queue.enqueue(keys, labels)
        seen.append((keys, labels))
        expected = _fifo_model(seen, 7)
        assert queue.filled == len(expected)
        assert queue.negatives.shape == (len(expected), 3) and queue.labels.shape == (len(expected),)
        assert _content(queue) == expected


def test_partly_filled_queue_exposes_only_its_filled_rows_in_order():
    queue = MemoryQueue(10, 2)
    assert queue.negatives.shape == (0, 2) and queue.labels.shape == (0,)
    keys = torch.arange(8.0).view(4, 2)
    queue.enqueue(keys, torch.tensor([3, 1, 4, 1]))
    torch.testing.assert_close(queue.negatives, keys, rtol=0, atol=0)
    assert queue.labels.tolist() == [3, 1, 4, 1]
    assert not queue.negatives.requires_grad


def test_without_labels():
    queue = MemoryQueue(4, 2, labels=False)
    queue.enqueue(torch.ones(3, 2, requires_grad=True))
    assert queue.labels is None and queue.negatives.shape == (3, 2) and not queue.negatives.requires_grad
    assert "label_buffer" not in queue.state_dict()


def test_resume_from_state_dict_is_exact(tmp_path):
    batches = _batches([5, 6, 3, 4, 8, 2], seed=1)
    straight = MemoryQueue(9, 3, dtype=torch.float64)
    for keys, labels in batches:
        straight.enqueue(keys, labels)

    first = MemoryQueue(9, 3, dtype=torch.float64)
    for keys, labels in batches[:3]:
        first.enqueue(keys, labels)
    torch.save(first.state_dict(), tmp_path / "queue.pt")
    resumed = MemoryQueue(9, 3, dtype=torch.float64)
    resumed.load_state_dict(torch.load(tmp_path / "queue.pt"))
    for keys, labels in batches[3:]:
        resumed.enqueue(keys, labels)
    assert torch.equal(resumed.keys, straight.keys) and torch.equal(resumed.label_buffer, straight.label_buffer)
    assert (resumed.filled, resumed._next) == (straight.filled, straight._next)


def test_state_of_another_shape_is_refused():
    with pytest.raises(ValueError, match=r"MemoryQueue\(size=8, dim=3\)"):
        MemoryQueue(9, 3).load_state_dict(MemoryQueue(8, 3).state_dict())


def test_dtype_follows_the_module():
    queue = MemoryQueue(4, 2)
    queue.enqueue(torch.randn(3, 2, dtype=torch.float64), torch.arange(3))
    assert queue.keys.dtype == torch.float32
    queue = queue.to(torch.float64)
    assert queue.negatives.dtype == torch.float64 and queue.labels.dtype == torch.int64 and queue.filled == 3
    queue.half()
    queue.enqueue(torch.randn(1, 2), torch.tensor([7]))
    assert queue.negatives.dtype == torch.float16 and queue.labels.tolist()[-1] == 7


def test_labels_in_the_losses_forms():
    """``[n, 1]`` and bool labels, which the losses take, enter the queue as ``[n]`` int64 class ids."""
    queue = MemoryQueue(6, 2)
    queue.enqueue(torch.randn(2, 2), torch.tensor([[3], [5]], dtype=torch.int32))
    queue.enqueue(torch.randn(2, 2), torch.tensor([True, False]))
    assert queue.labels.dtype == torch.int64 and queue.labels.tolist() == [3, 5, 1, 0]


def test_supcon_with_a_queue_equals_pml_cross_batch_memory_through_wrap_around():
    """PML ``CrossBatchMemory(SupConLoss, memory_size)`` holds the current batch too: ``MemoryQueue(memory_size - B)``
    with ``SupConLoss(negatives=, negative_labels=)`` gives its loss times ``N / N_pos`` (the README's PML mapping, the
    positives counted in the batch and the queue) at every step, the queue filling and wrapping.
    PML's memory holds the batch detached, so its gradient reaches the batch only through the anchors."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    import torch.nn.functional as F

    from fastcl import SupConLoss

    batch, memory_size = 6, 20
    memory = pml_losses.CrossBatchMemory(pml_losses.SupConLoss(temperature=0.1), 4, memory_size=memory_size)
    queue = MemoryQueue(memory_size - batch, 4, dtype=torch.float64)
    criterion = SupConLoss(0.1, base_temperature=0.1, normalize=True)
    g = torch.Generator().manual_seed(3)
    anchors_without_positive = []
    for _ in range(6):
        emb = torch.randn(batch, 4, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, 3, (batch,), generator=g)
        expected = memory(emb, labels)
        (expected_grad,) = torch.autograd.grad(expected, emb)
        ours = criterion(emb[:, None], labels, negatives=queue.negatives, negative_labels=queue.labels)
        # PML averages over the anchors with a positive (in the batch or the memory), fastcl over all anchors
        same = labels[:, None] == torch.cat([labels, queue.labels])
        n_pos = int((same.sum(1) > 1).sum())
        anchors_without_positive.append(batch - n_pos)
        torch.testing.assert_close(ours * batch / max(n_pos, 1), expected, rtol=1e-10, atol=1e-12)
        # the anchors-only gradient: the batch as constant contrast rows, as PML's memory holds it
        anchors = F.normalize(emb, dim=-1)
        contrast = torch.cat([anchors.detach(), F.normalize(queue.negatives, dim=-1)])
        logits = (anchors @ contrast.T / 0.1).masked_fill(
            torch.eye(batch, len(contrast), dtype=torch.bool), float("-inf")
        )
        log_prob = logits - logits.logsumexp(1, keepdim=True)
        positive = (labels[:, None] == torch.cat([labels, queue.labels])) & ~torch.eye(batch, len(contrast)).bool()
        per_anchor = -log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1).clamp(min=1)
        (anchor_grad,) = torch.autograd.grad(per_anchor[per_anchor > 0].mean(), emb)
        torch.testing.assert_close(anchor_grad, expected_grad, rtol=1e-10, atol=1e-12)
        queue.enqueue(emb.detach(), labels)
    assert queue.filled == memory_size - batch and anchors_without_positive[0] > 0


def test_numpy_sizes():
    np = pytest.importorskip("numpy")
    queue = MemoryQueue(np.int64(3), np.int32(2))
    assert (type(queue.size), type(queue.dim), queue.keys.shape) == (int, int, (3, 2))
    queue.enqueue(torch.arange(8.0).view(4, 2), torch.arange(4))
    assert queue.negatives[:, 0].tolist() == [2.0, 4.0, 6.0] and queue.labels.tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: MemoryQueue(0, 4), ValueError, "size must be positive"),
        (lambda: MemoryQueue(-3, 4), ValueError, "size must be positive"),
        (lambda: MemoryQueue(4.0, 4), TypeError, "size must be an int"),
        (lambda: MemoryQueue(True, 4), TypeError, "size must be an int"),
        (lambda: MemoryQueue(4, 0), ValueError, "dim must be positive"),
        (lambda: MemoryQueue(4, 4, dtype=torch.int64), TypeError, "dtype must be a floating-point"),
        (lambda: MemoryQueue(4, 4).enqueue(torch.ones(2, 5), torch.arange(2)), ValueError, r"\[n, 4\]"),
        (lambda: MemoryQueue(4, 4).enqueue(torch.ones(4), torch.arange(1)), ValueError, r"\[n, 4\]"),
        (lambda: MemoryQueue(4, 4).enqueue(torch.ones(2, 4, dtype=torch.int64), torch.arange(2)), TypeError, "float"),
        (lambda: MemoryQueue(4, 4).enqueue(torch.ones(2, 4)), ValueError, "pass labels"),
        (lambda: MemoryQueue(4, 4).enqueue(torch.ones(2, 4), torch.arange(3)), ValueError, r"\[n\] = \[2\]"),
        (lambda: MemoryQueue(4, 4).enqueue(torch.ones(2, 4), torch.ones(2)), TypeError, "integer"),
        (lambda: MemoryQueue(4, 4, labels=False).enqueue(torch.ones(2, 4), torch.arange(2)), ValueError, "no labels"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------------
# The same queue on every rank (gloo, 127.0.0.1): ranks 0-2 as world 3, ranks 0-1 as a subgroup of 2
# ----------------------------------------------------------------------------------------------------------------

WORLD = 3
SHARDS = {2: [[3, 1], [0, 4], [2, 2], [5, 0]], 3: [[2, 0, 3], [1, 1, 1], [0, 4, 2], [3, 2, 0]]}


def _global_steps(world):
    """Per step, the global batch (all ranks' keys and labels in rank order) and its split into shards."""
    steps = []
    for step, counts in enumerate(SHARDS[world]):
        keys, labels = _batches([sum(counts)], seed=100 * world + step)[0]
        steps.append((keys, labels, counts))
    return steps


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    join_gloo(rank, WORLD, port)
    pair = dist.new_group([0, 1])
    results = {}
    for world, group in ((2, pair), (3, None)):
        if rank >= world:
            continue
        queue = MemoryQueue(6, 3, dtype=torch.float64, gather_distributed=True, group=group)
        for keys, labels, counts in _global_steps(world):
            start = sum(counts[:rank])
            queue.enqueue(keys[start : start + counts[rank]], labels[start : start + counts[rank]])
        results[world] = {k: v.clone() for k, v in queue.state_dict().items() if isinstance(v, torch.Tensor)}
        results[world]["filled"] = queue.filled
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_queues(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("queue"), 120)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_holds_the_queue_of_the_global_batch(rank_queues, world):
    single = MemoryQueue(6, 3, dtype=torch.float64)
    for keys, labels, _ in _global_steps(world):
        single.enqueue(keys, labels)
    for rank in range(world):
        state = rank_queues[rank][world]
        assert state["filled"] == single.filled
        assert torch.equal(state["keys"], single.keys), f"rank {rank}"
        assert torch.equal(state["label_buffer"], single.label_buffer), f"rank {rank}"
