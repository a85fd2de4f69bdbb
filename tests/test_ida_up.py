"""The fused IDA-Up step against its plain-PyTorch reference, on every CPU backend."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dla_fused.ops.ida_up import IDAUpStep, ida_up, ida_up_reference
from dla_fused.ops.primitives import memory_format_of, upsampled_size
from helpers import CPU_BACKENDS, assert_close, gradcheck, opcheck_utils, saved_tensors, use_backend

ARG_NAMES = ("x", "proj_weight", "bn_weight", "bn_bias", "up_weight", "skip")


def make_inputs(c_in, c_out, factor, proj=True, skip=True, size=(7, 5), batch=2, dtype=torch.float32,
                channels_last=False, device="cpu"):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    channels = c_out if proj else c_in
    h, w = (upsampled_size(s, factor) for s in size) if factor > 1 else size
    t = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    vec = torch.float64 if dtype == torch.float64 else torch.float32  # BatchNorm's parameter dtype
    args = dict(x=t(batch, c_in, *size).to(dtype).contiguous(memory_format=fmt),
                proj_weight=(t(c_out, c_in, 1, 1) / c_in ** 0.5).to(dtype) if proj else None,
                bn_weight=(torch.rand(c_out, dtype=vec) + 0.5) if proj else None,
                bn_bias=torch.randn(c_out, dtype=vec) if proj else None,
                up_weight=(t(channels, 1, 2 * factor, 2 * factor) / factor).to(dtype) if factor > 1 else None,
                skip=t(batch, channels, h, w).to(dtype) if skip else None)
    buffers = dict(running_mean=torch.randn(c_out, dtype=vec) * 0.1 if proj else None,
                   running_var=torch.rand(c_out, dtype=vec) + 0.5 if proj else None,
                   num_batches_tracked=torch.tensor(0))
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return {k: move(v) for k, v in args.items()}, {k: move(v) for k, v in buffers.items()}


def run_both(args, buffers, factor, training):
    results = []
    for fn in (ida_up, ida_up_reference):
        a = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in args.items()}
        bufs = copy.deepcopy(buffers)
        out = fn(a["x"], a["proj_weight"], a["bn_weight"], a["bn_bias"], bufs["running_mean"], bufs["running_var"],
                 bufs["num_batches_tracked"], training, 0.1, 1e-5, a["up_weight"], factor, a["skip"])
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out)
        inputs = [a[k] for k in ARG_NAMES if a[k] is not None]
        results.append((out, dict(zip([k for k in ARG_NAMES if a[k] is not None],
                                      torch.autograd.grad(out, inputs, grad))), bufs))
    return results


def check_against_reference(args, buffers, factor, training):
    (out, grads, bufs), (ref, ref_grads, ref_bufs) = run_both(args, buffers, factor, training)
    assert out.is_contiguous(memory_format=memory_format_of(args["x"])), "output must take x's layout"
    assert_close(out, ref, "output")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], f"grad {name}")
    if bufs["running_mean"] is not None:
        assert_close(bufs["running_mean"], ref_bufs["running_mean"], "running_mean")
        assert_close(bufs["running_var"], ref_bufs["running_var"], "running_var")
    assert bufs["num_batches_tracked"].item() == ref_bufs["num_batches_tracked"].item()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("proj", [True, False], ids=["proj", "identity"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "noskip"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(backend_name, factor, proj, skip, training):
    use_backend(backend_name)
    # f = 8 on 3 x 2 coarse pixels: every border and the interior already (the interpreter pays per tap)
    args, buffers = make_inputs(6, 5, factor, proj, skip, size=(7, 5) if factor < 8 else (3, 2))
    check_against_reference(args, buffers, factor, training)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("proj", [True, False], ids=["proj", "identity"])
def test_channels_last_and_factor_one(backend_name, proj):
    use_backend(backend_name)
    args, buffers = make_inputs(6, 4, 2, proj, True, channels_last=True)
    check_against_reference(args, buffers, 2, True)
    args["skip"] = args["skip"].contiguous(memory_format=torch.channels_last)
    check_against_reference(args, buffers, 2, False)
    args, buffers = make_inputs(6, 4, 1, proj, True)  # no upsampling: projection (+ skip) only
    check_against_reference(args, buffers, 1, True)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("proj", [True, False], ids=["proj", "identity"])
def test_gradcheck_float64(backend_name, training, proj):
    use_backend(backend_name)
    args, buffers = make_inputs(3, 2, 2, proj, True, size=(3, 2), dtype=torch.float64)
    names = [k for k in ARG_NAMES if args[k] is not None]
    inputs = [args[k].double().requires_grad_() for k in names]
    rm = None if buffers["running_mean"] is None else buffers["running_mean"].double()
    rv = None if buffers["running_var"] is None else buffers["running_var"].double()

    def fn(*tensors):
        a = dict(zip(names, tensors))
        return ida_up(a["x"], a.get("proj_weight"), a.get("bn_weight"), a.get("bn_bias"),
                      None if rm is None else rm.clone(), None if rv is None else rv.clone(), None, training,
                      0.1, 1e-5, a["up_weight"], 2, a["skip"])
    assert gradcheck(fn, inputs, backend_name)


@settings(max_examples=25, deadline=None)
@given(c_in=st.integers(1, 9), c_out=st.integers(1, 9), factor=st.sampled_from([1, 2, 3, 4]),
       h=st.integers(1, 6), w=st.integers(1, 6), batch=st.integers(1, 3), proj=st.booleans(), skip=st.booleans(),
       training=st.booleans(), channels_last=st.booleans(), backend_name=st.sampled_from(["cpu", "reference"]),
       seed=st.integers(0, 2**31))
def test_property_random_shapes(c_in, c_out, factor, h, w, batch, proj, skip, training, channels_last,
                                backend_name, seed):
    """Any shape, factor and layout, in float64 (BatchNorm over 2 values cancels too much for float32)."""
    if batch * h * w < 2:
        training = False
    use_backend(backend_name)
    torch.manual_seed(seed)
    args, buffers = make_inputs(c_in, c_out, factor, proj, skip, size=(h, w), batch=batch,
                                channels_last=channels_last, dtype=torch.float64)
    check_against_reference(args, buffers, factor, training)


@settings(max_examples=6, deadline=None)
@given(c_in=st.integers(1, 6), c_out=st.integers(1, 6), factor=st.sampled_from([2, 3, 4]),
       h=st.integers(1, 4), w=st.integers(1, 4), proj=st.booleans(), skip=st.booleans(), seed=st.integers(0, 2**31))
def test_property_random_shapes_triton(c_in, c_out, factor, h, w, proj, skip, seed):
    use_backend("triton")
    torch.manual_seed(seed)
    args, buffers = make_inputs(c_in, c_out, factor, proj, skip, size=(h, w), dtype=torch.float64)
    check_against_reference(args, buffers, factor, 2 * h * w > 1)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_opcheck(backend_name):
    use_backend(backend_name)
    for proj in (True, False):
        args, buffers = make_inputs(4, 3, 2, proj, True, size=(3, 3))
        a = {k: None if v is None else v.requires_grad_() for k, v in args.items()}
        for batch_stats in (True, False):
            torch.library.opcheck(torch.ops.dla_fused.ida_up.default,
                                  (a["x"], a["proj_weight"], a["bn_weight"], a["bn_bias"], buffers["running_mean"],
                                   buffers["running_var"], batch_stats, 1e-5, a["up_weight"], 2, a["skip"]),
                                  test_utils=opcheck_utils(backend_name))


def test_compile_fullgraph_matches_eager():
    use_backend("cpu")
    torch.manual_seed(0)
    eager = IDAUpStep(6, 4, 2, skip=True)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x, skip = torch.randn(2, 6, 5, 3), torch.randn(2, 4, 10, 6)
    for training in (True, False):
        eager.train(training), compiled_module.train(training)
        out, ref = compiled(x, skip), eager(x, skip)
        assert_close(out, ref, "compiled output")
        out.square().sum().backward(), ref.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
        assert_close(q.grad, p.grad, f"compiled grad {name}")


def test_full_resolution_output_is_not_saved():
    """Saved for backward: the input, weights and per-channel vectors; eager saves the coarse
    conv, BN and ReLU outputs as well."""
    use_backend("cpu")
    args, buffers = make_inputs(8, 6, 4, True, True, size=(6, 5))
    a = {k: None if v is None else v.requires_grad_() for k, v in args.items()}
    out, saved = saved_tensors(lambda: ida_up(a["x"], a["proj_weight"], a["bn_weight"], a["bn_bias"],
                                              buffers["running_mean"], buffers["running_var"], None, True, 0.1,
                                              1e-5, a["up_weight"], 4, a["skip"]))
    live = {t.untyped_storage().data_ptr() for t in list(a.values()) + [out]}
    new = [t for t in saved if t.untyped_storage().data_ptr() not in live]
    assert all(t.dim() == 1 and t.numel() == 6 for t in new), [tuple(t.shape) for t in new]
    assert not any(t.shape == out.shape for t in saved)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_identity_step_returns_its_input(backend_name):
    """No projection and no upsampling: x itself (no copy), or one x + skip, as the reference; in
    dla34up 4 of the 14 fused steps are such, and pass their input through untouched."""
    import dla_fused
    use_backend(backend_name)
    x, skip = torch.randn(2, 4, 5, 3, requires_grad=True), torch.randn(2, 4, 5, 3, requires_grad=True)
    assert ida_up(x) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ida_up(x) is x
    out = ida_up(x, skip=skip)
    assert torch.equal(out, x + skip)
    grad = torch.randn_like(out)
    gx, gs = torch.autograd.grad(out, (x, skip), grad)
    assert torch.equal(gx, grad) and torch.equal(gs, grad)
    from dla_fused.fuse import fused_steps
    model = dla_fused.create_model("dla34up").train()
    steps = [step for m in model.modules() for step in fused_steps(m)]
    identities = [s for s in steps if isinstance(s.proj, torch.nn.Identity) and isinstance(s.up, torch.nn.Identity)]
    passed = []
    for step in identities:
        step.register_forward_hook(lambda m, args, out: passed.append(out is args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(steps) == 14 and len(identities) == 4 and passed == [True] * 4


# --------------------------------------------------------------------------------------------- bad input
BAD_INPUTS = {
    "skip shape": (dict(skip=torch.randn(2, 5, 14, 11)), ValueError, "skip must have the upsampled shape"),
    "up_weight not depthwise": (dict(up_weight=torch.randn(5, 5, 4, 4)), ValueError, "depthwise"),
    "up_weight kernel": (dict(up_weight=torch.randn(5, 1, 3, 3)), ValueError, r"\(5, 1, 4, 4\)"),
    "dtype mismatch": (dict(skip=torch.randn(2, 5, 14, 10, dtype=torch.float64)), TypeError, "dtype"),
    "device mismatch": (dict(up_weight=torch.randn(5, 1, 4, 4, device="meta")), ValueError, "device"),
    "factor zero": (dict(factor=0), ValueError, "factor must be an integer >= 1"),
    "factor one with up_weight": (dict(factor=1), ValueError, "factor must be >= 2"),
    "factor without up_weight": (dict(up_weight=None), ValueError, "needs an up_weight"),
    "proj channels": (dict(proj_weight=torch.randn(5, 7, 1, 1)), ValueError, "proj_weight must have shape"),
    "3-D input": (dict(x=torch.randn(6, 7, 5)), ValueError, "4-D"),
    "integer input": (dict(x=torch.ones(2, 6, 7, 5, dtype=torch.int32)), TypeError, "floating"),
    "one value per channel": (dict(x=torch.randn(1, 6, 1, 1), skip=None), ValueError, "more than 1 value"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_any_change(case):
    use_backend("cpu")
    args, buffers = make_inputs(6, 5, 2, True, True)
    changes, error, message = BAD_INPUTS[case]
    args.update(changes)
    factor = changes.get("factor", 2)
    args.pop("factor", None)
    before = {k: v.clone() for k, v in buffers.items()}
    with pytest.raises(error, match=message):
        ida_up(args["x"], args["proj_weight"], args["bn_weight"], args["bn_bias"], buffers["running_mean"],
               buffers["running_var"], buffers["num_batches_tracked"], True, 0.1, 1e-5, args["up_weight"],
               factor, args["skip"])
    for k, v in before.items():
        assert torch.equal(buffers[k], v), f"{k} changed although the call failed"


def test_module_round_trip_and_names():
    step = IDAUpStep(6, 4, 2)
    assert sorted(step.state_dict()) == ["proj.0.weight", "proj.1.bias", "proj.1.num_batches_tracked",
                                         "proj.1.running_mean", "proj.1.running_var", "proj.1.weight", "up.weight"]
    assert step.up.weight.requires_grad
    proj, up = step.to_modules()
    again = IDAUpStep.from_modules(proj, up)
    assert again.up.weight is step.up.weight
    with pytest.raises(ValueError, match="depthwise ConvTranspose2d"):
        IDAUpStep.from_modules(proj, torch.nn.ConvTranspose2d(4, 4, 3, stride=2, groups=4, bias=False))
    with pytest.raises(ValueError, match="built with skip=False"):
        step(torch.randn(2, 6, 3, 3), torch.randn(2, 4, 6, 6))
    with pytest.raises(ValueError, match="built with skip=True"):
        IDAUpStep(6, 4, 2, skip=True)(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="factor must be an integer"):
        IDAUpStep(6, 4, 0)
