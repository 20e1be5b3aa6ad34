"""``nn.Module`` forms of the fastcl losses: thin wrappers over :mod:`fastcl.functional`."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from fastcl import _validation as V
from fastcl import functional as FF
from fastcl._sigmoid_inputs import check_weighting

__all__ = ["SupConLoss", "NTXentLoss", "InfoNCELoss", "SigLipLoss"]


def _check_distributed(gather_distributed: bool, backend: str) -> bool:
    if gather_distributed and backend == "reference":
        raise ValueError(
            "backend='reference' (the dense single-process formulation) has no distributed form; "
            "use 'auto', 'chunked' or 'triton' with gather_distributed=True"
        )
    return bool(gather_distributed)


def _distributed_repr(gather_distributed: bool) -> str:
    return ", gather_distributed=True" if gather_distributed else ""


def _temperature_repr(value) -> str:
    """A number as it is; a tensor (a learnable temperature) by kind, without reading its value from the device."""
    if not isinstance(value, torch.Tensor):
        return repr(value)
    return f"tensor({value.dtype}, requires_grad={value.requires_grad})"


class SupConLoss(nn.Module):
    """Supervised contrastive loss; a drop-in for SupContrast's ``SupConLoss`` (same constructor, same numbers).

    Args:
        temperature: softmax temperature (default 0.07), a number or a 0-dim tensor (see below).
        contrast_mode: ``'all'`` (every view is an anchor) or ``'one'`` (view 0 only).
        base_temperature: the loss is scaled by ``temperature / base_temperature``.
        normalize: L2-normalise the features inside the loss (default False, as SupContrast).
        backend: ``'auto'`` (Triton on CUDA, chunked elsewhere), ``'triton'``, ``'chunked'`` or ``'reference'``.
        gather_distributed: anchors are this rank's samples, the contrast set is the global batch of all ranks
            (``torch.distributed`` group ``group``), with exactly the gradients of one big batch after DDP's
            averaging (:mod:`fastcl.distributed`). Batch sizes may differ between ranks, 0 included; labels, not
            ``mask``.

    Shape:
        ``forward(features [bsz, n_views, ...], labels [bsz] = None, mask [bsz, bsz] = None, *, temperature=None)
        -> scalar``.

    Learnable temperature:
        A number or a 0-dim floating tensor: an ``nn.Parameter`` passed to the constructor is registered as this
        module's parameter; a tensor computed from other parameters (``1 / model.logit_scale.exp()``) belongs in
        each call, ``forward(..., temperature=t)``, which overrides the constructor's for that call.

    Example:
        >>> criterion = SupConLoss(temperature=0.1)
        >>> features = torch.nn.functional.normalize(torch.randn(32, 2, 128), dim=-1)
        >>> loss = criterion(features, torch.randint(0, 10, (32,)))
    """

    def __init__(
        self,
        temperature: Union[float, torch.Tensor] = 0.07,
        contrast_mode: str = "all",
        base_temperature: float = 0.07,
        *,
        normalize: bool = False,
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
    ) -> None:
        super().__init__()
        self.temperature = V.check_temperature("temperature", temperature)
        self.contrast_mode = V.check_contrast_mode(contrast_mode)
        self.base_temperature = V.check_positive("base_temperature", base_temperature)
        self.normalize = bool(normalize)
        self.backend = V.check_backend(backend)
        self.gather_distributed = _check_distributed(gather_distributed, backend)
        self.group = group

    def forward(
        self,
        features: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        *,
        temperature: Union[float, torch.Tensor, None] = None,
        negatives: Optional[torch.Tensor] = None,
        negative_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return FF.supcon_loss(
            features,
            labels,
            mask,
            negatives=negatives,
            negative_labels=negative_labels,
            temperature=self.temperature if temperature is None else temperature,
            contrast_mode=self.contrast_mode,
            base_temperature=self.base_temperature,
            normalize=self.normalize,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            group=self.group,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={_temperature_repr(self.temperature)}, contrast_mode={self.contrast_mode!r}, "
            f"base_temperature={self.base_temperature}, normalize={self.normalize}, backend={self.backend!r}"
        ) + _distributed_repr(self.gather_distributed)


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent loss over two views.

    Shape:
        ``forward(z_a [B, D], z_b [B, D]) -> scalar``; embeddings are L2-normalised inside unless ``normalize=False``.
        ``gather_distributed=True`` (``group``): negatives from the global batch of all ranks, as in ``SupConLoss``.
        ``forward(z_a, z_b, *, temperature=t)`` overrides the constructor's temperature for that call; either may be
        a 0-dim tensor (learnable), as in ``SupConLoss``.
    """

    def __init__(
        self,
        temperature: Union[float, torch.Tensor] = 0.5,
        *,
        normalize: bool = True,
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
    ) -> None:
        super().__init__()
        self.temperature = V.check_temperature("temperature", temperature)
        self.normalize = bool(normalize)
        self.backend = V.check_backend(backend)
        self.gather_distributed = _check_distributed(gather_distributed, backend)
        self.group = group

    def forward(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        *,
        temperature: Union[float, torch.Tensor, None] = None,
        negatives: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return FF.nt_xent_loss(
            z_a,
            z_b,
            negatives=negatives,
            temperature=self.temperature if temperature is None else temperature,
            normalize=self.normalize,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            group=self.group,
        )

    def extra_repr(self) -> str:
        return f"temperature={_temperature_repr(self.temperature)}, normalize={self.normalize}, backend={self.backend!r}" + (
            _distributed_repr(self.gather_distributed)
        )


class InfoNCELoss(nn.Module):
    """Two-tower (CLIP-style) InfoNCE loss.

    Shape:
        ``forward(query [B, D], key [M, D], labels [B] = None) -> scalar``; the positive of query i is key
        ``labels[i]`` (default i). ``symmetric=True`` (needs M == B, default pairing) averages both directions.
        ``gather_distributed=True`` (``group``): this rank's queries against the keys of all ranks (B and M may differ
        between ranks, 0 included); ``labels`` then index the global key set (all ranks' keys in rank order).
        ``forward(query, key, labels, *, temperature=t)`` or ``logit_scale=s`` (open_clip's multiplier ``1 / t``,
        e.g. ``model.logit_scale.exp()``) overrides the constructor's temperature for that call (not both); either
        may be a 0-dim tensor (learnable), as in ``SupConLoss``. ``forward(..., negatives=Q)``: extra keys
        ``[M, D]`` (a queue, hard negatives); with ``in_batch_negatives`` / ``false_negative_margin`` of the
        constructor as in :func:`fastcl.functional.info_nce_loss` (these need ``symmetric=False``: a ``ValueError``
        in the constructor otherwise).
    """

    def __init__(
        self,
        temperature: Union[float, torch.Tensor] = 0.07,
        *,
        symmetric: bool = True,
        normalize: bool = True,
        backend: str = "auto",
        gather_distributed: bool = False,
        group=None,
        in_batch_negatives: bool = True,
        false_negative_margin: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.in_batch_negatives = bool(in_batch_negatives)
        self.false_negative_margin = V.check_margin(false_negative_margin)
        self.temperature = V.check_temperature("temperature", temperature)
        self.symmetric = bool(symmetric)
        if self.symmetric and (not self.in_batch_negatives or self.false_negative_margin is not None):
            raise ValueError(
                "in_batch_negatives=False / false_negative_margin are columns of the query -> key direction only: "
                "pass symmetric=False with them"
            )
        self.normalize = bool(normalize)
        self.backend = V.check_backend(backend)
        self.gather_distributed = _check_distributed(gather_distributed, backend)
        self.group = group

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        temperature: Union[float, torch.Tensor, None] = None,
        logit_scale: Union[float, torch.Tensor, None] = None,
        negatives: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if temperature is None and logit_scale is None:
            temperature = self.temperature
        return FF.info_nce_loss(
            query,
            key,
            labels,
            negatives=negatives,
            in_batch_negatives=self.in_batch_negatives,
            false_negative_margin=self.false_negative_margin,
            temperature=temperature,
            logit_scale=logit_scale,
            symmetric=self.symmetric,
            normalize=self.normalize,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            group=self.group,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={_temperature_repr(self.temperature)}, symmetric={self.symmetric}, normalize={self.normalize}, "
            f"backend={self.backend!r}"
        ) + _distributed_repr(self.gather_distributed)


# ----------------------------------------------------------------------------------------------------------------
# The sigmoid (SigLIP) loss
# ----------------------------------------------------------------------------------------------------------------


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss, called as open_clip's ``SigLipLoss``: ``(image_features, text_features, logit_scale,
    logit_bias)``, with the same value and gradients (:func:`fastcl.functional.sigmoid_loss`).

    Args:
        gather_distributed: this rank's images against the texts of all ranks (``torch.distributed``, ``group``),
            with the gradients of one big batch after DDP's averaging; shards may be uneven or empty. Each rank
            returns ``W * (its rows' summed loss) / B_global``: equal to open_clip's ``world_size > 1`` value (any
            ``dist_impl``; its loss over ``B_local``) when the shards are equal, and that value times
            ``W * B_local / B_global`` otherwise.
        weighting: ``'uniform'``, ``'siglip_plus'`` or ``'siglip_plus_asymmetric'`` (SigLIP+'s positive weights).
        normalize: L2-normalise the features inside the loss (default False, as open_clip).
        backend: ``'auto'``, ``'triton'``, ``'chunked'`` or ``'reference'``.

    Shape:
        ``forward(image_features [N, D], text_features [M, D], logit_scale (0-dim), logit_bias (0-dim or None),
        labels=None [N], text_labels=None [M], output_dict=False) -> scalar`` (``{"contrastive_loss": loss}`` with
        ``output_dict``, as open_clip).

    Example:
        >>> criterion = SigLipLoss()
        >>> loss = criterion(img, txt, model.logit_scale.exp(), model.logit_bias)
    """

    def __init__(
        self,
        gather_distributed: bool = False,
        *,
        weighting: str = "uniform",
        normalize: bool = False,
        backend: str = "auto",
        group=None,
    ) -> None:
        super().__init__()
        self.weighting = check_weighting(weighting)
        self.normalize = bool(normalize)
        self.backend = V.check_backend(backend)
        self.gather_distributed = _check_distributed(gather_distributed, backend)
        self.group = group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias=None,
        output_dict: bool = False,
        *,
        labels: Optional[torch.Tensor] = None,
        text_labels: Optional[torch.Tensor] = None,
    ):
        loss = FF.sigmoid_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            labels,
            text_labels=text_labels,
            weighting=self.weighting,
            normalize=self.normalize,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            group=self.group,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"weighting={self.weighting!r}, normalize={self.normalize}, backend={self.backend!r}" + (
            _distributed_repr(self.gather_distributed)
        )
