"""An independent float64 statement of the loss formulas, written anchor by anchor.

It shares no code with fastcl: each anchor's loss is spelled out from the paper's definition, and gradients
come from autograd through these loops. Slow (Python loops), so tests keep N small.
"""

import torch


def supcon_float64(features, labels=None, mask=None, temperature=0.07, contrast_mode="all", base_temperature=0.07):
    """Khosla et al. L_out; features [bsz, n_views, ...] -> scalar float64."""
    f = features.double().reshape(features.shape[0], features.shape[1], -1)
    bsz, n_views = f.shape[0], f.shape[1]
    if mask is not None:
        weight = mask.double()
    elif labels is not None:
        weight = (labels.reshape(-1, 1) == labels.reshape(1, -1)).double()
    else:
        weight = torch.eye(bsz, dtype=torch.float64)
    # contrast index k <-> (view k // bsz, sample k % bsz)
    contrast = [f[k % bsz, k // bsz] for k in range(bsz * n_views)]
    anchors = range(bsz) if contrast_mode == "one" else range(bsz * n_views)
    losses = []
    for i in anchors:
        a = contrast[i]
        others = [k for k in range(len(contrast)) if k != i]
        logits = torch.stack([a @ contrast[k] for k in others]) / temperature
        log_denominator = torch.logsumexp(logits, dim=0) if others else torch.tensor(float("-inf"), dtype=torch.float64)
        w = torch.stack([weight[i % bsz, k % bsz] for k in others]) if others else torch.zeros(0, dtype=torch.float64)
        total = w.sum()
        divisor = total if total >= 1e-6 else torch.ones((), dtype=torch.float64)  # no positive: loss 0
        log_prob = logits - log_denominator if others else logits
        losses.append(-(temperature / base_temperature) * (w * log_prob).sum() / divisor)
    return torch.stack(losses).mean()


def info_nce_float64(query, key, labels=None, temperature=0.07, symmetric=True):
    q, k = query.double(), key.double()
    if labels is None:
        labels = torch.arange(q.shape[0])
    forward = [-(q[i] @ k[labels[i]] / temperature - torch.logsumexp(k @ q[i] / temperature, 0)) for i in range(len(q))]
    loss = torch.stack(forward).mean()
    if symmetric:
        backward = [-(k[j] @ q[j] / temperature - torch.logsumexp(q @ k[j] / temperature, 0)) for j in range(len(k))]
        loss = 0.5 * (loss + torch.stack(backward).mean())
    return loss
