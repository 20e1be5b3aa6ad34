"""The sigmoid op's eager autograd: the loss from one forward pass that also forms every gradient; the backward
scales them by ``grad_output``.

:func:`loss_with_gradients` runs a backend's forward (chunked or Triton) inside :class:`SigmoidFunction`, or under
``torch.func`` transforms inside :class:`TransformableSigmoidFunction`; the custom op of :mod:`fastcl.ops.custom_ops`
shares :func:`input_gradients` for its own backward.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastcl.ops.problem import functorch_transforms_active
from fastcl.ops.sigmoid.problem import SigmoidProblem

Tensor = torch.Tensor


def input_gradients(needs, dtypes, grad_loss, d_image, d_text, d_scale, d_bias, eager: bool = True):
    """The gradients of ``(image, text, logit_scale, logit_bias)`` from those formed for ``grad_output = 1``: scaled
    out of place (a retained graph may run the backward again; autograd copies a stored tensor it is handed before
    accumulating into it, so ``grad_output == 1`` on CPU hands them over as they are), cast to the input dtypes,
    None where not needed. ``eager=False`` (the custom op's backward, traced by ``torch.compile``, and the
    ``torch.func`` form) reads nothing."""
    unit = eager and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0  # (a free read on CPU only)
    grads = []
    for need, dtype, grad in zip(needs, dtypes, (d_image, d_text, d_scale, d_bias)):
        if need:
            grad = grad if unit else grad.mul(grad_loss)
            grads.append(grad if grad.dtype == dtype else grad.to(dtype))
        else:
            grads.append(None)
    return grads


class SigmoidFunction(torch.autograd.Function):
    """``forward(image, text, logit_scale, logit_bias, problem, backend_forward) -> loss``: ``backend_forward``
    (problem -> ``(loss, dX, dY, ds, db)``) runs once; backward multiplies its gradients by ``grad_output``."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, problem: SigmoidProblem, backend_forward: Callable):
        loss, d_image, d_text, d_scale, d_bias = backend_forward(problem)
        ctx.dtypes = (image.dtype, text.dtype, logit_scale.dtype, logit_bias.dtype)
        ctx.save_for_backward(d_image, d_text, d_scale, d_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the stored first derivatives would enter as constants
            raise RuntimeError(
                "fastcl's sigmoid loss forms first derivatives only: create_graph=True (a second derivative "
                "through the loss) would silently treat them as constants; use backend='reference' for that"
            )
        grads = input_gradients(ctx.needs_input_grad[:4], ctx.dtypes, grad_loss, *ctx.saved_tensors)
        return *grads, None, None


class TransformableSigmoidFunction(torch.autograd.Function):
    """:class:`SigmoidFunction` in the setup_context form, which ``torch.func`` transforms need: outputs
    ``backend_forward``'s ``(loss, dX, dY, ds, db)``; backward scales the gradients by ``grad_output`` without
    reading it, and raises where a transform differentiates through them (a nested ``torch.func.grad``: a second
    derivative, which would otherwise treat them as constants)."""

    @staticmethod
    def forward(image, text, logit_scale, logit_bias, problem: SigmoidProblem, backend_forward: Callable):
        return tuple(backend_forward(problem))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtypes = tuple(t.dtype for t in inputs[:4])
        ctx.save_for_backward(*output[1:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, *grad_gradients):
        if any(g is not None for g in grad_gradients):
            raise RuntimeError(
                "fastcl's sigmoid loss forms first derivatives only: a second derivative through the loss (nested "
                "torch.func transforms) would silently treat them as constants; use backend='reference' for that"
            )
        if grad_loss is None:
            return (None,) * 6
        grads = input_gradients(ctx.needs_input_grad[:4], ctx.dtypes, grad_loss, *ctx.saved_tensors, eager=False)
        return *grads, None, None


def loss_with_gradients(problem: SigmoidProblem, backend_forward: Callable) -> Tensor:
    """The loss of ``problem`` with an autograd node that owns the gradients ``backend_forward`` formed."""
    args = (problem.image, problem.text, problem.logit_scale, problem.logit_bias, problem, backend_forward)
    if functorch_transforms_active():
        return TransformableSigmoidFunction.apply(*args)[0]
    return SigmoidFunction.apply(*args)
