"""CenterNet-style DLA (Zhou, Wang, Krahenbuhl, "Objects as Points", 2019): DLA-34 with a
summing IDA-Up neck and per-task heads at stride 4.

Parameter names follow CenterNet's pose_dla_dcn.py, so its checkpoints load strictly. The
deformable flavour is DCNv2 through torchvision.ops.deform_conv2d; the plain flavour replaces it
with an ordinary 3x3 conv under the same names.
"""
import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchvision.ops import deform_conv2d

from .dla import VARIANTS, check_num_classes
from .dla_up import bilinear_upsample

__all__ = ["ModulatedDeformConv2d", "IDAConv", "SumIDAUp", "SumDLAUp", "CenterNet",
           "centernet_dla34", "centernet_dla34_dcn"]

HM_PRIOR_BIAS = -2.19  # heatmap logits start at sigmoid(-2.19) ~ 0.1 (focal-loss prior)


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 (Zhu et al., CVPR 2019): a conv whose k*k taps sample at learned offsets, each scaled
    by a learned mask. `conv_offset_mask` predicts 3*k*k channels: two halves of offsets (passed on
    in that order) and k*k mask logits. Names and init as CenterNet's DCN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.conv_offset_mask = nn.Conv2d(in_channels, 3 * kernel_size * kernel_size, kernel_size,
                                          padding=padding, bias=True)
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1, o2, mask = self.conv_offset_mask(x).chunk(3, dim=1)
        return deform_conv2d(x, torch.cat([o1, o2], 1), self.weight, self.bias,
                             padding=self.padding, mask=mask.sigmoid())


class IDAConv(nn.Module):
    """3x3 conv -> BN -> ReLU, the conv deformable or plain; CenterNet's `DeformConv` layout."""

    def __init__(self, in_channels: int, out_channels: int, deformable: bool):
        super().__init__()
        self.actf = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.conv = (ModulatedDeformConv2d(in_channels, out_channels) if deformable
                     else nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actf(self.conv(x))


class SumIDAUp(nn.Module):
    """IDA-Up as CenterNet builds it: for i >= 1, layer_i = node_i(up_i(proj_i(layer_i)) + layer_{i-1}),
    with 3x3 proj/node convs and trainable bilinear-initialised up_i. Returns all layers."""

    def __init__(self, out_dim: int, channels: Sequence[int], up_factors: Sequence[int], deformable: bool):
        super().__init__()
        for i in range(1, len(channels)):
            setattr(self, f"proj_{i}", IDAConv(channels[i], out_dim, deformable))
            setattr(self, f"up_{i}", bilinear_upsample(out_dim, int(up_factors[i])))
            setattr(self, f"node_{i}", IDAConv(out_dim, out_dim, deformable))

    def project_up(self, i: int, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Step i's projection and upsampling, up_i(proj_i(x)) (+ skip): the fused IDA-Up op's unit."""
        x = getattr(self, f"up_{i}")(getattr(self, f"proj_{i}")(x))
        return x if skip is None else x + skip

    def forward(self, layers: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        out = [layers[0]]
        for i in range(1, len(layers)):
            out.append(getattr(self, f"node_{i}")(self.project_up(i, layers[i], skip=out[-1])))
        return out


class SumDLAUp(nn.Module):
    """DLA-Up over a pyramid with summing IDA-Up steps. Returns one map per input level, finest
    first: the last node of each step, then the untouched coarsest input."""

    def __init__(self, channels: Sequence[int], scales: Sequence[int], deformable: bool):
        super().__init__()
        in_channels, scales = list(channels), [int(s) for s in scales]
        for i in range(len(channels) - 1):
            j = -i - 2
            setattr(self, f"ida_{i}", SumIDAUp(channels[j], in_channels[j:],
                                               [s // scales[j] for s in scales[j:]], deformable))
            scales[j + 1:] = [scales[j]] * (i + 1)
            in_channels[j + 1:] = [channels[j]] * (i + 1)

    def forward(self, layers: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        layers = list(layers)
        out = [layers[-1]]
        for i in range(len(layers) - 1):
            start = len(layers) - i - 2
            layers[start:] = getattr(self, f"ida_{i}")(layers[start:])
            out.insert(0, layers[-1])
        return out


class CenterNet(nn.Module):
    """DLA backbone + summing DLA-Up over levels 2..5 + IDA-Up to stride 4 + one head per task.

    Each head is Conv3x3(64 -> head_conv, bias) - ReLU - Conv1x1(head_conv -> n, bias); heads whose
    name contains 'hm' (heatmaps) start with bias -2.19, the others with zero biases. `forward`
    returns [dict(head -> (N, n, H/4, W/4))], a one-element list as CenterNet does. The backbone
    keeps its (unused) classifier `base.fc`: CenterNet's checkpoints carry it. `num_classes` sizes
    the 'hm' head of the default heads {'hm', 'wh', 'reg'}; it is unused when `heads` is given.
    """

    first_level, last_level = 2, 5

    def __init__(self, base_name: str = "dla34", heads: Optional[Mapping[str, int]] = None,
                 head_conv: int = 256, deformable: bool = True, num_classes: int = 80):
        super().__init__()
        if base_name not in VARIANTS:
            raise ValueError(f"unknown DLA base {base_name!r}; known: {', '.join(VARIANTS)}")
        if isinstance(head_conv, bool) or not isinstance(head_conv, int) or head_conv < 1:
            raise ValueError(f"head_conv must be a positive int, got {head_conv!r}")
        heads = dict({"hm": check_num_classes(num_classes), "wh": 2, "reg": 2} if heads is None else heads)
        self.heads: Dict[str, int] = heads
        self.base = VARIANTS[base_name](return_levels=True)
        channels = self.base.channels[self.first_level:]
        self.dla_up = SumDLAUp(channels, [2 ** i for i in range(len(channels))], deformable)
        n = self.last_level - self.first_level
        self.ida_up = SumIDAUp(channels[0], channels[:n], [2 ** i for i in range(n)], deformable)
        for name, outputs in heads.items():
            if not name.isidentifier() or hasattr(self, name):
                raise ValueError(f"head name {name!r} is not a free attribute name")
            setattr(self, name, self._head(channels[0], head_conv, check_num_classes(outputs), "hm" in name))

    @staticmethod
    def _head(in_channels: int, head_conv: int, outputs: int, heatmap: bool) -> nn.Sequential:
        head = nn.Sequential(nn.Conv2d(in_channels, head_conv, 3, padding=1, bias=True), nn.ReLU(inplace=True),
                             nn.Conv2d(head_conv, outputs, 1, bias=True))
        if heatmap:
            nn.init.constant_(head[-1].bias, HM_PRIOR_BIAS)
        else:
            for conv in (head[0], head[-1]):
                nn.init.zeros_(conv.bias)
        return head

    def forward(self, x: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        x = self.dla_up(self.base(x)[self.first_level:])
        y = self.ida_up(x[:self.last_level - self.first_level])[-1]
        return [{name: getattr(self, name)(y) for name in self.heads}]


def centernet_dla34(num_classes: int = 80, **kwargs) -> CenterNet:
    return CenterNet("dla34", num_classes=num_classes, deformable=False, **kwargs)


def centernet_dla34_dcn(num_classes: int = 80, **kwargs) -> CenterNet:
    return CenterNet("dla34", num_classes=num_classes, deformable=True, **kwargs)
