"""Checks of the C++ kernel primitives (torch.ops.dla_fused, csrc/) against their specification,
dla_fused/ops/primitives.py, used by test_kernels.py on the CPU and on CUDA.

Each check builds fresh random inputs on the device, runs the C++ primitive and the same-named
plain-PyTorch primitive on float64 copies of the same inputs (on CPU), and compares them relative
to the largest reference magnitude with the tolerance REL of the activation dtype. Results must also
have the dtype and the memory format the conventions of primitives.py give them. Run the checks
under `poisoned_allocations()`: new memory is NaN, so an element a kernel forgets to write fails.
"""
import contextlib
import math
import warnings

import torch

import dla_fused._C  # noqa: F401  (loads the op library torch.ops.dla_fused)
from dla_fused.ops import primitives as P
from helpers import assert_close

OPS = torch.ops.dla_fused
REL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Layouts of test activations besides "nchw" and "cl": "crop" is a spatial crop (dense in neither
# format) and "narrow" a channel slice of a wider channels_last tensor, both converted by the
# kernels; "unaligned" and "unaligned_cl" are dense with a data pointer one element past a 16-byte
# boundary, which rules out the CUDA kernels' 16-byte vectors.
N, H, W = 2, 5, 7


@contextlib.contextmanager
def poisoned_allocations():
    """Deterministic mode: torch.empty (and ATen's at::empty) fill new memory with NaN."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


class Inputs:
    """Random inputs of one check, from its own seeded generator."""

    def __init__(self, device, dtype, seed):
        self.device, self.dtype = torch.device(device), dtype
        self.gen = torch.Generator().manual_seed(seed)

    def ints(self, count, low, high):
        return torch.randint(low, high + 1, (count,), generator=self.gen).tolist()

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def act(self, n, c, h, w, layout="nchw", mean=0.0, std=1.0):
        if layout == "crop":
            return self.act(n, c, h + 1, w + 2, "nchw", mean, std)[:, :, 1:, 1:-1]
        if layout == "narrow":
            return self.act(n, c + 3, h, w, "cl", mean, std)[:, 2:2 + c]
        if layout.startswith("unaligned"):
            cl = layout == "unaligned_cl"
            x = self.act(n, c, h, w, "cl" if cl else "nchw", mean, std)
            buf = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)[1:]
            return (buf.view(n, h, w, c).permute(0, 3, 1, 2) if cl else buf.view(n, c, h, w)).copy_(x)
        x = (self._randn(n, c, h, w) * std + mean).to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x

    def vec(self, c, positive=False):
        v = self._randn(c)
        return (v.abs() + 0.5 if positive else v).to(self.device, P.acc_dtype(self.dtype))

    def mat(self, *shape):
        return (self._randn(*shape) / math.sqrt(shape[-1])).to(self.device, self.dtype)


def to64(obj):
    """float64 CPU copies (same strides) of every floating tensor in obj."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().double() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(to64(o) for o in obj)
    return obj


def flat(obj):
    """The tensors of a (nested) result, in order; None for in-place primitives."""
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in flat(o)]
    return [obj] if isinstance(obj, torch.Tensor) else []


def check(actual, expected, like, what, dtype=None, rel_of=None):
    """actual ~ expected within REL of rel_of (like's dtype by default), with dtype `dtype` (like's by
    default) and like's memory format."""
    dtype = dtype or like.dtype
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.device == like.device, f"{what}: on {actual.device}, expected {like.device}"
    if actual.dim() == 4:
        assert P.memory_format_of(actual) == P.memory_format_of(like), f"{what}: wrong memory format"
    assert_close(actual.cpu(), expected, what, rel=REL[rel_of or like.dtype])


def child_layouts(layout, count):
    """'mixed': children[0] channels_last, then every other layout in turn."""
    if layout != "mixed":
        return [layout] * count
    return ["cl"] + [("nchw", "crop", "cl", "narrow")[i % 4] for i in range(count - 1)]


# Aggregation node -----------------------------------------------------------------------------------

AGG_MODES = ("train", "eval", "eval_residual", "all")  # agg_conv's (shift, residual, relu, stats)


def check_agg_conv(device, dtype, layout, n_children, mode, seed=0, size=(N, H, W), channels=None):
    inp = Inputs(device, dtype, seed)
    n, h, w = size
    channels = channels or inp.ints(n_children, 3, 40)
    layouts = child_layouts(layout, n_children)
    kids = [inp.act(n, c, h, w, lay) for c, lay in zip(channels, layouts)]
    residual_wanted = mode in ("eval_residual", "all")
    c_out = channels[0] if residual_wanted else inp.ints(1, 3, 40)[0]
    weight = inp.mat(c_out, sum(channels))
    shift = inp.vec(c_out) if mode != "train" else None
    residual = inp.act(n, c_out, h, w, layouts[-1]) if residual_wanted else None
    relu, stats = mode != "train", mode in ("train", "all")
    z, mean, var = OPS.agg_conv(kids, weight, shift, residual, relu, stats)
    ref_z, ref_mean, ref_var = P.agg_conv(*to64((kids, weight, shift, residual)), relu, stats)
    check(z, ref_z, kids[0], "z")
    acc = P.acc_dtype(dtype)
    for name, got, ref in (("mean", mean, ref_mean), ("var", var, ref_var)):
        if stats:
            check(got, ref, z, name, dtype=acc)
        else:
            assert got.numel() == 0 and got.dtype == acc, f"{name} must be an empty {acc} tensor"


def check_agg_stats_numerics(device, dtype, layout, size=(4, 32, 32), seed=0):
    """Channels with mean 100 + 10 c and std 1: the variance must not cancel catastrophically."""
    inp = Inputs(device, dtype, seed)
    c = 6
    x = inp.act(size[0], c, size[1], size[2], layout, std=1.0)
    x = (x.double() + 100 + 10 * torch.arange(c, device=x.device, dtype=torch.float64).view(1, -1, 1, 1)).to(dtype)
    weight = torch.eye(c, device=x.device, dtype=dtype)  # z = x exactly
    _, mean, var = OPS.agg_conv([x], weight, None, None, False, True)
    x64 = x.double().cpu()
    ref_mean, ref_var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    mean_rel, var_rel = (1e-12, 1e-10) if dtype == torch.float64 else (1e-6, 1e-3)
    assert ((mean.cpu().double() - ref_mean).abs() / ref_mean).max() < mean_rel, (mean, ref_mean)
    assert ((var.cpu().double() - ref_var).abs() / ref_var).max() < var_rel, (var, ref_var)


def _out_of_place(fn, z, ref, name):
    """fn() returns a new tensor: z untouched (bit for bit), the result in z's layout, equal to ref."""
    before = z.clone()
    result = fn()
    assert result.data_ptr() != z.data_ptr(), f"{name} must not write into z"
    assert torch.equal(z, before) or (z.isnan() == before.isnan()).all(), f"{name} changed z"
    assert result.shape == z.shape and result.dtype == z.dtype and result.device == z.device
    dense = z.contiguous(memory_format=P.memory_format_of(z))
    assert result.stride() == dense.stride(), f"{name}: result strides {result.stride()}, expected z's layout"
    check(result, ref, z, name)


def check_agg_apply(device, dtype, layout, residual_layout, seed=0, size=(N, H, W), c=None, in_place=True):
    inp = Inputs(device, dtype, seed)
    n, h, w = size
    c = c or inp.ints(1, 3, 40)[0]
    z = inp.act(n, c, h, w, layout)
    scale, shift = inp.vec(c, positive=True), inp.vec(c)
    residual = inp.act(n, c, h, w, residual_layout) if residual_layout else None
    ref = to64(z).clone()  # to64 of a float64 CPU tensor is that tensor; the primitive writes in place
    P.agg_apply_(ref, *to64((scale, shift, residual)))
    if not in_place:
        return _out_of_place(lambda: OPS.agg_apply(z, scale, shift, residual), z, ref, "agg_apply")
    before = (z.data_ptr(), z.stride())
    OPS.agg_apply_(z, scale, shift, residual)
    assert (z.data_ptr(), z.stride()) == before, "agg_apply_ must work in place"
    check(z, ref, z, "z")


def check_agg_backward_reduce(device, dtype, layout, with_out, seed=0, size=(N, H, W), c=None):
    inp = Inputs(device, dtype, seed)
    n, h, w = size
    c = c or inp.ints(1, 3, 40)[0]
    grad_out = inp.act(n, c, h, w, layout)
    out = inp.act(n, c, h, w, layout) if with_out else None
    z = inp.act(n, c, h, w, "nchw" if layout.endswith("cl") else "cl")  # converted to grad_out's layout
    mean = inp.vec(c)
    sums = OPS.agg_backward_reduce(grad_out, out, z, mean)
    refs = P.agg_backward_reduce(*to64((grad_out, out, z, mean)))
    for name, got, ref in zip(("sum g", "sum g (z - mean)"), sums, refs):
        check(got, ref, mean, name, rel_of=dtype)


def check_agg_backward_dz(device, dtype, layout, with_out, with_z_coef, seed=0, size=(N, H, W), c=None,
                          in_place=True):
    inp = Inputs(device, dtype, seed)
    n, h, w = size
    c = c or inp.ints(1, 3, 40)[0]
    z = inp.act(n, c, h, w, layout)
    if not with_z_coef:
        z.fill_(float("nan"))  # z is only written: poison it
    grad_out = inp.act(n, c, h, w, layout)
    out = inp.act(n, c, h, w, layout) if with_out else None
    scale = inp.vec(c)
    z_coef, bias, mean = (inp.vec(c), inp.vec(c), inp.vec(c)) if with_z_coef else (None, None, None)
    ref = to64(z).clone()  # to64 of a float64 CPU tensor is that tensor; the primitive writes in place
    P.agg_backward_dz_(ref, *to64((grad_out, out, scale, z_coef, bias, mean)))
    if not in_place:
        return _out_of_place(lambda: OPS.agg_backward_dz(z, grad_out, out, scale, z_coef, bias, mean), z, ref,
                             "agg_backward_dz")
    before = (z.data_ptr(), z.stride())
    OPS.agg_backward_dz_(z, grad_out, out, scale, z_coef, bias, mean)
    assert (z.data_ptr(), z.stride()) == before, "agg_backward_dz_ must work in place"
    check(z, ref, z, "dz")


def check_agg_backward_gemm(device, dtype, layout, n_children, residual, seed=0, size=(N, H, W), channels=None,
                            c_out=None):
    """residual: None, 'masked' (grad_out and out) or 'unmasked' (grad_out only)."""
    inp = Inputs(device, dtype, seed)
    n, h, w = size
    channels = channels or inp.ints(n_children, 3, 40)
    layouts = child_layouts(layout, n_children)
    kids = [inp.act(n, c, h, w, lay) for c, lay in zip(channels, layouts)]
    c_out = channels[0] if residual else (c_out or inp.ints(1, 3, 40)[0])
    dz_layout = "cl" if P.memory_format_of(kids[0]) == torch.channels_last else "nchw"
    dz = inp.act(n, c_out, h, w, dz_layout)
    weight = inp.mat(c_out, sum(channels))
    grad_out = inp.act(n, c_out, h, w, layouts[-1]) if residual else None
    out = inp.act(n, c_out, h, w, dz_layout) if residual == "masked" else None
    grads, grad_weight = OPS.agg_backward_gemm(dz, kids, weight, grad_out, out)
    ref_grads, ref_weight = P.agg_backward_gemm(*to64((dz, kids, weight, grad_out, out)))
    assert len(grads) == len(kids)
    for i, (got, ref, kid) in enumerate(zip(grads, ref_grads, kids)):
        check(got, ref, kid, f"grad children[{i}]")
    assert grad_weight.shape == weight.shape
    check(grad_weight, ref_weight, weight, "grad weight")


# IDA-Up ------------------------------------------------------------------------------------------------

def _ida_inputs(inp, layout, factor, with_scale, with_up, size, c):
    n, h, w = size
    z = inp.act(n, c, h, w, layout)
    scale, shift = (inp.vec(c), inp.vec(c)) if with_scale else (None, None)
    up_weight = None
    if with_up:
        up_weight = (torch.randn(c, 1, 2 * factor, 2 * factor, generator=inp.gen, dtype=torch.float64)
                     .to(inp.device, inp.dtype))
    ho, wo = (P.upsampled_size(h, factor), P.upsampled_size(w, factor)) if with_up else (h, w)
    return z, scale, shift, up_weight, (n, c, ho, wo)


def check_ida_upsample(device, dtype, layout, factor, with_scale, with_skip, with_up=True, seed=0,
                       size=(N, 7, 5), c=None):
    inp = Inputs(device, dtype, seed)
    c = c or inp.ints(1, 3, 12)[0]
    z, scale, shift, up_weight, out_shape = _ida_inputs(inp, layout, factor, with_scale, with_up, size, c)
    skip = inp.act(*out_shape, layout if layout.startswith("unaligned") else "cl") if with_skip else None
    out = OPS.ida_upsample(z, scale, shift, up_weight, factor, skip)
    ref = P.ida_upsample(*to64((z, scale, shift, up_weight)), factor, to64(skip))
    assert tuple(out.shape) == out_shape
    check(out, ref, z, "out")


def check_ida_upsample_backward(device, dtype, layout, factor, with_scale, with_up=True, seed=0,
                                size=(N, 7, 5), c=None):
    inp = Inputs(device, dtype, seed)
    c = c or inp.ints(1, 3, 12)[0]
    z, scale, shift, up_weight, out_shape = _ida_inputs(inp, layout, factor, with_scale, with_up, size, c)
    grad_out = inp.act(*out_shape, layout if layout.startswith("unaligned") else "cl")
    grad_p, grad_up = OPS.ida_upsample_backward(grad_out, z, scale, shift, up_weight, factor)
    ref_p, ref_up = P.ida_upsample_backward(*to64((grad_out, z, scale, shift, up_weight)), factor)
    check(grad_p, ref_p, z, "grad p")
    if with_up:
        assert grad_up.shape == up_weight.shape
        check(grad_up, ref_up, up_weight, "grad up_weight")
    else:
        assert grad_up.numel() == 0 and grad_up.dtype == z.dtype


# Errors ---------------------------------------------------------------------------------------------------

def primitive_calls(device, dtype):
    """Each primitive with small valid arguments in `dtype`: {name: thunk}."""
    inp = Inputs(device, dtype, 0)
    acc = P.acc_dtype(dtype)
    x = inp.act(2, 4, 3, 3)
    vec = torch.ones(4, device=device, dtype=acc)
    weight = torch.ones(4, 4, device=device, dtype=dtype)
    up = torch.ones(4, 1, 4, 4, device=device, dtype=dtype)
    big = inp.act(2, 4, 6, 6)
    return {
        "agg_conv": lambda: OPS.agg_conv([x], weight, None, None, False, True),
        "agg_apply_": lambda: OPS.agg_apply_(x, vec, vec, None),
        "agg_apply": lambda: OPS.agg_apply(x, vec, vec, None),
        "agg_backward_reduce": lambda: OPS.agg_backward_reduce(x, x, x, vec),
        "agg_backward_dz_": lambda: OPS.agg_backward_dz_(x, x, None, vec, None, None, None),
        "agg_backward_dz": lambda: OPS.agg_backward_dz(x, x, None, vec, None, None, None),
        "agg_backward_gemm": lambda: OPS.agg_backward_gemm(x, [x], weight, None, None),
        "ida_upsample": lambda: OPS.ida_upsample(x, vec, vec, up, 2, None),
        "ida_upsample_backward": lambda: OPS.ida_upsample_backward(big, x, vec, vec, up, 2),
    }
