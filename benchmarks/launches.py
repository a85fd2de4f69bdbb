"""Kernel launches per call, measured: Triton launches and the ATen ops that launch kernels.

`count_launches(fn)` runs fn once and counts
  * Triton launches: every `kernel[grid](...)` that runs (on a GPU each is one kernel launch;
    under TRITON_INTERPRET=1, where the kernels run on CPU tensors, each is still one launch);
  * ATen ops that would launch a kernel on a GPU: every op dispatched while fn runs (forward and
    autograd's backward alike), leaving out those that only make views or allocate (their schema
    returns an alias of an input, or they are in NO_KERNEL) and what the Triton interpreter itself
    runs inside a launch.

An op of the C++ extension (dla_fused::*) counts once, whatever it runs inside. On a GPU an ATen
op may launch more than one kernel (cuBLAS and cuDNN choose); there `cuda_kernel_launches` counts
the kernels themselves. Eager PyTorch is counted the same way as the fused ops, so the two are
comparable.
"""
import contextlib
from collections import Counter
from typing import Callable, Dict, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that allocate or only change metadata: no kernel on any device.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
             "set_", "lift_fresh", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type", "detach"}


def launches_kernel(func) -> bool:
    """Whether ATen op `func` (an OpOverload) launches a kernel: not a view (a return aliasing an
    input without writing it) and not an allocation or metadata op."""
    name = func._schema.name.split("::")[-1]
    if name in NO_KERNEL:
        return False
    for ret in func._schema.returns:
        alias = ret.alias_info
        if alias is not None and not alias.is_write:
            return False
    return True


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and launches_kernel(func):
            self.ops[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _triton_counted(counter: _AtenCounter, kernels: Counter):
    """Count Triton launches by kernel name, and pause the ATen count inside each (the interpreter
    moves data with torch ops of its own)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    executor = interpreter.GridExecutor
    original = executor.__call__

    def counted(self, *args, **kwargs):
        kernels[getattr(self.fn, "__name__", "kernel")] += 1
        counter.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.paused -= 1
    executor.__call__ = counted
    try:
        yield
    finally:
        executor.__call__ = original


def count_launches(fn: Callable[[], object]) -> Tuple[Counter, Counter]:
    """Run fn once; returns (Triton launches by kernel name, kernel-launching ATen ops by name).
    Triton launches are counted under the interpreter (TRITON_INTERPRET=1); on a GPU use the
    profiler instead (`cuda_kernel_launches`)."""
    counter, kernels = _AtenCounter(), Counter()
    with _triton_counted(counter, kernels), counter:
        fn()
    return kernels, counter.ops


def cuda_kernel_launches(fn: Callable[[], object]) -> Dict[str, int]:
    """CUDA kernels launched while fn runs, by kernel name, from the profiler (GPU only)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    launched = Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            launched[event.name] += 1
    return dict(launched)
