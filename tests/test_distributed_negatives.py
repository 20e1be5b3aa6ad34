"""Negatives shared by every rank with ``gather_distributed=True`` (gloo, 2 and 3 ranks, uneven and empty shards):
the mean of the ranks' losses is the one-process loss, each rank's input gradients / W are its shard of the
one-process gradients, and each rank's gradient of negatives that require grad is W / N times the sum over its
own anchors (so the average over ranks is the one-process gradient)."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import join_gloo, spawn_ranks

from fastcl import functional as FF

WORLD = 3
SPAWN_TIMEOUT_S = 150
DIM, N_NEG = 4, 7


def _cases(world):
    uneven, with_empty = {2: [5, 3], 3: [3, 0, 4]}[world], {2: [4, 0], 3: [2, 3, 0]}[world]
    cases = {}
    for counts_name, counts in (("uneven", uneven), ("empty", with_empty)):
        cases[f"supcon-queue-{counts_name}"] = dict(kind="supcon", counts=counts)
        cases[f"ntxent-queue-{counts_name}"] = dict(kind="ntxent", counts=counts)
        cases[f"mnrl-{counts_name}"] = dict(kind="infonce", counts=counts, extra=dict())
        cases[f"moco-margin-{counts_name}"] = dict(
            kind="infonce", counts=counts, extra=dict(in_batch_negatives=False, false_negative_margin=0.2)
        )
    return cases


def _inputs(name, spec):
    g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 10007)
    n = sum(spec["counts"])
    return {
        "x": torch.randn(n, 2, DIM, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, 3, (n,), generator=g),
        "query": torch.randn(n, DIM, generator=g, dtype=torch.float64),
        "key": torch.randn(n, DIM, generator=g, dtype=torch.float64),
        "negatives": torch.randn(N_NEG, DIM, generator=g, dtype=torch.float64),
        "negative_labels": torch.randint(0, 4, (N_NEG,), generator=g),
    }


def _shard(t, counts, rank):
    start = sum(counts[:rank])
    return t[start : start + counts[rank]]


def _loss(spec, inputs, gather, group=None, backend="auto", rows=None):
    """The case's loss on ``rows`` (per-input slices; None: everything) with its differentiable inputs."""
    rows = rows or {}
    neg = inputs["negatives"].clone().requires_grad_()
    if spec["kind"] == "supcon":
        x = rows.get("x", inputs["x"]).clone().requires_grad_()
        labels = rows.get("labels", inputs["labels"])
        loss = FF.supcon_loss(x, labels, temperature=0.3, base_temperature=0.2, normalize=True, negatives=neg,
                              negative_labels=inputs["negative_labels"], gather_distributed=gather, group=group,
                              backend=backend)  # fmt: skip
        return loss, (x, neg)
    if spec["kind"] == "ntxent":
        x = rows.get("x", inputs["x"]).clone().requires_grad_()
        loss = FF.nt_xent_loss(x[:, 0], x[:, 1], temperature=0.4, negatives=neg, gather_distributed=gather,
                               group=group, backend=backend)  # fmt: skip
        return loss, (x, neg)
    query = rows.get("query", inputs["query"]).clone().requires_grad_()
    key = rows.get("key", inputs["key"]).clone().requires_grad_()
    settings = dict(symmetric=False, temperature=0.3, gather_distributed=gather, group=group, backend=backend)
    loss = FF.info_nce_loss(query, key, rows.get("query_labels"), negatives=neg, **settings, **spec["extra"])
    return loss, (query, key, neg)


def _run_case(name, spec, rank, group):
    inputs, counts = _inputs(name, spec), spec["counts"]
    keys = ("x", "labels", "query", "key")
    loss, leaves = _loss(spec, inputs, True, group, rows={k: _shard(inputs[k], counts, rank) for k in keys})
    loss.backward()
    return {"loss": loss.item(), "grads": [t.grad for t in leaves]}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    join_gloo(rank, WORLD, port)
    pair = dist.new_group([0, 1])
    results = {}
    try:
        for world, group in ((2, pair), (3, None)):
            if rank >= world:
                continue
            results[world] = {}
            for name, spec in _cases(world).items():
                try:
                    results[world][name] = _run_case(name, spec, rank, group)
                except Exception:  # reported by the test
                    results[world][name] = {"error": traceback.format_exc()}
        bad = torch.randn(3, DIM + 1, dtype=torch.float64) if rank == 1 else torch.randn(3, DIM, dtype=torch.float64)
        try:
            FF.info_nce_loss(torch.randn(2, DIM, dtype=torch.float64), torch.randn(2, DIM, dtype=torch.float64),
                             symmetric=False, negatives=bad, gather_distributed=True)  # fmt: skip
            results["bad"] = None
        except Exception as err:  # the test inspects it
            results["bad"] = (type(err).__name__, str(err))
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("negatives"), SPAWN_TIMEOUT_S)


def _close(a, b, tol=1e-10):
    if b.numel() == 0:
        return a.shape == b.shape
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", sorted(_cases(2)))
def test_mean_over_ranks_is_one_process(per_rank, world, name):
    spec = _cases(world)[name]
    results = [per_rank[r][world][name] for r in range(world)]
    for res in results:
        assert "error" not in res, res["error"]
    inputs, counts, n_total = _inputs(name, spec), spec["counts"], sum(spec["counts"])
    loss, leaves = _loss(spec, inputs, False, backend="reference")
    expected = torch.autograd.grad(loss, leaves)
    assert abs(sum(r["loss"] for r in results) / world - loss.item()) <= 1e-10 * max(1.0, loss.item())
    for which, want in enumerate(expected[:-1]):  # the batch inputs: each rank's shard, after DDP's average
        for rank, res in enumerate(results):
            assert _close(res["grads"][which] / world, _shard(want, counts, rank))
    assert _close(sum(res["grads"][-1] for res in results) / world, expected[-1])  # the negatives: their average
    if spec["kind"] == "infonce":  # and rank r's own: W / N times the sum over its anchors
        for rank, res in enumerate(results):
            if counts[rank] == 0:
                assert torch.count_nonzero(res["grads"][-1]) == 0
                continue
            offset = sum(counts[:rank])  # local query i's positive is global key offset + i
            rows = {"query": _shard(inputs["query"], counts, rank), "query_labels": offset + torch.arange(counts[rank])}
            local, (_, _, neg) = _loss(spec, inputs, False, backend="reference", rows=rows)
            (want,) = torch.autograd.grad(local * (world * counts[rank] / n_total), [neg])
            assert _close(res["grads"][-1], want)


def test_negatives_disagreeing_between_ranks_raise_everywhere(per_rank):
    for rank in range(WORLD):
        kind, message = per_rank[rank]["bad"]
        assert kind == "ValueError" and "negatives" in message, (rank, message)
