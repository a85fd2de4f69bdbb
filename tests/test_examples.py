"""The example network outside DLA and the README's Python snippets."""
import copy
import importlib.util
import os
import re

import torch

import dla_fused
from helpers import assert_close, use_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    spec = importlib.util.spec_from_file_location("unet_decoder", os.path.join(ROOT, "examples", "unet_decoder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_fused_equals_plain_layers():
    """Same weights: the decoder with dla_fused.nn modules gives the outputs and gradients of
    the one built from plain layers (float64, training mode)."""
    example = _load_example()
    use_backend("cpu")
    torch.manual_seed(0)
    plain = example.UNetDecoder(5, fused=False).double().train()
    fused = example.UNetDecoder(5, fused=True).double().train()
    assert list(plain.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out_plain, out_fused = plain(images), fused(images)
    assert_close(out_fused, out_plain, "decoder output", rel=1e-9)
    out_plain.square().mean().backward(), out_fused.square().mean().backward()
    fused_params = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        assert_close(fused_params[name].grad, p.grad, f"grad {name}", rel=1e-8)
    for name, b in plain.named_buffers():
        assert torch.allclose(dict(fused.named_buffers())[name].double(), b.double()), name


def test_example_trains_a_few_steps():
    example = _load_example()
    losses = example.train(steps=3, batch_size=4, image_size=64, log=lambda _: None)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def _readme_snippets():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_python_snippets_run_as_written():
    snippets = _readme_snippets()
    assert len(snippets) >= 2
    for code in snippets:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_fused_ops_public_api_errors_match_the_models():
    """Bad input through dla_fused.nn gets the op's clear errors."""
    import pytest
    node = dla_fused.nn.AggregationNode([4, 3], 4)
    with pytest.raises(ValueError, match=r"expected children with channels \[4, 3\], got \[4, 5\]"):
        node(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="spatial size"):
        node(torch.randn(2, 4, 3, 3), torch.randn(2, 3, 3, 4))
    step = dla_fused.nn.IDAUpStep(6, 4, 2, skip=True)
    with pytest.raises(ValueError, match="skip must have the upsampled shape"):
        step(torch.randn(2, 6, 3, 3), torch.randn(2, 4, 5, 5))
    plain = copy.deepcopy(step)
    assert plain.to_modules()[1].weight.shape == (4, 1, 4, 4)
