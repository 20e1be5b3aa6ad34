"""The datasets of ``fastcl-pretrain``, held in memory as ``uint8`` image tensors with their metadata, and the loaders
that feed their training batches.

* :mod:`~fastcl.train.data.splits`: :class:`ImageSet`, :class:`DatasetSplits` (the in-memory form of every dataset),
  the dataset names and errors.
* :mod:`~fastcl.train.data.spurious_cues`: the procedural default ``spurious-cues`` (generated from a seed, no files).
* :mod:`~fastcl.train.data.files`: ``cifar10`` / ``cifar100``, ``folder``, ``urbancars`` read from local files, and
  :func:`load_dataset`, which opens any of them by name.
* :mod:`~fastcl.train.data.loader`: the batches of an epoch per rank, in memory or streamed from image files.

    splits = load_dataset("spurious-cues", seed=0)
    splits.train.images.shape        # [4096, 3, 32, 32] uint8
    splits.test.bg_aligned.float().mean()   # 0.5
"""

from fastcl.train.data.files import (
    folder_layout,
    folder_split_files,
    list_images,
    load_cifar,
    load_dataset,
    load_folder,
    load_urbancars,
)
from fastcl.train.data.splits import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSplits,
    ImageSet,
    MissingDependencyError,
    UnreadableImageError,
)
from fastcl.train.data.spurious_cues import (
    CORE_SHAPES,
    MAX_CUE_CLASSES,
    CueLayers,
    add_watermark,
    compose_cue_layers,
    make_spurious_cues,
    render_background,
    render_coobj,
    spurious_cues_splits,
    watermark_pattern,
)

__all__ = [
    "CORE_SHAPES",
    "DATASETS",
    "MAX_CUE_CLASSES",
    "CueLayers",
    "DatasetNotFoundError",
    "DatasetSplits",
    "ImageSet",
    "MissingDependencyError",
    "UnreadableImageError",
    "add_watermark",
    "compose_cue_layers",
    "folder_layout",
    "folder_split_files",
    "list_images",
    "load_cifar",
    "load_dataset",
    "load_folder",
    "load_urbancars",
    "make_spurious_cues",
    "render_background",
    "render_coobj",
    "spurious_cues_splits",
    "watermark_pattern",
]
