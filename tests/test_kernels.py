"""The C++ kernels of both devices (csrc/cpu: the `cpu` backend, csrc/cuda: the `cuda` backend)
against their specification, dla_fused/ops/primitives.py run in float64, for float32, float16,
bfloat16 and float64, on the CPU and, where a GPU is present, on CUDA.

Tolerances, relative to the largest reference magnitude (kernel_cases.REL): float64 1e-10,
float32 1e-5, float16 and bfloat16 1e-2. The checks live in kernel_cases.py; every test runs with
NaN-poisoned allocations, so an output element a kernel forgets to write fails. "Aligned" cases
have channel counts and widths that allow the vector paths (16 bytes on CUDA, 32 on CPU); the
random-size and "unaligned" cases take the scalar ones. CUDA cases are skipped on machines
without a CUDA GPU.
"""
import pytest
import torch

import kernel_cases as K
from conftest import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

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
@pytest.mark.parametrize("n_children", [1, 2, 7, 10])
@pytest.mark.parametrize("mode", K.AGG_MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_agg_conv(device, dtype, layout, n_children, mode):
    K.check_agg_conv(device, dtype, layout, n_children, mode, seed=n_children)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("mode", K.AGG_MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_agg_conv_aligned(device, dtype, layout, mode):
    K.check_agg_conv(device, dtype, layout, 2, mode, size=ALIGNED_SIZE, channels=[16, 8])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("size, channels", [((8, 32, 32), [64, 24]), ((4, 32, 33), [32, 9])])
@pytest.mark.parametrize("device", DEVICES)
def test_agg_conv_many_pixels(device, dtype, layout, size, channels):
    """Many slices in the two-level statistics reduction and several parallel tasks, on vector
    and scalar paths."""
    K.check_agg_conv(device, dtype, layout, 2, "all", size=size, channels=channels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("size", [(4, 32, 32), (2, 5, 7)])
@pytest.mark.parametrize("device", DEVICES)
def test_agg_stats_are_numerically_safe(device, dtype, layout, size):
    K.check_agg_stats_numerics(device, dtype, layout, size=size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl", "crop"])
@pytest.mark.parametrize("residual_layout", [None, "nchw", "cl"])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_agg_apply(device, dtype, layout, residual_layout, in_place):
    K.check_agg_apply(device, dtype, layout, residual_layout, in_place=in_place)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE + UNALIGNED)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_agg_apply_aligned_or_not(device, dtype, layout, with_residual):
    K.check_agg_apply(device, dtype, layout, layout if with_residual else None, size=ALIGNED_SIZE, c=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("size, c", [((2, 5, 7), None), (ALIGNED_SIZE, 16), ((8, 32, 32), 48)])
@pytest.mark.parametrize("device", DEVICES)
def test_agg_backward_reduce(device, dtype, layout, with_out, size, c):
    K.check_agg_backward_reduce(device, dtype, layout, with_out, size=size, c=c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE + UNALIGNED)
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("with_z_coef", [False, True])
@pytest.mark.parametrize("size, c", [((2, 5, 7), None), (ALIGNED_SIZE, 16)])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_agg_backward_dz(device, dtype, layout, with_out, with_z_coef, size, c, in_place):
    K.check_agg_backward_dz(device, dtype, layout, with_out, with_z_coef, size=size, c=c, in_place=in_place)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_children", [1, 2, 7, 10])
@pytest.mark.parametrize("residual", [None, "masked", "unmasked"])
@pytest.mark.parametrize("device", DEVICES)
def test_agg_backward_gemm(device, dtype, layout, n_children, residual):
    K.check_agg_backward_gemm(device, dtype, layout, n_children, residual, seed=n_children)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("residual", [None, "masked"])
@pytest.mark.parametrize("device", DEVICES)
def test_agg_backward_gemm_aligned(device, dtype, layout, residual):
    K.check_agg_backward_gemm(device, dtype, layout, 2, residual, size=ALIGNED_SIZE, channels=[16, 8], c_out=24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_agg_weight_gradient_over_batch_chunks(device, dtype):
    K.check_agg_backward_gemm(device, dtype, "nchw", 1, None, size=(40, 1, 1), channels=[700], c_out=700)


# IDA-Up ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_ida_upsample(device, dtype, layout, factor, with_scale, with_skip):
    K.check_ida_upsample(device, dtype, layout, factor, with_scale, with_skip, seed=factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE + UNALIGNED)
@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize("device", DEVICES)
def test_ida_upsample_aligned_or_not(device, dtype, layout, factor):
    """Width 8 and 16 channels: NCHW output rows and channels_last pixels take 16-byte vectors."""
    K.check_ida_upsample(device, dtype, layout, factor, True, True, size=(2, 5, 8), c=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl", "crop"])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_ida_without_upsampling(device, dtype, layout, with_scale, with_skip):
    K.check_ida_upsample(device, dtype, layout, 1, with_scale, with_skip, with_up=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_ida_upsample_backward(device, dtype, layout, factor, with_scale):
    K.check_ida_upsample_backward(device, dtype, layout, factor, with_scale, seed=factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE + UNALIGNED)
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("size", [(2, 5, 8), (4, 16, 16)])
@pytest.mark.parametrize("device", DEVICES)
def test_ida_upsample_backward_aligned_or_not(device, dtype, layout, factor, size):
    K.check_ida_upsample_backward(device, dtype, layout, factor, True, size=size, c=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_ida_backward_without_upsampling(device, dtype, layout, with_scale):
    K.check_ida_upsample_backward(device, dtype, layout, 1, with_scale, with_up=False)


# Device handling -----------------------------------------------------------------------------------------

@requires_cuda
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


@requires_cuda
def test_integer_activations_are_refused():
    x = torch.ones(2, 4, 3, 3, device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="agg_apply_: z must be a 4-D .*floating-point"):
        K.OPS.agg_apply_(x, torch.ones(4, device="cuda"), torch.ones(4, device="cuda"), None)


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
