"""``fastcl.ClipLoss``: open_clip's ``ClipLoss`` call on fastcl's fused InfoNCE op, learnable ``logit_scale`` included.

The constructor and ``forward`` are open_clip's (``open_clip.loss.ClipLoss``), and so are the numbers each rank gets,
for every ``(local_loss, gather_with_grad)`` setting; only the similarity matrix is never formed. What a rank returns
and which gradient it keeps (B rows per rank, W ranks, ``L`` the loss of one process on the concatenated batch):

=========================  =======================  ============================================================
``local_loss``,            rank r returns           rank r's gradients (before DDP averages them over ranks)
``gather_with_grad``
=========================  =======================  ============================================================
False, False               ``L``                    features: ``dL/dx_r``; ``logit_scale``: ``dL/ds``
False, True                ``L``                    features: ``W dL/dx_r``; ``logit_scale``: ``dL/ds``
True, True                 ``L_r``, its rows'       features: ``W dL/dx_r``; ``logit_scale``: ``dL_r/ds``
                           mean (``mean_r L_r = L``)
True, False                ``L_r``                  features: only from its own rows as anchors; ``dL_r/ds``
=========================  =======================  ============================================================

``local_loss=True, gather_with_grad=True`` is exactly fastcl's gathered op
(``info_nce_loss(..., gather_distributed=True)``, :mod:`fastcl.distributed`): each rank scores only its own rows
against everyone's (``O(B * W B)`` per rank instead of ``O((W B)^2)``), and DDP's average gives the one-process
gradients. With ``local_loss=False`` every rank computes the whole ``W B x W B`` loss, as open_clip does.

Uneven shards (open_clip's labels assume equal ones; fastcl takes any counts, 0 included): ``local_loss=False`` gives
``L`` of the concatenated batch exactly as above; ``local_loss=True`` returns fastcl's gathered convention,
``L_r = W (B_r / B) mean_{i on r} loss_i`` (equal to open_clip's for equal shards), so ``mean_r L_r = L`` and
``sum_r dL_r/ds = W dL/ds``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from fastcl import _sigmoid_inputs as SI
from fastcl import _validation as V
from fastcl import functional as FF
from fastcl.distributed import _meta_device, _rank_and_world, all_gather_with_grad

__all__ = ["ClipLoss"]


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``: CLIP's symmetric InfoNCE with a learnable ``logit_scale``, one GPU or gathered.

    Args:
        local_loss: each rank's rows against all ranks' rows (labels offset by the rank), instead of the whole
            global matrix on every rank.
        gather_with_grad: the gathered rows carry gradients back to their ranks (a reduce-scatter).
        cache_labels: accepted for open_clip compatibility (fastcl forms no label tensor).
        rank, world_size: this process's rank and the number of ranks in ``group`` (ints); checked against
            ``torch.distributed`` when ``world_size > 1``.
        use_horovod: not supported (``torch.distributed`` only).
        group: the process group (default: the world).
        backend: fastcl's backend (``'auto'``, ``'chunked'``, ``'triton'``; ``'reference'`` in one process or
            with ``local_loss=False``).

    Shape:
        ``forward(image_features [B, D], text_features [B, D], logit_scale, logit_bias=None, output_dict=False)``:
        normalised features as open_clip passes them (no normalisation here), ``logit_scale`` a number or a 0-dim
        tensor (``model.logit_scale.exp()``). Returns the scalar loss, or ``{"contrastive_loss": loss}``. A
        ``logit_bias`` (a number or a 0-dim tensor) adds the same constant to every logit, which a softmax ignores:
        the loss is unchanged and the bias gets a zero gradient (as open_clip's, up to rounding).

    Example:
        >>> loss = fastcl.ClipLoss()(img, txt, model.logit_scale.exp())
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        group=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("fastcl.ClipLoss runs on torch.distributed: use_horovod=True is not supported")
        rank, world_size = V.check_int(rank, "rank"), V.check_int(world_size, "world_size")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        V.check_backend(backend)
        if backend == "reference" and local_loss and world_size > 1:
            raise ValueError(
                "backend='reference' (the dense single-process formulation) has no distributed form; "
                "use 'auto', 'chunked' or 'triton' with local_loss=True and world_size > 1"
            )
        self.local_loss, self.gather_with_grad, self.cache_labels = bool(local_loss), bool(gather_with_grad), cache_labels
        self.rank, self.world_size, self.group, self.backend = rank, world_size, group, backend

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias: Optional[torch.Tensor] = None,
        output_dict: bool = False,
    ):
        loss = self._loss(image_features, text_features, logit_scale)
        if logit_bias is not None:  # (softmax is shift-invariant: no effect on the loss, a zero gradient)
            loss = loss + SI.scalar_tensor("logit_bias", logit_bias, text_features).to(loss.dtype).mul(0)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
            f"world_size={self.world_size}, backend={self.backend!r}"
        )

    def _loss(self, image, text, logit_scale):
        logit_scale = V.check_temperature("logit_scale", logit_scale)
        kwargs = dict(logit_scale=logit_scale, normalize=False, backend=self.backend)
        if self.world_size == 1:
            return FF.info_nce_loss(image, text, **kwargs)
        self._check_world()
        if self.local_loss:
            return _local_loss(image, text, self.gather_with_grad, self.group, kwargs)
        all_image = self._gathered(image)
        all_text = self._gathered(text)
        return FF.info_nce_loss(all_image, all_text, **kwargs)

    def _check_world(self):
        rank, world = _rank_and_world(self.group)
        if (rank, world) != (self.rank, self.world_size):
            raise ValueError(
                f"ClipLoss(rank={self.rank}, world_size={self.world_size}) does not match the process group "
                f"(rank {rank} of {world}); pass the group's rank and size"
            )

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in rank order: with gradients to their ranks (``gather_with_grad``), else constants
        except this rank's own rows (open_clip's ``gather_features`` with ``local_loss=False``)."""
        if self.gather_with_grad:
            return all_gather_with_grad(x, self.group)
        gathered = all_gather_with_grad(x.detach(), self.group)
        counts = _row_counts(x.shape[0], self.group, self.world_size)
        start = sum(counts[: self.rank])
        return torch.cat([gathered[:start], x, gathered[start + x.shape[0] :]])


def _local_loss(image, text, gather_with_grad, group, kwargs):
    """Each rank's rows against all ranks' rows: fastcl's gathered op (the gathered rows constants without
    ``gather_with_grad``)."""
    from fastcl.distributed import info_nce_loss_distributed

    scale = kwargs["logit_scale"]
    temperature = torch.reciprocal(scale) if isinstance(scale, torch.Tensor) else 1.0 / scale
    return info_nce_loss_distributed(
        image,
        text,
        temperature=temperature,
        normalize=False,
        backend=kwargs["backend"],
        group=group,
        _contrast_grad=gather_with_grad,
    )


def _row_counts(n: int, group, world: int):
    """Every rank's row count (one all-gather of one int64 each)."""
    local = torch.tensor([n], dtype=torch.int64, device=_meta_device(group))
    counts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(counts, local, group=group)
    return [int(c) for c in counts]
