"""Images (n, 3, S, S) in [-1, 1] + 18 FiLM (gamma, beta) pairs in, pooled features (n, 1280) out: the frozen
FiLM EfficientNet-B0 of LITE (reference lite.md §1.3; LITE:src/efficientnet.py, a port of lukemelas'
EfficientNet-PyTorch).

Module names equal the reference's (`_conv_stem`, `_bn0`, `_blocks.{i}._expand_conv`, ..., `_conv_head`,
`_bn1`, `_fc`), so LITE checkpoints and the EfficientNet-PyTorch release file load without renaming.
Numerics of the reference ("tf_"-style, as timm marks them): static TF-"same" padding computed for a 224-px
input whatever the input size, BatchNorm eps 1e-3, Swish = x·sigmoid(x). The backbone is frozen and always
runs in eval mode (ImageNet running statistics, no drop-connect), which `LiteModel.train` enforces.

How eval mode computes it (the same function, other roundings; docs/fidelity.md M12): every BN is folded
into the convolution before it (w·s, b·s + t with s = weight / sqrt(var + eps)), the FiLM affine is one
fused multiply-add, Swish is `F.silu`, the squeeze-excite 1x1 convolutions on 1x1 maps are matrix products,
and symmetric "same" paddings are the convolution's own (no padded copy). Training mode (pretraining) runs
the modules one by one, as the reference does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# TF BatchNorm momentum 0.99 -> PyTorch momentum 1 - 0.99; only matters if someone trains the backbone's BN.
BN_MOMENTUM = 1 - 0.99
BN_EPS = 1e-3
# The reference builds every static padding for this input size, even for 84-px images (lite.md §1.3).
PADDING_IMAGE_SIZE = 224
FEATURE_DIM = 1280


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block of EfficientNet-B0 (width and depth multipliers 1.0)."""

    kernel: int  # depthwise kernel size
    stride: int  # depthwise stride
    in_channels: int
    out_channels: int
    expand_ratio: int  # 1: no expansion conv (block 0)

    @property
    def expanded(self) -> int:
        """Channels of the depthwise conv = the width of this block's FiLM site."""
        return self.in_channels * self.expand_ratio

    @property
    def squeezed(self) -> int:
        """Squeeze-excite width: max(1, int(block input · 0.25))."""
        return max(1, int(self.in_channels * 0.25))

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


# EfficientNet-B0's 7 stages expanded into its 16 blocks (lite.md §1.3 block table).
B0_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(3, 1, 32, 16, 1),
    BlockSpec(3, 2, 16, 24, 6), BlockSpec(3, 1, 24, 24, 6),
    BlockSpec(5, 2, 24, 40, 6), BlockSpec(5, 1, 40, 40, 6),
    BlockSpec(3, 2, 40, 80, 6), BlockSpec(3, 1, 80, 80, 6), BlockSpec(3, 1, 80, 80, 6),
    BlockSpec(5, 1, 80, 112, 6), BlockSpec(5, 1, 112, 112, 6), BlockSpec(5, 1, 112, 112, 6),
    BlockSpec(5, 2, 112, 192, 6), BlockSpec(5, 1, 192, 192, 6), BlockSpec(5, 1, 192, 192, 6),
    BlockSpec(5, 1, 192, 192, 6),
    BlockSpec(3, 1, 192, 320, 6),
)
STEM_CHANNELS = 32

# Channels of the 18 FiLM sites in forward order: stem, blocks 0..15 (expanded width), head.
FILM_CHANNELS: tuple[int, ...] = (STEM_CHANNELS, *(b.expanded for b in B0_BLOCKS), FEATURE_DIM)


def same_padding(in_size: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TF "same" padding of a square input of `in_size` px as F.pad's (left, right, top, bottom).

    out = ceil(in / stride); total = max((out - 1)·stride + kernel - in, 0); the smaller half goes on the
    top/left (lukemelas `Conv2dStaticSamePadding`).
    """
    out = math.ceil(in_size / stride)
    total = max((out - 1) * stride + kernel - in_size, 0)
    before, after = total // 2, total - total // 2
    return (before, after, before, after)


class SameConv2d(nn.Conv2d):
    """A Conv2d with a fixed zero "same" padding (computed once for the reference input size): the
    convolution's own padding when it is symmetric, an explicit pad before an unpadded convolution otherwise
    (the stride-2 convolutions: one more row and column at the bottom and right)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, in_size: int,
                 groups: int = 1, bias: bool = False):
        left, right, top, bottom = same_padding(in_size, kernel, stride)
        symmetric = left == right and top == bottom
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=(top, left) if symmetric else 0,
                         groups=groups, bias=bias)
        self.pad = None if symmetric else (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.folded(x, self.weight, self.bias)

    def folded(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This convolution with other weights (a BN folded in)."""
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def conv_bn(conv: SameConv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)); in eval mode as one convolution with the BN folded into its weights and bias."""
    if bn.training:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C,)
    shift = bn.bias - bn.running_mean * scale  # (C,)
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv.folded(x, conv.weight * scale[:, None, None, None], shift)

def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(x), the reference's Swish (`F.silu` computes it in one pass)."""
    return F.silu(x)


def film(x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> torch.Tensor:
    """x (n, C, H, W) <- gamma[C]·x + beta[C] in one pass; None, None = no FiLM (gamma 1, beta 0 exactly)."""
    if gamma is None:
        return x
    return torch.addcmul(beta[None, :, None, None], x, gamma[None, :, None, None])


def _pointwise(conv: SameConv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution with bias on a (n, C) vector: a matrix product."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class FilmMBConvBlock(nn.Module):
    """Mobile inverted bottleneck with squeeze-excite; FiLM after the depthwise BN, before Swish."""

    def __init__(self, spec: BlockSpec, in_size: int):
        super().__init__()
        self.spec = spec
        exp = spec.expanded
        if spec.expand_ratio != 1:
            self._expand_conv = SameConv2d(spec.in_channels, exp, 1, 1, in_size)
            self._bn0 = _bn(exp)
        self._depthwise_conv = SameConv2d(exp, exp, spec.kernel, spec.stride, in_size, groups=exp)
        self._bn1 = _bn(exp)
        # Squeeze-excite acts on a 1x1 map: no padding (the reference builds these for image size 1).
        self._se_reduce = SameConv2d(exp, spec.squeezed, 1, 1, 1, bias=True)
        self._se_expand = SameConv2d(spec.squeezed, exp, 1, 1, 1, bias=True)
        self._project_conv = SameConv2d(exp, spec.out_channels, 1, 1, math.ceil(in_size / spec.stride))
        self._bn2 = _bn(spec.out_channels)

    def forward(self, inputs: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> torch.Tensor:
        x = inputs  # (n, in, H, W)
        if self.spec.expand_ratio != 1:
            x = swish(conv_bn(self._expand_conv, self._bn0, x))  # (n, exp, H, W)
        x = swish(film(conv_bn(self._depthwise_conv, self._bn1, x), gamma, beta))  # (n, exp, H/s, W/s)
        squeezed = x.mean(dim=(2, 3))  # (n, exp): global average pool
        squeezed = _pointwise(self._se_expand, swish(_pointwise(self._se_reduce, squeezed)))  # (n, exp)
        x = torch.sigmoid(squeezed)[:, :, None, None] * x
        x = conv_bn(self._project_conv, self._bn2, x)  # (n, out, H/s, W/s)
        if self.spec.residual:
            x = x + inputs  # drop-connect is a training-mode op; the backbone never trains
        return x


class _EmptyLinear(nn.Module):
    """The reference's `_fc = Linear(1280, 0)` (built with num_classes=0): two empty tensors that exist
    only so that LITE checkpoints, which contain them, load strictly. Never applied."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0, FEATURE_DIM), requires_grad=False)  # (0, 1280)
        self.bias = nn.Parameter(torch.empty(0), requires_grad=False)  # (0,)


class FilmEfficientNet(nn.Module):
    """EfficientNet-B0 feature extractor with 18 FiLM sites; `forward(images, film_params)` -> (n, 1280)."""

    def __init__(self, padding_image_size: int = PADDING_IMAGE_SIZE):
        super().__init__()
        size = padding_image_size
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2, size)
        self._bn0 = _bn(STEM_CHANNELS)
        size = math.ceil(size / 2)
        blocks = []
        for spec in B0_BLOCKS:
            blocks.append(FilmMBConvBlock(spec, size))
            size = math.ceil(size / spec.stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(B0_BLOCKS[-1].out_channels, FEATURE_DIM, 1, 1, size)
        self._bn1 = _bn(FEATURE_DIM)
        self._fc = _EmptyLinear()
        self._init_weights()
        for p in self.parameters():
            p.requires_grad_(False)

    def _init_weights(self) -> None:
        """Random backbone (used only without pretrained weights): convs ~ N(0, 2 / fan_out) as TF's
        EfficientNet (timm `_init_weight_goog`). PyTorch's default conv init shrinks activations layer by
        layer, so a default-initialised B0 gives near-constant features and vanishing gradients."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
                    if m.bias is not None:
                        m.bias.zero_()

    def forward(self, images: torch.Tensor,
                film_params: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """(n, 3, S, S) -> (n, 1280); `film_params` None = the plain EfficientNet-B0 (no FiLM)."""
        if film_params is None:
            film_params = [(None, None)] * len(FILM_CHANNELS)
        elif len(film_params) != len(FILM_CHANNELS):
            raise ValueError(f"expected {len(FILM_CHANNELS)} FiLM (gamma, beta) pairs, got {len(film_params)}")
        x = swish(film(conv_bn(self._conv_stem, self._bn0, images), *film_params[0]))  # (n, 32, S/2, S/2)
        for block, (gamma, beta) in zip(self._blocks, film_params[1:-1]):
            x = block(x, gamma, beta)
        x = swish(film(conv_bn(self._conv_head, self._bn1, x), *film_params[-1]))  # (n, 1280, h, w)
        return x.mean(dim=(2, 3))  # (n, 1280): global average pool


def calibrate_batch_norm(backbone: FilmEfficientNet, images: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Sets every BN's running statistics to the mean of its batch statistics over `images`: one batch
    (n, 3, S, S) or several, each a forward pass in training mode without FiLM (each BN normalises with its
    batch statistics and averages them: momentum None is PyTorch's cumulative average).

    For a random backbone, whose initial running statistics (mean 0, var 1) do not fit its activations (in
    eval mode its features then hardly depend on the image), and at the end of pretraining, where the
    running averages lag the last weights. Never for weights someone else trained."""
    batches = [images] if isinstance(images, torch.Tensor) else list(images)
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: after k batches, exactly the mean of their statistics
        backbone.train()
        for batch in batches:
            backbone(batch)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    backbone.eval()


def identity_film(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """gamma = 1, beta = 0 at every site: the plain (unadapted) EfficientNet-B0."""
    return [(torch.ones(c, dtype=dtype, device=device), torch.zeros(c, dtype=dtype, device=device))
            for c in FILM_CHANNELS]
