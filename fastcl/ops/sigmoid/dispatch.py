"""The one dispatch point of the sigmoid op: backend resolution, ``normalize``, and the route to a backend.

The public API (:func:`fastcl.functional.sigmoid_loss`, :class:`fastcl.SigLipLoss`, the gathered form in
:mod:`fastcl.distributed`) calls :func:`sigmoid_loss_op`. Eagerly a backend's forward runs inside
:class:`~fastcl.ops.sigmoid.autograd.SigmoidFunction`; while compiling it is the one custom op
``fastcl::sigmoid_loss`` (:mod:`fastcl.ops.custom_ops`). ``backend='reference'`` is called by the API itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcl.ops import custom_ops
from fastcl.ops.problem import autocast_off
from fastcl.ops.sigmoid import chunked
from fastcl.ops.sigmoid import triton as triton_backend
from fastcl.ops.sigmoid.autograd import loss_with_gradients
from fastcl.ops.sigmoid.problem import SigmoidProblem, compute_dtype


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``'auto'`` -> ``'triton'`` for CUDA tensors of a Triton dtype when the sigmoid kernels import, else
    ``'chunked'``."""
    if backend != "auto":
        return backend
    if x.is_cuda and x.dtype in triton_backend.TRITON_DTYPES and triton_backend.available():
        return "triton"
    return "chunked"


def sigmoid_loss_op(problem: SigmoidProblem, backend: str, normalize: bool = False) -> torch.Tensor:
    """The loss of ``problem`` (:mod:`fastcl.ops.sigmoid`) as a 0-dim fp32 tensor (float64 for float64 inputs),
    differentiable in both towers, ``logit_scale`` and ``logit_bias``; never allocates ``N x M``.

    ``normalize`` L2-normalises both towers first (``F.normalize(x, dim=-1)``, whose backward autograd runs).
    Inside a ``torch.autocast`` region it runs with autocast off on the towers' device: it computes in its own
    precision (fp32, float64 kept), as the Triton kernels do.
    """
    with autocast_off(problem.text.device):
        return _loss(problem, backend, normalize)


def _loss(problem: SigmoidProblem, backend: str, normalize: bool) -> torch.Tensor:
    backend = resolve_backend(backend, problem.text)
    if backend not in ("chunked", "triton"):
        raise ValueError(f"backend {backend!r} has no fused implementation of the sigmoid loss")
    if normalize:
        problem = problem._replace(image=F.normalize(problem.image, dim=-1), text=F.normalize(problem.text, dim=-1))
    if backend == "triton":
        triton_backend.check_inputs(problem)
    inputs = (problem.image, problem.text, problem.logit_scale, problem.logit_bias)
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    precision = triton_backend.input_precision(problem.text.dtype) if backend == "triton" else "ieee"
    if torch.compiler.is_compiling():
        return custom_ops.sigmoid(problem, backend, precision, want_grad)

    def forward(p: SigmoidProblem):
        if backend == "triton":
            return triton_backend.forward(p, precision, True)
        return chunked.chunked_forward(p, True)

    if want_grad and backend == "chunked" and chunked.takes_small_problem(problem):
        return chunked.autograd_small_loss(problem)
    if want_grad:
        return loss_with_gradients(problem, forward)
    if backend == "triton":
        return triton_backend.forward(problem, precision, False)[0]
    return chunked.chunked_forward(problem, False)[0].to(compute_dtype(problem.text))
