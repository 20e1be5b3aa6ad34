"""The one contrastive op every fused loss reduces to, and the single dispatch point between backends.

Anchors ``A [Na, D]`` are scored against a contrast set ``C [Nc, D]`` with logits ``s_ij = a_i . c_j / t``.
Positive weights ``w_ij`` come either from labels compared on the fly (``w_ij = [anchor_labels[i] ==
contrast_labels[j]]``) or from a ``[B, B]`` mask read at ``mask[i % B, j % B]``. With an integer
``self_offset`` anchor i is contrast row ``i + self_offset`` and that pair is dropped from numerator and
denominator (``None``: no self pairs, as in two-tower InfoNCE). Rank-local anchors against a gathered global
contrast set use the rank's row offset.
Per anchor, with ``W_i = sum_j w_ij`` and ``P_i = W_i`` (or 1 when ``W_i < 1e-6``)::

    loss_i = -scale / P_i * (sum_j w_ij s_ij - W_i * logsumexp_j s_ij)

and the op returns ``mean_i loss_i``. Its gradient with respect to the logits is
``dL/ds_ij = scale / (Na P_i) * (W_i softmax_ij - w_ij)``. Backends return the row statistics
``(pos_logit_sum, pos_weight, lse)``; the loss and the gradient coefficients are assembled here once.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

Stats = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def row_losses(pos_logit_sum: torch.Tensor, pos_weight: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-anchor losses ``[Na]`` from the fp32 row statistics.

    An anchor with no positive gets 0 (as SupContrast's current code does). An anchor with an empty denominator
    (a single-column problem with self excluded) has ``lse = -inf`` and no positive; it also gets 0. NaN stays NaN.
    """
    positives = torch.where(pos_weight < 1e-6, torch.ones_like(pos_weight), pos_weight)
    lse = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    return -scale * (pos_logit_sum - pos_weight * lse) / positives


def grad_coefficients(pos_weight: torch.Tensor, scale: float, grad_output: Optional[torch.Tensor] = None):
    """``(coef_softmax, coef_pos)`` fp32 ``[Na]``: ``Na * dL/ds_ij = coef_softmax_i * softmax_ij - coef_pos_i * w_ij``.

    The ``1 / Na`` of the mean is left out (callers apply it to the accumulated gradient) so the per-pair values
    stay O(1), which keeps them representable when cast to fp16/bf16 for the tensor-core products.
    """
    positives = torch.where(pos_weight < 1e-6, torch.ones_like(pos_weight), pos_weight)
    coef_pos = scale / positives
    if grad_output is not None:
        coef_pos = coef_pos * grad_output.to(coef_pos.dtype)
    return (coef_pos * pos_weight).contiguous(), coef_pos.contiguous()


@functools.lru_cache(maxsize=16)
def _cached_index_range(n: int, device: torch.device) -> torch.Tensor:
    # keyed by the torch.device callers pass (a tensor's .device); a normal tensor even when first asked for under
    # torch.inference_mode (an inference tensor could not later be saved for backward, e.g. as a cross-entropy target)
    with torch.inference_mode(False):
        return torch.arange(n, device=device)


def index_range(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` int64 on ``device``: eagerly one cached tensor per ``(n, device)``, so the chunked routes
    recognise the default pairing (ids ``0..n-1``) by identity instead of comparing, and small calls skip an
    allocation. Only for labels the library itself passes to the op and never writes (nothing hands them back to
    the caller); a fresh tensor while compiling."""
    if torch.compiler.is_compiling():
        return torch.arange(n, device=device)
    return _cached_index_range(n, device)


def in_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the call when it already is (~3 us a call on a 2-core CPU; small losses make dozens)."""
    return x if x.dtype == dtype else x.to(dtype)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``'auto'`` -> ``'triton'`` on CUDA tensors when Triton is importable, else ``'chunked'``."""
    if backend != "auto":
        return backend
    if x.is_cuda and x.dtype in TRITON_DTYPES and triton_available():
        return "triton"
    return "chunked"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def contrastive_loss(
    anchor: torch.Tensor,
    contrast: torch.Tensor,
    anchor_labels: Optional[torch.Tensor],
    contrast_labels: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    *,
    self_offset: Optional[int],
    temperature: float,
    scale: float,
    backend: str,
    two_way: bool = False,
    normalize: bool = False,
) -> torch.Tensor:
    """Mean over anchors of ``loss_i`` (module docstring) as an fp32 scalar; never allocates ``Na x Nc``.

    ``two_way=True`` returns the average of this direction and the reverse one (contrast rows anchoring over the
    anchor rows, labels swapped; CLIP's symmetric loss), sharing the similarity tiles where the backend can.

    Args:
        anchor: ``[Na, D]``; with ``self_offset = k`` anchor i is contrast row ``i + k`` (0 <= k <= Nc - Na).
        contrast: ``[Nc, D]``, same dtype and device.
        anchor_labels, contrast_labels: int64 ``[Na]``, ``[Nc]``; or both None when ``mask`` is given.
        mask: float32 ``[B, B]`` positive weights, read at ``[i % B, j % B]``.
        scale: multiplies every anchor's loss (``temperature / base_temperature`` for SupCon).
        backend: ``'triton'`` or ``'chunked'`` (``'auto'`` resolved by :func:`resolve_backend`).
        normalize: L2-normalise the rows of ``anchor`` and ``contrast`` first (``F.normalize(x, dim=-1)``). The eager
            chunked backend folds it into its autograd node for fp32 / float64 inputs (its Jacobian applied to the
            gradients formed in the forward: no autograd graph of its own); elsewhere ``F.normalize`` runs first.

    Both backends run as one ``torch.ops.fastcl`` custom op (fake function and autograd registered below), so
    ``torch.compile(fullgraph=True)`` traces the loss as a single node with symbolic sizes.
    """
    backend = resolve_backend(backend, contrast)
    inv_temperature = 1.0 / temperature
    if backend not in ("triton", "chunked"):
        raise ValueError(f"backend {backend!r} has no fused implementation here")
    same = anchor is contrast  # SupCon 'all' / NT-Xent: one input, so the gradients of both roles add up
    want_grad = torch.is_grad_enabled() and (anchor.requires_grad or contrast.requires_grad)
    eager_chunked = backend == "chunked" and not torch.compiler.is_compiling()
    fold_normalize = normalize and eager_chunked and want_grad and contrast.dtype in _FOLDED_NORMALIZE_DTYPES
    if normalize and not fold_normalize:
        contrast = torch.nn.functional.normalize(contrast, dim=-1)
        anchor = contrast if same else torch.nn.functional.normalize(anchor, dim=-1)
    if backend == "triton":
        _check_triton_inputs(contrast)
        route = _route(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, two_way)
        if contrast.stride(1) != 1:  # (after the route: a copy is no longer `anchor is contrast`)
            contrast = contrast.contiguous()
        if route != "self" and anchor.stride(1) != 1:
            anchor = anchor.contiguous()
        outputs = torch.ops.fastcl.contrastive_triton(
            None if route == "self" else anchor,
            contrast,
            anchor_labels,
            contrast_labels,
            mask,
            self_offset,
            inv_temperature,
            scale,
            route,
        )
        return outputs[0]
    if eager_chunked:
        # Eagerly the same computation without the custom op's dispatch (schema binding, the op's autograd
        # wrapper, output aliasing checks): ~0.5 ms a call on a 2-core CPU, as much as the whole loss at N = 64.
        return _chunked_eager(
            None if same else anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature,
            scale, two_way, want_grad, fold_normalize,
        )  # fmt: skip
    loss, _, _ = torch.ops.fastcl.contrastive_chunked(
        None if same else anchor,
        contrast,
        anchor_labels,
        contrast_labels,
        mask,
        self_offset,
        inv_temperature,
        scale,
        two_way,
        want_grad,
    )
    return loss


def _check_triton_inputs(contrast: torch.Tensor) -> None:
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
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


def _route(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, two_way) -> str:
    """The Triton route (``'self' | 'two_way' | 'one_way'``, see ``triton_route``).

    Eagerly this is ``triton_route`` itself. While compiling, tensors have no storage to compare, so 'self' is
    decided from the call's structure: the same anchor and contrast object, ``self_offset == 0``, and a mask or the
    same label object on both sides (as :mod:`fastcl.functional` passes them).
    """
    if not torch.compiler.is_compiling():
        from fastcl.kernels.contrastive import triton_route

        return triton_route(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, two_way)
    if two_way:
        return "two_way"
    if anchor is contrast and self_offset == 0 and (mask is not None or anchor_labels is contrast_labels):
        return "self"
    return "one_way"


# ----------------------------------------------------------------------------------------------------------------
# The fused op as torch.library custom ops (one node for torch.compile)
# ----------------------------------------------------------------------------------------------------------------
# torch.library.custom_op rather than triton_op: the Triton launchers pick autotuned configs and block sizes in
# Python and also run under TRITON_INTERPRET on CPU tensors, and the chunked backend is plain PyTorch with a
# Python loop over row blocks; an opaque op with a fake (shape) function serves both, keeps every kernel launch
# exactly as in eager mode, and makes the graph independent of N (no recompile per batch size). An ``anchor`` of
# None means "the contrast tensor itself" (the one-kernel 'self' route), so no tensor is passed twice.

Tensor = torch.Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastcl::contrastive_chunked", mutates_args=())
def _contrastive_chunked(
    anchor: Optional[Tensor],
    contrast: Tensor,
    anchor_labels: Optional[Tensor],
    contrast_labels: Optional[Tensor],
    mask: Optional[Tensor],
    self_offset: Optional[int],
    inv_temperature: float,
    scale: float,
    two_way: bool,
    want_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(loss, dL/dA, dL/dC)`` for grad_output = 1 in the compute dtype (empty ``[0]`` without ``want_grad``). With
    one input (``anchor`` None) the sum of the two is its gradient, and a route that forms only that sum returns it
    as ``dL/dA`` with zeros as ``dL/dC``: the output shapes stay those of earlier releases, which matters because
    Inductor's graph cache keys a compiled graph on the op's schema, not on its fake function."""
    from fastcl.chunked import chunked_forward

    loss, grad_anchor, grad_contrast = chunked_forward(
        contrast if anchor is None else anchor,
        contrast,
        anchor_labels,
        contrast_labels,
        mask,
        self_offset,
        inv_temperature,
        scale,
        two_way,
        want_grad,
        fold_same=anchor is None,
    )
    loss = loss.to(_compute_dtype(contrast))
    if want_grad and grad_contrast is None:  # one input, its whole gradient in grad_anchor (docstring)
        grad_contrast = torch.zeros_like(grad_anchor)
    if not want_grad:
        grad_anchor = grad_contrast = None
    empty = contrast.new_empty(0, dtype=_compute_dtype(contrast))
    grad_anchor = empty.clone() if grad_anchor is None else grad_anchor
    return loss, grad_anchor, empty if grad_contrast is None else grad_contrast


@_contrastive_chunked.register_fake
def _contrastive_chunked_fake(
    anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, two_way, want_grad
):
    dtype = _compute_dtype(contrast)
    rows = contrast if anchor is None else anchor
    if not want_grad:
        empty = contrast.new_empty(0, dtype=dtype)
        return contrast.new_empty((), dtype=dtype), empty, empty.clone()
    return (
        contrast.new_empty((), dtype=dtype),
        rows.new_empty(rows.shape, dtype=dtype),
        contrast.new_empty(contrast.shape, dtype=dtype),
    )


def _chunked_setup(ctx, inputs, output):
    anchor, contrast = inputs[0], inputs[1]
    ctx.same = anchor is None
    ctx.dtypes = (contrast.dtype if anchor is None else anchor.dtype, contrast.dtype)
    ctx.save_for_backward(output[1], output[2])


def _input_gradients(ctx, grad_loss, grad_anchor, grad_contrast):
    """``(dA, dC)`` for the inputs from the stored gradients of ``grad_output = 1`` (:func:`_chunked_setup`): scaled
    by ``grad_loss`` out of place (a retained graph may run the backward again) and cast to the input dtypes. With
    one input (``ctx.same``) both roles' gradients go to it; an empty ``grad_contrast`` there means ``grad_anchor``
    is already that input's whole gradient (folded by the forward)."""
    if ctx.same:
        total = grad_anchor if grad_contrast.dim() != 2 else torch.add(grad_anchor, grad_contrast)
        return None, in_dtype(total.mul(grad_loss), ctx.dtypes[1])
    grad_anchor = in_dtype(grad_anchor * grad_loss, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    grad_contrast = in_dtype(grad_contrast * grad_loss, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return grad_anchor, grad_contrast


def _chunked_backward(ctx, grad_loss, _grad_a, _grad_c):
    grad_anchor, grad_contrast = ctx.saved_tensors
    if grad_contrast.dim() != 2:
        raise RuntimeError("fastcl::contrastive_chunked was called with want_grad=False, so it has no gradient")
    return *_input_gradients(ctx, grad_loss, grad_anchor, grad_contrast), *([None] * 8)


_contrastive_chunked.register_autograd(_chunked_backward, setup_context=_chunked_setup)


# F.normalize's defaults (eps of the clamped norm); folded for the dtypes the chunked backend computes in as they are
# (fp16 / bf16 rows are normalised in their own dtype by F.normalize first, as before: the same numbers)
_NORMALIZE_EPS = 1e-12
_FOLDED_NORMALIZE_DTYPES = (torch.float32, torch.float64)


def _normalize_rows(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, denom, live)`` with ``y = x / denom`` and ``denom = max(|x_i|, eps)`` per row, as
    ``F.normalize(x, dim=-1)``; ``live [N, 1]`` marks the rows whose norm is not clamped."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    denom = norm.clamp_min(_NORMALIZE_EPS)
    return x / denom, denom, norm >= _NORMALIZE_EPS


def _normalize_backward(grad_y: Tensor, y: Tensor, denom: Tensor, live: Tensor) -> Tensor:
    """``dL/dx`` from ``dL/dy`` for ``y = F.normalize(x)``: ``(g - y (y . g)) / |x|``, or ``g / eps`` where the norm
    was clamped (``clamp_min`` passes no gradient to the norm below eps)."""
    radial = torch.linalg.vecdot(y, grad_y, dim=1)[:, None].mul_(live)
    return grad_y.addcmul(y, radial, value=-1.0).div_(denom)


def _fused_chunked(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale,
                   two_way, normalize):  # fmt: skip
    """``(loss, dA, dC)`` of the chunked op for grad_output = 1; with one input (``anchor`` None) ``dC`` is an empty
    marker and ``dA`` that input's whole gradient. With ``normalize`` the inputs are raw rows, normalised here, and
    the gradients are those of the raw rows."""
    from fastcl.chunked import chunked_forward

    if normalize:
        contrast, contrast_denom, contrast_live = _normalize_rows(contrast)
        if anchor is not None:
            anchor, anchor_denom, anchor_live = _normalize_rows(anchor)
    loss, grad_anchor, grad_contrast = chunked_forward(
        contrast if anchor is None else anchor, contrast, anchor_labels, contrast_labels, mask, self_offset,
        inv_temperature, scale, two_way, True, fold_same=anchor is None,
    )  # fmt: skip
    if normalize:
        if anchor is None:
            grad_anchor = _normalize_backward(grad_anchor, contrast, contrast_denom, contrast_live)
        else:
            grad_anchor = _normalize_backward(grad_anchor, anchor, anchor_denom, anchor_live)
            grad_contrast = _normalize_backward(grad_contrast, contrast, contrast_denom, contrast_live)
    return loss, grad_anchor, grad_anchor.new_empty(0) if grad_contrast is None else grad_contrast


class _ChunkedFunction(torch.autograd.Function):
    """The eager form of ``fastcl::contrastive_chunked`` under ``torch.func`` transforms (which need the
    setup_context form): outputs ``(loss, dA, dC)`` of :func:`_fused_chunked` like the op, backward scales the
    stored gradients by ``grad_output``; no custom-op dispatch."""

    forward = staticmethod(_fused_chunked)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _chunked_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx, grad_loss, _grad_a, _grad_c):
        return *_input_gradients(ctx, grad_loss, *ctx.saved_tensors), *([None] * 8)


class _EagerChunkedFunction(torch.autograd.Function):
    """:class:`_ChunkedFunction` in the classic form (``ctx`` in forward, the loss its only output), used outside
    ``torch.func`` transforms: autograd builds it without binding the signature and with one output, ~0.15 ms a
    call less on a 2-core CPU (a quarter of a whole fwd+bwd at N = 64)."""

    @staticmethod
    def forward(ctx, *args):
        loss, grad_anchor, grad_contrast = _fused_chunked(*args)
        _chunked_setup(ctx, args, (loss, grad_anchor, grad_contrast))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the stored first derivatives would enter as constants
            raise RuntimeError(
                "fastcl's chunked backend forms first derivatives only: create_graph=True (a second derivative "
                "through the loss) would silently treat them as constants; use backend='reference' for that"
            )
        return *_input_gradients(ctx, grad_loss, *ctx.saved_tensors), *([None] * 8)


_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def _chunked_eager(anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale,
                   two_way, want_grad, normalize=False):  # fmt: skip
    """The chunked op eagerly; ``normalize`` (only with ``want_grad``) folds ``F.normalize`` of the inputs in."""
    # one-way, one positive per anchor (InfoNCE): autograd's cross-entropy is the cheapest exact route at one block
    # (for the symmetric loss chunked's own single-block route, gradients formed in the forward, measured faster)
    if want_grad and not normalize and not two_way and anchor is not None and mask is None and self_offset is None:
        from fastcl.chunked import _SINGLE_BLOCK_PAIRS, _paired_by_index

        if 0 < anchor.shape[0] * contrast.shape[0] <= _SINGLE_BLOCK_PAIRS:
            positive = _paired_by_index(anchor_labels, contrast_labels, self_offset, two_way)
            if positive is not None:  # one positive per anchor, one block: cross-entropy with autograd is cheapest
                return _one_positive_loss(anchor, contrast, positive, inv_temperature, scale)
    if want_grad:
        args = (anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, two_way,
                normalize)  # fmt: skip
        if _FUNCTORCH_ACTIVE is None or _FUNCTORCH_ACTIVE():
            return _ChunkedFunction.apply(*args)[0]
        return _EagerChunkedFunction.apply(*args)
    from fastcl.chunked import chunked_forward

    loss, _, _ = chunked_forward(  # (fold_same: one input's forward takes the symmetric route, half the products)
        contrast if anchor is None else anchor, contrast, anchor_labels, contrast_labels, mask, self_offset,
        inv_temperature, scale, two_way, False, fold_same=anchor is None,
    )  # fmt: skip
    return loss.to(_compute_dtype(contrast))


def _one_positive_loss(anchor, contrast, positive, inv_temperature, scale):
    """The op's loss when anchor i's only positive is contrast ``positive[i]`` (or i: ``'diagonal'``) and no pair is
    excluded (one-way): ``scale * cross_entropy(s, positive)``, with autograd's backward. At small N (one block) the
    fewest ops: no weights, no gradients formed in the forward."""
    dtype = _compute_dtype(contrast)
    logits = torch.mm(in_dtype(anchor, dtype), in_dtype(contrast, dtype).T).mul(inv_temperature)
    target = index_range(anchor.shape[0], anchor.device) if isinstance(positive, str) else positive
    loss = torch.nn.functional.cross_entropy(logits, target)
    return loss * scale if scale != 1.0 else loss


@torch.library.custom_op("fastcl::contrastive_triton", mutates_args=())
def _contrastive_triton(
    anchor: Optional[Tensor],
    contrast: Tensor,
    anchor_labels: Optional[Tensor],
    contrast_labels: Optional[Tensor],
    mask: Optional[Tensor],
    self_offset: Optional[int],
    inv_temperature: float,
    scale: float,
    route: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, pos_weight [Na], lse [Na], col_pos_weight [Nc] or [0], col_lse [Nc] or [0])`` (``triton_forward``)."""
    from fastcl.kernels.contrastive import triton_forward

    same = anchor is None
    loss, residuals = triton_forward(
        contrast if same else anchor,
        contrast,
        contrast_labels if same and anchor_labels is None else anchor_labels,
        contrast_labels,
        mask,
        self_offset,
        inv_temperature,
        scale,
        route,
    )
    pos_weight, lse, col_pos_weight, col_lse = residuals
    if route != "two_way":  # fresh, distinct outputs (a custom op's outputs may not alias each other)
        col_pos_weight, col_lse = lse.new_empty(0), lse.new_empty(0)
    return loss, pos_weight, lse, col_pos_weight, col_lse


@_contrastive_triton.register_fake
def _contrastive_triton_fake(
    anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, route
):
    n_anchor = contrast.shape[0] if anchor is None else anchor.shape[0]
    n_col = contrast.shape[0] if route == "two_way" else 0
    f32 = torch.float32
    return (
        contrast.new_empty((), dtype=f32),
        contrast.new_empty(n_anchor, dtype=f32),
        contrast.new_empty(n_anchor, dtype=f32),
        contrast.new_empty(n_col, dtype=f32),
        contrast.new_empty(n_col, dtype=f32),
    )


@torch.library.custom_op("fastcl::contrastive_triton_backward", mutates_args=())
def _contrastive_triton_backward(
    grad_output: Tensor,
    anchor: Optional[Tensor],
    contrast: Tensor,
    anchor_labels: Optional[Tensor],
    contrast_labels: Optional[Tensor],
    mask: Optional[Tensor],
    pos_weight: Tensor,
    lse: Tensor,
    col_pos_weight: Tensor,
    col_lse: Tensor,
    self_offset: Optional[int],
    inv_temperature: float,
    scale: float,
    route: str,
    need_anchor: bool,
    need_contrast: bool,
) -> Tuple[Tensor, Tensor]:
    """``(dA, dC)`` in the input dtypes (empty ``[0]`` where not needed; with ``anchor`` None the whole gradient
    is ``dC``)."""
    from fastcl.kernels.contrastive import triton_backward

    same = anchor is None
    grad_anchor, grad_contrast = triton_backward(
        grad_output,
        contrast if same else anchor,
        contrast,
        contrast_labels if same and anchor_labels is None else anchor_labels,
        contrast_labels,
        mask,
        (pos_weight, lse, col_pos_weight, col_lse),
        self_offset,
        inv_temperature,
        scale,
        route,
        need_anchor=need_anchor,
        need_contrast=need_contrast,
    )
    if same:  # route 'self': the whole gradient is grad_anchor, and it belongs to the one input
        grad_anchor, grad_contrast = None, grad_anchor
    empty = contrast.new_empty(0)
    return (
        empty.clone() if grad_anchor is None else grad_anchor,
        empty if grad_contrast is None else grad_contrast,
    )


@_contrastive_triton_backward.register_fake
def _contrastive_triton_backward_fake(
    grad_output, anchor, contrast, anchor_labels, contrast_labels, mask, pos_weight, lse, col_pos_weight, col_lse,
    self_offset, inv_temperature, scale, route, need_anchor, need_contrast,
):  # fmt: skip
    if anchor is None:
        return contrast.new_empty(0), contrast.new_empty(contrast.shape)
    return (
        anchor.new_empty(anchor.shape) if need_anchor else contrast.new_empty(0),
        contrast.new_empty(contrast.shape) if need_contrast else contrast.new_empty(0),
    )


def _triton_setup(ctx, inputs, output):
    anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, route = inputs
    ctx.save_for_backward(anchor, contrast, anchor_labels, contrast_labels, mask, *output[1:])
    ctx.settings = (self_offset, inv_temperature, scale, route, anchor is None)


def _triton_backward(ctx, grad_loss, *_grad_residuals):
    anchor, contrast, anchor_labels, contrast_labels, mask, *residuals = ctx.saved_tensors
    self_offset, inv_temperature, scale, route, same = ctx.settings
    need_anchor = not same and ctx.needs_input_grad[0]
    need_contrast = ctx.needs_input_grad[1] or same
    grad_anchor, grad_contrast = torch.ops.fastcl.contrastive_triton_backward(
        grad_loss,
        None if same else anchor,
        contrast,
        anchor_labels,
        contrast_labels,
        mask,
        *residuals,
        self_offset,
        inv_temperature,
        scale,
        route,
        need_anchor,
        need_contrast,
    )
    return (
        grad_anchor if need_anchor else None,
        grad_contrast if ctx.needs_input_grad[1] else None,
        *([None] * 7),
    )


_contrastive_triton.register_autograd(_triton_backward, setup_context=_triton_setup)
