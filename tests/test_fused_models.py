"""Fused models against reference models: outputs, gradients, running statistics, fuse().

Whole-model comparisons run in float64: through a hundred training-mode BatchNorms the gradients
of a float32 network differ by percents between two correct evaluation orders (the reference in
NCHW vs channels_last shows it), so float32 would test conditioning, not the kernels."""
import copy

import pytest
import torch

import dla_fused
from dla_fused.ops.aggregation import AggregationNode
from helpers import assert_close, assert_same_grads_and_buffers, assert_within_rule, use_backend


def _tensors(out):
    """A model's output as a list of tensors: a classifier's, DLA-Up's (a tuple), CenterNet's
    (a list holding a dict of heads)."""
    return list(out) if isinstance(out, tuple) else (list(out[0].values()) if isinstance(out, list) else [out])


def _compare(name, size=(32, 32), batch=4, backend_name="cpu", **kwargs):
    use_backend(backend_name)
    torch.manual_seed(0)
    ref = dla_fused.create_model(name, fused=False, **kwargs).train().double()
    fused = dla_fused.fuse(copy.deepcopy(ref))
    assert dla_fused.is_fused(fused)
    x = torch.randn(batch, 3, *size, dtype=torch.float64)
    outputs = []
    for model in (ref, fused):
        tensors = _tensors(model(x))
        sum(t.float().square().mean() for t in tensors).backward()
        outputs.append(tensors)
    for a, b in zip(*outputs):
        assert_close(b, a, f"{name} output", rel=1e-8)
    assert_same_grads_and_buffers(fused, ref, f"{name} ", rel=1e-8)


@pytest.mark.parametrize("name", ["dla34", "dla102x", "dla46x_c"])
def test_classifier_fused_equals_reference(name):
    _compare(name, size=(32, 32), num_classes=10)


def test_dla34up_fused_equals_reference():
    _compare("dla34up", size=(32, 32), num_classes=5)


@pytest.mark.parametrize("name", ["centernet_dla34", "centernet_dla34_dcn"])
def test_centernet_fused_equals_reference(name):
    _compare(name, size=(32, 32), heads={"hm": 3, "wh": 2})


def test_triton_backend_through_a_whole_model():
    _compare("dla46_c", size=(32, 32), backend_name="triton", num_classes=4)


def test_fuse_keeps_state_dict_and_unfuse_restores():
    ref = dla_fused.create_model("dla34up", fused=False)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    classes = {name: type(m) for name, m in ref.named_modules()}
    dla_fused.fuse(ref)
    after = ref.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert sum(isinstance(m, AggregationNode) for m in ref.modules()) == 6  # dla34's six roots
    dla_fused.unfuse(ref)
    assert {name: type(m) for name, m in ref.named_modules()} == classes
    assert not dla_fused.is_fused(ref)


def test_fuse_a_timm_model():
    """fuse() finds timm's DlaRoot by structure; outputs and gradients stay the same."""
    timm = pytest.importorskip("timm")
    use_backend("cpu")
    torch.manual_seed(0)
    ref = timm.create_model("dla34", pretrained=False, num_classes=7).train().double()
    fused = dla_fused.fuse(copy.deepcopy(ref))
    assert sum(isinstance(m, AggregationNode) for m in fused.modules()) == 6
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out_ref, out = ref(x), fused(x)
    assert_close(out, out_ref, "timm output")
    out_ref.square().sum().backward(), out.square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for key, p in fused.named_parameters():
        assert_close(p.grad, ref_params[key].grad, f"timm grad {key}", rel=1e-8)
    assert list(fused.state_dict()) == list(ref.state_dict())


def test_fused_classes_and_create_model():
    model = dla_fused.DLA34(num_classes=3)
    assert isinstance(model, dla_fused.models.DLA34) and dla_fused.is_fused(model)
    assert not dla_fused.is_fused(dla_fused.DLA34(num_classes=3, fused=False))
    assert dla_fused.is_fused(dla_fused.create_model("dla60x_c", num_classes=3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_channels_last_through_fused_model(dtype):
    """Under autocast the fused model is as close to a float64 evaluation as the reference
    model under autocast is (the 2x rule), in channels_last, gradients included."""
    use_backend("cpu")
    torch.manual_seed(0)
    ref = dla_fused.create_model("dla46_c", num_classes=5, fused=False).to(memory_format=torch.channels_last)
    fused = dla_fused.fuse(copy.deepcopy(ref))
    wide = copy.deepcopy(ref).double()
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    wide(x.double()).square().mean().backward()
    outs = []
    for model in (ref, fused):
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        out.float().square().mean().backward()
        outs.append(out)
    assert outs[1].dtype == dtype
    assert_within_rule(outs[1], wide(x.double()), outs[0], "autocast output")
    key = "level3.tree2.root.conv.weight"
    grads = [dict(m.named_parameters())[key].grad for m in (ref, fused, wide)]
    assert_within_rule(grads[1], grads[2], grads[0], f"autocast grad {key}")


def test_compile_a_fused_model():
    """torch.compile over a whole fused model (float64, see the module docstring) gives the
    eager fused model's outputs and gradients: Dynamo and AOTAutograd over every fused op of the
    model (fake kernels, autograd, the running statistics' mutation). The backend is aot_eager:
    Inductor's code generation for the rest of the network takes a minute here and is PyTorch's
    own; Inductor over the fused ops runs in test_aggregation.py, test_ida_up.py and
    test_graph_fuse.py."""
    use_backend("cpu")
    torch.manual_seed(0)
    model = dla_fused.create_model("dla46_c", num_classes=4).double()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out, ref = compiled(x), eager(x)
    assert_close(out, ref, "compiled fused model", rel=1e-8)
    out.square().mean().backward(), ref.square().mean().backward()
    key = "level2.root.conv.weight"
    assert_close(dict(model.named_parameters())[key].grad, dict(eager.named_parameters())[key].grad,
                 f"compiled grad {key}", rel=1e-8)


EXPORT_CASES = [("dla46_c", "cpu", dict(num_classes=4)), ("dla34up", "cpu", dict(num_classes=3)),
                ("centernet_dla34", "cpu", {}), ("dla34", "auto", {})]


@pytest.mark.parametrize("name, backend_name, kwargs", EXPORT_CASES, ids=[f"{n}-{b}" for n, b, _ in EXPORT_CASES])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export_of_a_fused_model(name, backend_name, kwargs, training):
    """torch.export.export of a fused model (float64), eval and training. With the C++ kernels
    active the fused ops are in the exported graph (their fakes give the shapes); with the default
    (`auto`, the ops unfused on the CPU) the model exports as well. The exported program computes
    the model's outputs and, in training, moves the running statistics as the model does. (The
    methods fuse() attaches show export a bound method's code and signature.)"""
    use_backend(backend_name)
    torch.manual_seed(0)
    model = dla_fused.create_model(name, **kwargs).double().train(training)
    eager, before = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    ops = {str(n.target).split(".")[1] for n in program.graph.nodes
           if n.op == "call_function" and str(n.target).startswith("dla_fused.")}
    if backend_name == "cpu":
        assert ops == ({"aggregation_node"} if name.startswith("dla46") else {"aggregation_node", "ida_up"})
    exported = program.module()
    for a, b in zip(_tensors(exported(x)), _tensors(eager(x)), strict=True):
        assert_close(a, b, f"exported {name}", rel=1e-10)
    buffers = dict(exported.named_buffers())
    moved = 0
    for key, b in eager.named_buffers():
        assert torch.equal(buffers[key], b), key
        moved += key.endswith("running_mean") and not torch.equal(b, before.get_buffer(key))
    assert (moved > 0) == training


def test_set_memory_efficient_on_a_model():
    """The model-wide switch reaches every fused root; recomputing saves fewer bytes than keeping
    the conv output, and both give the same gradients."""
    from dla_fused.profiling import saved_bytes
    use_backend("cpu")
    torch.manual_seed(0)
    model = dla_fused.create_model("dla34", num_classes=4).train()
    x = torch.randn(2, 3, 32, 32)
    saved, grads = {}, {}
    for lean in (False, True):
        assert dla_fused.set_memory_efficient(model, lean) == 6
        assert all(m.memory_efficient is lean for m in model.modules() if isinstance(m, AggregationNode))
        saved[lean] = saved_bytes(lambda: model(x).square().mean(), exclude=list(model.parameters()) + [x])
        model.zero_grad()
        model(x).square().mean().backward()
        grads[lean] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert saved[True] < saved[False]
    assert len(grads[True]) == len(grads[False]) > 100
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="memory_efficient must be True, False or None"):
        dla_fused.set_memory_efficient(model, "yes")
