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

CASES = list(roofline.gpu_cases()) if not bu.GPU or backend.triton_interpreted() else []


@pytest.mark.skipif(bu.GPU and not backend.triton_interpreted(),
                    reason="the model traces the Triton path under the interpreter (TRITON_INTERPRET=1); "
                           "on a GPU run `TRITON_INTERPRET=1 pytest benchmarks/test_roofline.py` on its own")
@pytest.mark.parametrize("group, case", CASES, ids=[f"{g}-{c}" for g, c in CASES])
def test_roofline(group, case):
    prediction = roofline.model(group, case)
    row = roofline.row(prediction)
    small = roofline.small_case(group, case)
    triton, aten = roofline.launches_made(small)
    row["measured_launches"] = sum(triton.values()) + sum(aten.values())
    bu.ROOFLINE.append(row)
    assert row["measured_launches"] == row["triton_launches"], (
        f"the model traced {row['triton_launches']} launches, the op launched {row['measured_launches']}")
