"""Compile every Triton kernel of dla_fused for a CUDA architecture on a machine without a GPU.

    python -m dla_fused.kernels.compile_check [--arch 90] [--configs first|all] [--dtypes ...]
                                              [--only TEXT] [--shared-limit BYTES]

The Triton primitives (kernels/aggregation.py, kernels/ida_up.py) are called on small CPU tensors of
each dtype, in NCHW and channels_last, in two shapes (SHAPES) and with the argument combinations
the fused ops use (every children count, with and without statistics, residual, BN, skip). Each kernel
launch is replaced by compilation for the target: Triton's own argument specialisation picks the
variant a launch with such tensors would build, and Triton lowers it to PTX and, with the ptxas it
ships, to a cubin. Each kernel's shared memory is checked against the architecture's per-block limit
(a launch would fail with "out of resources" on the GPU otherwise). Nothing runs; the values of the
outputs are meaningless.

`first` (the default) compiles the config used with DLA_FUSED_TRITON_AUTOTUNE=0, `--configs all`
every config the autotuner would try (those its shared-memory estimate lets through). Must run
without TRITON_INTERPRET=1. Prints one line per compiled variant and exits with status 1 if any
failed.
"""
import argparse
import os
import sys
import time

# Per-block shared memory a kernel may use (bytes) by compute capability.
SHARED_LIMIT = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DTYPES = ("float32", "float16", "bfloat16", "float64")


# Two shapes, since Triton specialises integer arguments on divisibility by 16: "aligned" (channels
# and pixel counts multiples of 16, like most of DLA's) and "odd" (7x7 pixels, odd channel counts,
# like the last stage at 224 px). Children counts 1-8 and 10: the GEMM kernel compiles once per
# count.
SHAPES = {"aligned": dict(hw=8, c_out=32, children=(32, 32, 16, 32, 16, 16, 32, 16, 32, 16),
                          counts=tuple(range(1, 9)) + (10,)),
          "odd": dict(hw=7, c_out=24, children=(24, 13, 5, 24), counts=(1, 3))}


def _calls(torch, aggregation, ida_up, dtype, channels_last, shape):
    """(label, thunk) for the argument combinations of the fused ops."""
    def act(n, c, h, w):
        x = torch.randn(n, c, h, w).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def vec(c):
        return torch.rand(c, dtype=acc) + 0.5

    n, h, c_out = 2, SHAPES[shape]["hw"], SHAPES[shape]["c_out"]
    w = h
    children = [act(n, c, h, w) for c in SHAPES[shape]["children"]]
    out = act(n, c_out, h, w)
    calls = []
    for k in SHAPES[shape]["counts"]:  # training: conv + statistics; eval: the folded BN epilogue
        kids = children[:k]
        weight = torch.randn(c_out, sum(x.shape[1] for x in kids)).to(dtype)
        calls.append((f"agg_conv[{k} children, stats]",
                      lambda kids=kids, weight=weight: aggregation.agg_conv(kids, weight, None, None, False, True)))
        calls.append((f"agg_conv[{k} children, eval: shift, residual, relu]",
                      lambda kids=kids, weight=weight: aggregation.agg_conv(kids, weight, vec(c_out), out, True,
                                                                            False)))
    for k in SHAPES[shape]["counts"][:3]:  # the backward GEMMs run per child
        kids = children[:k]
        weight = torch.randn(c_out, sum(x.shape[1] for x in kids)).to(dtype)
        calls.append((f"agg_backward_gemm[{k} children]",
                      lambda kids=kids, weight=weight: aggregation.agg_backward_gemm(out.clone(), kids, weight,
                                                                                     out, out)))
    def chained(recompute, call):  # the chained backward's choice forced for one call
        def run():
            saved = aggregation.CHAINED_RECOMPUTE
            aggregation.CHAINED_RECOMPUTE = recompute
            try:
                return call()
            finally:
                aggregation.CHAINED_RECOMPUTE = saved
        return run

    for k in SHAPES[shape]["counts"][:3]:  # the training path: forward and backward compile per count
        kids = children[:k]
        weight = torch.randn(c_out, sum(x.shape[1] for x in kids)).to(dtype)
        calls += [
            (f"agg_forward_train[{k} children, recompute]",
             lambda kids=kids, weight=weight: aggregation.agg_forward_train(kids, weight, vec(c_out), vec(c_out),
                                                                            1e-5, False, False)),
            (f"agg_backward_fused[{k} children, recompute]",
             lambda kids=kids, weight=weight: aggregation.agg_backward_fused(
                 out, kids, weight, vec(c_out), vec(c_out), vec(c_out), vec(c_out), 1e-5, False, None)),
            (f"agg_backward_fused[{k} children, kept z]", chained(False, lambda kids=kids, weight=weight: (
                aggregation.agg_backward_fused(out, kids, weight, vec(c_out), vec(c_out), vec(c_out), vec(c_out),
                                               1e-5, False, out)))),
        ]
    two = children[:2]
    two_weight = torch.randn(c_out, sum(x.shape[1] for x in two)).to(dtype)
    running = (vec(c_out), vec(c_out), torch.zeros((), dtype=torch.int64), None)
    calls += [
        ("agg_forward_train[2 children, keep z, residual, running]", lambda: aggregation.agg_forward_train(
            two, two_weight, vec(c_out), vec(c_out), 1e-5, True, True, running)),
        ("agg_forward_train[2 children, recompute, residual, running]", lambda: aggregation.agg_forward_train(
            two, two_weight, vec(c_out), vec(c_out), 1e-5, True, False, running[:3] + (0.1,))),
        ("agg_backward_fused[2 children, kept z, chained recompute, residual]", chained(True, lambda: (
            aggregation.agg_backward_fused(out, two, two_weight, vec(c_out), vec(c_out), vec(c_out), vec(c_out),
                                           1e-5, True, out)))),
        ("agg_backward_fused[2 children, recompute, residual]", lambda: aggregation.agg_backward_fused(
            out, two, two_weight, vec(c_out), vec(c_out), vec(c_out), vec(c_out), 1e-5, True, None)),
    ]
    calls += [  # the Triton backend's fused steps (ops/_bn.py)
        ("agg_conv_affine[2 children]",
         lambda: aggregation.agg_conv_affine(two, two_weight, vec(c_out), vec(c_out), 1e-5)),
        ("agg_backward_coefficients", lambda: aggregation.agg_backward_coefficients(
            out, out, out, vec(c_out), vec(c_out), vec(c_out), 1e-5, 8, True)),
        ("agg_backward_coefficients[eval, no out]", lambda: aggregation.agg_backward_coefficients(
            out, None, out, vec(c_out), vec(c_out), vec(c_out), 1e-5, 8, False)),
        ("bn_affine", lambda: aggregation.bn_affine(vec(c_out), vec(c_out), vec(c_out), vec(c_out), 1e-5)),
    ]
    calls += [
        ("agg_apply_[residual]", lambda: aggregation.agg_apply_(out.clone(), vec(c_out), vec(c_out), out)),
        ("agg_apply_", lambda: aggregation.agg_apply_(out.clone(), vec(c_out), vec(c_out), None)),
        ("agg_backward_reduce", lambda: aggregation.agg_backward_reduce(out, out, out, vec(c_out))),
        ("agg_backward_reduce[no out]", lambda: aggregation.agg_backward_reduce(out, None, out, vec(c_out))),
        ("agg_backward_dz_", lambda: aggregation.agg_backward_dz_(out.clone(), out, out, vec(c_out), vec(c_out),
                                                                  vec(c_out), vec(c_out))),
        ("agg_backward_dz_[eval]", lambda: aggregation.agg_backward_dz_(out.clone(), out, out, vec(c_out), None,
                                                                        None, None)),
        ("agg_backward_gemm[no residual]",
         lambda: aggregation.agg_backward_gemm(out.clone(), two, two_weight, None, None)),
    ]
    # the other activations: 0 none, 2 LeakyReLU (slope 0.1; its masks), 3 SiLU
    for act_code, slope in ((0, 0.0), (2, 0.1), (3, 0.0)):
        calls += [
            (f"agg_conv[2 children, eval: shift, residual, act {act_code}]",
             lambda a=act_code, s=slope: aggregation.agg_conv(two, two_weight, vec(c_out), out, True, False, a, s)),
            (f"agg_apply_[residual, act {act_code}]",
             lambda a=act_code, s=slope: aggregation.agg_apply_(out.clone(), vec(c_out), vec(c_out), out, a, s)),
            (f"agg_apply[act {act_code}]",
             lambda a=act_code, s=slope: aggregation.agg_apply(out, vec(c_out), vec(c_out), None, a, s)),
        ]
    calls += [
        ("agg_activation_grad[residual, silu]", lambda: aggregation.agg_activation_grad(
            out, out, vec(c_out), vec(c_out), out, 3, 0.0)),
        ("agg_activation_grad[leaky_relu]", lambda: aggregation.agg_activation_grad(
            out, out, vec(c_out), vec(c_out), None, 2, 0.1)),
        ("agg_backward_reduce[leaky mask]", lambda: aggregation.agg_backward_reduce(out, out, out, vec(c_out), 0.1)),
        ("agg_backward_dz_[leaky mask]", lambda: aggregation.agg_backward_dz_(
            out.clone(), out, out, vec(c_out), vec(c_out), vec(c_out), vec(c_out), 0.1)),
        ("agg_backward_gemm[2 children, leaky gate]", lambda: aggregation.agg_backward_gemm(
            out.clone(), two, two_weight, out, out, 0.1)),
    ]
    for factor in (2, 4):
        z = act(n, c_out, h, w)
        up = torch.randn(c_out, 1, 2 * factor, 2 * factor).to(dtype)
        skip = act(n, c_out, h * factor, w * factor)
        calls += [
            (f"ida_upsample[x{factor}, bn, skip]",
             lambda z=z, up=up, skip=skip, f=factor: ida_up.ida_upsample(z, vec(c_out), vec(c_out), up, f, skip)),
            (f"ida_upsample[x{factor}]",
             lambda z=z, up=up, f=factor: ida_up.ida_upsample(z, None, None, up, f, None)),
            (f"ida_upsample_backward[x{factor}, bn]",
             lambda z=z, up=up, skip=skip, f=factor: ida_up.ida_upsample_backward(skip, z, vec(c_out), vec(c_out),
                                                                                  up, f)),
            (f"ida_upsample_backward[x{factor}]",
             lambda z=z, up=up, skip=skip, f=factor: ida_up.ida_upsample_backward(skip, z, None, None, up, f)),
        ]
    x = children[1]
    proj = torch.randn(c_out, x.shape[1]).to(dtype)
    for factor in (1, 2, 4)[:3 if shape == "odd" else 2]:  # the projected step's training path
        up = torch.randn(c_out, 1, 2 * factor, 2 * factor).to(dtype) if factor > 1 else None
        fine = act(n, c_out, h * factor, w * factor)
        calls += [
            (f"ida_forward_train[x{factor}, skip, running]",
             lambda up=up, f=factor, fine=fine: ida_up.ida_forward_train(
                 x, proj, vec(c_out), vec(c_out), 1e-5, up, f, fine, (vec(c_out), vec(c_out), None, 0.1))),
            (f"ida_backward_fused[x{factor}, recompute]", chained(True, lambda up=up, f=factor, fine=fine: (
                ida_up.ida_backward_fused(fine, x, proj, vec(c_out), vec(c_out), vec(c_out), vec(c_out), 1e-5, up,
                                          f)))),
        ]
        if factor < 4:  # (the stored-z variant differs by one store; the x4 taps compile slowly)
            stored = chained(False, lambda up=up, f=factor, fine=fine: ida_up.ida_backward_fused(
                fine, x, proj, vec(c_out), vec(c_out), vec(c_out), vec(c_out), 1e-5, up, f))
            calls.append((f"ida_backward_fused[x{factor}, stored z]", stored))
    z = act(n, c_out, h, w)
    calls += [("ida_upsample[projection + skip only]",
               lambda: ida_up.ida_upsample(z, vec(c_out), vec(c_out), None, 1, z)),
              ("ida_upsample_backward[projection only]",
               lambda: ida_up.ida_upsample_backward(z, z, vec(c_out), vec(c_out), None, 1))]
    return calls


def _describe(err):
    """One line for a compile error: the innermost cause's message (Triton wraps errors raised in
    called @jit functions), and for ptxas the lines of its output that report an error."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(getattr(err, "error_message", None) or err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return f"{type(err).__name__}: {' | '.join((errors or lines[-1:])[:3])}"


class Compiler:
    """Stands in for JITFunction.run: compiles for `target` instead of launching."""

    def __init__(self, triton, target, shared_limit):
        from triton.compiler import ASTSource, make_backend
        from triton.runtime import jit
        self.triton, self.target, self.shared_limit = triton, target, shared_limit
        self.ASTSource, self.backend = ASTSource, make_backend(target)
        self.bind = jit.create_function_from_signature
        self.knobs = triton.knobs
        self.done, self.results = {}, []
        self.context = ""

    def run(self, fn, *args, grid=None, warmup=False, **kwargs):
        kwargs["debug"] = kwargs.get("debug", fn.debug) or self.knobs.runtime.debug
        kwargs["instrumentation_mode"] = self.knobs.compilation.instrumentation_mode
        binder = self.bind(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                               options)
        key = (fn.__name__, repr(signature), repr(sorted(constexprs.items(), key=repr)), repr(attrs),
               repr(sorted(options.__dict__.items(), key=repr)))
        if key in self.done:
            return None
        constants = ", ".join(f"{fn.arg_names[path[0]]}={value}" for path, value in constexprs.items()
                              if fn.arg_names[path[0]].isupper())
        label = f"{fn.__name__}({constants}; warps {options.num_warps}, stages {options.num_stages})"
        start = time.perf_counter()
        try:
            kernel = self.triton.compile(self.ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                         options=options.__dict__)
            shared = kernel.metadata.shared
            error = (f"{shared} bytes of shared memory, above the limit of {self.shared_limit} per block"
                     if self.shared_limit and shared > self.shared_limit else None)
        except Exception as err:  # noqa: BLE001 (reported, then counted as a failure)
            shared, error = None, _describe(err)
        self.done[key] = error
        self.results.append((self.context, label, shared, time.perf_counter() - start, error))
        status = "FAILED " + error if error else f"ok, {shared} B shared"
        print(f"  {label}: {status} ({time.perf_counter() - start:.1f} s)", flush=True)
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dla_fused.kernels.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (default 90: Hopper)")
    parser.add_argument("--configs", choices=["first", "all"], default="first",
                        help="autotuning configs to compile: the first (default) or all")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="activation dtypes")
    parser.add_argument("--only", metavar="TEXT", help="only the primitive calls whose label contains TEXT "
                                                      "(e.g. agg_conv, ida_upsample_backward[x4)")
    parser.add_argument("--shared-limit", type=int, metavar="BYTES",
                        help="per-block shared memory limit to check against (default: that of --arch)")
    args = parser.parse_args(argv)
    if args.arch not in SHARED_LIMIT and args.shared_limit is None:
        parser.error(f"no shared-memory limit known for --arch {args.arch} (known: "
                     f"{', '.join(map(str, SHARED_LIMIT))}); give --shared-limit BYTES")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels that are to be compiled")
    if args.configs == "first":
        os.environ["DLA_FUSED_TRITON_AUTOTUNE"] = "0"

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from dla_fused.kernels import _common, aggregation, ida_up

    limit = args.shared_limit if args.shared_limit is not None else SHARED_LIMIT.get(args.arch)
    compiler = Compiler(triton, GPUTarget("cuda", args.arch, 32), limit)
    original_run = JITFunction.run
    original_getitem = _common.Tunable.__getitem__
    original_limit = _common.shared_memory_limit

    def every_config(self, grid):
        def launch(*a, **kw):
            for c in self.fitting(self.configs, dict(zip(self.fn.arg_names, a), **kw)):
                self.fn.run(*a, grid=grid, warmup=False, **kw, **c.all_kwargs())
        return launch

    JITFunction.run = lambda fn, *a, grid=None, warmup=False, **kw: compiler.run(fn, *a, grid=grid, **kw)
    if args.configs == "all":  # the configs the autotuner would try: those whose shared memory fits
        _common.Tunable.__getitem__ = every_config
        if limit:
            _common.shared_memory_limit = lambda device: limit
    print(f"compiling the Triton kernels for sm_{args.arch} with triton {triton.__version__} "
          f"(torch {torch.__version__}), {args.configs} config(s), dtypes {' '.join(args.dtypes)}", flush=True)
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        for name in args.dtypes:
            for channels_last in (False, True):
                for shape in SHAPES:
                    for label, call in _calls(torch, aggregation, ida_up, getattr(torch, name), channels_last,
                                              shape):
                        if args.only and args.only not in label:
                            continue
                        layout = "channels_last" if channels_last else "NCHW"
                        compiler.context = f"{label} {name} {layout} {shape}"
                        print(compiler.context, flush=True)
                        call()
    finally:
        JITFunction.run = original_run
        _common.Tunable.__getitem__ = original_getitem
        _common.shared_memory_limit = original_limit
    failed = [r for r in compiler.results if r[4]]
    largest = max((r for r in compiler.results if r[2] is not None), key=lambda r: r[2], default=None)
    print(f"\n{len(compiler.results)} kernel variants compiled for sm_{args.arch} in "
          f"{time.perf_counter() - start:.0f} s, {len(failed)} failed")
    if largest:
        print(f"most shared memory: {largest[1]} (from {largest[0]}), {largest[2]} bytes "
              f"(limit {compiler.shared_limit})")
    for context, label, _, _, error in failed:
        print(f"FAILED {label} (from {context}): {error}")
    return 1 if failed or not compiler.results else 0


if __name__ == "__main__":
    sys.exit(main())
