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
    """
    backend = resolve_backend(backend, contrast)
    inv_temperature = 1.0 / temperature
    if backend == "triton":
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
        from fastcl.kernels.contrastive import triton_contrastive_loss

        return triton_contrastive_loss(
            anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, two_way
        )
    if backend == "chunked":
        from fastcl.chunked import chunked_contrastive_loss

        return chunked_contrastive_loss(
            anchor, contrast, anchor_labels, contrast_labels, mask, self_offset, inv_temperature, scale, two_way
        )
    raise ValueError(f"backend {backend!r} has no fused implementation here")
