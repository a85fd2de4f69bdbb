import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported (torch._dynamo imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present")


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    """Each test starts from a fixed seed and the default backend selection."""
    from dla_fused import backend
    torch.manual_seed(0)
    saved = backend._requested
    yield
    backend._requested = saved
