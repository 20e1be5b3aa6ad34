"""MoCo v2 in ``fastcl-pretrain`` (``--queue-size K --key-momentum m``): the key model, its EMA update, the queue
and the loss with the queue's columns.

A step (:func:`fastcl.train.stages.train_step`): the model (with gradients) embeds view 1 into the queries ``q``,
the key model (a momentum copy, no gradients) embeds view 2 into the keys ``k``; the loss (:func:`moco_loss`) is
taken, the optimiser steps, then :func:`ema_update` moves the key model towards the model and the keys (and their
labels) are enqueued. MoCo v2's recipe (facebookresearch/moco, ``moco/builder.py``) and where this one differs are
in the README ("Pretraining with a memory queue").
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl.memory_queue import MemoryQueue

__all__ = ["build_queue", "ema_update", "key_model_of", "moco_loss", "normalized_keys"]


def key_model_of(model: nn.Module) -> nn.Module:
    """The key model: a copy of ``model`` (same weights and buffers) without gradients."""
    key = copy.deepcopy(model)
    key.requires_grad_(False)
    return key


@torch.no_grad()
def ema_update(key: nn.Module, model: nn.Module, momentum: float) -> None:
    """``p_k = m p_k + (1 - m) p_q`` for every parameter; buffers (BatchNorm statistics) copied from ``model``."""
    for pk, pq in zip(key.parameters(), model.parameters(), strict=True):
        pk.mul_(momentum).add_(pq.detach(), alpha=1.0 - momentum)
    for bk, bq in zip(key.buffers(), model.buffers(), strict=True):
        bk.copy_(bq)


def build_queue(args: argparse.Namespace, dim: int, world_size: int = 1) -> MemoryQueue:
    """The queue of ``--queue-size`` keys ``[dim]``; with labels for SupCon; all-gathered enqueues when
    ``world_size > 1`` (every rank holds the same queue)."""
    return MemoryQueue(args.queue_size, dim, labels=args.loss == "supcon", gather_distributed=world_size > 1)


def moco_loss(criterion: nn.Module, kind: str, q: Tensor, k: Tensor, labels: Tensor, queue: MemoryQueue,
              queue_positives: bool = True) -> Tensor:  # fmt: skip
    """The loss of queries ``q [B, D]`` (gradients) and keys ``k [B, D]`` (no gradients) with the queue's columns.

    ``supcon``: ``criterion`` a ``SupConLoss(contrast_mode='one')`` on ``[q, k]`` (anchors: the queries; contrast:
    the batch's queries and keys, the queue's keys; a queue key with the anchor's label is a positive, or with
    ``queue_positives=False``, ``--queue-negatives-only``, every queue key is a negative).
    ``simclr``: ``criterion`` an ``InfoNCELoss(symmetric=False, in_batch_negatives=False)``: each query against its
    own key and the queue (MoCo v2).
    """
    if kind == "supcon":
        return criterion(torch.stack([q, k], dim=1), labels, negatives=queue.negatives,
                         negative_labels=queue.labels if queue_positives else None)
    return criterion(q, k, negatives=queue.negatives)


def normalized_keys(z: Tensor) -> Tensor:
    """Keys as the queue stores them: float32, L2-normalised."""
    return F.normalize(z.float(), dim=-1)
