"""GradCache: one cached step equals the full-batch step (BatchNorm-free model), RNG and BatchNorm handling."""

import copy

import pytest
import torch
from torch import nn

from fastcl import NTXentLoss, SupConLoss
from fastcl.models.contrastive import ContrastiveModel
from fastcl.models.encoders import ConvNet
from fastcl.models.heads import MLPHead
from fastcl.train.augment import AugmentConfig, BatchAugment
from fastcl.train.gradcache import cached_backward, micro_batches


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bn_free_model(dropout: float = 0.0) -> ContrastiveModel:
    torch.manual_seed(0)
    enc = ConvNet(3, (8, 16), batchnorm=False)
    head = MLPHead(16, 16, 8, batchnorm=False)
    if dropout:
        head = nn.Sequential(nn.Dropout(dropout), head)
    return ContrastiveModel(enc, head)


def make_step(model, loss_kind: str, n: int = 13, seed: int = 0):
    """Images, labels, augmentation parameters of both views, and the ``encode`` / ``loss_fn`` pair."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    aug = BatchAugment(AugmentConfig())
    p1, p2 = aug.sample(n, g), aug.sample(n, g)

    def encode(s, e):
        views = torch.cat([aug.apply(x[s:e], p1[s:e]), aug.apply(x[s:e], p2[s:e])])
        _, z = model(views)
        return torch.stack([z[: e - s], z[e - s:]], dim=1)

    if loss_kind == "supcon":
        crit = SupConLoss(0.2, base_temperature=0.2, normalize=True)

        def loss_fn(z):
            return crit(z, y)
    else:
        crit = NTXentLoss(0.2)

        def loss_fn(z):
            return crit(z[:, 0], z[:, 1])
    return encode, loss_fn, n


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss_kind", ["supcon", "simclr"])
@pytest.mark.parametrize("micro", [1, 4, 5, 13, 100])
def test_cached_step_equals_full_batch_step(loss_kind, micro):
    full = bn_free_model()
    cached = copy.deepcopy(full)
    enc_f, loss_f, n = make_step(full, loss_kind)
    loss_full = loss_f(enc_f(0, n))
    loss_full.backward()
    enc_c, loss_c, n = make_step(cached, loss_kind)
    loss_cached = cached_backward(enc_c, n, micro, loss_c, model=cached)
    assert not loss_cached.requires_grad
    torch.testing.assert_close(loss_cached, loss_full.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(full), grads(cached)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # and the optimiser step that follows
    for m in (full, cached):
        torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9).step()
    for a, b in zip(full.parameters(), cached.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_dropout_masks_are_replayed_in_the_second_pass():
    """With dropout, the re-forward must draw the masks of the first pass; the result equals a step that
    back-propagates through those same forwards."""
    model = bn_free_model(dropout=0.5)
    ref = copy.deepcopy(model)
    enc, loss_fn, n = make_step(model, "supcon")
    torch.manual_seed(7)
    cached_backward(enc, n, 4, loss_fn, model=model)
    after_cached = torch.rand(1)

    enc_r, loss_r, n = make_step(ref, "supcon")
    torch.manual_seed(7)  # the same RNG stream, micro-batch by micro-batch, with autograd
    out = torch.cat([enc_r(s, e) for s, e in micro_batches(n, 4)])
    loss_r(out).backward()
    after_ref = torch.rand(1)
    for a, b in zip(grads(ref), grads(model)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert torch.equal(after_cached, after_ref)  # the RNG stream continues as after one pass


def test_batchnorm_running_stats_are_updated_once_per_micro_batch():
    torch.manual_seed(0)
    enc = ConvNet(3, (8,), batchnorm=True)
    model = ContrastiveModel(enc, MLPHead(8, 8, 4))
    ref = copy.deepcopy(model)
    encode, loss_fn, n = make_step(model, "simclr", n=12)
    cached_backward(encode, n, 4, loss_fn, model=model)
    bn = model.encoder.blocks[0][1]
    assert int(bn.num_batches_tracked) == 3  # pass 1 undone, pass 3 counted
    # the same statistics as three plain forwards of the micro-batches
    encode_r, _, _ = make_step(ref, "simclr", n=12)
    with torch.no_grad():
        for s, e in micro_batches(n, 4):
            encode_r(s, e)
    bn_ref = ref.encoder.blocks[0][1]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)


def test_no_sync_wraps_every_backward_but_the_last():
    model = bn_free_model()
    encode, loss_fn, n = make_step(model, "simclr", n=10)
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *a):
            return False

    cached_backward(encode, n, 3, loss_fn, model=model, no_sync=Ctx)
    assert len(entered) == len(micro_batches(10, 3)) - 1 == 3


def test_micro_batches():
    assert micro_batches(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert micro_batches(6, 6) == [(0, 6)]
    with pytest.raises(ValueError):
        micro_batches(4, 0)
