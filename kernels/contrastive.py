"""Fused Triton kernels for the contrastive op of :mod:`fastcl._core`.

Forward (one program per block of anchor rows): stream column tiles of the contrast set, form the logits tile
``s = a . c / t`` in fp32, compare labels on the fly (or read the ``[B, B]`` mask at ``[i % B, j % B]``), and keep a
running max, a rescaled running sum of ``exp`` (self-pair excluded), the positive-logit sum and the positive weight.
Only three fp32 numbers per anchor are written.

Backward recomputes the logits tiles (flash-attention style) and forms ``dS = c_softmax * softmax - c_pos * w``
tile by tile: one kernel accumulates ``dA = dS @ C`` per anchor block, a second ``dC = dS^T @ A`` per contrast block,
so no atomics are needed and the result is deterministic. When the anchors are the contrast set (SupCon 'all',
NT-Xent) the first kernel alone forms ``(dS + dS^T) @ C`` from each tile (``TWO_WAY``); symmetric two-tower InfoNCE
uses the same flag in both kernels, so each tile serves both directions. Nothing ``N x N`` is ever allocated.

Layout per op: ``@triton.jit`` kernels -> launchers (``contrastive_forward`` / ``contrastive_backward``) ->
``_TritonContrastiveLoss`` (autograd) -> ``triton_contrastive_loss`` (called by ``fastcl._core``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastcl._core import grad_coefficients, row_losses

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_SINGLE_D_TILE = 256  # feature dims up to this are held in one tile; larger ones are looped in tiles of 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, valid, stride, d0, dim, BLOCK_D: tl.constexpr):
    """Tile ``[len(rows), BLOCK_D]`` of a row-major ``[*, dim]`` matrix, columns ``d0 .. d0 + BLOCK_D``, zero padded."""
    d = d0 + tl.arange(0, BLOCK_D)
    offsets = rows.to(tl.int64)[:, None] * stride + d[None, :]  # int64: N * D may exceed 2**31
    return tl.load(ptr + offsets, mask=valid[:, None] & (d[None, :] < dim), other=0.0)


@triton.jit
def _logits_tile(
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
    mask_ptr,
    mask_period,
    stride_mask,
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
            mask_ptr + (rows % mask_period).to(tl.int64)[:, None] * stride_mask + (cols % mask_period)[None, :],
            mask=valid,
            other=0.0,
        )
    else:
        col_labels = tl.load(contrast_label_ptr + cols, mask=col_valid, other=0)
        w = tl.where(valid & (row_labels[:, None] == col_labels[None, :]), 1.0, 0.0)
    return w, valid


@triton.jit
def _dlogits_tile(logits2, lse2, coef_softmax, coef_pos, w, valid):
    """``dS = coef_softmax * softmax - coef_pos * w`` from base-2 logits and base-2 row LSE (fp32)."""
    probs = tl.exp2(tl.where(valid, logits2 - lse2[:, None], float("-inf")))  # excluded pairs -> exactly 0
    return coef_softmax[:, None] * probs - coef_pos[:, None] * w


@triton.jit
def _transposed_dlogits_tile(
    logits2,
    w,
    valid,
    rows,
    cols,
    mask_ptr,
    mask_period,
    stride_mask,
    col_lse2,
    col_coef_softmax,
    col_coef_pos,
    HAS_MASK: tl.constexpr,
):
    """``dS'_ji`` laid out ``[BLOCK_M, BLOCK_N]``: the reverse direction (contrast j as anchor over the anchors),
    from the same logits tile (``s_ji = s_ij``) and the reverse direction's per-column statistics."""
    w_t = w  # labels: [l_i == l_j] is symmetric
    if HAS_MASK:
        w_t = tl.load(
            mask_ptr + (cols % mask_period).to(tl.int64)[None, :] * stride_mask + (rows % mask_period)[:, None],
            mask=valid,
            other=0.0,
        )
    probs_t = tl.exp2(tl.where(valid, logits2 - col_lse2[None, :], float("-inf")))
    return col_coef_softmax[None, :] * probs_t - col_coef_pos[None, :] * w_t


@triton.jit
def _contrastive_fwd_kernel(
    pos_logit_sum_ptr,
    pos_weight_ptr,
    lse_ptr,
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
    stride_mask,
    self_offset,
    logit_scale_log2,
    HAS_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < n_anchor
    a_tile = _load_rows(anchor_ptr, rows, row_valid, stride_anchor, 0, dim, BLOCK_D)
    row_labels = rows
    if not HAS_MASK:
        row_labels = tl.load(anchor_label_ptr + rows, mask=row_valid, other=0)

    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col_start in range(0, n_contrast, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_valid = cols < n_contrast
        c_tile = a_tile
        if SINGLE_D_TILE:
            c_tile = _load_rows(contrast_ptr, cols, col_valid, stride_contrast, 0, dim, BLOCK_D)
        logits2 = logit_scale_log2 * _logits_tile(
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
            mask_ptr,
            mask_period,
            stride_mask,
            self_offset,
            HAS_MASK,
            EXCLUDE_SELF,
        )
        pos_sum += tl.sum(w * logits2, axis=1)
        pos_weight += tl.sum(w, axis=1)
        logits2 = tl.where(valid, logits2, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits2, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: avoid (-inf) - (-inf)
        run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(logits2 - shift[:, None]), axis=1)
        run_max = new_max

    shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    run_sum = tl.where(row_valid, run_sum, 1.0)  # padding rows: keep log2(0) out of the way
    lse = (shift + tl.log2(run_sum)) * 0.6931471805599453  # -inf for an empty denominator
    tl.store(lse_ptr + rows, lse, mask=row_valid)
    tl.store(pos_logit_sum_ptr + rows, pos_sum * 0.6931471805599453, mask=row_valid)
    tl.store(pos_weight_ptr + rows, pos_weight, mask=row_valid)


@triton.jit
def _load_row_stats(label_ptr, lse_ptr, coef_softmax_ptr, coef_pos_ptr, idx, valid, LOAD_LABELS: tl.constexpr):
    """``(labels, base-2 LSE, coef_softmax, coef_pos)`` of rows ``idx`` (``labels = idx`` unless ``LOAD_LABELS``)."""
    labels = idx
    if LOAD_LABELS:
        labels = tl.load(label_ptr + idx, mask=valid, other=0)
    lse2 = tl.load(lse_ptr + idx, mask=valid, other=0.0) * 1.4426950408889634
    coef_softmax = tl.load(coef_softmax_ptr + idx, mask=valid, other=0.0)
    coef_pos = tl.load(coef_pos_ptr + idx, mask=valid, other=0.0)
    return labels, lse2, coef_softmax, coef_pos


@triton.jit
def _backward_dlogits_tile(
    anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, row_labels,
    lse2, coef_softmax, coef_pos, col_lse2, col_coef_softmax, col_coef_pos,
    contrast_label_ptr, mask_ptr, dim, mask_period, stride_anchor, stride_contrast, stride_mask, self_offset,
    logit_scale_log2, HAS_MASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, TWO_WAY: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SINGLE_D_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The recomputed ``dS`` tile ``[BLOCK_M, BLOCK_N]`` both backward kernels multiply (plus ``dS'^T`` if TWO_WAY)."""
    logits2 = logit_scale_log2 * _logits_tile(
        anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, dim, stride_anchor,
        stride_contrast, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D_TILE, INPUT_PRECISION,
    )  # fmt: skip
    w, valid = _pair_weights(
        rows, cols, row_valid, col_valid, row_labels, contrast_label_ptr, mask_ptr, mask_period, stride_mask,
        self_offset, HAS_MASK, EXCLUDE_SELF,
    )  # fmt: skip
    dlogits = _dlogits_tile(logits2, lse2, coef_softmax, coef_pos, w, valid)
    if TWO_WAY:
        dlogits += _transposed_dlogits_tile(
            logits2, w, valid, rows, cols, mask_ptr, mask_period, stride_mask,
            col_lse2, col_coef_softmax, col_coef_pos, HAS_MASK,
        )  # fmt: skip
    return dlogits


@triton.jit
def _contrastive_bwd_anchor_kernel(
    grad_anchor_ptr,
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
    stride_mask,
    self_offset,
    stride_grad,
    logit_scale_log2,
    grad_scale,
    HAS_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    TWO_WAY: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dA[rows, d-tile] = grad_scale * sum_j dS_ij c_j``; grid (anchor blocks, output feature tiles).

    ``TWO_WAY``: the loss also has the reverse direction (contrast rows as anchors over the anchor rows, with
    statistics ``col_*``), whose logits are the transpose of the same tile, so ``dS + dS'^T`` is formed from one
    recomputed tile. With ``A = C`` (SupCon 'all' mode: ``col_*`` are the row statistics) this kernel alone gives
    the whole gradient ``(dS + dS^T) C``: two tile products instead of four.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d_out = tl.program_id(1) * BLOCK_D
    row_valid = rows < n_anchor
    a_tile = _load_rows(anchor_ptr, rows, row_valid, stride_anchor, 0, dim, BLOCK_D)
    row_labels, lse2, coef_softmax, coef_pos = _load_row_stats(
        anchor_label_ptr, lse_ptr, coef_softmax_ptr, coef_pos_ptr, rows, row_valid, not HAS_MASK
    )

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for col_start in range(0, n_contrast, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_valid = cols < n_contrast
        c_tile = _load_rows(contrast_ptr, cols, col_valid, stride_contrast, d_out, dim, BLOCK_D)
        col_lse2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        col_coef_softmax = col_lse2
        col_coef_pos = col_lse2
        if TWO_WAY:
            _, col_lse2, col_coef_softmax, col_coef_pos = _load_row_stats(
                contrast_label_ptr, col_lse_ptr, col_coef_softmax_ptr, col_coef_pos_ptr, cols, col_valid, False
            )
        dlogits = _backward_dlogits_tile(
            anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, row_labels,
            lse2, coef_softmax, coef_pos, col_lse2, col_coef_softmax, col_coef_pos,
            contrast_label_ptr, mask_ptr, dim, mask_period, stride_anchor, stride_contrast, stride_mask, self_offset,
            logit_scale_log2, HAS_MASK, EXCLUDE_SELF, TWO_WAY, INPUT_PRECISION, SINGLE_D_TILE,
            BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        acc = tl.dot(dlogits.to(c_tile.dtype), c_tile, acc, input_precision=INPUT_PRECISION)

    d = d_out + tl.arange(0, BLOCK_D)
    tl.store(
        grad_anchor_ptr + rows.to(tl.int64)[:, None] * stride_grad + d[None, :],
        (acc * grad_scale).to(grad_anchor_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (d[None, :] < dim),
    )


@triton.jit
def _contrastive_bwd_contrast_kernel(
    grad_contrast_ptr,
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
    stride_mask,
    self_offset,
    stride_grad,
    logit_scale_log2,
    grad_scale,
    HAS_MASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    TWO_WAY: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dC[cols, d-tile] = grad_scale * sum_i dS_ij a_i``; grid (contrast blocks, output feature tiles).

    ``TWO_WAY`` adds the reverse direction's ``dS'^T`` as in the anchor kernel (two-tower InfoNCE, symmetric).
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_out = tl.program_id(1) * BLOCK_D
    col_valid = cols < n_contrast
    col_lse2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    col_coef_softmax = col_lse2
    col_coef_pos = col_lse2
    if TWO_WAY:
        _, col_lse2, col_coef_softmax, col_coef_pos = _load_row_stats(
            contrast_label_ptr, col_lse_ptr, col_coef_softmax_ptr, col_coef_pos_ptr, cols, col_valid, False
        )
    c_tile = _load_rows(contrast_ptr, cols, col_valid, stride_contrast, 0, dim, BLOCK_D)

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for row_start in range(0, n_anchor, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_valid = rows < n_anchor
        a_tile = _load_rows(anchor_ptr, rows, row_valid, stride_anchor, d_out, dim, BLOCK_D)
        row_labels, lse2, coef_softmax, coef_pos = _load_row_stats(
            anchor_label_ptr, lse_ptr, coef_softmax_ptr, coef_pos_ptr, rows, row_valid, not HAS_MASK
        )
        dlogits = _backward_dlogits_tile(
            anchor_ptr, contrast_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, row_labels,
            lse2, coef_softmax, coef_pos, col_lse2, col_coef_softmax, col_coef_pos,
            contrast_label_ptr, mask_ptr, dim, mask_period, stride_anchor, stride_contrast, stride_mask, self_offset,
            logit_scale_log2, HAS_MASK, EXCLUDE_SELF, TWO_WAY, INPUT_PRECISION, SINGLE_D_TILE,
            BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        acc = tl.dot(tl.trans(dlogits.to(a_tile.dtype)), a_tile, acc, input_precision=INPUT_PRECISION)

    d = d_out + tl.arange(0, BLOCK_D)
    tl.store(
        grad_contrast_ptr + cols.to(tl.int64)[:, None] * stride_grad + d[None, :],
        (acc * grad_scale).to(grad_contrast_ptr.dtype.element_ty),
        mask=col_valid[:, None] & (d[None, :] < dim),
    )


# ----------------------------------------------------------------------------------------------------------------
# Autotuning
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
SHARED_MEMORY_BUDGET = 160 * 1024  # below the sm_80 / sm_90 per-block limits (164 / 227 KiB)


def keep_config(config: triton.Config, block_d: int, element_size: int) -> bool:
    """Prune configs whose tiles cannot fit: pipelined input tiles in shared memory, fp32 tiles in registers.

    The backward kernels hold the fp32 logits tile ``[BLOCK_M, BLOCK_N]`` and a gradient accumulator
    ``[max(BLOCK_M, BLOCK_N), BLOCK_D]`` at once; more than ~96 fp32 values of those per thread spills.
    """
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    tile_bytes = (block_m + block_n) * block_d * element_size
    if tile_bytes * max(config.num_stages, 1) > SHARED_MEMORY_BUDGET:
        return False
    fp32_per_thread = (block_m * block_n + max(block_m, block_n) * block_d) // (32 * config.num_warps)
    return fp32_per_thread <= 96


def _prune(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    element_size = named_args["anchor_ptr"].element_size()
    kept = [c for c in configs if keep_config(c, block_d, element_size)]
    return kept or configs[:1]


def tuning_configs():
    """The configs the launchers may use: one under the interpreter or FASTCL_TRITON_AUTOTUNE=0, else all."""
    if _interpreting():
        return [INTERPRETER_CONFIG]
    if os.environ.get("FASTCL_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)]
    return CONFIGS


# Timing function for the autotuner; None is Triton's GPU benchmarker. Tests set a host timer to drive the
# autotuned launch path through the interpreter.
AUTOTUNE_DO_BENCH = None


def _autotuned(kernel, configs):
    return triton.autotune(
        configs=configs,
        key=["n_anchor", "n_contrast", "dim", "HAS_MASK", "EXCLUDE_SELF", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune},
        do_bench=AUTOTUNE_DO_BENCH,
    )(kernel)


_tuned = {}


def _tuned_kernel(name):
    """Autotuned launchers, built on first use so importing fastcl compiles nothing."""
    if name not in _tuned:
        raw = {
            "fwd": _contrastive_fwd_kernel,
            "bwd_anchor": _contrastive_bwd_anchor_kernel,
            "bwd_contrast": _contrastive_bwd_contrast_kernel,
        }[name]
        configs = tuning_configs()
        if len(configs) == 1:
            _tuned[name] = (raw, configs[0])
        else:
            _tuned[name] = (_autotuned(raw, configs), None)
    return _tuned[name]


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def block_d_for(dim: int) -> tuple[int, bool]:
    """``(BLOCK_D, SINGLE_D_TILE)``: the whole feature dim in one tile when it fits, else tiles of 128."""
    if dim <= MAX_SINGLE_D_TILE:
        return max(16, triton.next_power_of_2(dim)), True
    return 128, False


def input_precision_for(dtype: torch.dtype) -> str:
    """fp32 dots follow ``torch.backends.cuda.matmul.allow_tf32`` (PyTorch's default: full fp32)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _common_args(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset):
    has_mask = mask is not None
    placeholder = (
        anchor_labels if anchor_labels is not None else torch.zeros(1, dtype=torch.int64, device=anchor.device)
    )
    block_d, single = block_d_for(anchor.shape[1])
    return dict(
        tensors=(
            anchor,
            contrast,
            placeholder if has_mask else anchor_labels,
            placeholder if has_mask else contrast_labels,
            mask if has_mask else torch.zeros(1, dtype=torch.float32, device=anchor.device),
        ),
        sizes=(
            anchor.shape[0],
            contrast.shape[0],
            anchor.shape[1],
            mask.shape[0] if has_mask else 1,
            anchor.stride(0),
            contrast.stride(0),
            mask.stride(0) if has_mask else 1,
            0 if self_offset is None else self_offset,
        ),
        constexprs=dict(
            HAS_MASK=has_mask,
            EXCLUDE_SELF=self_offset is not None,
            INPUT_PRECISION=input_precision_for(anchor.dtype),
            SINGLE_D_TILE=single,
            BLOCK_D=block_d,
        ),
    )


def _launch(name, grid_of, out_first, tensors, scalars, constexprs):
    kernel, fixed = _tuned_kernel(name)
    if fixed is not None:
        meta = dict(fixed.kwargs)
        grid = grid_of(meta)
        kernel[grid](
            *out_first, *tensors, *scalars, **constexprs, **meta, num_warps=fixed.num_warps, num_stages=fixed.num_stages
        )
    else:
        kernel[grid_of](*out_first, *tensors, *scalars, **constexprs)


def contrastive_forward(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature):
    """Row statistics ``(pos_logit_sum, pos_weight, lse)``, each fp32 ``[Na]``."""
    common = _common_args(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset)
    n_anchor = anchor.shape[0]
    stats = [torch.empty(n_anchor, dtype=torch.float32, device=anchor.device) for _ in range(3)]
    _launch(
        "fwd",
        lambda meta: (triton.cdiv(n_anchor, meta["BLOCK_M"]),),
        stats,
        common["tensors"],
        (*common["sizes"], inv_temperature * LOG2E),
        common["constexprs"],
    )
    return tuple(stats)


def contrastive_backward(
    anchor,
    contrast,
    anchor_labels,
    contrast_labels,
    mask,
    self_offset,
    inv_temperature,
    row_stats,
    col_stats=None,
    grad_scale=1.0,
    need_anchor=True,
    need_contrast=True,
):
    """``(dA, dC)`` in the input dtypes.

    ``row_stats = (lse, coef_softmax, coef_pos)`` fp32 ``[Na]`` give ``dS_ij = coef_softmax_i p_ij - coef_pos_i w_ij``
    and ``grad_scale`` multiplies ``dS @ C`` and ``dS^T @ A``. With ``col_stats`` (``[Nc]``, the reverse direction:
    contrast rows as anchors), ``dS'^T`` is added from the same tiles. ``col_stats is row_stats`` means the anchors
    are the contrast set: then ``dA`` is the whole gradient and ``dC`` is None.
    """
    common = _common_args(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset)
    two_way = col_stats is not None
    self_symmetric = col_stats is row_stats
    tensors = (*common["tensors"], *row_stats, *(col_stats if two_way else row_stats))
    constexprs = dict(common["constexprs"], TWO_WAY=two_way)
    n_anchor, n_contrast, dim = anchor.shape[0], contrast.shape[0], anchor.shape[1]
    d_tiles = triton.cdiv(dim, constexprs["BLOCK_D"])
    grad_anchor = grad_contrast = None
    if need_anchor:
        grad_anchor = torch.empty_like(anchor)
        _launch(
            "bwd_anchor",
            lambda meta: (triton.cdiv(n_anchor, meta["BLOCK_M"]), d_tiles),
            (grad_anchor,),
            tensors,
            (*common["sizes"], grad_anchor.stride(0), inv_temperature * LOG2E, grad_scale),
            constexprs,
        )
    if need_contrast and not self_symmetric:
        grad_contrast = torch.empty_like(contrast)
        _launch(
            "bwd_contrast",
            lambda meta: (triton.cdiv(n_contrast, meta["BLOCK_N"]), d_tiles),
            (grad_contrast,),
            tensors,
            (*common["sizes"], grad_contrast.stride(0), inv_temperature * LOG2E, grad_scale),
            constexprs,
        )
    return grad_anchor, grad_contrast


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


def triton_route(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, two_way) -> str:
    """``'self'`` when the anchors are the contrast set itself (the same tensor, same labels, ``self_offset == 0``:
    SupCon's 'all' mode; one backward kernel), ``'two_way'`` for the mean of both directions, else ``'one_way'``."""
    if two_way:
        return "two_way"
    if anchor is contrast and self_offset == 0 and _same_labels(anchor_labels, contrast_labels, mask):
        return "self"
    return "one_way"


def triton_forward(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, route):
    """``(loss, residuals)``: the fp32 scalar loss and the fp32 row statistics the backward needs,
    ``residuals = (pos_weight [Na], lse [Na], col_pos_weight [Nc], col_lse [Nc])`` (the ``col_*`` pair is empty
    unless ``route == 'two_way'``)."""
    pos_logit_sum, pos_weight, lse = contrastive_forward(
        anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature
    )
    loss = row_losses(pos_logit_sum, pos_weight, lse, scale).mean()
    col_pos_weight = col_lse = pos_weight.new_empty(0)
    if route == "two_way":
        col_pos_logit_sum, col_pos_weight, col_lse = contrastive_forward(
            contrast, anchor, contrast_labels, anchor_labels, mask, self_offset, inv_temperature
        )
        loss = 0.5 * (loss + row_losses(col_pos_logit_sum, col_pos_weight, col_lse, scale).mean())
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
    ``route == 'self'`` the whole gradient is ``grad_anchor`` and ``grad_contrast`` is None)."""
    pos_weight, lse, col_pos_weight, col_lse = residuals
    if route == "two_way":
        grad_output = 0.5 * grad_output
    row_stats = (lse, *grad_coefficients(pos_weight, scale, grad_output))
    col_stats = {"one_way": None, "self": row_stats}.get(route)
    if route == "two_way":  # both directions average over Na == Nc anchors
        col_stats = (col_lse, *grad_coefficients(col_pos_weight, scale, grad_output))
    return contrastive_backward(
        anchor,
        contrast,
        anchor_labels,
        contrast_labels,
        mask,
        self_offset,
        inv_temperature,
        row_stats,
        col_stats,
        grad_scale=inv_temperature / anchor.shape[0],
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
        return grad_anchor, grad_contrast, None, None, None, None, None, None, None


def triton_contrastive_loss(
    anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, two_way=False
):
    """The op of :mod:`fastcl._core` with the fused Triton kernels; arguments as in ``contrastive_loss``.

    When the anchors are the contrast set itself (the same tensor, same labels, ``self_offset == 0``: SupCon's
    'all' mode), the backward pass takes the one-kernel route; ``two_way`` shares every tile between both
    directions.
    """
    if contrast.stride(1) != 1:
        contrast = contrast.contiguous()
    route = triton_route(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, two_way)
    if route == "self":
        anchor = contrast
    elif anchor.stride(1) != 1:
        anchor = anchor.contiguous()
    return _TritonContrastiveLoss.apply(
        anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, route
    )


def _same_labels(anchor_labels, contrast_labels, mask) -> bool:
    """The same label tensor on both sides (checked without a device sync), or a mask."""
    return mask is not None or (
        anchor_labels.shape == contrast_labels.shape and anchor_labels.data_ptr() == contrast_labels.data_ptr()
    )
