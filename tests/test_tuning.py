"""Triton autotuning that users can live with (kernels/_common.py): keys bucketed by powers of two
of the pixel count, each bucket tuned once and its config pinned in a file that later runs reuse
(same config, same bits), and no recompiles across pixel counts. The GPU launch path is driven
here with stand-ins for the kernel and its autotuner: no GPU is needed to check the logic."""
import json

import pytest
import torch

from dla_fused.kernels import _common, aggregation, ida_up


def test_bucket_is_the_next_power_of_two():
    assert [_common.bucket(v) for v in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]


class _Kernel:
    """Stands in for a @triton.jit function: records direct launches."""
    arg_names = ["x_ptr", "num_pixels", "channels"]
    __name__ = "_fake_kernel"

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


class _Autotuner:
    """Stands in for triton.autotune's wrapper: a launch tunes and leaves best_config."""

    def __init__(self, winner):
        self.runs, self.winner, self.best_config = 0, winner, None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.runs += 1
            self.best_config = self.winner
        return run


def _tunable(winner):
    t = _common.Tunable.__new__(_common.Tunable)
    t.fn, t.key, t.name = _Kernel(), ["num_pixels", "channels"], "_fake_kernel"
    t.tuned = _Autotuner(winner)
    return t


def test_each_bucket_tunes_once_and_is_pinned_across_runs(tmp_path, monkeypatch):
    path = tmp_path / "configs.json"
    monkeypatch.setenv("DLA_FUSED_TUNING_CACHE", str(path))
    monkeypatch.setattr(_common, "STORE", _common.ConfigStore())
    import triton
    winner = triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4, num_stages=2)
    t = _tunable(winner)
    x = torch.zeros(4)
    t._tuned_launch(None, (x, 1000, 64), {})  # tunes
    t._tuned_launch(None, (x, 1020, 64), {})  # same bucket (1024): the pinned config, no tuning
    assert t.tuned.runs == 1
    assert t.fn.launches == [dict(BLOCK_P=64, BLOCK_C=32, num_warps=4, num_stages=2)]
    t._tuned_launch(None, (x, 1030, 64), {})  # bucket 2048: tunes
    t._tuned_launch(None, (x, 1020, 32), {})  # other channels: tunes
    assert t.tuned.runs == 3
    stored = json.loads(path.read_text())
    assert len(stored) == 3 and all(v["kwargs"] == {"BLOCK_P": 64, "BLOCK_C": 32} for v in stored.values())
    # a later run (a fresh store reading the file) launches the pinned config without tuning
    monkeypatch.setattr(_common, "STORE", _common.ConfigStore())
    later = _tunable(triton.Config({"BLOCK_P": 16, "BLOCK_C": 16}, num_warps=8, num_stages=3))
    later._tuned_launch(None, (x, 900, 64), {})
    assert later.tuned.runs == 0
    assert later.fn.launches == [dict(BLOCK_P=64, BLOCK_C=32, num_warps=4, num_stages=2)]


def test_cache_off_and_unreadable_file(tmp_path, monkeypatch):
    import triton
    winner = triton.Config({"BLOCK_P": 64}, num_warps=4, num_stages=2)
    monkeypatch.setenv("DLA_FUSED_TUNING_CACHE", "off")
    monkeypatch.setattr(_common, "STORE", _common.ConfigStore())
    t = _tunable(winner)
    t._tuned_launch(None, (torch.zeros(1), 10, 3), {})
    t._tuned_launch(None, (torch.zeros(1), 12, 3), {})
    assert t.tuned.runs == 1 and not list(tmp_path.iterdir())
    bad = tmp_path / "bad.json"
    bad.write_text("{half")
    monkeypatch.setenv("DLA_FUSED_TUNING_CACHE", str(bad))
    monkeypatch.setattr(_common, "STORE", _common.ConfigStore())
    t = _tunable(winner)
    t._tuned_launch(None, (torch.zeros(1), 10, 3), {})  # tunes again and rewrites the file
    assert t.tuned.runs == 1 and json.loads(bad.read_text())


def _tunables():
    for module in (aggregation, ida_up):
        for value in vars(module).values():
            if isinstance(value, _common.Tunable):
                yield value


@pytest.mark.parametrize("kernel", list(_tunables()), ids=lambda k: k.name)
def test_bucketed_arguments_are_not_specialised(kernel):
    """A bucketed key argument must not be specialised by Triton either (divisibility by 16),
    or a new pixel count in a tuned bucket would still compile again."""
    bucketed = [k for k in kernel.key if k in _common.BUCKETED]
    assert bucketed, f"{kernel.name}: its autotune key has no bucketed size"
    fn = kernel.fn
    names = getattr(fn, "kwargs", {}).get("do_not_specialize") or getattr(fn, "do_not_specialize", ())
    names = [fn.arg_names[n] if isinstance(n, int) else n for n in names]
    assert set(bucketed) <= set(names)
