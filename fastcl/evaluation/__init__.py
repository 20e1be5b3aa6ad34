"""Evaluation of frozen representations.

* :mod:`fastcl.evaluation.probes`: linear probes, the group-balanced (DFR) probe, one probe per layer.
* :mod:`fastcl.evaluation.shortcut_metrics`: UrbanCars multi-shortcut metrics, watermark metrics, group ids.
* :mod:`fastcl.evaluation.lle`: the Last Layer Ensemble head, its loss and its fit on frozen features.
"""

from fastcl.evaluation.lle import LastLayerEnsemble, fit_last_layer_ensemble, last_layer_ensemble_loss
from fastcl.evaluation.probes import (
    LinearProbeResult,
    group_balanced_linear_probe,
    linear_probe,
    linear_probe_layers,
)
from fastcl.evaluation.shortcut_metrics import group_ids, multi_shortcut_metrics, watermark_metrics

__all__ = [
    "LastLayerEnsemble",
    "LinearProbeResult",
    "fit_last_layer_ensemble",
    "group_balanced_linear_probe",
    "group_ids",
    "last_layer_ensemble_loss",
    "linear_probe",
    "linear_probe_layers",
    "multi_shortcut_metrics",
    "watermark_metrics",
]
