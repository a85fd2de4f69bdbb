"""A dataset generated in code, so training runs on a fresh machine with no download.

`ShapesDataset` draws filled shapes (disc, square, triangle, ring, cross, diamond) of random
size, position and colour on a noisy background. Sample i depends only on (seed, i): the same
seed always gives the same images, in any order, in any process.

  task 'cls': one shape per image, target = its class (0 .. num_classes-1)
  task 'seg': one to three shapes, target = per-pixel class map (0 background, 1 + shape class)
"""
import math

import torch
from torch.utils.data import Dataset

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")


def _shape_mask(kind: str, yy, xx, cy: float, cx: float, r: float):
    dy, dx = yy - cy, xx - cx
    if kind == "disc":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        return (dy.abs() <= r * 0.8) & (dx.abs() <= r * 0.8)
    if kind == "triangle":  # apex up: half-width grows linearly from the apex to the base
        return (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) * 0.5)
    if kind == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        w = r * 0.3
        return ((dy.abs() <= w) & (dx.abs() <= r)) | ((dx.abs() <= w) & (dy.abs() <= r))
    if kind == "diamond":
        return dy.abs() + dx.abs() <= r
    raise ValueError(f"unknown shape {kind!r}")


class ShapesDataset(Dataset):
    """Generated images (3, size, size) in [0, 1]-ish float32 and their targets."""

    def __init__(self, num_samples: int = 2048, image_size: int = 64, num_classes: int = 4,
                 task: str = "cls", seed: int = 0):
        if task not in ("cls", "seg"):
            raise ValueError(f"task must be 'cls' or 'seg', got {task!r}")
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be between 2 and {len(SHAPES)}, got {num_classes}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        self.num_samples, self.image_size = num_samples, image_size
        self.num_classes, self.task, self.seed = num_classes, task, seed

    @property
    def num_targets(self) -> int:
        """Output channels a model needs: classes, plus background for segmentation."""
        return self.num_classes + (1 if self.task == "seg" else 0)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        size = self.image_size
        rand = lambda: torch.rand((), generator=g).item()  # noqa: E731
        yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                                torch.arange(size, dtype=torch.float32), indexing="ij")
        background = torch.rand(3, 1, 1, generator=g) * 0.5
        image = background + 0.08 * torch.randn(3, size, size, generator=g)
        target = torch.zeros(size, size, dtype=torch.long)
        count = 1 if self.task == "cls" else 1 + int(rand() * 3)
        label = 0
        for _ in range(count):
            label = int(rand() * self.num_classes)
            r = size * (0.15 + 0.2 * rand())
            cy, cx = r + rand() * (size - 2 * r), r + rand() * (size - 2 * r)
            mask = _shape_mask(SHAPES[label], yy, xx, cy, cx, r)
            colour = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=g)
            image = torch.where(mask, colour.expand(3, size, size), image)
            target[mask] = label + 1
        image = (image - 0.45) / 0.25
        return (image, label) if self.task == "cls" else (image, target)


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean intersection-over-union from a (K, K) confusion matrix (rows: truth)."""
    inter = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - inter
    valid = union > 0
    return float((inter[valid] / union[valid]).mean()) if valid.any() else math.nan
