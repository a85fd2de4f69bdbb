"""Model level: one training step (forward, backward, SGD update) of dla34, dla34up and the
CenterNet-style dla34, reference vs fused, eager vs torch.compile, each in NCHW and channels_last:
images/s and peak memory. One test per network times all of them in interleaved rounds
(bench_utils.interleaved). Eager's record lists the network's fused parts (aggregation nodes,
IDA-Up steps) as op benchmark cases, for the share of its step they take (bench_summary.shares)."""
import os

import pytest
import torch
import torch.nn.functional as F

import bench_utils as bu
import dla_fused
from test_ops import fused_parts

MODELS = {"dla34": dict(num_classes=1000), "dla34up": dict(num_classes=19),
          "centernet_dla34": dict(heads={"hm": 80, "wh": 2, "reg": 2})}
# Compiling a whole network takes about a minute per variant (minutes on 2 CPU cores), so only
# dla34 is compiled, and the fused model only with the `auto` backend; DLA_BENCH_COMPILE_ALL=1
# compiles all three networks.
COMPILE_ALL = os.environ.get("DLA_BENCH_COMPILE_ALL") == "1"


def _loss(output):
    if isinstance(output, list):
        return sum(t.float().square().mean() for t in output[0].values())
    if isinstance(output, tuple):
        return output[1].float().square().mean()
    return F.cross_entropy(output.float(), torch.zeros(output.shape[0], dtype=torch.long, device=output.device))


def _providers(name):
    providers = ["eager", "compiled"] + [f"fused:{b}" for b in bu.fused_backends()] + ["fused:auto+compiled"]
    return [p for p in providers if COMPILE_ALL or name == "dla34" or not p.endswith("compiled")]


def _step(name, provider, memory_format):
    """One training step of a fresh model `name` as `provider` runs it, in `memory_format`."""
    torch.manual_seed(0)
    model = dla_fused.create_model(name, fused=provider.startswith("fused"), **MODELS[name])
    model = model.to(bu.DEVICE).train().to(memory_format=memory_format)
    net = torch.compile(model, dynamic=False) if provider.endswith("compiled") else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(bu.MODEL_BATCH, 3, bu.MODEL_IMAGE, bu.MODEL_IMAGE, device=bu.DEVICE)
    images = images.contiguous(memory_format=memory_format)

    def step():
        with torch.autocast(bu.DEVICE.type, dtype=bu.DTYPE, enabled=bu.GPU):
            loss = _loss(net(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step(benchmark, name):
    fns = {(layout, p): _step(name, p, memory_format)
           for layout, memory_format in bu.LAYOUTS.items() for p in _providers(name)}
    benchmark.group = f"train step {name}"
    times = bu.interleaved(benchmark, fns, 1)
    memory = bu.interleaved_memory(fns)
    case = f"{name} {bu.MODEL_BATCH}x3x{bu.MODEL_IMAGE}x{bu.MODEL_IMAGE}"
    # the op benchmarks measured the fused parts at the same shapes only when the sizes agree
    same_sizes = (bu.MODEL_BATCH, bu.MODEL_IMAGE) == (bu.OP_BATCH, bu.OP_IMAGE)
    parts = fused_parts(name, bu.MODEL_BATCH, bu.MODEL_IMAGE, **MODELS[name]) if same_sizes else None
    for layout, provider in fns:
        bu.record("training step", case, layout, "train step", provider, times[layout, provider],
                  memory=memory and memory[layout, provider], images=bu.MODEL_BATCH,
                  parts=parts if provider == "eager" else None)
