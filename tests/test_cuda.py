"""Both fused ops on a CUDA GPU, through each GPU backend (triton, cuda), every dtype, both
layouts, against the plain-PyTorch reference. Skipped without a GPU."""
import pytest
import torch

from dla_fused import backend
from dla_fused.ops.aggregation import aggregation_node
from dla_fused.ops.ida_up import ida_up
from helpers import assert_within_rule

import test_aggregation as agg
import test_ida_up as ida

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present")
GPU_BACKENDS = ("triton", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use(name):
    reasons = backend.not_supported_reasons(name, "cuda")
    assert not reasons, f"backend {name} must be usable on this GPU machine: {reasons}"
    backend.set_backend(name)


def _wide(tensors):
    return {k: (None if v is None else (v.double() if v.is_floating_point() else v)) for k, v in tensors.items()}


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_aggregation_node(backend_name, dtype, channels_last, training, residual):
    """dla34 level-3 root shape (children 128+128+64+128 -> 128), odd spatial size."""
    _use(backend_name)
    layout = (torch.channels_last,) if channels_last else None
    children, params, buffers = agg.make_inputs([128, 128, 64, 128], 128, size=(15, 13), batch=4,
                                                layout=layout, device="cuda")
    low = [c.detach().to(dtype).requires_grad_() for c in children]
    low_params = dict(params, weight=params["weight"].detach().to(dtype).requires_grad_())
    (out, grads, bufs), (same, same_grads, _) = agg.run_both(low, low_params, buffers, training, residual)
    wide_children = [c.detach().double().requires_grad_() for c in children]
    wide_params = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    _, (ref, ref_grads, ref_bufs) = agg.run_both(wide_children, wide_params, _wide(buffers), training, residual)
    assert_within_rule(out, ref, same, "output")
    for i, (g, r, s) in enumerate(zip(grads, ref_grads, same_grads)):
        assert_within_rule(g, r, s, f"gradient {i}")
    for key in ("running_mean", "running_var"):
        assert_within_rule(bufs[key], ref_bufs[key], ref_bufs[key].float(), key)


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
def test_aggregation_float64_and_gradcheck(backend_name):
    _use(backend_name)
    children, params, buffers = agg.make_inputs([5, 3, 4], 5, dtype=torch.float64, size=(3, 3), device="cuda")
    agg.check_against_reference(children, params, buffers, True, True)
    bn = {k: v.detach().double().requires_grad_() for k, v in params.items() if k != "weight"}

    def fn(a, b, c, w, gamma, beta):
        return aggregation_node([a, b, c], w, gamma, beta, None, None, None, True, 0.1, 1e-5, True)
    assert torch.autograd.gradcheck(fn, (*children, params["weight"], bn["bn_weight"], bn["bn_bias"]))


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
def test_aggregation_statistics_with_large_mean(backend_name):
    _use(backend_name)
    x = torch.randn(8, 64, 32, 32, device="cuda") + 100.0
    mean, var = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    aggregation_node([x], torch.eye(64, device="cuda").view(64, 64, 1, 1), torch.ones(64, device="cuda"),
                     torch.zeros(64, device="cuda"), mean, var, None, True, 1.0, 1e-5)
    # momentum 1: the running statistics are the batch mean and the unbiased batch variance
    torch.testing.assert_close(mean, x.double().mean((0, 2, 3)).float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(var, x.double().var((0, 2, 3)).float(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ida_up(backend_name, dtype, factor, channels_last, training):
    _use(backend_name)
    args, buffers = ida.make_inputs(96, 64, factor, True, True, size=(7, 5), batch=4, device="cuda",
                                    channels_last=channels_last)
    low = {k: None if v is None else (v.to(dtype) if k not in ("bn_weight", "bn_bias") else v)
           for k, v in args.items()}
    (out, grads, _), (same, same_grads, _) = ida.run_both(low, buffers, factor, training)
    _, (ref, ref_grads, _) = ida.run_both(_wide(args), _wide(buffers), factor, training)
    assert_within_rule(out, ref, same, "output")
    for name in ref_grads:
        assert_within_rule(grads[name], ref_grads[name], same_grads[name], f"grad {name}")


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("proj", [True, False], ids=["proj", "identity"])
def test_ida_up_float64_and_gradcheck(backend_name, proj):
    _use(backend_name)
    args, buffers = ida.make_inputs(3, 2, 2, proj, True, size=(3, 2), dtype=torch.float64, device="cuda")
    ida.check_against_reference(args, buffers, 2, True)
    names = [k for k in ida.ARG_NAMES if args[k] is not None]
    inputs = [args[k].double().requires_grad_() for k in names]

    def fn(*tensors):
        a = dict(zip(names, tensors))
        return ida_up(a["x"], a.get("proj_weight"), a.get("bn_weight"), a.get("bn_bias"), None, None, None, True,
                      0.1, 1e-5, a["up_weight"], 2, a["skip"])
    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
def test_bad_input_on_gpu(backend_name):
    _use(backend_name)
    children, params, buffers = agg.make_inputs([4, 4], 4, device="cuda")
    before = buffers["running_mean"].clone()
    with pytest.raises(ValueError, match="device"):
        aggregation_node([children[0], children[1].cpu()], params["weight"], params["bn_weight"],
                         params["bn_bias"], buffers["running_mean"], buffers["running_var"])
    assert torch.equal(buffers["running_mean"], before)
    backend.set_backend("cpu")
    with pytest.raises(backend.BackendError, match="CPU tensors"):
        aggregation_node(children, params["weight"], params["bn_weight"], params["bn_bias"],
                         buffers["running_mean"], buffers["running_var"])
    assert torch.equal(buffers["running_mean"], before)


def test_fused_model_on_gpu_matches_reference():
    """dla34 training step in bf16 channels_last: fused (auto backend) vs reference."""
    import copy
    import dla_fused
    backend.set_backend("auto")
    torch.manual_seed(0)
    ref = dla_fused.create_model("dla34", num_classes=10, fused=False).cuda().to(memory_format=torch.channels_last)
    fused = dla_fused.fuse(copy.deepcopy(ref))
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    outs = []
    for model in (ref, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        outs.append(out.float())
    err = (outs[1] - outs[0]).abs().max() / outs[0].abs().max()
    assert err < 5e-2, err
    g_ref = ref.level5.root.conv.weight.grad
    g = fused.level5.root.conv.weight.grad
    assert torch.isfinite(g).all() and ((g - g_ref).norm() / g_ref.norm()) < 0.1
