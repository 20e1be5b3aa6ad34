"""The dense reference backend: the ground truth that the fused backends are tested and benchmarked against.

They follow the widely used formulations step by step (SupContrast's ``SupConLoss`` and CLIP's symmetric
cross-entropy) and materialise the full ``N x N`` similarity matrix, so they are readable but take O(N^2) memory.
Inputs are assumed validated (see :mod:`fastcl.functional`). They are the ground truth, so half-precision inputs
(fp16 / bf16) are computed in fp32 (at t = 0.01 the logits overflow fp16) and the loss is returned in fp32, as by
every fused backend; float64 inputs are computed and returned in float64; ``upcast=True`` computes in float64 and
returns fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


def supcon_loss_reference(
    features: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 0.07,
    contrast_mode: str = "all",
    base_temperature: float = 0.07,
    upcast: bool = False,
) -> torch.Tensor:
    """SupCon (L_out), the SupContrast formulation. ``features [bsz, n_views, dim]`` -> scalar."""
    if upcast:
        features = features.double()
    elif features.dtype in HALF_DTYPES:
        features = features.float()
    device = features.device
    bsz, n_views = features.shape[0], features.shape[1]
    if mask is None:
        if labels is None:
            mask = torch.eye(bsz, dtype=features.dtype, device=device)
        else:
            labels = labels.reshape(-1, 1)
            mask = torch.eq(labels, labels.T).to(features.dtype)
    else:
        mask = mask.to(features.dtype)

    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)  # [n_views*bsz, dim], view-major
    if contrast_mode == "one":
        anchor_feature, anchor_count = features[:, 0], 1
    else:
        anchor_feature, anchor_count = contrast_feature, n_views

    logits = anchor_feature @ contrast_feature.T / temperature
    mask = mask.repeat(anchor_count, n_views)
    n_anchor = bsz * anchor_count
    logits_mask = torch.ones_like(mask)
    logits_mask[torch.arange(n_anchor, device=device), torch.arange(n_anchor, device=device)] = 0  # no self-pairs
    mask = mask * logits_mask
    # stability only: shift each row by its largest logit in the denominator; the self pair stays out of both (raw
    # rows' self logits |x|^2 / t can exceed every other column's by more than exp's range: exp would give 0 / inf)
    kept = logits_mask.bool()
    row_max = torch.where(kept, logits, float("-inf")).amax(dim=1, keepdim=True).detach()
    logits = logits - torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    exp_logits = torch.exp(torch.where(kept, logits, float("-inf")))
    denominator = exp_logits.sum(1, keepdim=True)
    # an anchor with no contrast column at all (one sample, one view) has no term and no positive: its loss is 0, as
    # in the fused backends (an empty sum of 1 keeps log() and its gradient finite; the row's positive mask is 0)
    denominator = torch.where(logits_mask.sum(1, keepdim=True) == 0, torch.ones_like(denominator), denominator)
    log_prob = logits - torch.log(denominator)
    positives = mask.sum(1)
    positives = torch.where(positives < 1e-6, torch.ones_like(positives), positives)
    mean_log_prob_pos = (mask * log_prob).sum(1) / positives
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    loss = loss.view(anchor_count, bsz).mean()
    return loss.float() if upcast else loss


def info_nce_loss_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 0.07,
    symmetric: bool = True,
    upcast: bool = False,
) -> torch.Tensor:
    """Two-tower InfoNCE: ``query [B, D]``, ``key [M, D]``; the positive of query i is key ``labels[i]`` (default i)."""
    if upcast:
        query, key = query.double(), key.double()
    elif query.dtype in HALF_DTYPES or key.dtype in HALF_DTYPES:
        query, key = query.float(), key.float()
    logits = query @ key.T / temperature
    if labels is None:
        labels = torch.arange(query.shape[0], device=query.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    return loss.float() if upcast else loss


def extra_columns_loss_reference(
    anchor: torch.Tensor,
    contrast: torch.Tensor,
    anchor_labels: torch.Tensor,
    contrast_labels: torch.Tensor,
    negatives: Optional[torch.Tensor],
    negative_labels: Optional[torch.Tensor] = None,
    *,
    self_offset: Optional[int] = None,
    in_batch: bool = True,
    false_negative_margin: Optional[float] = None,
    temperature=0.07,
    scale=1.0,
) -> torch.Tensor:
    """The op with contrast columns beyond the batch, densely: ``anchor [Na, D]`` against ``[contrast; negatives]``
    (``[Nc + M, D]``), positives where labels are equal (an unlabelled negative is never one), the pair
    ``(i, i + self_offset)`` left out, with ``in_batch=False`` only each anchor's positive batch column kept, and
    with ``false_negative_margin = m`` the columns with ``sim_ij > sim_i,pos + m`` left out (one positive per
    anchor). Returns ``mean_i -scale / P_i sum_{p in P(i)} log softmax_j(s_ij / t)[p]`` (0 for an anchor without a
    positive). Same dtype rules as :func:`supcon_loss_reference`."""
    if anchor.dtype in HALF_DTYPES:
        anchor, contrast = anchor.float(), contrast.float()
        negatives = None if negatives is None else negatives.float()
    n_anchor = anchor.shape[0]
    if negatives is None:
        negatives = contrast.new_zeros(0, contrast.shape[1])
    columns = torch.cat([contrast, negatives], 0)
    sim = anchor @ columns.T
    positive_batch = anchor_labels[:, None] == contrast_labels[None, :]
    keep_batch = torch.ones_like(positive_batch)
    if self_offset is not None:
        rows = torch.arange(n_anchor, device=anchor.device)
        keep_batch[rows, rows + self_offset] = False
    if not in_batch:
        keep_batch = keep_batch & positive_batch
    if negative_labels is None:
        positive_extra = torch.zeros(n_anchor, negatives.shape[0], dtype=torch.bool, device=anchor.device)
    else:
        positive_extra = anchor_labels[:, None] == negative_labels[None, :]
    keep = torch.cat([keep_batch, torch.ones_like(positive_extra)], 1)
    positive = torch.cat([positive_batch, positive_extra], 1) & keep
    if false_negative_margin is not None:
        positive_sim = torch.where(positive, sim, torch.zeros_like(sim)).sum(1, keepdim=True)
        keep = keep & ~((sim > positive_sim + false_negative_margin) & ~positive)
    logits = torch.where(keep, sim / temperature, torch.full_like(sim, float("-inf")))
    log_prob = torch.log_softmax(logits, dim=1)
    count = positive.sum(1).clamp_min(1).to(sim.dtype)
    per_anchor = -scale * torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / count
    return per_anchor.mean()
