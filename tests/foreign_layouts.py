"""DLA-Up and CenterNet networks as other codebases write their forward passes, for fuse() to find
their IDA-Up steps in a trace (tests/test_graph_fuse.py).

The modules, names and parameters are this package's (dla34up, centernet_dla34*); only the classes
change, to ones whose forward is written as in the original DLA release's dla_up.py (IDA-Up
returns its nodes; the segmentation head upsamples and takes log-softmax) and CenterNet's
pose_dla_dcn.py (IDA-Up updates a list in place between `startp` and `endp`; DLA-Up walks the
whole pyramid from `startp`). None of them has `project_up`, so fuse() cannot find their steps by
structure."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import dla_fused


class ReleaseIDAUp(nn.Module):
    def forward(self, layers):
        assert len(self.channels) == len(layers)
        layers = list(layers)
        for i, layer in enumerate(layers):
            layers[i] = getattr(self, f"up_{i}")(getattr(self, f"proj_{i}")(layer))
        x, y = layers[0], []
        for i in range(1, len(layers)):
            x = getattr(self, f"node_{i}")(torch.cat([x, layers[i]], 1))
            y.append(x)
        return x, y


class ReleaseDLAUp(nn.Module):
    def forward(self, layers):
        layers = list(layers)
        assert len(layers) > 1
        for i in range(len(layers) - 1):
            x, y = getattr(self, f"ida_{i}")(layers[-i - 2:])
            layers[-i - 1:] = y
        return x


class ReleaseDLASeg(nn.Module):
    def forward(self, x):
        x = self.base(x)
        x = self.dla_up(x[self.first_level:])
        x = self.fc(x)
        return F.log_softmax(self.up(x), dim=1), x


class PoseIDAUp(nn.Module):
    def forward(self, layers, startp, endp):
        for i in range(startp + 1, endp):
            upsample = getattr(self, f"up_{i - startp}")
            project = getattr(self, f"proj_{i - startp}")
            layers[i] = upsample(project(layers[i]))
            node = getattr(self, f"node_{i - startp}")
            layers[i] = node(layers[i] + layers[i - 1])


class PoseDLAUp(nn.Module):
    def forward(self, layers):
        out = [layers[-1]]
        for i in range(len(layers) - self.startp - 1):
            getattr(self, f"ida_{i}")(layers, len(layers) - i - 2, len(layers))
            out.insert(0, layers[-1])
        return out


class PoseDLASeg(nn.Module):
    def forward(self, x):
        x = self.base(x)
        x = self.dla_up(x)
        y = []
        for i in range(self.last_level - self.first_level):
            y.append(x[i].clone())
        self.ida_up(y, 0, len(y))
        return [{head: getattr(self, head)(y[-1]) for head in self.heads}]


def _recast(model: nn.Module, classes) -> nn.Module:
    for module in model.modules():
        for ours, theirs in classes.items():
            if type(module) is ours:
                module.__class__ = theirs
    return model


def release_dlaseg(num_classes: int = 5) -> nn.Module:
    """dla34up with the original release's forward passes (its parameters unchanged)."""
    from dla_fused.models.dla_up import DLASeg, DLAUp, IDAUp
    model = dla_fused.create_model("dla34up", fused=False, num_classes=num_classes)
    return _recast(model, {IDAUp: ReleaseIDAUp, DLAUp: ReleaseDLAUp, DLASeg: ReleaseDLASeg})


def pose_dlaseg(name: str = "centernet_dla34", **kwargs) -> nn.Module:
    """A CenterNet network with pose_dla_dcn.py's forward passes (its parameters unchanged)."""
    from dla_fused.models.centernet import CenterNet, SumDLAUp, SumIDAUp
    model = dla_fused.create_model(name, fused=False, **kwargs)
    model.first_level, model.last_level = CenterNet.first_level, CenterNet.last_level  # class attributes
    model.dla_up.startp = model.first_level
    return _recast(model, {SumIDAUp: PoseIDAUp, SumDLAUp: PoseDLAUp, CenterNet: PoseDLASeg})
