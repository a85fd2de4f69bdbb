"""The traffic and launch model of the benchmarks (benchmarks/roofline.py), on the CPU under
Triton's interpreter: every Triton kernel has a byte rule, the eager accounting gives the closed
form of its passes, a rule gives the hand count of its kernel's loads and stores, and the launches
the model traces (launches intercepted, GPU host branches) are the launches the op makes when it
runs."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import roofline  # noqa: E402
from dla_fused import backend  # noqa: E402

pytestmark = pytest.mark.skipif(not backend.triton_interpreted(), reason="traces Triton under its interpreter")


def _kernel_names():
    from dla_fused.kernels import aggregation, ida_up
    from dla_fused.kernels._common import Tunable
    names = set()
    for module in (aggregation, ida_up):
        for value in vars(module).values():
            fn = value.fn if isinstance(value, Tunable) else value
            # launched kernels are the module's own @triton.jit functions named *_kernel (the
            # others are device functions they call)
            if (hasattr(fn, "arg_names") and getattr(getattr(fn, "fn", None), "__module__", "") == module.__name__
                    and fn.fn.__name__.endswith("_kernel")):
                names.add(fn.fn.__name__)
    return names


def test_every_launched_kernel_has_a_rule():
    names = _kernel_names()
    assert {"_conv_kernel", "_upsample_kernel"} <= names  # the scan finds kernels at all
    assert names == set(roofline.RULES), f"no rule for {names - set(roofline.RULES)}, stale: {set(roofline.RULES) - names}"




def test_eager_node_bytes_are_its_passes():
    """Eager's node, fwd + bwd, moves 5 C_in + 16 C_out activation planes (plus the small weight
    and per-channel vectors): cat 2 C_in; conv C_in + C_out; BN (two reads, one write) 3 C_out;
    ReLU in place 2 C_out; ReLU backward 3 C_out; BN backward (input and gradient twice, one write)
    5 C_out; dgrad and wgrad 2 C_out + 2 C_in."""
    c_in, c_out, n, h, w = 12, 4, 3, 7, 5
    call_on = roofline._agg_call([(n, 6, h, w), (n, 6, h, w)], c_out, False, fused=False)
    trace = roofline.trace_eager(call_on)
    plane = n * h * w * torch.tensor([], dtype=roofline.DTYPE).element_size()
    small = c_out * c_in * 2 * 3 + 4 * c_out * 4 * 8  # weights and per-channel vectors, generously
    activations = (5 * c_in + 16 * c_out) * plane
    assert activations <= trace.bytes <= activations + small
    assert trace.launches == 7


def test_conv_rule_is_the_hand_count():
    """_conv_kernel with statistics over 2 children: the children once (output blocks adjacent), the
    weight once, the output written once, two fp32 partials per (pixel tile, channel) and a count
    per tile; FLOPs 2 P C_in C_out."""
    n, h, w, c_out = 2, 9, 7, 5
    children = [torch.randn(n, c, h, w, dtype=torch.bfloat16) for c in (3, 4)]
    weight = torch.randn(c_out, 7, dtype=torch.bfloat16)
    out = torch.empty(n, c_out, h, w, dtype=torch.bfloat16)
    part = torch.empty(16, c_out)
    args = dict(children=tuple((c, c.shape[1]) for c in children), num_pixels=n * h * w, c_out=c_out,
                w_ptr=weight, HAS_SCALE=False, HAS_SHIFT=False, HAS_RESIDUAL=False, HAS_GATE=False, out_ptr=out,
                STATS=True, STORE=True, mean_part=part, CO_FIRST=True)
    tiles = 3
    read, write, flops = roofline.RULES["_conv_kernel"](args, (1, tiles))
    assert read == sum(c.numel() * 2 for c in children) + weight.numel() * 2
    assert write == out.numel() * 2 + tiles * (2 * c_out + 1) * 4
    assert flops == 2 * n * h * w * 7 * c_out
    # statistics only: the output is not stored
    _, write, _ = roofline.RULES["_conv_kernel"](dict(args, STORE=False), (1, tiles))
    assert write == tiles * (2 * c_out + 1) * 4


@pytest.mark.parametrize("kind, params", [
    ("agg", ([(2, 5, 4, 4), (2, 6, 4, 4), (2, 3, 4, 4)], 5, True)),
    ("ida", ((2, 6, 3, 4), 4, 2, False)),
    ("ida", ((2, 4, 3, 4), None, 4, True)),
])
def test_traced_launches_are_the_launches_made(kind, params):
    """The model's trace (launches intercepted, GPU host branches) has as many launches as the op
    makes running for real under the interpreter, Triton kernels and ATen ops alike."""
    traced = roofline.trace_triton(roofline._call_on(kind, params, True))
    triton, aten = roofline.launches_made(roofline._call_on(kind, params, True))
    assert traced.triton_launches == sum(triton.values())
    assert traced.launches == sum(triton.values()) + sum(aten.values())
    assert traced.bytes > 0
