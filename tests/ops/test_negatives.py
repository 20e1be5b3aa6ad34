"""Contrast columns beyond the batch (``negatives=``, ``negative_labels=``, ``in_batch_negatives=``) and the
false-negative margin: the chunked extra-column pass against the dense float64 reference and against the peers'
formulas (MoCo v2, sentence-transformers MNRL, lightly's memory bank, PML ``CrossBatchMemory``), with gradients
for queries, keys and hard negatives; the cost of a detached queue; the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastcl
from fastcl import functional as FF

F64 = torch.float64
TOL = 1e-12


def _rand(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(grad)


def _assert_close(actual, expected, tol=TOL):
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= tol * max(1.0, expected.abs().max().item()), f"max error {err}"


def _loss_and_grads(fn, inputs):
    loss = fn()
    grads = torch.autograd.grad(loss, inputs)
    return loss, grads


def _compare(fn_a, fn_b, inputs, tol=TOL):
    loss_a, grads_a = _loss_and_grads(fn_a, inputs)
    loss_b, grads_b = _loss_and_grads(fn_b, inputs)
    _assert_close(loss_a, loss_b, tol)
    for a, b in zip(grads_a, grads_b):
        _assert_close(a, b, tol)
    return loss_a


# ---------------------------------------------------------------------------------------------------------------
# the fused pass against the dense reference backend
# ---------------------------------------------------------------------------------------------------------------

INFO_NCE_MODES = [
    dict(),
    dict(in_batch_negatives=False),
    dict(false_negative_margin=0.1),
    dict(false_negative_margin=0.0, in_batch_negatives=False),
]


@pytest.mark.parametrize("mode", INFO_NCE_MODES)
@pytest.mark.parametrize("sizes", [(37, 41, 53, 5), (3, 3, 1, 3), (70, 70, 130, 7)])
def test_info_nce_matches_reference(mode, sizes, monkeypatch):
    monkeypatch.setattr(fastcl.ops.chunked.negatives, "_block_rows", lambda n, m, d: 16)  # several blocks
    n_query, n_key, n_neg, dim = sizes
    q, k, neg = _rand(n_query, dim, seed=1), _rand(n_key, dim, seed=2), _rand(n_neg, dim, seed=3)
    labels = torch.randperm(n_key, generator=torch.Generator().manual_seed(4))[:n_query]

    def loss(backend):
        return lambda: FF.info_nce_loss(q, k, labels, negatives=neg, symmetric=False, temperature=0.3,
                                        backend=backend, **mode)  # fmt: skip

    value = _compare(loss("chunked"), loss("reference"), (q, k, neg))
    assert value.item() > 0


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("labelled", [True, False])
def test_supcon_matches_reference(contrast_mode, labelled, monkeypatch):
    monkeypatch.setattr(fastcl.ops.chunked.negatives, "_block_rows", lambda n, m, d: 16)
    features, queue = _rand(23, 2, 3, seed=5), _rand(45, 3, seed=6)
    labels = torch.randint(0, 4, (23,), generator=torch.Generator().manual_seed(7))
    queue_labels = torch.randint(0, 6, (45,), generator=torch.Generator().manual_seed(8)) if labelled else None

    def loss(backend):
        return lambda: FF.supcon_loss(features, labels, temperature=0.2, base_temperature=0.1, normalize=True,
                                      contrast_mode=contrast_mode, negatives=queue, negative_labels=queue_labels,
                                      backend=backend)  # fmt: skip

    _compare(loss("chunked"), loss("reference"), (features, queue))


def test_supcon_negatives_reference_is_supcon_when_queue_is_the_batch():
    """The extra-column reference against SupContrast's: a labelled queue holding the batch's second view is
    SupCon over both views with the view-0 rows as anchors (``contrast_mode='one'``)."""
    x, y = _rand(9, 4, seed=9), _rand(9, 4, seed=10)
    labels = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(11))
    with_queue = FF.supcon_loss(x[:, None], labels, negatives=y, negative_labels=labels, temperature=0.5,
                                base_temperature=0.5, backend="reference")  # fmt: skip
    two_view = FF.supcon_loss(torch.stack([x, y], 1), labels, temperature=0.5, base_temperature=0.5,
                              contrast_mode="one", backend="reference")  # fmt: skip
    _assert_close(with_queue, two_view)


def test_float_labels_compare_by_value_across_batch_and_queue():
    features, queue = _rand(8, 1, 3, seed=12), _rand(6, 3, seed=13)
    labels = torch.tensor([0.5, 1.5, 0.5, 2.5, 1.5, 0.5, 2.5, 9.0], dtype=F64)
    queue_labels = torch.tensor([1.5, 9.0, 0.5, 7.0, 2.5, 2.5], dtype=F64)
    as_float = FF.supcon_loss(features, labels, negatives=queue, negative_labels=queue_labels, backend="chunked")
    as_int = FF.supcon_loss(features, (labels * 2).long(), negatives=queue,
                            negative_labels=(queue_labels * 2).long(), backend="chunked")  # fmt: skip
    _assert_close(as_float, as_int)


def test_empty_queue_is_the_plain_loss():
    features = _rand(10, 2, 5, seed=14)
    labels = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(15))
    queue = fastcl.MemoryQueue(32, 5, dtype=F64)
    plain = FF.supcon_loss(features, labels, backend="chunked")
    with_empty = FF.supcon_loss(features, labels, negatives=queue.negatives, negative_labels=queue.labels)
    _assert_close(with_empty, plain)


def test_learnable_temperature_gradient_matches_reference():
    q, k, neg = _rand(11, 4, seed=16), _rand(11, 4, seed=17), _rand(13, 4, seed=18)
    t_a = torch.tensor(0.3, dtype=F64, requires_grad=True)
    t_b = torch.tensor(0.3, dtype=F64, requires_grad=True)
    a = FF.info_nce_loss(q, k, negatives=neg, symmetric=False, temperature=t_a, false_negative_margin=0.2)
    b = FF.info_nce_loss(q, k, negatives=neg, symmetric=False, temperature=t_b, false_negative_margin=0.2,
                         backend="reference")  # fmt: skip
    (ga,), (gb,) = torch.autograd.grad(a, [t_a]), torch.autograd.grad(b, [t_b])
    _assert_close(ga, gb)
    assert ga.abs().item() > 1e-3


def test_grad_output_scales_and_nan_propagates():
    q, k, neg = _rand(6, 3, seed=19), _rand(6, 3, seed=20), _rand(5, 3, seed=21)
    loss = FF.info_nce_loss(q, k, negatives=neg, symmetric=False)
    (g1,) = torch.autograd.grad(loss, [neg], retain_graph=True)
    (g3,) = torch.autograd.grad(loss * 3.0, [neg])
    _assert_close(g3, 3 * g1)
    bad = neg.detach().clone()
    bad[2, 1] = float("nan")
    assert torch.isnan(FF.info_nce_loss(q, k, negatives=bad, symmetric=False, normalize=False))


# ---------------------------------------------------------------------------------------------------------------
# the peers' formulas
# ---------------------------------------------------------------------------------------------------------------


def test_moco_v2_logits_and_cross_entropy():
    """MoCo v2: ``logits = cat([l_pos, q @ queue.T]) / t``, cross-entropy to class 0, keys and queue detached."""
    q, k = _rand(17, 8, seed=22), _rand(17, 8, seed=23, grad=False)
    queue = F.normalize(_rand(40, 8, seed=24, grad=False), dim=1)
    t = 0.2

    def moco():
        qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
        l_pos = torch.einsum("nc,nc->n", qn, kn)[:, None]
        logits = torch.cat([l_pos, qn @ queue.T], 1) / t
        return F.cross_entropy(logits, torch.zeros(17, dtype=torch.long))

    def ours():
        return FF.info_nce_loss(q, k, negatives=queue, in_batch_negatives=False, symmetric=False, temperature=t)

    _compare(ours, moco, (q,))


def test_lightly_memory_bank_formula_with_memory_queue():
    """lightly's ``NTXentLoss(memory_bank_size=...)``: out0 against ``[out1_i, bank]`` (normalised), cross-entropy to
    0; the bank holds earlier ``out1`` rows (reimplemented from lightly 1.6's ``ntx_ent_loss.py``: importing lightly
    needs torchvision). The rows come from :class:`fastcl.MemoryQueue` straight in."""
    queue = fastcl.MemoryQueue(24, 6, dtype=F64, labels=False)
    for step in range(3):
        out0, out1 = _rand(10, 6, seed=30 + step), _rand(10, 6, seed=40 + step)
        bank = queue.negatives.detach().clone()

        def lightly(out0=out0, out1=out1, bank=bank):
            sim_pos = torch.einsum("nc,nc->n", F.normalize(out0, dim=1), F.normalize(out1, dim=1))[:, None]
            sim_neg = F.normalize(out0, dim=1) @ bank.T
            logits = torch.cat([sim_pos, sim_neg], 1) / 0.5
            return F.cross_entropy(logits, torch.zeros(10, dtype=torch.long))

        def ours(out0=out0, out1=out1):
            return FF.info_nce_loss(out0, out1, negatives=queue.negatives, in_batch_negatives=False,
                                    symmetric=False, temperature=0.5)  # fmt: skip

        _compare(ours, lightly, (out0, out1))
        queue.enqueue(F.normalize(out1, dim=1).detach())


def test_mnrl_with_hard_negatives_gradients():
    """sentence-transformers' MultipleNegativesRankingLoss with hard negatives: ``scores = cos(q, [docs; hard]) *
    scale``, cross-entropy to ``arange(B)``; the hard negatives come from the document tower and get their
    gradient."""
    q, docs, hard = _rand(12, 5, seed=50), _rand(12, 5, seed=51), _rand(24, 5, seed=52)
    scale = 20.0

    def mnrl():
        scores = F.normalize(q, dim=1) @ F.normalize(torch.cat([docs, hard]), dim=1).T * scale
        return F.cross_entropy(scores, torch.arange(12))

    def ours():
        return FF.info_nce_loss(q, docs, negatives=hard, symmetric=False, logit_scale=scale)

    _compare(ours, mnrl, (q, docs, hard))
    assert torch.autograd.grad(ours(), [hard])[0].abs().max().item() > 1e-4


def test_margin_against_dense_masked_reference():
    """Qwen3-Embedding's false-negative mask, written out densely: column j leaves row i when ``cos_ij > cos_ii +
    m`` (positive kept), in-batch keys and hard negatives alike."""
    q, k, hard = _rand(15, 4, seed=53), _rand(15, 4, seed=54), _rand(9, 4, seed=55)
    m, t = 0.1, 0.05

    def dense():
        sim = F.normalize(q, dim=1) @ F.normalize(torch.cat([k, hard]), dim=1).T
        positive = sim.diagonal()[:, None]
        drop = (sim > positive + m).detach()
        drop[torch.arange(15), torch.arange(15)] = False
        logits = (sim / t).masked_fill(drop, float("-inf"))
        return F.cross_entropy(logits, torch.arange(15))

    def ours():
        return FF.info_nce_loss(q, k, negatives=hard, symmetric=False, temperature=t, false_negative_margin=m)

    loss = _compare(ours, dense, (q, k, hard))
    plain = FF.info_nce_loss(q, k, negatives=hard, symmetric=False, temperature=t)
    assert loss.item() < plain.item() - 1e-3  # the mask dropped something


pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning is not installed")


def test_pml_cross_batch_memory_supcon():
    """PML ``CrossBatchMemory(SupConLoss)``: the batch against the memory that already holds it (self pairs
    removed) = the batch against itself plus the earlier memory entries with their labels."""
    torch.manual_seed(0)
    memory = pml_losses.CrossBatchMemory(pml_losses.SupConLoss(temperature=0.1), 6, memory_size=40)
    for step in range(3):
        emb = _rand(12, 6, seed=60 + step)
        labels = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(70 + step))
        filled = memory.queue_idx if not memory.has_been_filled else memory.memory_size
        bank, bank_labels = memory.embedding_memory[:filled].clone(), memory.label_memory[:filled].clone()
        expected = memory(emb, labels)
        ours = FF.supcon_loss(emb[:, None], labels, negatives=bank.to(F64), negative_labels=bank_labels,
                              temperature=0.1, base_temperature=0.1, normalize=True)  # fmt: skip
        _assert_close(ours, expected.to(F64), 1e-10)


def test_pml_cross_batch_memory_ntxent():
    """PML ``CrossBatchMemory(NTXentLoss)`` with pair labels (each sample its own id, fresh ids each step): every
    anchor's one positive is its other view, the memory plain negatives = :func:`fastcl.functional.nt_xent_loss`
    with ``negatives``."""
    memory = pml_losses.CrossBatchMemory(pml_losses.NTXentLoss(temperature=0.3), 5, memory_size=50)
    for step in range(3):
        z_a, z_b = _rand(8, 5, seed=80 + step), _rand(8, 5, seed=90 + step)
        filled = memory.queue_idx if not memory.has_been_filled else memory.memory_size
        bank = memory.embedding_memory[:filled].clone()
        ids = torch.arange(8) + 8 * step
        expected = memory(torch.cat([z_a, z_b]), torch.cat([ids, ids]))
        ours = FF.nt_xent_loss(z_a, z_b, negatives=bank.to(F64), temperature=0.3)
        _assert_close(ours, expected.to(F64), 1e-10)


# ---------------------------------------------------------------------------------------------------------------
# cost: a detached queue forms no gradient product for its columns
# ---------------------------------------------------------------------------------------------------------------


class _CountProducts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            self.shapes.append((tuple(args[-2].shape), tuple(args[-1].shape)))
        return func(*args, **(kwargs or {}))


def _products(neg_requires_grad):
    q, k = _rand(40, 8, seed=100), _rand(40, 8, seed=101)
    neg = _rand(300, 8, seed=102, grad=neg_requires_grad)
    with _CountProducts() as counter:
        loss = FF.info_nce_loss(q, k, negatives=neg, symmetric=False, normalize=False)
        loss.backward()
    return counter.shapes


def test_detached_queue_costs_no_gradient_product():
    detached, trained = _products(False), _products(True)
    # the queue's gradient product is dQ += dS_q.T @ A_r: [300, 40] @ [40, 8] (one block of rows)
    gradient_product = ((300, 40), (40, 8))
    assert len(trained) == len(detached) + 1
    assert gradient_product in trained and gradient_product not in detached


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    q, k = _rand(4, 3, grad=False), _rand(4, 3, grad=False)
    features = _rand(4, 2, 3, grad=False)
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="negatives must have shape"):
        FF.info_nce_loss(q, k, negatives=torch.randn(5, dtype=F64), symmetric=False)
    with pytest.raises(ValueError, match="feature dim"):
        FF.info_nce_loss(q, k, negatives=torch.randn(5, 4, dtype=F64), symmetric=False)
    with pytest.raises(TypeError, match="negatives must have the same dtype"):
        FF.supcon_loss(features, labels, negatives=torch.randn(5, 3))
    with pytest.raises(ValueError, match="negative_labels were given without negatives"):
        FF.supcon_loss(features, labels, negative_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"negative_labels must have shape \[5\]"):
        FF.supcon_loss(features, labels, negatives=torch.randn(5, 3, dtype=F64), negative_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="negative_labels need labels"):
        FF.supcon_loss(features, negatives=torch.randn(5, 3, dtype=F64), negative_labels=torch.arange(5))
    with pytest.raises(ValueError, match="several positives per anchor"):
        FF.supcon_loss(features, labels, false_negative_margin=0.1)
    with pytest.raises(ValueError, match="symmetric=False"):
        FF.info_nce_loss(q, k, negatives=torch.randn(5, 3, dtype=F64))
    with pytest.raises(ValueError, match="negatives with a mask"):
        FF.supcon_loss(features, mask=torch.eye(4), negatives=torch.randn(5, 3, dtype=F64))
    with pytest.raises(TypeError, match="false_negative_margin must be a real number"):
        FF.info_nce_loss(q, k, symmetric=False, false_negative_margin="0.1")


def test_modules_take_negatives():
    q, k, neg = _rand(7, 4, seed=110), _rand(7, 4, seed=111), _rand(9, 4, seed=112)
    module = fastcl.InfoNCELoss(0.2, symmetric=False, in_batch_negatives=False, false_negative_margin=0.3)
    expected = FF.info_nce_loss(q, k, negatives=neg, symmetric=False, temperature=0.2, in_batch_negatives=False,
                                false_negative_margin=0.3, backend="reference")  # fmt: skip
    _assert_close(module(q, k, negatives=neg), expected)
    features, labels = _rand(6, 2, 4, seed=113), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = FF.supcon_loss(features, labels, negatives=neg, negative_labels=torch.arange(9) % 4, backend="reference")
    _assert_close(fastcl.SupConLoss()(features, labels, negatives=neg, negative_labels=torch.arange(9) % 4), expected)
    z_a, z_b = features.unbind(1)
    expected = FF.nt_xent_loss(z_a, z_b, negatives=neg, backend="reference")
    _assert_close(fastcl.NTXentLoss()(z_a, z_b, negatives=neg), expected)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: one custom op, no graph break, the eager numbers
# ---------------------------------------------------------------------------------------------------------------


def _compiled_cases():
    def mnrl(q, k, neg, labels, log_scale):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, logit_scale=log_scale.exp(), backend="chunked")

    def moco_margin(q, k, neg, labels, log_scale):
        return FF.info_nce_loss(q, k, negatives=neg.detach(), symmetric=False, in_batch_negatives=False,
                                false_negative_margin=0.1, temperature=0.2, backend="chunked")  # fmt: skip

    def supcon_queue(q, k, neg, labels, log_scale):
        features = torch.stack([q, k], 1)
        return FF.supcon_loss(features, labels, negatives=neg, negative_labels=labels.flip(0)[:1].repeat(neg.shape[0]),
                              temperature=0.1, backend="chunked")  # fmt: skip

    return {"mnrl": mnrl, "moco_margin": moco_margin, "supcon_queue": supcon_queue}


@pytest.mark.parametrize("name", sorted(_compiled_cases()))
def test_fullgraph_compile_matches_eager(name):
    from torch._dynamo.testing import CompileCounterWithBackend

    fn = _compiled_cases()[name]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for n in (9, 13):
        q, k, neg = _rand(n, 5, seed=120 + n), _rand(n, 5, seed=130 + n), _rand(11, 5, seed=140 + n)
        labels = torch.arange(n) % 3
        log_scale = torch.tensor(2.0, dtype=F64, requires_grad=True)
        inputs = (q, k, neg, log_scale)
        for_eager, for_graph = fn(q, k, neg, labels, log_scale), compiled(q, k, neg, labels, log_scale)
        eager = torch.autograd.grad(for_eager, inputs, allow_unused=True, materialize_grads=True)
        graph = torch.autograd.grad(for_graph, inputs, allow_unused=True, materialize_grads=True)
        for a, b in zip((for_eager,) + eager, (for_graph,) + graph):
            _assert_close(b, a)
    assert counter.frame_count <= 2  # (a first static graph, then the dynamic one)


def test_opcheck_extra_columns():
    a, c, q = _rand(6, 4, seed=150), _rand(6, 4, seed=151), _rand(5, 4, seed=152)
    ids = torch.arange(6)
    u = torch.tensor(3.0, dtype=F64, requires_grad=True)
    op = torch.ops.fastcl.contrastive_extra_columns
    torch.library.opcheck(op, (a, c, q, ids, ids, None, None, u, 1.0, True, 0.1, True, True))
    torch.library.opcheck(op, (a, c, q, ids, ids, None, None, u, 1.0, False, None, True, False))
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    torch.library.opcheck(op, (None, c, q, labels, labels, labels[:5], 0, u, 0.5, True, None, True, True))
    c, q = c.detach(), q.detach()
    torch.library.opcheck(op, (None, c, q, labels, labels, labels[:5], 0, u.detach(), 0.5, True, None, False, False))


@pytest.mark.triton
def test_triton_backend_runs_the_extra_columns_in_its_kernels(monkeypatch):
    """``backend='triton'`` takes the extra columns as its kernels' second column range (never the chunked pass;
    tests/kernels/test_triton_negatives.py covers it in full) and, as for the batch alone, float32 / float16 /
    bfloat16 rows only."""
    from conftest import DEVICE

    def refuse(*args, **kwargs):
        raise AssertionError("the chunked extra-column pass ran")

    monkeypatch.setattr(fastcl.ops.dispatch, "negatives_loss", refuse)
    monkeypatch.setattr(fastcl.ops.custom_ops, "negatives_forward", refuse)
    q, k, neg = _rand(9, 4, seed=160), _rand(9, 4, seed=161), _rand(6, 4, seed=162)
    expected = FF.info_nce_loss(q, k, negatives=neg, symmetric=False, backend="reference")
    on_device = [x.detach().to(DEVICE, torch.float32) for x in (q, k, neg)]
    loss = FF.info_nce_loss(*on_device[:2], negatives=on_device[2], symmetric=False, backend="triton")
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    with pytest.raises(TypeError, match="float64"):
        FF.info_nce_loss(q, k, negatives=neg, symmetric=False, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_against_float64(dtype):
    q, k, neg = _rand(33, 16, seed=170), _rand(33, 16, seed=171), _rand(50, 16, seed=172)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, neg)]
    loss = FF.info_nce_loss(*low[:2], negatives=low[2], symmetric=False, temperature=0.1)
    grads = torch.autograd.grad(loss, low)
    exact = [t.detach().to(dtype).to(F64).requires_grad_() for t in (q, k, neg)]
    ref = FF.info_nce_loss(*exact[:2], negatives=exact[2], symmetric=False, temperature=0.1, backend="reference")
    ref_grads = torch.autograd.grad(ref, exact)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert (g.to(F64) - r).abs().max().item() <= tol * r.abs().max().item()


def test_a_row_without_columns_has_loss_zero_and_finite_gradients():
    features = _rand(1, 1, 3, seed=180)
    empty = torch.zeros(0, 3, dtype=F64)
    loss = FF.supcon_loss(
        features, torch.tensor([2]), negatives=empty, negative_labels=torch.zeros(0, dtype=torch.long)
    )
    (grad,) = torch.autograd.grad(loss, [features])
    assert loss.item() == 0.0 and torch.isfinite(grad).all()
    one = _rand(1, 3, seed=181)
    loss = FF.supcon_loss(features, torch.tensor([2]), negatives=one, negative_labels=torch.tensor([2]))
    expected = FF.supcon_loss(features, torch.tensor([2]), negatives=one, negative_labels=torch.tensor([2]),
                              backend="reference")  # fmt: skip
    _assert_close(loss, expected)
    assert abs(loss.item()) < 1e-14  # its one column is its positive: log softmax = 0 (to rounding)


def test_supcon_learnable_temperature_gradient_matches_reference():
    features, queue = _rand(10, 2, 4, seed=190), _rand(12, 4, seed=191)
    labels, queue_labels = torch.arange(10) % 3, torch.arange(12) % 4
    grads = []
    for backend in ("chunked", "reference"):
        t = torch.tensor(0.2, dtype=F64, requires_grad=True)
        loss = FF.supcon_loss(features, labels, temperature=t, base_temperature=0.1, negatives=queue,
                              negative_labels=queue_labels, backend=backend)  # fmt: skip
        grads.append(torch.autograd.grad(loss, [t, features, queue]))
    for a, b in zip(*grads):
        _assert_close(a, b)
    assert grads[0][0].abs().item() > 1e-3


def test_torch_func_grad_through_negatives():
    q, k, neg = _rand(8, 4, seed=200, grad=False), _rand(8, 4, seed=201, grad=False), _rand(5, 4, seed=202, grad=False)

    def loss(q, neg, backend):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, false_negative_margin=0.3, backend=backend)

    ours = torch.func.grad(loss, argnums=(0, 1))(q, neg, "chunked")
    expected = torch.func.grad(loss, argnums=(0, 1))(q, neg, "reference")
    for a, b in zip(ours, expected):
        _assert_close(a, b)


def test_nested_torch_func_transforms_are_refused():
    """A second derivative by nested transforms (grad of grad in a learnable logit scale, jacrev of grad in the
    queries) raises on the extra-column pass, as create_graph=True does, instead of treating the stored first
    derivatives as constants (the reference's second derivative in the scale is 1.88)."""
    q, k, neg = _rand(6, 5, seed=213, grad=False), _rand(6, 5, seed=214, grad=False), _rand(10, 5, seed=215, grad=False)

    def in_scale(p, backend):
        return FF.info_nce_loss(q, k, negatives=neg, symmetric=False, logit_scale=p.exp(), backend=backend)

    def in_query(x, backend):
        return FF.info_nce_loss(x, k, negatives=neg, symmetric=False, temperature=0.5, backend=backend)

    log_scale = torch.tensor(1.0, dtype=F64)
    assert torch.func.grad(torch.func.grad(lambda p: in_scale(p, "reference")))(log_scale).abs() > 0.1
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.func.grad(torch.func.grad(lambda p: in_scale(p, "chunked")))(log_scale)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.func.jacrev(torch.func.grad(lambda x: in_query(x, "chunked")))(q)
    _assert_close(torch.func.grad(lambda p: in_scale(p, "chunked"))(log_scale),
                  torch.func.grad(lambda p: in_scale(p, "reference"))(log_scale))  # fmt: skip


def test_create_graph_is_refused():
    q, k, neg = _rand(6, 3, seed=210), _rand(6, 3, seed=211), _rand(4, 3, seed=212)
    loss = FF.info_nce_loss(q, k, negatives=neg, symmetric=False)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, [q], create_graph=True)
