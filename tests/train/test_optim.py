import math

import pytest
import torch
from torch import nn

from fastcl.train.optim import LARS, build_optimizer, cosine_with_warmup, param_groups


def test_lars_step_matches_the_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4))
    gw, gb = torch.randn(4, 3), torch.randn(4)
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars_adapt": False}],
               lr=0.5, momentum=0.9, eta=0.01)
    w0, b0 = w.detach().clone(), b.detach().clone()
    bufs = [None, None]
    for step in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        wc, bc = w.detach().clone(), b.detach().clone()
        opt.step()
        d = gw + 0.1 * wc
        d = d * (0.01 * wc.norm() / d.norm())
        bufs[0] = d if bufs[0] is None else 0.9 * bufs[0] + d
        bufs[1] = gb if bufs[1] is None else 0.9 * bufs[1] + gb
        torch.testing.assert_close(w.detach(), wc - 0.5 * bufs[0])
        torch.testing.assert_close(b.detach(), bc - 0.5 * bufs[1])
    assert not torch.equal(w0, w.detach()) and not torch.equal(b0, b.detach())


def test_lars_zero_weights_fall_back_to_plain_sgd():
    w = nn.Parameter(torch.zeros(3, 3))
    w.grad = torch.ones(3, 3)
    LARS([w], lr=0.1, momentum=0.0).step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.1))


def test_param_groups_and_build_optimizer():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    groups = param_groups(model, 1e-4)
    assert [len(g["params"]) for g in groups] == [2, 4]  # 2 weight matrices; 2 biases + BN weight + BN bias
    assert groups[1]["weight_decay"] == 0.0 and not groups[1]["lars_adapt"]
    assert isinstance(build_optimizer("sgd", model, 0.1), torch.optim.SGD)
    assert isinstance(build_optimizer("lars", model, 0.1), LARS)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("adam", model, 0.1)


def test_cosine_with_warmup():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = cosine_with_warmup(opt, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[7] == pytest.approx(1.0 + math.cos(math.pi * 3 / 6))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
