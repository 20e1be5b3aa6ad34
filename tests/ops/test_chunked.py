"""The chunked backend's routes (two-way, half-matrix, row blocks, single block) against independent dense float64
formulas."""

import pytest
import torch

import fastcl.ops.chunked.passes as chunked_passes
from fastcl.ops.chunked.passes import chunked_forward
from fastcl.ops.problem import Problem


def _forward(
    anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, two_way, want_grad
):
    """:func:`chunked_forward` on the problem these describe (``anchor`` None: the anchors are the contrast rows)."""
    settings = (mask, self_offset, inv_temperature, scale, two_way)
    return chunked_forward(Problem(anchor, contrast, anchor_labels, contrast_labels, *settings), want_grad)


def _dense_two_way(anchor, contrast, anchor_labels, contrast_labels, self_offset, inv_temperature, scale):
    """Mean of both directions' SupCon-style losses from the full ``[Na, Nc]`` logits (float64, autograd)."""
    logits = anchor @ contrast.T * inv_temperature
    positive = (anchor_labels[:, None] == contrast_labels[None, :]).to(logits.dtype)
    if self_offset is not None:
        excluded = torch.zeros_like(positive, dtype=torch.bool)
        idx = torch.arange(anchor.shape[0])
        excluded[idx, idx + self_offset] = True
        logits = logits.masked_fill(excluded, float("-inf"))
        positive = positive.masked_fill(excluded, 0.0)

    def one_way(s, w):
        log_prob = s - torch.logsumexp(s, dim=1, keepdim=True)
        count = w.sum(1)
        pos = torch.where(w > 0, log_prob, torch.zeros_like(log_prob)).sum(1)
        return (-scale * pos / count.clamp_min(1.0)).mean()

    return 0.5 * (one_way(logits, positive) + one_way(logits.T, positive.T))


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize(
    "n_anchor,n_contrast,self_offset,n_classes",
    [(13, 13, None, None), (11, 19, None, None), (17, 17, 0, 5), (9, 23, None, 4), (21, 21, None, 3)],
)
def test_two_way_matches_dense_float64(monkeypatch, blocks, n_anchor, n_contrast, self_offset, n_classes):
    if blocks == "many":
        monkeypatch.setattr(chunked_passes, "_BLOCK_BYTES", 1)
        monkeypatch.setattr(chunked_passes, "_MIN_BLOCK_ROWS", 4)
    gen = torch.Generator().manual_seed(n_anchor * 100 + n_contrast)
    anchor = torch.randn(n_anchor, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    contrast = torch.randn(n_contrast, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    if n_classes is None:  # InfoNCE: query i's positive is key i
        anchor_labels, contrast_labels = torch.arange(n_anchor), torch.arange(n_contrast)
    else:
        anchor_labels = torch.randint(n_classes, (n_anchor,), generator=gen)
        contrast_labels = anchor_labels.clone() if self_offset == 0 else torch.randint(n_classes, (n_contrast,), generator=gen)
    inv_t, scale = 1 / 0.3, 0.7

    loss, grad_anchor, grad_contrast = _forward(
        anchor.detach(), contrast.detach(), anchor_labels, contrast_labels, None, self_offset, inv_t, scale, True, True
    )
    ref = _dense_two_way(anchor, contrast, anchor_labels, contrast_labels, self_offset, inv_t, scale)
    ref_grad_anchor, ref_grad_contrast = torch.autograd.grad(ref, (anchor, contrast))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_anchor, ref_grad_anchor, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_contrast, ref_grad_contrast, rtol=1e-9, atol=1e-12)

    # the blockwise two-pass route directly (chunked_forward takes the dense single-block route when one block fits)
    problem = Problem(anchor.detach(), contrast.detach(), anchor_labels, contrast_labels, None, self_offset, inv_t, scale)
    problem = problem._replace(two_way=True)
    loss2, grad_anchor2, grad_contrast2 = chunked_passes._two_way_pass(problem, True)
    torch.testing.assert_close(loss2, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_anchor2, ref_grad_anchor, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_contrast2, ref_grad_contrast, rtol=1e-9, atol=1e-12)

    loss_only, none_a, none_c = _forward(
        anchor.detach(), contrast.detach(), anchor_labels, contrast_labels, None, self_offset, inv_t, scale, True, False
    )
    assert none_a is None and none_c is None
    torch.testing.assert_close(loss_only, loss, rtol=1e-12, atol=0)


def test_two_way_large_logits_stay_finite():
    """Unnormalized inputs at a low temperature: the online column log-sum-exp must not overflow or underflow."""
    gen = torch.Generator().manual_seed(3)
    anchor = (torch.randn(40, 16, generator=gen, dtype=torch.float64) * 6).requires_grad_()
    contrast = (torch.randn(40, 16, generator=gen, dtype=torch.float64) * 6).requires_grad_()
    labels = torch.arange(40)
    chunked_passes._BLOCK_BYTES, saved = 1, chunked_passes._BLOCK_BYTES
    try:
        loss, grad_anchor, _ = _forward(
            anchor.detach(), contrast.detach(), labels, labels, None, None, 1 / 0.05, 1.0, True, True
        )
    finally:
        chunked_passes._BLOCK_BYTES = saved
    ref = _dense_two_way(anchor, contrast, labels, labels, None, 1 / 0.05, 1.0)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_anchor, torch.autograd.grad(ref, anchor)[0], rtol=1e-9, atol=1e-12)


def test_two_way_nan_propagates():
    anchor = torch.randn(6, 4, dtype=torch.float64)
    anchor[2, 1] = float("nan")
    labels = torch.arange(6)
    loss, grad_anchor, grad_contrast = _forward(
        anchor, torch.randn(6, 4, dtype=torch.float64), labels, labels, None, None, 2.0, 1.0, True, True
    )
    assert torch.isnan(loss) and torch.isnan(grad_anchor).any() and torch.isnan(grad_contrast).any()


def _dense_one_way(anchor, contrast, weights, self_offset, inv_temperature, scale):
    """SupCon-style loss of the anchors over the contrast rows with ``[Na, Nc]`` positive weights (float64)."""
    logits = anchor @ contrast.T * inv_temperature
    if self_offset is not None:
        idx = torch.arange(anchor.shape[0])
        excluded = torch.zeros_like(logits, dtype=torch.bool)
        excluded[idx, idx + self_offset] = True
        logits = logits.masked_fill(excluded, float("-inf"))
        weights = weights.masked_fill(excluded, 0.0)
    log_prob = torch.log_softmax(logits, dim=1)
    pos = torch.where(weights > 0, weights * log_prob, torch.zeros_like(log_prob)).sum(1)
    count = weights.sum(1)
    return (-scale * pos / torch.where(count < 1e-6, torch.ones_like(count), count)).mean()


@pytest.mark.parametrize("shift_free", [True, False])
@pytest.mark.parametrize("route", ["labels", "mask", "two_way", "paired", "paired_two_way"])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_routes_match_dense_float64(monkeypatch, shift_free, route, blocks):
    """Every route (single block, blockwise, identity pairing) with and without the shift-free exponentials."""
    monkeypatch.setattr(chunked_passes, "_SHIFT_FREE_BOUND", {d: (1e9 if shift_free else -1.0) for d in (torch.float32, torch.float64)})
    if blocks == "many":
        monkeypatch.setattr(chunked_passes, "_BLOCK_BYTES", 1)
        monkeypatch.setattr(chunked_passes, "_MIN_BLOCK_ROWS", 4)
        monkeypatch.setattr(chunked_passes, "_SINGLE_BLOCK_PAIRS", 0)
    gen = torch.Generator().manual_seed(11)
    n, bsz = 19, 19 if route.startswith("paired") else 10
    contrast = torch.randn(2 * bsz, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    inv_t, scale = 1 / 0.4, 0.9
    mask = labels = None
    if route in ("labels", "mask"):
        sample_labels = torch.randint(3, (bsz,), generator=gen)
        anchor, self_offset, two_way = contrast, 0, False
        labels = sample_labels.repeat(2)
        weights = (labels[:, None] == labels[None, :]).to(torch.float64)
        if route == "mask":
            mask = torch.rand(bsz, bsz, generator=gen, dtype=torch.float64).float()
            weights = mask.double().repeat(2, 2)
            labels = None
    else:
        anchor = torch.randn(n if route.startswith("paired") else 13, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        contrast = contrast[: anchor.shape[0] if route != "paired" else n + 4].detach().requires_grad_()
        self_offset, two_way = None, route != "paired"
        labels_a = torch.arange(anchor.shape[0]) if route.startswith("paired") else torch.randint(4, (anchor.shape[0],), generator=gen)
        labels_c = torch.arange(contrast.shape[0]) if route.startswith("paired") else torch.randint(4, (contrast.shape[0],), generator=gen)
        weights = (labels_a[:, None] == labels_c[None, :]).to(torch.float64)
    if route in ("labels", "mask"):
        ref = _dense_one_way(anchor, contrast, weights, self_offset, inv_t, scale)
        grad_ref = torch.autograd.grad(ref, contrast)[0]
        loss, ga, gc = _forward(anchor.detach(), contrast.detach(), labels, labels, mask, 0, inv_t, scale, False, True)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ga + gc, grad_ref, rtol=1e-9, atol=1e-12)
        return
    if two_way:
        ref = _dense_two_way(anchor, contrast, labels_a, labels_c, None, inv_t, scale)
    else:
        ref = _dense_one_way(anchor, contrast, weights, None, inv_t, scale)
    ref_a, ref_c = torch.autograd.grad(ref, (anchor, contrast))
    loss, ga, gc = _forward(anchor.detach(), contrast.detach(), labels_a, labels_c, None, None, inv_t, scale, two_way, True)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, ref_a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gc, ref_c, rtol=1e-9, atol=1e-12)


def test_paired_by_index_detects_only_one_positive_per_row():
    ids = torch.arange(6)
    paired = chunked_passes._paired_by_index
    assert paired(ids[:4], ids, None, False) == "diagonal"
    assert paired(torch.arange(6), ids, None, True) == "diagonal"
    assert paired(ids[:4], ids, None, True) is None  # two-way needs Na == Nc
    assert paired(ids + 1, ids + 1, None, True) is None
    labels = torch.tensor([0, 1, 3, 2])
    assert paired(labels, torch.arange(4), None, False) is labels  # one-way: any index in [0, Nc)
    assert paired(labels, torch.arange(4), None, True) is None
    assert paired(torch.tensor([0, 4]), torch.arange(4), None, False) is None  # out of range: no positive
    assert paired(torch.tensor([0, -1]), torch.arange(4), None, False) is None
    assert paired(ids, ids, 0, False) is None  # self pairs excluded: not InfoNCE


def test_single_positive_per_row_route_matches_dense_float64():
    """InfoNCE with explicit labels (one-way): the gather route against the dense formula, repeated indices too."""
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(14, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 0, 13, 3, 7, 7, 1, 12, 5])
    weights = (labels[:, None] == torch.arange(14)[None, :]).to(torch.float64)
    ref = _dense_one_way(query, key, weights, None, 1 / 0.2, 1.0)
    ref_q, ref_k = torch.autograd.grad(ref, (query, key))
    loss, gq, gk = _forward(query.detach(), key.detach(), labels, torch.arange(14), None, None, 5.0, 1.0, False, True)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gq, ref_q, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gk, ref_k, rtol=1e-9, atol=1e-12)


def test_shift_free_bound():
    small = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    assert chunked_passes._shift_free(small * 20, small)  # |s| <= 20
    assert not chunked_passes._shift_free(small * 61, small)
    assert not chunked_passes._shift_free(small * float("nan"), small)
    assert chunked_passes._shift_free(small.double() * 500, small.double())


@pytest.mark.parametrize("use_mask", [False, True])
def test_anchors_are_contrast_gives_the_one_inputs_whole_gradient(use_mask):
    """Anchors that are the contrast rows: (dS + dS^T) X in one product equals dA + dC of the unfolded route."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(14, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(3, (7,), generator=gen).repeat(2)
    mask = torch.rand(7, 7, generator=gen) if use_mask else None
    args = (x, x, None if use_mask else labels, None if use_mask else labels, mask, 0, 1 / 0.3, 0.8, False, True)
    loss, ga, gc = _forward(*args)
    folded_loss, whole, none = _forward(None, *args[1:])
    assert none is None
    torch.testing.assert_close(folded_loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(whole, ga + gc, rtol=1e-10, atol=1e-13)
    x_grad = x.clone().requires_grad_()
    if use_mask:
        ref = _dense_one_way(x_grad, x_grad, mask.double().repeat(2, 2), 0, 1 / 0.3, 0.8)
    else:
        ref = _dense_one_way(x_grad, x_grad, (labels[:, None] == labels[None, :]).double(), 0, 1 / 0.3, 0.8)
    torch.testing.assert_close(whole, torch.autograd.grad(ref, x_grad)[0], rtol=1e-9, atol=1e-12)


def test_eager_function_under_torch_func_grad_and_retained_graph():
    """The eager autograd.Function (no custom-op dispatch) keeps what the op gave: torch.func.grad works, and a
    retained graph's second backward adds the same gradient again (the stored gradients are never scaled in place)."""
    import fastcl.functional as FF

    gen = torch.Generator().manual_seed(4)
    features = torch.randn(8, 2, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,), generator=gen)
    grad = torch.func.grad(lambda f: FF.supcon_loss(f, labels, backend="chunked"))(features)
    leaf = features.clone().requires_grad_()
    expected = torch.autograd.grad(FF.supcon_loss(leaf, labels, backend="reference"), leaf)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)

    query = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = FF.info_nce_loss(query, key, backend="chunked")
    (2.0 * loss).backward(retain_graph=True)
    first = query.grad.clone()
    loss.backward()
    torch.testing.assert_close(query.grad, 1.5 * first, rtol=1e-12, atol=0)


@pytest.mark.parametrize("labels", [None, [4, 0, 9, 4, 2, 8, 1]])
def test_one_way_infonce_cross_entropy_route_matches_dense_float64(labels):
    """The eager op's one-way InfoNCE route (one positive per anchor, one block: autograd cross-entropy), more keys
    than queries, against the independent dense formula."""
    import fastcl.functional as FF

    gen = torch.Generator().manual_seed(8)
    query = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(10, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.arange(7) if labels is None else torch.tensor(labels)
    loss = FF.info_nce_loss(query, key, None if labels is None else index, temperature=0.3, symmetric=False,
                            normalize=False, backend="chunked")  # fmt: skip
    weights = (index[:, None] == torch.arange(10)[None, :]).to(torch.float64)
    ref = _dense_one_way(query, key, weights, None, 1 / 0.3, 1.0)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(loss, (query, key))
    expected = torch.autograd.grad(ref, (query, key))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,block_rows", [(37, 4), (38, 9), (40, 40), (23, 64)])
@pytest.mark.parametrize("positives", ["labels", "sample_ids", "mask"])
def test_half_matrix_route_matches_dense_float64(monkeypatch, n, block_rows, positives):
    """SupCon 'all' / SimCLR with one input: half the similarity panels (rows [p0, p1) x columns [p0, N)), row sums
    completed by symmetry, the gradient (G + G^T) x / t; panels of 4 / 9 rows (last one partial), one panel, and a
    block larger than N; positives from labels, from sample ids (SimCLR) and from a mask. The row-block pass must not
    run."""
    monkeypatch.setattr(chunked_passes, "_SINGLE_BLOCK_PAIRS", 0)
    monkeypatch.setattr(chunked_passes, "_BLOCK_BYTES", 4 * n * block_rows)
    monkeypatch.setattr(chunked_passes, "_MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(chunked_passes, "_fused_pass", None)  # calling it would raise TypeError
    gen = torch.Generator().manual_seed(n + block_rows)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(4, (n,), generator=gen) if positives == "labels" else torch.arange(n) % (n // 2)
    mask = None
    if positives == "mask":  # [B, B] weights read at [i % B, j % B], B not dividing N when n is odd
        labels, mask = None, torch.rand(n // 2, n // 2, generator=gen, dtype=torch.float64)
    inv_t, scale = 1 / 0.35, 0.8
    xd = x.detach()  # (anchor None: the anchors are the contrast rows)
    loss, grad, none = _forward(None, xd, labels, labels, mask, 0, inv_t, scale, False, True)
    assert none is None
    if mask is None:
        weights = (labels[:, None] == labels[None, :]).double()
    else:
        weights = mask[torch.arange(n)[:, None] % (n // 2), torch.arange(n)[None, :] % (n // 2)]
    ref = _dense_one_way(x, x, weights, 0, inv_t, scale)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, x)[0], rtol=1e-9, atol=1e-12)
    forward_only = _forward(None, xd, labels, labels, mask, 0, inv_t, scale, False, False)
    torch.testing.assert_close(forward_only[0], loss, rtol=1e-12, atol=0)
    assert forward_only[1] is None and forward_only[2] is None


def test_half_matrix_route_falls_back_when_logits_are_unbounded(monkeypatch):
    """Logits that may leave the shift-free range take the row-block pass (max-shifted exponentials), same numbers;
    NaN in gives NaN out."""
    monkeypatch.setattr(chunked_passes, "_SINGLE_BLOCK_PAIRS", 0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64) * 30.0  # |s| up to ~1e4 at t = 0.3
    labels = torch.randint(3, (30,), generator=gen)
    assert chunked_passes._half_matrix_pass(Problem(None, x, labels, labels, None, 0, 1 / 0.3, 1.0), True) is None
    x_grad = x.clone().requires_grad_()
    ref = _dense_one_way(x_grad, x_grad, (labels[:, None] == labels[None, :]).double(), 0, 1 / 0.3, 1.0)
    loss, grad, _ = _forward(None, x, labels, labels, None, 0, 1 / 0.3, 1.0, False, True)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, x_grad)[0], rtol=1e-9, atol=1e-12)
    poisoned = x.clone() / 30.0
    poisoned[5, 1] = float("nan")
    loss, grad, _ = _forward(None, poisoned, labels, labels, None, 0, 1 / 0.3, 1.0, False, True)
    assert torch.isnan(loss) and torch.isnan(grad).any()


def test_half_matrix_route_float32_supcon(monkeypatch):
    """The route through fastcl.functional in fp32 (normalised features, t = 0.07) against the float64 reference."""
    import fastcl.functional as FF

    monkeypatch.setattr(chunked_passes, "_SINGLE_BLOCK_PAIRS", 0)
    monkeypatch.setattr(chunked_passes, "_BLOCK_BYTES", 4 * 64 * 10)
    monkeypatch.setattr(chunked_passes, "_MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(chunked_passes, "_fused_pass", None)  # the half-matrix route must take it
    gen = torch.Generator().manual_seed(9)
    features = torch.nn.functional.normalize(torch.randn(32, 2, 16, generator=gen), dim=-1).requires_grad_()
    labels = torch.randint(5, (32,), generator=gen)
    loss = FF.supcon_loss(features, labels, temperature=0.07, backend="chunked")
    leaf = features.detach().double().requires_grad_()
    ref = FF.supcon_loss(leaf, labels, temperature=0.07, backend="reference")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    grad, ref_grad = torch.autograd.grad(loss, features)[0], torch.autograd.grad(ref, leaf)[0]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("self_offset", [None, 0, 5])
def test_mask_positives_row_blocks_match_dense_float64(monkeypatch, self_offset):
    """Anchors that are a slice of the contrast rows (SupCon 'one', a rank's rows) with a mask: the positives from
    the mask's products (no weight blocks) over many row blocks, against the dense weights."""
    monkeypatch.setattr(chunked_passes, "_SINGLE_BLOCK_PAIRS", 0)
    monkeypatch.setattr(chunked_passes, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(chunked_passes, "_MIN_BLOCK_ROWS", 3)
    gen = torch.Generator().manual_seed(21)
    contrast = torch.randn(27, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    start = 0 if self_offset is None else self_offset
    anchor = (contrast.detach()[start : start + 13] + (0.1 if self_offset is None else 0.0)).requires_grad_()
    mask = torch.rand(9, 9, generator=gen, dtype=torch.float64)
    mask[2] = 0.0  # anchors of sample 2 have no positive
    rows, cols = torch.arange(13)[:, None] % 9, torch.arange(27)[None, :] % 9
    ref = _dense_one_way(anchor, contrast, mask[rows, cols], self_offset, 1 / 0.3, 0.6)
    loss, ga, gc = _forward(anchor.detach(), contrast.detach(), None, None, mask, self_offset, 1 / 0.3, 0.6,
                                   False, True)  # fmt: skip
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    ref_a, ref_c = torch.autograd.grad(ref, (anchor, contrast))
    torch.testing.assert_close(ga, ref_a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gc, ref_c, rtol=1e-9, atol=1e-12)


def test_forward_only_takes_the_half_matrix_route(monkeypatch):
    """Evaluation (no gradient) of SupCon 'all' forms half the panels as well, same loss as with gradients."""
    import fastcl.functional as FF

    monkeypatch.setattr(chunked_passes, "_SINGLE_BLOCK_PAIRS", 0)
    monkeypatch.setattr(chunked_passes, "_MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(chunked_passes, "_fused_pass", None)  # calling it would raise TypeError
    gen = torch.Generator().manual_seed(10)
    features = torch.nn.functional.normalize(torch.randn(20, 2, 6, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.randint(4, (20,), generator=gen)
    with torch.no_grad():
        loss = FF.supcon_loss(features, labels, temperature=0.2, backend="chunked")
    reference = FF.supcon_loss(features, labels, temperature=0.2, backend="reference")
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
