"""The Triton kernels compile for Hopper (sm_90) on any machine: python -m dla_fused.kernels.compile_check
lowers the kernel variants the fused ops launch (every dtype, layout and children count, aligned and
odd sizes) to a cubin with Triton's own ptxas and checks their shared memory, without a GPU. Each
run is a subprocess without TRITON_INTERPRET (the interpreter would replace the kernels)."""
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _has_nvidia_backend():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _has_nvidia_backend(), reason="this triton has no NVIDIA backend to compile with")


def compile_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "dla_fused.kernels.compile_check", *args], env=env,
                          capture_output=True, text=True, timeout=2400)


@pytest.mark.compile_sweep  # minutes: `make test` leaves it to `make compile-check` (a CI step of its own)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_every_kernel_compiles_for_sm90(dtype):
    out = compile_check("--arch", "90", "--dtypes", dtype)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = re.search(r"(\d+) kernel variants compiled for sm_90 in \d+ s, (\d+) failed", out.stdout)
    assert summary, out.stdout[-2000:]
    # every kernel (conv, finalize-stats, apply, reduce, dz, weight-grad, the fused backward's sums and
    # chained passes, upsample and its two backwards) in several constexpr variants, for two layouts
    assert int(summary.group(1)) >= 30 and summary.group(2) == "0"
    for kernel in ("_conv_kernel", "_finalize_stats_kernel", "_apply_kernel", "_reduce_kernel", "_dz_kernel",
                   "_weight_grad_kernel", "_backward_sums_kernel", "_backward_chained_kernel", "_upsample_kernel",
                   "_upsample_backward_kernel", "_upsample_backward_fused_kernel"):
        assert f"  {kernel}(" in out.stdout, kernel


def test_shared_memory_above_the_limit_fails():
    out = compile_check("--dtypes", "float32", "--only", "agg_conv[1 children, stats]", "--shared-limit", "1024")
    assert out.returncode == 1
    assert re.search(r"FAILED _conv_kernel\(.*\): \d+ bytes of shared memory, above the limit of 1024 per block",
                     out.stdout), out.stdout[-2000:]


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "dla_fused.kernels.compile_check"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "unset TRITON_INTERPRET" in out.stderr
