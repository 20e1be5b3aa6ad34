"""The model and the loss of a run, built from its arguments (``fastcl-pretrain``'s, or a checkpoint's config)."""

from __future__ import annotations

import argparse
import inspect
import os
from typing import Any

from torch import Tensor, nn

import fastcl
from fastcl.losses import InfoNCELoss, NTXentLoss, SupConLoss
from fastcl.models import encoders as E
from fastcl.models import heads as H
from fastcl.models.contrastive import ContrastiveModel

__all__ = ["build_criterion", "build_model", "loss_on"]


def build_model(args: argparse.Namespace, in_channels: int = 3) -> ContrastiveModel:
    """Encoder + head from the command-line arguments."""
    if args.encoder == "convnet":
        enc: nn.Module = E.ConvNet(in_channels, tuple(args.widths), batchnorm=not args.no_batchnorm)
    else:
        if args.no_batchnorm:
            raise ValueError(f"--no-batchnorm applies to the convnet encoder only, not {args.encoder}")
        enc = getattr(E, args.encoder)(in_channels)
    rep = enc.out_dim
    if args.head == "mlp":
        head: nn.Module = H.MLPHead(rep, rep, args.proj_dim, batchnorm=not args.no_batchnorm)
    elif args.head == "linear":
        head = H.LinearHead(rep, args.proj_dim)
    elif args.head == "fixed":
        head = H.FixedReweightingHead(rep, args.kappa)
    else:
        head = H.IdentityHead(rep)
    return ContrastiveModel(enc, head)


def build_criterion(args: argparse.Namespace, world_size: int = 1) -> nn.Module:
    """SupCon (labels) or SimCLR (NT-Xent) on L2-normalised embeddings; ``gather_distributed=True`` when
    ``world_size > 1`` (each rank's anchors against the global batch). With ``--queue-size`` (MoCo,
    :func:`fastcl.train.moco.moco_loss`): SupCon with the queries as anchors (``contrast_mode='one'``), or
    MoCo v2's InfoNCE (own key + queue, one direction; per rank: it has no in-batch columns to gather)."""
    queue = getattr(args, "queue_size", 0) > 0
    if queue and args.loss == "simclr":
        return InfoNCELoss(args.temperature, symmetric=False, in_batch_negatives=False, normalize=True,
                           backend=args.backend)
    cls = SupConLoss if args.loss == "supcon" else NTXentLoss
    kwargs: dict[str, Any] = {"normalize": True, "backend": args.backend}
    if queue:
        kwargs["contrast_mode"] = "one"
    if world_size > 1:
        if "gather_distributed" not in inspect.signature(cls).parameters:
            raise RuntimeError(
                f"torchrun with {world_size} processes needs {cls.__name__}(gather_distributed=True), which the "
                f"installed fastcl {fastcl.__version__} ({os.path.dirname(fastcl.__file__)}) does not have yet: "
                "update fastcl (fastcl.distributed) or run a single process")
        kwargs["gather_distributed"] = True
    if args.loss == "supcon":
        return cls(args.temperature, base_temperature=args.temperature, **kwargs)
    return cls(args.temperature, **kwargs)


def loss_on(criterion: nn.Module, kind: str, z: Tensor, labels: Tensor) -> Tensor:
    """``z [B, 2, D]`` -> scalar: SupCon with labels, or NT-Xent between the two views."""
    if kind == "supcon":
        return criterion(z, labels)
    return criterion(z[:, 0], z[:, 1])
