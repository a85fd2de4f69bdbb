"""Which implementation of the kernel primitives runs the fused ops.

Backends (each provides the primitives of dla_fused/ops/primitives.py under the same names):
  cpu        C++ kernels in csrc/cpu (CPU tensors)
  cuda       C++/CUDA kernels in csrc/cuda (CUDA tensors)
  triton     Triton kernels in kernels/ (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  reference  the plain-PyTorch primitives (any device; the spec, not tuned for speed)
  eager      no fusion: the op's plain-PyTorch reference composition with PyTorch's own autograd
             (any device; what the unfused model runs), for an op no fused backend beats
  tune       measure: the first call of an op with a new shape key times one forward (+ backward
             when gradients are wanted) through every usable backend on that device, runs the
             fastest and keeps that choice for the key (`backend_info()` lists choices and times)
  auto       the default: `tune` on CUDA devices (among triton, cuda and reference); on CPU a fixed
             choice per op, measured (AUTO_ORDER_CPU; interpreted Triton is for tests, never picked)

`eager` with a process group (synchronised statistics, which the plain composition cannot do) runs
the fused op on the reference primitives.

Choose with `set_backend(name)` or the environment variable DLA_FUSED_BACKEND; see what was built
and what is selected, and why, with `backend_info()`. A call's forward and backward run on the
same backend.
"""
import importlib
import os
import statistics
import time
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch

NAMES = ("auto", "tune", "triton", "cuda", "cpu", "reference", "eager")
KERNELS = NAMES[2:6]  # the primitive implementations that tuning measures
# `auto` on CPU, per op: the first usable of these. Chosen by measurement (benchmarks/RESULTS.md,
# float32, both layouts, interleaved against eager): no fused backend is yet as fast as PyTorch's
# own ops on the CPU, so both ops run unfused there by default. The C++ kernels reach 0.70-1.13x
# of eager for the aggregation node (forward + backward; training steps 0.81-0.98x, with 7-10%
# fewer bytes saved for backward), the IDA-Up step 0.11-0.69x. `set_backend("cpu")`
# selects the C++ kernels for their memory savings. On CUDA `auto` measures every call's shape
# instead (`tune`).
AUTO_ORDER_CPU = {"aggregation_node": ("eager",), "ida_up": ("eager",)}
OPS = tuple(AUTO_ORDER_CPU)
TUNE_REPEATS = 3
PRIMITIVES = ("agg_conv", "agg_apply_", "agg_apply", "agg_activation_grad", "agg_backward_reduce", "agg_backward_dz_", "agg_backward_dz",
              "agg_backward_gemm", "ida_upsample", "ida_upsample_backward")

_requested: Optional[str] = None
_loaded: Dict[str, object] = {}
_load_errors: Dict[str, str] = {}
# tuned choices: (device type, device index, op, *shape key) -> (backend, {backend: seconds})
_tuned: Dict[tuple, Tuple[str, Dict[str, float]]] = {}


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
        except (ImportError, OSError) as err:  # not built (or a library missing): the reference
            # and triton backends still work
            _loaded["_C"] = None
            _load_errors["_C"] = str(err)
    return _loaded["_C"]


def _cpp_primitives():
    ops = torch.ops.dla_fused
    return types.SimpleNamespace(**{name: getattr(ops, name) for name in PRIMITIVES})


# Optional primitives: a backend that has them lets ops/_bn.py skip its per-channel glue
# (agg_conv_affine: statistics and BatchNorm's affine; agg_backward_coefficients: the backward's
# reduction and every per-channel vector; bn_affine: BatchNorm's scale and shift;
# agg_forward_train and agg_backward_fused, ida_forward_train and ida_backward_fused: each op's
# whole training forward and backward, docs/design.md section 2). Only the Triton backend has them.
FUSED_PRIMITIVES = ("agg_conv_affine", "agg_backward_coefficients", "bn_affine", "agg_forward_train",
                    "agg_backward_fused", "ida_forward_train", "ida_backward_fused")


def _triton_primitives():
    from dla_fused.kernels import aggregation, ida_up
    table = {}
    for module in (aggregation, ida_up):
        table.update({name: getattr(module, name) for name in PRIMITIVES + FUSED_PRIMITIVES
                      if hasattr(module, name)})
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
    if name in ("reference", "eager"):
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
    if name == "eager":  # where it cannot run unfused (a process group): the reference primitives
        name = "reference"
    if name not in _loaded:
        loader = {"cpu": _cpp_primitives, "cuda": _cpp_primitives,
                  "triton": _triton_primitives, "reference": _reference_primitives}[name]
        _loaded[name] = loader()
    return _loaded[name]


def _tunes(requested: str, device: torch.device) -> bool:
    return requested == "tune" or (requested == "auto" and device.type == "cuda")


def tunes(device: torch.device) -> bool:
    """Whether calls on `device` choose their backend per shape key (`tune`) under the current selection."""
    return _tunes(get_backend(), device)


# resolve()'s answers: (requested, device type, op, triton interpreted) -> backend name. What a
# backend can serve does not change within a process, except the interpreter switch (in the key).
_resolved: Dict[tuple, str] = {}


def resolve(device: torch.device, op: str) -> str:
    """The backend that will run `op` (one of OPS) on `device` under the current selection ('tune'
    where it is measured per call); raises BackendError when an explicitly requested backend
    cannot."""
    requested = get_backend()
    cache_key = (requested, device.type, op, triton_interpreted())
    name = _resolved.get(cache_key)
    if name is None:
        name = _resolve(requested, device, op)
        _resolved[cache_key] = name
    return name


def _resolve(requested: str, device: torch.device, op: str) -> str:
    if _tunes(requested, device):
        return "tune"
    if requested != "auto":
        reasons = not_supported_reasons(requested, device.type)
        if reasons:
            raise BackendError(f"backend {requested!r} cannot run on {device.type}: " + "; ".join(reasons))
        return requested
    for name in AUTO_ORDER_CPU[op]:
        if not not_supported_reasons(name, device.type):
            return name
    return "reference"


def _usable(device_type: str) -> List[str]:
    """The backends that can run on `device_type`: what tuning measures (`auto` tunes only on
    CUDA, so interpreted Triton is measured only when `tune` is asked for on the CPU)."""
    return [n for n in KERNELS if not not_supported_reasons(n, device_type)]


def _seconds(fn: Callable[[], None], device: torch.device) -> float:
    """Median wall time of fn over TUNE_REPEATS runs, after one untimed run (compilation, caches)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    fn()
    times = []
    for _ in range(TUNE_REPEATS):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tuned_key(device: torch.device, key: tuple) -> tuple:
    return (device.type, device.index) + tuple(key)


def primitives_for(device: torch.device, op: str, key: tuple = (),
                   trial: Optional[Callable[[object], None]] = None):
    """The primitives namespace that runs `op` on `device`. Under tuning, `key` names the call's
    shapes and flags and `trial(P)` runs one forward (+ backward) with primitives P: the first call
    per key times it on every candidate backend and keeps the fastest; later calls (and the
    backward of the same key) reuse that choice. Without `trial` an unseen key falls back to the
    first usable backend."""
    name = resolve(device, op)
    if name != "tune":
        return _load(name)
    full_key = _tuned_key(device, (op,) + tuple(key))
    if full_key not in _tuned:
        candidates = _usable(device.type)
        if trial is None:
            return _load(candidates[0] if candidates else "reference")
        times = {n: _seconds(lambda: trial(_load(n)), device) for n in candidates}
        _tuned[full_key] = (min(times, key=times.get), times)
    return _load(_tuned[full_key][0])


def tuned_choices() -> Dict[tuple, Tuple[str, Dict[str, float]]]:
    """What tuning chose so far: {(device type, index, op, *shape key): (backend, seconds by backend)}."""
    return dict(_tuned)


def clear_tuned() -> None:
    _tuned.clear()


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
        usable = _usable(device_type)
        lines.append(f"{device_type}: usable {', '.join(usable) or 'none'}")
        for n in KERNELS:
            for reason in not_supported_reasons(n, device_type):
                lines.append(f"  {n}: {reason}")
        device = torch.device(device_type)
        for op in OPS:
            try:
                chosen = resolve(device, op)
            except BackendError as err:
                lines.append(f"  {op} on {device_type}: none ({err})")
                continue
            if chosen == "tune":
                among = ", ".join(usable)
                lines.append(f"  {op} on {device_type}: measured per shape on first call, among {among}")
            else:
                why = "requested" if get_backend() != "auto" else "auto's measured CPU choice"
                what = " (unfused: PyTorch's own ops)" if chosen == "eager" else ""
                lines.append(f"  {op} on {device_type}: {chosen}{what} ({why})")
    for key, (winner, times) in _tuned.items():
        measured = ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in sorted(times.items(), key=lambda kv: kv[1]))
        lines.append(f"tuned {key[0]}:{key[2]} {key[3:]}: {winner} ({measured})")
    text = "\n".join(lines)
    if print_it:
        print(text)
    return text


# Loaded now rather than on first use: backend.resolve runs inside torch.compile's trace, which
# cannot import a module (a fresh process whose first fused call is compiled would fail).
_extension()
