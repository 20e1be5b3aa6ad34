"""Datasets read from local files, held in memory, and :func:`load_dataset`, which opens any dataset by name.

* ``cifar10`` / ``cifar100``: the python-pickle release, read from a local directory.
* ``folder``: ``DIR/train/<class>/*.png`` and ``DIR/test/<class>/*`` (optionally ``DIR/val/<class>/*``), read
  with Pillow and resized.
* ``urbancars``: the UrbanCars images of Li et al. (CVPR 2023) in their release layout
  (``DIR/bg-0.95_co_occur_obj-0.95/train/obj-urban_bg-urban_co_occur_obj-country/*.jpg``, ...), with the group
  metadata taken from the folder names.

Nothing is downloaded: a missing directory raises :class:`DatasetNotFoundError` saying what to fetch and where
to put it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastcl.train.data.splits import (
    DATASETS,
    IMAGE_EXTENSIONS,
    DatasetNotFoundError,
    DatasetSplits,
    ImageSet,
    MissingDependencyError,
    UnreadableImageError,
)
from fastcl.train.data.spurious_cues import spurious_cues_splits

__all__ = ["folder_layout", "folder_split_files", "list_images", "load_cifar", "load_dataset", "load_folder",
           "load_urbancars", "rgb_image"]

# --------------------------------------------------------------------------------------------------
# CIFAR (python pickle release)
# --------------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], label_key=b"labels",
                    meta="batches.meta", names_key=b"label_names", classes=10,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(folder="cifar-100-python", url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     train=["train"], test=["test"], label_key=b"fine_labels", meta="meta",
                     names_key=b"fine_label_names", classes=100,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}


def _cifar_root(name: str, data_dir: str | None) -> str:
    spec = _CIFAR[name]
    hint = (f"download {spec['url']} and extract it into DIR (giving DIR/{spec['folder']}/{spec['train'][0]}), "
            f"then pass --data-dir DIR; nothing is downloaded at run time")
    if data_dir is None:
        raise DatasetNotFoundError(f"{name} needs --data-dir: {hint}")
    for root in (os.path.join(data_dir, spec["folder"]), data_dir):
        if all(os.path.isfile(os.path.join(root, f)) for f in spec["train"] + spec["test"]):
            return root
    raise DatasetNotFoundError(
        f"{name} not found in {os.path.abspath(data_dir)!r} (looked for {spec['folder']}/{spec['train'][0]} "
        f"... {spec['test'][0]}): {hint}")


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar(name: str, data_dir: str | None, train_samples: int | None = None) -> DatasetSplits:
    """CIFAR-10 / CIFAR-100 from the python-pickle release in ``data_dir`` (or ``data_dir/cifar-*-python``)."""
    spec = _CIFAR[name]
    root = _cifar_root(name, data_dir)

    def read(files: Sequence[str]) -> ImageSet:
        xs, ys = [], []
        for fname in files:
            path = os.path.join(root, fname)
            try:
                d = _unpickle(path)
                xs.append(torch.as_tensor(d[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32))
                ys.append(torch.as_tensor(d[spec["label_key"]], dtype=torch.long))
            except Exception as e:  # truncated (an interrupted download), not a pickle, not a CIFAR batch
                what = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
                raise ValueError(f"{path!r} is not a readable {name} batch ({what}): download {spec['url']} and "
                                 f"extract it again") from None
        return ImageSet(torch.cat(xs), torch.cat(ys))

    train, test = read(spec["train"]), read(spec["test"])
    if train_samples:
        train = train.subset(slice(0, train_samples))
    names: list[str] = []
    meta = os.path.join(root, spec["meta"])
    if os.path.isfile(meta):
        names = [b.decode() for b in _unpickle(meta).get(spec["names_key"], [])]
    return DatasetSplits(name, train, test, None, spec["classes"], spec["mean"], spec["std"], None, names,
                         {"root": os.path.abspath(root)})


# --------------------------------------------------------------------------------------------------
# Image folders (Pillow)
# --------------------------------------------------------------------------------------------------


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError(
            "the 'folder' and 'urbancars' datasets read images with Pillow, which is not installed: pip install pillow"
        ) from None
    return Image


def rgb_image(im):
    """The Pillow image ``im`` in mode RGB; 16-bit greyscale (``I;16`` PNG and TIFF files) keeps its high byte,
    which Pillow's own conversion would clip at 255."""
    if im.mode.startswith("I;16"):
        im = _pillow().fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8))
    return im.convert("RGB")


def list_images(folder: str) -> list[str]:
    """The image files (by extension) directly in ``folder``, sorted."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def _read_images(paths: Sequence[str], image_size: int) -> Tensor:
    Image = _pillow()
    out = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = rgb_image(im).resize((image_size, image_size), Image.BILINEAR)
        except Exception as e:  # corrupt, truncated, not an image
            raise UnreadableImageError.reading(p, e) from None
        out[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3) \
            .permute(2, 0, 1)
    return out


def _channel_stats(images: Tensor, limit: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images[:limit].float() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


_FOLDER_HINT = "put class-per-subfolder images in DIR/train/<class>/* and DIR/test/<class>/* and pass --data-dir DIR"


def folder_split_files(split_dir: str, classes: list[str]) -> tuple[list[str], torch.Tensor]:
    """``(paths, labels)`` of the images in ``split_dir/<class>/`` for each class (label = index in ``classes``);
    a :class:`DatasetNotFoundError` when the split has none."""
    paths: list[str] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        files = list_images(folder) if os.path.isdir(folder) else []
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir!r}: {_FOLDER_HINT}")
    return paths, torch.tensor(labels, dtype=torch.long)


def folder_layout(data_dir: str | None) -> tuple[str, str, list[str]]:
    """``(train_dir, test_dir, classes)`` of a class-per-subfolder dataset (``DIR/val`` stands in for a missing
    ``DIR/test``; classes are the sorted subfolder names of ``DIR/train``), or a :class:`DatasetNotFoundError`."""
    hint = _FOLDER_HINT
    if data_dir is None:
        raise DatasetNotFoundError(f"the folder dataset needs --data-dir: {hint}")
    train_dir = os.path.join(data_dir, "train")
    test_dir = next((os.path.join(data_dir, s) for s in ("test", "val") if os.path.isdir(os.path.join(data_dir, s))),
                    None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise DatasetNotFoundError(f"no train/ and test/ (or val/) folders in {os.path.abspath(data_dir)!r}: {hint}")
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not classes:
        raise DatasetNotFoundError(f"{train_dir!r} has no class subfolders: {hint}")
    return train_dir, test_dir, classes


def load_folder(data_dir: str | None, image_size: int = 64, train_samples: int | None = None) -> DatasetSplits:
    """Class-per-subfolder images: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (``DIR/val`` is used as
    the test split when there is no ``DIR/test``). Classes are the sorted subfolder names of ``DIR/train``."""
    train_dir, test_dir, classes = folder_layout(data_dir)

    def read(split_dir: str) -> ImageSet:
        paths, labels = folder_split_files(split_dir, classes)
        return ImageSet(_read_images(paths, image_size), labels)

    train = read(train_dir)
    if train_samples:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_samples]
        train = train.subset(perm.sort().values)
    test = read(test_dir)
    mean, std = _channel_stats(train.images)
    return DatasetSplits("folder", train, test, None, len(classes), mean, std, None, classes,
                         {"root": os.path.abspath(data_dir), "image_size": image_size})


_URBANCARS_NAMES = ("urban", "country")
_URBANCARS_URL = "https://github.com/facebookresearch/Whac-A-Mole (UrbanCars generation / release instructions)"


def _urbancars_split(root: str, split: str, image_size: int) -> ImageSet:
    ratio = "bg-0.95_co_occur_obj-0.95" if split == "train" else "bg-0.5_co_occur_obj-0.5"
    split_dir = os.path.join(root, ratio, split)
    paths, obj, bgs, cos = [], [], [], []
    for o, oname in enumerate(_URBANCARS_NAMES):
        for b, bname in enumerate(_URBANCARS_NAMES):
            for c, cname in enumerate(_URBANCARS_NAMES):
                folder = os.path.join(split_dir, f"obj-{oname}_bg-{bname}_co_occur_obj-{cname}")
                if not os.path.isdir(folder):
                    raise DatasetNotFoundError(
                        f"UrbanCars folder {folder!r} is missing: get the UrbanCars images ({_URBANCARS_URL}) so "
                        f"that DIR/bg-0.95_co_occur_obj-0.95/train/obj-urban_bg-urban_co_occur_obj-urban/*.jpg and "
                        f"DIR/bg-0.5_co_occur_obj-0.5/{{val,test}}/... exist, then pass --data-dir DIR")
                files = list_images(folder)
                paths += files
                obj += [o] * len(files)
                bgs += [b] * len(files)
                cos += [c] * len(files)
    y, bg, co = (torch.tensor(v, dtype=torch.long) for v in (obj, bgs, cos))
    return ImageSet(_read_images(paths, image_size), y, bg == y, co == y, bg, co)


def load_urbancars(data_dir: str | None, image_size: int = 64, train_samples: int | None = None) -> DatasetSplits:
    """UrbanCars (Li et al., CVPR 2023) in the release layout; ``data_dir`` may also contain ``urbancars/`` or
    ``urbancars_images/`` holding it. Training cues agree with the class 95% of the time; val/test are balanced."""
    if data_dir is None:
        raise DatasetNotFoundError(f"urbancars needs --data-dir DIR holding DIR/bg-0.95_co_occur_obj-0.95/train/... "
                                   f"({_URBANCARS_URL})")
    root = next((r for r in (data_dir, os.path.join(data_dir, "urbancars"), os.path.join(data_dir, "urbancars_images"))
                 if os.path.isdir(os.path.join(r, "bg-0.95_co_occur_obj-0.95"))), data_dir)
    train = _urbancars_split(root, "train", image_size)
    if train_samples:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_samples]
        train = train.subset(perm.sort().values)
    val = _urbancars_split(root, "val", image_size)
    test = _urbancars_split(root, "test", image_size)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return DatasetSplits("urbancars", train, test, val, 2, mean, std, 0.95, list(_URBANCARS_NAMES),
                         {"root": os.path.abspath(root), "image_size": image_size})


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
    classes: int = 2,
    train_samples: int | None = None,
    val_samples: int = 1024,
    test_samples: int = 2048,
    cue_agreement: float = 0.95,
    watermark: float = 0.0,
    watermark_elsewhere: float = 0.02,
    watermark_class: int = 0,
) -> DatasetSplits:
    """Load (or generate) a dataset by name; see the module docstring.

    ``classes``, ``val_samples``, ``test_samples``, ``cue_agreement``, ``seed`` and the ``watermark*`` cue
    (see :func:`make_spurious_cues`; off by default) only apply to ``spurious-cues``; ``train_samples`` caps the
    training split (``None``: all, 4096 for spurious-cues);
    ``image_size`` defaults to 32 (spurious-cues, CIFAR is always 32) or 64 (folder, urbancars).
    """
    if name == "spurious-cues":
        return spurious_cues_splits(seed=seed, classes=classes, image_size=image_size or 32,
                                    train_samples=train_samples or 4096, val_samples=val_samples,
                                    test_samples=test_samples, cue_agreement=cue_agreement, watermark=watermark,
                                    watermark_elsewhere=watermark_elsewhere, watermark_class=watermark_class)
    if name in _CIFAR:
        if image_size not in (None, 32):
            raise ValueError(f"{name} images are 32x32; got image_size={image_size}")
        return load_cifar(name, data_dir, train_samples)
    if name == "folder":
        return load_folder(data_dir, image_size or 64, train_samples)
    if name == "urbancars":
        return load_urbancars(data_dir, image_size or 64, train_samples)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
