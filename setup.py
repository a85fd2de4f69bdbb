"""Build dla_fused and its extension dla_fused._C.

The C++ CPU kernels are always built. The CUDA kernels under csrc/cuda/ are built when nvcc and a
CUDA build of torch are both present. Environment switches:

  DLA_FUSED_CUDA=auto|1|0   auto (default): build CUDA when possible; 1: require it; 0: skip it
  TORCH_CUDA_ARCH_LIST      architectures to build; default: the local GPUs, or 9.0 with no GPU
  CUDA_HOME                 the CUDA toolkit; default: found from nvcc, then /usr/local/cuda
  DLA_FUSED_CPU_ARCH        native (default: the build machine's instruction set), portable, or
                            any -march value, for the C++ CPU kernels
  MAX_JOBS                  parallel compile jobs (ninja)

The decision is printed at the start of the build.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _toolkit_root():
    """The CUDA toolkit folder. nvcc on the PATH may be a wrapper script outside the toolkit,
    so a candidate only counts when it holds include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


CUDA_ROOT = _toolkit_root()
if CUDA_ROOT:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import time.
    os.environ["CUDA_HOME"] = CUDA_ROOT

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cuda_decision():
    mode = os.environ.get("DLA_FUSED_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"DLA_FUSED_CUDA must be auto, 1 or 0, got {mode!r}")
    reasons = []
    if CUDA_ROOT is None:
        reasons.append("no CUDA toolkit found (nvcc / CUDA_HOME)")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if mode == "0":
        return False, "skipped (DLA_FUSED_CUDA=0)"
    if reasons:
        if mode == "1":
            sys.exit("DLA_FUSED_CUDA=1 but CUDA cannot be built: " + "; ".join(reasons))
        return False, "skipped: " + "; ".join(reasons)
    return True, f"building with toolkit {CUDA_ROOT} for torch CUDA {torch.version.cuda}"


def _default_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return "9.0"  # compile check on machines without a GPU: Hopper


def _wheel_cuda_dirs(kind):
    """include/ or lib/ folders of the nvidia-* pip wheels that a CUDA build of torch brings
    (cuBLAS headers, the CUDA runtime), used when the toolkit itself lacks them."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", kind))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _cpu_arch_flags():
    """The CPU kernels' per-element loops are written to vectorise: built for the build machine's
    instruction set by default (AVX2 / AVX-512 where present), as the package is built where it
    is installed. DLA_FUSED_CPU_ARCH=portable builds for any x86-64 (SSE2 only, slower);
    any other value is passed as -march=VALUE."""
    arch = os.environ.get("DLA_FUSED_CPU_ARCH", "native").strip()
    if arch == "portable":
        print("[dla_fused] C++ CPU kernels: portable build (DLA_FUSED_CPU_ARCH=portable)", flush=True)
        return []
    print(f"[dla_fused] C++ CPU kernels: -march={arch}", flush=True)
    return [f"-march={arch}"]


def _extensions():
    with_cuda, why = _cuda_decision()
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"] + _cpu_arch_flags()  # the C++ standard is the one torch asks for
    define = [("DLA_FUSED_WITH_CUDA", "1" if with_cuda else "0")]
    print(f"[dla_fused] C++ CPU kernels: building {len(cpu_sources)} sources", flush=True)
    print(f"[dla_fused] CUDA kernels: {why}", flush=True)
    if not with_cuda:
        return [CppExtension("dla_fused._C", cpu_sources, define_macros=define,
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])]
    arch_list = _default_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    print(f"[dla_fused] CUDA architectures: {arch_list}", flush=True)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return [CUDAExtension(
        "dla_fused._C", cpu_sources + cuda_sources, define_macros=define,
        include_dirs=_wheel_cuda_dirs("include"),
        library_dirs=_wheel_cuda_dirs("lib"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"])]


setup(
    name="dla_fused",
    version="0.1.0",
    description="Deep Layer Aggregation networks with fused Triton and C++/CUDA kernels",
    packages=find_packages(include=["dla_fused", "dla_fused.*"]) + ["dla_fused.kernels"],
    package_dir={"dla_fused.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.15", "triton>=3.6,<3.9; platform_system=='Linux'",
                      "numpy"],
    extras_require={"dcn": ["torchvision"], "plot": ["matplotlib"],
                    "test": ["pytest", "pytest-benchmark", "hypothesis", "timm"]},
    entry_points={"console_scripts": ["dla-fused=dla_fused.__main__:main"]},
)
