"""The Triton backend with a tensor (learnable) temperature: the kernels read ``log2(e) / t`` from a device pointer
(``SCALE_FROM_PTR``); loss and gradients (features and the temperature's parameter) against the float64 chunked
backend, on every route (anchors are the contrast rows, one-way with an offset, two-way). Interpreter: tiny shapes."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from fastcl import functional as FF
from fastcl.kernels import launch

pytestmark = pytest.mark.triton
TOL = dict(rtol=2e-4, atol=2e-5)  # fp32 kernels (tf32x3 on GPUs) against float64


def _cases():
    return {
        "supcon_all": lambda f, p, backend: FF.supcon_loss(
            f, torch.arange(f.shape[0], device=f.device) % 3, temperature=1 / p.exp(), base_temperature=0.2,
            backend=backend),
        "supcon_one": lambda f, p, backend: FF.supcon_loss(
            f, torch.arange(f.shape[0], device=f.device) % 3, temperature=1 / p.exp(), contrast_mode="one",
            backend=backend),
        "clip_two_way": lambda f, p, backend: FF.info_nce_loss(
            f[:, 0], f[:, 1], logit_scale=p.exp(), normalize=False, backend=backend),
        "info_nce_one_way": lambda f, p, backend: FF.info_nce_loss(
            f[:, 0], f[:, 1], symmetric=False, logit_scale=p.exp(), backend=backend),
    }  # fmt: skip


def _run(fn, features, backend, dtype):
    f = features.to(dtype).detach().requires_grad_()
    p = torch.tensor(1.6, device=features.device, dtype=dtype if dtype == torch.float64 else torch.float32)
    p.requires_grad_()
    loss = fn(f, p, backend)
    grads = torch.autograd.grad(loss * 1.3, (f, p))
    return loss.detach().double(), *(g.double() for g in grads)


@pytest.mark.parametrize("case", list(_cases()))
def test_learnable_temperature_matches_float64(case):
    torch.manual_seed(0)
    features = F.normalize(torch.randn(11, 2, 5, device=DEVICE, dtype=torch.float64), dim=-1)
    fn = _cases()[case]
    got = _run(fn, features, "triton", torch.float32)
    want = _run(fn, features.cpu(), "chunked", torch.float64)
    for name, g, w in zip(("loss", "d features", "d p"), got, want):
        torch.testing.assert_close(g.cpu(), w, **TOL, msg=lambda m: f"{case} {name}: {m}")
    assert abs(float(want[2])) > 1e-3


def test_kernels_read_the_scale_from_a_pointer(monkeypatch):
    """A tensor temperature reaches the kernels as a pointer (SCALE_FROM_PTR), never as a host float (no .item())."""
    seen = []
    real = launch._launch

    def recording(name, grid_of, leading, args, scalars, constexprs):
        seen.append((name, constexprs["SCALE_FROM_PTR"], type(scalars[-2 if name != "fwd" else -1])))
        return real(name, grid_of, leading, args, scalars, constexprs)

    monkeypatch.setattr(launch, "_launch", recording)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (_ for _ in ()).throw(AssertionError("host sync")))
    q, k = torch.randn(6, 16, device=DEVICE, requires_grad=True), torch.randn(6, 16, device=DEVICE)
    scale = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    FF.info_nce_loss(q, k, logit_scale=scale, normalize=False, backend="triton").backward()
    assert {s[0] for s in seen} >= {"fwd", "bwd_anchor"}
    assert all(flag and kind is torch.Tensor for _, flag, kind in seen), seen
    assert scale.grad is not None and q.grad is not None


def test_float_temperature_keeps_the_float_argument(monkeypatch):
    seen = []
    real = launch._launch

    def recording(name, grid_of, leading, args, scalars, constexprs):
        seen.append((constexprs["SCALE_FROM_PTR"], type(scalars[-2 if name != "fwd" else -1])))
        return real(name, grid_of, leading, args, scalars, constexprs)

    monkeypatch.setattr(launch, "_launch", recording)
    q = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    FF.info_nce_loss(q, q.detach().flip(0), temperature=0.2, backend="triton").backward()
    assert seen and all(not flag and kind is float for flag, kind in seen), seen


def test_frozen_anchors_still_give_the_scale_its_gradient():
    """Only the keys and the scale want gradients: the backward forms the anchors' gradient for dL/du anyway."""
    torch.manual_seed(1)
    q, k = torch.randn(9, 16, device=DEVICE), torch.randn(9, 16, device=DEVICE)
    results = []
    for backend, dtype in (("triton", torch.float32), ("chunked", torch.float64)):
        key = k.to(dtype).requires_grad_()
        p = torch.tensor(1.2, device=DEVICE, dtype=dtype, requires_grad=True)
        loss = FF.info_nce_loss(q.to(dtype), key, symmetric=False, logit_scale=p.exp(), backend=backend)
        results.append([g.double().cpu() for g in torch.autograd.grad(loss, (key, p))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL)
