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
    the ATen glue between the kernels is counted beside it."""
    backend.set_backend("triton")
    step = _node_call(aggregation_node, memory_efficient=True)
    step()  # first call: caches
    first, first_aten = launches.count_launches(step)
    again, again_aten = launches.count_launches(step)
    assert first == again and first_aten == again_aten
    assert all(name.startswith("_") and name.endswith("_kernel") for name in first), first
    # forward: the product with its statistics, their finalisation, the apply; backward: the
    # recomputed product again, then the reduction, dz and the backward products
    assert first["_apply_kernel"] == 1 and first["_dz_kernel"] == 1 and first["_reduce_kernel"] == 1
    assert sum(first.values()) >= 7
    assert sum(first_aten.values()) > 0
