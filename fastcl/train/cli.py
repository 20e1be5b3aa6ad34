"""The ``fastcl-pretrain`` command line: the parser and every check of the arguments that needs no data or model.

:func:`training_config` names the arguments that define a training trajectory: a resumed run must repeat them.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch

from fastcl.train.checkpoint import run_files
from fastcl.train.data import DATASETS
from fastcl.train.data.loader import STREAMING_DATASETS
from fastcl.train.errors import ConfigError

__all__ = ["BASE_LR", "MAX_CUE_CLASSES", "MIN_BATCHNORM_ROWS", "build_parser", "check_args", "training_config"]

MIN_BATCHNORM_ROWS = 8  # smallest micro-batch (samples per rank) with BatchNorm: 2 views -> 16 rows per statistic
MAX_CUE_CLASSES = 8
# arguments that do not change the training trajectory: they may differ between a run and its resumption
NOT_TRAINING = {"out", "resume", "overwrite", "device", "threads", "probe_every", "eval_batch_size", "no_plots",
                 "dfr_repeats", "quiet", "probe_train_samples", "probe_weight_decay",
                 "dfr_weight_decay", "workers", "prefetch", "checkpoint_every"}
BASE_LR = {"sgd": 0.1, "lars": 0.3}  # per 256 samples of batch


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
    """The ``fastcl-pretrain`` parser (its defaults also complete a checkpoint's config in ``fastcl-shortcuts``)."""
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
    m.add_argument("--queue-size", type=int, default=0,
                   help="MoCo v2: a queue of the last K keys (and labels) as extra contrast columns, the keys from a "
                        "momentum (EMA) copy of the model; needs --key-momentum (0: off)")
    m.add_argument("--key-momentum", type=float, default=None,
                   help="with --queue-size: EMA rate m of the key model, p_k = m p_k + (1 - m) p_q after each step "
                        "(MoCo: 0.999; --momentum is the optimiser's)")
    m.add_argument("--queue-negatives-only", action="store_true",
                   help="with --queue-size and --loss supcon: every queue key is a negative (MoCo's queue beside the "
                        "batch's SupCon positives); by default a queue key with the anchor's label is a positive")

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
    return p


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be checked without data or model; raises :class:`ConfigError`."""
    for name in ("epochs", "batch_size", "proj_dim", "eval_batch_size", "dfr_repeats", "probe_train_samples",
                 "prefetch"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"{_flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("micro_batch_size", "workers", "checkpoint_every", "threads", "weight_decay", "warmup_epochs"):
        value = getattr(args, name)
        if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{_flag(name)} must be >= 0, got {value}")
    if args.probe_every < -1:
        raise ConfigError(f"--probe-every must be >= 0 (or -1 for every max(1, epochs // 5)), got {args.probe_every}")
    if args.train_samples is not None and args.train_samples <= 0:
        raise ConfigError(f"--train-samples must be positive (leave it out for the default), got {args.train_samples}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.momentum < 1:
        raise ConfigError(f"--momentum must lie in [0, 1), got {args.momentum}")
    _check_queue(args)
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


def _check_queue(args: argparse.Namespace) -> None:
    if args.queue_size < 0:
        raise ConfigError(f"--queue-size must be >= 0 (0: no queue), got {args.queue_size}")
    if args.queue_negatives_only and (args.queue_size == 0 or args.loss != "supcon"):
        raise ConfigError("--queue-negatives-only needs --queue-size K > 0 and --loss supcon (with --loss simclr "
                          "every queue key is a negative already)")
    if args.queue_size == 0:
        if args.key_momentum is not None:
            raise ConfigError(f"--key-momentum {args.key_momentum:g} needs a queue: pass --queue-size K > 0 as well "
                              f"(or leave --key-momentum out)")
        return
    if args.key_momentum is None:
        raise ConfigError(f"--queue-size {args.queue_size} needs --key-momentum m, the EMA rate of the key model "
                          f"(MoCo v2: 0.999; short runs: 0.99)")
    if not (math.isfinite(args.key_momentum) and 0 <= args.key_momentum < 1):
        raise ConfigError(f"--key-momentum must lie in [0, 1), got {args.key_momentum}")


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


def _check_out(args: argparse.Namespace) -> None:
    out = args.out
    if not out:
        raise ConfigError("--out must name a directory, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a directory: choose another --out")
    present = run_files(out)
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


def training_config(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that define the training trajectory (all but :data:`NOT_TRAINING`), as a checkpoint stores
    them: a resumed run must repeat them."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())
            if k not in NOT_TRAINING}
