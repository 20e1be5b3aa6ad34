"""fastcl: fused, memory-efficient contrastive losses for PyTorch.

>>> from fastcl import SupConLoss
>>> loss = SupConLoss(temperature=0.1)(features, labels)   # features [bsz, n_views, dim]
"""

from fastcl import functional
from fastcl.clip import ClipLoss
from fastcl.losses import InfoNCELoss, NTXentLoss, SigLipLoss, SupConLoss
from fastcl.memory_queue import MemoryQueue
from fastcl.models import ContrastiveModel, collect_representations, encoders, heads

__version__ = "0.1.0"

__all__ = [
    "SupConLoss",
    "NTXentLoss",
    "InfoNCELoss",
    "ClipLoss",
    "SigLipLoss",
    "MemoryQueue",
    "ContrastiveModel",
    "collect_representations",
    "functional",
    "encoders",
    "heads",
    "__version__",
]
