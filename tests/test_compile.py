"""torch.compile: every loss traces as one graph (fullgraph=True, 0 graph breaks), matches eager in loss and
gradients, does not recompile for a new batch size, and the fused ops pass torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from conftest import triton_usable

from fastcl import functional as FF

BACKENDS = ["chunked", pytest.param("triton", marks=pytest.mark.triton)]


def _supcon_labels(f, labels, backend):
    return FF.supcon_loss(f, labels, temperature=0.1, backend=backend)


def _supcon_mask(f, labels, backend):
    mask = (labels[:, None] == labels[None, :]).float() * 0.5 + torch.eye(labels.shape[0], device=f.device) * 0.5
    return FF.supcon_loss(f, mask=mask, temperature=0.1, backend=backend)


def _simclr(f, labels, backend):
    return FF.supcon_loss(f, temperature=0.2, base_temperature=0.1, backend=backend)


def _supcon_one(f, labels, backend):
    return FF.supcon_loss(f, labels, temperature=0.1, contrast_mode="one", backend=backend)


def _nt_xent(f, labels, backend):
    return FF.nt_xent_loss(f[:, 0], f[:, 1], temperature=0.5, backend=backend)


def _info_nce_symmetric(f, labels, backend):
    return FF.info_nce_loss(f[:, 0], f[:, 1], temperature=0.07, backend=backend)


def _info_nce_labels(f, labels, backend):
    keys = torch.cat([f[:, 1], f[:, 0]])  # 2B keys, query i's positive at labels[i]
    return FF.info_nce_loss(f[:, 0], keys, labels, symmetric=False, backend=backend)


LOSSES = [_supcon_labels, _supcon_mask, _simclr, _supcon_one, _nt_xent, _info_nce_symmetric, _info_nce_labels]


def _inputs(bsz, dim=12, dtype=torch.float32):
    features = torch.nn.functional.normalize(torch.randn(bsz, 2, dim, dtype=dtype), dim=-1)
    return features, torch.randint(0, 3, (bsz,))


def _loss_and_grad(fn, features, labels, backend):
    f = features.detach().clone().requires_grad_()
    loss = fn(f, labels, backend)
    (loss * 1.7).backward()  # grad_output != 1
    return loss.detach(), f.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__.strip("_"))
def test_fullgraph_compile_matches_eager_without_recompiling(fn, backend):
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for bsz in (6, 11):  # a second batch size reuses the graph
        features, labels = _inputs(bsz)
        if fn is _info_nce_labels:
            labels = torch.randint(0, 2 * bsz, (bsz,))
        eager_loss, eager_grad = _loss_and_grad(fn, features, labels, backend)
        loss, grad = _loss_and_grad(compiled, features, labels, backend)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)
        assert eager_loss.item() > 0
        frames.append(counter.frame_count)
    # (the first call may compile twice: Dynamo restarts once to turn the float arguments into graph inputs)
    assert frames[0] >= 1 and frames[1] == frames[0], f"recompiled for a new batch size: frames {frames}"


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__.strip("_"))
def test_explain_shows_no_graph_break(fn):
    features, labels = _inputs(7)
    if fn is _info_nce_labels:
        labels = torch.randint(0, 14, (7,))
    explanation = torch._dynamo.explain(fn)(features.requires_grad_(), labels, "chunked")
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_inductor_compiles_a_training_step():
    """The default backend (Inductor) around an encoder + SupCon step, float64 so the numbers can be held tight."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).double()

    def step(x, labels):
        z = torch.nn.functional.normalize(encoder(x), dim=-1)
        return FF.supcon_loss(z.view(-1, 2, 8), labels, temperature=0.1, backend="chunked")

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for bsz in (5, 9):
        x, labels = torch.randn(bsz * 2, 10, dtype=torch.float64), torch.randint(0, 3, (bsz,))
        expected = step(x, labels)
        expected_grads = torch.autograd.grad(expected, list(encoder.parameters()))
        got = compiled(x, labels)
        got_grads = torch.autograd.grad(got, list(encoder.parameters()))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def _op_samples(dtype):
    torch.manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(10, 6, dtype=dtype), dim=1)
    a = c[3:8].clone()
    labels = torch.randint(0, 3, (10,))
    mask = torch.rand(5, 5)
    inv_t = 1 / 0.3

    def leaf(x):
        return x.detach().clone().requires_grad_()

    return {
        "self_labels": (None, leaf(c), labels, labels, None, 0, inv_t, 0.7),
        "self_mask": (None, leaf(c), None, None, mask, 0, inv_t, 0.7),
        "offset": (leaf(a), leaf(c), labels[3:8].clone(), labels, None, 3, inv_t, 1.0),
        "no_self": (leaf(a), leaf(c), labels[:5].clone(), labels, None, None, inv_t, 1.0),
        "two_way": (leaf(c[:5]), leaf(c[5:]), labels[:5].clone(), labels[5:].clone(), None, None, inv_t, 1.0),
        "no_grad_anchor": (a.clone(), leaf(c), labels[3:8].clone(), labels, None, 3, inv_t, 1.0),
    }


@pytest.mark.parametrize("case", list(_op_samples(torch.float64)))
def test_opcheck_chunked(case):
    args = _op_samples(torch.float64)[case]
    two_way = case == "two_way"
    torch.library.opcheck(torch.ops.fastcl.contrastive_chunked, (*args, two_way, True))
    no_grad = [x.detach() if torch.is_tensor(x) else x for x in args]  # want_grad=False: inputs without grad
    torch.library.opcheck(torch.ops.fastcl.contrastive_chunked, (*no_grad, two_way, False))


@pytest.mark.triton
@pytest.mark.parametrize("case", ["self_labels", "self_mask", "offset", "two_way"])
def test_opcheck_triton(case):
    if not triton_usable():
        pytest.skip("needs triton on a GPU or under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [x.to(device).detach().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x
            for x in _op_samples(torch.float32)[case]]  # fmt: skip
    route = {"offset": "one_way", "two_way": "two_way"}.get(case, "anchors_are_contrast")
    torch.library.opcheck(torch.ops.fastcl.contrastive_triton, (*args, route, "tf32x3"))


def test_same_input_is_not_passed_twice():
    """SupCon 'all' hands the op one embedding tensor (anchor None), so Dynamo sees no duplicate input."""
    features, labels = _inputs(4)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(_supcon_labels, backend=backend, fullgraph=True)(features, labels, "chunked")
    ops = (torch.ops.fastcl.contrastive_chunked, torch.ops.fastcl.contrastive_chunked.default)
    calls = [n for n in graphs[0].graph.nodes if n.target in ops]
    assert len(calls) == 1 and calls[0].args[0] is None


# ----------------------------------------------------------------------------------------------------------------
# A learnable temperature: fastcl::contrastive_chunked_learnable (the inverse temperature a Tensor input)
# ----------------------------------------------------------------------------------------------------------------


def _supcon_learnable(f, labels, log_scale):
    return FF.supcon_loss(f, labels, temperature=1 / log_scale.exp(), base_temperature=0.1, backend="chunked")


def _nt_xent_learnable(f, labels, log_scale):
    return FF.nt_xent_loss(f[:, 0], f[:, 1], temperature=1 / log_scale.exp(), backend="chunked")


def _clip_learnable(f, labels, log_scale):
    return FF.info_nce_loss(f[:, 0], f[:, 1], logit_scale=log_scale.exp(), normalize=False, backend="chunked")


def _info_nce_labels_learnable(f, labels, log_scale):
    keys = torch.cat([f[:, 1], f[:, 0]])
    return FF.info_nce_loss(f[:, 0], keys, labels, symmetric=False, logit_scale=log_scale.exp(), backend="chunked")


LEARNABLE = [_supcon_learnable, _nt_xent_learnable, _clip_learnable, _info_nce_labels_learnable]


def _learnable_loss_and_grads(fn, features, labels):
    f = features.detach().clone().requires_grad_()
    log_scale = torch.tensor(2.0, dtype=features.dtype, requires_grad=True)
    loss = fn(f, labels, log_scale)
    grads = torch.autograd.grad(loss * 1.7, (f, log_scale))
    return loss.detach(), grads


@pytest.mark.parametrize("fn", LEARNABLE, ids=lambda f: f.__name__.strip("_"))
def test_fullgraph_compile_learnable_temperature(fn):
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for bsz in (6, 11):
        features, labels = _inputs(bsz, dtype=torch.float64)
        if fn is _info_nce_labels_learnable:
            labels = torch.randint(0, 2 * bsz, (bsz,))
        eager_loss, eager_grads = _learnable_loss_and_grads(fn, features, labels)
        loss, grads = _learnable_loss_and_grads(compiled, features, labels)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=1e-12)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        assert abs(eager_grads[1].item()) > 1e-4
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], f"recompiled for a new batch size: frames {frames}"
    explanation = torch._dynamo.explain(fn)(features.requires_grad_(), labels, torch.tensor(2.0, requires_grad=True,
                                                                                            dtype=torch.float64))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_inductor_compiles_a_step_with_a_learnable_logit_scale():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(10, 8).double()
    log_scale = torch.nn.Parameter(torch.tensor(2.659, dtype=torch.float64))

    def step(x, y):
        img, txt = torch.nn.functional.normalize(encoder(x), dim=-1), torch.nn.functional.normalize(encoder(y), dim=-1)
        return FF.info_nce_loss(img, txt, logit_scale=log_scale.exp(), normalize=False, backend="chunked")

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    params = [*encoder.parameters(), log_scale]
    for bsz in (5, 9):
        x, y = torch.randn(bsz, 10, dtype=torch.float64), torch.randn(bsz, 10, dtype=torch.float64)
        expected = step(x, y)
        expected_grads = torch.autograd.grad(expected, params)
        got = compiled(x, y)
        for g, e in zip(torch.autograd.grad(got, params), expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", list(_op_samples(torch.float64)))
def test_opcheck_chunked_learnable(case):
    args = list(_op_samples(torch.float64)[case])
    args[6] = torch.tensor(args[6], dtype=torch.float64, requires_grad=True)
    two_way = case == "two_way"
    torch.library.opcheck(torch.ops.fastcl.contrastive_chunked_learnable, (*args, two_way, True))
    no_grad = [x.detach() if torch.is_tensor(x) else x for x in args]
    torch.library.opcheck(torch.ops.fastcl.contrastive_chunked_learnable, (*no_grad, two_way, False))


@pytest.mark.triton
@pytest.mark.parametrize("case", ["self_labels", "self_mask", "offset", "two_way"])
def test_opcheck_triton_learnable(case):
    if not triton_usable():
        pytest.skip("needs triton on a GPU or under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [x.to(device).detach().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x
            for x in _op_samples(torch.float32)[case]]  # fmt: skip
    args[6] = torch.tensor(args[6], device=device, requires_grad=True)
    route = {"offset": "one_way", "two_way": "two_way"}.get(case, "anchors_are_contrast")
    torch.library.opcheck(torch.ops.fastcl.contrastive_triton_learnable, (*args, route, "tf32x3"))


@pytest.mark.triton
def test_fullgraph_compile_learnable_temperature_triton():
    if not triton_usable():
        pytest.skip("needs triton on a GPU or under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def clip(f, log_scale):
        return FF.info_nce_loss(f[:, 0], f[:, 1], logit_scale=log_scale.exp(), normalize=False, backend="triton")

    compiled = torch.compile(clip, backend="aot_eager", fullgraph=True, dynamic=True)
    features = _inputs(7)[0].to(device)
    results = []
    for fn in (clip, compiled):
        f = features.clone().requires_grad_()
        log_scale = torch.tensor(2.0, device=device, requires_grad=True)
        loss = fn(f, log_scale)
        results.append((loss.detach(), *torch.autograd.grad(loss, (f, log_scale))))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(results[0][2].item()) > 1e-4
