"""Model level: one training step (forward, backward, SGD update) of dla34, dla34up and the
CenterNet-style dla34, reference vs fused, eager vs torch.compile, each in NCHW and channels_last:
images/s, peak memory and the bytes autograd saves for backward. One test per network times all of
them in interleaved rounds (bench_utils.interleaved). Eager's record lists the network's fused
parts (aggregation nodes, IDA-Up steps) as op benchmark cases, for the share of its step they take
(bench_summary.shares). Then inference: eval mode under torch.inference_mode, at the sizes
CenterNet-style and segmentation models are deployed at."""
import copy
import functools
import os

import pytest
import torch
import torch.nn.functional as F

import bench_utils as bu
import dla_fused
from dla_fused.profiling import saved_bytes
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


def _model(name, provider, memory_format):
    torch.manual_seed(0)
    model = dla_fused.create_model(name, fused=provider.startswith("fused"), **MODELS.get(name, {}))
    if bu.lean(provider):
        dla_fused.set_memory_efficient(model, True)
    return model.to(bu.DEVICE).to(memory_format=memory_format)


def _step(name, provider, memory_format, batch=bu.MODEL_BATCH, size=(bu.MODEL_IMAGE, bu.MODEL_IMAGE)):
    """One training step of a fresh model `name` as `provider` runs it, in `memory_format`, and
    its forward alone (for the bytes saved for backward)."""
    model = _model(name, provider, memory_format).train()
    net = torch.compile(model, dynamic=False) if provider.endswith("compiled") else model
    return _training_step(model, net, memory_format, batch, size)


def _training_step(model, net, memory_format, batch, size):
    """One SGD training step of `model` run as `net` (itself, or compiled), as a callable with
    its forward alone (`.forward`) and the tensors that are not activations (`.exclude`)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, *size, device=bu.DEVICE)
    images = images.contiguous(memory_format=memory_format)

    def forward():
        with torch.autocast(bu.DEVICE.type, dtype=bu.DTYPE, enabled=bu.GPU):
            return _loss(net(images))

    def step():
        loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    step.forward, step.exclude = forward, list(model.parameters()) + [images]
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
    for (layout, provider), fn in fns.items():
        bu.select_backend(provider)
        saved = None if provider.endswith("compiled") else saved_bytes(fn.forward, exclude=fn.exclude)
        bu.record("training step", case, layout, "train step", provider, times[layout, provider],
                  memory=memory and memory[layout, provider], saved=saved, images=bu.MODEL_BATCH,
                  parts=parts if provider == "eager" else None)


# Shapes nothing was tuned for: another variant, another batch size, a non-square input.
UNTUNED = [("dla46_c", 8, (128, 128)), ("dla34", 4, (96, 160))]


def _eager_vs_fused_steps(benchmark, group, section, case, make_step, batch):
    """Training steps of eager and each fused backend in both layouts (`make_step(provider,
    memory_format)`), timed in interleaved rounds and recorded with the bytes saved for backward."""
    providers = ["eager"] + [f"fused:{b}" for b in bu.fused_backends()]
    fns = {(layout, p): make_step(p, memory_format) for layout, memory_format in bu.LAYOUTS.items() for p in providers}
    benchmark.group = group
    times = bu.interleaved(benchmark, fns, 1)
    for (layout, provider), fn in fns.items():
        bu.select_backend(provider)
        bu.record(section, case, layout, "train step", provider, times[layout, provider],
                  saved=saved_bytes(fn.forward, exclude=fn.exclude), images=batch)


@pytest.mark.parametrize("name, batch, size", UNTUNED, ids=[f"{n}-{b}x{h}x{w}" for n, b, (h, w) in UNTUNED])
def test_training_step_untuned(benchmark, name, batch, size):
    _eager_vs_fused_steps(benchmark, f"train step {name} {batch}x{size}", "training step, untuned shapes",
                          f"{name} {batch}x3x{size[0]}x{size[1]}",
                          lambda p, memory_format: _step(name, p, memory_format, batch, size), batch)


# Networks other than DLA whose aggregation chains fuse() finds in a trace (dla_fused.graph_fuse):
# timm's HGNetV2-B0 (the RT-DETR backbone, ReLU), VoVNet-19 (ESE, depthwise, ReLU), CSPDarkNet-53
# (LeakyReLU) and CS3DarkNet-S (SiLU), at the CPU model sizes.
OTHER_NETWORKS = ["hgnetv2_b0", "ese_vovnet19b_dw", "cspdarknet53", "cs3darknet_s"]


@functools.lru_cache(maxsize=1)
def _timm_model(name):
    """timm's `name` with seeded random weights, built once per network (copies serve each provider)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=1000)


def _timm_step(name, provider, memory_format, batch=bu.MODEL_BATCH, size=(bu.MODEL_IMAGE, bu.MODEL_IMAGE)):
    model = copy.deepcopy(_timm_model(name))
    torch.manual_seed(0)  # the same images for every provider
    if provider.startswith("fused"):
        dla_fused.fuse(model)
        if bu.lean(provider):
            dla_fused.set_memory_efficient(model, True)
    model = model.to(bu.DEVICE).to(memory_format=memory_format).train()
    return _training_step(model, model, memory_format, batch, size)


@pytest.mark.parametrize("name", OTHER_NETWORKS)
def test_training_step_other_networks(benchmark, name):
    _eager_vs_fused_steps(benchmark, f"train step {name} (timm)", "training step, other networks",
                          f"{name} {bu.MODEL_BATCH}x3x{bu.MODEL_IMAGE}x{bu.MODEL_IMAGE}",
                          lambda p, memory_format: _timm_step(name, p, memory_format), bu.MODEL_BATCH)


# (network, batch, image size): classification at 224 px, one image and a batch; the dense
# networks on one 512 px image, as CenterNet and segmentation models run.
INFERENCE = [("dla34", 1, 224), ("dla34", 8, 224), ("centernet_dla34", 1, 512), ("dla34up", 1, 512)]


def _inference(name, provider, memory_format, batch, image):
    model = _model(name, provider, memory_format).eval()
    images = torch.randn(batch, 3, image, image, device=bu.DEVICE).contiguous(memory_format=memory_format)

    def run():
        with torch.inference_mode(), torch.autocast(bu.DEVICE.type, dtype=bu.DTYPE, enabled=bu.GPU):
            model(images)
    return run


@pytest.mark.parametrize("name, batch, image", INFERENCE, ids=[f"{n}-{b}x{i}" for n, b, i in INFERENCE])
def test_inference(benchmark, name, batch, image):
    providers = ["eager"] + [f"fused:{b}" for b in bu.fused_backends() if not bu.lean(b)]
    fns = {(layout, p): _inference(name, p, memory_format, batch, image)
           for layout, memory_format in bu.LAYOUTS.items() for p in providers}
    benchmark.group = f"inference {name} {batch}x{image}"
    times = bu.interleaved(benchmark, fns, 1)
    case = f"{name} {batch}x3x{image}x{image}"
    for layout, provider in fns:
        bu.record("inference", case, layout, "eval fwd", provider, times[layout, provider], images=batch)
