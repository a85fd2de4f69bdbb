"""Shared pieces of the Triton kernels: launching (autotuned on a GPU, one fixed config under the
interpreter), strided (N, C, pixel) addressing, dtype choices and reduction splits."""
import os

import torch
import triton
import triton.language as tl

from dla_fused.backend import triton_interpreted as interpreted
from dla_fused.ops.primitives import acc_dtype, memory_format_of

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float32: tl.float32, torch.float64: tl.float64}


def autotune_enabled() -> bool:
    """DLA_FUSED_TRITON_AUTOTUNE=0 pins every kernel to its first config (fast compiles)."""
    return not interpreted() and os.environ.get("DLA_FUSED_TRITON_AUTOTUNE", "1") != "0"


def interpreter_block(extent: int) -> int:
    """Interpreter block size for a dimension of `extent`: 16 (many ragged tiles in small tests),
    above 64 the power of two at or above it, at most 512 (the interpreter pays per program and
    per operation, hardly per element)."""
    return 16 if extent <= 64 else min(512, triton.next_power_of_2(extent))


def _triton_version():
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def _fix_interpreter_scalar_index():
    """Triton before 3.8 interprets `range(0, n, BLOCK)` over a runtime scalar n by calling int() on
    the one-element 1-D array that holds n, which NumPy 2.4 and later refuse ("only 0-dimensional
    arrays can be converted to Python scalars"). Triton 3.8 squeezes the array first; do the same on
    older versions. Interpreter only (TRITON_INTERPRET is read when triton is imported, before this
    module); the compiled kernels are not affected."""
    if _triton_version() >= (3, 8):
        return
    from triton.runtime import interpreter
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreted():
    _fix_interpreter_scalar_index()


# Size arguments of the autotune keys that are rounded up to a power of two (`bucket`): every
# pixel count in (2^(k-1), 2^k] shares one tuning, so a new batch size or resolution in the same
# bucket neither re-benchmarks nor recompiles (the kernels do not specialise these arguments).
BUCKETED = ("num_pixels",)


def bucket(value: int) -> int:
    """The power of two at or above `value` (1 for 0 and 1)."""
    return 1 << max(int(value) - 1, 0).bit_length()


class ConfigStore:
    """The config tuned for each (kernel, GPU, Triton version, bucketed key), pinned: kept for the
    process and in a JSON file, so that later runs take the same config, and so the same result
    bits, without tuning again. The file is DLA_FUSED_TUNING_CACHE (default
    ~/.cache/dla_fused/triton-configs.json); DLA_FUSED_TUNING_CACHE=off keeps the configs in
    memory only."""

    def __init__(self):
        self.configs = {}
        self.loaded = None  # the path read, once

    @staticmethod
    def path():
        path = os.environ.get("DLA_FUSED_TUNING_CACHE")
        if path == "off":
            return None
        return path or os.path.join(os.path.expanduser("~"), ".cache", "dla_fused", "triton-configs.json")

    def _load(self, path):
        if self.loaded == path:
            return
        self.loaded = path
        if path is None or not os.path.exists(path):
            return
        import json
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError):  # unreadable or half-written: tune again
            return
        for key, c in stored.items():
            self.configs.setdefault(key, triton.Config(c["kwargs"], num_warps=c["num_warps"],
                                                       num_stages=c["num_stages"]))

    def get(self, key: str):
        self._load(self.path())
        return self.configs.get(key)

    def put(self, key: str, config) -> None:
        self.configs[key] = config
        path = self.path()
        if path is None:
            return
        import json
        import tempfile
        stored = {k: dict(kwargs=dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages)
                  for k, c in self.configs.items()}
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(stored, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
        except OSError:  # a read-only home: the process keeps its configs in memory
            pass


STORE = ConfigStore()


class Tunable:
    """A @triton.jit kernel with an autotuned twin. `kernel[grid](...)` launches the twin on a
    GPU, the first config when autotuning is off, and the `interpreter` block sizes under
    TRITON_INTERPRET=1, where autotuning would only cost time; there a size given as an argument's
    name is interpreter_block(that argument). On a GPU the first launch of each bucketed key
    (`bucket_key`) tunes; the winner is pinned in STORE and every later launch of the key, in this
    run or a later one, launches it directly. Under the interpreter a caller may pass block sizes
    itself (aggregation.product_tile)."""

    def __init__(self, fn, configs, key, interpreter, dot_tiles=None, **options):
        self.fn, self.configs, self.interpreter, self.dot_tiles = fn, configs, interpreter, dot_tiles
        self.key, self.name = list(key), getattr(fn, "__name__", None) or fn.fn.__name__
        if dot_tiles is not None:
            options["prune_configs_by"] = {"early_config_prune": self._prune}
        self.tuned = triton.autotune(configs=configs, key=key, **options)(fn)

    def bucket_key(self, named) -> tuple:
        """The tuning key of a launch: the key arguments, BUCKETED ones rounded up to a power of
        two, and the dtypes of the tensor arguments."""
        sizes = tuple(bucket(named[k]) if k in BUCKETED else named[k] for k in self.key)
        return sizes + tuple(str(v.dtype) for v in named.values() if isinstance(v, torch.Tensor))

    def store_key(self, named) -> str:
        device = next((v.device for v in named.values() if isinstance(v, torch.Tensor)), None)
        gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else "cpu"
        return f"{self.name}|{gpu}|triton {triton.__version__}|{self.bucket_key(named)}"

    def _tuned_launch(self, grid, args, kwargs):
        named = dict(zip(self.fn.arg_names, args), **kwargs)
        key = self.store_key(named)
        config = STORE.get(key)
        if config is None:  # first sight of this bucket: tune (and run the winner), then pin it
            self.tuned[grid](*args, **kwargs)
            STORE.put(key, self.tuned.best_config)
            return
        self.fn[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

    def shared_bytes(self, config, args) -> int:
        """Estimated shared memory of `config`: the two tl.dot operand tiles `dot_tiles` names,
        ((rows, cols) of block-size names each), in the DOT dtype, buffered num_stages - 1 times as
        Triton's software pipelining does. 0 for kernels without tl.dot."""
        if self.dot_tiles is None:
            return 0
        k = config.kwargs
        elements = sum(k[rows] * k[cols] for rows, cols in self.dot_tiles)
        return max(config.num_stages - 1, 1) * elements * args["DOT"].primitive_bitwidth // 8

    def fitting(self, configs, args):
        """The configs whose shared memory fits the device of the first tensor argument (the first
        config when none does: the launch then reports the error)."""
        device = next((a.device for a in args.values() if isinstance(a, torch.Tensor)), torch.device("cpu"))
        limit = shared_memory_limit(device)
        return [c for c in configs if self.shared_bytes(c, args) <= limit] or list(configs[:1])

    def _prune(self, configs, named_args, **kwargs):
        return self.fitting(configs, dict(named_args, **kwargs))

    def candidates(self, name):
        """Every value the block size `name` can take in the current mode."""
        if interpreted():
            return [self.interpreter[name]]
        configs = self.configs if autotune_enabled() else self.configs[:1]
        return [c.kwargs[name] for c in configs]

    def _interpreted_launch(self, grid, args, kwargs):
        named = dict(zip(self.fn.arg_names, args), **kwargs)
        blocks = {k: interpreter_block(named[v]) if isinstance(v, str) else v for k, v in self.interpreter.items()
                  if k not in kwargs}  # a block size the caller passes wins
        return self.fn[grid](*args, **kwargs, **blocks)

    def __getitem__(self, grid):
        if interpreted():
            return lambda *args, **kwargs: self._interpreted_launch(grid, args, kwargs)
        if not autotune_enabled():
            c = self.configs[0]
            return lambda *args, **kwargs: self.fn[grid](*args, **kwargs, **c.kwargs, num_warps=c.num_warps,
                                                         num_stages=c.num_stages)
        return lambda *args, **kwargs: self._tuned_launch(grid, args, kwargs)


def tunable(configs, key, interpreter, dot_tiles=None, **options):
    return lambda fn: Tunable(fn, configs, key, interpreter, dot_tiles, **options)


# Per-block shared memory a kernel may opt in to on Hopper (H100, H200): 227 KiB.
HOPPER_SHARED_BYTES = 232448


def shared_memory_limit(device) -> int:
    """Bytes of shared memory one program may use on `device` (the Hopper figure off a GPU)."""
    if device.type != "cuda":
        return HOPPER_SHARED_BYTES
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", HOPPER_SHARED_BYTES)


def grid(*dims):
    """A launch grid from (extent, block-size name) pairs and plain program counts."""
    return lambda meta: tuple(triton.cdiv(d[0], meta[d[1]]) if isinstance(d, tuple) else d for d in dims)


def pixel_view(t):
    """(t, (s_n, s_c, s_p)): t addressed as (N, C, P = H*W). When H and W do not merge into one
    stride, t is first made contiguous in its memory format."""
    _, _, h, w = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    if w == 1:
        return t, (s_n, s_c, s_h)
    if h == 1 or s_h == w * s_w:
        return t, (s_n, s_c, s_w)
    return pixel_view(t.contiguous(memory_format=memory_format_of(t)))


def empty_like_format(shape, like, dtype=None):
    """An uninitialised tensor of `shape` in the memory format of `like`."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format_of(like))


def dot_types(a: torch.dtype, b: torch.dtype):
    """(operand type, input precision) for tl.dot: the shared dtype of both operands, else the
    accumulation type; IEEE for float32/float64 so that results are not TF32-rounded. Under the
    interpreter bfloat16 operands are widened to float32 (exact products, fp32 sums as on a GPU)."""
    dot = a if a == b else acc_dtype(a)
    if dot == torch.bfloat16 and interpreted():  # the interpreter multiplies bfloat16's raw bits
        dot = torch.float32
    return TL_DTYPES[dot], ("ieee" if dot in (torch.float32, torch.float64) else "tf32")


def num_sms(device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def split(total: int, parts: int):
    """(parts, chunk): `total` items cut into at most `parts` non-empty chunks of `chunk` items."""
    chunk = triton.cdiv(total, max(1, min(parts, total)))
    return triton.cdiv(total, chunk), chunk


if interpreted():
    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """x.to(dtype), rounding to nearest even as a GPU does: the interpreter truncates float32 to
        bfloat16, so that conversion is done on the bits (add 0x7fff plus the lowest kept bit)."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(dtype)
        return y
else:
    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        return x.to(dtype)


@triton.jit
def pixel_coords(q, hw):
    """(n, p) of flat pixel indices q = n * hw + p; n as int64 so that offsets cannot overflow."""
    n = (q // hw).to(tl.int64)
    return n, q - n * hw


@triton.jit
def tile(num_pixels, hw, channels, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(n, p, pixel mask, channels, channel mask) of this program's [BLOCK_P, BLOCK_C] tile."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, p = pixel_coords(q, hw)
    return n, p, q < num_pixels, c, c < channels


@triton.jit
def offsets(n, p, c, s_n, s_c, s_p):
    """[pixels, channels] offsets into a tensor with strides (s_n, s_c, s_p)."""
    return (n * s_n + p * s_p)[:, None] + (c * s_c)[None, :]
