import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported (torch._dynamo imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpret_device_calls_without_repatching():
    """Triton's interpreter patches triton.language again on every call of a @triton.jit helper
    from a kernel (inspect.getmembers over the language modules: about a sixth of an interpreted
    test's time), although the running kernel's launch has patched it already. Such a call skips
    the patching when the helper sees no language module the kernel does not (then it would patch
    exactly what is patched). Tests only; without these interpreter internals nothing changes."""
    from triton.runtime import interpreter as it
    if not all(hasattr(it, name) for name in ("GridExecutor", "InterpretedFunction", "InterpreterError", "tl")):
        return
    running = []

    def languages(fn):
        return frozenset(id(v) for v in fn.__globals__.values() if v is it.tl or v is it.tl.core)
    launch, device_call = it.GridExecutor.__call__, it.InterpretedFunction.__call__

    def launch_tracked(self, *args, **kwargs):
        running.append(languages(self.fn))
        try:
            return launch(self, *args, **kwargs)
        finally:
            running.pop()

    def device_call_unpatched(self, *args, **kwargs):
        if not running or not languages(self.fn) <= running[-1]:
            return device_call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise it.InterpreterError(repr(e)) from e
    it.GridExecutor.__call__, it.InterpretedFunction.__call__ = launch_tracked, device_call_unpatched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_device_calls_without_repatching()

# torch.compile's on-disk caches key a compiled backward on the forward graph, which does not
# change when one of this package's custom ops changes its backward: a cache left by an older
# checkout would serve a stale backward. The tests compile into a directory of their own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dla_fused-tests-inductor-")

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores,
# so that torch's intra-op threads do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present")


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    """Each test starts from a fixed seed and the default backend selection."""
    from dla_fused import backend
    torch.manual_seed(0)
    saved = backend._requested
    yield
    backend._requested = saved
