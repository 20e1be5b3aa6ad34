"""Contrastive pretraining with fastcl's fused losses, then probes of the pre- and post-projection features.

    fastcl-pretrain                                   # default experiment: spurious-cues, SupCon, MLP head, CPU
    python -m fastcl.pretrain --head fixed --seed 1 --out runs/fixed-s1
    fastcl-pretrain --batch-size 4096 --micro-batch-size 512 ...        # GradCache: big batches, small memory
    torchrun --nproc_per_node=8 -m fastcl.pretrain --dataset cifar10 --data-dir ~/data --encoder resnet18 ...

The question of the default experiment (after Xue et al., ICLR 2024 and Li et al., CVPR 2023): after
contrastive pretraining with a projection head on images whose background and co-occurring object agree with
the class 95% of the time, is the representation before the head (h) more robust to those spurious cues than
the one after it (z)? At the end both are probed: a linear probe trained on the (cue-biased) training set, and
last-layer retraining on a small group-balanced held-out set (DFR) evaluated with the UrbanCars metrics on
the cue-balanced test set. Everything lands in ``OUT/``: ``summary.json``, ``metrics.jsonl`` (one record per
step, epoch and probe), ``checkpoint.pt`` (every epoch, atomic), ``loss.png`` and ``probe.png``.

Training details:

* ``--micro-batch-size m < --batch-size``: gradient caching (:mod:`fastcl.gradcache`): embeddings of all
  micro-batches without autograd, the loss and its gradient on the full batch, then each micro-batch
  re-forwarded with autograd and the cached gradient back-propagated, RNG restored. Augmentation parameters are
  drawn for the whole batch first, so the views are the same whatever ``m`` is. With BatchNorm the step differs
  from the full-batch one (statistics per micro-batch); without it, it is the same step.
* ``torchrun``: DDP over ``WORLD_SIZE`` processes (gloo on CPU, NCCL on GPU). ``--batch-size`` is global; each
  rank embeds its ``batch / world`` rows and the loss (``gather_distributed=True``) contrasts them with the
  whole gathered batch, so the gradient is that of the single-process loss (BatchNorm statistics are per rank).
* ``--resume``: continue from ``OUT/checkpoint.pt`` (model, optimizer, schedule, RNG states, epoch), written
  after every epoch through a temporary file and a rename. A run killed at any point and resumed with the same
  arguments finishes with the same weights as an uninterrupted one (same device; on GPU add
  ``--deterministic``). With no checkpoint yet, ``--resume`` starts from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import Tensor, nn

import fastcl
from fastcl import encoders as E
from fastcl import heads as H
from fastcl.train.augment import AugmentConfig, BatchAugment
from fastcl.train.data import DATASETS, DatasetNotFoundError, DatasetSplits, MissingDependencyError, load_dataset
from fastcl.eval import group_balanced_linear_probe, group_ids, linear_probe, multi_shortcut_metrics
from fastcl.train.gradcache import cached_backward
from fastcl.losses import NTXentLoss, SupConLoss
from fastcl.models import ContrastiveModel
from fastcl.train.optim import build_optimizer, cosine_with_warmup

__all__ = ["main", "build_parser", "build_model", "build_criterion"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# arguments that do not change the training trajectory: they may differ between a run and its resumption
_NOT_TRAINING = {"out", "resume", "device", "threads", "probe_every", "eval_batch_size", "no_plots",
                 "crash_after_steps", "dfr_repeats", "quiet", "probe_train_samples", "probe_weight_decay",
                 "dfr_weight_decay"}
BASE_LR = {"sgd": 0.1, "lars": 0.3}  # per 256 samples of batch


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
                   help="GradCache micro-batch per process (0: no caching, the whole local batch at once)")
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
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
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


def _check_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    for name in ("epochs", "batch_size", "proj_dim", "eval_batch_size", "dfr_repeats", "probe_train_samples"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.micro_batch_size < 0:
        p.error("--micro-batch-size must be >= 0")
    if not 0 <= args.cue_agreement <= 1:
        p.error("--cue-agreement must lie in [0, 1]")
    if args.temperature <= 0 or args.kappa <= 0:
        p.error("--temperature and --kappa must be positive")
    if args.crop_scale is not None and not 0 < args.crop_scale <= 1:
        p.error("--crop-scale must lie in (0, 1]")


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


@torch.no_grad()
def embed(model: ContrastiveModel, images: Tensor, aug: BatchAugment, device: torch.device, batch_size: int,
          amp: bool = False) -> tuple[Tensor, Tensor]:
    """``(h, z)`` float32 on CPU for un-augmented ``images`` (eval mode; the module modes are restored)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    hs, zs = [], []
    try:
        for s in range(0, images.shape[0], batch_size):
            x = aug.eval_transform(images[s:s + batch_size].to(device, non_blocking=True))
            with _autocast(device, amp):
                h, z = model(x)
            hs.append(h.float().cpu())
            zs.append(z.float().cpu())
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    return torch.cat(hs), torch.cat(zs)


# --------------------------------------------------------------------------------------------------
# Checkpoints, metrics
# --------------------------------------------------------------------------------------------------


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """``torch.save`` through a temporary file and an atomic rename: a reader sees the old or the new file."""
    _atomic_write(path, lambda f: torch.save(state, f))


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


def evaluate(model: ContrastiveModel, splits: DatasetSplits, aug: BatchAugment, device: torch.device,
             args: argparse.Namespace, amp: bool) -> dict[str, Any]:
    """Linear probe (train -> test) and, with cue annotations, DFR + UrbanCars metrics, on h and on z."""
    k = splits.num_classes
    tr = splits.train.subset(_cap(len(splits.train), args.probe_train_samples, args.seed))
    feats = {"train": embed(model, tr.images, aug, device, args.eval_batch_size, amp),
             "test": embed(model, splits.test.images, aug, device, args.eval_batch_size, amp)}
    test = splits.test
    robust = splits.val is not None and splits.val.has_groups and test.has_groups
    if robust:
        feats["val"] = embed(model, splits.val.images, aug, device, args.eval_batch_size, amp)
    out: dict[str, Any] = {"linear_probe": {}, "robustness": {}}
    for i, layer in enumerate(("pre_projection", "post_projection")):
        with _threads(1):
            lp = linear_probe(feats["train"][i], tr.labels, feats["test"][i], test.labels, num_classes=k,
                              weight_decay=args.probe_weight_decay)
        entry: dict[str, Any] = {"accuracy": lp.test_acc, "train_accuracy": lp.train_acc}
        if test.has_groups:  # the ERM probe (fitted on cue-biased training data) under the same metrics
            m = multi_shortcut_metrics(lp.test_pred, test.labels, test.bg_aligned, test.coobj_aligned,
                                       train_ratio=splits.cue_agreement or 0.95)
            entry["shortcut_metrics"] = {key: m[key] for key in _ROBUST_KEYS}
        out["linear_probe"][layer] = entry
        if robust:
            val = splits.val
            groups = group_ids(val.labels, val.bg_aligned, val.coobj_aligned)
            with _threads(1):
                dfr = group_balanced_linear_probe(feats["val"][i], val.labels, groups, feats["test"][i],
                                                  test.labels, num_repeats=args.dfr_repeats, seed=args.seed,
                                                  num_classes=k, weight_decay=args.dfr_weight_decay)
            m = multi_shortcut_metrics(dfr.test_pred, test.labels, test.bg_aligned, test.coobj_aligned,
                                       train_ratio=splits.cue_agreement or 0.95)
            out["robustness"][layer] = {**{key: m[key] for key in _ROBUST_KEYS}, "test_accuracy": dfr.test_acc}
    if not robust:
        del out["robustness"]
    return out


def quick_probe(model: ContrastiveModel, splits: DatasetSplits, aug: BatchAugment, device: torch.device,
                args: argparse.Namespace, amp: bool, n: int = 1024) -> dict[str, float]:
    """A cheap linear probe (``n`` training and ``n`` test images, 100 L-BFGS iterations) of h and z."""
    tr = splits.train.subset(_cap(len(splits.train), n, args.seed))
    te = splits.test.subset(_cap(len(splits.test), n, args.seed + 1))
    ftr = embed(model, tr.images, aug, device, args.eval_batch_size, amp)
    fte = embed(model, te.images, aug, device, args.eval_batch_size, amp)
    with _threads(1):
        return {layer: linear_probe(ftr[i], tr.labels, fte[i], te.labels, num_classes=splits.num_classes,
                                    weight_decay=args.probe_weight_decay, max_iter=100).test_acc
                for i, layer in enumerate(("pre_projection", "post_projection"))}


# --------------------------------------------------------------------------------------------------
# Main
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    threads = torch.get_num_threads()
    d = setup_distributed(args.device, args.threads)
    try:
        return _run(args, d)
    except (DatasetNotFoundError, MissingDependencyError) as e:  # missing data or Pillow: say what to do, no traceback
        print(f"fastcl-pretrain: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, d: Dist) -> int:
    wall_start = time.perf_counter()
    device = d.device
    amp = device.type == "cuda" and not args.fp32
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.batch_size % d.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {d.world_size} processes")
    local_batch = args.batch_size // d.world_size
    micro = args.micro_batch_size or local_batch
    if args.lr is None:
        args.lr = BASE_LR[args.optimizer] * args.batch_size / 256
    if args.crop_scale is None:
        args.crop_scale = 0.5 if args.dataset == "spurious-cues" else 0.2
    out_dir = args.out
    if d.main:
        os.makedirs(out_dir, exist_ok=True)
    d.barrier()
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    metrics_path = os.path.join(out_dir, METRICS)

    # ---- data
    t0 = time.perf_counter()
    splits = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed, image_size=args.image_size,
                          classes=args.classes, train_samples=args.train_samples, val_samples=args.val_samples,
                          test_samples=args.test_samples, cue_agreement=args.cue_agreement,
                          watermark=args.watermark, watermark_elsewhere=args.watermark_elsewhere,
                          watermark_class=args.watermark_class)
    if args.image_size is None:
        args.image_size = splits.image_size
    n_train = len(splits.train)
    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training set ({n_train} images)")
    total_steps = steps_per_epoch * args.epochs
    aug = BatchAugment(AugmentConfig(crop_scale=(args.crop_scale, 1.0)), splits.mean, splits.std)
    train_images = splits.train.images.to(device)
    train_labels = splits.train.labels.to(device)
    _log(d,
         f"fastcl-pretrain: {args.dataset} ({n_train} train, {len(splits.test)} test"
         f"{'' if splits.val is None else f', {len(splits.val)} val'}; {splits.num_classes} classes, "
         f"{splits.image_size}px; ready in {time.perf_counter() - t0:.1f}s), {args.loss} loss, {args.encoder} + "
         f"{args.head} head, batch {args.batch_size}"
         f"{f' (micro {micro})' if micro < local_batch else ''} x {args.epochs} epochs = {total_steps} steps, "
         f"{args.optimizer} lr {args.lr:g}, {d.world_size} process(es) on {_device_name(device)}")

    # ---- model, optimisation
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = build_model(args, splits.channels).to(device)
    criterion = build_criterion(args, d.world_size)
    optimizer = build_optimizer(args.optimizer, model, args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, eta=args.lars_eta)
    scheduler = cosine_with_warmup(optimizer, total_steps, round(args.warmup_epochs * steps_per_epoch))
    gens = {"data": torch.Generator().manual_seed(args.seed), "augment": torch.Generator().manual_seed(args.seed + 1)}
    torch.manual_seed(args.seed * 1000 + d.rank)  # dropout etc.: a different stream per rank
    start_epoch, global_step, train_time = 0, 0, 0.0

    config = _training_config(args)
    resumed = False
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        diff = {k: (ckpt["config"].get(k), v) for k, v in config.items() if ckpt["config"].get(k) != v}
        if diff:
            raise SystemExit(f"--resume: {ckpt_path} was written with different training arguments "
                             f"(checkpoint, now): {diff}; use the same arguments or another --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        rngs = ckpt["rng"]
        _rng_restore(rngs[d.rank] if d.rank < len(rngs) else rngs[0], device, gens)
        start_epoch, global_step, train_time = ckpt["epoch"], ckpt["step"], ckpt["train_time_s"]
        resumed = True
        _log(d, f"resumed from {ckpt_path}: {start_epoch}/{args.epochs} epochs done, step {global_step}")
        del ckpt
    elif args.resume:
        _log(d, f"--resume: no checkpoint in {out_dir} yet, starting from scratch")
    if d.main:  # metrics of the epochs the checkpoint covers survive; the rest is redone
        kept = [r for r in _read_metrics(metrics_path)
                if resumed and r.get("type") in ("step", "epoch", "probe") and r.get("epoch", 1e9) <= start_epoch]
        _atomic_write(metrics_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(vars(args) | {"world_size": d.world_size}, f, indent=2, default=list)
    metrics_file = open(metrics_path, "a") if d.main else None

    def log_record(rec: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()

    net: nn.Module = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    probe_every = args.probe_every if args.probe_every >= 0 else max(1, args.epochs // 5)

    # ---- training
    bar = ProgressBar((args.epochs - start_epoch) * steps_per_epoch, enabled=d.main and not args.quiet)
    lo, hi = d.rank * local_batch, (d.rank + 1) * local_batch
    for epoch in range(start_epoch, args.epochs):
        net.train()
        epoch_start = time.perf_counter()
        perm = torch.randperm(n_train, generator=gens["data"])
        loss_sum = 0.0
        for it in range(steps_per_epoch):
            step_start = time.perf_counter()
            idx = perm[it * args.batch_size:(it + 1) * args.batch_size][lo:hi].to(device)
            p1 = aug.sample(args.batch_size, gens["augment"])[lo:hi].to(device)
            p2 = aug.sample(args.batch_size, gens["augment"])[lo:hi].to(device)
            xb, yb = train_images[idx], train_labels[idx]

            def encode(s: int, e: int) -> Tensor:
                x = xb[s:e]
                views = torch.cat([aug.apply(x, p1[s:e]), aug.apply(x, p2[s:e])])
                with _autocast(device, amp):
                    _, z = net(views)
                z = z.float()
                return torch.stack([z[: e - s], z[e - s:]], dim=1)  # [m, 2, D]

            optimizer.zero_grad(set_to_none=True)
            loss = cached_backward(encode, local_batch, micro, lambda z: _loss_on(criterion, args.loss, z, yb),
                                   model=model, no_sync=net.no_sync if d.enabled else None)
            optimizer.step()
            scheduler.step()
            global_step += 1
            if d.enabled:
                dist.all_reduce(loss)
                loss /= d.world_size
            loss_val = float(loss)
            if not math.isfinite(loss_val):
                raise SystemExit(f"loss is {loss_val} at step {global_step}: lower --lr or raise --temperature")
            loss_sum += loss_val
            dt = time.perf_counter() - step_start
            log_record({"type": "step", "epoch": epoch + 1, "step": global_step, "loss": loss_val,
                        "lr": optimizer.param_groups[0]["lr"], "samples_per_s": args.batch_size / dt})
            bar.update(args.batch_size, f"epoch {epoch + 1}/{args.epochs}", loss=loss_val)
            if args.crash_after_steps and global_step >= args.crash_after_steps:
                sys.stderr.flush()
                os._exit(137)  # test hook: die like kill -9
        train_time += time.perf_counter() - epoch_start
        log_record({"type": "epoch", "epoch": epoch + 1, "step": global_step, "loss": loss_sum / steps_per_epoch,
                    "epoch_time_s": time.perf_counter() - epoch_start})
        if probe_every and ((epoch + 1) % probe_every == 0 or epoch + 1 == args.epochs) and d.main:
            acc = quick_probe(model, splits, aug, device, args, amp)
            log_record({"type": "probe", "epoch": epoch + 1, "step": global_step, **acc})
        rngs = _gather_objects(_rng_snapshot(device, gens), d)
        if d.main:
            save_checkpoint(ckpt_path, {
                "version": 1, "epoch": epoch + 1, "step": global_step, "train_time_s": train_time,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rngs, "config": config,
                "fastcl": str(fastcl.__version__), "torch": str(torch.__version__),
            })
        d.barrier()
    if metrics_file is not None:
        metrics_file.close()

    # ---- evaluation (rank 0)
    if d.main:
        if not args.quiet:
            print(f"training done ({train_time:.0f}s); evaluating h and z ...", file=sys.stderr, flush=True)
        t_eval = time.perf_counter()
        results = evaluate(model, splits, aug, device, args, amp)
        records = _read_metrics(metrics_path)
        epochs = [r for r in records if r.get("type") == "epoch"]
        summary = {
            **results,
            "final_loss": epochs[-1]["loss"] if epochs else None,
            "config": vars(args) | {"world_size": d.world_size, "local_batch_size": local_batch,
                                    "micro_batch_size_used": micro, "steps": total_steps},
            "dataset": splits.info | {"name": splits.name, "num_classes": splits.num_classes},
            "versions": {"fastcl": str(fastcl.__version__), "torch": str(torch.__version__),
                         "python": platform.python_version()},
            "device": _device_name(device),
            "world_size": d.world_size,
            "wall_time_s": round(time.perf_counter() - wall_start, 2),
            "train_time_s": round(train_time, 2),
            "eval_time_s": round(time.perf_counter() - t_eval, 2),
            "resumed": resumed,
            "peak_memory": _peak_memory_mb(device),
        }
        _atomic_write(os.path.join(out_dir, SUMMARY),
                      lambda f: f.write(json.dumps(summary, indent=2, default=list).encode()))
        if not args.no_plots:
            from fastcl.train import plots

            title = f"{args.dataset}, {args.loss}, head={args.head}, seed {args.seed}"
            if plots.plot_loss(records, os.path.join(out_dir, "loss.png"), title=title):
                plots.plot_probe(records, summary, os.path.join(out_dir, "probe.png"), title=title)
        _print_summary(summary, out_dir)
    # the other ranks leave without waiting: no collective is pending, and a long evaluation on rank 0 must not
    # run into the process group's timeout
    return 0


def _print_summary(summary: dict[str, Any], out_dir: str) -> None:
    lp = summary["linear_probe"]
    print(f"linear probe accuracy: pre-projection h {lp['pre_projection']['accuracy']:.4f}, "
          f"post-projection z {lp['post_projection']['accuracy']:.4f}")
    rob = summary.get("robustness")
    if rob:
        print("DFR (group-balanced last layer) on the cue-balanced test set:")
        print(f"  {'':16s}" + "".join(f"{k:>16s}" for k in _ROBUST_KEYS[:5]))
        for layer in ("pre_projection", "post_projection"):
            print(f"  {layer:16s}" + "".join(f"{rob[layer][k]:16.4f}" for k in _ROBUST_KEYS[:5]))
    print(f"wall time {summary['wall_time_s']:.0f}s; results in {os.path.join(out_dir, SUMMARY)}")


if __name__ == "__main__":
    sys.exit(main())
