"""The chunked backend's passes: the contrastive op of :mod:`fastcl.ops` on any device, O(N*D + block*N) memory.

Anchors are processed in blocks of rows, each block's logits formed by one matrix product (stored transposed,
``[Nc, rows]``: on MKL the products then run unstrided) and reduced to the row log-sum-exp (self pair excluded), in
place, then freed. When a gradient is needed the same pass turns the block into the softmax part of ``dL/ds`` and
accumulates ``dA`` and ``dC`` (three matrix products per block, as many as the dense form), so backward only scales
the stored ``[N, D]`` gradients by ``grad_output``: nothing ``N x N`` is kept and nothing is recomputed. Three
routes do better than that: when the anchors are the contrast rows (SupCon 'all', NT-Xent, SimCLR) only the half of
the symmetric similarity matrix on and right of the diagonal is formed (:func:`_half_matrix_pass`, two thirds of the
dense FLOPs); both
directions of a symmetric loss share each block (:func:`_two_way_pass`); and one block holding the whole problem takes
the dense single-block routes. The positives never touch a block: with labels (and SimCLR) they come from per-class
sums of embeddings in ``O(N * D)``, with a ``[B, B]`` mask from ``B x B x D`` products with it.
Half-precision inputs are computed in fp32; float64 stays float64 (``gradcheck``).

:func:`chunked_forward` takes a :class:`~fastcl.ops.problem.Problem` and picks the route; its autograd lives in
:mod:`fastcl.ops.chunked.autograd` (eagerly) and :mod:`fastcl.ops.custom_ops` (the custom op).
"""

from __future__ import annotations

import os

import torch

from fastcl.ops.problem import Problem, compute_dtype, grad_coefficients, in_dtype, index_range, row_losses

# Bytes of logits per block (``FASTCL_CHUNK_BYTES``; default: 8 MiB per intra-op thread, up to 4 threads). Measured
# at N = 8192, D = 128 on a 2-core EPYC (512 KiB L2 per core, 8 MiB L3): 256 rows per thread beat 64 and 128 (the
# dC product, whose K is the block's row count, and each thread's share of the similarity GEMM run faster) and
# 512 / 1024 rows on one thread, whose blocks no longer fit the L3.
_BLOCK_BYTES = int(os.environ["FASTCL_CHUNK_BYTES"]) if os.environ.get("FASTCL_CHUNK_BYTES") else None
_BLOCK_BYTES_PER_THREAD = 8 * 1024 * 1024
_SINGLE_BLOCK_PAIRS = 512 * 512  # up to this many pairs: the dense single-block route (_single_block)
_MIN_BLOCK_ROWS = 64  # at very large N the byte budget alone would give GEMMs too thin to run fast
_HALF_MATRIX_PANELS = 8  # the half-matrix route's fewest panels (_half_matrix_pass)


def block_bytes(device_type: str = "cpu") -> int:
    """The logits budget of one block on ``device_type`` (see ``_BLOCK_BYTES``)."""
    if device_type != "cpu":
        return 64 * (4 * 1024 * 1024 if _BLOCK_BYTES is None else _BLOCK_BYTES)
    if _BLOCK_BYTES is not None:
        return _BLOCK_BYTES
    return _BLOCK_BYTES_PER_THREAD * min(torch.get_num_threads(), 4)


def _block_rows(n_anchor: int, n_contrast: int, device: torch.device) -> int:
    budget = block_bytes(device.type)
    return min(n_anchor, max(_MIN_BLOCK_ROWS, budget // (4 * n_contrast)))


# Largest logit magnitude for which exp(s) needs no shift: every exp(s) and every row or column sum of up to 2**30
# of them stays a normal number (fp32: exp overflows above 88.7 and leaves the normal range below -87.3).
_SHIFT_FREE_BOUND = {torch.float32: 60.0, torch.float64: 600.0}


def _shift_free(a_all: torch.Tensor, c_all: torch.Tensor) -> bool:
    """True when ``|s_ij| <= max_i |a_i| * max_j |c_j|`` (Cauchy-Schwarz) is small enough to exponentiate the logits
    as they are: no row max, no subtraction, and (two-way) no online rescaling of the column sums.

    Normalised embeddings have ``|s| <= 1 / t``, so every temperature above ~0.017 qualifies. Checked on CPU only (a
    scalar read; on an accelerator it would wait for the device), NaN and inf fail it (they take the shifted path).
    """
    if a_all.device.type != "cpu" or a_all.shape[0] == 0 or c_all.shape[0] == 0:
        return False
    bound = torch.linalg.vector_norm(a_all, dim=1).amax() * torch.linalg.vector_norm(c_all, dim=1).amax()
    return bool(bound <= _SHIFT_FREE_BOUND[a_all.dtype])


def _block_view(buffer: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A contiguous ``[height, width]`` block at the start of a flat preallocated ``buffer`` (blocks of every size
    reuse one allocation; a slice of a 2-D buffer would be strided)."""
    return buffer[: height * width].view(height, width)


def _self_diagonal(block: torch.Tensor, start: int, self_offset: int) -> torch.Tensor:
    """The self pairs of a transposed block ``[Nc, rows]`` of anchors from ``start``: elements
    ``(start + self_offset + r, r)`` (anchor ``start + r`` is contrast row ``start + r + self_offset``)."""
    return block[start + self_offset :].diagonal()


def _mask_weights(rows: torch.Tensor, mask: torch.Tensor, contrast_samples: torch.Tensor, dtype) -> torch.Tensor:
    """``w [block, Nc]`` for anchor rows ``rows``, read from the ``[B, B]`` mask at ``[i % B, j % B]``."""
    return mask.index_select(0, rows % mask.shape[0]).index_select(1, contrast_samples).to(dtype)


class _Positives:
    """The positive pairs' share of the loss and of both gradients without any ``[block, Nc]`` weight matrix.

    Rows are put in groups (``anchor_ids [Na]``, ``contrast_ids [Nc]`` in ``[0, G)``) and ``w_ij = W[g_i, g'_j]``
    for a ``[G, G]`` weight matrix ``W``, or ``W = I`` when ``weights`` is None (labels: the groups are the classes).
    With ``R[g]`` the sum of the contrast rows of group g, ``sum_j w_ij c_j = (W R)[g_i]``: the positive-logit sums,
    the positive weights and the positive part of both gradients cost ``O(N D)`` plus one ``G x G x D`` product with a
    mask. The self pair (anchor i is contrast row ``i + self_offset``), when excluded, is subtracted explicitly with
    its weight ``W[g_i, g'_{i+k}]`` (1 with labels). Static shapes, no host sync.
    """

    def __init__(self, a_all, c_all, anchor_ids, contrast_ids, n_groups, weights, self_offset):
        n_anchor, n_contrast = a_all.shape[0], c_all.shape[0]
        device, dtype = c_all.device, c_all.dtype
        self.anchor_ids, self.contrast_ids, self.weights = anchor_ids, contrast_ids, weights
        group_sum = torch.zeros(n_groups, c_all.shape[1], dtype=dtype, device=device).index_add_(0, contrast_ids, c_all)
        counts = torch.zeros(n_groups, dtype=dtype, device=device).index_add_(
            0, contrast_ids, torch.ones(n_contrast, dtype=dtype, device=device)
        )
        if weights is not None:  # [G, D]: sum_j W[g, g'_j] c_j
            group_sum, counts = torch.mm(weights, group_sum), torch.mv(weights, counts)
        self.positive_sums = group_sum
        self.pos_weight = counts[anchor_ids]
        self.pos_logit_sum = torch.linalg.vecdot(a_all, group_sum[anchor_ids])
        self.self_columns = self.self_weight = None
        if self_offset is not None:
            self.self_columns = slice(self_offset, self_offset + n_anchor)
            self_dots = torch.linalg.vecdot(a_all, c_all[self.self_columns])
            if weights is None:  # the same row: always its own class
                self.pos_logit_sum -= self_dots
                self.pos_weight -= 1
            else:
                self.self_weight = weights[anchor_ids, contrast_ids[self.self_columns]]
                self.pos_logit_sum -= self.self_weight * self_dots
                self.pos_weight -= self.self_weight

    def subtract_gradients(self, grad_anchor, grad_contrast, a_all, c_all, coef_pos):
        """``dA_i -= coef_pos_i sum_j w_ij c_j`` and ``dC_j -= sum_i coef_pos_i w_ij a_i`` (self pairs excluded)."""
        positive_sum = self.positive_sums[self.anchor_ids]
        weighted = a_all * coef_pos[:, None]
        per_group = torch.zeros_like(self.positive_sums).index_add_(0, self.anchor_ids, weighted)
        if self.weights is not None:
            per_group = torch.mm(self.weights.T, per_group)
        if self.self_columns is not None:
            self_rows = c_all[self.self_columns]
            if self.self_weight is None:
                positive_sum.sub_(self_rows)
            else:
                positive_sum.addcmul_(self_rows, self.self_weight[:, None], value=-1.0)
                weighted = weighted * self.self_weight[:, None]
            grad_contrast[self.self_columns] += weighted
        grad_anchor.addcmul_(positive_sum, coef_pos[:, None], value=-1.0)
        grad_contrast.sub_(per_group[self.contrast_ids])


def _label_positives(a_all, c_all, anchor_labels, contrast_labels, self_offset):
    """:class:`_Positives` of labels: dense class ids from a sort (labels of any real or bool dtype, equal values
    sharing an id), at most ``Na + Nc`` classes (a static bound)."""
    from fastcl._validation import dense_label_ids

    labels = torch.cat([anchor_labels, contrast_labels])
    ids = dense_label_ids(labels.to(torch.uint8) if labels.dtype == torch.bool else labels)
    n_anchor = a_all.shape[0]
    return _Positives(a_all, c_all, ids[:n_anchor], ids[n_anchor:], ids.shape[0], None, self_offset)


def _positives(a_all, c_all, anchor_labels, contrast_labels, mask, self_offset):
    """The positives' statistics and gradient, from labels or from a ``[B, B]`` mask read at ``[i % B, j % B]``
    (the groups are the residues mod B), never from a similarity block."""
    if mask is None:
        return _label_positives(a_all, c_all, anchor_labels, contrast_labels, self_offset)
    device, bsz = c_all.device, mask.shape[0]
    anchor_ids = torch.arange(a_all.shape[0], device=device) % bsz
    contrast_ids = torch.arange(c_all.shape[0], device=device) % bsz
    return _Positives(a_all, c_all, anchor_ids, contrast_ids, bsz, mask.to(c_all.dtype), self_offset)


def _fused_pass(problem: Problem, want_grad: bool):
    """Row statistics for every anchor (one direction) and, with ``want_grad``, ``dL/dA`` and ``dL/dC`` for
    grad_output = 1."""
    inv_temperature, self_offset = problem.inv_temperature, problem.self_offset
    dtype = compute_dtype(problem.contrast)
    a_all = problem.anchor_rows.to(dtype) * inv_temperature  # s = a_all @ c_all.T
    c_all = problem.contrast.to(dtype)
    n_anchor, n_contrast = a_all.shape[0], c_all.shape[0]
    device = a_all.device

    lse = torch.empty(n_anchor, dtype=dtype, device=device)
    positives = _positives(a_all, c_all, problem.anchor_labels, problem.contrast_labels, problem.mask, self_offset)
    if want_grad:
        grad_anchor = torch.empty_like(a_all)
        grad_contrast = torch.zeros_like(c_all)
        coef_softmax, coef_pos = grad_coefficients(positives.pos_weight, problem.scale / n_anchor)

    shift_free = _shift_free(a_all, c_all)
    block = _block_rows(n_anchor, n_contrast, device)
    buffer = a_all.new_empty(min(block, n_anchor) * n_contrast)  # one buffer; blocks stored transposed, [Nc, rows]
    for start in range(0, n_anchor, block):
        stop = min(start + block, n_anchor)
        a = a_all[start:stop]
        logits = torch.mm(c_all, a.T, out=_block_view(buffer, n_contrast, stop - start))
        if self_offset is not None:
            _self_diagonal(logits, start, self_offset).fill_(float("-inf"))
        if shift_free:  # |s| is bounded: exp(s) as it is (one pass instead of max, subtract, exp)
            exps = logits.exp_()
            row_sum = exps.sum(dim=0)
            lse[start:stop] = torch.log(row_sum)
        else:
            row_max = logits.amax(dim=0)
            shift = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)  # empty row
            exps = logits.sub_(shift).exp_()  # in place: the block's only buffer
            row_sum = exps.sum(dim=0)
            lse[start:stop] = shift + torch.log(row_sum)
        if want_grad:
            # softmax part of dL/ds = coef_softmax * exps / row_sum (the 1/Na of the mean included); positives below
            softmax_scale = coef_softmax[start:stop] / row_sum
            softmax_scale = torch.where(row_sum > 0, softmax_scale, torch.zeros_like(softmax_scale))
            torch.mm(exps.T, c_all, out=grad_anchor[start:stop])
            grad_anchor[start:stop] *= softmax_scale[:, None]
            grad_contrast.addmm_(exps, a * softmax_scale[:, None])
        del logits, exps
    stats = (positives.pos_logit_sum, positives.pos_weight, lse)
    if not want_grad:
        return stats, None, None
    positives.subtract_gradients(grad_anchor, grad_contrast, a_all, c_all, coef_pos)
    return stats, grad_anchor.mul_(inv_temperature), grad_contrast


def _half_matrix_pass(problem: Problem, want_grad: bool):
    """SupCon 'all' / NT-Xent / SimCLR, the anchors being the contrast rows (self pairs excluded) and every ``|s|``
    bounded (:func:`_shift_free`): ``(stats, whole gradient or None)``, or None when the bound does not hold (the
    caller takes the row-block pass).

    ``s = x x^T / t`` is symmetric, so only the panels on and right of the diagonal are formed: panel ``p`` is rows
    ``R = [p0, p1)`` against columns ``[p0, N)``. Pass 1 sums ``exp(s)`` along the panel's rows (row sums of R) and,
    right of its diagonal block, along its columns (the rows below R, by symmetry): after the last panel every row
    sum is complete. The softmax part of ``dL/ds`` is ``G_ij = f_i exp(s_ij)`` (``f_i`` = the row's coefficient over
    its sum), and the one input's gradient is ``(G + G^T) x / t`` with ``(G + G^T)_ij = exp(s_ij) (f_i + f_j)``
    symmetric too: pass 2 re-forms each panel, turns it into that matrix ``M`` and adds ``M x[p0:]`` to the rows R and
    ``M^T x[R]`` (right of the diagonal block) to the rows below. Four block products over half the pairs: two
    thirds of the dense form's three over all pairs, and memory ``O(N D)`` plus one panel. Positives come from
    per-class sums or the mask's products (:func:`_positives`), never from the panels. Panels are stored transposed
    (``[N - p0, rows]``, contiguous): the products ``x[p0:] a_R^T`` and ``M^T`` times ``x[R]`` (K = rows) then run
    unstrided, 7-16% faster fwd+bwd at N = 4096-8192 than the row layout on a 2-core CPU (MKL, 1 and 2 threads).
    """
    inv_temperature, labels = problem.inv_temperature, problem.contrast_labels
    dtype = compute_dtype(problem.contrast)
    x = problem.contrast.to(dtype)
    a_all = x * inv_temperature  # s = a_all @ x.T
    if not _shift_free(a_all, x):
        return None
    n = x.shape[0]
    positives = _positives(a_all, x, labels, labels, problem.mask, 0)
    # at least _HALF_MATRIX_PANELS panels: P panels form (1 + 1/P) / 2 of the pairs (one panel would form them all)
    block = min(_block_rows(n, n, x.device), max(_MIN_BLOCK_ROWS, -(-n // _HALF_MATRIX_PANELS)))
    buffer = x.new_empty(block * n)  # panels stored transposed, [N - p0, rows], each one contiguous
    row_sum = torch.zeros(n, dtype=dtype, device=x.device)

    def panel_exps(start, stop):
        """``exp(s)`` of rows ``[start, stop)`` against columns ``[start, N)``, self pairs 0."""
        width, rows = n - start, stop - start
        panel = torch.mm(x[start:], a_all[start:stop].T, out=_block_view(buffer, width, rows))
        panel.diagonal().fill_(float("-inf"))
        return panel.exp_()

    for start in range(0, n, block):
        stop = min(start + block, n)
        exps = panel_exps(start, stop)
        row_sum[start:stop] += exps.sum(dim=0)
        row_sum[stop:] += exps[stop - start :].sum(dim=1)
    lse = torch.log(row_sum)
    stats = (positives.pos_logit_sum, positives.pos_weight, lse)
    if not want_grad:
        return stats, None

    coef_softmax, coef_pos = grad_coefficients(positives.pos_weight, problem.scale / n)
    factor = torch.where(row_sum > 0, coef_softmax / row_sum, torch.zeros_like(row_sum))
    grad = torch.zeros_like(x)  # (G + G^T) x, then the anchors' positive part; / t below
    grad_contrast = torch.zeros_like(x)  # the contrast role's positive part (already / t: it multiplies a_all)
    pair_factor = x.new_empty(block * n)
    for start in range(0, n, block):
        stop = min(start + block, n)
        exps = panel_exps(start, stop)
        width, rows = n - start, stop - start
        weights = torch.add(factor[start:, None], factor[start:stop], out=_block_view(pair_factor, width, rows))
        weights.mul_(exps)  # M^T = exp(s)^T (f_j + f_i)
        grad[start:stop].addmm_(weights.T, x[start:])
        grad[stop:].addmm_(weights[rows:], x[start:stop])
    positives.subtract_gradients(grad, grad_contrast, a_all, x, coef_pos)
    return stats, grad.mul_(inv_temperature).add_(grad_contrast)


class _TwoWayBlocks:
    """The row blocks :func:`_two_way_pass` forms twice (statistics, then gradients): the scaled inputs, the block
    size, and one or two flat buffers. Blocks are stored transposed, ``[Nc, rows]`` and contiguous (the products
    then run unstrided, as in :func:`_half_matrix_pass`)."""

    def __init__(self, problem: Problem):
        dtype = compute_dtype(problem.contrast)
        self.self_offset = problem.self_offset
        self.a_all = problem.anchor_rows.to(dtype) * problem.inv_temperature  # s = a_all @ c_all.T
        self.c_all = problem.contrast.to(dtype)
        self.n_anchor, self.n_contrast = self.a_all.shape[0], self.c_all.shape[0]
        self.shift_free = _shift_free(self.a_all, self.c_all)
        self.block = _block_rows(self.n_anchor, self.n_contrast, self.a_all.device)
        self.single_block = self.block >= self.n_anchor
        rows = min(self.block, self.n_anchor)
        self.buffers = [self.a_all.new_empty(rows * self.n_contrast) for _ in range(1 if self.single_block else 2)]

    def starts(self):
        """``(start, stop)`` of every row block."""
        return ((start, min(start + self.block, self.n_anchor)) for start in range(0, self.n_anchor, self.block))

    def logits(self, start, stop):
        """``s^T`` of anchors ``[start, stop)``: ``[Nc, rows]``, self pairs ``-inf``."""
        out = _block_view(self.buffers[0], self.n_contrast, stop - start)
        logits = torch.mm(self.c_all, self.a_all[start:stop].T, out=out)
        if self.self_offset is not None:
            _self_diagonal(logits, start, self.self_offset).fill_(float("-inf"))
        return logits


def _two_way_pass(problem: Problem, want_grad: bool):
    """Both directions of a label-defined loss from the same similarity blocks: ``(loss, dA, dC)``.

    Pass 1 forms each row block ``s = a c^T`` once and reduces it to the row log-sum-exp (this direction) and, online
    across row blocks, the column log-sum-exp (the reverse direction: contrast rows anchoring over the anchors). The
    column statistics are final only after the last row block, so with ``want_grad`` pass 2 recomputes each block and
    turns it into the combined ``dL/ds = (fwd softmax + reverse softmax) / 2`` before the two gradient products: four
    block GEMMs in all (dense needs three and an ``N x N`` buffer; two one-way passes need six). When one block holds
    the whole problem the logits of pass 1 are kept, so it is exactly three. Positives of both directions come from
    per-class sums (:class:`_Positives`), never from the block. Only ``self_offset`` None or 0 (the same pairs
    excluded in both directions).
    """
    blocks = _TwoWayBlocks(problem)
    a_all, c_all = blocks.a_all, blocks.c_all
    forward_pos = _label_positives(a_all, c_all, problem.anchor_labels, problem.contrast_labels, problem.self_offset)
    reverse_pos = _label_positives(c_all, a_all, problem.contrast_labels, problem.anchor_labels, problem.self_offset)
    row_lse, col_lse, kept = _two_way_statistics(blocks)
    scale = problem.scale
    forward_loss = row_losses(forward_pos.pos_logit_sum, forward_pos.pos_weight, row_lse, scale).mean()
    reverse_loss = row_losses(reverse_pos.pos_logit_sum, reverse_pos.pos_weight, col_lse, scale).mean()
    loss = 0.5 * (forward_loss + reverse_loss)
    if not want_grad:
        return loss, None, None

    # dL/ds_ij = 1/2 [cf_i exp(s_ij - lse_i) + cr_j exp(s_ij - lse'_j) - cpf_i w_ij - cpr_j w_ij]; positives below
    forward_softmax, forward_coef_pos = grad_coefficients(forward_pos.pos_weight, 0.5 * scale / blocks.n_anchor)
    reverse_softmax, reverse_coef_pos = grad_coefficients(reverse_pos.pos_weight, 0.5 * scale / blocks.n_contrast)
    forward_softmax = torch.where(row_lse == float("-inf"), torch.zeros_like(row_lse), forward_softmax)
    reverse_softmax = torch.where(col_lse == float("-inf"), torch.zeros_like(col_lse), reverse_softmax)
    row_lse = torch.where(row_lse == float("-inf"), torch.zeros_like(row_lse), row_lse)
    col_lse = torch.where(col_lse == float("-inf"), torch.zeros_like(col_lse), col_lse)
    grad_anchor, grad_contrast = _two_way_softmax_gradients(
        blocks, kept, (row_lse, forward_softmax), (col_lse, reverse_softmax)
    )
    forward_pos.subtract_gradients(grad_anchor, grad_contrast, a_all, c_all, forward_coef_pos)
    reverse_pos.subtract_gradients(grad_contrast, grad_anchor, c_all, a_all, reverse_coef_pos)
    return loss, grad_anchor.mul_(problem.inv_temperature), grad_contrast


def _two_way_statistics(blocks: _TwoWayBlocks):
    """Pass 1: ``(row_lse [Na], col_lse [Nc], kept)``, the column statistics online across row blocks; ``kept`` is
    the single block's logits (shift-free: its exps) for pass 2, else None."""
    n_contrast, dtype, device = blocks.n_contrast, blocks.a_all.dtype, blocks.a_all.device
    row_lse = torch.empty(blocks.n_anchor, dtype=dtype, device=device)
    col_max = torch.full((n_contrast,), float("-inf"), dtype=dtype, device=device)
    col_sum = torch.zeros(n_contrast, dtype=dtype, device=device)
    kept = None
    for start, stop in blocks.starts():
        logits = blocks.logits(start, stop)
        if blocks.shift_free:  # |s| is bounded: exp(s) as it is, the column sums need no rescaling (3 passes in all)
            exps = logits.exp_()
            row_lse[start:stop] = torch.log(exps.sum(dim=0))
            col_sum.add_(exps.sum(dim=1))
            kept = exps if blocks.single_block else None  # pass 2 needs exactly these
            del logits, exps
            continue
        # columns: online log-sum-exp across row blocks (rescale the running sum to the new running max)
        new_max = torch.maximum(col_max, logits.amax(dim=1))
        col_shift = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
        col_sum.mul_(torch.exp(col_max - col_shift)).add_(torch.exp(logits - col_shift[:, None]).sum(dim=1))
        col_max = new_max
        # rows: complete within the block
        row_max = logits.amax(dim=0)
        row_shift = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
        exps = torch.sub(logits, row_shift) if blocks.single_block else logits.sub_(row_shift)
        row_lse[start:stop] = row_shift + torch.log(exps.exp_().sum(dim=0))
        if blocks.single_block:
            kept = logits
        del logits, exps
    if blocks.shift_free:
        return row_lse, torch.log(col_sum), kept
    col_shift = torch.where(col_max == float("-inf"), torch.zeros_like(col_max), col_max)
    return row_lse, col_shift + torch.log(col_sum), kept


def _two_way_softmax_gradients(blocks: _TwoWayBlocks, kept, forward, reverse):
    """Pass 2: ``(dA, dC)`` of both directions' softmax parts (``forward = (row_lse, row coefficients)``,
    ``reverse`` the columns'), each block re-formed (or the ``kept`` single block) and turned into the combined
    ``dL/ds`` before its two gradient products."""
    (row_lse, forward_softmax), (col_lse, reverse_softmax) = forward, reverse
    if blocks.shift_free:  # dL/ds_ij (softmax part) = exp(s_ij) (f_i + g_j)
        row_factor = forward_softmax.mul_(torch.exp(-row_lse))
        col_factor = reverse_softmax.mul_(torch.exp(-col_lse))
    a_all, c_all, n_contrast = blocks.a_all, blocks.c_all, blocks.n_contrast
    grad_anchor = torch.empty_like(a_all)
    grad_contrast = torch.zeros_like(c_all)
    for start, stop in blocks.starts():
        if blocks.shift_free:
            exps = kept if blocks.single_block else blocks.logits(start, stop).exp_()
            kept = None
            if blocks.single_block:
                dlogits = torch.empty_like(exps)
            else:
                dlogits = _block_view(blocks.buffers[-1], n_contrast, stop - start)
            dlogits = torch.mul(exps, col_factor[:, None], out=dlogits).addcmul_(exps, row_factor[start:stop])
            del exps
        else:
            logits = kept if blocks.single_block else blocks.logits(start, stop)
            kept = None
            reverse_part = torch.sub(logits, col_lse[:, None]).exp_().mul_(reverse_softmax[:, None])
            dlogits = logits.sub_(row_lse[start:stop]).exp_().mul_(forward_softmax[start:stop])
            dlogits.add_(reverse_part)
            del reverse_part, logits
        torch.mm(dlogits.T, c_all, out=grad_anchor[start:stop])
        grad_contrast.addmm_(dlogits, a_all[start:stop])
        del dlogits
    return grad_anchor, grad_contrast


def _paired_by_index(anchor_labels, contrast_labels, self_offset, two_way):
    """Where each anchor's only positive is when the contrast ids are ``arange(Nc)`` (InfoNCE's pairings), else None:
    ``'diagonal'`` when anchor i pairs with contrast i (the default pairing), or (one-way) the ``[Na]`` positive
    column of each anchor (``labels`` given, all in ``[0, Nc)``).

    Checked on CPU only, where reading small integer vectors costs microseconds and no device sync; the answer
    picks :func:`_single_block_paired`, whose positives are one element per row.
    """
    n_anchor, n_contrast = anchor_labels.shape[0], contrast_labels.shape[0]
    if self_offset is not None or contrast_labels.device.type != "cpu" or contrast_labels.dtype != torch.int64:
        return None
    ids = index_range(n_contrast, contrast_labels.device)
    if contrast_labels is not ids and not torch.equal(contrast_labels, ids):
        return None
    prefix = (  # fastcl.functional passes the anchors' ids as a view of the contrast ids
        anchor_labels.data_ptr() == contrast_labels.data_ptr() and anchor_labels.stride() == contrast_labels.stride()
    )
    if (prefix or torch.equal(anchor_labels, ids[:n_anchor])) and (not two_way or n_anchor == n_contrast):
        return "diagonal"
    if two_way or anchor_labels.dtype != torch.int64:
        return None
    low, high = torch.aminmax(anchor_labels)
    return anchor_labels if 0 <= int(low) and int(high) < n_contrast else None


def _single_block_paired(problem: Problem, want_grad: bool, positive="diagonal"):
    """:func:`_single_block` when each anchor has exactly one positive (``W = P = 1``): anchor i pairs with contrast
    i (``positive='diagonal'``; both directions when ``two_way``, Na == Nc) or with contrast ``positive[i]``
    (one-way). The loss is the mean of the positives' log-softmax and ``dL/ds = k (softmax - onehot)``: no weight
    matrix at all."""
    inv_temperature, scale, two_way = problem.inv_temperature, problem.scale, problem.two_way
    dtype = compute_dtype(problem.contrast)
    a_all, c_all = in_dtype(problem.anchor_rows, dtype), in_dtype(problem.contrast, dtype)
    n_anchor = a_all.shape[0]
    logits = torch.mm(a_all, c_all.T).mul_(inv_temperature)
    half = 0.5 if two_way else 1.0
    log_prob = torch.log_softmax(logits, 1)
    column = None if isinstance(positive, str) else positive[:, None]
    if two_way:  # Na == Nc
        col_log_prob = torch.log_softmax(logits, 0)
        loss = torch.add(log_prob.diagonal(), col_log_prob.diagonal()).sum()
    elif column is None:
        loss = log_prob.diagonal().sum()
    else:
        loss = log_prob.gather(1, column).sum()
    loss = loss.mul_(-half * scale / n_anchor)
    if not want_grad:
        return loss, None, None
    coef = half * scale * inv_temperature / n_anchor  # (= the column coefficient: Nc == Na when two-way)
    dlogits = log_prob.exp_()
    if two_way:
        dlogits.add_(col_log_prob.exp_())
    if column is None:
        dlogits.mul_(coef).diagonal().sub_(2 * coef if two_way else coef)
    else:
        dlogits.mul_(coef).scatter_add_(1, column, dlogits.new_empty(column.shape).fill_(-coef))
    return loss, torch.mm(dlogits, c_all), torch.mm(dlogits.T, a_all)


def _single_block(problem: Problem, want_grad: bool, fold_roles: bool = False):
    """Label- or mask-defined loss (one or both directions) when one block holds the whole ``[Na, Nc]`` problem.

    The cheapest exact route at small N, where each PyTorch op costs more than its arithmetic: three GEMMs and about
    twenty whole-matrix ops, positive weights from a label comparison (no sort, scatter or gather), the self pairs
    written through a diagonal view, ``1 / t`` and the mean folded into the per-row gradient coefficients. Needs at
    least one column per row once the self pair is out (``Nc >= 2`` with ``self_offset``; :func:`chunked_forward`
    routes the single-column case elsewhere). ``fold_roles`` (the anchors are the contrast rows, ``self_offset ==
    0``): ``dA`` is that input's whole gradient and ``dC`` None.
    """
    inv_temperature, scale, two_way, mask, self_offset = (
        problem.inv_temperature,
        problem.scale,
        problem.two_way,
        problem.mask,
        problem.self_offset,
    )
    dtype = compute_dtype(problem.contrast)
    a_all, c_all = in_dtype(problem.anchor_rows, dtype), in_dtype(problem.contrast, dtype)
    n_anchor, n_contrast = a_all.shape[0], c_all.shape[0]
    logits = torch.mm(a_all, c_all.T).mul_(inv_temperature)
    w = _single_block_weights(problem, n_anchor, n_contrast, dtype)
    if self_offset is not None:
        w.diagonal(self_offset).zero_()
        logits.diagonal(self_offset).fill_(float("-inf"))
    half = 0.5 if two_way else 1.0

    def direction(dim, count):
        """``(loss term, softmax, W, 1 / P)`` along ``dim``: loss = -scale / (N P_i) sum_j w_ij log softmax_ij,
        ``P_i = max(W_i, 1)`` (``W_i`` counts positives: an integer)."""
        weight = w.sum(dim)
        if mask is None:  # W counts positives: P = max(W, 1)
            inverse = weight.clamp_min(1.0).reciprocal_()
        else:  # real weights: P = W, or 1 when W < 1e-6 (row_losses)
            inverse = torch.where(weight < 1e-6, 1.0, weight).reciprocal_()
        log_prob = torch.log_softmax(logits, dim)
        prob = log_prob.exp() if want_grad else None
        if self_offset is not None:  # 0 * -inf would be NaN; w is 0 there
            log_prob.diagonal(self_offset).zero_()
        term = torch.linalg.vecdot(w, log_prob, dim=dim).dot(inverse).mul_(-half * scale / count)
        return term, prob, weight, inverse

    loss, prob, weight, inverse = direction(1, n_anchor)
    if two_way:
        col_loss, col_prob, col_weight, col_inverse = direction(0, n_contrast)
        loss = loss.add_(col_loss)
    if not want_grad:
        return loss, None, None

    # dL/ds_ij / t = k_i (W_i softmax_ij - w_ij) [+ k'_j (W'_j softmax'_ij - w_ij)], k = half scale / (t N P)
    row_coef = inverse.mul_(half * scale * inv_temperature / n_anchor)
    dlogits = prob.mul_(weight[:, None]).sub_(w).mul_(row_coef[:, None])
    if two_way:
        col_coef = col_inverse.mul_(half * scale * inv_temperature / n_contrast)
        dlogits.addcmul_(col_prob.mul_(col_weight).sub_(w), col_coef)
    if fold_roles:  # anchors are the contrast rows: dX = dS X + dS^T X = (dS + dS^T) X, one product instead of two
        return loss, torch.mm(dlogits + dlogits.T, c_all), None
    return loss, torch.mm(dlogits, c_all), torch.mm(dlogits.T, a_all)


def _single_block_weights(problem: Problem, n_anchor: int, n_contrast: int, dtype) -> torch.Tensor:
    """``w [Na, Nc]`` of the single-block routes: a label comparison, or the ``[B, B]`` mask read at
    ``[i % B, j % B]`` (tiled when both counts are multiples of B, as for stacked views)."""
    mask, device = problem.mask, problem.contrast.device
    if mask is None:
        return torch.eq(problem.anchor_labels[:, None], problem.contrast_labels[None, :]).to(dtype)
    if n_anchor % mask.shape[0] == 0 and n_contrast % mask.shape[0] == 0:  # views stacked: mask tiles
        return mask.to(dtype).repeat(n_anchor // mask.shape[0], n_contrast // mask.shape[0])
    rows = torch.arange(n_anchor, device=device)
    return _mask_weights(rows, mask, torch.arange(n_contrast, device=device) % mask.shape[0], dtype)


def chunked_forward(problem: Problem, want_grad: bool):
    """``(loss, grad_anchor, grad_contrast)``: the loss (fp32, float64 for float64 inputs) and, with ``want_grad``,
    its gradients for ``grad_output = 1`` in the compute dtype (else None). ``problem.two_way`` averages both
    directions.

    When :attr:`~fastcl.ops.problem.Problem.anchors_are_contrast`, ``grad_contrast`` is None and ``grad_anchor`` the
    whole gradient of the one input (the single-block route then needs one gradient product instead of two, and
    with ``self_offset == 0`` the half-matrix route forms only half the similarity panels)."""
    loss, grad_anchor, grad_contrast = _routes(problem, want_grad)
    if problem.anchors_are_contrast and grad_contrast is not None:
        grad_anchor, grad_contrast = grad_anchor.add_(grad_contrast), None
    return loss, grad_anchor, grad_contrast


def _routes(problem: Problem, want_grad: bool):
    """:func:`chunked_forward`'s choice of route."""
    # below ~512 x 512 pairs the per-class positives' fixed costs (sort, scatter, gather) outweigh a dense
    # label comparison; above it the blockwise route is faster even when one block would hold everything
    self_offset, mask, two_way = problem.self_offset, problem.mask, problem.two_way
    n_anchor, n_contrast = problem.anchor_rows.shape[0], problem.contrast.shape[0]
    single = 0 < n_anchor * n_contrast <= _SINGLE_BLOCK_PAIRS
    no_empty_row = self_offset is None or (n_contrast >= 2 and (not two_way or n_anchor >= 2))
    fold_roles = problem.anchors_are_contrast and self_offset == 0
    if mask is None and single and no_empty_row and (not two_way or self_offset in (None, 0)):
        positive = _paired_by_index(problem.anchor_labels, problem.contrast_labels, self_offset, two_way)
        if positive is not None:
            return _single_block_paired(problem, want_grad, positive)
        return _single_block(problem, want_grad, fold_roles=fold_roles)
    if mask is not None and single and no_empty_row and not two_way:  # (two-way reads the mask transposed)
        return _single_block(problem, want_grad, fold_roles=fold_roles)
    if two_way and mask is None and self_offset in (None, 0):
        return _two_way_pass(problem, want_grad)
    if fold_roles and not two_way:
        half_matrix = _half_matrix_pass(problem, want_grad)
        if half_matrix is not None:
            stats, grad = half_matrix
            return row_losses(*stats, problem.scale).mean(), grad, None
    one_way = problem._replace(anchor=problem.anchor_rows, two_way=False)
    stats, grad_anchor, grad_contrast = _fused_pass(one_way, want_grad)
    loss = row_losses(*stats, problem.scale).mean()
    if two_way:
        reverse_stats, reverse_grad_contrast, reverse_grad_anchor = _fused_pass(one_way.reversed, want_grad)
        loss = 0.5 * (loss + row_losses(*reverse_stats, problem.scale).mean())
        if want_grad:
            grad_anchor = grad_anchor.add_(reverse_grad_anchor).mul_(0.5)
            grad_contrast = grad_contrast.add_(reverse_grad_contrast).mul_(0.5)
    return loss, grad_anchor, grad_contrast
