"""A traffic, FLOP and launch model of one forward + backward (training-mode BN) of the fused ops
on a GPU, for eager PyTorch and for the Triton path, at the GPU benchmark shapes: bf16,
channels_last, the op cases of a batch of 64 images at 224 px (`gpu_cases`).

Where the numbers come from (the code, not estimates):
  * `trace_triton` runs the op once at the full shape on the CPU, with every Triton launch
    intercepted and recorded instead of executed. The host code takes its GPU branches (kernels
    see `interpreted()` False and an H200's 132 multiprocessors, autotuning off: each tunable
    kernel gets its first config, which is what runs with DLA_FUSED_TRITON_AUTOTUNE=0; an
    autotuned winner may tile differently). Every ATen op the path dispatches is recorded too.
  * `trace_eager` runs eager PyTorch's composition on the meta device and records its ATen ops.
  * A Triton launch's bytes and FLOPs come from `RULES`, one per kernel, written from the
    kernel's code: which tensor arguments its programs load and store, and how many times (a
    grid axis over output-channel blocks re-streams the inputs once per block). A kernel without
    a rule raises, so the model cannot silently fall behind the kernels.
  * An ATen op reads each tensor argument once and writes each output once, except where its GPU
    kernels make more passes (`_aten_bytes`: BatchNorm's training forward reads its input twice,
    statistics then normalisation; its backward reads the input and the gradient twice; the conv
    backward's dgrad and wgrad are separate GEMMs, each reading grad_output).
  * HBM traffic: a tensor that one launch re-streams is read from HBM once when the programs
    re-reading a piece of it are adjacent in launch order (grid axis 0) or when the whole tensor
    fits in the L2 cache (L2_BYTES), else once per re-read; across launches nothing is assumed to
    stay cached (a tensor read by two kernels costs twice). Weights and per-channel vectors are
    read once per launch.

Predicted time of a path: the sum over its kernels of max(bytes / BANDWIDTH, FLOPs / PEAK) (each
kernel on its own roofline), and, separately, that plus LAUNCH_S per launch. The ratios are eager
over fused: "bytes" (at equal bandwidth), "roofline" (bytes and the FLOP ceiling) and "+launch".
"""
import contextlib
import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from launches import count_launches, launches_kernel

# H200 SXM: HBM3e sustained ~4.3 TB/s (of 4.8 peak), dense bf16 tensor-core peak ~989 TFLOP/s,
# 132 multiprocessors. LAUNCH_S: the host and launch cost of one kernel without CUDA graphs, an
# assumption (a few microseconds is typical of PyTorch eager), not a measurement.
BANDWIDTH = 4.3e12
L2_BYTES = 50 * 2 ** 20
PEAK = 989e12
SMS = 132
LAUNCH_S = 4e-6
BATCH, IMAGE, DTYPE = 64, 224, torch.bfloat16


@dataclass
class Kernel:
    name: str
    read: int
    write: int
    flops: int = 0
    triton: bool = False

    @property
    def seconds(self) -> float:
        return max((self.read + self.write) / BANDWIDTH, self.flops / PEAK)


@dataclass
class Trace:
    kernels: List[Kernel] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(k.read + k.write for k in self.kernels)

    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)

    @property
    def launches(self) -> int:
        return len(self.kernels)

    @property
    def triton_launches(self) -> int:
        return sum(k.triton for k in self.kernels)

    @property
    def seconds(self) -> float:
        return sum(k.seconds for k in self.kernels)

    @property
    def seconds_with_launches(self) -> float:
        return self.seconds + LAUNCH_S * self.launches

    def by_kernel(self) -> Dict[str, Tuple[int, int]]:
        """{kernel name: (launches, bytes)}."""
        out: Dict[str, Tuple[int, int]] = {}
        for k in self.kernels:
            n, b = out.get(k.name, (0, 0))
            out[k.name] = (n + 1, b + k.read + k.write)
        return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# ------------------------------------------------------------------------------------------------
# ATen ops

def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _conv_flops(x_shape, w_shape, out_shape, transposed) -> int:
    """2 x multiply-adds: one per (output element, weight tap of its group), or for a transposed
    convolution one per (input element, tap)."""
    elements = x_shape if transposed else out_shape
    return 2 * elements[0] * elements[1] * elements[2] * elements[3] * w_shape[1] * w_shape[2] * w_shape[3]


def _aten_bytes(func, args, kwargs, out) -> Tuple[int, int, int]:
    """(read, write, flops) of one ATen op as its GPU kernels move data (module docstring)."""
    name = func._schema.name.split("::")[-1]
    schema_args = func._schema.arguments
    named = dict(zip([a.name for a in schema_args], args), **(kwargs or {}))
    written = {a.name for a in schema_args if a.alias_info is not None and a.alias_info.is_write}
    outputs = _tensors(out)
    if name in ("fill_", "zero_", "zeros_like", "ones_like", "full_like", "full", "zeros", "ones", "scalar_tensor"):
        return 0, sum(map(_nbytes, outputs)), 0
    if name == "copy_":
        return _nbytes(named["src"]), _nbytes(named["self"]), 0
    if "batch_norm" in name and "backward" not in name and "elemt" not in name:
        x = named.get("input")
        training = named.get("training", True)
        read = (2 if training else 1) * _nbytes(x) + sum(
            _nbytes(v) for k, v in named.items() if k != "input" for v in _tensors(v))
        return read, sum(map(_nbytes, outputs)), 0
    if "batch_norm_backward" in name:
        x, g = named.get("input"), named.get("grad_out", named.get("grad_output"))
        read = 2 * (_nbytes(x) + _nbytes(g)) + sum(
            _nbytes(v) for k, v in named.items() if k not in ("input", "grad_out", "grad_output")
            for v in _tensors(v))
        return read, sum(map(_nbytes, outputs)), 0
    if name == "convolution_backward":
        grad, x, w = named["grad_output"], named["input"], named["weight"]
        mask = named["output_mask"]
        gemms = int(mask[0]) + int(mask[1])
        read = gemms * _nbytes(grad) + (_nbytes(x) if mask[1] else 0) + (_nbytes(w) if mask[0] else 0)
        flops = gemms * _conv_flops(x.shape, w.shape, grad.shape, named["transposed"])
        return read, sum(map(_nbytes, outputs)), flops
    read = sum(_nbytes(t) for a in schema_args if a.name in named for t in _tensors(named[a.name]))
    write = sum(map(_nbytes, outputs))
    flops = 0
    if name == "convolution":
        flops = _conv_flops(named["input"].shape, named["weight"].shape, outputs[0].shape, named["transposed"])
    elif name in ("mm", "addmm", "bmm", "baddbmm"):
        a = named["mat1"] if "mat1" in named else named.get("self" if name in ("mm", "bmm") else "batch1")
        flops = 2 * outputs[0].numel() * a.shape[-1]
    if written and outputs:  # in-place or out=: the written argument is the output, counted once
        read -= sum(_nbytes(named[n]) for n in written if n in named and n != "self")
    return read, write, flops


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, trace: Trace):
        super().__init__()
        self.trace, self.paused = trace, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and launches_kernel(func):
            read, write, flops = _aten_bytes(func, args, kwargs, out)
            self.trace.kernels.append(Kernel(func._schema.name.split("::")[-1], read, write, flops))
        return out


# ------------------------------------------------------------------------------------------------
# Triton kernels: one rule per kernel, from its code (kernels/aggregation.py, kernels/ida_up.py)

def _blocks(grid, axis):
    return grid[axis] if axis < len(grid) else 1


def _streamed(nbytes: int, times: int) -> int:
    """HBM bytes of an operand one launch streams `times` times: once when it fits in L2."""
    return nbytes if nbytes <= L2_BYTES else nbytes * times


def _rule_conv(a, grid):
    """_conv_kernel: program (pixel tile, output-channel block) loads its pixels of every child
    over all input channels, so the children are read once per output-channel block (from cache
    when those programs are adjacent, CO_FIRST); stores its
    output tile (unless STORE is off: statistics only); the epilogue loads the residual (and
    gate) tile, and BatchNorm's scale and shift (HAS_SCALE) or a bias (HAS_SHIFT); with STATS,
    stores per-tile mean and M2 per channel (and a count per tile)."""
    children = a["children"]
    c_in = sum(c[1] for c in children)
    pixels, c_out = a["num_pixels"], a["c_out"]
    children_bytes = sum(_nbytes(c[0]) for c in children)
    # re-read once per output block: by adjacent programs with CO_FIRST (once), else streamed
    read = (children_bytes if a["CO_FIRST"] else _streamed(children_bytes, _blocks(grid, 1))) \
        + c_out * c_in * a["w_ptr"].element_size()
    p_tiles = _blocks(grid, 1) if a["CO_FIRST"] else _blocks(grid, 0)
    if a["HAS_SHIFT"] or a["HAS_SCALE"]:
        read += (1 + a["HAS_SCALE"]) * c_out * a["shift_ptr"].element_size()
    if a["HAS_RESIDUAL"]:
        read += _nbytes(a["res_ptr"])
        if a["HAS_GATE"]:
            read += _nbytes(a["gate_ptr"])
    write = _nbytes(a["out_ptr"]) if a["STORE"] else 0
    if a["STATS"]:
        acc = a["mean_part"].element_size()
        write += p_tiles * (2 * c_out + 1) * acc
    return read, write, 2 * pixels * c_in * c_out


def _rule_finalize(a, grid):
    """_finalize_stats_kernel: program (channel block, tile chunk) walks its tiles twice (means;
    means, M2 and counts) and stores its chunk's (count, mean, M2); the last program of a block
    walks the chunks the same way and stores mean and variance, with AFFINE also scale and shift
    (reading gamma and beta), with RUNNING also the running mean and variance (read and stored)
    and num_batches_tracked."""
    tiles = a["mean_part"].shape[0]  # rows allocated for the GEMM's tiles (an upper bound)
    acc = a["mean_part"].element_size()
    channels, blocks, chunks = a["channels"], _blocks(grid, 0), _blocks(grid, 1)
    read = (3 * tiles * channels + 2 * tiles * blocks + 3 * chunks * channels + 2 * chunks * blocks) * acc
    write = (2 * chunks * channels + chunks * blocks + 2 * channels) * acc
    if a["AFFINE"]:
        read += channels * (a["gamma_ptr"].element_size() + a["beta_ptr"].element_size())
        write += 2 * channels * acc
    if a["RUNNING"]:
        running = channels * (a["rmean_ptr"].element_size() + a["rvar_ptr"].element_size())
        nbt = 2 * a["nbt_ptr"].element_size() if a["HAS_NBT"] else 0
        read, write = read + running + nbt // 2, write + running + nbt // 2
    return read, write, 0


def _rule_coefficients(a, grid):
    """_coefficients_kernel: the reduction's split partials (sums of g and g (z - mean)), var
    and gamma; stores grad gamma, grad beta, scale and, with batch statistics, the two dz
    coefficients."""
    acc, channels = a["part_ptr"].element_size(), a["channels"]
    read = 2 * a["splits"] * channels * acc + channels * (acc + a["gamma_ptr"].element_size())
    return read, (5 if a["BATCH_STATS"] else 3) * channels * acc, 0


def _rule_apply(a, grid):
    """_apply_kernel: z (+ residual) in, out (in place or not) out."""
    z = _nbytes(a["z_ptr"])
    return z + (_nbytes(a["res_ptr"]) if a["HAS_RESIDUAL"] else 0), _nbytes(a["out_ptr"]), 0


def _rule_activation_grad(a, grid):
    """_activation_grad_kernel: grad_out and z (+ residual) in, the activation's gradient out."""
    read = _nbytes(a["go_ptr"]) + _nbytes(a["z_ptr"]) + (_nbytes(a["res_ptr"]) if a["HAS_RESIDUAL"] else 0)
    return read, _nbytes(a["out_ptr"]), 0


def _rule_backward_sums(a, grid):
    """_backward_sums_kernel: program (output block, split) walks its pixel tiles: the children
    (RECOMPUTE: the product again, each block's programs adjacent on axis 0, so once) or the kept
    z, grad_out, and with a residual its tile of children[0] (already in cache when recomputing:
    the product just read it); stores two partial rows per split, which the last split of a
    block reads back, then six per-channel vectors."""
    children, c_out = a["children"], a["c_out"]
    acc = a["part_ptr"].element_size()
    splits = _blocks(grid, 1)
    read = _nbytes(a["go_ptr"]) + 4 * c_out * acc
    flops = 0
    if a["RECOMPUTE"]:
        c_in = sum(c[1] for c in children)
        read += sum(_nbytes(c[0]) for c in children) + c_out * c_in * a["w_ptr"].element_size()
        flops = 2 * a["num_pixels"] * c_in * c_out
    else:
        read += _nbytes(a["z_ptr"]) + (_nbytes(a["res_ptr"]) if a["HAS_RESIDUAL"] else 0)
    partials = 2 * splits * c_out * acc
    return read + partials, partials + 6 * c_out * acc, flops


def _rule_backward_chained(a, grid):
    """_backward_chained_kernel: program (input block, split) walks its pixel tiles; the programs
    of one split, adjacent on axis 0, walk the same tiles together, so grad_out, the kept z (or,
    RECOMPUTE, the children of the product) and the children are read once; W once; stores grad x
    (every child once) and grad W, with more than one split through fp32 partials that the last
    split of a block reads back. FLOPs: grad x and grad W, the product again per input block when
    recomputing, and the residual's one-hot product."""
    children, c_out, c_in, pixels = a["children"], a["c_out"], a["c_in"], a["num_pixels"]
    acc = a["mean_ptr"].element_size()
    blocks, splits = _blocks(grid, 0), _blocks(grid, 1)
    read = _nbytes(a["go_ptr"]) + sum(_nbytes(c[0]) for c in children) + c_out * c_in * a["w_ptr"].element_size() \
        + 5 * c_out * acc
    gemm = 2 * pixels * c_in * c_out
    flops = 2 * gemm + (blocks * gemm if a["RECOMPUTE"] else 0)
    if not a["RECOMPUTE"]:
        read += _nbytes(a["z_ptr"])
    if a["HAS_RESIDUAL"]:
        flops += 2 * pixels * a["BLOCK_CO"] * children[0][1]
    write = sum(_nbytes(g[0]) for g in a["grads"]) + c_out * c_in * a["gw_ptr"].element_size()
    if splits > 1:
        partials = splits * c_out * c_in * a["part_ptr"].element_size()
        read, write = read + partials, write + partials
    return read, write, flops


def _rule_reduce(a, grid):
    """_reduce_kernel: grad_out (and out for the ReLU mask) and z; stores two partial sums per
    (split, channel)."""
    read = _nbytes(a["go_ptr"]) + _nbytes(a["z_ptr"]) + (_nbytes(a["out_ptr"]) if a["HAS_OUT"] else 0)
    return read, 2 * _blocks(grid, 0) * a["channels"] * a["part_ptr"].element_size(), 0


def _rule_dz(a, grid):
    """_dz_kernel: grad_out (and out), z when it has the BN coefficients; dz over z in place."""
    z = _nbytes(a["z_ptr"])
    read = _nbytes(a["go_ptr"]) + (_nbytes(a["out_ptr"]) if a["HAS_OUT"] else 0) + (z if a["HAS_COEF"] else 0)
    return read, z, 0


def _rule_weight_grad(a, grid):
    """_weight_grad_kernel: program (out block, in block over all children, pixel split) loads
    its dz rows and x columns over its pixels: dz streamed once per input-channel block, the
    children once; with more than one split, fp32 partials are stored
    and read back by the last split of each tile; grad W stored once in W's dtype."""
    children = a["children"]
    c_out, c_in, pixels = a["c_out"], a["c_in"], a["num_pixels"]
    # x is re-read by programs adjacent in launch order (axis 0: the output blocks of one input
    # block) while its columns are in cache: once
    read = _streamed(_nbytes(a["dz_ptr"]), _blocks(grid, 1)) + sum(_nbytes(c[0]) for c in children)
    write = c_out * c_in * a["gw_ptr"].element_size()
    if _blocks(grid, 2) > 1:
        partials = _blocks(grid, 2) * c_out * c_in * a["part_ptr"].element_size()
        read, write = read + partials, write + partials
    return read, write, 2 * pixels * c_in * c_out


def _rule_upsample(a, grid):
    """_upsample_kernel: output tile gathers its 2 x 2 coarse taps (the coarse tensor once: the
    taps of neighbouring tiles overlap in cache), adds the skip tile, stores the output."""
    read = _nbytes(a["z_ptr"]) + (_nbytes(a["skip_ptr"]) if a["HAS_SKIP"] else 0)
    if a["HAS_UP"]:
        read += _nbytes(a["u_ptr"])
    return read, _nbytes(a["out_ptr"]), 2 * 4 * a["out_ptr"].numel() if a["HAS_UP"] else 0


def _rule_upsample_backward(a, grid):
    """_upsample_backward_kernel: coarse tile loads z and its (2f)^2-tap window of grad_out (the
    fine gradient once: windows overlap in cache), stores grad p and, with the upsample, one
    partial of the up-weight gradient per (tile, channel, tap)."""
    read = _nbytes(a["z_ptr"]) + _nbytes(a["go_ptr"]) + (_nbytes(a["u_ptr"]) if a["HAS_UP"] else 0)
    write, flops = _nbytes(a["gp_ptr"]), 0
    if a["HAS_UP"]:
        taps = 2 * a["factor"]
        write += _blocks(grid, 0) * a["channels"] * taps * taps * a["gu_part"].element_size()
        flops = 2 * 2 * taps * taps * a["z_ptr"].numel()  # grad p and the up-weight gradient, per tap
    return read, write, flops


def _rule_upsample_backward_fused(a, grid):
    """_upsample_backward_fused_kernel: program (channel block, coarse tile) recomputes its z
    tile (x read once: a tile's channel blocks are adjacent on axis 0), gathers its window of
    grad_out (once: windows overlap in cache), stores the gradient of p (and z with STORE_Z), a
    row of the two sums and, with the upsample, its up-weight partials per (channel, tap), which
    the last tile of each block reads back with the sum rows; then six per-channel vectors and
    grad u."""
    (x, c_in, *_), = a["children"]
    channels, pixels = a["channels"], a["num_pixels"]
    acc = a["part_ptr"].element_size()
    tiles = _blocks(grid, 1)
    read = _nbytes(a["go_ptr"]) + _nbytes(x) + channels * c_in * a["w_ptr"].element_size() + 4 * channels * acc
    write = _nbytes(a["gp_ptr"]) + (_nbytes(a["zs_ptr"]) if a["STORE_Z"] else 0) + 6 * channels * acc
    partials = 2 * tiles * channels * acc
    flops = 2 * pixels * c_in * channels
    if a["HAS_UP"]:
        taps = 2 * a["factor"]
        partials += tiles * channels * taps * taps * acc
        write += _nbytes(a["gu_ptr"])
        flops += 2 * 2 * taps * taps * pixels * channels
    return read + partials, write + partials, flops


def _rule_affine(a, grid):
    """_affine_kernel: gamma, beta, mean and var; stores scale and shift."""
    channels = a["channels"]
    read = channels * sum(a[k].element_size() for k in ("gamma_ptr", "beta_ptr", "mean_ptr", "var_ptr"))
    return read, 2 * channels * a["out_ptr"].element_size(), 0


RULES: Dict[str, Callable] = {
    "_affine_kernel": _rule_affine,
    "_conv_kernel": _rule_conv, "_finalize_stats_kernel": _rule_finalize, "_coefficients_kernel": _rule_coefficients,
    "_apply_kernel": _rule_apply,
    "_activation_grad_kernel": _rule_activation_grad,
    "_backward_sums_kernel": _rule_backward_sums, "_backward_chained_kernel": _rule_backward_chained,
    "_reduce_kernel": _rule_reduce, "_dz_kernel": _rule_dz, "_weight_grad_kernel": _rule_weight_grad,
    "_upsample_kernel": _rule_upsample, "_upsample_backward_kernel": _rule_upsample_backward,
    "_upsample_backward_fused_kernel": _rule_upsample_backward_fused,
}


class MissingRule(KeyError):
    pass


@contextlib.contextmanager
def _gpu_host_paths(trace: Trace):
    """Triton launches recorded (by RULES) instead of run; the kernels' host code on its GPU
    branches (see the module docstring)."""
    from triton.runtime import interpreter

    from dla_fused.kernels import _common, aggregation, ida_up
    executor = interpreter.GridExecutor
    original = executor.__call__

    def record(self, *args, **kwargs):
        spec = inspect.getfullargspec(self.fn)
        named = inspect.getcallargs(self.fn, *args, **{k: v for k, v in kwargs.items() if k in spec.args})
        grid = self.grid(named) if callable(self.grid) else self.grid
        name = self.fn.__name__
        if name not in RULES:
            raise MissingRule(f"roofline.RULES has no rule for Triton kernel {name}")
        read, write, flops = RULES[name](named, tuple(grid))
        trace.kernels.append(Kernel(name, read, write, flops, triton=True))

    saved = [(m, n, getattr(m, n)) for m in (_common, aggregation, ida_up) for n in ("interpreted", "num_sms")
             if hasattr(m, n)]
    env = os.environ.get("DLA_FUSED_TRITON_AUTOTUNE")
    executor.__call__ = record
    for module, name, _ in saved:
        setattr(module, name, (lambda *a: False) if name == "interpreted" else (lambda device: SMS))
    os.environ["DLA_FUSED_TRITON_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        executor.__call__ = original
        for module, name, value in saved:
            setattr(module, name, value)
        if env is None:
            os.environ.pop("DLA_FUSED_TRITON_AUTOTUNE", None)
        else:
            os.environ["DLA_FUSED_TRITON_AUTOTUNE"] = env


def _fwd_bwd(call, inputs, recorder):
    out = call()
    recorder.paused += 1  # the incoming gradient is the caller's, not the op's
    grad = torch.ones_like(out)
    recorder.paused -= 1
    torch.autograd.grad(out, inputs, grad)


def trace_eager(call_on: Callable[[torch.device], Tuple[Callable, list]]) -> Trace:
    """Eager PyTorch's forward + backward, on the meta device."""
    trace = Trace()
    call, inputs = call_on(torch.device("meta"))
    recorder = _AtenRecorder(trace)
    with recorder:
        _fwd_bwd(call, inputs, recorder)
    return trace


@contextlib.contextmanager
def _triton_backend():
    from dla_fused import backend
    saved = backend._requested
    backend.set_backend("triton")
    try:
        yield
    finally:
        backend._requested = saved


def trace_triton(call_on: Callable[[torch.device], Tuple[Callable, list]]) -> Trace:
    """The Triton path's forward + backward at full size, launches intercepted (Triton's
    interpreter must be on: TRITON_INTERPRET=1)."""
    from dla_fused.kernels import aggregation
    trace = Trace()
    call, inputs = call_on(torch.device("cpu"))
    recorder = _AtenRecorder(trace)
    aggregation._counters(torch.device("cpu"), 1 << 14)  # the counters' one-time fill, as after a first call
    with _triton_backend(), _gpu_host_paths(trace), recorder:
        _fwd_bwd(call, inputs, recorder)
    return trace


def launches_made(call_on: Callable[[torch.device], Tuple[Callable, list]]):
    """(Triton launches, ATen ops) of the Triton path's forward + backward running for real under
    the interpreter (benchmarks/launches.py counts them); the incoming gradient is not counted."""
    call, inputs = call_on(torch.device("cpu"))
    with _triton_backend():
        grad = torch.ones_like(call())
        return count_launches(lambda: torch.autograd.grad(call(), inputs, grad))


# ------------------------------------------------------------------------------------------------
# The op cases at the GPU benchmark size

def _agg_call(shapes, out, residual, fused):
    from dla_fused.ops.aggregation import aggregation_node, aggregation_node_reference, default_memory_efficient

    def call_on(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        make = (lambda *s: torch.empty(*s, device=device, dtype=DTYPE)) if device.type == "meta" else (
            lambda *s: torch.randn(*s, generator=g).to(DTYPE))
        cl = torch.channels_last
        children = [make(*s).contiguous(memory_format=cl).requires_grad_() for s in shapes]
        cin = sum(s[1] for s in shapes)
        weight = make(out, cin, 1, 1).requires_grad_()
        gamma = make(out).float().requires_grad_()
        beta = make(out).float().requires_grad_()
        mean, var = torch.zeros(out, device=device), torch.ones(out, device=device)
        if fused:  # as on a GPU by default
            fn = functools.partial(aggregation_node, memory_efficient=default_memory_efficient(torch.device("cuda")))
        else:
            fn = aggregation_node_reference
        return (lambda: fn(children, weight, gamma, beta, mean, var, None, True, 0.1, 1e-5, residual),
                children + [weight, gamma, beta])
    return call_on


def _ida_call(shape, proj_out, factor, skip, fused):
    from dla_fused.ops.ida_up import ida_up, ida_up_reference

    def call_on(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        make = (lambda *s: torch.empty(*s, device=device, dtype=DTYPE)) if device.type == "meta" else (
            lambda *s: torch.randn(*s, generator=g).to(DTYPE))
        cl = torch.channels_last
        x = make(*shape).contiguous(memory_format=cl).requires_grad_()
        channels = proj_out or shape[1]
        inputs, args = [x], {}
        if proj_out:
            args = dict(proj_weight=make(proj_out, shape[1], 1, 1).requires_grad_(),
                        bn_weight=make(proj_out).float().requires_grad_(), bn_bias=make(proj_out).float().requires_grad_(),
                        running_mean=torch.zeros(proj_out, device=device), running_var=torch.ones(proj_out, device=device))
            inputs += [args["proj_weight"], args["bn_weight"], args["bn_bias"]]
        up = make(channels, 1, 2 * factor, 2 * factor).requires_grad_()
        inputs.append(up)
        big = (shape[0], channels, shape[2] * factor, shape[3] * factor)
        s = make(*big).contiguous(memory_format=cl).requires_grad_() if skip else None
        if skip:
            inputs.append(s)
        fn = ida_up if fused else ida_up_reference
        return (lambda: fn(x, args.get("proj_weight"), args.get("bn_weight"), args.get("bn_bias"),
                           args.get("running_mean"), args.get("running_var"), None, True, 0.1, 1e-5,
                           up, factor, s), inputs)
    return call_on


@functools.lru_cache(maxsize=None)
def gpu_cases() -> Dict[Tuple[str, str], Tuple[str, tuple]]:
    """{(op group, case label): (kind, parameters)} at the GPU benchmark size: the same cases as
    test_ops.py, captured at batch 64, 224 px."""
    from test_ops import _agg_label, _capture, _ida_label, _ida_steps, _roots
    cases = {}
    for shapes, out, residual in _capture("dla34", _roots, IMAGE, BATCH):
        cases["aggregation node", _agg_label("dla34", shapes, out)] = ("agg", (shapes, out, residual))
    dla169 = _capture("dla169", _roots, IMAGE, BATCH)
    shapes, out, residual = max(dla169, key=lambda k: (len(k[0]), sum(s[1] for s in k[0])))
    cases["aggregation node", _agg_label("dla169", shapes, out)] = ("agg", (shapes, out, residual))
    for net in ("dla34up", "centernet_dla34"):
        for key in _capture(net, _ida_steps, IMAGE, BATCH):
            cases["IDA-Up step", _ida_label(net, *key)] = ("ida", key)
    return cases


def _call_on(kind, params, fused):
    return _agg_call(*params, fused) if kind == "agg" else _ida_call(*params, fused)


def small_case(group: str, case: str):
    """The fused call_on of a case with the same channels on 2 images of 4 x 4 (coarse) pixels."""
    kind, params = gpu_cases()[group, case]
    if kind == "agg":
        shapes, out, residual = params
        params = ([(2, s[1], 4, 4) for s in shapes], out, residual)
    else:
        shape, proj_out, factor, skip = params
        params = ((2, shape[1], 4, 4), proj_out, factor, skip)
    return _call_on(kind, params, True)


def model(group: str, case: str) -> Dict[str, object]:
    """The prediction for one case: traces of both paths and the three ratios."""
    kind, params = gpu_cases()[group, case]
    eager, fused = trace_eager(_call_on(kind, params, False)), trace_triton(_call_on(kind, params, True))
    return dict(
        group=group, case=case, eager=eager, triton=fused,
        bytes_ratio=eager.bytes / fused.bytes, roofline_ratio=eager.seconds / fused.seconds,
        launch_ratio=eager.seconds_with_launches / fused.seconds_with_launches)


def row(prediction) -> Dict[str, object]:
    """A JSON-friendly summary of `model`'s result."""
    e, t = prediction["eager"], prediction["triton"]
    return dict(group=prediction["group"], case=prediction["case"],
                eager_mb=e.bytes / 1e6, triton_mb=t.bytes / 1e6, eager_gflop=e.flops / 1e9, triton_gflop=t.flops / 1e9,
                eager_launches=e.launches, triton_launches=t.launches, triton_kernels=t.triton_launches,
                eager_us=e.seconds * 1e6, triton_us=t.seconds * 1e6,
                bytes_ratio=prediction["bytes_ratio"], roofline_ratio=prediction["roofline_ratio"],
                launch_ratio=prediction["launch_ratio"],
                triton_by_kernel={k: dict(launches=n, mb=b / 1e6) for k, (n, b) in t.by_kernel().items()})
