"""The gathered sigmoid loss across processes (gloo on 127.0.0.1) against one process on the concatenated batch.

One spawn of 3 processes: world size 3 on the default group and world size 2 on the subgroup of ranks 0 and 1.
Every rank builds the same global float64 inputs from a seed and keeps its shard (uneven, and with an empty shard).
The test process checks that the mean over ranks of the returned losses is the one-process loss on the whole
batch (divided by the global B), that each rank's tower gradients divided by W and the rank mean of the
``logit_scale`` / ``logit_bias`` gradients are the one-process gradients (what DDP's averaging gives), the same for
a real DistributedDataParallel model, and that with equal shards each rank returns open_clip's per-rank value.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import join_gloo, spawn_ranks
from sigmoid_peers import open_clip_loss

import fastcl
import fastcl.functional as FF

WORLD = 3
SPAWN_TIMEOUT_S = 150
DIM = 5
SCALE, BIAS = 6.0, -2.5


def _cases(world):
    uneven = {2: [5, 3], 3: [3, 0, 4]}[world]
    with_empty = {2: [4, 0], 3: [2, 3, 0]}[world]
    texts = {2: [2, 6], 3: [4, 2, 0]}[world]
    cases = {}
    for counts_name, counts in (("uneven", uneven), ("empty", with_empty)):
        cases[f"paired-{counts_name}"] = dict(counts=counts, texts=counts, labels=None)
        cases[f"shared-labels-{counts_name}"] = dict(counts=counts, texts=counts, labels="shared")
        cases[f"rectangular-{counts_name}"] = dict(counts=counts, texts=texts, labels="rectangular")
        cases[f"siglip-plus-{counts_name}"] = dict(
            counts=counts, texts=texts, labels="rectangular", weighting="siglip_plus"
        )
        cases[f"ddp-{counts_name}"] = dict(counts=counts, texts=counts, labels=None, ddp=True)
    return cases


def _seed(name):
    return sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 10007


def _global_inputs(name, spec):
    g = torch.Generator().manual_seed(_seed(name))
    n, m = sum(spec["counts"]), sum(spec["texts"])
    image = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(m, DIM, generator=g, dtype=torch.float64), dim=-1)
    return dict(
        image=image,
        text=text,
        raw_image=torch.randn(n, 6, generator=g, dtype=torch.float64),
        raw_text=torch.randn(n, 7, generator=g, dtype=torch.float64),
        image_labels=torch.randint(0, 4, (n,), generator=g),
        text_labels=torch.randint(0, 4, (m,), generator=g),
    )


def _shard(t, counts, rank):
    start = sum(counts[:rank])
    return t[start : start + counts[rank]]


class _TwoTowers(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.image = torch.nn.Linear(6, DIM).double()
        self.text = torch.nn.Linear(7, DIM).double()
        self.log_scale = torch.nn.Parameter(torch.tensor(SCALE, dtype=torch.float64).log())
        self.bias = torch.nn.Parameter(torch.tensor(BIAS, dtype=torch.float64))

    def forward(self, x_image, x_text):
        return self.image(x_image), self.text(x_text), self.log_scale.exp(), self.bias


def _labels(spec, inputs, rank):
    if spec["labels"] is None:
        return None, None
    image_labels = _shard(inputs["image_labels"], spec["counts"], rank)
    if spec["labels"] == "shared":
        return image_labels, None
    return image_labels, _shard(inputs["text_labels"], spec["texts"], rank)


def _run_case(name, spec, rank, world, group):
    inputs = _global_inputs(name, spec)
    if spec.get("ddp"):
        model = torch.nn.parallel.DistributedDataParallel(_TwoTowers(_seed(name)), process_group=group)
        raw_image = _shard(inputs["raw_image"], spec["counts"], rank)
        raw_text = _shard(inputs["raw_text"], spec["counts"], rank)
        loss = fastcl.SigLipLoss(gather_distributed=True, normalize=True, group=group)(*model(raw_image, raw_text))
        loss.backward()
        return {"loss": loss.item(), "param_grads": [p.grad.clone() for p in model.parameters()]}
    image = _shard(inputs["image"], spec["counts"], rank).clone().requires_grad_()
    text = _shard(inputs["text"], spec["texts"], rank).clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    labels, text_labels = _labels(spec, inputs, rank)
    loss = FF.sigmoid_loss(
        image,
        text,
        scale,
        bias,
        labels,
        text_labels=text_labels,
        weighting=spec.get("weighting", "uniform"),
        gather_distributed=True,
        group=group,
    )
    loss.backward()
    return {"loss": loss.item(), "grads": [image.grad, text.grad, scale.grad, bias.grad]}


def _open_clip_equal_shards(rank, world):
    """open_clip's SigLipLoss ('bidir') and fastcl on equal shards of the same batch: (theirs, ours)."""
    loss_module = open_clip_loss()
    if loss_module is None:
        return None
    g = torch.Generator().manual_seed(5)
    image = torch.nn.functional.normalize(torch.randn(3 * world, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3 * world, DIM, generator=g, dtype=torch.float64), dim=-1)
    image, text = image[3 * rank : 3 * rank + 3], text[3 * rank : 3 * rank + 3]
    scale, bias = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    theirs = loss_module.SigLipLoss(rank=rank, world_size=world)(image, text, scale, bias)
    ours = fastcl.SigLipLoss(gather_distributed=True)(image, text, scale, bias)
    return theirs.item(), ours.item()


def _bad_inputs(rank, world, group):
    results = {}

    def attempt(name, fn):
        try:
            fn()
            results[name] = (None, "")
        except Exception as err:
            results[name] = (type(err).__name__, str(err))
        dist.barrier(group=group)

    x = torch.randn(3, DIM + (rank == world - 1))
    attempt("dim", lambda: FF.sigmoid_loss(x, x, 2.0, 0.0, gather_distributed=True, group=group))
    y = torch.randn(3, DIM)
    labels = torch.zeros(3, dtype=torch.long) if rank == 0 else None
    attempt("labels-on-one-rank", lambda: FF.sigmoid_loss(y, y, 2.0, 0.0, labels, gather_distributed=True, group=group))
    bad_scale = -1.0 if rank == world - 1 else 2.0
    attempt("scale", lambda: FF.sigmoid_loss(y, y, bad_scale, 0.0, gather_distributed=True, group=group))
    return results


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    join_gloo(rank, WORLD, port)
    pair = dist.new_group([0, 1])
    results = {}
    try:
        for world, group in ((2, pair), (3, None)):
            if rank >= world:
                continue
            results[world] = {"cases": {}}
            for name, spec in _cases(world).items():
                try:
                    results[world]["cases"][name] = _run_case(name, spec, rank, world, group)
                except Exception:
                    results[world]["cases"][name] = {"error": traceback.format_exc()}
            results[world]["bad"] = _bad_inputs(rank, world, group)
        results["open_clip"] = _open_clip_equal_shards(rank, WORLD)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def all_results(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("sigmoid_distributed"), SPAWN_TIMEOUT_S)


def _pairwise_float64(image, text, scale, bias, positive, weight=None):
    logits = scale * image @ text.T + bias
    signs = torch.where(positive, 1.0, -1.0).double()
    w = torch.ones_like(logits) if weight is None else torch.where(positive, weight, torch.ones_like(logits))
    return -(w * torch.log(torch.sigmoid(signs * logits))).sum() / image.shape[0]


def _positive_and_weight(name, spec, inputs):
    n, m = sum(spec["counts"]), sum(spec["texts"])
    if spec["labels"] is None:
        return torch.eye(n, m, dtype=torch.bool), None
    image_labels = inputs["image_labels"]
    text_labels = image_labels if spec["labels"] == "shared" else inputs["text_labels"]
    positive = image_labels[:, None] == text_labels[None, :]
    if spec.get("weighting") != "siglip_plus":
        return positive, None
    k_row = positive.sum(1).clamp_min(1).double()
    k_col = positive.sum(0).clamp_min(1).double()
    return positive, 0.5 / k_row[:, None] + 0.5 / k_col[None, :]


def _close(ours, expected, tol=1e-11):
    assert ours.shape == expected.shape
    if ours.numel():
        assert (ours - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())


def _results(all_results, world, name):
    per_rank = [r[world]["cases"][name] for r in all_results[:world]]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank} failed:\n{res['error']}"
    return per_rank


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", [n for n, s in _cases(2).items() if not s.get("ddp")])
def test_loss_and_gradients_match_one_process(all_results, world, name):
    spec = _cases(world)[name]
    per_rank = _results(all_results, world, name)
    inputs = _global_inputs(name, spec)
    leaves = [inputs["image"].clone().requires_grad_(), inputs["text"].clone().requires_grad_()]
    leaves += [torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)]
    leaves += [torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)]
    loss = _pairwise_float64(*leaves, *_positive_and_weight(name, spec, inputs))
    loss.backward()
    assert abs(sum(r["loss"] for r in per_rank) / world - loss.item()) <= 1e-12 * max(1.0, abs(loss.item()))
    image_grad = torch.cat([r["grads"][0] for r in per_rank]) / world
    text_grad = torch.cat([r["grads"][1] for r in per_rank]) / world
    _close(image_grad, leaves[0].grad)
    _close(text_grad, leaves[1].grad)
    _close(sum(r["grads"][2] for r in per_rank) / world, leaves[2].grad)
    _close(sum(r["grads"][3] for r in per_rank) / world, leaves[3].grad)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", [n for n, s in _cases(2).items() if s.get("ddp")])
def test_ddp_parameter_gradients_match_one_process(all_results, world, name):
    spec = _cases(world)[name]
    per_rank = _results(all_results, world, name)
    inputs = _global_inputs(name, spec)
    model = _TwoTowers(_seed(name))
    image, text, scale, bias = model(inputs["raw_image"], inputs["raw_text"])
    image, text = torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    loss = _pairwise_float64(image, text, scale, bias, torch.eye(image.shape[0], dtype=torch.bool))
    loss.backward()
    assert abs(sum(r["loss"] for r in per_rank) / world - loss.item()) <= 1e-12 * abs(loss.item())
    for res in per_rank:
        for ours, param in zip(res["param_grads"], model.parameters()):
            _close(ours, param.grad)


def test_equal_shards_return_open_clip_per_rank_value(all_results):
    values = [r["open_clip"] for r in all_results]
    if values[0] is None:
        pytest.skip("open_clip_torch is not installed")
    for theirs, ours in values:
        assert abs(theirs - ours) <= 1e-12 * abs(theirs)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "case, error, message",
    [
        ("dim", "ValueError", "same dim and dtype"),
        ("labels-on-one-rank", "ValueError", "labels on all ranks or on none"),
        ("scale", "ValueError", "logit_scale must be finite and > 0"),
    ],
)
def test_bad_input_on_one_rank_raises_on_every_rank(all_results, world, case, error, message):
    for rank in range(world):
        kind, text = all_results[rank][world]["bad"][case]
        assert kind == error and message in text, (rank, kind, text)
