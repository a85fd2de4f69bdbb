"""Kernel launches per forward + backward (training mode) of each op benchmark case: eager
PyTorch, and the Triton path and the C++ kernels of the fused ops (benchmarks/launches.py).

On the CPU the Triton kernels run in Triton's interpreter at the case's channels on 2 images of
4x4 pixels (the number of launches does not depend on the batch or image size) and launches are
counted at dispatch; the Triton path runs as on a GPU (memory_efficient at the GPU default, which
keeps the conv output for backward). A C++ op (fused:cpu) counts once there, whatever it runs
inside. On a GPU the profiler counts the CUDA kernels at the case's full size."""
import functools

import pytest
import torch

import bench_utils as bu
from dla_fused import backend
from dla_fused.ops.aggregation import aggregation_node, aggregation_node_reference, default_memory_efficient
from dla_fused.ops.ida_up import ida_up, ida_up_reference
from launches import count_launches, cuda_kernel_launches
from test_ops import _agg_inputs, _ida_inputs, agg_cases, ida_cases

PROVIDERS = {"eager": None, "fused:triton": "triton", "fused:cpu": "cpu", "fused:cuda": "cuda"}


def _small(shape):
    return (2, shape[1], 4, 4) if not bu.GPU else shape


def _record(group, case, provider, fn):
    if bu.GPU:
        kernels = cuda_kernel_launches(fn)
        bu.LAUNCHES.append(dict(group=group, case=case, provider=provider, counted="profiler", triton=0,
                                aten=sum(kernels.values()), kernels=kernels))
        return
    triton, aten = count_launches(fn)
    bu.LAUNCHES.append(dict(group=group, case=case, provider=provider, counted="interpreter",
                            triton=sum(triton.values()), aten=sum(aten.values()),
                            kernels={**{f"triton {k}": v for k, v in triton.items()}, **dict(aten)}))


def _usable(provider):
    name = PROVIDERS[provider]
    return name is None or not backend.not_supported_reasons(name, bu.DEVICE.type)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", list(agg_cases()))
def test_aggregation_node_launches(case, provider):
    if not _usable(provider):
        pytest.skip(f"{provider} does not run on {bu.DEVICE.type}")
    children, weight, gamma, beta, stats, residual, inputs, _ = _agg_inputs(case, torch.contiguous_format)
    if not bu.GPU:  # the same channels, a small batch and image
        children = [torch.randn(_small(c.shape), dtype=c.dtype).requires_grad_() for c in children]
        inputs = children + [weight, gamma, beta]
    fn = aggregation_node_reference if provider == "eager" else aggregation_node
    if provider != "eager":
        backend.set_backend(PROVIDERS[provider])
    if provider == "fused:triton":
        fn = functools.partial(aggregation_node, memory_efficient=default_memory_efficient(torch.device("cuda")))
    out_ = fn(children, weight, gamma, beta, stats["running_mean"], stats["running_var"], None, True, 0.1, 1e-5,
              residual)
    grad = torch.randn_like(out_)

    def step():
        y = fn(children, weight, gamma, beta, stats["running_mean"], stats["running_var"], None, True, 0.1, 1e-5,
               residual)
        torch.autograd.grad(y, inputs, grad)
    step()  # first call: compilation, caches
    _record("aggregation node", case, provider, step)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", list(ida_cases()))
def test_ida_up_launches(case, provider):
    if not _usable(provider):
        pytest.skip(f"{provider} does not run on {bu.DEVICE.type}")
    shape = ida_cases()[case][0]
    args, factor, inputs, _ = _ida_inputs(case, torch.contiguous_format)
    if not bu.GPU:
        small = _small(shape)
        args["x"] = torch.randn(small, dtype=args["x"].dtype).requires_grad_()
        if "skip" in args:
            big = (small[0], args["skip"].shape[1], small[2] * factor, small[3] * factor)
            args["skip"] = torch.randn(big, dtype=args["skip"].dtype).requires_grad_()
        inputs = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    fn = ida_up_reference if provider == "eager" else ida_up
    if provider != "eager":
        backend.set_backend(PROVIDERS[provider])

    def call():
        return fn(args["x"], args.get("proj_weight"), args.get("bn_weight"), args.get("bn_bias"),
                  args.get("running_mean"), args.get("running_var"), None, True, 0.1, 1e-5, args["up_weight"],
                  factor, args.get("skip"))
    grad = torch.randn_like(call())

    def step():
        torch.autograd.grad(call(), inputs, grad)
    step()
    _record("IDA-Up step", case, provider, step)
