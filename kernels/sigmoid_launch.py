"""The launcher of the sigmoid kernel (:mod:`fastcl.kernels.sigmoid_jit`): tiling, the two launches, the sums.

Cost. The image launch forms every logits tile once per output feature tile and multiplies ``dL/dl`` into
``dL/dimage``; the text launch does the same with the towers' roles swapped (its logits tiles are the transposes,
recomputed rather than stored). With ``T = cdiv(D, BLOCK_D_OUT)`` output tiles that is ``2 (2 T + 2) N M D`` tensor
flops: ``8 N M D`` while the dim fits one output tile (D <= 512 in bf16 / fp16, 128 in fp32; the dense forward and
backward are ``6 N M D``), ``12 N M D`` at D = 768 in bf16. Why not ``6 N M D``: the exact ``6`` keeps a logits block
in memory (or accumulates ``dL/dtext`` with atomics across image blocks, not deterministic); two launches that each
own their output rows need nothing ``N x M`` and no atomics, for one extra logits product. Memory: the two fp32
gradients and ``3 * cdiv(N, BLOCK_M)`` partial sums.

``loss``, ``ds`` and ``db`` come from per-block partial sums of the image launch, added in a fixed order.
"""

from __future__ import annotations

import os

import torch
import triton

from fastcl.kernels.sigmoid_jit import _sigmoid_side_kernel
from fastcl.kernels.tiling import (
    aligned_rows,
    block_d_for,
    fixed_config,
    launch_dim,
    output_block_d_for,
    trimmed_grad,
)

# The interpreter runs numpy per program: small tiles keep multi-tile loops exercised on small test shapes.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)
# The gradient kernel's register profile is the softmax backward's (an fp32 [BLOCK_M, BLOCK_D_OUT] accumulator, one
# logits tile live): its configs come from that variant's fixed choice (fastcl.kernels.tiling), checked spill-free for
# this kernel by ``python -m fastcl.aot``.
CONFIG_VARIANT = "bwd_anchor"
MAX_OUTPUT_D_TILE_FP32 = 128  # fp32 output tiles (wider ones spilled in the image launch)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def config_for(dim: int, element_size: int, precision: str = "ieee", interpreter=None) -> triton.Config:
    """The launch config: the softmax backward's fixed choice for the dim (its register profile is this kernel's),
    with the changes ``python -m fastcl.aot --op sigmoid --full`` needed for no spill on sm_80 and sm_90: one
    pipeline stage at the single feature tile of 256 (the image launch keeps its loss and ``ds`` / ``db`` sums live
    next to the accumulator), 64 x 64 / 4 warps at feature tiles of 16, and for fp32 (tf32x3 and tf32) 64 x 32 / 4
    warps on one tile, 32 x 32 / 8 warps with output tiles of :data:`MAX_OUTPUT_D_TILE_FP32` beyond. ``interpreter``
    (default: ``TRITON_INTERPRET=1``) gives the interpreter's small tiles."""
    if _interpreting() if interpreter is None else interpreter:
        return INTERPRETER_CONFIG
    block_d, single = block_d_for(launch_dim(dim), element_size)
    if element_size == 4:
        return _config(64, 32, 4, 2) if single else _config(32, 32, 8, 2)
    if single and block_d <= 16:
        return _config(64, 64, 4, 2)
    config = fixed_config(CONFIG_VARIANT, launch_dim(dim), element_size)
    if single and block_d >= 256:
        return _config(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, 1)
    return config


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def tiles_for(dim: int, element_size: int, interpreter=None) -> tuple:
    """``(BLOCK_D, SINGLE_D_TILE, BLOCK_D_OUT)`` for embeddings of ``dim`` features."""
    seen = launch_dim(dim)
    block_d, single = block_d_for(seen, element_size)
    if _interpreting() if interpreter is None else interpreter:  # 16-wide tiles: the looped paths on tiny dims
        block_d, single = 16, dim <= 16
        return block_d, single, 16
    block_d_out = output_block_d_for(seen, element_size)
    return block_d, single, min(block_d_out, MAX_OUTPUT_D_TILE_FP32) if element_size == 4 else block_d_out


def _launch(
    rows,
    cols,
    row_ids,
    col_ids,
    row_weight,
    col_weight,
    scale,
    bias,
    pair_offset,
    inv_norm,
    precision,
    want_stats,
    want_grad,
):
    n_rows, dim = rows.shape
    element_size = rows.element_size()
    config = config_for(dim, element_size, precision)
    block_m = config.kwargs["BLOCK_M"]
    block_d, single, block_d_out = tiles_for(dim, element_size)
    grad = torch.empty((n_rows, dim) if want_grad else (0,), dtype=torch.float32, device=rows.device)
    stats = torch.empty((triton.cdiv(n_rows, block_m), 3), dtype=torch.float32, device=rows.device)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(dim, block_d_out) if want_grad else 1)
    has_ids, has_weights = row_ids is not None, row_weight is not None
    _sigmoid_side_kernel[grid](
        grad,
        stats,
        rows,
        cols,
        row_ids if has_ids else rows,
        col_ids if has_ids else rows,
        row_weight if has_weights else stats,
        col_weight if has_weights else stats,
        scale,
        bias,
        n_rows,
        cols.shape[0],
        dim,
        rows.stride(0),
        cols.stride(0),
        grad.stride(0) if want_grad else 0,
        pair_offset,
        inv_norm,
        HAS_IDS=has_ids,
        HAS_WEIGHTS=has_weights,
        WANT_STATS=want_stats,
        WANT_GRAD=want_grad,
        INPUT_PRECISION=precision,
        SINGLE_D_TILE=single,
        BLOCK_M=block_m,
        BLOCK_N=config.kwargs["BLOCK_N"],
        BLOCK_D=block_d,
        BLOCK_D_OUT=block_d_out,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return grad, stats


def sigmoid_forward(problem, precision: str, want_grad: bool):
    """``(loss, d_image, d_text, d_scale, d_bias)`` fp32 (for grad_output = 1; gradients None without
    ``want_grad``) of a :class:`~fastcl.ops.sigmoid.problem.SigmoidProblem`."""
    # the rows as the kernel is compiled for them (and lowered by ``python -m fastcl.aot``): zero-padded to a
    # multiple of 16 features with an aligned row stride, copied only where they are not already
    feature_dim = problem.image.shape[1]
    image, text = aligned_rows(problem.image), aligned_rows(problem.text)
    scale = problem.logit_scale.detach().to(torch.float32).reshape(1).contiguous()
    bias = problem.logit_bias.detach().to(torch.float32).reshape(1).contiguous()
    ids = tuple(None if x is None else x.contiguous() for x in (problem.image_ids, problem.text_ids))  # read [i]
    weights = (problem.row_weight, problem.col_weight)
    if weights[0] is not None:
        weights = tuple(w.to(torch.float32).contiguous() for w in weights)
    inv_norm = 1.0 / problem.norm
    with torch.cuda.device(image.device) if image.is_cuda else _nothing():
        d_image, stats = _launch(
            image,
            text,
            ids[0],
            ids[1],
            weights[0],
            weights[1],
            scale,
            bias,
            problem.pair_offset,
            inv_norm,
            precision,
            True,
            want_grad,
        )
        d_text = None
        if want_grad:
            d_text, _ = _launch(
                text,
                image,
                ids[1],
                ids[0],
                weights[1],
                weights[0],
                scale,
                bias,
                -problem.pair_offset,
                inv_norm,
                precision,
                False,
                True,
            )
    loss, d_scale, d_bias = (stats[:, k].sum() for k in range(3))  # three fresh tensors, fixed order
    if not want_grad:
        return loss, None, None, None, None
    return loss, trimmed_grad(d_image, feature_dim), trimmed_grad(d_text, feature_dim), d_scale, d_bias


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
