"""The one dispatch point of fastcl.ops directly: rank-local anchors against a larger contrast set (self_offset)."""

import pytest
import torch
from conftest import triton_usable

from fastcl.ops.dispatch import contrastive_loss


def _float64_rows(anchor, contrast, anchor_labels, contrast_labels, self_offset, temperature, scale):
    losses = []
    for i in range(anchor.shape[0]):
        keep = torch.ones(contrast.shape[0], dtype=torch.bool)
        if self_offset is not None:
            keep[i + self_offset] = False
        logits = (contrast[keep] @ anchor[i]) / temperature
        positive = (contrast_labels[keep] == anchor_labels[i]).double()
        log_prob = logits - torch.logsumexp(logits, 0)
        count = positive.sum()
        losses.append(-scale * (positive * log_prob).sum() / (count if count > 0 else 1.0))
    return torch.stack(losses).mean()


BACKENDS = ["chunked"] + (["triton"] if triton_usable() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("self_offset", [None, 0, 7, 20])
def test_local_anchors_against_global_contrast(backend, self_offset):
    n_contrast, n_anchor, dim = 37, 17, 5
    dtype = torch.float64 if backend == "chunked" else torch.float32
    contrast = torch.nn.functional.normalize(torch.randn(n_contrast, dim, dtype=torch.float64), dim=1)
    contrast_labels = torch.randint(0, 4, (n_contrast,))
    start = 0 if self_offset is None else self_offset
    anchor = contrast[start : start + n_anchor].clone()
    anchor_labels = contrast_labels[start : start + n_anchor].clone()

    a = anchor.to(dtype).detach().clone().requires_grad_()
    c = contrast.to(dtype).detach().clone().requires_grad_()
    loss = contrastive_loss(
        a, c, anchor_labels, contrast_labels, None, self_offset=self_offset, temperature=0.3, scale=0.9, backend=backend
    )
    (loss * 1.5).backward()

    ra, rc = anchor.clone().requires_grad_(), contrast.clone().requires_grad_()
    ref = _float64_rows(ra, rc, anchor_labels, contrast_labels, self_offset, 0.3, 0.9)
    (ref * 1.5).backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    for ours, expected in ((a.grad, ra.grad), (c.grad, rc.grad)):
        assert ((ours.double() - expected).norm() / expected.norm()).item() < 5 * tol


# ----------------------------------------------------------------------------------------------------------------
# normalize=True folded into the eager chunked node (no F.normalize autograd graph)
# ----------------------------------------------------------------------------------------------------------------


def _folded_cases():
    """``(name, fastcl call, float64 reference on F.normalize'd inputs, input shapes)`` for every chunked route."""
    from float64_reference import info_nce_float64, supcon_float64

    import fastcl.functional as FF

    F = torch.nn.functional
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 1])
    mask = torch.rand(7, 7, generator=torch.Generator().manual_seed(3))
    index = torch.tensor([3, 0, 8, 3, 5, 1, 7])
    return [
        ("infonce-sym", lambda q, k: FF.info_nce_loss(q, k, temperature=0.3, backend="chunked"),
         lambda q, k: info_nce_float64(F.normalize(q, dim=-1), F.normalize(k, dim=-1), None, 0.3), [(7, 5), (7, 5)]),
        ("infonce-one-way", lambda q, k: FF.info_nce_loss(q, k, temperature=0.3, symmetric=False, backend="chunked"),
         lambda q, k: info_nce_float64(F.normalize(q, dim=-1), F.normalize(k, dim=-1), None, 0.3, symmetric=False),
         [(7, 5), (9, 5)]),
        ("infonce-labels", lambda q, k: FF.info_nce_loss(q, k, index, temperature=0.3, symmetric=False, backend="chunked"),
         lambda q, k: info_nce_float64(F.normalize(q, dim=-1), F.normalize(k, dim=-1), index, 0.3, symmetric=False),
         [(7, 3), (9, 3)]),
        ("ntxent", lambda a, b: FF.nt_xent_loss(a, b, temperature=0.4, backend="chunked"),
         lambda a, b: supcon_float64(F.normalize(torch.stack([a, b], 1), dim=-1), temperature=0.4, base_temperature=0.4),
         [(7, 5), (7, 5)]),
        ("supcon-labels-all", lambda f: FF.supcon_loss(f, labels, temperature=0.2, normalize=True, backend="chunked"),
         lambda f: supcon_float64(F.normalize(f, dim=-1), labels, temperature=0.2), [(7, 3, 4)]),
        ("supcon-labels-one", lambda f: FF.supcon_loss(f, labels, temperature=0.2, contrast_mode="one", normalize=True,
                                                       backend="chunked"),
         lambda f: supcon_float64(F.normalize(f, dim=-1), labels, temperature=0.2, contrast_mode="one"), [(7, 2, 4)]),
        ("supcon-mask", lambda f: FF.supcon_loss(f, mask=mask, temperature=0.2, normalize=True, backend="chunked"),
         lambda f: supcon_float64(F.normalize(f, dim=-1), mask=mask, temperature=0.2), [(7, 2, 4)]),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _folded_cases(), ids=lambda case: case[0])
def test_folded_normalize_matches_float64_reference(case, monkeypatch):
    """normalize=True on the eager chunked backend: raw rows go into the op, which normalises them and applies
    F.normalize's Jacobian to the gradients it forms (F.normalize itself must not run), for every route; one input
    row is zero and one has a norm below eps (the clamped-norm branch: gradient g / eps, no radial part)."""
    _, fused, reference, shapes = case
    gen = torch.Generator().manual_seed(11)
    raw = [(3.0 * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_() for shape in shapes]
    with torch.no_grad():  # a zero row, and a row of norm 5e-13 < eps (y = x / eps is not a unit vector there)
        rows = raw[-1].view(-1, raw[-1].shape[-1])
        rows[1] = 0.0
        rows[2] *= 5e-13 / rows[2].norm()
    expected = reference(*raw)
    expected_grads = torch.autograd.grad(expected, raw)

    def no_normalize(*args, **kwargs):
        raise AssertionError("F.normalize ran: the fold was not taken")

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "normalize", no_normalize)
        loss = fused(*raw)
        grads = torch.autograd.grad(loss, raw)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert grads[-1].abs().max() > 1e10  # the zero row's gradient is g / 1e-12: the clamped branch was exercised


def test_folded_normalize_float32_nan_and_torch_func():
    """fp32 rows: the fold agrees with F.normalize + the dense reference; NaN in one row gives a NaN loss and NaN
    gradients; under torch.func.grad (the setup_context node) the same gradient as eagerly."""
    import fastcl.functional as FF

    gen = torch.Generator().manual_seed(12)
    query = (2.0 * torch.randn(24, 16, generator=gen)).requires_grad_()
    key = (2.0 * torch.randn(24, 16, generator=gen)).requires_grad_()
    loss = FF.info_nce_loss(query, key, temperature=0.1, backend="chunked")
    ref = FF.info_nce_loss(query, key, temperature=0.1, backend="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    got, want = torch.autograd.grad(loss, (query, key)), torch.autograd.grad(ref, (query, key))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)

    func_grad = torch.func.grad(lambda q: FF.info_nce_loss(q, key.detach(), temperature=0.1, backend="chunked"))(
        query.detach()
    )
    torch.testing.assert_close(func_grad, got[0], rtol=1e-6, atol=1e-8)

    poisoned = query.detach().clone()
    poisoned[3, 2] = float("nan")
    poisoned.requires_grad_()
    nan_loss = FF.info_nce_loss(poisoned, key, temperature=0.1, backend="chunked")
    assert torch.isnan(nan_loss)
    assert torch.isnan(torch.autograd.grad(nan_loss, poisoned)[0]).any()


def test_half_inputs_normalise_as_before():
    """bf16 rows are not folded: F.normalize in bf16 first, exactly the numbers of normalizing by hand."""
    import fastcl.functional as FF

    gen = torch.Generator().manual_seed(13)
    query = torch.randn(10, 8, generator=gen).bfloat16().requires_grad_()
    key = torch.randn(10, 8, generator=gen).bfloat16().requires_grad_()
    loss = FF.info_nce_loss(query, key, temperature=0.2, backend="chunked")
    manual = FF.info_nce_loss(torch.nn.functional.normalize(query, dim=-1), torch.nn.functional.normalize(key, dim=-1),
                              temperature=0.2, normalize=False, backend="chunked")  # fmt: skip
    assert torch.equal(loss, manual)
    assert torch.equal(torch.autograd.grad(loss, query)[0], torch.autograd.grad(manual, query)[0])


def test_index_range_is_cached_eagerly():
    from fastcl.ops.problem import index_range

    first = index_range(5, torch.device("cpu"))
    assert first is index_range(5, torch.device("cpu"))
    assert torch.equal(first, torch.arange(5)) and first.dtype == torch.int64


def test_training_after_inference_mode_evaluation():
    """An evaluation under torch.inference_mode first (the cached default-pairing ids are created there), training
    afterwards: the ids must be normal tensors, which autograd can save (the one-way route's cross-entropy target)."""
    import fastcl.functional as FF
    import fastcl.ops.problem

    fastcl.ops.problem._cached_index_range.cache_clear()  # (else an earlier test may have created the ids)
    gen = torch.Generator().manual_seed(14)
    query, key = torch.randn(11, 4, generator=gen), torch.randn(11, 4, generator=gen)
    with torch.inference_mode():
        evaluated = FF.info_nce_loss(query, key, symmetric=False, normalize=False, backend="chunked")
    query.requires_grad_()
    loss = FF.info_nce_loss(query, key, symmetric=False, normalize=False, backend="chunked")
    loss.backward()
    torch.testing.assert_close(loss.detach(), evaluated)
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_chunked_second_derivative_raises():
    """The eager chunked node stores first derivatives: create_graph=True (the way to a second derivative, e.g. a
    gradient penalty through an encoder) is a clear error, never a Hessian silently missing the loss's own term."""
    import fastcl.functional as FF

    encoder = torch.nn.Linear(5, 5).double()
    features = encoder(torch.randn(6, 2, 5, dtype=torch.float64))
    loss = FF.supcon_loss(features, torch.tensor([0, 1, 0, 2, 1, 0]), normalize=True, backend="chunked")
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, encoder.weight, create_graph=True)
    loss = FF.supcon_loss(features, torch.tensor([0, 1, 0, 2, 1, 0]), normalize=True, backend="chunked")
    torch.autograd.grad(loss, encoder.weight)  # first derivatives as usual


@pytest.mark.parametrize(
    "case", ["supcon_all", "supcon_one", "nt_xent", "info_nce", "info_nce_one_way", "queue", "learnable"]
)
def test_autocast_region_computes_in_float32(case):
    """Inside torch.autocast (bf16 products on CPU, as a mixed-precision training loop runs its loss) the chunked
    backend computes in fp32: loss and gradients at fp32 accuracy against float64, an fp32 loss, on every route
    (the extra-column pass too)."""
    import fastcl.functional as FF

    gen = torch.Generator().manual_seed(15)
    feats = torch.nn.functional.normalize(torch.randn(9, 2, 16, generator=gen), dim=-1)
    labels = torch.randint(0, 3, (9,), generator=gen)
    query, key, queue = (torch.randn(n, 16, generator=gen) for n in (9, 9, 20))
    calls = {
        "supcon_all": ([feats], lambda f, be: FF.supcon_loss(f, labels, backend=be)),
        "supcon_one": ([feats], lambda f, be: FF.supcon_loss(f, labels, contrast_mode="one", backend=be)),
        "nt_xent": ([query, key], lambda q, k, be: FF.nt_xent_loss(q, k, backend=be)),
        "info_nce": ([query, key], lambda q, k, be: FF.info_nce_loss(q, k, backend=be)),
        "info_nce_one_way": ([query, key], lambda q, k, be: FF.info_nce_loss(q, k, symmetric=False, backend=be)),
        "queue": (
            [query, key],
            lambda q, k, be: FF.info_nce_loss(q, k, negatives=queue.to(q.dtype), symmetric=False, backend=be),
        ),
        "learnable": (
            [query, key, torch.tensor(2.0)],
            lambda q, k, p, be: FF.info_nce_loss(q, k, logit_scale=p.exp(), backend=be),
        ),
    }
    inputs, call = calls[case]
    leaves = [x.clone().requires_grad_() for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = call(*leaves, "chunked")
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [x.double().requires_grad_() for x in inputs]
    ref = call(*ref_leaves, "reference")
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_torch_func_then_eager_calls_share_no_transform_tensor():
    """A first call under torch.func.grad (the default-pairing ids made inside the transform) and eager calls after
    it: the ids cached for eager calls are never the transform's (which cannot outlive it), so the eager loss and
    the transform's gradient match the reference."""
    import fastcl.functional as FF
    import fastcl.ops.problem

    fastcl.ops.problem._cached_index_range.cache_clear()
    gen = torch.Generator().manual_seed(16)
    query, key = torch.randn(13, 5, generator=gen), torch.randn(13, 5, generator=gen)
    func_grad = torch.func.grad(lambda q: FF.info_nce_loss(q, key, backend="chunked"))(query)
    eager = FF.info_nce_loss(query, key, backend="chunked")
    q = query.clone().requires_grad_()
    ref = FF.info_nce_loss(q, key, backend="reference")
    ref.backward()
    torch.testing.assert_close(eager, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(func_grad, q.grad, rtol=1e-4, atol=1e-6)
    again = torch.func.grad(lambda q: FF.info_nce_loss(q, key, backend="chunked"))(query)
    torch.testing.assert_close(again, func_grad)


def test_nested_torch_func_transforms_raise_on_chunked():
    """A second derivative by nested torch.func transforms (grad of grad in a learnable logit scale, jacrev of grad
    in the features) raises on the chunked backend, as create_graph=True does, instead of treating the stored
    first derivatives as constants; the first derivatives under the same transforms are the reference's."""
    import fastcl.functional as FF

    gen = torch.Generator().manual_seed(17)
    query = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    key = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    log_scale = torch.tensor(1.0, dtype=torch.float64)

    def in_scale(p, backend):
        return FF.info_nce_loss(query, key, logit_scale=p.exp(), backend=backend)

    def in_query(q, backend):
        return FF.info_nce_loss(q, key, temperature=0.5, backend=backend)

    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.func.grad(torch.func.grad(lambda p: in_scale(p, "chunked")))(log_scale)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.func.jacrev(torch.func.grad(lambda q: in_query(q, "chunked")))(query)
    torch.testing.assert_close(
        torch.func.grad(lambda p: in_scale(p, "chunked"))(log_scale),
        torch.func.grad(lambda p: in_scale(p, "reference"))(log_scale),
    )
    torch.testing.assert_close(
        torch.func.grad(lambda q: in_query(q, "chunked"))(query),
        torch.func.grad(lambda q: in_query(q, "reference"))(query),
    )


def test_torch_func_takes_the_chunked_backend():
    """Under torch.func transforms 'auto' resolves to 'chunked' (the Triton backend runs as custom ops, which the
    transforms cannot differentiate) and an explicit 'triton' is a ValueError naming the backend and the way out;
    outside them nothing changes."""
    import fastcl.functional as FF
    from fastcl.ops.dispatch import resolve_backend

    gen = torch.Generator().manual_seed(18)
    query, key = torch.randn(7, 16, generator=gen), torch.randn(7, 16, generator=gen)
    seen = []

    def loss(q, backend):
        seen.append(resolve_backend(backend, q))
        return FF.info_nce_loss(q, key, backend=backend)

    grad = torch.func.grad(lambda q: loss(q, "auto"))(query)
    assert seen == ["chunked"]
    torch.testing.assert_close(grad, torch.func.grad(lambda q: loss(q, "reference"))(query), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="backend='triton'.*torch.func.*backend='chunked'"):
        torch.func.grad(lambda q: FF.info_nce_loss(q, key, backend="triton"))(query)
    assert resolve_backend("triton", query) == "triton"
