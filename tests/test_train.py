"""The training entry point: equivalence of fused and reference training, exact resume,
synchronised DDP, command-line behaviour."""
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from dla_fused.train import TrainConfig, load_training_checkpoint, train
from dla_fused.checkpoint import CheckpointError
from helpers import cli_in_process

SMALL = dict(model="dla34", image_size=32, batch_size=8, num_samples=64, lr=0.01, log_every=1, quiet=True,
             device="cpu")


@pytest.fixture(autouse=True)
def _fused_kernels(monkeypatch):
    """`auto` runs both ops unfused on the CPU: the fused models here run the C++ kernels, in this
    process and in the processes it starts."""
    from dla_fused import backend
    monkeypatch.setenv("DLA_FUSED_BACKEND", "cpu")
    backend._requested = None


def _losses(log_path):
    with open(log_path) as f:
        return [row["loss"] for row in map(json.loads, f) if row["kind"] == "step"]


def _float64_run(cfg):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        train(cfg)
    finally:
        torch.set_default_dtype(previous)
    return torch.load(os.path.join(cfg.out, "last.pt"), weights_only=True)["model"], _losses(
        os.path.join(cfg.out, "log.jsonl"))


def _assert_same_state(a, b, rel=1e-9):
    """Equal state dicts: floating entries to `rel` of their largest magnitude, the rest exactly."""
    for k in b:
        if b[k].is_floating_point():
            scale = b[k].abs().max().item() or 1.0
            assert (a[k] - b[k]).abs().max().item() <= rel * scale, k
        else:
            assert torch.equal(a[k], b[k]), k


def test_fused_training_equals_reference_in_float64(tmp_path):
    """4 float64 steps from the same weights and data end with the same parameters, running
    statistics and losses (relative 1e-9). The head starts at zero, so step 1 trains only the head
    (from the backbone's forward), step 2 sends gradients through every fused node and step 3's
    loss depends on them: a wrong forward, backward or running-statistics update in the fused
    ops shows here, while float64 keeps the chaotic growth of rounding differences far below it."""
    common = dict(SMALL, epochs=1, steps_per_epoch=4)
    fused, fused_losses = _float64_run(TrainConfig(**common, fused=True, out=str(tmp_path / "fused")))
    ref, ref_losses = _float64_run(TrainConfig(**common, fused=False, out=str(tmp_path / "reference")))
    assert fused["level5.root.conv.weight"].dtype == torch.float64
    assert len(ref_losses) == 4 and len(set(ref_losses)) == 4
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(ref_losses), rtol=1e-9, atol=0)
    _assert_same_state(fused, ref)


def test_fused_float32_training_stays_within_reference_noise(tmp_path):
    """20 float32 steps from the same weights and data. Training a deep BatchNorm network is
    chaotic: a difference in the last bit grows ~20x per step, so two correct float32 evaluation
    orders of the *reference* (NCHW vs channels_last) drift apart by percents within 20 steps.
    Stated tolerance: over the 20 steps the fused run stays as close to the reference as the
    reference's own channels_last run does (mean relative difference at most 3x). Exactness is
    the float64 test's job."""
    runs = {}
    for name, kwargs in (("reference", dict(fused=False)), ("reference_cl", dict(fused=False, channels_last=True)),
                         ("fused", dict(fused=True))):
        cfg = TrainConfig(**{**SMALL, "num_samples": 160}, epochs=1, steps_per_epoch=20, out=str(tmp_path / name),
                          **kwargs)
        assert train(cfg)["steps"] == 20
        runs[name] = torch.tensor(_losses(tmp_path / name / "log.jsonl"))
    ref = runs["reference"]
    fused_diff = (runs["fused"] - ref).abs() / ref
    noise = (runs["reference_cl"] - ref).abs() / ref
    assert len(ref) == 20 and torch.isfinite(runs["fused"]).all()
    assert fused_diff.mean() <= 3 * noise.mean() + 1e-4, (fused_diff, noise)


def test_resume_from_an_epoch_checkpoint_continues_bit_identically(tmp_path, monkeypatch):
    """Resuming from the checkpoint written after epoch 1 ends exactly where the uninterrupted
    2-epoch run ends: same parameters, buffers and losses, bit for bit."""
    import shutil
    import dla_fused.train as T
    cfg = dict(SMALL, epochs=2, steps_per_epoch=3)
    saved = []
    real_save = T.save_training_checkpoint

    def save_and_keep(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        if path.endswith("last.pt"):  # not best.pt
            saved.append(shutil.copy(path, tmp_path / f"epoch{len(saved) + 1}.pt"))
    monkeypatch.setattr(T, "save_training_checkpoint", save_and_keep)
    T.train(TrainConfig(**cfg, out=str(tmp_path / "straight")))
    assert len(saved) == 2
    (tmp_path / "resumed").mkdir()
    T.train(TrainConfig(**cfg, out=str(tmp_path / "resumed"), resume=str(saved[0])))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight" / "log.jsonl")[3:] == _losses(tmp_path / "resumed" / "log.jsonl")


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_identically(tmp_path, monkeypatch):
    """SIGINT mid-epoch stops after the running step and saves a checkpoint there; resuming
    ends exactly where an uninterrupted run ends."""
    import signal
    straight = TrainConfig(**SMALL, epochs=1, steps_per_epoch=6, out=str(tmp_path / "straight"))
    train(straight)
    calls = {"n": 0}
    real_step = torch.optim.SGD.step

    def step_with_ctrl_c(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 4
        return real_step(self, *args, **kwargs)
    cfg = TrainConfig(**SMALL, epochs=1, steps_per_epoch=6, out=str(tmp_path / "split"))
    monkeypatch.setattr(torch.optim.SGD, "step", step_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    state = load_training_checkpoint(str(tmp_path / "split" / "last.pt"), cfg)
    assert state["progress"] == {"epoch": 0, "batch": 4, "global_step": 4}
    train(TrainConfig(**SMALL, epochs=1, steps_per_epoch=6, out=str(tmp_path / "split"), resume="auto"))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight" / "log.jsonl") == _losses(tmp_path / "split" / "log.jsonl")


def test_resume_errors(tmp_path):
    cfg = TrainConfig(**SMALL, epochs=1, steps_per_epoch=1, out=str(tmp_path))
    bad = tmp_path / "page.pt"
    bad.write_text("<!DOCTYPE html><html>Not found</html>")
    with pytest.raises(CheckpointError, match="HTML"):
        train(TrainConfig(**{**SMALL, "resume": str(bad)}, out=str(tmp_path)))
    train(cfg)
    other = TrainConfig(**{**SMALL, "image_size": 64}, epochs=1, out=str(tmp_path), resume="auto")
    with pytest.raises(CheckpointError, match="image_size"):
        train(other)
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(1)}, weights)
    with pytest.raises(CheckpointError, match="not a dla_fused training checkpoint"):
        train(TrainConfig(**SMALL, out=str(tmp_path), resume=str(weights)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(TrainConfig(**kwargs, out=out))
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecated, f"rank {rank} used deprecated APIs: {deprecated}"


def test_ddp_sync_bn_matches_one_process_on_the_full_batch(tmp_path):
    """2 gloo processes with half the batch each and --sync-bn end with the parameters one
    process reaches on the full batch, without deprecation warnings. Run in float64 (default dtype): in float32, tiny
    BatchNorm batches make even the thread count change the parameters by 1e-3 after 3 steps."""
    common = dict(SMALL, epochs=1, steps_per_epoch=3, model="dla46_c")
    a, _ = _float64_run(TrainConfig(**{**common, "batch_size": 8}, out=str(tmp_path / "one")))
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "two"), {**common, "batch_size": 4, "sync_bn": True}),
             nprocs=2, join=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    assert a["base_layer.0.weight"].dtype == torch.float64
    _assert_same_state(b, a)
    # validation is shared between the processes and their counts summed: the same accuracy
    metrics = [[row["metric"] for row in map(json.loads, open(tmp_path / run / "log.jsonl")) if row["kind"] == "epoch"]
               for run in ("one", "two")]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 1


def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "dla_fused", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("extra", [
    ["--model", "dla34", "--amp", "bf16", "--channels-last"],
    ["--model", "dla46_c", "--reference"],
    ["--task", "seg", "--model", "dla34up"],
    ["--task", "seg", "--model", "centernet_dla34"],
], ids=["cls-amp-cl", "cls-reference", "seg-dla34up", "seg-centernet"])
def test_cli_smoke(tmp_path, extra):
    """Each case through main() in this process; the first also as `python -m dla_fused`."""
    run = _cli if "--amp" in extra else cli_in_process
    r = run("train", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--image-size", "32",
            "--num-samples", "16", "--out", str(tmp_path), *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["metric"] is not None
    for name in ("log.jsonl", "last.pt", "plot.png"):
        assert (tmp_path / name).exists(), name


def test_cli_rejects_bad_arguments(tmp_path):
    """Through main() in this process; the first case also as `python -m dla_fused`."""
    for run in (_cli, cli_in_process):
        r = run("train", "--model", "resnet50", "--out", str(tmp_path))
        assert r.returncode != 0 and "unknown" in r.stderr
    r = cli_in_process("train", "--image-size", "50", "--out", str(tmp_path))
    assert r.returncode != 0 and "multiple of 32" in r.stderr
    r = cli_in_process("train", "--task", "seg", "--model", "dla34", "--out", str(tmp_path))
    assert r.returncode != 0 and "dense model" in r.stderr
    corrupt = tmp_path / "last.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    r = cli_in_process("train", "--resume", str(corrupt), "--out", str(tmp_path))
    assert r.returncode == 2 and "truncated or corrupt" in r.stderr
