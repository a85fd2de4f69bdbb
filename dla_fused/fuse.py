"""Convert a model to the fused ops in place, and back, without changing its state_dict.

`fuse(model)` finds, by structure rather than class name:
  * aggregation nodes: a DLA `Root` (this package's or the original release's) or timm's `DlaRoot`
    with a 1x1 bias-free `conv` (Conv2d), a `bn` (BatchNorm2d) and a boolean `residual` or
    `shortcut` attribute. It is replaced by an `AggregationNode` sharing the same conv and bn,
    called the same way.
  * IDA-Up modules: a module with `proj_i` / `up_i` submodules and a `project_up(i, x, skip=None)`
    method (dla_fused's IDAUp and the CenterNet-style summing IDAUp). Its `project_up` is replaced
    by the fused IDA-Up step; a 1x1 conv-BN-ReLU projection is fused too, any other projection
    (3x3, deformable) runs as it is and only the upsample + skip is fused.
  * in any other model, aggregation chains and IDA-Up steps in a torch.fx trace: cat -> 1x1
    Conv2d -> BatchNorm2d [-> + first input] [-> ReLU, LeakyReLU or SiLU], and depthwise
    ConvTranspose2d upsamplings with their projection and skip; the forward of the module holding
    them runs the traced graph with each replaced by a fused module (see `dla_fused.graph_fuse`).
  * for CPU inference (see `dla_fused.prepack`): nn.Sequential runs of Conv2d [BatchNorm2d]
    [ReLU], dla_fused's BasicBlock / Bottleneck, and the two fused modules above run, in eval mode
    with autograd off, as prepacked oneDNN convolutions with BN folded in.
`unfuse(model)` restores the original modules and methods.
"""
import inspect
from typing import Optional

import torch
import torch.nn as nn

from . import graph_fuse, prepack
from .models.centernet import CenterNet, IDAConv
from .models.dla import DLA, BasicBlock, Bottleneck, BottleneckX
from .models.dla_up import DLASeg
from .ops import _checks
from .ops.aggregation import AggregationNode, is_plain_1x1
from .ops.ida_up import IDAUpStep

_ORIGINAL = "_dla_fused_original"
_STRUCTURAL = (DLA, DLASeg, CenterNet)  # models whose every fusable part is found by structure
_STEPS = "_dla_fused_steps"


class _Method:
    """`function` bound to one module instance, set as an instance attribute by `fuse`. Unlike a
    types.MethodType it survives pickling (torch.save of a whole model) and copy.deepcopy: the
    function is saved by its qualified name, the module through pickle's memo. It shows what a
    bound method shows of its function (code, name, signature without the module), which
    torch.export reads from a model's forward."""

    def __init__(self, function, module: nn.Module):
        self.function, self.module = function, module

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)

    @property
    def __code__(self):
        return self.function.__code__

    @property
    def __name__(self):
        return self.function.__name__

    @property
    def __signature__(self):
        signature = inspect.signature(self.function)
        return signature.replace(parameters=list(signature.parameters.values())[1:])


def _root_like(module: nn.Module) -> Optional[bool]:
    """The residual flag if `module` is a fusable aggregation node, else None."""
    if isinstance(module, AggregationNode):
        return None
    conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
    flag = getattr(module, "residual", getattr(module, "shortcut", None))
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(flag, bool)):
        return None
    if not is_plain_1x1(conv) or conv.bias is not None:
        return None
    if not bn.affine or bn.num_features != conv.out_channels:
        return None
    extra = set(dict(module.named_children())) - {"conv", "bn", "relu"}
    if extra or type(getattr(module, "relu", nn.ReLU())) is not nn.ReLU:
        return None
    # The forward is assumed, so the class must be one whose forward is known: DLA's Root (this
    # package's and the original release's) or timm's DlaRoot. Other modules are matched in a
    # trace (graph_fuse), which sees what their forward does.
    return flag if type(module).__name__ in ("Root", "DlaRoot") else None


def _fusable_step(proj: nn.Module, up: nn.Module):
    """(projection to run unfused or None, fused IDAUpStep) for one IDA-Up step, or None when even
    the upsampling cannot be fused (the step then runs as it is)."""
    try:
        return None, IDAUpStep.from_modules(proj, up)
    except ValueError:  # a projection the op cannot take (3x3, deformable): run it, fuse the rest
        pass
    try:
        return proj, IDAUpStep.from_modules(nn.Identity(), up)
    except ValueError:
        return None


def _fused_project_up(self, i: int, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """up_i(proj_i(x)) (+ skip) through the fused IDA-Up op."""
    plan = self.__dict__[_STEPS][i]
    if plan is None:
        return type(self).project_up(self, i, x, skip)
    unfused_proj, step = plan
    return step(x if unfused_proj is None else unfused_proj(x), skip)


def _ida_like(module: nn.Module) -> bool:
    return (callable(getattr(type(module), "project_up", None)) and hasattr(module, "up_1")
            and hasattr(module, "proj_1") and _STEPS not in module.__dict__)


def _prepack_forward(module: nn.Module):
    """The prepacked forward `fuse` gives `module`, or None."""
    if type(module) in (BasicBlock, Bottleneck, BottleneckX):  # exact types: their forward is known
        return prepack.block_forward
    if type(module) is IDAConv and [type(m) for m in module.actf] == [nn.BatchNorm2d, nn.ReLU]:
        return prepack.conv_act_forward
    if isinstance(module, (DLA, DLASeg, CenterNet)):
        return prepack.model_forward
    if prepack.sequential_unit(module):
        return prepack.sequential_forward
    return None


def fuse(model: nn.Module, prepack_inference: bool = True, report: bool = False):
    """Route `model`'s aggregation nodes and IDA-Up steps through the fused ops, in place, and
    (prepack_inference=True) its conv-BN units through prepacked oneDNN convolutions in CPU
    inference. Returns the model, or with report=True (model, FuseReport): what was fused, what
    was not and why (print it for a table). The state_dict (names, shapes, values) is unchanged.

    Aggregation nodes are found by structure (DLA's Root in this package's, the original
    release's and timm's layouts) and, in any other model, in a torch.fx trace: the chain
    cat -> 1x1 Conv2d -> BatchNorm2d [-> + first input] [-> ReLU, LeakyReLU or SiLU] (see
    dla_fused.graph_fuse)."""
    if not isinstance(prepack_inference, bool):
        raise ValueError(f"prepack_inference must be True or False, got {prepack_inference!r}")
    if not isinstance(report, bool):
        raise ValueError(f"report must be True or False, got {report!r}")
    found = graph_fuse.FuseReport()
    for name, module in list(model.named_modules()):
        residual = _root_like(module)
        if residual is not None and name:
            parent_name, _, child = name.rpartition(".")
            node = AggregationNode.from_modules(module.conv, module.bn, residual=residual)
            node.__dict__[prepack.ON] = prepack_inference
            object.__setattr__(node, _ORIGINAL, module)  # kept for unfuse(), not registered
            setattr(model.get_submodule(parent_name) if parent_name else model, child, node)
            found.append(graph_fuse.FuseEntry(name, "aggregation node", True,
                                              f"{type(module).__name__} (residual={residual})"))
        elif _ida_like(module):
            # Steps share the module's proj_i / up_i; kept outside the module registry so that
            # the state_dict does not change.
            steps = {}
            for key, proj in module.named_children():
                if key.startswith("proj_"):
                    i = int(key[len("proj_"):])
                    steps[i] = _fusable_step(proj, getattr(module, f"up_{i}"))
                    found.append(graph_fuse.FuseEntry(
                        name, "IDA-Up step", steps[i] is not None,
                        f"step {i}: " + ("upsampling not fusable" if steps[i] is None else
                                         "projection + upsampling" if steps[i][0] is None else
                                         f"upsampling ({type(proj).__name__} projection runs unfused)")))
            module.__dict__[_STEPS] = steps
            for plan in steps.values():
                if plan is not None:
                    plan[1].__dict__[prepack.ON] = prepack_inference
            module.project_up = _Method(_fused_project_up, module)
    graph_fuse.fuse_graphs(model, _STRUCTURAL, found, prepack_inference)
    for module in model.modules():
        forward = _prepack_forward(module)
        if forward is not None and "forward" not in module.__dict__:
            module.forward = _Method(forward, module)
            module.__dict__[prepack.ON] = prepack_inference
    return (model, found) if report else model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse`: the original modules and methods come back, sharing the same parameters."""
    graph_fuse.restore(model)
    for name, module in list(model.named_modules()):
        original = module.__dict__.get(_ORIGINAL)
        if isinstance(module, AggregationNode) and isinstance(original, nn.Module) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, original)
        elif _STEPS in module.__dict__:
            del module.__dict__[_STEPS]
            del module.project_up
        if module.__dict__.pop(prepack.ON, None) is not None and "forward" in module.__dict__:
            del module.forward
    prepack.clear(model)
    return model


def set_prepack(model: nn.Module, enabled: bool) -> int:
    """Turn the prepacked CPU inference path (see `dla_fused.prepack`) on or off for every unit
    `fuse` routed there, and drop the cached weights. Returns the number of units set."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    units = [m for m in model.modules() if prepack.ON in m.__dict__]
    units += [step for m in model.modules() for step in fused_steps(m)] + graph_fuse.graph_nodes(model)
    units += graph_fuse.graph_steps(model)
    for unit in units:
        unit.__dict__[prepack.ON] = enabled
    prepack.clear(model)
    return len(units)


def set_memory_efficient(model: nn.Module, memory_efficient: Optional[bool]) -> int:
    """Set `memory_efficient` on every fused aggregation node of `model`: True recomputes each
    node's conv output in backward (fewer bytes saved), False keeps it (one matrix product fewer),
    None takes the device's default. Returns the number of nodes set."""
    _checks.memory_efficient(memory_efficient)
    nodes = [m for m in model.modules() if isinstance(m, AggregationNode)] + graph_fuse.graph_nodes(model)
    for node in nodes:
        node.memory_efficient = memory_efficient
    return len(nodes)


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, AggregationNode) or _STEPS in m.__dict__ or graph_fuse._GRAPH in m.__dict__
               for m in model.modules())


def fused_steps(module: nn.Module):
    """The fused IDA-Up steps `fuse` attached to `module` (empty if none)."""
    return [plan[1] for plan in module.__dict__.get(_STEPS, {}).values() if plan is not None]
