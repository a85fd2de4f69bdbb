"""The launch counter of the benchmarks (benchmarks/launches.py), on the CPU under Triton's
interpreter: views and allocations are not launches, every Triton kernel call is one, and eager
PyTorch's aggregation node is its seven kernels."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import launches  # noqa: E402
from dla_fused import backend  # noqa: E402
from dla_fused.ops.aggregation import aggregation_node, aggregation_node_reference  # noqa: E402


def test_views_and_allocations_are_not_launches():
    x = torch.randn(4, 6)
    triton, aten = launches.count_launches(lambda: (x.view(6, 4), x.t(), x[1:], torch.empty(3), x + 1, x.mul_(2)))
    assert sum(triton.values()) == 0
    assert aten == {"add": 1, "mul_": 1}


def _node_call(fn, **kwargs):
    children = [torch.randn(2, c, 3, 3, requires_grad=True) for c in (4, 4)]
    weight = torch.randn(4, 8, 1, 1, requires_grad=True)
    gamma, beta = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    stats = torch.zeros(4), torch.ones(4)
    grad = torch.randn(2, 4, 3, 3)

    def step():
        y = fn(children, weight, gamma, beta, *stats, None, True, 0.1, 1e-5, False, **kwargs)
        torch.autograd.grad(y, children + [weight, gamma, beta], grad)
    return step


def test_eager_node_launches_its_seven_kernels():
    triton, aten = launches.count_launches(_node_call(aggregation_node_reference))
    assert sum(triton.values()) == 0
    assert aten == {"cat": 1, "convolution": 1, "native_batch_norm": 1, "relu_": 1, "threshold_backward": 1,
                    "native_batch_norm_backward": 1, "convolution_backward": 1}


def test_triton_launches_are_counted_per_kernel():
    """Each Triton kernel call is one launch, named by its kernel; the count repeats exactly, and
    the ATen glue between the kernels is counted beside it. The Triton training path: forward in
    three launches (the product's statistics, their finalisation with the running statistics'
    update, the output), backward in two (the sums pass, the chained GEMMs), no ATen launch."""
    backend.set_backend("triton")
    for memory_efficient, output in ((True, {"_conv_kernel": 2}), (False, {"_conv_kernel": 1, "_apply_kernel": 1})):
        step = _node_call(aggregation_node, memory_efficient=memory_efficient)
        step()  # first call: caches
        first, first_aten = launches.count_launches(step)
        again, again_aten = launches.count_launches(step)
        assert first == again and first_aten == again_aten
        assert all(name.startswith("_") and name.endswith("_kernel") for name in first), first
        assert first == dict(output, _finalize_stats_kernel=1, _backward_sums_kernel=1,
                             _backward_chained_kernel=1), first
        assert sum(first_aten.values()) == 0, first_aten


def test_triton_ida_up_step_is_five_launches():
    """The projected IDA-Up step on the Triton path: forward in three launches (the projection's
    statistics, the finalize with the running statistics, the gather), backward in two (the fused
    upsample backward, the chained GEMMs), no ATen launch; num_batches_tracked moves once."""
    from dla_fused.ops.ida_up import ida_up
    backend.set_backend("triton")
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    weight = torch.randn(4, 6, 1, 1, requires_grad=True)
    gamma, beta = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    up = torch.randn(4, 1, 4, 4, requires_grad=True)
    skip = torch.randn(2, 4, 6, 6, requires_grad=True)
    mean, var, tracked = torch.zeros(4), torch.ones(4), torch.tensor(0)
    grad = torch.randn(2, 4, 6, 6)

    def step():
        y = ida_up(x, weight, gamma, beta, mean, var, tracked, True, 0.1, 1e-5, up, 2, skip)
        torch.autograd.grad(y, [x, weight, gamma, beta, up, skip], grad)
    step()
    triton, aten = launches.count_launches(step)
    assert triton == {"_conv_kernel": 1, "_finalize_stats_kernel": 1, "_upsample_kernel": 1,
                      "_upsample_backward_fused_kernel": 1, "_backward_chained_kernel": 1}, triton
    assert sum(aten.values()) == 0, aten
    assert int(tracked) == 2
