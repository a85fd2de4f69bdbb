import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported (torch._dynamo imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
