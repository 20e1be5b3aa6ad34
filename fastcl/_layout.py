"""How the losses lay embeddings out as anchors and a contrast set: shared by :mod:`fastcl.functional` and
:mod:`fastcl.distributed` (below both, so neither imports the other for it).

SupCon's contrast set is every view stacked view-major (row ``v * bsz + i`` is view v of sample i, as
``torch.cat(torch.unbind(features, 1))``); its labels are the samples' ids repeated once per view; the anchors are
all of those rows (``contrast_mode='all'``) or view 0 only (``'one'``), the first ``bsz`` rows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def view_major(features: torch.Tensor) -> torch.Tensor:
    """``[n_views * bsz, dim]`` from ``features [bsz, n_views, dim]``: row ``v * bsz + i`` is view v of sample i
    (``bsz`` may be 0)."""
    bsz, n_views, dim = features.shape
    return features.transpose(0, 1).reshape(n_views * bsz, dim)


def anchor_count(contrast_mode: str, bsz: int, n_views: int) -> int:
    """How many of the view-major rows are anchors: all of them (``'all'``), or the first view's (``'one'``)."""
    return bsz if contrast_mode == "one" else n_views * bsz


def view_major_labels(sample_ids: torch.Tensor, n_views: int, counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The contrast rows' labels: ``sample_ids`` repeated once per view, view-major; with ``counts`` (samples per
    rank, the ids of all ranks in rank order) each rank's block of views is repeated in place."""
    if counts is None:
        return sample_ids.repeat(n_views)
    from fastcl import _extension  # (the gather extension's loader: only the distributed losses need it)

    return _extension.repeat_segments(sample_ids, counts, n_views)
