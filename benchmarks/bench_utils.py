"""Shared pieces of the benchmark suites: device and sizes, timing, memory, the result registry."""
import ctypes
import os
import platform
import time
from typing import Callable, Dict, List, Optional

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
# Sizes by device: the GPU targets are stated at batch 64 (ops) / 128 (models), 224 px, bf16,
# channels_last; the CPU run is kept small enough to finish in minutes on 2 cores.
OP_BATCH, OP_IMAGE = (64, 224) if GPU else (8, 128)
MODEL_BATCH, MODEL_IMAGE = (128, 224) if GPU else (8, 128)
DTYPE = torch.bfloat16 if GPU else torch.float32
LAYOUT = torch.channels_last if GPU else torch.contiguous_format
ROUNDS = 20 if GPU else 5

RESULTS: List[Dict] = []


def fused_backends() -> List[str]:
    from dla_fused import backend
    names = ("triton", "cuda") if GPU else ("cpu",)
    return [n for n in names if not backend.not_supported_reasons(n, DEVICE.type)]


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def time_per_call(benchmark, fn: Callable[[], object], inner: int) -> float:
    """Median seconds of one call of fn, timed by pytest-benchmark over `inner` calls per round
    (the device is synchronised once per round, so launches overlap as in training)."""
    def many():
        for _ in range(inner):
            fn()
        sync()
    # the warm-up round (compilation, autotuning, allocator) is untimed; with --benchmark-disable,
    # pedantic's one untimed call is it
    benchmark.pedantic(many, rounds=ROUNDS, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: time it ourselves
        start = time.perf_counter()
        many()
        return (time.perf_counter() - start) / inner
    return stats.stats.median / inner


_libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes allocated while fn runs, beyond what was allocated before: the CUDA caching
    allocator's statistics on GPU; on CPU the growth of the resident set's high-water mark after
    returning free heap memory to the system (PyTorch's profiler reports no CPU peak)."""
    if GPU:
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    if _libc is None or not os.path.exists("/proc/self/clear_refs"):
        return None
    _libc.malloc_trim(0)
    base = _proc_status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    fn()
    return _proc_status("VmHWM:") - base


_COPY_BANDWIDTH: Optional[float] = None


def copy_bandwidth() -> Optional[float]:
    """Bytes per second (read + write) of a large device-to-device copy, measured once."""
    global _COPY_BANDWIDTH
    if not GPU:
        return None
    if _COPY_BANDWIDTH is None:
        src = torch.randn(512 * 2**20 // 4, device=DEVICE)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            dst.copy_(src)
        end.record()
        sync()
        _COPY_BANDWIDTH = 2 * src.numel() * 4 * 20 / (start.elapsed_time(end) / 1e3)
    return _COPY_BANDWIDTH


def record(group: str, case: str, provider: str, mode: str, seconds: float, memory: Optional[int] = None,
           saved: Optional[int] = None, min_bytes: Optional[int] = None, images: Optional[int] = None) -> None:
    RESULTS.append(dict(group=group, case=case, provider=provider, mode=mode, seconds=seconds, memory=memory,
                        saved=saved, min_bytes=min_bytes, images=images))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> Dict[str, str]:
    import triton
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
            "device": torch.cuda.get_device_name() if GPU else f"{_cpu_name()}, {os.cpu_count()} cores",
            "dtype": str(DTYPE).replace("torch.", ""), "layout": "channels_last" if GPU else "NCHW"}
    if GPU:
        info["copy_bandwidth_GBps"] = f"{copy_bandwidth() / 1e9:.0f}"
    return info
