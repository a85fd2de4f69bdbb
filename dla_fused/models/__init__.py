"""DLA models by name: classification backbones, DLA-Up segmentation, CenterNet-style detection."""
import os
from typing import Callable, Dict, List, NamedTuple

import torch
from torch import nn

from .centernet import (CenterNet, IDAConv, ModulatedDeformConv2d, SumDLAUp, SumIDAUp,
                        centernet_dla34, centernet_dla34_dcn)
from .dla import (CONFIGS, DLA, DLA34, DLA46_C, DLA46X_C, DLA60, DLA60X, DLA60X_C, DLA102, DLA102X,
                  DLA102X2, DLA169, VARIANTS, BasicBlock, Bottleneck, BottleneckX, DLAConfig, Root,
                  Tree, check_input, dla34, dla46_c, dla46x_c, dla60, dla60x, dla60x_c, dla102,
                  dla102x, dla102x2, dla169, unused_projects)
from .dla_up import (DLASeg, DLAUp, IDAUp, bilinear_upsample, dla34up, dla60up, dla102up,
                     dla169up, fill_up_weights)

__all__ = [
    "create_model", "list_models", "parameter_table", "ParameterRow",
    "BasicBlock", "Bottleneck", "BottleneckX", "Root", "Tree", "DLA", "DLAConfig", "CONFIGS",
    "VARIANTS", "DLA34", "DLA46_C", "DLA46X_C", "DLA60X_C", "DLA60", "DLA60X", "DLA102", "DLA102X",
    "DLA102X2", "DLA169", "dla34", "dla46_c", "dla46x_c", "dla60x_c", "dla60", "dla60x", "dla102",
    "dla102x", "dla102x2", "dla169", "check_input", "unused_projects",
    "fill_up_weights", "bilinear_upsample", "IDAUp", "DLAUp", "DLASeg",
    "dla34up", "dla60up", "dla102up", "dla169up",
    "ModulatedDeformConv2d", "IDAConv", "SumIDAUp", "SumDLAUp", "CenterNet",
    "centernet_dla34", "centernet_dla34_dcn",
]

_MODELS: Dict[str, Callable[..., nn.Module]] = {
    **VARIANTS,
    "dla34up": dla34up, "dla60up": dla60up, "dla102up": dla102up, "dla169up": dla169up,
    "centernet_dla34": centernet_dla34, "centernet_dla34_dcn": centernet_dla34_dcn,
}


def list_models() -> List[str]:
    """Names `create_model` accepts: the ten classifiers, four DLA-Up and the CenterNet-style nets."""
    return list(_MODELS)


def create_model(name: str, pretrained=None, num_classes=None, **kwargs) -> nn.Module:
    """Build model `name`; load the local checkpoint file `pretrained` if given (never downloads).

    num_classes defaults per family: 1000 (classifiers), 19 (DLA-Up), 80 (CenterNet heatmaps).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_MODELS)}")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(f"pretrained must be None or a local checkpoint path (nothing is downloaded), "
                         f"got {pretrained!r}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _MODELS[name](**kwargs)
    if pretrained is not None:
        from ..checkpoint import load_checkpoint  # here: checkpoint imports this package
        load_checkpoint(model, pretrained)
    return model


class ParameterRow(NamedTuple):
    name: str
    original: int  # with the never-used `project` modules, as the original release
    timm: int      # without them, as timm


def parameter_table() -> List[ParameterRow]:
    """Parameter counts of the ten classifiers (1000 classes), built on the meta device."""
    rows = []
    with torch.device("meta"):
        for name, cls in VARIANTS.items():
            model = cls()
            total = sum(p.numel() for p in model.parameters())
            unused = sum(p.numel() for m in unused_projects(model).values() for p in m.parameters())
            rows.append(ParameterRow(name, total, total - unused))
    return rows
