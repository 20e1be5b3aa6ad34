"""Distributed losses across processes (gloo on 127.0.0.1) against one process on the concatenated batch.

One spawn of 3 processes runs every case: world size 3 on the default group, world size 2 on a subgroup of
ranks 0 and 1 (passed as ``group=``), so the seconds each process spends importing torch are paid once. Every
rank builds the same global inputs from a seed and keeps its shard (uneven, and with an empty shard); the test
process then checks, in float64:

* the mean over ranks of the returned losses equals the single-process loss (tests/float64_reference.py);
* each rank's input gradient divided by W (what DDP's averaging does to the parameter gradients downstream)
  equals the single-process gradient of that rank's rows; with a real DistributedDataParallel model, the
  parameter gradients equal the single-process ones on every rank;
* bad input on one rank (feature dim, dtype, a mask, labels out of range) raises a clear error on every rank,
  within seconds, and the process group stays usable.
"""

from __future__ import annotations

import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from float64_reference import info_nce_float64, supcon_float64
from gloo_ranks import join_gloo, spawn_ranks

import fastcl.functional as FF
from fastcl import SupConLoss
from fastcl.distributed import all_gather_with_grad

TEMPERATURE, BASE_TEMPERATURE = 0.3, 0.5
WORLD = 3  # processes spawned; world size 2 runs on the subgroup of ranks 0 and 1
SPAWN_TIMEOUT_S = 150  # the workers take about 15 s on 2 busy cores
DIM = 4


# ----------------------------------------------------------------------------------------------------------------
# Cases: built identically in the workers and in the test process
# ----------------------------------------------------------------------------------------------------------------


def _cases(world):
    uneven = {2: [5, 3], 3: [3, 0, 4]}[world]
    with_empty = {2: [4, 0], 3: [2, 3, 0]}[world]
    cases = {}
    for counts_name, counts in (("uneven", uneven), ("empty", with_empty)):
        for mode in ("all", "one"):
            for labels in (True, False):
                for n_views in (2, 3):
                    name = f"supcon-{counts_name}-{mode}-{'labels' if labels else 'simclr'}-v{n_views}"
                    cases[name] = dict(kind="supcon", counts=counts, mode=mode, labels=labels, n_views=n_views)
        cases[f"ntxent-{counts_name}"] = dict(kind="ntxent", counts=counts)
        cases[f"infonce-symmetric-{counts_name}"] = dict(
            kind="infonce", counts=counts, key_counts=counts, symmetric=True, labels=False
        )
        cases[f"infonce-labels-{counts_name}"] = dict(
            kind="infonce", counts=counts, key_counts=counts[::-1], symmetric=False, labels=True
        )
        cases[f"gather-{counts_name}"] = dict(kind="gather", counts=counts)
    cases["infonce-default-more-keys"] = dict(
        kind="infonce", counts=uneven, key_counts=[c + 2 for c in uneven], symmetric=False, labels=False
    )
    cases["ddp-supcon-empty"] = dict(kind="ddp", counts=with_empty)
    cases["ddp-supcon-uneven"] = dict(kind="ddp", counts=uneven)
    # "frozen": the rank whose inputs do not require grad (a rank without data passing a plain zero-row tensor, or a
    # rank with rows and no grad); the others' gradients still hold its loss's share, by its joining the backward
    placeholder = with_empty.index(0)
    cases["gather-no-grad-on-rank-0"] = dict(kind="gather", counts=uneven, frozen=0)
    cases["gather-strided"] = dict(kind="gather", counts=uneven, strided=True)  # x [n, 3, 2] with strides (2, 1, 3)
    cases["gather-empty-placeholder"] = dict(kind="gather", counts=with_empty, frozen=placeholder)
    cases["supcon-empty-placeholder"] = dict(
        kind="supcon", counts=with_empty, mode="all", labels=True, n_views=2, frozen=placeholder
    )
    cases["infonce-symmetric-empty-placeholder"] = dict(
        kind="infonce", counts=with_empty, key_counts=with_empty, symmetric=True, labels=False, frozen=placeholder
    )
    return cases


def _seed(name):
    return sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 10007


def _global_inputs(name, spec):
    """The full batch of every rank (float64), from the case's seed."""
    g = torch.Generator().manual_seed(_seed(name))
    n = sum(spec["counts"])
    if spec["kind"] == "supcon":
        feats = torch.nn.functional.normalize(
            torch.randn(n, spec["n_views"], DIM, generator=g, dtype=torch.float64), dim=-1
        )
        return {"features": feats, "labels": torch.randint(0, 3, (n,), generator=g)}
    if spec["kind"] == "ntxent":
        return {
            "z_a": torch.randn(n, DIM, generator=g, dtype=torch.float64),
            "z_b": torch.randn(n, DIM, generator=g, dtype=torch.float64),
        }
    if spec["kind"] == "infonce":
        m = sum(spec["key_counts"])
        return {
            "query": torch.randn(n, DIM, generator=g, dtype=torch.float64),
            "key": torch.randn(m, DIM, generator=g, dtype=torch.float64),
            "labels": torch.randint(0, m, (n,), generator=g),
        }
    if spec["kind"] == "gather":
        return {
            "x": torch.randn(n, 3, 2, generator=g, dtype=torch.float64),
            "weight": torch.randn(n, 3, 2, generator=g, dtype=torch.float64),
        }
    if spec["kind"] == "ddp":
        return {
            "x": torch.randn(n, 2, 6, generator=g, dtype=torch.float64),
            "labels": torch.randint(0, 3, (n,), generator=g),
        }
    raise AssertionError(spec)


def _shard(t, counts, rank):
    start = sum(counts[:rank])
    return t[start : start + counts[rank]]


def _input(t, spec, rank):
    """This rank's copy of a shard: requiring grad, except on the case's "frozen" rank."""
    t = t.clone()
    return t if spec.get("frozen") == rank else t.requires_grad_()


def _grad(t):
    """The gradient of an input; zeros for one that does not require grad."""
    return torch.zeros_like(t) if t.grad is None else t.grad


def _model(name):
    torch.manual_seed(_seed(name))
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, DIM)).double()


# ----------------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------------


def _run_case(name, spec, rank, world, group):
    inputs, counts = _global_inputs(name, spec), spec["counts"]
    kind = spec["kind"]
    if kind == "supcon":
        feats = _input(_shard(inputs["features"], counts, rank), spec, rank)
        labels = _shard(inputs["labels"], counts, rank) if spec["labels"] else None
        loss = FF.supcon_loss(
            feats,
            labels,
            temperature=TEMPERATURE,
            base_temperature=BASE_TEMPERATURE,
            contrast_mode=spec["mode"],
            gather_distributed=True,
            group=group,
        )
        loss.backward()
        return {"loss": loss.item(), "grads": [_grad(feats)]}
    if kind == "ntxent":
        z_a = _shard(inputs["z_a"], counts, rank).clone().requires_grad_()
        z_b = _shard(inputs["z_b"], counts, rank).clone().requires_grad_()
        loss = FF.nt_xent_loss(z_a, z_b, temperature=TEMPERATURE, gather_distributed=True, group=group)
        loss.backward()
        return {"loss": loss.item(), "grads": [z_a.grad, z_b.grad]}
    if kind == "infonce":
        query = _input(_shard(inputs["query"], counts, rank), spec, rank)
        key = _input(_shard(inputs["key"], spec["key_counts"], rank), spec, rank)
        labels = _shard(inputs["labels"], counts, rank) if spec["labels"] else None
        loss = FF.info_nce_loss(
            query,
            key,
            labels,
            temperature=TEMPERATURE,
            symmetric=spec["symmetric"],
            gather_distributed=True,
            group=group,
        )
        loss.backward()
        return {"loss": loss.item(), "grads": [_grad(query), _grad(key)]}
    if kind == "gather":
        x = _shard(inputs["x"], counts, rank)
        x = _input(x.transpose(1, 2).contiguous().transpose(1, 2) if spec.get("strided") else x, spec, rank)
        gathered = all_gather_with_grad(x, group)
        # rank-dependent use of the gathered tensor: the gradient of x sums the contributions of all ranks
        (gathered * inputs["weight"] * (rank + 1)).sum().backward()
        return {"gathered": gathered.detach(), "grads": [x.grad]}
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(_model(name), process_group=group)
        x = _shard(inputs["x"], counts, rank)
        labels = _shard(inputs["labels"], counts, rank)
        criterion = SupConLoss(
            temperature=TEMPERATURE,
            base_temperature=BASE_TEMPERATURE,
            normalize=True,
            gather_distributed=True,
            group=group,
        )
        loss = criterion(model(x), labels)
        loss.backward()
        return {"loss": loss.item(), "param_grads": [p.grad.clone() for p in model.parameters()]}
    raise AssertionError(spec)


def _bad_inputs(rank, world, group):
    """Each bad case on every rank: (exception type, message, seconds to raise), then a good collective."""
    last = world - 1
    results = {}

    def attempt(name, fn):
        start = time.perf_counter()
        try:
            fn()
            outcome = (None, "", time.perf_counter() - start)
        except Exception as err:  # the test inspects it
            outcome = (type(err).__name__, str(err), time.perf_counter() - start)
        # the group must still be usable, in step on every rank
        check = all_gather_with_grad(torch.full((1,), float(rank)), group)
        results[name] = outcome + (check.tolist(),)

    feats = torch.randn(3, 2, DIM + (rank == last))
    attempt("supcon-dim", lambda: FF.supcon_loss(feats, gather_distributed=True, group=group))
    feats_dtype = torch.randn(3, 2, DIM, dtype=torch.float64 if rank == 0 else torch.float32)
    attempt("supcon-dtype", lambda: FF.supcon_loss(feats_dtype, gather_distributed=True, group=group))
    features = torch.randn(3, 2, DIM)
    mask = torch.eye(3) if rank == last else None
    attempt("supcon-mask", lambda: FF.supcon_loss(features, mask=mask, gather_distributed=True, group=group))
    labels = torch.zeros(3, dtype=torch.long) if rank == 0 else None
    attempt("supcon-labels-on-one-rank", lambda: FF.supcon_loss(features, labels, gather_distributed=True, group=group))
    wrong_len = torch.zeros(3 + (rank == last), dtype=torch.long)
    attempt("supcon-labels-shape", lambda: FF.supcon_loss(features, wrong_len, gather_distributed=True, group=group))
    x = torch.randn(2 + rank, 5 + (rank == last))
    attempt("gather-shape", lambda: all_gather_with_grad(x, group))
    x_dtype = torch.zeros(2, 3, dtype=torch.float64 if rank == last else torch.float32)
    attempt("gather-dtype", lambda: all_gather_with_grad(x_dtype, group))
    not_a_tensor = [0.0, 1.0] if rank == last else torch.zeros(2)
    attempt("gather-not-a-tensor", lambda: all_gather_with_grad(not_a_tensor, group))
    q = torch.randn(2, DIM)
    bad_labels = torch.tensor([0, 99 if rank == last else 1])
    attempt(
        "infonce-label-range",
        lambda: FF.info_nce_loss(q, q.clone(), bad_labels, symmetric=False, gather_distributed=True, group=group),
    )
    return results


def _double_backward(rank, group):
    """A second derivative through the gather (a gradient penalty): the first-order gradient, and what the second
    backward raised."""
    x = (torch.arange(6, dtype=torch.float64).reshape(2, 3) + rank).requires_grad_()
    (grad,) = torch.autograd.grad((all_gather_with_grad(x, group) ** 2).sum(), x, create_graph=True)
    try:
        ((grad**2).sum() + x.sum()).backward()
        outcome = (None, "")
    except RuntimeError as err:
        outcome = (type(err).__name__, str(err))
    check = all_gather_with_grad(torch.full((1,), float(rank)), group)
    return (grad.detach(),) + outcome + (check.tolist(),)


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    join_gloo(rank, WORLD, port)
    pair = dist.new_group([0, 1])  # collective: every rank calls it
    results = {}
    import fastcl.distributed as D

    core = D.contrastive_loss
    current = [None, None]

    def recording(anchor, contrast, *args, **kwargs):  # what each rank hands the core op
        calls = results[current[0]]["core_calls"]
        calls.setdefault(current[1], []).append((anchor.shape[0], contrast.shape[0]))
        return core(anchor, contrast, *args, **kwargs)

    D.contrastive_loss = recording
    try:
        for world, group in ((2, pair), (3, None)):
            if rank >= world:
                continue
            results[world] = {"cases": {}, "core_calls": {}}
            current[0] = world
            for name, spec in _cases(world).items():
                current[1] = name
                try:
                    results[world]["cases"][name] = _run_case(name, spec, rank, world, group)
                except Exception:  # reported by the test
                    results[world]["cases"][name] = {"error": traceback.format_exc()}
            results[world]["bad"] = _bad_inputs(rank, world, group)
            results[world]["double_backward"] = _double_backward(rank, group)
    finally:
        D.contrastive_loss = core
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Test side
# ----------------------------------------------------------------------------------------------------------------


def _spawn(out_dir):
    """Run _worker on WORLD processes; fail (never hang) if they do not finish in time."""
    return spawn_ranks(_worker, WORLD, out_dir, SPAWN_TIMEOUT_S)


@pytest.fixture(scope="module")
def all_results(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def world_results(request, all_results):
    world = request.param
    return world, [per_rank[world] for per_rank in all_results[:world]]


def _expected(name, spec):
    """Single-process loss and gradients of every input (whole batch), float64, by the independent reference."""
    inputs, kind = _global_inputs(name, spec), spec["kind"]
    if kind == "supcon":
        feats = inputs["features"].clone().requires_grad_()
        loss = supcon_float64(
            feats, inputs["labels"] if spec["labels"] else None, None, TEMPERATURE, spec["mode"], BASE_TEMPERATURE
        )
        loss.backward()
        return loss.item(), [feats.grad]
    if kind == "ntxent":
        z_a, z_b = inputs["z_a"].clone().requires_grad_(), inputs["z_b"].clone().requires_grad_()
        normed = torch.nn.functional.normalize(torch.stack([z_a, z_b], 1), dim=-1)
        loss = supcon_float64(normed, None, None, TEMPERATURE, "all", TEMPERATURE)
        loss.backward()
        return loss.item(), [z_a.grad, z_b.grad]
    if kind == "infonce":
        query, key = inputs["query"].clone().requires_grad_(), inputs["key"].clone().requires_grad_()
        q, k = torch.nn.functional.normalize(query, dim=-1), torch.nn.functional.normalize(key, dim=-1)
        if spec["labels"]:
            labels = inputs["labels"]
        else:  # local query i <-> local key i, in global key indices
            labels = torch.cat([torch.arange(c) + sum(spec["key_counts"][:r]) for r, c in enumerate(spec["counts"])])
        loss = info_nce_float64(q, k, labels, TEMPERATURE, spec["symmetric"])
        loss.backward()
        return loss.item(), [query.grad, key.grad]
    raise AssertionError(spec)


def _close(ours, expected, tol=1e-10):
    if ours.shape != expected.shape:
        return False
    if not ours.numel():
        return True
    return (ours - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())


def _case_names(kinds):
    return [name for name, spec in _cases(2).items() if spec["kind"] in kinds]


def _results_for(world_results, name):
    world, results = world_results
    cases = _cases(world)
    if name not in cases:  # names are the same for both world sizes
        pytest.skip(f"{name} not defined for world size {world}")
    per_rank = [r["cases"][name] for r in results]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank} failed:\n{res['error']}"
    return world, cases[name], per_rank


@pytest.mark.parametrize("name", _case_names({"supcon", "ntxent", "infonce"}))
def test_loss_and_gradients_match_one_process(world_results, name):
    world, spec, per_rank = _results_for(world_results, name)
    expected_loss, expected_grads = _expected(name, spec)
    mean_loss = sum(r["loss"] for r in per_rank) / world
    assert abs(mean_loss - expected_loss) <= 1e-10 * max(1.0, abs(expected_loss)), (mean_loss, expected_loss)
    shard_counts = [spec["counts"], spec.get("key_counts", spec["counts"])]
    for which, expected in enumerate(expected_grads):
        counts = spec["counts"] if spec["kind"] != "infonce" else shard_counts[which]
        for rank, res in enumerate(per_rank):
            ours = res["grads"][which] / world  # what DDP's average over ranks makes of it
            want = _shard(expected, counts, rank)
            assert _close(ours, want), f"rank {rank} input {which}: max err {(ours - want).abs().max().item()}"


@pytest.mark.parametrize("name", _case_names({"gather"}))
def test_all_gather_with_grad(world_results, name):
    world, spec, per_rank = _results_for(world_results, name)
    inputs = _global_inputs(name, spec)
    total_weight = inputs["weight"] * sum(rank + 1 for rank in range(world))  # d/dx of sum_r loss_r
    for rank, res in enumerate(per_rank):
        assert torch.equal(res["gathered"], inputs["x"])  # rank order, uneven and empty shards
        if spec.get("frozen") == rank:  # its x does not require grad
            assert res["grads"][0] is None
        else:
            assert _close(res["grads"][0], _shard(total_weight, spec["counts"], rank))


@pytest.mark.parametrize("name", _case_names({"ddp"}))
def test_ddp_parameter_gradients_match_one_process(world_results, name):
    world, spec, per_rank = _results_for(world_results, name)
    inputs = _global_inputs(name, spec)
    model = _model(name)
    feats = torch.nn.functional.normalize(model(inputs["x"]), dim=-1)
    loss = supcon_float64(feats, inputs["labels"], None, TEMPERATURE, "all", BASE_TEMPERATURE)
    loss.backward()
    mean_loss = sum(r["loss"] for r in per_rank) / world
    assert abs(mean_loss - loss.item()) <= 1e-10 * max(1.0, abs(loss.item()))
    for rank, res in enumerate(per_rank):
        for ours, param in zip(res["param_grads"], model.parameters()):
            assert _close(ours, param.grad), f"rank {rank}: max err {(ours - param.grad).abs().max().item()}"


def test_each_rank_scores_only_its_own_anchors(world_results):
    """Local rows x global columns: over the ranks the anchors partition the single-process anchors."""
    world, results = world_results
    for name, spec in _cases(world).items():
        if spec["kind"] != "supcon":
            continue
        calls = [call for res in results for call in res["core_calls"].get(name, [])]
        n_contrast = spec["n_views"] * sum(spec["counts"])
        assert calls and all(contrast == n_contrast for _, contrast in calls)
        expected = n_contrast if spec["mode"] == "all" else sum(spec["counts"])
        assert sum(anchor for anchor, _ in calls) == expected, (name, calls)
        assert len(calls) == sum(1 for c in spec["counts"] if c), (name, calls)  # one call per non-empty rank


BAD = [
    "supcon-dim",
    "supcon-dtype",
    "supcon-mask",
    "supcon-labels-on-one-rank",
    "supcon-labels-shape",
    "gather-shape",
    "gather-dtype",
    "gather-not-a-tensor",
    "infonce-label-range",
]
MENTIONS = {  # what every rank's message must name
    "supcon-dim": ["rank 0", "rank {last}", f"{DIM + 1}]", "dim"],
    "supcon-dtype": ["rank 0", "float64", "float32", "dtype"],
    "supcon-mask": ["rank {last}", "mask", "labels"],
    "supcon-labels-on-one-rank": ["labels=given", "labels=None"],
    "supcon-labels-shape": ["rank {last}", "labels must have shape [3]"],
    "gather-shape": ["rank 0", "rank {last}", "[2, 5]", "6]"],
    "gather-dtype": ["rank 0: x [2, 3] float32", "rank {last}: x [2, 3] float64", "same dtype"],
    "gather-not-a-tensor": ["rank {last}", "x must be a torch.Tensor, got list"],
    "infonce-label-range": ["rank {last}", "99", "global key set"],
}

ERROR_TYPES = {"gather-not-a-tensor": "TypeError"}  # every other case: ValueError


@pytest.mark.parametrize("case", BAD)
def test_bad_input_on_one_rank_raises_on_every_rank(world_results, case):
    world, results = world_results
    raised = [res["bad"][case][0] for res in results]
    assert raised == [ERROR_TYPES.get(case, "ValueError")] * world  # one exception type on every rank
    for rank, res in enumerate(results):
        err_type, message, seconds, check = res["bad"][case]
        for needle in MENTIONS[case]:
            assert needle.format(last=world - 1) in message, (rank, needle, message)
        assert seconds < 10, f"rank {rank} took {seconds:.1f} s to raise"
        assert check == [float(r) for r in range(world)]  # the group is still in step afterwards


def test_second_derivative_through_the_gather_raises(world_results):
    """The backward reduce-scatter is not itself differentiable: a second backward through it raises on every rank
    (its terms would otherwise be left out of the result), and the first-order gradient is exact."""
    world, results = world_results
    for rank, res in enumerate(results):
        grad, err_type, message, check = res["double_backward"]
        x = torch.arange(6, dtype=torch.float64).reshape(2, 3) + rank
        assert torch.equal(grad, 2 * world * x)  # d/dx of sum over ranks of sum(gathered ** 2)
        assert err_type == "RuntimeError" and "once_differentiable" in message, (rank, err_type, message)
        assert check == [float(r) for r in range(world)]


# ----------------------------------------------------------------------------------------------------------------
# Without a process group: world size 1
# ----------------------------------------------------------------------------------------------------------------


def test_single_process_is_the_plain_loss():
    assert not dist.is_initialized()
    x = torch.randn(5, 3)
    assert all_gather_with_grad(x) is x
    feats = torch.nn.functional.normalize(torch.randn(6, 2, DIM, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 3, (6,))
    for mode in ("all", "one"):
        ours = FF.supcon_loss(feats, labels, contrast_mode=mode, gather_distributed=True)
        assert torch.allclose(ours, FF.supcon_loss(feats, labels, contrast_mode=mode), rtol=1e-12, atol=0)
    q, k = torch.randn(4, DIM, dtype=torch.float64), torch.randn(4, DIM, dtype=torch.float64)
    assert torch.allclose(FF.info_nce_loss(q, k, gather_distributed=True), FF.info_nce_loss(q, k), rtol=1e-12)
    assert torch.allclose(FF.nt_xent_loss(q, k, gather_distributed=True), FF.nt_xent_loss(q, k), rtol=1e-12)


@pytest.mark.parametrize(
    "loss",
    [
        lambda f, gathered: FF.supcon_loss(f, torch.tensor([0, 1, 0, 2, 1]), gather_distributed=gathered),
        lambda f, gathered: FF.nt_xent_loss(f[:, 0], f[:, 1], gather_distributed=gathered),
        lambda f, gathered: FF.info_nce_loss(f[:, 0], f[:, 1], gather_distributed=gathered),
        lambda f, gathered: FF.info_nce_loss(
            f[:, 0], f[:, 1], torch.tensor([4, 0, 0, 2, 1]), symmetric=False, gather_distributed=gathered
        ),
        lambda f, gathered: FF.sigmoid_loss(f[:, 0], f[:, 1], torch.tensor(10.0), None, gather_distributed=gathered),
    ],
    ids=["supcon", "ntxent", "infonce", "infonce-labels", "sigmoid"],
)
def test_single_process_gathered_loss_compiles_as_one_graph(loss):
    """Without a process group the gathered form traces with fullgraph=True (its metadata, the dtype included, is
    Python state) and gives the plain loss."""
    features = torch.nn.functional.normalize(torch.randn(5, 2, DIM, dtype=torch.float64), dim=-1)
    torch._dynamo.reset()
    compiled = torch.compile(lambda f: loss(f, True), backend="eager", fullgraph=True)(features)
    assert torch.allclose(compiled, loss(features, False), rtol=1e-12, atol=0)


def test_single_process_gathered_info_nce_checks_the_label_range_in_graph():
    query = torch.randn(3, DIM)
    torch._dynamo.reset()
    traced = torch.compile(
        lambda labels: FF.info_nce_loss(query, query, labels, symmetric=False, gather_distributed=True),
        backend="eager",
        fullgraph=True,
    )
    with pytest.raises(RuntimeError, match="labels must index the global key set"):
        traced(torch.tensor([0, 3, 1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gathered_supcon_takes_a_half_precision_temperature_as_fp32(dtype):
    """A learnable temperature of a half-precision model (a bf16 / fp16 0-dim tensor) with a float base
    temperature: the gathered form's ``t / base_t`` is formed in fp32 as the one-process loss's is, so both give the
    same loss and temperature gradient (a half-precision quotient is off by up to 2**-9 relative)."""
    feats = torch.nn.functional.normalize(torch.randn(6, 2, DIM), dim=-1)
    labels = torch.randint(0, 3, (6,))
    results = []
    for gathered in (False, True):
        t = torch.tensor(0.1013, dtype=dtype, requires_grad=True)
        loss = FF.supcon_loss(feats, labels, temperature=t, base_temperature=0.07, gather_distributed=gathered)
        loss.backward()
        results.append((loss.detach(), t.grad.float()))
    exact = FF.supcon_loss(feats.double(), labels, temperature=torch.tensor(0.1013, dtype=dtype).double(),
                           base_temperature=0.07)  # fmt: skip
    for loss, _ in results:
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=0)


def test_single_process_empty_batch_and_errors():
    feats = torch.zeros(0, 2, DIM, requires_grad=True)
    loss = FF.supcon_loss(feats, gather_distributed=True)
    loss.backward()
    assert loss.item() == 0.0 and feats.grad.shape == feats.shape
    with pytest.raises(ValueError, match="mask cannot be used with gather_distributed"):
        FF.supcon_loss(torch.randn(3, 2, DIM), mask=torch.eye(3), gather_distributed=True)
    with pytest.raises(ValueError, match="no distributed form"):
        SupConLoss(backend="reference", gather_distributed=True)
    with pytest.raises(ValueError, match="features must be non-empty|n_views >= 1"):
        FF.supcon_loss(torch.zeros(0, 0, DIM), gather_distributed=True)
    assert "gather_distributed=True" in repr(SupConLoss(gather_distributed=True))
