"""DLA-Up: dense prediction by iterative deep aggregation back up the DLA hierarchy.

Matches the original release (ucbdrive/dla, dla_up.py): names, shapes, init and outputs.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .dla import VARIANTS, check_num_classes, init_conv_bn_

__all__ = ["fill_up_weights", "bilinear_upsample", "IDAUp", "DLAUp", "DLASeg",
           "dla34up", "dla60up", "dla102up", "dla169up"]


def fill_up_weights(up: nn.ConvTranspose2d) -> None:
    """Set every channel of a depthwise transposed conv to the bilinear kernel.

    For kernel size k: f = ceil(k/2), c = (2f - 1 - f % 2) / 2f, w[i, j] = (1 - |i/f - c|)(1 - |j/f - c|).
    """
    k = up.weight.shape[2]
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    row = 1 - (torch.arange(k, dtype=torch.float64, device=up.weight.device) / f - c).abs()
    with torch.no_grad():
        up.weight.copy_((row[:, None] * row[None, :]).expand_as(up.weight))


def bilinear_upsample(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Depthwise ConvTranspose2d that upsamples by `factor`, initialised to bilinear interpolation."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2,
                            groups=channels, bias=False)
    fill_up_weights(up)
    return up


class IDAUp(nn.Module):
    """Iterative deep aggregation up: bring every input to `out_dim` channels and the first input's
    resolution (proj_i: 1x1 conv-BN-ReLU, up_i: trainable bilinear-initialised upsampling), then
    aggregate left to right, x = node_i(cat(x, layer_i)). Returns the last node and every node.
    """

    def __init__(self, node_kernel: int, out_dim: int, channels: Sequence[int], up_factors: Sequence[int]):
        super().__init__()
        self.channels = list(channels)
        self.out_dim = out_dim
        for i, (c, f) in enumerate(zip(channels, up_factors)):
            proj = nn.Identity() if c == out_dim else nn.Sequential(
                nn.Conv2d(c, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))
            setattr(self, f"proj_{i}", proj)
            setattr(self, f"up_{i}", nn.Identity() if f == 1 else bilinear_upsample(out_dim, int(f)))
        for i in range(1, len(channels)):
            setattr(self, f"node_{i}", nn.Sequential(
                nn.Conv2d(2 * out_dim, out_dim, node_kernel, padding=node_kernel // 2, bias=False),
                nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True)))
        init_conv_bn_(self)

    def project_up(self, i: int, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Step i's projection and upsampling, up_i(proj_i(x)) (+ skip): the fused IDA-Up op's unit."""
        x = getattr(self, f"up_{i}")(getattr(self, f"proj_{i}")(x))
        return x if skip is None else x + skip

    def forward(self, layers: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if len(layers) != len(self.channels):
            raise ValueError(f"IDAUp expects {len(self.channels)} inputs, got {len(layers)}")
        layers = [self.project_up(i, x) for i, x in enumerate(layers)]
        x, nodes = layers[0], []
        for i in range(1, len(layers)):
            x = getattr(self, f"node_{i}")(torch.cat([x, layers[i]], 1))
            nodes.append(x)
        return x, nodes


class DLAUp(nn.Module):
    """Aggregates a feature pyramid from the coarsest level down: ida_i merges the i + 2 coarsest
    levels into channels[-i-2] at that level's resolution, replacing the finer inputs of the next
    step with its nodes. Returns the finest output."""

    def __init__(self, channels: Sequence[int], scales: Sequence[int], in_channels: Optional[Sequence[int]] = None):
        super().__init__()
        self.channels = list(channels)
        in_channels = list(channels if in_channels is None else in_channels)
        scales = [int(s) for s in scales]
        for i in range(len(channels) - 1):
            j = -i - 2
            setattr(self, f"ida_{i}", IDAUp(3, channels[j], in_channels[j:], [s // scales[j] for s in scales[j:]]))
            scales[j + 1:] = [scales[j]] * (i + 1)
            in_channels[j + 1:] = [channels[j]] * (i + 1)

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(layers) != len(self.channels):
            raise ValueError(f"DLAUp expects {len(self.channels)} inputs, got {len(layers)}")
        layers = list(layers)
        for i in range(len(layers) - 1):
            x, nodes = getattr(self, f"ida_{i}")(layers[-i - 2:])
            layers[-i - 1:] = nodes
        return x


class DLASeg(nn.Module):
    """DLA-Up segmentation network. Returns (log_softmax(up(fc(x))), fc(x)): per-pixel log
    probabilities at input resolution and logits at 1/down_ratio. `up` is a fixed bilinear upsampling.
    """

    def __init__(self, base_name: str, classes: int, down_ratio: int = 2):
        super().__init__()
        if base_name not in VARIANTS:
            raise ValueError(f"unknown DLA base {base_name!r}; known: {', '.join(VARIANTS)}")
        if down_ratio not in (2, 4, 8, 16):
            raise ValueError(f"down_ratio must be 2, 4, 8 or 16, got {down_ratio!r}")
        check_num_classes(classes)
        self.first_level = int(math.log2(down_ratio))
        self.base = VARIANTS[base_name](return_levels=True)
        channels = self.base.channels[self.first_level:]
        self.dla_up = DLAUp(channels, scales=[2 ** i for i in range(len(channels))])
        self.fc = nn.Sequential(nn.Conv2d(channels[0], classes, 1, bias=True))
        init_conv_bn_(self.fc)
        self.up = bilinear_upsample(classes, down_ratio)
        self.up.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.dla_up(self.base(x)[self.first_level:])
        x = self.fc(x)
        return F.log_softmax(self.up(x), dim=1), x


def dla34up(num_classes: int = 19, **kwargs) -> DLASeg:
    return DLASeg("dla34", num_classes, **kwargs)


def dla60up(num_classes: int = 19, **kwargs) -> DLASeg:
    return DLASeg("dla60", num_classes, **kwargs)


def dla102up(num_classes: int = 19, **kwargs) -> DLASeg:
    return DLASeg("dla102", num_classes, **kwargs)


def dla169up(num_classes: int = 19, **kwargs) -> DLASeg:
    return DLASeg("dla169", num_classes, **kwargs)
