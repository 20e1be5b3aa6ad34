"""The sigmoid loss's Triton kernel (through the interpreter on CPU: fp32, tiny shapes; 16 x 16 tiles, feature
tiles of 16) against the float64 dense reference: loss and every gradient, default pairing with an offset,
labels, rectangular batches, SigLIP+ weights, odd sizes, NaN, forward only, torch.compile's custom op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcl.functional as FF
from fastcl.ops.sigmoid.problem import SigmoidProblem
from fastcl.ops.sigmoid.reference import sigmoid_loss_reference

pytestmark = pytest.mark.triton
TOL = dict(rtol=2e-5, atol=2e-6)


def _leaves(n, m, dim, seed=0, scale=5.0, bias=-2.0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1) * 1.5
    text = F.normalize(torch.randn(m, dim, generator=g), dim=-1)
    return [image, text, torch.tensor(scale), torch.tensor(bias)]


def _run(fn, leaves, grad_output=1.0):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    (loss * grad_output).backward()
    return loss.detach(), [t.grad for t in leaves]


def _compare(fn_ours, fn_ref, leaves, grad_output=1.3):
    loss, grads = _run(fn_ours, leaves, grad_output)
    loss_ref, grads_ref = _run(fn_ref, [t.double() for t in leaves], grad_output)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), loss_ref, **TOL)
    for name, g, r in zip(("image", "text", "scale", "bias"), grads, grads_ref):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), r, **TOL, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("n, dim", [(1, 3), (19, 3), (37, 40)])
def test_default_pairing(n, dim):
    leaves = _leaves(n, n, dim)
    _compare(
        lambda *t: FF.sigmoid_loss(*t, backend="triton"), lambda *t: FF.sigmoid_loss(*t, backend="reference"), leaves
    )


def test_shared_labels_and_rectangular_siglip_plus():
    leaves = _leaves(18, 18, 20, seed=1)
    labels = torch.randint(0, 5, (18,), generator=torch.Generator().manual_seed(2))
    _compare(
        lambda *t: FF.sigmoid_loss(*t, labels, backend="triton"),
        lambda *t: FF.sigmoid_loss(*t, labels, backend="reference"),
        leaves,
    )
    leaves = _leaves(13, 29, 5, seed=3)
    image_labels = torch.randint(0, 6, (13,), generator=torch.Generator().manual_seed(4))
    text_labels = torch.randint(0, 6, (29,), generator=torch.Generator().manual_seed(5))
    for weighting in ("uniform", "siglip_plus", "siglip_plus_asymmetric"):
        kw = dict(text_labels=text_labels, weighting=weighting)
        _compare(
            lambda *t, kw=kw: FF.sigmoid_loss(*t, image_labels, backend="triton", **kw),
            lambda *t, kw=kw: FF.sigmoid_loss(*t, image_labels, backend="reference", **kw),
            leaves,
        )


def test_pair_offset_as_a_gathered_rank_sees_it():
    """Rank r's images against every rank's texts: image i pairs with text offset + i."""
    from fastcl.ops.sigmoid.triton import forward

    image, text, s, b = _leaves(7, 25, 6, seed=6)
    problem = SigmoidProblem(image, text, s, b, None, None, None, None, 4.5, pair_offset=11)
    loss, d_image, d_text, d_scale, d_bias = forward(problem, "tf32x3", True)
    leaves = [t.double().requires_grad_() for t in (image, text, s, b)]
    ref = sigmoid_loss_reference(
        problem._replace(image=leaves[0], text=leaves[1], logit_scale=leaves[2], logit_bias=leaves[3])
    )
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL)
    for ours, leaf in zip((d_image, d_text, d_scale, d_bias), leaves):
        torch.testing.assert_close(ours.double(), leaf.grad, **TOL)


def test_extreme_logits_stay_finite_and_exact():
    """Logits of +-60: softplus and sigmoid from exp(-|t|) without overflow."""
    leaves = _leaves(9, 9, 4, seed=7, scale=40.0, bias=-20.0)
    _compare(
        lambda *t: FF.sigmoid_loss(*t, backend="triton"), lambda *t: FF.sigmoid_loss(*t, backend="reference"), leaves
    )


def test_nan_in_nan_out_and_forward_only():
    image, text, s, b = _leaves(6, 6, 4)
    with torch.no_grad():
        plain = FF.sigmoid_loss(image, text, s, b, backend="triton")
        torch.testing.assert_close(plain, FF.sigmoid_loss(image, text, s, b, backend="chunked"), **TOL)
        image[3, 2] = float("nan")
        assert torch.isnan(FF.sigmoid_loss(image, text, s, b, backend="triton"))


def test_compiled_custom_op_matches_eager():
    torch._dynamo.reset()
    leaves = _leaves(10, 10, 5, seed=8)

    def fn(x, y, log_scale, bias):
        return FF.sigmoid_loss(x, y, log_scale.exp(), bias, backend="triton")

    leaves[2] = leaves[2].log()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = _run(fn, leaves)
    loss, grads = _run(compiled, leaves)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_opcheck_triton_custom_op():
    image, text, s, b = _leaves(6, 9, 3)
    args = (image, text, s.requires_grad_(), b, None, None, None, None, 6.0, 2, "triton", "tf32x3", True)
    torch.library.opcheck(torch.ops.fastcl.sigmoid_loss.default, args)


def test_odd_feature_dims_launch_on_zero_padded_aligned_rows(monkeypatch):
    """D = 20 (rows of 80 bytes: neither the dim nor the row stride a multiple of 16): the kernel sees rows of
    launch_dim(20) = 32 with an aligned row stride, the variant ``python -m fastcl.aot`` lowers; the gradients come
    back as contiguous ``[N, 20]`` and match float64. Aligned rows are passed as they are."""
    from fastcl.kernels import sigmoid_launch

    seen = []
    real_launch = sigmoid_launch._launch

    def spy(rows, cols, *rest):
        seen.append((rows.shape[1], rows.stride(0), cols.shape[1], cols.stride(0), rows.data_ptr() % 16))
        return real_launch(rows, cols, *rest)

    monkeypatch.setattr(sigmoid_launch, "_launch", spy)
    image, text, s, b = _leaves(11, 11, 40, seed=9)
    odd = [image[:, 3:23], text[:, 3:23], s, b]
    _compare(
        lambda *t: FF.sigmoid_loss(*t, normalize=False, backend="triton"),
        lambda *t: FF.sigmoid_loss(*t, normalize=False, backend="reference"),
        odd,
    )
    assert seen and all(view == (32, 32, 32, 32, 0) for view in seen), seen
    d_image = _run(lambda *t: FF.sigmoid_loss(*t, normalize=False, backend="triton"), odd)[1][0]
    assert d_image.shape == (11, 20) and d_image.is_contiguous()
    seen.clear()
    aligned = [image[:, :32].contiguous(), text[:, :32].contiguous(), s, b]
    with torch.no_grad():
        FF.sigmoid_loss(*aligned, normalize=False, backend="triton")
    assert seen == [(32, 32, 32, 32, 0)]


def test_strided_labels_are_read_by_index():
    """Labels that are a column of a larger tensor (stride 2 / 3): the kernel reads ids by row index, so the launcher
    passes them contiguous; the loss and gradients are the reference's."""
    leaves = _leaves(12, 20, 6, seed=10)
    gen = torch.Generator().manual_seed(11)
    image_labels = torch.randint(0, 4, (12, 2), generator=gen)[:, 0]
    text_labels = torch.randint(0, 4, (20, 3), generator=gen)[:, 2]
    assert not image_labels.is_contiguous() and not text_labels.is_contiguous()
    for weighting in ("uniform", "siglip_plus"):
        kw = dict(text_labels=text_labels, weighting=weighting)
        _compare(
            lambda *t, kw=kw: FF.sigmoid_loss(*t, image_labels, backend="triton", **kw),
            lambda *t, kw=kw: FF.sigmoid_loss(*t, image_labels, backend="reference", **kw),
            leaves,
        )
    square = _leaves(12, 12, 6, seed=12)
    _compare(
        lambda *t: FF.sigmoid_loss(*t, image_labels, backend="triton"),
        lambda *t: FF.sigmoid_loss(*t, image_labels, backend="reference"),
        square,
    )
