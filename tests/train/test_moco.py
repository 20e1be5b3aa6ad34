"""MoCo in fastcl-pretrain (fastcl/train/moco.py): the EMA update, the loss with the queue against float64
references, the steps of a run, the flags and the checkpoint rules. Resume after kill -9 and torchrun with a queue
are in test_pretrain.py (the ``queue`` cases)."""

import argparse
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcl.train import pretrain
from fastcl.train.factory import build_criterion
from fastcl.train.moco import build_queue, ema_update, key_model_of, moco_loss

TINY = ["--train-samples", "128", "--val-samples", "64", "--test-samples", "64", "--image-size", "16",
        "--widths", "8,16", "--proj-dim", "16", "--batch-size", "32", "--dfr-repeats", "2", "--threads", "1",
        "--quiet", "--no-plots", "--probe-every", "0"]


def ckpt_of(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)


def test_ema_update_moves_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    key = key_model_of(model)
    assert all(not p.requires_grad for p in key.parameters()) and all(p.requires_grad for p in model.parameters())
    before = [p.detach().double().clone() for p in key.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(7, 5))  # new running statistics in the model only
    ema_update(key, model, 0.9)
    for pk, pq, b in zip(key.parameters(), model.parameters(), before):
        torch.testing.assert_close(pk.double(), 0.9 * b + 0.1 * pq.detach().double(), rtol=0, atol=1e-6)
    for bk, bq in zip(key.buffers(), model.buffers()):
        assert torch.equal(bk, bq)
    ema_update(key, model, 0.0)  # m = 0: the key model is the model
    for pk, pq in zip(key.parameters(), model.parameters()):
        assert torch.equal(pk, pq)


def _args(loss, queue_size=8, temperature=0.2):
    return argparse.Namespace(loss=loss, queue_size=queue_size, temperature=temperature, backend="chunked")


def _supcon_reference(q, k, labels, queue, queue_labels, t):
    """Float64: anchors the queries; columns the other queries, all keys and the queue; same label = positive."""
    q, k, queue = (F.normalize(x.double(), dim=-1) for x in (q, k, queue))
    cols = torch.cat([q, k, queue])
    col_labels = torch.cat([labels, labels, queue_labels])
    total = 0.0
    for i in range(q.shape[0]):
        keep = torch.ones(cols.shape[0], dtype=torch.bool)
        keep[i] = False  # the anchor itself
        logits = (cols[keep] @ q[i]) / t
        logp = logits - torch.logsumexp(logits, 0)
        pos = col_labels[keep] == labels[i]
        total += -logp[pos].mean()
    return total / q.shape[0]


def _moco_v2_reference(q, k, queue, t):
    """Float64 MoCo v2 (moco/builder.py): logits [q.k_i, q @ queue.T] / t, cross-entropy to column 0."""
    q, k, queue = (F.normalize(x.double(), dim=-1) for x in (q, k, queue))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


@pytest.mark.parametrize("filled", [0, 5, 11])  # empty, partly filled, wrapped (size 8)
def test_moco_loss_supcon_equals_the_float64_reference(filled):
    torch.manual_seed(filled)
    b, d = 6, 3
    queue = build_queue(_args("supcon"), d)
    if filled:
        queue.enqueue(torch.randn(filled, d), torch.randint(0, 3, (filled,)))
    q, k = torch.randn(b, d, requires_grad=True), torch.randn(b, d)
    labels = torch.randint(0, 3, (b,))
    loss = moco_loss(build_criterion(_args("supcon")), "supcon", q, k, labels, queue)
    ref = _supcon_reference(q, k, labels, queue.negatives, queue.labels, 0.2)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, q)
    qd = q.detach().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_supcon_reference(qd, k, labels, queue.negatives, queue.labels, 0.2), qd)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_moco_loss_supcon_with_a_negatives_only_queue():
    """--queue-negatives-only: the queue keys are columns but never positives, even with the anchor's label."""
    torch.manual_seed(3)
    b, d = 6, 3
    queue = build_queue(_args("supcon"), d)
    queue.enqueue(torch.randn(7, d), torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    q, k = torch.randn(b, d, requires_grad=True), torch.randn(b, d)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = moco_loss(build_criterion(_args("supcon")), "supcon", q, k, labels, queue, queue_positives=False)
    never = torch.full((7,), -1)  # a label no anchor has
    ref = _supcon_reference(q, k, labels, queue.negatives, never, 0.2)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    with_positives = moco_loss(build_criterion(_args("supcon")), "supcon", q, k, labels, queue)
    assert abs(with_positives.item() - loss.item()) > 1e-3  # the queue's labels matter by default


@pytest.mark.parametrize("filled", [5, 8])
def test_moco_loss_simclr_is_moco_v2_infonce(filled):
    torch.manual_seed(filled)
    b, d = 7, 5
    queue = build_queue(_args("simclr"), d)
    assert queue.labels is None
    queue.enqueue(torch.randn(filled, d))
    q, k = torch.randn(b, d, requires_grad=True), torch.randn(b, d)
    loss = moco_loss(build_criterion(_args("simclr")), "simclr", q, k, torch.zeros(b, dtype=torch.long), queue)
    torch.testing.assert_close(loss.double(), _moco_v2_reference(q, k, queue.negatives, 0.2), rtol=1e-5, atol=1e-6)


def test_a_queue_run_keeps_the_last_keys_and_the_key_model_follows(tmp_path):
    out = str(tmp_path / "run")
    # 4 steps of 32: 128 keys through a queue of 80, which wrapped once; m = 0: the key model is the model
    assert pretrain.main([*TINY, "--epochs", "1", "--queue-size", "80", "--key-momentum", "0", "--out", out]) == 0
    ckpt = ckpt_of(out)
    assert ckpt["queue"]["_extra_state"] == {"size": 80, "dim": 16, "next": 48, "filled": 80}
    keys = ckpt["queue"]["keys"]
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(80), rtol=0, atol=1e-5)  # normalised keys
    assert set(ckpt["queue"]["label_buffer"].tolist()) <= {0, 1}
    for name, value in ckpt["model"].items():
        assert torch.equal(ckpt["key_model"][name], value), name
    # m = 0.9: the key model lags the model, but has moved from the initial weights
    out2 = str(tmp_path / "run2")
    assert pretrain.main([*TINY, "--epochs", "1", "--queue-size", "80", "--key-momentum", "0.9", "--out", out2]) == 0
    c2 = ckpt_of(out2)
    w = next(k for k in c2["model"] if k.endswith("weight"))  # the first layer's
    assert not torch.equal(c2["key_model"][w], c2["model"][w])
    assert not torch.equal(c2["key_model"][w], ckpt_of(out)["key_model"][w])


def test_a_negatives_only_queue_run_trains_another_trajectory(tmp_path):
    """--queue-negatives-only reaches the loss: the same run with and without it ends with other weights, and the
    flag is part of the checkpoint's training arguments."""
    runs = {}
    for name, extra in (("labelled", []), ("negatives", ["--queue-negatives-only"])):
        out = str(tmp_path / name)
        assert pretrain.main([*TINY, "--epochs", "1", "--queue-size", "80", "--key-momentum", "0.9", *extra,
                              "--out", out]) == 0  # fmt: skip
        runs[name] = ckpt_of(out)
    assert runs["negatives"]["config"]["queue_negatives_only"] is True
    w = next(k for k in runs["labelled"]["model"] if k.endswith("weight"))
    assert not torch.equal(runs["labelled"]["model"][w], runs["negatives"]["model"][w])


@pytest.mark.parametrize("args, message", [
    (["--queue-size", "-1", "--key-momentum", "0.99"], "--queue-size must be >= 0 (0: no queue), got -1"),
    (["--queue-size", "64"], "--queue-size 64 needs --key-momentum m"),
    (["--queue-size", "64", "--key-momentum", "1"], "--key-momentum must lie in [0, 1), got 1.0"),
    (["--queue-size", "64", "--key-momentum", "-0.1"], "--key-momentum must lie in [0, 1), got -0.1"),
    (["--queue-size", "64", "--key-momentum", "nan"], "--key-momentum must lie in [0, 1), got nan"),
    (["--key-momentum", "0.99"], "--key-momentum 0.99 needs a queue: pass --queue-size K > 0"),
    (["--queue-negatives-only"], "--queue-negatives-only needs --queue-size K > 0 and --loss supcon"),
    (["--queue-size", "64", "--key-momentum", "0.9", "--loss", "simclr", "--queue-negatives-only"],
     "--queue-negatives-only needs --queue-size K > 0 and --loss supcon"),
])
def test_queue_flags_are_checked_before_training(tmp_path, capsys, args, message):
    out = str(tmp_path / "o")
    assert pretrain.main([*TINY, *args, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_checkpoint_rules_for_the_queue(tmp_path, capsys):
    plain = str(tmp_path / "plain")
    assert pretrain.main([*TINY, "--epochs", "1", "--out", plain]) == 0
    # a checkpoint written before the queue options existed: its config has neither; it resumes without a queue
    path = os.path.join(plain, "checkpoint.pt")
    ckpt = ckpt_of(plain)
    assert "queue" not in ckpt and "key_model" not in ckpt
    for name in ("queue_size", "key_momentum"):
        del ckpt["config"][name]
    torch.save(ckpt, path)
    capsys.readouterr()
    assert pretrain.main([*TINY, "--epochs", "1", "--out", plain, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    # ... but not with a queue: the queue size is part of the run
    assert pretrain.main([*TINY, "--epochs", "1", "--queue-size", "64", "--key-momentum", "0.9", "--out", plain,
                          "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was written with --queue-size 0, this run has --queue-size 64: a run cannot change its queue" in err
    queued = str(tmp_path / "queued")
    q_args = [*TINY, "--queue-size", "64", "--key-momentum", "0.9", "--out", queued]
    assert pretrain.main([*q_args, "--epochs", "1"]) == 0
    capsys.readouterr()
    resized = [a if a != "64" else "96" for a in q_args]
    assert pretrain.main([*resized, "--epochs", "1", "--resume"]) == 2
    assert "was written with --queue-size 64, this run has --queue-size 96" in capsys.readouterr().err
    ckpt = ckpt_of(queued)
    del ckpt["key_model"]
    torch.save(ckpt, os.path.join(queued, "checkpoint.pt"))
    assert pretrain.main([*q_args, "--epochs", "1", "--resume"]) == 2
    assert "has no key_model state although it was written with --queue-size 64" in capsys.readouterr().err
