"""The fused aggregation node against its plain-PyTorch reference, on every CPU backend."""
import copy
import functools
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dla_fused import backend
from dla_fused.ops.aggregation import AggregationNode, aggregation_node, aggregation_node_reference
from dla_fused.ops.primitives import memory_format_of
from helpers import (CPU_BACKENDS, assert_close, dla_root_shapes, gradcheck, opcheck_utils, saved_tensors,
                     use_backend)


# (training, memory_efficient): without batch statistics there is no conv output to keep or to
# recompute (aggregation_node keeps z only in training), so evaluation takes one of them only.
TRAINING_MODES = [pytest.param(True, True, id="train-lean"), pytest.param(True, False, id="train-keep"),
                  pytest.param(False, None, id="eval")]


def make_inputs(channels, out, dtype=torch.float32, size=(3, 5), batch=2, layout=None, seed=None, device="cpu"):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    children = []
    for i, c in enumerate(channels):
        x = torch.randn(batch, c, *size, generator=g, dtype=torch.float64)
        fmt = layout[i % len(layout)] if layout else torch.contiguous_format
        children.append(x.to(device, dtype).contiguous(memory_format=fmt).requires_grad_())
    weight = (torch.randn(out, sum(channels), 1, 1, generator=g, dtype=torch.float64) / sum(channels) ** 0.5)
    vec = torch.float64 if dtype == torch.float64 else torch.float32  # BatchNorm's parameter dtype
    params = dict(weight=weight.to(device, dtype).requires_grad_(),
                  bn_weight=(torch.rand(out, generator=g) + 0.5).to(device, vec).requires_grad_(),
                  bn_bias=torch.randn(out, generator=g).to(device, vec).requires_grad_())
    buffers = dict(running_mean=(torch.randn(out, generator=g) * 0.1).to(device, vec),
                   running_var=(torch.rand(out, generator=g) + 0.5).to(device, vec),
                   num_batches_tracked=torch.tensor(3, device=device))
    return children, params, buffers


def run_both(children, params, buffers, training, residual, momentum=0.1, memory_efficient=None,
             activation="relu", negative_slope=0.01):
    """Fused and reference forward + backward from identical inputs; returns both results."""
    results = []
    fused = functools.partial(aggregation_node, memory_efficient=memory_efficient, activation=activation,
                              negative_slope=negative_slope)
    reference = functools.partial(aggregation_node_reference, activation=activation, negative_slope=negative_slope)
    for fn in (fused, reference):
        kids = [c.detach().clone().requires_grad_() for c in children]
        ps = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        bufs = copy.deepcopy(buffers)
        out = fn(kids, ps["weight"], ps["bn_weight"], ps["bn_bias"], bufs["running_mean"], bufs["running_var"],
                 bufs["num_batches_tracked"], training=training, momentum=momentum, eps=1e-5, residual=residual)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
        grads = torch.autograd.grad(out, kids + list(ps.values()), grad)
        results.append((out, grads, bufs))
    return results


def check_against_reference(children, params, buffers, training, residual, momentum=0.1, memory_efficient=None,
                            activation="relu", negative_slope=0.01):
    (out, grads, bufs), (ref, ref_grads, ref_bufs) = run_both(children, params, buffers, training, residual, momentum,
                                                              memory_efficient, activation, negative_slope)
    assert out.is_contiguous(memory_format=memory_format_of(children[0])), "output must take children[0]'s layout"
    assert_close(out, ref, "output")
    names = [f"grad children[{i}]" for i in range(len(children))] + ["grad weight", "grad gamma", "grad beta"]
    for name, g, r in zip(names, grads, ref_grads):
        assert_close(g, r, name)
    for key in ("running_mean", "running_var"):
        assert_close(bufs[key], ref_bufs[key], key)
    assert bufs["num_batches_tracked"].item() == ref_bufs["num_batches_tracked"].item()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_dla_root_shape(backend_name, training):
    """All distinct roots of the ten DLA variants (spatially shrunk), training and eval."""
    use_backend(backend_name)
    for channels, out, residual in dla_root_shapes():
        children, params, buffers = make_inputs(channels, out, size=(3, 2))
        check_against_reference(children, params, buffers, training, residual)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("n_children", [1, 2, 7, 10])  # 10: more than any DLA node has
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training, memory_efficient", TRAINING_MODES)
def test_children_residual_training(backend_name, n_children, residual, training, memory_efficient):
    use_backend(backend_name)
    channels = [9, 5, 3, 6, 4, 7, 2, 3, 5, 2][:n_children]
    children, params, buffers = make_inputs(channels, 9, size=(5, 7))
    check_against_reference(children, params, buffers, training, residual, memory_efficient=memory_efficient)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("layouts", [(torch.channels_last,), (torch.channels_last, torch.contiguous_format)],
                         ids=["channels_last", "mixed"])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_layouts(backend_name, layouts, memory_efficient):
    use_backend(backend_name)
    children, params, buffers = make_inputs([6, 4, 5], 6, size=(5, 3), layout=layouts)
    check_against_reference(children, params, buffers, True, True, memory_efficient=memory_efficient)
    # a non-contiguous child (a strided slice)
    wide = torch.randn(2, 12, 5, 3).requires_grad_()
    children[1] = wide[:, ::3]
    check_against_reference(children, params, buffers, True, False, memory_efficient=memory_efficient)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_momentum_none_and_repeated_calls(backend_name):
    """Cumulative-average running statistics, updated exactly once per forward."""
    use_backend(backend_name)
    children, params, buffers = make_inputs([4, 4], 4)
    for _ in range(3):
        check_against_reference(children, params, buffers, True, False, momentum=None)
        buffers["num_batches_tracked"] += 1


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_statistics_with_large_mean(backend_name):
    """A channel with mean 100 and std 1 still gets the right variance (no E[z^2] - E[z]^2)."""
    use_backend(backend_name)
    x = (torch.randn(4, 3, 8, 8) + 100.0)
    weight = torch.eye(3).view(3, 3, 1, 1)
    mean, var = torch.zeros(3), torch.ones(3)
    aggregation_node([x], weight, torch.ones(3), torch.zeros(3), mean, var, None, True, 1.0, 1e-5)
    x64 = x.double()
    assert_close(mean, x64.mean((0, 2, 3)).float(), "mean", rel=1e-5)
    assert_close(var, x64.var((0, 2, 3)).float(), "variance", rel=1e-3)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("training, memory_efficient", TRAINING_MODES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["relu"])
def test_gradcheck_float64(backend_name, training, residual, memory_efficient, activation):
    use_backend(backend_name)
    children, params, buffers = make_inputs([3, 2, 3], 3, dtype=torch.float64, size=(3, 2))
    bn = {k: v.detach().double().requires_grad_() for k, v in params.items() if k != "weight"}
    rm, rv = buffers["running_mean"].double(), buffers["running_var"].double()

    def fn(a, b, c, w, gamma, beta):
        return aggregation_node([a, b, c], w, gamma, beta, rm.clone(), rv.clone(), None, training, 0.1, 1e-5,
                                residual, memory_efficient=memory_efficient, activation=activation,
                                negative_slope=0.2)
    assert gradcheck(fn, (*children, params["weight"], bn["bn_weight"], bn["bn_bias"]), backend_name)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["leaky_relu", "silu", "none"])
def test_gradcheck_float64_activations(backend_name, residual, activation):
    """The other activations in training mode, z recomputed (the ReLU test above covers the
    modes: they do not depend on the activation)."""
    test_gradcheck_float64(backend_name, True, residual, True, activation)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("activation, negative_slope", [("leaky_relu", 0.01), ("leaky_relu", 0.3),
                                                        ("leaky_relu", 0.0), ("silu", 0.01), ("none", 0.01)])
@pytest.mark.parametrize("n_children", [1, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training, memory_efficient", TRAINING_MODES)
def test_activations(backend_name, activation, negative_slope, n_children, residual, training, memory_efficient):
    """Every activation against the reference: output, every gradient, running statistics."""
    use_backend(backend_name)
    channels = [6, 3, 5][:n_children]
    out_channels = 6 if residual else 4
    children, params, buffers = make_inputs(channels, out_channels, dtype=torch.float64, size=(5, 3), seed=11)
    check_against_reference(children, params, buffers, training, residual, memory_efficient=memory_efficient,
                            activation=activation, negative_slope=negative_slope)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["leaky_relu", "silu", "none"])
def test_activation_module_and_layouts(backend_name, activation):
    """AggregationNode(activation=...) on mixed layouts, fused (kernel 1) and unfused (kernel 3),
    against the reference composition of its own conv and bn."""
    use_backend(backend_name)
    for kernel_size in (1, 3):
        torch.manual_seed(3)
        node = AggregationNode([5, 4], 5, kernel_size, residual=True, activation=activation,
                               negative_slope=0.1).double()
        assert activation in repr(node)
        ref = copy.deepcopy(node)
        layout = (torch.channels_last, torch.contiguous_format)
        children, _, _ = make_inputs([5, 4], 5, dtype=torch.float64, size=(6, 7), layout=layout, seed=5)
        out = node(*children)
        y = ref.bn(ref.conv(torch.cat(children, 1))) + children[0]
        expected = {"leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.1),
                    "silu": torch.nn.functional.silu, "none": lambda t: t}[activation](y)
        assert_close(out, expected, f"{activation}, kernel {kernel_size}")
        assert_close(node.bn.running_var, ref.bn.running_var, "running_var")


def test_activation_arguments_are_checked_before_any_change():
    children, params, buffers = make_inputs([3, 2], 3)
    before = buffers["running_mean"].clone()
    for kwargs, text in [({"activation": "gelu"}, "activation must be one of"),
                         ({"activation": "leaky_relu", "negative_slope": -0.1}, "negative_slope must be"),
                         ({"activation": "leaky_relu", "negative_slope": float("nan")}, "negative_slope must be")]:
        with pytest.raises(ValueError, match=text):
            aggregation_node(children, *params.values(), buffers["running_mean"], buffers["running_var"],
                             buffers["num_batches_tracked"], True, **kwargs)
    assert torch.equal(buffers["running_mean"], before) and buffers["num_batches_tracked"].item() == 3
    with pytest.raises(ValueError, match="activation must be one of"):
        AggregationNode(5, 3, activation="tanh")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_backward_twice_through_a_retained_graph(backend_name, memory_efficient):
    """The kept conv output is read, never overwritten, by backward: a second backward through a
    retained graph gives the same gradients."""
    use_backend(backend_name)
    children, params, buffers = make_inputs([5, 4], 5, size=(4, 3))
    inputs = children + list(params.values())
    out = aggregation_node(children, *params.values(), buffers["running_mean"], buffers["running_var"], None,
                           True, 0.1, 1e-5, True, memory_efficient=memory_efficient)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    second = torch.autograd.grad(out, inputs, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(channels=st.lists(st.integers(1, 12), min_size=1, max_size=8), out=st.integers(1, 12),
       h=st.integers(1, 6), w=st.integers(1, 6), batch=st.integers(1, 3), residual=st.booleans(),
       training=st.booleans(), channels_last=st.booleans(), backend_name=st.sampled_from(["cpu", "reference"]),
       seed=st.integers(0, 2**31))
def test_property_random_shapes(channels, out, h, w, batch, residual, training, channels_last, backend_name, seed):
    """Any shape and layout, in float64 (BatchNorm over 2 values cancels too much for float32)."""
    if batch * h * w < 2:
        training = False
    if residual:
        channels[0] = out
    use_backend(backend_name)
    fmt = (torch.channels_last,) if channels_last else None
    children, params, buffers = make_inputs(channels, out, torch.float64, size=(h, w), batch=batch, layout=fmt,
                                            seed=seed)
    check_against_reference(children, params, buffers, training, residual)


@settings(max_examples=6, deadline=None)
@given(channels=st.lists(st.integers(1, 9), min_size=1, max_size=4), out=st.integers(1, 9),
       h=st.integers(1, 5), w=st.integers(1, 5), residual=st.booleans(), seed=st.integers(0, 2**31))
def test_property_random_shapes_triton(channels, out, h, w, residual, seed):
    if residual:
        channels[0] = out
    use_backend("triton")
    children, params, buffers = make_inputs(channels, out, torch.float64, size=(h, w), seed=seed)
    check_against_reference(children, params, buffers, True, residual)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_opcheck(backend_name):
    use_backend(backend_name)
    children, params, buffers = make_inputs([4, 3], 4, size=(2, 3))  # what opcheck checks does not grow with size
    for batch_stats in (True, False):
        for keep_z in (True, False):
            for act, slope in ((1, 0.0), (2, 0.2), (3, 0.0), (0, 0.0)):
                torch.library.opcheck(torch.ops.dla_fused.aggregation_node.default,
                                      (children, params["weight"], params["bn_weight"], params["bn_bias"],
                                       buffers["running_mean"], buffers["running_var"], batch_stats, 1e-5, True,
                                       keep_z, act, slope), test_utils=opcheck_utils(backend_name))


def test_compile_fullgraph_as_first_call_of_a_process():
    """A process whose very first fused call is compiled with fullgraph=True (nothing loaded the
    extension before torch.compile traces the backend choice). What failed there was Dynamo's
    trace, so AOTAutograd's eager backend serves (Inductor takes half a minute more to start)."""
    code = ("import torch, dla_fused\n"
            "dla_fused.set_backend('cpu')\n"
            "node = dla_fused.nn.AggregationNode(6, 4, residual=False)\n"
            "out = torch.compile(node, fullgraph=True, backend='aot_eager')(torch.randn(2, 3, 4, 4), "
            "torch.randn(2, 3, 4, 4))\n"
            "out.sum().backward()\n"
            "print(tuple(out.shape))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("(2, 4, 4, 4)")


@pytest.mark.parametrize("activations", [("relu", "relu"), ("leaky_relu", "silu"), ("none", "relu")])
def test_compile_fullgraph_matches_eager(activations):
    """torch.compile(fullgraph=True) over a module of fused roots: no graph breaks, same numbers."""
    use_backend("cpu")

    class TwoRoots(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = AggregationNode(12, 6, residual=True, activation=activations[0], negative_slope=0.2)
            self.b = AggregationNode(12, 5, activation=activations[1])

        def forward(self, x, y):
            h = self.a(x, y)
            return self.b(h, x)

    torch.manual_seed(0)
    eager = TwoRoots()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x, y = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    for training in (True, False):
        eager.train(training), compiled_module.train(training)
        out, ref = compiled(x, y), eager(x, y)
        assert_close(out, ref, "compiled output")
        out.sum().backward(), ref.sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
        assert_close(q.grad, p.grad, f"compiled grad {name}")
    assert_close(compiled_module.a.bn.running_var, eager.a.bn.running_var, "compiled running_var")
    assert compiled_module.a.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_saves_only_live_tensors_and_vectors(residual, memory_efficient):
    """memory_efficient: backward recomputes the conv output, and the op saves its inputs, its
    output and per-channel vectors only; otherwise it keeps the conv output z too. Either way far
    fewer new bytes than eager (which keeps the concatenation, z and the BatchNorm output)."""
    use_backend("cpu")
    children, params, buffers = make_inputs([8, 8, 4], 8, size=(6, 6))
    fused_out, saved = saved_tensors(lambda: aggregation_node(
        children, params["weight"], params["bn_weight"], params["bn_bias"], buffers["running_mean"].clone(),
        buffers["running_var"].clone(), None, True, 0.1, 1e-5, residual, memory_efficient=memory_efficient))
    live = {t.untyped_storage().data_ptr() for t in children + list(params.values()) + [fused_out]}
    new = [t for t in saved if t.untyped_storage().data_ptr() not in live]
    vectors = [t for t in new if t.dim() == 1 and t.numel() == 8]
    kept = [tuple(t.shape) for t in new if t.dim() != 1]
    assert len(vectors) + len(kept) == len(new), [tuple(t.shape) for t in new]
    assert kept == ([] if memory_efficient else [tuple(fused_out.shape)])
    ref_out, ref_saved = saved_tensors(lambda: aggregation_node_reference(
        children, params["weight"], params["bn_weight"], params["bn_bias"], buffers["running_mean"].clone(),
        buffers["running_var"].clone(), None, True, 0.1, 1e-5, residual))
    ref_live = {t.untyped_storage().data_ptr() for t in children + list(params.values()) + [ref_out]}
    ref_new = sum(t.numel() * t.element_size() for t in {t.untyped_storage().data_ptr(): t for t in ref_saved
                                                         if t.untyped_storage().data_ptr() not in ref_live}.values())
    fused_new = sum(t.numel() * t.element_size() for t in new)
    assert fused_new * (20 if memory_efficient else 2) < ref_new, (fused_new, ref_new)


# --------------------------------------------------------------------------------------------- bad input
def _good():
    children, params, buffers = make_inputs([4, 3], 4, size=(3, 3))
    return dict(children=children, weight=params["weight"], bn_weight=params["bn_weight"],
                bn_bias=params["bn_bias"], running_mean=buffers["running_mean"],
                running_var=buffers["running_var"], num_batches_tracked=buffers["num_batches_tracked"],
                training=True, residual=False)


BAD_INPUTS = {
    "batch mismatch": (lambda a: a["children"].__setitem__(1, torch.randn(3, 3, 3, 3)), ValueError, "batch size"),
    "spatial mismatch": (lambda a: a["children"].__setitem__(1, torch.randn(2, 3, 3, 4)), ValueError, "spatial"),
    "dtype mismatch": (lambda a: a["children"].__setitem__(1, torch.randn(2, 3, 3, 3, dtype=torch.float64)),
                       TypeError, "dtype"),
    "device mismatch": (lambda a: a["children"].__setitem__(1, torch.randn(2, 3, 3, 3, device="meta")),
                        ValueError, "device"),
    "channel sum": (lambda a: a.__setitem__("weight", torch.randn(4, 8, 1, 1)), ValueError, r"\(C_out, 7, 1, 1\)"),
    "kernel size": (lambda a: a.__setitem__("weight", torch.randn(4, 7, 3, 3)), ValueError, "weight must have shape"),
    "residual channels": (lambda a: (a.__setitem__("residual", True),
                                     a.__setitem__("weight", torch.randn(5, 7, 1, 1)),
                                     a.__setitem__("bn_weight", torch.ones(5)), a.__setitem__("bn_bias", torch.ones(5)),
                                     a.__setitem__("running_mean", torch.zeros(5)),
                                     a.__setitem__("running_var", torch.ones(5))), ValueError, "residual"),
    "one value per channel": (lambda a: (a["children"].__setitem__(0, torch.randn(1, 4, 1, 1)),
                                         a["children"].__setitem__(1, torch.randn(1, 3, 1, 1))),
                              ValueError, "more than 1 value"),
    "integer dtype": (lambda a: a["children"].__setitem__(0, torch.ones(2, 4, 3, 3, dtype=torch.int64)),
                      TypeError, "floating"),
    "3-D child": (lambda a: a["children"].__setitem__(0, torch.randn(4, 3, 3)), ValueError, "4-D"),
    "bn_weight length": (lambda a: a.__setitem__("bn_weight", torch.ones(5)), ValueError, "bn_weight must have 4"),
    "children not a list": (lambda a: a.__setitem__("children", torch.randn(2, 7, 3, 3)), TypeError, "list"),
    "memory_efficient not a bool": (lambda a: a.__setitem__("memory_efficient", "yes"), TypeError,
                                    "memory_efficient must be True, False or None"),
    "momentum None without num_batches_tracked": (lambda a: (a.__setitem__("momentum", None),
                                                            a.__setitem__("num_batches_tracked", None)),
                                                  ValueError, "needs num_batches_tracked"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_any_change(case):
    use_backend("cpu")
    args = _good()
    mutate, error, message = BAD_INPUTS[case]
    mutate(args)
    before = {k: args[k].clone() for k in ("running_mean", "running_var", "num_batches_tracked")
              if args.get(k) is not None}
    with pytest.raises(error, match=message):
        aggregation_node(**args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} changed although the call failed"


def test_backend_that_cannot_serve_the_device():
    args = _good()
    before = args["running_mean"].clone()
    backend.set_backend("cuda")
    with pytest.raises(backend.BackendError, match="cuda backend runs on CUDA tensors"):
        aggregation_node(**args)
    assert torch.equal(args["running_mean"], before)
    with pytest.raises(backend.BackendError, match="backend must be one of"):
        backend.set_backend("tpu")


def test_module_state_dict_matches_reference_root():
    from dla_fused.models.dla import Root
    from dla_fused.nn import FusedRoot
    ref = Root(12, 6, 1, True)
    fused = FusedRoot(12, 6, 1, True)  # Root's own arguments
    assert isinstance(fused, AggregationNode) and fused.residual
    assert list(ref.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())


def test_module_kernel_size_3_runs_reference_path():
    node = AggregationNode(6, 4, kernel_size=3)
    assert not node.fused and "reference path" in repr(node)
    x = torch.randn(2, 3, 5, 5)
    expected = aggregation_node_reference([x, x], node.conv.weight, node.bn.weight, node.bn.bias,
                                          node.bn.running_mean.clone(), node.bn.running_var.clone(), None, True)
    assert_close(node(x, x), expected, "3x3 root")


@pytest.mark.parametrize("backend_name, port", [("cpu", 29511), ("eager", 29512)])
def test_synchronised_statistics_single_process_group(backend_name, port):
    """process_group with one rank gives exactly the unsynchronised result (with `eager`, whose
    plain composition cannot synchronise, on the fused op with the reference primitives)."""
    import torch.distributed as dist
    use_backend(backend_name)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        children, params, buffers = make_inputs([4, 4], 4)
        outs = []
        for group in (None, dist.group.WORLD):
            kids = [c.detach().clone().requires_grad_() for c in children]
            ps = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
            bufs = copy.deepcopy(buffers)
            out = aggregation_node(kids, ps["weight"], ps["bn_weight"], ps["bn_bias"], bufs["running_mean"],
                                   bufs["running_var"], None, True, 0.1, 1e-5, True, process_group=group)
            fused_node = "AggregationNodeFunction" in out.grad_fn.name()
            assert fused_node == (group is not None or backend_name != "eager"), out.grad_fn.name()
            out.square().sum().backward()
            outs.append((out, [k.grad for k in kids] + [p.grad for p in ps.values()], bufs))
        (a, ga, ba), (b, gb, bb) = outs
        assert_close(b, a, "synced output")
        for x, y in zip(gb, ga):
            assert_close(x, y, "synced grad")
        assert_close(bb["running_var"], ba["running_var"], "synced running_var")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_statistics_stay_float32_under_autocast(backend_name):
    """The kernels choose their own precision: under autocast the batch statistics the op returns
    are float32, whatever the backend (the plain-PyTorch primitives included)."""
    use_backend(backend_name)
    children, params, buffers = make_inputs([4, 4], 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, mean, var, z = torch.ops.dla_fused.aggregation_node(
            [c.bfloat16() for c in children], params["weight"].bfloat16(), params["bn_weight"], params["bn_bias"],
            None, None, True, 1e-5, False, True)
    assert out.dtype == z.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    x64 = torch.nn.functional.conv2d(torch.cat([c.bfloat16().double() for c in children], 1),
                                     params["weight"].bfloat16().double())
    assert_close(var, x64.var((0, 2, 3), unbiased=False).float(), "variance under autocast", rel=2e-2)
