"""The Whac-A-Mole study: single-shortcut fixes, their mixture and Last Layer Ensemble, on h and z, frozen and
end to end.

    fastcl-shortcuts --finetune --out runs/shortcuts               # pretrains the default model (watermark cue on)
    fastcl-shortcuts --checkpoint runs/pretrain/checkpoint.pt --out runs/shortcuts-ckpt   # frozen study only
    python -m fastcl.train.shortcuts --pretrain-args "--head fixed" --seed 1 --finetune --out runs/shortcuts-fixed-s1
    fastcl-shortcuts --aggregate runs/shortcuts-s0 runs/shortcuts-s1 runs/shortcuts-s2 --out runs/shortcuts-mean

Li et al. ("A Whac-A-Mole Dilemma", CVPR 2023) show that removing one shortcut (e.g. with background augmentation)
can amplify the reliance on another, and propose Last Layer Ensemble (LLE): one linear head per distribution shift
(the original data and each augmentation that breaks one shortcut) and a shift predictor whose probabilities weight
the heads at test time. This command asks which representation of a contrastive model, the encoder output ``h`` or
the projection-head output ``z`` (Xue et al., ICLR 2024), gives these methods the most to work with.

It takes a ``fastcl-pretrain`` checkpoint of the ``spurious-cues`` data (without ``--checkpoint`` it first trains the
default job with the watermark cue on, ``--watermark 0.9``, into ``OUT/pretrain``, or reuses a finished one there)
and regenerates the data with the generator's layers. The shifts of the training set
(:mod:`fastcl.train.shortcut_augment`) are those of the paper's UrbanCars protocol: the original images (shift 0),
background swapped (1) and co-object swapped (2; or removed). A swap always changes the cue (with two classes: to
the other class, so the cue conflicts with the label wherever it agreed, the rate of the paper's cue taken from an
image of the other class); no shifted image equals its source. The 4-shift extension adds ImageNet-W's watermark
augmentation: a random watermark (random glyphs, size, height and opacity) on every image, on top of the dataset's
own. The methods (:data:`METHOD_SETS`):

* ``erm``: the original data;
* ``bg_aug``, ``coobj_aug`` (``wm_aug``): the original data and one shifted copy (the single-shortcut baselines);
* ``mixed`` (``mixed_wm``): one last layer on the 3 (4) sets together;
* ``lle`` (``lle_wm``): one head per set and the shift predictor, on the same 3 (4) sets.

Two studies run on ``h`` and on ``z``:

* ``frozen`` (the paper's ImageNet protocol): the backbone frozen, the last layers fitted by deterministic
  full-batch L-BFGS on standardised features (:func:`fastcl.evaluation.linear_probe`,
  :func:`fastcl.evaluation.fit_last_layer_ensemble`), fixed ``--weight-decay``;
* ``finetune`` (``--finetune``, the paper's UrbanCars protocol): the backbone trained end to end with the last layer
  (:mod:`fastcl.train.shortcut_finetune`: SGD, CE, + shift CE with weight 1 for LLE), the (epoch, weight decay) with
  the best worst-group accuracy on the cue-balanced validation split selected; the test split is never used to select.

Each is scored on the cue-balanced test set with the UrbanCars metrics
(:func:`fastcl.evaluation.multi_shortcut_metrics`: I.D. accuracy, BG / CoObj / BG+CoObj gaps, worst-group accuracy over
the (class, BG, CoObj) cells) and on the same test set with the dataset's watermark on every image
(:func:`fastcl.evaluation.watermark_metrics`: accuracy gap and the share of predictions moved to the watermark's
class). LLE's shift predictor is also scored on held-out images of the training distribution (a fresh draw of the
training split) under every shift (``shift_heldout_acc``, per shift ``shift_acc_<shift>``), and its mean weights on
the test set are recorded overall and per cue group (``test_shift_weights``, ``test_shift_weights_by_group``).
``OUT/`` gets ``summary.json``, ``metrics.jsonl`` (one record per study, method and representation), ``gaps.svg`` /
``gaps-finetune.svg`` (gaps per method, h next to z) and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import fastcl
from fastcl.evaluation.lle import fit_last_layer_ensemble
from fastcl.evaluation.probes import linear_probe
from fastcl.evaluation.shortcut_metrics import multi_shortcut_metrics, watermark_metrics
from fastcl.train.augment import BatchAugment
from fastcl.train.checkpoint import (
    CHECKPOINT,
    NON_FINITE_JSON,
    SUMMARY,
    CheckpointError,
    atomic_json,
    read_checkpoint,
)
from fastcl.train.cli import build_parser as build_pretrain_parser
from fastcl.train.data import CueLayers, ImageSet, make_spurious_cues
from fastcl.train.evaluate import embed
from fastcl.train.factory import build_model
from fastcl.train.pretrain import main as pretrain_main
from fastcl.train.runtime import resolve_device, torch_threads
from fastcl.train.shortcut_augment import (
    insert_random_watermark,
    insert_watermark,
    remove_coobj,
    sample_cue_swap,
    sample_watermark,
    swap_background,
    swap_coobj,
)
from fastcl.train.shortcut_finetune import FinetuneConfig, finetune, predict, predict_shift

__all__ = ["EXTENSION_METHODS", "METHODS", "METHOD_SETS", "SHIFTS", "STUDIES", "REPRESENTATIONS", "METRIC_KEYS",
           "aggregate", "build_parser", "main", "run_study"]

# UrbanCars' protocol: the original data and its two shifts; the watermark is the 4-shift extension
SHIFTS = ("original", "bg", "coobj")
EXTENSION_SHIFTS = SHIFTS + ("wm",)
METHODS = ("erm", "bg_aug", "coobj_aug", "mixed", "lle")
EXTENSION_METHODS = ("wm_aug", "mixed_wm", "lle_wm")
# the training sets of every method (an augmentation method trains on the original data and its shifted copy)
METHOD_SETS = {"erm": ("original",), "bg_aug": ("original", "bg"), "coobj_aug": ("original", "coobj"),
               "mixed": SHIFTS, "lle": SHIFTS, "wm_aug": ("original", "wm"), "mixed_wm": EXTENSION_SHIFTS,
               "lle_wm": EXTENSION_SHIFTS}
STUDIES = ("frozen", "finetune")
REPRESENTATIONS = ("pre_projection", "post_projection")
METRIC_KEYS = ("id_acc", "bg_gap", "coobj_gap", "both_gap", "worst_group_acc", "wm_gap", "wm_shift")
_GROUP_KEYS = ("acc_aligned", "acc_bg_conflict", "acc_coobj_conflict", "acc_both_conflict")
_LABELS = {"id_acc": "I.D. acc", "bg_gap": "BG gap", "coobj_gap": "CoObj gap", "both_gap": "BG+CoObj gap",
           "worst_group_acc": "worst-group", "wm_gap": "WM gap", "wm_shift": "WM shift",
           "shift_heldout_acc": "shift acc (held-out)"}
_REP_SHORT = {"pre_projection": "h", "post_projection": "z"}
_STUDY_TITLE = {"frozen": "frozen backbone (ImageNet protocol: last layers on frozen features, L-BFGS)",
                "finetune": "end to end (UrbanCars protocol: backbone + last layer, SGD, selection on val "
                            "worst-group)"}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastcl-shortcuts",
        description="Whac-A-Mole on a contrastive model: ERM, single-shortcut augmentations, their mixture and Last "
                    "Layer Ensemble on the pre-projection h and the post-projection z, with the backbone frozen and "
                    "(--finetune) trained end to end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", default=None,
                   help="fastcl-pretrain checkpoint.pt of the spurious-cues data (default: train the default job "
                        "with --watermark 0.9 into OUT/pretrain first)")
    p.add_argument("--out", default="runs/shortcuts", help="output directory")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the augmentation draws, and of the pretraining when there is no --checkpoint")
    p.add_argument("--pretrain-args", default="",
                   help="extra fastcl-pretrain arguments for the pretraining without --checkpoint, e.g. "
                        "'--head fixed' or '--epochs 2 --train-samples 256'")
    p.add_argument("--coobj-aug", default="swap", choices=["swap", "remove"],
                   help="co-object augmentation: another class's co-object, or none")
    p.add_argument("--head-train-samples", type=int, default=0,
                   help="training images the heads are fitted on (0: the whole training split)")
    p.add_argument("--test-samples", type=int, default=0,
                   help="test images (0: the checkpoint's --test-samples)")
    p.add_argument("--weight-decay", type=float, default=1e-3,
                   help="frozen study: L2 penalty of every head (standardised features)")
    p.add_argument("--max-iter", type=int, default=1000, help="frozen study: L-BFGS iterations per fit")
    p.add_argument("--finetune", action="store_true",
                   help="also run the end-to-end study (UrbanCars protocol): backbone + last layer trained with SGD, "
                        "selected on the validation split's worst-group accuracy")
    p.add_argument("--ft-epochs", type=int, default=5, help="end-to-end: epochs (each draws the training set's size)")
    p.add_argument("--ft-lr", type=float, default=0.01, help="end-to-end: SGD learning rate (constant)")
    p.add_argument("--ft-batch-size", type=int, default=128, help="end-to-end: batch size")
    p.add_argument("--ft-weight-decays", default="1e-4,1e-3",
                   help="end-to-end: comma-separated weight decays, selected on validation with the epoch")
    p.add_argument("--val-samples", type=int, default=0,
                   help="validation images for the end-to-end selection and the held-out shift accuracy "
                        "(0: the checkpoint's --val-samples)")
    p.add_argument("--no-extension", action="store_true",
                   help="skip the 4-shift watermark extension (wm_aug, mixed_wm, lle_wm)")
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--aggregate", nargs="+", metavar="RUN_DIR", default=None,
                   help="instead of a study: mean and standard deviation over the summary.json of these runs, "
                        "written to OUT/summary.json, OUT/table.md and OUT/gaps.svg")
    p.add_argument("--quiet", action="store_true")
    return p


def _log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("head_train_samples", "test_samples", "val_samples"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("max_iter", "eval_batch_size", "ft_epochs", "ft_batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error("--weight-decay must be a finite number >= 0")
    try:
        args.ft_weight_decays = tuple(float(v) for v in args.ft_weight_decays.split(","))
        FinetuneConfig(args.ft_epochs, args.ft_lr, batch_size=args.ft_batch_size,
                       weight_decays=args.ft_weight_decays, eval_batch_size=args.eval_batch_size)
    except ValueError as e:
        parser.error(f"end-to-end options: {e}")
    os.makedirs(args.out, exist_ok=True)
    if args.aggregate:
        summaries = []
        for run in args.aggregate:
            path = run if run.endswith(".json") else os.path.join(run, "summary.json")
            if not os.path.isfile(path):
                parser.error(f"--aggregate: no summary.json in {run!r}")
            with open(path) as f:
                summaries.append(json.load(f))
        agg = aggregate(summaries)
        agg["runs"] = [os.path.abspath(r) for r in args.aggregate]
        _write_outputs(args.out, agg, [], f"mean ± sd over {len(summaries)} runs")
        print(table_markdown(agg))
        return 0
    try:
        with torch_threads(args.threads if args.threads > 0 else torch.get_num_threads()):
            summary = run_study(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"fastcl-shortcuts: error: {e}", file=sys.stderr)
        return 2
    print(table_markdown(summary))
    print(f"results in {os.path.join(args.out, 'summary.json')}")
    return 0


# --------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------


def _pretrain(args: argparse.Namespace) -> str:
    out = os.path.join(args.out, "pretrain")
    ckpt = os.path.join(out, CHECKPOINT)
    if os.path.isfile(os.path.join(out, SUMMARY)) and os.path.isfile(ckpt):
        _log(args, f"fastcl-shortcuts: reusing the finished pretraining in {out} (delete it to train again)")
        return ckpt
    argv = ["--watermark", "0.9", "--seed", str(args.seed), "--out", out, "--no-plots", "--device", args.device]
    argv += shlex.split(args.pretrain_args)
    if args.quiet:
        argv.append("--quiet")
    _log(args, f"fastcl-shortcuts: no --checkpoint, pretraining first: fastcl-pretrain {shlex.join(argv)}")
    rc = pretrain_main(argv)
    if rc:
        raise ValueError(f"the pretraining failed (exit status {rc})")
    return ckpt


def load_frozen_model(path: str, device: torch.device) -> tuple[torch.nn.Module, argparse.Namespace]:
    """The frozen model (eval mode, no gradients) and the pretraining arguments of a ``fastcl-pretrain``
    checkpoint (read with :func:`fastcl.train.checkpoint.read_checkpoint`: a file it cannot use raises
    :class:`~fastcl.train.checkpoint.CheckpointError`)."""
    ckpt = read_checkpoint(path)
    cfg = build_pretrain_parser().parse_args([])
    for k, v in ckpt["config"].items():
        setattr(cfg, k, tuple(v) if isinstance(v, list) else v)
    if cfg.dataset != "spurious-cues":
        raise ValueError(f"the study needs the spurious-cues data (its generator's layers make the shortcut "
                         f"augmentations exact); {path!r} was trained on {cfg.dataset!r}")
    model = build_model(cfg, 3)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval().requires_grad_(False)
    return model, cfg


def _shifted_sets(train: ImageSet, layers: CueLayers, classes: int, coobj_aug: str, opacity: float,
                  seed: int) -> dict[str, ImageSet]:
    """The original set and its three shifts: background swapped, co-object swapped (or removed) and a random
    watermark. The swapped cue always changes (:func:`sample_cue_swap`) and every image gets a new watermark, so no
    shifted image equals its source."""
    g = torch.Generator().manual_seed(seed)
    bg, _ = swap_background(train, layers, sample_cue_swap(train.bg, classes, g), watermark_opacity=opacity)
    if coobj_aug == "swap":
        co, _ = swap_coobj(train, layers, sample_cue_swap(train.coobj, classes, g), watermark_opacity=opacity)
    else:
        co, _ = remove_coobj(train, layers, watermark_opacity=opacity)
    wm = insert_random_watermark(train, sample_watermark(len(train), g))
    return {"original": train, "bg": bg, "coobj": co, "wm": wm}


def _score(logits_clean: Tensor, logits_marked: Tensor, test: ImageSet, train_ratio: float,
           watermark_class: int) -> dict[str, float]:
    m = multi_shortcut_metrics(logits_clean, test.labels, test.bg_aligned, test.coobj_aligned, train_ratio,
                               bg=test.bg, coobj=test.coobj)
    w = watermark_metrics(logits_clean, logits_marked, test.labels, watermark_class)
    out = {k: m[k] for k in METRIC_KEYS if k in m} | {k: w[k] for k in ("wm_gap", "wm_shift")}
    out |= {k: m[k] for k in _GROUP_KEYS} | {"test_acc": w["wm_clean_acc"], "wm_acc": w["wm_acc"]}
    return out


def _shift_accuracy(shift_logits: dict[str, Tensor], shifts: Sequence[str]) -> dict[str, float]:
    """Held-out shift-prediction accuracy of an LLE shift predictor: overall and per shift (``shift_acc_<s>``),
    from its logits on every shift of held-out training-distribution images."""
    correct = {s: shift_logits[s].argmax(1) == i for i, s in enumerate(shifts)}
    out = {"shift_heldout_acc": float(torch.cat(list(correct.values())).double().mean())}
    return out | {f"shift_acc_{s}": float(c.double().mean()) for s, c in correct.items()}


def _test_shift_weights(shift_logits: Tensor, test: ImageSet, shifts: Sequence[str]) -> dict[str, Any]:
    """Mean shift probabilities of the LLE shift predictor on the test set, overall and per cue group."""
    w = shift_logits.softmax(1)
    by_group = {}
    for key, bg_al, co_al in (("aligned", True, True), ("bg_conflict", False, True), ("coobj_conflict", True, False),
                              ("both_conflict", False, False)):
        mask = (test.bg_aligned == bg_al) & (test.coobj_aligned == co_al)
        by_group[key] = dict(zip(shifts, w[mask].mean(0).tolist()))
    return {"test_shift_weights": dict(zip(shifts, w.mean(0).tolist())), "test_shift_weights_by_group": by_group}


def _methods(args: argparse.Namespace) -> tuple[str, ...]:
    return METHODS if args.no_extension else METHODS + EXTENSION_METHODS


def fit_and_score(feats: dict[str, Tensor], labels: dict[str, Tensor], test_clean: Tensor, test_marked: Tensor,
                  test: ImageSet, num_classes: int, train_ratio: float, watermark_class: int,
                  weight_decay: float, max_iter: int, heldout_feats: dict[str, Tensor] | None = None,
                  methods: Sequence[str] = METHODS + EXTENSION_METHODS) -> dict[str, dict[str, Any]]:
    """Frozen study: fit ``methods`` (:data:`METHOD_SETS`) on the features of the shifted training sets
    (``feats[shift] [N_s, D]``, ``labels[shift] [N_s]``) and score them on the clean and watermarked test features;
    LLE's shift predictor is also scored on ``heldout_feats[shift]`` (held-out images under every shift)."""
    out: dict[str, dict[str, Any]] = {}
    kw = dict(num_classes=num_classes, weight_decay=weight_decay, max_iter=max_iter)
    with torch_threads(1):  # small full-batch fits: on a shared CPU more threads cost more than they save
        for method in methods:
            t0 = time.perf_counter()
            shifts = METHOD_SETS[method]
            x = torch.cat([feats[s] for s in shifts])
            y = torch.cat([labels[s] for s in shifts])
            if method.startswith("lle"):
                shift = torch.cat([torch.full((len(labels[s]),), i, dtype=torch.long) for i, s in enumerate(shifts)])
                ens = fit_last_layer_ensemble(x, y, shift, len(shifts), **kw)
                with torch.no_grad():
                    logits, shift_logits = ens.forward_all(x)
                    extra = {"train_acc": float((ens.combine(logits, shift_logits).argmax(1) == y).double().mean()),
                             "shift_train_acc": float((shift_logits.argmax(1) == shift).double().mean())}
                    clean, marked = ens(test_clean), ens(test_marked)
                    extra |= _test_shift_weights(ens.forward_all(test_clean)[1], test, shifts)
                    if heldout_feats is not None:
                        extra |= _shift_accuracy({s: ens.forward_all(heldout_feats[s])[1] for s in shifts}, shifts)
            else:
                lp = linear_probe(x, y, test_clean, test.labels, **kw)
                clean, marked = lp.logits(test_clean), lp.logits(test_marked)
                extra = {"train_acc": lp.train_acc}
            out[method] = {**_score(clean, marked, test, train_ratio, watermark_class), **extra,
                           "fit_time_s": round(time.perf_counter() - t0, 3), "train_samples": len(y)}
    return out


def finetune_and_score(model: torch.nn.Module, rep: str, sets: dict[str, ImageSet], val: ImageSet,
                       heldout_sets: dict[str, ImageSet], test: ImageSet, test_marked: ImageSet, num_classes: int,
                       train_ratio: float, watermark_class: int, config: FinetuneConfig, seed: int,
                       methods: Sequence[str], log: Any = None,
                       device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """End-to-end study: fine-tune the backbone up to ``rep`` with each method's last layer on its sets
    (:func:`fastcl.train.shortcut_finetune.finetune`, selected on ``val``), then score the selected model on the
    test set, clean and watermarked; LLE's shift predictor is scored on ``heldout_sets``."""
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        t0 = time.perf_counter()
        shifts = METHOD_SETS[method]
        if log:
            log(f"end to end: {method} on {_REP_SHORT[rep]} ({' + '.join(shifts)})")
        clf, record = finetune(model, rep, [sets[s] for s in shifts], val, num_classes, train_ratio, config,
                               lle=method.startswith("lle"), seed=seed, log=log, device=device)
        clean = predict(clf, test.images, config.eval_batch_size)
        marked = predict(clf, test_marked.images, config.eval_batch_size)
        extra: dict[str, Any] = {}
        if clf.lle:
            logits = {s: predict_shift(clf, heldout_sets[s].images, config.eval_batch_size) for s in shifts}
            extra = _shift_accuracy(logits, shifts)
            extra |= _test_shift_weights(predict_shift(clf, test.images, config.eval_batch_size), test, shifts)
        out[method] = {**_score(clean, marked, test, train_ratio, watermark_class), **extra, **record,
                       "fit_time_s": round(time.perf_counter() - t0, 3),
                       "train_samples": sum(len(sets[s]) for s in shifts)}
    return out


def _study_data(args: argparse.Namespace, cfg: argparse.Namespace) -> dict[str, Any]:
    """The training set and its shifts; held-out images of the training distribution (a fresh draw of the training
    split, as many as the validation split) and their shifts, for the shift predictor's accuracy; the validation
    split; the test split clean and with the dataset's watermark on every image."""
    wm_cfg = dict(watermark=getattr(cfg, "watermark", 0.0),
                  watermark_elsewhere=getattr(cfg, "watermark_elsewhere", 0.02),
                  watermark_class=getattr(cfg, "watermark_class", 0))
    kw = dict(classes=cfg.classes, image_size=cfg.image_size or 32, cue_agreement=cfg.cue_agreement)
    train, layers = make_spurious_cues(cfg.train_samples or 4096, seed=cfg.seed, split="train", return_layers=True,
                                       **kw, **wm_cfg)
    n_val = args.val_samples or cfg.val_samples
    held, held_layers = make_spurious_cues(n_val, seed=cfg.seed + 1_000_003, split="train", return_layers=True,
                                           **kw, **wm_cfg)
    val = make_spurious_cues(n_val, seed=cfg.seed, split="val", **kw)
    test = make_spurious_cues(args.test_samples or cfg.test_samples, seed=cfg.seed, split="test", **kw)
    if args.head_train_samples and args.head_train_samples < len(train):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        idx = idx[:args.head_train_samples].sort().values
        train, layers = train.subset(idx), layers[idx]
    opacity = 0.5
    return {"train": train, "sets": _shifted_sets(train, layers, cfg.classes, args.coobj_aug, opacity, args.seed),
            "heldout_sets": _shifted_sets(held, held_layers, cfg.classes, args.coobj_aug, opacity, args.seed + 7919),
            "val": val, "test": test, "test_marked": insert_watermark(test, opacity=opacity),
            "watermark_class": wm_cfg["watermark_class"], "watermark": wm_cfg["watermark"]}


def _frozen_study(args: argparse.Namespace, model: torch.nn.Module, cfg: argparse.Namespace, d: dict[str, Any],
                  device: torch.device) -> dict[str, dict[str, Any]]:
    aug = BatchAugment(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # spurious-cues' normalisation
    shifts = EXTENSION_SHIFTS if not args.no_extension else SHIFTS
    emb = {s: embed(model, d["sets"][s].images, aug, device, args.eval_batch_size) for s in shifts}
    emb_held = {s: embed(model, d["heldout_sets"][s].images, aug, device, args.eval_batch_size) for s in shifts}
    emb_test = embed(model, d["test"].images, aug, device, args.eval_batch_size)
    emb_marked = embed(model, d["test_marked"].images, aug, device, args.eval_batch_size)
    results: dict[str, dict[str, Any]] = {m: {} for m in _methods(args)}
    for i, rep in enumerate(REPRESENTATIONS):
        _log(args, f"frozen: fitting {len(results)} methods on {_REP_SHORT[rep]} ({rep}, "
                   f"{emb_test[i].shape[1]} dims) ...")
        res = fit_and_score({s: emb[s][i] for s in shifts}, {s: d["sets"][s].labels for s in shifts}, emb_test[i],
                            emb_marked[i], d["test"], cfg.classes, cfg.cue_agreement, d["watermark_class"],
                            args.weight_decay, args.max_iter, {s: emb_held[s][i] for s in shifts}, _methods(args))
        for method, r in res.items():
            results[method][rep] = r
    return results


def _finetune_study(args: argparse.Namespace, model: torch.nn.Module, cfg: argparse.Namespace,
                    d: dict[str, Any], device: torch.device) -> dict[str, dict[str, Any]]:
    config = FinetuneConfig(args.ft_epochs, args.ft_lr, batch_size=args.ft_batch_size,
                            weight_decays=args.ft_weight_decays, eval_batch_size=args.eval_batch_size)
    results: dict[str, dict[str, Any]] = {m: {} for m in _methods(args)}
    for rep in REPRESENTATIONS:
        res = finetune_and_score(model, rep, d["sets"], d["val"], d["heldout_sets"], d["test"], d["test_marked"],
                                 cfg.classes, cfg.cue_agreement, d["watermark_class"], config, args.seed,
                                 _methods(args), log=None if args.quiet else (lambda m: _log(args, m)), device=device)
        for method, r in res.items():
            results[method][rep] = r
    return results


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study of the module docstring; returns (and writes) the summary."""
    start = time.perf_counter()
    device = resolve_device(args.device, 0)
    ckpt_path = args.checkpoint or _pretrain(args)
    model, cfg = load_frozen_model(ckpt_path, device)
    d = _study_data(args, cfg)
    _log(args, f"fastcl-shortcuts: {len(d['train'])} training images x {len(EXTENSION_SHIFTS)} shifts, "
               f"{len(d['val'])} validation, {len(d['test'])} test images; checkpoint {ckpt_path}")
    times: dict[str, float] = {}
    studies: dict[str, Any] = {}
    t0 = time.perf_counter()
    studies["frozen"] = _frozen_study(args, model, cfg, d, device)
    times["frozen_time_s"] = round(time.perf_counter() - t0, 2)
    if args.finetune:
        t0 = time.perf_counter()
        studies["finetune"] = _finetune_study(args, model, cfg, d, device)
        times["finetune_time_s"] = round(time.perf_counter() - t0, 2)
    sets = d["sets"]
    cue_stats = {s: {"bg_aligned": float(sets[s].bg_aligned.double().mean()),
                     "coobj_aligned": float((sets[s].coobj == sets[s].labels).double().mean()),
                     "watermark": float(sets[s].watermark.double().mean()) if sets[s].watermark is not None else 0.0,
                     "unchanged": float((sets[s].images == sets["original"].images).flatten(1).all(1).double()
                                        .mean())}
                 for s in EXTENSION_SHIFTS}
    summary = {
        "studies": studies,
        "shifts": list(SHIFTS),
        "extension_shifts": list(EXTENSION_SHIFTS),
        "method_sets": {m: list(METHOD_SETS[m]) for m in _methods(args)},
        "representations": list(REPRESENTATIONS),
        "training_cue_rates": cue_stats,
        "checkpoint": os.path.abspath(ckpt_path),
        "pretrain_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(cfg).items())},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "versions": {"fastcl": str(fastcl.__version__), "torch": str(torch.__version__),
                     "python": platform.python_version()},
        "device": str(device),
        "threads": torch.get_num_threads(),
        **times,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    title = (f"head={cfg.head}, seed {cfg.seed}, watermark {d['watermark']:g}, co-object aug {args.coobj_aug}")
    records = [{"study": st, "method": m, "representation": r, **e}
               for st, res in studies.items() for m, per in res.items() for r, e in per.items()]
    _write_outputs(args.out, summary, records, title)
    return summary


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _write_outputs(out_dir: str, summary: dict[str, Any], records: list[dict[str, Any]], title: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    atomic_json(os.path.join(out_dir, SUMMARY), summary)
    if records:
        with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in records))
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(f"{title}\n\n{table_markdown(summary)}\n")
        if all(st in summary["studies"] and set(METHODS) <= set(summary["studies"][st]) for st in STUDIES):
            f.write(f"\n**the 3-shift protocol, frozen | end to end, and the paper**\n\n"
                    f"{side_by_side_markdown(summary)}\n")
    for study, res in summary["studies"].items():
        name = "gaps.svg" if study == "frozen" else f"gaps-{study}.svg"
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(gaps_svg(res, f"{title}; {study}"))


def _cell(entry: Any, key: str) -> tuple[float, float | None]:
    """(mean, sd or None) in percentage points of a summary entry (a float, or {'mean', 'sd'} when aggregated)."""
    v = entry[key]
    if isinstance(v, dict):
        return 100 * v["mean"], 100 * v["sd"]
    return 100 * v, None


def _fmt(entry: Any, key: str) -> str:
    if key not in entry:
        return ""
    mean, sd = _cell(entry, key)
    sign = "+" if key.endswith(("gap", "shift")) and mean >= 0 else ""
    return f"{sign}{mean:.1f}" + ("" if sd is None else f" ± {sd:.1f}")


def table_markdown(summary: dict[str, Any]) -> str:
    """The results as markdown tables, one per study (percentage points; ``mean ± sd`` for aggregated summaries);
    the 4-shift watermark extension below a separator row."""
    keys = METRIC_KEYS + ("shift_heldout_acc",)
    out = []
    for study, res in summary["studies"].items():
        lines = [f"**{_STUDY_TITLE[study]}**", "", "| method | rep | " + " | ".join(_LABELS[k] for k in keys) + " |",
                 "|" + " --- |" * (len(keys) + 2)]
        for method in res:
            if method == EXTENSION_METHODS[0]:
                lines.append("| *4 shifts (+ watermark)* |" + " |" * (len(keys) + 1))
            for rep in REPRESENTATIONS:
                entry = res[method][rep]
                lines.append(f"| {method} | {_REP_SHORT[rep]} | " + " | ".join(_fmt(entry, k) for k in keys) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


# Li et al. (CVPR 2023), UrbanCars, end to end (percentage points); the entries the paper's text gives
PAPER_URBANCARS = {"erm": {"both_gap": -69.2},
                   "lle": {"id_acc": 96.7, "bg_gap": -2.1, "coobj_gap": -2.7, "both_gap": -5.9}}
_SIDE_KEYS = ("id_acc", "bg_gap", "coobj_gap", "both_gap", "worst_group_acc")


def side_by_side_markdown(summary: dict[str, Any]) -> str:
    """The 3-shift methods of both studies in one table, each metric frozen | end to end, under the paper's
    UrbanCars numbers (percentage points)."""
    studies = [st for st in STUDIES if st in summary["studies"]]
    head = "| method | rep | " + " | ".join(f"{_LABELS[k]} {st}" for k in _SIDE_KEYS for st in studies) + " |"
    lines = [head, "|" + " --- |" * (2 + len(_SIDE_KEYS) * len(studies))]
    for method, paper in PAPER_URBANCARS.items():
        cells = [(f"{paper[k]:+.1f}" if k.endswith("gap") else f"{paper[k]:.1f}") if k in paper else "" for k in
                 _SIDE_KEYS for _ in studies]
        cells = [c if i % len(studies) == len(studies) - 1 else "" for i, c in enumerate(cells)]
        lines.append(f"| {method} (paper, UrbanCars) | ResNet-50 | " + " | ".join(cells) + " |")
    for method in METHODS:
        for rep in REPRESENTATIONS:
            cells = [_fmt(summary["studies"][st][method][rep], k) for k in _SIDE_KEYS for st in studies]
            lines.append(f"| {method} | {_REP_SHORT[rep]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aggregate(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (sample) standard deviation over runs of every numeric metric of the studies all runs have:
    ``studies[study][method][rep][key] = {'mean', 'sd', 'values'}``."""
    if not summaries:
        raise ValueError("aggregate needs at least one summary")
    out: dict[str, Any] = {"studies": {}, "num_runs": len(summaries)}
    common = [st for st in STUDIES if all(st in s["studies"] for s in summaries)]
    for study in common:
        methods = [m for m in summaries[0]["studies"][study] if all(m in s["studies"][study] for s in summaries)]
        res: dict[str, Any] = {}
        for method in methods:
            res[method] = {}
            for rep in REPRESENTATIONS:
                entries = [s["studies"][study][method][rep] for s in summaries]
                agg = {}
                for k, v in entries[0].items():
                    if (isinstance(v, (int, float)) and not isinstance(v, bool)) or v in NON_FINITE_JSON:
                        vals = torch.tensor([float(e[k]) for e in entries], dtype=torch.float64)
                        sd = float(vals.std()) if len(vals) > 1 else 0.0
                        agg[k] = {"mean": float(vals.mean()), "sd": sd, "values": vals.tolist()}
                res[method][rep] = agg
        out["studies"][study] = res
    return out


def gaps_svg(results: dict[str, Any], title: str = "") -> str:
    """A dependency-free SVG bar chart: the BG, CoObj, BG+CoObj and watermark gaps (percentage points) of every
    method of one study (``results[method][rep]``), one panel for h and one for z (error bars: standard deviation
    of aggregated runs)."""
    keys = ("bg_gap", "coobj_gap", "both_gap", "wm_gap")
    colours = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    methods = list(results)
    vals = [[[_cell(results[m][r], k) for k in keys] for m in methods] for r in REPRESENTATIONS]
    lo = min(min(mean - (sd or 0) for mean, sd in row) for panel in vals for row in panel)
    hi = max(max(mean + (sd or 0) for mean, sd in row) for panel in vals for row in panel)
    lo, hi = min(lo, 0.0) - 2, max(hi, 0.0) + 2
    pw, ph, left, top, gap = 430, 260, 50, 40, 30
    width, height = left + len(REPRESENTATIONS) * (pw + gap), top + ph + 70

    def y(v: float) -> float:
        return top + ph * (hi - v) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="16" font-size="13">{_xml(title)}: gaps (pp, negative = relies on the cue)</text>']
    step = 10 if hi - lo > 40 else 5
    for pi, rep in enumerate(REPRESENTATIONS):
        x0 = left + pi * (pw + gap)
        parts.append(f'<text x="{x0 + pw / 2}" y="{top - 8}" text-anchor="middle" font-size="12">'
                     f'{_REP_SHORT[rep]} ({rep.replace("_", "-")})</text>')
        t = math.ceil(lo / step) * step
        while t <= hi:
            parts.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>')
            if pi == 0:
                parts.append(f'<text x="{x0 - 4}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
            t += step
        parts.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="black"/>')
        gw = pw / len(methods)
        bw = gw * 0.8 / len(keys)
        for mi, method in enumerate(methods):
            gx = x0 + mi * gw + gw * 0.1
            for ki, (mean, sd) in enumerate(vals[pi][mi]):
                bx = gx + ki * bw
                y1, y2 = sorted((y(0), y(mean)))
                parts.append(f'<rect x="{bx:.1f}" y="{y1:.1f}" width="{bw:.1f}" height="{max(y2 - y1, 0.5):.1f}" '
                             f'fill="{colours[ki]}"/>')
                if sd:
                    cx = bx + bw / 2
                    parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(mean - sd):.1f}" y2="{y(mean + sd):.1f}" '
                                 f'stroke="black"/>')
            parts.append(f'<text x="{x0 + (mi + 0.5) * gw:.1f}" y="{top + ph + 16}" text-anchor="middle">'
                         f'{method}</text>')
    for ki, k in enumerate(keys):
        lx = left + ki * 120
        parts.append(f'<rect x="{lx}" y="{top + ph + 34}" width="10" height="10" fill="{colours[ki]}"/>')
        parts.append(f'<text x="{lx + 14}" y="{top + ph + 43}">{_LABELS[k]}</text>')
    parts.append("</svg>\n")
    return "\n".join(parts)


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


if __name__ == "__main__":
    sys.exit(main())
