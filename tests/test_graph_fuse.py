"""fuse() on networks other than DLA: aggregation chains found in a torch.fx trace.

Every fused model is compared with an unfused deep copy in float64, training mode: outputs, every
parameter gradient and the BatchNorm buffers; float32 by the tolerance rule (helpers.py)."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dla_fused
from dla_fused import graph_fuse
from dla_fused.ops.aggregation import AggregationNode
from helpers import (FLOOR, assert_close, assert_results_within_rule, assert_same_grads_and_buffers,
                     assert_within_rule, named_grads, use_backend)

import test_aggregation as agg

timm = pytest.importorskip("timm")


def _calls(model):
    """Count the calls of every fused node graph_fuse made in `model` (list, filled as they run)."""
    calls = []
    for node in graph_fuse.graph_nodes(model):
        node.register_forward_hook(lambda m, args, out: calls.append(m))
    return calls


def _compare(ref, fused, x, rel=1e-10, steps=1):
    """Outputs, parameter gradients and buffers of `fused` against `ref`, after `steps` training
    steps on x (fresh gradients each)."""
    for _ in range(steps):
        outputs = []
        for model in (ref, fused):
            model.zero_grad(set_to_none=True)
            out = model(*x) if isinstance(x, tuple) else model(x)
            (out.square().mean() + out.mean()).backward()
            outputs.append(out)
        assert_close(outputs[1], outputs[0], "output", rel=rel)
    assert_same_grads_and_buffers(fused, ref, rel=rel)


# ---------------------------------------------------------------------------------------------
# Small models with one chain each
# ---------------------------------------------------------------------------------------------
class Node(nn.Module):
    """cat -> conv -> bn [-> + x0] -> act, written out in a forward as users write it."""

    def __init__(self, chans=(5, 3), out=5, residual=False, act="relu", conv_kwargs=None, affine=True,
                 norm=None):
        super().__init__()
        self.conv = nn.Conv2d(sum(chans), out, **(conv_kwargs or {"kernel_size": 1, "bias": False}))
        self.bn = norm if norm is not None else nn.BatchNorm2d(out, affine=affine)
        self.residual, self.act = residual, act
        self.relu = nn.ReLU(inplace=True)
        self.leaky, self.silu = nn.LeakyReLU(0.05, inplace=True), nn.SiLU()

    def forward(self, a, b):
        y = self.bn(self.conv(torch.cat([a, b], dim=1)))
        if self.residual:
            y += a
        if self.act == "relu":
            return self.relu(y)
        if self.act == "F.relu":
            return F.relu(y, inplace=True)
        if self.act == "method":
            return y.relu_()
        if self.act == "leaky":
            return F.leaky_relu(y, 0.2)
        if self.act == "nn.LeakyReLU":
            return self.leaky(y)
        if self.act == "silu":
            return F.silu(y)
        if self.act == "nn.SiLU":
            return self.silu(y)
        if self.act == "gelu":
            return F.gelu(y)
        return y


class Net(nn.Module):
    """Two branches, a node, a head: the node's chain is owned by `node`, the net traces whole."""

    def __init__(self, **node_kwargs):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
        self.node = Node(**node_kwargs)
        self.head = nn.Conv2d(self.node.conv.out_channels, 2, 1)

    def forward(self, x):
        return self.head(self.node(self.a(x), self.b(x)))


def _fresh(model, dtype=torch.float64):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.to(dtype).train()


ACTS = {"relu": "relu", "F.relu": "relu", "method": "relu", "leaky": "leaky_relu", "nn.LeakyReLU": "leaky_relu",
        "silu": "silu", "nn.SiLU": "silu", "none": "none", "gelu": "none"}


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("residual", [False, True])
def test_chain_in_a_forward_is_fused(act, residual):
    use_backend("cpu")
    ref = _fresh(Net(residual=residual, act=act))
    fused, report = dla_fused.fuse(copy.deepcopy(ref), report=True)
    assert report.count("aggregation node") == 1 and report.count("aggregation node", fused=False) == 0
    (entry,) = report.fused
    assert entry.path == "node" and ("+ x0" in entry.detail) == residual
    (node,) = graph_fuse.graph_nodes(fused)
    assert node.residual == residual and node.conv is fused.node.conv and node.bn is fused.node.bn
    assert node.activation == ACTS[act]
    if act == "gelu":
        assert "gelu runs unfused" in entry.detail
    if act in ("leaky", "nn.LeakyReLU"):
        assert node.negative_slope == (0.2 if act == "leaky" else 0.05)
    calls = _calls(fused)
    x = torch.randn(3, 3, 7, 9, dtype=torch.float64)
    _compare(ref, fused, x, steps=2)
    assert len(calls) == 2  # the fused node ran, once per step
    assert list(fused.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("case, reason", [
    ({"conv_kwargs": {"kernel_size": 1, "bias": True}}, "has a bias"),
    ({"conv_kwargs": {"kernel_size": 1, "bias": False, "stride": 2}}, "not a plain 1x1"),
    ({"conv_kwargs": {"kernel_size": 1, "bias": False, "groups": 2}, "chans": (4, 4), "out": 4},
     "not a plain 1x1"),
    ({"conv_kwargs": {"kernel_size": 3, "bias": False, "padding": 1}}, "not a plain 1x1"),
    ({"affine": False}, "no affine parameters"),
    ({"norm": nn.GroupNorm(1, 5)}, "not a BatchNorm2d"),
])
def test_unsupported_chains_are_left_alone_with_the_reason(case, reason):
    use_backend("cpu")
    ref = _fresh(Net(**case))
    fused, report = dla_fused.fuse(copy.deepcopy(ref), report=True)
    (entry,) = report
    assert not entry.fused and reason in entry.detail, str(report)
    assert not graph_fuse.graph_nodes(fused) and not dla_fused.is_fused(fused)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert torch.equal(fused(x), ref(x))


class SharedCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, a, b):
        c = torch.cat([a, b], 1)
        return torch.relu(self.bn(self.conv(c))), c.mean()


class SharedBn(SharedCat):
    def forward(self, a, b):
        y = self.bn(self.conv(torch.cat([a, b], 1)))
        return torch.relu(y), y


class OtherResidual(SharedCat):
    def forward(self, a, b):
        return torch.relu(self.bn(self.conv(torch.cat([a, b], 1))) + b[:, :1])


class ChannelsLastDim(SharedCat):
    def forward(self, a, b):
        return torch.relu(self.bn(self.conv(torch.cat([a, b], 2))))  # a, b with 6 channels each


@pytest.mark.parametrize("cls, reason", [
    (SharedCat, "concatenation has another user"),
    (ChannelsLastDim, "not the channels"),
])
def test_chains_with_other_users_are_left_alone(cls, reason):
    model = cls()
    _, report = dla_fused.fuse(model, report=True)
    (entry,) = report
    assert not entry.fused and reason in entry.detail, str(report)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("cls", [SharedBn, OtherResidual])
def test_chain_ends_where_values_have_other_users(cls):
    """BatchNorm's output used twice, or added to something else: fused up to the BatchNorm (no
    activation); the rest runs as written, on the fused output."""
    use_backend("cpu")
    ref = _fresh(cls())
    fused, report = dla_fused.fuse(copy.deepcopy(ref), report=True)
    (entry,) = report
    assert entry.fused and "no activation" in entry.detail, str(report)
    (node,) = graph_fuse.graph_nodes(fused)
    assert node.activation == "none" and not node.residual
    a, b = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    outs = [m(a, b) for m in (ref, fused)]
    outs = [o if isinstance(o, tuple) else (o,) for o in outs]
    for x, y in zip(*outs):
        assert_close(y, x, "output")
    sum(o.square().sum() for o in outs[0]).backward(), sum(o.square().sum() for o in outs[1]).backward()
    assert_close(fused.conv.weight.grad, ref.conv.weight.grad, "grad")


def test_in_place_op_after_a_node_without_activation():
    """The fused output is not saved for backward when no mask needs it: an in-place activation
    the node does not take (here Hardswish) may run on it."""
    use_backend("cpu")

    class Hard(SharedCat):
        def __init__(self):
            super().__init__()
            self.act = nn.Hardswish(inplace=True)

        def forward(self, a, b):
            return self.act(self.bn(self.conv(torch.cat([a, b], 1))))

    ref = _fresh(Hard())
    fused = dla_fused.fuse(copy.deepcopy(ref))
    a, b = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    _compare(ref, fused, (a, b))


def test_timm_bn_act_with_another_activation_is_reported():
    from timm.layers import BatchNormAct2d
    model = Net(norm=BatchNormAct2d(5, act_layer=nn.GELU))
    _, report = dla_fused.fuse(model, report=True)
    assert "activation GELU not supported" in report[0].detail
    model = Net(norm=BatchNormAct2d(5, act_layer=nn.ReLU, drop_layer=nn.Dropout))
    _, report = dla_fused.fuse(model, report=True)
    assert "dropout" in report[0].detail


class Untraceable(nn.Module):
    """A data-dependent branch at the top: the net is searched submodule by submodule."""

    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.net(x)


def test_untraceable_model_is_searched_by_submodule():
    use_backend("cpu")
    ref = _fresh(Untraceable())
    fused, report = dla_fused.fuse(copy.deepcopy(ref), report=True)
    trace, chain = report
    assert trace.kind == "trace" and not trace.fused and trace.path == "" and "could not be traced" in trace.detail
    assert chain.fused and chain.path == "net.node"
    _compare(ref, fused, torch.randn(2, 3, 5, 6, dtype=torch.float64))


class Modal(nn.Module):
    """A forward that branches on self.training and reads a buffer of its own."""

    def __init__(self):
        super().__init__()
        self.node = Node()
        self.register_buffer("offset", torch.tensor(0.25))

    def forward(self, a, b):
        y = torch.cat([a, b], 1)
        y = self.node.relu(self.node.bn(self.node.conv(y)))
        return y * 2 if self.training else y + self.offset


def test_training_branch_and_own_buffer():
    use_backend("cpu")
    ref = _fresh(Modal())
    fused = dla_fused.fuse(copy.deepcopy(ref))
    assert graph_fuse.owners(fused)[0][0] is fused  # the chain's owner is the model itself
    a, b = torch.randn(2, 5, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert_close(fused(a, b), ref(a, b), "train")
    ref.eval(), fused.eval()
    assert_close(fused(a, b), ref(a, b), "eval")
    for model in (ref, fused):  # a buffer replaced by .to(): the graph reads the new one
        model.offset = torch.tensor(1.5, dtype=torch.float64)
    assert_close(fused(a, b), ref(a, b), "after replacing the buffer")


def test_unfuse_copy_and_pickle():
    use_backend("cpu")
    ref = _fresh(Net(residual=True))
    fused = dla_fused.fuse(copy.deepcopy(ref))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = fused(x)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        (node,) = graph_fuse.graph_nodes(clone)
        assert node.conv is clone.node.conv  # the copy's node shares the copy's parameters
        assert_close(clone(x), expected, "copy")
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    assert_close(torch.load(buffer, weights_only=False)(x), expected, "torch.save")
    assert dla_fused.set_memory_efficient(fused, True) == 1
    assert dla_fused.set_prepack(fused, False) == 2  # the node and the Sequential branch `b`
    dla_fused.unfuse(fused)
    assert not dla_fused.is_fused(fused) and "forward" not in fused.node.__dict__
    assert not graph_fuse.owners(fused)


def test_report_argument_is_checked():
    with pytest.raises(ValueError, match="report must be True or False"):
        dla_fused.fuse(Net(), report="yes")


def test_dla_models_keep_their_structural_path():
    model, report = dla_fused.fuse(dla_fused.create_model("dla34up", fused=False), report=True)
    assert report.count("aggregation node") == 6 and report.count("IDA-Up step") == 14
    assert not graph_fuse.owners(model) and all(e.kind != "trace" for e in report)


# ---------------------------------------------------------------------------------------------
# timm networks
# ---------------------------------------------------------------------------------------------
TIMM = {  # name: chains fused, chains left (and why)
    "hgnetv2_b0": (5, 1),  # the stem's cat feeds a 3x3 stride-2 conv
    "ese_vovnet19b_dw": (4, 0),
    "cspdarknet53": (5, 0),  # LeakyReLU(0.01)
    "cs3darknet_s": (4, 0),  # SiLU
}


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_network_float64(name):
    use_backend("cpu")
    torch.manual_seed(0)
    ref = _fresh(timm.create_model(name, pretrained=False, num_classes=7))
    fused, report = dla_fused.fuse(copy.deepcopy(ref), report=True)
    assert (report.count("aggregation node"), report.count("aggregation node", fused=False)) == TIMM[name], str(report)
    calls = _calls(fused)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _compare(ref, fused, x, steps=2)
    assert len(calls) == 2 * TIMM[name][0]
    assert list(fused.state_dict()) == list(ref.state_dict())
    ref.eval(), fused.eval()
    with torch.no_grad():
        assert_close(fused(x), ref(x), "eval output")


def _node_inputs(model, x):
    """What each graph-fused node of `model` meets in one training forward on x:
    (children, params, buffers, residual, activation, negative_slope), copied before the call."""
    seen = []

    def grab(node, args):
        children = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        params = dict(weight=node.conv.weight, bn_weight=node.bn.weight, bn_bias=node.bn.bias)
        seen.append(([c.detach().clone() for c in children], {k: v.detach().clone() for k, v in params.items()},
                     {k: b.clone() for k, b in node.bn.named_buffers()}, node.residual, node.activation,
                     node.negative_slope))
    hooks = [node.register_forward_pre_hook(grab) for node in graph_fuse.graph_nodes(model)]
    model(x)
    for hook in hooks:
        hook.remove()
    return seen


# Networks whose float32 gradients, in training mode at these sizes, are noise at the 1e-3 level:
# each gradient tensor's error against float64 is a draw whose spread no 2x rule can bound.
# cspdarknet53 (seeds 0-11, 2 x 3 x 64 x 64): the forward's error grows from 5e-7 at the stem to
# 2e-4 at stage 4 (BatchNorms over 8 values), and eager channels_last against eager NCHW breaks the
# per-tensor rule in 11 of 12 seeds, by up to 67x; the fused model breaks it in 5, by up to 12x,
# yet its errors are the smaller of the two draws (per tensor, log10 of error over eager NCHW's:
# 90th percentile +0.59 fused, +1.75 channels_last; with oneDNN, MKL and ATen held to AVX2, +0.77
# and +0.72). Its float32 check is therefore per fused node, at the node's own inputs.
CHAOTIC = {"cspdarknet53"}


@pytest.mark.parametrize("name", ["hgnetv2_b0", "ese_vovnet19b_dw", "cspdarknet53", "cs3darknet_s"])
def test_timm_network_float32_within_rule(name):
    """float32 by the rule against the float64 network: the output, every fused node at the inputs
    the network gives it (output, every gradient, running statistics), and, where the network's
    float32 gradients are not noise (CHAOTIC), every parameter gradient of the whole network."""
    use_backend("cpu")
    torch.manual_seed(1)
    truth = _fresh(timm.create_model(name, pretrained=False, num_classes=7))
    eager = copy.deepcopy(truth).float()
    fused = dla_fused.fuse(copy.deepcopy(truth).float())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    nodes = _node_inputs(dla_fused.fuse(copy.deepcopy(truth)), x)
    assert len(nodes) == TIMM[name][0]
    for children, params, buffers, residual, act, slope in nodes:
        low = [c.float() for c in children]
        low_params = {k: v.float() for k, v in params.items()}
        low_buffers = {k: v.float() if v.is_floating_point() else v for k, v in buffers.items()}
        ours, same = agg.run_both(low, low_params, low_buffers, True, residual, activation=act, negative_slope=slope)
        _, exact = agg.run_both(children, params, buffers, True, residual, activation=act, negative_slope=slope)
        assert_results_within_rule(*(named_grads(r, len(children)) for r in (ours, exact, same)))
    results = []
    for model, inp in ((truth, x), (eager, x.float()), (fused, x.float())):
        out = model(inp)
        out.square().mean().backward()
        results.append((out, {k: p.grad for k, p in model.named_parameters()}))
    (out64, g64), (out32, g32), (outf, gf) = results
    assert_within_rule(outf, out64, out32, f"{name} output")
    if name in CHAOTIC:
        return
    # Gradients: the rule per tensor, its floor relative to the largest gradient of the model
    # (a bias in front of a BatchNorm has a true gradient of ~0, so its own scale means nothing).
    scale = max(g.abs().max().item() for g in g64.values())
    for key in g64:
        err = (gf[key].double() - g64[key]).abs().max().item()
        base = (g32[key].double() - g64[key]).abs().max().item()
        bound = 2 * base + FLOOR[torch.float32] * scale
        assert err <= bound, f"{name} grad {key}: error {err:.3g} > bound {bound:.3g} (eager {base:.3g})"


def test_compile_fullgraph_over_a_model_fused_from_a_trace():
    use_backend("cpu")
    ref = _fresh(Net(residual=True))
    fused = dla_fused.fuse(copy.deepcopy(ref))
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    out, expected = compiled(x), ref(x)
    assert_close(out, expected, "compiled output")
    out.square().sum().backward(), expected.square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for key, p in fused.named_parameters():
        assert_close(p.grad, ref_params[key].grad, f"compiled grad {key}")


@pytest.mark.parametrize("owner", ["top", "nested"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export_of_a_model_fused_from_a_trace(training, owner):
    """torch.export.export over the forward fuse() gives a traced model (the exported module's
    own, "top", or a submodule's): the fused node is in the exported graph, and the program
    computes the reference's output and running statistics."""
    use_backend("cpu")
    ref = _fresh(Node(residual=True) if owner == "top" else Net(residual=True)).train(training)
    fused = dla_fused.fuse(copy.deepcopy(ref))
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    inputs = (torch.randn(2, 5, 5, 7, dtype=torch.float64), x) if owner == "top" else (x,)
    program = torch.export.export(fused, inputs)
    assert any(str(n.target).startswith("dla_fused.aggregation_node") for n in program.graph.nodes)
    exported = program.module()
    assert_close(exported(*inputs), ref(*inputs), "exported output")
    buffers = dict(exported.named_buffers())
    for key, b in ref.named_buffers():
        assert_close(buffers[key].double(), b.double(), f"exported {key}")


# ---------------------------------------------------------------------------------------------
# IDA-Up steps in DLA-Up and CenterNet networks written as other codebases write them
# ---------------------------------------------------------------------------------------------
def _outputs(out):
    if isinstance(out, list):
        return list(out[0].values())
    return list(out)


class _Wrap(nn.Module):
    """One tensor out of a network's outputs, for _compare."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.cat([t.flatten() for t in _outputs(self.net(x))])


@pytest.mark.parametrize("layout, ours, expected", [
    # the original release's dla_up.py: 10 projected x2^k steps + the head's final upsampling (its
    # 1x1 conv has a bias: upsampling only); 4 steps are Identity (factor 1), nothing to fuse
    ("release", "dla34up", {"aggregation node": 6, "IDA-Up step": 11}),
    # CenterNet's pose_dla_dcn.py: 8 steps, 3x3 projections run unfused, upsampling + skip fused
    ("pose", "centernet_dla34", {"aggregation node": 6, "IDA-Up step": 8}),
    ("pose", "centernet_dla34_dcn", {"aggregation node": 6, "IDA-Up step": 8}),
])
def test_foreign_layouts_fuse_their_ida_up_steps(layout, ours, expected):
    import foreign_layouts
    use_backend("cpu")
    torch.manual_seed(0)
    kwargs = {"num_classes": 5} if layout == "release" else {"name": ours, "heads": {"hm": 3, "wh": 2}}
    theirs = (foreign_layouts.release_dlaseg if layout == "release" else foreign_layouts.pose_dlaseg)(**kwargs)
    theirs = _fresh(theirs)
    # the layout computes what our model computes, with the same parameters
    mine = dla_fused.create_model(ours, fused=False, **({"num_classes": 5} if layout == "release"
                                                        else {"heads": {"hm": 3, "wh": 2}})).double()
    mine.load_state_dict(theirs.state_dict())
    # 64 px: at 32 the deepest BatchNorms normalise 2 values each and amplify rounding to ~1e-7
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(_outputs(copy.deepcopy(theirs).eval()(x)), _outputs(mine.eval()(x))):
            assert_close(a, b, "layout vs ours")
    fused, report = dla_fused.fuse(copy.deepcopy(theirs), report=True)
    counts = {kind: report.count(kind) for kind in expected}
    assert counts == expected, str(report)
    steps = [e for e in report if e.kind == "IDA-Up step" and e.fused]
    if layout == "pose":
        assert all("+ skip" in e.detail and "(unfused)" in e.detail for e in steps)
    else:
        assert sum("-> ReLU ->" in e.detail for e in steps) == 10
    calls = []
    for step in graph_fuse.graph_steps(fused):
        step.register_forward_hook(lambda m, args, out: calls.append(m))
    _compare(_Wrap(theirs), _Wrap(fused), x, steps=2)
    assert len(calls) == 2 * expected["IDA-Up step"]
    theirs.eval(), fused.eval()
    with torch.no_grad():
        for a, b in zip(_outputs(fused(x)), _outputs(theirs(x))):
            assert_close(a, b, "eval output")
    assert len(calls) == 3 * expected["IDA-Up step"]


def test_ida_step_with_a_broadcast_skip_adds_it_outside_the_op():
    """`up(x) + b` with b broadcast (not the upsampled shape): the op upsamples, the sum stays
    PyTorch's."""
    use_backend("cpu")

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Sequential(nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
            self.up = nn.ConvTranspose2d(3, 3, 4, stride=2, padding=1, groups=3, bias=False)

        def forward(self, x, b):
            return self.up(self.proj(x)) + b

    ref = _fresh(Up())
    fused, report = dla_fused.fuse(copy.deepcopy(ref), report=True)
    (entry,) = report
    assert entry.fused and entry.detail.endswith("+ skip")
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    for b in (torch.randn(2, 3, 10, 6, dtype=torch.float64), torch.randn(3, 1, 1, dtype=torch.float64)):
        assert_close(fused(x, b), ref(x, b), f"skip {tuple(b.shape)}")


def test_upsampling_that_is_not_bilinear_style_is_reported():
    model = nn.Sequential(nn.ConvTranspose2d(3, 3, 3, stride=2, groups=3, bias=False))
    model = nn.Sequential(model, nn.Conv2d(3, 3, 1))  # something to trace around it
    _, report = dla_fused.fuse(model, report=True)
    (entry,) = report
    assert not entry.fused and "depthwise ConvTranspose2d with kernel 2f" in entry.detail
