"""Shared pieces of the benchmark suites: device and sizes, interleaved timing, memory, the result
registry.

Every benchmark test times all providers of one case, in both memory layouts, in interleaved
rounds (each round runs every provider once, the order rotated by one place per round): at least
MIN_ROUNDS, then more up to ROUNDS while some provider's per-round ratio to eager is still spread
(interquartile range over NARROW of its median); peak memory likewise, MIN_MEMORY_ROUNDS to
MEMORY_ROUNDS. The summary (bench_summary.py) pairs the figures round by
round: ratios against eager in the same layout, median [q1–q3], met / MISSED / inconclusive.
"""
import ctypes
import os
import platform
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from bench_summary import spread

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
# Sizes by device: the GPU targets are stated at batch 64 (ops) / 128 (models), 224 px, bf16; the
# CPU run is kept small enough to finish in minutes on 2 cores.
OP_BATCH, OP_IMAGE = (64, 224) if GPU else (8, 128)
MODEL_BATCH, MODEL_IMAGE = (128, 224) if GPU else (8, 128)
DTYPE = torch.bfloat16 if GPU else torch.float32
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
# At least 5 rounds, for the interquartile range to mean something; more only where it is wide.
MIN_ROUNDS, ROUNDS = (10, 20) if GPU else (5, 7)
# CUDA's allocator statistics repeat exactly; the CPU's RSS mostly, not always
MIN_MEMORY_ROUNDS, MEMORY_ROUNDS = (3, 3) if GPU else (3, 5)
# "Spread": an interquartile range over NARROW of the median. On the CPU half of all per-round
# ratios spread 3-8% (2026-12-08 run), so 5% would add rounds to nearly every case.
NARROW = 0.05 if GPU else 0.10

RESULTS: List[Dict] = []
# Kernel launches per forward + backward of an op (benchmarks/test_launches.py): dicts with group,
# case, provider, counted ("interpreter" or "profiler"), triton, aten, kernels.
LAUNCHES: List[Dict] = []
ROOFLINE: List[Dict] = []  # benchmarks/test_roofline.py's rows


def fused_backends() -> List[str]:
    """The device's fused backends, and `auto` (the default: measured per call on a GPU, a
    measured choice per op on the CPU), then `+lean` variants: memory_efficient=True (the
    aggregation node recomputes its conv output in backward) where the device's default keeps it
    (the CPU)."""
    from dla_fused import backend
    from dla_fused.ops.aggregation import default_memory_efficient
    names = ("triton", "cuda") if GPU else ("cpu",)
    usable = [n for n in names if not backend.not_supported_reasons(n, DEVICE.type)]
    lean = [] if default_memory_efficient(DEVICE) else [f"{n}+lean" for n in usable]
    return usable + ["auto"] + lean


def lean(provider: str) -> bool:
    """Whether `provider` runs the aggregation node with memory_efficient=True."""
    return "+lean" in provider


def select_backend(provider: str) -> None:
    """Make the dla_fused backend of a provider current: 'fused:NAME' or 'fused:NAME+compiled'
    run NAME, anything else 'auto' (the reference ops ignore it)."""
    from dla_fused import backend
    backend.set_backend(provider.split(":")[1].split("+")[0] if provider.startswith("fused:") else "auto")


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def _rotated(keys: List, k: int) -> List:
    k %= len(keys)
    return keys[k:] + keys[:k]


Fns = Dict[Tuple[str, str], Callable[[], object]]  # (layout, provider) -> one call


def interleaved(benchmark, fns: Fns, inner: int) -> Dict[Tuple[str, str], List[float]]:
    """Seconds per call of each fn, one figure per round, MIN_ROUNDS to ROUNDS rounds (settled).
    A round times `inner` calls of every fn in turn (its provider's backend selected first,
    untimed; the device synchronised before and after, so launches overlap as in training).
    pytest-benchmark times the first MIN_ROUNDS (benchmark.pedantic); with --benchmark-disable it
    runs one and the rest run here, so the figures are the same either way. One untimed call of
    each fn first (compilation, autotuning, allocator)."""
    keys = list(fns)
    times = {k: [] for k in keys}

    def one_round():
        for key in _rotated(keys, len(times[keys[0]])):
            select_backend(key[1])
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fns[key]()
            sync()
            times[key].append((time.perf_counter() - start) / inner)
    for key in keys:
        select_backend(key[1])
        fns[key]()
    sync()
    benchmark.pedantic(one_round, rounds=MIN_ROUNDS)
    while len(times[keys[0]]) < MIN_ROUNDS or (len(times[keys[0]]) < ROUNDS and not settled(times, True)):
        one_round()
    return times


def settled(figures: Dict[Tuple[str, str], List[float]], inverse: bool) -> bool:
    """Whether every provider's per-round ratio to eager in its layout (eager / provider when
    `inverse`, times; provider / eager otherwise, memory) has an interquartile range within NARROW
    of its median. A layout without eager: its providers' own figures."""
    for (layout, provider), values in figures.items():
        eager = figures.get((layout, "eager"))
        ratios = [(e / v if inverse else v / e) if e and v else 0.0 for e, v in zip(eager, values)] if eager else values
        s = spread(ratios)
        if s.q3 - s.q1 > NARROW * abs(s.median):
            return False
    return True


_libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def settle_allocator() -> None:
    """Make every CPU figure independent of what ran before it in the process. glibc serves large
    blocks with fresh mmap'ed memory that page-faults on first touch and returns freed memory to
    the system, adapting both thresholds to the blocks freed so far; so the same case measured
    alone or early in a run was up to 2x slower (eager aggregation node, 8x64x32x32, NCHW:
    7.8-10 ms) than measured later in the full run (4.5-5 ms). Here freed memory is kept and reused
    (both thresholds fixed at 1 GiB), as a caching allocator (jemalloc, tcmalloc, PyTorch's own on
    GPUs) does: no provider pays page faults on its temporaries, which favours the provider with
    more temporaries (eager). Peak memory stays comparable: peak_memory() returns the free
    memory to the system before each measurement."""
    if _libc is None or GPU:
        return
    _libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    _libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


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


def interleaved_memory(fns: Fns) -> Optional[Dict[Tuple[str, str], List[int]]]:
    """peak_memory of each fn, MIN_MEMORY_ROUNDS to MEMORY_ROUNDS times (settled), in rotated
    order as interleaved() does."""
    keys = list(fns)
    peaks = {k: [] for k in keys}
    for r in range(MEMORY_ROUNDS):
        if r >= MIN_MEMORY_ROUNDS and settled(peaks, False):
            break
        for key in _rotated(keys, r):
            select_backend(key[1])
            peak = peak_memory(fns[key])
            if peak is None:
                return None
            peaks[key].append(peak)
    return peaks


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


def record(group: str, case: str, layout: str, mode: str, provider: str, times: List[float],
           memory: Optional[List[int]] = None, saved: Optional[int] = None, min_bytes: Optional[int] = None,
           images: Optional[int] = None, parts: Optional[Dict[Tuple[str, str], int]] = None) -> None:
    """One provider's figures for a case: `times` (seconds per call) and `memory` (peak bytes) per
    round, round r of every provider of the case measured in the same interleaved round; `parts`
    ({(op group, op case): calls}) for a model step, the op cases it is made of."""
    RESULTS.append(dict(group=group, case=case, layout=layout, mode=mode, provider=provider, times=times,
                        memory=memory, saved=saved, min_bytes=min_bytes, images=images,
                        parts=parts and [[group_, case_, n] for (group_, case_), n in parts.items()]))


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
            "dtype": str(DTYPE).replace("torch.", ""), "rounds": f"{MIN_ROUNDS}-{ROUNDS}",
            "memory rounds": f"{MIN_MEMORY_ROUNDS}-{MEMORY_ROUNDS}"}
    if GPU:
        info["copy_bandwidth_GBps"] = f"{copy_bandwidth() / 1e9:.0f}"
    return info
