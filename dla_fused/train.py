"""Training entry point: `python -m dla_fused train ...` (see `python -m dla_fused train --help`).

Classification with any DLA variant, or segmentation (`--task seg`) with DLA-Up or the
CenterNet-style net, on an image folder (`--data`, classification) or on the generated shapes
dataset (default; no download). Mixed precision, channels_last, torch.compile, fused or reference
ops, DistributedDataParallel under torchrun (nccl on GPU, gloo on CPU) with optional synchronised
BatchNorm. Writes to --out: log.jsonl (one JSON object per logged step and per epoch), plot.png,
and last.pt (a checkpoint after every epoch and on Ctrl-C; --resume continues exactly from it).
"""
import argparse
import copy
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import CheckpointError
from .data import ShapesDataset, mean_iou

CHECKPOINT_FORMAT = "dla_fused.train/1"
SEG_MODELS = ("dla34up", "dla60up", "dla102up", "dla169up", "centernet_dla34", "centernet_dla34_dcn")


@dataclass
class TrainConfig:
    model: str = "dla34"
    task: str = "cls"
    data: Optional[str] = None
    num_samples: int = 2048
    image_size: int = 64
    num_classes: int = 4
    batch_size: int = 32
    epochs: int = 2
    steps_per_epoch: Optional[int] = None
    lr: float = 0.05
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    workers: int = 0
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    fused: bool = True
    sync_bn: bool = False
    out: str = "runs/train"
    resume: Optional[str] = None
    seed: int = 0
    device: Optional[str] = None
    log_every: int = 10
    quiet: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dla_fused train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="model name (dla_fused.list_models())")
    p.add_argument("--task", default=d.task, choices=["cls", "seg"])
    p.add_argument("--data", default=d.data, help="image folder (class per subfolder) for cls; "
                                                  "default: generated shapes")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="generated training images")
    p.add_argument("--image-size", type=int, default=d.image_size, help="side in pixels (multiple of 32)")
    p.add_argument("--num-classes", type=int, default=d.num_classes, help="generated shape classes (2-6)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch, help="cap on steps per epoch")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=["cosine", "step", "constant"])
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--amp", default=d.amp, choices=["bf16", "fp16"], help="mixed precision")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fused", dest="fused", action="store_true", default=True, help="fused ops (default)")
    g.add_argument("--reference", dest="fused", action="store_false", help="plain PyTorch ops")
    p.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes")
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--resume", default=d.resume, help="checkpoint to continue from ('auto': OUT/last.pt)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(argv) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    return TrainConfig(**{f.name: getattr(ns, f.name) for f in fields(TrainConfig)})


def _validate(cfg: TrainConfig) -> None:
    from .models import list_models
    if cfg.model not in list_models():
        raise SystemExit(f"--model {cfg.model!r} is unknown; choose from {', '.join(list_models())}")
    if cfg.task == "seg" and cfg.model not in SEG_MODELS:
        raise SystemExit(f"--task seg needs a dense model ({', '.join(SEG_MODELS)}), got {cfg.model!r}")
    if cfg.task == "cls" and cfg.model in SEG_MODELS:
        raise SystemExit(f"--model {cfg.model!r} is a dense model: use --task seg")
    if cfg.task == "seg" and cfg.data is not None:
        raise SystemExit("--data is for classification image folders; segmentation trains on the "
                         "generated shapes (leave --data out)")
    for name in ("batch_size", "epochs", "num_samples", "log_every"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.image_size % 32:
        raise SystemExit(f"--image-size must be a multiple of 32 (the backbone's stride), got {cfg.image_size}")
    if cfg.data is not None and not os.path.isdir(cfg.data):
        raise SystemExit(f"--data {cfg.data!r} is not a folder")


# --------------------------------------------------------------------------------------------- pieces
class _Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device_arg: Optional[str]):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg:
            self.device = torch.device(device_arg)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local if self.world > 1 else torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _ResumableSampler(torch.utils.data.Sampler):
    """DistributedSampler's per-epoch order (seeded by seed + epoch), starting `skip` samples in."""

    def __init__(self, dataset, world: int, rank: int, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(self.inner)[self.skip:])

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def _datasets(cfg: TrainConfig):
    if cfg.data is not None:
        from torchvision import datasets, transforms
        tf = transforms.Compose([transforms.Resize((cfg.image_size, cfg.image_size)), transforms.ToTensor(),
                                 transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        train = datasets.ImageFolder(cfg.data, transform=tf)
        return train, None, len(train.classes)
    train = ShapesDataset(cfg.num_samples, cfg.image_size, cfg.num_classes, cfg.task, cfg.seed)
    val = ShapesDataset(max(cfg.batch_size, cfg.num_samples // 8), cfg.image_size, cfg.num_classes, cfg.task,
                        cfg.seed + 7919)
    return train, val, train.num_targets


def _build_model(cfg: TrainConfig, num_outputs: int):
    """The model with its last layer zero-initialised, so training starts from uniform
    predictions (the original init gives logits in the tens for a few classes), and with the
    parameters its forward never uses (the original layout's unused `project` modules, a dense
    model's backbone classifier) frozen, so DistributedDataParallel need not look for them."""
    from . import create_model, fuse
    kwargs = {"heads": {"seg": num_outputs}} if cfg.model.startswith("centernet") else {}
    model = create_model(cfg.model, num_classes=None if kwargs else num_outputs, fused=False, **kwargs)
    last = model.seg[-1] if kwargs else (model.fc[0] if isinstance(model.fc, torch.nn.Sequential) else model.fc)
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    probe = copy.deepcopy(model).to("meta")  # shapes only: finds what backward never reaches
    output = probe(torch.empty(2, 3, cfg.image_size, cfg.image_size, device="meta"))
    outputs = list(output[0].values()) if isinstance(output, list) else (
        list(output) if isinstance(output, tuple) else [output])
    sum(o.float().sum() for o in outputs).backward()
    reached = {name for name, p in probe.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name not in reached:
            p.requires_grad_(False)
    return fuse(model) if cfg.fused else model


def _logits(output, size):
    """Per-pixel (seg) or per-image (cls) logits from each model family's output."""
    if isinstance(output, list):  # CenterNet-style: [{'seg': (N, K, H/4, W/4)}]
        return F.interpolate(output[0]["seg"], size=size, mode="bilinear", align_corners=False)
    if isinstance(output, tuple):  # DLASeg: (log_softmax at full resolution, logits)
        return output[0]
    return output


def _loss(cfg: TrainConfig, output, target):
    logits = _logits(output, target.shape[-2:]).float()
    if cfg.task == "seg" and isinstance(output, tuple):
        return F.nll_loss(logits, target), logits
    return F.cross_entropy(logits, target), logits


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if schedule == "step":
        return 0.1 ** (3 * step // max(total, 1))
    return 1.0


class _Progress:
    """A one-line progress bar on a terminal, periodic lines otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def update(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.tty:
            sys.stderr.write("\r" + text.ljust(100) + ("\n" if final else ""))
            sys.stderr.flush()
        elif final or now - self.last >= 5.0:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self.last = now


class _StopRequest:
    """Ctrl-C (SIGINT) during training asks to stop after the current step, so the checkpoint
    saved then is exactly a step boundary; a second Ctrl-C stops at once."""

    def __init__(self, env: "_Distributed"):
        self.env = env
        self.requested = False  # this process got a Ctrl-C
        self.stopping = False   # some process did, and all stop at this step boundary
        self.previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.env.main:
            print("\nstopping after this step to save a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr)

    def stop_now(self, device) -> bool:
        """True when any process was asked to stop (all processes agree, so DDP stays in step)."""
        if self.env.world == 1:
            self.stopping = self.requested
        else:
            flag = torch.tensor([float(self.requested)], device=device)
            dist.all_reduce(flag)
            self.stopping = bool(flag.item())
        return self.stopping


def save_training_checkpoint(path: str, model, optimizer, scheduler, scaler, progress: dict,
                             cfg: TrainConfig, world_size: int = 1) -> None:
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
             "progress": progress, "config": asdict(cfg), "world_size": world_size, "rng": torch.get_rng_state()}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leaves a half-written checkpoint behind


# Settings that fix the model, the data order and the learning-rate schedule: a resumed run must
# use the same ones to continue exactly.
RESUME_KEYS = ("model", "task", "num_classes", "image_size", "data", "num_samples", "batch_size", "seed",
               "epochs", "steps_per_epoch", "lr", "lr_schedule")


def load_training_checkpoint(path: str, cfg: TrainConfig, world_size: int = 1) -> dict:
    """The training state in `path`, checked against `cfg`; CheckpointError says what is wrong."""
    from .checkpoint import read_state_dict
    if not os.path.isfile(path):
        raise CheckpointError(f"cannot resume: {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        read_state_dict(path)  # raises the precise reason for non-checkpoints and damaged files
        raise CheckpointError(f"cannot resume from {path!r}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"cannot resume from {path!r}: not a dla_fused training checkpoint "
                              f"(expected format {CHECKPOINT_FORMAT!r}); to start from model weights, "
                              "load them with dla_fused.load_checkpoint instead")
    saved = state["config"]
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}" for k in RESUME_KEYS
              if saved.get(k) != getattr(cfg, k)]
    if state.get("world_size", 1) != world_size:
        differ.append(f"processes: checkpoint {state.get('world_size', 1)}, now {world_size}")
    if differ:
        raise CheckpointError(f"cannot resume from {path!r}: it was trained with other settings: "
                              + "; ".join(differ))
    return state


def _evaluate(cfg: TrainConfig, model, dataset, device, amp_ctx) -> Optional[float]:
    """Accuracy (cls) or mean IoU (seg) on the generated validation set."""
    if dataset is None:
        return None
    model.eval()
    correct = total = 0
    k = dataset.num_targets
    confusion = torch.zeros(k, k, dtype=torch.long)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False)
    with torch.no_grad():
        for images, target in loader:
            images = images.to(device)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp_ctx():
                pred = _logits(model(images), target.shape[-2:]).argmax(1).cpu()
            if cfg.task == "cls":
                correct += int((pred == target).sum())
                total += target.numel()
            else:
                confusion += torch.bincount(target.flatten() * k + pred.flatten(), minlength=k * k).view(k, k)
    model.train()
    return correct / total if cfg.task == "cls" else mean_iou(confusion)


def write_plot(log_path: str, plot_path: str, title: str = "") -> bool:
    """Loss per step and accuracy / mIoU per epoch from log.jsonl into a PNG; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps, losses, epochs, metrics, metric_name = [], [], [], [], "metric"
    with open(log_path) as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == "step":
                steps.append(row["global_step"])
                losses.append(row["loss"])
            elif row["kind"] == "epoch" and row.get("metric") is not None:
                epochs.append(row["epoch"] + 1)
                metrics.append(row["metric"])
                metric_name = row["metric_name"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, losses)
    a.set_xlabel("step"), a.set_ylabel("training loss")
    b.plot(epochs, metrics, marker="o")
    b.set_xlabel("epoch"), b.set_ylabel(metric_name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- loop

def _rank_local_buffers() -> dict:
    """DistributedDataParallel keyword that stops it copying rank 0's buffers (BatchNorm running
    statistics) to every rank before each forward: `forward_sync_buffers=False` from torch 2.14 on,
    where `broadcast_buffers` is deprecated, else `broadcast_buffers=False`. The new keyword also
    copies them once at the start, which changes nothing here: every rank starts from the same
    weights and buffers (same seed, or the same checkpoint)."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}

def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (images/s, peak memory, last loss and metric)."""
    _validate(cfg)
    env = _Distributed(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        env.close()


def _train(cfg: TrainConfig, env: _Distributed) -> dict:
    from .sync_bn import synchronize_batch_norm
    device = env.device
    torch.manual_seed(cfg.seed)
    train_set, val_set, num_outputs = _datasets(cfg)
    model = _build_model(cfg, num_outputs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    sampler = _ResumableSampler(train_set, env.world, env.rank, cfg.seed)
    steps_per_epoch = len(sampler.inner) // cfg.batch_size
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    if steps_per_epoch < 1:
        raise SystemExit(f"{len(sampler.inner)} samples per process make no batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(cfg.lr_schedule, s, total_steps))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    progress = {"epoch": 0, "batch": 0, "global_step": 0}
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "log.jsonl")
    if cfg.resume:
        path = ckpt_path if cfg.resume == "auto" else cfg.resume
        state = load_training_checkpoint(path, cfg, env.world)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        progress = dict(state["progress"])
        torch.set_rng_state(state["rng"])
        if env.main:
            print(f"resumed from {path} at epoch {progress['epoch']}, batch {progress['batch']}", file=sys.stderr)
    elif env.main and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log
    if cfg.sync_bn:
        if env.world == 1 and env.main:
            print("--sync-bn with a single process: statistics are already global", file=sys.stderr)
        synchronize_batch_norm(model)
    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **_rank_local_buffers())
    if cfg.compile:
        net = torch.compile(net)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    def amp_ctx():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    bar = _Progress(env.main and not cfg.quiet)
    log = open(log_path, "a") if env.main else None
    images_per_s, loss_value, metric = [], float("nan"), None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stop = _StopRequest(env)
    try:
        stop.install()
        for epoch in range(progress["epoch"], cfg.epochs):
            sampler.set_position(epoch, progress["batch"] * cfg.batch_size)
            loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                drop_last=True, pin_memory=device.type == "cuda")
            tick = time.perf_counter()
            for images, target in loader:
                if progress["batch"] >= steps_per_epoch:
                    break
                images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with amp_ctx():
                    output = net(images)
                loss, _ = _loss(cfg, output, target)
                optimizer.zero_grad(set_to_none=True)
                if scaler:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                scheduler.step()
                progress["batch"] += 1
                progress["global_step"] += 1
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {progress['global_step']}")
                now = time.perf_counter()
                rate = cfg.batch_size * env.world / (now - tick)
                tick = now
                if progress["global_step"] > 2:  # the first steps include warm-up and compilation
                    images_per_s.append(rate)
                if log and progress["global_step"] % cfg.log_every == 0:
                    log.write(json.dumps({"kind": "step", "epoch": epoch, "global_step": progress["global_step"],
                                          "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                                          "images_per_s": rate}) + "\n")
                    log.flush()
                bar.update(f"epoch {epoch + 1}/{cfg.epochs} step {progress['batch']}/{steps_per_epoch} "
                           f"loss {loss_value:.4f} {rate:.1f} img/s lr {scheduler.get_last_lr()[0]:.4g}")
                if stop.stop_now(device):
                    raise KeyboardInterrupt
            progress = {"epoch": epoch + 1, "batch": 0, "global_step": progress["global_step"]}
            if env.main:
                metric = _evaluate(cfg, model, val_set, device, amp_ctx)
                metric_name = "accuracy" if cfg.task == "cls" else "mIoU"
                bar.update(f"epoch {epoch + 1}/{cfg.epochs} loss {loss_value:.4f} "
                           + (f"{metric_name} {metric:.3f}" if metric is not None else ""), final=True)
                log.write(json.dumps({"kind": "epoch", "epoch": epoch, "loss": loss_value, "metric": metric,
                                      "metric_name": metric_name, "global_step": progress["global_step"]}) + "\n")
                log.flush()
                save_training_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, progress, cfg, env.world)
    except KeyboardInterrupt:
        if env.main and stop.stopping:  # at a step boundary (a second Ctrl-C saves nothing)
            save_training_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, progress, cfg, env.world)
            print(f"\ninterrupted after step {progress['global_step']}: checkpoint saved to {ckpt_path}; "
                  f"continue with --resume {ckpt_path}", file=sys.stderr)
        raise
    finally:
        stop.restore()
        if log:
            log.close()
    if env.main:
        ops = "fused" if cfg.fused else "reference"
        write_plot(log_path, os.path.join(cfg.out, "plot.png"), f"{cfg.model} ({ops})")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"images_per_s": sum(images_per_s) / len(images_per_s) if images_per_s else float("nan"),
            "peak_memory_bytes": peak, "final_loss": loss_value, "metric": metric,
            "steps": progress["global_step"], "checkpoint": ckpt_path, "log": log_path}


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    try:
        summary = train(cfg)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
