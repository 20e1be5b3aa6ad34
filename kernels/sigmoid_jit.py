"""The Triton kernel of the sigmoid (SigLIP) op: one program per block of rows of one tower, streaming the other.

``_sigmoid_side_kernel`` serves both launches of :mod:`fastcl.kernels.sigmoid_launch`: rows = images (the loss,
``dL/dimage`` and per-block partial sums for ``ds`` and ``db``) and rows = texts (``dL/dtext``). A program holds
``BLOCK_M`` rows and an fp32 ``[BLOCK_M, BLOCK_D_OUT]`` gradient accumulator, streams the other tower in blocks of
``BLOCK_N``, forms the logits tile ``s r_i . c_j + b`` (one product over the whole feature dim), turns it into the
pair losses and ``dL/dl`` right there (no normalisation across a row: nothing waits for other tiles) and adds
``dL/dl @ c`` to the accumulator. Every output element is written by one program: no atomics, deterministic.

Per pair ``t = -z l`` (``z = +1`` positive, ``-1`` negative): loss ``w softplus(t)``, ``dL/dl = -z w sigmoid(t)``,
both from one ``exp(-|t|)``; ``log1p`` as ``log(u) * e / (u - 1)`` with ``u = 1 + e`` (exact where ``1 + e``
rounds). ``logit_scale`` and ``logit_bias`` are read from device pointers (no host sync).
"""

import triton
import triton.language as tl


@triton.jit
def _sigmoid_side_kernel(
    grad_ptr,
    stats_ptr,
    rows_ptr,
    cols_ptr,
    row_ids_ptr,
    col_ids_ptr,
    row_weight_ptr,
    col_weight_ptr,
    scale_ptr,
    bias_ptr,
    n_rows,
    n_cols,
    dim,
    stride_rows,
    stride_cols,
    stride_grad,
    pair_offset,
    inv_norm,
    HAS_IDS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    WANT_STATS: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D_OUT: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    offs_out = pid_d * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    out_valid = offs_out < dim
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if SINGLE_D_TILE:
        rows = tl.load(
            rows_ptr + offs_m[:, None] * stride_rows + offs_d[None, :],
            mask=row_valid[:, None] & (offs_d[None, :] < dim),
            other=0.0,
        )
    if HAS_IDS:
        row_ids = tl.load(row_ids_ptr + offs_m, mask=row_valid, other=-1)
    else:
        paired_col = offs_m + pair_offset
    if HAS_WEIGHTS:
        row_weight = tl.load(row_weight_ptr + offs_m, mask=row_valid, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D_OUT), dtype=tl.float32)
    loss_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dot_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    grad_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, n_cols, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_valid = offs_n < n_cols
        col_offsets = offs_n.to(tl.int64)[:, None] * stride_cols  # int64: M * D may exceed 2**31 (gathered towers)
        if SINGLE_D_TILE:
            cols = tl.load(
                cols_ptr + col_offsets + offs_d[None, :],
                mask=col_valid[:, None] & (offs_d[None, :] < dim),
                other=0.0,
            )
            dots = tl.dot(rows, tl.trans(cols), input_precision=INPUT_PRECISION)
        else:
            dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start_d in range(0, dim, BLOCK_D):
                feature = start_d + offs_d
                feature_valid = feature < dim
                row_tile = tl.load(
                    rows_ptr + offs_m[:, None] * stride_rows + feature[None, :],
                    mask=row_valid[:, None] & feature_valid[None, :],
                    other=0.0,
                )
                col_tile = tl.load(
                    cols_ptr + col_offsets + feature[None, :],
                    mask=col_valid[:, None] & feature_valid[None, :],
                    other=0.0,
                )
                dots = tl.dot(row_tile, tl.trans(col_tile), dots, input_precision=INPUT_PRECISION)
        logits = dots * scale + bias
        if HAS_IDS:
            col_ids = tl.load(col_ids_ptr + offs_n, mask=col_valid, other=-2)
            positive = row_ids[:, None] == col_ids[None, :]
        else:
            positive = paired_col[:, None] == offs_n[None, :]
        signed = tl.where(positive, -logits, logits)  # t = -z l
        e = tl.exp(-tl.abs(signed))
        u = 1.0 + e
        rounded = u == 1.0
        log1p_e = tl.where(rounded, e, tl.log(u) * (e / tl.where(rounded, 1.0, u - 1.0)))
        pair_loss = tl.maximum(signed, 0.0) + log1p_e
        inv_u = 1.0 / u
        sigmoid_t = tl.where(signed >= 0.0, inv_u, e * inv_u)
        grad = tl.where(positive, -sigmoid_t, sigmoid_t)
        if HAS_WEIGHTS:
            col_weight = tl.load(col_weight_ptr + offs_n, mask=col_valid, other=0.0)
            weight = tl.where(positive, row_weight[:, None] + col_weight[None, :], 1.0)
            pair_loss = pair_loss * weight
            grad = grad * weight
        valid = row_valid[:, None] & col_valid[None, :]
        grad = tl.where(valid, grad, 0.0)
        if WANT_STATS:
            loss_sum += tl.sum(tl.where(valid, pair_loss, 0.0), axis=1)
            dot_sum += tl.sum(grad * dots, axis=1)
            grad_sum += tl.sum(grad, axis=1)
        if WANT_GRAD:
            col_out = tl.load(
                cols_ptr + col_offsets + offs_out[None, :],
                mask=col_valid[:, None] & out_valid[None, :],
                other=0.0,
            )
            acc = tl.dot(grad.to(col_out.dtype), col_out, acc, input_precision=INPUT_PRECISION)
    if WANT_GRAD:
        tl.store(
            grad_ptr + offs_m[:, None] * stride_grad + offs_out[None, :],
            acc * (scale * inv_norm),
            mask=row_valid[:, None] & out_valid[None, :],
        )
    if WANT_STATS:
        if pid_d == 0:
            tl.store(stats_ptr + pid_m * 3, tl.sum(loss_sum, axis=0) * inv_norm)
            tl.store(stats_ptr + pid_m * 3 + 1, tl.sum(dot_sum, axis=0) * inv_norm)
            tl.store(stats_ptr + pid_m * 3 + 2, tl.sum(grad_sum, axis=0) * inv_norm)
