"""The chunked backend's eager autograd: the loss and its gradients from one forward pass, no custom-op dispatch.

:func:`chunked_loss` is what :func:`fastcl.ops.dispatch.contrastive_loss` calls eagerly for ``backend='chunked'``.
The forward pass forms the gradients for ``grad_output = 1`` (:func:`~fastcl.ops.chunked.passes.chunked_forward`),
so the backward only scales them: :class:`_EagerChunkedFunction` outside ``torch.func`` transforms,
:class:`_ChunkedFunction` (the setup_context form) under them. ``normalize`` is folded in for fp32 / float64 inputs:
``F.normalize``'s Jacobian applied to the gradients formed in the forward, no autograd graph of its own.
:func:`save_gradients` / :func:`input_gradients` are shared with the custom op's autograd.
"""

from __future__ import annotations

from typing import Tuple

import torch

from fastcl.ops.chunked import passes
from fastcl.ops.problem import Problem, compute_dtype, functorch_transforms_active, in_dtype, index_range

Tensor = torch.Tensor

# F.normalize's defaults (eps of the clamped norm); folded for the dtypes the chunked backend computes in as they are
# (fp16 / bf16 rows are normalised in their own dtype by F.normalize first)
_NORMALIZE_EPS = 1e-12
FOLDED_NORMALIZE_DTYPES = (torch.float32, torch.float64)


def save_gradients(ctx, anchor, contrast, output) -> None:
    """Keep the ``(dA, dC)`` of ``output = (loss, dA, dC)`` for :func:`input_gradients`; ``anchor`` None: the
    anchors are the contrast rows."""
    ctx.anchors_are_contrast = anchor is None
    ctx.dtypes = (contrast.dtype if anchor is None else anchor.dtype, contrast.dtype)
    ctx.save_for_backward(output[1], output[2])


def input_gradients(ctx, grad_loss, grad_anchor, grad_contrast):
    """``(dA, dC)`` for the inputs from the stored gradients of ``grad_output = 1`` (:func:`save_gradients`): scaled
    by ``grad_loss`` out of place (a retained graph may run the backward again) and cast to the input dtypes. When
    the anchors are the contrast rows both roles' gradients go to the one input; an empty ``grad_contrast`` there
    means ``grad_anchor`` is already that input's whole gradient (folded by the forward)."""
    if ctx.anchors_are_contrast:
        total = grad_anchor if grad_contrast.dim() != 2 else torch.add(grad_anchor, grad_contrast)
        return None, in_dtype(total.mul(grad_loss), ctx.dtypes[1])
    grad_anchor = in_dtype(grad_anchor * grad_loss, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    grad_contrast = in_dtype(grad_contrast * grad_loss, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return grad_anchor, grad_contrast


def scale_gradient(anchor, contrast, grad_anchor, grad_contrast, inv_temperature: Tensor) -> Tensor:
    """``dL/du`` (0-dim) of the op's loss w.r.t. its inverse temperature ``u``, from the gradients it formed for
    ``grad_output = 1``: the loss depends on the rows only through ``u * A @ C.T``, so ``u dL/du = <A, dL/dA>``
    (Euler's relation for the scaled anchors), or ``<X, dL/dX> / 2`` when the anchors are the contrast rows
    (``anchor`` None; ``grad_contrast`` None, an empty marker, or the contrast role's share). One ``N x D``
    reduction, exact for every route and backend (the rows are the op's own: normalised where it normalises)."""
    dtype = grad_anchor.dtype
    if anchor is not None:
        return torch.linalg.vecdot(in_dtype(anchor, dtype), grad_anchor).sum() / inv_temperature
    rows = in_dtype(contrast, dtype)
    dot = torch.linalg.vecdot(rows, grad_anchor).sum()
    if grad_contrast is not None and grad_contrast.dim() == 2:
        dot = dot + torch.linalg.vecdot(rows, grad_contrast).sum()
    return dot / (2 * inv_temperature)


def _normalize_rows(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, denom, live)`` with ``y = x / denom`` and ``denom = max(|x_i|, eps)`` per row, as
    ``F.normalize(x, dim=-1)``; ``live [N, 1]`` marks the rows whose norm is not clamped."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    denom = norm.clamp_min(_NORMALIZE_EPS)
    return x / denom, denom, norm >= _NORMALIZE_EPS


def _normalize_backward(grad_y: Tensor, y: Tensor, denom: Tensor, live: Tensor) -> Tensor:
    """``dL/dx`` from ``dL/dy`` for ``y = F.normalize(x)``: ``(g - y (y . g)) / |x|``, or ``g / eps`` where the norm
    was clamped (``clamp_min`` passes no gradient to the norm below eps)."""
    radial = torch.linalg.vecdot(y, grad_y, dim=1)[:, None].mul_(live)
    return grad_y.addcmul(y, radial, value=-1.0).div_(denom)


def _fused_chunked(anchor, contrast, problem: Problem, normalize: bool, inv_temperature=None):
    """``(loss, dA, dC, dL/du)`` of the chunked op for grad_output = 1; when the anchors are the contrast rows
    (``anchor`` None) ``dC`` is an empty marker and ``dA`` that input's whole gradient. ``anchor`` and ``contrast``
    are the autograd inputs (the problem's own tensors, as autograd hands them over). With ``normalize`` they are
    raw rows, normalised here, and the gradients are those of the raw rows. ``dL/du`` (:func:`scale_gradient`)
    only for a tensor ``inv_temperature`` (a learnable temperature), else an empty marker."""
    if normalize:
        contrast, contrast_denom, contrast_live = _normalize_rows(contrast)
        if not problem.anchors_are_contrast:
            anchor, anchor_denom, anchor_live = _normalize_rows(anchor)
    if anchor is not problem.anchor or contrast is not problem.contrast:  # (as a torch.func transform hands them)
        problem = problem._replace(anchor=anchor, contrast=contrast)
    loss, grad_anchor, grad_contrast = passes.chunked_forward(problem, True)
    grad_scale = grad_anchor.new_empty(0)
    if inv_temperature is not None:  # (from the gradients of the normalised rows, before F.normalize's Jacobian)
        grad_scale = scale_gradient(problem.anchor, problem.contrast, grad_anchor, grad_contrast, inv_temperature)
    if normalize:
        if problem.anchors_are_contrast:
            grad_anchor = _normalize_backward(grad_anchor, contrast, contrast_denom, contrast_live)
        else:
            grad_anchor = _normalize_backward(grad_anchor, anchor, anchor_denom, anchor_live)
            grad_contrast = _normalize_backward(grad_contrast, contrast, contrast_denom, contrast_live)
    return loss, grad_anchor, grad_anchor.new_empty(0) if grad_contrast is None else grad_contrast, grad_scale


class _ChunkedFunction(torch.autograd.Function):
    """The eager chunked op under ``torch.func`` transforms (which need the setup_context form): outputs
    ``(loss, dA, dC, dL/du)`` of :func:`_fused_chunked` like the custom op, backward scales the stored gradients by
    ``grad_output``; no custom-op dispatch. A transform that differentiates through those gradients (a nested
    ``torch.func.grad`` or ``jacrev``: a second derivative) reaches them as outputs of this node, and the backward
    raises there, as ``create_graph=True`` does eagerly: it would otherwise treat them as constants."""

    forward = staticmethod(_fused_chunked)

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_gradients(ctx, inputs[0], inputs[1], output)
        ctx.grad_scale = output[3]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, grad_a, grad_c, grad_s):
        if grad_a is not None or grad_c is not None or grad_s is not None:
            raise RuntimeError(FIRST_DERIVATIVES_ONLY)
        if grad_loss is None:
            return (None,) * 5
        return *input_gradients(ctx, grad_loss, *ctx.saved_tensors), None, None, _scale_input_gradient(ctx, grad_loss)


# the error of a second derivative through the chunked backend (its nodes hold first derivatives as constants)
FIRST_DERIVATIVES_ONLY = (
    "fastcl's chunked backend forms first derivatives only: a second derivative through the loss (create_graph=True, "
    "nested torch.func transforms) would silently treat them as constants; use backend='reference' for that"
)


def _scale_input_gradient(ctx, grad_loss):
    """The gradient for the inverse temperature input (the last): ``grad_loss * dL/du``, or None."""
    return ctx.grad_scale * grad_loss if ctx.needs_input_grad[-1] else None


class _EagerChunkedFunction(torch.autograd.Function):
    """:class:`_ChunkedFunction` in the classic form (``ctx`` in forward, the loss its only output), used outside
    ``torch.func`` transforms: autograd builds it without binding the signature and with one output, ~0.15 ms a
    call less on a 2-core CPU (a quarter of a whole fwd+bwd at N = 64)."""

    @staticmethod
    def forward(ctx, anchor, contrast, problem, normalize, inv_temperature):
        loss, grad_anchor, grad_contrast, ctx.grad_scale = _fused_chunked(
            anchor, contrast, problem, normalize, inv_temperature
        )
        save_gradients(ctx, anchor, contrast, (loss, grad_anchor, grad_contrast))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the stored first derivatives would enter as constants
            raise RuntimeError(FIRST_DERIVATIVES_ONLY)
        grad_scale = _scale_input_gradient(ctx, grad_loss)
        return *input_gradients(ctx, grad_loss, *ctx.saved_tensors), None, None, grad_scale


def chunked_loss(problem: Problem, want_grad: bool, normalize: bool = False, inv_temperature=None) -> Tensor:
    """The chunked op eagerly; ``normalize`` (only with ``want_grad``) folds ``F.normalize`` of the inputs in.
    ``inv_temperature``: the differentiable ``u`` of a tensor temperature (``problem.inv_temperature`` is its
    detached value), or None."""
    if inv_temperature is not None and not inv_temperature.requires_grad:
        inv_temperature = None  # (a constant tensor: its value is in the problem, no dL/du to form)
    if want_grad and not normalize:
        one_positive = _one_positive(problem)
        if one_positive is not None:  # one positive per anchor, one block: cross-entropy with autograd is cheapest
            return _one_positive_loss(problem, one_positive, inv_temperature)
    if want_grad:
        args = (problem.anchor, problem.contrast, problem, normalize, inv_temperature)
        if functorch_transforms_active():
            return _ChunkedFunction.apply(*args)[0]
        return _EagerChunkedFunction.apply(*args)
    # (anchors that are the contrast rows take the half-matrix route forward: half the products)
    loss, _, _ = passes.chunked_forward(problem, False)
    return loss.to(compute_dtype(problem.contrast))


def _one_positive(problem: Problem):
    """Where each anchor's only positive is (``_paired_by_index``) for a one-way problem with distinct anchors, no
    mask, no excluded pair, and one block; else None. (For the two-way loss chunked's own single-block route,
    gradients formed in the forward, measured faster.)"""
    if problem.two_way or problem.anchors_are_contrast or problem.mask is not None or problem.self_offset is not None:
        return None
    if not 0 < problem.anchor.shape[0] * problem.contrast.shape[0] <= passes._SINGLE_BLOCK_PAIRS:
        return None
    return passes._paired_by_index(problem.anchor_labels, problem.contrast_labels, None, False)


def _one_positive_loss(problem: Problem, positive, inv_temperature=None):
    """The op's loss when anchor i's only positive is contrast ``positive[i]`` (or i: ``'diagonal'``) and no pair is
    excluded (one-way): ``scale * cross_entropy(s, positive)``, with autograd's backward. At small N (one block) the
    fewest ops: no weights, no gradients formed in the forward."""
    dtype = compute_dtype(problem.contrast)
    anchor = problem.anchor
    inverse = problem.inv_temperature if inv_temperature is None else inv_temperature  # (autograd: dL/du too)
    logits = torch.mm(in_dtype(anchor, dtype), in_dtype(problem.contrast, dtype).T).mul(inverse)
    target = index_range(anchor.shape[0], anchor.device) if isinstance(positive, str) else positive
    loss = torch.nn.functional.cross_entropy(logits, target)
    return loss * problem.scale if problem.scale != 1.0 else loss
