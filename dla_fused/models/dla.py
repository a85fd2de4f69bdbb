"""Deep Layer Aggregation (Yu, Wang, Shelhamer, Darrell, CVPR 2018) classification backbones.

Parameter names and shapes follow the original release (ucbdrive/dla), so its checkpoints load
strictly, and timm's load too (timm's keys are a subset: it drops the `project` modules that the
original builds at levels > 1 tree nodes but never uses). Every variant is a row of `CONFIGS`.

Iterative deep aggregation (IDA) chains the stages level0..level5; hierarchical deep aggregation
(HDA) is the recursive `Tree`, whose `Root` aggregation nodes fuse their children:
    root(x_1, ..., x_k) = relu(bn(W [x_1; ...; x_k]) (+ x_1 if residual))
"""
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Type

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock", "Bottleneck", "BottleneckX", "Root", "Tree", "DLA", "DLAConfig", "CONFIGS",
    "DLA34", "DLA46_C", "DLA46X_C", "DLA60X_C", "DLA60", "DLA60X", "DLA102", "DLA102X",
    "DLA102X2", "DLA169", "VARIANTS", "dla34", "dla46_c", "dla46x_c", "dla60x_c", "dla60",
    "dla60x", "dla102", "dla102x", "dla102x2", "dla169", "check_input", "check_num_classes",
    "init_conv_bn_", "unused_projects",
]

STRIDE = 32  # total downsampling of the backbone


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation,
                     groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = x if residual is None else residual
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += residual
        return F.relu(out, inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped by `cardinality`) -> 1x1 expand, with a residual connection."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, cardinality: int = 1):
        super().__init__()
        width = self.bottle_planes(planes, cardinality)
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, dilation, groups=cardinality)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes)
        self.bn3 = nn.BatchNorm2d(planes)

    @staticmethod
    def bottle_planes(planes: int, cardinality: int) -> int:
        return planes // 2

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = x if residual is None else residual
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += residual
        return F.relu(out, inplace=True)


class BottleneckX(Bottleneck):
    """ResNeXt-style bottleneck: `cardinality` groups, bottleneck width planes * cardinality / 32."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, cardinality: int = 32):
        super().__init__(inplanes, planes, stride, dilation, cardinality)

    @staticmethod
    def bottle_planes(planes: int, cardinality: int) -> int:
        return planes * cardinality // 32


class Root(nn.Module):
    """Aggregation node: relu(bn(conv1x1(cat(children))) (+ children[0] if residual)).

    `kernel_size` is kept for the original's signature; the node is a 1x1 conv (the only size any
    DLA uses), so anything else is refused.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, residual: bool = False):
        super().__init__()
        if kernel_size != 1:
            raise ValueError(f"Root is a 1x1 aggregation node; kernel_size={kernel_size} is not supported")
        self.conv = conv1x1(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)
        self.residual = residual

    def forward(self, *children: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(torch.cat(children, 1)))
        if self.residual:
            x += children[0]
        return F.relu(x, inplace=True)


class Tree(nn.Module):
    """Hierarchical deep aggregation of depth `levels`, built recursively.

    A depth-1 tree is two blocks aggregated by a Root; a deeper tree stacks two subtrees and hands
    its children (the downsampled input when `level_root`, then each tree1 output) down to the
    deepest root of tree2, which therefore aggregates up to levels + 2 inputs.
    """

    def __init__(self, levels: int, block: Type[nn.Module], in_channels: int, out_channels: int,
                 stride: int = 1, level_root: bool = False, root_dim: int = 0,
                 root_residual: bool = False, **block_args):
        super().__init__()
        root_dim = root_dim or 2 * out_channels
        if level_root:
            root_dim += in_channels
        if levels == 1:
            self.tree1 = block(in_channels, out_channels, stride, **block_args)
            self.tree2 = block(out_channels, out_channels, 1, **block_args)
            self.root = Root(root_dim, out_channels, 1, root_residual)
        else:
            sub = dict(root_residual=root_residual, **block_args)
            self.tree1 = Tree(levels - 1, block, in_channels, out_channels, stride, **sub)
            self.tree2 = Tree(levels - 1, block, out_channels, out_channels, root_dim=root_dim + out_channels, **sub)
        # Built at every node as the original does (its checkpoints carry the weights); only
        # depth-1 nodes use it, see `unused_projects`.
        self.project = None
        if in_channels != out_channels:
            self.project = nn.Sequential(conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels))
        self.downsample = nn.MaxPool2d(stride, stride=stride) if stride > 1 else None
        self.levels = levels
        self.level_root = level_root

    def forward(self, x: torch.Tensor, children: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        bottom = self.downsample(x) if self.downsample is not None else x
        children = [*children, bottom] if self.level_root else list(children)
        if self.levels == 1:
            residual = self.project(bottom) if self.project is not None else bottom
            x1 = self.tree1(x, residual)
            x2 = self.tree2(x1)
            return self.root(x2, x1, *children)
        x1 = self.tree1(x)
        return self.tree2(x1, [*children, x1])


def unused_projects(model: nn.Module) -> Dict[str, nn.Module]:
    """The `project` modules of levels > 1 tree nodes, by qualified name: built, never used."""
    return {f"{name}.project" if name else "project": m.project for name, m in model.named_modules()
            if isinstance(m, Tree) and m.levels > 1 and m.project is not None}


def conv_level(inplanes: int, planes: int, convs: int, stride: int = 1) -> nn.Sequential:
    layers = []
    for i in range(convs):
        layers += [conv3x3(inplanes if i == 0 else planes, planes, stride if i == 0 else 1),
                   nn.BatchNorm2d(planes), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def init_conv_bn_(module: nn.Module) -> None:
    """The original init: conv weights ~ N(0, 2 / (k*k*out)), BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def check_input(x: torch.Tensor, in_chans: int) -> None:
    """Raise ValueError unless x is (N, in_chans, H, W) with sizes the backbone can aggregate.

    level1 halves a size s to ceil(s/2); each of level2..level5 then halves it again, and a tree's
    max-pooled input (floor) must line up with its strided block's output (ceil), so ceil(s/2) must
    be a positive multiple of 16: s = 32k or 32k - 1.
    """
    if isinstance(x, torch.fx.Proxy):  # a torch.fx trace (dla_fused.fuse): no values to check
        return
    expected = f"(N, {in_chans}, H, W) with H and W multiples of {STRIDE} (or one less)"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a tensor of shape {expected}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point input of shape {expected}, got dtype {x.dtype}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}")
    half = STRIDE // 2
    if any(-(-s // 2) % half or s == 0 for s in x.shape[2:]):
        sizes = ", ".join(str(STRIDE * max(1, -(-s // STRIDE))) for s in x.shape[2:])
        raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}; "
                         f"pad or resize the image, e.g. to {sizes}")


class DLA(nn.Module):
    """DLA backbone and classifier.

    Returns logits (N, num_classes), or with `return_levels` the six level outputs (strides
    1, 2, 4, 8, 16, 32) for dense prediction. `cardinality` is passed to the block (BottleneckX).
    """

    def __init__(self, levels: Sequence[int], channels: Sequence[int], num_classes: int = 1000,
                 block: Type[nn.Module] = BasicBlock, residual_root: bool = False,
                 return_levels: bool = False, cardinality: Optional[int] = None, in_chans: int = 3):
        super().__init__()
        self.channels = list(channels)
        self.num_classes = check_num_classes(num_classes)
        self.return_levels = return_levels
        self.in_chans = in_chans
        self.base_layer = nn.Sequential(
            nn.Conv2d(in_chans, channels[0], 7, padding=3, bias=False),
            nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.level0 = conv_level(channels[0], channels[0], levels[0])
        self.level1 = conv_level(channels[0], channels[1], levels[1], stride=2)
        tree_args = dict(root_residual=residual_root)
        if cardinality is not None:
            tree_args["cardinality"] = cardinality
        for i in range(2, 6):
            setattr(self, f"level{i}", Tree(levels[i], block, channels[i - 1], channels[i], 2,
                                            level_root=i > 2, **tree_args))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels[-1], num_classes, 1, bias=True)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor):
        check_input(x, self.in_chans)
        x = self.base_layer(x)
        levels: List[torch.Tensor] = []
        for i in range(6):
            x = getattr(self, f"level{i}")(x)
            levels.append(x)
        if self.return_levels:
            return levels
        return self.fc(self.pool(x)).flatten(1)


class DLAConfig(NamedTuple):
    levels: Sequence[int]
    channels: Sequence[int]
    block: Type[nn.Module]
    cardinality: Optional[int]
    residual_root: bool


_SMALL = (16, 32, 64, 64, 128, 256)
_LARGE = (16, 32, 128, 256, 512, 1024)
CONFIGS: Dict[str, DLAConfig] = {
    #           levels               channels                    block        card  residual root
    "dla34":    DLAConfig((1, 1, 1, 2, 2, 1), (16, 32, 64, 128, 256, 512), BasicBlock, None, False),
    "dla46_c":  DLAConfig((1, 1, 1, 2, 2, 1), _SMALL, Bottleneck, None, False),
    "dla46x_c": DLAConfig((1, 1, 1, 2, 2, 1), _SMALL, BottleneckX, 32, False),
    "dla60x_c": DLAConfig((1, 1, 1, 2, 3, 1), _SMALL, BottleneckX, 32, False),
    "dla60":    DLAConfig((1, 1, 1, 2, 3, 1), _LARGE, Bottleneck, None, False),
    "dla60x":   DLAConfig((1, 1, 1, 2, 3, 1), _LARGE, BottleneckX, 32, False),
    "dla102":   DLAConfig((1, 1, 1, 3, 4, 1), _LARGE, Bottleneck, None, True),
    "dla102x":  DLAConfig((1, 1, 1, 3, 4, 1), _LARGE, BottleneckX, 32, True),
    "dla102x2": DLAConfig((1, 1, 1, 3, 4, 1), _LARGE, BottleneckX, 64, True),
    "dla169":   DLAConfig((1, 1, 2, 3, 5, 1), _LARGE, Bottleneck, None, True),
}


class _Variant(DLA):
    """A DLA built from its row of CONFIGS."""
    variant: str

    def __init__(self, num_classes: int = 1000, **kwargs):
        super().__init__(**CONFIGS[self.variant]._asdict(), num_classes=num_classes, **kwargs)


class DLA34(_Variant):
    variant = "dla34"


class DLA46_C(_Variant):
    variant = "dla46_c"


class DLA46X_C(_Variant):
    variant = "dla46x_c"


class DLA60X_C(_Variant):
    variant = "dla60x_c"


class DLA60(_Variant):
    variant = "dla60"


class DLA60X(_Variant):
    variant = "dla60x"


class DLA102(_Variant):
    variant = "dla102"


class DLA102X(_Variant):
    variant = "dla102x"


class DLA102X2(_Variant):
    variant = "dla102x2"


class DLA169(_Variant):
    variant = "dla169"


VARIANTS: Dict[str, Type[DLA]] = {cls.variant: cls for cls in _Variant.__subclasses__()}


def dla34(**kwargs) -> DLA:
    return DLA34(**kwargs)


def dla46_c(**kwargs) -> DLA:
    return DLA46_C(**kwargs)


def dla46x_c(**kwargs) -> DLA:
    return DLA46X_C(**kwargs)


def dla60x_c(**kwargs) -> DLA:
    return DLA60X_C(**kwargs)


def dla60(**kwargs) -> DLA:
    return DLA60(**kwargs)


def dla60x(**kwargs) -> DLA:
    return DLA60X(**kwargs)


def dla102(**kwargs) -> DLA:
    return DLA102(**kwargs)


def dla102x(**kwargs) -> DLA:
    return DLA102X(**kwargs)


def dla102x2(**kwargs) -> DLA:
    return DLA102X2(**kwargs)


def dla169(**kwargs) -> DLA:
    return DLA169(**kwargs)
