"""Chunked and reference backends against the independent float64 formulas: values and gradients."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from float64_reference import info_nce_float64, supcon_float64

import fastcl.ops.chunked.passes as chunked_passes
from fastcl import functional as FF

CPU_BACKENDS = ["chunked", "reference"]


def _features(bsz, n_views, dim, dtype=torch.float64, normalize=True):
    f = torch.randn(bsz, n_views, dim, dtype=dtype)
    return F.normalize(f, dim=-1) if normalize else f


def _value_and_grad(fn, x, grad_output=1.0):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    (loss * grad_output).backward()
    return loss.detach(), x.grad


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several row blocks even at test sizes (blocks of 8 rows)."""
    monkeypatch.setattr(chunked_passes, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(chunked_passes, "_MIN_BLOCK_ROWS", 8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("positives", ["labels", "mask", "simclr"])
@pytest.mark.parametrize("n_views,dim", [(1, 3), (2, 17), (3, 128), (4, 5)])
def test_supcon_matches_float64(backend, contrast_mode, positives, n_views, dim, small_blocks):
    bsz = 13  # N = 13 * n_views: never a multiple of a block
    features = _features(bsz, n_views, dim)
    labels = torch.randint(0, 4, (bsz,))
    mask = (torch.rand(bsz, bsz) < 0.3).double() * torch.rand(bsz, bsz).double() if positives == "mask" else None
    kwargs = dict(labels=labels if positives == "labels" else None, mask=mask)
    temperature, base_temperature = 0.3, 0.11

    def ours(x):
        return FF.supcon_loss(
            x,
            **kwargs,
            temperature=temperature,
            contrast_mode=contrast_mode,
            base_temperature=base_temperature,
            backend=backend,
        )

    def expected(x):
        return supcon_float64(
            x, **kwargs, temperature=temperature, contrast_mode=contrast_mode, base_temperature=base_temperature
        )

    loss, grad = _value_and_grad(ours, features, grad_output=2.5)
    ref_loss, ref_grad = _value_and_grad(expected, features, grad_output=2.5)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temperature,base_temperature", [(0.07, 0.07), (0.5, 0.07), (1.0, 2.0)])
def test_supcon_temperatures(backend, temperature, base_temperature):
    features, labels = _features(21, 2, 9), torch.randint(0, 5, (21,))
    loss = FF.supcon_loss(features, labels, temperature=temperature, base_temperature=base_temperature, backend=backend)
    expected = supcon_float64(features, labels, temperature=temperature, base_temperature=base_temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_supcon_flattens_extra_dims(backend):
    features, labels = torch.randn(6, 2, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 2, 2])
    loss = FF.supcon_loss(features, labels, backend=backend)
    torch.testing.assert_close(loss, supcon_float64(features.reshape(6, 2, 12), labels), rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_normalize_matches_prenormalized_including_gradient(backend):
    raw = torch.randn(11, 2, 7, dtype=torch.float64) * 3
    labels = torch.randint(0, 3, (11,))
    fused, g_fused = _value_and_grad(lambda x: FF.supcon_loss(x, labels, normalize=True, backend=backend), raw)
    manual, g_manual = _value_and_grad(lambda x: supcon_float64(F.normalize(x, dim=-1), labels), raw)
    torch.testing.assert_close(fused, manual, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_fused, g_manual, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_float64(backend, symmetric, small_blocks):
    query, key = torch.randn(19, 6, dtype=torch.float64), torch.randn(19, 6, dtype=torch.float64)
    ours = FF.info_nce_loss(query, key, temperature=0.2, symmetric=symmetric, normalize=False, backend=backend)
    torch.testing.assert_close(
        ours, info_nce_float64(query, key, temperature=0.2, symmetric=symmetric), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_info_nce_labels_and_more_keys_with_gradients(backend, small_blocks):
    query = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    key = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 23, (10,))
    ours = FF.info_nce_loss(query, key, labels, temperature=0.3, symmetric=False, backend=backend)
    ref = info_nce_float64(F.normalize(query, dim=-1), F.normalize(key, dim=-1), labels, 0.3, symmetric=False)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    g_ours = torch.autograd.grad(ours * 0.7, (query, key))
    g_ref = torch.autograd.grad(ref * 0.7, (query, key))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nt_xent_is_supcon_with_two_views(backend):
    z_a, z_b = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    loss = FF.nt_xent_loss(z_a, z_b, temperature=0.5, backend=backend)
    stacked = F.normalize(torch.stack([z_a, z_b], 1), dim=-1)
    torch.testing.assert_close(loss, supcon_float64(stacked, temperature=0.5, base_temperature=0.5), rtol=1e-10, atol=0)


def test_nt_xent_equals_simclr_cross_entropy():
    """NT-Xent as SimCLR states it: cross-entropy over the 2B - 1 others with the other view as target."""
    z_a, z_b = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    z = F.normalize(torch.cat([z_a, z_b]), dim=-1)
    logits = z @ z.T / 0.2
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(8, 16), torch.arange(0, 8)])
    expected = F.cross_entropy(logits, target)
    torch.testing.assert_close(FF.nt_xent_loss(z_a, z_b, temperature=0.2), expected, rtol=1e-10, atol=0)


def test_chunked_gradcheck(small_blocks):
    features = _features(7, 3, 4).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    for mode in ["all", "one"]:
        assert torch.autograd.gradcheck(
            lambda x, mode=mode: FF.supcon_loss(x, labels, temperature=0.5, contrast_mode=mode, backend="chunked"),
            (features,),
        )
    mask = torch.rand(7, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: FF.supcon_loss(x, mask=mask, backend="chunked", normalize=True), (features,)
    )
    query, key = (
        torch.randn(5, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 3, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda q, k: FF.info_nce_loss(q, k, backend="chunked"), (query, key))


def test_chunked_block_size_does_not_change_result(monkeypatch):
    features, labels = _features(50, 2, 16), torch.randint(0, 6, (50,))
    results = []
    for block_bytes in (1, 4 * 100 * 17, 1 << 30):
        monkeypatch.setattr(chunked_passes, "_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(chunked_passes, "_MIN_BLOCK_ROWS", 8)
        results.append(_value_and_grad(lambda x: FF.supcon_loss(x, labels, backend="chunked"), features))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_chunked_low_precision_inputs(dtype, tol):
    features = _features(33, 2, 24, dtype=torch.float32)
    labels = torch.randint(0, 5, (33,))
    x = features.to(dtype).requires_grad_()
    loss = FF.supcon_loss(x, labels, temperature=0.1, backend="chunked")
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    ref, ref_grad = _value_and_grad(lambda f: supcon_float64(f, labels, temperature=0.1), x.detach().double())
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=0)
    rel = (x.grad.double() - ref_grad).norm() / ref_grad.norm()
    assert rel < 5 * tol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
@pytest.mark.parametrize("positives", ["labels", "mask", "simclr"])
def test_supcon_raw_rows_whose_self_pair_dwarfs_every_other_column(backend, dtype, tol, positives):
    """Unnormalised rows (norm ~11) at t = 0.07: each self logit |x|^2 / t ~ 1800 exceeds every other column's by
    far more than exp's range; the self pair is not in the denominator, so the loss and gradient stay finite."""
    features = torch.randn(8, 2, 128, dtype=dtype)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3])
    kwargs = dict(labels=labels if positives == "labels" else None)
    kwargs["mask"] = torch.rand(8, 8, dtype=torch.float64) if positives == "mask" else None
    loss, grad = _value_and_grad(lambda x: FF.supcon_loss(x, **kwargs, backend=backend), features)
    ref_loss, ref_grad = _value_and_grad(lambda x: supcon_float64(x, **kwargs), features.double())
    assert 100.0 < loss.item() < float("inf")  # each positive scores far below its row's best other column
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_float64_mask_weights_enter_the_float64_loss_unrounded(backend, contrast_mode):
    """Float64 features with a float64 mask: weights float32 cannot hold (1 + 2**-30, random reals) are used as
    they are, so loss and gradient match the float64 formula to float64 accuracy."""
    features = _features(6, 2, 5, normalize=False) * 3
    mask = torch.rand(6, 6, dtype=torch.float64)
    mask[:, ::2] = 1 + 2.0**-30
    kwargs = dict(mask=mask, temperature=0.1, contrast_mode=contrast_mode)
    loss, grad = _value_and_grad(lambda x: FF.supcon_loss(x, **kwargs, backend=backend), features)
    ref_loss, ref_grad = _value_and_grad(lambda x: supcon_float64(x, **kwargs), features)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_temperature_tensors_enter_the_fp32_loss_exactly(backend, dtype):
    """A learnable temperature or logit_scale of a half-precision model (0.1 and 100, exact in fp32 once rounded
    to ``dtype``): the fp32 loss and its gradient are those of the same value as an fp32 tensor; no ``t / base_t``
    or ``1 / logit_scale`` rounded to ``dtype`` (up to 2e-3 of the loss in bf16)."""
    features, labels = _features(8, 2, 16, dtype=torch.float32), torch.randint(0, 3, (8,))
    query, key = torch.randn(8, 16), torch.randn(8, 16)
    negatives = dict(negatives=query[:3])
    calls = [
        (lambda t: FF.supcon_loss(features, labels, temperature=t, backend=backend), 0.1),
        (lambda t: FF.supcon_loss(features, labels, temperature=t, base_temperature=t, backend=backend), 0.1),
        (lambda t: FF.supcon_loss(features, labels, temperature=t, **negatives, backend=backend), 0.1),
        (lambda t: FF.nt_xent_loss(query, key, temperature=t, backend=backend), 0.1),
        (lambda t: FF.nt_xent_loss(query, key, temperature=t, **negatives, backend=backend), 0.1),
        (lambda t: FF.info_nce_loss(query, key, temperature=t, backend=backend), 0.1),
        (lambda s: FF.info_nce_loss(query, key, logit_scale=s, backend=backend), 100.0),
        (lambda s: FF.info_nce_loss(query, key, logit_scale=s, symmetric=False, **negatives, backend=backend), 100.0),
    ]
    for call, value in calls:
        half = torch.tensor(value, dtype=dtype, requires_grad=True)
        single = half.detach().float().requires_grad_()
        loss, expected = call(half), call(single)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        (grad,), (expected_grad,) = torch.autograd.grad(loss, half), torch.autograd.grad(expected, single)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, expected_grad.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, pytest.param("triton", marks=pytest.mark.triton)])
def test_losses_called_under_autocast_are_the_losses_without_it(backend):
    """Called inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` (a training step's mixed-precision region):
    the losses compute in their own dtypes, so value, dtype and gradient are those of the same call outside it."""
    features, labels = _features(6, 2, 5, dtype=torch.float32), torch.tensor([0, 1, 0, 2, 1, 0])
    mask, negatives = torch.rand(6, 6), torch.randn(3, 5)
    calls = [
        lambda x: FF.supcon_loss(x, labels, temperature=0.3, backend=backend),
        lambda x: FF.supcon_loss(x, mask=mask, contrast_mode="one", normalize=True, backend=backend),
        lambda x: FF.supcon_loss(x, labels, negatives=negatives, negative_labels=labels[:3], backend=backend),
        lambda x: FF.nt_xent_loss(x[:, 0], x[:, 1], backend=backend),
        lambda x: FF.info_nce_loss(x[:, 0], x[:, 1], backend=backend),
        lambda x: FF.info_nce_loss(x[:, 0], x[:, 1], symmetric=False, negatives=negatives, backend=backend),
        lambda x: FF.supcon_loss(labels=labels, features=x, backend=backend),  # every argument by keyword
        lambda x: FF.nt_xent_loss(z_b=x[:, 1], z_a=x[:, 0], backend=backend),
        lambda x: FF.info_nce_loss(key=x[:, 1], query=x[:, 0], backend=backend),
    ]
    for call in calls:
        expected, expected_grad = _value_and_grad(call, features)
        x = features.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = call(x)
        (grad,) = torch.autograd.grad(loss, x)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_anchor_without_positive_contributes_zero(backend):
    features = _features(5, 1, 4)
    labels = torch.tensor([0, 0, 1, 2, 3])  # samples 2, 3, 4 have no positive (single view)
    loss = FF.supcon_loss(features, labels, backend=backend)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, supcon_float64(features, labels), rtol=1e-10, atol=0)
    # only anchors 0 and 1 contribute, and the mean still counts all 5 anchors
    two = FF.supcon_loss(features[:2], labels[:2], backend=backend)
    assert not torch.isclose(loss, two)


def test_simclr_single_view_is_zero_and_finite():
    features = _features(6, 1, 3)
    for backend in CPU_BACKENDS:
        loss = FF.supcon_loss(features, backend=backend)
        assert loss.item() == 0.0


def test_single_sample_single_view_is_zero_not_nan():
    """One column and self excluded: empty denominator, no positive -> the defined value 0."""
    loss = FF.supcon_loss(torch.randn(1, 1, 4, dtype=torch.float64), backend="chunked")
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", ["anchor", "other"])
def test_nan_in_gives_nan_out(backend, where):
    features = _features(6, 1, 4)  # single view: every anchor has zero positives
    features[0 if where == "anchor" else 5, 0, 2] = float("nan")
    assert torch.isnan(FF.supcon_loss(features, backend=backend))
    features2 = _features(6, 2, 4)
    features2[3, 1, 0] = float("nan")
    assert torch.isnan(FF.supcon_loss(features2, torch.randint(0, 2, (6,)), backend=backend))
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    k[1, 1] = float("nan")
    assert torch.isnan(FF.info_nce_loss(q, k, backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_batch,margin", [(True, None), (True, 0.1), (False, None), (False, 0.1)])
def test_info_nce_query_scoring_minus_inf_against_every_column_gives_nan(backend, in_batch, margin):
    """A query at -inf along a direction where every key and extra row is positive scores -inf against all of them,
    its positive included: its log-softmax is -inf - (-inf), undefined, so the loss is NaN (never +inf)."""
    query = torch.randn(5, 4, dtype=torch.float64)
    query[2] = torch.tensor([float("-inf"), 0.0, 0.0, 0.0])
    key, negatives = torch.randn(5, 4, dtype=torch.float64).abs(), torch.randn(3, 4, dtype=torch.float64).abs()
    columns = dict(negatives=negatives, in_batch_negatives=in_batch, false_negative_margin=margin)
    loss = FF.info_nce_loss(query, key, **columns, symmetric=False, normalize=False, backend=backend)
    assert torch.isnan(loss)


def test_forward_without_grad_matches():
    features, labels = _features(20, 2, 8), torch.randint(0, 3, (20,))
    with torch.no_grad():
        a = FF.supcon_loss(features, labels, backend="chunked")
    b = FF.supcon_loss(features.requires_grad_(), labels, backend="chunked")
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_auto_backend_on_cpu_is_chunked(monkeypatch):
    calls = []
    original = chunked_passes.chunked_forward
    monkeypatch.setattr(chunked_passes, "chunked_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    FF.supcon_loss(_features(4, 2, 3), backend="auto")
    assert calls == [1]


def test_every_mode_combination_agrees_between_backends():
    features, labels = _features(10, 3, 6), torch.randint(0, 3, (10,))
    mask = torch.rand(10, 10, dtype=torch.float64)
    for mode, kw in itertools.product(["all", "one"], [dict(labels=labels), dict(mask=mask), {}]):
        a = FF.supcon_loss(features, contrast_mode=mode, backend="chunked", **kw)
        b = FF.supcon_loss(features, contrast_mode=mode, backend="reference", **kw)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_block_rows_stay_wide_enough_at_large_n():
    """The byte budget alone would give 16-row blocks at N = 65536; GEMMs keep at least 64 rows."""
    cpu = torch.device("cpu")
    assert chunked_passes._block_rows(65536, 65536, cpu) == 64
    threads = torch.get_num_threads()
    try:  # 8 MiB of fp32 logits per intra-op thread (up to 4)
        for count, rows in ((1, 256), (2, 512), (8, 1024)):
            torch.set_num_threads(count)
            assert chunked_passes._block_rows(8192, 8192, cpu) == rows
    finally:
        torch.set_num_threads(threads)
    assert chunked_passes._block_rows(10, 8192, cpu) == 10
