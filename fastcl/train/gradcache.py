"""Gradient caching (Gao et al., 2021, "GradCache"): a contrastive step on a batch larger than memory allows.

A contrastive loss couples every sample of the batch, so it cannot be split into independent micro-batches.
But its gradient only flows into the model through the embeddings, which are small. :func:`cached_backward`

1. embeds every micro-batch without autograd (no activations kept),
2. evaluates the loss on the full batch of embeddings and takes its gradient with respect to them,
3. re-embeds each micro-batch with autograd and back-propagates the cached gradient slice through it.

Peak activation memory is that of one micro-batch; the parameter gradients equal those of the full-batch step
(exactly, up to floating-point summation order) when the embedding of a sample does not depend on the other
samples of its micro-batch. The RNG state (CPU and the CUDA devices in use) is saved before each micro-batch in
pass 1 and restored before its re-forward in pass 3, so dropout draws the same masks in both passes. Draw
augmentation parameters for the whole batch up front (see :class:`fastcl.augment.BatchAugment`), so that the
views do not depend on how the batch is split.

**BatchNorm** in training mode is the exception: it normalises with statistics of the micro-batch, so the
embeddings (and therefore the step) differ from a full-batch step, as with plain gradient accumulation. Running
statistics are updated once per micro-batch, by the pass that has gradients (pass 1's updates are undone).
Use a BatchNorm-free model (or GroupNorm / LayerNorm) where exact equality matters.

    loss = cached_backward(lambda s, e: model(x[s:e]), len(x), 64, criterion, model=model)
    optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["cached_backward", "micro_batches"]


def micro_batches(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in chunks of at most ``size``."""
    if size <= 0:
        raise ValueError(f"micro-batch size must be positive, got {size}")
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _rng_state(cuda_devices: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices]


def _set_rng_state(state: tuple[Tensor, list[Tensor]], cuda_devices: Sequence[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(cuda_devices, state[1]):
        torch.cuda.set_rng_state(s, d)


def _norm_buffers(model: nn.Module | None) -> list[tuple[Tensor, Tensor]]:
    """(buffer, saved copy) for the running statistics of every BatchNorm-like module of ``model``."""
    if model is None:
        return []
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                if b is not None:
                    saved.append((b, b.detach().clone()))
    return saved


def cached_backward(
    encode: Callable[[int, int], Tensor],
    n: int,
    micro_batch_size: int,
    loss_fn: Callable[[Tensor], Tensor],
    *,
    model: nn.Module | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    cuda_devices: Sequence[int] | None = None,
) -> Tensor:
    """Back-propagate ``loss_fn(cat([encode(s, e) for each micro-batch]))`` into the parameters used by
    ``encode``, one micro-batch at a time; returns the (detached) loss.

    Args:
        encode: ``encode(start, stop)`` returns the embeddings of batch rows ``start:stop`` (any shape with that
            leading dimension, float). Called twice per micro-batch: once under ``torch.no_grad()``, once with
            autograd.
        n: batch size (rows of the full batch).
        micro_batch_size: rows per micro-batch; ``>= n`` does a plain full-batch forward and backward.
        loss_fn: maps the full ``[n, ...]`` embeddings to a scalar loss.
        model: the module ``encode`` runs; its BatchNorm running statistics are restored after pass 1, so they
            are updated exactly once per micro-batch.
        no_sync: context-manager factory entered around every backward but the last (e.g. DDP's ``no_sync``),
            so gradients are all-reduced once per step.
        cuda_devices: CUDA devices whose RNG state is saved and restored (default: the current one, if CUDA is
            initialised).
    """
    if cuda_devices is None:
        cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else []
    if micro_batch_size >= n:
        out = encode(0, n)
        loss = loss_fn(out)
        loss.backward()
        return loss.detach()

    chunks = micro_batches(n, micro_batch_size)
    saved_norm = _norm_buffers(model)
    states, outs = [], []
    with torch.no_grad():
        for s, e in chunks:
            states.append(_rng_state(cuda_devices))
            outs.append(encode(s, e).detach())
    end_state = _rng_state(cuda_devices)
    for buf, copy in saved_norm:
        buf.copy_(copy)

    full = torch.cat(outs).requires_grad_(True)
    del outs
    with torch.enable_grad():
        loss = loss_fn(full)
        (grad,) = torch.autograd.grad(loss, full)
    del full

    last = len(chunks) - 1
    for i, (s, e) in enumerate(chunks):
        _set_rng_state(states[i], cuda_devices)
        ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
        with ctx:
            out = encode(s, e)
            out.backward(grad[s:e].to(out.dtype))
    _set_rng_state(end_state, cuda_devices)
    return loss.detach()
