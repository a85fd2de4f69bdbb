"""Dense prediction: DLA-Up and the CenterNet-style network (docs/design.md, section 9)."""
import functools

import pytest
import torch
import torch.nn.functional as F

from dla_fused.checkpoint import CheckpointError, load_checkpoint
from dla_fused.models import (CenterNet, DLASeg, IDAUp, ModulatedDeformConv2d, create_model,
                              fill_up_weights)

DLA_UP_PARAMS = {"dla34up": 18_095_163, "dla60up": 31_303_227, "dla102up": 42_700_859, "dla169up": 62_958_139}


@functools.lru_cache(maxsize=None)
def centernet(flavour):
    return create_model(flavour)


@functools.lru_cache(maxsize=None)
def dla34up():
    return create_model("dla34up")


# ----------------------------------------------------------------------------------- DLA-Up

def test_fill_up_weights():
    up = torch.nn.ConvTranspose2d(3, 3, 4, stride=2, padding=1, groups=3, bias=False)
    fill_up_weights(up)
    row = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(up.weight, (row[:, None] * row[None, :]).expand(3, 1, 4, 4))
    up8 = torch.nn.ConvTranspose2d(1, 1, 8, stride=4, padding=2, bias=False)
    fill_up_weights(up8)
    expected = torch.tensor([1, 3, 5, 7, 7, 5, 3, 1]) / 8
    torch.testing.assert_close(up8.weight[0, 0, 0], expected[0] * expected)


@pytest.mark.parametrize("name", list(DLA_UP_PARAMS))
def test_dla_up_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=19)
    assert sum(p.numel() for p in model.parameters()) == DLA_UP_PARAMS[name]


def test_dla_up_structure():
    """ida_i (docs/design.md, section 9): out channels[-i-2], inputs re-projected to the previous step's width."""
    model = dla34up()
    ida = model.dla_up.ida_3
    assert ida.channels == [32, 64, 64, 64, 64] and ida.out_dim == 32
    assert isinstance(ida.up_0, torch.nn.Identity) and isinstance(model.dla_up.ida_0.proj_0, torch.nn.Identity)
    assert tuple(ida.up_4.weight.shape) == (32, 1, 4, 4)
    assert model.dla_up.ida_1.channels == [128, 256, 256]
    assert tuple(model.dla_up.ida_0.node_1[0].weight.shape) == (256, 512, 3, 3)


def test_up_is_trainable_but_seg_up_is_fixed():
    model = dla34up().train()
    assert model.dla_up.ida_0.up_1.weight.requires_grad
    assert not model.up.weight.requires_grad
    model.zero_grad(set_to_none=True)
    y, _ = model(torch.randn(2, 3, 32, 64))
    y[:, 0].sum().backward()
    assert model.dla_up.ida_0.up_1.weight.grad.abs().sum() > 0
    assert model.up.weight.grad is None


def test_dla_seg_outputs():
    model = dla34up().eval()
    with torch.no_grad():
        y, logits = model(torch.randn(2, 3, 64, 96))
    assert y.shape == (2, 19, 64, 96) and logits.shape == (2, 19, 32, 48)
    torch.testing.assert_close(y.exp().sum(1), torch.ones(2, 64, 96))
    torch.testing.assert_close(y, F.log_softmax(model.up(logits), 1))
    coarse = DLASeg("dla34", 5, down_ratio=8).eval()
    with torch.no_grad():
        y, logits = coarse(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 5, 64, 64) and logits.shape == (1, 5, 8, 8)


def test_ida_up_step():
    """Each step is node_i(cat(x, up_i(proj_i(layer_i)))), with proj+up in one call (`project_up`)."""
    ida = IDAUp(3, 8, [8, 16], [1, 2]).eval()
    a, b = torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        expected = ida.node_1(torch.cat([a, ida.up_1(ida.proj_1(b))], 1))
        calls = []
        ida.project_up = lambda i, x, skip=None, f=ida.project_up: calls.append(i) or f(i, x, skip)
        x, nodes = ida([a, b])
    torch.testing.assert_close(x, expected)
    assert calls == [0, 1] and len(nodes) == 1
    with pytest.raises(ValueError, match="expects 2 inputs, got 1"):
        ida([a])


def test_dla_seg_errors():
    with pytest.raises(ValueError, match="down_ratio"):
        DLASeg("dla34", 19, down_ratio=3)
    with pytest.raises(ValueError, match="unknown DLA base 'dla35'"):
        DLASeg("dla35", 19)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        create_model("dla34up", num_classes=0)
    with pytest.raises(ValueError, match=r"multiples of 32.*got \(1, 3, 64, 80\)"):
        dla34up()(torch.randn(1, 3, 64, 80))


# -------------------------------------------------------------------------------- CenterNet

@pytest.mark.parametrize("flavour", ["centernet_dla34", "centernet_dla34_dcn"])
def test_centernet_outputs(flavour):
    model = centernet(flavour).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert isinstance(out, list) and len(out) == 1
    assert {k: tuple(v.shape) for k, v in out[0].items()} == {
        "hm": (2, 80, 16, 24), "wh": (2, 2, 16, 24), "reg": (2, 2, 16, 24)}
    assert torch.all(model.hm[-1].bias == -2.19)
    assert torch.all(model.wh[0].bias == 0) and torch.all(model.reg[-1].bias == 0)
    assert isinstance(model.dla_up.ida_0.proj_1.conv, ModulatedDeformConv2d) == flavour.endswith("dcn")
    assert model.ida_up.up_2.weight.requires_grad


def test_summing_ida_up_step():
    """CenterNet's step: layer_i = node_i(up_i(proj_i(layer_i)) + layer_{i-1}), the sum inside project_up."""
    ida = centernet("centernet_dla34").ida_up.eval()
    a, b = torch.randn(1, 64, 8, 8), torch.randn(1, 128, 4, 4)
    with torch.no_grad():
        out = ida([a, b, torch.randn(1, 256, 2, 2)])
        torch.testing.assert_close(out[1], ida.node_1(ida.up_1(ida.proj_1(b)) + a))
    assert out[0] is a and len(out) == 3


def test_centernet_dcn_trains():
    model = centernet("centernet_dla34_dcn").train()
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 3, 64, 64))[0]
    sum(v.square().mean() for v in out.values()).backward()
    dcn = model.ida_up.node_2.conv
    assert dcn.weight.grad.abs().sum() > 0 and dcn.conv_offset_mask.weight.grad.abs().sum() > 0


def test_modulated_deform_conv_semantics():
    """Zero offsets and mask logits: half a plain conv. Offsets (dy, dx) = (0, 1) with mask ~1: the
    conv of the input shifted one pixel left."""
    dcn = ModulatedDeformConv2d(4, 6)
    x = torch.randn(1, 4, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(dcn(x), 0.5 * F.conv2d(x, dcn.weight, dcn.bias, padding=1))
        dcn.conv_offset_mask.bias[:18] = torch.tensor([0.0, 1.0]).repeat(9)
        dcn.conv_offset_mask.bias[18:] = 30.0
        shifted = F.pad(x[..., 1:], (0, 1))
        # column 0 differs: its left taps read x[..., 0] where the shifted input has padding
        torch.testing.assert_close(dcn(x)[..., 1:], F.conv2d(shifted, dcn.weight, dcn.bias, padding=1)[..., 1:])


def test_centernet_checkpoint_strict_round_trip(tmp_path):
    model = centernet("centernet_dla34_dcn")
    torch.save({"epoch": 140, "state_dict": model.state_dict()}, tmp_path / "ctdet.pth")
    fresh = load_checkpoint(create_model("centernet_dla34_dcn"), tmp_path / "ctdet.pth", strict=True)
    assert torch.equal(fresh.hm[0].weight, model.hm[0].weight)
    assert "base.fc.weight" in fresh.state_dict()  # CenterNet's checkpoints carry the unused classifier
    with pytest.raises(CheckpointError, match=r"unexpected keys: dla_up\.ida_0\.proj_1\.conv\.bias"):
        load_checkpoint(create_model("centernet_dla34"), tmp_path / "ctdet.pth")


def test_centernet_errors():
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        centernet("centernet_dla34")(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="head name 'base'"):
        CenterNet(heads={"base": 2})
    with pytest.raises(ValueError, match="head_conv"):
        CenterNet(head_conv=0)
    with pytest.raises(ValueError, match="num_classes"):
        CenterNet(heads={"hm": 0})


def test_centernet_custom_heads():
    model = create_model("centernet_dla34", heads={"hm": 1, "hps": 34}, head_conv=32).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))[0]
    assert out["hm"].shape == (1, 1, 8, 8) and out["hps"].shape == (1, 34, 8, 8)
