"""SimCLR-style augmentations as batched tensor ops on the training device (no torchvision).

Every random choice is made per sample, in one batched draw from a ``torch.Generator``, and kept in an
:class:`AugmentParams` record; :meth:`BatchAugment.apply` is then a deterministic function of the images and
the record. Splitting the two matters for gradient caching: the parameters of a whole batch are drawn once,
and any slice of the batch can be augmented (and re-augmented) identically::

    aug = BatchAugment(AugmentConfig(), mean=(0.5,) * 3, std=(0.25,) * 3)
    g = torch.Generator().manual_seed(0)
    params = aug.sample(len(images), g)              # per-sample crop / flip / jitter / grayscale
    view = aug.apply(images, params)                 # [B, C, S, S] normalised float
    assert torch.equal(aug.apply(images[:8], params[:8]), view[:8])

The ops, in order: random resized crop (scale and aspect ratio as torchvision's, sampled without rejection),
horizontal flip, colour jitter (brightness, contrast, saturation, hue, applied with probability
``jitter_p``), random grayscale, then per-channel normalisation. Images may be ``uint8`` (0..255) or float in
``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AugmentConfig", "AugmentParams", "BatchAugment", "to_float", "normalize"]

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: hue rotation is a rotation of the (I, Q) chroma plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the augmentations (SimCLR's CIFAR recipe by default).

    Attributes:
        crop_scale: range of the crop area as a fraction of the image area.
        crop_ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of applying colour jitter to a sample.
        brightness, contrast, saturation: factors are drawn from ``[1 - s, 1 + s]``.
        hue: hue shift drawn from ``[-hue, hue]`` in turns (0.5 = 180 degrees).
        grayscale_p: probability of converting a sample to grayscale (all channels = luma).
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5], got {self.hue}")


@dataclass
class AugmentParams:
    """Per-sample augmentation parameters of a batch of ``B`` samples (all tensors have leading dim ``B``).

    Attributes:
        theta: ``[B, 2, 3]`` affine maps from output to input coordinates (crop and flip), as
            ``F.affine_grid`` takes them.
        jitter: ``[B, 4]`` brightness, contrast, saturation factors and hue shift (identity ``1, 1, 1, 0``
            for samples without jitter).
        gray: ``[B]`` 1.0 for samples converted to grayscale, else 0.0.

    Index or slice it like a tensor: ``params[4:8]`` is the record of samples 4 to 7.
    """

    theta: Tensor
    jitter: Tensor
    gray: Tensor

    def __len__(self) -> int:
        return self.theta.shape[0]

    def __getitem__(self, index: slice | Tensor) -> AugmentParams:
        return AugmentParams(*(getattr(self, f.name)[index] for f in fields(self)))

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(*(getattr(self, f.name).to(device) for f in fields(self)))


def to_float(images: Tensor) -> Tensor:
    """``uint8`` images (0..255) -> float32 in ``[0, 1]``; float images are returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std`` for ``x [B, C, H, W]``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _gray(x: Tensor) -> Tensor:
    """Luma ``[B, 1, H, W]`` of RGB ``[B, 3, H, W]`` (a single channel is its own luma)."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


class BatchAugment:
    """Batched, seeded augmentation pipeline; see the module docstring.

    Args:
        config: augmentation strengths.
        mean, std: per-channel normalisation applied last (after augmentation).
        out_size: side of the output views (default: the input's height).
    """

    def __init__(
        self,
        config: AugmentConfig | None = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        out_size: int | None = None,
    ) -> None:
        self.config = config if config is not None else AugmentConfig()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std must have one entry per channel and std > 0, got {mean}, {std}")
        self.out_size = out_size

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str | None = None) -> AugmentParams:
        """Draw the parameters of ``n`` samples from ``generator`` (on the generator's device by default)."""
        c = self.config
        dev = torch.device(device) if device is not None else generator.device
        g = generator
        # random resized crop: area fraction and log aspect ratio, then clamp so the crop fits the image
        area = _uniform(n, c.crop_scale[0], c.crop_scale[1], g, dev)
        log_r = _uniform(n, math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1]), g, dev)
        ratio = torch.exp(log_r)
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (1 - w) * (2 * torch.rand(n, generator=g, device=dev) - 1)  # centre in [-1, 1] coordinates
        cy = (1 - h) * (2 * torch.rand(n, generator=g, device=dev) - 1)
        flip = torch.rand(n, generator=g, device=dev) < c.flip_p
        sx = torch.where(flip, -w, w)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        # colour jitter (identity where not applied)
        on = torch.rand(n, generator=g, device=dev) < c.jitter_p
        b = _uniform(n, 1 - c.brightness, 1 + c.brightness, g, dev)
        ct = _uniform(n, 1 - c.contrast, 1 + c.contrast, g, dev)
        s = _uniform(n, 1 - c.saturation, 1 + c.saturation, g, dev)
        hue = _uniform(n, -c.hue, c.hue, g, dev)
        ident = torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev)
        jitter = torch.where(on[:, None], torch.stack([b, ct, s, hue], 1), ident)
        gray = (torch.rand(n, generator=g, device=dev) < c.grayscale_p).float()
        return AugmentParams(theta, jitter, gray)

    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Augment ``images [B, C, H, W]`` (uint8 or float in [0, 1]) with ``params`` (length ``B``);
        returns normalised float32 views ``[B, C, S, S]``."""
        if images.ndim != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
        if len(params) != images.shape[0]:
            raise ValueError(f"params describe {len(params)} samples but images has {images.shape[0]}")
        params = params.to(images.device)
        x = to_float(images)
        n, ch = x.shape[:2]
        size = self.out_size or x.shape[-2]
        grid = F.affine_grid(params.theta.to(x.dtype), [n, ch, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if ch == 3:
            x = self._jitter(x, params.jitter.to(x.dtype))
            g = params.gray.to(x.dtype).view(-1, 1, 1, 1)
            x = x + g * (_gray(x) - x)
        else:  # single-channel images: brightness and contrast only
            j = params.jitter.to(x.dtype)
            x = (x * j[:, 0].view(-1, 1, 1, 1)).clamp(0, 1)
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - m) * j[:, 1].view(-1, 1, 1, 1) + m).clamp(0, 1)
        return normalize(x, self.mean, self.std)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Sample parameters for ``images`` and apply them."""
        return self.apply(images, self.sample(images.shape[0], generator, device=images.device))

    def eval_transform(self, images: Tensor) -> Tensor:
        """The un-augmented view used for evaluation: float, resized to ``out_size`` if set, normalised."""
        x = to_float(images)
        if self.out_size is not None and x.shape[-1] != self.out_size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return normalize(x, self.mean, self.std)

    @staticmethod
    def _jitter(x: Tensor, j: Tensor) -> Tensor:
        b, c, s, h = (j[:, i].view(-1, 1, 1, 1) for i in range(4))
        x = (x * b).clamp(0, 1)
        m = _gray(x).mean(dim=(2, 3), keepdim=True)
        x = ((x - m) * c + m).clamp(0, 1)
        g = _gray(x)
        x = ((x - g) * s + g).clamp(0, 1)
        # hue: rotate the chroma plane of YIQ by 2 * pi * h
        to_yiq = _RGB2YIQ.to(x)
        to_rgb = _YIQ2RGB.to(x)
        yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
        ang = 2 * math.pi * h
        cos, sin = torch.cos(ang), torch.sin(ang)
        i, q = yiq[:, 1:2], yiq[:, 2:3]
        yiq = torch.cat([yiq[:, :1], cos * i - sin * q, sin * i + cos * q], dim=1)
        return torch.einsum("ij,bjhw->bihw", to_rgb, yiq).clamp(0, 1)
