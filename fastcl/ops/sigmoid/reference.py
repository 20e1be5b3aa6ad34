"""The dense sigmoid loss: the whole ``[N, M]`` logits matrix, gradients by autograd (``backend='reference'``).

open_clip's ``SigLipLoss._loss`` generalised to labels and SigLIP+ weights; float64 in, float64 out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcl.ops.sigmoid.problem import SigmoidProblem, compute_dtype


def sigmoid_loss_reference(problem: SigmoidProblem) -> torch.Tensor:
    """``-sum_ij w_ij log sigmoid(z_ij (s x_i . y_j + b)) / norm`` from the dense logits (autograd backward)."""
    dtype = compute_dtype(problem.text)
    image, text = problem.image.to(dtype), problem.text.to(dtype)
    logits = problem.logit_scale.to(dtype) * (image @ text.T) + problem.logit_bias.to(dtype)
    image_ids, text_ids = problem.ids()
    positive = image_ids[:, None] == text_ids[None, :]
    signs = torch.where(positive, 1.0, -1.0).to(dtype)
    pair_loss = -F.logsigmoid(signs * logits)
    if problem.row_weight is not None:
        weight = problem.row_weight.to(dtype)[:, None] + problem.col_weight.to(dtype)[None, :]
        pair_loss = pair_loss * torch.where(positive, weight, torch.ones_like(weight))
    return pair_loss.sum() / problem.norm
