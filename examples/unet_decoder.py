"""The fused ops outside DLA: a U-Net-style decoder on a torchvision ResNet-18.

Each decoder stage upsamples the coarser map with an IDA-Up step (1x1 projection + BN + ReLU +
learnable bilinear x2 upsample + the lateral feature as skip) and merges it with the lateral
feature in an aggregation node (concat -> 1x1 conv -> BN -> + residual -> ReLU). Built with
`fused=True` the stages are dla_fused.nn modules; with `fused=False` the same network (same
parameter names) is built from plain PyTorch layers, so state dicts move between the two.

    python examples/unet_decoder.py            # a few training steps on generated shapes
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from dla_fused.data import ShapesDataset
from dla_fused.models.dla_up import bilinear_upsample
from dla_fused.nn import AggregationNode, IDAUpStep

ENCODER_CHANNELS = (64, 128, 256, 512)  # ResNet-18 at strides 4, 8, 16, 32


class PlainUpStep(nn.Module):
    """up(proj(x)) + skip with plain layers: what IDAUpStep fuses."""

    def __init__(self, in_channels, out_channels, factor):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.up = bilinear_upsample(out_channels, factor)

    def forward(self, x, skip):
        return self.up(self.proj(x)) + skip


class PlainNode(nn.Module):
    """relu(bn(conv1x1(cat(children))) + children[0]) with plain layers: what AggregationNode fuses."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, *children):
        return torch.relu(self.bn(self.conv(torch.cat(children, 1))) + children[0])


class UNetDecoder(nn.Module):
    """Per-pixel class logits at the input resolution from a ResNet-18 encoder."""

    def __init__(self, num_classes: int, fused: bool = True):
        super().__init__()
        r = torchvision.models.resnet18(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.encoder = nn.ModuleList([r.layer1, r.layer2, r.layer3, r.layer4])
        ups, nodes = [], []
        for fine, coarse in zip(ENCODER_CHANNELS[:-1], ENCODER_CHANNELS[1:]):
            ups.append(IDAUpStep(coarse, fine, 2, skip=True) if fused else PlainUpStep(coarse, fine, 2))
            nodes.append(AggregationNode([fine, fine], fine, residual=True) if fused else PlainNode(2 * fine, fine))
        self.ups, self.nodes = nn.ModuleList(ups), nn.ModuleList(nodes)
        self.head = nn.Conv2d(ENCODER_CHANNELS[0], num_classes, 1)

    def forward(self, images):
        x, features = self.stem(images), []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        x = features[-1]
        for i in reversed(range(len(self.ups))):  # coarse to fine
            lateral = features[i]
            x = self.nodes[i](self.ups[i](x, lateral), lateral)
        return F.interpolate(self.head(x), size=images.shape[-2:], mode="bilinear", align_corners=False)


def train(steps: int = 20, batch_size: int = 8, image_size: int = 64, fused: bool = True, seed: int = 0,
          log=print):
    """Train a few steps on generated shapes; returns the losses."""
    torch.manual_seed(seed)
    data = ShapesDataset(steps * batch_size, image_size, num_classes=4, task="seg", seed=seed)
    model = UNetDecoder(data.num_targets, fused=fused)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    losses = []
    start = time.perf_counter()
    for step, (images, masks) in enumerate(loader, 1):
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        log(f"step {step}/{steps} loss {loss.item():.4f} "
            f"({step * batch_size / (time.perf_counter() - start):.1f} images/s)")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reference", action="store_true", help="plain PyTorch layers instead of fused ops")
    args = parser.parse_args()
    train(args.steps, fused=not args.reference)
