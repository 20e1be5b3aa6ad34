"""Input checks of the sigmoid (SigLIP) loss, shared by its functional form, its module and its gathered form
(:func:`scalar_tensor` also by ``ClipLoss``'s ``logit_bias``).

Every error names the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from fastcl import _validation as V
from fastcl.ops.sigmoid.problem import WEIGHTINGS, SigmoidProblem, compute_dtype, siglip_plus_weights


class SigmoidInputs(NamedTuple):
    """The checked inputs of one call: towers, 0-dim scale and bias, int64 labels of each side (both None: the
    default pairing, image i with text i)."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor
    image_labels: Optional[torch.Tensor]
    text_labels: Optional[torch.Tensor]


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return weighting


def check_logit_param(name: str, value, like: torch.Tensor, positive: bool) -> torch.Tensor:
    """``logit_scale`` / ``logit_bias`` -> a 0-dim floating tensor on ``like``'s device (a Python number becomes a
    constant tensor of the compute dtype; a tensor keeps its dtype and its autograd history).

    Values: finite, and > 0 for the scale. Checked eagerly on CPU tensors (a scalar read); on an accelerator and while
    compiling by a device assert (no host read; on an accelerator it fails at the next synchronisation).
    """
    if value is None and not positive:
        return torch.zeros((), dtype=compute_dtype(like), device=like.device)
    value = scalar_tensor(name, value, like)
    _check_value(name, value, positive)
    return value


def scalar_tensor(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A real number or a one-element floating-point tensor -> a 0-dim tensor on ``like``'s device (a number becomes
    a constant tensor of the compute dtype; a tensor keeps its dtype and its autograd history); its value is not
    read. Raises TypeError / ValueError naming ``name`` for anything else."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = torch.tensor(float(value), dtype=compute_dtype(like), device=like.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a 0-dim floating-point tensor (or a real number), got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a scalar (a 0-dim tensor), got shape {tuple(value.shape)}")
    if value.dim() != 0:  # (a view of a 0-dim tensor would add an autograd node per call)
        value = value.reshape(())
    if value.device != like.device:
        value = value.to(like.device)
    return value


def _check_value(name: str, value: torch.Tensor, positive: bool) -> None:
    rule = "finite and > 0" if positive else "finite"
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        number = value.item()
        if not math.isfinite(number) or (positive and not number > 0):
            raise ValueError(f"{name} must be {rule}, got {number}")
        return
    with torch.no_grad():
        ok = torch.isfinite(value) & (value > 0) if positive else torch.isfinite(value)
        torch._assert_async(ok, f"{name} must be {rule}")


def check_inputs(image, text, logit_scale, logit_bias, labels, text_labels, allow_empty=False) -> SigmoidInputs:
    """Check one call's tensors (raises TypeError / ValueError naming the argument)."""
    V.check_embeddings("image_features", image, allow_empty=allow_empty)
    V.check_embeddings("text_features", text, allow_empty=allow_empty)
    V.check_same_kind("image_features", image, "text_features", text)
    scale = check_logit_param("logit_scale", logit_scale, text, positive=True)
    bias = check_logit_param("logit_bias", logit_bias, text, positive=False)
    n_image, n_text = image.shape[0], text.shape[0]
    if text_labels is not None:
        if labels is None:
            raise ValueError("text_labels needs labels: pass labels [N] for the images with text_labels [M]")
        image_labels = V.check_labels("labels", labels, n_image, image.device)
        text_labels = V.check_labels("text_labels", text_labels, n_text, text.device)
        return SigmoidInputs(image, text, scale, bias, image_labels, text_labels)
    if n_image != n_text:
        what = "labels [N] alone (labelling both towers)" if labels is not None else "the default pairing (i <-> i)"
        raise ValueError(
            f"{what} needs as many texts as images, got image_features {tuple(image.shape)} and text_features "
            f"{tuple(text.shape)}; pass labels [N] and text_labels [M] for a rectangular batch"
        )
    if labels is None:
        return SigmoidInputs(image, text, scale, bias, None, None)
    image_labels = V.check_labels("labels", labels, n_image, image.device)
    return SigmoidInputs(image, text, scale, bias, image_labels, image_labels)


def make_problem(
    inputs: SigmoidInputs,
    weighting: str,
    norm: float,
    pair_offset: int = 0,
    all_image_labels=None,
    image_offset: int = 0,
) -> SigmoidProblem:
    """The :class:`SigmoidProblem` of checked inputs. SigLIP+ weights count group members over
    ``all_image_labels`` (the global images; default this call's) and the given texts; without labels every group
    has one member on each side, so SigLIP+ is the uniform loss (``alpha + beta = 1``)."""
    row_weight = col_weight = None
    if inputs.image_labels is not None and weighting != "uniform":
        every_image = inputs.image_labels if all_image_labels is None else all_image_labels
        rows, cols = siglip_plus_weights(every_image, inputs.text_labels, weighting)
        dtype = compute_dtype(inputs.text)
        row_weight = rows[image_offset : image_offset + inputs.image.shape[0]].to(dtype)
        col_weight = cols.to(dtype)
    return SigmoidProblem(
        inputs.image,
        inputs.text,
        inputs.logit_scale,
        inputs.logit_bias,
        inputs.image_labels,
        inputs.text_labels,
        row_weight,
        col_weight,
        float(norm),
        pair_offset,
    )
