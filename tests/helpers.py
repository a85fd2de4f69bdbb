"""Shared test utilities: backends to run, tolerances, DLA root shapes, the command line in-process."""
import contextlib
import functools
import io
import subprocess
import sys

import torch

from dla_fused import backend

# Backends that must work on this (CPU) machine; test_low_precision.py also runs the CUDA ones.
CPU_BACKENDS = ("reference", "cpu", "triton")

# Tolerance rule (flash-attention's): the fused result's error against a float64 reference may be
# at most twice the error of PyTorch's own same-dtype path, plus this relative floor.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def gradcheck(fn, inputs, backend_name: str) -> bool:
    """torch.autograd.gradcheck in float64: every Jacobian entry for the C++ and reference
    backends; for Triton under the interpreter, where every call costs seconds, PyTorch's fast mode
    (v^T J u against its finite difference for random u, v: a wrong entry anywhere changes it,
    with probability 1), undefined output gradients included in both."""
    fast = backend_name == "triton" and backend.triton_interpreted()
    return torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=fast)


def opcheck_utils(backend_name: str):
    """torch.library.opcheck's checks for a backend: all of them for the C++ and reference
    backends; for Triton under the interpreter all but the compiled-graph one
    (test_aot_dispatch_dynamic, which compiles the op's fake and autograd registration, the same
    for every backend, and runs it on the kernels several times over)."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return checks[:-1] if backend_name == "triton" and backend.triton_interpreted() else checks


def use_backend(name: str) -> None:
    reasons = backend.not_supported_reasons(name, "cpu") if name != "reference" else []
    assert not reasons, f"backend {name} must be usable on CPU here: {reasons}"
    backend.set_backend(name)


def assert_within_rule(actual, reference64, same_dtype, what=""):
    """|actual - ref64| <= 2 |same_dtype - ref64| + floor * max|ref64|, elementwise max."""
    actual, reference64 = actual.detach(), reference64.detach()
    assert actual.shape == reference64.shape, f"{what}: shape {actual.shape} != {reference64.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = reference64.abs().max().item() or 1.0
    err = (actual.double() - reference64.double()).abs().max().item()
    base = (same_dtype.detach().double() - reference64.double()).abs().max().item()
    bound = 2 * base + FLOOR[actual.dtype] * scale
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (PyTorch same-dtype error {base:.3g})"


def assert_results_within_rule(fused, truth, same):
    """Each result (output, gradients by name, running statistics) of `fused` against the float64
    `truth`, with `same` (the reference on the same inputs) setting the allowed error."""
    (out, grads, bufs), (ref, ref_grads, ref_bufs), (same_out, same_grads, same_bufs) = fused, truth, same
    assert_within_rule(out, ref, same_out, "output")
    for name in ref_grads:
        assert_within_rule(grads[name], ref_grads[name], same_grads[name], f"gradient {name}")
    for key in ("running_mean", "running_var"):
        assert_within_rule(bufs[key], ref_bufs[key], same_bufs[key], key)


def named_grads(result, n_children):
    """An aggregation node's (output, gradients, buffers) with the gradients named."""
    out, grads, bufs = result
    names = [f"children[{i}]" for i in range(n_children)] + ["weight", "bn_weight", "bn_bias"]
    return out, dict(zip(names, grads)), bufs


def assert_close(actual, expected, what="", rel=None):
    """Max-norm comparison relative to the largest expected value, with a per-dtype tolerance and
    an absolute floor (for results that cancel to nearly zero, e.g. BatchNorm over 2 values)."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    rel = rel if rel is not None else {torch.float64: 1e-10, torch.float32: 1e-4}.get(actual.dtype, 2e-2)
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item()
    floor = {torch.float64: 1e-12}.get(actual.dtype, 1e-6)
    assert err <= rel * scale + floor, f"{what}: max error {err:.3g} > {rel:.1g} x {scale:.3g} + {floor:.0e}"


def assert_same_grads_and_buffers(model, ref, what="", rel=None):
    """Every parameter gradient (where either model has one) and every buffer of `model` against
    `ref`, matched by name: floating entries with assert_close, the rest exactly."""
    ref_params = dict(ref.named_parameters())
    for key, p in model.named_parameters():
        if p.grad is not None or ref_params[key].grad is not None:
            assert_close(p.grad, ref_params[key].grad, f"{what}grad {key}", rel=rel)
    ref_buffers = dict(ref.named_buffers())
    for key, b in model.named_buffers():
        if b.is_floating_point():
            assert_close(b, ref_buffers[key], f"{what}buffer {key}", rel=rel)
        else:
            assert torch.equal(b, ref_buffers[key]), key


def saved_tensors(fn):
    """(fn(), the tensors autograd saved for backward while fn ran)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@functools.lru_cache(maxsize=None)
def dla_root_shapes():
    """Every distinct aggregation-node configuration of the ten DLA variants, found by running
    each model once: tuples (child channel counts, out channels, residual)."""
    from dla_fused.models import create_model
    from dla_fused.models.dla import Root
    found = set()
    for name in ("dla34", "dla46_c", "dla46x_c", "dla60x_c", "dla60", "dla60x", "dla102", "dla102x",
                 "dla102x2", "dla169"):
        model = create_model(name).eval()
        hooks = [m.register_forward_pre_hook(
            lambda mod, args: found.add((tuple(a.shape[1] for a in args), mod.conv.out_channels, mod.residual)))
            for m in model.modules() if isinstance(m, Root)]
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        for h in hooks:
            h.remove()
    return sorted(found)


def cli_in_process(*args):
    """`python -m dla_fused ARGS` run by its main() in this process (no interpreter start-up, no
    second import of torch): return code, stdout and stderr as _cli gives them."""
    from dla_fused.__main__ import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's errors, and sys.exit(message) as Python reports it
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = 1 if isinstance(e.code, str) else e.code or 0
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
