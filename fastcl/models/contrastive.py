"""Encoder + projection-head model and per-layer representation extraction::

    model = ContrastiveModel(resnet18(), MLPHead(512, 512, 128))
    h, z = model(x)            # pre-projection [B, 512], post-projection [B, 128]
    reps = collect_representations(model, x_test, ["encoder.layer3", "encoder", "head"])
    reps["encoder"].shape      # [N, 512]; "encoder.layer3" is average-pooled to [N, 256]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

from fastcl.models.heads import IdentityHead

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ContrastiveModel", "LayerTaps", "collect_representations"]

_POOLS = ("avg", "flatten")


class ContrastiveModel(nn.Module):
    """An encoder followed by a projection head.

    Train with a contrastive loss on ``z``; after training discard the head and use ``h``
    (Xue et al., ICLR 2024, explain why ``h`` transfers better).

    Args:
        encoder: maps ``x`` to ``h [B, rep_dim]``; any ``nn.Module`` (see
            :func:`fastcl.models.encoders.as_encoder` for backbones that return feature maps).
        head: maps ``h`` to ``z [B, out_dim]``; ``None`` means :class:`~fastcl.models.heads.IdentityHead`.

    Attributes:
        rep_dim: ``encoder.out_dim`` if the encoder defines it, else ``None``.
        out_dim: ``head.out_dim`` if defined (else ``rep_dim``).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        if head is None:
            head = IdentityHead()
        elif not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module or None, got {type(head).__name__}")
        rep_dim = getattr(encoder, "out_dim", None)
        head_in = getattr(head, "in_dim", None)
        if isinstance(rep_dim, int) and isinstance(head_in, int) and rep_dim != head_in:
            raise ValueError(f"head expects in_dim={head_in} but encoder.out_dim={rep_dim}")
        self.encoder = encoder
        self.head = head
        self.rep_dim: int | None = rep_dim if isinstance(rep_dim, int) else None
        head_out = getattr(head, "out_dim", None)
        self.out_dim: int | None = head_out if isinstance(head_out, int) else self.rep_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x -> (h [B, rep_dim], z [B, out_dim])``: pre- and post-projection outputs."""
        h = self.encoder(x)
        return h, self.head(h)

    def embed(self, x: Tensor) -> Tensor:
        """Pre-projection representation ``h [B, rep_dim]`` (the one to use downstream)."""
        return self.encoder(x)

    def project(self, h: Tensor) -> Tensor:
        """Apply the head: ``h [B, rep_dim] -> z [B, out_dim]``."""
        return self.head(h)

    def forward_views(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Encode ``V`` augmented views of a batch in a single pass (shared BatchNorm statistics).

        Args:
            views: ``V`` tensors of identical shape ``[B, ...]``.

        Returns:
            ``(h [B, V, rep_dim], z [B, V, out_dim])``; ``z`` is in the ``[bsz, n_views, dim]``
            layout taken by :class:`fastcl.SupConLoss`.
        """
        if isinstance(views, Tensor) or not isinstance(views, Sequence) or len(views) == 0:
            raise TypeError("views must be a non-empty sequence of tensors (one per view)")
        shape = views[0].shape
        for i, v in enumerate(views):
            if not isinstance(v, Tensor):
                raise TypeError(f"views[{i}] must be a torch.Tensor, got {type(v).__name__}")
            if v.shape != shape:
                raise ValueError(f"views[{i}] has shape {tuple(v.shape)}, expected {tuple(shape)}")
        n_views, bsz = len(views), shape[0]
        h, z = self(torch.cat(list(views), dim=0))
        return (h.reshape(n_views, bsz, math.prod(h.shape[1:])).transpose(0, 1),
                z.reshape(n_views, bsz, math.prod(z.shape[1:])).transpose(0, 1))


def _pool(out: Tensor, pool: str) -> Tensor:
    """Reduce ``[B, ...]`` to ``[B, D]`` in new memory (a later in-place op, e.g. ``ReLU(inplace=True)``
    on the tapped output, must not change the recorded values)."""
    if out.ndim > 2 and pool == "avg":
        return out.mean(dim=tuple(range(2, out.ndim)))
    return out.reshape(out.shape[0], math.prod(out.shape[1:])).clone()  # explicit size: an empty batch too


class LayerTaps:
    """Context manager recording the outputs of named submodules with forward hooks.

    Inside the ``with`` block, after each forward pass, ``taps.outputs[name]`` holds the detached
    output of ``model.get_submodule(name)`` reduced to ``[B, D]``: trailing dimensions of conv
    feature maps ``[B, C, H, W]`` are averaged (``pool="avg"``) or flattened (``pool="flatten"``).
    Hooks are removed on exit.

    Args:
        model: the model to tap.
        layers: submodule names as in ``model.named_modules()``, e.g. ``"encoder.layer3"``; for a
            :class:`ContrastiveModel`, ``"encoder"`` is ``h`` and ``"head"`` is ``z``.
        pool: ``"avg"`` or ``"flatten"``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], pool: str = "avg") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers or not all(isinstance(n, str) for n in layers):
            raise TypeError("layers must be a non-empty sequence of module names (str)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers contains duplicates: {layers}")
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        named = dict(model.named_modules())
        missing = [n for n in layers if n not in named]
        if missing:
            known = [n for n in named if n][:20]
            raise ValueError(f"layers {missing} not found in model; available names include {known}")
        self.model = model
        self.layers = layers
        self.pool = pool
        self.outputs: dict[str, Tensor] = {}
        self._modules = {n: named[n] for n in layers}
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, expected a Tensor")
            if name in self.outputs:
                raise RuntimeError(f"layer {name!r} ran more than once in one forward pass; "
                                   "its representation is ambiguous")
            self.outputs[name] = _pool(output.detach(), self.pool)
        return hook

    def clear(self) -> None:
        """Forget the recorded outputs (call before each forward pass)."""
        self.outputs = {}

    def __enter__(self) -> Self:
        self.clear()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


_Batch = Union[Tensor, Sequence[Any]]


def collect_representations(
    model: nn.Module,
    data: Tensor | Iterable[_Batch],
    layers: Sequence[str],
    *,
    pool: str = "avg",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    return_targets: bool = False,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
    """Run ``model`` over ``data`` and collect the outputs of named layers, for per-layer probes.

    The model runs in eval mode under ``torch.no_grad()``; every submodule's train/eval flag is
    restored afterwards.

    Args:
        model: the model; layer names are those of ``model.named_modules()``.
        data: a tensor ``[N, ...]`` (split into chunks of ``batch_size``) or an iterable of batches
            (e.g. a ``DataLoader``) where each batch is a tensor or a ``(inputs, targets, ...)``
            tuple/list.
        layers: names of the submodules to record (see :class:`LayerTaps`).
        pool: how to reduce feature maps ``[B, C, ...]`` to ``[B, D]``: ``"avg"`` or ``"flatten"``.
        batch_size: chunk size when ``data`` is a tensor.
        device: where to run; default: the device of the model's first parameter (else CPU).
        return_targets: also return the concatenated second element of each batch (a 0-d target counts as [1]).

    Returns:
        ``{name: Tensor [N, D_name]}`` on CPU, or ``(that dict, targets [N])`` when
        ``return_targets``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is None:
        param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    taps = LayerTaps(model, layers, pool=pool)  # validates model, layers and pool
    if isinstance(data, Tensor):
        if data.ndim < 1:
            raise ValueError("data must have a batch dimension")
        batches: Iterable[_Batch] = torch.split(data, batch_size)
    else:
        batches = data
    if return_targets and isinstance(data, Tensor):
        raise ValueError("return_targets=True needs batches of (inputs, targets); data is a plain tensor")

    chunks: dict[str, list[Tensor]] = {n: [] for n in taps.layers}
    targets: list[Tensor] = []
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), taps:
            for i, batch in enumerate(batches):
                if isinstance(batch, Tensor):
                    x, y = batch, None
                elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
                    x, y = batch[0], (batch[1] if len(batch) > 1 else None)
                else:
                    raise TypeError(f"batch {i} must be a Tensor or a (inputs, targets, ...) tuple, "
                                    f"got {type(batch).__name__}")
                if return_targets:
                    if not isinstance(y, Tensor):
                        raise TypeError(f"return_targets=True but batch {i} has no target tensor")
                    targets.append(torch.atleast_1d(y.detach().cpu()))  # a 0-d target of a one-sample batch
                taps.clear()
                model(x.to(device))
                for n in taps.layers:
                    if n not in taps.outputs:
                        raise RuntimeError(f"layer {n!r} did not run during the forward pass")
                    chunks[n].append(taps.outputs[n].cpu())
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not chunks[taps.layers[0]]:
        raise ValueError("data is empty")
    reps = {n: torch.cat(c) for n, c in chunks.items()}
    if return_targets:
        return reps, torch.cat(targets)
    return reps
