"""The bottom of the op: the record that describes one contrastive problem, and the row math every backend shares.

Imports nothing from the rest of :mod:`fastcl.ops` or :mod:`fastcl.kernels`, so every backend and the Triton
launcher import their math from here, never from the module that dispatches to them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional, Union

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Triton backend's routes (fastcl.kernels.launch.triton_route): the anchors are the contrast rows (one backward
# kernel for both roles), both directions of a two-way loss from the same tiles, or one direction.
ANCHORS_ARE_CONTRAST, TWO_WAY, ONE_WAY = "anchors_are_contrast", "two_way", "one_way"


class Problem(NamedTuple):
    """One call of the op (see :mod:`fastcl.ops`): anchors ``[Na, D]`` scored against a contrast set ``[Nc, D]``.

    ``anchor`` None means the anchors are the contrast rows (one input: SupCon 'all', NT-Xent, SimCLR), so the
    gradients of both roles add up in that input; :attr:`anchors_are_contrast` says so. Positives come from
    ``anchor_labels`` / ``contrast_labels`` (int ``[Na]``, ``[Nc]``) or from ``mask`` (float ``[B, B]`` read at
    ``[i % B, j % B]``); with an integer ``self_offset`` anchor i is contrast row ``i + self_offset`` and that pair
    is excluded. ``scale`` multiplies every anchor's loss; ``two_way`` averages both directions (CLIP's loss).

    Extra columns (a memory queue, shared hard negatives): ``negatives [M, D]`` are contrast columns after the
    ``Nc`` batch columns that are never anchors; with ``negative_labels`` (int ``[M]``) an entry whose label equals
    the anchor's is a positive, else every entry is a negative. ``in_batch=False`` keeps, of the batch columns,
    only each anchor's own positive (MoCo's ``[l_pos, queue]`` row; needs ``contrast_labels = arange(Nc)`` and one
    positive per anchor: ``anchor_labels[i]`` is its column). ``false_negative_margin = m`` (one positive per
    anchor) drops column j from row i where ``sim_ij > sim_i,pos + m`` (``sim = s * t``, before the temperature).
    A backend takes the extra rows as a second column range (the chunked backend's :mod:`fastcl.ops.chunked.negatives`
    scores them with their own products; the Triton kernels stream them after the batch columns, ``HAS_EXTRA``) and
    forms their gradient only when they require grad; nothing ``Na x (Nc + M)`` is formed. :attr:`has_extra_columns`
    says whether any of these is set.
    """

    anchor: Optional[torch.Tensor]
    contrast: torch.Tensor
    anchor_labels: Optional[torch.Tensor]
    contrast_labels: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    self_offset: Optional[int]
    inv_temperature: Union[float, torch.Tensor]  # 1 / t; a 0-dim tensor (no grad) for a tensor temperature
    scale: float
    two_way: bool = False
    negatives: Optional[torch.Tensor] = None
    negative_labels: Optional[torch.Tensor] = None
    in_batch: bool = True
    false_negative_margin: Optional[float] = None

    @property
    def has_extra_columns(self) -> bool:
        """Negatives beyond the batch, a batch restricted to the positive, or a false-negative margin."""
        return self.negatives is not None or not self.in_batch or self.false_negative_margin is not None

    @property
    def core(self) -> tuple:
        """The fields the batch-only custom ops take (everything up to ``two_way``)."""
        return tuple(self[:9])

    @property
    def anchors_are_contrast(self) -> bool:
        """The anchors are the contrast rows themselves (``anchor`` None)."""
        return self.anchor is None

    @property
    def anchor_rows(self) -> torch.Tensor:
        """The anchors ``[Na, D]``: ``anchor``, or ``contrast`` when :attr:`anchors_are_contrast`."""
        return self.contrast if self.anchor is None else self.anchor

    @property
    def reversed(self) -> "Problem":
        """The reverse direction: contrast rows anchoring over the anchor rows, labels swapped (one way)."""
        return self._replace(
            anchor=self.contrast,
            contrast=self.anchor_rows,
            anchor_labels=self.contrast_labels,
            contrast_labels=self.anchor_labels,
            two_way=False,
        )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the op computes in for inputs like ``x``: float64 stays float64, everything else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_off(device: torch.device):
    """A context in which ``device``'s autocast is off (nothing to do where it is not on): the ops compute in their
    own precision (:func:`compute_dtype`) inside a ``torch.autocast`` region, as their Triton kernels do; autocast
    would otherwise turn the chunked path's block products into bf16 / fp16 next to its fp32 buffers. (About 0.4 us
    a call outside autocast: the losses take it twice, at the API and at the op.)"""
    kind = device.type
    if (kind in ("cpu", "cuda") or torch.amp.is_autocast_available(kind)) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()  # (reusable: entering it does nothing)


def row_losses(pos_logit_sum: torch.Tensor, pos_weight: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-anchor losses ``[Na]`` from the fp32 row statistics.

    An anchor with no positive gets 0 (as SupContrast's current code does). An anchor with an empty denominator
    (a single-column problem with self excluded) has ``lse = -inf`` and no positive; it also gets 0. An anchor with
    a positive and ``lse = -inf`` (every column, its positives included, at ``-inf``: infinite inputs) has an
    undefined log-softmax and gets NaN. NaN stays NaN.
    """
    no_positive = pos_weight < 1e-6
    positives = torch.where(no_positive, torch.ones_like(pos_weight), pos_weight)
    lse = torch.where((lse == float("-inf")) & no_positive, torch.zeros_like(lse), lse)
    return -scale * (pos_logit_sum - pos_weight * lse) / positives


def grad_coefficients(pos_weight: torch.Tensor, scale: float, grad_output: Optional[torch.Tensor] = None):
    """``(coef_softmax, coef_pos)`` fp32 ``[Na]``: ``Na * dL/ds_ij = coef_softmax_i * softmax_ij - coef_pos_i * w_ij``.

    The ``1 / Na`` of the mean is left out (callers apply it to the accumulated gradient) so the per-pair values
    stay O(1), which keeps them representable when cast to fp16/bf16 for the tensor-core products.
    """
    positives = torch.where(pos_weight < 1e-6, torch.ones_like(pos_weight), pos_weight)
    coef_pos = scale / positives
    if grad_output is not None:
        coef_pos = coef_pos * grad_output.to(coef_pos.dtype)
    return (coef_pos * pos_weight).contiguous(), coef_pos.contiguous()


@functools.lru_cache(maxsize=16)
def _cached_index_range(n: int, device: torch.device) -> torch.Tensor:
    # keyed by the torch.device callers pass (a tensor's .device); a normal tensor even when first asked for under
    # torch.inference_mode (an inference tensor could not later be saved for backward, e.g. as a cross-entropy target)
    with torch.inference_mode(False):
        return torch.arange(n, device=device)


def index_range(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` int64 on ``device``: eagerly one cached tensor per ``(n, device)``, so the chunked routes
    recognise the default pairing (ids ``0..n-1``) by identity instead of comparing, and small calls skip an
    allocation. Only for labels the library itself passes to the op and never writes (nothing hands them back to
    the caller); a fresh tensor while compiling and under ``torch.func`` transforms (a tensor made there is the
    transform's, and must not outlive it in the cache)."""
    if torch.compiler.is_compiling() or functorch_transforms_active():
        return torch.arange(n, device=device)
    return _cached_index_range(n, device)


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``vmap``) is running: the ops then take
    their autograd nodes in the setup_context form, and cache nothing made inside."""
    return torch._C._are_functorch_transforms_active()


def in_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the call when it already is (~3 us a call on a 2-core CPU; small losses make dozens)."""
    return x if x.dtype == dtype else x.to(dtype)
