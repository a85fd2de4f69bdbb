"""The C++/CUDA kernels (csrc/cuda, the `cuda` backend) against their specification,
dla_fused/ops/primitives.py run in float64, for float32, float16, bfloat16 and float64.

Tolerances, relative to the largest reference magnitude (kernel_cases.REL): float64 1e-10,
float32 1e-5, float16 and bfloat16 1e-2. The checks live in kernel_cases.py (shared with
test_cpp_kernels.py); every test runs with NaN-poisoned allocations. "Aligned" cases have channel
counts and widths that allow the 16-byte vector paths; the random-size and "unaligned" cases take
the scalar ones. Every test is skipped on machines without a CUDA GPU.
"""
import pytest
import torch

import kernel_cases as K
from conftest import requires_cuda

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "cl", "mixed"]
DENSE = ["nchw", "cl"]
UNALIGNED = ["unaligned", "unaligned_cl"]
ALIGNED_SIZE = (2, 4, 8)  # H*W = 32 pixels, a multiple of every vector width
FACTORS = [1, 2, 3, 4, 8]


@pytest.fixture(autouse=True)
def _poisoned():
    with K.poisoned_allocations():
        yield


# Aggregation node ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_children", [1, 2, 7])
@pytest.mark.parametrize("mode", K.AGG_MODES)
def test_agg_conv(dtype, layout, n_children, mode):
    K.check_agg_conv("cuda", dtype, layout, n_children, mode, seed=n_children)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("mode", K.AGG_MODES)
def test_agg_conv_aligned(dtype, layout, mode):
    K.check_agg_conv("cuda", dtype, layout, 2, mode, size=ALIGNED_SIZE, channels=[16, 8])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
def test_agg_conv_many_pixels(dtype, layout):
    """Many slices in the two-level statistics reduction."""
    K.check_agg_conv("cuda", dtype, layout, 2, "all", size=(8, 32, 32), channels=[64, 24])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("size", [(4, 32, 32), (2, 5, 7)])
def test_agg_stats_are_numerically_safe(dtype, layout, size):
    K.check_agg_stats_numerics("cuda", dtype, layout, size=size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl", "crop"])
@pytest.mark.parametrize("residual_layout", [None, "nchw", "cl"])
def test_agg_apply(dtype, layout, residual_layout):
    K.check_agg_apply("cuda", dtype, layout, residual_layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE + UNALIGNED)
@pytest.mark.parametrize("with_residual", [False, True])
def test_agg_apply_aligned_or_not(dtype, layout, with_residual):
    K.check_agg_apply("cuda", dtype, layout, layout if with_residual else None, size=ALIGNED_SIZE, c=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("size, c", [((2, 5, 7), None), (ALIGNED_SIZE, 16), ((8, 32, 32), 48)])
def test_agg_backward_reduce(dtype, layout, with_out, size, c):
    K.check_agg_backward_reduce("cuda", dtype, layout, with_out, size=size, c=c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE + UNALIGNED)
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("with_z_coef", [False, True])
@pytest.mark.parametrize("size, c", [((2, 5, 7), None), (ALIGNED_SIZE, 16)])
def test_agg_backward_dz(dtype, layout, with_out, with_z_coef, size, c):
    K.check_agg_backward_dz("cuda", dtype, layout, with_out, with_z_coef, size=size, c=c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_children", [1, 2, 7])
@pytest.mark.parametrize("residual", [None, "masked", "unmasked"])
def test_agg_backward_gemm(dtype, layout, n_children, residual):
    K.check_agg_backward_gemm("cuda", dtype, layout, n_children, residual, seed=n_children)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("residual", [None, "masked"])
def test_agg_backward_gemm_aligned(dtype, layout, residual):
    K.check_agg_backward_gemm("cuda", dtype, layout, 2, residual, size=ALIGNED_SIZE, channels=[16, 8], c_out=24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_agg_weight_gradient_over_batch_chunks(dtype):
    K.check_agg_backward_gemm("cuda", dtype, "nchw", 1, None, size=(40, 1, 1), channels=[700], c_out=700)


# IDA-Up ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
def test_ida_upsample(dtype, layout, factor, with_scale, with_skip):
    K.check_ida_upsample("cuda", dtype, layout, factor, with_scale, with_skip, seed=factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE + UNALIGNED)
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_ida_upsample_aligned_or_not(dtype, layout, factor):
    """Width 8 and 16 channels: NCHW output rows and channels_last pixels take 16-byte vectors."""
    K.check_ida_upsample("cuda", dtype, layout, factor, True, True, size=(2, 5, 8), c=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl", "crop"])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
def test_ida_without_upsampling(dtype, layout, with_scale, with_skip):
    K.check_ida_upsample("cuda", dtype, layout, 1, with_scale, with_skip, with_up=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("with_scale", [False, True])
def test_ida_upsample_backward(dtype, layout, factor, with_scale):
    K.check_ida_upsample_backward("cuda", dtype, layout, factor, with_scale, seed=factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE + UNALIGNED)
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("size", [(2, 5, 8), (4, 16, 16)])
def test_ida_upsample_backward_aligned_or_not(dtype, layout, factor, size):
    K.check_ida_upsample_backward("cuda", dtype, layout, factor, True, size=size, c=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("with_scale", [False, True])
def test_ida_backward_without_upsampling(dtype, layout, with_scale):
    K.check_ida_upsample_backward("cuda", dtype, layout, 1, with_scale, with_up=False)


# Device handling -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(K.primitive_calls("cpu", torch.float32)))
def test_kernels_run_on_the_current_stream(name):
    """Each primitive launched on a side stream gives, once that stream is synchronised, what it
    gives on the default stream."""
    expected = K.primitive_calls("cuda", torch.float32)[name]()
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        got = K.primitive_calls("cuda", torch.float32)[name]()
    side.synchronize()
    for g, e in zip(K.flat(got), K.flat(expected)):
        torch.testing.assert_close(g, e)


def test_integer_activations_are_refused():
    x = torch.ones(2, 4, 3, 3, device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="agg_apply_: z must be a 4-D .*floating-point"):
        K.OPS.agg_apply_(x, torch.ones(4, device="cuda"), torch.ones(4, device="cuda"), None)
