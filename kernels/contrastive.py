"""Fused Triton kernels for the contrastive op of :mod:`fastcl._core`.

Forward (one program per block of anchor rows): stream column tiles of the contrast set, form the dot-product tile
``x = a . c`` in fp32, compare labels on the fly (or read the ``[B, B]`` mask at ``[i % B, j % B]``), and keep a
running max, a rescaled running sum of ``exp`` (self-pair excluded), the positive-logit sum and the positive weight.
Only three fp32 numbers per anchor are written.

Backward recomputes the dot tiles (flash-attention style) and forms ``dS = c_softmax * softmax - c_pos * w``
tile by tile: one kernel accumulates ``dA = dS @ C`` per anchor block, a second ``dC = dS^T @ A`` per contrast block,
so no atomics are needed and the result is deterministic. At small N the reduction range (columns, or rows for
``dC``) is split over one more grid axis and the partials are combined in a fixed order (``split_count``). When the anchors are the contrast set (SupCon 'all',
NT-Xent) the first kernel alone forms ``(dS + dS^T) @ C`` from each tile (``TWO_WAY``); symmetric two-tower InfoNCE
uses the same flag in both kernels, so each tile serves both directions. Nothing ``N x N`` is ever allocated.

Feature dims up to 256 (fp32: 16) are one tile. Beyond, the logits loop over feature tiles of 128 (fp32: 32), and
each backward program owns the gradient columns of one output tile of up to 512 (fp32: 256, two-way kernels 128;
:func:`output_block_d_for`), loaded after the logits loop: every output tile recomputes the whole logits product,
so the tile is as wide as the registers allow (a ``[32, 512]`` fp32 accumulator). At D = 1024 the logits are
recomputed twice (fp32: 4 times, two-way 8; D = 128 once), and the self route costs the dense formulation's FLOPs
(:func:`backward_flops`; with 128-wide output tiles it was 3x: 9 tile products per 128 columns where dense needs 2).

Layout per op: ``@triton.jit`` kernels -> config choice (autotuned, fixed or deterministic; every choice passes
:func:`keep_config`) -> launchers (``contrastive_forward`` / ``contrastive_backward``, under the tensors' CUDA
device) -> ``triton_route`` / ``triton_forward`` / ``triton_backward`` (argument preparation happens here, once)
-> ``_TritonContrastiveLoss`` (autograd) -> ``triton_contrastive_loss`` (called by ``fastcl._core``).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from fastcl._core import TRITON_DTYPES, grad_coefficients, row_losses

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_SINGLE_D_TILE = 256  # feature dims up to this are held in one tile; larger ones are looped in tiles of 128
# fp32 (tf32x3: three tensor-core products on hi/lo split operands) holds the split feature tiles in registers:
# with feature tiles of 64 or 128, or one tile of 32, every two-way backward config spilled on sm_80 (README, "GPU
# resources"), so fp32 keeps one tile up to D = 16 and loops tiles of 32 beyond (the backward's output tiles are
# wider, MAX_OUTPUT_D_TILE_FP32).
MAX_SINGLE_D_TILE_FP32 = 16
D_TILE_FP32 = 32
# Larger dims: the logits loop over feature tiles of LOOPED_D_TILE (fp32: D_TILE_FP32), and each backward program
# accumulates an output tile of up to MAX_OUTPUT_D_TILE gradient columns (output_block_d_for). Module constants so
# that tests can shrink them to the interpreter's 16 x 16 blocks.
LOOPED_D_TILE = 128
MAX_OUTPUT_D_TILE = 512
# fp32 (tf32x3, tf32): the logits loop keeps feature tiles of 32 (the split tf32x3 operands are what spilled), but the
# output tile is up to 256 wide (one-way kernels) or 128 (two-way: twice the dS values; every two-way config tried
# at 256 spilled 8-320 B, README "GPU resources"): D = 128 recomputes the logits once, D = 1024 four / eight times.
MAX_OUTPUT_D_TILE_FP32 = 256
MAX_OUTPUT_D_TILE_FP32_TWO_WAY = 128

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
)
NOT_ALIGNMENT_SPECIALIZED = ("anchor_label_ptr", "contrast_label_ptr", "mask_ptr", "mask_t_ptr", "grad_output_ptr")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
# above 2**(SPAN - 126) comes from a normal p_ij at full fp32 precision (smaller ones are below anything the fp16 /
# bf16 dS cast keeps). Any other tile (spread-out or non-finite statistics: extreme logits, empty rows, NaN) takes
# one exp per pair as before.
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
        if logit_scale_log2 * (hi - lo) <= EXP_REUSE_MAX_SPAN:  # False for inf / NaN statistics
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
):
    """Row statistics of one block of anchors over this program's share of the contrast columns (grid axis 1
    splits the columns; the shares are combined in a fixed order by ``contrastive_forward``): the running max of the
    dots, the sum of ``exp2(logit_scale_log2 * (x - max))``, the positive-logit sum (natural units) and the positive
    weight, each stored at ``[split, row]``. ``n_*_bucket`` only key the autotuner (the next power of two of the
    sizes)."""
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
        pos_sum += tl.sum(w * dots, axis=1)
        pos_weight += tl.sum(w, axis=1)
        dots = tl.where(valid, dots, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(dots, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: avoid (-inf) - (-inf)
        run_sum = run_sum * tl.exp2(logit_scale_log2 * (run_max - shift)) + tl.sum(
            tl.exp2(logit_scale_log2 * (dots - shift[:, None])), axis=1
        )
        run_max = new_max

    out = tl.program_id(1).to(tl.int64) * n_anchor + rows
    tl.store(max_ptr + out, run_max, mask=row_valid)
    tl.store(sum_ptr + out, run_sum, mask=row_valid)
    tl.store(pos_logit_sum_ptr + out, pos_sum * (logit_scale_log2 * 0.6931471805599453), mask=row_valid)
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
):  # fmt: skip
    """The recomputed ``dS`` tile ``[BLOCK_M, BLOCK_N]`` both backward kernels multiply (plus ``dS'^T`` if TWO_WAY).

    Its entries are O(scale): the loss scale and ``grad_output`` are applied to the fp32 accumulator after the
    products, so a GradScaler's 2**16 never meets the fp16/bf16 cast of ``dS``. TWO_WAY reads the mask's
    transposed copy ``mask_t`` for the reverse weights; ``EXP_REUSE`` (only without RECOMPUTE_TRANSPOSED) rescales
    this tile's probabilities into the reverse direction's instead of a second exp per pair."""
    dots = _dots_tile(
        anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, dim, stride_anchor,
        stride_contrast, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D_TILE, INPUT_PRECISION,
    )  # fmt: skip
    w, valid = _pair_weights(
        rows, cols, row_valid, col_valid, row_labels, contrast_label_ptr, stride_contrast_label, mask_ptr,
        mask_period, stride_mask_row, stride_mask_col, self_offset, HAS_MASK, EXCLUDE_SELF,
    )  # fmt: skip
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
):
    """``dA[rows, d-tile] = grad_output * grad_scale * sum_j dS_ij c_j``; grid (anchor blocks, output feature tiles).

    ``TWO_WAY``: the loss also has the reverse direction (contrast rows as anchors over the anchor rows, with
    statistics ``col_*``), whose logits are the transpose of the same tile, so ``dS + dS'^T`` is formed from one
    recomputed tile. With ``A = C`` (SupCon 'all' mode: ``col_*`` are the row statistics) this kernel alone gives
    the whole gradient ``(dS + dS^T) C``: two tile products instead of four.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d_out = tl.program_id(1) * BLOCK_D_OUT
    row_valid = rows < n_anchor
    a_tile = _load_rows(anchor_ptr, rows, row_valid, stride_anchor, 0, dim, BLOCK_D)
    row_labels, lse_raw, coef_softmax, coef_pos = _load_row_stats(
        anchor_label_ptr, stride_anchor_label, lse_ptr, coef_softmax_ptr, coef_pos_ptr, rows, row_valid,
        not HAS_MASK,
    )  # fmt: skip

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
        )  # fmt: skip
        if not SINGLE_D_TILE:  # loaded here, the [BLOCK_N, BLOCK_D_OUT] tile is not live across the logits loop
            c_tile = _load_rows(contrast_ptr, cols, col_valid, stride_contrast, d_out, dim, BLOCK_D_OUT)
        acc = tl.dot(dlogits.to(c_tile.dtype), c_tile, acc, input_precision=INPUT_PRECISION)

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
):
    """``dC[cols, d-tile] = grad_output * grad_scale * sum_i dS_ij a_i``; grid (contrast blocks, feature tiles).

    ``TWO_WAY`` adds the reverse direction's ``dS'^T`` as in the anchor kernel (two-tower InfoNCE, symmetric).
    """
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
        dlogits = _backward_dlogits_tile(
            anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, row_labels,
            lse_raw, coef_softmax, coef_pos, col_lse_raw, col_coef_softmax, col_coef_pos,
            contrast_label_ptr, stride_contrast_label, mask_ptr, dim, mask_period, stride_anchor, stride_contrast,
            stride_mask_row, stride_mask_col, self_offset, logit_scale_log2,
            HAS_MASK, EXCLUDE_SELF, TWO_WAY, RECOMPUTE_TRANSPOSED, INPUT_PRECISION, SINGLE_D_TILE,
            BLOCK_M, BLOCK_N, BLOCK_D, mask_t_ptr, stride_mask_t_row, stride_mask_t_col, EXP_REUSE,
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


# ----------------------------------------------------------------------------------------------------------------
# Configs: autotuned, fixed (FASTCL_TRITON_AUTOTUNE=0), deterministic, fallback; every one passes keep_config
# ----------------------------------------------------------------------------------------------------------------

CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_m in (64, 128)
    for block_n in (32, 64, 128)
    for warps in (4, 8)
    for stages in (2, 3)
]
# The interpreter runs numpy per program: small tiles keep multi-tile loops exercised on small test shapes.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)
# The fixed config (FASTCL_TRITON_AUTOTUNE=0, deterministic mode, and the fallback when pruning keeps nothing): the
# first of these that keep_config keeps for the kernel, the feature tile and the dtype. The last one fits every
# kernel at every BLOCK_D on every supported arch (``python -m fastcl.aot`` checks it).
FIXED_PREFERENCE = (
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1),
)
# Tried first by the backward kernels at looped feature dims (D > 256): the wide output tile (a 32 x BLOCK_D_OUT
# accumulator) against 64 streamed rows (bwd_contrast) or columns (bwd_anchor), one stage (see keep_config); the
# two-way variants (twice the dS values) keep 32 x 32.
LOOPED_FIXED_PREFERENCE = (
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1),
)
# Opt-in shared memory per block (bytes) of the archs fastcl is lowered for (``cudaDevAttrMaxSharedMemoryPerBlockOptin``).
SHARED_MEMORY_LIMITS = {80: 166_912, 90: 232_448}
SHARED_MEMORY_BUDGET = min(SHARED_MEMORY_LIMITS.values())
KERNEL_NAMES = ("fwd", "bwd_anchor", "bwd_contrast")
# The variants a launch compiles: the backward kernels with and without the reverse direction fused in.
KERNEL_VARIANTS = ("fwd", "bwd_anchor", "bwd_anchor[two_way]", "bwd_contrast", "bwd_contrast[two_way]")
REGISTER_BUDGET = 48  # fp32 tile values per thread the kernels may hold without spilling (see keep_config)
# The backward at looped feature dims: the [resident, BLOCK_D_OUT] accumulator dominates (bf16, D = 1024, sm_80 and
# sm_90: 68-74 values per thread (32 x 512 accumulator) lowered to 168-216 registers without spills with labels,
# 206-231 with a mask; the two-way 32 x 64 tiles (80-84 values) reached 248-255 with a mask, 128-144 values spilled
# on one arch or the other); a second pipeline stage of the logits loop spilled even the 32 x 32 tile, so these
# configs run one stage.
LOOPED_REGISTER_BUDGET = 76


def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# fp32 inputs (tf32x3, and tf32 with allow_tf32): the configs that lower without spilling on sm_80 and sm_90, per
# kernel variant and feature tiling (one tile, D <= 16, or looped tiles of 32), found by sweeping tiles, warps,
# stages and feature tiles with ``python -m fastcl.aot`` (which fails on any kept config that spills). Preferred
# first: the first is the fixed config. ptxas settles between 74 and 255 registers per thread for these.
# One feature tile, not kept, for instance: two-way 64x32 tiles on sm_80 (8-40 B), 64x64 two-way tiles (144-440 B),
# any two-way tile with one tile of 32 (8-608 B); bwd_contrast 32x32 (tf32, sm_90, 8 B at 128 registers), two-way
# bwd_contrast 32x64 with a mask (64 B, sm_80), one-way bwd_anchor 64x32 / 2 stages (tf32, sm_80, 8 B) and 32x64
# (16 B, sm_90). Looped feature tiles, with the backward's output tiles of up to 256 columns (two-way: 128,
# output_block_d_for; the [resident, BLOCK_D_OUT] accumulator and the [streamed, BLOCK_D_OUT] operand): the
# one-way kernels keep a resident side of 32 (at 256 columns 64x32 bwd_anchor spilled 8-32 B, 32x64 bwd_contrast
# 24-224 B, 32x64 bwd_anchor 96-208 B); two-way at 128 columns: bwd_anchor 64x32 / 1 stage spilled 8 B (sm_80), 32x64
# 8-16 B, 32x32 16-56 B, 4 warps up to 296 B; two-way at 256 columns every config tried spilled (32x32: 8-72 B, 64x32
# / 32x64: 24-320 B), hence MAX_OUTPUT_D_TILE_FP32_TWO_WAY = 128. Both positive sources (labels, ``--mask``) and both
# precisions are lowered for these (D = 32, 64, 128, 256, 1024: every output-tile width).
FP32_CONFIGS = {
    ("fwd", True): (_cfg(64, 32, 8, 2), _cfg(64, 32, 8, 1), _cfg(32, 64, 8, 2), _cfg(32, 32, 8, 2)),
    ("fwd", False): (_cfg(64, 32, 8, 2), _cfg(64, 32, 8, 1), _cfg(32, 64, 8, 2), _cfg(32, 32, 8, 2)),
    ("bwd_anchor", True): (_cfg(64, 32, 8, 1),),
    ("bwd_anchor", False): (_cfg(32, 32, 8, 2), _cfg(32, 32, 8, 1)),
    ("bwd_contrast", True): (_cfg(32, 64, 8, 2), _cfg(32, 64, 8, 1), _cfg(64, 32, 8, 1)),
    ("bwd_contrast", False): (_cfg(32, 32, 8, 2),),
    ("bwd_anchor[two_way]", True): (_cfg(32, 32, 8, 2),),
    ("bwd_anchor[two_way]", False): (_cfg(64, 32, 8, 2),),
    ("bwd_contrast[two_way]", True): (_cfg(64, 32, 8, 1), _cfg(32, 32, 8, 2)),
    ("bwd_contrast[two_way]", False): (_cfg(32, 64, 8, 1),),
}
# Per output-tile width (BLOCK_D_OUT, output_block_d_for) where the variant's looped configs above spill: two-way
# bwd_contrast 32x64 / 1 stage spilled 8 B at 64-wide output tiles (D = 64, mask, tf32x3, sm_80), 2 stages do not
# (and spilled 8 B at 128-wide ones).
FP32_CONFIGS_BY_OUTPUT_TILE = {
    ("bwd_contrast[two_way]", 64): (_cfg(32, 64, 8, 2),),
}


# fp32 autotunes among its FP32_CONFIGS: those CONFIGS lacks are appended to it, autotuned for fp32 only.
_HALF_CANDIDATE_KEYS = frozenset((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in CONFIGS)
_FP32_ONLY = {
    (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c
    for configs in (*FP32_CONFIGS.values(), *FP32_CONFIGS_BY_OUTPUT_TILE.values())
    for c in configs
}
_FP32_ONLY = {key: c for key, c in _FP32_ONLY.items() if key not in _HALF_CANDIDATE_KEYS}
CONFIGS = CONFIGS + list(_FP32_ONLY.values())


def variant_name(kernel: str, two_way: bool = False) -> str:
    return f"{kernel}[two_way]" if two_way and kernel != "fwd" else kernel


def shared_memory_estimate(config: triton.Config, dim: int, element_size: int, kernel: str = "bwd_anchor") -> int:
    """Upper estimate of the shared memory (bytes) Triton allocates for ``kernel`` (a :data:`KERNEL_VARIANTS` name)
    in ``config`` at feature dim ``dim`` (only its tile, :func:`block_d_for`, matters).

    One feature tile: the tile that stays put (the anchor block of the forward and of ``bwd_anchor``, the contrast
    block of ``bwd_contrast``) is staged once and the streamed tile ``num_stages`` deep. Looped feature tiles
    (D > 256): both operands of the logits product stream, and the backward also stages its output-tile operand
    (``[streamed, BLOCK_D_OUT]``, :func:`output_block_d_for`). The backward kernels stage the ``[BLOCK_M,
    BLOCK_N]`` dS tile and layout-conversion scratch. fp32 tiles count twice (tf32x3 stages split operands).
    Calibrated against ``python -m fastcl.aot`` (its ``estim`` column).
    """
    block_d, single = block_d_for(dim, element_size)
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    stages = max(config.num_stages, 1)
    resident, streamed = (block_n, block_m) if kernel.startswith("bwd_contrast") else (block_m, block_n)
    if single:
        tiles = (resident + streamed * stages) * block_d * element_size
    else:
        tiles = (block_m + block_n) * block_d * element_size * stages
        if kernel != "fwd":
            tiles += streamed * output_block_d_for(dim, element_size, kernel.endswith("[two_way]")) * element_size
    if element_size == 4:
        tiles *= 2
    scratch = 0 if kernel == "fwd" else block_m * block_n * max(element_size, 2) * 2
    return tiles + scratch + 1024


def register_estimate(config: triton.Config, dim: int, element_size: int, kernel: str = "bwd_anchor") -> float:
    """fp32 tile values per thread that ``kernel`` keeps live: the logits / dS tile (twice with the reverse
    direction fused in), plus the gradient accumulator ``[resident rows, BLOCK_D_OUT]`` (backward; looped dims
    have their own budget, :data:`LOOPED_REGISTER_BUDGET`) or the anchor tile
    (forward; both operand tiles when the feature dim is looped). fp32 inputs count 1.5x (tf32x3 splits operands).

    Calibrated on sm_80 / sm_90 lowerings of bf16 (``python -m fastcl.aot``): within :data:`REGISTER_BUDGET` nothing
    spilled (bwd_contrast also counts its transposed dS tile and prefetched anchor tiles, see below); the forward
    128x64 / 8 warps (64 values, sm_80) and 64x128 (D = 256), the two-way backward 64x64 / 8 warps (64 values) did.
    fp32 does not go by this estimate: the split tf32x3 operands' register use is not proportional to the tiles
    (a 32x32 two-way tile spilled where 32x64 did not), so :func:`keep_config` keeps the :data:`FP32_CONFIGS`
    lowered spill-free.
    """
    block_d, single = block_d_for(dim, element_size)
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    threads = 32 * config.num_warps
    tile = block_m * block_n * (2 if kernel.endswith("[two_way]") else 1)
    if kernel.startswith("bwd_contrast"):
        # dS is transposed for its product, and the prefetched anchor tiles of later stages stay in registers:
        # two-way at D = 256 spilled 8 B on sm_90 at 48 values (64x32) and at 42 values with 2 stages (32x32).
        tile = tile * 1.25 + (config.num_stages - 1) * block_m * block_d * element_size / 4
    if kernel == "fwd":
        resident = (block_m if single else block_m + block_n) * block_d * element_size / 4
    else:  # the fp32 gradient accumulator
        resident = (block_n if kernel.startswith("bwd_contrast") else block_m) * output_block_d_for(
            dim, element_size, kernel.endswith("[two_way]")
        )
    return (tile + resident) / threads * (1.5 if element_size == 4 else 1.0)


def keep_config(
    config: triton.Config,
    dim: int,
    element_size: int,
    kernel: str = "bwd_anchor",
    shared_limit: int = SHARED_MEMORY_BUDGET,
) -> bool:
    """Whether ``config`` fits ``kernel`` (a :data:`KERNEL_VARIANTS` name) at feature dim ``dim``: its shared memory
    (:func:`shared_memory_estimate`) within ``shared_limit`` (default: the smallest of :data:`SHARED_MEMORY_LIMITS`)
    and its live fp32 tile values (:func:`register_estimate`) within :data:`REGISTER_BUDGET` per thread; fp32
    inputs: one of the spill-free :data:`FP32_CONFIGS` of the variant and feature tiling (output-tile width)."""
    if shared_memory_estimate(config, dim, element_size, kernel) > shared_limit:
        return False
    if element_size == 4:
        return _config_key(config) in {_config_key(c) for c in _fp32_configs(kernel, dim)}
    if kernel.endswith("[two_way]") and min(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) >= 64:
        return False  # the exp reuse keeps p_ij live next to dS: 64x64 two-way tiles spilled 16-472 B (D = 16, 64)
    budget = REGISTER_BUDGET
    if kernel != "fwd" and not block_d_for(dim, element_size)[1]:
        if config.num_stages > 1:  # the wide accumulator leaves no registers for a second logits-loop stage
            return False
        budget = LOOPED_REGISTER_BUDGET
    return register_estimate(config, dim, element_size, kernel) <= budget


def _fp32_configs(kernel: str, dim: int) -> tuple:
    """The variant's :data:`FP32_CONFIGS` at this feature tiling (:data:`FP32_CONFIGS_BY_OUTPUT_TILE` first)."""
    single = block_d_for(dim, 4)[1]
    if kernel != "fwd" and not single:
        by_width = FP32_CONFIGS_BY_OUTPUT_TILE.get((kernel, output_block_d_for(dim, 4, kernel.endswith("[two_way]"))))
        if by_width:
            return by_width
    return FP32_CONFIGS[(kernel, single)]


def fixed_preference(kernel: str, dim: int, element_size: int) -> tuple:
    """:data:`FIXED_PREFERENCE`, after :data:`LOOPED_FIXED_PREFERENCE` for the backward kernels at looped dims."""
    if kernel != "fwd" and not block_d_for(dim, element_size)[1]:
        return LOOPED_FIXED_PREFERENCE + FIXED_PREFERENCE
    return FIXED_PREFERENCE


def fixed_config(kernel: str, dim: int, element_size: int, candidates=None) -> triton.Config:
    """The one config used without autotuning: the first of ``candidates`` (default :func:`fixed_preference`) that
    :func:`keep_config` keeps, else the last preference (the smallest, which fits everywhere). fp32: the first of
    the variant's :data:`FP32_CONFIGS` (whatever the candidates)."""
    if element_size == 4:
        return _fp32_configs(kernel, dim)[0]
    for config in candidates if candidates is not None else fixed_preference(kernel, dim, element_size):
        if keep_config(config, dim, element_size, kernel):
            return config
    return FIXED_PREFERENCE[-1]


def autotune_configs(kernel: str, dim: int, element_size: int, configs=None) -> list:
    """The configs the autotuner times for this kernel variant, feature dim and dtype (never empty)."""
    configs = CONFIGS if configs is None else configs
    kept = [
        c
        for c in configs
        if keep_config(c, dim, element_size, kernel) and (element_size == 4 or _config_key(c) not in _FP32_ONLY)
    ]
    return kept or [fixed_config(kernel, dim, element_size)]


def launchable_configs(kernel: str, dim: int, element_size: int) -> list:
    """Every config a GPU launch can use for this kernel variant / feature dim / dtype: the autotuned set and the
    fixed (also deterministic and fallback) config. ``python -m fastcl.aot`` lowers exactly these."""
    configs = autotune_configs(kernel, dim, element_size)
    fixed = fixed_config(kernel, dim, element_size)
    return configs + [fixed] if all(_config_key(fixed) != _config_key(c) for c in configs) else configs


def _config_key(config: triton.Config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def tuning_configs():
    """The autotune candidates: one config under the interpreter, else :data:`CONFIGS`."""
    if _interpreting():
        return [INTERPRETER_CONFIG]
    return CONFIGS


def autotuning_enabled() -> bool:
    """False under ``torch.use_deterministic_algorithms(True)`` (the timing-driven choice could differ between
    processes and with it the summation order) and with ``FASTCL_TRITON_AUTOTUNE=0``."""
    return os.environ.get("FASTCL_TRITON_AUTOTUNE", "1") != "0" and not torch.are_deterministic_algorithms_enabled()


# Timing function for the autotuner; None is Triton's GPU benchmarker. Tests set a host timer to drive the
# autotuned launch path through the interpreter.
AUTOTUNE_DO_BENCH = None
RAW_KERNELS = {
    "fwd": _contrastive_fwd_kernel,
    "bwd_anchor": _contrastive_bwd_anchor_kernel,
    "bwd_contrast": _contrastive_bwd_contrast_kernel,
}
_AUTOTUNE_KEY = ["n_anchor_bucket", "n_contrast_bucket", "dim", "HAS_MASK", "EXCLUDE_SELF", "INPUT_PRECISION"]


def _autotuned(name, configs):
    def prune(configs, named_args, **kwargs):
        dim = named_args["dim"]
        two_way = kwargs.get("TWO_WAY", named_args.get("TWO_WAY", False))
        element_size = named_args["anchor_ptr"].element_size()
        return autotune_configs(variant_name(name, two_way), dim, element_size, configs)

    return triton.autotune(
        configs=configs,
        key=_AUTOTUNE_KEY + ([] if name == "fwd" else ["TWO_WAY"]),
        prune_configs_by={"early_config_prune": prune},
        do_bench=AUTOTUNE_DO_BENCH,
    )(RAW_KERNELS[name])


_tuned = {}


def _kernel_and_config(variant, dim, element_size):
    """``(kernel, config)`` for a :data:`KERNEL_VARIANTS` name: the raw kernel and its one config, or the autotuned
    kernel and None."""
    name = variant.split("[")[0]
    configs = tuning_configs()
    if len(configs) == 1:
        return RAW_KERNELS[name], configs[0]
    if not autotuning_enabled():
        candidates = list(fixed_preference(variant, dim, element_size)) + configs
        return RAW_KERNELS[name], fixed_config(variant, dim, element_size, candidates)
    if name not in _tuned:  # built on first use so importing fastcl compiles nothing
        _tuned[name] = _autotuned(name, configs)
    return _tuned[name], None


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def block_d_for(dim: int, element_size: int = 2) -> tuple[int, bool]:
    """``(BLOCK_D, SINGLE_D_TILE)``: the whole feature dim in one tile when it fits (up to 256, 16 for fp32),
    else the logits loop over tiles of :data:`LOOPED_D_TILE` (fp32: :data:`D_TILE_FP32`)."""
    if dim <= (MAX_SINGLE_D_TILE_FP32 if element_size == 4 else MAX_SINGLE_D_TILE):
        return max(16, triton.next_power_of_2(dim)), True
    return (D_TILE_FP32 if element_size == 4 else LOOPED_D_TILE), False


def output_block_d_for(dim: int, element_size: int = 2, two_way: bool = False) -> int:
    """``BLOCK_D_OUT``: the width of the gradient columns one backward program accumulates. The feature tile itself
    when the dim fits one tile, else the dim rounded up to a power of two, at most :data:`MAX_OUTPUT_D_TILE` (fp32:
    :data:`MAX_OUTPUT_D_TILE_FP32`, and :data:`MAX_OUTPUT_D_TILE_FP32_TWO_WAY` for the ``TWO_WAY`` kernels): each
    output tile recomputes the whole logits product, so wide tiles keep that recomputation rare
    (:func:`backward_flops`)."""
    block_d, single = block_d_for(dim, element_size)
    if single:
        return block_d
    if element_size == 4:
        widest = MAX_OUTPUT_D_TILE_FP32_TWO_WAY if two_way else MAX_OUTPUT_D_TILE_FP32
    else:
        widest = MAX_OUTPUT_D_TILE
    return max(block_d, min(widest, triton.next_power_of_2(dim)))


def backward_output_tiles(dim: int, element_size: int = 2, two_way: bool = False) -> int:
    """Programs per row block along the feature dim in the backward grid (each recomputes the logits once)."""
    return triton.cdiv(dim, output_block_d_for(dim, element_size, two_way))


def backward_flops(
    route: str, n_anchor: int, n_contrast: int, dim: int, element_size: int = 2, recompute: bool = False
) -> int:
    """Tensor-core FLOPs (2 per multiply-add, padded tile widths) of the backward launch for ``route`` (as in
    :func:`triton_route`), from the launcher's own tiling: every program of each of the
    :func:`backward_output_tiles` feature tiles recomputes the ``Na x Nc`` logits over the whole (padded) dim, twice
    with ``recompute`` (two-way tiles whose transposed dots are recomputed, :func:`recompute_transposed`), then
    multiplies ``dS`` into its ``BLOCK_D_OUT`` gradient columns. ``'self'`` runs one kernel, the others two (``dA``
    and ``dC``). Compare with :func:`dense_backward_flops`."""
    if route not in ("self", "one_way", "two_way"):
        raise ValueError(f"route must be 'self', 'one_way' or 'two_way', got {route!r}")
    block_d, _ = block_d_for(dim, element_size)
    two_way = route != "one_way"
    tiles = backward_output_tiles(dim, element_size, two_way)
    logits_k = triton.cdiv(dim, block_d) * block_d
    logits_per_tile = 2 if recompute and two_way else 1
    block_d_out = output_block_d_for(dim, element_size, two_way)
    per_kernel = 2 * n_anchor * n_contrast * tiles * (logits_per_tile * logits_k + block_d_out)
    return per_kernel * (1 if route == "self" else 2)


def dense_backward_flops(n_anchor: int, n_contrast: int, dim: int) -> int:
    """FLOPs of the dense formulation, forward and backward (``6 Na Nc D``): the logits ``A C^T``, then ``dS C``
    and ``dS^T A``. The fused backward (:func:`backward_flops`) is compared with it: it recomputes the logits."""
    return 6 * n_anchor * n_contrast * dim


def input_precision_for(dtype: torch.dtype) -> str:
    """fp32 dots run on tensor cores: ``'tf32'`` when ``torch.backends.cuda.matmul.allow_tf32`` is set, else
    ``'tf32x3'`` (three TF32 products with split operands: fp32-level accuracy, PyTorch's default)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"


def recompute_transposed(dtype: torch.dtype) -> bool:
    """Whether TWO_WAY tiles recompute the transposed dots ``x_ji`` instead of reusing ``x_ij``.

    The reverse direction's statistics come from a forward pass that formed ``x_ji`` with ``c_j`` as the left
    operand; the backward must see bitwise the same value, or at |logits| ~ 1e5 one ulp of the dot moves a
    saturated softmax probability by percents. Tensor-core products of fp16/bf16 (and tf32) operands are exact
    and summed in k order, so ``x_ij == x_ji`` and the tile is reused; fp32 via tf32x3 sums its two cross terms in
    operand order, and the interpreter's numpy matmul is not symmetric either: there the transposed tile is
    recomputed (one more tile product).
    """
    return _interpreting() or dtype == torch.float32


# TWO_WAY tiles that reuse x_ij as x_ji (see recompute_transposed) also reuse its exp: p'_ji = p_ij * r_i * q_j
# (EXP_REUSE_MAX_SPAN). Tests force it on in the interpreter, with dots that are exact and hence symmetric.
TRANSPOSED_EXP_REUSE = True


def reuse_transposed_exp(dtype: torch.dtype) -> bool:
    """Whether TWO_WAY tiles rescale ``p_ij`` into the reverse direction's ``p'_ji`` (one exp per pair, not two):
    only where the dots tile is reused bitwise (not :func:`recompute_transposed`)."""
    return TRANSPOSED_EXP_REUSE and not recompute_transposed(dtype)


def _device_guard(device: torch.device):
    """Launch on the tensors' device: Triton launches on the current CUDA device and stream."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class _LaunchArgs:
    """The kernels' view of one call, prepared once: unit column stride for the embeddings (row strides passed),
    labels and mask passed with their strides, placeholders for what the variant does not read. ``two_way`` (a
    backward that adds the reverse direction) with a mask also prepares ``mask_t``, a contiguous copy of
    ``mask.T``, so the reverse weights ``mask[j % B, i % B]`` are read along rows (``mask_t_strides``)."""

    def __init__(self, anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, two_way=False):
        for name, x in (("anchor", anchor), ("contrast", contrast)):
            if x.dim() != 2:
                raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
            if x.dtype not in TRITON_DTYPES:
                raise TypeError(f"the Triton kernels take float32, float16 or bfloat16 {name}, got {x.dtype}")
        if contrast.dtype != anchor.dtype or contrast.device != anchor.device or contrast.shape[1] != anchor.shape[1]:
            raise ValueError(
                f"anchor {tuple(anchor.shape)} {anchor.dtype} on {anchor.device} and contrast {tuple(contrast.shape)} "
                f"{contrast.dtype} on {contrast.device} must share dtype, device and feature dim"
            )
        same = contrast is anchor
        self.anchor = anchor if anchor.stride(1) == 1 else anchor.contiguous()
        self.contrast = self.anchor if same else (contrast if contrast.stride(1) == 1 else contrast.contiguous())
        self.device = anchor.device
        self.has_mask = mask is not None
        if self.has_mask:
            if mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.device != anchor.device:
                raise ValueError(f"mask must be a square [B, B] tensor on {anchor.device}, got {tuple(mask.shape)}")
            mask = mask if mask.dtype == torch.float32 else mask.to(torch.float32)
            placeholder = torch.zeros(1, dtype=torch.int64, device=self.device)
            anchor_labels = contrast_labels = placeholder
        else:
            for name, labels, n in (
                ("anchor_labels", anchor_labels, anchor.shape[0]),
                ("contrast_labels", contrast_labels, contrast.shape[0]),
            ):
                if labels is None or labels.shape != (n,) or labels.device != anchor.device:
                    raise ValueError(f"{name} must be a [{n}] integer tensor on {anchor.device} (or pass a mask)")
                if labels.is_floating_point() or labels.is_complex():
                    raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
            mask = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.n_anchor, self.n_contrast, self.dim = anchor.shape[0], contrast.shape[0], anchor.shape[1]
        self.block_d, single = block_d_for(self.dim, anchor.element_size())
        self.element_size = anchor.element_size()
        self.tensors = (self.anchor, self.contrast, anchor_labels, contrast_labels, mask)
        self.mask_t = mask.t().contiguous() if self.has_mask and two_way else mask  # no host sync
        self.mask_t_strides = (self.mask_t.stride(0), self.mask_t.stride(1)) if self.has_mask else (1, 1)
        self.sizes = (
            self.n_anchor,
            self.n_contrast,
            self.dim,
            mask.shape[0] if self.has_mask else 1,
            self.anchor.stride(0),
            self.contrast.stride(0),
            anchor_labels.stride(0),
            contrast_labels.stride(0),
            mask.stride(0) if self.has_mask else 1,
            mask.stride(1) if self.has_mask else 1,
            0 if self_offset is None else int(self_offset),
            triton.next_power_of_2(max(self.n_anchor, 1)),
            triton.next_power_of_2(max(self.n_contrast, 1)),
        )
        self.constexprs = dict(
            HAS_MASK=self.has_mask,
            EXCLUDE_SELF=self_offset is not None,
            INPUT_PRECISION=input_precision_for(anchor.dtype),
            SINGLE_D_TILE=single,
            BLOCK_D=self.block_d,
        )


def _launch(name, grid_of, leading, args: _LaunchArgs, scalars, constexprs):
    variant = variant_name(name, constexprs.get("TWO_WAY", False))
    kernel, config = _kernel_and_config(variant, args.dim, args.element_size)
    with _device_guard(args.device):
        if config is not None:
            meta = dict(config.kwargs)
            kernel[grid_of(meta)](
                *leading, *args.tensors, *scalars, **constexprs, **meta,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip
        else:
            kernel[grid_of](*leading, *args.tensors, *scalars, **constexprs)


# Small batches: split the reduction range (columns in the forward and bwd_anchor, rows in bwd_contrast) over one
# more grid axis when the output blocks alone would leave SMs idle, aiming at SPLIT_PROGRAMS_PER_SM programs per SM;
# each share streams at least MIN_SPLIT_LENGTH rows / columns. The partial results are combined in a fixed order
# (deterministic). INTERPRETER_SMS stands in for the SM count off-GPU.
SPLIT_PROGRAMS_PER_SM = 2
MIN_SPLIT_LENGTH = 32
NOMINAL_BLOCK = 64
INTERPRETER_SMS = 1
_sm_counts = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def split_count(output_programs: int, reduce_length: int, device: torch.device) -> int:
    """How many shares the reduction range is split into (1: no split), from the programs the outputs give (counted
    with blocks of :data:`NOMINAL_BLOCK`), the range's length and the device's SM count."""
    wanted = SPLIT_PROGRAMS_PER_SM * sm_count(device)
    if output_programs >= wanted:
        return 1
    return max(1, min(triton.cdiv(wanted, max(output_programs, 1)), reduce_length // MIN_SPLIT_LENGTH))


def contrastive_forward(args: _LaunchArgs, inv_temperature):
    """Row statistics ``(lse_raw, pos_logit_sum, pos_weight)``, each fp32 ``[Na]`` (``lse_raw / t`` is the natural
    log-sum-exp of the logits). With the columns split over ``S`` programs per anchor block, the kernel writes
    ``[S, Na]`` partial (max, scaled sum, positive-logit sum, positive weight) and they are combined here in a
    fixed order; ``S == 1`` gives exactly the single-pass statistics."""
    splits = split_count(triton.cdiv(args.n_anchor, NOMINAL_BLOCK), args.n_contrast, args.device)
    parts = [torch.empty(splits, args.n_anchor, dtype=torch.float32, device=args.device) for _ in range(4)]
    _launch(
        "fwd",
        lambda meta: (triton.cdiv(args.n_anchor, meta["BLOCK_M"]), splits),
        parts,
        args,
        (*args.sizes, inv_temperature * LOG2E),
        args.constexprs,
    )
    run_max, run_sum, pos_logit_sum, pos_weight = parts
    scale_log2 = inv_temperature * LOG2E
    top = run_max.max(dim=0).values
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    total = (run_sum * torch.exp2(scale_log2 * (run_max - shift))).sum(dim=0)
    lse_raw = shift + torch.log2(total) / scale_log2  # -inf for an empty denominator; exact when one term rules
    return lse_raw, pos_logit_sum.sum(dim=0), pos_weight.sum(dim=0)


def contrastive_backward(
    args: _LaunchArgs,
    grad_output,
    inv_temperature,
    row_stats,
    col_stats=None,
    grad_scale=1.0,
    need_anchor=True,
    need_contrast=True,
):
    """``(dA, dC)`` in the input dtypes.

    ``row_stats = (lse_raw, coef_softmax, coef_pos)`` fp32 ``[Na]`` give ``dS_ij = coef_softmax_i p_ij - coef_pos_i
    w_ij``, and ``grad_output * grad_scale`` (``grad_output`` a one-element fp32 device tensor) multiplies the fp32
    accumulators of ``dS @ C`` and ``dS^T @ A``. With ``col_stats`` (``[Nc]``, the reverse direction: contrast rows
    as anchors), ``dS'^T`` is added from the same tiles. ``col_stats is row_stats`` means the anchors are the
    contrast set: then ``dA`` is the whole gradient and ``dC`` is None.
    """
    two_way = col_stats is not None
    self_symmetric = col_stats is row_stats
    stats = (*row_stats, *(col_stats if two_way else row_stats))
    constexprs = dict(
        args.constexprs,
        TWO_WAY=two_way,
        RECOMPUTE_TRANSPOSED=two_way and recompute_transposed(args.anchor.dtype),
        BLOCK_D_OUT=output_block_d_for(args.dim, args.element_size, two_way),
        EXP_REUSE=two_way and reuse_transposed_exp(args.anchor.dtype),
    )
    if two_way and args.has_mask and args.mask_t is args.tensors[4]:
        raise ValueError("a two-way masked backward needs _LaunchArgs(..., two_way=True) (the transposed mask)")
    # passed by keyword (the kernels' last runtime arguments): the transposed mask of TWO_WAY and its strides
    constexprs.update(
        mask_t_ptr=args.mask_t, stride_mask_t_row=args.mask_t_strides[0], stride_mask_t_col=args.mask_t_strides[1]
    )
    d_tiles = backward_output_tiles(args.dim, args.element_size, two_way)
    scalars = (*args.sizes,)
    grad_anchor = grad_contrast = None
    if need_anchor:
        splits = split_count(triton.cdiv(args.n_anchor, NOMINAL_BLOCK) * d_tiles, args.n_contrast, args.device)
        grad_anchor = _gradient_buffer(args.anchor, splits)
        _launch(
            "bwd_anchor",
            lambda meta: (triton.cdiv(args.n_anchor, meta["BLOCK_M"]), d_tiles, splits),
            (grad_anchor, grad_output),
            _with_stats(args, stats),
            (*scalars, grad_anchor.stride(-2), inv_temperature * LOG2E, grad_scale),
            constexprs,
        )
        grad_anchor = _reduce_splits(grad_anchor, args.anchor.dtype)
    if need_contrast and not self_symmetric:
        splits = split_count(triton.cdiv(args.n_contrast, NOMINAL_BLOCK) * d_tiles, args.n_anchor, args.device)
        grad_contrast = _gradient_buffer(args.contrast, splits)
        _launch(
            "bwd_contrast",
            lambda meta: (triton.cdiv(args.n_contrast, meta["BLOCK_N"]), d_tiles, splits),
            (grad_contrast, grad_output),
            _with_stats(args, stats),
            (*scalars, grad_contrast.stride(-2), inv_temperature * LOG2E, grad_scale),
            constexprs,
        )
        grad_contrast = _reduce_splits(grad_contrast, args.contrast.dtype)
    return grad_anchor, grad_contrast


def _gradient_buffer(x: torch.Tensor, splits: int) -> torch.Tensor:
    """The gradient itself (``splits == 1``), else fp32 partial sums ``[splits, N, D]``."""
    if splits == 1:
        return torch.empty_like(x)
    return torch.empty(splits, *x.shape, dtype=torch.float32, device=x.device)


def _reduce_splits(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum the partial gradients over the split axis in a fixed order (deterministic), in fp32."""
    return buffer if buffer.dim() == 2 else buffer.sum(dim=0).to(dtype)


def _with_stats(args: _LaunchArgs, stats) -> _LaunchArgs:
    """A shallow copy of ``args`` whose tensor list also carries the backward's six statistics vectors."""
    out = object.__new__(_LaunchArgs)
    out.__dict__.update(args.__dict__)
    out.tensors = (*args.tensors, *stats)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Entry points (also called directly by the torch.library custom op) and autograd
# ----------------------------------------------------------------------------------------------------------------


def triton_route(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, two_way) -> str:
    """``'self'`` when the anchors are the contrast set itself (the same tensor object as given, same labels,
    ``self_offset == 0``: SupCon's 'all' mode; one backward kernel), ``'two_way'`` for the mean of both directions,
    else ``'one_way'``. Decided from the tensors as passed, before any copy."""
    if two_way:
        return "two_way"
    if anchor is contrast and self_offset == 0 and _same_labels(anchor_labels, contrast_labels, mask):
        return "self"
    return "one_way"


def triton_forward(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, route):
    """``(loss, residuals)``: the fp32 scalar loss and the fp32 row statistics the backward needs,
    ``residuals = (pos_weight [Na], lse_raw [Na], col_pos_weight [Nc], col_lse_raw [Nc])`` (the ``col_*`` pair is
    empty unless ``route == 'two_way'``; ``lse_raw`` is the log-sum-exp in dot-product units, ``lse_raw / t`` the
    natural one)."""
    args = _LaunchArgs(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset)
    lse, pos_logit_sum, pos_weight = contrastive_forward(args, inv_temperature)
    loss = row_losses(pos_logit_sum, pos_weight, lse * inv_temperature, scale).mean()
    col_pos_weight = col_lse = pos_weight.new_empty(0)
    if route == "two_way":
        reverse = _LaunchArgs(contrast, anchor, contrast_labels, anchor_labels, mask, self_offset)
        col_lse, col_pos_logit_sum, col_pos_weight = contrastive_forward(reverse, inv_temperature)
        loss = 0.5 * (loss + row_losses(col_pos_logit_sum, col_pos_weight, col_lse * inv_temperature, scale).mean())
    return loss, (pos_weight, lse, col_pos_weight, col_lse)


def triton_backward(
    grad_output,
    anchor,
    contrast,
    anchor_labels,
    contrast_labels,
    mask,
    residuals,
    self_offset,
    inv_temperature,
    scale,
    route,
    need_anchor=True,
    need_contrast=True,
):
    """``(grad_anchor, grad_contrast)`` of ``grad_output * loss`` (either None when not needed; with
    ``route == 'self'`` the whole gradient is ``grad_anchor`` and ``grad_contrast`` is None). ``grad_output`` is
    read on the device (no host sync) and applied to the fp32 accumulators, never to the half-precision dS."""
    args = _LaunchArgs(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, route != "one_way")
    if not torch.is_tensor(grad_output):
        grad_output = torch.tensor(float(grad_output), device=args.device)
    grad_output = grad_output.detach().to(device=args.device, dtype=torch.float32).reshape(1)
    pos_weight, lse, col_pos_weight, col_lse = residuals
    row_stats = (lse, *grad_coefficients(pos_weight, scale))
    col_stats = {"one_way": None, "self": row_stats}.get(route)
    grad_scale = inv_temperature / args.n_anchor
    if route == "two_way":  # both directions average over Na == Nc anchors; the loss is their mean
        col_stats = (col_lse, *grad_coefficients(col_pos_weight, scale))
        grad_scale *= 0.5
    return contrastive_backward(
        args,
        grad_output,
        inv_temperature,
        row_stats,
        col_stats,
        grad_scale=grad_scale,
        need_anchor=need_anchor or route == "self",
        need_contrast=need_contrast,
    )


class _TritonContrastiveLoss(torch.autograd.Function):
    """Autograd over :func:`triton_forward` / :func:`triton_backward` (``route`` from :func:`triton_route`)."""

    @staticmethod
    def forward(
        ctx, anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, route
    ):
        loss, residuals = triton_forward(
            anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, route
        )
        ctx.save_for_backward(anchor, contrast, anchor_labels, contrast_labels, mask, *residuals)
        ctx.settings = (self_offset, inv_temperature, scale, route)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        anchor, contrast, anchor_labels, contrast_labels, mask, *residuals = ctx.saved_tensors
        self_offset, inv_temperature, scale, route = ctx.settings
        if route == "self":
            contrast = anchor  # the same tensor: saved tensors come back as distinct objects
        grad_anchor, grad_contrast = triton_backward(
            grad_output,
            anchor,
            contrast,
            anchor_labels,
            contrast_labels,
            mask,
            tuple(residuals),
            self_offset,
            inv_temperature,
            scale,
            route,
            need_anchor=ctx.needs_input_grad[0],
            need_contrast=ctx.needs_input_grad[1],
        )
        if route == "self":  # anchor and contrast are one input: its whole gradient goes through one slot
            return grad_anchor, None, None, None, None, None, None, None, None
        return grad_anchor, grad_contrast, None, None, None, None, None, None, None


def triton_contrastive_loss(
    anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, two_way=False
):
    """The op of :mod:`fastcl._core` with the fused Triton kernels; arguments as in ``contrastive_loss``.

    When the anchors are the contrast set itself (the same tensor, same labels, ``self_offset == 0``: SupCon's
    'all' mode), the backward pass takes the one-kernel route; ``two_way`` shares every tile between both
    directions. The route is decided on the tensors as given; the kernels' argument preparation (strides,
    contiguity, dtype checks) happens in :func:`triton_forward` / :func:`triton_backward`.
    """
    route = triton_route(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, two_way)
    return _TritonContrastiveLoss.apply(
        anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, route
    )


def _same_labels(anchor_labels, contrast_labels, mask) -> bool:
    """The same label tensor on both sides (checked without a device sync), or a mask."""
    return mask is not None or (
        anchor_labels is not None
        and contrast_labels is not None
        and anchor_labels.shape == contrast_labels.shape
        and anchor_labels.stride() == contrast_labels.stride()
        and anchor_labels.data_ptr() == contrast_labels.data_ptr()
    )
