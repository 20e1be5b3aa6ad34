"""The Triton backend: input checks, the route, and the launcher calls behind ``fastcl::contrastive_triton`` and
``fastcl::contrastive_triton_extra``.

:func:`fastcl.ops.dispatch.contrastive_loss` checks the inputs (:func:`check_inputs`) and picks the route
(:func:`route`, or :func:`extra_columns_route` for a problem with extra contrast columns); the custom ops of
:mod:`fastcl.ops.custom_ops` (one node for ``torch.compile``, with their autograd) call :func:`forward` /
:func:`backward` (:func:`extra_columns_forward` / :func:`extra_columns_backward`: the kernels' second column range),
which run the launcher of :mod:`fastcl.kernels.launch`. At that boundary ``anchor`` None means the route
:data:`ANCHORS_ARE_CONTRAST` (one backward kernel for both roles).
"""

from __future__ import annotations

import os

import torch

from fastcl.ops.problem import ANCHORS_ARE_CONTRAST, ONE_WAY, TRITON_DTYPES, TWO_WAY, Problem

# The oldest Triton the kernels run on: ``triton.jit(do_not_specialize_on_alignment=...)`` and an autotuner that
# passes ``autotune(do_bench=...)`` on (3.0 / 3.1 reject the first; 3.2 drops the second, and its interpreter cannot
# run a ``range`` over the split bounds). pyproject.toml states the same floor.
MIN_TRITON = (3, 3)


def _version_tuple(version: str) -> tuple:
    parts = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


_status = []  # kernels_status(), decided once per process


def kernels_status() -> tuple:
    """``(True, "")`` when the Triton kernels import (:mod:`fastcl.kernels.launch`: the ``@triton.jit`` kernels
    and the launcher), else ``(False, why)``: no triton, a Triton older than :data:`MIN_TRITON`, or the error the
    import raised. Decided once per process (a plain list, which ``torch.compile`` reads as a constant)."""
    if not _status:
        _status.append(_import_kernels())
    return _status[0]


def _import_kernels() -> tuple:
    try:
        import triton
    except ImportError as exc:
        return False, f"the triton package is not importable ({exc}); pip install 'triton>=3.3'"
    version = getattr(triton, "__version__", "0")
    if _version_tuple(version) < MIN_TRITON:
        floor = ".".join(map(str, MIN_TRITON))
        return False, f"triton {version} is older than {floor}, the oldest the fastcl kernels run on"
    try:
        import fastcl.kernels.launch  # noqa: F401
    except Exception as exc:  # any failure to build the kernels: report it instead of crashing every call
        return False, f"the fastcl Triton kernels do not import with triton {version}: {type(exc).__name__}: {exc}"
    return True, ""


def available() -> bool:
    """Whether the Triton kernels import (:func:`kernels_status`)."""
    return kernels_status()[0]


def check_inputs(contrast: torch.Tensor) -> None:
    """Raise a clear error when the Triton backend cannot take these embeddings."""
    ok, why = kernels_status()
    if not ok:
        raise RuntimeError(f"backend='triton' is unavailable: {why}. Use backend='chunked' or 'auto'.")
    if contrast.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' takes float32, float16 or bfloat16 embeddings, got {contrast.dtype}; "
            "use backend='chunked' (float64 is computed in float64 there)"
        )
    if not contrast.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import for CPU debugging); "
            f"got tensors on {contrast.device}. Use backend='chunked' or 'auto'."
        )


def route(problem: Problem) -> str:
    """The route (``ANCHORS_ARE_CONTRAST | TWO_WAY | ONE_WAY``, see :func:`fastcl.kernels.launch.triton_route`).

    Eagerly this is ``triton_route`` itself. While compiling, tensors have no storage to compare, so
    :data:`ANCHORS_ARE_CONTRAST` is decided from the call's structure: the anchors are the contrast rows,
    ``self_offset == 0``, and a mask or the same label object on both sides (as :mod:`fastcl.functional` passes
    them).
    """
    if not torch.compiler.is_compiling():
        from fastcl.kernels.launch import triton_route

        return triton_route(problem)
    if problem.two_way:
        return TWO_WAY
    same_labels = problem.mask is not None or problem.anchor_labels is problem.contrast_labels
    if problem.anchors_are_contrast and problem.self_offset == 0 and same_labels:
        return ANCHORS_ARE_CONTRAST
    return ONE_WAY


def unit_column_stride(problem: Problem, route: str) -> Problem:
    """The problem with embeddings of unit column stride (after the route: a copy is no longer the same rows);
    ``anchor`` None exactly for :data:`ANCHORS_ARE_CONTRAST`, as the custom op takes it."""
    contrast = problem.contrast if problem.contrast.stride(1) == 1 else problem.contrast.contiguous()
    if route == ANCHORS_ARE_CONTRAST:
        return problem._replace(anchor=None, contrast=contrast)
    if problem.anchors_are_contrast:  # other labels or an offset: the same rows in both roles, passed twice
        return problem._replace(anchor=contrast, contrast=contrast)
    anchor = problem.anchor if problem.anchor.stride(1) == 1 else problem.anchor.contiguous()
    return problem._replace(anchor=anchor, contrast=contrast)


def _launcher_problem(problem: Problem) -> Problem:
    """The launcher's view: the anchors' labels default to the contrast labels when the anchors are the contrast
    rows and none were passed for them."""
    if problem.anchors_are_contrast and problem.anchor_labels is None:
        return problem._replace(anchor_labels=problem.contrast_labels)
    return problem


def input_precision(dtype: torch.dtype) -> str:
    """The dots' input precision for ``dtype`` under the current ``allow_tf32`` (``'ieee'``, ``'tf32x3'``,
    ``'tf32'``): read once per loss at the forward and passed to the backward with the residuals."""
    from fastcl.kernels.launch import input_precision_for

    return input_precision_for(dtype)


def forward(problem: Problem, route: str, precision: str):
    """``(loss, pos_weight [Na], lse [Na], col_pos_weight [Nc] or [0], col_lse [Nc] or [0])``, distinct tensors;
    the dots in ``precision`` (:func:`input_precision`)."""
    from fastcl.kernels.launch import triton_forward

    loss, residuals = triton_forward(_launcher_problem(problem), route, precision)
    pos_weight, lse, col_pos_weight, col_lse = residuals
    if route != TWO_WAY:  # fresh, distinct outputs (a custom op's outputs may not alias each other)
        col_pos_weight, col_lse = lse.new_empty(0), lse.new_empty(0)
    return loss, pos_weight, lse, col_pos_weight, col_lse


def backward(
    grad_output, problem: Problem, residuals, route: str, precision: str, need_anchor: bool, need_contrast: bool
):
    """``(dA, dC)`` in the input dtypes (empty ``[0]`` where not needed; when the anchors are the contrast rows the
    whole gradient is ``dC``); the recomputed dots in the forward's ``precision``."""
    from fastcl.kernels.launch import triton_backward

    grad_anchor, grad_contrast = triton_backward(
        grad_output,
        _launcher_problem(problem),
        residuals,
        route,
        need_anchor=need_anchor,
        need_contrast=need_contrast,
        input_precision=precision,
    )
    return _input_gradients(problem, grad_anchor, grad_contrast)


def extra_columns_route(problem: Problem) -> str:
    """The route of a problem with extra columns: :data:`ANCHORS_ARE_CONTRAST` where :func:`route` gives it and
    every batch column is kept without a margin (one backward kernel forms both roles of the batch columns plus
    the extra columns' share of the anchors' gradient), else :data:`ONE_WAY` (the only direction extra columns
    have)."""
    if problem.two_way:
        raise ValueError("negatives / in_batch=False / false_negative_margin are one-way: two_way must be False")
    if problem.in_batch and problem.false_negative_margin is None and route(problem) == ANCHORS_ARE_CONTRAST:
        return ANCHORS_ARE_CONTRAST
    return ONE_WAY


def extra_columns_forward(problem: Problem, route: str, precision: str):
    """``(loss, pos_weight [Na], lse [Na], positive_dots [Na] or [0])``, distinct tensors (the kernels' second
    column range, :func:`fastcl.kernels.launch.triton_extra_forward`)."""
    from fastcl.kernels.launch import triton_extra_forward

    loss, (pos_weight, lse, positive_dots) = triton_extra_forward(_launcher_problem(problem), route, precision)
    return loss, pos_weight, lse, positive_dots


def extra_columns_backward(grad_output, problem: Problem, residuals, route: str, precision: str, needs):
    """``(dA, dC, dQ)`` in the input dtypes for ``needs = (anchor, contrast, negatives)`` (empty ``[0]`` where not
    needed or absent; when the anchors are the contrast rows the whole gradient of that input is ``dC``)."""
    from fastcl.kernels.launch import triton_extra_backward

    need_anchor, need_contrast, need_negatives = needs
    grad_anchor, grad_contrast, grad_extra = triton_extra_backward(
        grad_output,
        _launcher_problem(problem),
        residuals,
        route,
        need_anchor=need_anchor,
        need_contrast=need_contrast,
        need_negatives=need_negatives,
        input_precision=precision,
    )
    return _input_gradients(problem, grad_anchor, grad_contrast, grad_extra)


def _input_gradients(problem: Problem, grad_anchor, grad_contrast, *more):
    """The launcher's gradients as the custom ops return them: when the anchors are the contrast rows the whole
    gradient (the launcher's ``grad_anchor``) belongs to the one input, ``dC``; a fresh empty ``[0]`` for each
    gradient not formed (a custom op's outputs may not alias each other)."""
    if problem.anchors_are_contrast:
        grad_anchor, grad_contrast = None, grad_anchor
    empty = problem.contrast.new_empty(0)
    return tuple(empty.clone() if grad is None else grad for grad in (grad_anchor, grad_contrast, *more))
