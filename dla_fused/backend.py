"""Which implementation of the kernel primitives runs the fused ops.

Backends (each provides the primitives of dla_fused/ops/primitives.py under the same names):
  cpu        C++ kernels in csrc/cpu (CPU tensors)
  cuda       C++/CUDA kernels in csrc/cuda (CUDA tensors)
  triton     Triton kernels in kernels/ (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  reference  the plain-PyTorch primitives (any device; slow, for checking)
  auto       per device, the fastest one available (the default)

Choose with `set_backend(name)` or the environment variable DLA_FUSED_BACKEND; see what was built
and what is selected, and why, with `backend_info()`.
"""
import importlib
import os
import types
from typing import Dict, List, Optional

import torch

NAMES = ("auto", "triton", "cuda", "cpu", "reference")
# Preference of `auto` on CUDA devices, fastest first (benchmarks/RESULTS.md).
AUTO_ORDER_CUDA = ("triton", "cuda", "reference")
AUTO_ORDER_CPU = ("cpu", "reference")
PRIMITIVES = ("agg_conv", "agg_apply_", "agg_backward_reduce", "agg_backward_dz_",
              "agg_backward_gemm", "ida_upsample", "ida_upsample_backward")

_requested: Optional[str] = None
_loaded: Dict[str, object] = {}
_load_errors: Dict[str, str] = {}


class BackendError(RuntimeError):
    """A backend was asked for that cannot serve the given device, or does not exist."""


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in NAMES:
        raise BackendError(f"{source} must be one of {', '.join(NAMES)}; got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for this process: 'auto', 'triton', 'cuda', 'cpu' or 'reference'."""
    global _requested
    _requested = _check_name(name, "backend")


def get_backend() -> str:
    """The requested backend name (possibly 'auto')."""
    if _requested is not None:
        return _requested
    return _check_name(os.environ.get("DLA_FUSED_BACKEND", "auto"), "DLA_FUSED_BACKEND")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _extension():
    """dla_fused._C, or None with the import error remembered."""
    if "_C" not in _loaded:
        try:
            _loaded["_C"] = importlib.import_module("dla_fused._C")
        except ImportError as err:  # not built: the reference and triton backends still work
            _loaded["_C"] = None
            _load_errors["_C"] = str(err)
    return _loaded["_C"]


def _cpp_primitives():
    ops = torch.ops.dla_fused
    return types.SimpleNamespace(**{name: getattr(ops, name) for name in PRIMITIVES})


def _triton_primitives():
    from dla_fused.kernels import aggregation, ida_up
    table = {}
    for module in (aggregation, ida_up):
        table.update({name: getattr(module, name) for name in PRIMITIVES if hasattr(module, name)})
    return types.SimpleNamespace(**table)


def _reference_primitives():
    from dla_fused.ops import primitives
    return types.SimpleNamespace(**{name: getattr(primitives, name) for name in PRIMITIVES})


def not_supported_reasons(name: str, device_type: str) -> List[str]:
    """Why backend `name` cannot run on `device_type` ('cpu' or 'cuda'); empty when it can.
    Every backend takes float16, bfloat16, float32 and float64 activations."""
    reasons = []
    if device_type == "cuda" and not torch.cuda.is_available():
        reasons.append("no CUDA device is available")
    if name == "reference":
        return reasons
    if name == "cpu":
        if device_type != "cpu":
            reasons.append(f"the cpu backend runs on CPU tensors, not {device_type}")
        if _extension() is None:
            reasons.append("dla_fused._C is not built: " + _load_errors.get("_C", ""))
    elif name == "cuda":
        if device_type != "cuda":
            reasons.append(f"the cuda backend runs on CUDA tensors, not {device_type}")
        ext = _extension()
        if ext is None:
            reasons.append("dla_fused._C is not built: " + _load_errors.get("_C", ""))
        elif not ext.with_cuda:
            reasons.append("dla_fused._C was built without CUDA (see the build log)")
    elif name == "triton":
        if device_type == "cpu" and not triton_interpreted():
            reasons.append("triton runs on CPU tensors only under TRITON_INTERPRET=1")
        elif device_type not in ("cpu", "cuda"):
            reasons.append(f"triton does not run on {device_type} tensors")
        try:
            importlib.import_module("triton")
        except ImportError as err:
            reasons.append(f"triton is not installed: {err}")
    return reasons


def _load(name: str):
    if name not in _loaded:
        loader = {"cpu": _cpp_primitives, "cuda": _cpp_primitives,
                  "triton": _triton_primitives, "reference": _reference_primitives}[name]
        _loaded[name] = loader()
    return _loaded[name]


def resolve(device: torch.device) -> str:
    """The backend that will run on `device` under the current selection; raises BackendError
    when an explicitly requested backend cannot."""
    requested = get_backend()
    if requested != "auto":
        reasons = not_supported_reasons(requested, device.type)
        if reasons:
            raise BackendError(f"backend {requested!r} cannot run on {device.type}: " + "; ".join(reasons))
        return requested
    order = AUTO_ORDER_CUDA if device.type == "cuda" else AUTO_ORDER_CPU
    for name in order:
        if not not_supported_reasons(name, device.type):
            return name
    return "reference"


def primitives_for(device: torch.device):
    """The primitives namespace of the backend that runs on `device`."""
    return _load(resolve(device))


def backend_info(print_it: bool = True) -> str:
    """What was built, what can run where, and what is selected and why."""
    ext = _extension()
    if ext is None:
        built = "not built (" + _load_errors.get("_C", "") + ")"
    else:
        built = "built, CUDA kernels " + ("included" if ext.with_cuda else "not included")
    lines = [f"dla_fused backend: requested {get_backend()!r}"
             + ("" if _requested is not None else " (DLA_FUSED_BACKEND or default)"),
             "extension dla_fused._C: " + built,
             f"torch {torch.__version__}, CUDA device: "
             + (torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
             f"triton interpreter: {'on' if triton_interpreted() else 'off'}"]
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and not torch.cuda.is_available():
            lines.append("cuda: no CUDA device is available")
            continue
        usable = [n for n in NAMES[1:] if not not_supported_reasons(n, device_type)]
        lines.append(f"{device_type}: usable {', '.join(usable) or 'none'}")
        for n in NAMES[1:]:
            for reason in not_supported_reasons(n, device_type):
                lines.append(f"  {n}: {reason}")
        try:
            chosen = resolve(torch.device(device_type))
            why = "requested" if get_backend() != "auto" else "first usable of auto's order " + "/".join(
                AUTO_ORDER_CUDA if device_type == "cuda" else AUTO_ORDER_CPU)
            lines.append(f"  selected for {device_type}: {chosen} ({why})")
        except BackendError as err:
            lines.append(f"  selected for {device_type}: none ({err})")
    text = "\n".join(lines)
    if print_it:
        print(text)
    return text
