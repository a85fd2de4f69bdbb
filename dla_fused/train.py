"""Training entry point: `python -m dla_fused train ...` (see `python -m dla_fused train --help`).

Classification with any DLA variant, or segmentation (`--task seg`) with DLA-Up or the
CenterNet-style net, on your own images (`--data`: a folder per class, or images/ and masks/ for
segmentation; see dla_fused.folders) or on the generated shapes dataset (default; no download),
from scratch or fine-tuned from a checkpoint (`--pretrained`: original release, timm, CenterNet or
dla_fused). Mixed precision, channels_last, torch.compile, fused or reference ops,
DistributedDataParallel under torchrun (nccl on GPU, gloo on CPU) with optional synchronised
BatchNorm. Writes to --out: log.jsonl (one JSON object per logged step and per epoch), plot.png,
last.pt (a checkpoint after every epoch and on Ctrl-C; --resume continues exactly from it) and,
with a validation set, best.pt (the epoch with the best top-1 accuracy or mean IoU).
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
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import CheckpointError
from .data import ShapesDataset, mean_iou
from .folders import ClassificationFolder, DataError, SegmentationFolder, split_folders

CHECKPOINT_FORMAT = "dla_fused.train/1"
METRIC_NAMES = {"cls": "top-1 accuracy", "seg": "mIoU"}
SEG_MODELS = ("dla34up", "dla60up", "dla102up", "dla169up", "centernet_dla34", "centernet_dla34_dcn")


@dataclass
class TrainConfig:
    model: str = "dla34"
    task: str = "cls"
    data: Optional[str] = None
    val_data: Optional[str] = None
    pretrained: Optional[str] = None
    augment: bool = True
    ignore_index: int = 255
    skip_bad_images: bool = False
    num_samples: int = 2048
    image_size: int = 64
    num_classes: Optional[int] = None
    batch_size: int = 32
    epochs: int = 2
    steps_per_epoch: Optional[int] = None
    lr: float = 0.05
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    workers: Optional[int] = None
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults after each option's help, except for on/off flags and options without a value
    (their help says what happens then)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dla_fused train", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="model name (dla_fused.list_models())")
    p.add_argument("--task", default=d.task, choices=["cls", "seg"])
    p.add_argument("--data", default=d.data, help="your images: for cls a subfolder of images per class, "
                   "for seg images/ and masks/ (single-channel PNG class indices, same names); either "
                   "may be split into train/ and val/ inside --data; default: generated shapes")
    p.add_argument("--val-data", default=d.val_data, help="validation folder laid out as --data's "
                   "(default: --data's val/, if any)")
    p.add_argument("--pretrained", default=d.pretrained, help="start from this local checkpoint (original "
                   "release, timm, CenterNet or a dla_fused last.pt/best.pt); a classifier or head of "
                   "another shape is re-initialised, and the log says which tensors were kept")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no augmentation: resize and "
                   "center crop only (default for folders: random resized crop and flip for cls, random "
                   "scale 0.5-2, crop and flip of image and mask for seg)")
    p.add_argument("--ignore-index", type=int, default=d.ignore_index, help="seg: mask value that counts for "
                   "nothing in the loss and the mean IoU")
    p.add_argument("--skip-bad-images", action="store_true", help="images that cannot be decoded are left out "
                   "and counted (default: an error naming them, before training starts; every image is decoded "
                   "once then); a bad mask is always an error")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="generated training images")
    p.add_argument("--image-size", type=int, default=d.image_size, help="side in pixels (multiple of 32): "
                   "the training crop for folders")
    p.add_argument("--num-classes", type=int, default=d.num_classes, help="generated shapes: 2-6 (default 4); "
                   "cls folders: the number of class folders; seg folders: the largest mask index + 1")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch, help="cap on steps per epoch "
                   "(default: the whole training set)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=["cosine", "step", "constant"])
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes per training "
                   "process (default: for folders, CPU cores / training processes, at most 8, none when that "
                   "is 1; generated shapes: none)")
    p.add_argument("--amp", default=d.amp, choices=["bf16", "fp16"], help="mixed precision (default: float32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fused", dest="fused", action="store_true", default=d.fused, help="fused ops (default)")
    g.add_argument("--reference", dest="fused", action="store_false", help="plain PyTorch ops")
    p.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes")
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--resume", default=d.resume, help="checkpoint to continue from ('auto': OUT/last.pt); "
                   "default: a fresh start")
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
    for name in ("batch_size", "epochs", "num_samples", "log_every"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.image_size % 32:
        raise SystemExit(f"--image-size must be a multiple of 32 (the backbone's stride), got {cfg.image_size}")
    if cfg.workers is not None and cfg.workers < 0:
        raise SystemExit(f"--workers must be 0 or more, got {cfg.workers}")
    if cfg.val_data is not None and cfg.data is None:
        raise SystemExit("--val-data needs --data (the generated shapes have their own validation set)")
    if cfg.data is None and cfg.num_classes is not None and not 2 <= cfg.num_classes <= 6:
        raise SystemExit(f"--num-classes must be 2-6 for the generated shapes, got {cfg.num_classes}")
    if cfg.data is not None and cfg.num_classes is not None and cfg.num_classes < 2:
        raise SystemExit(f"--num-classes must be at least 2, got {cfg.num_classes}")
    if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
        raise CheckpointError(f"--pretrained {cfg.pretrained!r}: checkpoint file does not exist")


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


def _datasets(cfg: TrainConfig, say):
    """(training set, validation set or None, cfg with num_classes resolved); folders are checked
    here, before anything trains (DataError)."""
    if cfg.data is None:
        classes = 4 if cfg.num_classes is None else cfg.num_classes
        train = ShapesDataset(cfg.num_samples, cfg.image_size, classes, cfg.task, cfg.seed)
        val = ShapesDataset(max(cfg.batch_size, cfg.num_samples // 8), cfg.image_size, classes, cfg.task,
                            cfg.seed + 7919)
        return train, val, replace(cfg, num_classes=classes)
    train_dir, val_dir = split_folders(cfg.data, cfg.val_data)
    common = dict(image_size=cfg.image_size, augment=cfg.augment, skip_bad=cfg.skip_bad_images, seed=cfg.seed,
                  progress=say)
    if cfg.task == "cls":
        train = ClassificationFolder(train_dir, train=True, arg="--data", **common)
        if cfg.num_classes is not None and cfg.num_classes != train.num_targets:
            raise DataError(f"--num-classes {cfg.num_classes} but --data {train_dir!r} has {train.num_targets} "
                            f"class folders")
        val = None if val_dir is None else ClassificationFolder(
            val_dir, train=False, classes=train.classes, arg="--val-data" if cfg.val_data else "--data (val/)",
            **common)
    else:
        train = SegmentationFolder(train_dir, train=True, num_classes=cfg.num_classes,
                                   ignore_index=cfg.ignore_index, arg="--data", **common)
        val = None if val_dir is None else SegmentationFolder(
            val_dir, train=False, num_classes=cfg.num_classes, ignore_index=cfg.ignore_index,
            arg="--val-data" if cfg.val_data else "--data (val/)", **common)
        if cfg.num_classes is None:  # the largest index of either split (a class may be in val/ only)
            classes = max(train.largest, val.largest if val else 0) + 1
            if classes < 2:
                raise DataError(f"--data {cfg.data!r}: the masks hold one class only (index 0, besides the "
                                f"ignore index {cfg.ignore_index}); pass --num-classes")
            for split in (train, val):
                if split is not None:
                    split.num_classes = classes
    return train, val, replace(cfg, num_classes=train.num_targets)


def _default_workers(cfg: TrainConfig, world: int) -> int:
    """DataLoader workers when --workers is not given: folders decode images, so one process per
    core (shared among the training processes) up to 8; the generated shapes are cheap to draw in
    the training process itself."""
    if cfg.data is None:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(8, cores // world) if cores // world > 1 else 0


def _head_modules(model) -> tuple:
    """The layers a fine-tuned model may re-initialise when their shape differs: the classifier
    of a DLA, the last convolution and the class-map upsampling of DLA-Up, the heads of the
    CenterNet-style net, and a dense model's unused backbone classifier."""
    if isinstance(getattr(model, "heads", None), dict):
        return (*model.heads, "base.fc")  # base.fc: the backbone's classifier, never used
    if isinstance(getattr(model, "up", None), torch.nn.Module):  # DLA-Up: the upsampling of the class maps
        return ("fc", "up", "base.fc")
    return ("fc",)


def _build_model(cfg: TrainConfig, num_outputs: int):
    """(model, PretrainedReport or None): the model with its last layer zero-initialised, so
    training starts from uniform predictions (the original init gives logits in the tens for a
    few classes), then loaded from --pretrained (a head of another shape keeps that init), and
    with the parameters its forward never uses (the original layout's unused `project` modules, a
    dense model's backbone classifier) frozen, so DistributedDataParallel need not look for them."""
    from . import create_model, fuse
    from .checkpoint import load_pretrained
    kwargs = {"heads": {"seg": num_outputs}} if cfg.model.startswith("centernet") else {}
    model = create_model(cfg.model, num_classes=None if kwargs else num_outputs, fused=False, **kwargs)
    last = model.seg[-1] if kwargs else (model.fc[0] if isinstance(model.fc, torch.nn.Sequential) else model.fc)
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    report = load_pretrained(model, cfg.pretrained, head=_head_modules(model)) if cfg.pretrained else None
    probe = copy.deepcopy(model).to("meta")  # shapes only: finds what backward never reaches
    output = probe(torch.empty(2, 3, cfg.image_size, cfg.image_size, device="meta"))
    outputs = list(output[0].values()) if isinstance(output, list) else (
        list(output) if isinstance(output, tuple) else [output])
    sum(o.float().sum() for o in outputs).backward()
    reached = {name for name, p in probe.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name not in reached:
            p.requires_grad_(False)
    return (fuse(model) if cfg.fused else model), report


def _logits(output, size):
    """Per-pixel (seg) or per-image (cls) logits from each model family's output."""
    if isinstance(output, list):  # CenterNet-style: [{'seg': (N, K, H/4, W/4)}]
        return F.interpolate(output[0]["seg"], size=size, mode="bilinear", align_corners=False)
    if isinstance(output, tuple):  # DLASeg: (log_softmax at input resolution, logits)
        if output[0].shape[-2:] != tuple(size):  # validation masks kept at their own resolution
            return F.interpolate(output[0], size=size, mode="bilinear", align_corners=False)
        return output[0]
    return output


def _loss(cfg: TrainConfig, output, target):
    logits = _logits(output, target.shape[-2:]).float()
    if cfg.task == "cls":
        return F.cross_entropy(logits, target), logits
    # the mean over the pixels not ignored (0, not NaN, for a crop that holds none)
    loss_fn = F.nll_loss if isinstance(output, tuple) else F.cross_entropy
    total = loss_fn(logits, target, ignore_index=cfg.ignore_index, reduction="sum")
    return total / (target != cfg.ignore_index).sum().clamp_min(1), logits


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
                             cfg: TrainConfig, world_size: int = 1, best: Optional[dict] = None,
                             data: Optional[dict] = None) -> None:
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
             "progress": progress, "config": asdict(cfg), "world_size": world_size, "rng": torch.get_rng_state(),
             "best": best or {}, "data": data or {}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leaves a half-written checkpoint behind


# Settings that fix the model, the data order and the learning-rate schedule: a resumed run must
# use the same ones to continue exactly.
RESUME_KEYS = ("model", "task", "num_classes", "image_size", "data", "augment", "ignore_index",
               "skip_bad_images", "num_samples", "batch_size", "seed", "epochs", "steps_per_epoch", "lr",
               "lr_schedule")


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
    # settings added later are absent from older checkpoints: they had the defaults; an unset
    # num_classes follows from the data (compared as `data`)
    defaults = TrainConfig()
    differ = [f"{k}: checkpoint {saved.get(k, getattr(defaults, k))!r}, now {getattr(cfg, k)!r}"
              for k in RESUME_KEYS if saved.get(k, getattr(defaults, k)) != getattr(cfg, k)
              and not (k == "num_classes" and getattr(cfg, k) is None)]
    if state.get("world_size", 1) != world_size:
        differ.append(f"processes: checkpoint {state.get('world_size', 1)}, now {world_size}")
    if differ:
        raise CheckpointError(f"cannot resume from {path!r}: it was trained with other settings: "
                              + "; ".join(differ))
    return state


def _data_signature(train_set) -> dict:
    """What a resumed run's training data must still be: the sample count and the classes."""
    return {"samples": len(train_set), "classes": list(getattr(train_set, "classes", [])) or train_set.num_targets}


def _evaluate(cfg: TrainConfig, model, dataset, device, amp_ctx, env: Optional["_Distributed"] = None
              ) -> Optional[float]:
    """Top-1 accuracy (cls) or mean IoU (seg, pixels at the ignore index left out) on the
    validation set; with several processes each takes every world-th sample and the counts are
    summed (every process must call it)."""
    if dataset is None:
        return None
    model.eval()
    correct = total = 0
    k = dataset.num_targets
    confusion = torch.zeros(k, k, dtype=torch.long)
    batch = cfg.batch_size if getattr(dataset, "uniform", True) else 1  # images of several sizes: one by one
    world, rank = (env.world, env.rank) if env is not None else (1, 0)
    shard = dataset if world == 1 else torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=batch, shuffle=False, num_workers=cfg.workers or 0)
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
                keep = target != cfg.ignore_index
                confusion += torch.bincount(target[keep] * k + pred[keep], minlength=k * k).view(k, k)
    model.train()
    if world > 1:
        counts = torch.cat([torch.tensor([correct, total]), confusion.flatten()]).to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
        correct, total, confusion = int(counts[0]), int(counts[1]), counts[2:].view(k, k)
    return correct / total if cfg.task == "cls" else mean_iou(confusion)


def _holds_best(path: str, best: dict) -> bool:
    """Whether `path` is the checkpoint of that best epoch."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("best") == best
    except Exception:  # missing or unreadable: not it
        return False


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

    def say(message: str) -> None:
        if env.main and not cfg.quiet:
            print(message, file=sys.stderr, flush=True)
    train_set, val_set, cfg = _datasets(cfg, say)
    if cfg.workers is None:
        cfg = replace(cfg, workers=_default_workers(cfg, env.world))
    skipped = getattr(train_set, "skipped", 0) + getattr(val_set, "skipped", 0)
    if cfg.data is not None and env.main:
        print(f"data: {len(train_set)} training images" + (f", {len(val_set)} validation images" if val_set
              else " (no validation set: --val-data, or train/ and val/ inside --data)")
              + f", {train_set.num_targets} classes" + (f", {skipped} unreadable images skipped" if skipped else "")
              + f"; {cfg.workers} loader workers", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model, pretrained = _build_model(cfg, train_set.num_targets)
    model = model.to(device)
    if pretrained is not None and env.main:
        print(f"pretrained {cfg.pretrained}: {pretrained.summary()}", file=sys.stderr)
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
    best = {}  # {"metric", "epoch"} of the best validation so far
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "log.jsonl")
    best_path = os.path.join(cfg.out, "best.pt")
    data_signature = _data_signature(train_set)
    if cfg.resume:
        path = ckpt_path if cfg.resume == "auto" else cfg.resume
        state = load_training_checkpoint(path, cfg, env.world)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        signature = state.get("data") or data_signature  # older checkpoints have none
        if signature != data_signature:
            raise CheckpointError(f"cannot resume from {path!r}: the training data changed since it was saved "
                                  f"(then {signature['samples']} samples, classes {signature['classes']}; now "
                                  f"{data_signature['samples']}, {data_signature['classes']})")
        progress = dict(state["progress"])
        best = dict(state.get("best", {}))
        if best and not _holds_best(best_path, best):
            if env.main:
                print(f"{best_path} is not the best checkpoint of the run resumed: the best is tracked afresh",
                      file=sys.stderr)
            best = {}
        torch.set_rng_state(state["rng"])
        if env.main:
            print(f"resumed from {path} at epoch {progress['epoch']}, batch {progress['batch']}", file=sys.stderr)
    elif env.main:
        for stale in (log_path, best_path):  # a fresh run starts a fresh log and a fresh best
            if os.path.exists(stale):
                os.remove(stale)
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
    if log and pretrained is not None and not cfg.resume:
        log.write(json.dumps({"kind": "pretrained", "path": cfg.pretrained, "kept": pretrained.kept,
                              "reinitialised": pretrained.reinitialised, "not_in_file": pretrained.not_in_file,
                              "unused": pretrained.unused, "prefix": pretrained.prefix}) + "\n")
    images_per_s, loss_value, metric = [], float("nan"), None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stop = _StopRequest(env)
    try:
        stop.install()
        for epoch in range(progress["epoch"], cfg.epochs):
            sampler.set_position(epoch, progress["batch"] * cfg.batch_size)
            if hasattr(train_set, "set_epoch"):  # augmentation drawn from (seed, epoch, index)
                train_set.set_epoch(epoch)
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
            metric = _evaluate(cfg, model, val_set, device, amp_ctx, env)
            # a NaN (no labelled pixel met) never counts as the best
            improved = metric is not None and math.isfinite(metric) and (not best or metric > best["metric"])
            if improved:
                best = {"metric": metric, "epoch": epoch}
            if env.main:
                metric_name = METRIC_NAMES[cfg.task]
                bar.update(f"epoch {epoch + 1}/{cfg.epochs} loss {loss_value:.4f} "
                           + (f"{metric_name} {metric:.3f}" + (" (best)" if improved else "")
                              if metric is not None else ""), final=True)
                log.write(json.dumps({"kind": "epoch", "epoch": epoch, "loss": loss_value, "metric": metric,
                                      "metric_name": metric_name, "global_step": progress["global_step"]}) + "\n")
                log.flush()
                save_training_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, progress, cfg, env.world,
                                         best, data_signature)
                if improved:
                    save_training_checkpoint(best_path, model, optimizer, scheduler, scaler, progress, cfg,
                                             env.world, best, data_signature)
    except KeyboardInterrupt:
        if env.main and stop.stopping:  # at a step boundary (a second Ctrl-C saves nothing)
            save_training_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, progress, cfg, env.world,
                                     best, data_signature)
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
            "metric_name": METRIC_NAMES[cfg.task] if val_set is not None else None,
            "best_metric": best.get("metric"), "best_epoch": best.get("epoch"),
            "best_checkpoint": best_path if best else None, "skipped_images": skipped,
            "steps": progress["global_step"], "checkpoint": ckpt_path, "log": log_path}


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    try:
        summary = train(cfg)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
