"""Model level: one training step (forward, backward, SGD update) of dla34, dla34up and the
CenterNet-style dla34, reference vs fused, eager vs torch.compile: images/s and peak memory."""
import os

import pytest
import torch
import torch.nn.functional as F

import bench_utils as bu
import dla_fused
from dla_fused import backend

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


def _cases():
    providers = ["eager", "compiled"] + [f"fused:{b}" for b in bu.fused_backends()] + ["fused:auto+compiled"]
    return [(name, p) for name in MODELS for p in providers
            if COMPILE_ALL or name == "dla34" or not p.endswith("compiled")]


@pytest.mark.parametrize("name,provider", _cases())
def test_training_step(benchmark, name, provider):
    compiled = provider.endswith("compiled")
    fused = provider.startswith("fused")
    backend.set_backend(provider.split(":")[1].split("+")[0] if fused else "auto")
    torch.manual_seed(0)
    model = dla_fused.create_model(name, fused=fused, **MODELS[name]).to(bu.DEVICE).train()
    model = model.to(memory_format=bu.LAYOUT)
    net = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(bu.MODEL_BATCH, 3, bu.MODEL_IMAGE, bu.MODEL_IMAGE, device=bu.DEVICE)
    images = images.contiguous(memory_format=bu.LAYOUT)

    def step():
        with torch.autocast(bu.DEVICE.type, dtype=bu.DTYPE, enabled=bu.GPU):
            loss = _loss(net(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    benchmark.group = f"train step {name}"
    seconds = bu.time_per_call(benchmark, step, 1)
    memory = bu.peak_memory(step)
    case = f"{name} {bu.MODEL_BATCH}x3x{bu.MODEL_IMAGE}x{bu.MODEL_IMAGE}"
    bu.record("training step", case, provider, "train step", seconds, memory=memory, images=bu.MODEL_BATCH)
