"""``spurious-cues``: a procedural, UrbanCars-like image dataset generated from a seed (no files).

Each image has a *core object* whose outline shape decides the class, a *background* texture cue and a small
*co-occurring object* cue. In training each cue agrees with the class with probability ``cue_agreement`` (0.95),
independently; in the validation and test splits each of the four cue groups (background aligned or not x co-object
aligned or not) is exactly a quarter of every class. The cues are big and saturated, the core is a thin outline of
random colour and size, so the cues are the easier features. An optional third cue, a translucent watermark, marks
training images of one class. The images are composed of layers (:class:`CueLayers`) that the shortcut
augmentations of :mod:`fastcl.train.shortcut_augment` recompose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from fastcl.train.data.splits import DatasetSplits, ImageSet
from fastcl.train.runtime import torch_threads

__all__ = [
    "CORE_SHAPES",
    "CueLayers",
    "MAX_CUE_CLASSES",
    "add_watermark",
    "compose_cue_layers",
    "make_spurious_cues",
    "render_background",
    "render_coobj",
    "spurious_cues_splits",
    "watermark_pattern",
]

MAX_CUE_CLASSES = 8
CORE_SHAPES = ("ring", "plus", "square", "triangle", "cross", "diamond", "equals", "pillars")
COOBJ_FORMS = ("disk", "square", "diamond", "triangle", "plus", "hexagon", "hbar", "vbar")
BG_PATTERNS = ("hstripes", "vstripes", "checker", "rings", "dots", "hatch", "grid", "waves")
# background: (dark, light) colour per cue class; co-object: one saturated colour per cue class
_BG_COLOURS = (
    ((0.55, 0.10, 0.10), (0.95, 0.55, 0.45)),
    ((0.10, 0.40, 0.12), (0.55, 0.90, 0.50)),
    ((0.10, 0.15, 0.55), (0.50, 0.65, 0.98)),
    ((0.50, 0.45, 0.05), (0.98, 0.92, 0.45)),
    ((0.45, 0.08, 0.45), (0.95, 0.55, 0.95)),
    ((0.05, 0.42, 0.45), (0.50, 0.95, 0.95)),
    ((0.55, 0.28, 0.05), (0.98, 0.72, 0.40)),
    ((0.25, 0.25, 0.25), (0.80, 0.80, 0.80)),
)
_COOBJ_COLOURS = (
    (1.00, 0.95, 0.10), (1.00, 0.10, 0.80), (0.10, 1.00, 1.00), (1.00, 0.45, 0.00),
    (0.55, 0.00, 1.00), (0.00, 0.80, 0.20), (1.00, 1.00, 1.00), (0.05, 0.05, 0.05),
)


def _polygon_norm(u: Tensor, v: Tensor, sides: int, start_deg: float) -> Tensor:
    """``max_k <(u, v), n_k>`` over the ``sides`` outward edge normals: the polygon's gauge (apothem units)."""
    out = None
    for k in range(sides):
        a = math.radians(start_deg + 360.0 * k / sides)
        p = u * math.cos(a) + v * math.sin(a)
        out = p if out is None else torch.maximum(out, p)
    return out


def _segment_dist(u: Tensor, v: Tensor, half_len: float, horizontal: bool, offset: float = 0.0) -> Tensor:
    """Distance to the segment ``{|t| <= half_len}`` along an axis, shifted by ``offset`` across it."""
    along, across = (u, v - offset) if horizontal else (v, u - offset)
    return torch.sqrt((along.abs() - half_len).clamp(min=0) ** 2 + across**2)


def _core_distance(kind: int, u: Tensor, v: Tensor) -> Tensor:
    """Distance (in units of the object radius) from ``(u, v)`` to the outline of core shape ``kind``.
    Image ``v`` points down; every shape is symmetric under a horizontal flip."""
    name = CORE_SHAPES[kind]
    if name == "ring":
        return (torch.sqrt(u * u + v * v) - 0.9).abs()
    if name == "square":
        return (torch.maximum(u.abs(), v.abs()) - 0.75).abs()
    if name == "triangle":  # apex down: edge normals at -90 (up), 30 and 150 degrees
        return (_polygon_norm(u, v, 3, -90.0) - 0.5).abs()
    if name == "plus":
        return torch.minimum(_segment_dist(u, v, 0.95, True), _segment_dist(u, v, 0.95, False))
    if name == "cross":
        a, b = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        return torch.minimum(_segment_dist(a, b, 0.95, True), _segment_dist(a, b, 0.95, False))
    if name == "diamond":
        return ((u.abs() + v.abs()) - 0.95).abs() / math.sqrt(2)
    if name == "equals":
        return torch.minimum(_segment_dist(u, v, 0.85, True, 0.45), _segment_dist(u, v, 0.85, True, -0.45))
    if name == "pillars":
        return torch.minimum(_segment_dist(u, v, 0.85, False, 0.45), _segment_dist(u, v, 0.85, False, -0.45))
    raise ValueError(kind)


def _coobj_inside(kind: int, u: Tensor, v: Tensor) -> Tensor:
    """Signed 'inside' score (> 0 inside, roughly in radius units) of filled co-object form ``kind``."""
    name = COOBJ_FORMS[kind]
    if name == "disk":
        return 1.0 - torch.sqrt(u * u + v * v)
    if name == "square":
        return 0.85 - torch.maximum(u.abs(), v.abs())
    if name == "diamond":
        return (1.1 - (u.abs() + v.abs())) / math.sqrt(2)
    if name == "triangle":
        return 0.55 - _polygon_norm(u, v, 3, -90.0)
    if name == "plus":
        return torch.maximum(torch.minimum(0.35 - v.abs(), 1.0 - u.abs()), torch.minimum(0.35 - u.abs(), 1.0 - v.abs()))
    if name == "hexagon":
        return 0.9 - _polygon_norm(u, v, 6, 0.0)
    if name == "hbar":
        return torch.minimum(1.05 - u.abs(), 0.45 - v.abs())
    if name == "vbar":
        return torch.minimum(0.45 - u.abs(), 1.05 - v.abs())
    raise ValueError(kind)


def _bg_pattern(kind: int, x: Tensor, y: Tensor, period: Tensor, phase: Tensor) -> Tensor:
    """Pattern ``kind`` in ``[0, 1]`` at pixel coordinates ``x, y [n, S, S]`` (period, phase ``[n, 1, 1]``)."""
    w = 2 * math.pi / period
    name = BG_PATTERNS[kind]
    if name == "hstripes":
        p = torch.sin(w * y + phase)
    elif name == "vstripes":
        p = torch.sin(w * x + phase)
    elif name == "checker":
        p = torch.tanh(3 * torch.sin(w * x + phase) * torch.sin(w * y + phase))
    elif name == "rings":
        c = x.shape[-1] / 2
        p = torch.sin(w * torch.sqrt((x - c) ** 2 + (y - c) ** 2) + phase)
    elif name == "dots":
        p = 2 * ((torch.cos(w * x + phase) * torch.cos(w * y + phase)).clamp(min=0) ** 2) - 1
    elif name == "hatch":
        p = torch.sin(w * (x + y) / math.sqrt(2) + phase) * torch.sin(w * (x - y) / math.sqrt(2) + phase)
    elif name == "grid":
        p = 2 * torch.maximum(torch.cos(w * x + phase), torch.cos(w * y + phase)).clamp(min=0) ** 4 - 1
    elif name == "waves":
        p = torch.sin(w * y + 2.0 * torch.sin(w * x / 2) + phase)
    else:
        raise ValueError(kind)
    return 0.5 + 0.5 * p


def _other_class(y: Tensor, k: int, g: torch.Generator) -> Tensor:
    """A class different from ``y``, uniformly among the other ``k - 1``."""
    return (y + torch.randint(1, k, y.shape, generator=g)) % k


def make_spurious_cues(
    n: int,
    *,
    seed: int,
    split: str = "train",
    classes: int = 2,
    image_size: int = 32,
    cue_agreement: float = 0.95,
    noise: float = 0.04,
    watermark: float = 0.0,
    watermark_elsewhere: float = 0.02,
    watermark_class: int = 0,
    watermark_opacity: float = 0.5,
    return_layers: bool = False,
) -> ImageSet | tuple[ImageSet, CueLayers]:
    """Generate one split of the ``spurious-cues`` dataset (deterministic in ``seed`` and ``split``).

    Args:
        n: number of images.
        seed: dataset seed; each split draws from its own stream derived from it.
        split: ``'train'`` (each cue agrees with the class with probability ``cue_agreement``, independently),
            or ``'val'`` / ``'test'`` (classes balanced and, within every class, the four cue groups equally
            frequent: exactly when ``n`` is a multiple of ``4 * classes``).
        classes: number of classes, 2 to 8.
        image_size: side of the square RGB images (16 or more).
        cue_agreement: training cue-class agreement probability.
        noise: standard deviation of the pixel noise (in ``[0, 1]`` intensity units).
        watermark: third cue, ImageNet-W's analogue (off at 0): in the training split, the probability that an
            image of class ``watermark_class`` carries the translucent glyph watermark of :func:`add_watermark`.
            Images of the other classes carry it with probability ``watermark_elsewhere``. Validation and test
            images never do (the study inserts it into every test image to measure the cue). Drawn from a
            stream of its own: every other byte of the split is the same with or without it.
        watermark_class: the class the watermark co-occurs with.
        watermark_opacity: opacity of the watermark glyphs.
        return_layers: also return the :class:`CueLayers` the (un-watermarked) images are composed of, for
            exact composites (:mod:`fastcl.train.shortcut_augment`).

    Returns:
        An :class:`ImageSet` with labels, ``bg_aligned``, ``coobj_aligned``, ``bg`` and ``coobj`` (and
        ``watermark`` when ``watermark > 0``); with ``return_layers``, ``(image_set, layers)``.

    Each image: a background texture (pattern and colours set by the background cue, random period, phase and
    tint), a small filled co-object near a random corner (form and colour set by the co-object cue), and the
    core object on top: the outline of the class's shape, of random colour, radius and line width, near the
    centre. A conflicting cue points to a class drawn uniformly among the other classes.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= MAX_CUE_CLASSES:
        raise ValueError(f"classes must be an int in [2, {MAX_CUE_CLASSES}], got {classes!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    if not 0.0 <= cue_agreement <= 1.0:
        raise ValueError(f"cue_agreement must lie in [0, 1], got {cue_agreement}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for name, v in (("watermark", watermark), ("watermark_elsewhere", watermark_elsewhere),
                    ("watermark_opacity", watermark_opacity)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v}")
    if isinstance(watermark_class, bool) or not isinstance(watermark_class, int) or not 0 <= watermark_class < classes:
        raise ValueError(f"watermark_class must be an int in [0, {classes}), got {watermark_class!r}")
    with torch_threads(1):  # same bytes whatever the thread count (reductions), and faster on a busy CPU
        layers: dict[str, Tensor] | None = {} if return_layers else None
        out = _render(n, seed, split, classes, image_size, cue_agreement, noise, layers)
        if watermark > 0:
            stream = {"train": 0, "val": 1, "test": 2}[split]
            g = torch.Generator().manual_seed(int(seed) * 7919 + 104729 * stream + 29)
            prob = torch.where(out.labels == watermark_class, watermark, watermark_elsewhere)
            marked = (torch.rand(n, generator=g) < prob) & (split == "train")
            out.images = add_watermark(out.images, marked, opacity=watermark_opacity)
            out.watermark = marked
    return (out, CueLayers(**layers)) if layers is not None else out


@dataclass
class CueLayers:
    """The layers ``spurious-cues`` images are composed of (float32, intensities in ``[0, 1]``), as
    :func:`make_spurious_cues` drew them; :func:`compose_cue_layers` gives back the same ``uint8`` images.

    Attributes:
        background: ``[N, 3, S, S]`` background texture.
        period, phase: ``[N, 1, 1]`` texture period (pixels) and phase; tint: ``[N, 3, 1, 1]``
            (:func:`render_background` takes them).
        coobj_alpha: ``[N, 1, S, S]`` coverage of the co-occurring object; coobj_colour: ``[N, 3, 1, 1]``.
        coobj_centre: ``[N, 2]`` its centre (x, y) in pixels; coobj_radius: ``[N, 1, 1]``
            (:func:`render_coobj` takes them).
        core_alpha: ``[N, 1, S, S]`` coverage of the core object's outline; core_colour: ``[N, 3, 1, 1]``.
        noise: ``[N, 3, S, S]`` the pixel noise added last.

    Index it like a tensor: ``layers[4:8]``.
    """

    background: Tensor
    period: Tensor
    phase: Tensor
    tint: Tensor
    coobj_alpha: Tensor
    coobj_colour: Tensor
    coobj_centre: Tensor
    coobj_radius: Tensor
    core_alpha: Tensor
    core_colour: Tensor
    noise: Tensor

    def __len__(self) -> int:
        return self.background.shape[0]

    def __getitem__(self, index: slice | Tensor) -> CueLayers:
        return CueLayers(*(getattr(self, f.name)[index] for f in fields(self)))

    def replace(self, **changes: Tensor) -> CueLayers:
        """A copy with some layers replaced (the tensors are shared, not copied)."""
        return CueLayers(**({f.name: getattr(self, f.name) for f in fields(self)} | changes))


def compose_cue_layers(layers: CueLayers) -> Tensor:
    """``uint8 [N, 3, S, S]`` images from their layers: background, co-object over it, core object over both,
    noise; the same operations as :func:`make_spurious_cues`, so unchanged layers give the same bytes."""
    img = layers.background
    img = img + layers.coobj_alpha * (layers.coobj_colour - img)
    img = img + layers.core_alpha * (layers.core_colour - img)
    img = img + layers.noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _pixel_grid(n: int, s: int) -> tuple[Tensor, Tensor]:
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return xx.expand(n, s, s), yy.expand(n, s, s)


def render_background(cue: Tensor, period: Tensor, phase: Tensor, tint: Tensor, image_size: int) -> Tensor:
    """Background textures ``[N, 3, S, S]`` of cue classes ``cue [N]`` with the given period, phase
    ``[N, 1, 1]`` and tint ``[N, 3, 1, 1]`` (as in :class:`CueLayers`): the texture :func:`make_spurious_cues`
    draws for that cue class."""
    n, s = cue.shape[0], image_size
    xx, yy = _pixel_grid(n, s)
    img = torch.empty(n, 3, s, s)
    for c in torch.unique(cue).tolist():
        idx = torch.nonzero(cue == c).flatten()
        p = _bg_pattern(c, xx[idx], yy[idx], period[idx], phase[idx]).unsqueeze(1)
        dark, light = (torch.tensor(col).view(1, 3, 1, 1) for col in _BG_COLOURS[c])
        img[idx] = dark + (light - dark) * p + tint[idx]
    return img


def render_coobj(cue: Tensor, centre: Tensor, radius: Tensor, image_size: int) -> tuple[Tensor, Tensor]:
    """Co-occurring objects of cue classes ``cue [N]`` at ``centre [N, 2]`` (x, y pixels) with ``radius
    [N, 1, 1]``: ``(alpha [N, 1, S, S], colour [N, 3, 1, 1])``, the form and colour of that cue class."""
    n, s = cue.shape[0], image_size
    xx, yy = _pixel_grid(n, s)
    alpha = torch.zeros(n, 1, s, s)
    colour = torch.zeros(n, 3, 1, 1)
    cx, cy = centre[:, 0].view(n, 1, 1), centre[:, 1].view(n, 1, 1)
    for c in torch.unique(cue).tolist():
        idx = torch.nonzero(cue == c).flatten()
        u, v = (xx[idx] - cx[idx]) / radius[idx], (yy[idx] - cy[idx]) / radius[idx]
        alpha[idx] = (_coobj_inside(c, u, v) * radius[idx] + 0.5).clamp(0, 1).unsqueeze(1)
        colour[idx] = torch.tensor(_COOBJ_COLOURS[c]).view(1, 3, 1, 1)
    return alpha, colour


# 3x5 bitmap glyphs of the watermark text
_GLYPHS = {
    "F": ("###", "#..", "##.", "#..", "#.."), "A": (".#.", "#.#", "###", "#.#", "#.#"),
    "S": ("###", "#..", "###", "..#", "###"), "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "C": ("###", "#..", "#..", "#..", "###"), "L": ("#..", "#..", "#..", "#..", "###"),
}
WATERMARK_TEXT = "FASTCL"


def watermark_pattern(image_size: int) -> Tensor:
    """The fixed watermark glyph mask ``[S, S]`` (0/1 float): the text ``FASTCL`` in a 3x5 pixel font, on two
    lines across the image (glyphs scaled by ``image_size // 32``), like ImageNet-W's text watermark."""
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    scale = max(1, image_size // 32)
    glyph = torch.tensor([[[ch == "#" for ch in row] for row in _GLYPHS[c]] for c in WATERMARK_TEXT],
                         dtype=torch.float32)  # [6, 5, 3]
    line = torch.cat([torch.cat([gl, torch.zeros(5, 1)], 1) for gl in glyph], 1)[:, :-1]  # [5, 23]
    line = line.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    h, w = line.shape
    w = min(w, image_size)
    mask = torch.zeros(image_size, image_size)
    x0 = (image_size - w) // 2
    for frac in (0.25, 0.6):
        y0 = min(int(round(frac * image_size)), image_size - h)
        mask[y0:y0 + h, x0:x0 + w] = line[:, :w]
    return mask


def add_watermark(images: Tensor, which: Tensor | None = None, *, opacity: float = 0.5,
                  colour: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    """Insert the translucent watermark of :func:`watermark_pattern` into ``uint8 images [N, C, S, S]``.

    ``x -> x + opacity * mask * (colour - x)`` on intensities in ``[0, 1]``, rounded back to ``uint8``; pixels
    outside the glyphs, and images with ``which[i] == False`` (``which [N]`` bool; default: every image), are
    returned unchanged, byte for byte. Deterministic, batched, and the same for an image alone or in a batch.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    n, ch, hgt, wid = images.shape
    if hgt != wid:
        raise ValueError(f"images must be square, got {hgt}x{wid}")
    if len(colour) != ch:
        raise ValueError(f"colour must have one entry per channel ({ch}), got {tuple(colour)}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}")
    if which is None:
        which = torch.ones(n, dtype=torch.bool)
    if not isinstance(which, Tensor) or which.shape != (n,) or which.dtype != torch.bool:
        raise ValueError(f"which must be a bool tensor of shape [{n}]")
    mask = watermark_pattern(hgt).to(images.device)
    alpha = opacity * mask
    x = images.float() / 255.0
    col = torch.tensor(colour, dtype=torch.float32, device=images.device).view(1, ch, 1, 1)
    marked = ((x + alpha * (col - x)).clamp(0, 1) * 255).round().to(torch.uint8)
    where = which.to(images.device).view(n, 1, 1, 1) & (mask > 0)
    return torch.where(where, marked, images)


def _render(n: int, seed: int, split: str, classes: int, image_size: int, cue_agreement: float,
            noise: float, layers: dict[str, Tensor] | None = None) -> ImageSet:
    """Render one split; with a ``layers`` dict, also store in it the layers the images are composed of
    (:class:`CueLayers`' fields). Recording draws nothing from the generator: the images are the same."""
    stream = {"train": 0, "val": 1, "test": 2}[split]
    g = torch.Generator().manual_seed(int(seed) * 7919 + 104729 * stream + 17)
    k, s = classes, image_size

    perm = torch.randperm(n, generator=g)
    y = perm % k  # balanced classes in random order
    if split == "train":
        bg_al = torch.rand(n, generator=g) < cue_agreement
        co_al = torch.rand(n, generator=g) < cue_agreement
    else:
        cell = (perm // k) % 4  # within each class, the 4 cue groups in turn
        bg_al, co_al = (cell % 2) == 0, (cell // 2) == 0
    bg = torch.where(bg_al, y, _other_class(y, k, g))
    co = torch.where(co_al, y, _other_class(y, k, g))

    coords = torch.arange(s, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx.expand(n, s, s), yy.expand(n, s, s)
    img = torch.empty(n, 3, s, s)

    # background texture
    period = (s / 5.0) * (0.8 + 0.4 * torch.rand(n, 1, 1, generator=g))
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    tint = 0.12 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    for c in range(k):
        idx = torch.nonzero(bg == c).flatten()
        if idx.numel() == 0:
            continue
        p = _bg_pattern(c, xx[idx], yy[idx], period[idx], phase[idx]).unsqueeze(1)
        dark, light = (torch.tensor(col).view(1, 3, 1, 1) for col in _BG_COLOURS[c])
        img[idx] = dark + (light - dark) * p + tint[idx]
    if layers is not None:
        layers.update(background=img.clone(), period=period, phase=phase, tint=tint,
                      coobj_alpha=torch.zeros(n, 1, s, s), coobj_colour=torch.zeros(n, 3, 1, 1),
                      core_alpha=torch.zeros(n, 1, s, s))

    # co-occurring object near a random corner
    r_co = s * (0.12 + 0.03 * torch.rand(n, 1, 1, generator=g))
    corner = torch.randint(0, 4, (n,), generator=g)
    margin = s * (0.19 + 0.04 * torch.rand(n, 2, generator=g))
    cx = torch.where(corner % 2 == 0, margin[:, 0], s - margin[:, 0]).view(n, 1, 1)
    cy = torch.where(corner // 2 == 0, margin[:, 1], s - margin[:, 1]).view(n, 1, 1)
    for c in range(k):
        idx = torch.nonzero(co == c).flatten()
        if idx.numel() == 0:
            continue
        u, v = (xx[idx] - cx[idx]) / r_co[idx], (yy[idx] - cy[idx]) / r_co[idx]
        alpha = (_coobj_inside(c, u, v) * r_co[idx] + 0.5).clamp(0, 1).unsqueeze(1)
        colour = torch.tensor(_COOBJ_COLOURS[c]).view(1, 3, 1, 1)
        img[idx] = img[idx] + alpha * (colour - img[idx])
        if layers is not None:
            layers["coobj_alpha"][idx] = alpha
            layers["coobj_colour"][idx] = colour

    # core object: outline of the class's shape, random colour contrasting with the background's brightness
    r_core = s * (0.24 + 0.08 * torch.rand(n, 1, 1, generator=g))
    centre = s / 2 + s * 0.06 * (2 * torch.rand(n, 2, 1, 1, generator=g) - 1)
    width = s * (0.07 + 0.03 * torch.rand(n, 1, 1, generator=g))
    bright = img.mean(dim=(1, 2, 3)) < 0.5
    base = torch.rand(n, 3, generator=g) * 0.45
    colour = torch.where(bright[:, None], 0.55 + base, base).view(n, 3, 1, 1)
    for c in range(k):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() == 0:
            continue
        r = r_core[idx]
        u, v = (xx[idx] - centre[idx, 0]) / r, (yy[idx] - centre[idx, 1]) / r
        d = _core_distance(c, u, v) * r  # pixels
        alpha = (width[idx] / 2 + 0.5 - d).clamp(0, 1).unsqueeze(1)
        img[idx] = img[idx] + alpha * (colour[idx] - img[idx])
        if layers is not None:
            layers["core_alpha"][idx] = alpha

    if layers is not None:
        layers.update(core_colour=colour, coobj_centre=torch.cat([cx, cy], 1).view(n, 2),
                      coobj_radius=r_co, noise=noise * torch.randn(img.shape, generator=g))
        img = img + layers["noise"]
    else:
        img = img + noise * torch.randn(img.shape, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(images, y.long(), bg_al, co_al, bg.long(), co.long())


def spurious_cues_splits(
    *,
    seed: int = 0,
    classes: int = 2,
    image_size: int = 32,
    train_samples: int = 4096,
    val_samples: int = 1024,
    test_samples: int = 2048,
    cue_agreement: float = 0.95,
    watermark: float = 0.0,
    watermark_elsewhere: float = 0.02,
    watermark_class: int = 0,
) -> DatasetSplits:
    """Train / val (DFR held-out) / test splits of ``spurious-cues``; see :func:`make_spurious_cues`
    (``watermark > 0`` adds the watermark cue to the training split)."""
    kw = dict(seed=seed, classes=classes, image_size=image_size, cue_agreement=cue_agreement)
    wm = {}
    if watermark > 0:
        wm = dict(watermark=watermark, watermark_elsewhere=watermark_elsewhere, watermark_class=watermark_class)
        kw.update(wm)
    train = make_spurious_cues(train_samples, split="train", **kw)
    val = make_spurious_cues(val_samples, split="val", **kw)
    test = make_spurious_cues(test_samples, split="test", **kw)
    return DatasetSplits(
        "spurious-cues", train, test, val, classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), cue_agreement,
        [CORE_SHAPES[c] for c in range(classes)],
        {"generator": "fastcl.data.make_spurious_cues", "seed": seed, "classes": classes, "image_size": image_size,
         "train_samples": train_samples, "val_samples": val_samples, "test_samples": test_samples,
         "cue_agreement": cue_agreement, **wm},
    )
