"""Contrastive pretraining with fastcl's fused losses, then probes of the pre- and post-projection features.

    fastcl-pretrain                                   # default experiment: spurious-cues, SupCon, MLP head, CPU
    python -m fastcl.pretrain --head fixed --seed 1 --out runs/fixed-s1
    fastcl-pretrain --batch-size 4096 --micro-batch-size 512 ...        # GradCache: big batches, small memory
    fastcl-pretrain --dataset folder --data-dir ~/imagenet --stream --workers 8 ...   # larger than memory
    torchrun --nproc_per_node=8 -m fastcl.pretrain --dataset cifar10 --data-dir ~/data --encoder resnet18 ...

The question of the default experiment (after Xue et al., ICLR 2024 and Li et al., CVPR 2023): after
contrastive pretraining with a projection head on images whose background and co-occurring object agree with
the class 95% of the time, is the representation before the head (h) more robust to those spurious cues than
the one after it (z)? At the end both are probed: a linear probe trained on the (cue-biased) training set, and
last-layer retraining on a small group-balanced held-out set (DFR) evaluated with the UrbanCars metrics on
the cue-balanced test set. Everything lands in ``OUT/``: ``summary.json``, ``metrics.jsonl`` (one record per
step, epoch and probe), ``checkpoint.pt`` (every epoch; the one before it is kept as ``checkpoint.prev.pt``),
``config.json``, ``loss.png`` and ``probe.png``.

A run reads top to bottom as stages (:func:`_run`): prepare the output directory, load the data, build the
model, restore a checkpoint, train (steps, checkpoints), evaluate, report.

Output directory rules:

* an ``--out`` that already holds a run is never touched without an explicit choice: ``--resume`` continues it,
  ``--overwrite`` deletes its files first; otherwise the command stops before doing anything.
* checkpoints are written beside the current one, read back and verified, and only then rotated in
  (``checkpoint.pt`` -> ``checkpoint.prev.pt``): a damaged write costs at most one epoch, and a damaged file is
  named in a one-line error that says what to do.
* if anything fails after training (evaluation, plots), the checkpoint stays and ``summary.json`` says what was
  not evaluated and why (exit status 1). Configuration errors print one line and exit with status 2.

Training details:

* ``--micro-batch-size m < --batch-size``: gradient caching (:mod:`fastcl.train.gradcache`): embeddings of all
  micro-batches without autograd, the loss and its gradient on the full batch, then each micro-batch
  re-forwarded with autograd and the cached gradient back-propagated, RNG restored. Augmentation parameters are
  drawn for the whole batch first, so the views are the same whatever ``m`` is. With BatchNorm the step differs
  from the full-batch one (statistics per micro-batch; a warning says so, and micro-batches under
  ``MIN_BATCHNORM_ROWS`` samples are refused); without it, it is the same step.
* ``--stream``: ``folder`` / ``urbancars`` images decoded in ``DataLoader`` workers (:mod:`fastcl.train.loader`)
  instead of held in memory.
* ``torchrun``: DDP over ``WORLD_SIZE`` processes (gloo on CPU, NCCL on GPU). ``--batch-size`` is global; each
  rank reads and embeds its ``batch / world`` rows and the loss (``gather_distributed=True``) contrasts them with
  the whole gathered batch, so the gradient is that of the single-process loss (BatchNorm statistics are per rank).
* ``--resume``: continue from ``OUT/checkpoint.pt`` (model, optimizer, schedule, RNG states, epoch and step),
  written after every epoch and every ``--checkpoint-every`` steps. A run killed at any point and resumed with
  the same arguments finishes with the same weights as an uninterrupted one (same device; on GPU add
  ``--deterministic``). With no checkpoint yet, ``--resume`` starts from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import inspect
import json
import math
import os
import platform
import random
import re
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import Tensor, nn

import fastcl
from fastcl.evaluation.probes import group_balanced_linear_probe, linear_probe
from fastcl.evaluation.shortcut_metrics import group_ids, multi_shortcut_metrics
from fastcl.losses import NTXentLoss, SupConLoss
from fastcl.models import encoders as E
from fastcl.models import heads as H
from fastcl.models.contrastive import ContrastiveModel
from fastcl.train.augment import AugmentConfig, BatchAugment
from fastcl.train.data import DATASETS, DatasetNotFoundError, DatasetSplits, MissingDependencyError, load_dataset
from fastcl.train.gradcache import cached_backward, micro_batches
from fastcl.train.data.loader import (
    STREAMING_DATASETS,
    EpochBatchSampler,
    InMemoryBatches,
    StreamingBatches,
    iter_image_batches,
    load_streaming,
)
from fastcl.train.optim import build_optimizer, cosine_with_warmup

__all__ = ["main", "build_parser", "build_model", "build_criterion", "ConfigError", "RunError"]

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
# the files a run writes in --out: their presence marks a run directory, --overwrite deletes them
RUN_FILES = (CHECKPOINT, PREVIOUS_CHECKPOINT, METRICS, SUMMARY, CONFIG, "loss.png", "probe.png")
CHECKPOINT_VERSION = 2
MIN_BATCHNORM_ROWS = 8  # smallest micro-batch (samples per rank) with BatchNorm: 2 views -> 16 rows per statistic
MAX_CUE_CLASSES = 8
# arguments that do not change the training trajectory: they may differ between a run and its resumption
_NOT_TRAINING = {"out", "resume", "overwrite", "device", "threads", "probe_every", "eval_batch_size", "no_plots",
                 "crash_after_steps", "dfr_repeats", "quiet", "probe_train_samples", "probe_weight_decay",
                 "dfr_weight_decay", "workers", "prefetch", "checkpoint_every"}
BASE_LR = {"sgd": 0.1, "lars": 0.3}  # per 256 samples of batch


class ConfigError(Exception):
    """A configuration problem found before or while setting up: one line on stderr, exit status 2."""


class RunError(Exception):
    """A failure of the run itself (diverged training, a checkpoint that cannot be written): one line on stderr,
    exit status 1; whatever could be kept (checkpoint, summary) is kept."""


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage of this many options would bury the message)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastcl-pretrain",
        description="Contrastive pretraining (SupCon / SimCLR) with fastcl's fused losses; probes h and z at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="spurious-cues", choices=DATASETS)
    d.add_argument("--data-dir", default=None, help="directory of cifar10 / cifar100 / folder / urbancars data")
    d.add_argument("--classes", type=int, default=2, help="spurious-cues: number of classes (2-8; 2 as UrbanCars)")
    d.add_argument("--image-size", type=int, default=None,
                   help="image side (default: 32 for spurious-cues and CIFAR, 64 for folder / urbancars)")
    d.add_argument("--train-samples", type=int, default=None,
                   help="training images (spurious-cues: generated, default 4096; others: cap, default all)")
    d.add_argument("--val-samples", type=int, default=1024, help="spurious-cues: group-balanced DFR held-out set")
    d.add_argument("--test-samples", type=int, default=2048, help="spurious-cues: cue-balanced test set")
    d.add_argument("--cue-agreement", type=float, default=0.95,
                   help="spurious-cues: probability that each training cue agrees with the class")
    d.add_argument("--watermark", type=float, default=0.0,
                   help="spurious-cues: third cue (off at 0), the share of --watermark-class training images "
                        "carrying a translucent glyph watermark (fastcl-shortcuts measures it)")
    d.add_argument("--watermark-elsewhere", type=float, default=0.02,
                   help="spurious-cues: share of the other classes' training images carrying the watermark")
    d.add_argument("--watermark-class", type=int, default=0, help="spurious-cues: the watermark's class")
    d.add_argument("--crop-scale", type=float, default=None,
                   help="smallest random-resized-crop area fraction (default 0.5 for spurious-cues, else 0.2)")
    d.add_argument("--stream", action="store_true",
                   help="folder / urbancars: decode images in DataLoader workers instead of holding them in memory "
                        "(aspect ratio kept: short side to --image-size, then a random (train) / centre crop)")
    d.add_argument("--workers", type=int, default=0, help="--stream: decoding worker processes per rank")
    d.add_argument("--prefetch", type=int, default=2, help="--stream: batches prefetched per worker")

    m = p.add_argument_group("model and loss")
    m.add_argument("--encoder", default="convnet", choices=["convnet", "resnet18", "resnet34", "resnet50"])
    m.add_argument("--widths", type=_int_list, default=(16, 32, 64), help="convnet: channels per stage")
    m.add_argument("--no-batchnorm", action="store_true",
                   help="convnet encoder and mlp head without BatchNorm (GradCache steps then equal full-batch ones)")
    m.add_argument("--head", default="mlp", choices=["mlp", "linear", "fixed", "none"])
    m.add_argument("--proj-dim", type=int, default=128, help="output size of the mlp / linear head")
    m.add_argument("--kappa", type=float, default=1.05, help="fixed head: z_i = h_i * kappa**-i")
    m.add_argument("--loss", default="supcon", choices=["supcon", "simclr"])
    m.add_argument("--temperature", type=float, default=0.1)
    m.add_argument("--backend", default="auto", choices=["auto", "triton", "chunked", "reference"])

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=15)
    o.add_argument("--batch-size", type=int, default=256, help="global batch (samples; 2 views each)")
    o.add_argument("--micro-batch-size", type=int, default=0,
                   help=f"GradCache micro-batch per process (0: no caching, the whole local batch at once; with "
                        f"BatchNorm at least {MIN_BATCHNORM_ROWS})")
    o.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"])
    o.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 0.1 (sgd) or 0.3 (lars) x batch-size / 256)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--lars-eta", type=float, default=0.001)
    o.add_argument("--warmup-epochs", type=float, default=1.0)
    o.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    o.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (bitwise-reproducible resumes on GPU; slower)")

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    r.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (0: torch's default; under torchrun on CPU: cores / processes)")
    r.add_argument("--out", default="runs/pretrain", help="output directory")
    x = r.add_mutually_exclusive_group()
    x.add_argument("--resume", action="store_true",
                   help="continue the run in --out from OUT/checkpoint.pt (from scratch if it has none yet)")
    x.add_argument("--overwrite", action="store_true", help="delete the run files already in --out and start over")
    r.add_argument("--checkpoint-every", type=int, default=0,
                   help="also checkpoint every N steps within an epoch (0: at the end of each epoch only)")
    r.add_argument("--probe-every", type=int, default=-1,
                   help="quick linear probe of h and z every N epochs (0: never; -1: every max(1, epochs // 5))")
    r.add_argument("--probe-train-samples", type=int, default=10000,
                   help="training images used to fit the final linear probe")
    r.add_argument("--dfr-repeats", type=int, default=10, help="balanced subsets averaged by the DFR probe")
    r.add_argument("--probe-weight-decay", type=float, default=1e-3,
                   help="L2 penalty of the linear probes (on standardised features)")
    r.add_argument("--dfr-weight-decay", type=float, default=1e-2,
                   help="L2 penalty of the DFR last-layer retraining on the small balanced held-out set")
    r.add_argument("--eval-batch-size", type=int, default=512)
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    # test hook: die like kill -9 (no cleanup) right after this many optimisation steps
    r.add_argument("--crash-after-steps", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be checked without data or model; raises :class:`ConfigError`."""
    for name in ("epochs", "batch_size", "proj_dim", "eval_batch_size", "dfr_repeats", "probe_train_samples",
                 "prefetch"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"{_flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("micro_batch_size", "workers", "checkpoint_every", "threads", "weight_decay", "warmup_epochs",
                 "crash_after_steps"):
        value = getattr(args, name)
        if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{_flag(name)} must be >= 0, got {value}")
    if args.train_samples is not None and args.train_samples <= 0:
        raise ConfigError(f"--train-samples must be positive (leave it out for the default), got {args.train_samples}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.momentum < 1:
        raise ConfigError(f"--momentum must lie in [0, 1), got {args.momentum}")
    if not 0 <= args.cue_agreement <= 1:
        raise ConfigError(f"--cue-agreement must lie in [0, 1], got {args.cue_agreement}")
    for name in ("temperature", "kappa", "lars_eta"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{_flag(name)} must be a positive number, got {value}")
    if args.crop_scale is not None and not 0 < args.crop_scale <= 1:
        raise ConfigError(f"--crop-scale must lie in (0, 1], got {args.crop_scale}")
    if args.dataset == "spurious-cues":
        if not 2 <= args.classes <= MAX_CUE_CLASSES:
            raise ConfigError(f"--classes must lie in [2, {MAX_CUE_CLASSES}] for spurious-cues, got {args.classes}")
        cells = 4 * args.classes  # every class x (background, co-object) cue group
        for name in ("val_samples", "test_samples"):
            if getattr(args, name) < cells:
                use = "DFR last-layer retraining" if name == "val_samples" else "the test metrics"
                raise ConfigError(f"{_flag(name)} must be at least 4 x --classes = {cells} ({use} needs every "
                                  f"class x cue group), got {getattr(args, name)}")
    if args.dataset in ("cifar10", "cifar100"):
        if args.image_size not in (None, 32):
            raise ConfigError(f"--image-size: {args.dataset} images are 32x32, got {args.image_size}")
    elif args.image_size is not None and args.image_size < 16:
        raise ConfigError(f"--image-size must be at least 16, got {args.image_size}")
    if args.stream and args.dataset not in STREAMING_DATASETS:
        raise ConfigError(f"--stream reads image files ({', '.join(STREAMING_DATASETS)}), not {args.dataset}: "
                          f"that dataset is held in memory")
    if (args.workers or args.prefetch != 2) and not args.stream:
        raise ConfigError("--workers and --prefetch apply to --stream only")
    if args.no_batchnorm and args.encoder != "convnet":
        raise ConfigError(f"--no-batchnorm applies to the convnet encoder only, not {args.encoder}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise ConfigError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    _check_device(args.device)
    _check_out(args)


def _check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available in this torch build / machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _run_files(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]


def _check_out(args: argparse.Namespace) -> None:
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a directory: choose another --out")
    present = _run_files(out)
    if present and not (args.resume or args.overwrite):
        raise ConfigError(f"--out {out} already holds a run ({', '.join(present)}): pass --resume to continue it, "
                          f"--overwrite to delete it and start over, or choose another --out")
    if int(os.environ.get("RANK", "0")) == 0:  # can we write there? (root ignores permission bits: really try)
        probe = os.path.join(out, f".fastcl-write-test.{os.getpid()}")
        try:
            os.makedirs(out, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"--out {out} is not writable: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class ProgressBar:
    """A minimal progress bar on ``stream`` (stderr): redrawn in place on a terminal, a line every
    ``line_interval`` seconds (and at the end) otherwise. Shows steps, loss, samples/s and the ETA."""

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True,
                 line_interval: float = 15.0, width: int = 24) -> None:
        self.total = max(int(total), 0)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.total > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.line_interval = line_interval
        self.width = width
        self.n = 0
        self.samples = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_line = self.start

    def update(self, samples: int, desc: str = "", **postfix: float) -> None:
        self.n += 1
        self.samples += samples
        if not self.enabled:
            return
        now = time.perf_counter()
        done = self.n >= self.total
        if self.tty and not done and now - self._last_draw < 0.1:
            return
        if not self.tty and not done and now - self._last_line < self.line_interval:
            return
        elapsed = now - self.start
        rate = self.samples / elapsed if elapsed > 0 else float("nan")
        eta = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
        fill = int(self.width * self.n / self.total)
        extras = " ".join(f"{k} {v:.4f}" for k, v in postfix.items())
        text = (f"{desc} [{'#' * fill}{'.' * (self.width - fill)}] {self.n}/{self.total} {extras} | "
                f"{rate:.0f} samples/s | ETA {_fmt_time(eta)}")
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if done else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_draw = self._last_line = now


# --------------------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available in this torch build / machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def setup_distributed(device_name: str, threads: int = 0) -> Dist:
    """Single process, or one rank of a ``torchrun`` job (``WORLD_SIZE > 1``): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if threads > 0:
        torch.set_num_threads(threads)
    if world <= 1:
        return Dist(0, 1, 0, _resolve_device(device_name, 0))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_name, local_rank)
    if device.type == "cpu" and threads <= 0:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


# --------------------------------------------------------------------------------------------------
# Model, loss, data views
# --------------------------------------------------------------------------------------------------


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
    ``world_size > 1`` (each rank's anchors against the global batch)."""
    cls = SupConLoss if args.loss == "supcon" else NTXentLoss
    kwargs: dict[str, Any] = {"normalize": True, "backend": args.backend}
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


def _loss_on(criterion: nn.Module, kind: str, z: Tensor, labels: Tensor) -> Tensor:
    """``z [B, 2, D]`` -> scalar: SupCon with labels, or NT-Xent between the two views."""
    if kind == "supcon":
        return criterion(z, labels)
    return criterion(z[:, 0], z[:, 1])


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Checkpoints, metrics
# --------------------------------------------------------------------------------------------------


def _tmp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # make a rename durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_tmp(path: str, write) -> str:
    """Write through ``write(file)`` into ``path.tmpPID`` and fsync it; on any failure (disk full, ...) the
    temporary file is removed and the error re-raised."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return tmp


def _atomic_write(path: str, write) -> None:
    """Replace ``path`` atomically: a reader sees the old or the new file, never a part of one."""
    os.replace(_write_tmp(path, write), path)
    _fsync_dir(path)


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Delete ``*.tmpPID`` files in ``out_dir`` left by processes that no longer run (a kill during a write);
    returns their names."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp*")):
        m = re.search(r"\.tmp(\d+)$", path)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # that process still runs (another rank or run): not ours to delete
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(os.path.basename(path))
    return removed


class CheckpointError(ConfigError):
    """``--resume`` found a checkpoint it cannot use; the message names the file and what to do."""


_CHECKPOINT_KEYS = ("version", "epoch", "step", "epoch_step", "model", "optimizer", "scheduler", "rng", "config")


def _read_checkpoint(path: str) -> dict[str, Any]:
    """``torch.load`` of a checkpoint with its keys checked; raises ``ValueError`` saying what is wrong."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, unpickling errors, I/O errors ...
        raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"holds a {type(ckpt).__name__}, not a fastcl-pretrain checkpoint")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if ckpt.get("version") not in (None, CHECKPOINT_VERSION) and "version" not in missing:
        raise ValueError(f"checkpoint format {ckpt.get('version')} (this fastcl-pretrain writes and reads "
                         f"{CHECKPOINT_VERSION})")
    if missing:
        raise ValueError(f"not a fastcl-pretrain checkpoint (no {', '.join(missing)})")
    return ckpt


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` beside ``path``, read it back and check it, then rotate: the current ``path`` becomes
    ``checkpoint.prev.pt`` and the new file takes its place. A failure leaves the current checkpoint and no
    temporary file; it raises :class:`RunError`."""
    prev = os.path.join(os.path.dirname(path), PREVIOUS_CHECKPOINT)
    try:
        tmp = _write_tmp(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise RunError(f"could not write the checkpoint {path}: {e.strerror or e} (the previous checkpoint, if "
                       f"any, is intact; free space and rerun with --resume)") from None
    try:
        back = _read_checkpoint(tmp)
        if back["epoch"] != state["epoch"] or back["step"] != state["step"]:
            raise ValueError(f"reads back epoch {back['epoch']} step {back['step']}")
    except ValueError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise RunError(f"the checkpoint written to {path} did not read back ({e}); the previous checkpoint is "
                       f"intact: check the disk and rerun with --resume") from None
    if os.path.exists(path):
        os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(path)


def load_checkpoint(out_dir: str) -> tuple[dict[str, Any], str] | None:
    """The checkpoint to resume from and its path, ``None`` when ``out_dir`` has none. ``checkpoint.pt`` is
    used; ``checkpoint.prev.pt`` only when ``checkpoint.pt`` is missing (a kill between the two renames of a
    rotation). A damaged file raises :class:`CheckpointError` naming it and what to do."""
    path, prev = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, PREVIOUS_CHECKPOINT)
    if not os.path.exists(path):
        if not os.path.exists(prev):
            return None
        path = prev
    try:
        return _read_checkpoint(path), path
    except ValueError as e:
        problem = f"{path} is damaged ({e})"
    if path != prev and os.path.exists(prev):
        try:
            good = _read_checkpoint(prev)
        except ValueError:
            pass
        else:
            raise CheckpointError(f"{problem}; the previous checkpoint {prev} (epoch {good['epoch']}, step "
                                  f"{good['step']}) is intact: move it to {path} and rerun with --resume, or "
                                  f"start over with --overwrite")
    raise CheckpointError(f"{problem} and there is no intact earlier checkpoint: start over with --overwrite "
                          f"(or restore {path} from a copy)")


def _training_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())
            if k not in _NOT_TRAINING}


def _read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                    out.append(json.loads(line))
    return out


def _rng_snapshot(device: torch.device, generators: dict[str, torch.Generator]) -> dict[str, Any]:
    snap: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(device)
    for name, g in generators.items():
        snap[name] = g.get_state()
    return snap


def _rng_restore(snap: dict[str, Any], device: torch.device, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(snap["torch"])
    random.setstate(snap["python"])
    if device.type == "cuda" and "cuda" in snap:
        torch.cuda.set_rng_state(snap["cuda"], device)
    for name, g in generators.items():
        g.set_state(snap[name])


def _gather_objects(obj: Any, d: Dist) -> list[Any]:
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

_ROBUST_KEYS = ("id_acc", "bg_gap", "coobj_gap", "both_gap", "worst_group_acc",
                "acc_aligned", "acc_bg_conflict", "acc_coobj_conflict", "acc_both_conflict")
_LAYERS = ("pre_projection", "post_projection")


@torch.no_grad()
def embed(model: ContrastiveModel, images: Any, aug: BatchAugment, device: torch.device, batch_size: int,
          amp: bool = False, workers: int = 0) -> tuple[Tensor, Tensor]:
    """``(h, z)`` float32 on CPU for the un-augmented images of a split (an in-memory ``ImageSet``, a streaming
    set, or a ``uint8`` tensor), in eval mode; the module modes are restored."""
    if isinstance(images, Tensor):
        chunks = (images[s:s + batch_size] for s in range(0, images.shape[0], batch_size))
    else:
        chunks = iter_image_batches(images, batch_size, workers=workers)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    hs, zs = [], []
    try:
        for chunk in chunks:
            x = aug.eval_transform(chunk.to(device, non_blocking=True))
            with _autocast(device, amp):
                h, z = model(x)
            hs.append(h.float().cpu())
            zs.append(z.float().cpu())
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    if not hs:
        raise ValueError("no images to embed")
    return torch.cat(hs), torch.cat(zs)


@contextlib.contextmanager
def _threads(n: int):
    """Run the (small, full-batch) probe fits on ``n`` threads: on a shared CPU the hand-offs of more threads
    cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cap(n: int, limit: int, seed: int) -> Tensor:
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def _why(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def evaluate(model: ContrastiveModel, splits: DatasetSplits, aug: BatchAugment, device: torch.device,
             args: argparse.Namespace, amp: bool) -> dict[str, Any]:
    """Linear probe (train -> test) and, with cue annotations, DFR + UrbanCars metrics, on h and on z.

    Each part that fails is left out and listed in ``not_evaluated`` (``{"what", "why"}``) instead of
    stopping the others; parameters that are not finite (a diverged run) skip everything."""
    out: dict[str, Any] = {"linear_probe": {}, "not_evaluated": []}

    def skip(what: str, e: BaseException | str) -> None:
        out["not_evaluated"].append({"what": what, "why": e if isinstance(e, str) else _why(e)})

    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        skip("everything", f"the trained weights are not finite ({len(bad)} tensors, e.g. {bad[0]}): training "
                           f"diverged; lower --lr or raise --temperature")
        return out
    k, test = splits.num_classes, splits.test
    tr = splits.train.subset(_cap(len(splits.train), args.probe_train_samples, args.seed))
    robust = splits.val is not None and splits.val.has_groups and test.has_groups
    feats: dict[str, tuple[Tensor, Tensor]] = {}
    for name, images in (("train", tr), ("test", test)) + ((("val", splits.val),) if robust else ()):
        try:
            feats[name] = embed(model, images, aug, device, args.eval_batch_size, amp, args.workers)
        except Exception as e:
            skip(f"features of the {name} split", e)
    if robust:
        out["robustness"] = {}
    for i, layer in enumerate(_LAYERS):
        if "train" in feats and "test" in feats:
            try:
                with _threads(1):
                    lp = linear_probe(feats["train"][i], tr.labels, feats["test"][i], test.labels, num_classes=k,
                                      weight_decay=args.probe_weight_decay)
                entry: dict[str, Any] = {"accuracy": lp.test_acc, "train_accuracy": lp.train_acc}
                if test.has_groups:  # the ERM probe (fitted on cue-biased training data) under the same metrics
                    m = multi_shortcut_metrics(lp.test_pred, test.labels, test.bg_aligned, test.coobj_aligned,
                                               train_ratio=splits.cue_agreement or 0.95)
                    entry["shortcut_metrics"] = {key: m[key] for key in _ROBUST_KEYS}
                out["linear_probe"][layer] = entry
            except Exception as e:
                skip(f"linear_probe.{layer}", e)
        else:
            skip(f"linear_probe.{layer}", "no features (see above)")
        if not robust:
            continue
        if "val" not in feats or "test" not in feats:
            skip(f"robustness.{layer}", "no features (see above)")
            continue
        try:
            val = splits.val
            groups = group_ids(val.labels, val.bg_aligned, val.coobj_aligned)
            with _threads(1):
                dfr = group_balanced_linear_probe(feats["val"][i], val.labels, groups, feats["test"][i],
                                                  test.labels, num_repeats=args.dfr_repeats, seed=args.seed,
                                                  num_classes=k, weight_decay=args.dfr_weight_decay)
            m = multi_shortcut_metrics(dfr.test_pred, test.labels, test.bg_aligned, test.coobj_aligned,
                                       train_ratio=splits.cue_agreement or 0.95)
            out["robustness"][layer] = {**{key: m[key] for key in _ROBUST_KEYS}, "test_accuracy": dfr.test_acc}
        except Exception as e:
            skip(f"robustness.{layer}", e)
    return out


def quick_probe(model: ContrastiveModel, splits: DatasetSplits, aug: BatchAugment, device: torch.device,
                args: argparse.Namespace, amp: bool, n: int = 1024) -> dict[str, float]:
    """A cheap linear probe (``n`` training and ``n`` test images, 100 L-BFGS iterations) of h and z."""
    tr = splits.train.subset(_cap(len(splits.train), n, args.seed))
    te = splits.test.subset(_cap(len(splits.test), n, args.seed + 1))
    ftr = embed(model, tr, aug, device, args.eval_batch_size, amp, args.workers)
    fte = embed(model, te, aug, device, args.eval_batch_size, amp, args.workers)
    with _threads(1):
        return {layer: linear_probe(ftr[i], tr.labels, fte[i], te.labels, num_classes=splits.num_classes,
                                    weight_decay=args.probe_weight_decay, max_iter=100).test_acc
                for i, layer in enumerate(_LAYERS)}


# --------------------------------------------------------------------------------------------------
# The run, stage by stage
# --------------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    out = {"host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    if device.type == "cuda":
        out["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out


def _log(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Run:
    """What the stages of one run share; each stage fills in its part."""

    args: argparse.Namespace
    d: Dist
    wall_start: float
    # data
    splits: Any = None
    batches: Any = None
    aug: Any = None
    steps_per_epoch: int = 0
    # model and optimisation
    model: Any = None
    net: Any = None
    criterion: Any = None
    optimizer: Any = None
    scheduler: Any = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    amp: bool = False
    # progress (what the checkpoint holds)
    epoch: int = 0  # completed epochs
    epoch_step: int = 0  # steps done in the epoch in progress
    epoch_loss_sum: float = 0.0
    global_step: int = 0
    train_time: float = 0.0
    resumed: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    metrics_file: Any = None

    @property
    def out_dir(self) -> str:
        return self.args.out

    @property
    def local_batch(self) -> int:
        return self.args.batch_size // self.d.world_size

    @property
    def micro(self) -> int:
        return self.args.micro_batch_size or self.local_batch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.args.epochs

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def log_record(self, rec: dict[str, Any]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(rec) + "\n")
            self.metrics_file.flush()


def prepare_output(args: argparse.Namespace, d: Dist) -> Run:
    """Stage 1: resolve the defaults that depend on other arguments and clear ``--out`` as asked
    (``--overwrite``: the earlier run's files; always: temporaries left by killed processes)."""
    run = Run(args, d, time.perf_counter())
    if args.lr is None:
        args.lr = BASE_LR[args.optimizer] * args.batch_size / 256
    if args.crop_scale is None:
        args.crop_scale = 0.5 if args.dataset == "spurious-cues" else 0.2
    run.amp = d.device.type == "cuda" and not args.fp32
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    if d.main:
        os.makedirs(args.out, exist_ok=True)
        if args.overwrite:
            gone = _run_files(args.out)
            for name in gone:
                os.remove(run.path(name))
            if gone:
                _log(d, f"--overwrite: deleted {', '.join(gone)} from {args.out}")
        stale = remove_stale_temporaries(args.out)
        if stale:
            _log(d, f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale)}")
    d.barrier()
    return run


def load_data(run: Run) -> None:
    """Stage 2: the splits (in memory, or file lists with ``--stream``), this rank's batches and the
    augmentation."""
    args, d = run.args, run.d
    t0 = time.perf_counter()
    try:
        if args.stream:
            run.splits = load_streaming(args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                                        train_samples=args.train_samples, seed=args.seed)
        else:
            run.splits = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed,
                                      image_size=args.image_size, classes=args.classes,
                                      train_samples=args.train_samples, val_samples=args.val_samples,
                                      test_samples=args.test_samples, cue_agreement=args.cue_agreement,
                                      watermark=args.watermark, watermark_elsewhere=args.watermark_elsewhere,
                                      watermark_class=args.watermark_class)
    except ValueError as e:  # arguments the dataset cannot honour
        raise ConfigError(f"--dataset {args.dataset}: {e}") from None
    splits = run.splits
    if args.image_size is None:
        args.image_size = splits.image_size
    n_train = len(splits.train)
    if n_train < args.batch_size:
        raise ConfigError(f"--batch-size {args.batch_size} is larger than the training set ({n_train} images)")
    sampler = EpochBatchSampler(n_train, args.batch_size, rank=d.rank, world_size=d.world_size, seed=args.seed)
    run.steps_per_epoch = sampler.steps_per_epoch
    if args.stream:
        run.batches = StreamingBatches(splits.train, sampler, d.device, workers=args.workers,
                                       prefetch=args.prefetch, seed=args.seed)
    else:
        run.batches = InMemoryBatches(splits.train, sampler, d.device)
    run.aug = BatchAugment(AugmentConfig(crop_scale=(args.crop_scale, 1.0)), splits.mean, splits.std)
    source = f"streamed by {args.workers} worker(s)" if args.stream else "in memory"
    _log(d,
         f"fastcl-pretrain: {args.dataset} ({n_train} train, {len(splits.test)} test"
         f"{'' if splits.val is None else f', {len(splits.val)} val'}; {splits.num_classes} classes, "
         f"{splits.image_size}px, {source}; ready in {time.perf_counter() - t0:.1f}s), {args.loss} loss, "
         f"{args.encoder} + {args.head} head, batch {args.batch_size}"
         f"{f' (micro {run.micro})' if run.micro < run.local_batch else ''} x {args.epochs} epochs = "
         f"{run.total_steps} steps, {args.optimizer} lr {args.lr:g}, {d.world_size} process(es) on "
         f"{_device_name(d.device)}")


def build_training(run: Run) -> None:
    """Stage 3: model, loss, optimiser, schedule and random generators; refuses BatchNorm on micro-batches too
    small for meaningful statistics and warns when they are per micro-batch at all."""
    args, d = run.args, run.d
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    run.model = build_model(args, run.splits.channels).to(d.device)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.model.modules())
    smallest = min(e - s for s, e in micro_batches(run.local_batch, run.micro))
    if has_bn and smallest < MIN_BATCHNORM_ROWS:
        unit = "micro-batch" if run.micro < run.local_batch else f"process (batch {args.batch_size} / {d.world_size})"
        raise ConfigError(
            f"BatchNorm statistics would come from {smallest} sample(s) per {unit}, too few to mean anything: use "
            f"--micro-batch-size >= {MIN_BATCHNORM_ROWS} (dividing the per-process batch {run.local_batch})"
            f"{' or --no-batchnorm' if args.encoder == 'convnet' else ''}")
    if has_bn and run.micro < run.local_batch:
        _log(d, f"warning: BatchNorm statistics are computed per micro-batch of {run.micro} samples "
                f"({2 * run.micro} views), not over the batch of {run.local_batch}: the step differs from a "
                f"full-batch step (--no-batchnorm makes GradCache steps exact)")
    run.criterion = build_criterion(args, d.world_size)
    run.optimizer = build_optimizer(args.optimizer, run.model, args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay, eta=args.lars_eta)
    run.scheduler = cosine_with_warmup(run.optimizer, run.total_steps,
                                       round(args.warmup_epochs * run.steps_per_epoch))
    run.generators = {"augment": torch.Generator().manual_seed(args.seed + 1)}
    torch.manual_seed(args.seed * 1000 + d.rank)  # dropout etc.: a different stream per rank
    run.net = run.model
    if d.enabled:
        ids = [d.device.index] if d.device.type == "cuda" else None
        run.net = nn.parallel.DistributedDataParallel(run.model, device_ids=ids)


def restore_checkpoint(run: Run) -> None:
    """Stage 4: with ``--resume``, the state of ``OUT/checkpoint.pt``; then the metrics the checkpoint covers
    are kept (the rest is redone), ``config.json`` written and the earlier summary and plots removed."""
    args, d = run.args, run.d
    run.config = _training_config(args)
    found = load_checkpoint(run.out_dir) if args.resume else None
    if found is not None:
        ckpt, path = found
        diff = {k: (ckpt["config"].get(k), v) for k, v in run.config.items() if ckpt["config"].get(k) != v}
        if diff:
            raise ConfigError(f"--resume: {path} was written with different training arguments "
                              f"(checkpoint, now): {diff}; use the same arguments or another --out")
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        rngs = ckpt["rng"]
        _rng_restore(rngs[d.rank] if d.rank < len(rngs) else rngs[0], d.device, run.generators)
        run.epoch, run.epoch_step, run.global_step = ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]
        run.train_time, run.epoch_loss_sum = ckpt["train_time_s"], ckpt.get("epoch_loss_sum", 0.0)
        run.resumed = True
        _log(d, f"resumed from {path}: {run.epoch}/{args.epochs} epochs done"
                f"{f' and {run.epoch_step} steps of the next' if run.epoch_step else ''}, step {run.global_step}")
        del ckpt
    elif args.resume:
        _log(d, f"--resume: no checkpoint in {run.out_dir} yet, starting from scratch")
    if d.main:
        kept = [r for r in _read_metrics(run.path(METRICS))
                if run.resumed and r.get("type") in ("step", "epoch", "probe")
                and r.get("step", 1e18) <= run.global_step]
        _atomic_write(run.path(METRICS), lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        _atomic_write(run.path(CONFIG), lambda f: f.write(
            json.dumps(vars(args) | {"world_size": d.world_size}, indent=2, default=list).encode()))
        for name in (SUMMARY, "loss.png", "probe.png"):  # they described the run before this one's end
            with contextlib.suppress(FileNotFoundError):
                os.remove(run.path(name))
        run.metrics_file = open(run.path(METRICS), "a")


def train_step(run: Run, images: Tensor, labels: Tensor) -> float:
    """One optimisation step on this rank's rows of a global batch; returns the (global) loss."""
    args, device = run.args, run.d.device
    lo, hi = run.d.rank * run.local_batch, (run.d.rank + 1) * run.local_batch
    p1 = run.aug.sample(args.batch_size, run.generators["augment"])[lo:hi].to(device)
    p2 = run.aug.sample(args.batch_size, run.generators["augment"])[lo:hi].to(device)

    def encode(s: int, e: int) -> Tensor:
        x = images[s:e]
        views = torch.cat([run.aug.apply(x, p1[s:e]), run.aug.apply(x, p2[s:e])])
        with _autocast(device, run.amp):
            _, z = run.net(views)
        z = z.float()
        return torch.stack([z[: e - s], z[e - s:]], dim=1)  # [m, 2, D]

    run.optimizer.zero_grad(set_to_none=True)
    loss = cached_backward(encode, run.local_batch, run.micro, lambda z: _loss_on(run.criterion, args.loss, z, labels),
                           model=run.model, no_sync=run.net.no_sync if run.d.enabled else None)
    run.optimizer.step()
    run.scheduler.step()
    if run.d.enabled:
        dist.all_reduce(loss)
        loss /= run.d.world_size
    value = float(loss)
    if not math.isfinite(value):
        raise RunError(f"the loss is {value} at step {run.global_step + 1}: training diverged; lower --lr "
                       f"(now {args.lr:g}) or raise --temperature (the last checkpoint is the one before)")
    return value


def write_checkpoint(run: Run) -> None:
    """The state after ``run.global_step`` steps (all ranks' RNG states; written by rank 0)."""
    rngs = _gather_objects(_rng_snapshot(run.d.device, run.generators), run.d)
    if run.d.main:
        save_checkpoint(run.path(CHECKPOINT), {
            "version": CHECKPOINT_VERSION, "epoch": run.epoch, "epoch_step": run.epoch_step,
            "step": run.global_step, "epoch_loss_sum": run.epoch_loss_sum, "train_time_s": run.train_time,
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": rngs, "config": run.config,
            "fastcl": str(fastcl.__version__), "torch": str(torch.__version__),
        })
    run.d.barrier()


def train(run: Run) -> None:
    """Stage 5: the remaining epochs; a checkpoint after each one (and every ``--checkpoint-every`` steps)."""
    args, d = run.args, run.d
    probe_every = args.probe_every if args.probe_every >= 0 else max(1, args.epochs // 5)
    remaining = (args.epochs - run.epoch) * run.steps_per_epoch - run.epoch_step
    bar = ProgressBar(remaining, enabled=d.main and not args.quiet)
    for epoch in range(run.epoch, args.epochs):
        run.net.train()
        epoch_start = last = time.perf_counter()
        for images, labels in run.batches.epoch(epoch, run.epoch_step):
            loss = train_step(run, images, labels)
            run.global_step += 1
            run.epoch_step += 1
            run.epoch_loss_sum += loss
            now = time.perf_counter()
            run.log_record({"type": "step", "epoch": epoch + 1, "step": run.global_step, "loss": loss,
                            "lr": run.optimizer.param_groups[0]["lr"], "samples_per_s": args.batch_size / (now - last)})
            bar.update(args.batch_size, f"epoch {epoch + 1}/{args.epochs}", loss=loss)
            if (args.checkpoint_every and run.global_step % args.checkpoint_every == 0
                    and run.epoch_step < run.steps_per_epoch):
                run.train_time += now - epoch_start
                epoch_start = now
                write_checkpoint(run)
            if args.crash_after_steps and run.global_step >= args.crash_after_steps:
                sys.stderr.flush()
                os._exit(137)  # test hook: die like kill -9
            last = time.perf_counter()
        run.train_time += time.perf_counter() - epoch_start
        run.log_record({"type": "epoch", "epoch": epoch + 1, "step": run.global_step,
                        "loss": run.epoch_loss_sum / run.steps_per_epoch,
                        "epoch_time_s": time.perf_counter() - epoch_start})
        run.epoch, run.epoch_step, run.epoch_loss_sum = epoch + 1, 0, 0.0
        if probe_every and (run.epoch % probe_every == 0 or run.epoch == args.epochs) and d.main:
            try:
                acc: dict[str, Any] = quick_probe(run.model, run.splits, run.aug, d.device, args, run.amp)
            except Exception as e:  # e.g. features that are not finite: record it, keep training
                acc = {"error": _why(e)}
            run.log_record({"type": "probe", "epoch": run.epoch, "step": run.global_step, **acc})
        write_checkpoint(run)


def evaluate_run(run: Run) -> dict[str, Any]:
    """Stage 6 (rank 0): :func:`evaluate`, every failure recorded in ``not_evaluated``."""
    if not run.args.quiet:
        print(f"training done ({run.train_time:.0f}s); evaluating h and z ...", file=sys.stderr, flush=True)
    t_eval = time.perf_counter()
    try:
        results = evaluate(run.model, run.splits, run.aug, run.d.device, run.args, run.amp)
    except Exception as e:
        results = {"linear_probe": {}, "not_evaluated": [{"what": "everything", "why": _why(e)}]}
    results["eval_time_s"] = round(time.perf_counter() - t_eval, 2)
    return results


def report(run: Run, results: dict[str, Any], training_error: str | None = None) -> None:
    """Stage 7 (rank 0): ``summary.json`` (also when training or evaluation failed: it says what was not
    evaluated and why), the plots and the printed summary."""
    args, d = run.args, run.d
    records = _read_metrics(run.path(METRICS))
    epochs = [r for r in records if r.get("type") == "epoch"]
    summary = {
        **results,
        "training": {"completed": training_error is None, "epochs_done": run.epoch, "steps_done": run.global_step,
                     **({"error": training_error} if training_error else {})},
        "final_loss": epochs[-1]["loss"] if epochs else None,
        "config": vars(args) | {"world_size": d.world_size, "local_batch_size": run.local_batch,
                                "micro_batch_size_used": run.micro, "steps": run.total_steps},
        "dataset": run.splits.info | {"name": run.splits.name, "num_classes": run.splits.num_classes},
        "versions": {"fastcl": str(fastcl.__version__), "torch": str(torch.__version__),
                     "python": platform.python_version()},
        "device": _device_name(d.device),
        "world_size": d.world_size,
        "wall_time_s": round(time.perf_counter() - run.wall_start, 2),
        "train_time_s": round(run.train_time, 2),
        "resumed": run.resumed,
        "checkpoint": run.path(CHECKPOINT) if os.path.exists(run.path(CHECKPOINT)) else None,
        "peak_memory": _peak_memory_mb(d.device),
    }
    if not args.no_plots and training_error is None:
        try:
            from fastcl.train import plots

            title = f"{args.dataset}, {args.loss}, head={args.head}, seed {args.seed}"
            if plots.plot_loss(records, run.path("loss.png"), title=title):
                plots.plot_probe(records, summary, run.path("probe.png"), title=title)
        except Exception as e:
            summary["not_evaluated"].append({"what": "plots", "why": _why(e)})
    _atomic_write(run.path(SUMMARY), lambda f: f.write(json.dumps(summary, indent=2, default=list).encode()))
    _print_summary(summary, run.out_dir)


def _print_summary(summary: dict[str, Any], out_dir: str) -> None:
    lp = summary.get("linear_probe", {})
    if lp:
        print("linear probe accuracy: " + ", ".join(
            f"{name} {lp[layer]['accuracy']:.4f}" for layer, name in zip(_LAYERS, ("pre-projection h",
                                                                                 "post-projection z"))
            if layer in lp))
    rob = summary.get("robustness")
    if rob:
        print("DFR (group-balanced last layer) on the cue-balanced test set:")
        print(f"  {'':16s}" + "".join(f"{k:>16s}" for k in _ROBUST_KEYS[:5]))
        for layer in _LAYERS:
            if layer in rob:
                print(f"  {layer:16s}" + "".join(f"{rob[layer][k]:16.4f}" for k in _ROBUST_KEYS[:5]))
    for item in summary.get("not_evaluated", []):
        print(f"not evaluated: {item['what']}: {item['why']}")
    print(f"wall time {summary['wall_time_s']:.0f}s; results in {os.path.join(out_dir, SUMMARY)}")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace, d: Dist) -> int:
    run = prepare_output(args, d)
    load_data(run)
    build_training(run)
    restore_checkpoint(run)
    try:
        train(run)
    except RunError as e:
        if d.main:  # the last checkpoint stays; the summary says why nothing was evaluated
            report(run, {"linear_probe": {}, "not_evaluated": [{"what": "everything", "why": "training stopped"}]},
                   training_error=str(e))
        raise
    finally:
        if run.metrics_file is not None:
            run.metrics_file.close()
    # the other ranks leave without waiting: no collective is pending, and a long evaluation on rank 0 must not
    # run into the process group's timeout
    if not d.main:
        return 0
    results = evaluate_run(run)
    report(run, results)
    missing = results["not_evaluated"]
    if missing:
        print(f"fastcl-pretrain: error: not everything was evaluated ({missing[0]['what']}: {missing[0]['why']}"
              f"{f'; {len(missing) - 1} more' if len(missing) > 1 else ''}); the trained model is in "
              f"{run.path(CHECKPOINT)}, details in {run.path(SUMMARY)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``fastcl-pretrain``: returns the exit status (0; 1 when the run failed; 2 for a configuration error,
    reported in one line). argparse's own errors raise ``SystemExit(2)``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        check_args(args)
    except ConfigError as e:
        if rank0:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    d = setup_distributed(args.device, args.threads)
    try:
        return _run(args, d)
    except (ConfigError, DatasetNotFoundError, MissingDependencyError) as e:  # say what to do, no traceback
        if d.main:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        if d.main:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
