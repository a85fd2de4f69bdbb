"""Aggregation nodes and IDA-Up steps found in a traced graph, for networks other than DLA.

`fuse` (dla_fused.fuse) calls `fuse_graphs(model)` after its structural pass. It traces the model
with torch.fx (timm's not-traceable modules and functions stay opaque, as timm's own FX helpers
do), looks for

    torch.cat([x0, x1, ...], dim=1) -> Conv2d 1x1 -> BatchNorm2d [-> + x0] [-> activation]

where the Conv2d is bias-free, stride 1, unpadded and ungrouped, the BatchNorm2d is affine (or is
timm's BatchNormAct2d, whose activation then counts), the activation ReLU, LeakyReLU (slope >= 0)
or SiLU, and each intermediate value has no other user, and replaces each such chain by one
fused `AggregationNode` sharing the conv's and BatchNorm's parameters; and for

    [Conv2d 1x1 -> BatchNorm2d -> ReLU ->] depthwise ConvTranspose2d (kernel 2f, stride f) [-> + skip]

one fused IDA-Up step (`GraphIDAStep`). Only the forward of the smallest module that holds the
whole chain (its "owner") is replaced, by the traced graph with the chain swapped out; the
owner's parameters and the model's state_dict are untouched, and `unfuse` restores the original
forward.

A model that cannot be traced as a whole is searched module by module: each submodule that traces
is handled alone, and the report says which modules could not be traced and why.

The traced graph holds Python branches frozen at trace time. Branches on `self.training` are
handled by tracing once per mode; other flags a forward branches on (e.g. a gradient
checkpointing switch) take effect after `unfuse` + `fuse` again.
"""
import operator
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .ops.aggregation import AggregationNode, is_plain_1x1
from .ops.ida_up import IDAUpStep
from .ops.primitives import upsampled_size

_GRAPH = "_dla_fused_graph"  # the owner's _OwnerGraph, outside the module registry

_CAT = (torch.cat, torch.concat, torch.concatenate)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_RELU_METHODS = ("relu", "relu_")
_ADD = (operator.add, operator.iadd, torch.add)


@dataclass
class FuseEntry:
    """One candidate: `path` (the module that owns it, "" for the model), `kind`, whether it was
    fused, and `detail` (the chain, or why it was not fused)."""
    path: str
    kind: str
    fused: bool
    detail: str

    def __str__(self) -> str:
        where = self.path or "(model)"
        return f"{'fused' if self.fused else 'not fused':<9}  {self.kind:<16} {where}: {self.detail}"


class FuseReport(list):
    """What `fuse(model, report=True)` found: a list of FuseEntry, printable as a table."""

    @property
    def fused(self) -> List[FuseEntry]:
        return [e for e in self if e.fused]

    @property
    def not_fused(self) -> List[FuseEntry]:
        return [e for e in self if not e.fused]

    def count(self, kind: Optional[str] = None, fused: bool = True) -> int:  # type: ignore[override]
        return sum(1 for e in self if e.fused == fused and (kind is None or e.kind == kind))

    def __str__(self) -> str:
        head = f"{len(self.fused)} fused, {len(self.not_fused)} not fused"
        return "\n".join([head] + [str(e) for e in self])


# ---------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------
def _timm_notrace():
    """(modules, functions) timm marks as not traceable, or empty sets without timm."""
    try:
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    except Exception:  # timm absent or its layout changed: plain torch.fx rules
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class _Tracer(fx.Tracer):
    """torch.fx's tracer with more leaves: normalisation layers (timm's BatchNormAct2d included),
    the fused modules, modules whose forward runs a fused graph, modules owning parameters or buffers
    of their own (so that a module's tensors are never baked into a graph), and timm's
    not-traceable modules."""

    def __init__(self):
        modules, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self.notrace_modules = modules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # an owner runs its own fused graph; other replaced forwards (fuse's prepacked CPU
        # inference paths) fall back to their class's forward on traced values and are traced
        if isinstance(m, (nn.modules.batchnorm._NormBase, AggregationNode, IDAUpStep)) or _GRAPH in m.__dict__:
            return True
        if self.notrace_modules and isinstance(m, self.notrace_modules):
            return True
        if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None:
            return True
        return super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> fx.Graph:
    return _Tracer().trace(module)


def _short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------
@dataclass
class _Match:
    cat: fx.Node
    conv: fx.Node
    end: fx.Node  # the node whose value the fused node produces
    erase: List[fx.Node]  # end first
    children: List[fx.Node]
    residual: bool
    conv_path: str
    bn_path: str
    chain: str
    reason: Optional[str] = None  # why it is not fused (None: fusable)
    locations: List[str] = field(default_factory=list)
    activation: Tuple[str, float] = ("none", 0.0)  # (name, negative slope) for AggregationNode


def _location(node: fx.Node) -> str:
    """The path of the module whose forward code made `node` (relative to the traced root)."""
    stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    if node.op == "call_module" and stack and stack[-1] == node.target:
        stack = stack[:-1]
    return stack[-1] if stack else ""


def _common_prefix(paths: List[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for items in zip(*parts):
        if any(item != items[0] for item in items):
            break
        common.append(items[0])
    return ".".join(common)


def _module(root: nn.Module, node: fx.Node) -> Optional[nn.Module]:
    """The module a call_module node calls (None for other nodes, and for the fused modules
    inserted by _rewrite, which `root` does not hold)."""
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(node.target)
    except AttributeError:
        return None


def _activation_of(root: nn.Module, node: fx.Node) -> Optional[Tuple[str, float, str]]:
    """(activation name for AggregationNode, negative slope, description) when `node` applies a
    supported activation to its first argument alone, else None."""
    if node.op == "call_module":
        module = _module(root, node)
        if type(module) is nn.LeakyReLU and module.negative_slope >= 0 and len(node.args) == 1:
            return "leaky_relu", float(module.negative_slope), f"LeakyReLU({module.negative_slope})"
        if type(module) is nn.SiLU and len(node.args) == 1:
            return "silu", 0.0, "SiLU"
    if node.op == "call_function" and node.target is F.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        extra = set(node.kwargs) - {"negative_slope", "inplace"}
        if isinstance(slope, (int, float)) and slope >= 0 and not extra and len(node.args) <= 3:
            return "leaky_relu", float(slope), f"leaky_relu({slope})"
    if node.op == "call_function" and node.target is F.silu and len(node.args) == 1 and \
            set(node.kwargs) <= {"inplace"}:
        return "silu", 0.0, "silu"
    name = _relu_like(root, node)
    if name is not None and (len(node.args) == 1 or node.op == "call_function"):
        return "relu", 0.0, name
    return None


def _relu_like(root: nn.Module, node: fx.Node) -> Optional[str]:
    """A description of node's activation when it is a ReLU of its first argument, else None."""
    if node.op == "call_module" and type(_module(root, node)) is nn.ReLU:
        return "ReLU"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "relu"
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return "relu"
    return None


def _describe(root: nn.Module, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(_module(root, node)).__name__} ({node.target})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def _cat_dim(node: fx.Node):
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("dim", node.kwargs.get("axis", 0))


SUPPORTED = "ReLU, LeakyReLU (slope >= 0), SiLU or none"


def _batch_norm_act(bn: nn.Module) -> Tuple[bool, Optional[Tuple[str, float, str]], Optional[str]]:
    """(is timm's BatchNormAct2d, the activation it applies as _activation_of gives it, why it
    cannot be fused or None)."""
    if type(bn).__name__ != "BatchNormAct2d" or not hasattr(bn, "act"):
        return False, None, None
    drop = getattr(bn, "drop", nn.Identity())
    if not isinstance(drop, nn.Identity):
        return True, None, f"BatchNormAct2d with dropout {type(drop).__name__} after its BatchNorm"
    act = bn.act
    if type(act) is nn.ReLU:
        return True, ("relu", 0.0, "ReLU"), None
    if type(act) is nn.LeakyReLU and act.negative_slope >= 0:
        return True, ("leaky_relu", float(act.negative_slope), f"LeakyReLU({act.negative_slope})"), None
    if type(act) is nn.SiLU:
        return True, ("silu", 0.0, "SiLU"), None
    if type(act) is nn.Identity:
        return True, ("none", 0.0, "no activation"), None
    return True, None, f"BatchNormAct2d's activation {type(act).__name__} not supported (supported: {SUPPORTED})"


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_matches(root: nn.Module, graph: fx.Graph) -> List[_Match]:
    """Every `cat -> Conv2d` chain of `graph` (traced from `root`), fusable or with the reason
    it is not."""
    matches = []
    for cat in graph.nodes:
        if cat.op != "call_function" or cat.target not in _CAT:
            continue
        convs = [u for u in cat.users if u.op == "call_module" and isinstance(_module(root, u), nn.Conv2d)]
        if not convs:
            continue
        conv = convs[0]
        conv_mod = _module(root, conv)
        children = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        match = _Match(cat, conv, conv, [conv, cat], [], False, conv.target, "", f"cat -> {conv.target}")
        match.locations = [_location(cat), _location(conv)]
        matches.append(match)

        def fail(reason):
            match.reason = reason

        if len(cat.users) > 1:
            fail("the concatenation has another user")
            continue
        if _cat_dim(cat) not in (1, -3):
            fail(f"concatenation over dim {_cat_dim(cat)!r}, not the channels")
            continue
        if not isinstance(children, (list, tuple)) or not all(isinstance(c, fx.Node) for c in children):
            fail("the concatenated tensors are not a list of traced values")
            continue
        match.children = list(children)
        if type(conv_mod) is not nn.Conv2d:
            fail(f"{type(conv_mod).__name__} is not a plain Conv2d")
            continue
        if conv_mod.bias is not None:
            fail("the 1x1 conv has a bias")
            continue
        if not is_plain_1x1(conv_mod):
            fail(f"the conv is not a plain 1x1 conv (kernel {conv_mod.kernel_size}, stride {conv_mod.stride}, "
                 f"padding {conv_mod.padding}, dilation {conv_mod.dilation}, groups {conv_mod.groups})")
            continue
        if len(conv.args) != 1 or conv.kwargs:
            fail("the conv is called with extra arguments")
            continue
        bn = _single_user(conv)
        if bn is None:
            fail("the conv output has more than one user")
            continue
        bn_mod = _module(root, bn)
        if not (type(bn_mod) is nn.BatchNorm2d or type(bn_mod).__name__ == "BatchNormAct2d"):
            fail(f"the conv is followed by {_describe(root, bn)}, not a BatchNorm2d")
            continue
        match.chain += f" -> {bn.target}"
        match.bn_path = bn.target
        match.locations.append(_location(bn))
        match.erase.insert(0, bn)
        match.end = bn
        if not bn_mod.affine:
            fail("the BatchNorm2d has no affine parameters")
            continue
        if bn_mod.num_features != conv_mod.out_channels:
            fail("the BatchNorm2d's features differ from the conv's outputs")
            continue
        if len(bn.args) != 1 or bn.kwargs:
            fail("the BatchNorm2d is called with extra arguments")
            continue
        is_bn_act, act, why = _batch_norm_act(bn_mod)
        if why:
            fail(why)
            continue
        if is_bn_act:
            match.activation = act[:2]
            match.chain += f" ({act[2]})"
            continue
        # then, each when the value before has no other user: + x0 (the residual), an activation;
        # the chain ends where they stop (no activation: 'none', a later one runs unfused)
        node = _single_user(bn)
        if (node is not None and node.op == "call_function" and node.target in _ADD and len(node.args) == 2
                and not node.kwargs and match.children[0] in node.args
                and (node.args[0] is bn) != (node.args[1] is bn)):
            match.residual = True
            match.chain += " -> + x0"
            match.erase.insert(0, node)
            match.end = node
            match.locations.append(_location(node))
            node = _single_user(node)
        act = None if node is None else _activation_of(root, node)
        if act is None or node.args[0] is not match.end:
            match.chain += " (no activation" + ("" if node is None else f"; {_describe(root, node)} runs unfused") + ")"
            continue
        match.activation = act[:2]
        match.chain += f" -> {act[2]}"
        match.erase.insert(0, node)
        match.end = node
        match.locations.append(_location(node))
    return matches


class GraphIDAStep(nn.Module):
    """A fused IDA-Up step found in a graph: step(x) (+ skip). The sum goes through the op only
    when `skip` has the upsampled shape, dtype and device (the `+` in the traced code broadcasts
    and promotes; the op does not); otherwise the op's result is added to it as the code did."""

    def __init__(self, step: IDAUpStep):
        super().__init__()
        self.step = step

    def forward(self, x: torch.Tensor, skip=None) -> torch.Tensor:
        if skip is None:
            return self.step(x)
        up = self.step.up
        factor = 1 if isinstance(up, nn.Identity) else up.stride[0]
        channels = self.step.proj[0].out_channels if isinstance(self.step.proj, nn.Sequential) else x.shape[1]
        size = [upsampled_size(s, factor) if factor > 1 else s for s in x.shape[2:]]
        if (isinstance(skip, torch.Tensor) and x.dim() == 4 and skip.shape == (x.shape[0], channels, *size)
                and skip.dtype == x.dtype and skip.device == x.device):
            return self.step(x, skip)
        return self.step(x) + skip


@dataclass
class _IdaMatch:
    up: fx.Node
    input: fx.Node  # what the fused step takes: the projection's input, or the upsampling's
    skip: Optional[fx.Node]
    end: fx.Node
    erase: List[fx.Node]  # end first
    up_path: str
    proj: Optional[Tuple[str, str]]  # (conv path, bn path) when the projection is fused
    chain: str
    reason: Optional[str] = None
    locations: List[str] = field(default_factory=list)


def _projection(root: nn.Module, node: fx.Node):
    """(conv node, bn node, relu node) when `node` is ReLU(BatchNorm2d(Conv2d 1x1(.))) with every
    intermediate used once and the layers fusable as an IDA-Up projection, else None."""
    if _relu_like(root, node) is None or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    bn = node.args[0]
    if bn.op != "call_module" or type(_module(root, bn)) is not nn.BatchNorm2d or _single_user(bn) is not node:
        return None
    conv = bn.args[0] if len(bn.args) == 1 and not bn.kwargs else None
    if not isinstance(conv, fx.Node) or conv.op != "call_module" or _single_user(conv) is not bn:
        return None
    conv_mod, bn_mod = _module(root, conv), _module(root, bn)
    if type(conv_mod) is not nn.Conv2d or conv_mod.bias is not None or not is_plain_1x1(conv_mod):
        return None
    if not bn_mod.affine or bn_mod.num_features != conv_mod.out_channels or len(conv.args) != 1 or conv.kwargs:
        return None
    return conv, bn, node


def find_ida_matches(root: nn.Module, graph: fx.Graph) -> List[_IdaMatch]:
    """Every ConvTranspose2d of `graph`: an IDA-Up upsampling, with its 1x1 conv-BN-ReLU projection
    and its `+ skip` when present, fusable or with the reason it is not."""
    matches = []
    for up in graph.nodes:
        if up.op != "call_module" or not isinstance(_module(root, up), nn.ConvTranspose2d):
            continue
        up_mod = _module(root, up)
        x = up.args[0] if up.args else None
        match = _IdaMatch(up, x, None, up, [up], up.target, None, f"{up.target}")
        match.locations = [_location(up)]
        matches.append(match)
        if type(up_mod) is not nn.ConvTranspose2d or len(up.args) != 1 or up.kwargs or not isinstance(x, fx.Node):
            match.reason = "not a plain ConvTranspose2d call"
            continue
        try:
            IDAUpStep.from_modules(nn.Identity(), up_mod)
        except ValueError as error:
            match.reason = str(error).split(";")[0]
            continue
        proj = _projection(root, x)
        if proj is None:
            match.chain = f"{_describe(root, x)} (unfused) -> {up.target}"
        else:
            conv, bn, relu = proj
            match.proj = (conv.target, bn.target)
            match.input = conv.args[0]
            match.erase += [relu, bn, conv]
            match.locations += [_location(n) for n in proj]
            match.chain = f"{conv.target} -> {bn.target} -> ReLU -> {up.target}"
        add = _single_user(up)
        if (add is not None and add.op == "call_function" and add.target in _ADD and len(add.args) == 2
                and not add.kwargs and all(isinstance(a, fx.Node) for a in add.args) and add.args[0] is not add.args[1]):
            match.skip = add.args[1] if add.args[0] is up else add.args[0]
            match.erase.insert(0, add)
            match.end = add
            match.locations.append(_location(add))
            match.chain += " -> + skip"
    return matches


# ---------------------------------------------------------------------------------------------
# Owners: the modules whose forward runs the rewritten graph
# ---------------------------------------------------------------------------------------------
class _OwnerGraph:
    """The owner's rewritten forward, one traced graph per training mode (both traced by `fuse`,
    so that a branch on `self.training` takes the right side), and the fused nodes (one per conv,
    shared by both graphs). A tensor the owner holds itself is read by the graph as it was when
    traced: if one is replaced (e.g. a buffer by `.to()`), the graphs are traced again."""

    def __init__(self, nodes: Dict[str, nn.Module], graphs: Dict[bool, fx.GraphModule], owner: nn.Module):
        self.nodes, self.graphs, self.tensors = nodes, graphs, _own_tensors(owner)

    def graph_for(self, owner: nn.Module):
        """The graph to run, or None (then the owner's own forward runs, unfused)."""
        if _own_tensors(owner) != self.tensors:
            self.tensors = _own_tensors(owner)
            try:
                self.graphs = _rewrite_both(owner, self.nodes)
            except Exception as error:
                warnings.warn(f"dla_fused: {type(owner).__name__} could not be traced again after its own "
                              f"tensors changed ({_short_error(error)}); it runs unfused")
                self.graphs = {True: None, False: None}
        return self.graphs[owner.training]


def _own_tensors(module: nn.Module) -> Tuple[int, ...]:
    return tuple(id(t) for t in (*module._parameters.values(), *module._buffers.values()))


def _owner_forward(self: nn.Module, *args, **kwargs):
    graph = self.__dict__[_GRAPH].graph_for(self)
    if graph is None:
        return type(self).forward(self, *args, **kwargs)
    return graph(*args, **kwargs)


def _rewrite_both(owner: nn.Module, nodes: Dict[str, nn.Module]) -> Dict[bool, fx.GraphModule]:
    """The owner's rewritten graph in training and in eval mode (the modules' flags are restored)."""
    flags = [(m, m.training) for m in owner.modules()]
    graphs = {}
    try:
        for mode in (owner.training, not owner.training):
            for m, _ in flags:
                m.training = mode
            graphs[mode] = _rewrite(owner, nodes)[0]
    finally:
        for m, flag in flags:
            m.training = flag
    return graphs


def _rewrite(owner: nn.Module, nodes: Dict[str, nn.Module]) -> Tuple[fx.GraphModule, list]:
    """Trace `owner` and swap every fusable chain for its fused module (made, and added to `nodes`,
    on first sight of its conv or upsampling). Aggregation chains go first, so that an upsampling
    fed by one keeps it and fuses without the projection. Returns the graph module and the
    matches found (aggregation chains, then IDA-Up steps)."""
    graph = _trace(owner)
    modules: Dict[str, nn.Module] = {}

    def replace(match, key, make, args):
        node = nodes.get(key)
        if node is None:
            node = nodes[key] = make()
        name = f"_dla_fused_{len(modules)}"
        modules[name] = node
        with graph.inserting_before(match.end):
            fused = graph.call_module(name, args)
        match.end.replace_all_uses_with(fused)
        for old in match.erase:
            graph.erase_node(old)

    matches = find_matches(owner, graph)
    for m in matches:
        if m.reason is None:
            replace(m, "agg:" + m.conv_path, lambda m=m: AggregationNode.from_modules(
                owner.get_submodule(m.conv_path), owner.get_submodule(m.bn_path), residual=m.residual,
                activation=m.activation[0], negative_slope=m.activation[1] if m.activation[0] == "leaky_relu"
                else 0.01), tuple(m.children))
    ida_matches = find_ida_matches(owner, graph)
    for m in ida_matches:
        if m.reason is None:
            replace(m, "ida:" + m.up_path, lambda m=m: GraphIDAStep(IDAUpStep.from_modules(
                nn.Identity() if m.proj is None else nn.Sequential(
                    owner.get_submodule(m.proj[0]), owner.get_submodule(m.proj[1]), nn.ReLU()),
                owner.get_submodule(m.up_path))), (m.input,) if m.skip is None else (m.input, m.skip))
    graph.lint()
    root = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in modules:
            root[node.target] = _attribute(owner, node.target)
    root.update(modules)
    return fx.GraphModule(root, graph, class_name=f"Fused{type(owner).__name__}"), matches + ida_matches


def _attribute(owner: nn.Module, target: str):
    value = owner
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _install(owner: nn.Module, owner_path: str, report: FuseReport, prepack_on: bool) -> None:
    nodes: Dict[str, nn.Module] = {}
    try:
        matches = _rewrite(owner, nodes)[1]
        graphs = _rewrite_both(owner, nodes) if nodes else {}
    except Exception as error:
        report.append(FuseEntry(owner_path, "trace", False, f"could not be rewritten ({_short_error(error)})"))
        return
    for match in matches:
        kind = "IDA-Up step" if isinstance(match, _IdaMatch) else "aggregation node"
        report.append(FuseEntry(owner_path, kind, match.reason is None,
                                match.chain if match.reason is None else f"{match.chain}: {match.reason}"))
    if not nodes:
        return
    from . import prepack
    from .fuse import _Method
    for node in nodes.values():
        (node.step if isinstance(node, GraphIDAStep) else node).__dict__[prepack.ON] = prepack_on
    owner.__dict__[_GRAPH] = _OwnerGraph(nodes, graphs, owner)
    owner.forward = _Method(_owner_forward, owner)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def fuse_graphs(model: nn.Module, skip: Tuple[type, ...], report: FuseReport, prepack_on: bool) -> None:
    """Find and fuse the aggregation chains in `model` (see the module docstring), in place; add
    what was found to `report`. Modules of the types in `skip` are left alone (their fusion is
    structural)."""
    _search(model, "", skip, report, prepack_on)


def _search(module: nn.Module, path: str, skip, report: FuseReport, prepack_on: bool) -> None:
    if isinstance(module, skip) or _GRAPH in module.__dict__ or "forward" in module.__dict__:
        return
    if isinstance(module, AggregationNode) or not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return
    try:
        graph = _trace(module)
        matches = find_matches(module, graph) + find_ida_matches(module, graph)
    except Exception as error:  # search the children one by one
        children = list(module.named_children())
        report.append(FuseEntry(path, "trace", False, f"could not be traced ({_short_error(error)}); "
                                f"searched its {len(children)} submodules instead"))
        for name, child in children:
            _search(child, _join(path, name), skip, report, prepack_on)
        return
    found: List[str] = []  # owners in the order their first chain appears
    for match in matches:
        owner = _common_prefix(match.locations)
        # an owner that does not trace on its own (e.g. its forward takes a list) hands its chains
        # to the nearest ancestor that does (at worst `module`, which traced)
        while owner and not _traces(module.get_submodule(owner)):
            parent = owner.rpartition(".")[0]
            report.append(FuseEntry(_join(path, owner), "trace", False, "could not be traced on its own; "
                                    f"{_join(path, parent) or '(model)'} runs its fused graph instead"))
            owner = parent
        if owner not in found:
            found.append(owner)
    # an owner inside another owner is rewritten with it
    chosen = [o for o in found if not any(p != o and (p == "" or o.startswith(p + ".")) for p in found)]
    for owner in chosen:
        target = module.get_submodule(owner) if owner else module
        if not isinstance(target, skip):
            _install(target, _join(path, owner), report, prepack_on)


def _traces(module: nn.Module) -> bool:
    try:
        _trace(module)
    except Exception:
        return False
    return True


def owners(model: nn.Module):
    """(module, its _OwnerGraph) for every module whose forward fuse_graphs rewrote."""
    return [(m, m.__dict__[_GRAPH]) for m in model.modules() if _GRAPH in m.__dict__]


def graph_nodes(model: nn.Module) -> List[AggregationNode]:
    """The fused aggregation nodes fuse_graphs made (not registered as submodules)."""
    return [node for _, state in owners(model) for node in state.nodes.values() if isinstance(node, AggregationNode)]


def graph_steps(model: nn.Module) -> List[IDAUpStep]:
    """The fused IDA-Up steps fuse_graphs made (not registered as submodules)."""
    return [node.step for _, state in owners(model) for node in state.nodes.values() if isinstance(node, GraphIDAStep)]


def restore(model: nn.Module) -> None:
    for module, _ in owners(model):
        del module.__dict__[_GRAPH]
        module.__dict__.pop("forward", None)
