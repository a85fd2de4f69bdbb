"""Prepacked CPU inference (dla_fused.prepack): fused models in eval mode, autograd off, float32
channels_last, run their conv-BN units as prepacked oneDNN convolutions with BN folded in.

Against a float64 evaluation they must be within the 2x rule of the float32 reference model; every
unit the model runs must take the prepacked path; the cache must follow parameter and statistics
changes; and every other situation must run the modules themselves, bit for bit."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import dla_fused
from dla_fused import prepack
from dla_fused.models.dla import BasicBlock, Bottleneck
from helpers import assert_within_rule, use_backend

pytestmark = pytest.mark.skipif(prepack._POINTWISE is None or not torch.backends.mkldnn.is_available(),
                                reason="this torch build has no oneDNN: the prepacked path is never taken")

CL = torch.channels_last


def _randomise_bn(model):
    """Running statistics and affine parameters away from their identity initialisation."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def _pair(name, **kwargs):
    torch.manual_seed(0)
    ref = dla_fused.create_model(name, fused=False, **kwargs)
    _randomise_bn(ref)
    ref = ref.eval().to(memory_format=CL)
    fused = dla_fused.fuse(copy.deepcopy(ref))
    return ref, fused


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _conv_units(model):
    """Conv2d modules a prepacked forward of `model` may run (not the unused `project` convs and
    not the classifier of a backbone used as a feature extractor)."""
    return [m for m in model.modules() if type(m) is nn.Conv2d]


@pytest.mark.parametrize("name, kwargs, size", [
    ("dla34", dict(num_classes=10), 64),
    ("dla60", dict(num_classes=10), 64),
    ("dla46x_c", dict(num_classes=10), 64),
    ("dla34up", dict(num_classes=5), 64),
    ("centernet_dla34", dict(heads={"hm": 3, "wh": 2}), 64),
])
def test_prepacked_inference_within_rule_of_reference(name, kwargs, size):
    use_backend("auto")
    ref, fused = _pair(name, **kwargs)
    wide = copy.deepcopy(ref).double()
    x = torch.randn(2, 3, size, size + 32).contiguous(memory_format=CL)
    prepack.clear(fused)
    with torch.inference_mode():
        outs = _leaves(fused(x))
        refs = _leaves(ref(x))
        truths = _leaves(wide(x.double()))
    ran = [m for m in _conv_units(fused) if m in prepack._CACHE]
    # every conv went through the prepacked path except the never-used `project` modules and the
    # backbone's classifier `fc`, a bare Conv2d on pooled 1x1 features (unused in dense models)
    unused = {m for n, m in fused.named_modules() if ".project" in n or n == "fc" or n.endswith(".fc")}
    expected = [m for m in _conv_units(fused) if m not in unused]
    missing = [n for n, m in fused.named_modules() if m in expected and m not in ran]
    assert ran and not missing, f"not prepacked: {missing}"
    for out, r, truth in zip(outs, refs, truths):
        assert out.is_contiguous(memory_format=CL) == r.is_contiguous(memory_format=CL)
        assert_within_rule(out, truth, r, f"{name} prepacked output")


@pytest.mark.parametrize("name, kwargs", [("dla34", dict(num_classes=4)), ("centernet_dla34", dict(heads={"hm": 2}))])
def test_nchw_model_runs_channels_last_and_answers_nchw(name, kwargs):
    """A whole model given NCHW runs its units prepacked in channels_last and returns NCHW."""
    use_backend("auto")
    ref, fused = _pair(name, **kwargs)
    ref.to(memory_format=torch.contiguous_format), fused.to(memory_format=torch.contiguous_format)
    wide = copy.deepcopy(ref).double()
    x = torch.randn(1, 3, 64, 96)
    prepack.clear(fused)
    with torch.inference_mode():
        outs, refs, truths = _leaves(fused(x)), _leaves(ref(x)), _leaves(wide(x.double()))
    assert any(m in prepack._CACHE for m in fused.modules())
    for out, r, truth in zip(outs, refs, truths):
        assert out.is_contiguous() and r.is_contiguous()
        assert_within_rule(out, truth, r, f"{name} NCHW prepacked output")


def test_prepacked_under_no_grad_and_in_the_cpu_backend():
    """no_grad counts as autograd off; the residual blocks are prepacked whatever the backend,
    the aggregation nodes only when `eager` serves them (here the C++ kernels do)."""
    ref, fused = _pair("dla34", num_classes=4)
    wide = copy.deepcopy(ref).double()
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=CL)
    use_backend("cpu")
    prepack.clear(fused)
    with torch.no_grad():
        out, r, truth = fused(x), ref(x), wide(x.double())
    assert_within_rule(out, truth, r, "no_grad, cpu backend")
    assert fused.level1[0] in prepack._CACHE  # base conv levels: Sequential units
    assert fused.level2.tree1.conv1 in prepack._CACHE  # a BasicBlock
    assert fused.level2.root.conv not in prepack._CACHE  # the node ran the C++ kernels


@pytest.mark.parametrize("situation", ["nchw", "grad", "train", "float64", "autocast", "off", "unfused"])
def test_other_situations_run_the_modules(situation):
    """Anything but eval + autograd off + float32 channels_last on the CPU runs the modules
    themselves: the output equals the reference model's bit for bit and nothing is packed."""
    use_backend("auto")
    ref, fused = _pair("dla34", num_classes=4)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    if situation == "nchw":  # a unit given NCHW (a whole model would switch, see below)
        ref, fused = (m.level2.to(memory_format=torch.contiguous_format) for m in (ref, fused))
        x = torch.randn(2, 32, 16, 16)  # (NCHW weights too: channels_last ones make PyTorch switch)
    elif situation == "train":
        ref.train(), fused.train()
    elif situation == "float64":
        ref.double(), fused.double()
        x = x.double()
    elif situation == "off":
        assert dla_fused.set_prepack(fused, False) > 0
    elif situation == "unfused":
        dla_fused.unfuse(fused)
    prepack.clear(fused)
    grad = torch.enable_grad() if situation in ("grad", "train") else torch.no_grad()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=situation == "autocast")
    with grad, autocast:
        out = fused(x)
        expected = ref(x)
    assert torch.equal(out, expected)
    assert not any(m in prepack._CACHE for m in fused.modules())


def test_cache_follows_parameter_and_statistics_changes():
    """Optimizer steps, running-statistics updates and load_state_dict all reach the prepacked
    weights (version counters); `set_prepack(model, True)` drops the cache for `.data` writes."""
    use_backend("auto")
    ref, fused = _pair("dla34", num_classes=4)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)

    def check(what):
        with torch.no_grad():
            out, r, truth = fused(x), ref(x), copy.deepcopy(ref).double()(x.double())
        assert_within_rule(out, truth, r, what)

    check("first call")
    # an optimizer step on the fused model, then a training-mode forward that moves running stats
    fused.train()
    opt = torch.optim.SGD(fused.parameters(), lr=1e-3)
    fused(x).mean().backward()
    opt.step()
    fused.eval()
    ref.load_state_dict(fused.state_dict())
    check("after an optimizer step and a training forward")
    # load_state_dict into the fused model
    other = dla_fused.create_model("dla34", fused=False, num_classes=4)
    _randomise_bn(other)
    fused.load_state_dict(other.state_dict()), ref.load_state_dict(other.state_dict())
    check("after load_state_dict")
    # .data writes bypass the version counters: set_prepack(model, True) drops the cache
    with torch.no_grad():
        scaled = fused.level3.tree1.tree1.bn2.weight.data
        scaled.mul_(3)
    ref.load_state_dict(fused.state_dict())
    assert dla_fused.set_prepack(fused, True) > 0
    check("after a .data write and set_prepack")


def test_fuse_and_set_prepack_reject_non_bool():
    model = dla_fused.create_model("dla34", fused=False, num_classes=3)
    with pytest.raises(ValueError, match="prepack_inference must be True or False"):
        dla_fused.fuse(model, prepack_inference="yes")
    assert not dla_fused.is_fused(model)
    with pytest.raises(ValueError, match="enabled must be True or False"):
        dla_fused.set_prepack(dla_fused.fuse(model), 1)


def test_fuse_prepack_off_and_units_found():
    model = dla_fused.create_model("dla34", fused=False, num_classes=3)
    dla_fused.fuse(model, prepack_inference=False)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=CL)
    with torch.inference_mode():
        model.eval()(x.contiguous(memory_format=CL))
    assert not any(m in prepack._CACHE for m in model.modules())
    blocks = sum(type(m) in (BasicBlock, Bottleneck) for m in model.modules())
    assert blocks == 12 and dla_fused.set_prepack(model, True) >= blocks + 6  # + the six roots


def test_residual_of_the_wrong_shape_raises_as_the_modules_do():
    """A block called with a residual that does not fit falls back to its modules, which raise."""
    block = BasicBlock(8, 8).eval()
    dla_fused.fuse(nn.Sequential(block))
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=CL)
    bad = torch.randn(1, 8, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad(), pytest.raises(RuntimeError, match="size"):
        block(x, bad)
    with torch.no_grad():
        expected = BasicBlock.forward(block, x, x)
        assert_within_rule(block(x, x), BasicBlock.forward(copy.deepcopy(block).double(), x.double(), x.double()),
                           expected, "block with residual")


def test_deepcopy_and_torch_save_of_a_used_model():
    """The cache lives outside the modules and `fuse`'s methods pickle by name: a whole fused
    model that has run prepacked can be deep-copied, saved and loaded."""
    use_backend("auto")
    _, fused = _pair("dla34up", num_classes=3)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=CL)
    with torch.no_grad():
        expected = _leaves(fused(x))
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        for other in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
            assert dla_fused.is_fused(other)
            for a, b in zip(_leaves(other(x)), expected):
                assert torch.equal(a, b)
