"""Training data from folders of your own images: classification and segmentation.

Classification (`ClassificationFolder`): one subfolder of images per class, as torchvision's
ImageFolder reads it (images may sit in nested folders below their class folder).

Segmentation (`SegmentationFolder`): `images/` and `masks/` side by side; each image has a mask
with the same name (extension aside): a single-channel PNG (mode L, P, I or I;16; BMP and TIFF
too, never a lossy format) whose pixel values are class indices, `ignore_index` (255 by default)
marking pixels that count for nothing.

`split_folders` finds a validation split: `--val-data`, or a `train/` and `val/` inside `--data`.

Everything is checked before training starts, and a `DataError` says what is wrong: a missing or
empty folder, a class folder without images, an image without its mask, two files of one name, a
mask of another size than its image, class indices beyond the number of classes, and images that
cannot be decoded (with `skip_bad=True` those are left out and counted instead; a bad mask is
always an error). Every image and mask is decoded once for this check, in threads.

Augmentation draws from a generator seeded by (seed, epoch, index): the same sample of the same
epoch is augmented the same way in any worker process and after `--resume`.
"""
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import checkpoint

__all__ = ["DataError", "ClassificationFolder", "SegmentationFolder", "split_folders", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".pgm", ".bmp", ".tif", ".tiff")  # lossless: class indices survive
MASK_MODES = ("L", "P", "I", "I;16")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as the checkpoints
SCALE_RANGE = (0.5, 2.0)  # segmentation: random scale around the base size
_LISTED = 5  # files named in an error before "... and N more"
_CHECK_THREADS = 8


class DataError(ValueError):
    """A data folder is missing, empty, or holds files that cannot be used for training."""


def _listing(items: Sequence[str]) -> str:
    return checkpoint._listing(items, _LISTED)


def _folder(path: str, arg: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"{arg} {path!r} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"{arg} {path!r} is not a folder")
    if not any(not e.startswith(".") for e in os.listdir(path)):
        raise DataError(f"{arg} {path!r} is empty")
    return path


def _subfolders(path: str) -> List[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str, extensions=IMAGE_EXTENSIONS) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(extensions)]
    return found


def _by_name(paths: Sequence[str], folder: str, what: str, arg: str) -> Dict[str, str]:
    """{name without extension, relative to folder: path}; two files of one name are an error."""
    named: Dict[str, List[str]] = {}
    for p in paths:
        named.setdefault(os.path.splitext(os.path.relpath(p, folder))[0], []).append(p)
    clashes = [" and ".join(v) for v in named.values() if len(v) > 1]
    if clashes:
        raise DataError(f"{arg}: {len(clashes)} names are used by more than one of the {what} (extension aside), "
                        f"so which pairs with which is unclear: {_listing(clashes)}")
    return {k: v[0] for k, v in named.items()}


def split_folders(data: str, val_data: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(training folder, validation folder or None): `data/train` and `data/val` when `data`
    holds a `train/` folder, else `data` itself; `val_data` overrides the validation folder."""
    _folder(data, "--data")
    train, val = data, None
    if os.path.isdir(os.path.join(data, "val")) and not os.path.isdir(os.path.join(data, "train")):
        raise DataError(f"--data {data!r} holds a val/ folder but no train/ folder: put the training images in "
                        "train/ (or pass the validation folder as --val-data)")
    if os.path.isdir(os.path.join(data, "train")):
        train = _folder(os.path.join(data, "train"), "--data (its train/ folder)")
        if os.path.isdir(os.path.join(data, "val")):
            val = _folder(os.path.join(data, "val"), "--data (its val/ folder)")
    if val_data is not None:
        val = _folder(val_data, "--val-data")
    return train, val


def _decode(path: str):
    """(width, height) of the image, decoded in full (a file cut short opens, then fails to
    decode), or the reason it cannot be used."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        return f"{type(e).__name__}: {e}"


def _map_with_progress(fn, items: Sequence, what: str, progress) -> list:
    """fn over items in threads (PIL decodes outside the GIL), with a progress line every 10 s."""
    progress(f"checking {len(items)} {what} ...")
    results, last = [], time.monotonic()
    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        for r in pool.map(fn, items):
            results.append(r)
            if time.monotonic() - last >= 10:
                progress(f"  {len(results)}/{len(items)} {what} checked")
                last = time.monotonic()
    return results


def _check_images(paths: Sequence[str], skip_bad: bool, arg: str, progress) -> Tuple[Dict[str, tuple], int]:
    """Sizes of the images that decode; an error naming the others, or their count with
    `skip_bad`."""
    results = _map_with_progress(_decode, paths, f"images in {arg}", progress)
    bad = [f"{p} ({r})" for p, r in zip(paths, results) if isinstance(r, str)]
    if bad and not skip_bad:
        raise DataError(f"{arg}: {len(bad)} of {len(paths)} images cannot be read: {_listing(bad)} "
                        "(--skip-bad-images leaves them out)")
    if bad:
        progress(f"{arg}: skipping {len(bad)} unreadable images: {_listing(bad)}")
    return {p: r for p, r in zip(paths, results) if not isinstance(r, str)}, len(bad)


def _quiet(_message: str) -> None:
    pass


def _load_rgb(path: str) -> torch.Tensor:
    """(3, H, W) float image in [0, 1]."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    try:
        with Image.open(path) as im:
            return pil_to_tensor(im.convert("RGB")).float().div_(255)
    except Exception as e:
        raise DataError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e


def _normalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (image - mean) / std


class _Seeded:
    """Per-sample augmentation randomness from (seed, epoch, index), whatever process runs it."""
    seed = 0
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2 ** 63)


# --------------------------------------------------------------------------------------------- classes
class ClassificationFolder(_Seeded, Dataset):
    """Images in one subfolder per class. Training with `augment`: random resized crop
    (scale 0.08-1, as torchvision's and timm's ImageNet recipes) and horizontal flip; otherwise
    (validation, or `augment=False`): resize the shorter side to image_size / 0.875, then a center
    crop. `classes` (a validation split) maps folder names to the training split's indices."""

    def __init__(self, root: str, image_size: int, train: bool = True, augment: bool = True,
                 classes: Optional[Sequence[str]] = None, skip_bad: bool = False, seed: int = 0,
                 arg: str = "--data", progress=_quiet):
        _folder(root, arg)
        found = _subfolders(root)
        if not found:
            raise DataError(f"{arg} {root!r} has no class folders: expected one subfolder of images per class")
        if classes is None:
            classes = found
        else:
            unknown = [c for c in found if c not in classes]
            if unknown:
                raise DataError(f"{arg} {root!r} has class folders the training data lacks: {_listing(unknown)}")
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        files = {c: _image_files(os.path.join(root, c)) for c in found}
        empty = [os.path.join(root, c) for c in found if not files[c]]
        if empty:
            raise DataError(f"{arg}: class folders without images ({', '.join(IMAGE_EXTENSIONS)}): "
                            f"{_listing(empty)}")
        paths = [p for c in found for p in files[c]]
        sizes, self.skipped = _check_images(paths, skip_bad, arg, progress)
        self.samples = [(p, index[c]) for c in found for p in files[c] if p in sizes]
        if not self.samples:
            raise DataError(f"{arg} {root!r}: no readable images")
        self.image_size, self.train, self.augment, self.seed = image_size, train, augment, seed

    @property
    def num_targets(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = _load_rgb(path)
        size = self.image_size
        if self.train and self.augment:
            g = self._generator(index)
            image = _random_resized_crop(image, size, g)
            if torch.rand((), generator=g) < 0.5:
                image = image.flip(-1)
        else:
            image = _resize_shorter(image, round(size / 0.875), "bilinear")
            image = _center_crop(image, size)
        return _normalize(image), label


def _resize(x: torch.Tensor, hw: Tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if mode == "nearest":
        return F.interpolate(x[None, None].float(), size=hw, mode="nearest-exact")[0, 0].to(x.dtype)
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    return F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False, antialias=shrink)[0]


def _resize_shorter(x: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    hw = (side, int(side * w / h)) if h <= w else (int(side * h / w), side)  # torchvision's rounding
    return _resize(x, hw, mode)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))  # torchvision's offsets
    return x[..., top:top + size, left:left + size]


def _random_resized_crop(image: torch.Tensor, size: int, g: torch.Generator,
                         scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """A crop of random area (scale of the image) and aspect ratio, resized to size x size; the
    center crop of the largest fitting box after 10 failed draws (torchvision's rule)."""
    h, w = image.shape[-2:]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand((), generator=g).item())
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            return _resize(image[:, top:top + ch, left:left + cw], (size, size), "bilinear")
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(image[:, top:top + ch, left:left + cw], (size, size), "bilinear")


# --------------------------------------------------------------------------------------------- masks
def _read_mask(path: str):
    """(mask as a (H, W) int64 tensor, None) or (None, the reason it cannot be used)."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                return None, (f"mode {im.mode}: masks must be single-channel class indices "
                              f"(PNG mode {', '.join(MASK_MODES)})")
            return torch.from_numpy(np.array(im, dtype=np.int64)), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _mask_summary(path: str):
    mask, reason = _read_mask(path)
    if mask is None:
        return reason
    return (mask.shape[1], mask.shape[0]), torch.unique(mask)


class SegmentationFolder(_Seeded, Dataset):
    """`images/` and `masks/` with one single-channel PNG mask of class indices per image (same
    name, any image extension). `num_classes`: checked against every mask (indices other than
    `ignore_index` must be below it); None: the largest index found + 1 (the trainer takes the
    largest over the training and validation splits).

    Training with `augment`: the image is scaled so its shorter side is image_size x s, s drawn
    from 0.5-2.0, padded where smaller than image_size (mask: ignore_index), randomly cropped to
    image_size x image_size and flipped horizontally, jointly for image and mask. Without it:
    shorter side to image_size and a center crop. Validation (`train=False`): the shorter side
    to image_size, each side rounded to a multiple of 32, and the mask kept at full resolution
    (predictions are upsampled to it)."""

    def __init__(self, root: str, image_size: int, train: bool = True, augment: bool = True,
                 num_classes: Optional[int] = None, ignore_index: int = 255, skip_bad: bool = False,
                 seed: int = 0, arg: str = "--data", progress=_quiet):
        _folder(root, arg)
        image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        lacking = [d for d in ("images", "masks") if not os.path.isdir(os.path.join(root, d))]
        if lacking:
            raise DataError(f"{arg} {root!r} has no {' or '.join(d + '/' for d in lacking)} folder: segmentation "
                            "data is images/ and masks/ side by side, one mask per image with the same name")
        images = _image_files(image_dir)
        if not images:
            raise DataError(f"{arg}: {image_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        stem = {v: k for k, v in _by_name(images, image_dir, "images", arg).items()}
        masks = _by_name(_image_files(mask_dir, MASK_EXTENSIONS), mask_dir, "masks", arg)
        orphans = [p for p in images if stem[p] not in masks]
        if orphans:
            lossy = _by_name(_image_files(mask_dir), mask_dir, "mask files", arg)
            lossy = [lossy[stem[p]] for p in orphans if stem[p] in lossy]
            if lossy:
                raise DataError(f"{arg}: masks in a lossy format, which changes class indices: {_listing(lossy)}; "
                                f"save them as PNG ({', '.join(MASK_EXTENSIONS)} are read)")
            raise DataError(f"{arg}: {len(orphans)} images have no mask of the same name in {mask_dir!r}: "
                            f"{_listing(orphans)}")
        sizes, self.skipped = _check_images(images, skip_bad, arg, progress)
        images = [p for p in images if p in sizes]
        summaries = _map_with_progress(_mask_summary, [masks[stem[p]] for p in images], f"masks in {arg}", progress)
        bad = [f"{masks[stem[p]]} ({s})" for p, s in zip(images, summaries) if isinstance(s, str)]
        if bad:
            raise DataError(f"{arg}: {len(bad)} masks cannot be used: {_listing(bad)}")
        wrong_size = [f"{masks[stem[p]]} ({s[0][0]}x{s[0][1]}, image {sizes[p][0]}x{sizes[p][1]})"
                      for p, s in zip(images, summaries) if s[0] != sizes[p]]
        if wrong_size:
            raise DataError(f"{arg}: {len(wrong_size)} masks differ in size from their image: {_listing(wrong_size)}")
        values = [s[1][s[1] != ignore_index] for s in summaries]
        negative = [masks[stem[p]] for p, v in zip(images, values) if len(v) and v.min() < 0]
        if negative:
            raise DataError(f"{arg}: masks with negative values: {_listing(negative)}")
        if not any(len(v) for v in values):
            raise DataError(f"{arg}: every mask pixel is the ignore index {ignore_index}: nothing to learn or "
                            "measure (is --ignore-index right?)")
        self.largest = max(int(v.max()) for v in values if len(v))
        if num_classes is None:
            num_classes = self.largest + 1
        beyond = [f"{masks[stem[p]]} (values {', '.join(str(int(x)) for x in v[v >= num_classes][:4])})"
                  for p, v in zip(images, values) if len(v) and v.max() >= num_classes]
        if beyond:
            raise DataError(f"{arg}: {len(beyond)} masks hold class indices >= the number of classes "
                            f"({num_classes}) other than the ignore index {ignore_index}: {_listing(beyond)} "
                            "(--num-classes, --ignore-index)")
        self.samples = [(p, masks[stem[p]]) for p in images]
        self.sizes = [sizes[p] for p in images]
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.image_size, self.train, self.augment, self.seed = image_size, train, augment, seed

    @property
    def num_targets(self) -> int:
        return self.num_classes

    @property
    def uniform(self) -> bool:
        """Whether every sample comes out at one size (so samples batch together)."""
        return self.train or len(set(self.sizes)) == 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image_path, mask_path = self.samples[index]
        image = _normalize(_load_rgb(image_path))
        mask, reason = _read_mask(mask_path)
        if mask is None:
            raise DataError(f"cannot read mask {mask_path!r}: {reason}")
        size = self.image_size
        if not self.train:
            h, w = image.shape[-2:]
            s = size / min(h, w)
            image = _resize(image, (max(32, round(h * s / 32) * 32), max(32, round(w * s / 32) * 32)), "bilinear")
            return image, mask
        if not self.augment:
            image, mask = _resize_shorter(image, size, "bilinear"), _resize_shorter(mask, size, "nearest")
            return _center_crop(image, size), _center_crop(mask, size)
        g = self._generator(index)
        h, w = image.shape[-2:]
        s = size / min(h, w) * (SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * torch.rand((), generator=g).item())
        hw = (max(1, round(h * s)), max(1, round(w * s)))
        image, mask = _resize(image, hw, "bilinear"), _resize(mask, hw, "nearest")
        pad_h, pad_w = max(0, size - hw[0]), max(0, size - hw[1])
        if pad_h or pad_w:  # image: 0 is the mean after normalisation; mask: ignored
            image = F.pad(image, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - size + 1, (), generator=g))
        left = int(torch.randint(0, w - size + 1, (), generator=g))
        image, mask = image[:, top:top + size, left:left + size], mask[top:top + size, left:left + size]
        if torch.rand((), generator=g) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()
