"""The one dispatch point of the contrastive op: backend resolution, ``normalize``, and the route to a backend.

The public API (:mod:`fastcl.functional`, :mod:`fastcl.losses`, :mod:`fastcl.distributed`) calls
:func:`contrastive_loss`; it builds the :class:`~fastcl.ops.problem.Problem` and hands it to the chunked backend
(eagerly :mod:`fastcl.ops.chunked.autograd`, else its custom op) or to the Triton backend (:mod:`fastcl.ops.triton`
through its custom op), both in :mod:`fastcl.ops.custom_ops`. The dense reference is called by the public API
itself (``backend='reference'``).
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

from fastcl.ops import custom_ops
from fastcl.ops import triton as triton_backend
from fastcl.ops.chunked.autograd import FOLDED_NORMALIZE_DTYPES, chunked_loss
from fastcl.ops.chunked.negatives import negatives_loss
from fastcl.ops.problem import TRITON_DTYPES, Problem, autocast_off, compute_dtype, functorch_transforms_active


def triton_available() -> bool:
    """Whether the Triton kernels import (a Triton new enough for them is installed)."""
    return triton_backend.available()


_warned_fallback = []


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``'auto'`` -> ``'triton'`` on CUDA tensors when the Triton kernels import, else ``'chunked'``; CUDA tensors
    that fall back to ``'chunked'`` for want of the kernels warn once per process, saying why. Under ``torch.func``
    transforms ``'auto'`` is ``'chunked'`` (on any device): the Triton backend runs as custom ops, whose autograd
    the transforms do not take, so ``'triton'`` is an error there."""
    if functorch_transforms_active():
        if backend == "triton":
            raise ValueError(
                "backend='triton' runs as torch.library custom ops, which torch.func transforms (grad, vjp, jacrev, "
                "vmap) cannot differentiate; use backend='chunked' (any device) or 'auto' under torch.func"
            )
        if backend == "auto":
            return "chunked"
    if backend != "auto":
        return backend
    if not (x.is_cuda and x.dtype in TRITON_DTYPES):
        return "chunked"
    ok, why = triton_backend.kernels_status()
    if ok:
        return "triton"
    if not _warned_fallback:
        _warned_fallback.append(why)
        warnings.warn(f"fastcl: backend='auto' uses 'chunked' on CUDA: {why}", RuntimeWarning, stacklevel=3)
    return "chunked"


def contrastive_loss(
    anchor: torch.Tensor,
    contrast: torch.Tensor,
    anchor_labels: Optional[torch.Tensor],
    contrast_labels: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    *,
    self_offset: Optional[int],
    temperature: Union[float, torch.Tensor],
    scale: Union[float, torch.Tensor],
    backend: str,
    two_way: bool = False,
    normalize: bool = False,
    negatives: Optional[torch.Tensor] = None,
    negative_labels: Optional[torch.Tensor] = None,
    in_batch: bool = True,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """Mean over anchors of ``loss_i`` (:mod:`fastcl.ops`) as an fp32 scalar; never allocates ``Na x Nc``.

    ``two_way=True`` returns the average of this direction and the reverse one (contrast rows anchoring over the
    anchor rows, labels swapped; CLIP's symmetric loss), sharing the similarity tiles where the backend can.

    Args:
        anchor: ``[Na, D]``; with ``self_offset = k`` anchor i is contrast row ``i + k`` (0 <= k <= Nc - Na). The
            same tensor object as ``contrast`` means the anchors are the contrast rows (one input: the gradients of
            both roles add up in it).
        contrast: ``[Nc, D]``, same dtype and device.
        anchor_labels, contrast_labels: int64 ``[Na]``, ``[Nc]``; or both None when ``mask`` is given.
        mask: float32 ``[B, B]`` positive weights, read at ``[i % B, j % B]``.
        temperature: ``t > 0``: a float, or a 0-dim floating tensor (with or without grad: a learnable
            temperature, e.g. ``1 / logit_scale``). A tensor goes to the op as ``u = 1 / t`` on the device
            (:func:`inverse_temperature`; no host sync), and the op's backward gives ``dL/du = <A, dL/dA> / u``
            (``<X, dL/dX> / (2u)`` when the anchors are the contrast rows): the loss depends on the embeddings only
            through ``u * A @ C.T``, so this one ``N x D`` reduction of the anchor gradient the op forms anyway is
            the exact derivative (no ``N x N`` pass, nothing added to the tiles).
        scale: multiplies every anchor's loss (``temperature / base_temperature`` for SupCon); a tensor (a
            learnable temperature's) multiplies the op's loss, so autograd takes its gradient.
        backend: ``'triton'`` or ``'chunked'`` (``'auto'`` resolved by :func:`resolve_backend`).
        normalize: L2-normalise the rows of ``anchor`` and ``contrast`` first (``F.normalize(x, dim=-1)``). The eager
            chunked backend folds it into its autograd node for fp32 / float64 inputs (its Jacobian applied to the
            gradients formed in the forward: no autograd graph of its own); elsewhere ``F.normalize`` runs first.
        negatives, negative_labels, in_batch, false_negative_margin: contrast columns beyond the batch and the margin
            (:class:`~fastcl.ops.problem.Problem`; one-way only). ``backend='chunked'`` takes them through the
            chunked extra-column pass (:mod:`fastcl.ops.chunked.negatives`: block rows x ``(Nc + M)`` at a time),
            ``backend='triton'`` as the kernels' second column range (``fastcl::contrastive_triton_extra``: the
            extra rows streamed after the batch columns, their gradient from the contrast-gradient kernel only when
            they require grad); neither forms an ``Na x (Nc + M)`` matrix. ``normalize`` normalises ``negatives``
            as well.

    Both backends run as one ``torch.ops.fastcl`` custom op while compiling (:mod:`fastcl.ops.custom_ops`), so
    ``torch.compile(fullgraph=True)`` traces the loss as a single node with symbolic sizes.
    """
    backend = resolve_backend(backend, contrast)
    if backend not in ("triton", "chunked"):
        raise ValueError(f"backend {backend!r} has no fused implementation here")
    with autocast_off(contrast.device):  # the op's own precision inside torch.autocast (autocast_off)
        # a tensor temperature: u = 1 / t as a tensor (the op's gradient flows to it); a tensor scale multiplies
        # the loss
        tensor_temperature = isinstance(temperature, torch.Tensor)
        inv_temperature = inverse_temperature(temperature, contrast) if tensor_temperature else None
        loss_scale = scale if isinstance(scale, torch.Tensor) else None
        problem = Problem(
            None if anchor is contrast else anchor,  # SupCon 'all' / NT-Xent: the anchors are the contrast rows
            contrast,
            anchor_labels,
            contrast_labels,
            mask,
            self_offset,
            1.0 / temperature if inv_temperature is None else inv_temperature.detach(),
            scale if loss_scale is None else 1.0,
            two_way,
            negatives,
            negative_labels,
            in_batch,
            false_negative_margin,
        )
        want_grad = torch.is_grad_enabled() and (
            anchor.requires_grad
            or contrast.requires_grad
            or (negatives is not None and negatives.requires_grad)
            or (inv_temperature is not None and inv_temperature.requires_grad)
        )
        if problem.has_extra_columns:
            problem = _normalized(problem) if normalize else problem
            if backend == "triton":
                loss = _triton_extra_columns_loss(problem, inv_temperature)
            else:
                loss = _extra_columns_loss(problem, want_grad, inv_temperature)
            return loss if loss_scale is None else loss * loss_scale.to(loss.dtype)
        eager_chunked = backend == "chunked" and not torch.compiler.is_compiling()
        fold_normalize = normalize and eager_chunked and want_grad and contrast.dtype in FOLDED_NORMALIZE_DTYPES
        if normalize and not fold_normalize:
            problem = _normalized(problem)
        if backend == "triton":
            triton_backend.check_inputs(problem.contrast)
            route = triton_backend.route(problem)
            precision = triton_backend.input_precision(problem.contrast.dtype)  # the backward's too
            problem = triton_backend.unit_column_stride(problem, route)
            loss = custom_ops.triton(problem, route, precision, inv_temperature)
        elif eager_chunked:
            # Eagerly the same computation without the custom op's dispatch (schema binding, the op's autograd
            # wrapper, output aliasing checks): ~0.5 ms a call on a 2-core CPU, as much as the whole loss at N = 64.
            loss = chunked_loss(problem, want_grad, fold_normalize, inv_temperature)
        else:
            loss = custom_ops.chunked(problem, want_grad, inv_temperature)
        return loss if loss_scale is None else loss * loss_scale.to(loss.dtype)


def inverse_temperature(temperature: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``u = 1 / t`` (0-dim, differentiable) on ``like``'s device in the op's compute dtype; NaN where ``t`` is not
    positive and finite, decided on the device (no host sync), so a bad learnable temperature gives a NaN loss
    (:func:`fastcl._validation.check_temperature` raises eagerly on CPU instead)."""
    inverse = torch.reciprocal(temperature.to(device=like.device, dtype=compute_dtype(like)))
    return torch.where(torch.isfinite(inverse) & (inverse > 0), inverse, float("nan"))


def _extra_columns_loss(problem: Problem, want_grad: bool, inv_temperature) -> torch.Tensor:
    """A problem with extra columns or a margin (:attr:`~fastcl.ops.problem.Problem.has_extra_columns`): the
    chunked extra-column pass, eagerly its autograd function, while compiling its custom op."""
    if torch.compiler.is_compiling():
        return custom_ops.chunked_negatives(problem, want_grad, inv_temperature)
    return negatives_loss(problem, want_grad, inv_temperature)


def _triton_extra_columns_loss(problem: Problem, inv_temperature) -> torch.Tensor:
    """A problem with extra columns or a margin on the Triton kernels' second column range (its custom op, eagerly
    too: nothing ``Na x (Nc + M)`` is formed)."""
    triton_backend.check_inputs(problem.contrast)
    route = triton_backend.extra_columns_route(problem)
    precision = triton_backend.input_precision(problem.contrast.dtype)
    problem = triton_backend.unit_column_stride(problem, route)
    return custom_ops.triton_extra(problem, route, precision, inv_temperature)


def _normalized(problem: Problem) -> Problem:
    """The problem with L2-normalised rows (``F.normalize(x, dim=-1)``), the anchors once when they are the
    contrast rows; extra rows (``negatives``) too."""
    normalize = torch.nn.functional.normalize
    contrast = normalize(problem.contrast, dim=-1)
    anchor = None if problem.anchors_are_contrast else normalize(problem.anchor, dim=-1)
    negatives = None if problem.negatives is None else normalize(problem.negatives, dim=-1)
    return problem._replace(anchor=anchor, contrast=contrast, negatives=negatives)
