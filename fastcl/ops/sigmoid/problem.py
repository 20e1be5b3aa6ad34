"""The bottom of the sigmoid op: the record of one call, the positive-pair weights and the per-pair math.

Imports nothing from the rest of :mod:`fastcl.ops` or :mod:`fastcl.kernels`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor

# The positive-pair weightings: every pair weighs 1 (SigLIP), or SigLIP+'s per-anchor weights (positives of image i
# weigh alpha / k_i + beta / k'_j, k_i the texts in image i's group, k'_j the images in text j's group; negatives 1)
WEIGHTINGS = ("uniform", "siglip_plus", "siglip_plus_asymmetric")
_SIGLIP_PLUS_MIX = {"siglip_plus": (0.5, 0.5), "siglip_plus_asymmetric": (1.0, 0.0)}


class SigmoidProblem(NamedTuple):
    """One call of the sigmoid op: images ``[N, D]`` scored against texts ``[M, D]``.

    ``image_ids [N]`` / ``text_ids [M]`` (int64) mark the positives: pair ``(i, j)`` is positive when
    ``image_ids[i] == text_ids[j]``; both None is the default pairing, image i with text ``i + pair_offset`` (so
    ``N + pair_offset <= M``), which the backends handle without comparing ids. ``row_weight [N]`` and
    ``col_weight [M]`` (None: uniform) weigh a positive pair ``row_weight[i] + col_weight[j]``; a negative pair weighs
    1. ``logit_scale`` and ``logit_bias`` are 0-dim
    tensors; the summed loss is divided by ``norm`` (open_clip: the local batch size).
    """

    image: Tensor
    text: Tensor
    logit_scale: Tensor
    logit_bias: Tensor
    image_ids: Optional[Tensor]
    text_ids: Optional[Tensor]
    row_weight: Optional[Tensor]
    col_weight: Optional[Tensor]
    norm: float
    pair_offset: int = 0

    def ids(self) -> Tuple[Tensor, Tensor]:
        """``(image_ids, text_ids)``, spelled out for the default pairing."""
        if self.image_ids is not None:
            return self.image_ids, self.text_ids
        device = self.text.device
        n_image, n_text = self.image.shape[0], self.text.shape[0]
        image_ids = torch.arange(self.pair_offset, self.pair_offset + n_image, device=device)
        return image_ids, torch.arange(n_text, device=device)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64, everything else is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def siglip_plus_weights(image_ids: Tensor, text_ids: Tensor, weighting: str) -> Tuple[Tensor, Tensor]:
    """``(row_weight [N], col_weight [M])`` of SigLIP+ (siglip-kernel's soft weighting): ``alpha / k_i`` and
    ``beta / k'_j`` with ``k_i = #{j: text_ids[j] == image_ids[i]}``, ``k'_j = #{i: image_ids[i] == text_ids[j]}``
    (clamped to 1; a count of 0 has no positive pair to weigh), ``(alpha, beta) = (1/2, 1/2)`` symmetric or
    ``(1, 0)`` asymmetric. float64 ``[N]``, ``[M]`` (callers cast them to their compute dtype)."""
    alpha, beta = _SIGLIP_PLUS_MIX[weighting]
    ids = torch.cat([image_ids, text_ids])
    _, dense = torch.unique(ids, return_inverse=True)
    n_image = image_ids.shape[0]
    image_dense, text_dense = dense[:n_image], dense[n_image:]
    n_groups = ids.shape[0]
    texts_per_group = torch.bincount(text_dense, minlength=n_groups)
    images_per_group = torch.bincount(image_dense, minlength=n_groups)
    k_row = texts_per_group[image_dense].clamp_min(1).to(torch.float64)
    k_col = images_per_group[text_dense].clamp_min(1).to(torch.float64)
    return alpha / k_row, beta / k_col


def pair_terms(logits: Tensor, positive: Tensor, weight: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(loss_ij, dloss_ij/dlogit_ij)`` of a block of logits: ``w softplus(-z l)`` and ``-z w sigmoid(-z l)``,
    ``z = +1`` where ``positive``, ``w`` = ``weight`` on positives (1 elsewhere; all 1 when None)."""
    signed = torch.where(positive, -logits, logits)  # -z * l
    loss = torch.nn.functional.softplus(signed, threshold=softplus_threshold(logits.dtype))
    grad = torch.sigmoid(signed)
    grad = torch.where(positive, -grad, grad)
    if weight is not None:
        w = torch.where(positive, weight, torch.ones_like(weight))
        loss, grad = loss * w, grad * w
    return loss, grad


def softplus_threshold(dtype: torch.dtype) -> float:
    """Above this ``softplus(x) = x`` to the dtype's precision (``log1p(exp(-x)) < eps * x``)."""
    return 40.0 if dtype == torch.float64 else 20.0
