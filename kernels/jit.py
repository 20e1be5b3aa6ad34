"""The ``@triton.jit`` kernels of the contrastive op: one forward kernel and two backward kernels.

Forward (one program per block of anchor rows): stream column tiles of the contrast set, form the dot-product tile
``x = a . c`` in fp32, compare labels on the fly (or read the ``[B, B]`` mask at ``[i % B, j % B]``), and keep a
running max, a rescaled running sum of ``exp`` (self-pair excluded), the positive-logit sum and the positive weight.
Only three fp32 numbers per anchor are written.

Backward recomputes the dot tiles (flash-attention style) and forms ``dS = c_softmax * softmax - c_pos * w``
tile by tile: one kernel accumulates ``dA = dS @ C`` per anchor block, a second ``dC = dS^T @ A`` per contrast block,
so no atomics are needed and the result is deterministic. At small N the reduction range (columns, or rows for
``dC``) is split over one more grid axis and the partials are combined in a fixed order by the launcher. When the
anchors are the contrast rows (SupCon 'all', NT-Xent) the first kernel alone forms ``(dS + dS^T) @ C`` from each tile
(``TWO_WAY``); symmetric two-tower InfoNCE uses the same flag in both kernels, so each tile serves both directions.
Nothing ``N x N`` is ever allocated.

Extra contrast columns (a memory queue, shared hard negatives; ``HAS_EXTRA``): the forward and the anchor-gradient
kernel stream a second column range, the ``n_extra`` rows at ``extra_ptr``, after the batch columns, into the same
row statistics and the same ``dA`` accumulator. Extra rows are never anchors and have no self pair; with
``EXTRA_LABELS`` an extra row whose label (``extra_label_ptr``) equals the anchor's is a positive, else none is. Their
own gradient is the contrast-gradient kernel launched with the extra rows as its contrast set. ``HAS_MARGIN`` (one
way) drops column j from row i where ``x_ij > threshold_i`` (``threshold_ptr``: the positive's dot plus the margin,
formed by the launcher) unless it is a positive; NaN dots compare false and stay. With the flags off these
arguments are None (compile-time constants) and the kernels compile exactly as without them.

Called only by :mod:`fastcl.kernels.launch` (and lowered ahead of time by :mod:`fastcl.aot`); the tile sizes they
are launched with come from :mod:`fastcl.kernels.tiling`.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # the positive-logit sums are stored in natural units: log2 units * ln 2

# Integer arguments left out of Triton's divisibility-by-16 specialization (one compiled kernel whatever the batch
# size, the mask period or the rank offset), and pointers left out of the 16-byte alignment one (labels and masks
# may be strided views such as ``pairs[:, 1]``; the grad_output scalar is read once). Embedding pointers, row
# strides and the feature dim stay specialized: they decide vectorized and asynchronous (cp.async / TMA-free
# pipelined) tile loads. ``fastcl.aot`` reads these lists to lower exactly what a launch compiles.
NOT_SPECIALIZED = (
    "n_anchor",
    "n_contrast",
    "mask_period",
    "self_offset",
    "n_anchor_bucket",
    "n_contrast_bucket",
    "stride_anchor_label",
    "stride_contrast_label",
    "stride_mask_row",
    "stride_mask_col",
    "stride_mask_t_row",
    "stride_mask_t_col",
    "n_extra",
    "stride_extra_label",
)
NOT_ALIGNMENT_SPECIALIZED = (
    "anchor_label_ptr",
    "contrast_label_ptr",
    "mask_ptr",
    "mask_t_ptr",
    "grad_output_ptr",
    "extra_label_ptr",
    "threshold_ptr",
)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
#
# Units: every kernel works with the raw dot products ``x_ij = a_i . c_j`` and applies ``logit_scale_log2 =
# log2(e) / t`` after subtracting a row statistic in the same units, ``exp2(logit_scale_log2 * (x_ij - m_i))``.
# The subtraction is exact where it matters (the largest dot of a row), and no multiply-then-subtract pair is left
# for the compiler to contract into an FMA in one pass and not the other, so the forward and the backward see the
# same probabilities even at |logits| ~ 1e5. The per-row log-sum-exp is stored in those units too:
# ``lse_raw_i = m_i + log2(sum_j exp2(logit_scale_log2 * (x_ij - m_i))) / logit_scale_log2``, so the natural
# log-sum-exp of the logits is ``lse_raw_i / t``.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, valid, stride, d0, dim, BLOCK_D: tl.constexpr):
    """Tile ``[len(rows), BLOCK_D]`` of a ``[*, dim]`` matrix with unit column stride, columns ``d0 .. d0 + BLOCK_D``,
    zero padded."""
    d = d0 + tl.arange(0, BLOCK_D)
    offsets = rows.to(tl.int64)[:, None] * stride + d[None, :]  # int64: N * D may exceed 2**31
    return tl.load(ptr + offsets, mask=valid[:, None] & (d[None, :] < dim), other=0.0)


@triton.jit
def _dots_tile(
    anchor_ptr,
    contrast_ptr,
    a_tile,
    c_tile,
    rows,
    cols,
    row_valid,
    col_valid,
    dim,
    stride_anchor,
    stride_contrast,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Raw dot products ``a_i . c_j`` ``[BLOCK_M, BLOCK_N]`` in fp32 (preloaded tiles when the dim fits one tile)."""
    if SINGLE_D_TILE:
        acc = tl.dot(a_tile, tl.trans(c_tile), input_precision=INPUT_PRECISION)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            a = _load_rows(anchor_ptr, rows, row_valid, stride_anchor, d0, dim, BLOCK_D)
            c = _load_rows(contrast_ptr, cols, col_valid, stride_contrast, d0, dim, BLOCK_D)
            acc = tl.dot(a, tl.trans(c), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _pair_weights(
    rows,
    cols,
    row_valid,
    col_valid,
    row_labels,
    contrast_label_ptr,
    stride_contrast_label,
    mask_ptr,
    mask_period,
    stride_mask_row,
    stride_mask_col,
    self_offset,
    HAS_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
):
    """``(w, valid)`` ``[BLOCK_M, BLOCK_N]``: positive weights and which pairs enter the softmax denominator."""
    valid = row_valid[:, None] & col_valid[None, :]
    if EXCLUDE_SELF:
        valid = valid & (rows[:, None] + self_offset != cols[None, :])
    if HAS_MASK:
        w = tl.load(
            mask_ptr
            + (rows % mask_period).to(tl.int64)[:, None] * stride_mask_row
            + (cols % mask_period).to(tl.int64)[None, :] * stride_mask_col,
            mask=valid,
            other=0.0,
        )
    else:
        col_labels = tl.load(contrast_label_ptr + cols.to(tl.int64) * stride_contrast_label, mask=col_valid, other=0)
        w = tl.where(valid & (row_labels[:, None] == col_labels[None, :]), 1.0, 0.0)
    return w, valid


@triton.jit
def _extra_pair_weights(cols, row_valid, col_valid, row_labels, extra_label_ptr, stride_extra_label,
                        EXTRA_LABELS: tl.constexpr):  # fmt: skip
    """``(w, valid)`` ``[BLOCK_M, BLOCK_N]`` of a tile of extra columns: no self pair; positives where the extra
    row's label equals the anchor's (``EXTRA_LABELS``), else none."""
    valid = row_valid[:, None] & col_valid[None, :]
    if EXTRA_LABELS:  # (rows past the end are never stored: only the columns' range masks the weights)
        col_labels = tl.load(extra_label_ptr + cols.to(tl.int64) * stride_extra_label, mask=col_valid, other=0)
        w = tl.where(col_valid[None, :] & (row_labels[:, None] == col_labels[None, :]), 1.0, 0.0)
    else:
        w = tl.zeros(valid.shape, dtype=tl.float32)
    return w, valid


@triton.jit
def _within_margin(valid, w, dots, threshold):
    """``valid`` without the non-positive pairs whose dot exceeds the row's ``threshold`` (the false-negative
    margin); a NaN dot or threshold compares false and the pair stays in."""
    return tl.where((dots > threshold[:, None]) & (w == 0.0), False, valid)


@triton.jit
def _update_row_stats(dots, w, valid, run_max, run_sum, pos_sum, pos_weight, logit_scale_log2):
    """The running row statistics ``(max, sum of exp2, positive dot sum, positive weight)`` with one more tile."""
    pos_sum += tl.sum(w * dots, axis=1)
    pos_weight += tl.sum(w, axis=1)
    dots = tl.where(valid, dots, float("-inf"))
    new_max = tl.maximum(run_max, tl.max(dots, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: avoid (-inf) - (-inf)
    run_sum = run_sum * tl.exp2(logit_scale_log2 * (run_max - shift)) + tl.sum(
        tl.exp2(logit_scale_log2 * (dots - shift[:, None])), axis=1
    )
    return new_max, run_sum, pos_sum, pos_weight


@triton.jit
def _probs_tile(dots, lse_raw, valid, logit_scale_log2):
    """``p_ij = exp2(logit_scale_log2 * (x_ij - lse_raw_i))`` (fp32, one exp per pair; excluded pairs -> 0)."""
    return tl.exp2(logit_scale_log2 * tl.where(valid, dots - lse_raw[:, None], float("-inf")))


@triton.jit
def _dlogits_tile(probs, coef_softmax, coef_pos, w):
    """``dS = coef_softmax * softmax - coef_pos * w`` (fp32) from the tile's probabilities."""
    return coef_softmax[:, None] * probs - coef_pos[:, None] * w


# TWO_WAY without recomputed dots (x_ji == x_ij bitwise): the reverse direction's probabilities are
# p'_ji = exp2(s (x_ij - lse'_j)) = p_ij * r_i * q_j with per-row / per-column factors r_i = exp2(s (lse_i - ref))
# and q_j = exp2(s (ref - lse'_j)) around a tile reference ref: BLOCK_M + BLOCK_N exps per tile instead of
# BLOCK_M * BLOCK_N. Only where the tile's log-sum-exps lie within EXP_REUSE_MAX_SPAN (in log2 units) of each other:
# then each factor is within 2**(+-SPAN/2) (no overflow or underflow) and p_ij >= p'_ji * 2**-SPAN, so every p'_ji
# above 2**(SPAN - 126) comes from a normal p_ij at full fp32 precision. Smaller ones (below 2**-62) may lose bits or
# flush to zero: fp16's dS cast keeps nothing below 2**-24 anyway; bf16 has fp32's exponent range and would keep
# them, but such a term is 2**-54 below bf16's rounding step of any dS entry of order 1 / N (N < 2**30), so the
# gradient does not see it. Spread-out or infinite statistics (extreme logits, empty rows) take one exp per pair.
# NaN statistics do not switch the reuse off (tl.min / tl.max skip NaN), but they reach p'_ji through r_i or q_j as
# they would through the exp: that row or column is NaN either way.
EXP_REUSE_MAX_SPAN = tl.constexpr(64.0)


@triton.jit
def _transposed_dlogits_tile(
    dots,
    probs,
    w,
    valid,
    rows,
    cols,
    row_valid,
    col_valid,
    mask_t_ptr,
    mask_period,
    stride_mask_t_row,
    stride_mask_t_col,
    lse_raw,
    col_lse_raw,
    col_coef_softmax,
    col_coef_pos,
    logit_scale_log2,
    HAS_MASK: tl.constexpr,
    EXP_REUSE: tl.constexpr,
):
    """``dS'_ji`` laid out ``[BLOCK_M, BLOCK_N]``: the reverse direction (contrast j as anchor over the anchors),
    from the same dots tile (``x_ji = x_ij``) and the reverse direction's per-column statistics.

    With a mask its weights ``mask[j % B, i % B]`` are read from the contiguous transposed copy ``mask_t``
    (``[i % B, j % B]``: consecutive columns are consecutive addresses, as for ``w``). ``EXP_REUSE``: ``probs`` are
    this tile's ``p_ij`` and ``dots`` are bitwise the reverse direction's ``x_ji``; the probabilities are rescaled
    instead of exponentiated again where that is exact enough (see ``EXP_REUSE_MAX_SPAN``)."""
    w_t = w  # labels: [l_i == l_j] is symmetric
    if HAS_MASK:
        w_t = tl.load(
            mask_t_ptr
            + (rows % mask_period).to(tl.int64)[:, None] * stride_mask_t_row
            + (cols % mask_period).to(tl.int64)[None, :] * stride_mask_t_col,
            mask=valid,
            other=0.0,
        )
    if EXP_REUSE:
        row_lo = tl.min(tl.where(row_valid, lse_raw, float("inf")), axis=0)
        row_hi = tl.max(tl.where(row_valid, lse_raw, float("-inf")), axis=0)
        col_lo = tl.min(tl.where(col_valid, col_lse_raw, float("inf")), axis=0)
        col_hi = tl.max(tl.where(col_valid, col_lse_raw, float("-inf")), axis=0)
        lo = tl.minimum(row_lo, col_lo)
        hi = tl.maximum(row_hi, col_hi)
        if logit_scale_log2 * (hi - lo) <= EXP_REUSE_MAX_SPAN:  # False for infinite statistics; NaN ones are skipped
            ref = lo + 0.5 * (hi - lo)
            row_factor = tl.exp2(logit_scale_log2 * tl.where(row_valid, lse_raw - ref, 0.0))
            col_factor = tl.exp2(logit_scale_log2 * tl.where(col_valid, ref - col_lse_raw, 0.0))
            probs_t = probs * row_factor[:, None] * col_factor[None, :]
        else:
            probs_t = tl.exp2(logit_scale_log2 * tl.where(valid, dots - col_lse_raw[None, :], float("-inf")))
    else:
        probs_t = tl.exp2(logit_scale_log2 * tl.where(valid, dots - col_lse_raw[None, :], float("-inf")))
    return col_coef_softmax[None, :] * probs_t - col_coef_pos[None, :] * w_t


@triton.jit
def _split_range(n, BLOCK: tl.constexpr, AXIS: tl.constexpr):
    """``(start, end)`` of this program's share of ``range(n)`` along grid axis ``AXIS``: whole blocks of ``BLOCK``,
    split as evenly as possible over the axis (one share when the axis has one program)."""
    n_blocks = tl.cdiv(n, BLOCK)
    per_split = tl.cdiv(n_blocks, tl.num_programs(AXIS))
    start = tl.program_id(AXIS) * per_split * BLOCK
    return start, tl.minimum(start + per_split * BLOCK, n)


@triton.jit(
    do_not_specialize=NOT_SPECIALIZED,
    do_not_specialize_on_alignment=NOT_ALIGNMENT_SPECIALIZED,
)
def _contrastive_fwd_kernel(
    max_ptr,
    sum_ptr,
    pos_logit_sum_ptr,
    pos_weight_ptr,
    anchor_ptr,
    contrast_ptr,
    anchor_label_ptr,
    contrast_label_ptr,
    mask_ptr,
    n_anchor,
    n_contrast,
    dim,
    mask_period,
    stride_anchor,
    stride_contrast,
    stride_anchor_label,
    stride_contrast_label,
    stride_mask_row,
    stride_mask_col,
    self_offset,
    n_anchor_bucket,
    n_contrast_bucket,
    logit_scale_log2,
    HAS_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCALE_FROM_PTR: tl.constexpr,
    extra_ptr=None,
    extra_label_ptr=None,
    threshold_ptr=None,
    n_extra=None,
    stride_extra=None,
    stride_extra_label=None,
    HAS_EXTRA: tl.constexpr = False,
    EXTRA_LABELS: tl.constexpr = False,
    HAS_MARGIN: tl.constexpr = False,
):
    """Row statistics of one block of anchors over this program's share of the contrast columns (grid axis 1
    splits the columns; the shares are combined in a fixed order by ``contrastive_forward``): the running max of the
    dots, the sum of ``exp2(logit_scale_log2 * (x - max))``, the positive-logit sum (natural units) and the positive
    weight, each stored at ``[split, row]``. ``n_*_bucket`` only key the autotuner (the next power of two of the
    sizes). ``HAS_EXTRA``: this program's share of the extra columns too (module notes); ``HAS_MARGIN``: the
    false-negative margin in both ranges."""
    if SCALE_FROM_PTR:  # a learnable temperature: log2(e) / t read on the device (no host sync)
        logit_scale_log2 = tl.load(logit_scale_log2).to(tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < n_anchor
    a_tile = _load_rows(anchor_ptr, rows, row_valid, stride_anchor, 0, dim, BLOCK_D)
    row_labels = rows
    if not HAS_MASK:
        row_labels = tl.load(anchor_label_ptr + rows.to(tl.int64) * stride_anchor_label, mask=row_valid, other=0)

    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    threshold = run_sum
    if HAS_MARGIN:
        threshold = tl.load(threshold_ptr + rows, mask=row_valid, other=0.0)
    col_begin, col_end = _split_range(n_contrast, BLOCK_N, 1)
    for col_start in range(col_begin, col_end, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_valid = cols < col_end
        c_tile = a_tile
        if SINGLE_D_TILE:
            c_tile = _load_rows(contrast_ptr, cols, col_valid, stride_contrast, 0, dim, BLOCK_D)
        dots = _dots_tile(
            anchor_ptr,
            contrast_ptr,
            a_tile,
            c_tile,
            rows,
            cols,
            row_valid,
            col_valid,
            dim,
            stride_anchor,
            stride_contrast,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            SINGLE_D_TILE,
            INPUT_PRECISION,
        )
        w, valid = _pair_weights(
            rows,
            cols,
            row_valid,
            col_valid,
            row_labels,
            contrast_label_ptr,
            stride_contrast_label,
            mask_ptr,
            mask_period,
            stride_mask_row,
            stride_mask_col,
            self_offset,
            HAS_MASK,
            EXCLUDE_SELF,
        )
        if HAS_MARGIN:
            valid = _within_margin(valid, w, dots, threshold)
        run_max, run_sum, pos_sum, pos_weight = _update_row_stats(
            dots, w, valid, run_max, run_sum, pos_sum, pos_weight, logit_scale_log2
        )
    if HAS_EXTRA:  # the extra columns: the same statistics over this program's share of them
        extra_begin, extra_end = _split_range(n_extra, BLOCK_N, 1)
        for extra_start in range(extra_begin, extra_end, BLOCK_N):
            cols = extra_start + tl.arange(0, BLOCK_N)
            col_valid = cols < extra_end
            q_tile = a_tile
            if SINGLE_D_TILE:
                q_tile = _load_rows(extra_ptr, cols, col_valid, stride_extra, 0, dim, BLOCK_D)
            dots = _dots_tile(
                anchor_ptr, extra_ptr, a_tile, q_tile, rows, cols, row_valid, col_valid, dim, stride_anchor,
                stride_extra, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D_TILE, INPUT_PRECISION,
            )  # fmt: skip
            w, valid = _extra_pair_weights(
                cols, row_valid, col_valid, row_labels, extra_label_ptr, stride_extra_label, EXTRA_LABELS
            )
            if HAS_MARGIN:
                valid = _within_margin(valid, w, dots, threshold)
            run_max, run_sum, pos_sum, pos_weight = _update_row_stats(
                dots, w, valid, run_max, run_sum, pos_sum, pos_weight, logit_scale_log2
            )

    out = tl.program_id(1).to(tl.int64) * n_anchor + rows
    tl.store(max_ptr + out, run_max, mask=row_valid)
    tl.store(sum_ptr + out, run_sum, mask=row_valid)
    tl.store(pos_logit_sum_ptr + out, pos_sum * (logit_scale_log2 * LN2), mask=row_valid)
    tl.store(pos_weight_ptr + out, pos_weight, mask=row_valid)


@triton.jit
def _load_row_stats(
    label_ptr, stride_label, lse_ptr, coef_softmax_ptr, coef_pos_ptr, idx, valid, LOAD_LABELS: tl.constexpr
):
    """``(labels, lse_raw, coef_softmax, coef_pos)`` of rows ``idx`` (``labels = idx`` unless ``LOAD_LABELS``)."""
    labels = idx
    if LOAD_LABELS:
        labels = tl.load(label_ptr + idx.to(tl.int64) * stride_label, mask=valid, other=0)
    lse_raw = tl.load(lse_ptr + idx, mask=valid, other=0.0)
    coef_softmax = tl.load(coef_softmax_ptr + idx, mask=valid, other=0.0)
    coef_pos = tl.load(coef_pos_ptr + idx, mask=valid, other=0.0)
    return labels, lse_raw, coef_softmax, coef_pos


@triton.jit
def _backward_dlogits_tile(
    anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, row_labels,
    lse_raw, coef_softmax, coef_pos, col_lse_raw, col_coef_softmax, col_coef_pos,
    contrast_label_ptr, stride_contrast_label, mask_ptr, dim, mask_period, stride_anchor, stride_contrast,
    stride_mask_row, stride_mask_col, self_offset, logit_scale_log2,
    HAS_MASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, TWO_WAY: tl.constexpr, RECOMPUTE_TRANSPOSED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SINGLE_D_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    mask_t_ptr, stride_mask_t_row, stride_mask_t_col, EXP_REUSE: tl.constexpr,
    threshold, HAS_MARGIN: tl.constexpr,
):  # fmt: skip
    """The recomputed ``dS`` tile ``[BLOCK_M, BLOCK_N]`` both backward kernels multiply (plus ``dS'^T`` if TWO_WAY).

    Its entries are O(scale): the loss scale and ``grad_output`` are applied to the fp32 accumulator after the
    products, so a GradScaler's 2**16 never meets the fp16/bf16 cast of ``dS``. TWO_WAY reads the mask's
    transposed copy ``mask_t`` for the reverse weights; ``EXP_REUSE`` (only without RECOMPUTE_TRANSPOSED) rescales
    this tile's probabilities into the reverse direction's instead of a second exp per pair. ``HAS_MARGIN`` (one
    way only): the pairs beyond the rows' ``threshold`` leave the softmax."""
    dots = _dots_tile(
        anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, dim, stride_anchor,
        stride_contrast, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D_TILE, INPUT_PRECISION,
    )  # fmt: skip
    w, valid = _pair_weights(
        rows, cols, row_valid, col_valid, row_labels, contrast_label_ptr, stride_contrast_label, mask_ptr,
        mask_period, stride_mask_row, stride_mask_col, self_offset, HAS_MASK, EXCLUDE_SELF,
    )  # fmt: skip
    if HAS_MARGIN:
        valid = _within_margin(valid, w, dots, threshold)
    probs = _probs_tile(dots, lse_raw, valid, logit_scale_log2)
    dlogits = _dlogits_tile(probs, coef_softmax, coef_pos, w)
    if TWO_WAY:
        dots_t = dots
        if RECOMPUTE_TRANSPOSED:  # x_ji exactly as the reverse direction's forward formed it (see module notes)
            dots_t = tl.trans(
                _dots_tile(
                    contrast_ptr, anchor_ptr, c_tile, a_tile, cols, rows, col_valid, row_valid, dim, stride_contrast,
                    stride_anchor, BLOCK_N, BLOCK_M, BLOCK_D, SINGLE_D_TILE, INPUT_PRECISION,
                )
            )  # fmt: skip
        dlogits += _transposed_dlogits_tile(
            dots_t, probs, w, valid, rows, cols, row_valid, col_valid, mask_t_ptr, mask_period, stride_mask_t_row,
            stride_mask_t_col, lse_raw, col_lse_raw, col_coef_softmax, col_coef_pos, logit_scale_log2, HAS_MASK,
            EXP_REUSE and not RECOMPUTE_TRANSPOSED,
        )  # fmt: skip
    return dlogits


@triton.jit(
    do_not_specialize=NOT_SPECIALIZED,
    do_not_specialize_on_alignment=NOT_ALIGNMENT_SPECIALIZED,
)
def _contrastive_bwd_anchor_kernel(
    grad_anchor_ptr,
    grad_output_ptr,
    anchor_ptr,
    contrast_ptr,
    anchor_label_ptr,
    contrast_label_ptr,
    mask_ptr,
    lse_ptr,
    coef_softmax_ptr,
    coef_pos_ptr,
    col_lse_ptr,
    col_coef_softmax_ptr,
    col_coef_pos_ptr,
    n_anchor,
    n_contrast,
    dim,
    mask_period,
    stride_anchor,
    stride_contrast,
    stride_anchor_label,
    stride_contrast_label,
    stride_mask_row,
    stride_mask_col,
    self_offset,
    n_anchor_bucket,
    n_contrast_bucket,
    stride_grad,
    logit_scale_log2,
    grad_scale,
    mask_t_ptr,
    stride_mask_t_row,
    stride_mask_t_col,
    HAS_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    TWO_WAY: tl.constexpr,
    RECOMPUTE_TRANSPOSED: tl.constexpr,
    EXP_REUSE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCALE_FROM_PTR: tl.constexpr,
    extra_ptr=None,
    extra_label_ptr=None,
    threshold_ptr=None,
    n_extra=None,
    stride_extra=None,
    stride_extra_label=None,
    HAS_EXTRA: tl.constexpr = False,
    EXTRA_LABELS: tl.constexpr = False,
    HAS_MARGIN: tl.constexpr = False,
):
    """``dA[rows, d-tile] = grad_output * grad_scale * sum_j dS_ij c_j``; grid (anchor blocks, output feature tiles).

    ``TWO_WAY``: the loss also has the reverse direction (contrast rows as anchors over the anchor rows, with
    statistics ``col_*``), whose logits are the transpose of the same tile, so ``dS + dS'^T`` is formed from one
    recomputed tile. With ``A = C`` (SupCon 'all' mode: ``col_*`` are the row statistics) this kernel alone gives
    the whole gradient ``(dS + dS^T) C``: two tile products instead of four.

    ``HAS_EXTRA``: ``dA`` also sums ``dS_iq q_q`` over this program's share of the extra columns (one way: extra
    rows are never anchors, so no reverse term); ``HAS_MARGIN`` (one way): the false-negative margin in both ranges.
    """
    if SCALE_FROM_PTR:  # a learnable temperature: log2(e) / t read on the device (no host sync)
        logit_scale_log2 = tl.load(logit_scale_log2).to(tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d_out = tl.program_id(1) * BLOCK_D_OUT
    row_valid = rows < n_anchor
    a_tile = _load_rows(anchor_ptr, rows, row_valid, stride_anchor, 0, dim, BLOCK_D)
    row_labels, lse_raw, coef_softmax, coef_pos = _load_row_stats(
        anchor_label_ptr, stride_anchor_label, lse_ptr, coef_softmax_ptr, coef_pos_ptr, rows, row_valid,
        not HAS_MASK,
    )  # fmt: skip
    threshold = lse_raw
    if HAS_MARGIN:
        threshold = tl.load(threshold_ptr + rows, mask=row_valid, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D_OUT], dtype=tl.float32)
    col_begin, col_end = _split_range(n_contrast, BLOCK_N, 2)
    for col_start in range(col_begin, col_end, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_valid = cols < col_end
        if SINGLE_D_TILE:  # the logits operand is also the output operand
            c_tile = _load_rows(contrast_ptr, cols, col_valid, stride_contrast, d_out, dim, BLOCK_D_OUT)
        else:  # unused by the looped logits product; the output operand is loaded after it (see below)
            c_tile = tl.zeros([BLOCK_N, BLOCK_D], dtype=contrast_ptr.dtype.element_ty)
        col_lse_raw = tl.zeros([BLOCK_N], dtype=tl.float32)
        col_coef_softmax = col_lse_raw
        col_coef_pos = col_lse_raw
        if TWO_WAY:
            _, col_lse_raw, col_coef_softmax, col_coef_pos = _load_row_stats(
                contrast_label_ptr, stride_contrast_label, col_lse_ptr, col_coef_softmax_ptr, col_coef_pos_ptr,
                cols, col_valid, False,
            )  # fmt: skip
        dlogits = _backward_dlogits_tile(
            anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, row_labels,
            lse_raw, coef_softmax, coef_pos, col_lse_raw, col_coef_softmax, col_coef_pos,
            contrast_label_ptr, stride_contrast_label, mask_ptr, dim, mask_period, stride_anchor, stride_contrast,
            stride_mask_row, stride_mask_col, self_offset, logit_scale_log2,
            HAS_MASK, EXCLUDE_SELF, TWO_WAY, RECOMPUTE_TRANSPOSED, INPUT_PRECISION, SINGLE_D_TILE,
            BLOCK_M, BLOCK_N, BLOCK_D, mask_t_ptr, stride_mask_t_row, stride_mask_t_col, EXP_REUSE,
            threshold, HAS_MARGIN,
        )  # fmt: skip
        if not SINGLE_D_TILE:  # loaded here, the [BLOCK_N, BLOCK_D_OUT] tile is not live across the logits loop
            c_tile = _load_rows(contrast_ptr, cols, col_valid, stride_contrast, d_out, dim, BLOCK_D_OUT)
        acc = tl.dot(dlogits.to(c_tile.dtype), c_tile, acc, input_precision=INPUT_PRECISION)
    if HAS_EXTRA:  # dS_q @ Q over this program's share of the extra columns (as above, one way)
        extra_begin, extra_end = _split_range(n_extra, BLOCK_N, 2)
        for extra_start in range(extra_begin, extra_end, BLOCK_N):
            cols = extra_start + tl.arange(0, BLOCK_N)
            col_valid = cols < extra_end
            if SINGLE_D_TILE:
                q_tile = _load_rows(extra_ptr, cols, col_valid, stride_extra, d_out, dim, BLOCK_D_OUT)
            else:
                q_tile = tl.zeros([BLOCK_N, BLOCK_D], dtype=extra_ptr.dtype.element_ty)
            dots = _dots_tile(
                anchor_ptr, extra_ptr, a_tile, q_tile, rows, cols, row_valid, col_valid, dim, stride_anchor,
                stride_extra, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D_TILE, INPUT_PRECISION,
            )  # fmt: skip
            w, valid = _extra_pair_weights(
                cols, row_valid, col_valid, row_labels, extra_label_ptr, stride_extra_label, EXTRA_LABELS
            )
            if HAS_MARGIN:
                valid = _within_margin(valid, w, dots, threshold)
            dlogits = _dlogits_tile(_probs_tile(dots, lse_raw, valid, logit_scale_log2), coef_softmax, coef_pos, w)
            if not SINGLE_D_TILE:
                q_tile = _load_rows(extra_ptr, cols, col_valid, stride_extra, d_out, dim, BLOCK_D_OUT)
            acc = tl.dot(dlogits.to(q_tile.dtype), q_tile, acc, input_precision=INPUT_PRECISION)

    d = d_out + tl.arange(0, BLOCK_D_OUT)
    grad_output = tl.load(grad_output_ptr).to(tl.float32)
    # split columns (grid axis 2): fp32 partial sums at [split, row, :], reduced in a fixed order by the launcher
    out_rows = tl.program_id(2).to(tl.int64) * n_anchor + rows.to(tl.int64)
    tl.store(
        grad_anchor_ptr + out_rows[:, None] * stride_grad + d[None, :],
        (acc * (grad_scale * grad_output)).to(grad_anchor_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (d[None, :] < dim),
    )


@triton.jit(
    do_not_specialize=NOT_SPECIALIZED,
    do_not_specialize_on_alignment=NOT_ALIGNMENT_SPECIALIZED,
)
def _contrastive_bwd_contrast_kernel(
    grad_contrast_ptr,
    grad_output_ptr,
    anchor_ptr,
    contrast_ptr,
    anchor_label_ptr,
    contrast_label_ptr,
    mask_ptr,
    lse_ptr,
    coef_softmax_ptr,
    coef_pos_ptr,
    col_lse_ptr,
    col_coef_softmax_ptr,
    col_coef_pos_ptr,
    n_anchor,
    n_contrast,
    dim,
    mask_period,
    stride_anchor,
    stride_contrast,
    stride_anchor_label,
    stride_contrast_label,
    stride_mask_row,
    stride_mask_col,
    self_offset,
    n_anchor_bucket,
    n_contrast_bucket,
    stride_grad,
    logit_scale_log2,
    grad_scale,
    mask_t_ptr,
    stride_mask_t_row,
    stride_mask_t_col,
    HAS_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    TWO_WAY: tl.constexpr,
    RECOMPUTE_TRANSPOSED: tl.constexpr,
    EXP_REUSE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCALE_FROM_PTR: tl.constexpr,
    threshold_ptr=None,
    HAS_MARGIN: tl.constexpr = False,
):
    """``dC[cols, d-tile] = grad_output * grad_scale * sum_i dS_ij a_i``; grid (contrast blocks, feature tiles).

    ``TWO_WAY`` adds the reverse direction's ``dS'^T`` as in the anchor kernel (two-tower InfoNCE, symmetric).
    ``HAS_MARGIN`` (one way): the false-negative margin. Extra rows get their gradient from this kernel with them
    as the contrast set (no self pair; without labels a ``[1, 1]`` zero mask: no positive).
    """
    if SCALE_FROM_PTR:  # a learnable temperature: log2(e) / t read on the device (no host sync)
        logit_scale_log2 = tl.load(logit_scale_log2).to(tl.float32)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_out = tl.program_id(1) * BLOCK_D_OUT
    col_valid = cols < n_contrast
    col_lse_raw = tl.zeros([BLOCK_N], dtype=tl.float32)
    col_coef_softmax = col_lse_raw
    col_coef_pos = col_lse_raw
    if TWO_WAY:
        _, col_lse_raw, col_coef_softmax, col_coef_pos = _load_row_stats(
            contrast_label_ptr, stride_contrast_label, col_lse_ptr, col_coef_softmax_ptr, col_coef_pos_ptr,
            cols, col_valid, False,
        )  # fmt: skip
    c_tile = _load_rows(contrast_ptr, cols, col_valid, stride_contrast, 0, dim, BLOCK_D)

    acc = tl.zeros([BLOCK_N, BLOCK_D_OUT], dtype=tl.float32)
    row_begin, row_end = _split_range(n_anchor, BLOCK_M, 2)
    for row_start in range(row_begin, row_end, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_valid = rows < row_end
        if SINGLE_D_TILE:  # the logits operand is also the output operand
            a_tile = _load_rows(anchor_ptr, rows, row_valid, stride_anchor, d_out, dim, BLOCK_D_OUT)
        else:  # unused by the looped logits product; the output operand is loaded after it (see below)
            a_tile = tl.zeros([BLOCK_M, BLOCK_D], dtype=anchor_ptr.dtype.element_ty)
        row_labels, lse_raw, coef_softmax, coef_pos = _load_row_stats(
            anchor_label_ptr, stride_anchor_label, lse_ptr, coef_softmax_ptr, coef_pos_ptr, rows, row_valid,
            not HAS_MASK,
        )  # fmt: skip
        threshold = lse_raw
        if HAS_MARGIN:
            threshold = tl.load(threshold_ptr + rows, mask=row_valid, other=0.0)
        dlogits = _backward_dlogits_tile(
            anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, row_labels,
            lse_raw, coef_softmax, coef_pos, col_lse_raw, col_coef_softmax, col_coef_pos,
            contrast_label_ptr, stride_contrast_label, mask_ptr, dim, mask_period, stride_anchor, stride_contrast,
            stride_mask_row, stride_mask_col, self_offset, logit_scale_log2,
            HAS_MASK, EXCLUDE_SELF, TWO_WAY, RECOMPUTE_TRANSPOSED, INPUT_PRECISION, SINGLE_D_TILE,
            BLOCK_M, BLOCK_N, BLOCK_D, mask_t_ptr, stride_mask_t_row, stride_mask_t_col, EXP_REUSE,
            threshold, HAS_MARGIN,
        )  # fmt: skip
        if not SINGLE_D_TILE:  # loaded here, the [BLOCK_M, BLOCK_D_OUT] tile is not live across the logits loop
            a_tile = _load_rows(anchor_ptr, rows, row_valid, stride_anchor, d_out, dim, BLOCK_D_OUT)
        acc = tl.dot(tl.trans(dlogits.to(a_tile.dtype)), a_tile, acc, input_precision=INPUT_PRECISION)

    d = d_out + tl.arange(0, BLOCK_D_OUT)
    grad_output = tl.load(grad_output_ptr).to(tl.float32)
    out_cols = tl.program_id(2).to(tl.int64) * n_contrast + cols.to(tl.int64)
    tl.store(
        grad_contrast_ptr + out_cols[:, None] * stride_grad + d[None, :],
        (acc * (grad_scale * grad_output)).to(grad_contrast_ptr.dtype.element_ty),
        mask=col_valid[:, None] & (d[None, :] < dim),
    )
