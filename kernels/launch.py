"""The launcher of the Triton kernels: argument preparation, config choice, launches, and the row statistics.

Called by the Triton backend :mod:`fastcl.ops.triton` (through the ``fastcl::contrastive_triton`` custom ops of
:mod:`fastcl.ops.custom_ops`); it launches the kernels of :mod:`fastcl.kernels.jit` in configs chosen from
:mod:`fastcl.kernels.tiling` and assembles the loss from the shared row math of :mod:`fastcl.ops.problem`.

Layout: config choice (autotuned, fixed or deterministic; every choice passes ``keep_config``) -> :class:`_LaunchArgs`
(the kernels' view of one call, prepared once) -> ``contrastive_forward`` / ``contrastive_backward`` (launches under
the tensors' CUDA device, split reductions combined in a fixed order) -> ``triton_route`` / ``triton_forward`` /
``triton_backward`` on a :class:`~fastcl.ops.problem.Problem`, and ``triton_extra_forward`` /
``triton_extra_backward`` for a problem with extra contrast columns (the kernels' second column range).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from fastcl.kernels.jit import _contrastive_bwd_anchor_kernel, _contrastive_bwd_contrast_kernel, _contrastive_fwd_kernel
from fastcl.kernels.tiling import (
    CONFIGS,
    aligned_rows,
    autotune_configs,
    backward_output_tiles,
    block_d_for,
    fixed_config,
    fixed_preference,
    launch_dim,
    output_block_d_for,
    trimmed_grad,
    variant_name,
)
from fastcl.ops.problem import (
    ANCHORS_ARE_CONTRAST,
    ONE_WAY,
    TRITON_DTYPES,
    TWO_WAY,
    Problem,
    grad_coefficients,
    row_losses,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The interpreter runs numpy per program: small tiles keep multi-tile loops exercised on small test shapes.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
# (each kernel keys on those it takes; the extra-column flags are passed only when on, so a batch-only launch keys
# on the others as before)
_AUTOTUNE_KEY = ["n_anchor_bucket", "n_contrast_bucket", "dim", "HAS_MASK", "EXCLUDE_SELF", "INPUT_PRECISION",
                 "HAS_EXTRA", "EXTRA_LABELS", "HAS_MARGIN"]  # fmt: skip


def _autotuned(name, configs):
    def prune(configs, named_args, **kwargs):
        dim = named_args["dim"]
        two_way = kwargs.get("TWO_WAY", named_args.get("TWO_WAY", False))
        extra = any(kwargs.get(flag, named_args.get(flag, False)) for flag in ("HAS_EXTRA", "HAS_MARGIN"))
        element_size = named_args["anchor_ptr"].element_size()
        return autotune_configs(variant_name(name, two_way), dim, element_size, configs, extra)

    return triton.autotune(
        configs=configs,
        key=[key for key in _AUTOTUNE_KEY + ["TWO_WAY"] if key in RAW_KERNELS[name].arg_names],
        prune_configs_by={"early_config_prune": prune},
        do_bench=AUTOTUNE_DO_BENCH,
    )(RAW_KERNELS[name])


_tuned = {}


def _kernel_and_config(variant, dim, element_size, extra=False):
    """``(kernel, config)`` for a :data:`KERNEL_VARIANTS` name (``extra``: its extra-column form, the tiling's
    configs for it): the raw kernel and its one config, or the autotuned kernel and None."""
    name = variant.split("[")[0]
    configs = tuning_configs()
    if len(configs) == 1:
        return RAW_KERNELS[name], configs[0]
    if not autotuning_enabled():
        candidates = list(fixed_preference(variant, dim, element_size)) + configs
        return RAW_KERNELS[name], fixed_config(variant, dim, element_size, candidates, extra)
    if name not in _tuned:  # built on first use so importing fastcl compiles nothing
        _tuned[name] = _autotuned(name, configs)
    return _tuned[name], None


def input_precision_for(dtype: torch.dtype) -> str:
    """fp32 dots run on tensor cores: ``'tf32'`` when ``torch.backends.cuda.matmul.allow_tf32`` is set, else
    ``'tf32x3'`` (three TF32 products with split operands: fp32-level accuracy, PyTorch's default).

    Read once per loss, at the forward: the forward's statistics and the backward's recomputed logits must come
    from the same dot, so the backward takes the precision the forward recorded (``triton_backward``'s
    ``input_precision``), whatever the flag says by then."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"


def _checked_precision(dtype: torch.dtype, input_precision) -> str:
    """``input_precision`` (None: :func:`input_precision_for` now), checked against the dtype."""
    if input_precision is None:
        return input_precision_for(dtype)
    allowed = ("tf32x3", "tf32") if dtype == torch.float32 else ("ieee",)
    if input_precision not in allowed:
        raise ValueError(f"input_precision for {dtype} must be one of {allowed}, got {input_precision!r}")
    return input_precision


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
    backward that adds the reverse direction) with a mask also prepares ``mask_t``, ``mask.T`` with unit column
    stride (the mask itself when symmetric, :func:`transposed_mask`), so the reverse weights ``mask[j % B, i % B]``
    are read along rows (``mask_t_strides``)."""

    # positions in ``sizes`` (the kernels' integer arguments, in their order) that a launch without the batch
    # columns (``in_batch=False``, :func:`_with_extra_columns`) overrides
    SIZE_N_CONTRAST, SIZE_N_CONTRAST_BUCKET = 1, 12

    def __init__(self, problem: Problem, two_way: bool = False, input_precision=None):
        anchor, contrast, mask, self_offset = problem.anchor_rows, problem.contrast, problem.mask, problem.self_offset
        anchor_labels, contrast_labels = problem.anchor_labels, problem.contrast_labels
        _check_embeddings(anchor, contrast)
        self.feature_dim = anchor.shape[1]  # the caller's D; self.dim is the one the kernels see (aligned_rows)
        self.anchor = aligned_rows(anchor)
        self.contrast = self.anchor if contrast is anchor else aligned_rows(contrast)  # one copy serves both roles
        self.device = anchor.device
        self.has_mask = mask is not None
        if self.has_mask:
            if mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.device != anchor.device:
                raise ValueError(f"mask must be a square [B, B] tensor on {anchor.device}, got {tuple(mask.shape)}")
            mask = mask if mask.dtype == torch.float32 else mask.to(torch.float32)
            placeholder = torch.zeros(1, dtype=torch.int64, device=self.device)
            anchor_labels = contrast_labels = placeholder
        else:
            _check_labels(anchor, contrast, anchor_labels, contrast_labels)
            mask = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.n_anchor, self.n_contrast, self.dim = anchor.shape[0], contrast.shape[0], self.anchor.shape[1]
        self.block_d, single = block_d_for(self.dim, anchor.element_size())
        self.element_size = anchor.element_size()
        self.tensors = (self.anchor, self.contrast, anchor_labels, contrast_labels, mask)
        self.two_way = two_way
        self.mask_t = transposed_mask(mask) if self.has_mask and two_way else mask
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
            INPUT_PRECISION=_checked_precision(anchor.dtype, input_precision),
            SINGLE_D_TILE=single,
            BLOCK_D=self.block_d,
            # a tensor inverse temperature (a learnable one): the kernels read log2(e) / t from a device pointer
            SCALE_FROM_PTR=torch.is_tensor(problem.inv_temperature),
        )
        # the extra column range and the margin (_with_extra_columns): keyword arguments per kernel, none by default
        self.n_extra = 0
        self.keywords = {}


# The last mask a two-way backward read, its version and its transpose (the mask itself when symmetric), held so
# that the mask cannot be freed and its address reused while cached.
_transposed = []


def transposed_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask.T`` with unit column stride, for the two-way backward's reverse weights: ``mask`` itself when it is
    symmetric (SupCon's masks: no copy), else a contiguous copy. Kept across calls for the same, unmodified mask, so
    the symmetry check (one host sync) and the copy happen once per mask, not every step; while a CUDA graph is
    being captured nothing is checked (a copy)."""
    key = (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask.dtype, mask.device, mask._version)
    if _transposed and _transposed[0][1] == key:
        return _transposed[0][2]
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return mask.t().contiguous()
    mask_t = mask if mask.stride(1) == 1 and bool(torch.equal(mask, mask.t())) else mask.t().contiguous()
    _transposed[:] = [(mask, key, mask_t)]
    return mask_t


def _check_embeddings(anchor: torch.Tensor, contrast: torch.Tensor) -> None:
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


def _check_labels(anchor, contrast, anchor_labels, contrast_labels) -> None:
    for name, labels, n in (
        ("anchor_labels", anchor_labels, anchor.shape[0]),
        ("contrast_labels", contrast_labels, contrast.shape[0]),
    ):
        if labels is None or labels.shape != (n,) or labels.device != anchor.device:
            raise ValueError(f"{name} must be a [{n}] integer tensor on {anchor.device} (or pass a mask)")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")


def _launch(name, grid_of, leading, args: _LaunchArgs, scalars, constexprs):
    variant = variant_name(name, constexprs.get("TWO_WAY", False))
    keywords = args.keywords.get(name, {})
    extra = bool(keywords.get("HAS_EXTRA") or keywords.get("HAS_MARGIN"))
    if extra:  # the extra-column form's configs (fastcl.kernels.tiling)
        kernel, config = _kernel_and_config(variant, args.dim, args.element_size, True)
    else:
        kernel, config = _kernel_and_config(variant, args.dim, args.element_size)
    with _device_guard(args.device):
        if config is not None:
            meta = dict(config.kwargs)
            launch = kernel[grid_of(meta)]
            launch(
                *leading,
                *args.tensors,
                *scalars,
                **constexprs,
                **keywords,
                **meta,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        else:
            kernel[grid_of](*leading, *args.tensors, *scalars, **constexprs, **keywords)


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


def contrastive_forward(args: _LaunchArgs, inv_temperature, positive_dots=None):
    """Row statistics ``(lse_raw, pos_logit_sum, pos_weight)``, each fp32 ``[Na]`` (``lse_raw / t`` is the natural
    log-sum-exp of the logits). With the columns split over ``S`` programs per anchor block, the kernel writes
    ``[S, Na]`` partial (max, scaled sum, positive-logit sum, positive weight) and they are combined here in a
    fixed order; ``S == 1`` gives exactly the single-pass statistics. ``positive_dots`` (fp32 ``[Na]``): one more
    column per row, a positive with that dot, combined as one more share (the batch column of ``in_batch=False``,
    whose batch range the kernel then skips)."""
    n_columns = args.n_contrast + args.n_extra
    splits = split_count(triton.cdiv(args.n_anchor, NOMINAL_BLOCK), n_columns, args.device)
    parts = [torch.empty(splits, args.n_anchor, dtype=torch.float32, device=args.device) for _ in range(4)]
    _launch(
        "fwd",
        lambda meta: (triton.cdiv(args.n_anchor, meta["BLOCK_M"]), splits),
        parts,
        args,
        (*args.sizes, _scale_log2(inv_temperature)),
        args.constexprs,
    )
    run_max, run_sum, pos_logit_sum, pos_weight = parts
    scale_log2 = _scale_log2(inv_temperature)
    if positive_dots is not None:
        one = torch.ones_like(positive_dots)[None]
        run_max, run_sum = torch.cat([run_max, positive_dots[None]]), torch.cat([run_sum, one])
        pos_logit_sum = torch.cat([pos_logit_sum, (positive_dots * (scale_log2 * LN2))[None]])
        pos_weight = torch.cat([pos_weight, one])
    top = run_max.max(dim=0).values
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    total = (run_sum * torch.exp2(scale_log2 * (run_max - shift))).sum(dim=0)
    lse_raw = shift + torch.log2(total) / scale_log2  # -inf for an empty denominator; exact when one term rules
    return lse_raw, pos_logit_sum.sum(dim=0), pos_weight.sum(dim=0)


def _scale_log2(inv_temperature):
    """``log2(e) / t``: a float, or (a tensor ``1 / t``) a one-element fp32 device tensor the kernels load."""
    if not torch.is_tensor(inv_temperature):
        return inv_temperature * LOG2E
    return (inv_temperature.detach().to(torch.float32) * LOG2E).reshape(1)


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
    anchors_are_contrast = col_stats is row_stats
    stats = (*row_stats, *(col_stats if two_way else row_stats))
    constexprs = dict(
        args.constexprs,
        TWO_WAY=two_way,
        RECOMPUTE_TRANSPOSED=two_way and recompute_transposed(args.anchor.dtype),
        BLOCK_D_OUT=output_block_d_for(args.dim, args.element_size, two_way),
        EXP_REUSE=two_way and reuse_transposed_exp(args.anchor.dtype),
    )
    if two_way and args.has_mask and not args.two_way:
        raise ValueError("a two-way masked backward needs _LaunchArgs(..., two_way=True) (the transposed mask)")
    # passed by keyword (the kernels' last runtime arguments): the transposed mask of TWO_WAY and its strides
    constexprs.update(
        mask_t_ptr=args.mask_t, stride_mask_t_row=args.mask_t_strides[0], stride_mask_t_col=args.mask_t_strides[1]
    )
    d_tiles = backward_output_tiles(args.dim, args.element_size, two_way)
    args = _with_stats(args, stats)
    if torch.is_tensor(grad_scale):  # (a tensor temperature's: applied with grad_output, on the device)
        grad_output, grad_scale = grad_output * grad_scale.detach().to(torch.float32), 1.0
    common = (d_tiles, grad_output, args, (_scale_log2(inv_temperature), grad_scale), constexprs)
    grad_anchor = grad_contrast = None
    if need_anchor:
        grad_anchor = _backward_kernel("bwd_anchor", args.anchor, args.n_contrast + args.n_extra, "BLOCK_M", *common)
    if need_contrast and not anchors_are_contrast:
        grad_contrast = _backward_kernel("bwd_contrast", args.contrast, args.n_anchor, "BLOCK_N", *common)
    return grad_anchor, grad_contrast


def _backward_kernel(name, rows, n_reduced, block, d_tiles, grad_output, args, tail, constexprs):
    """Launch backward kernel ``name``, which accumulates the gradient of ``rows`` (``[N, D]``, blocks of
    ``meta[block]`` rows, ``d_tiles`` output feature tiles) over ``n_reduced`` rows or columns, split over a third
    grid axis when the outputs alone leave SMs idle; the gradient in ``rows``' dtype."""
    n_rows = rows.shape[0]
    splits = split_count(triton.cdiv(n_rows, NOMINAL_BLOCK) * d_tiles, n_reduced, args.device)
    grad = _gradient_buffer(rows, splits)
    _launch(
        name,
        lambda meta: (triton.cdiv(n_rows, meta[block]), d_tiles, splits),
        (grad, grad_output),
        args,
        (*args.sizes, grad.stride(-2), *tail),
        constexprs,
    )
    return _reduce_splits(grad, rows.dtype)


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
# Entry points on a Problem (called by fastcl.ops.triton)
# ----------------------------------------------------------------------------------------------------------------


def triton_route(problem: Problem) -> str:
    """:data:`ANCHORS_ARE_CONTRAST` when the anchors are the contrast rows (``problem.anchor`` None) with the same
    labels (or a mask) and ``self_offset == 0`` (SupCon's 'all' mode: one backward kernel), :data:`TWO_WAY` for the
    mean of both directions, else :data:`ONE_WAY`. Decided from the tensors as passed, before any copy."""
    if problem.two_way:
        return TWO_WAY
    if (
        problem.anchors_are_contrast
        and problem.self_offset == 0
        and _same_labels(problem.anchor_labels, problem.contrast_labels, problem.mask)
    ):
        return ANCHORS_ARE_CONTRAST
    return ONE_WAY


def triton_forward(problem: Problem, route: str, input_precision=None):
    """``(loss, residuals)``: the fp32 scalar loss and the fp32 row statistics the backward needs,
    ``residuals = (pos_weight [Na], lse_raw [Na], col_pos_weight [Nc], col_lse_raw [Nc])`` (the ``col_*`` pair is
    empty unless ``route == TWO_WAY``; ``lse_raw`` is the log-sum-exp in dot-product units, ``lse_raw / t`` the
    natural one). ``input_precision``: the dots' (None: :func:`input_precision_for` now); pass the backward the
    same."""
    inv_temperature, scale = problem.inv_temperature, problem.scale
    args = _LaunchArgs(problem, input_precision=input_precision)
    lse, pos_logit_sum, pos_weight = contrastive_forward(args, inv_temperature)
    loss = row_losses(pos_logit_sum, pos_weight, lse * inv_temperature, scale).mean()
    col_pos_weight = col_lse = pos_weight.new_empty(0)
    if route == TWO_WAY:  # the reverse direction reads the rows already aligned (no second padded copy)
        aligned = problem._replace(anchor=args.anchor, contrast=args.contrast)
        reverse = _LaunchArgs(aligned.reversed, input_precision=args.constexprs["INPUT_PRECISION"])
        col_lse, col_pos_logit_sum, col_pos_weight = contrastive_forward(reverse, inv_temperature)
        loss = 0.5 * (loss + row_losses(col_pos_logit_sum, col_pos_weight, col_lse * inv_temperature, scale).mean())
    return loss, (pos_weight, lse, col_pos_weight, col_lse)


def triton_backward(
    grad_output, problem: Problem, residuals, route: str, need_anchor=True, need_contrast=True, input_precision=None
):
    """``(grad_anchor, grad_contrast)`` of ``grad_output * loss`` (either None when not needed; with
    ``route == ANCHORS_ARE_CONTRAST`` the whole gradient is ``grad_anchor`` and ``grad_contrast`` is None).
    ``grad_output`` is read on the device (no host sync) and applied to the fp32 accumulators, never to the
    half-precision dS. ``input_precision``: the one the forward's dots used (None: :func:`input_precision_for`
    now, which is the forward's only if ``allow_tf32`` has not changed since)."""
    args = _LaunchArgs(problem, two_way=route != ONE_WAY, input_precision=input_precision)
    if not torch.is_tensor(grad_output):
        grad_output = torch.tensor(float(grad_output), device=args.device)
    grad_output = grad_output.detach().to(device=args.device, dtype=torch.float32).reshape(1)
    pos_weight, lse, col_pos_weight, col_lse = residuals
    row_stats = (lse, *grad_coefficients(pos_weight, problem.scale))
    col_stats = row_stats if route == ANCHORS_ARE_CONTRAST else None
    grad_scale = problem.inv_temperature / args.n_anchor
    if route == TWO_WAY:  # both directions average over Na == Nc anchors; the loss is their mean
        col_stats = (col_lse, *grad_coefficients(col_pos_weight, problem.scale))
        grad_scale *= 0.5
    grads = contrastive_backward(
        args,
        grad_output,
        problem.inv_temperature,
        row_stats,
        col_stats,
        grad_scale=grad_scale,
        need_anchor=need_anchor or route == ANCHORS_ARE_CONTRAST,
        need_contrast=need_contrast,
    )
    return tuple(trimmed_grad(grad, args.feature_dim) for grad in grads)


def _same_labels(anchor_labels, contrast_labels, mask) -> bool:
    """The same label tensor on both sides (checked without a device sync), or a mask."""
    return mask is not None or (
        anchor_labels is not None
        and contrast_labels is not None
        and anchor_labels.shape == contrast_labels.shape
        and anchor_labels.stride() == contrast_labels.stride()
        and anchor_labels.data_ptr() == contrast_labels.data_ptr()
    )


# ----------------------------------------------------------------------------------------------------------------
# Extra contrast columns (Problem.negatives / negative_labels / in_batch / false_negative_margin): the kernels'
# second column range
# ----------------------------------------------------------------------------------------------------------------


def check_extra_columns(problem: Problem, route: str) -> None:
    """Raise a ``ValueError`` naming the argument when the kernels' extra column range cannot take ``problem``."""
    if problem.two_way or route == TWO_WAY:
        raise ValueError("negatives / in_batch=False / false_negative_margin are one-way: two_way must be False")
    if problem.mask is not None:
        raise ValueError("negatives with a mask: the mask has no entries for the extra rows; pass labels instead")
    if route == ANCHORS_ARE_CONTRAST and (not problem.in_batch or problem.false_negative_margin is not None):
        raise ValueError("in_batch=False and false_negative_margin take the one-way route, not anchors_are_contrast")
    if not problem.in_batch and problem.self_offset is not None:
        raise ValueError("in_batch=False keeps only each anchor's positive column: self_offset must be None")
    negatives, labels = problem.negatives, problem.negative_labels
    if negatives is not None:
        contrast = problem.contrast
        if negatives.dim() != 2 or negatives.shape[1] != contrast.shape[1]:
            raise ValueError(f"negatives must have shape [M, {contrast.shape[1]}], got {tuple(negatives.shape)}")
        if negatives.dtype != contrast.dtype or negatives.device != contrast.device:
            raise ValueError(
                f"negatives ({negatives.dtype} on {negatives.device}) must share the contrast rows' dtype and device "
                f"({contrast.dtype} on {contrast.device})"
            )
    if labels is not None:
        if negatives is None:
            raise ValueError("negative_labels were given without negatives")
        if labels.shape != (negatives.shape[0],) or labels.device != negatives.device:
            raise ValueError(f"negative_labels must be a [{negatives.shape[0]}] tensor on {negatives.device}")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"negative_labels must be an integer tensor, got {labels.dtype}")
    if problem.anchor_labels is None or problem.contrast_labels is None:
        raise ValueError("extra columns need anchor_labels and contrast_labels (a mask has no entries for them)")


def _positive_dots(args: _LaunchArgs, problem: Problem):
    """fp32 ``[Na]`` dots of each anchor with its positive batch column ``anchor_labels[i]`` (``in_batch=False``:
    the row's one batch column; the margin's reference), else None. An ``O(Na * D)`` gather and product."""
    if problem.in_batch and problem.false_negative_margin is None:
        return None
    positive = args.contrast.index_select(0, problem.anchor_labels.to(torch.int64))
    return torch.linalg.vecdot(args.anchor.to(torch.float32), positive.to(torch.float32))


def _with_extra_columns(args: _LaunchArgs, problem: Problem, positive_dots) -> _LaunchArgs:
    """A shallow copy of ``args`` that launches with the extra column range (``negatives``, ``HAS_EXTRA``), the
    margin's per-row threshold (``positive_dots + margin``, ``HAS_MARGIN``) and, for ``in_batch=False``, no batch
    range (its one column is ``positive_dots``, :func:`contrastive_forward`). Also ``args.extra``: the aligned extra
    rows (or None)."""
    out = object.__new__(_LaunchArgs)
    out.__dict__.update(args.__dict__)
    out.extra = None
    forward_keywords, margin_keywords = {}, {}
    if problem.negatives is not None:
        extra, labels = aligned_rows(problem.negatives), problem.negative_labels
        if extra.shape[1] != args.dim:
            raise ValueError(f"negatives must have {args.feature_dim} features, got {problem.negatives.shape[1]}")
        out.extra, out.n_extra = extra, extra.shape[0]
        forward_keywords.update(
            extra_ptr=extra,
            extra_label_ptr=labels,
            n_extra=out.n_extra,
            stride_extra=extra.stride(0),
            stride_extra_label=None if labels is None else labels.stride(0),
            HAS_EXTRA=True,
            EXTRA_LABELS=labels is not None,
        )
    if problem.false_negative_margin is not None:
        threshold = (positive_dots + float(problem.false_negative_margin)).contiguous()
        margin_keywords = dict(threshold_ptr=threshold, HAS_MARGIN=True)
    forward_keywords.update(margin_keywords)
    out.keywords = {"fwd": forward_keywords, "bwd_anchor": forward_keywords, "bwd_contrast": margin_keywords}
    if not problem.in_batch:  # the kernels skip the batch range
        sizes = list(args.sizes)
        sizes[_LaunchArgs.SIZE_N_CONTRAST], sizes[_LaunchArgs.SIZE_N_CONTRAST_BUCKET] = 0, 1
        out.sizes, out.n_contrast = tuple(sizes), 0
    return out


def triton_extra_forward(problem: Problem, route: str, input_precision=None):
    """``(loss, residuals)`` of a problem with extra columns (:attr:`~fastcl.ops.problem.Problem.has_extra_columns`;
    ``route`` :data:`ANCHORS_ARE_CONTRAST` or :data:`ONE_WAY`): ``residuals = (pos_weight [Na], lse_raw [Na],
    positive_dots [Na] or [0])``, fp32, ``positive_dots`` only with ``in_batch=False`` or a margin."""
    check_extra_columns(problem, route)
    inv_temperature, scale = problem.inv_temperature, problem.scale
    args = _LaunchArgs(problem, input_precision=input_precision)
    positive_dots = _positive_dots(args, problem)
    launch_args = _with_extra_columns(args, problem, positive_dots)
    seed = None if problem.in_batch else positive_dots
    lse, pos_logit_sum, pos_weight = contrastive_forward(launch_args, inv_temperature, seed)
    loss = row_losses(pos_logit_sum, pos_weight, lse * inv_temperature, scale).mean()
    if positive_dots is None:
        positive_dots = lse.new_empty(0)
    return loss, (pos_weight, lse, positive_dots)


def triton_extra_backward(
    grad_output,
    problem: Problem,
    residuals,
    route: str,
    need_anchor=True,
    need_contrast=True,
    need_negatives=True,
    input_precision=None,
):
    """``(grad_anchor, grad_contrast, grad_negatives)`` of ``grad_output * loss`` for :func:`triton_extra_forward`
    (None where not needed; with ``route == ANCHORS_ARE_CONTRAST`` the whole gradient of the one input is
    ``grad_anchor``). ``dA`` sums both column ranges in one kernel; the extra rows' gradient is the
    contrast-gradient kernel over them, launched only with ``need_negatives``; with ``in_batch=False`` the batch
    column's share (one column per anchor) is an ``O(Na * D)`` product here."""
    check_extra_columns(problem, route)
    pos_weight, lse, positive_dots = residuals
    positive_dots = positive_dots if positive_dots.numel() else None
    args = _LaunchArgs(problem, two_way=route != ONE_WAY, input_precision=input_precision)
    launch_args = _with_extra_columns(args, problem, positive_dots)
    if not torch.is_tensor(grad_output):
        grad_output = torch.tensor(float(grad_output), device=args.device)
    grad_output = grad_output.detach().to(device=args.device, dtype=torch.float32).reshape(1)
    coef_softmax, coef_pos = grad_coefficients(pos_weight, problem.scale)
    row_stats = (lse, coef_softmax, coef_pos)
    col_stats = row_stats if route == ANCHORS_ARE_CONTRAST else None
    inv_temperature = problem.inv_temperature
    grad_scale = inv_temperature / args.n_anchor
    grad_anchor, grad_contrast = contrastive_backward(
        launch_args,
        grad_output,
        inv_temperature,
        row_stats,
        col_stats,
        grad_scale=grad_scale,
        need_anchor=need_anchor or route == ANCHORS_ARE_CONTRAST,
        need_contrast=need_contrast and problem.in_batch,
    )
    if not problem.in_batch:  # the one batch column per anchor: dS_i,pos c_pos into dA, dS_i,pos a_i into dC
        factor = grad_output * (grad_scale.detach().to(torch.float32) if torch.is_tensor(grad_scale) else grad_scale)
        probs = torch.exp2(_scale_log2(inv_temperature) * (positive_dots - lse))
        d_positive = (coef_softmax * probs - coef_pos) * factor
        columns = problem.anchor_labels.to(torch.int64)
        if grad_anchor is not None:
            positive = args.contrast.index_select(0, columns).to(torch.float32)
            grad_anchor = (grad_anchor.to(torch.float32) + d_positive[:, None] * positive).to(args.anchor.dtype)
        if need_contrast:
            grad_contrast = torch.zeros(args.contrast.shape, dtype=torch.float32, device=args.device)
            grad_contrast.index_add_(0, columns, d_positive[:, None] * args.anchor.to(torch.float32))
            grad_contrast = grad_contrast.to(args.contrast.dtype)
    grad_extra = None
    if need_negatives and launch_args.extra is not None:
        grad_extra = _extra_rows_gradient(launch_args, problem, grad_output, row_stats, grad_scale)
    return trimmed_grad(grad_anchor, args.feature_dim), trimmed_grad(grad_contrast, args.feature_dim), trimmed_grad(
        grad_extra, args.feature_dim
    )


def _extra_rows_gradient(args: _LaunchArgs, problem: Problem, grad_output, row_stats, grad_scale):
    """``dQ = dS_q^T @ A``: the contrast-gradient kernel with the extra rows as its contrast set (no self pair; the
    positives from ``negative_labels``, or none: a ``[1, 1]`` zero mask)."""
    if args.n_extra == 0:
        return torch.zeros_like(args.extra)
    labels = problem.negative_labels
    mask = torch.zeros(1, 1, dtype=torch.float32, device=args.device) if labels is None else None
    columns = Problem(args.anchor, args.extra, problem.anchor_labels, labels, mask, None, problem.inv_temperature,
                      problem.scale)  # fmt: skip
    extra_args = _LaunchArgs(columns, input_precision=args.constexprs["INPUT_PRECISION"])
    extra_args.keywords = {"bwd_contrast": args.keywords["bwd_contrast"]}
    _, grad_extra = contrastive_backward(
        extra_args, grad_output, problem.inv_temperature, row_stats, None, grad_scale=grad_scale, need_anchor=False
    )
    return grad_extra
