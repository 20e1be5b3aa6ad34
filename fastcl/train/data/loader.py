"""Feeding training batches: the in-memory path and the streaming path for datasets larger than memory.

Both paths draw the same batches: :class:`EpochBatchSampler` permutes the training set once per epoch from
``(seed, epoch)`` (no generator state to carry), cuts it into global batches of ``batch_size`` (the last partial
batch is dropped) and gives rank ``r`` of ``world_size`` the rows ``[r * b, (r + 1) * b)`` of every global batch,
``b = batch_size / world_size``: each rank reads only its own shard (``DistributedSampler`` semantics: disjoint,
together the whole epoch), and a run resumed at step ``s`` of an epoch starts from batch ``s`` without reading
the ones before.

* In memory (:class:`InMemoryBatches`): the ``uint8`` split lives on the training device and a batch is an
  index into it. Right for the embedded default and for sets that fit (CIFAR: 150 MB).
* Streaming (:class:`StreamingBatches`, ``fastcl-pretrain --stream``): only file paths are held; images are
  decoded in ``DataLoader`` worker processes (``workers``, pinned memory, ``prefetch`` batches per worker,
  persistent workers), resized keeping the aspect ratio (short side to ``image_size``, then a random crop of the
  long side for training and a centre crop for evaluation) and handed to the batched augmentations on the
  training device as ``uint8 [B, 3, S, S]``. Memory stays flat whatever the number of files.

Decoders: torchvision's ``decode_image`` (libjpeg-turbo / libpng) when torchvision is installed, otherwise
Pillow (``pip install pillow`` or ``pip install fastcl[data]``), which decodes JPEGs at a reduced scale
(``Image.draft``) when the target is much smaller than the file.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from fastcl.train.data.files import folder_layout, folder_split_files, list_images, rgb_image
from fastcl.train.data.splits import (
    DatasetNotFoundError,
    DatasetSplits,
    ImageSet,
    MissingDependencyError,
    UnreadableImageError,
)

__all__ = [
    "EpochBatchSampler",
    "ImageFileDataset",
    "InMemoryBatches",
    "STREAMING_DATASETS",
    "StreamingBatches",
    "StreamingImageSet",
    "StreamingSplits",
    "decode_resized",
    "decoder_name",
    "iter_image_batches",
    "load_streaming",
    "read_image",
]

STREAMING_DATASETS = ("folder", "urbancars")


# --------------------------------------------------------------------------------------------------
# Batches of an epoch, per rank
# --------------------------------------------------------------------------------------------------


class EpochBatchSampler(Sampler):
    """Local batches (lists of dataset indices) of one rank for one epoch; see the module docstring.

    Args:
        n: dataset size.
        batch_size: global batch (all ranks together); must be divisible by ``world_size``.
        rank, world_size: this process and the number of processes.
        seed: the permutation of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``(seed, e)``.
        tag_epoch: yield ``(index, epoch)`` pairs instead of indices (for datasets whose random crop depends on
            the epoch, decoded in worker processes that do not see :meth:`set_epoch`).
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 tag_epoch: bool = False) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(f"batch_size must be a positive multiple of world_size={world_size}, got {batch_size}")
        if n < batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.tag_epoch = seed, tag_epoch
        self.local = batch_size // world_size
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (and the first step, to resume mid-epoch) that the next iteration yields."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must lie in [0, {self.steps_per_epoch}], got {start_step}")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list]:
        perm = self.permutation(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            s = step * self.batch_size + self.rank * self.local
            rows = perm[s:s + self.local].tolist()
            yield [(i, self.epoch) for i in rows] if self.tag_epoch else rows

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step


class InMemoryBatches:
    """Training batches indexed out of an in-memory ``uint8`` split held on ``device``."""

    streaming = False

    def __init__(self, train: ImageSet, sampler: EpochBatchSampler, device: torch.device) -> None:
        self.images = train.images.to(device)
        self.labels = train.labels.to(device)
        self.sampler = sampler
        self.device = device

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images uint8 [b, C, S, S], labels [b])`` on the device for each remaining step of ``epoch``."""
        self.sampler.set_epoch(epoch, start_step)
        for rows in self.sampler:
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
            yield self.images[idx], self.labels[idx]


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _torchvision_io():
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
        from torchvision.transforms.v2.functional import resize
    except Exception:  # not installed, or built for another torch
        return None
    return decode_image, read_file, ImageReadMode.RGB, resize


def decoder_name() -> str:
    """``'torchvision'`` or ``'pillow'`` (the decoder :func:`decode_resized` uses here); raises
    :class:`MissingDependencyError` when neither is installed."""
    if _torchvision_io() is not None:
        return "torchvision"
    _pillow()
    return "pillow"


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError(
            "reading image files needs torchvision or Pillow, and neither is installed: pip install pillow "
            "(or pip install 'fastcl[data]')") from None
    return Image


def _crop_box(w: int, h: int, size: int, offset: float | None) -> tuple[int, int]:
    """Top-left corner of the ``size x size`` crop of a ``w x h`` image whose short side is ``size``: at
    ``offset`` in [0, 1) of the ``slack + 1`` positions along the long side, or centred when ``offset`` is None."""
    if offset is None:
        return (w - size) // 2, (h - size) // 2
    return min(int(offset * (w - size + 1)), w - size), min(int(offset * (h - size + 1)), h - size)


def decode_resized(path: str, size: int, offset: float | None = None) -> Tensor:
    """``uint8 [3, size, size]``: the RGB image at ``path``, its short side resized to ``size`` (aspect ratio
    kept, antialiased), then cropped to a square along the long side (centre when ``offset`` is ``None``,
    else at ``offset`` in [0, 1) of the slack)."""
    tv = _torchvision_io()
    if tv is not None:
        decode_image, read_file, rgb, resize = tv
        img = decode_image(read_file(path), mode=rgb)
        if img.dtype != torch.uint8:  # 16-bit PNG: the high byte
            img = img.to(torch.int32).div(256, rounding_mode="floor").to(torch.uint8)
        h, w = img.shape[-2:]
        if min(h, w) != size:
            scale = size / min(h, w)
            img = resize(img, [max(size, round(h * scale)), max(size, round(w * scale))], antialias=True)
        h, w = img.shape[-2:]
        x0, y0 = _crop_box(w, h, size, offset)
        return img[:, y0:y0 + size, x0:x0 + size].contiguous()
    Image = _pillow()
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale while the short side stays >= size
        im = rgb_image(im)
        w, h = im.size
        if min(w, h) != size:
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR,
                           reducing_gap=3.0)
        w, h = im.size
        x0, y0 = _crop_box(w, h, size, offset)
        im = im.crop((x0, y0, x0 + size, y0 + size))
        return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1) \
            .contiguous()


def read_image(path: str, size: int, offset: float | None = None) -> Tensor:
    """:func:`decode_resized`; a file that cannot be decoded raises :class:`UnreadableImageError` naming it."""
    try:
        return decode_resized(path, size, offset)
    except MissingDependencyError:
        raise
    except Exception as e:  # corrupt, truncated, not an image
        raise UnreadableImageError.reading(path, e) from None


class ImageFileDataset(Dataset):
    """``(image uint8 [3, S, S], label)`` for ``paths[i]``; with ``random_crop`` the crop along the long side is
    drawn from ``(seed, epoch, i)`` (keys ``(i, epoch)``), so it does not depend on the worker that decodes it."""

    def __init__(self, paths: Sequence[str], labels: Tensor, image_size: int, *, random_crop: bool = False,
                 seed: int = 0) -> None:
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} paths but {labels.shape[0]} labels")
        # one numpy array rather than a list of str objects: worker processes read it without touching (and so
        # copying) a page per path through reference counts
        self.paths, self.labels = np.asarray([os.fsdecode(p) for p in paths]), labels
        self.image_size, self.random_crop, self.seed = int(image_size), random_crop, int(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        offset = None
        if self.random_crop:
            offset = random.Random((self.seed * 1_000_003 + epoch) * 100_000_007 + i).random()
        return read_image(str(self.paths[i]), self.image_size, offset), self.labels[i]


def _loader(dataset: Dataset, *, batch_sampler: Any = None, batch_size: int | None = None, workers: int = 0,
            prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    kw: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        kw |= {"prefetch_factor": prefetch, "persistent_workers": True}
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kw)


# --------------------------------------------------------------------------------------------------
# Streaming splits
# --------------------------------------------------------------------------------------------------


@dataclass
class StreamingImageSet:
    """One split held as file paths (decoded on demand) with the metadata of :class:`~fastcl.train.data.ImageSet`.

    Attributes:
        paths: image files; ``labels [N] int64``; optional ``bg_aligned``, ``coobj_aligned`` ``[N] bool`` and
            ``bg``, ``coobj`` ``[N] int64`` cue annotations.
        image_size: side of the square ``uint8`` images it yields.
    """

    paths: list[str]
    labels: Tensor
    image_size: int
    bg_aligned: Tensor | None = None
    coobj_aligned: Tensor | None = None
    bg: Tensor | None = None
    coobj: Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.paths)
        for name in ("labels", "bg_aligned", "coobj_aligned", "bg", "coobj"):
            t = getattr(self, name)
            if t is not None and t.shape != (n,):
                raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_groups(self) -> bool:
        return self.bg_aligned is not None and self.coobj_aligned is not None

    def subset(self, index: Tensor | slice) -> StreamingImageSet:
        rows = range(len(self))[index] if isinstance(index, slice) else index.tolist()
        kw = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
              for f in fields(self) if f.name not in ("paths", "image_size")}
        return StreamingImageSet([self.paths[i] for i in rows], image_size=self.image_size, **kw)

    def dataset(self, *, random_crop: bool = False, seed: int = 0) -> ImageFileDataset:
        return ImageFileDataset(self.paths, self.labels, self.image_size, random_crop=random_crop, seed=seed)


@dataclass
class StreamingSplits(DatasetSplits):
    """:class:`~fastcl.train.data.DatasetSplits` whose splits are :class:`StreamingImageSet` s."""

    size: int = 64

    @property
    def image_size(self) -> int:
        return self.size

    @property
    def channels(self) -> int:
        return 3


class StreamingBatches:
    """Training batches decoded by a ``DataLoader`` (worker processes, pinned memory, prefetch, persistent
    workers) from a :class:`StreamingImageSet`, in the order of ``sampler``; moved to ``device``."""

    streaming = True

    def __init__(self, train: StreamingImageSet, sampler: EpochBatchSampler, device: torch.device, *,
                 workers: int = 0, prefetch: int = 2, seed: int = 0) -> None:
        sampler.tag_epoch = True
        self.sampler = sampler
        self.device = device
        self.loader = _loader(train.dataset(random_crop=True, seed=seed), batch_sampler=sampler, workers=workers,
                              prefetch=prefetch, pin_memory=device.type == "cuda")

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        self.sampler.set_epoch(epoch, start_step)
        for images, labels in _batches(self.loader):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def _iterate(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)`` with the parent's objects frozen while worker processes are forked: the workers' garbage
    collector then never walks (and so never copies, page by page) the parent's heap, and their memory stays
    what they use themselves."""
    if loader.num_workers == 0:
        return iter(loader)
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


def _batches(loader: DataLoader) -> Iterator[Any]:
    """The batches of ``loader``; an :class:`UnreadableImageError` raised in a worker process arrives with the
    worker's traceback in its message and is raised again with its own one-line message."""
    try:
        yield from _iterate(loader)
    except UnreadableImageError as e:
        lines = str(e).strip().splitlines()
        if len(lines) <= 1:
            raise
        name = f"{UnreadableImageError.__module__}.{UnreadableImageError.__qualname__}: "
        raise UnreadableImageError(lines[-1].removeprefix(name)) from None


def iter_image_batches(images: ImageSet | StreamingImageSet, batch_size: int, *, workers: int = 0,
                       prefetch: int = 2) -> Iterator[Tensor]:
    """The images of a split in order, ``batch_size`` at a time, as ``uint8 [b, C, S, S]`` on the CPU
    (streaming splits: decoded by ``workers`` processes, centre-cropped)."""
    if isinstance(images, ImageSet):
        for s in range(0, len(images), batch_size):
            yield images.images[s:s + batch_size]
        return
    loader = _loader(images.dataset(), batch_size=batch_size, workers=workers, prefetch=prefetch)
    for x, _ in _batches(loader):
        yield x


def _cap(split: StreamingImageSet, limit: int | None, seed: int) -> StreamingImageSet:
    if not limit or limit >= len(split):
        return split
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:limit]
    return split.subset(perm.sort().values)


def _channel_stats(split: StreamingImageSet, limit: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ``limit`` images spread over the split (centre crops)."""
    rows = torch.linspace(0, len(split) - 1, min(limit, len(split))).round().long().unique()
    x = torch.stack([read_image(split.paths[i], split.image_size) for i in rows.tolist()]).float() / 255.0
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def _folder_splits(data_dir: str | None, image_size: int, train_samples: int | None, seed: int) -> StreamingSplits:
    train_dir, test_dir, classes = folder_layout(data_dir)

    def listing(split_dir: str) -> StreamingImageSet:
        paths, labels = folder_split_files(split_dir, classes)
        return StreamingImageSet(paths, labels, image_size)

    train = _cap(listing(train_dir), train_samples, 0)
    test = listing(test_dir)
    mean, std = _channel_stats(train)
    return StreamingSplits("folder", train, test, None, len(classes), mean, std, None, classes,  # type: ignore
                           {"root": os.path.abspath(data_dir), "image_size": image_size, "streaming": True},
                           size=image_size)


_URBANCARS_NAMES = ("urban", "country")


def _urbancars_splits(data_dir: str | None, image_size: int, train_samples: int | None,
                      seed: int) -> StreamingSplits:
    layout = ("DIR/bg-0.95_co_occur_obj-0.95/train/obj-urban_bg-urban_co_occur_obj-urban/*.jpg and "
              "DIR/bg-0.5_co_occur_obj-0.5/{val,test}/... (https://github.com/facebookresearch/Whac-A-Mole)")
    if data_dir is None:
        raise DatasetNotFoundError(f"urbancars needs --data-dir DIR holding {layout}")
    root = next((r for r in (data_dir, os.path.join(data_dir, "urbancars"), os.path.join(data_dir, "urbancars_images"))
                 if os.path.isdir(os.path.join(r, "bg-0.95_co_occur_obj-0.95"))), data_dir)

    def listing(split: str) -> StreamingImageSet:
        ratio = "bg-0.95_co_occur_obj-0.95" if split == "train" else "bg-0.5_co_occur_obj-0.5"
        paths: list[str] = []
        meta: list[tuple[int, int, int]] = []
        for o, oname in enumerate(_URBANCARS_NAMES):
            for b, bname in enumerate(_URBANCARS_NAMES):
                for c, cname in enumerate(_URBANCARS_NAMES):
                    folder = os.path.join(root, ratio, split, f"obj-{oname}_bg-{bname}_co_occur_obj-{cname}")
                    if not os.path.isdir(folder):
                        raise DatasetNotFoundError(f"UrbanCars folder {folder!r} is missing: get the images so that "
                                                   f"{layout} exist, then pass --data-dir DIR")
                    files = list_images(folder)
                    paths += files
                    meta += [(o, b, c)] * len(files)
        y, bg, co = torch.tensor(meta, dtype=torch.long).reshape(-1, 3).unbind(1)
        return StreamingImageSet(paths, y, image_size, bg == y, co == y, bg, co)

    train = _cap(listing("train"), train_samples, 0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return StreamingSplits("urbancars", train, listing("test"), listing("val"), 2, mean, std, 0.95,  # type: ignore
                           list(_URBANCARS_NAMES),
                           {"root": os.path.abspath(root), "image_size": image_size, "streaming": True},
                           size=image_size)


def load_streaming(name: str, *, data_dir: str | None, image_size: int | None = None,
                   train_samples: int | None = None, seed: int = 0) -> StreamingSplits:
    """The file lists of a dataset in :data:`STREAMING_DATASETS` (``folder``, ``urbancars``; default
    ``image_size`` 64); nothing is decoded but a few hundred images for the channel statistics of ``folder``."""
    if train_samples is not None and train_samples <= 0:
        raise ValueError(f"train_samples must be positive (or None for all), got {train_samples}")
    size = 64 if image_size is None else int(image_size)
    decoder_name()  # fail now, with the install hint, rather than in a worker
    if name == "folder":
        return _folder_splits(data_dir, size, train_samples, seed)
    if name == "urbancars":
        return _urbancars_splits(data_dir, size, train_samples, seed)
    raise ValueError(f"streaming reads {STREAMING_DATASETS}, not {name!r}")

