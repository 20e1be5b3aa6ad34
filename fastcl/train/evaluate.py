"""The evaluation of a trained run: embedding the splits, the probes of h and z, and the summary.

Stage 6 (:func:`evaluate_run`) and stage 7 (:func:`report`) of :func:`fastcl.train.pretrain.main`; :func:`embed`
also serves ``fastcl-shortcuts``, :func:`quick_probe` the probes during training.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

import fastcl
from fastcl.evaluation.probes import group_balanced_linear_probe, linear_probe
from fastcl.evaluation.shortcut_metrics import group_ids, multi_shortcut_metrics
from fastcl.models.contrastive import ContrastiveModel
from fastcl.train.augment import BatchAugment
from fastcl.train.checkpoint import CHECKPOINT, METRICS, SUMMARY, atomic_json, read_metrics
from fastcl.train.data import DatasetSplits
from fastcl.train.data.loader import iter_image_batches
from fastcl.train.runtime import autocast, device_name, peak_memory_mb, torch_threads

if TYPE_CHECKING:
    from fastcl.train.stages import Run

__all__ = ["LAYERS", "ROBUST_KEYS", "describe_error", "embed", "evaluate", "evaluate_run", "quick_probe", "report"]

ROBUST_KEYS = ("id_acc", "bg_gap", "coobj_gap", "both_gap", "worst_group_acc",
                "acc_aligned", "acc_bg_conflict", "acc_coobj_conflict", "acc_both_conflict")
LAYERS = ("pre_projection", "post_projection")


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
            with autocast(device, amp):
                h, z = model(x)
            hs.append(h.float().cpu())
            zs.append(z.float().cpu())
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    if not hs:
        raise ValueError("no images to embed")
    return torch.cat(hs), torch.cat(zs)


def _cap(n: int, limit: int, seed: int) -> Tensor:
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def describe_error(e: BaseException) -> str:
    """``'Type: first line of the message'``, as ``not_evaluated`` records a failure."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def evaluate(model: ContrastiveModel, splits: DatasetSplits, aug: BatchAugment, device: torch.device,
             args: argparse.Namespace, amp: bool) -> dict[str, Any]:
    """Linear probe (train -> test) and, with cue annotations, DFR + UrbanCars metrics, on h and on z.

    Each part that fails is left out and listed in ``not_evaluated`` (``{"what", "why"}``) instead of
    stopping the others; parameters that are not finite (a diverged run) skip everything."""
    out: dict[str, Any] = {"linear_probe": {}, "not_evaluated": []}

    def skip(what: str, e: BaseException | str) -> None:
        out["not_evaluated"].append({"what": what, "why": e if isinstance(e, str) else describe_error(e)})

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
    for i, layer in enumerate(LAYERS):
        if "train" in feats and "test" in feats:
            try:
                with torch_threads(1):
                    lp = linear_probe(feats["train"][i], tr.labels, feats["test"][i], test.labels, num_classes=k,
                                      weight_decay=args.probe_weight_decay)
                entry: dict[str, Any] = {"accuracy": lp.test_acc, "train_accuracy": lp.train_acc}
                if test.has_groups:  # the ERM probe (fitted on cue-biased training data) under the same metrics
                    m = multi_shortcut_metrics(lp.test_pred, test.labels, test.bg_aligned, test.coobj_aligned,
                                               train_ratio=splits.cue_agreement or 0.95)
                    entry["shortcut_metrics"] = {key: m[key] for key in ROBUST_KEYS}
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
            with torch_threads(1):
                dfr = group_balanced_linear_probe(feats["val"][i], val.labels, groups, feats["test"][i],
                                                  test.labels, num_repeats=args.dfr_repeats, seed=args.seed,
                                                  num_classes=k, weight_decay=args.dfr_weight_decay)
            m = multi_shortcut_metrics(dfr.test_pred, test.labels, test.bg_aligned, test.coobj_aligned,
                                       train_ratio=splits.cue_agreement or 0.95)
            out["robustness"][layer] = {**{key: m[key] for key in ROBUST_KEYS}, "test_accuracy": dfr.test_acc}
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
    with torch_threads(1):
        return {layer: linear_probe(ftr[i], tr.labels, fte[i], te.labels, num_classes=splits.num_classes,
                                    weight_decay=args.probe_weight_decay, max_iter=100).test_acc
                for i, layer in enumerate(LAYERS)}


def evaluate_run(run: Run) -> dict[str, Any]:
    """Stage 6 (rank 0): :func:`evaluate`, every failure recorded in ``not_evaluated``."""
    if not run.args.quiet:
        print(f"training done ({run.train_time:.0f}s); evaluating h and z ...", file=sys.stderr, flush=True)
    t_eval = time.perf_counter()
    try:
        results = evaluate(run.model, run.splits, run.aug, run.d.device, run.args, run.amp)
    except Exception as e:
        results = {"linear_probe": {}, "not_evaluated": [{"what": "everything", "why": describe_error(e)}]}
    results["eval_time_s"] = round(time.perf_counter() - t_eval, 2)
    return results


def report(run: Run, results: dict[str, Any], training_error: str | None = None) -> None:
    """Stage 7 (rank 0): ``summary.json`` (also when training or evaluation failed: it says what was not
    evaluated and why), the plots and the printed summary."""
    args, d = run.args, run.d
    records = read_metrics(run.path(METRICS))
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
        "device": device_name(d.device),
        "world_size": d.world_size,
        "wall_time_s": round(time.perf_counter() - run.wall_start, 2),
        "train_time_s": round(run.train_time, 2),
        "resumed": run.resumed,
        "checkpoint": run.path(CHECKPOINT) if os.path.exists(run.path(CHECKPOINT)) else None,
        "peak_memory": peak_memory_mb(d.device),
    }
    if not args.no_plots and training_error is None:
        try:
            from fastcl.train import plots

            title = f"{args.dataset}, {args.loss}, head={args.head}, seed {args.seed}"
            if plots.plot_loss(records, run.path("loss.png"), title=title):
                plots.plot_probe(records, summary, run.path("probe.png"), title=title)
        except Exception as e:
            summary["not_evaluated"].append({"what": "plots", "why": describe_error(e)})
    atomic_json(run.path(SUMMARY), summary)
    print_summary(summary, run.out_dir)


def print_summary(summary: dict[str, Any], out_dir: str) -> None:
    """The probe results of ``summary`` and what was not evaluated, on stdout."""
    lp = summary.get("linear_probe", {})
    if lp:
        print("linear probe accuracy: " + ", ".join(
            f"{name} {lp[layer]['accuracy']:.4f}" for layer, name in zip(LAYERS, ("pre-projection h",
                                                                                 "post-projection z"))
            if layer in lp))
    rob = summary.get("robustness")
    if rob:
        print("DFR (group-balanced last layer) on the cue-balanced test set:")
        print(f"  {'':16s}" + "".join(f"{k:>16s}" for k in ROBUST_KEYS[:5]))
        for layer in LAYERS:
            if layer in rob:
                print(f"  {layer:16s}" + "".join(f"{rob[layer][k]:16.4f}" for k in ROBUST_KEYS[:5]))
    for item in summary.get("not_evaluated", []):
        print(f"not evaluated: {item['what']}: {item['why']}")
    print(f"wall time {summary['wall_time_s']:.0f}s; results in {os.path.join(out_dir, SUMMARY)}")
