"""The stages of a ``fastcl-pretrain`` run, in order, on the :class:`Run` they share.

1. :func:`prepare_output`: defaults that depend on other arguments, ``--out`` cleared as asked;
2. :func:`load_data`: the splits, this rank's batches, the augmentation;
3. :func:`build_training`: model, loss, optimiser, schedule, random generators;
4. :func:`restore_checkpoint`: the state of ``OUT/checkpoint.pt`` with ``--resume``;
5. :func:`train`: the remaining epochs (:func:`train_step` per batch, :func:`write_checkpoint` after each epoch).

Evaluation and the summary (stages 6 and 7) are in :mod:`fastcl.train.evaluate`.

Test hook: with the environment variable ``FASTCL_TEST_CRASH_AFTER_STEPS=N`` the training loop dies like
``kill -9`` (no cleanup, exit status 137) right after step ``N``; the resume tests set it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import fastcl
from fastcl.train.augment import AugmentConfig, BatchAugment
from fastcl.train.checkpoint import (
    CHECKPOINT,
    CHECKPOINT_VERSION,
    CONFIG,
    METRICS,
    SUMMARY,
    atomic_json,
    atomic_write,
    json_safe,
    load_checkpoint,
    read_metrics,
    remove_stale_temporaries,
    rng_restore,
    rng_snapshot,
    run_files,
    save_checkpoint,
)
from fastcl.train.cli import BASE_LR, MIN_BATCHNORM_ROWS, build_parser, training_config
from fastcl.train.data import UnreadableImageError, load_dataset
from fastcl.train.data.loader import EpochBatchSampler, InMemoryBatches, StreamingBatches, load_streaming
from fastcl.train.errors import ConfigError, RunError
from fastcl.train.evaluate import describe_error, quick_probe
from fastcl.train.factory import build_criterion, build_model, loss_on
from fastcl.train.gradcache import cached_backward, micro_batches
from fastcl.train.moco import build_queue, ema_update, key_model_of, moco_loss, normalized_keys
from fastcl.train.optim import build_optimizer, cosine_with_warmup
from fastcl.train.progress import ProgressBar
from fastcl.train.runtime import Dist, autocast, device_name, gather_objects

__all__ = ["CRASH_AFTER_STEPS_ENV", "Run", "build_training", "load_data", "prepare_output", "restore_checkpoint",
           "train", "train_step", "write_checkpoint"]

CRASH_AFTER_STEPS_ENV = "FASTCL_TEST_CRASH_AFTER_STEPS"


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
    key_model: Any = None  # --queue-size: the momentum copy of the model that embeds the keys
    queue: Any = None  # --queue-size: fastcl.MemoryQueue of the last keys (and labels)
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
            self.metrics_file.write(json.dumps(json_safe(rec), allow_nan=False) + "\n")
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
            gone = run_files(args.out)
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
         f"{device_name(d.device)}")


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
    if args.queue_size:
        run.key_model = key_model_of(run.model)
        run.queue = build_queue(args, run.model.out_dim, d.world_size).to(d.device)
        _log(d, f"MoCo: key model EMA {args.key_momentum:g}, queue of {args.queue_size} keys"
                f"{' and labels' if run.queue.keeps_labels else ''}")
    torch.manual_seed(args.seed * 1000 + d.rank)  # dropout etc.: a different stream per rank
    run.net = run.model
    if d.enabled:
        ids = [d.device.index] if d.device.type == "cuda" else None
        run.net = nn.parallel.DistributedDataParallel(run.model, device_ids=ids)


def restore_checkpoint(run: Run) -> None:
    """Stage 4: with ``--resume``, the state of ``OUT/checkpoint.pt``; then the metrics the checkpoint covers
    are kept (the rest is redone), ``config.json`` written and the earlier summary and plots removed."""
    args, d = run.args, run.d
    run.config = training_config(args)
    found = load_checkpoint(run.out_dir) if args.resume else None
    if found is not None:
        ckpt, path = found
        saved = training_config(build_parser().parse_args([])) | ckpt["config"]  # options added since: defaults
        diff = {k: (saved.get(k), v) for k, v in run.config.items() if saved.get(k) != v}
        if "queue_size" in diff:
            raise ConfigError(f"--resume: {path} was written with --queue-size {saved['queue_size']}, this run has "
                              f"--queue-size {args.queue_size}: a run cannot change its queue; use --queue-size "
                              f"{saved['queue_size']} or another --out")
        if diff:
            raise ConfigError(f"--resume: {path} was written with different training arguments "
                              f"(checkpoint, now): {diff}; use the same arguments or another --out")
        n_train = len(run.splits.train)
        if ckpt.get("train_size", n_train) != n_train:  # the data, not the arguments, changed
            raise ConfigError(f"--resume: the training set has {n_train} images, {path} was written with "
                              f"{ckpt['train_size']}: the data changed since; restore it, or start over with "
                              f"--overwrite or another --out")
        run.model.load_state_dict(ckpt["model"])
        _restore_queue(run, ckpt, path)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        rngs = ckpt["rng"]
        rng_restore(rngs[d.rank] if d.rank < len(rngs) else rngs[0], d.device, run.generators)
        run.epoch, run.epoch_step, run.global_step = ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]
        run.train_time, run.epoch_loss_sum = ckpt["train_time_s"], ckpt.get("epoch_loss_sum", 0.0)
        run.resumed = True
        _log(d, f"resumed from {path}: {run.epoch}/{args.epochs} epochs done"
                f"{f' and {run.epoch_step} steps of the next' if run.epoch_step else ''}, step {run.global_step}")
        del ckpt
    elif args.resume:
        _log(d, f"--resume: no checkpoint in {run.out_dir} yet, starting from scratch")
    if d.main:
        kept = [r for r in read_metrics(run.path(METRICS))
                if run.resumed and r.get("type") in ("step", "epoch", "probe")
                and r.get("step", 1e18) <= run.global_step]
        atomic_write(run.path(METRICS), lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        atomic_json(run.path(CONFIG), vars(args) | {"world_size": d.world_size})
        for name in (SUMMARY, "loss.png", "probe.png"):  # they described the run before this one's end
            with contextlib.suppress(FileNotFoundError):
                os.remove(run.path(name))
        run.metrics_file = open(run.path(METRICS), "a")


def _restore_queue(run: Run, ckpt: dict[str, Any], path: str) -> None:
    """The key model and the queue of a ``--queue-size`` checkpoint (the config check has matched the sizes)."""
    if run.queue is None:
        return
    missing = [k for k in ("key_model", "queue") if k not in ckpt]
    if missing:
        raise ConfigError(f"--resume: {path} has no {' or '.join(missing)} state although it was written with "
                          f"--queue-size {run.args.queue_size}: start over with --overwrite")
    run.key_model.load_state_dict(ckpt["key_model"])
    run.queue.load_state_dict(ckpt["queue"])


def _keys(run: Run, images: Tensor, p2: Tensor) -> Tensor:
    """The key model's embeddings of view 2 (no gradients), per micro-batch, float32 and L2-normalised."""
    out = []
    with torch.no_grad():
        for s, e in micro_batches(run.local_batch, run.micro):
            with autocast(run.d.device, run.amp):
                _, z = run.key_model(run.aug.apply(images[s:e], p2[s:e]))
            out.append(normalized_keys(z))
    return torch.cat(out)


def _moco_step(run: Run, images: Tensor, labels: Tensor, p1: Tensor, p2: Tensor) -> Tensor:
    """The backward of a ``--queue-size`` step: queries of view 1 against keys of view 2 and the queue."""
    args = run.args
    keys = _keys(run, images, p2)

    def encode(s: int, e: int) -> Tensor:
        with autocast(run.d.device, run.amp):
            _, z = run.net(run.aug.apply(images[s:e], p1[s:e]))
        return z.float()

    run.optimizer.zero_grad(set_to_none=True)
    loss = cached_backward(encode, run.local_batch, run.micro,
                           lambda q: moco_loss(run.criterion, args.loss, q, keys, labels, run.queue,
                                               not args.queue_negatives_only),
                           model=run.model, no_sync=run.net.no_sync if run.d.enabled else None)
    run.optimizer.step()
    run.scheduler.step()
    ema_update(run.key_model, run.model, args.key_momentum)
    run.queue.enqueue(keys, labels if run.queue.keeps_labels else None)
    return loss


def train_step(run: Run, images: Tensor, labels: Tensor) -> float:
    """One optimisation step on this rank's rows of a global batch; returns the (global) loss."""
    args, device = run.args, run.d.device
    lo, hi = run.d.rank * run.local_batch, (run.d.rank + 1) * run.local_batch
    p1 = run.aug.sample(args.batch_size, run.generators["augment"])[lo:hi].to(device)
    p2 = run.aug.sample(args.batch_size, run.generators["augment"])[lo:hi].to(device)
    if run.queue is not None:
        return _finite(run, _moco_step(run, images, labels, p1, p2))

    def encode(s: int, e: int) -> Tensor:
        x = images[s:e]
        views = torch.cat([run.aug.apply(x, p1[s:e]), run.aug.apply(x, p2[s:e])])
        with autocast(device, run.amp):
            _, z = run.net(views)
        z = z.float()
        return torch.stack([z[: e - s], z[e - s:]], dim=1)  # [m, 2, D]

    run.optimizer.zero_grad(set_to_none=True)
    loss = cached_backward(encode, run.local_batch, run.micro, lambda z: loss_on(run.criterion, args.loss, z, labels),
                           model=run.model, no_sync=run.net.no_sync if run.d.enabled else None)
    run.optimizer.step()
    run.scheduler.step()
    return _finite(run, loss)


def _finite(run: Run, loss: Tensor) -> float:
    """The loss averaged over the ranks, as a number; a non-finite one stops the run."""
    args = run.args
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
    rngs = gather_objects(rng_snapshot(run.d.device, run.generators), run.d)
    if run.d.main:
        save_checkpoint(run.path(CHECKPOINT), {
            "version": CHECKPOINT_VERSION, "epoch": run.epoch, "epoch_step": run.epoch_step,
            "step": run.global_step, "epoch_loss_sum": run.epoch_loss_sum, "train_time_s": run.train_time,
            "train_size": len(run.splits.train),
            "model": run.model.state_dict(), **_queue_state(run), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": rngs, "config": run.config,
            "fastcl": str(fastcl.__version__), "torch": str(torch.__version__),
        })
    run.d.barrier()


def _queue_state(run: Run) -> dict[str, Any]:
    if run.queue is None:
        return {}
    return {"key_model": run.key_model.state_dict(), "queue": run.queue.state_dict()}


def crash_after_steps() -> int:
    """The step after which the test hook kills the process (``FASTCL_TEST_CRASH_AFTER_STEPS``; 0: never)."""
    text = os.environ.get(CRASH_AFTER_STEPS_ENV, "").strip() or "0"
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise ConfigError(f"{CRASH_AFTER_STEPS_ENV} must be a whole number >= 0, got {text!r}")
    return steps


def _epoch_batches(run: Run, epoch: int):
    """The batches of ``epoch`` from its current step; an image that cannot be read (``--stream`` decodes while
    training) stops the run with :class:`RunError`, the last checkpoint kept."""
    try:
        yield from run.batches.epoch(epoch, run.epoch_step)
    except UnreadableImageError as e:
        raise RunError(f"{e}: replace or remove that file, then rerun with --resume (the last checkpoint, if any, "
                       f"is kept)") from None


def train(run: Run) -> None:
    """Stage 5: the remaining epochs; a checkpoint after each one (and every ``--checkpoint-every`` steps)."""
    args, d = run.args, run.d
    probe_every = args.probe_every if args.probe_every >= 0 else max(1, args.epochs // 5)
    remaining = (args.epochs - run.epoch) * run.steps_per_epoch - run.epoch_step
    bar = ProgressBar(remaining, enabled=d.main and not args.quiet)
    crash_after = crash_after_steps()
    for epoch in range(run.epoch, args.epochs):
        run.net.train()
        if run.key_model is not None:
            run.key_model.train()  # BatchNorm on batch statistics, as the model's
        epoch_start = last = time.perf_counter()
        for images, labels in _epoch_batches(run, epoch):
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
            if crash_after and run.global_step >= crash_after:
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
                acc = {"error": describe_error(e)}
            run.log_record({"type": "probe", "epoch": run.epoch, "step": run.global_step, **acc})
        write_checkpoint(run)
