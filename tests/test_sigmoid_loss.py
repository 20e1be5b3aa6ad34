"""The sigmoid (SigLIP) loss in one process: the fused backends against open_clip's SigLipLoss and an independent
float64 statement, every gradient (both towers, logit_scale, logit_bias), labels, rectangular batches, SigLIP+
weights, gradcheck, NaN, torch.compile and the input errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from sigmoid_peers import open_clip_loss, siglip_kernel_reference

import fastcl
import fastcl.functional as FF
from fastcl.ops.sigmoid import chunked

BACKENDS = ["chunked", "reference"]
OPEN_CLIP = open_clip_loss()


def sigmoid_float64(image, text, scale, bias, positive, weight=None):
    """Pair by pair: ``-sum_ij w_ij log sigmoid(z_ij (s x_i . y_j + b)) / N`` (float64, autograd)."""
    terms = []
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            z = 1.0 if positive[i][j] else -1.0
            w = weight[i][j] if (weight is not None and positive[i][j]) else 1.0
            logit = scale * torch.dot(image[i], text[j]) + bias
            terms.append(-w * torch.log(torch.sigmoid(z * logit)))
    return torch.stack(terms).sum() / image.shape[0]


def _leaves(n, m, dim, dtype=torch.float64, scale=7.0, bias=-3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(m, dim, generator=g, dtype=dtype), dim=-1).requires_grad_()
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    b = torch.tensor(bias, dtype=dtype, requires_grad=True)
    return image, text, s, b


def _grads(fn, leaves, grad_output=1.0):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    (loss * grad_output).backward()
    return loss.detach(), [t.grad for t in leaves]


def _assert_close(ours, theirs, rtol=1e-12, atol=1e-13):
    loss, grads = ours
    loss_ref, grads_ref = theirs
    torch.testing.assert_close(loss, loss_ref.to(loss.dtype), rtol=rtol, atol=atol)
    for name, g, r in zip(("image", "text", "logit_scale", "logit_bias"), grads, grads_ref):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=rtol, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 image rows (chunked): several blocks, the last one partial, on test-sized batches."""
    monkeypatch.setattr(chunked, "block_rows", lambda n, m, device: max(1, min(n, 7)))


@pytest.mark.skipif(OPEN_CLIP is None, reason="open_clip_torch is not installed")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, dim", [(1, 5), (19, 3), (33, 16)])
def test_equals_open_clip_siglip_loss_float64(small_blocks, backend, n, dim):
    leaves = _leaves(n, n, dim)
    theirs = _grads(lambda *t: OPEN_CLIP.SigLipLoss()(*t), leaves, grad_output=1.7)
    ours = _grads(lambda *t: fastcl.SigLipLoss(backend=backend)(*t), leaves, grad_output=1.7)
    _assert_close(ours, theirs)
    assert ours[0].dtype == torch.float64 and ours[1][2].shape == ()


@pytest.mark.skipif(OPEN_CLIP is None, reason="open_clip_torch is not installed")
def test_open_clip_call_with_learnable_parameters():
    """open_clip's own call: logit_scale.exp() of a parameter, a bias parameter, fp32; the parameters' gradients."""
    torch.manual_seed(1)
    image, text = torch.randn(24, 8), torch.randn(24, 8)
    grads = []
    for loss_fn in (OPEN_CLIP.SigLipLoss(), fastcl.SigLipLoss()):
        log_scale = torch.nn.Parameter(torch.tensor(10.0).log())
        bias = torch.nn.Parameter(torch.tensor(-10.0))
        loss = loss_fn(image, text, log_scale.exp(), bias)
        loss.backward()
        grads.append((loss.detach(), log_scale.grad, bias.grad))
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_labels_rectangular_float64(small_blocks, backend):
    """Several captions per image (labels [N], text_labels [M]), against the pair-by-pair statement."""
    image, text, s, b = _leaves(9, 23, 5, seed=3)
    image_labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])
    text_labels = torch.randint(0, 11, (23,), generator=torch.Generator().manual_seed(4))
    positive = (image_labels[:, None] == text_labels[None, :]).tolist()
    theirs = _grads(lambda *t: sigmoid_float64(*t, positive), (image, text, s, b), grad_output=0.6)

    def ours_fn(*t):
        return FF.sigmoid_loss(*t, image_labels, text_labels=text_labels, backend=backend)

    _assert_close(_grads(ours_fn, (image, text, s, b), grad_output=0.6), theirs)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_shared_labels_multi_positive(small_blocks, backend):
    image, text, s, b = _leaves(17, 17, 4, seed=5)
    labels = torch.randint(0, 4, (17,), generator=torch.Generator().manual_seed(6))
    positive = (labels[:, None] == labels[None, :]).tolist()
    theirs = _grads(lambda *t: sigmoid_float64(*t, positive), (image, text, s, b))
    _assert_close(_grads(lambda *t: FF.sigmoid_loss(*t, labels, backend=backend), (image, text, s, b)), theirs)


def _siglip_plus_float64(image, text, scale, bias, image_gid, text_gid, symmetric):
    """siglip-kernel's SigLIP+ (fused_siglip_plus.py's module docstring and _group_inverse_counts): ``sum_ij v_ij
    BCE(S_ij, Y_ij) / (N * M)``, ``v_ij = alpha / k_i + beta / k'_j`` on positives, 1 elsewhere, k_i the texts in
    image i's group, k'_j the images in text j's group."""
    alpha, beta = (0.5, 0.5) if symmetric else (1.0, 0.0)
    n, m = image.shape[0], text.shape[0]
    logits = image @ text.T * scale + bias
    positive = (image_gid[:, None] == text_gid[None, :]).double()
    k_row = positive.sum(1).clamp_min(1)
    k_col = positive.sum(0).clamp_min(1)
    v = torch.where(positive > 0, alpha / k_row[:, None] + beta / k_col[None, :], torch.ones_like(positive))
    return F.binary_cross_entropy_with_logits(logits, positive, weight=v, reduction="sum") / (n * m)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("weighting", ["siglip_plus", "siglip_plus_asymmetric"])
def test_siglip_plus_weighting_float64(small_blocks, backend, weighting):
    """SigLIP+ equals siglip-kernel's definition times M (it divides by N * M, open_clip's convention by N)."""
    image, text, s, b = _leaves(11, 26, 6, seed=7)
    image_gid = torch.randint(0, 6, (11,), generator=torch.Generator().manual_seed(8))
    text_gid = torch.randint(0, 7, (26,), generator=torch.Generator().manual_seed(9))
    symmetric = weighting == "siglip_plus"
    theirs = _grads(lambda *t: 26 * _siglip_plus_float64(*t, image_gid, text_gid, symmetric), (image, text, s, b))

    def ours_fn(*t):
        return FF.sigmoid_loss(*t, image_gid, text_labels=text_gid, weighting=weighting, backend=backend)

    _assert_close(_grads(ours_fn, (image, text, s, b)), theirs)
    uniform = _grads(lambda *t: FF.sigmoid_loss(*t, image_gid, text_labels=text_gid), (image, text, s, b))
    assert (uniform[0] - theirs[0]).abs() > 1e-3  # the weights change the loss on this batch


@pytest.mark.skipif(siglip_kernel_reference() is None, reason="siglip-kernel is not installed")
def test_equals_siglip_kernel_reference():
    ref = siglip_kernel_reference()
    image, text, s, b = _leaves(13, 13, 7, seed=10)
    theirs = _grads(lambda *t: ref.siglip_loss_reference(*t), (image, text, s, b))
    _assert_close(_grads(lambda *t: FF.sigmoid_loss(*t, backend="chunked"), (image, text, s, b)), theirs)


def test_gradcheck_chunked(small_blocks):
    image, text, s, b = _leaves(10, 10, 3, scale=4.0, bias=-1.0, seed=11)
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6])
    assert torch.autograd.gradcheck(lambda *t: FF.sigmoid_loss(*t, backend="chunked"), (image, text, s, b))
    assert torch.autograd.gradcheck(
        lambda *t: FF.sigmoid_loss(*t, labels, weighting="siglip_plus", backend="chunked"), (image, text, s, b)
    )


def test_normalize_gives_the_gradients_of_raw_features(small_blocks):
    image, text, s, b = _leaves(15, 15, 5, seed=12)
    raw = [image.detach() * 3.0, text.detach() * 0.5, s, b]
    theirs = _grads(lambda x, y, *p: OPEN_CLIP_OR_DENSE(F.normalize(x, dim=-1), F.normalize(y, dim=-1), *p), raw)
    ours = _grads(lambda *t: FF.sigmoid_loss(*t, normalize=True, backend="chunked"), raw)
    _assert_close(ours, theirs)
    unnormalised = _grads(lambda *t: FF.sigmoid_loss(*t, backend="chunked"), raw)
    assert (unnormalised[0] - theirs[0]).abs() > 1e-3


def OPEN_CLIP_OR_DENSE(image, text, s, b):
    positive = torch.eye(image.shape[0], dtype=torch.bool).tolist()
    return sigmoid_float64(image, text, s, b, positive)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs_against_float64(small_blocks, dtype, tol):
    image, text, s, b = _leaves(40, 40, 16, seed=13, scale=10.0, bias=-8.0)
    theirs = _grads(lambda *t: FF.sigmoid_loss(*t, backend="reference"), (image, text, s, b))
    lowered = [image.detach().to(dtype), text.detach().to(dtype), s.detach().float(), b.detach().float()]
    loss, grads = _grads(lambda *t: FF.sigmoid_loss(*t, backend="chunked"), lowered)
    assert loss.dtype == torch.float32 and grads[0].dtype == dtype
    exact = _grads(lambda *t: FF.sigmoid_loss(*t, backend="reference"), [t.double() for t in lowered])
    _assert_close((loss.double(), [g.double() for g in grads]), exact, rtol=tol, atol=tol * 1e-2)
    assert abs(loss.double() - theirs[0]) < 0.1 * abs(theirs[0])


@pytest.mark.parametrize(
    "n, labelled, rows, backend",
    [
        (12, False, None, "chunked"),
        (129, False, None, "chunked"),
        (129, False, 7, "chunked"),
        (40, True, None, "chunked"),
        (40, True, 7, "chunked"),
        (40, True, None, "reference"),
    ],
    ids=["native-autograd", "single-block", "paired-blocks", "labelled-block", "labelled-blocks", "reference"],
)
def test_autocast_region_computes_in_float32(monkeypatch, n, labelled, rows, backend):
    """Called inside ``torch.autocast`` (open_clip computes its loss there), the loss still computes fp32 inputs in
    fp32 on every chunked route and on the reference backend: the loss and gradients of the same call outside the
    region."""
    if rows is not None:
        monkeypatch.setattr(chunked, "block_rows", lambda n_image, n_text, device: rows)
    image, text, s, b = _leaves(n, n, 6, dtype=torch.float32, scale=10.0, bias=-5.0, seed=15)
    labels = torch.arange(n) % 5 if labelled else None

    def fn(*t):
        return FF.sigmoid_loss(*t, labels, backend=backend)

    def in_autocast(*t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*t)

    expected = _grads(fn, (image, text, s, b))
    loss, grads = _grads(in_autocast, (image, text, s, b))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    _assert_close((loss, grads), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, labelled", [(9, True), (140, False)], ids=["labelled", "one-pass-default-pairing"])
def test_torch_func_grad_equals_backward(n, labelled):
    """``torch.func.grad`` through the one-pass op (labels, or a default pairing above the native-autograd size):
    the gradients of both towers, logit_scale and logit_bias that ``backward`` gives, scaled by grad_output. A nested
    ``torch.func.grad`` (a second derivative) raises, as ``create_graph=True`` does."""
    image, text, s, b = _leaves(n, n, 5, dtype=torch.float32, seed=16)
    labels = torch.arange(n) % 4 if labelled else None

    def loss(*t):
        return 1.5 * FF.sigmoid_loss(*t, labels, backend="chunked")

    got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(*(t.detach() for t in (image, text, s, b)))
    expected = _grads(loss, (image, text, s, b))[1]
    for name, g, e in zip(("image", "text", "logit_scale", "logit_bias"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"d{n}: {m}")
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.func.grad(torch.func.grad(lambda scale: loss(image.detach(), text.detach(), scale, b.detach())))(
            s.detach()
        )


def test_nan_in_nan_out():
    image, text, s, b = _leaves(6, 6, 4)
    poisoned = image.detach().clone()
    poisoned[2, 1] = float("nan")
    for backend in BACKENDS:
        loss = FF.sigmoid_loss(poisoned, text.detach(), s.detach(), b.detach(), backend=backend)
        assert torch.isnan(loss), backend


def test_default_is_not_normalised_and_scale_bias_numbers_work():
    image, text, _, _ = _leaves(8, 8, 4)
    with torch.no_grad():
        a = FF.sigmoid_loss(image * 2, text, 3.0, -1.0, backend="chunked")
        c = FF.sigmoid_loss(image * 2, text, torch.tensor(3.0, dtype=torch.float64), None, backend="chunked")
        d = FF.sigmoid_loss(image * 2, text, 3.0, 0.0, backend="reference")
    assert a.dtype == torch.float64
    torch.testing.assert_close(c, d)
    assert (a - c).abs() > 1e-3


def test_forward_only_matches_with_gradients():
    image, text, s, b = _leaves(70, 70, 8)
    with torch.no_grad():
        loss = FF.sigmoid_loss(image, text, s, b, backend="chunked")
    torch.testing.assert_close(loss, FF.sigmoid_loss(image, text, s, b, backend="chunked").detach())


def test_second_derivative_is_refused():
    image, text, s, b = _leaves(129, 129, 3)  # above the small problems that run under native autograd
    loss = FF.sigmoid_loss(image, text, s, b, backend="chunked")
    (g,) = torch.autograd.grad(loss, s, create_graph=False)
    assert torch.isfinite(g)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(FF.sigmoid_loss(image, text, s, b, backend="chunked"), s, create_graph=True)


@pytest.mark.parametrize("n", [1, 7, 128])
def test_small_problem_runs_native_autograd_with_reference_numbers(n):
    """N M <= 16,384 (default pairing, gradients wanted): six native ops; loss, first and second derivatives equal
    the float64 reference."""
    image, text, s, b = _leaves(n, n, 5, seed=n)
    problem_loss = FF.sigmoid_loss(image, text, s, b, backend="chunked")
    assert problem_loss.grad_fn.name() == "MulBackward0"  # native autograd, not the one-pass function
    expected = FF.sigmoid_loss(image, text, s, b, backend="reference")
    torch.testing.assert_close(problem_loss, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(problem_loss, [image, text, s, b], create_graph=True)
    expected_grads = torch.autograd.grad(expected, [image, text, s, b], create_graph=True)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    second = torch.autograd.grad(grads[2], [s, b])
    expected_second = torch.autograd.grad(expected_grads[2], [s, b])
    for got, want in zip(second, expected_second):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    big = _leaves(129, 129, 5)
    assert FF.sigmoid_loss(*big, backend="chunked").grad_fn.name() != "MulBackward0"


BAD_CALLS = [
    (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale must be a scalar"),
    (dict(logit_bias=torch.ones(1, 2)), ValueError, "logit_bias must be a scalar"),
    (dict(logit_scale=torch.tensor(float("nan"))), ValueError, "logit_scale must be finite and > 0"),
    (dict(logit_scale=torch.tensor(0.0)), ValueError, "logit_scale must be finite and > 0"),
    (dict(logit_scale=-2.0), ValueError, "logit_scale must be finite and > 0"),
    (dict(logit_bias=torch.tensor(float("inf"))), ValueError, "logit_bias must be finite"),
    (dict(logit_scale="10"), TypeError, "logit_scale must be a 0-dim"),
    (dict(logit_bias=torch.tensor(1)), TypeError, "logit_bias must be a floating-point"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \[6\]"),
    (
        dict(labels=torch.zeros(6, dtype=torch.long), text_labels=torch.zeros(4, dtype=torch.long)),
        ValueError,
        r"text_labels must have shape \[6\]",
    ),
    (dict(text_labels=torch.zeros(6, dtype=torch.long)), ValueError, "text_labels needs labels"),
    (dict(text=torch.randn(6, 5)), ValueError, "same feature dim"),
    (dict(text=torch.randn(7, 4)), ValueError, "as many texts as images"),
    (dict(weighting="plus"), ValueError, "weighting must be one of"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("change, error, message", BAD_CALLS)
def test_bad_input_names_the_argument(change, error, message):
    args = dict(image=torch.randn(6, 4), text=torch.randn(6, 4), logit_scale=torch.tensor(2.0), logit_bias=-1.0)
    args.update(change)
    with pytest.raises(error, match=message):
        FF.sigmoid_loss(**args)


def test_module_matches_functional_and_output_dict():
    image, text, s, b = _leaves(9, 9, 4)
    module = fastcl.SigLipLoss(backend="chunked")
    out = module(image, text, s, b, output_dict=True)
    torch.testing.assert_close(out["contrastive_loss"], FF.sigmoid_loss(image, text, s, b))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])
    torch.testing.assert_close(module(image, text, s, b, labels=labels), FF.sigmoid_loss(image, text, s, b, labels))
    assert "weighting='uniform'" in repr(module)
    with pytest.raises(ValueError, match="no distributed form"):
        fastcl.SigLipLoss(gather_distributed=True, backend="reference")


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    image, text, s, b = _leaves(12, 12, 5, dtype=torch.float32)

    def fn(x, y, scale, bias):
        return FF.sigmoid_loss(x, y, scale.exp(), bias, backend="chunked")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = _grads(fn, (image, text, s.detach().log(), b))
    got = _grads(compiled, (image, text, s.detach().log(), b))
    _assert_close(got, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_call_checks_logit_scale_and_bias(backend):
    """Compiled, the values are checked by a device assert (no host read while tracing): a scale that is not finite
    and > 0, or a bias that is not finite, raises instead of giving a loss; valid values give the eager numbers."""
    torch._dynamo.reset()
    image, text, _, _ = _leaves(7, 7, 4, dtype=torch.float32)

    def with_tensors(x, y, scale, bias):
        return FF.sigmoid_loss(x, y, scale, bias, backend=backend)

    compiled = torch.compile(with_tensors, fullgraph=True, backend="aot_eager")
    valid = (torch.tensor(3.0), torch.tensor(-1.0))
    torch.testing.assert_close(compiled(image, text, *valid), with_tensors(image, text, *valid))
    for scale, bias, message in (
        (-1.0, 0.0, "logit_scale must be finite and > 0"),
        (0.0, 0.0, "logit_scale must be finite and > 0"),
        (float("nan"), 0.0, "logit_scale must be finite and > 0"),
        (3.0, float("inf"), "logit_bias must be finite"),
    ):
        with pytest.raises(RuntimeError, match=message):
            compiled(image, text, torch.tensor(scale), torch.tensor(bias))

    def with_a_number(x, y):
        return FF.sigmoid_loss(x, y, -2.0, backend=backend)

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="logit_scale must be finite and > 0"):
        torch.compile(with_a_number, fullgraph=True, backend="aot_eager")(image, text)


def test_opcheck_custom_op():
    image, text, s, b = _leaves(6, 9, 3, dtype=torch.float32)
    labels, text_labels = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 0, 1, 2, 2, 3, 4, 5, 5])
    weights = [torch.rand(6), torch.rand(9)]
    for ids, extra in (((None, None), [None, None]), ((labels, text_labels), weights)):
        args = (image, text, s, b, *ids, *extra, 6.0, 0, "chunked", "ieee", True)
        torch.library.opcheck(torch.ops.fastcl.sigmoid_loss.default, args)


@pytest.mark.parametrize("offset", [0, 5])
def test_single_block_route_equals_the_block_loop(monkeypatch, offset):
    """Small problems take the single-block route (one [N, M] block, fewest operations); the block loop over rows
    gives the same loss and gradients (float64), with the default pairing at an offset (a gathered rank)."""
    from fastcl.ops.sigmoid.problem import SigmoidProblem

    image, text, s, b = [t.detach() for t in _leaves(23, 31, 6, seed=14)]
    problem = SigmoidProblem(image, text, s, b, None, None, None, None, 4.0, pair_offset=offset)
    single = chunked.chunked_forward(problem, True)
    monkeypatch.setattr(chunked, "block_rows", lambda n, m, device: 5)
    looped = chunked.chunked_forward(problem, True)
    for a, c in zip(single, looped):
        torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-14)
    forward_only = chunked.chunked_forward(problem, False)
    torch.testing.assert_close(forward_only[0], single[0], rtol=1e-13, atol=1e-14)


@pytest.mark.triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="siglip-kernel's kernel on CPU tensors")
@pytest.mark.parametrize("symmetric", [True, False])
def test_siglip_plus_equals_siglip_kernels_own_kernel(symmetric):
    """siglip-kernel's fused SigLIP+ (its Triton kernel through the interpreter, fp32) against ours / M: loss and the
    gradients of both towers, its log-temperature and its bias."""
    from sigmoid_peers import siglip_kernel_plus_on_cpu

    plus = siglip_kernel_plus_on_cpu()
    if plus is None:
        pytest.skip("siglip-kernel is not installed")
    image, text, _, _ = _leaves(11, 26, 6, dtype=torch.float32, seed=15)
    image_gid = torch.randint(0, 6, (11,), generator=torch.Generator().manual_seed(16))
    text_gid = torch.randint(0, 7, (26,), generator=torch.Generator().manual_seed(17))
    leaves = [image.detach(), text.detach(), torch.tensor(7.0).log(), torch.tensor(-3.0)]

    def theirs_fn(x, y, log_t, b):
        return plus.fused_siglip_plus_loss(x, y, log_t, b, image_gid, text_gid, symmetric=symmetric, chunk_size=4)

    def ours_fn(x, y, log_t, b):
        weighting = "siglip_plus" if symmetric else "siglip_plus_asymmetric"
        loss = FF.sigmoid_loss(x, y, log_t.exp(), b, image_gid, text_labels=text_gid, weighting=weighting)
        return loss / 26

    _assert_close(_grads(ours_fn, leaves), _grads(theirs_fn, leaves), rtol=2e-6, atol=2e-7)


def test_retained_graph_backward_twice_and_in_place_edits_of_grad():
    """The stored gradients are handed to autograd for grad_output = 1: a second backward through a retained graph
    gives them again, unchanged by in-place edits of the first ``.grad``."""
    image, text, s, b = _leaves(300, 300, 8, dtype=torch.float32)
    loss = FF.sigmoid_loss(image, text, s, b, backend="chunked")
    loss.backward(retain_graph=True)
    first_image, first_scale = image.grad.clone(), s.grad.clone()
    image.grad.mul_(100.0)
    s.grad.zero_()
    loss.backward()
    torch.testing.assert_close(image.grad, 101.0 * first_image)
    torch.testing.assert_close(s.grad, first_scale)
