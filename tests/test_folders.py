"""Training on your own data: image folders for classification and segmentation, augmentation,
validation with best/last checkpoints, fine-tuning from a checkpoint, and the errors raised before
training starts. Every folder here is written by the test itself (small PNG files)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dla_fused.checkpoint import CheckpointError, load_pretrained
from dla_fused.folders import ClassificationFolder, DataError, SegmentationFolder, split_folders
from dla_fused.models import create_model
from dla_fused.models.dla import unused_projects
from dla_fused.train import TrainConfig, _build_model, _default_workers, build_parser, train
from helpers import cli_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=32, batch_size=4, lr=0.01, log_every=1, quiet=True, device="cpu")


@pytest.fixture(autouse=True)
def _fused_kernels(monkeypatch):
    """The fused models run the C++ CPU kernels (`auto` leaves both ops unfused on the CPU)."""
    from dla_fused import backend
    monkeypatch.setenv("DLA_FUSED_BACKEND", "cpu")
    backend._requested = None


def _png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _photo(rng, h, w, tint):
    """An RGB image whose colour says its class, with noise."""
    base = np.array(tint, dtype=np.float64)[None, None] * 255
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


TINTS = [(0.9, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.1, 0.9)]


def make_classification_folder(root, per_class=(6, 5, 7), val_per_class=3, seed=0, names=("cat", "dog", "owl")):
    rng = np.random.default_rng(seed)
    for split, counts in (("train", per_class), ("val", [val_per_class] * len(per_class))):
        if not counts[0]:
            continue
        for c, (name, n) in enumerate(zip(names, counts)):
            for i in range(n):
                h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
                _png(os.path.join(root, split, name, f"{i:03d}.png"), _photo(rng, h, w, TINTS[c]))
    return root


def make_segmentation_folder(root, n_train=6, n_val=3, classes=3, seed=0, ignore=255):
    """Images of quadrants coloured by class, masks of those class indices, a band of `ignore`."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
            mask = np.zeros((h, w), np.uint8)
            labels = rng.integers(0, classes, 4)
            mask[:h // 2, :w // 2], mask[:h // 2, w // 2:] = labels[0], labels[1]
            mask[h // 2:, :w // 2], mask[h // 2:, w // 2:] = labels[2], labels[3]
            mask[:, :2] = ignore
            image = np.stack([np.array(TINTS[m % 3]) * 255 if m != ignore else np.zeros(3) for m in mask.ravel()])
            image = np.clip(image.reshape(h, w, 3) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            _png(os.path.join(root, split, "images", f"scene{i}.jpg" if i == 0 else f"scene{i}.png"), image)
            _png(os.path.join(root, split, "masks", f"scene{i}.png"), mask, "L")
    return root


def _rows(out, kind):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


# --------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_classification_folder_trains_with_validation_and_best_checkpoint(tmp_path, fused):
    data = make_classification_folder(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    summary = train(TrainConfig(model="dla46_c", data=data, epochs=2, fused=fused, workers=2, out=out, **TINY))
    epochs = _rows(out, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(r["metric_name"] == "top-1 accuracy" and 0 <= r["metric"] <= 1 for r in epochs)
    # 9 validation images: accuracy is a multiple of 1/9
    assert all(abs(r["metric"] * 9 - round(r["metric"] * 9)) < 1e-9 for r in epochs)
    assert summary["metric"] == epochs[-1]["metric"]
    assert summary["best_metric"] == max(r["metric"] for r in epochs)
    assert epochs[summary["best_epoch"]]["metric"] == summary["best_metric"]
    assert summary["steps"] == 2 * (18 // 4)
    best = torch.load(summary["best_checkpoint"], weights_only=True)
    assert best["progress"]["epoch"] == summary["best_epoch"] + 1
    assert best["config"]["num_classes"] == 3 and best["model"]["fc.weight"].shape[0] == 3
    assert (tmp_path / "out" / "plot.png").exists() and (tmp_path / "out" / "last.pt").exists()


@pytest.mark.parametrize("model", ["dla34up", "centernet_dla34"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_segmentation_folder_trains_with_mean_iou(tmp_path, model, fused):
    data = make_segmentation_folder(str(tmp_path / "seg"))
    out = str(tmp_path / "out")
    summary = train(TrainConfig(model=model, task="seg", data=data, epochs=1, fused=fused, workers=0, out=out,
                                **{**TINY, "batch_size": 2}))
    (epoch,) = _rows(out, "epoch")
    assert epoch["metric_name"] == "mIoU" and 0 <= epoch["metric"] <= 1
    assert summary["steps"] == 3 and summary["best_checkpoint"] and torch.isfinite(torch.tensor(summary["final_loss"]))
    state = torch.load(summary["checkpoint"], weights_only=True)
    assert state["config"]["num_classes"] == 3  # inferred: largest index 2, the ignore index left out


def test_resume_with_augmentation_and_workers_continues_exactly(tmp_path, monkeypatch):
    """Augmentation is drawn from (seed, epoch, index): a run resumed from its epoch-1 checkpoint
    with another number of loader workers ends bit-identically to the uninterrupted run."""
    import shutil
    import dla_fused.train as T
    data = make_classification_folder(str(tmp_path / "data"), per_class=(4, 4, 4), val_per_class=0)
    saved = []
    real_save = T.save_training_checkpoint

    def save_and_keep(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        if path.endswith("last.pt"):
            saved.append(shutil.copy(path, tmp_path / f"epoch{len(saved) + 1}.pt"))
    monkeypatch.setattr(T, "save_training_checkpoint", save_and_keep)
    cfg = dict(TINY, model="dla46_c", data=data, epochs=2)
    T.train(TrainConfig(**cfg, workers=2, out=str(tmp_path / "straight")))
    T.train(TrainConfig(**cfg, workers=0, out=str(tmp_path / "resumed"), resume=str(saved[0])))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- augmentation
def test_classification_transforms(tmp_path):
    from torchvision.transforms import v2
    data = make_classification_folder(str(tmp_path / "d"))
    train_dir, val_dir = split_folders(data)
    ds = ClassificationFolder(train_dir, image_size=32, train=True, augment=True, seed=3)
    assert ds.classes == ["cat", "dog", "owl"] and len(ds) == 18 and ds.num_targets == 3
    a, b = ds[5][0], ds[5][0]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)  # same (seed, epoch, index): same draw
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a)
    # validation / --no-augment: shorter side to 32 / 0.875, center crop: torchvision's recipe
    val = ClassificationFolder(val_dir, image_size=32, train=False, classes=ds.classes)
    path, label = val.samples[4]
    assert label == 1
    raw = v2.functional.pil_to_tensor(Image.open(path).convert("RGB")).float() / 255
    expected = v2.CenterCrop(32)(v2.Resize(37, antialias=True)(raw))
    expected = (expected - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(val[4][0], expected, atol=1e-4, rtol=0)
    plain = ClassificationFolder(train_dir, image_size=32, train=True, augment=False)
    torch.testing.assert_close(plain[4][0], ClassificationFolder(train_dir, image_size=32, train=False)[4][0])


def test_random_resized_crop_and_flip_draws(tmp_path):
    """Over many draws, the crop takes varied parts of the image, and about half the training
    images are flipped."""
    from dla_fused.folders import _random_resized_crop
    # a horizontal ramp: the mean says where the crop is, a flip reverses the slope
    image = torch.linspace(0, 1, 96).expand(3, 64, 96).contiguous()
    means, slopes = [], []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        x = _random_resized_crop(image, 32, g)
        assert x.shape == (3, 32, 32)
        means.append(x.mean().item())
        slopes.append((x[0, :, -1] - x[0, :, 0]).mean().item())
    assert min(means) < 0.3 and max(means) > 0.7 and all(s >= 0 for s in slopes)
    ramp = (np.linspace(0, 255, 96)[None, :, None] * np.ones((64, 1, 3))).astype(np.uint8)
    _png(str(tmp_path / "ramp" / "only" / "ramp.png"), ramp)
    ds = ClassificationFolder(str(tmp_path / "ramp"), image_size=32, train=True, augment=True)
    flipped = 0
    for epoch in range(60):
        ds.set_epoch(epoch)
        x = ds[0][0]
        flipped += int((x[0, :, -1] - x[0, :, 0]).mean() < 0)
    assert 15 <= flipped <= 45, flipped


def test_segmentation_augmentation_keeps_image_and_mask_aligned(tmp_path, monkeypatch):
    """Image colour encodes the class of each pixel; after the joint random scale, pad, crop and
    flip, the colour at each labelled pixel still names its label (away from the few pixels where
    bilinear and nearest resampling meet at a boundary), and padding is ignored."""
    data = make_segmentation_folder(str(tmp_path / "s"), n_train=4, n_val=2)
    ds = SegmentationFolder(os.path.join(data, "train"), image_size=32, train=True, augment=True, seed=1)
    assert ds.num_classes == 3 and ds.uniform
    tints = (torch.tensor(TINTS) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    agree = total = ignored = 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, mask = ds[i]
            assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
            labelled = mask != 255
            nearest = ((image.permute(1, 2, 0)[:, :, None, :] - tints) ** 2).sum(-1).argmin(-1)
            agree += int((nearest[labelled] == mask[labelled]).sum())
            total += int(labelled.sum())
            ignored += int((~labelled).sum())
    assert total > 0 and agree / total > 0.9, agree / total
    assert ignored > 0
    # the flip: at scale 1 nothing is padded, so an ignore band on the right edge was flipped there
    import dla_fused.folders as folders
    monkeypatch.setattr(folders, "SCALE_RANGE", (1.0, 1.0))
    left = right = 0
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            mask = ds[i][1]
            left += int((mask[:, 0] == 255).all())
            right += int((mask[:, -1] == 255).all())
    assert left > 0 and right > 0, (left, right)
    val = SegmentationFolder(os.path.join(data, "val"), image_size=32, train=False, num_classes=3)
    image, mask = val[0]
    h, w = val.sizes[0][1], val.sizes[0][0]
    assert mask.shape == (h, w) and image.shape[1] % 32 == 0 and image.shape[2] % 32 == 0
    assert min(image.shape[1:]) in (32, 64)


# --------------------------------------------------------------------------------------------- errors
def _expect_data_error(tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        train(TrainConfig(**{**TINY, "model": "dla46_c", "out": str(out), **kwargs}))
    assert not (out / "last.pt").exists() and not (out / "log.jsonl").exists()  # nothing trained


def test_folder_errors_before_training(tmp_path):
    _expect_data_error(tmp_path, "does not exist", data=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    _expect_data_error(tmp_path, "is empty", data=str(tmp_path / "empty"))
    data = make_classification_folder(str(tmp_path / "cls"), val_per_class=0)
    os.makedirs(os.path.join(data, "train", "zebra"))
    open(os.path.join(data, "train", "zebra", "notes.txt"), "w").close()
    _expect_data_error(tmp_path, "class folders without images.*zebra", data=data)
    os.remove(os.path.join(data, "train", "zebra", "notes.txt"))
    os.rmdir(os.path.join(data, "train", "zebra"))
    with open(os.path.join(data, "train", "cat", "broken.png"), "w") as f:
        f.write("not an image")
    _expect_data_error(tmp_path, r"1 of 19 images cannot be read: .*broken\.png.*--skip-bad-images", data=data)
    # a file cut short: its header reads, its pixels do not
    whole = open(os.path.join(data, "train", "dog", "000.png"), "rb").read()
    with open(os.path.join(data, "train", "dog", "cut.png"), "wb") as f:
        f.write(whole[:len(whole) // 2])
    _expect_data_error(tmp_path, r"2 of 20 images cannot be read: .*cut\.png \(OSError", data=data)
    summary = train(TrainConfig(**{**TINY, "model": "dla46_c"}, data=data, skip_bad_images=True, epochs=1,
                                steps_per_epoch=1, out=str(tmp_path / "skip")))
    assert summary["steps"] == 1 and summary["skipped_images"] == 2
    os.remove(os.path.join(data, "train", "cat", "broken.png"))
    os.remove(os.path.join(data, "train", "dog", "cut.png"))
    _expect_data_error(tmp_path, "--num-classes 5 but", data=data, num_classes=5)
    val = make_classification_folder(str(tmp_path / "other"), names=("cat", "dog", "emu"))
    _expect_data_error(tmp_path, "--val-data .*class folders the training data lacks: emu", data=data,
                       val_data=os.path.join(val, "val"))
    flat = tmp_path / "flat"
    flat.mkdir()
    _png(str(flat / "a.png"), np.zeros((8, 8, 3), np.uint8))
    _expect_data_error(tmp_path, "no class folders", data=str(flat))
    os.makedirs(flat / "val" / "cat")
    _expect_data_error(tmp_path, "holds a val/ folder but no train/ folder", data=str(flat))


def test_segmentation_errors_before_training(tmp_path):
    seg = dict(task="seg", model="dla34up")
    data = make_segmentation_folder(str(tmp_path / "seg"), n_val=0)
    train_dir = os.path.join(data, "train")
    _expect_data_error(tmp_path, "no images/ or masks/ folder", data=str(tmp_path / "seg" / "train" / "images"),
                       **seg)
    os.remove(os.path.join(train_dir, "masks", "scene2.png"))
    _expect_data_error(tmp_path, r"1 images have no mask of the same name.*scene2\.png", data=data, **seg)
    _png(os.path.join(train_dir, "masks", "scene2.png"), np.full((5, 5), 1, np.uint8), "L")
    _expect_data_error(tmp_path, r"masks differ in size from their image.*scene2\.png \(5x5", data=data, **seg)
    size = Image.open(os.path.join(train_dir, "images", "scene2.png")).size
    bad = np.zeros(size[::-1], np.uint8)
    bad[0, 0] = 7
    _png(os.path.join(train_dir, "masks", "scene2.png"), bad, "L")
    _expect_data_error(tmp_path, r"hold class indices >= the number of classes \(3\).*scene2\.png \(values 7\)",
                       data=data, num_classes=3, **seg)
    _png(os.path.join(train_dir, "masks", "scene2.png"), np.zeros((*size[::-1], 3), np.uint8))
    _expect_data_error(tmp_path, r"scene2\.png \(mode RGB: masks must be single-channel", data=data, **seg)
    _png(os.path.join(train_dir, "masks", "scene2.png"), np.zeros(size[::-1], np.uint8), "L")
    _png(os.path.join(train_dir, "images", "scene2.jpg"), np.zeros((*size[::-1], 3), np.uint8))
    _expect_data_error(tmp_path, r"1 names are used by more than one of the images.*scene2\.jpg and .*scene2\.png|"
                       r"1 names are used by more than one of the images.*scene2\.png and .*scene2\.jpg",
                       data=data, **seg)
    os.remove(os.path.join(train_dir, "images", "scene2.jpg"))
    os.rename(os.path.join(train_dir, "masks", "scene3.png"), os.path.join(train_dir, "masks", "scene3.jpg"))
    _expect_data_error(tmp_path, r"masks in a lossy format.*scene3\.jpg", data=data, **seg)
    os.rename(os.path.join(train_dir, "masks", "scene3.jpg"), os.path.join(train_dir, "masks", "scene3.png"))
    blank = make_segmentation_folder(str(tmp_path / "blank"), n_train=2, n_val=0, classes=1)
    for name in os.listdir(os.path.join(blank, "train", "masks")):  # class 0 everywhere, ignored as 0
        path = os.path.join(blank, "train", "masks", name)
        _png(path, np.zeros_like(np.array(Image.open(path))), "L")
    _expect_data_error(tmp_path, r"every mask pixel is the ignore index 0", data=blank, ignore_index=0, **seg)
    _expect_data_error(tmp_path, r"the masks hold one class only", data=blank, **seg)
    with pytest.raises(SystemExit, match="--val-data needs --data"):
        train(TrainConfig(**TINY, **seg, val_data=data, out=str(tmp_path / "x")))


def test_cli_reports_data_errors_and_help_is_truthful(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dla_fused", "train", "--data", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error: --data" in r.stderr and "does not exist" in r.stderr, r.stderr[-2000:]
    text = build_parser().format_help()
    assert "(default: True)" not in text and "--skip-bad-images" in text and "--pretrained" in text
    assert build_parser().parse_args([]).fused is True
    assert build_parser().parse_args(["--reference"]).fused is False


def test_default_workers():
    assert _default_workers(TrainConfig(), 1) == 0  # generated shapes
    cores = len(os.sched_getaffinity(0))
    expected = min(8, cores) if cores > 1 else 0
    assert _default_workers(TrainConfig(data="x"), 1) == expected
    assert _default_workers(TrainConfig(data="x"), cores) == 0  # one core per training process


# --------------------------------------------------------------------------------------------- pretrained
def _state(name, **kwargs):
    torch.manual_seed(123)
    return create_model(name, **kwargs).state_dict()


def test_pretrained_classifier_keeps_backbone_and_reinitialises_a_new_head(tmp_path):
    source = _state("dla46_c")  # 1000 classes, as an ImageNet checkpoint
    for p in unused_projects(create_model("dla46_c")):  # timm's files lack the never-used projections
        for k in [k for k in source if k.startswith(p + ".")]:
            del source[k]
    path = tmp_path / "dla46_c_timm.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.items()}}, path)
    cfg = TrainConfig(model="dla46_c", pretrained=str(path), fused=False, image_size=32)
    model, report = _build_model(cfg, 3)
    state = model.state_dict()
    assert sorted(report.reinitialised) == ["fc.bias", "fc.weight"] and not report.not_in_file
    assert not report.unused and report.prefix == ""
    assert len(report.kept) == len(source) - 2
    assert all(torch.equal(state[k], source[k]) for k in report.kept)
    assert state["fc.weight"].shape[0] == 3 and not state["fc.weight"].any()
    # same number of classes: the head is kept as well
    model, report = _build_model(cfg, 1000)
    assert torch.equal(model.state_dict()["fc.weight"], source["fc.weight"]) and not report.reinitialised


def test_pretrained_backbone_into_dense_models_and_centernet_checkpoint(tmp_path):
    backbone = _state("dla34")
    torch.save(backbone, tmp_path / "dla34.pth")
    model, report = _build_model(TrainConfig(model="dla34up", task="seg", pretrained=str(tmp_path / "dla34.pth"),
                                             fused=False), 5)
    assert report.prefix == "base." and len(report.kept) == len(backbone)
    assert {k.split(".")[0] for k in report.not_in_file} == {"dla_up", "fc", "up"}
    state = model.state_dict()
    assert all(torch.equal(state["base." + k], v) for k, v in backbone.items())
    centernet = _state("centernet_dla34")  # heads hm (80), wh, reg
    torch.save({"epoch": 70, "state_dict": centernet}, tmp_path / "ctdet.pth")
    model, report = _build_model(TrainConfig(model="centernet_dla34", task="seg",
                                             pretrained=str(tmp_path / "ctdet.pth"), fused=True), 4)
    assert {k.split(".")[0] for k in report.unused} == {"hm", "wh", "reg"}
    assert {k.split(".")[0] for k in report.not_in_file} == {"seg"}
    state = model.state_dict()
    assert all(torch.equal(state[k], centernet[k]) for k in report.kept) and len(report.kept) > 100


def test_pretrained_dense_checkpoints_with_other_classes_and_into_a_classifier(tmp_path):
    """A DLA-Up checkpoint of 19 classes fine-tunes a 5-class DLA-Up (its class conv and the
    class-map upsampling re-initialised), and gives a classifier its backbone."""
    source = _state("dla34up", num_classes=19)
    torch.save(source, tmp_path / "seg19.pth")
    model, report = _build_model(TrainConfig(model="dla34up", task="seg", pretrained=str(tmp_path / "seg19.pth"),
                                             fused=False), 5)
    assert sorted(report.reinitialised) == ["fc.0.bias", "fc.0.weight", "up.weight"]
    assert len(report.kept) == len(source) - 3 and not report.not_in_file and not report.unused
    state = model.state_dict()
    assert state["up.weight"].shape[0] == 5 and state["up.weight"].sum() > 0  # bilinear kernels, as built
    model, report = _build_model(TrainConfig(model="dla34", pretrained=str(tmp_path / "seg19.pth"), fused=False), 3)
    assert report.prefix == "-base." and sorted(report.reinitialised) == ["fc.bias", "fc.weight"]
    state = model.state_dict()
    assert all(torch.equal(state[k], source["base." + k]) for k in report.kept) and len(report.kept) > 200
    assert "as the backbone" in report.summary()


def test_pretrained_errors(tmp_path):
    torch.save(_state("dla34"), tmp_path / "dla34.pth")
    model = create_model("dla46_c", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shape mismatches outside the head \(fc\).*another variant"):
        load_pretrained(model, tmp_path / "dla34.pth", head=("fc",))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unchanged
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="shares no tensor names"):
        load_pretrained(model, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="--pretrained .* does not exist"):
        train(TrainConfig(**TINY, model="dla46_c", pretrained=str(tmp_path / "nope.pth"), out=str(tmp_path / "o")))


def test_pretrained_is_logged(tmp_path):
    torch.save(_state("dla46_c"), tmp_path / "w.pth")
    data = make_classification_folder(str(tmp_path / "data"), val_per_class=0)
    out = str(tmp_path / "out")
    train(TrainConfig(**TINY, model="dla46_c", data=data, pretrained=str(tmp_path / "w.pth"), epochs=1,
                      steps_per_epoch=1, out=out))
    (row,) = _rows(out, "pretrained")
    assert sorted(row["reinitialised"]) == ["fc.bias", "fc.weight"] and len(row["kept"]) > 100
    assert "level5.root.conv.weight" in row["kept"] and not row["not_in_file"] and not row["unused"]


# --------------------------------------------------------------------------------------------- README
def test_readme_fine_tuning_examples_run(tmp_path, monkeypatch):
    """The README's fine-tuning commands, run as written in a folder holding the files they name
    (a checkpoint in the original release's layout, with random weights, and small image
    folders), with settings appended that make them take seconds: one epoch, one step, 32 px.
    Through main() in this process (test_train.py runs `python -m dla_fused` itself)."""
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    commands = [c for c in re.findall(r"^python -m dla_fused train .*$", readme, flags=re.M) if "--pretrained" in c]
    assert len(commands) >= 2
    for command in commands:
        args = command.split("#")[0].split()[4:]
        ckpt = args[args.index("--pretrained") + 1]
        if not (tmp_path / ckpt).exists():
            torch.save(_state(ckpt.split("-")[0].split(".")[0]), tmp_path / ckpt)
        data = args[args.index("--data") + 1]
        if not (tmp_path / data).exists():
            (make_segmentation_folder if "--task" in args and "seg" in args else make_classification_folder)(
                str(tmp_path / data))
        r = cli_in_process("train", *args, "--epochs", "1", "--steps-per-epoch", "1", "--image-size", "32",
                           "--batch-size", "2", "--quiet")
        assert r.returncode == 0, (command, r.stderr[-3000:])
        assert "pretrained" in r.stderr and json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 1


# --------------------------------------------------------------------------------------------- review cases
def test_a_class_only_in_validation_sets_the_class_count_and_val_data_folder(tmp_path):
    """Without --num-classes the count is the largest index of either split; --val-data names a
    validation folder elsewhere, and its mean IoU is measured."""
    data = make_segmentation_folder(str(tmp_path / "seg"), n_val=0, classes=2)
    val = make_segmentation_folder(str(tmp_path / "other"), n_train=0, n_val=2, classes=2, seed=5)
    path = os.path.join(val, "val", "masks", "scene1.png")
    mask = np.array(Image.open(path))
    mask[-3:, -3:] = 4  # class 4 appears in validation only
    _png(path, mask, "L")
    out = str(tmp_path / "out")
    summary = train(TrainConfig(**{**TINY, "batch_size": 2}, model="dla34up", task="seg", data=data,
                                val_data=os.path.join(val, "val"), epochs=1, steps_per_epoch=1, out=out))
    assert torch.load(summary["checkpoint"], weights_only=True)["config"]["num_classes"] == 5
    assert summary["metric_name"] == "mIoU" and 0 <= summary["metric"] <= 1


def test_ignored_pixels_count_for_nothing():
    """A crop whose every pixel is ignored gives a loss of 0 (not NaN) and zero gradients; ignored
    pixels change neither the loss nor its gradient otherwise."""
    from dla_fused.train import _loss
    cfg = TrainConfig(task="seg", ignore_index=7)
    logits = torch.randn(2, 3, 5, 5, requires_grad=True)
    target = torch.full((2, 5, 5), 7)
    loss, _ = _loss(cfg, logits, target)
    loss.backward()
    assert loss.item() == 0 and not logits.grad.any()
    target = torch.randint(0, 3, (2, 5, 5))
    keep = torch.rand(2, 5, 5) < 0.6
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])
    loss, _ = _loss(cfg, logits, torch.where(keep, target, torch.tensor(7)))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_each_epoch_draws_new_augmentation(tmp_path, monkeypatch):
    """The trainer moves the data set to each epoch (so augmentation differs between epochs, and a
    resumed run draws what the uninterrupted run drew)."""
    data = make_classification_folder(str(tmp_path / "data"), per_class=(2, 2, 2), val_per_class=0)
    seen = []
    real = ClassificationFolder.__getitem__

    def record(self, index):
        seen.append((self.epoch, index))
        return real(self, index)
    monkeypatch.setattr(ClassificationFolder, "__getitem__", record)
    train(TrainConfig(**TINY, model="dla46_c", data=data, epochs=2, workers=0, out=str(tmp_path / "out")))
    assert {e for e, _ in seen} == {0, 1} and len(seen) == 2 * 4


def test_resume_refuses_changed_data(tmp_path):
    data = make_classification_folder(str(tmp_path / "data"), val_per_class=0)
    out = str(tmp_path / "out")
    train(TrainConfig(**TINY, model="dla46_c", data=data, epochs=2, steps_per_epoch=1, out=out))
    _png(os.path.join(data, "train", "cat", "new.png"), np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(CheckpointError, match="the training data changed.*18 samples.*now 19"):
        train(TrainConfig(**TINY, model="dla46_c", data=data, epochs=2, steps_per_epoch=1, out=out, resume="auto"))


def test_pretrained_own_classifier_checkpoint_into_dense_models_and_safetensors(tmp_path):
    """A 3-class dla34 of ours (its training checkpoint) starts a DLA-Up and a CenterNet-style
    net: the dense models' unused 1000-class backbone classifier is no obstacle. A .safetensors
    file (timm's Hub format) loads too."""
    from safetensors.torch import save_file
    data = make_classification_folder(str(tmp_path / "data"), val_per_class=0)
    summary = train(TrainConfig(**TINY, model="dla34", data=data, epochs=1, steps_per_epoch=1,
                                out=str(tmp_path / "cls")))
    source = torch.load(summary["checkpoint"], weights_only=True)["model"]
    for name in ("dla34up", "centernet_dla34"):
        model, report = _build_model(TrainConfig(model=name, task="seg", pretrained=summary["checkpoint"],
                                                 fused=False), 4)
        assert report.prefix == "base." and sorted(report.reinitialised) == ["base.fc.bias", "base.fc.weight"]
        state = model.state_dict()
        assert all(torch.equal(state[k], source[k[len("base."):]]) for k in report.kept)
    save_file({k: v.contiguous() for k, v in _state("dla46_c").items()}, str(tmp_path / "model.safetensors"))
    model, report = _build_model(TrainConfig(model="dla46_c", pretrained=str(tmp_path / "model.safetensors"),
                                             fused=False), 3)
    assert sorted(report.reinitialised) == ["fc.bias", "fc.weight"] and len(report.kept) > 100
