"""The Triton kernels' second column range (extra contrast columns: ``negatives``, ``negative_labels``,
``in_batch_negatives=False``, ``false_negative_margin``) against the dense float64 reference, on CPU through
TRITON_INTERPRET=1 (small odd shapes: multi-tile loops with the interpreter's 16 x 16 blocks) or on a GPU: every
loss that takes extra columns, the gradients of anchors, contrast rows and extra rows, a detached queue (no
gradient launch for it), ``grad_output`` scaling, NaN propagation, a learnable temperature, the custom op."""

import pytest
import torch
from autotune_timing import host_timer
from conftest import DEVICE

import fastcl
from fastcl import functional as FF
from fastcl.kernels import launch

pytestmark = pytest.mark.triton
F64 = torch.float64
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}  # fp32 kernels (tf32x3 on GPUs) against float64


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run(fn, inputs, backend, dtype, scale=1.3):
    """``(loss, grads)`` of ``fn(*inputs)`` in ``dtype`` on the device (Triton) or float64 on CPU (reference);
    ``None`` inputs stay None, inputs given as ``(tensor, False)`` are detached."""
    leaves = []
    for x in inputs:
        tensor, grad = x if isinstance(x, tuple) else (x, True)
        device, kind = ("cpu", F64) if backend == "reference" else (DEVICE, dtype)
        leaves.append(tensor.to(device, kind).detach().requires_grad_(grad))
    loss = fn(*leaves, backend)
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss * scale, wanted)
    return loss.detach().double().cpu(), [g.double().cpu() for g in grads]


def _assert_matches(fn, inputs, dtype=torch.float32, scale=1.3):
    loss, grads = _run(fn, inputs, "triton", dtype, scale)
    ref, ref_grads = _run(fn, inputs, "reference", dtype, scale)
    tol = TOL[dtype]
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert g.numel() == 0 or (g - r).abs().max().item() <= 5 * tol * max(r.abs().max().item(), 1e-3)
    return loss


INFO_NCE_MODES = {
    "plain": dict(),
    "moco": dict(in_batch_negatives=False),
    "margin": dict(false_negative_margin=0.1),
    "moco_margin": dict(false_negative_margin=0.0, in_batch_negatives=False),
}


@pytest.mark.parametrize("mode", sorted(INFO_NCE_MODES))
@pytest.mark.parametrize("sizes", [(5, 5, 1, 3), (13, 17, 7, 16), (37, 37, 33, 16), (9, 11, 0, 3), (9, 11, 19, 40)])
def test_info_nce_one_way(mode, sizes):
    """D = 3, 16: one feature tile; D = 40 (fp32): looped feature tiles in the logits products of both ranges."""
    n_query, n_key, n_extra, dim = sizes
    labels = torch.randperm(n_key, generator=torch.Generator().manual_seed(3))[:n_query]

    def loss(q, k, neg, backend):
        return FF.info_nce_loss(q, k, labels.to(q.device), negatives=neg, symmetric=False, temperature=0.3,
                                backend=backend, **INFO_NCE_MODES[mode])  # fmt: skip

    _assert_matches(loss, (_rand(n_query, dim, seed=1), _rand(n_key, dim, seed=2), _rand(n_extra, dim, seed=4)))


def test_info_nce_margin_drops_columns_in_both_ranges():
    """At t = 0.05 with a margin of 0.05 some batch keys and some extra rows leave the softmax (the loss falls)."""
    q, k, neg = _rand(15, 4, seed=5), _rand(15, 4, seed=6), _rand(9, 4, seed=7)

    def loss(q, k, neg, backend, margin=0.05):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, temperature=0.05,
                                false_negative_margin=margin, backend=backend)  # fmt: skip

    with_margin = _assert_matches(loss, (q, k, neg))
    plain = loss(q.to(DEVICE), k.to(DEVICE), neg.to(DEVICE), "triton", margin=None)
    assert with_margin.item() < plain.item() - 1e-3


def test_info_nce_two_way_with_negatives_is_refused():
    q, k, neg = (_rand(6, 3, seed=s).to(DEVICE) for s in (8, 9, 10))
    with pytest.raises(ValueError, match="symmetric=False"):
        FF.info_nce_loss(q, k, negatives=neg, backend="triton")


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("sizes", [(7, 2, 7, 3), (11, 2, 33, 16), (5, 2, 9, 40)])
def test_supcon_with_queue(contrast_mode, labelled, sizes):
    bsz, n_views, n_extra, dim = sizes
    labels = torch.randint(0, 4, (bsz,), generator=torch.Generator().manual_seed(11))
    queue_labels = torch.randint(0, 6, (n_extra,), generator=torch.Generator().manual_seed(12)) if labelled else None

    def loss(features, queue, backend):
        device = features.device
        return FF.supcon_loss(features, labels.to(device), temperature=0.2, base_temperature=0.1, normalize=True,
                              contrast_mode=contrast_mode, negatives=queue,
                              negative_labels=None if queue_labels is None else queue_labels.to(device),
                              backend=backend)  # fmt: skip

    _assert_matches(loss, (_rand(bsz, n_views, dim, seed=13), _rand(n_extra, dim, seed=14)))


@pytest.mark.parametrize("n_extra", [1, 33])
def test_nt_xent_with_negatives(n_extra):
    def loss(z_a, z_b, neg, backend):
        return FF.nt_xent_loss(z_a, z_b, negatives=neg, temperature=0.3, backend=backend)

    _assert_matches(loss, (_rand(19, 16, seed=15), _rand(19, 16, seed=16), _rand(n_extra, 16, seed=17)))


@pytest.mark.parametrize("mode", ["plain", "moco_margin"])
def test_feature_dim_beyond_one_output_tile(mode):
    """D = 300: looped logits tiles and two output feature tiles of the anchor gradient (fp32: 256 wide), so the
    extra range's output operand is read at a feature offset."""

    def loss(q, k, neg, backend):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, temperature=0.5, backend=backend,
                                **INFO_NCE_MODES[mode])  # fmt: skip

    _assert_matches(loss, (_rand(7, 300, seed=35), _rand(7, 300, seed=36), _rand(18, 300, seed=37)))


def test_half_precision_queue():
    def loss(features, queue, backend):
        labels = torch.arange(9, device=features.device) % 3
        return FF.supcon_loss(features, labels, negatives=queue, negative_labels=torch.arange(13, device=features.device) % 4,
                              temperature=0.5, base_temperature=0.5, backend=backend)  # fmt: skip

    _assert_matches(loss, (_rand(9, 2, 16, seed=18), _rand(13, 16, seed=19)), dtype=torch.float16)


def test_detached_queue_launches_no_gradient_for_it(monkeypatch):
    calls = []
    extra_rows_gradient = launch._extra_rows_gradient
    monkeypatch.setattr(launch, "_extra_rows_gradient", lambda *a: calls.append(1) or extra_rows_gradient(*a))

    def loss(q, k, neg, backend):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, temperature=0.2, backend=backend)

    q, k, neg = _rand(21, 16, seed=20), _rand(21, 16, seed=21), _rand(33, 16, seed=22)
    _assert_matches(loss, (q, k, (neg, False)))
    assert calls == []
    _assert_matches(loss, (q, k, neg))
    assert calls == [1]


def test_grad_output_scales_every_gradient():
    def loss(q, k, neg, backend):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, in_batch_negatives=False, backend=backend)

    inputs = (_rand(13, 16, seed=23), _rand(13, 16, seed=24), _rand(7, 16, seed=25))
    _, once = _run(loss, inputs, "triton", torch.float32, scale=1.0)
    _, scaled = _run(loss, inputs, "triton", torch.float32, scale=-2.5)
    for a, b in zip(once, scaled):
        assert torch.allclose(b, -2.5 * a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["negatives", "query"])
@pytest.mark.parametrize("mode", ["plain", "moco_margin"])
def test_nan_propagates(where, mode):
    q, k, neg = _rand(9, 16, seed=26), _rand(9, 16, seed=27), _rand(7, 16, seed=28)
    (neg if where == "negatives" else q)[2, 1] = float("nan")
    q, k, neg = (x.to(DEVICE).requires_grad_() for x in (q, k, neg))
    loss = FF.info_nce_loss(q, k, negatives=neg, symmetric=False, normalize=False, backend="triton",
                            **INFO_NCE_MODES[mode])  # fmt: skip
    assert torch.isnan(loss)
    grad_q, grad_neg = torch.autograd.grad(loss, [q, neg])
    assert torch.isnan(grad_q).any() and torch.isnan(grad_neg).any()


@pytest.mark.parametrize("case", ["info_nce_margin", "info_nce_moco", "supcon_all_queue", "supcon_one_queue", "nt_xent"])
def test_learnable_temperature(case):
    """``dL/du`` from the anchor gradient (one way) or from both roles plus the extra rows' gradient (the anchors
    are the contrast rows: one kernel forms both roles' sum), through ``u = exp(p)``."""

    def loss(x, neg, p, backend):
        device = x.device
        if case == "info_nce_margin":
            return FF.info_nce_loss(x[:, 0], x[:, 1], negatives=neg, symmetric=False, logit_scale=p.exp(),
                                    false_negative_margin=0.2, backend=backend)  # fmt: skip
        if case == "info_nce_moco":
            return FF.info_nce_loss(x[:, 0], x[:, 1], negatives=neg, symmetric=False, temperature=1 / p.exp(),
                                    in_batch_negatives=False, backend=backend)  # fmt: skip
        if case == "nt_xent":
            return FF.nt_xent_loss(x[:, 0], x[:, 1], negatives=neg, temperature=1 / p.exp(), backend=backend)
        labels = torch.arange(x.shape[0], device=device) % 3
        return FF.supcon_loss(x, labels, temperature=1 / p.exp(), base_temperature=0.2, negatives=neg,
                              negative_labels=torch.arange(neg.shape[0], device=device) % 4,
                              contrast_mode="all" if case == "supcon_all_queue" else "one", backend=backend)  # fmt: skip

    def run(backend, queue_grad):
        dtype = F64 if backend == "reference" else torch.float32
        device = "cpu" if backend == "reference" else DEVICE
        x = _rand(10, 2, 16, seed=29).to(device, dtype).requires_grad_()
        neg = _rand(17, 16, seed=30).to(device, dtype).requires_grad_(queue_grad)
        p = torch.tensor(1.6, device=device, dtype=dtype, requires_grad=True)
        value = loss(x, neg, p, backend)
        wanted = [x, p] + ([neg] if queue_grad else [])
        return value.double().cpu(), [g.double().cpu() for g in torch.autograd.grad(value * 1.3, wanted)]

    for queue_grad in (False, True):
        value, grads = run("triton", queue_grad)
        ref, ref_grads = run("reference", queue_grad)
        assert abs(value.item() - ref.item()) <= 2e-5 * max(1.0, abs(ref.item()))
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max().item() <= 1e-4 * max(r.abs().max().item(), 1e-3)
        assert ref_grads[1].abs().item() > 1e-3


def test_the_kernels_take_the_extra_columns(monkeypatch):
    """``backend='triton'`` launches the kernels with the second column range, never the chunked pass."""

    def refuse(*args, **kwargs):
        raise AssertionError("the chunked extra-column pass ran")

    monkeypatch.setattr(fastcl.ops.chunked.negatives, "negatives_forward", refuse)
    monkeypatch.setattr(fastcl.ops.custom_ops, "negatives_forward", refuse)
    seen = []
    real_launch = launch._launch

    def spy(name, grid_of, leading, args, scalars, constexprs):
        seen.append((name, dict(args.keywords.get(name, {}))))
        return real_launch(name, grid_of, leading, args, scalars, constexprs)

    monkeypatch.setattr(launch, "_launch", spy)
    q, k, neg = (_rand(n, 16, seed=31 + n).to(DEVICE).requires_grad_() for n in (9, 10, 11))
    loss = FF.info_nce_loss(q, k, negatives=neg, symmetric=False, false_negative_margin=0.3, backend="triton")
    loss.backward()
    names = [name for name, _ in seen]
    assert names == ["fwd", "bwd_anchor", "bwd_contrast", "bwd_contrast"]  # dA, dC, dQ
    assert seen[0][1]["HAS_EXTRA"] and seen[0][1]["HAS_MARGIN"] and not seen[0][1]["EXTRA_LABELS"]
    assert seen[1][1]["HAS_EXTRA"] and all(keywords["HAS_MARGIN"] for _, keywords in seen[2:])


def test_errors_name_the_argument():
    from fastcl.ops.dispatch import contrastive_loss

    q, k = _rand(6, 16, seed=40).to(DEVICE), _rand(6, 16, seed=41).to(DEVICE)
    ids = torch.arange(6, device=DEVICE)
    common = dict(self_offset=None, temperature=0.1, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="negatives"):
        contrastive_loss(q, k, ids, ids, None, negatives=_rand(5, 16, seed=42).to(DEVICE, torch.float16), **common)
    with pytest.raises(ValueError, match="two_way"):
        contrastive_loss(q, k, ids, ids, None, negatives=q, two_way=True, **common)
    with pytest.raises(ValueError, match="negative_labels"):
        contrastive_loss(q, k, ids, ids, None, negatives=q, negative_labels=ids[:2], **common)
    with pytest.raises(ValueError, match="self_offset"):
        contrastive_loss(q, q, ids, ids, None, in_batch=False, **dict(common, self_offset=0))


def test_opcheck_the_custom_op():
    a, c, q = (_rand(6, 16, seed=s).to(DEVICE) for s in (50, 51, 52))
    ids = torch.arange(6, device=DEVICE)
    u = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    op = torch.ops.fastcl.contrastive_triton_extra
    a, c, q = a.requires_grad_(), c.requires_grad_(), q.requires_grad_()
    torch.library.opcheck(op, (a, c, q, ids, ids, None, None, 0.0, u, 1.0, True, 0.1, "one_way", "tf32x3"))
    torch.library.opcheck(op, (a, c, q.detach(), ids, ids, None, None, 2.0, None, 1.0, False, None, "one_way",
                               "tf32x3"))  # fmt: skip
    labels = torch.tensor([0, 1, 0, 2, 1, 2], device=DEVICE)
    torch.library.opcheck(op, (None, c, q[:5], labels, labels, labels[:5], 0, 2.0, None, 0.5, True, None,
                               "anchors_are_contrast", "tf32x3"))  # fmt: skip


def test_fullgraph_compile_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(q, k, neg):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, false_negative_margin=0.1, backend="triton")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    inputs = [_rand(n, 16, seed=60 + n).to(DEVICE).requires_grad_() for n in (9, 9, 11)]
    eager, graph = fn(*inputs), compiled(*inputs)
    assert torch.allclose(graph, eager, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(eager, inputs), torch.autograd.grad(graph, inputs)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)
    assert counter.frame_count == 1


def test_autotuned_launches_key_on_the_extra_column_flags(monkeypatch):
    """The autotuner wrapper (timed on the host) launches the extra-column forms and tunes them apart from the
    batch-only launches of the same sizes."""
    import triton

    configs = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    ]
    monkeypatch.setattr(launch, "tuning_configs", lambda: configs)
    monkeypatch.setattr(launch, "AUTOTUNE_DO_BENCH", host_timer)
    monkeypatch.setattr(launch, "_tuned", {})

    def loss(q, k, neg, backend):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, false_negative_margin=0.2, temperature=0.2,
                                backend=backend)  # fmt: skip

    inputs = (_rand(19, 16, seed=70), _rand(19, 16, seed=71), _rand(23, 16, seed=72))
    _assert_matches(loss, inputs, dtype=torch.float16)
    assert set(launch._tuned) == {"fwd", "bwd_anchor", "bwd_contrast"}
    q, k = (x.to(DEVICE, torch.float16) for x in inputs[:2])
    FF.info_nce_loss(q, k, symmetric=False, backend="triton")  # the batch alone: its own tuning entry
    assert len(launch._tuned["fwd"].cache) == 2


@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("dim", [16, 64, 100, 128, 256, 512, 1024])
@pytest.mark.parametrize("kernel", ["fwd", "bwd_anchor", "bwd_anchor[two_way]", "bwd_contrast"])
def test_extra_column_forms_launch_their_own_configs(kernel, dim, element_size):
    """The extra-column forms launch their variant's configs less those that spilled there (fp32: their own
    lists where the variant's spilled), every one within the filter on both archs, the fixed one among them."""
    from fastcl.kernels import tiling

    configs = tiling.launchable_configs(kernel, dim, element_size, extra=True)
    fixed = tiling.config_key(tiling.fixed_config(kernel, dim, element_size, extra=True))
    keys = [tiling.config_key(c) for c in configs]
    assert configs and fixed in keys
    for config in configs:
        for limit in tiling.SHARED_MEMORY_LIMITS.values():
            assert tiling.keep_config(config, dim, element_size, kernel, shared_limit=limit, extra=True)
    single = tiling.block_d_for(dim, element_size)[1]
    if element_size == 4:
        allowed = [tiling.config_key(c) for c in tiling._fp32_configs(kernel, dim, extra=True)]
        assert set(keys) <= set(allowed) and fixed == allowed[0]
        if (kernel, single) in tiling.FP32_EXTRA_COLUMN_CONFIGS:
            spilled = {tiling.config_key(c) for c in tiling._fp32_configs(kernel, dim)} - set(allowed)
            assert spilled and not spilled & set(keys)
    else:
        assert not set(keys) & tiling.EXTRA_COLUMN_SPILLS.get((kernel, single), frozenset())


def test_fixed_configs_of_the_extra_column_forms(monkeypatch):
    """With autotuning off, the launches with the second column range or the margin take their forms' fixed
    configs; the extra rows' own gradient without a margin is the plain contrast-gradient kernel."""
    from fastcl.kernels import tiling

    monkeypatch.setenv("FASTCL_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(launch, "tuning_configs", lambda: tiling.CONFIGS)
    chosen = []
    kernel_and_config = launch._kernel_and_config

    def spy(variant, dim, element_size, extra=False):
        kernel, config = kernel_and_config(variant, dim, element_size, extra)
        chosen.append((variant, extra, tiling.config_key(config)))
        return kernel, config

    monkeypatch.setattr(launch, "_kernel_and_config", spy)

    def loss(q, k, neg, backend):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, backend=backend)

    _assert_matches(loss, (_rand(9, 16, seed=80), _rand(9, 16, seed=81), _rand(11, 16, seed=82)))
    expected = [(variant, extra, tiling.config_key(tiling.fixed_config(variant, 16, 4, extra=extra)))
                for variant, extra in (("fwd", True), ("bwd_anchor", True), ("bwd_contrast", False),
                                       ("bwd_contrast", False))]  # fmt: skip
    assert chosen == expected
    assert chosen[1][2] != tiling.config_key(tiling.fixed_config("bwd_anchor", 16, 4))  # its own list
