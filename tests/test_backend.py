"""Backend choice: explicit selection, `auto`, and the measured choice (`tune`, what `auto` does on
CUDA), exercised on the CPU with the cpu, reference and interpreted Triton backends."""
import types

import pytest
import torch

from dla_fused import backend
from dla_fused.ops.aggregation import aggregation_node, aggregation_node_reference
from dla_fused.ops.ida_up import ida_up
from helpers import assert_close


@pytest.fixture(autouse=True)
def _fresh_tuning():
    backend.clear_tuned()
    yield
    backend.clear_tuned()


def _node_inputs(size=(5, 3)):
    children = [torch.randn(2, c, *size, requires_grad=True) for c in (6, 4)]
    weight = (torch.randn(6, 10, 1, 1) / 10 ** 0.5).requires_grad_()
    gamma, beta = (torch.rand(6) + 0.5).requires_grad_(), torch.randn(6).requires_grad_()
    return children, weight, gamma, beta


def _node(children, weight, gamma, beta, fn=aggregation_node):
    return fn(children, weight, gamma, beta, torch.zeros(6), torch.ones(6), None, True, 0.1, 1e-5, True)


def _counting(name, monkeypatch):
    """Replace backend `name`'s primitives by counting wrappers; returns the call log."""
    calls = []
    real = backend._load(name)

    def wrap(prim, fn):
        def counted(*args, **kwargs):
            calls.append(prim)
            return fn(*args, **kwargs)
        return counted
    spy = types.SimpleNamespace(**{p: wrap(p, getattr(real, p)) for p in backend.PRIMITIVES})
    monkeypatch.setitem(backend._loaded, name, spy)
    return calls


def test_tune_times_every_usable_backend_once_per_key_and_runs_the_fastest():
    backend.set_backend("tune")
    children, weight, gamma, beta = _node_inputs()
    out = _node(children, weight, gamma, beta)
    (key, (winner, times)), = backend.tuned_choices().items()
    assert key[:3] == ("cpu", None, "aggregation_node")
    assert set(times) == {"cpu", "reference", "triton"} and all(t > 0 for t in times.values())
    assert winner == min(times, key=times.get)
    assert_close(out, _node(children, weight, gamma, beta, aggregation_node_reference), "output")
    _node(children, weight, gamma, beta).sum().backward()
    assert backend.tuned_choices()[key] == (winner, times)  # same key: not timed again
    _node(*_node_inputs(size=(4, 4)))
    assert len(backend.tuned_choices()) == 2  # a new shape is a new key
    assert f"{winner} (" in backend.backend_info(print_it=False)


def test_forward_and_backward_run_on_the_measured_winner(monkeypatch):
    """With fake timings that make `reference` the fastest, every primitive of the forward and the
    backward (eager and compiled paths) runs on it, and none on the others."""
    fake = iter([3.0, 2.0, 1.0, 3.0, 2.0, 1.0])  # triton, cpu, reference (KERNELS order), twice

    def fake_seconds(fn, device):
        fn()  # the trial itself must run on each candidate
        return next(fake)
    monkeypatch.setattr(backend, "_seconds", fake_seconds)
    backend.set_backend("tune")
    children, weight, gamma, beta = _node_inputs()
    x = torch.randn(2, 6, 4, 3, requires_grad=True)
    up = dict(up_weight=torch.randn(6, 1, 4, 4), factor=2)
    _node(children, weight, gamma, beta)  # both ops tune (the trials run on every backend)
    ida_up(x, **up)
    used = {name: _counting(name, monkeypatch) for name in ("reference", "cpu", "triton")}
    _node(children, weight, gamma, beta).sum().backward()
    compiled = torch.compile(lambda *a: _node(*a), fullgraph=True)
    compiled(children, weight, gamma, beta).sum().backward()
    ida_up(x, **up).sum().backward()
    assert {"agg_conv", "agg_apply", "agg_backward_reduce", "agg_backward_dz", "agg_backward_gemm",
            "ida_upsample", "ida_upsample_backward"} <= set(used["reference"])
    assert used["cpu"] == [] and used["triton"] == []
    winners = {key[2]: choice[0] for key, choice in backend.tuned_choices().items()}
    assert winners == {"aggregation_node": "reference", "ida_up": "reference"}


def test_auto_measures_on_cuda_and_takes_its_measured_choice_per_op_on_cpu(monkeypatch):
    """On CPU `auto` runs both ops unfused, through PyTorch's own ops (measured faster than every
    fused backend there, backend.AUTO_ORDER_CPU), without timing anything."""
    backend.set_backend("auto")
    for op in backend.OPS:
        assert backend.resolve(torch.device("cuda"), op) == "tune"
        assert backend.resolve(torch.device("cpu"), op) == "eager"
    assert backend._usable("cpu") == ["triton", "cpu", "reference"]  # what `tune` would measure here
    used = {name: _counting(name, monkeypatch) for name in ("reference", "cpu")}
    out = _node(*_node_inputs())
    assert out.grad_fn.name() == "ReluBackward0"  # PyTorch's own graph, no fused node
    out.sum().backward()
    x = torch.randn(2, 6, 4, 3, requires_grad=True)
    up = torch.randn(6, 1, 4, 4, requires_grad=True)
    out = ida_up(x, up_weight=up, factor=2)
    assert out.grad_fn.name() == "ConvolutionBackward0"
    out.sum().backward()
    assert used["reference"] == [] and used["cpu"] == []  # no primitive ran
    assert backend.tuned_choices() == {}  # nothing is timed on the CPU under auto
    info = backend.backend_info(print_it=False)
    assert "aggregation_node on cpu: eager (unfused" in info and "ida_up on cpu: eager (unfused" in info


def test_cpu_kernels_keep_z_by_default_and_recompute_when_memory_efficient(monkeypatch):
    """On the CPU the aggregation node keeps its conv output for backward unless
    memory_efficient=True: the out-of-place primitives, and no second product in backward."""
    backend.set_backend("cpu")
    for memory_efficient, expected in ((None, ["agg_conv", "agg_apply", "agg_backward_reduce", "agg_backward_dz",
                                               "agg_backward_gemm"]),
                                       (True, ["agg_conv", "agg_apply_", "agg_conv", "agg_backward_reduce",
                                               "agg_backward_dz_", "agg_backward_gemm"])):
        used = _counting("cpu", monkeypatch)
        children, weight, gamma, beta = _node_inputs()
        aggregation_node(children, weight, gamma, beta, torch.zeros(6), torch.ones(6), None, True, 0.1, 1e-5,
                         True, memory_efficient=memory_efficient).sum().backward()
        assert used == expected


def test_eager_backend_runs_the_unfused_ops():
    """`eager` runs the plain composition (PyTorch's autograd graph); with a process group, which
    that composition cannot serve, the fused op runs on the reference primitives
    (test_aggregation.py: test_synchronised_statistics_single_process_group)."""
    backend.set_backend("eager")
    children, weight, gamma, beta = _node_inputs()
    out = _node(children, weight, gamma, beta)
    assert out.grad_fn.name() == "ReluBackward0"
    assert backend.primitives_for(torch.device("cpu"), "aggregation_node") is backend._load("reference")
