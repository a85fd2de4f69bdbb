"""The Triton kernels (kernels/) against their specification, dla_fused/ops/primitives.py.

CPU tensors run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py when there is no
GPU); CUDA tensors run compiled. Every test runs in deterministic mode, where torch.empty fills new
memory with NaN: an output element a kernel forgets to write fails the comparison.

Tolerances, against the primitive run in float64 on the same inputs and relative to the largest
reference magnitude: float32 1e-5, float64 1e-10 (TF32 is switched off for the reference's own
convolutions and matmuls). float16/bfloat16 (docs/design.md, section 12): the error against the float64
reference is at most 2x the error of the same-dtype PyTorch path, plus 2 ulp of the output dtype at
the largest reference magnitude.
"""
import collections
import os
import sys

import pytest
import torch

from conftest import requires_cuda
from dla_fused.ops import primitives as P

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from dla_fused.kernels import aggregation, ida_up  # noqa: E402

requires_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                          reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")
DEVICES = [pytest.param("cpu", marks=requires_interpreter), pytest.param("cuda", marks=requires_cuda)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
N, H, W = 2, 5, 7
# Children of the aggregation node: channels and layouts. "crop" is a spatial crop (H and W do not
# merge into one stride), "narrow" a channel slice of a wider tensor.
CHILDREN = {"1-nchw": ([24], ["nchw"]),
            "2-cl": ([24, 13], ["cl", "cl"]),
            "7-mixed": ([24, 3, 5, 8, 2, 7, 4], ["nchw", "cl", "crop", "cl", "nchw", "narrow", "cl"])}
MAX_ERRORS = collections.defaultdict(float)  # input dtype -> largest relative error (printed with -s)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _nan_poisoned_allocations_and_no_tf32():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    print("\nlargest relative errors:", {str(k): f"{v:.2e}" for k, v in MAX_ERRORS.items()})


def activation(shape, dtype, device, layout="nchw", mean=0.0):
    n, c, h, w = shape
    if layout == "crop":
        return activation((n, c, h + 1, w + 2), dtype, device, mean=mean)[:, :, 1:, 1:-1]
    if layout == "narrow":
        return activation((n, c + 3, h, w), dtype, device, "cl", mean)[:, 2:2 + c]
    x = (torch.randn(shape, dtype=torch.float64) + mean).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


def vector(c, dtype, device):
    """A per-channel vector in the accumulation dtype of `dtype`."""
    return torch.randn(c, dtype=torch.float64).to(device=device, dtype=P.acc_dtype(dtype))


def to64(obj):
    if isinstance(obj, torch.Tensor):
        return obj.to(torch.float64) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(to64(o) for o in obj)
    return obj


def flat(obj):
    return [t for o in obj for t in flat(o)] if isinstance(obj, (list, tuple)) else [obj]


def run(fn, args, inplace):
    """fn(*args); for an in-place primitive, on a clone of args[0], which is returned."""
    if not inplace:
        return fn(*args)
    args = [args[0].clone()] + list(args[1:])
    fn(*args)
    return args[0]


def check(name, args, inplace=False):
    """The Triton primitive `name` on args against primitives.`name` (see the module docstring)."""
    module = aggregation if hasattr(aggregation, name) else ida_up
    ours = flat(run(getattr(module, name), args, inplace))
    same = flat(run(getattr(P, name), args, inplace))
    ref64 = flat(run(getattr(P, name), to64(args), inplace))
    input_dtype = next(t.dtype for t in flat(args) if isinstance(t, torch.Tensor))
    return compare(name, ours, same, ref64, input_dtype)


def compare(name, ours, same, ref64, input_dtype):
    """Each of `ours` against the float64 reference `ref64`, with the tolerance of its dtype
    (the module docstring); `same`: the PyTorch path in the same dtypes."""
    assert len(ours) == len(same) == len(ref64)
    for o, s, r in zip(ours, same, ref64):
        assert (o.dtype, o.shape, o.device) == (s.dtype, s.shape, s.device)
        if o.numel() == 0:
            continue
        assert P.memory_format_of(o) == P.memory_format_of(s)
        assert torch.isfinite(o).all(), f"{name}: non-finite values (unwritten output?)"
        scale = max(1.0, r.abs().max().item())
        err = (o.double() - r).abs().max().item() / scale
        if s.dtype in TOLERANCE and input_dtype in TOLERANCE:
            assert err <= TOLERANCE[s.dtype], f"{name}: relative error {err:.3e}"
        else:  # (a float32 output of 16-bit inputs carries their rounding: the same rule)
            same_err = (s.double() - r).abs().max().item() / scale
            bound = 2 * same_err + 2 * torch.finfo(s.dtype if s.dtype not in TOLERANCE else input_dtype).eps
            assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e} (PyTorch path {same_err:.3e})"
        MAX_ERRORS[input_dtype] = max(MAX_ERRORS[input_dtype], err)
    return ours


def children_of(case, dtype, device, h=H, w=W):
    channels, layouts = CHILDREN[case]
    return [activation((N, c, h, w), dtype, device, layout) for c, layout in zip(channels, layouts)]


# ------------------------------------------------------------------------------------------------
# Aggregation node

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CHILDREN)
@pytest.mark.parametrize("mode", ["stats", "plain", "eval-residual", "eval"])
def test_agg_conv(device, dtype, case, mode):
    children = children_of(case, dtype, device)
    c_out = 40
    weight = torch.randn(c_out, sum(c.shape[1] for c in children), device=device).to(dtype)
    shift = vector(c_out, dtype, device) if mode.startswith("eval") else None
    residual = activation((N, c_out, H, W), dtype, device, "cl") if mode == "eval-residual" else None
    relu = mode.startswith("eval")
    out, mean, var = check("agg_conv", [children, weight, shift, residual, relu, mode == "stats"])
    if mode == "stats":  # backward recomputes z with stats=False: it must be the very same z
        assert torch.equal(aggregation.agg_conv(children, weight, None, None, False, False)[0], out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_agg_conv_statistics_of_offset_channels(device, dtype):
    """Mean 100, std 1: a one-pass E[z^2] - E[z]^2 loses the variance in float32; per-tile M2
    combined with Chan's formula must not."""
    x = activation((N, 16, 9, 11), dtype, device)
    ones = torch.ones(N, 1, 9, 11, device=device, dtype=dtype)
    weight = torch.cat([torch.randn(8, 16, device=device) / 4, torch.full((8, 1), 100.0, device=device)], 1)
    _, mean, var = aggregation.agg_conv([x, ones], weight.to(dtype), None, None, False, True)
    _, mean64, var64 = P.agg_conv(to64([x, ones]), weight.to(dtype).double(), None, None, False, True)
    assert (mean64 - 100).abs().max() < 2 and (var64 - 1).abs().max() < 0.9
    assert ((var.double() - var64) / var64).abs().max() < 1e-4
    assert ((mean.double() - mean64) / mean64).abs().max() < 1e-6


def test_agg_conv_ten_children(device):
    children = [activation((N, 3, H, W), torch.float32, device, "cl" if i % 2 else "nchw") for i in range(10)]
    weight = torch.randn(20, 30, device=device)
    check("agg_conv", [children, weight, None, None, False, True])


def test_agg_conv_weight_in_accumulation_dtype(device):
    children = children_of("2-cl", torch.float16, device)
    check("agg_conv", [children, torch.randn(40, 37, device=device), None, None, False, True])


def test_wide_channels(device):
    """Channel counts above 64 (the interpreter then uses blocks of 128) through every primitive."""
    children = [activation((N, c, 3, 5), torch.float32, device, layout) for c, layout in ((70, "cl"), (30, "nchw"))]
    weight = torch.randn(70, 100, device=device)
    z = check("agg_conv", [children, weight, None, None, False, True])[0]
    check("agg_apply_", [z, vector(70, z.dtype, device), vector(70, z.dtype, device), children[0]], inplace=True)
    check("agg_backward_reduce", [z, children[0], z, vector(70, z.dtype, device)])
    check("agg_backward_gemm", [z, children, weight, z, children[0]])
    up = torch.rand(70, 1, 4, 4, device=device)
    check("ida_upsample", [children[0], None, None, up, 2, None])
    check("ida_upsample_backward", [activation((N, 70, 6, 10), torch.float32, device), children[0], None, None, up, 2])


def test_bfloat16_results_round_to_nearest(device):
    """Stores round to nearest even (the interpreter itself would truncate float32 -> bfloat16), so
    almost every element equals the reference's, which rounds its float32 result once."""
    children = children_of("2-cl", torch.bfloat16, device)
    weight = torch.randn(40, 37, device=device).to(torch.bfloat16)
    ours = aggregation.agg_conv(children, weight, None, None, False, False)[0]
    same = P.agg_conv(children, weight, None, None, False, False)[0]
    assert (ours != same).double().mean() < 0.02


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("residual", [False, True])
def test_agg_apply_(device, dtype, layout, residual):
    c = 40
    z = activation((N, c, H, W), dtype, device, layout)
    res = activation((N, c, H, W), dtype, device, "nchw" if layout == "cl" else "crop") if residual else None
    check("agg_apply_", [z, vector(c, dtype, device), vector(c, dtype, device), res], inplace=True)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("residual", [False, True])
def test_agg_apply_out_of_place(device, layout, residual):
    c = 40
    z = activation((N, c, H, W), torch.float32, device, layout)
    before = z.clone()
    res = activation((N, c, H, W), torch.float32, device, "crop") if residual else None
    check("agg_apply", [z, vector(c, z.dtype, device), vector(c, z.dtype, device), res])
    assert torch.equal(z, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("with_out", [False, True])
def test_agg_backward_reduce(device, dtype, layout, with_out):
    c = 40
    other = "cl" if layout == "nchw" else "nchw"
    grad_out = activation((N, c, H, W), dtype, device, other)
    out = activation((N, c, H, W), dtype, device, layout) if with_out else None
    z = activation((N, c, H, W), dtype, device, layout, mean=3.0)
    check("agg_backward_reduce", [grad_out, out, z, vector(c, dtype, device) + 3])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("with_coef", [False, True])
def test_agg_backward_dz_(device, dtype, with_out, with_coef):
    c = 40
    z = activation((N, c, H, W), dtype, device, "cl")
    if not with_coef:
        z.fill_(float("nan"))  # z is only written: poison it
    grad_out = activation((N, c, H, W), dtype, device, "nchw")
    out = activation((N, c, H, W), dtype, device, "crop") if with_out else None
    coef, bias, mean = ([vector(c, dtype, device) for _ in range(3)] if with_coef else [None] * 3)
    check("agg_backward_dz_", [z, grad_out, out, vector(c, dtype, device), coef, bias, mean], inplace=True)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_agg_backward_dz_out_of_place(device, layout):
    c = 40
    z = activation((N, c, H, W), torch.float32, device, layout)
    before = z.clone()
    grad_out = activation((N, c, H, W), torch.float32, device, "nchw")
    out = activation((N, c, H, W), torch.float32, device, "crop")
    coef, bias, mean = [vector(c, z.dtype, device) for _ in range(3)]
    check("agg_backward_dz", [z, grad_out, out, vector(c, z.dtype, device), coef, bias, mean])
    assert torch.equal(z, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CHILDREN)
@pytest.mark.parametrize("residual", ["none", "gated"])
def test_agg_backward_gemm(device, dtype, case, residual):
    children = children_of(case, dtype, device)
    c_out = children[0].shape[1]
    dz = activation((N, c_out, H, W), dtype, device, "cl" if case == "1-nchw" else "nchw")
    weight = torch.randn(c_out, sum(c.shape[1] for c in children), device=device).to(dtype)
    grad_out = activation((N, c_out, H, W), dtype, device, "narrow") if residual != "none" else None
    out = activation((N, c_out, H, W), dtype, device) if residual == "gated" else None
    check("agg_backward_gemm", [dz, children, weight, grad_out, out])


def test_agg_backward_gemm_ungated_residual(device):
    children = children_of("2-cl", torch.float32, device)
    dz = activation((N, 24, H, W), torch.float32, device)
    grad_out = activation((N, 24, H, W), torch.float32, device, "cl")
    check("agg_backward_gemm", [dz, children, torch.randn(24, 37, device=device), grad_out, None])


# ------------------------------------------------------------------------------------------------
# The fused training path (agg_forward_train, agg_backward_fused)

def _train_step_primitives(children, weight, gamma, beta, grad_out, residual, eps=1e-5):
    """The training forward and backward composed of the reference primitives (z kept):
    (out, mean, var, grad of each child, grad W, grad gamma, grad beta)."""
    from dla_fused.ops import _bn
    z, mean, var = P.agg_conv(children, weight, None, None, False, True)
    scale, shift = _bn.affine(gamma, beta, mean, var, eps)
    out = P.agg_apply(z, scale, shift, children[0] if residual else None)
    grads, grad_w, grad_g, grad_b = _bn.backward(P, grad_out, out, children, weight, gamma, mean, var, eps, True,
                                                 residual, z=z, z_kept=True)
    return out, mean, var, grads, grad_w, grad_g, grad_b


def _train_step_fused(children, weight, gamma, beta, grad_out, residual, keep_z, eps=1e-5):
    out, mean, var, z = aggregation.agg_forward_train(children, weight, gamma, beta, eps, residual, keep_z)
    assert (z is not None) == keep_z
    grads, grad_w, grad_g, grad_b = aggregation.agg_backward_fused(grad_out, children, weight, gamma, beta, mean,
                                                                   var, eps, residual, z)
    return out, mean, var, grads, grad_w, grad_g, grad_b


def _train_args(case, dtype, device, residual, h=H, w=W):
    children = children_of(case, dtype, device, h, w)
    c_out = children[0].shape[1] if residual else 19
    weight = torch.randn(c_out, sum(c.shape[1] for c in children), device=device).to(dtype)
    gamma, beta = vector(c_out, dtype, device), vector(c_out, dtype, device)
    grad_out = activation((N, c_out, h, w), dtype, device, "cl")
    return children, weight, gamma, beta, grad_out


def _compare_modes(what, runs, same, ref64, dtype, device):
    """runs: {mode: results}, the first mode's z stored. It meets the rule against the reference
    primitives; under the interpreter every other mode is it bit for bit (one tile for every
    product), on a GPU each meets the rule on its own."""
    (first, kept), *others = runs.items()
    compare(what, kept, same, ref64, dtype)
    for mode, results in others:
        if device.type == "cpu":
            for i, (a, b) in enumerate(zip(kept, results)):
                assert torch.equal(a, b), f"{mode}: result {i} differs from the {first} run's"
        else:
            compare(f"{what}, {mode}", results, same, ref64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CHILDREN)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fused_training_path(device, dtype, case, residual, monkeypatch):
    """The forward in three launches and the backward in two against the reference primitives'
    composition, with z kept (the chained pass reading it, or on a GPU also recomputing it) or
    recomputed in both passes; odd sizes, mixed layouts, a residual. Under the interpreter the recomputing runs
    are the kept one bit for bit (one tile for every product: docs/design.md, section 2), so the
    recomputed ReLU mask is the forward's; on a GPU each meets the rule on its own."""
    args = _train_args(case, dtype, device, residual)
    same = flat(_train_step_primitives(*args, residual))
    ref64 = flat(_train_step_primitives(*to64(args), residual))
    # (mode, the chained pass recomputes, z kept). Under the interpreter "chained" would repeat
    # kept's sums pass and both's chained pass, kernel for kernel: only a GPU runs it.
    modes = [("kept", False, True), ("both", True, False)] + ([("chained", True, True)] if device.type == "cuda" else [])
    runs = {}
    for mode, chained, keep_z in modes:
        monkeypatch.setattr(aggregation, "CHAINED_RECOMPUTE", chained)
        runs[mode] = flat(_train_step_fused(*args, residual, keep_z=keep_z))
    _compare_modes("fused training path", runs, same, ref64, dtype, device)


_PRODUCT = aggregation._product  # the kernels' own, for the stand-in below
PERTURBATION = 0.0


@triton.jit
def _perturbed_product(children, w_ptr, sw_k, w_cols, co_ok, n, p, q_ok, ACC: tl.constexpr, DOT: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """A wrong recompute: the kernels' product times (1 + PERTURBATION)."""
    acc = _PRODUCT(children, w_ptr, sw_k, w_cols, co_ok, n, p, q_ok, ACC, DOT, PRECISION, BLOCK_P, BLOCK_CO, BLOCK_K)
    return acc * (1.0 + PERTURBATION)


def _ulp(v, dtype):
    """One unit in the last place of dtype at |v| (float64 tensors; at least the smallest normal)."""
    info = torch.finfo(dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(info.tiny))))


def _recompute_bounds(children, weight, gamma, beta, grad_out, residual, z, mean, var, eps=1e-5):
    """docs/design.md, section 2: how far a backward whose z is recomputed in another summation order
    may move from the one that reads the forward's z. Elementwise bounds (float64) on each
    gradient, in the order of flat(agg_backward_fused's result), and the number of outputs whose
    ReLU mask may flip. Sums in the accumulation type (unit u) of any order: |error| <= gamma_n
    times the sum of the magnitudes (gamma_n = n u / (1 - n u)); a value rounded to the storage
    dtype moves by at most one more of its ulps."""
    storage = z.dtype
    u = torch.finfo(P.acc_dtype(storage)).eps / 2
    gamma_n = lambda n: n * u / (1 - n * u)  # noqa: E731
    rounds = (lambda v: _ulp(v, storage)) if storage != P.acc_dtype(storage) else (lambda v: 0 * v)
    xs = [c.double() for c in children]
    x, w, g, zf = torch.cat(xs, 1), weight.double(), grad_out.double(), z.double()
    n, c_out, h, w_ = zf.shape
    count = n * h * w_
    per_channel = lambda t: t[None, :, None, None]  # noqa: E731
    total = lambda t: t.sum(dim=(0, 2, 3))  # noqa: E731
    mean, var = mean.double(), var.double()
    sigma = (var + eps).sqrt()
    scale, shift = gamma.double() / sigma, beta.double() - mean * gamma.double() / sigma
    res = xs[0] if residual else torch.zeros_like(zf)
    # the product: terms |w| |x|, summed in another order, then rounded to the storage dtype
    terms = torch.einsum("oi,nihw->nohw", w.abs(), x.abs())
    dz_acc = 2 * gamma_n(x.shape[1]) * terms
    delta_z = dz_acc + rounds(zf.abs() + dz_acc)
    pre = zf * per_channel(scale) + per_channel(shift) + res
    band = pre.abs() <= (per_channel(scale.abs()) * delta_z
                         + 4 * u * ((zf * per_channel(scale)).abs() + per_channel(shift.abs()) + res.abs()))
    mask = (pre > 0) | band  # every output whose g may count
    centred = (zf - per_channel(mean)).abs()
    # the sums pass: sum g and sum g (z - mean) over masked outputs
    d_sum_g = total(g.abs() * band) + 2 * gamma_n(count) * total(g.abs() * mask)
    d_sum_gz = (total(g.abs() * band * (centred + delta_z)) + total(g.abs() * mask * delta_z)
                + 2 * gamma_n(count + 2) * total(g.abs() * mask * (centred + delta_z)))
    sum_g, sum_gz = total(g * (pre > 0)), total(g * (pre > 0) * (zf - per_channel(mean)))
    z_coef, bias = -scale * sum_gz / ((var + eps) * count), -scale * sum_g / count
    d_z_coef = scale.abs() * d_sum_gz / ((var + eps) * count) + 4 * u * z_coef.abs()
    d_bias = scale.abs() * d_sum_g / count + 4 * u * bias.abs()
    # dz per output, as the chained pass forms and rounds it
    dz_max = (per_channel(scale.abs()) * g.abs() + per_channel(z_coef.abs() + d_z_coef) * (centred + delta_z)
              + per_channel(bias.abs() + d_bias))
    d_dz = (per_channel(scale.abs()) * g.abs() * band + per_channel(d_z_coef) * (centred + delta_z)
            + per_channel(z_coef.abs()) * delta_z + per_channel(d_bias) + 6 * u * dz_max)
    d_dz = d_dz + rounds(dz_max + d_dz)
    dx_max = torch.einsum("nohw,oi->nihw", dz_max, w.abs())
    d_dx = torch.einsum("nohw,oi->nihw", d_dz, w.abs()) + 2 * gamma_n(c_out) * dx_max
    widths = [c.shape[1] for c in children]
    grads, dx_max = list(d_dx.split(widths, 1)), list(dx_max.split(widths, 1))
    if residual:  # the residual's g, through its mask
        grads[0], dx_max[0] = grads[0] + g.abs() * band, dx_max[0] + g.abs()
    grads = [b + rounds(m + b) for b, m in zip(grads, dx_max)]
    d_dw = (torch.einsum("nohw,nihw->oi", d_dz, x.abs())
            + 2 * gamma_n(count) * torch.einsum("nohw,nihw->oi", dz_max, x.abs()))
    d_dw = d_dw + rounds(torch.einsum("nohw,nihw->oi", dz_max, x.abs()) + d_dw)
    d_gamma = d_sum_gz / sigma + 4 * u * (sum_gz.abs() + d_sum_gz) / sigma
    return grads + [d_dw, d_gamma, d_sum_g], int(band.sum())


def _assert_within_recompute_bounds(exact, other, bounds, what):
    for i, (a, b, bound) in enumerate(zip(exact, other, bounds)):
        excess = ((b.double() - a.double()).abs() - bound).max().item()
        assert excess <= 0, f"{what}: gradient {i} moved past its bound by {excess:.3g}"


@requires_interpreter
@pytest.mark.parametrize("dtype, residual, case", [(torch.float32, False, "7-mixed"), (torch.bfloat16, True, "2-cl")],
                         ids=["float32-plain", "bfloat16-residual"])
def test_recomputed_z_in_another_order_stays_within_the_bound(dtype, residual, case, monkeypatch):
    """What a GPU may do (docs/design.md, section 2): z recomputed in backward with its terms
    summed in another order (here another K chunk, 32 instead of 16: other roundings on any CPU)
    instead of the forward's. ReLU masks may then flip only inside the band of outputs within
    rounding of zero, and every gradient stays within _recompute_bounds of the backward that
    reads the kept z. The bound is a worst case (n u times the sum of the terms' magnitudes):
    reordered sums use well under 1% of it on random data, so what it catches is a recompute
    that is really wrong, z off by 2^-11 of itself in float32 or 4 of its ulps in bfloat16. In
    float32 a second run repeats the first bit for bit (the split merges run in a fixed order)."""
    torch.manual_seed(3)
    children, weight, gamma, beta, grad_out = _train_args(case, dtype, torch.device("cpu"), residual)
    out, mean, var, z = aggregation.agg_forward_train(children, weight, gamma, beta, 1e-5, residual, True)

    def backward(chained, keep_z):
        monkeypatch.setattr(aggregation, "CHAINED_RECOMPUTE", chained)
        return flat(aggregation.agg_backward_fused(grad_out, children, weight, gamma, beta, mean, var, 1e-5,
                                                   residual, z if keep_z else None))
    exact = backward(False, True)
    bounds, in_band = _recompute_bounds(children, weight, gamma, beta, grad_out, residual, z, mean, var)
    assert in_band < out.numel() // 100  # the band is a sliver of the outputs
    monkeypatch.setattr(aggregation, "block_k_of", lambda c_in: 32)
    chained, both = backward(True, True), backward(True, False)
    if dtype == torch.float32:  # (bfloat16's rounding of z hides the other order almost everywhere)
        assert any(not torch.equal(a, b) for a, b in zip(exact, both)), "the other order changed nothing"
        for a, b in zip(both, backward(True, False)):  # a second run repeats the first: merges in fixed order
            assert torch.equal(a, b)
    for a, b in zip(exact[-2:], chained[-2:]):  # the sums pass read z: grad gamma and beta unchanged
        assert torch.equal(a, b)
    _assert_within_recompute_bounds(exact, chained, bounds, "chained pass recomputing")
    _assert_within_recompute_bounds(exact, both, bounds, "both passes recomputing")

    monkeypatch.setattr(sys.modules[__name__], "PERTURBATION", {torch.float32: 2**-11, torch.bfloat16: 2**-5}[dtype])
    monkeypatch.setattr(aggregation, "_product", _perturbed_product)
    with pytest.raises(AssertionError, match="moved past its bound"):
        _assert_within_recompute_bounds(exact, backward(True, False), bounds, "perturbed recompute")


@requires_interpreter
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_running_statistics_in_the_finalize(momentum):
    """agg_forward_train updates the running statistics as nn.BatchNorm2d (ops/_bn.py's
    update_running_stats) does, num_batches_tracked exactly once; without `running` nothing moves."""
    from dla_fused.ops import _bn
    torch.manual_seed(5)
    children, weight, gamma, beta, _ = _train_args("2-cl", torch.float32, torch.device("cpu"), False)
    c_out = weight.shape[0]
    fused = [torch.randn(c_out), torch.rand(c_out) + 0.5, torch.tensor(4)]
    expected = [t.clone() for t in fused]
    before = [t.clone() for t in fused]
    aggregation.agg_forward_train(children, weight, gamma, beta, 1e-5, False, False)
    for a, b in zip(fused, before):
        assert torch.equal(a, b)
    _, mean, var, _ = aggregation.agg_forward_train(children, weight, gamma, beta, 1e-5, False, False,
                                                    (*fused, momentum))
    _bn.update_running_stats(*expected, momentum, mean, var, N * H * W)
    torch.testing.assert_close(fused[0], expected[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused[1], expected[1], rtol=1e-6, atol=1e-7)
    assert int(fused[2]) == int(expected[2]) == 5


# ------------------------------------------------------------------------------------------------
# IDA-Up

# factor None: up_weight None (factor 1). The variants: BatchNorm + ReLU and a skip of another
# layout, or neither, with z in either layout.
IDA_VARIANTS = {"bn-skip": (True, True, "nchw", "cl"), "plain": (False, False, "cl", None),
                "bn-cl": (True, False, "cl", None)}


def ida_args(dtype, device, factor, variant, c=None, h=None, w=None):
    # the interpreter is slow on the many taps and pixels of f = 8: fewer channels, one coarse tile
    c, h, w = c or (20 if factor != 8 else 6), h or (7 if factor != 8 else 3), w or (5 if factor != 8 else 2)
    bn, skip, layout, skip_layout = IDA_VARIANTS[variant]
    z = activation((N, c, h, w), dtype, device, layout)
    up = None if factor is None else torch.rand(c, 1, 2 * factor, 2 * factor, device=device).to(dtype)
    f = factor or 1
    size = (N, c, P.upsampled_size(h, f), P.upsampled_size(w, f)) if up is not None else (N, c, h, w)
    scale, shift = (vector(c, dtype, device), vector(c, dtype, device)) if bn else (None, None)
    return z, scale, shift, up, f, (activation(size, dtype, device, skip_layout) if skip else None), size


def _ida_step_primitives(x, weight, gamma, beta, up, factor, skip, grad_out, eps=1e-5):
    """The projected IDA-Up step's training forward and backward composed of the reference
    primitives: (out, mean, var, grad x, grad W, grad gamma, grad beta, grad up)."""
    from dla_fused.ops import _bn
    z, mean, var = P.agg_conv([x], weight, None, None, False, True)
    scale, shift = _bn.affine(gamma, beta, mean, var, eps)
    out = P.ida_upsample(z, scale, shift, up, factor, skip)
    grad_p, grad_up = P.ida_upsample_backward(grad_out, z, scale, shift, up, factor)
    grads, grad_w, grad_g, grad_b = _bn.backward(P, grad_p, None, [x], weight, gamma, mean, var, eps, True, False,
                                                 z=z)
    return out, mean, var, grads[0], grad_w, grad_g, grad_b, grad_up


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factor", [None, 2, 4])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_fused_ida_training_path(device, dtype, factor, layout, monkeypatch):
    """The projected step in three launches forward (running statistics in the finalize) and
    two backward against the reference primitives' composition; z stored by the first backward
    pass, or recomputed by the chained pass (under the interpreter the same bits: one tile for
    every product); odd sizes, a skip in the other layout."""
    c_in, c = 11, 20
    h, w = 5, 3  # 30 coarse pixels: two tiles of the interpreter's backward, one ragged
    x = activation((N, c_in, h, w), dtype, device, layout)
    weight = torch.randn(c, c_in, device=device).to(dtype)
    gamma, beta = vector(c, dtype, device), vector(c, dtype, device)
    f = factor or 1
    up = torch.rand(c, 1, 2 * f, 2 * f, device=device).to(dtype) if factor else None
    size = (N, c, P.upsampled_size(h, f), P.upsampled_size(w, f)) if factor else (N, c, h, w)
    skip = activation(size, dtype, device, "cl" if layout == "nchw" else "nchw")
    grad_out = activation(size, dtype, device, layout)
    args = [x, weight, gamma, beta, up, f, skip, grad_out]
    same = [t for t in flat(_ida_step_primitives(*args)) if t.numel()]
    ref64 = [t for t in flat(_ida_step_primitives(*to64(args))) if t.numel()]
    runs = {}
    for chained in ("stored z", "recompute"):
        monkeypatch.setattr(aggregation, "CHAINED_RECOMPUTE", chained == "recompute")
        out, mean, var = ida_up.ida_forward_train(x, weight, gamma, beta, 1e-5, up, f, skip)
        runs[chained] = [t for t in flat([out, mean, var, *ida_up.ida_backward_fused(
            grad_out, x, weight, gamma, beta, mean, var, 1e-5, up, f)]) if t is not None]
    _compare_modes("fused IDA-Up training path", runs, same, ref64, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factor", [None, 1, 2, 4, 8])
@pytest.mark.parametrize("variant", ["bn-skip", "plain"])
def test_ida_upsample(device, dtype, factor, variant):
    z, scale, shift, up, f, skip, _ = ida_args(dtype, device, factor, variant)
    check("ida_upsample", [z, scale, shift, up, f, skip])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factor", [None, 1, 2, 4, 8])
@pytest.mark.parametrize("variant", ["bn-cl", "plain"])
def test_ida_upsample_backward(device, dtype, factor, variant):
    z, scale, shift, up, f, _, size = ida_args(dtype, device, factor, variant)
    grad_out = activation(size, dtype, device, "nchw" if variant == "bn-cl" else "cl")
    check("ida_upsample_backward", [grad_out, z, scale, shift, up, f])


# ------------------------------------------------------------------------------------------------
# GPU only: autotuned launches and sizes larger than the interpreter can afford

@requires_cuda
def test_autotuned_recompute_is_exact(monkeypatch):
    """With autotuning on, agg_conv(stats=False) (the backward's recomputation) gives exactly the
    z of the training forward (stats=True), and both match the reference."""
    monkeypatch.setenv("DLA_FUSED_TRITON_AUTOTUNE", "1")
    for dtype in (torch.float32, torch.bfloat16):
        children = [activation((8, c, 28, 30), dtype, "cuda", layout) for c, layout in ((64, "cl"), (128, "cl"))]
        weight = torch.randn(128, 192, device="cuda").to(dtype)
        out, _, _ = check("agg_conv", [children, weight, None, None, False, True])
        assert torch.equal(aggregation.agg_conv(children, weight, None, None, False, False)[0], out)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_sizes(dtype):
    dev = torch.device("cuda")
    children = [activation((4, c, 33, 35), dtype, dev, "cl") for c in (96, 96, 64)]
    weight = torch.randn(96, 256, device=dev).to(dtype)
    check("agg_conv", [children, weight, None, None, False, True])
    z = activation((4, 96, 33, 35), dtype, dev, "cl")
    check("agg_backward_reduce", [z, z, z, vector(96, dtype, dev)])
    check("agg_backward_gemm", [z, children, weight, z, z])
    for factor in (2, 8):
        z, scale, shift, up, f, skip, size = ida_args(dtype, dev, factor, "bn-skip", c=64, h=33, w=35)
        check("ida_upsample", [z, scale, shift, up, f, skip])
        check("ida_upsample_backward", [activation(size, dtype, dev, "cl"), z, scale, shift, up, f])


def test_autotuning_skips_configs_whose_shared_memory_does_not_fit():
    # Hopper allows 227 KiB per block; Triton buffers each tl.dot operand tile num_stages - 1 times.
    import triton.language as tl
    from dla_fused.kernels._common import HOPPER_SHARED_BYTES
    for kernel, dims in ((aggregation._conv_kernel, ("BLOCK_P", "BLOCK_K", "BLOCK_CO")),
                         (aggregation._weight_grad_kernel, ("BLOCK_CO", "BLOCK_K", "BLOCK_CI"))):
        x = torch.empty(1)
        for dot, size in ((tl.float32, 4), (tl.float64, 8), (tl.bfloat16, 2)):
            kept = kernel.fitting(kernel.configs, {"x": x, "DOT": dot})
            for c in kernel.configs:
                m, k, n = (c.kwargs[d] for d in dims)
                need = (c.num_stages - 1) * (m * k + k * n) * size
                assert kernel.shared_bytes(c, {"DOT": dot}) == need
                assert (c in kept) == (need <= HOPPER_SHARED_BYTES)
        if kernel is aggregation._weight_grad_kernel:  # (the product's configs all fit, K = PRODUCT_K)
            assert len(kernel.fitting(kernel.configs, {"x": x, "DOT": tl.float64})) < len(kernel.configs)
        # and the autotuner asks the same (Triton calls the hook with the positional arguments as
        # nargs and the keyword arguments, among them DOT)
        tuner = kernel.tuned
        tuner.nargs = {"x": x}
        try:
            expected = kernel.fitting(kernel.configs, {"x": x, "DOT": tl.float64})
            assert tuner.prune_configs({"DOT": tl.float64}) == expected
            assert tuner.prune_configs({"DOT": tl.float32}) == kernel.configs
        finally:
            tuner.nargs = None
    assert aggregation._apply_kernel.fitting(aggregation._apply_kernel.configs, {}) == aggregation._apply_kernel.configs


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="interpreter check of the grid orders")
def test_conv_grid_orders_give_the_same_bits(monkeypatch):
    """The GEMM puts output blocks on grid axis 0 (CO_FIRST) unless the pixel tiles would pass
    the grid's axis-1 limit; both orders compute every tile alike: the same bits, statistics
    included, and equal to the reference primitive."""
    torch.manual_seed(0)
    kids = [torch.randn(2, c, 5, 7, dtype=torch.float64) for c in (6, 3)]
    weight = torch.randn(40, 9, dtype=torch.float64)  # several output blocks of 16
    first = aggregation.agg_conv(kids, weight, None, None, False, True)
    monkeypatch.setattr(aggregation, "MAX_GRID_Y", 0)
    second = aggregation.agg_conv(kids, weight, None, None, False, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    expected = P.agg_conv(kids, weight, None, None, False, True)
    for a, e in zip(first, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@requires_interpreter
def test_fused_ida_backward_beyond_the_grid_limit(monkeypatch):
    """Coarse tiles past the grid's axis-1 limit: ida_backward_fused declines (None) and the op's
    backward takes the unfused kernels, with the same gradients."""
    from dla_fused import backend
    from dla_fused.ops.ida_up import ida_up as ida_up_op, ida_up_reference
    torch.manual_seed(7)
    x = torch.randn(2, 5, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(4, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(ida_up, "MAX_GRID_Y", 1)
    args = (x[:, :, :3], weight.flatten(1), gamma, beta, torch.zeros(4, dtype=torch.float64),
            torch.ones(4, dtype=torch.float64), 1e-5, up, 2)
    assert ida_up.ida_backward_fused(torch.randn(2, 4, 6, 10, dtype=torch.float64), *args) is None
    saved = backend._requested
    backend.set_backend("triton")
    try:
        outs = [f(x, weight, gamma, beta, None, None, None, True, 0.1, 1e-5, up, 2)
                for f in (ida_up_op, ida_up_reference)]
        grads = [torch.autograd.grad(o, [x, weight, gamma, beta, up], torch.ones_like(o)) for o in outs]
    finally:
        backend._requested = saved
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
