"""Op level: the aggregation node at every distinct dla34 root (plus the widest dla169 root) and
the IDA-Up steps of dla34up and the CenterNet-style net; eager, torch.compile of the eager
reference and each fused backend, each in NCHW and channels_last; forward, backward and both. One
test per case and mode times all of them in interleaved rounds (bench_utils.interleaved)."""
import functools

import pytest
import torch

import bench_summary as bs
import bench_utils as bu
from dla_fused import models
from dla_fused.ops.aggregation import aggregation_node, aggregation_node_reference
from dla_fused.ops.ida_up import ida_up, ida_up_reference
from dla_fused.ops.primitives import memory_format_of
from dla_fused.profiling import saved_bytes

INNER = 10 if bu.GPU else 2
# "eval": the forward in eval mode (running statistics) under torch.inference_mode, as inference
# runs it; the others in training mode.
MODES = ["fwd", "bwd", "fwd+bwd", "eval"]
# Backward alone is timed by replaying one graph (retain_graph=True), which compiled graphs refuse
# when they donate their buffers to the backward.
torch._functorch.config.donated_buffer = False
# One compiled reference per op serves every case, layout and mode: one static graph per case and
# layout (no automatic dynamic shapes), cached between the three modes.
torch._dynamo.config.recompile_limit = 64


def _capture(name, hook_target, image, batch=bu.OP_BATCH, **kwargs):
    """Run model `name` on the meta device and collect what `hook_target(model)` records."""
    with torch.device("meta"):
        model = models.create_model(name, **kwargs).train()
        seen = hook_target(model)
        model(torch.empty(batch, 3, image, image))
    return seen


def _count(seen, key):
    seen[key] = seen.get(key, 0) + 1


def _roots(model):
    """{(child shapes, out channels, residual): calls} of the model's aggregation nodes."""
    seen = {}
    for module in model.modules():
        if isinstance(module, models.Root):
            module.register_forward_pre_hook(lambda m, args: _count(
                seen, (tuple(tuple(a.shape) for a in args), m.conv.out_channels, m.residual)))
    return seen


def _ida_steps(model):
    """{(input shape, projection width or None, factor, skip): calls} of the model's upsampling
    IDA-Up steps (an identity step costs nothing)."""
    seen = {}
    for module in model.modules():
        if hasattr(type(module), "project_up"):
            def wrapped(i, x, skip=None, _m=module, _orig=module.project_up):
                proj, up = getattr(_m, f"proj_{i}"), getattr(_m, f"up_{i}")
                fused_proj = isinstance(proj, torch.nn.Sequential)
                channels = proj[0].out_channels if fused_proj else (
                    x.shape[1] if isinstance(proj, torch.nn.Identity) else proj.actf[0].num_features)
                factor = 1 if isinstance(up, torch.nn.Identity) else up.stride[0]
                if factor > 1:
                    _count(seen, (tuple(x.shape) if fused_proj or isinstance(proj, torch.nn.Identity)
                                  else (x.shape[0], channels, *x.shape[2:]),
                                  channels if fused_proj else None, factor, skip is not None))
                return _orig(i, x, skip)
            module.project_up = wrapped
    return seen


def _agg_label(base, shapes, out):
    return f"{base} {list(s[1] for s in shapes)}->{out} {shapes[0][2]}x{shapes[0][3]}"


def _ida_label(net, shape, proj_out, factor, skip):
    label = f"{net} {shape[1]}" + (f"->{proj_out}" if proj_out else "") + f" x{factor} {shape[2]}x{shape[3]}"
    return label + (" +skip" if skip else "")


@functools.lru_cache(maxsize=None)
def agg_cases():
    cases = {}
    for (shapes, out, residual) in _capture("dla34", _roots, bu.OP_IMAGE):
        cases[_agg_label("dla34", shapes, out)] = (shapes, out, residual)
    dla169 = _capture("dla169", _roots, bu.OP_IMAGE)
    shapes, out, residual = max(dla169, key=lambda k: (len(k[0]), sum(s[1] for s in k[0])))
    cases[_agg_label("dla169", shapes, out)] = (shapes, out, residual)
    return cases


@functools.lru_cache(maxsize=None)
def ida_cases():
    cases = {}
    for net in ("dla34up", "centernet_dla34"):
        for key in _capture(net, _ida_steps, bu.OP_IMAGE):
            cases[_ida_label(net, *key)] = key
    return cases


def fused_parts(name, batch, image, **kwargs):
    """{(op group, op case label): calls} of the parts the fused ops replace in one forward of
    model `name` (a dla34-based network) at batch x 3 x image x image: the op cases measured here
    when batch and image are the op benchmarks' sizes."""
    roots, steps = _capture(name, lambda model: (_roots(model), _ida_steps(model)), image, batch, **kwargs)
    parts = {("aggregation node", _agg_label("dla34", shapes, out)): n for (shapes, out, _), n in roots.items()}
    parts.update({("IDA-Up step", _ida_label(name, *key)): n for key, n in steps.items()})
    return parts


def _providers(with_lean=True):
    """Eager, compiled and the fused backends; the `+lean` ones only where they differ (the
    aggregation node in training)."""
    return ["eager", "compiled"] + [f"fused:{b}" for b in bu.fused_backends() if with_lean or not bu.lean(b)]


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _agg_inputs(case, layout):
    shapes, out, residual = agg_cases()[case]
    g = torch.Generator(device=bu.DEVICE).manual_seed(0)
    t = lambda *s: torch.randn(*s, device=bu.DEVICE, generator=g)  # noqa: E731
    children = [t(*s).to(bu.DTYPE).contiguous(memory_format=layout).requires_grad_() for s in shapes]
    cin = sum(s[1] for s in shapes)
    weight = (t(out, cin, 1, 1) / cin ** 0.5).to(bu.DTYPE).requires_grad_()
    gamma, beta = (t(out).abs() + 0.5).requires_grad_(), t(out).requires_grad_()
    stats = dict(running_mean=torch.zeros(out, device=bu.DEVICE), running_var=torch.ones(out, device=bu.DEVICE))
    inputs = children + [weight, gamma, beta]
    p = shapes[0][0] * shapes[0][2] * shapes[0][3]
    elt = children[0].element_size()
    min_bytes = elt * p * (cin + out) + elt * p * (2 * cin + 2 * out)  # fwd: x, y; bwd: x, dy, y, dx
    return children, weight, gamma, beta, stats, residual, inputs, min_bytes


def _op(provider, reference, fused):
    if provider.startswith("fused:"):
        return fused
    return _compiled(reference) if provider == "compiled" else reference


def _timed(mode, call, inputs):
    """The function timed for `mode` of `call()` (the forward, returning the output)."""
    if mode == "eval":
        def inference():
            with torch.inference_mode():
                return call()
        return inference
    if mode == "fwd":
        return call
    out = call()
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)
    return lambda: torch.autograd.grad(call(), inputs, grad)


# Not an implementation: eager's matrix products alone (its 1x1 convolution forward, and its
# backward for fwd+bwd, on the concatenated input made beforehand; the IDA-Up step's projection),
# timed like the providers. eager time / its time bounds what any fusion that runs the products at
# oneDNN's speed can gain; the summary prints it beside the fused ratios, as the op cases' bound.
GEMMS = bs.GEMMS


def _measure(benchmark, group, case, mode, calls, min_bytes, gemms=None):
    """Time `mode` of every (layout, provider) -> (call, inputs) in interleaved rounds, and in
    fwd+bwd its peak memory and the bytes it saves for backward; record them. `gemms`: {layout:
    function} timed as the GEMMS row."""
    fns = {}
    for key, (call, inputs) in calls.items():
        bu.select_backend(key[1])
        fns[key] = _timed(mode, call, inputs)
    bounds = {(layout, GEMMS): fn for layout, fn in (gemms or {}).items()}
    times = bu.interleaved(benchmark, {**fns, **bounds}, INNER)
    both = mode == "fwd+bwd"
    memory = bu.interleaved_memory(fns) if both else None
    for (layout, provider), (call, inputs) in calls.items():
        saved = None
        if both:
            bu.select_backend(provider)
            saved = saved_bytes(call, exclude=inputs)
        bu.record(group, case, layout, mode, provider, times[layout, provider],
                  memory=memory and memory[layout, provider], saved=saved, min_bytes=min_bytes if both else None)
    for key in bounds:
        bu.record(group, case, key[0], mode, GEMMS, times[key])


def _eager_gemms(mode, x, weight):
    """Eager's 1x1 convolution of x (the node's concatenated children, the step's input) by weight
    alone, for `mode` (fwd+bwd or eval), or None."""
    if mode not in ("fwd+bwd", "eval"):
        return None
    x, w = x.detach(), weight.detach()
    grad = torch.randn((x.shape[0], w.shape[0], x.shape[2], x.shape[3]), device=x.device, dtype=x.dtype)
    grad = grad.contiguous(memory_format=memory_format_of(x))

    def run():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, w)
            if mode == "fwd+bwd":
                torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                    [True, True, False])
    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(agg_cases()))
def test_aggregation_node(benchmark, case, mode):
    calls, gemms = {}, {}
    for layout, memory_format in bu.LAYOUTS.items():
        children, weight = _agg_inputs(case, memory_format)[:2]
        bound = _eager_gemms(mode, torch.cat([c.detach() for c in children], dim=1), weight)
        if bound is not None:
            gemms[layout] = bound
        for provider in _providers(with_lean=mode != "eval"):
            children, weight, gamma, beta, stats, residual, inputs, min_bytes = _agg_inputs(case, memory_format)
            fn = _op(provider, aggregation_node_reference, aggregation_node)
            if bu.lean(provider):
                fn = functools.partial(fn, memory_efficient=True)
            calls[layout, provider] = (functools.partial(
                fn, children, weight, gamma, beta, stats["running_mean"], stats["running_var"], None,
                mode != "eval", 0.1, 1e-5, residual), inputs)
    benchmark.group = f"aggregation {case} {mode}"
    _measure(benchmark, "aggregation node", case, mode, calls, min_bytes, gemms)


def _ida_inputs(case, layout):
    shape, proj_out, factor, skip = ida_cases()[case]
    g = torch.Generator(device=bu.DEVICE).manual_seed(0)
    t = lambda *s: torch.randn(*s, device=bu.DEVICE, generator=g)  # noqa: E731
    x = t(*shape).to(bu.DTYPE).contiguous(memory_format=layout).requires_grad_()
    channels = proj_out or shape[1]
    args = dict(x=x)
    if proj_out:
        args.update(proj_weight=(t(proj_out, shape[1], 1, 1) / shape[1] ** 0.5).to(bu.DTYPE).requires_grad_(),
                    bn_weight=(t(proj_out).abs() + 0.5).requires_grad_(), bn_bias=t(proj_out).requires_grad_(),
                    running_mean=torch.zeros(proj_out, device=bu.DEVICE),
                    running_var=torch.ones(proj_out, device=bu.DEVICE))
    args["up_weight"] = (t(channels, 1, 2 * factor, 2 * factor) / factor).to(bu.DTYPE).requires_grad_()
    big = (shape[0], channels, shape[2] * factor, shape[3] * factor)
    if skip:
        args["skip"] = t(*big).to(bu.DTYPE).contiguous(memory_format=layout).requires_grad_()
    inputs = [v for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    elt = x.element_size()
    coarse, fine = shape[0] * shape[2] * shape[3], big[0] * big[2] * big[3]
    # fwd: x in, out (and skip) ; bwd: x, dout in, dx (and dskip = dout, free) out
    min_bytes = elt * (coarse * shape[1] * 3 + fine * channels * (2 + (1 if skip else 0)))
    return args, factor, inputs, min_bytes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(ida_cases()))
def test_ida_up_step(benchmark, case, mode):
    calls, gemms = {}, {}
    for layout, memory_format in bu.LAYOUTS.items():
        args = _ida_inputs(case, memory_format)[0]
        bound = _eager_gemms(mode, args["x"], args["proj_weight"]) if "proj_weight" in args else None
        if bound is not None:  # (steps without a projection have no product to bound them)
            gemms[layout] = bound
        for provider in _providers(with_lean=False):
            args, factor, inputs, min_bytes = _ida_inputs(case, memory_format)
            fn = _op(provider, ida_up_reference, ida_up)
            calls[layout, provider] = (functools.partial(
                fn, args["x"], args.get("proj_weight"), args.get("bn_weight"), args.get("bn_bias"),
                args.get("running_mean"), args.get("running_var"), None, mode != "eval", 0.1, 1e-5,
                args["up_weight"], factor, args.get("skip")), inputs)
    benchmark.group = f"ida {case} {mode}"
    _measure(benchmark, "IDA-Up step", case, mode, calls, min_bytes, gemms)
