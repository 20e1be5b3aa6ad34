"""The chunked backend with contrast columns beyond the batch: a memory queue, shared hard negatives, a batch
restricted to each anchor's positive (MoCo), and the false-negative margin (:class:`~fastcl.ops.problem.Problem`'s
``negatives`` / ``negative_labels`` / ``in_batch`` / ``false_negative_margin``).

One pass over blocks of anchor rows. Each block's logits are two products, ``A_r @ C.T`` over the ``Nc`` batch
columns (or, with ``in_batch=False``, one dot product per row with its positive) and ``A_r @ Q.T`` over the ``M``
extra rows, joined into one ``[rows, Nc' + M]`` block (``Nc' = Nc`` or 1) whose log-sum-exp, positive sum and
``dL/ds`` are formed in place; nothing ``Na x (Nc + M)`` is kept. The gradients are formed in the same pass for
``grad_output = 1`` (the backward only scales them): ``dA_r = dS_b @ C + dS_q @ Q``, ``dC += dS_b.T @ A_r``, and
``dQ += dS_q.T @ A_r`` only when the extra rows require grad (MNRL's hard negatives): a detached queue costs its two
forward-direction products per block and nothing more.

Row ``i``'s loss is ``-scale / P_i * sum_j w_ij log softmax_j(s_ij)`` over the kept columns, ``w_ij = 1`` for a
positive (equal labels; a labelled extra row with the anchor's label included), ``P_i = max(W_i, 1)``: the op's
loss (:func:`~fastcl.ops.problem.row_losses`) with more columns.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fastcl.ops.chunked import passes
from fastcl.ops.problem import Problem, compute_dtype, grad_coefficients, in_dtype, row_losses

Tensor = torch.Tensor

_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)

# Bytes of one block's logits on an accelerator: the block's few [rows, Nc + M] temporaries stay a few times this
# (at Nc + M = 69,632 that is 120 rows, still a full-width GEMM on a GPU); on CPU the chunked backend's budget.
_ACCELERATOR_BLOCK_BYTES = 32 * 1024 * 1024


class _Columns(NamedTuple):
    """The problem's rows in the compute dtype, as the blocks read them."""

    anchor: Tensor  # [Na, D]
    contrast: Tensor  # [Nc, D]
    negatives: Tensor  # [M, D] (M may be 0)
    anchor_labels: Tensor  # [Na]
    contrast_labels: Tensor  # [Nc]
    negative_labels: Optional[Tensor]  # [M]
    inv_temperature: object  # float or 0-dim tensor
    margin: Optional[float]


def _columns(problem: Problem) -> _Columns:
    dtype = compute_dtype(problem.contrast)
    contrast = in_dtype(problem.contrast, dtype)
    negatives = problem.negatives
    negatives = contrast.new_zeros(0, contrast.shape[1]) if negatives is None else in_dtype(negatives, dtype)
    return _Columns(
        in_dtype(problem.anchor_rows, dtype),
        contrast,
        negatives,
        problem.anchor_labels,
        problem.contrast_labels,
        problem.negative_labels,
        problem.inv_temperature,
        problem.false_negative_margin,
    )


def _block_rows(n_anchor: int, n_columns: int, device: torch.device) -> int:
    budget = passes.block_bytes("cpu") if device.type == "cpu" else _ACCELERATOR_BLOCK_BYTES
    return max(1, min(n_anchor, max(16, budget // (4 * max(n_columns, 1)))))


def _block_logits(cols: _Columns, problem: Problem, start: int, stop: int):
    """``(logits [r, Nb + M], w_batch [r, Nb], w_extra [r, M] or None, Nb)`` of anchors ``start:stop`` (``Nb = Nc``,
    or 1 with ``in_batch=False``), excluded pairs at ``-inf`` (the self pair, columns beyond the margin) with
    weight 0."""
    scaled = cols.anchor[start:stop] * cols.inv_temperature  # (1 / t on the [r, D] rows, not on the logits)
    rows = torch.arange(start, stop, device=scaled.device)
    labels = cols.anchor_labels[start:stop]
    if problem.in_batch:
        batch = torch.mm(scaled, cols.contrast.T)
        w_batch = torch.eq(labels[:, None], cols.contrast_labels[None, :]).to(scaled.dtype)
    else:  # the positive's column only (contrast ids are arange(Nc): the label is the column)
        batch = torch.linalg.vecdot(scaled, cols.contrast[labels])[:, None]
        w_batch = scaled.new_ones(stop - start, 1)
    n_batch = batch.shape[1]
    logits = torch.cat([batch, torch.mm(scaled, cols.negatives.T)], 1)
    del batch
    w_extra = None
    if cols.negative_labels is not None:
        w_extra = torch.eq(labels[:, None], cols.negative_labels[None, :]).to(scaled.dtype)
    if problem.self_offset is not None:
        self_column = rows + problem.self_offset
        logits[rows - start, self_column] = float("-inf")
        w_batch[rows - start, self_column] = 0.0
    if cols.margin is not None:
        _drop_beyond_margin(logits, labels if problem.in_batch else torch.zeros_like(labels), cols)
    return logits, w_batch, w_extra, n_batch


def _drop_beyond_margin(logits: Tensor, positive_column: Tensor, cols: _Columns) -> None:
    """Column j leaves row i where ``s_ij > s_i,pos + m / t`` (the margin in similarity units), the positive kept;
    NaN scores compare false (kept: the loss stays NaN)."""
    local = torch.arange(logits.shape[0], device=logits.device)
    positive = logits[local, positive_column]
    drop = logits > (positive + cols.margin * cols.inv_temperature)[:, None]
    drop[local, positive_column] = False
    logits.masked_fill_(drop, float("-inf"))


def negatives_forward(problem: Problem, want_grad: bool, grad_negatives: bool):
    """``(loss, dA, dC, dQ)``: the mean loss (compute dtype) and, with ``want_grad``, the gradients for
    ``grad_output = 1`` of the anchor role, the batch-column role and (``grad_negatives``) the extra rows; else
    None. When the anchors are the contrast rows, ``dA`` and ``dC`` are the two roles of that one input."""
    cols = _columns(problem)
    n_anchor, n_columns = cols.anchor.shape[0], cols.contrast.shape[0] + cols.negatives.shape[0]
    total = cols.anchor.new_zeros(())
    grad_anchor = torch.empty_like(cols.anchor) if want_grad else None
    grad_contrast = torch.zeros_like(cols.contrast) if want_grad else None
    grad_extra = torch.zeros_like(cols.negatives) if want_grad and grad_negatives else None
    step = _block_rows(n_anchor, n_columns, cols.anchor.device)
    for start in range(0, n_anchor, step):
        stop = min(start + step, n_anchor)
        logits, w_batch, w_extra, n_batch = _block_logits(cols, problem, start, stop)
        pos_sum, weight = _positive_sums(logits[:, :n_batch], w_batch)
        if w_extra is not None:
            extra_sum, extra_weight = _positive_sums(logits[:, n_batch:], w_extra)
            pos_sum, weight = pos_sum + extra_sum, weight + extra_weight
        exps, sums, lse = _exponentials(logits)
        del logits
        total = total + row_losses(pos_sum, weight, lse, problem.scale).sum()
        if want_grad:
            grads = (grad_anchor, grad_contrast, grad_extra)
            _block_gradients(cols, problem, (start, stop), (exps, w_batch, w_extra, n_batch), (sums, weight), grads)
        del exps, w_batch, w_extra
    return total / n_anchor, grad_anchor, grad_contrast, grad_extra


def _positive_sums(logits: Tensor, w: Tensor):
    """``(sum_j w_ij s_ij, sum_j w_ij)`` per row, excluded (``-inf``) entries, whose weight is 0, counted as 0."""
    finite = torch.where(logits == float("-inf"), 0.0, logits)
    return torch.linalg.vecdot(w, finite), w.sum(1)


def _exponentials(logits: Tensor):
    """``(exps, sums, lse)``: ``exp(s_ij - max_i)`` in place of the logits, their row sums, and the row
    log-sum-exp (``-inf`` for a row with no column; its exps and sum are 0)."""
    row_max = logits.amax(1)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    exps = logits.sub_(shift[:, None]).exp_()
    sums = exps.sum(1)
    return exps, sums, shift + torch.log(sums)


def _block_gradients(cols: _Columns, problem: Problem, span, block, stats, grads) -> None:
    """Turn the block's exps into ``dL/ds`` in place and accumulate the three gradients (``dQ`` when asked)."""
    (start, stop), (exps, w_batch, w_extra, n_batch), (sums, weight) = span, block, stats
    grad_anchor, grad_contrast, grad_extra = grads
    coef_softmax, coef_pos = grad_coefficients(weight, problem.scale)
    factor = cols.inv_temperature / cols.anchor.shape[0]  # dL/d(a . c) = dL/ds / t, and the mean's 1 / Na
    coef_pos = coef_pos.mul_(factor)
    # softmax = exps / sums: one pass turns the exps into the softmax part of dL/ds (a row with no column: 0)
    row_factor = torch.where(sums == 0, 0.0, coef_softmax.mul_(factor) / sums)
    dlogits = exps.mul_(row_factor[:, None])
    dlogits[:, :n_batch].sub_(w_batch * coef_pos[:, None])
    if w_extra is not None:
        dlogits[:, n_batch:].sub_(w_extra * coef_pos[:, None])
    anchor = cols.anchor[start:stop]
    d_batch, d_extra = dlogits[:, :n_batch], dlogits[:, n_batch:]
    if problem.in_batch:
        grad_anchor[start:stop] = torch.mm(d_batch, cols.contrast)
        grad_contrast.addmm_(d_batch.T, anchor)
    else:
        positive = cols.anchor_labels[start:stop]
        grad_anchor[start:stop] = d_batch * cols.contrast[positive]
        grad_contrast.index_add_(0, positive, d_batch * anchor)
    grad_anchor[start:stop].addmm_(d_extra, cols.negatives)
    if grad_extra is not None:
        grad_extra.addmm_(d_extra.T, anchor)


class _NegativesFunction(torch.autograd.Function):
    """The extra-column op eagerly (the setup_context form, so ``torch.func`` transforms take it too): outputs
    ``(loss, dA, dC, dQ, dL/du)``, the gradients formed in the forward for ``grad_output = 1`` and scaled in the
    backward (``dA`` empty when the anchors are the contrast rows, ``dQ`` empty unless ``grad_negatives``, ``dL/du``
    empty without ``inv_temperature``). Inputs ``(anchor or None, contrast, negatives or None, problem, u or None,
    grad_negatives)``; ``u`` is a learnable temperature's ``1 / t`` (``dL/du = <A, dL/dA> / u``: the loss depends
    on the rows only through ``u * A @ [C; Q].T``, the margin's mask being piecewise constant)."""

    @staticmethod
    def forward(anchor, contrast, negatives, problem, inv_temperature, grad_negatives):
        problem = problem._replace(anchor=anchor, contrast=contrast, negatives=negatives)  # (as a transform hands them)
        loss, grad_anchor, grad_contrast, grad_extra = negatives_forward(problem, True, grad_negatives)
        grad_scale = grad_contrast.new_empty(0)
        if inv_temperature is not None:
            rows = in_dtype(problem.anchor_rows, grad_anchor.dtype)
            grad_scale = torch.linalg.vecdot(rows, grad_anchor).sum() / problem.inv_temperature
        if anchor is None:  # the anchors are the contrast rows: both roles' gradients go to the one input
            grad_anchor, grad_contrast = grad_contrast.new_empty(0), grad_contrast.add_(grad_anchor)
        grad_extra = grad_contrast.new_empty(0) if grad_extra is None else grad_extra
        return loss, grad_anchor, grad_contrast, grad_extra, grad_scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtypes = tuple(None if x is None else x.dtype for x in inputs[:3])
        ctx.save_for_backward(*output[1:])
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad_loss, *_grad_outputs):
        if torch.is_grad_enabled() and not _FUNCTORCH_ACTIVE():  # create_graph=True: would treat them as constants
            raise RuntimeError(
                "fastcl's chunked backend forms first derivatives only (create_graph=True would treat them as "
                "constants); use backend='reference' for a second derivative"
            )
        needs = ctx.needs_input_grad
        out = [None] * 6
        for index, grad in enumerate(ctx.saved_tensors[:3]):
            if needs[index] and grad.dim() == 2:
                out[index] = in_dtype(grad * grad_loss, ctx.dtypes[index])
        grad_scale = ctx.saved_tensors[3]
        out[4] = grad_scale * grad_loss if needs[4] and grad_scale.dim() == 0 else None
        return tuple(out)


def negatives_loss(problem: Problem, want_grad: bool, inv_temperature: Optional[Tensor] = None) -> Tensor:
    """The extra-column op eagerly (:class:`_NegativesFunction` with ``want_grad``, else the forward alone)."""
    if inv_temperature is not None and not inv_temperature.requires_grad:
        inv_temperature = None
    if not want_grad:
        return negatives_forward(problem, False, False)[0]
    negatives = problem.negatives
    grad_negatives = negatives is not None and negatives.requires_grad
    args = (problem.anchor, problem.contrast, negatives, problem, inv_temperature, grad_negatives)
    return _NegativesFunction.apply(*args)[0]
