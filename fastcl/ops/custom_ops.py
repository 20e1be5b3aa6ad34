"""Every ``torch.library`` custom op of fastcl, with its fake (shape) function and its autograd: one node each for
``torch.compile``.

``torch.library.custom_op`` rather than ``triton_op``: the Triton launchers pick autotuned configs and block sizes
in Python and also run under TRITON_INTERPRET on CPU tensors, and the chunked backend is plain PyTorch with a
Python loop over row blocks; an opaque op with a fake function serves both, keeps every kernel launch exactly as in
eager mode, and makes the graph independent of N (no recompile per batch size).

This is the one place where a :class:`~fastcl.ops.problem.Problem` is flattened to plain arguments (a schema takes
nothing else). An ``anchor`` of None means the anchors are the contrast rows, so no tensor is passed twice. The op
names and schemas stay exactly as they are: Inductor's graph cache keys a compiled graph on the schema.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastcl.ops import triton as triton_backend
from fastcl.ops.chunked import passes
from fastcl.ops.chunked.autograd import input_gradients, save_gradients, scale_gradient
from fastcl.ops.chunked.negatives import negatives_forward
from fastcl.ops.problem import Problem, compute_dtype, in_dtype

Tensor = torch.Tensor


def chunked(problem: Problem, want_grad: bool, inv_temperature: Optional[Tensor] = None) -> Tensor:
    """The loss of ``fastcl::contrastive_chunked`` on ``problem`` (its gradients, with ``want_grad``, kept for the
    op's backward); with a tensor ``inv_temperature`` (a learnable temperature: ``problem.inv_temperature`` is its
    value) that of ``fastcl::contrastive_chunked_learnable``, whose backward also gives ``dL/du``."""
    if inv_temperature is None:
        loss, _, _ = torch.ops.fastcl.contrastive_chunked(*problem.core, want_grad)
        return loss
    core = problem.core
    return torch.ops.fastcl.contrastive_chunked_learnable(*core[:6], inv_temperature, *core[7:], want_grad)[0]


def triton(problem: Problem, route: str, precision: str, inv_temperature: Optional[Tensor] = None) -> Tensor:
    """The loss of ``fastcl::contrastive_triton`` on ``problem`` (``anchor`` None exactly for the route
    ``ANCHORS_ARE_CONTRAST``; ``problem.two_way`` is carried by the route)."""
    if inv_temperature is not None:  # a learnable temperature: u a Tensor input, its gradient from the backward
        return torch.ops.fastcl.contrastive_triton_learnable(*problem[:6], inv_temperature, problem.scale, route,
                                                             precision)[0]  # fmt: skip
    return torch.ops.fastcl.contrastive_triton(*problem.core[:-1], route, precision)[0]


# ----------------------------------------------------------------------------------------------------------------
# fastcl::contrastive_chunked
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcl::contrastive_chunked", mutates_args=())
def _contrastive_chunked(
    anchor: Optional[Tensor],
    contrast: Tensor,
    anchor_labels: Optional[Tensor],
    contrast_labels: Optional[Tensor],
    mask: Optional[Tensor],
    self_offset: Optional[int],
    inv_temperature: float,
    scale: float,
    two_way: bool,
    want_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(loss, dL/dA, dL/dC)`` for grad_output = 1 in the compute dtype (empty ``[0]`` without ``want_grad``). When
    the anchors are the contrast rows (``anchor`` None) the sum of the two is the one input's gradient, and a route
    that forms only that sum returns it as ``dL/dA`` with zeros as ``dL/dC``: the output shapes stay those of
    earlier releases, which matters because Inductor's graph cache keys a compiled graph on the op's schema, not on
    its fake function."""
    problem = Problem(
        anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, two_way
    )
    return _chunked_outputs(problem, want_grad)


def _chunked_outputs(problem: Problem, want_grad: bool):
    """The outputs of ``fastcl::contrastive_chunked`` (its docstring) for ``problem``."""
    contrast = problem.contrast
    loss, grad_anchor, grad_contrast = passes.chunked_forward(problem, want_grad)
    dtype = compute_dtype(contrast)
    loss = loss.to(dtype)
    if want_grad and grad_contrast is None:  # one input, its whole gradient in grad_anchor (docstring)
        grad_contrast = torch.zeros_like(grad_anchor)
    if not want_grad:
        grad_anchor = grad_contrast = None
    empty = contrast.new_empty(0, dtype=dtype)
    grad_anchor = empty.clone() if grad_anchor is None else grad_anchor
    return loss, grad_anchor, empty if grad_contrast is None else grad_contrast


@_contrastive_chunked.register_fake
def _contrastive_chunked_fake(anchor, contrast, *_settings_and_want_grad):
    want_grad = _settings_and_want_grad[-1]
    dtype = compute_dtype(contrast)
    rows = contrast if anchor is None else anchor
    if not want_grad:
        empty = contrast.new_empty(0, dtype=dtype)
        return contrast.new_empty((), dtype=dtype), empty, empty.clone()
    return (
        contrast.new_empty((), dtype=dtype),
        rows.new_empty(rows.shape, dtype=dtype),
        contrast.new_empty(contrast.shape, dtype=dtype),
    )


def _chunked_setup(ctx, inputs, output):
    save_gradients(ctx, inputs[0], inputs[1], output)


def _chunked_backward(ctx, grad_loss, _grad_a, _grad_c):
    grad_anchor, grad_contrast = ctx.saved_tensors
    if grad_contrast.dim() != 2:
        raise RuntimeError("fastcl::contrastive_chunked was called with want_grad=False, so it has no gradient")
    return *input_gradients(ctx, grad_loss, grad_anchor, grad_contrast), *([None] * 8)


_contrastive_chunked.register_autograd(_chunked_backward, setup_context=_chunked_setup)


# ----------------------------------------------------------------------------------------------------------------
# fastcl::contrastive_chunked_learnable: the same op with a tensor inverse temperature (a learnable temperature)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcl::contrastive_chunked_learnable", mutates_args=())
def _contrastive_chunked_learnable(
    anchor: Optional[Tensor],
    contrast: Tensor,
    anchor_labels: Optional[Tensor],
    contrast_labels: Optional[Tensor],
    mask: Optional[Tensor],
    self_offset: Optional[int],
    inv_temperature: Tensor,
    scale: float,
    two_way: bool,
    want_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``fastcl::contrastive_chunked`` with ``u = 1 / t`` a 0-dim tensor in the compute dtype (read on its device,
    no host sync): ``(loss, dL/dA, dL/dC, dL/du)`` for grad_output = 1 (``dL/du`` 0-dim, from
    :func:`~fastcl.ops.chunked.autograd.scale_gradient`; the three gradients empty ``[0]`` without
    ``want_grad``)."""
    problem = Problem(
        anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, two_way
    )
    loss, grad_anchor, grad_contrast = _chunked_outputs(problem, want_grad)
    if not want_grad:
        return loss, grad_anchor, grad_contrast, grad_contrast.clone()
    return (
        loss,
        grad_anchor,
        grad_contrast,
        scale_gradient(anchor, contrast, grad_anchor, grad_contrast, inv_temperature),
    )


@_contrastive_chunked_learnable.register_fake
def _contrastive_chunked_learnable_fake(anchor, contrast, *_settings_and_want_grad):
    loss, grad_anchor, grad_contrast = _contrastive_chunked_fake(anchor, contrast, *_settings_and_want_grad)
    want_grad = _settings_and_want_grad[-1]
    return loss, grad_anchor, grad_contrast, loss.new_empty(()) if want_grad else loss.new_empty(0)


def _chunked_learnable_setup(ctx, inputs, output):
    save_gradients(ctx, inputs[0], inputs[1], output)
    ctx.save_for_backward(*output[1:])


def _chunked_learnable_backward(ctx, grad_loss, _grad_a, _grad_c, _grad_s):
    grad_anchor, grad_contrast, grad_scale = ctx.saved_tensors
    if grad_contrast.dim() != 2:
        raise RuntimeError("fastcl::contrastive_chunked_learnable was called with want_grad=False: no gradient")
    grad_anchor, grad_contrast = input_gradients(ctx, grad_loss, grad_anchor, grad_contrast)
    grad_scale = grad_scale * grad_loss if ctx.needs_input_grad[6] else None
    return grad_anchor, grad_contrast, None, None, None, None, grad_scale, None, None, None


_contrastive_chunked_learnable.register_autograd(_chunked_learnable_backward, setup_context=_chunked_learnable_setup)


# ----------------------------------------------------------------------------------------------------------------
# fastcl::contrastive_extra_columns: the chunked extra-column pass (negatives beyond the batch, the MoCo row form,
# the false-negative margin; fastcl.ops.chunked.negatives)
# ----------------------------------------------------------------------------------------------------------------


def chunked_negatives(problem: Problem, want_grad: bool, inv_temperature: Optional[Tensor] = None) -> Tensor:
    """The loss of ``fastcl::contrastive_extra_columns`` on ``problem`` (a float temperature enters as a 0-dim
    tensor; with a tensor ``inv_temperature`` the op's backward also gives ``dL/du``)."""
    contrast = problem.contrast
    if inv_temperature is None:
        value = problem.inv_temperature
        inv_temperature = torch.full((), value, dtype=compute_dtype(contrast), device=contrast.device)
    negatives = problem.negatives
    return torch.ops.fastcl.contrastive_extra_columns(
        problem.anchor, contrast, negatives, problem.anchor_labels, problem.contrast_labels,
        problem.negative_labels, problem.self_offset, inv_temperature, problem.scale, problem.in_batch,
        problem.false_negative_margin, want_grad, want_grad and negatives is not None and negatives.requires_grad,
    )[0]  # fmt: skip


@torch.library.custom_op("fastcl::contrastive_extra_columns", mutates_args=())
def _contrastive_extra_columns(
    anchor: Optional[Tensor],
    contrast: Tensor,
    negatives: Optional[Tensor],
    anchor_labels: Tensor,
    contrast_labels: Tensor,
    negative_labels: Optional[Tensor],
    self_offset: Optional[int],
    inv_temperature: Tensor,
    scale: float,
    in_batch: bool,
    false_negative_margin: Optional[float],
    want_grad: bool,
    grad_negatives: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, dL/dA, dL/dC, dL/dQ, dL/du)`` for grad_output = 1 in the compute dtype: ``dL/dA`` empty ``[0]``
    when the anchors are the contrast rows (``anchor`` None: ``dL/dC`` is that input's whole gradient), ``dL/dQ``
    empty unless ``grad_negatives``, all four empty without ``want_grad``."""
    problem = Problem(
        anchor, contrast, anchor_labels, contrast_labels, None, self_offset, inv_temperature, scale, False,
        negatives, negative_labels, in_batch, false_negative_margin,
    )  # fmt: skip
    loss, grad_anchor, grad_contrast, grad_extra = negatives_forward(problem, want_grad, grad_negatives)
    empty = contrast.new_empty(0, dtype=compute_dtype(contrast))
    if not want_grad:
        return loss, empty, empty.clone(), empty.clone(), empty.clone()
    rows = in_dtype(problem.anchor_rows, grad_anchor.dtype)
    grad_scale = torch.linalg.vecdot(rows, grad_anchor).sum() / inv_temperature
    if anchor is None:
        grad_anchor, grad_contrast = empty.clone(), grad_contrast.add_(grad_anchor)
    return loss, grad_anchor, grad_contrast, empty.clone() if grad_extra is None else grad_extra, grad_scale


@_contrastive_extra_columns.register_fake
def _contrastive_extra_columns_fake(anchor, contrast, negatives, *settings):
    want_grad, grad_negatives = settings[-2], settings[-1]
    dtype = compute_dtype(contrast)
    loss, empty = contrast.new_empty((), dtype=dtype), contrast.new_empty(0, dtype=dtype)
    if not want_grad:
        return loss, empty, empty.clone(), empty.clone(), empty.clone()
    grad_anchor = empty.clone() if anchor is None else anchor.new_empty(anchor.shape, dtype=dtype)
    grad_extra = negatives.new_empty(negatives.shape, dtype=dtype) if grad_negatives else empty.clone()
    return loss, grad_anchor, contrast.new_empty(contrast.shape, dtype=dtype), grad_extra, loss.new_empty(())


def _extra_columns_setup(ctx, inputs, output):
    anchor, contrast, negatives = inputs[:3]
    ctx.dtypes = tuple(None if x is None else x.dtype for x in (anchor, contrast, negatives))
    ctx.save_for_backward(*output[1:])


def _extra_columns_backward(ctx, grad_loss, *_grad_outputs):
    grads = ctx.saved_tensors
    if grads[1].dim() != 2:
        raise RuntimeError("fastcl::contrastive_extra_columns was called with want_grad=False: no gradient")
    needs = ctx.needs_input_grad
    out = [None] * 13
    for index in range(3):
        if needs[index] and grads[index].dim() == 2:
            out[index] = in_dtype(grads[index] * grad_loss, ctx.dtypes[index])
    out[7] = grads[3] * grad_loss if needs[7] else None
    return tuple(out)


_contrastive_extra_columns.register_autograd(_extra_columns_backward, setup_context=_extra_columns_setup)


# ----------------------------------------------------------------------------------------------------------------
# fastcl::contrastive_triton and fastcl::contrastive_triton_backward
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcl::contrastive_triton", mutates_args=())
def _contrastive_triton(
    anchor: Optional[Tensor],
    contrast: Tensor,
    anchor_labels: Optional[Tensor],
    contrast_labels: Optional[Tensor],
    mask: Optional[Tensor],
    self_offset: Optional[int],
    inv_temperature: float,
    scale: float,
    route: str,
    precision: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, pos_weight [Na], lse [Na], col_pos_weight [Nc] or [0], col_lse [Nc] or [0])`` (``triton_forward``;
    ``precision`` the dots' input precision, recorded for the backward)."""
    problem = Problem(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale)
    return triton_backend.forward(problem, route, precision)


@_contrastive_triton.register_fake
def _contrastive_triton_fake(anchor, contrast, *_settings_route_precision):
    route = _settings_route_precision[-2]
    n_anchor = contrast.shape[0] if anchor is None else anchor.shape[0]
    n_col = contrast.shape[0] if route == triton_backend.TWO_WAY else 0
    f32 = torch.float32
    return (
        contrast.new_empty((), dtype=f32),
        contrast.new_empty(n_anchor, dtype=f32),
        contrast.new_empty(n_anchor, dtype=f32),
        contrast.new_empty(n_col, dtype=f32),
        contrast.new_empty(n_col, dtype=f32),
    )


@torch.library.custom_op("fastcl::contrastive_triton_backward", mutates_args=())
def _contrastive_triton_backward(
    grad_output: Tensor,
    anchor: Optional[Tensor],
    contrast: Tensor,
    anchor_labels: Optional[Tensor],
    contrast_labels: Optional[Tensor],
    mask: Optional[Tensor],
    pos_weight: Tensor,
    lse: Tensor,
    col_pos_weight: Tensor,
    col_lse: Tensor,
    self_offset: Optional[int],
    inv_temperature: float,
    scale: float,
    route: str,
    precision: str,
    need_anchor: bool,
    need_contrast: bool,
) -> Tuple[Tensor, Tensor]:
    """``(dA, dC)`` in the input dtypes (empty ``[0]`` where not needed; with ``anchor`` None the whole gradient
    is ``dC``)."""
    problem = Problem(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale)
    residuals = (pos_weight, lse, col_pos_weight, col_lse)
    return triton_backend.backward(grad_output, problem, residuals, route, precision, need_anchor, need_contrast)


@_contrastive_triton_backward.register_fake
def _contrastive_triton_backward_fake(grad_output, anchor, contrast, *_rest):
    need_anchor, need_contrast = _rest[-2], _rest[-1]
    if anchor is None:
        return contrast.new_empty(0), contrast.new_empty(contrast.shape)
    return (
        anchor.new_empty(anchor.shape) if need_anchor else contrast.new_empty(0),
        contrast.new_empty(contrast.shape) if need_contrast else contrast.new_empty(0),
    )


def _triton_setup(ctx, inputs, output):
    anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale = inputs[:8]
    route, precision = inputs[8:]
    ctx.save_for_backward(anchor, contrast, anchor_labels, contrast_labels, mask, *output[1:])
    ctx.settings = (self_offset, inv_temperature, scale, route, precision, anchor is None)


def _triton_backward(ctx, grad_loss, *_grad_residuals):
    anchor, contrast, anchor_labels, contrast_labels, mask, *residuals = ctx.saved_tensors
    self_offset, inv_temperature, scale, route, precision, anchors_are_contrast = ctx.settings
    need_anchor = not anchors_are_contrast and ctx.needs_input_grad[0]
    need_contrast = ctx.needs_input_grad[1] or anchors_are_contrast
    grad_anchor, grad_contrast = torch.ops.fastcl.contrastive_triton_backward(
        grad_loss,
        None if anchors_are_contrast else anchor,
        contrast,
        anchor_labels,
        contrast_labels,
        mask,
        *residuals,
        self_offset,
        inv_temperature,
        scale,
        route,
        precision,
        need_anchor,
        need_contrast,
    )
    return (
        grad_anchor if need_anchor else None,
        grad_contrast if ctx.needs_input_grad[1] else None,
        *([None] * 8),
    )


_contrastive_triton.register_autograd(_triton_backward, setup_context=_triton_setup)


# ----------------------------------------------------------------------------------------------------------------
# fastcl::contrastive_triton_learnable and its backward: the inverse temperature a Tensor (a learnable temperature)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcl::contrastive_triton_learnable", mutates_args=())
def _contrastive_triton_learnable(
    anchor: Optional[Tensor],
    contrast: Tensor,
    anchor_labels: Optional[Tensor],
    contrast_labels: Optional[Tensor],
    mask: Optional[Tensor],
    self_offset: Optional[int],
    inv_temperature: Tensor,
    scale: float,
    route: str,
    precision: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fastcl::contrastive_triton`` with ``u = 1 / t`` a 0-dim fp32 tensor, which the kernels read on the device."""
    problem = Problem(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale)
    return triton_backend.forward(problem, route, precision)


_contrastive_triton_learnable.register_fake(_contrastive_triton_fake)


@torch.library.custom_op("fastcl::contrastive_triton_learnable_backward", mutates_args=())
def _contrastive_triton_learnable_backward(
    grad_output: Tensor,
    anchor: Optional[Tensor],
    contrast: Tensor,
    anchor_labels: Optional[Tensor],
    contrast_labels: Optional[Tensor],
    mask: Optional[Tensor],
    pos_weight: Tensor,
    lse: Tensor,
    col_pos_weight: Tensor,
    col_lse: Tensor,
    self_offset: Optional[int],
    inv_temperature: Tensor,
    scale: float,
    route: str,
    precision: str,
    need_anchor: bool,
    need_contrast: bool,
) -> Tuple[Tensor, Tensor]:
    """``fastcl::contrastive_triton_backward`` with the inverse temperature a 0-dim tensor."""
    problem = Problem(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale)
    residuals = (pos_weight, lse, col_pos_weight, col_lse)
    return triton_backend.backward(grad_output, problem, residuals, route, precision, need_anchor, need_contrast)


_contrastive_triton_learnable_backward.register_fake(_contrastive_triton_backward_fake)


def _triton_learnable_setup(ctx, inputs, output):
    anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale = inputs[:8]
    route, precision = inputs[8:]
    ctx.save_for_backward(anchor, contrast, anchor_labels, contrast_labels, mask, *output[1:], inv_temperature)
    ctx.settings = (self_offset, scale, route, precision, anchor is None)


def _triton_learnable_backward(ctx, grad_loss, *_grad_residuals):
    """The input gradients, and ``dL/du = <A, dL/dA> / u`` (``<X, dL/dX> / (2u)`` when the anchors are the contrast
    rows) from the backward's own gradients (:func:`~fastcl.ops.chunked.autograd.scale_gradient`): the anchors'
    gradient is formed when ``u`` needs one even if the anchors do not."""
    anchor, contrast, anchor_labels, contrast_labels, mask, *residuals, inv_temperature = ctx.saved_tensors
    self_offset, scale, route, precision, anchors_are_contrast = ctx.settings
    need_scale = ctx.needs_input_grad[6]
    need_anchor = not anchors_are_contrast and (ctx.needs_input_grad[0] or need_scale)
    need_contrast = ctx.needs_input_grad[1] or anchors_are_contrast
    grad_anchor, grad_contrast = torch.ops.fastcl.contrastive_triton_learnable_backward(
        grad_loss, None if anchors_are_contrast else anchor, contrast, anchor_labels, contrast_labels, mask,
        *residuals, self_offset, inv_temperature, scale, route, precision, need_anchor, need_contrast,
    )  # fmt: skip
    grad_scale = None
    if need_scale:  # (the gradients already carry grad_loss)
        rows, grad_rows = (contrast, grad_contrast) if anchors_are_contrast else (anchor, grad_anchor)
        dot = torch.linalg.vecdot(rows.to(torch.float32), grad_rows.to(torch.float32)).sum()
        grad_scale = (dot / (2 * inv_temperature if anchors_are_contrast else inv_temperature)).to(
            inv_temperature.dtype
        )
    return (
        grad_anchor if not anchors_are_contrast and ctx.needs_input_grad[0] else None,
        grad_contrast if ctx.needs_input_grad[1] else None,
        None, None, None, None, grad_scale, None, None, None,
    )  # fmt: skip


_contrastive_triton_learnable.register_autograd(_triton_learnable_backward, setup_context=_triton_learnable_setup)


# ----------------------------------------------------------------------------------------------------------------
# fastcl::contrastive_triton_extra and its backward: the Triton kernels with extra contrast columns (negatives beyond
# the batch, the MoCo row form, the false-negative margin; the kernels' second column range)
# ----------------------------------------------------------------------------------------------------------------


def triton_extra(problem: Problem, route: str, precision: str, inv_temperature: Optional[Tensor] = None) -> Tensor:
    """The loss of ``fastcl::contrastive_triton_extra`` on ``problem`` (``anchor`` None exactly for the route
    ``ANCHORS_ARE_CONTRAST``); a tensor ``inv_temperature`` (a learnable temperature: ``problem.inv_temperature``
    is its value) is read on the device and gets ``dL/du`` from the op's backward."""
    value = 0.0 if inv_temperature is not None else float(problem.inv_temperature)
    return torch.ops.fastcl.contrastive_triton_extra(
        problem.anchor, problem.contrast, problem.negatives, problem.anchor_labels, problem.contrast_labels,
        problem.negative_labels, problem.self_offset, value, inv_temperature, problem.scale, problem.in_batch,
        problem.false_negative_margin, route, precision,
    )[0]  # fmt: skip


def _extra_problem(anchor, contrast, negatives, anchor_labels, contrast_labels, negative_labels, self_offset,
                   inv_temperature, learnable_inv_temperature, scale, in_batch, false_negative_margin) -> Problem:  # fmt: skip
    u = inv_temperature if learnable_inv_temperature is None else learnable_inv_temperature
    return Problem(
        anchor, contrast, anchor_labels, contrast_labels, None, self_offset, u, scale, False, negatives,
        negative_labels, in_batch, false_negative_margin,
    )  # fmt: skip


@torch.library.custom_op("fastcl::contrastive_triton_extra", mutates_args=())
def _contrastive_triton_extra(
    anchor: Optional[Tensor],
    contrast: Tensor,
    negatives: Optional[Tensor],
    anchor_labels: Tensor,
    contrast_labels: Tensor,
    negative_labels: Optional[Tensor],
    self_offset: Optional[int],
    inv_temperature: float,
    learnable_inv_temperature: Optional[Tensor],
    scale: float,
    in_batch: bool,
    false_negative_margin: Optional[float],
    route: str,
    precision: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, pos_weight [Na], lse [Na], positive_dots [Na] or [0])`` (``triton_extra_forward``; the dots with each
    anchor's positive only with ``in_batch=False`` or a margin). ``learnable_inv_temperature``: ``u = 1 / t`` a
    0-dim fp32 tensor read on the device (``inv_temperature`` is then ignored), whose gradient the backward gives."""
    problem = _extra_problem(anchor, contrast, negatives, anchor_labels, contrast_labels, negative_labels,
                             self_offset, inv_temperature, learnable_inv_temperature, scale, in_batch,
                             false_negative_margin)  # fmt: skip
    return triton_backend.extra_columns_forward(problem, route, precision)


@_contrastive_triton_extra.register_fake
def _contrastive_triton_extra_fake(anchor, contrast, negatives, *settings):
    in_batch, margin = settings[7], settings[8]
    n_anchor = contrast.shape[0] if anchor is None else anchor.shape[0]
    f32 = torch.float32
    positive_dots = n_anchor if (not in_batch or margin is not None) else 0
    return (
        contrast.new_empty((), dtype=f32),
        contrast.new_empty(n_anchor, dtype=f32),
        contrast.new_empty(n_anchor, dtype=f32),
        contrast.new_empty(positive_dots, dtype=f32),
    )


@torch.library.custom_op("fastcl::contrastive_triton_extra_backward", mutates_args=())
def _contrastive_triton_extra_backward(
    grad_output: Tensor,
    anchor: Optional[Tensor],
    contrast: Tensor,
    negatives: Optional[Tensor],
    anchor_labels: Tensor,
    contrast_labels: Tensor,
    negative_labels: Optional[Tensor],
    pos_weight: Tensor,
    lse: Tensor,
    positive_dots: Tensor,
    self_offset: Optional[int],
    inv_temperature: float,
    learnable_inv_temperature: Optional[Tensor],
    scale: float,
    in_batch: bool,
    false_negative_margin: Optional[float],
    route: str,
    precision: str,
    need_anchor: bool,
    need_contrast: bool,
    need_negatives: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dA, dC, dQ)`` in the input dtypes (empty ``[0]`` where not needed; with ``anchor`` None the whole gradient
    of the one input is ``dC``)."""
    problem = _extra_problem(anchor, contrast, negatives, anchor_labels, contrast_labels, negative_labels,
                             self_offset, inv_temperature, learnable_inv_temperature, scale, in_batch,
                             false_negative_margin)  # fmt: skip
    residuals = (pos_weight, lse, positive_dots)
    needs = (need_anchor, need_contrast, need_negatives)
    return triton_backend.extra_columns_backward(grad_output, problem, residuals, route, precision, needs)


@_contrastive_triton_extra_backward.register_fake
def _contrastive_triton_extra_backward_fake(grad_output, anchor, contrast, negatives, *rest):
    need_anchor, need_contrast, need_negatives = rest[-3:]
    empty = contrast.new_empty(0)
    grad_anchor = anchor.new_empty(anchor.shape) if anchor is not None and need_anchor else empty.clone()
    grad_contrast = contrast.new_empty(contrast.shape) if anchor is None or need_contrast else empty.clone()
    grad_extra = negatives.new_empty(negatives.shape) if negatives is not None and need_negatives else empty.clone()
    return grad_anchor, grad_contrast, grad_extra


def _triton_extra_setup(ctx, inputs, output):
    anchor, contrast, negatives, anchor_labels, contrast_labels, negative_labels = inputs[:6]
    self_offset, inv_temperature, learnable, scale, in_batch, margin, route, precision = inputs[6:]
    ctx.save_for_backward(
        anchor, contrast, negatives, anchor_labels, contrast_labels, negative_labels, *output[1:], learnable
    )
    ctx.settings = (self_offset, inv_temperature, scale, in_batch, margin, route, precision)


def _triton_extra_backward(ctx, grad_loss, *_grad_residuals):
    """The input gradients, and with a learnable temperature ``dL/du`` from them (the loss depends on the rows only
    through ``u * A @ [C; Q].T``, the margin's mask being piecewise constant): ``<A, dL/dA> / u``, or when the
    anchors are the contrast rows (one kernel forms both roles' sum) ``(<X, dL/dX> + <Q, dL/dQ>) / (2u)``, which
    forms the extra rows' gradient for it even when they need none."""
    anchor, contrast, negatives, anchor_labels, contrast_labels, negative_labels, *residuals, learnable = (
        ctx.saved_tensors
    )
    self_offset, inv_temperature, scale, in_batch, margin, route, precision = ctx.settings
    needs = ctx.needs_input_grad
    anchors_are_contrast = anchor is None
    need_scale = learnable is not None and needs[8]
    need_anchor = not anchors_are_contrast and (needs[0] or need_scale)
    need_contrast = needs[1] or anchors_are_contrast
    need_negatives = negatives is not None and (needs[2] or (need_scale and anchors_are_contrast))
    grad_anchor, grad_contrast, grad_extra = torch.ops.fastcl.contrastive_triton_extra_backward(
        grad_loss, anchor, contrast, negatives, anchor_labels, contrast_labels, negative_labels, *residuals,
        self_offset, inv_temperature, learnable, scale, in_batch, margin, route, precision, need_anchor,
        need_contrast, need_negatives,
    )  # fmt: skip
    grad_scale = None
    if need_scale:  # (the gradients already carry grad_loss)
        f32 = torch.float32
        if anchors_are_contrast:
            dot = torch.linalg.vecdot(contrast.to(f32), grad_contrast.to(f32)).sum()
            if negatives is not None:
                dot = dot + torch.linalg.vecdot(negatives.to(f32), grad_extra.to(f32)).sum()
            grad_scale = dot / (2 * learnable)
        else:
            grad_scale = torch.linalg.vecdot(anchor.to(f32), grad_anchor.to(f32)).sum() / learnable
        grad_scale = grad_scale.to(learnable.dtype)
    return (
        grad_anchor if need_anchor and needs[0] else None,
        grad_contrast if needs[1] else None,
        grad_extra if negatives is not None and needs[2] else None,
        None, None, None, None, None, grad_scale, None, None, None, None, None,
    )  # fmt: skip


_contrastive_triton_extra.register_autograd(_triton_extra_backward, setup_context=_triton_extra_setup)


# ----------------------------------------------------------------------------------------------------------------
# fastcl::sigmoid_loss (the SigLIP op, both backends)
# ----------------------------------------------------------------------------------------------------------------


def sigmoid(problem, backend: str, precision: str, want_grad: bool) -> Tensor:
    """The loss of ``fastcl::sigmoid_loss`` on a :class:`~fastcl.ops.sigmoid.problem.SigmoidProblem` (its
    gradients, with ``want_grad``, formed by the same call and kept for the op's backward)."""
    return torch.ops.fastcl.sigmoid_loss(*problem, backend, precision, want_grad)[0]


@torch.library.custom_op("fastcl::sigmoid_loss", mutates_args=())
def _sigmoid_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    image_ids: Optional[Tensor],
    text_ids: Optional[Tensor],
    row_weight: Optional[Tensor],
    col_weight: Optional[Tensor],
    norm: float,
    pair_offset: int,
    backend: str,
    precision: str,
    want_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, dL/dimage, dL/dtext, dL/dscale, dL/dbias)`` for grad_output = 1, fp32 (float64 for float64 inputs);
    the gradients are empty ``[0]`` without ``want_grad``. ``backend`` is ``'chunked'`` or ``'triton'``
    (``precision`` the Triton dots' input precision)."""
    from fastcl.ops.sigmoid import chunked as sigmoid_chunked
    from fastcl.ops.sigmoid import triton as sigmoid_triton
    from fastcl.ops.sigmoid.problem import SigmoidProblem

    problem = SigmoidProblem(
        image, text, logit_scale, logit_bias, image_ids, text_ids, row_weight, col_weight, norm, pair_offset
    )
    if backend == "triton":
        outputs = sigmoid_triton.forward(problem, precision, want_grad)
    else:
        outputs = sigmoid_chunked.chunked_forward(problem, want_grad)
    if not want_grad:
        empty = outputs[0].new_empty(0)
        return outputs[0].clone(), empty, empty.clone(), empty.clone(), empty.clone()
    return tuple(t if t.is_contiguous() else t.contiguous() for t in outputs)


@_sigmoid_loss.register_fake
def _sigmoid_loss_fake(image, text, *_rest):
    want_grad = _rest[-1]
    dtype = torch.float64 if text.dtype == torch.float64 else torch.float32
    loss = text.new_empty((), dtype=dtype)
    if not want_grad:
        empty = text.new_empty(0, dtype=dtype)
        return loss, empty, empty.clone(), empty.clone(), empty.clone()
    return (
        loss,
        image.new_empty(image.shape, dtype=dtype),
        text.new_empty(text.shape, dtype=dtype),
        text.new_empty((), dtype=dtype),
        text.new_empty((), dtype=dtype),
    )


def _sigmoid_setup(ctx, inputs, output):
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    ctx.save_for_backward(*output[1:])


def _sigmoid_backward(ctx, grad_loss, *_grad_gradients):
    from fastcl.ops.sigmoid.autograd import input_gradients

    if ctx.saved_tensors[0].dim() != 2:
        raise RuntimeError("fastcl::sigmoid_loss was called with want_grad=False, so it has no gradient")
    grads = input_gradients(ctx.needs_input_grad[:4], ctx.dtypes, grad_loss, *ctx.saved_tensors, eager=False)
    return *grads, *([None] * 9)


_sigmoid_loss.register_autograd(_sigmoid_backward, setup_context=_sigmoid_setup)
