"""End-to-end fine-tuning for the Whac-A-Mole study: Whac-A-Mole's UrbanCars protocol on a pretrained backbone.

Each method trains a copy of the pretrained backbone together with its last layer, from the ``fastcl-pretrain``
checkpoint, on its training sets (images of the shifts, :mod:`fastcl.train.shortcut_augment`):

* one linear head (``erm``, the single-augmentation methods, ``mixed``): cross-entropy;
* :class:`fastcl.evaluation.LastLayerEnsemble` (``lle``): one linear head per shift and the linear shift predictor,
  :func:`fastcl.evaluation.last_layer_ensemble_loss` (class CE through the sample's own shift head + shift CE,
  weight 1); at test time the heads' logits weighted by the predicted shift probabilities.

As in the authors' trainer, an epoch draws as many samples as the original training set, without replacement, from
the union of the method's sets (for one set: a permutation of it); SGD with momentum and a constant learning rate,
random horizontal flips. Model selection: after every epoch the model is scored on the cue-balanced validation split,
and the (epoch, weight decay) with the best validation worst-group accuracy is kept (ties: the earlier epoch, the
smaller weight decay). The test split is scored only for the selected model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl.evaluation.lle import LastLayerEnsemble, last_layer_ensemble_loss
from fastcl.evaluation.shortcut_metrics import multi_shortcut_metrics
from fastcl.train.data import ImageSet

__all__ = ["FinetuneConfig", "ShortcutClassifier", "finetune", "predict", "predict_shift"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune` (the weight decays are the selection grid)."""

    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 128
    weight_decays: tuple[float, ...] = (1e-4, 1e-3)
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"lr must be > 0 and momentum in [0, 1), got {self.lr}, {self.momentum}")
        if not self.weight_decays or any(not wd >= 0 for wd in self.weight_decays):
            raise ValueError(f"weight_decays must be a non-empty list of numbers >= 0, got {self.weight_decays}")


class ShortcutClassifier(nn.Module):
    """A pretrained contrastive model's backbone up to ``h`` (``pre_projection``) or ``z`` (``post_projection``)
    with a last layer: ``nn.Linear`` or :class:`LastLayerEnsemble` (``num_shifts > 1``)."""

    def __init__(self, model: nn.Module, representation: str, num_classes: int, num_shifts: int = 1) -> None:
        super().__init__()
        if representation not in ("pre_projection", "post_projection"):
            raise ValueError(f"representation must be 'pre_projection' or 'post_projection', got {representation!r}")
        self.encoder = model.encoder
        self.projection = model.head if representation == "post_projection" else None
        was = model.training
        model.eval()  # the probe forward must not touch BatchNorm's running statistics
        with torch.no_grad():
            probe = torch.zeros(2, getattr(model.encoder, "in_channels", 3), 32, 32,
                                device=next(model.parameters()).device)
            dim = self.features(probe).shape[1]
        model.train(was)
        self.lle = num_shifts > 1
        self.last = LastLayerEnsemble(dim, num_classes, num_shifts) if self.lle else nn.Linear(dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return h if self.projection is None else self.projection(h)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Training mode: logits ``[B, C]`` (one head) or ``(logits [B, K, C], shift_logits [B, K])`` (LLE); eval
        mode: ``[B, C]`` logits (LLE: shift-weighted)."""
        f = self.features(x)
        if self.lle:
            return self.last.forward_all(f) if self.training else self.last.predict(f)
        return self.last(f)


def _normalise(images: Tensor, clf: nn.Module) -> Tensor:
    """``uint8`` images -> normalised float on the classifier's device (spurious-cues' normalisation)."""
    device = next(clf.parameters()).device
    return (images.to(device).float() / 255.0 - 0.5) / 0.25


@torch.no_grad()
def predict(clf: ShortcutClassifier, images: Tensor, batch_size: int) -> Tensor:
    """Logits ``[N, C]`` of ``uint8 images`` in eval mode (the module's mode is restored)."""
    was = clf.training
    clf.eval()
    try:
        return torch.cat([clf(_normalise(images[s:s + batch_size], clf)).cpu()
                          for s in range(0, len(images), batch_size)])
    finally:
        clf.train(was)


@torch.no_grad()
def predict_shift(clf: ShortcutClassifier, images: Tensor, batch_size: int) -> Tensor:
    """Shift-predictor logits ``[N, K]`` of an LLE classifier, in eval mode (the module's mode is restored)."""
    if not clf.lle:
        raise ValueError("predict_shift needs a LastLayerEnsemble classifier (num_shifts > 1)")
    was = clf.training
    clf.eval()
    try:
        return torch.cat([clf.last.forward_all(clf.features(_normalise(images[s:s + batch_size], clf)))[1].cpu()
                          for s in range(0, len(images), batch_size)])
    finally:
        clf.train(was)


def _train_epoch(clf: ShortcutClassifier, opt: torch.optim.Optimizer, images: Tensor, labels: Tensor,
                 shifts: Tensor, n_draw: int, batch_size: int, g: torch.Generator) -> float:
    clf.train()
    order = torch.randperm(len(images), generator=g)[:n_draw]
    total = 0.0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        if len(idx) < 2:  # BatchNorm needs two samples
            continue
        x = _normalise(images[idx], clf)
        flip = (torch.rand(len(idx), generator=g) < 0.5).to(x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y, shift = labels[idx].to(x.device), shifts[idx].to(x.device)
        out = clf(x)
        if clf.lle:
            loss = last_layer_ensemble_loss(out[0], out[1], y, shift)
        else:
            loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / max(len(order), 1)


def _val_worst_group(logits: Tensor, val: ImageSet, train_ratio: float) -> float:
    """The validation worst-group accuracy, NaN for a diverged model (NaN logits predict nothing: it is recorded as
    NaN and never selected)."""
    if torch.isnan(logits).any():
        return float("nan")
    m = multi_shortcut_metrics(logits, val.labels, val.bg_aligned, val.coobj_aligned, train_ratio, bg=val.bg,
                               coobj=val.coobj)
    return m["worst_group_acc"]


def finetune(
    model: nn.Module,
    representation: str,
    sets: Sequence[ImageSet],
    val: ImageSet,
    num_classes: int,
    train_ratio: float,
    config: FinetuneConfig,
    *,
    lle: bool = False,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[ShortcutClassifier, dict[str, Any]]:
    """Fine-tune ``model``'s backbone with a last layer on the union of ``sets`` (``sets[0]`` the original data:
    an epoch draws ``len(sets[0])`` samples); with ``lle``, one head per set and the shift predictor.

    Returns the selected classifier (best validation worst-group accuracy over epochs and weight decays, in eval
    mode, on ``device``; the images stay on the CPU and move there batch by batch) and a record:
    ``selected_epoch``, ``selected_weight_decay``, ``val_worst_group_acc``, the validation curve of every weight
    decay (``val_curves``) and the final training loss. ``model`` is not modified.
    """
    if not sets:
        raise ValueError("sets must hold at least the original training set")
    images = torch.cat([s.images for s in sets])
    labels = torch.cat([s.labels for s in sets])
    shifts = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(sets)])
    best: tuple[float, int, float] | None = None
    best_state: dict[str, Tensor] | None = None
    curves: dict[str, list[float]] = {}
    losses: dict[str, float] = {}
    for wd in config.weight_decays:
        torch.manual_seed(seed)  # the same head initialisation for every weight decay
        clf = ShortcutClassifier(copy.deepcopy(model).requires_grad_(True), representation, num_classes,
                                 len(sets) if lle else 1).to(device)
        opt = torch.optim.SGD(clf.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=wd)
        g = torch.Generator().manual_seed(seed)
        curve = []
        for epoch in range(1, config.epochs + 1):
            loss = _train_epoch(clf, opt, images, labels, shifts, len(sets[0]), config.batch_size, g)
            wga = _val_worst_group(predict(clf, val.images, config.eval_batch_size), val, train_ratio)
            curve.append(wga)
            if log:
                log(f"  wd {wd:g} epoch {epoch}: loss {loss:.4f}, val worst-group {100 * wga:.1f}")
            if best is None or wga > best[0] or (math.isnan(best[0]) and not math.isnan(wga)):
                best = (wga, epoch, wd)
                best_state = {k: v.detach().clone() for k, v in clf.state_dict().items()}
        curves[f"{wd:g}"] = curve
        losses[f"{wd:g}"] = loss
    clf.load_state_dict(best_state)
    record = {"selected_epoch": best[1], "selected_weight_decay": best[2], "val_worst_group_acc": best[0],
              "val_curves": curves, "final_train_loss": losses}
    return clf.eval(), record
