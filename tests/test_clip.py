"""``fastcl.ClipLoss`` against open_clip's ``ClipLoss`` (float64, to 1e-12), and a learnable temperature across ranks.

open_clip is installed without its dependencies (``import open_clip`` needs torchvision), so its ``loss.py``, which
needs only torch, is loaded by file path. One spawn of 3 processes (gloo on 127.0.0.1) runs world size 3, then
world size 2 on ranks 0 and 1 (a fresh default group: open_clip gathers on the world). Every rank builds the same
global inputs from a seed and keeps its shard; the test process checks:

* equal shards, every ``(local_loss, gather_with_grad)``: each rank's loss and gradients (both feature tensors and
  the parameter ``p`` of ``logit_scale = p.exp()``) equal open_clip's on that rank;
* uneven and empty shards: fastcl's per-rank results against open_clip in one process on the concatenated batch,
  under the convention of :mod:`fastcl.clip`;
* fastcl's gathered SupCon / NT-Xent / InfoNCE with a tensor temperature: the rank-mean of the losses is the
  one-process loss and the rank-sum of the temperature parameter's gradients, divided by W (DDP's average), is the
  one-process gradient.
"""

from __future__ import annotations

import importlib.util
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import join_gloo, spawn_ranks

import fastcl
import fastcl.functional as FF

DIM = 5
LOG_SCALE = 1.3  # logit_scale = exp(1.3) ~ 3.7: gradients of every part are O(1)
COMBOS = [(False, False), (False, True), (True, False), (True, True)]
SPAWN_TIMEOUT_S = 180
TOL = dict(rtol=1e-12, atol=1e-12)


def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _inputs(counts, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    img = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def _clip_step(criterion, img, txt):
    """``(loss, d img, d txt, d p)`` of ``criterion(img, txt, p.exp())``, with ``grad_output = 1``."""
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    p = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    loss = criterion(img, txt, p.exp())
    grads = torch.autograd.grad(loss, (img, txt, p), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (img, txt, p))]
    return loss.detach(), *grads


# ----------------------------------------------------------------------------------------------------------------
# One process
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 40, 600])
def test_one_process_equals_open_clip(n):
    open_clip_loss = _open_clip_loss_module()
    img, txt = _inputs([n], n)
    want = _clip_step(open_clip_loss.ClipLoss(), img, txt)
    got = _clip_step(fastcl.ClipLoss(), img, txt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    assert abs(float(want[3])) > 1e-3 or n == 1


def test_output_dict_bias_and_errors():
    open_clip_loss = _open_clip_loss_module()
    img, txt = _inputs([6], 3)
    s = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    got = fastcl.ClipLoss()(img, txt, s, bias, output_dict=True)
    want = open_clip_loss.ClipLoss()(img, txt, s, bias, output_dict=True)
    assert set(got) == {"contrastive_loss"}
    torch.testing.assert_close(got["contrastive_loss"], want["contrastive_loss"], **TOL)
    (grad_bias,) = torch.autograd.grad(got["contrastive_loss"], bias)
    assert grad_bias == 0
    with pytest.raises(ValueError, match="use_horovod"):
        fastcl.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank"):
        fastcl.ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="does not match the process group"):
        fastcl.ClipLoss(rank=0, world_size=2)(img, txt, s)
    with pytest.raises(ValueError, match="logit_scale"):
        fastcl.ClipLoss()(img, txt, torch.tensor(-1.0))
    with pytest.raises(ValueError, match="logit_scale"):
        fastcl.ClipLoss()(img, txt, torch.ones(2))


def test_logit_bias_is_one_number():
    """``logit_bias`` is one constant added to every logit (no effect on the loss, a zero gradient): a number, a
    0-dim or a one-element tensor. A bias of any other shape (open_clip would add it logit by logit, changing its
    loss) or kind raises, naming the argument; a NaN bias gives a NaN loss, as open_clip's."""
    img, txt = _inputs([6], 4)
    s = torch.tensor(10.0, dtype=torch.float64)
    plain = fastcl.ClipLoss()(img, txt, s)
    for bias in (-2.0, torch.tensor(-2.0), torch.tensor([-2.0], requires_grad=True)):
        loss = fastcl.ClipLoss()(img, txt, s, bias)
        torch.testing.assert_close(loss, plain, **TOL)
        if isinstance(bias, torch.Tensor) and bias.requires_grad:
            (grad_bias,) = torch.autograd.grad(loss, bias)
            assert grad_bias.shape == (1,) and grad_bias.item() == 0
    assert torch.isnan(fastcl.ClipLoss()(img, txt, s, float("nan")))
    for bias, error in (
        (torch.zeros(6, 6), ValueError),
        (torch.zeros(2), ValueError),
        (torch.tensor(1), TypeError),
        ("-2", TypeError),
        ([-2.0], TypeError),
    ):
        with pytest.raises(error, match="logit_bias"):
            fastcl.ClipLoss()(img, txt, s, bias)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(backend="reference", local_loss=True, rank=0, world_size=2), ValueError, "backend='reference'"),
        (dict(world_size=1.5), TypeError, "world_size must be an int"),
        (dict(world_size=True), TypeError, "world_size must be an int"),
        (dict(rank="0", world_size=2), TypeError, "rank must be an int"),
    ],
)
def test_constructor_refuses_bad_settings_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastcl.ClipLoss(**kwargs)


def test_constructor_takes_numpy_ints_and_shows_its_settings():
    np = pytest.importorskip("numpy")
    img, txt = _inputs([6], 5)
    s = torch.tensor(10.0, dtype=torch.float64)
    criterion = fastcl.ClipLoss(rank=np.int64(0), world_size=np.int64(1), backend="reference")
    assert (type(criterion.rank), type(criterion.world_size)) == (int, int)
    torch.testing.assert_close(criterion(img, txt, s), fastcl.ClipLoss()(img, txt, s), **TOL)
    assert repr(fastcl.ClipLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2)) == (
        "ClipLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2, backend='auto')"
    )


# ----------------------------------------------------------------------------------------------------------------
# Across ranks: the workers
# ----------------------------------------------------------------------------------------------------------------


def _shard(x, counts, rank):
    start = sum(counts[:rank])
    return x[start : start + counts[rank]]


def _uneven(world):
    return {3: [[3, 0, 4], [2, 3, 1]], 2: [[5, 3], [0, 4]]}[world]


def _run_clip(rank, world):
    open_clip_loss = _open_clip_loss_module()
    out = {}
    equal = [4] * world
    img, txt = _inputs(equal, 11 * world)
    for local_loss, with_grad in COMBOS:
        kwargs = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
        mine = (_shard(img, equal, rank), _shard(txt, equal, rank))
        out[("equal", local_loss, with_grad)] = (
            _clip_step(fastcl.ClipLoss(**kwargs), *mine),
            _clip_step(open_clip_loss.ClipLoss(**kwargs), *mine),
        )
    for index, counts in enumerate(_uneven(world)):
        img, txt = _inputs(counts, 7 * world + index)
        for local_loss, with_grad in COMBOS:
            criterion = fastcl.ClipLoss(local_loss, with_grad, rank=rank, world_size=world)
            out[(f"uneven{index}", local_loss, with_grad)] = _clip_step(
                criterion, _shard(img, counts, rank), _shard(txt, counts, rank)
            )
    return out


LEARNABLE = ["supcon", "ntxent", "infonce"]


def _learnable_loss(name, f, p, labels, **kwargs):
    """SupCon (labels, base_temperature 0.5), NT-Xent (temperature 1 / exp(p)) or InfoNCE (logit_scale exp(p))."""
    if name == "supcon":
        return FF.supcon_loss(f, labels, temperature=1 / p.exp(), base_temperature=0.5, **kwargs)
    if name == "ntxent":
        return FF.nt_xent_loss(f[:, 0], f[:, 1], temperature=1 / p.exp(), **kwargs)
    return FF.info_nce_loss(f[:, 0], f[:, 1], logit_scale=p.exp(), **kwargs)


def _learnable_inputs(counts, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(counts), 2, DIM, generator=g, dtype=torch.float64)


def _run_learnable(rank, world):
    out = {}
    for index, counts in enumerate(_uneven(world)):
        features = _learnable_inputs(counts, 5 * world + index)
        for name in LEARNABLE:
            f = _shard(features, counts, rank).clone().requires_grad_()
            p = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
            start = sum(counts[:rank])  # labels: the global sample index mod 2
            labels = torch.arange(start, start + counts[rank]) % 2
            loss = _learnable_loss(name, f, p, labels, gather_distributed=True)
            out[(name, index)] = (loss.detach(), *torch.autograd.grad(loss, (f, p)))
    return out


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    join_gloo(rank, world, port)
    try:
        result = {"clip": _run_clip(rank, world), "learnable": _run_learnable(rank, world)}
    except Exception:
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ranks[rank][world]``: world sizes 2 and 3, one spawn each (open_clip gathers on the default group)."""
    _open_clip_loss_module()
    results = [{}, {}, {}]
    for world in (3, 2):
        for rank, result in enumerate(_spawn(world, tmp_path_factory.mktemp(f"clip{world}"))):
            assert "error" not in result, f"rank {rank} of {world}:\n{result['error']}"
            results[rank][world] = result
    return results


def _spawn(world, out_dir):
    return spawn_ranks(_worker, world, out_dir, SPAWN_TIMEOUT_S, world)


# ----------------------------------------------------------------------------------------------------------------
# Across ranks: the checks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("local_loss, with_grad", COMBOS)
def test_equal_shards_equal_open_clip_per_rank(ranks, world, local_loss, with_grad):
    for rank in range(world):
        got, want = ranks[rank][world]["clip"][("equal", local_loss, with_grad)]
        for name, g, w in zip(("loss", "d image", "d text", "d p"), got, want):
            where = f"rank {rank} of {world}, {name}"
            torch.testing.assert_close(g, w, **TOL, msg=lambda m, where=where: f"{where}: {m}")
        assert abs(float(want[3])) > 1e-4


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("local_loss, with_grad", COMBOS)
def test_uneven_shards_follow_the_documented_convention(ranks, world, index, local_loss, with_grad):
    """Against open_clip in one process on the concatenated batch (L), as the table in fastcl.clip says."""
    open_clip_loss = _open_clip_loss_module()
    counts = _uneven(world)[index]
    img, txt = _inputs(counts, 7 * world + index)
    loss, d_img, d_txt, d_p = _clip_step(open_clip_loss.ClipLoss(), img, txt)
    per_rank = [ranks[rank][world]["clip"][(f"uneven{index}", local_loss, with_grad)] for rank in range(world)]
    if local_loss:  # mean_r L_r = L, sum_r dL_r/dp = W dL/dp
        torch.testing.assert_close(sum(r[0] for r in per_rank) / world, loss, **TOL)
        torch.testing.assert_close(sum(r[3] for r in per_rank) / world, d_p, **TOL)
    else:  # every rank: L and dL/dp
        for r in per_rank:
            torch.testing.assert_close(r[0], loss, **TOL)
            torch.testing.assert_close(r[3], d_p, **TOL)
    if local_loss and not with_grad:
        return  # (only the anchor roles' gradients: no one-process counterpart)
    feature_factor = world if with_grad else 1
    for rank, r in enumerate(per_rank):
        torch.testing.assert_close(r[1], feature_factor * _shard(d_img, counts, rank), **TOL)
        torch.testing.assert_close(r[2], feature_factor * _shard(d_txt, counts, rank), **TOL)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("name", LEARNABLE)
def test_learnable_temperature_gathered_equals_one_process(ranks, world, index, name):
    counts = _uneven(world)[index]
    features = _learnable_inputs(counts, 5 * world + index).requires_grad_()
    p = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    loss = _learnable_loss(name, features, p, torch.arange(sum(counts)) % 2)
    d_features, d_p = torch.autograd.grad(loss, (features, p))
    per_rank = [ranks[rank][world]["learnable"][(name, index)] for rank in range(world)]
    torch.testing.assert_close(sum(r[0] for r in per_rank) / world, loss.detach(), **TOL)
    torch.testing.assert_close(sum(r[2] for r in per_rank) / world, d_p, **TOL)  # DDP's average
    for rank, r in enumerate(per_rank):
        torch.testing.assert_close(r[1] / world, _shard(d_features, counts, rank), **TOL)
    assert abs(float(d_p)) > 1e-4
