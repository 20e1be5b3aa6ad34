"""The models of the paper code: encoders, projection heads and the encoder + head model.

* :mod:`fastcl.models.encoders`: backbones that map images to a representation ``h`` (ConvNet, ResNets, MLP).
* :mod:`fastcl.models.heads`: projection heads ``h -> z`` (linear, MLP, fixed reweighting, identity).
* :mod:`fastcl.models.contrastive`: :class:`ContrastiveModel` (``x -> (h, z)``) and
  :func:`collect_representations` (per-layer features of any model).
"""

from fastcl.models import encoders, heads
from fastcl.models.contrastive import ContrastiveModel, LayerTaps, collect_representations

__all__ = ["ContrastiveModel", "LayerTaps", "collect_representations", "encoders", "heads"]
