"""The chunked backend with contrast columns beyond the batch: a memory queue, shared hard negatives, a batch
restricted to each anchor's positive (MoCo), and the false-negative margin (:class:`~fastcl.ops.problem.Problem`'s
``negatives`` / ``negative_labels`` / ``in_batch`` / ``false_negative_margin``).

One pass over blocks of anchor rows. Each block's logits are two products written side by side into one reused
``[rows, Nc' + M]`` buffer: ``A_r @ C.T`` over the ``Nc`` batch columns (or, with ``in_batch=False``, one dot
product per row with its positive: ``Nc' = 1``) and ``A_r @ Q.T`` over the ``M`` extra rows. The buffer is
exponentiated in place (no row max when every logit is small enough); nothing ``Na x (Nc + M)`` is kept. With
``in_batch`` the positive pairs never touch the block: their logit sums and their share of the gradients are class
sums over the columns that can be positive (the batch, and labelled extra rows), ``O((N + M) D)``; with
``in_batch=False`` each row's one positive is its first column. The gradients are formed in the
same pass for ``grad_output = 1`` (the backward only scales them), the softmax share through the block's exps with
the row factors on the ``[rows, D]`` sides: ``dA_r = f (E_b @ C + E_q @ Q)``, ``dC += E_b.T @ (f A_r)``, and
``dQ += E_q.T @ (f A_r)`` only when the extra rows require grad (MNRL's hard negatives): a detached queue costs its
two forward-direction products per block and nothing more.

Row ``i``'s loss is ``-scale / P_i * sum_j w_ij log softmax_j(s_ij)`` over the kept columns, ``w_ij = 1`` for a
positive (equal labels; a labelled extra row with the anchor's label included), ``P_i = max(W_i, 1)``: the op's
loss (:func:`~fastcl.ops.problem.row_losses`) with more columns.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fastcl.ops.chunked import passes
from fastcl.ops.chunked.autograd import FIRST_DERIVATIVES_ONLY
from fastcl.ops.problem import (
    Problem,
    compute_dtype,
    functorch_transforms_active,
    grad_coefficients,
    in_dtype,
    row_losses,
)

Tensor = torch.Tensor


# Bytes of one block's logits on an accelerator: the block's few [rows, Nc + M] temporaries stay a few times this
# (at Nc + M = 69,632 that is 120 rows, still a full-width GEMM on a GPU); on CPU the chunked backend's budget.
_ACCELERATOR_BLOCK_BYTES = 32 * 1024 * 1024
_MIN_BLOCK_ROWS, _MAX_BLOCK_BYTES = 64, 64 * 1024 * 1024
# Largest log of a softmax product's entry the shift-free path allows (fp32 overflows above 88.7, float64 709.8)
_PRODUCT_BOUND = {torch.float32: 80.0, torch.float64: 700.0}


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
    """Rows per block: the logits budget over ``4 (Nb + M)`` bytes, but at least 64 rows while such a block stays
    within 64 MiB, and never fewer than 16. Thinner products run far below the square-sgemm rate R: at D = 128 on
    one Xeon thread the two large ones ran at 0.43 / 0.63 R with 31 rows and 0.55 / 0.78 R with 64."""
    width = 4 * max(n_columns, 1)
    budget = passes.block_bytes("cpu") if device.type == "cpu" else _ACCELERATOR_BLOCK_BYTES
    least = min(_MIN_BLOCK_ROWS, max(16, _MAX_BLOCK_BYTES // width))
    return max(1, min(n_anchor, max(least, budget // width)))


def _shift_free(scaled_anchor: Tensor, cols: _Columns) -> bool:
    """Every logit small enough to exponentiate as it is (the bound of
    :func:`~fastcl.ops.chunked.passes._shift_free`, ``max|a| max|c| / t``, over the batch columns and the extra
    rows), and the softmax products ``E @ [C; Q]`` it feeds finite too: their entries are sums of up to
    ``Nc + M`` terms ``exp(s_ij) c_jk``, at most ``exp(bound) max|c| (Nc + M)``. Checked on CPU only (a scalar
    read); NaN and inf fail it."""
    columns = [c for c in (cols.contrast, cols.negatives) if c.shape[0] > 0]
    if scaled_anchor.device.type != "cpu" or scaled_anchor.shape[0] == 0 or not columns:
        return False
    column_norm = torch.stack([torch.linalg.vector_norm(c, dim=1).amax() for c in columns]).amax()
    bound = torch.linalg.vector_norm(scaled_anchor, dim=1).amax() * column_norm
    product = bound + torch.log(column_norm * sum(c.shape[0] for c in columns))
    dtype = scaled_anchor.dtype
    return bool((bound <= passes._SHIFT_FREE_BOUND[dtype]) & (product <= _PRODUCT_BOUND[dtype]))


def _column_positives(cols: _Columns, problem: Problem, scaled_anchor: Tensor):
    """``(positives, columns)``: the positive pairs of an ``in_batch`` problem as class sums over the columns that
    can be positive (:class:`~fastcl.ops.chunked.passes._Positives`): the batch columns, and the extra rows when
    they are labelled (``columns`` is then ``[C; Q]``, else ``C``)."""
    columns, labels = cols.contrast, cols.contrast_labels
    if cols.negative_labels is not None and cols.negatives.shape[0] > 0:
        columns = torch.cat([cols.contrast, cols.negatives])
        labels = torch.cat([cols.contrast_labels, cols.negative_labels.to(labels.dtype)])
    positives = passes._label_positives(scaled_anchor, columns, cols.anchor_labels, labels, problem.self_offset)
    return positives, columns


def _block_logits(logits: Tensor, cols: _Columns, problem: Problem, scaled: Tensor, start: int, stop: int) -> None:
    """Fill ``logits [r, Nb + M]`` for anchors ``start:stop`` (``scaled``: their rows times ``1 / t``): the batch
    columns (``Nb = Nc``, or with ``in_batch=False`` only the positive's, ``Nb = 1``), then the extra rows; excluded
    pairs (the self pair, columns beyond the margin) at ``-inf``."""
    n_batch = logits.shape[1] - cols.negatives.shape[0]
    labels = cols.anchor_labels[start:stop]
    if problem.in_batch:
        torch.mm(scaled, cols.contrast.T, out=logits[:, :n_batch])
    else:  # the positive's column only (contrast ids are arange(Nc): the label is the column)
        logits[:, 0] = torch.linalg.vecdot(scaled, cols.contrast[labels])
    if n_batch < logits.shape[1]:
        torch.mm(scaled, cols.negatives.T, out=logits[:, n_batch:])
    local = torch.arange(stop - start, device=scaled.device)
    if problem.self_offset is not None:
        logits[local, local + start + problem.self_offset] = float("-inf")
    if cols.margin is not None:
        _drop_beyond_margin(logits, labels if problem.in_batch else torch.zeros_like(labels), cols)


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
    None. When the anchors are the contrast rows, ``dA`` and ``dC`` are the two roles of that one input.

    Per block of anchor rows the batch and extra-row products are written side by side into one reused
    ``[r, Nb + M]`` buffer and exponentiated in place (without a row max when every logit is small enough,
    :func:`_shift_free`). With ``in_batch`` the positives never touch the block: their logit sums and their share
    of the gradients are class sums over the columns (``O((N + M) D)``); with ``in_batch=False`` each row's one
    positive is its first column. The softmax share of the gradients scales the ``[r, D]`` sides of its products
    (``dA_r = f (E @ [C; Q])``, ``dC += E_b^T (f A_r)``), so after the exp and its row sums only the products read
    the block."""
    cols = _columns(problem)
    n_anchor, n_extra = cols.anchor.shape[0], cols.negatives.shape[0]
    n_batch = cols.contrast.shape[0] if problem.in_batch else 1
    width = n_batch + n_extra
    scaled_anchor = cols.anchor * cols.inv_temperature
    shift_free = _shift_free(scaled_anchor, cols)
    positives = columns = None
    if problem.in_batch:
        positives, columns = _column_positives(cols, problem, scaled_anchor)
    labelled_extra = columns is not None and columns.shape[0] > cols.contrast.shape[0]
    grad_anchor = grad_columns = grad_extra = coef_pos_all = None
    if want_grad:
        grad_anchor = torch.empty_like(cols.anchor)
        # one buffer for the batch columns' and the extra rows' gradients: the labelled extra rows' positive share
        # is subtracted over [C; Q] at once
        n_grad_rows = cols.contrast.shape[0] + (n_extra if labelled_extra or grad_negatives else 0)
        grad_columns = cols.contrast.new_zeros(n_grad_rows, cols.contrast.shape[1])
        if grad_negatives:
            grad_extra = grad_columns[cols.contrast.shape[0] :]
        coef_pos_all = torch.empty(n_anchor, dtype=cols.anchor.dtype, device=cols.anchor.device)
    grad_contrast = None if grad_columns is None else grad_columns[: cols.contrast.shape[0]]
    total = cols.anchor.new_zeros(())
    step = _block_rows(n_anchor, width, cols.anchor.device)
    buffer = cols.anchor.new_empty(min(step, n_anchor) * width)
    for start in range(0, n_anchor, step):
        stop = min(start + step, n_anchor)
        logits = buffer[: (stop - start) * width].view(stop - start, width)
        _block_logits(logits, cols, problem, scaled_anchor[start:stop], start, stop)
        if problem.in_batch:
            pos_sum, weight = positives.pos_logit_sum[start:stop], positives.pos_weight[start:stop]
        else:
            pos_sum, weight = logits[:, 0].clone(), logits.new_ones(stop - start)
        exps, sums, lse = _exponentials(logits, shift_free)
        total = total + row_losses(pos_sum, weight, lse, problem.scale).sum()
        if want_grad:
            grads = (grad_anchor, grad_contrast, grad_extra, coef_pos_all)
            _block_gradients(cols, problem, (start, stop), exps, (sums, weight), grads)
    if want_grad and problem.in_batch:  # the positives' share, all rows at once
        positives.subtract_gradients(grad_anchor, grad_columns[: columns.shape[0]], cols.anchor, columns, coef_pos_all)
    if grad_extra is not None:  # (its own storage: the op's outputs may not alias one another)
        grad_extra = grad_extra.clone()
    return total / n_anchor, grad_anchor, grad_contrast, grad_extra


def _exponentials(logits: Tensor, shift_free: bool):
    """``(exps, sums, lse)``: ``exp(s_ij - shift_i)`` in place of the logits (``shift = 0`` when
    ``shift_free``, else the row max), their row sums, and the row log-sum-exp (``-inf`` for a row with no column;
    its exps and sum are 0)."""
    if shift_free:
        exps = logits.exp_()
        sums = exps.sum(1)
        return exps, sums, torch.log(sums)
    row_max = logits.amax(1)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    exps = logits.sub_(shift[:, None]).exp_()
    sums = exps.sum(1)
    return exps, sums, shift + torch.log(sums)


def _block_gradients(cols: _Columns, problem: Problem, span, exps: Tensor, stats, grads) -> None:
    """Accumulate the softmax share of the three gradients (``dQ`` when asked) from the block's exps; store the
    rows' positive coefficients (``in_batch``: subtracted after the loop) or subtract the positive's share now
    (``in_batch=False``: one column)."""
    (start, stop), (sums, weight) = span, stats
    grad_anchor, grad_contrast, grad_extra, coef_pos_all = grads
    coef_softmax, coef_pos = grad_coefficients(weight, problem.scale)
    factor = cols.inv_temperature / cols.anchor.shape[0]  # dL/d(a . c) = dL/ds / t, and the mean's 1 / Na
    coef_pos = coef_pos.mul_(factor)
    # dL/ds_ij = f_i exps_ij - coef_pos_i w_ij, f_i = coef_softmax_i / (t Na sums_i) (a row with no column: 0)
    row_factor = torch.where(sums == 0, 0.0, coef_softmax.mul_(factor) / sums)[:, None]
    n_batch = exps.shape[1] - cols.negatives.shape[0]
    exps_batch, exps_extra = exps[:, :n_batch], exps[:, n_batch:]
    anchor = cols.anchor[start:stop]
    weighted_anchor = anchor * row_factor
    grad_rows = grad_anchor[start:stop]
    if problem.in_batch:
        torch.mm(exps_batch, cols.contrast, out=grad_rows)
        grad_contrast.addmm_(exps_batch.T, weighted_anchor)
        coef_pos_all[start:stop] = coef_pos
    else:
        positive = cols.anchor_labels[start:stop]
        positive_rows = cols.contrast[positive]
        torch.mul(positive_rows, exps_batch, out=grad_rows)
        grad_contrast.index_add_(0, positive, exps_batch * weighted_anchor - coef_pos[:, None] * anchor)
    if exps_extra.shape[1] > 0:
        grad_rows.addmm_(exps_extra, cols.negatives)
    grad_rows.mul_(row_factor)
    if not problem.in_batch:
        grad_rows.addcmul_(positive_rows, coef_pos[:, None], value=-1.0)
    if grad_extra is not None:
        grad_extra.addmm_(exps_extra.T, weighted_anchor)


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
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, *grad_outputs):
        # create_graph=True, or a nested torch.func transform reaching the stored gradients (outputs of this node):
        # a second derivative, which would treat them as constants
        nested = any(g is not None for g in grad_outputs)
        if nested or (torch.is_grad_enabled() and not functorch_transforms_active()):
            raise RuntimeError(FIRST_DERIVATIVES_ONLY)
        if grad_loss is None:
            return (None,) * 6
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
