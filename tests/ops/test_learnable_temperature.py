"""A tensor (learnable) temperature: loss and gradients (features and temperature) against float64 references, on
every chunked route (single block, blockwise, half-matrix, two-way, paired), with ``normalize`` folded or not."""

import pytest
import torch

import fastcl
from fastcl import functional as FF
from float64_reference import info_nce_float64, supcon_float64

TOL = dict(rtol=1e-10, atol=1e-12)
# N = 9: the single-block routes; N = 300 (x2 views = 600 rows): the blockwise, half-matrix and two-way routes
SIZES = [9, 300]


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_()


def _log_scale():
    """CLIP's parametrisation: temperature = 1 / exp(p)."""
    return torch.tensor(2.1, dtype=torch.float64).requires_grad_()


def _grads(loss, *leaves):
    return torch.autograd.grad(loss * 1.7, leaves)  # grad_output != 1


def _close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)


def _supcon_reference(features, labels, mask, temperature, mode, base, normalize):
    if normalize:
        features = torch.nn.functional.normalize(features, dim=-1)
    if features.shape[0] <= 16:
        return supcon_float64(features, labels, mask, temperature, mode, base)
    return FF.supcon_loss(
        features, labels, mask, temperature=temperature, contrast_mode=mode, base_temperature=base, backend="reference"
    )


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("positives", ["labels", "simclr", "mask"])
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("normalize", [False, True])
def test_supcon_tensor_temperature(n, positives, mode, normalize):
    features = _leaf(n, 2, 5).mul(0.6).detach().requires_grad_()
    labels = torch.randint(0, 4, (n,)) if positives == "labels" else None
    mask = torch.rand(n, n, dtype=torch.float64).round() if positives == "mask" else None
    p = _log_scale()
    got = FF.supcon_loss(
        features, labels, mask, temperature=1 / p.exp(), contrast_mode=mode, base_temperature=0.1,
        normalize=normalize, backend="chunked",
    )
    want = _supcon_reference(features, labels, mask, 1 / p.exp(), mode, 0.1, normalize)
    torch.testing.assert_close(got, want, **TOL)
    _close(_grads(got, features, p), _grads(want, features, p))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("normalize", [False, True])
def test_nt_xent_tensor_temperature(n, normalize):
    z_a, z_b, t = _leaf(n, 4), _leaf(n, 4), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    got = FF.nt_xent_loss(z_a, z_b, temperature=t, normalize=normalize, backend="chunked")
    want = FF.nt_xent_loss(z_a, z_b, temperature=t, normalize=normalize, backend="reference")
    torch.testing.assert_close(got, want, **TOL)
    _close(_grads(got, z_a, z_b, t), _grads(want, z_a, z_b, t))
    if n <= 16:
        features = torch.stack([z_a, z_b], 1)
        if normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        torch.testing.assert_close(got, supcon_float64(features, temperature=t, base_temperature=t), **TOL)


@pytest.mark.parametrize("n", SIZES + [600])
@pytest.mark.parametrize("kind", ["symmetric", "one_way", "labels", "rectangular"])
@pytest.mark.parametrize("normalize", [False, True])
def test_info_nce_logit_scale(n, kind, normalize):
    n_key = n + 3 if kind in ("rectangular", "labels") else n
    query, key = _leaf(n, 7), _leaf(n_key, 7)
    labels = torch.randint(0, n_key, (n,)) if kind == "labels" else None
    symmetric = kind == "symmetric"
    p = _log_scale()
    got = FF.info_nce_loss(
        query, key, labels, logit_scale=p.exp(), symmetric=symmetric, normalize=normalize, backend="chunked"
    )
    q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (query, key)) if normalize else (query, key)
    if n <= 16:
        want = info_nce_float64(q, k, labels, 1 / p.exp(), symmetric)
    else:
        want = FF.info_nce_loss(q, k, labels, temperature=1 / p.exp(), symmetric=symmetric, normalize=False,
                                backend="reference")
    torch.testing.assert_close(got, want, **TOL)
    _close(_grads(got, query, key, p), _grads(want, query, key, p))


def test_temperature_only_leaf_and_frozen_features():
    """The temperature is the only leaf that wants a gradient (frozen towers): the op still forms it."""
    query, key = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    for n in (40, 600):
        q, k = torch.randn(n, 6, dtype=torch.float64), torch.randn(n, 6, dtype=torch.float64)
        got = torch.autograd.grad(FF.info_nce_loss(q, k, temperature=t, backend="chunked"), t)[0]
        want = torch.autograd.grad(FF.info_nce_loss(q, k, temperature=t, backend="reference"), t)[0]
        torch.testing.assert_close(got, want, **TOL)
    del query, key


def test_tensor_without_grad_equals_float():
    features, labels = torch.randn(20, 2, 8), torch.randint(0, 3, (20,))
    for backend in ("chunked", "reference"):
        as_float = FF.supcon_loss(features, labels, temperature=0.2, backend=backend)
        as_tensor = FF.supcon_loss(features, labels, temperature=torch.tensor(0.2), backend=backend)
        torch.testing.assert_close(as_tensor, as_float, rtol=1e-6, atol=0)


def test_fp32_features_float64_temperature():
    """The loss stays in the features' compute dtype; the temperature's gradient in its own."""
    query, key = torch.randn(30, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    p = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    loss = FF.info_nce_loss(query, key, logit_scale=p.exp(), backend="chunked")
    assert loss.dtype == torch.float32
    (grad_p,) = torch.autograd.grad(loss, p)
    assert grad_p.dtype == torch.float64
    want = FF.info_nce_loss(query.double(), key.double(), logit_scale=p.exp(), backend="reference")
    torch.testing.assert_close(grad_p, torch.autograd.grad(want, p)[0], rtol=1e-4, atol=1e-6)


def test_supcon_base_temperature_gradient():
    """scale = t / base_t also depends on t: d/dt of (t / b) * L0(1 / t), by finite differences in float64."""
    features, labels = torch.randn(12, 2, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(FF.supcon_loss(features, labels, temperature=t, base_temperature=0.07,
                                                 backend="chunked"), t)
    eps = 1e-6
    plus, minus = (FF.supcon_loss(features, labels, temperature=0.4 + s, base_temperature=0.07, backend="chunked")
                   for s in (eps, -eps))
    torch.testing.assert_close(grad, (plus - minus) / (2 * eps), rtol=1e-7, atol=1e-9)
    assert abs(float(grad)) > 1e-3


def test_modules_take_a_parameter_and_a_per_call_temperature():
    log_t = torch.nn.Parameter(torch.tensor(-1.5, dtype=torch.float64))
    criterion = fastcl.SupConLoss(temperature=torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64)))
    assert [name for name, _ in criterion.named_parameters()] == ["temperature"]
    features, labels = torch.randn(10, 2, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    criterion(features, labels).backward()
    assert criterion.temperature.grad is not None and criterion.temperature.grad != 0
    loss = criterion(features, labels, temperature=log_t.exp())
    torch.testing.assert_close(loss, FF.supcon_loss(features, labels, temperature=log_t.exp()), **TOL)
    loss.backward()
    assert log_t.grad != 0
    info = fastcl.InfoNCELoss()
    q, k = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(info(q, k, logit_scale=torch.tensor(4.0, dtype=torch.float64)),
                               info(q, k, temperature=0.25), **TOL)
    torch.testing.assert_close(fastcl.NTXentLoss()(q, k, temperature=torch.tensor(0.25, dtype=torch.float64)),
                               fastcl.NTXentLoss(0.25)(q, k), **TOL)
    assert "requires_grad=True" in repr(criterion)


@pytest.mark.parametrize(
    "value, error, words",
    [
        (torch.tensor([0.1, 0.2]), ValueError, "0-dim"),
        (torch.tensor(1), TypeError, "floating-point"),
        (torch.tensor(0.0), ValueError, "positive and finite"),
        (torch.tensor(-0.1), ValueError, "positive and finite"),
        (torch.tensor(float("inf")), ValueError, "positive and finite"),
        (torch.tensor(float("nan")), ValueError, "positive and finite"),
    ],
)
def test_bad_temperature_tensors(value, error, words):
    q = torch.randn(4, 3)
    with pytest.raises(error, match=words) as info:
        FF.info_nce_loss(q, q, temperature=value)
    assert "temperature" in str(info.value)
    with pytest.raises(error, match="logit_scale"):
        FF.info_nce_loss(q, q, logit_scale=value)
    with pytest.raises(error, match="temperature"):
        fastcl.SupConLoss(temperature=value)


def test_temperature_and_logit_scale_together_is_an_error():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="not both"):
        FF.info_nce_loss(q, q, temperature=0.1, logit_scale=10.0)
    with pytest.raises(ValueError, match="not both"):
        fastcl.InfoNCELoss()(q, q, temperature=0.1, logit_scale=10.0)


def test_invalid_value_on_the_op_is_nan():
    """Where a tensor's value is not checked (an accelerator, or compiling), the op gives NaN, not a wrong number."""
    from fastcl.ops.dispatch import contrastive_loss

    q = torch.randn(5, 3)
    ids = torch.arange(5)
    for bad in (-0.5, 0.0, float("inf")):
        loss = contrastive_loss(q, q.clone(), ids, ids, None, self_offset=None, temperature=torch.tensor(bad),
                                scale=1.0, backend="chunked")
        assert torch.isnan(loss)
    from fastcl.functional import _nan_unless_positive  # the reference backend's form of the same rule

    assert torch.isnan(_nan_unless_positive(torch.tensor(-1.0))) and _nan_unless_positive(torch.tensor(0.5)) == 0.5


@pytest.mark.parametrize("n", [20, 600])
def test_torch_func_grad_through_a_learnable_scale(n):
    """Under torch.func transforms the chunked op takes its setup_context form: the scale's gradient is there too."""
    q, k = torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64)
    p = torch.tensor(1.1, dtype=torch.float64)
    got = torch.func.grad(lambda p, q: FF.info_nce_loss(q, k, logit_scale=p.exp(), backend="chunked"), (0, 1))(p, q)
    leaves = (p.clone().requires_grad_(), q.clone().requires_grad_())
    want = torch.autograd.grad(FF.info_nce_loss(leaves[1], k, logit_scale=leaves[0].exp(), backend="reference"), leaves)
    _close(got, want)
