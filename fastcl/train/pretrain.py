"""Contrastive pretraining with fastcl's fused losses, then probes of the pre- and post-projection features.

    fastcl-pretrain                                   # default experiment: spurious-cues, SupCon, MLP head, CPU
    python -m fastcl.train.pretrain --head fixed --seed 1 --out runs/fixed-s1
    fastcl-pretrain --batch-size 4096 --micro-batch-size 512 ...        # GradCache: big batches, small memory
    fastcl-pretrain --dataset folder --data-dir ~/imagenet --stream --workers 8 ...   # larger than memory
    torchrun --nproc_per_node=8 -m fastcl.train.pretrain --dataset cifar10 --data-dir ~/data --encoder resnet18 ...

The question of the default experiment (after Xue et al., ICLR 2024 and Li et al., CVPR 2023): after
contrastive pretraining with a projection head on images whose background and co-occurring object agree with
the class 95% of the time, is the representation before the head (h) more robust to those spurious cues than
the one after it (z)? At the end both are probed: a linear probe trained on the (cue-biased) training set, and
last-layer retraining on a small group-balanced held-out set (DFR) evaluated with the UrbanCars metrics on
the cue-balanced test set. Everything lands in ``OUT/``: ``summary.json``, ``metrics.jsonl`` (one record per
step, epoch and probe), ``checkpoint.pt`` (every epoch; the one before it is kept as ``checkpoint.prev.pt``),
``config.json``, ``loss.png`` and ``probe.png``.

A run reads top to bottom as stages (:func:`_run`): prepare the output directory, load the data, build the
model, restore a checkpoint, train (steps, checkpoints) (:mod:`fastcl.train.stages`), evaluate, report
(:mod:`fastcl.train.evaluate`). The arguments are parsed and checked in :mod:`fastcl.train.cli`; the files of the
run directory are written by :mod:`fastcl.train.checkpoint`; processes, device and threads are set up by
:mod:`fastcl.train.runtime`.

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
* ``--queue-size K --key-momentum m``: MoCo v2 (:mod:`fastcl.train.moco`): a momentum copy of the model embeds
  the second view into keys, the model the first into queries; the loss adds a queue of the last ``K`` keys (and
  labels: SupCon positives) as contrast columns; after each step the EMA update, then the keys are enqueued (all
  ranks' under ``torchrun``). The key model and the queue are in the checkpoint.
* ``--stream``: ``folder`` / ``urbancars`` images decoded in ``DataLoader`` workers (:mod:`fastcl.train.data.loader`)
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
import gc
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from fastcl.train.checkpoint import CHECKPOINT, SUMMARY
from fastcl.train.cli import build_parser, check_args
from fastcl.train.data import DatasetNotFoundError, MissingDependencyError
from fastcl.train.errors import ConfigError, RunError
from fastcl.train.evaluate import evaluate_run, report
from fastcl.train.runtime import Dist, setup_distributed
from fastcl.train.stages import build_training, load_data, prepare_output, restore_checkpoint, train

__all__ = ["main"]


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
    reported in one line; 130 after Ctrl-C). argparse's own errors raise ``SystemExit(2)``."""
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
    except KeyboardInterrupt:
        if d.main:
            print(f"{parser.prog}: interrupted; the last checkpoint ({os.path.join(args.out, CHECKPOINT)}, if any) "
                  f"stays: rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
        if d.enabled and dist.is_initialized():
            # the run's DDP model and graphs hold the group: collect them first, so its gloo worker threads finish
            # while Python still runs (one that drops the last reference to a tensor during interpreter shutdown
            # aborts the process; see fastcl/examples/ddp_supcon.py)
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
