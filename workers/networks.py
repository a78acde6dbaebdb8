"""ProGAN generator and discriminator (Karras et al. 2018), following the reference networks.py.

Both nets grow in place: `grow()` adds the block at twice the resolution plus its toRGB/fromRGB and keeps
every existing module, so a grown net's state_dict is a superset of the old one's. Modules live in
ModuleDicts keyed by resolution, which makes parameter names depend only on the current resolution: a net
built at r and a net built at 4 then grown to r have the same keys (and, from the same seed, the same
initial weights, since construction is literally repeated growth).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SQRT2 = math.sqrt(2.0)


def channels_at(res: int, fmap_base: int, fmap_max: int) -> int:
    """Feature maps of the block at resolution res: min(fmap_base / 2^(log2 res - 1), fmap_max).

    Floored at 1 so that tiny test configurations stay valid at high resolutions; the paper's settings
    never reach the floor.
    """
    return max(1, min(int(fmap_base / 2 ** (int(math.log2(res)) - 1)), fmap_max))


def _check_resolution(resolution: int) -> None:
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")


# ----------------------------------------------------------------------------------------------------------
# Primitives


class EqualizedConv2d(nn.Module):
    """Conv whose weights are stored ~N(0,1) and scaled by gain/sqrt(fan_in) at run time (equalized LR):
    with Adam this gives every layer the same effective learning speed regardless of its fan-in."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = SQRT2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    """Dense layer with the same run-time weight scaling as EqualizedConv2d."""

    def __init__(self, in_features: int, out_features: int, gain: float = SQRT2, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalise each pixel's feature vector to unit mean square (keeps G's signal magnitudes in check)."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2)


def upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 2)


def fade_images(x: Tensor, alpha: float) -> Tensor:
    """Blend images the way G blends its output during a fade: lerp(upsample(avgpool2(x)), x, alpha)."""
    if alpha >= 1:
        return x
    return torch.lerp(upsample(downsample(x)), x, alpha)


def minibatch_stddev(x: Tensor, group_size: int = 4, sets: int = 1) -> Tensor:
    """Append one feature map: the std over each group of samples, averaged over features and pixels.

    Groups are strided as in the reference (sample n belongs to group n % (N / G)); N must be divisible by
    the group size min(group_size, N). With `sets` > 1 the batch is that many equal sets stacked (reals and
    fakes in one forward), and each set is grouped on its own, as if it ran alone: groups never mix sets.
    """
    n, c, h, w = x.shape
    per_set = n // sets
    g = min(group_size, per_set)
    if n % sets or per_set % g:
        raise ValueError(f"minibatch of {per_set} is not divisible by the minibatch-stddev group of {g}")
    y = x.reshape(sets, g, per_set // g, c, h, w)
    y = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1).add(1e-8).sqrt()  # [S, M, C, H, W]
    y = y.mean(dim=(2, 3, 4)).reshape(sets, 1, per_set // g, 1, 1, 1).expand(-1, g, -1, 1, h, w)
    return torch.cat([x, y.reshape(n, 1, h, w)], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Generator


class GInputBlock(nn.Module):
    """4x4: dense latent -> 4x4xC (gain sqrt(2)/4 as in the reference), then a 3x3 conv."""

    def __init__(self, latent_size: int, out_channels: int):
        super().__init__()
        self.dense = EqualizedLinear(latent_size, out_channels * 16, gain=SQRT2 / 4, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.conv = EqualizedConv2d(out_channels, out_channels, 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.dense(z).reshape(z.shape[0], -1, 4, 4) + self.bias.reshape(1, -1, 1, 1)
        x = pixel_norm(lrelu(x))
        return pixel_norm(lrelu(self.conv(x)))


class GBlock(nn.Module):
    """8x8 and up: nearest 2x upsample, two 3x3 convs, each followed by LeakyReLU and pixelnorm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, out_channels, 3)
        self.conv1 = EqualizedConv2d(out_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = pixel_norm(lrelu(self.conv0(upsample(x))))
        return pixel_norm(lrelu(self.conv1(x)))


class Generator(nn.Module):
    def __init__(
        self,
        resolution: int,
        channels: int,
        latent_size: int,
        fmap_base: int = 8192,
        fmap_max: int = 512,
    ):
        super().__init__()
        _check_resolution(resolution)
        self.channels, self.latent_size = channels, latent_size
        self.fmap_base, self.fmap_max = fmap_base, fmap_max
        self.blocks = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict()
        self.resolution = 4
        self._add(GInputBlock(latent_size, self._ch(4)))
        while self.resolution < resolution:
            self.grow()

    def _ch(self, res: int) -> int:
        return channels_at(res, self.fmap_base, self.fmap_max)

    def _add(self, block: nn.Module) -> None:
        rgb = EqualizedConv2d(self._ch(self.resolution), self.channels, 1, gain=1.0)
        if len(self.blocks):
            like = next(self.parameters())
            block, rgb = block.to(like), rgb.to(like)
        self.blocks[str(self.resolution)] = block
        self.to_rgb[str(self.resolution)] = rgb

    def grow(self) -> None:
        """Add the block at twice the current resolution and its toRGB; existing modules are untouched."""
        self.resolution *= 2
        self._add(GBlock(self._ch(self.resolution // 2), self._ch(self.resolution)))

    def forward(self, z: Tensor, alpha: float = 1.0) -> Tensor:
        x = pixel_norm(z)
        prev = None
        for block in self.blocks.values():
            prev, x = x, block(x)
        out = self.to_rgb[str(self.resolution)](x)
        if alpha < 1 and self.resolution > 4:
            old = upsample(self.to_rgb[str(self.resolution // 2)](prev))
            out = torch.lerp(old, out, alpha)
        return out


# ----------------------------------------------------------------------------------------------------------
# Discriminator


class DOutputBlock(nn.Module):
    """4x4: minibatch-stddev, 3x3 conv, dense 4x4xC -> ch(2), dense -> 1 score (gain 1)."""

    def __init__(self, in_channels: int, hidden: int, mbstd_group: int):
        super().__init__()
        self.mbstd_group = mbstd_group
        self.conv = EqualizedConv2d(in_channels + 1, in_channels, 3)
        self.dense0 = EqualizedLinear(in_channels * 16, hidden)
        self.dense1 = EqualizedLinear(hidden, 1, gain=1.0)

    def forward(self, x: Tensor, sets: int = 1) -> Tensor:
        x = lrelu(self.conv(minibatch_stddev(x, self.mbstd_group, sets)))
        x = lrelu(self.dense0(x.flatten(1)))
        return self.dense1(x)


class DBlock(nn.Module):
    """8x8 and up: two 3x3 convs with LeakyReLU, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualizedConv2d(in_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = lrelu(self.conv0(x))
        return downsample(lrelu(self.conv1(x)))


class Discriminator(nn.Module):
    def __init__(
        self,
        resolution: int,
        channels: int,
        fmap_base: int = 8192,
        fmap_max: int = 512,
        mbstd_group: int = 4,
    ):
        super().__init__()
        _check_resolution(resolution)
        self.channels, self.fmap_base, self.fmap_max = channels, fmap_base, fmap_max
        self.blocks = nn.ModuleDict()
        self.from_rgb = nn.ModuleDict()
        self.resolution = 4
        self._add(DOutputBlock(self._ch(4), self._ch(2), mbstd_group))
        while self.resolution < resolution:
            self.grow()

    def _ch(self, res: int) -> int:
        return channels_at(res, self.fmap_base, self.fmap_max)

    def _add(self, block: nn.Module) -> None:
        rgb = EqualizedConv2d(self.channels, self._ch(self.resolution), 1)
        if len(self.blocks):
            like = next(self.parameters())
            block, rgb = block.to(like), rgb.to(like)
        self.blocks[str(self.resolution)] = block
        self.from_rgb[str(self.resolution)] = rgb

    def grow(self) -> None:
        """Add the block at twice the current resolution and its fromRGB; existing modules are untouched."""
        self.resolution *= 2
        self._add(DBlock(self._ch(self.resolution), self._ch(self.resolution // 2)))

    def forward(self, x: Tensor, alpha: float = 1.0, sets: int = 1) -> Tensor:
        """Scores of x; `sets` equal sets stacked in x are scored as if each ran alone (see minibatch_stddev)."""
        res = self.resolution
        h = lrelu(self.from_rgb[str(res)](x))
        if res > 4:
            h = self.blocks[str(res)](h)
            if alpha < 1:
                h = torch.lerp(lrelu(self.from_rgb[str(res // 2)](downsample(x))), h, alpha)
            for r in reversed(list(self.blocks)[1:-1]):
                h = self.blocks[r](h)
        return self.blocks["4"](h, sets)
