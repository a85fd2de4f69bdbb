"""The traffic, FLOP and launch model of benchmarks/roofline.py for every op case at the GPU
benchmark size (bf16, channels_last, batch 64, 224 px), with the measured launch count beside the
predicted one: the same op counted while it runs (benchmarks/launches.py; Triton's interpreter on
2 images of 4x4 pixels on the CPU, where the count does not depend on the size). On a GPU the
summary also sets the op benchmarks' measured fwd+bwd ratios beside the predicted ones."""
import pytest
import torch

import bench_utils as bu
import roofline
from dla_fused import backend
from launches import count_launches

CASES = list(roofline.gpu_cases()) if not bu.GPU or backend.triton_interpreted() else []


def _measured_launches(call_on):
    """Launches of one fused forward + backward at a small size, counted while it runs."""
    call, inputs = call_on(torch.device("cpu"))
    saved = backend._requested
    backend.set_backend("triton")
    try:
        out = call()
        grad = torch.ones_like(out)
        triton, aten = count_launches(lambda: torch.autograd.grad(call(), inputs, grad))
    finally:
        backend._requested = saved
    return sum(triton.values()) + sum(aten.values())


@pytest.mark.skipif(bu.GPU and not backend.triton_interpreted(),
                    reason="the model traces the Triton path under the interpreter (TRITON_INTERPRET=1); "
                           "on a GPU run `TRITON_INTERPRET=1 pytest benchmarks/test_roofline.py` on its own")
@pytest.mark.parametrize("group, case", CASES, ids=[f"{g}-{c}" for g, c in CASES])
def test_roofline(group, case):
    prediction = roofline.model(group, case)
    row = roofline.row(prediction)
    small = roofline.small_case(group, case)
    row["measured_launches"] = _measured_launches(small)
    bu.ROOFLINE.append(row)
    assert row["measured_launches"] == row["triton_launches"], (
        f"the model traced {row['triton_launches']} launches, the op launched {row['measured_launches']}")
