"""Drop-in encoders (backbones) for contrastive learning.

Every encoder maps an input batch to a flat representation ``h`` of shape ``[B, out_dim]`` and
exposes the integer attribute ``out_dim``, so a projection head can be sized from it::

    enc = resnet18()                      # CIFAR form, enc.out_dim == 512
    h = enc(torch.randn(8, 3, 32, 32))    # [8, 512]

* :func:`resnet18`, :func:`resnet34`, :func:`resnet50`: the CIFAR variant used by the SimCLR /
  SupCon papers (3x3 stride-1 stem, no max-pool, global average pool, no ``fc``).
* :class:`ConvNet`: a small, fast conv net for CPU experiments.
* :class:`MLPEncoder`: an MLP for vector data (inputs are flattened).
* :class:`WrappedEncoder` / :func:`as_encoder`: adapt any ``nn.Module`` backbone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor, nn

from fastcl._validation import check_positive_int as _check_positive_int

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ConvNet",
    "MLPEncoder",
    "ResNet",
    "WrappedEncoder",
    "as_encoder",
    "resnet18",
    "resnet34",
    "resnet50",
]


def _check_image_batch(x: Tensor, in_channels: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must have shape [B, {in_channels}, H, W], got {tuple(x.shape)}")


def _check_batchnorm_batch(module: nn.Module, batch: int, name: str) -> None:
    """A batch of one sample cannot give BatchNorm1d batch statistics: say so before BatchNorm does."""
    if batch == 1 and any(isinstance(m, nn.BatchNorm1d) and m.training for m in module.modules()):
        raise ValueError(f"{name} needs at least 2 samples per batch in train mode (its BatchNorm1d layers use "
                         "batch statistics), got 1; call .eval() to embed single samples, or build it with "
                         "batchnorm=False")


# --------------------------------------------------------------------------------------------------
# CIFAR ResNets
# --------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Shapes: ``[B, in_planes, H, W] -> [B, planes, H / stride, W / stride]``.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck with a residual connection (ResNet-50).

    The stride sits on the 3x3 convolution. Shapes:
    ``[B, in_planes, H, W] -> [B, 4 * planes, H / stride, W / stride]``.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


_Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(nn.Module):
    """ResNet in the CIFAR form: 3x3 stride-1 stem, no max-pool, global average pool, no ``fc``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        num_blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        in_channels: input channels (3 for RGB).
        zero_init_residual: zero the last BN scale of every block, so each block starts as identity.

    Shapes: ``x [B, in_channels, H, W] -> h [B, out_dim]`` with ``out_dim = 512 * block.expansion``.
    The stages downsample by 8 in all: in train mode a batch of one sample needs ``H > 8`` or ``W > 8``, so that
    ``layer4``'s map has more than one position and BatchNorm more than one value per channel (PyTorch raises
    ``ValueError`` otherwise); eval mode takes any size.
    Submodules ``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``avgpool`` can be tapped by name with
    :func:`fastcl.models.collect_representations` (names listed in :attr:`layer_names`).
    """

    layer_names: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        block: _Block,
        num_blocks: Sequence[int],
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks must have 4 entries, got {list(num_blocks)}")
        for i, n in enumerate(num_blocks):
            _check_positive_int(n, f"num_blocks[{i}]")
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self._in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim: int = 512 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: _Block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self._in_planes, planes, s))
            self._in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W] -> h [B, out_dim]``."""
        _check_image_batch(x, self.in_channels)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18(in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """CIFAR ResNet-18 (11,168,832 parameters for 3 input channels), ``out_dim == 512``."""
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels, zero_init_residual)


def resnet34(in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """CIFAR ResNet-34 (21,276,992 parameters for 3 input channels), ``out_dim == 512``."""
    return ResNet(BasicBlock, (3, 4, 6, 3), in_channels, zero_init_residual)


def resnet50(in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """CIFAR ResNet-50 (23,500,352 parameters for 3 input channels), ``out_dim == 2048``."""
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, zero_init_residual)


# --------------------------------------------------------------------------------------------------
# Small encoders for CPU experiments
# --------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Small conv net: stages of ``Conv3x3 -> BN -> ReLU`` with 2x2 max-pooling between stages,
    then global average pooling.

    Args:
        in_channels: input channels.
        widths: channels of each stage; ``out_dim == widths[-1]``.
        batchnorm: use BatchNorm after each convolution.

    Shapes: ``x [B, in_channels, H, W] -> h [B, widths[-1]]``. Stages are ``blocks.0``,
    ``blocks.1``, ... (names listed in :attr:`layer_names`); the tapped outputs are pre-pooling.
    Pooling is skipped once the spatial size is below 2, so tiny inputs work. In train mode BatchNorm needs more
    than one value per channel (PyTorch raises ``ValueError`` otherwise): a batch of one ``1x1`` image works in eval
    mode only.
    """

    def __init__(
        self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128), batchnorm: bool = True
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must contain at least one stage width")
        for i, w in enumerate(widths):
            _check_positive_int(w, f"widths[{i}]")
        blocks = []
        prev = in_channels
        for w in widths:
            layers: list[nn.Module] = [nn.Conv2d(prev, w, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU(inplace=True))
            blocks.append(nn.Sequential(*layers))
            prev = w
        self.blocks = nn.ModuleList(blocks)
        self.out_dim: int = widths[-1]
        self.layer_names: tuple[str, ...] = tuple(f"blocks.{i}" for i in range(len(widths)))

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W] -> h [B, out_dim]``."""
        _check_image_batch(x, self.in_channels)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1 and min(x.shape[-2:]) >= 2:
                x = nn.functional.max_pool2d(x, 2)
        return x.mean(dim=(2, 3))


class MLPEncoder(nn.Module):
    """MLP encoder: per layer ``Linear -> [BatchNorm1d] -> ReLU``; inputs are flattened.

    Args:
        in_dim: number of input features (after flattening all but the batch dimension).
        hidden_dims: width of each layer; ``out_dim == hidden_dims[-1]``.
        batchnorm: use BatchNorm1d after each linear layer (the linear layer then has no bias).

    Shapes: ``x [B, *] (prod(*) == in_dim) -> h [B, hidden_dims[-1]]``. Layers are ``layers.0``,
    ``layers.1``, ... (names listed in :attr:`layer_names`).
    With BatchNorm, a batch of one sample in train mode raises ``ValueError`` (no batch statistics); eval mode
    takes any batch.
    """

    def __init__(self, in_dim: int, hidden_dims: Sequence[int] = (512, 512), batchnorm: bool = True) -> None:
        super().__init__()
        self.in_dim = _check_positive_int(in_dim, "in_dim")
        hidden_dims = tuple(hidden_dims)
        if not hidden_dims:
            raise ValueError("hidden_dims must contain at least one layer width")
        for i, w in enumerate(hidden_dims):
            _check_positive_int(w, f"hidden_dims[{i}]")
        layers = []
        prev = in_dim
        for w in hidden_dims:
            parts: list[nn.Module] = [nn.Linear(prev, w, bias=not batchnorm)]
            if batchnorm:
                parts.append(nn.BatchNorm1d(w))
            parts.append(nn.ReLU(inplace=True))
            layers.append(nn.Sequential(*parts))
            prev = w
        self.layers = nn.ModuleList(layers)
        self.out_dim: int = hidden_dims[-1]
        self.layer_names: tuple[str, ...] = tuple(f"layers.{i}" for i in range(len(hidden_dims)))

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, *] -> h [B, out_dim]``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_dim:
            raise ValueError(f"x must have shape [B, *] with {self.in_dim} features per sample, "
                             f"got {tuple(x.shape)}")
        _check_batchnorm_batch(self, x.shape[0], "MLPEncoder")
        x = x.flatten(1)
        for layer in self.layers:
            x = layer(x)
        return x


# --------------------------------------------------------------------------------------------------
# Wrapping arbitrary backbones
# --------------------------------------------------------------------------------------------------


class WrappedEncoder(nn.Module):
    """Adapt any backbone into an encoder that returns ``[B, out_dim]`` and has ``out_dim``.

    Outputs with more than two dimensions (e.g. conv feature maps ``[B, C, H, W]``) are globally
    average-pooled over the trailing dimensions when ``pool=True`` and flattened otherwise.

    Args:
        backbone: any module mapping a batch to a tensor ``[B, ...]``.
        out_dim: representation size; if ``None`` it is inferred from a dry run on zeros of shape
            ``[2, *input_shape]`` (when ``input_shape`` is given) or from the first forward.
        input_shape: per-sample input shape used for the dry run, e.g. ``(3, 32, 32)``.
        pool: average-pool trailing dimensions instead of flattening them.
    """

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: int | None = None,
        input_shape: Sequence[int] | None = None,
        pool: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone
        self.pool = bool(pool)
        self.out_dim: int | None = None if out_dim is None else _check_positive_int(out_dim, "out_dim")
        if self.out_dim is None and input_shape is not None:
            self.out_dim = self._infer_out_dim(tuple(input_shape))

    def _infer_out_dim(self, input_shape: tuple[int, ...]) -> int:
        for i, s in enumerate(input_shape):
            _check_positive_int(s, f"input_shape[{i}]")
        param = next(self.backbone.parameters(), None)
        kwargs = {} if param is None else {"device": param.device, "dtype": param.dtype}
        modes = {m: m.training for m in self.modules()}
        try:
            self.eval()  # eval mode: BN running stats are neither used for batch 2 nor updated
            with torch.no_grad():
                out = self._flat(self.backbone(torch.zeros(2, *input_shape, **kwargs)))
        finally:
            for m, mode in modes.items():
                m.training = mode
        return int(out.shape[1])

    def _flat(self, out: object) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"backbone must return a Tensor, got {type(out).__name__}")
        if out.ndim < 2:
            raise ValueError(f"backbone output must have shape [B, ...], got {tuple(out.shape)}")
        if out.ndim > 2:
            out = out.mean(dim=tuple(range(2, out.ndim))) if self.pool else out.flatten(1)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``x -> h [B, out_dim]``."""
        h = self._flat(self.backbone(x))
        if self.out_dim is None:
            self.out_dim = int(h.shape[1])
        elif h.shape[1] != self.out_dim:
            raise ValueError(f"backbone produced {h.shape[1]} features but out_dim={self.out_dim}")
        return h


def as_encoder(
    module: nn.Module,
    out_dim: int | None = None,
    input_shape: Sequence[int] | None = None,
    pool: bool = True,
) -> nn.Module:
    """Return ``module`` unchanged if it already has an integer ``out_dim``, else wrap it.

    See :class:`WrappedEncoder` for ``out_dim``, ``input_shape`` and ``pool``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    existing = getattr(module, "out_dim", None)
    if isinstance(existing, int) and not isinstance(existing, bool):
        if out_dim is not None and out_dim != existing:
            raise ValueError(f"out_dim={out_dim} does not match module.out_dim={existing}")
        return module
    return WrappedEncoder(module, out_dim=out_dim, input_shape=input_shape, pool=pool)
