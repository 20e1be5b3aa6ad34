"""Input checks shared by the functional forms and the modules.

Every error names the argument and the shape or type that was expected, so a user can fix the call from the
message alone.
"""

from __future__ import annotations

import math
import numbers

import torch

BACKENDS = ("auto", "triton", "chunked", "reference")
CONTRAST_MODES = ("all", "one")


def check_positive(name: str, value: float) -> float:
    """A strictly positive finite real number (temperatures): int, float or a numpy scalar; not bool, str, tensor."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def check_temperature(name: str, value):
    """A temperature (or ``logit_scale``): a positive finite real number (:func:`check_positive`, returned as a
    float), or a 0-dim floating-point tensor, with or without grad, returned as it is.

    A tensor's value is checked here only where reading it costs no device sync and no graph break: eagerly, on the
    CPU. Elsewhere (an accelerator, or while compiling) the op turns a value that is not positive and finite into a
    NaN loss on the device (:func:`fastcl.ops.dispatch.inverse_temperature`)."""
    if not isinstance(value, torch.Tensor):
        return check_positive(name, value)
    if value.dim() != 0:
        raise ValueError(
            f"{name} must be a Python number or a 0-dim (scalar) tensor, got a tensor of shape {tuple(value.shape)}; "
            f"pass {name}.reshape(()) for a one-element tensor"
        )
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        number = float(value.detach())
        if not number > 0 or number == float("inf"):
            raise ValueError(f"{name} must be positive and finite, got {number}")
    return value


def check_int(value: object, name: str) -> int:
    """An integer (a Python or numpy int), returned as a Python int; bools are rejected."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_positive_int(value: object, name: str) -> int:
    """A strictly positive integer (sizes, counts; a Python or numpy int), returned as a Python int; bools are
    rejected."""
    value = check_int(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_contrast_mode(contrast_mode: str) -> str:
    if contrast_mode not in CONTRAST_MODES:
        raise ValueError(f"contrast_mode must be one of {CONTRAST_MODES}, got {contrast_mode!r}")
    return contrast_mode


def check_float_tensor(name: str, x: torch.Tensor, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {shape_doc}, got dtype {x.dtype}")


def check_embeddings(name: str, x: torch.Tensor, allow_empty: bool = False) -> None:
    """A ``[N, D]`` floating-point matrix with N >= 1 (N >= 0 with ``allow_empty``) and D >= 1."""
    check_float_tensor(name, x, "[N, D]")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
    if (x.shape[0] == 0 and not allow_empty) or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


def check_same_kind(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two embedding tensors that meet in one matrix product: same device, dtype and feature dim."""
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same feature dim, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_features(features: torch.Tensor, allow_empty: bool = False) -> torch.Tensor:
    """SupCon features ``[bsz, n_views, ...]`` -> ``[bsz, n_views, dim]`` (extra dims flattened).

    ``allow_empty`` accepts ``bsz == 0`` (a rank with no samples in a distributed loss); views and dim stay >= 1.
    """
    check_float_tensor("features", features, "[bsz, n_views, ...]")
    if features.dim() < 3:
        raise ValueError(
            f"features must be [bsz, n_views, ...] (at least 3 dimensions), got shape {tuple(features.shape)}"
        )
    if allow_empty and features.shape[0] == 0:
        if features.shape[1] == 0 or math.prod(features.shape[2:]) == 0:
            raise ValueError(f"features must have n_views >= 1 and dim >= 1, got shape {tuple(features.shape)}")
        return features.reshape(0, features.shape[1], math.prod(features.shape[2:]))
    if features.dim() > 3:
        features = features.reshape(features.shape[0], features.shape[1], -1)
    if features.shape[0] == 0 or features.shape[1] == 0 or features.shape[2] == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")
    return features


def check_labels(
    name: str, labels: torch.Tensor, expected_len: int, device: torch.device, allow_float: bool = False
) -> torch.Tensor:
    """Class labels ``[expected_len]`` (``[n, 1]`` accepted) -> int64 on ``device``.

    Integer and bool labels keep their values. With ``allow_float`` floating-point labels are accepted with
    SupContrast's meaning (``torch.eq``: equal values are positives) and become dense int64 ids
    (:func:`dense_label_ids`, no host sync); a NaN label equals nothing, so each NaN-labelled sample is its own class.
    """
    kind = "a real-valued (integer, bool or float)" if allow_float else "an integer (or bool)"
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {kind.split(' ', 1)[1]} labels of shape [{expected_len}]")
    if labels.is_complex() or (labels.is_floating_point() and not allow_float):
        raise TypeError(f"{name} must be {kind} tensor, got dtype {labels.dtype}")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if labels.dim() != 1 or labels.shape[0] != expected_len:
        raise ValueError(f"{name} must have shape [{expected_len}] (one per sample), got shape {tuple(labels.shape)}")
    labels = labels.to(device=device)
    if labels.is_floating_point():
        return dense_label_ids(labels)
    return labels.to(dtype=torch.int64)


def dense_label_ids(labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` real labels -> int64 ids in ``[0, N)``, equal values (``-0.0 == 0.0``) sharing an id.

    Sort, mark where the sorted value changes, cumulative sum, scatter back: static shapes, no host sync, so it
    runs inside a ``torch.compile`` graph and on CUDA without waiting for the GPU.
    """
    values, order = torch.sort(labels)
    changed = torch.cat([values.new_zeros(1, dtype=torch.bool), values[1:] != values[:-1]])
    sorted_ids = torch.cumsum(changed.to(torch.int64), 0)
    return torch.empty_like(sorted_ids).scatter_(0, order, sorted_ids)


def check_mask(mask: torch.Tensor, bsz: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``[bsz, bsz]`` positive-pair mask (bool or non-negative weights) -> ``dtype`` on ``device`` (the loss's compute
    dtype: float32, or float64 for float64 features, whose weights then enter the loss unrounded).

    Negative weights are a ``ValueError``: the loss is a weighted mean of log-probabilities, and a negative weight
    turns it into a reward for pushing that pair apart (the loss can go below 0 without bound), which is never what a
    positive-pair mask means; put such pairs in the denominator only (weight 0). Cost of the check: one min-reduction
    over the ``bsz x bsz`` mask, no temporary (small next to the ``(n_views * bsz)^2 * D`` loss) and, eagerly, one
    host sync (a scalar read; on CUDA it waits for the mask to be ready). Under ``torch.compile`` it is an in-graph assert
    (``torch._assert_async``) with no sync of its own.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape [{bsz}, {bsz}], got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"mask must be a real (bool, int or float) tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != (bsz, bsz):
        raise ValueError(f"mask must have shape [bsz, bsz] = [{bsz}, {bsz}], got {tuple(mask.shape)}")
    mask = mask.to(device=device, dtype=dtype).contiguous()
    message = "mask must hold non-negative weights (negative weights would reward separating that pair)"
    # amin: no [bsz, bsz] temporary (a NaN weight makes the minimum NaN; the loss is NaN then anyway)
    if torch.compiler.is_compiling():
        torch._assert_async(mask.amin() >= 0 if mask.numel() else mask.new_ones((), dtype=torch.bool), message)
    elif mask.numel() and bool(mask.amin() < 0):
        negative = mask.lt(0).nonzero()[0].tolist()
        raise ValueError(f"{message}; got mask{negative} = {mask[negative[0], negative[1]].item():.6g}")
    return mask


def check_label_indices(labels: torch.Tensor, n_query: int, n_key: int, device: torch.device) -> torch.Tensor:
    """InfoNCE positive indices ``[n_query]`` with values in ``[0, n_key)`` (one host sync eagerly; an in-graph
    assert under ``torch.compile``)."""
    labels = check_labels("labels", labels, n_query, device)
    if torch.compiler.is_compiling():
        # (a constant message: formatting the symbolic n_key into it would specialise the graph on the size)
        torch._assert_async(((labels >= 0) & (labels < n_key)).all(), "labels must index keys in [0, M)")
        return labels
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_key:
        raise ValueError(f"labels must index keys in [0, {n_key}), got values in [{lo}, {hi}]")
    return labels


def check_negatives(negatives, like: torch.Tensor, like_name: str):
    """Extra contrast rows ``[M, D]`` (M >= 0) with ``like``'s dtype, device and feature dim ``D``; None passes."""
    if negatives is None:
        return None
    check_embeddings("negatives", negatives, allow_empty=True)
    check_same_kind(like_name, like, "negatives", negatives)
    return negatives


def check_negative_labels(negative_labels, negatives, device: torch.device, allow_float: bool = False):
    """``negative_labels [M]`` for ``negatives [M, D]`` (None passes); an error without ``negatives``."""
    if negative_labels is None:
        return None
    if negatives is None:
        raise ValueError("negative_labels were given without negatives: pass negatives [M, D] with them")
    return check_labels("negative_labels", negative_labels, negatives.shape[0], device, allow_float=allow_float)


def check_margin(margin):
    """A false-negative margin: None or a finite real number (a similarity difference)."""
    if margin is None:
        return None
    if isinstance(margin, (bool, torch.Tensor)) or not isinstance(margin, numbers.Real):
        raise TypeError(f"false_negative_margin must be a real number or None, got {type(margin).__name__}")
    if not math.isfinite(float(margin)):
        raise ValueError(f"false_negative_margin must be finite, got {margin}")
    return float(margin)
