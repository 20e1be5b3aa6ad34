"""Optimisers and learning-rate schedules for contrastive pretraining.

* :class:`LARS`: SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as large-batch
  SimCLR trains: each weight tensor's update is rescaled by ``eta * ||w|| / ||g + wd * w||``. Biases and
  normalisation parameters (1-d tensors) are excluded from both weight decay and adaptation by default.
* :func:`cosine_with_warmup`: linear warmup then cosine decay, as a ``LambdaLR`` stepped once per
  optimisation step.
* :func:`build_optimizer`: ``'sgd'`` or ``'lars'`` for a model, with 1-d parameters out of weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LARS", "build_optimizer", "cosine_with_warmup", "param_groups"]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling on top of SGD with momentum.

    For every parameter ``w`` with gradient ``g`` in a group with ``lars_adapt=True``::

        d = g + weight_decay * w
        trust = eta * ||w|| / ||d||        (1 where either norm is 0)
        buf = momentum * buf + trust * d
        w = w - lr * buf

    Groups with ``lars_adapt=False`` (by default: every 1-d tensor, when built by :func:`param_groups`) take
    plain SGD-with-momentum steps on ``g + weight_decay * w``.

    Args:
        params: parameters or parameter groups (a group may set ``lars_adapt``).
        lr: learning rate.
        momentum: momentum factor.
        weight_decay: L2 coefficient added to the gradient.
        eta: trust coefficient (0.001 in the LARS paper and SimCLR).
        nesterov: Nesterov momentum.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, nesterov: bool = False) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS hyper-parameters: lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}, eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0:
                    d = d.add(p, alpha=wd)
                if group["lars_adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d * trust
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    buf.mul_(mom).add_(d)
                step = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(step, alpha=-lr)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights (``ndim > 1``) with ``weight_decay``; biases and norm parameters without weight
    decay and without LARS adaptation (as SimCLR)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars_adapt": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_adapt": False})
    return groups


def build_optimizer(name: str, model: nn.Module, lr: float, *, momentum: float = 0.9, weight_decay: float = 1e-4,
                    eta: float = 0.001) -> torch.optim.Optimizer:
    """``'sgd'`` (momentum SGD) or ``'lars'`` over :func:`param_groups` of ``model``."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        for g in groups:
            g.pop("lars_adapt")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta)
    raise ValueError(f"optimizer must be 'sgd' or 'lars', got {name!r}")


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                       final_lr_fraction: float = 0.0) -> LambdaLR:
    """Per-step schedule: ``lr * (s + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a cosine
    from ``lr`` down to ``final_lr_fraction * lr`` at ``total_steps``. Call ``scheduler.step()`` after every
    optimiser step."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / decay_steps)
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(optimizer, factor)
