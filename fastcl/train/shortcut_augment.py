"""Shortcut-breaking augmentations for ``spurious-cues`` images: exact composites from the generator's layers.

Each augmentation breaks one cue of :func:`fastcl.train.data.make_spurious_cues` and keeps everything else, byte for
byte, as Whac-A-Mole's (Li et al., CVPR 2023) distribution shifts do for UrbanCars and ImageNet-W:

* :func:`swap_background`: the background texture is re-rendered for another cue class (same period, phase and tint);
  the core object, the co-occurring object, the noise and the watermark are kept.
* :func:`swap_coobj`: the co-occurring object becomes the form and colour of another cue class, at the same place and
  size; :func:`remove_coobj` takes it away.
* :func:`insert_random_watermark`: a random translucent text watermark on every image (random glyphs, size, height
  and opacity, as ImageNet-W's watermark augmentation draws random characters, font size, position and opacity), on top
  of any watermark the image already carries; :func:`insert_watermark`: the dataset's own fixed watermark
  (:func:`fastcl.train.data.add_watermark`), the one the study puts on the test images.

The generator's layers (``make_spurious_cues(..., return_layers=True)``) make these exact composites: an image is
recomposed from the same layers with one of them replaced, so every pixel the replaced cue does not reach keeps its
value. Randomness is split from the operation, as in :mod:`fastcl.train.augment`: :func:`sample_cue_swap` draws the new
cue class of every sample from a generator in one batched draw, and the swaps are deterministic functions of the images,
the layers and those draws, so a batch gives the same images as its samples one by one::

    train, layers = make_spurious_cues(4096, seed=0, split="train", return_layers=True)
    g = torch.Generator().manual_seed(0)
    params = sample_cue_swap(train.bg, classes=2, generator=g)
    shifted, shifted_layers = swap_background(train, layers, params)
    assert (shifted.bg != train.bg).all()
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from fastcl.train.data import (
    CueLayers,
    ImageSet,
    add_watermark,
    compose_cue_layers,
    render_background,
    render_coobj,
)

__all__ = [
    "SwapParams",
    "WatermarkParams",
    "background_region",
    "coobj_region",
    "insert_random_watermark",
    "insert_watermark",
    "random_watermark_masks",
    "remove_coobj",
    "sample_cue_swap",
    "sample_watermark",
    "swap_background",
    "swap_coobj",
]


@dataclass
class SwapParams:
    """Per-sample draws of a cue swap (leading dim ``N``).

    Attributes:
        target: ``[N]`` int64, the new cue class (always different from the current one).
        apply: ``[N]`` bool, whether the sample is swapped (:func:`sample_cue_swap` swaps every sample; samples with
            ``False`` are returned unchanged).
    """

    target: Tensor
    apply: Tensor

    def __len__(self) -> int:
        return self.target.shape[0]

    def __getitem__(self, index: slice | Tensor) -> SwapParams:
        return SwapParams(*(getattr(self, f.name)[index] for f in fields(self)))


def sample_cue_swap(cue: Tensor, classes: int, generator: torch.Generator) -> SwapParams:
    """Draw a new cue class for every sample, uniformly among the ``classes - 1`` classes other than its current
    one ``cue [N]``: the cue always changes, so no swapped image equals its source.

    With two classes the new cue is the other class: where the original cue agreed with the label (a fraction
    ``cue_agreement`` of the training images) it now conflicts with it, and the other way round. Whac-A-Mole's
    UrbanCars augmentation takes the cue from a random training image of the other class, whose cue agrees with that
    class at the same rate: the augmented set's cue conflicts with the label for the same fraction of the images.
    """
    if not isinstance(cue, Tensor) or cue.ndim != 1 or cue.dtype.is_floating_point:
        raise ValueError(f"cue must be an integer tensor [N], got {getattr(cue, 'dtype', type(cue).__name__)}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes must be an int >= 2, got {classes!r}")
    if cue.numel() and (int(cue.min()) < 0 or int(cue.max()) >= classes):
        raise ValueError(f"cue values must lie in [0, {classes}), got [{int(cue.min())}, {int(cue.max())}]")
    n = cue.shape[0]
    target = (cue.cpu().long() + torch.randint(1, classes, (n,), generator=generator)) % classes
    return SwapParams(target, torch.ones(n, dtype=torch.bool))


def _check(data: ImageSet, layers: CueLayers, params: SwapParams | None = None) -> None:
    if not isinstance(data, ImageSet) or not isinstance(layers, CueLayers):
        raise TypeError("data must be an ImageSet and layers the CueLayers of the same images "
                        "(make_spurious_cues(..., return_layers=True))")
    if len(layers) != len(data) or layers.background.shape[-1] != data.images.shape[-1]:
        raise ValueError(f"layers describe {len(layers)} images of side {layers.background.shape[-1]}, data has "
                         f"{len(data)} of side {data.images.shape[-1]}")
    if data.bg is None or data.coobj is None:
        raise ValueError("data must carry the cue classes bg and coobj (a spurious-cues ImageSet)")
    if params is not None and len(params) != len(data):
        raise ValueError(f"params describe {len(params)} samples but data has {len(data)}")


def _recompose(data: ImageSet, new_layers: CueLayers, apply: Tensor, watermark_opacity: float) -> Tensor:
    images = compose_cue_layers(new_layers)
    if data.watermark is not None:
        images = add_watermark(images, data.watermark, opacity=watermark_opacity)
    return torch.where(apply.view(-1, 1, 1, 1), images, data.images)


def background_region(layers: CueLayers) -> Tensor:
    """``[N, S, S]`` bool: the pixels a background swap can change (the background shows through the co-object and
    the core object, ``(1 - coobj_alpha) * (1 - core_alpha) > 0``)."""
    return ((1 - layers.coobj_alpha) * (1 - layers.core_alpha) > 0)[:, 0]


def coobj_region(before: CueLayers, after: CueLayers) -> Tensor:
    """``[N, S, S]`` bool: the pixels a co-object swap from ``before`` to ``after`` can change (covered by the old or
    the new co-object and not fully covered by the core object)."""
    covered = (before.coobj_alpha > 0) | (after.coobj_alpha > 0)
    return (covered & (before.core_alpha < 1))[:, 0]


def swap_background(data: ImageSet, layers: CueLayers, params: SwapParams, *,
                    watermark_opacity: float = 0.5) -> tuple[ImageSet, CueLayers]:
    """Replace the background of every sample with ``params.apply`` by the texture of cue class ``params.target``.

    Args:
        data: spurious-cues images with their cue metadata (``bg``, ``coobj``, optional ``watermark``).
        layers: their :class:`~fastcl.train.data.CueLayers`.
        params: from :func:`sample_cue_swap` on ``data.bg``.
        watermark_opacity: opacity the dataset's watermark was drawn with (re-applied where ``data.watermark``).

    Returns:
        ``(images, layers)`` after the swap: ``bg`` and ``bg_aligned`` updated, everything else as given.
    """
    _check(data, layers, params)
    apply = params.apply.to(torch.bool)
    new_bg = torch.where(apply, params.target, data.bg)
    background = render_background(new_bg, layers.period, layers.phase, layers.tint, data.images.shape[-1])
    background = torch.where(apply.view(-1, 1, 1, 1), background, layers.background)
    new_layers = layers.replace(background=background)
    images = _recompose(data, new_layers, apply, watermark_opacity)
    out = ImageSet(images, data.labels, new_bg == data.labels, data.coobj_aligned, new_bg, data.coobj, data.watermark)
    return out, new_layers


def swap_coobj(data: ImageSet, layers: CueLayers, params: SwapParams, *,
               watermark_opacity: float = 0.5) -> tuple[ImageSet, CueLayers]:
    """Replace the co-occurring object of every sample with ``params.apply`` by the form and colour of cue class
    ``params.target``, at the same centre and radius; as :func:`swap_background` otherwise (``coobj`` and
    ``coobj_aligned`` updated)."""
    _check(data, layers, params)
    apply = params.apply.to(torch.bool)
    new_co = torch.where(apply, params.target, data.coobj)
    alpha, colour = render_coobj(new_co, layers.coobj_centre, layers.coobj_radius, data.images.shape[-1])
    a = apply.view(-1, 1, 1, 1)
    new_layers = layers.replace(coobj_alpha=torch.where(a, alpha, layers.coobj_alpha),
                                coobj_colour=torch.where(a, colour, layers.coobj_colour))
    images = _recompose(data, new_layers, apply, watermark_opacity)
    out = ImageSet(images, data.labels, data.bg_aligned, new_co == data.labels, data.bg, new_co, data.watermark)
    return out, new_layers


def remove_coobj(data: ImageSet, layers: CueLayers, which: Tensor | None = None, *,
                 watermark_opacity: float = 0.5) -> tuple[ImageSet, CueLayers]:
    """Take the co-occurring object away (the background shows where it was) from the samples with ``which [N]``
    (default: all). Removed cues get ``coobj = -1`` and ``coobj_aligned = False``."""
    _check(data, layers)
    n = len(data)
    apply = torch.ones(n, dtype=torch.bool) if which is None else which
    if not isinstance(apply, Tensor) or apply.shape != (n,) or apply.dtype != torch.bool:
        raise ValueError(f"which must be a bool tensor of shape [{n}]")
    a = apply.view(-1, 1, 1, 1)
    new_layers = layers.replace(coobj_alpha=torch.where(a, torch.zeros_like(layers.coobj_alpha), layers.coobj_alpha))
    images = _recompose(data, new_layers, apply, watermark_opacity)
    new_co = torch.where(apply, torch.full_like(data.coobj, -1), data.coobj)
    out = ImageSet(images, data.labels, data.bg_aligned, data.coobj_aligned & ~apply, data.bg, new_co, data.watermark)
    return out, new_layers


def insert_watermark(data: ImageSet, which: Tensor | None = None, *, opacity: float = 0.5) -> ImageSet:
    """The watermark on the samples with ``which [N]`` (default: all); ``watermark`` metadata updated. Images that
    already carry it are returned unchanged (the composite is applied to the clean image only once)."""
    n = len(data)
    which = torch.ones(n, dtype=torch.bool) if which is None else which
    if not isinstance(which, Tensor) or which.shape != (n,) or which.dtype != torch.bool:
        raise ValueError(f"which must be a bool tensor of shape [{n}]")
    had = data.watermark if data.watermark is not None else torch.zeros(n, dtype=torch.bool)
    images = add_watermark(data.images, which & ~had, opacity=opacity)
    return ImageSet(images, data.labels, data.bg_aligned, data.coobj_aligned, data.bg, data.coobj, had | which)


# the augmentation's draws, after ImageNet-W's: white text of random glyphs from the left edge, at a random height
WATERMARK_OPACITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WATERMARK_HEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WATERMARK_CHARS = 8


@dataclass
class WatermarkParams:
    """Per-sample draws of a random watermark (leading dim ``N``).

    Attributes:
        glyphs: ``[N, L, 5, 3]`` bool, ``L`` random 3x5 bitmap characters of the text.
        scale: ``[N]`` int64, pixels per glyph pixel (1 or 2, the "font size").
        height: ``[N]`` float, the text's top row as a fraction of the image side.
        opacity: ``[N]`` float, in ``(0, 1]``.
    """

    glyphs: Tensor
    scale: Tensor
    height: Tensor
    opacity: Tensor

    def __len__(self) -> int:
        return self.glyphs.shape[0]

    def __getitem__(self, index: slice | Tensor) -> WatermarkParams:
        return WatermarkParams(*(getattr(self, f.name)[index] for f in fields(self)))


def sample_watermark(n: int, generator: torch.Generator, chars: int = WATERMARK_CHARS) -> WatermarkParams:
    """Draw ``n`` random watermarks: ``chars`` random 3x5 glyphs (every one with at least one set pixel), a scale of 1
    or 2, a height in :data:`WATERMARK_HEIGHTS` and an opacity in :data:`WATERMARK_OPACITIES`, uniformly."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(chars, bool) or not isinstance(chars, int) or chars < 1:
        raise ValueError(f"chars must be an int >= 1, got {chars!r}")
    glyphs = torch.rand(n, chars, 5, 3, generator=generator) < 0.5
    empty = ~glyphs.flatten(2).any(2)  # a blank glyph gets its centre pixel
    glyphs[..., 2, 1] |= empty
    scale = torch.randint(1, 3, (n,), generator=generator)
    height = torch.tensor(WATERMARK_HEIGHTS)[torch.randint(len(WATERMARK_HEIGHTS), (n,), generator=generator)]
    opacity = torch.tensor(WATERMARK_OPACITIES)[torch.randint(len(WATERMARK_OPACITIES), (n,), generator=generator)]
    return WatermarkParams(glyphs, scale, height, opacity)


def random_watermark_masks(params: WatermarkParams, image_size: int) -> Tensor:
    """``[N, S, S]`` float 0/1 masks of the watermarks ``params``: the glyphs side by side (one blank column
    between them), scaled, from the left edge, the top row at ``height * S`` (moved up to fit), cut at the right
    edge."""
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    n, chars = params.glyphs.shape[:2]
    gap = torch.zeros(n, chars, 5, 1, dtype=torch.bool)
    lines = torch.cat([params.glyphs, gap], 3).permute(0, 2, 1, 3).reshape(n, 5, chars * 4)[:, :, :-1]
    masks = torch.zeros(n, image_size, image_size)
    for i in range(n):
        k = int(params.scale[i])
        line = lines[i].repeat_interleave(k, 0).repeat_interleave(k, 1)[:, :image_size].float()
        h, w = line.shape
        y0 = min(int(round(float(params.height[i]) * image_size)), image_size - h)
        masks[i, y0:y0 + h, :w] = line
    return masks


def insert_random_watermark(data: ImageSet, params: WatermarkParams) -> ImageSet:
    """Every image with its random watermark (white, ``x -> x + opacity * mask * (1 - x)``), on top of whatever
    it shows, the dataset's watermark included; ``watermark`` set for every image."""
    if not isinstance(data, ImageSet):
        raise TypeError("data must be an ImageSet")
    n, _, s, _ = data.images.shape
    if len(params) != n:
        raise ValueError(f"params describe {len(params)} watermarks but data has {n} images")
    alpha = (params.opacity.view(n, 1, 1) * random_watermark_masks(params, s)).unsqueeze(1)
    x = data.images.float() / 255.0
    images = ((x + alpha * (1.0 - x)).clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(images, data.labels, data.bg_aligned, data.coobj_aligned, data.bg, data.coobj,
                    torch.ones(n, dtype=torch.bool))
