"""Both fused ops, and a whole fused model, in every dtype through every (device, backend) pair,
against a float64 run of the plain-PyTorch reference. One rule for everything checked (outputs,
every gradient, the running statistics): helpers.assert_within_rule, i.e. the error against the
float64 truth is at most twice eager PyTorch's own error in the same dtype (the reference run on
the same low-precision inputs, or under the same autocast) plus a small floor.

Every test body runs for each (device, backend) pair of PAIRS:
  cuda/triton, cuda/cuda  the GPU shapes; skipped without a CUDA GPU;
  cpu/cpu                 the C++ CPU kernels, smaller shapes;
  cpu/triton              the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1, which
                          conftest.py sets on a machine without a GPU), the same smaller shapes,
                          except IDA-Up factor 8 and the whole model (too slow there; see them);
so a body that would fail on a correct GPU fails on the CPU first."""
import copy

import pytest
import torch

import dla_fused
from conftest import requires_cuda
from dla_fused import backend
from dla_fused.ops.aggregation import aggregation_node
from dla_fused.ops.ida_up import ida_up
from helpers import assert_results_within_rule, assert_within_rule, named_grads

import test_aggregation as agg
import test_ida_up as ida

requires_interpreter = pytest.mark.skipif(not backend.triton_interpreted(),
                                          reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")
PAIRS = [pytest.param(("cuda", "triton"), marks=requires_cuda, id="cuda-triton"),
         pytest.param(("cuda", "cuda"), marks=requires_cuda, id="cuda-cuda"),
         pytest.param(("cpu", "cpu"), id="cpu-cpu"),
         pytest.param(("cpu", "triton"), marks=requires_interpreter, id="cpu-triton")]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Per device: on the GPU a dla34 level-3 root and a DLA-Up step as the models meet them; on the CPU
# fewer channels and pixels (the Triton interpreter is slow; 12 coarse pixels are one backward tile
# of the IDA-Up kernel there), with an odd spatial size still.
AGG_SHAPE = {"cuda": dict(channels=[128, 128, 64, 128], out=128, size=(15, 13), batch=4),
             "cpu": dict(channels=[16, 16, 8, 16], out=16, size=(5, 3), batch=2)}
IDA_SHAPE = {"cuda": dict(c_in=96, c_out=64, size=(7, 5), batch=4),
             "cpu": dict(c_in=8, c_out=4, size=(3, 2), batch=2)}
# Not smaller on the CPU: at 2 x 32 x 32 dla34's last BatchNorms average 2 values each, and bfloat16
# gradients are noise (eager PyTorch in NCHW misses the rule against eager channels_last by 100x).
MODEL_INPUT = {"cuda": (8, 3, 64, 64), "cpu": (2, 3, 64, 64)}
LARGE_MEAN_INPUT = {"cuda": (8, 64, 32, 32), "cpu": (2, 16, 9, 7)}


@pytest.fixture(params=PAIRS)
def device(request):
    """Selects the pair's backend; the device type to run on."""
    device, name = request.param
    reasons = backend.not_supported_reasons(name, device)
    assert not reasons, f"backend {name} must be usable on {device} here: {reasons}"
    backend.set_backend(name)
    return device


def _wide(t):
    return t.detach().double() if t is not None and t.is_floating_point() else t


def _fast_gradcheck(device):
    """On the CPU a random projection of the Jacobian only: the full gradchecks of the CPU backends
    are in test_aggregation.py and test_ida_up.py, and the Triton interpreter is too slow for two."""
    return device == "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_aggregation_node(device, dtype, channels_last, training, residual):
    layout = (torch.channels_last,) if channels_last else None
    children, params, buffers = agg.make_inputs(**AGG_SHAPE[device], layout=layout, device=device)
    low = [c.detach().to(dtype) for c in children]
    low_params = dict(params, weight=params["weight"].detach().to(dtype))
    fused, same = agg.run_both(low, low_params, buffers, training, residual)
    _, truth = agg.run_both([_wide(c) for c in children], {k: _wide(v) for k, v in params.items()},
                            {k: _wide(v) for k, v in buffers.items()}, training, residual)
    assert_results_within_rule(*(named_grads(r, len(children)) for r in (fused, truth, same)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["leaky_relu", "silu", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_aggregation_node_activations(device, dtype, activation, training):
    """The other activations, channels_last with a residual, by the same rule."""
    children, params, buffers = agg.make_inputs(**AGG_SHAPE[device], layout=(torch.channels_last,), device=device)
    low = [c.detach().to(dtype) for c in children]
    low_params = dict(params, weight=params["weight"].detach().to(dtype))
    kwargs = dict(activation=activation, negative_slope=0.1)
    fused, same = agg.run_both(low, low_params, buffers, training, True, **kwargs)
    _, truth = agg.run_both([_wide(c) for c in children], {k: _wide(v) for k, v in params.items()},
                            {k: _wide(v) for k, v in buffers.items()}, training, True, **kwargs)
    assert_results_within_rule(*(named_grads(r, len(children)) for r in (fused, truth, same)))


def test_aggregation_float64_and_gradcheck(device):
    children, params, buffers = agg.make_inputs([5, 3, 4], 5, dtype=torch.float64, size=(3, 3), device=device)
    agg.check_against_reference(children, params, buffers, True, True)
    bn = {k: v.detach().double().requires_grad_() for k, v in params.items() if k != "weight"}

    def fn(a, b, c, w, gamma, beta):
        return aggregation_node([a, b, c], w, gamma, beta, None, None, None, True, 0.1, 1e-5, True)
    assert torch.autograd.gradcheck(fn, (*children, params["weight"], bn["bn_weight"], bn["bn_bias"]),
                                    fast_mode=_fast_gradcheck(device))


def test_aggregation_statistics_with_large_mean(device):
    x = torch.randn(LARGE_MEAN_INPUT[device], device=device) + 100.0
    c = x.shape[1]
    mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)
    aggregation_node([x], torch.eye(c, device=device).view(c, c, 1, 1), torch.ones(c, device=device),
                     torch.zeros(c, device=device), mean, var, None, True, 1.0, 1e-5)
    # momentum 1: the running statistics are the batch mean and the unbiased batch variance
    torch.testing.assert_close(mean, x.double().mean((0, 2, 3)).float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(var, x.double().var((0, 2, 3)).float(), rtol=1e-3, atol=0)


# Every factor on every pair but factor 8 in the Triton interpreter: its backward loops over the
# 16 x 16 taps in Python, about 2 s a case (test_ida_up.py takes factor 8 through it in float32).
IDA_CASES = [pytest.param(pair.values[0], factor, marks=pair.marks, id=f"{pair.id}-{factor}")
             for pair in PAIRS for factor in (2, 4, 8) if not (pair.id == "cpu-triton" and factor == 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,factor", IDA_CASES, indirect=["device"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ida_up(device, dtype, factor, channels_last, training):
    shape = IDA_SHAPE[device]
    args, buffers = ida.make_inputs(shape["c_in"], shape["c_out"], factor, True, True, size=shape["size"],
                                    batch=shape["batch"], device=device, channels_last=channels_last)
    low = {k: v if k in ("bn_weight", "bn_bias") else v.to(dtype) for k, v in args.items()}
    fused, same = ida.run_both(low, buffers, factor, training)
    _, truth = ida.run_both({k: _wide(v) for k, v in args.items()}, {k: _wide(v) for k, v in buffers.items()},
                            factor, training)
    assert_results_within_rule(fused, truth, same)


@pytest.mark.parametrize("proj", [True, False], ids=["proj", "identity"])
def test_ida_up_float64_and_gradcheck(device, proj):
    args, buffers = ida.make_inputs(3, 2, 2, proj, True, size=(3, 2), dtype=torch.float64, device=device)
    ida.check_against_reference(args, buffers, 2, True)
    names = [k for k in ida.ARG_NAMES if args[k] is not None]
    inputs = [args[k].double().requires_grad_() for k in names]

    def fn(*tensors):
        a = dict(zip(names, tensors))
        return ida_up(a["x"], a.get("proj_weight"), a.get("bn_weight"), a.get("bn_bias"), None, None, None, True,
                      0.1, 1e-5, a["up_weight"], 2, a["skip"])
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=_fast_gradcheck(device))


def test_bad_input_on_the_device(device):
    """A child on another device, or a backend that cannot serve this device, raises before the
    running statistics change."""
    children, params, buffers = agg.make_inputs([4, 4], 4, device=device)
    before = buffers["running_mean"].clone()
    other_device, other_backend = ("meta", "cuda") if device == "cpu" else ("cpu", "cpu")
    with pytest.raises(ValueError, match="device"):
        aggregation_node([children[0], children[1].to(other_device)], params["weight"], params["bn_weight"],
                         params["bn_bias"], buffers["running_mean"], buffers["running_var"])
    assert torch.equal(buffers["running_mean"], before)
    backend.set_backend(other_backend)
    with pytest.raises(backend.BackendError, match=f"backend runs on .* tensors, not {device}"):
        aggregation_node(children, params["weight"], params["bn_weight"], params["bn_bias"],
                         buffers["running_mean"], buffers["running_var"])
    assert torch.equal(buffers["running_mean"], before)


def _training_step(model, x, autocast):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.double().square().mean().backward()
    return out


# Not through the Triton interpreter: dla34 takes about 30 s there (its 64-channel level-2 root runs
# in 16-wide blocks), over this file's time budget; the Triton kernels' low-precision numbers are
# checked op by op above, and a whole model through them in float64 in test_fused_models.py.
@pytest.mark.parametrize("device", [pair for pair in PAIRS if pair.id != "cpu-triton"], indirect=True)
def test_fused_model_under_autocast(device):
    """A dla34 training step under bfloat16 autocast in channels_last: the fused model's output,
    every parameter gradient and every BatchNorm running statistic against a float64 copy."""
    torch.manual_seed(0)
    same = dla_fused.create_model("dla34", num_classes=10, fused=False).to(device, memory_format=torch.channels_last)
    fused = dla_fused.fuse(copy.deepcopy(same))
    truth = copy.deepcopy(same).double()
    x = torch.randn(MODEL_INPUT[device], device=device).contiguous(memory_format=torch.channels_last)
    ref = _training_step(truth, x.double(), autocast=False)
    same_out = _training_step(same, x, autocast=True)
    out = _training_step(fused, x, autocast=True)
    assert out.dtype == torch.bfloat16
    assert_within_rule(out, ref, same_out, "output")
    truth_params, same_params = dict(truth.named_parameters()), dict(same.named_parameters())
    for key, p in fused.named_parameters():
        assert (p.grad is None) == (truth_params[key].grad is None), f"grad {key}: used in one model only"
        if p.grad is not None:  # None: a parameter the model does not use (dla34's level3.project)
            assert_within_rule(p.grad, truth_params[key].grad, same_params[key].grad, f"grad {key}")
    truth_bufs, same_bufs = dict(truth.named_buffers()), dict(same.named_buffers())
    for key, b in fused.named_buffers():
        if b.is_floating_point():
            assert_within_rule(b, truth_bufs[key], same_bufs[key], key)
        else:
            assert torch.equal(b, same_bufs[key]), key
