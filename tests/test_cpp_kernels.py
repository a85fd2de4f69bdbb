"""The C++ CPU kernels (csrc/cpu, the `cpu` backend) against their specification,
dla_fused/ops/primitives.py, in float32 (relative tolerance 1e-5), float64 (1e-10), float16 and
bfloat16 (1e-2; what autocast on CPU feeds them).

The checks live in kernel_cases.py (shared with test_cuda_kernels.py); every test runs with
NaN-poisoned allocations, so an output element a kernel forgets to write fails.
"""
import pytest
import torch

import kernel_cases as K

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "cl", "mixed"]


@pytest.fixture(autouse=True)
def _poisoned():
    with K.poisoned_allocations():
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_children", [1, 2, 7])
@pytest.mark.parametrize("mode", K.AGG_MODES)
def test_agg_conv(dtype, layout, n_children, mode):
    K.check_agg_conv("cpu", dtype, layout, n_children, mode, seed=n_children)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_agg_conv_many_pixels(dtype, layout):
    """Enough elements for several parallel tasks."""
    K.check_agg_conv("cpu", dtype, layout, 2, "all", size=(4, 32, 33), channels=[32, 9])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_agg_stats_are_numerically_safe(dtype, layout):
    K.check_agg_stats_numerics("cpu", dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl", "crop"])
@pytest.mark.parametrize("residual_layout", [None, "nchw", "cl"])
def test_agg_apply(dtype, layout, residual_layout):
    K.check_agg_apply("cpu", dtype, layout, residual_layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("with_out", [False, True])
def test_agg_backward_reduce(dtype, layout, with_out):
    K.check_agg_backward_reduce("cpu", dtype, layout, with_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("with_z_coef", [False, True])
def test_agg_backward_dz(dtype, layout, with_out, with_z_coef):
    K.check_agg_backward_dz("cpu", dtype, layout, with_out, with_z_coef)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_children", [1, 2, 7])
@pytest.mark.parametrize("residual", [None, "masked", "unmasked"])
def test_agg_backward_gemm(dtype, layout, n_children, residual):
    K.check_agg_backward_gemm("cpu", dtype, layout, n_children, residual, seed=n_children)


def test_agg_weight_gradient_over_batch_chunks():
    """NCHW weight gradients are summed over chunks of the batch when C_out x C_in is large."""
    K.check_agg_backward_gemm("cpu", torch.float32, "nchw", 1, None, size=(40, 1, 1), channels=[700], c_out=700)


FACTORS = [1, 2, 3, 4, 8]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
def test_ida_upsample(dtype, layout, factor, with_scale, with_skip):
    K.check_ida_upsample("cpu", dtype, layout, factor, with_scale, with_skip, seed=factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl", "crop"])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
def test_ida_without_upsampling(dtype, layout, with_scale, with_skip):
    K.check_ida_upsample("cpu", dtype, layout, 1, with_scale, with_skip, with_up=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("with_scale", [False, True])
def test_ida_upsample_backward(dtype, layout, factor, with_scale):
    K.check_ida_upsample_backward("cpu", dtype, layout, factor, with_scale, seed=factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("with_scale", [False, True])
def test_ida_backward_without_upsampling(dtype, layout, with_scale):
    K.check_ida_upsample_backward("cpu", dtype, layout, 1, with_scale, with_up=False)


@pytest.mark.parametrize("name", list(K.primitive_calls("cpu", torch.float32)))
def test_unsupported_dtype_is_a_clear_error(name):
    call = K.primitive_calls("cpu", torch.complex64)[name]
    with pytest.raises(RuntimeError, match=rf"dla_fused::{name}\b.*(floating-point|supports float32, float16, "
                                           r"bfloat16 and float64).*got ComplexFloat"):
        call()


def test_bad_arguments_are_named():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="agg_conv: weight must be"):
        K.OPS.agg_conv([x], torch.ones(4, 5), None, None, False, False)
    with pytest.raises(RuntimeError, match=r"agg_apply_: scale must be a contiguous Float vector of 4 elements"):
        K.OPS.agg_apply_(x, torch.ones(3), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="agg_conv: children\\[1\\] must be"):
        K.OPS.agg_conv([x, torch.randn(2, 4, 3, 2)], torch.ones(4, 8), None, None, False, False)
    with pytest.raises(RuntimeError, match="ida_upsample: up_weight must be"):
        K.OPS.ida_upsample(x, None, None, torch.ones(4, 1, 3, 3), 2, None)
    with pytest.raises(RuntimeError, match="ida_upsample: skip must be"):
        K.OPS.ida_upsample(x, None, None, torch.ones(4, 1, 4, 4), 2, torch.randn(2, 4, 3, 3))
