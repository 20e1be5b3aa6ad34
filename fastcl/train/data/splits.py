"""The in-memory form of every dataset (:class:`ImageSet`, :class:`DatasetSplits`: ``uint8`` images with their
labels and cue metadata), the dataset names and the errors of dataset loading."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["DATASETS", "IMAGE_EXTENSIONS", "DatasetNotFoundError", "DatasetSplits", "ImageSet",
           "MissingDependencyError", "UnreadableImageError"]

DATASETS = ("spurious-cues", "cifar10", "cifar100", "folder", "urbancars")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset directory (or file in it) is missing; the message says what to download and where."""


class MissingDependencyError(ImportError):
    """An optional dependency a dataset needs (Pillow) is not installed; the message says how to install it."""


class UnreadableImageError(ValueError):
    """An image file of a dataset cannot be decoded (corrupt, truncated, not an image); the message is one line
    naming the file."""

    @classmethod
    def reading(cls, path: str, e: BaseException) -> UnreadableImageError:
        """The error for ``path``, whose decoding raised ``e``."""
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return cls(f"could not read image {path!r}: {type(e).__name__}{f': {text}' if text else ''}")


@dataclass
class ImageSet:
    """One split: ``images [N, C, H, W] uint8``, ``labels [N] int64`` and optional group metadata.

    Attributes:
        bg_aligned, coobj_aligned: ``[N]`` bool, the background / co-occurring object cue agrees with the
            class (``None`` for datasets without cue annotations).
        bg, coobj: ``[N]`` int64, the class each cue points to (``None`` when unknown).
        watermark: ``[N]`` bool, the image carries the watermark (``None`` when the dataset has no watermark).
    """

    images: Tensor
    labels: Tensor
    bg_aligned: Tensor | None = None
    coobj_aligned: Tensor | None = None
    bg: Tensor | None = None
    coobj: Tensor | None = None
    watermark: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        n = self.images.shape[0]
        for f in fields(self)[1:]:
            t = getattr(self, f.name)
            if t is not None and t.shape != (n,):
                raise ValueError(f"{f.name} must have shape [{n}], got {tuple(t.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def has_groups(self) -> bool:
        return self.bg_aligned is not None and self.coobj_aligned is not None

    def subset(self, index: Tensor | slice) -> ImageSet:
        return ImageSet(*(None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                          for f in fields(self)))


@dataclass
class DatasetSplits:
    """The splits of a dataset and what training and evaluation need to know about it.

    Attributes:
        val: held-out set with group annotations used for last-layer retraining (DFR), or ``None``.
        mean, std: per-channel normalisation statistics.
        cue_agreement: cue-class agreement probability of the training split (UrbanCars' ``train_ratio``), or
            ``None`` for datasets without cues.
        info: free-form description stored in the run summary.
    """

    name: str
    train: ImageSet
    test: ImageSet
    val: ImageSet | None
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cue_agreement: float | None = None
    class_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])
