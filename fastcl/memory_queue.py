"""A FIFO memory of past keys (MoCo's queue, a cross-batch memory), the same on every rank.

:class:`MemoryQueue` keeps the last ``size`` keys it was given (and their labels, with ``labels=True``) in buffers of
the module, so ``.to(device)``, ``.half()``, ``state_dict()`` and ``load_state_dict()`` treat it as any other state
of a model, and a resumed run continues with the exact queue it was killed with. With ``gather_distributed=True``
every rank enqueues the global batch (all ranks' keys in rank order, uneven shards and empty ones included), so
every rank holds the same queue.

>>> queue = MemoryQueue(4096, 128)
>>> queue.enqueue(key.detach(), labels)           # after the step's backward
>>> queue.negatives.shape, queue.labels.shape     # ([filled, 128], [filled])
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from fastcl import _validation as V

__all__ = ["MemoryQueue"]


class MemoryQueue(nn.Module):
    """FIFO buffer of the last ``size`` keys ``[dim]`` (and their integer labels).

    Args:
        size: how many keys the queue holds (> 0). Enqueueing more than ``size`` keys at once keeps the last ``size``.
        dim: the key dimension.
        dtype: the keys' dtype (floating point); ``module.to(dtype)`` / ``.half()`` convert it like any buffer.
        labels: keep an int64 label per key (SupCon / cross-batch-memory positives); then :meth:`enqueue` needs them.
        gather_distributed: :meth:`enqueue` takes this rank's keys and stores the keys of every rank in rank order
            (``torch.distributed``, ``group``), so every rank holds the same queue.
        group: the process group for ``gather_distributed`` (default: the world).

    The keys live in the buffer ``keys`` ``[size, dim]`` (``label_buffer`` ``[size]``) as a ring: :attr:`negatives`
    and :attr:`labels` return the filled part in buffer order (the losses sum over contrast columns, so the order
    does not change a loss). They are views of the buffers, which the next :meth:`enqueue` overwrites in place:
    enqueue after the backward of the losses that read them, as MoCo does.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        labels: bool = True,
        gather_distributed: bool = False,
        group=None,
    ) -> None:
        super().__init__()
        self.size = V.check_positive_int(size, "size")
        self.dim = V.check_positive_int(dim, "dim")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.keeps_labels = bool(labels)
        self.gather_distributed = bool(gather_distributed)
        self.group = group
        self.register_buffer("keys", torch.zeros(self.size, self.dim, dtype=dtype))
        self.register_buffer("label_buffer", torch.zeros(self.size, dtype=torch.int64) if self.keeps_labels else None)
        self._next = 0  # the row the next key goes to
        self._filled = 0

    @property
    def filled(self) -> int:
        """How many rows hold keys (``size`` once the queue has wrapped)."""
        return self._filled

    @property
    def negatives(self) -> torch.Tensor:
        """The stored keys ``[filled, dim]`` (a view of the buffer; no gradient)."""
        return self.keys[: self._filled]

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """The stored keys' labels ``[filled]`` int64, or None for a queue without labels."""
        return None if self.label_buffer is None else self.label_buffer[: self._filled]

    def reset(self) -> None:
        """Empty the queue (the buffers keep their storage)."""
        self._next = self._filled = 0

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Append ``keys`` ``[n, dim]`` (and integer or bool ``labels`` ``[n]`` or ``[n, 1]``, stored as int64),
        dropping the oldest entries beyond ``size``.

        With ``gather_distributed`` each rank passes its own keys (``n`` may differ between ranks, 0 included) and
        every rank appends all of them in rank order. Keys are stored detached, in the queue's dtype.
        """
        keys, labels = self._checked(keys, labels)
        if self.gather_distributed:
            keys, labels = self._gathered(keys, labels)
        n = keys.shape[0]
        if n >= self.size:  # only the newest `size` keys survive
            self._write(0, keys[n - self.size :], None if labels is None else labels[n - self.size :])
            self._next, self._filled = 0, self.size
            return
        head = min(n, self.size - self._next)
        self._write(self._next, keys[:head], None if labels is None else labels[:head])
        if head < n:  # wrap around to the start
            self._write(0, keys[head:], None if labels is None else labels[head:])
        self._next = (self._next + n) % self.size
        self._filled = min(self._filled + n, self.size)

    def _write(self, start: int, keys: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        self.keys[start : start + keys.shape[0]].copy_(keys)
        if labels is not None:
            self.label_buffer[start : start + labels.shape[0]].copy_(labels)

    def _checked(self, keys, labels):
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.dim:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must be a tensor of shape [n, {self.dim}] (the queue's dim), got {shape}")
        if not keys.is_floating_point():
            raise TypeError(f"keys must be floating point, got {keys.dtype}")
        if self.label_buffer is None:
            if labels is not None:
                raise ValueError("this queue keeps no labels (MemoryQueue(..., labels=False)): pass labels=None")
            return keys.detach(), None
        if labels is None:
            raise ValueError("this queue keeps labels (MemoryQueue(..., labels=True)): pass labels [n] with the keys")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)  # [n, 1], as the losses take them
        if not isinstance(labels, torch.Tensor) or labels.shape != (keys.shape[0],):
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must have shape [n] = [{keys.shape[0]}] (one per key), got {shape}")
        if labels.is_floating_point() or labels.is_complex():  # (bool labels are classes 0 / 1, as in the losses)
            raise TypeError(f"labels must be an integer (or bool) tensor, got {labels.dtype}")
        return keys.detach(), labels.to(device=self.keys.device, dtype=torch.int64)

    def _gathered(self, keys, labels):
        from fastcl.distributed import all_gather_with_grad

        keys = all_gather_with_grad(keys.to(self.keys.dtype), group=self.group)
        if labels is not None:
            labels = all_gather_with_grad(labels, group=self.group)
        return keys, labels

    def get_extra_state(self) -> Dict[str, Any]:
        return {"size": self.size, "dim": self.dim, "next": self._next, "filled": self._filled}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if (state.get("size"), state.get("dim")) != (self.size, self.dim):
            raise ValueError(
                f"the state is of a MemoryQueue(size={state.get('size')}, dim={state.get('dim')}), "
                f"this one is MemoryQueue(size={self.size}, dim={self.dim})"
            )
        self._next, self._filled = int(state["next"]), int(state["filled"])

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, dtype={self.keys.dtype}, labels={self.keeps_labels}, "
            f"filled={self._filled}" + (", gather_distributed=True" if self.gather_distributed else "")
        )
