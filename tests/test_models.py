"""DLA classifiers: structure and parameter counts (docs/design.md, section 8), equivalence with timm,
checkpoint loading and its errors, bad input."""
import functools

import pytest
import timm
import torch

from dla_fused.checkpoint import CheckpointError, load_checkpoint
from dla_fused.models import (CONFIGS, BottleneckX, Root, create_model, list_models,
                              parameter_table, unused_projects)

# name: (params of the original release, params in timm's layout), docs/design.md, section 8
PARAMS = {
    "dla34": (15_783_832, 15_742_104), "dla46_c": (1_309_848, 1_301_400),
    "dla46x_c": (1_076_888, 1_068_440), "dla60x_c": (1_336_728, 1_319_832),
    "dla60": (22_334_104, 22_036_632), "dla60x": (17_649_816, 17_352_344),
    "dla102": (33_731_736, 33_268_888), "dla102x": (26_772_120, 26_309_272),
    "dla102x2": (41_745_048, 41_282_200), "dla169": (53_989_016, 53_389_720),
}
EQUIVALENCE = ["dla34", "dla46x_c", "dla60x_c", "dla102x2"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def unused_keys(model):
    return {f"{n}.{k}" for n, m in unused_projects(model).items() for k in m.state_dict()}


@functools.lru_cache(maxsize=None)
def ours_and_timm(name):
    """Our model carrying the weights of a timm model with randomised BatchNorm state (built once)."""
    torch.manual_seed(1)
    reference = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    ours = create_model(name)
    result = ours.load_state_dict(reference.state_dict(), strict=False)
    # (PyTorch itself supplies num_batches_tracked for modules the file has no metadata for)
    assert set(result.missing_keys) == {k for k in unused_keys(ours) if "num_batches" not in k}
    assert not result.unexpected_keys
    return ours, reference


@functools.lru_cache(maxsize=None)
def small_model():
    return create_model("dla46x_c")


# ---------------------------------------------------------------------------------- structure

def test_parameter_table_matches_design():
    assert {row.name: (row.original, row.timm) for row in parameter_table()} == PARAMS


def test_registry_lists_every_family():
    names = list_models()
    assert names[:10] == list(PARAMS)
    assert {"dla34up", "dla60up", "dla102up", "dla169up", "centernet_dla34", "centernet_dla34_dcn"} <= set(names)


@pytest.mark.parametrize("name", list(PARAMS))
def test_keys_and_shapes_match_timm(name):
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(name, pretrained=False).state_dict()
    mine = ours.state_dict()
    assert set(mine) - set(theirs) == unused_keys(ours)
    assert set(theirs) <= set(mine)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(mine[k].shape) for k in theirs}


def test_root_with_most_children_has_original_shape():
    with torch.device("meta"):
        model = create_model("dla34")
    # children 128 + 128 + 64 (bottom of level3) + 128 (x1 of the level-2 tree)
    assert tuple(model.level3.tree2.root.conv.weight.shape) == (128, 448, 1, 1)
    assert "level3.project.0.weight" in model.state_dict()  # built but unused, as the original


def test_cardinality_is_per_model():
    """The original set BottleneckX.cardinality = 64 on the class when building dla102x2."""
    with torch.device("meta"):
        create_model("dla102x2")
        later = create_model("dla102x")
    assert not hasattr(BottleneckX, "cardinality")
    groups = {m.conv2.groups for m in later.modules() if isinstance(m, BottleneckX)}
    assert groups == {32}
    assert sum(p.numel() for p in later.parameters()) == PARAMS["dla102x"][0]
    assert CONFIGS["dla102x"].cardinality == 32 and CONFIGS["dla102x2"].cardinality == 64


def test_init_matches_original():
    model = small_model()
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all())
               for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    w = model.level5.tree1.conv2.weight  # 3x3, 256 outputs: std sqrt(2 / (9 * 256))
    assert abs(w.std().item() / (2 / (9 * w.shape[0])) ** 0.5 - 1) < 0.05


def test_root_formula():
    root = Root(6, 4, 1, residual=True).eval()
    with torch.no_grad():
        root.bn.running_mean.uniform_(-1, 1)
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 2, 5, 5)
    expected = torch.relu(root.bn(root.conv(torch.cat([a, b], 1))) + a)
    torch.testing.assert_close(root(a, b), expected)
    with pytest.raises(ValueError, match="1x1"):
        Root(6, 4, 3, False)


def test_return_levels_shapes():
    model = create_model("dla34", return_levels=True).eval()
    with torch.no_grad():
        levels = model(torch.randn(2, 3, 64, 96))
    assert [tuple(t.shape) for t in levels] == [
        (2, c, 64 // s, 96 // s) for c, s in zip(CONFIGS["dla34"].channels, (1, 2, 4, 8, 16, 32))]


# --------------------------------------------------------------------------- timm equivalence

@pytest.mark.parametrize("name", EQUIVALENCE)
def test_eval_output_matches_timm(name):
    ours, reference = ours_and_timm(name)
    ours.eval(), reference.eval()
    with torch.no_grad():
        for shape in ((2, 3, 64, 64), (1, 3, 96, 32)):
            x = torch.randn(shape)
            out = ours(x)
            assert out.shape == (shape[0], 1000)
            assert rel_err(out, reference(x)) <= 1e-5


@pytest.mark.parametrize("name", EQUIVALENCE)
def test_training_gradients_match_timm(name):
    ours, reference = ours_and_timm(name)
    ours.train(), reference.train()
    x, weight = torch.randn(2, 3, 64, 64), torch.randn(2, 1000)
    for model in (ours, reference):
        model.zero_grad(set_to_none=True)
        (model(x) * weight).sum().backward()
    theirs = dict(reference.named_parameters())
    for key, p in ours.named_parameters():
        if key in theirs:
            assert rel_err(p.grad, theirs[key].grad) <= 1e-5, key
        else:
            assert p.grad is None, key  # the never-used projects


# -------------------------------------------------------------------------------- checkpoints

def test_original_layout_round_trip(tmp_path):
    model = small_model()
    path = tmp_path / "dla46x_c.pth"
    torch.save(model.state_dict(), path)
    fresh = load_checkpoint(create_model("dla46x_c"), path, strict=True)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_wrapped_dataparallel_checkpoint(tmp_path):
    model = small_model()
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    fresh = create_model("dla46x_c", pretrained=path)
    assert torch.equal(fresh.fc.weight, model.fc.weight)
    torch.save({"model": model.state_dict()}, path)
    assert torch.equal(load_checkpoint(create_model("dla46x_c"), path).fc.bias, model.fc.bias)


def test_timm_checkpoint_file_loads(tmp_path):
    ours, reference = ours_and_timm("dla46x_c")
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    fresh = load_checkpoint(create_model("dla46x_c"), path)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in reference.state_dict().items())


def test_legacy_checkpoint_without_num_batches_tracked(tmp_path):
    state = {k: v for k, v in small_model().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    load_checkpoint(create_model("dla46x_c"), tmp_path / "old.pth")


def test_error_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth.*does not exist"):
        load_checkpoint(small_model(), path)
    assert issubclass(CheckpointError, RuntimeError)


def test_error_html_page(tmp_path):
    path = tmp_path / "dla34.pth"
    path.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    with pytest.raises(CheckpointError, match=r"dla34\.pth.*not a PyTorch checkpoint.*HTML"):
        load_checkpoint(small_model(), path)


def test_error_truncated_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(small_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated or corrupt"):
        load_checkpoint(small_model(), path)


def test_error_missing_and_unexpected_keys(tmp_path):
    state = dict(small_model().state_dict())
    del state["fc.bias"]
    state["head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "keys.pth")
    with pytest.raises(CheckpointError, match=r"keys.pth.*1 missing keys: fc\.bias; 1 unexpected keys: head\.weight"):
        load_checkpoint(create_model("dla46x_c"), tmp_path / "keys.pth")
    state = {k: v for k, v in state.items() if not k.startswith("level5")}
    torch.save(state, tmp_path / "many.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: .*, \.\.\. and \d+ more"):
        load_checkpoint(create_model("dla46x_c"), tmp_path / "many.pth")


def test_error_shape_mismatch(tmp_path):
    torch.save(create_model("dla46x_c", num_classes=10).state_dict(), tmp_path / "ten.pth")
    with pytest.raises(CheckpointError, match=r"ten.pth.*2 shape mismatches: fc\.weight \(model \(1000, 256, 1, 1\), "
                                              r"file \(10, 256, 1, 1\)\), fc\.bias"):
        load_checkpoint(create_model("dla46x_c"), tmp_path / "ten.pth")


# ---------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("shape, message", [
    ((2, 1, 64, 64), r"expected input of shape \(N, 3, H, W\).*got \(2, 1, 64, 64\)"),
    ((3, 64, 64), r"got \(3, 64, 64\)"),
    ((1, 3, 65, 64), r"multiples of 32 \(or one less\).*e\.g\. to 96, 64"),
    ((1, 3, 48, 64), r"multiples of 32"),
    ((1, 3, 0, 64), r"multiples of 32"),
])
def test_bad_input_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        small_model()(torch.randn(shape))


def test_bad_input_type():
    with pytest.raises(ValueError, match="floating-point"):
        small_model()(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected a tensor"):
        small_model()([[0.0]])


def test_sizes_one_below_a_multiple_of_32_work():
    with torch.no_grad():
        assert small_model().eval()(torch.randn(1, 3, 63, 31)).shape == (1, 1000)


def test_create_model_errors():
    with pytest.raises(ValueError, match=r"unknown model 'dla35'; known models: dla34, dla46_c"):
        create_model("dla35")
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            create_model("dla46x_c", num_classes=bad)
    with pytest.raises(ValueError, match="local checkpoint path"):
        create_model("dla46x_c", pretrained=True)
