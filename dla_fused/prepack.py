"""CPU inference through prepacked oneDNN convolutions.

In eval mode with autograd off (`torch.no_grad()` or `torch.inference_mode()`), on float32 CPU
tensors in channels_last, a fused model runs each conv -> BatchNorm (-> + residual) (-> ReLU) unit as one oneDNN
convolution:
  * BN folded into the weights and a bias: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta
    (computed in float64, stored in float32);
  * the residual add and the ReLU as the convolution's post-ops (no extra pass over the output);
  * the folded weight reordered once into oneDNN's blocked layout for the input shape, and cached
    on the conv module (outside its state_dict) until the input shape or any of the six tensors
    changes (tracked by data pointer and version counter, so optimizer steps, `load_state_dict`
    and `.to()` all invalidate it; writes through `.data`, which bypass the version counter, do
    not: call `set_prepack(model, True)` after them to drop the cache).
Units take channels_last inputs only: oneDNN's prepacked convolution returns channels_last, so
keeping an NCHW caller's layout would cost two reorders per unit, and measured that way (2-core
AVX-512 CPU, batch 1 and 8) it was slower than eager at most DLA shapes, 0.40-1.09x. Instead a
whole dla_fused model (DLA, DLASeg, CenterNet) given an NCHW input runs in channels_last and
returns its 4-D outputs in NCHW: one reorder in, one per output. Anything else (training, autograd on, autocast, other dtypes or devices, `torch.compile`, a
non-zero padding mode, a BN without running statistics) runs the module's own forward.

`fuse(model)` routes these units of a model here: `nn.Sequential` runs of Conv2d [BatchNorm2d]
[ReLU], dla_fused's residual blocks, and the aggregation nodes when the `eager` backend serves
them. `set_prepack(model, False)` turns it off and frees the cached weights.
"""
import weakref
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

# conv module -> (key, packed weight, bias); outside the module, so that copy.deepcopy, pickling
# and torch.save of a model never meet oneDNN's opaque tensors
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
ON = "_dla_fused_prepack"  # per-module switch set by fuse() / set_prepack()

try:
    _POINTWISE = torch.ops.mkldnn._convolution_pointwise
    _REORDER = torch._C._nn.mkldnn_reorder_conv2d_weight
except (AttributeError, RuntimeError):  # a build without oneDNN
    _POINTWISE = _REORDER = None


def _runnable(x: Tensor) -> bool:
    return (_POINTWISE is not None and isinstance(x, Tensor) and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 4 and not torch.is_grad_enabled()
            and torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


def usable(x: Tensor) -> bool:
    """Whether a conv unit on input `x` may run prepacked (see the module docstring)."""
    return _runnable(x) and x.is_contiguous(memory_format=torch.channels_last)


def convertible(conv: nn.Module, bn: Optional[nn.Module]) -> bool:
    """Whether (conv, bn) is a unit this module computes exactly: a 2-D zero-padded convolution
    with explicit padding, followed by nothing or by an eval-mode BatchNorm2d with running stats."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if bn is None:
        return True
    return (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


def _folded(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], x: Tensor):
    """(packed weight, bias) for `conv` followed by `bn` on inputs shaped like `x`, cached."""
    tensors = (conv.weight, conv.bias) + ((bn.weight, bn.bias, bn.running_mean, bn.running_var)
                                          if bn is not None else ())
    if any(t is not None and t.is_inference() for t in tensors):
        return None  # no version counter to key a cache on
    key = (tuple(x.shape), bn.eps if bn is not None else None) + tuple(
        None if t is None else (t.data_ptr(), t._version) for t in tensors)
    cached = _CACHE.get(conv)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
        w = w * scale.view(-1, 1, 1, 1)
        b = (b - bn.running_mean.detach().double()) * scale
        if bn.bias is not None:
            b = b + bn.bias.detach().double()
    packed = _REORDER(w.float().contiguous().to_mkldnn(), list(conv.padding), list(conv.stride),
                      list(conv.dilation), conv.groups, list(x.shape))
    bias = b.float()
    _CACHE[conv] = (key, packed, bias)
    return packed, bias


def conv_unit(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], x: Tensor, relu: bool,
              residual: Optional[Tensor] = None) -> Optional[Tensor]:
    """relu?(bn?(conv(x)) (+ residual)) as one prepacked oneDNN convolution, or None when the
    unit cannot run that way (the caller then runs its modules)."""
    if not (usable(x) and convertible(conv, bn)):
        return None
    folded = _folded(conv, bn, x)
    if folded is None:
        return None
    packed, bias = folded
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if residual is None:
        return _POINTWISE(x, packed, bias, *args, "relu" if relu else "none", [], "")
    size = [x.shape[0], conv.out_channels] + [
        (x.shape[2 + d] + 2 * conv.padding[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1)
        // conv.stride[d] + 1 for d in range(2)]
    if not (isinstance(residual, Tensor) and residual.dtype == x.dtype and residual.device == x.device
            and list(residual.shape) == size):
        return None  # the caller's modules then raise or broadcast as they would
    return _POINTWISE.binary(x, residual.contiguous(memory_format=torch.channels_last), packed, bias, *args, "add", None,
                             "relu" if relu else None, [], "")


def enabled(module: nn.Module) -> bool:
    return module.__dict__.get(ON, False)


def clear(module: nn.Module) -> None:
    """Drop the prepacked weights cached under `module`."""
    for m in module.modules():
        _CACHE.pop(m, None)


def sequential_forward(self: nn.Sequential, x: Tensor) -> Tensor:
    """nn.Sequential.forward with its Conv2d [BatchNorm2d] [ReLU] runs prepacked when possible."""
    if not (enabled(self) and usable(x)):
        return nn.Sequential.forward(self, x)
    mods = list(self)
    i = 0
    while i < len(mods):
        m = mods[i]
        if type(m) is nn.Conv2d:
            bn = mods[i + 1] if i + 1 < len(mods) and type(mods[i + 1]) is nn.BatchNorm2d else None
            j = i + 1 + (bn is not None)
            relu = j < len(mods) and type(mods[j]) is nn.ReLU
            y = conv_unit(m, bn, x, relu)
            if y is not None:
                x, i = y, j + relu
                continue
        x = m(x)
        i += 1
    return x


def sequential_unit(module: nn.Module) -> bool:
    """Whether an nn.Sequential holds a Conv2d [BatchNorm2d] [ReLU] unit worth routing here."""
    return type(module) is nn.Sequential and any(type(m) is nn.Conv2d for m in module)


def block_forward(self: nn.Module, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """dla_fused's BasicBlock / Bottleneck forward with its conv-BN units prepacked when possible:
    relu(bn1(conv1 x)) -> ... -> relu(bn_last(conv_last .) + residual)."""
    if enabled(self) and usable(x):
        units = [(self.conv1, self.bn1), (self.conv2, self.bn2)]
        if hasattr(self, "conv3"):
            units.append((self.conv3, self.bn3))
        out = x
        for k, (conv, bn) in enumerate(units):
            last = k == len(units) - 1
            out = conv_unit(conv, bn, out, True, (x if residual is None else residual) if last else None)
            if out is None:
                break
        else:
            return out
    return type(self).forward(self, x, residual)


def conv_act_forward(self: nn.Module, x: Tensor) -> Tensor:
    """CenterNet's IDAConv forward, actf(conv(x)) with actf = Sequential(BatchNorm2d, ReLU), with
    its unit prepacked when the conv is a plain Conv2d and the input qualifies."""
    if enabled(self) and usable(x):
        out = conv_unit(self.conv, self.actf[0], x, True)
        if out is not None:
            return out
    return type(self).forward(self, x)


def model_forward(self: nn.Module, x: Tensor, *args, **kwargs):
    """A whole model's forward (dla_fused's DLA, DLASeg and CenterNet): an NCHW input runs in
    channels_last, where its units can be prepacked, and 4-D outputs come back in NCHW."""
    if not (enabled(self) and _runnable(x) and x.is_contiguous()
            and not x.is_contiguous(memory_format=torch.channels_last)):
        return type(self).forward(self, x, *args, **kwargs)
    out = type(self).forward(self, x.contiguous(memory_format=torch.channels_last), *args, **kwargs)
    return torch.utils._pytree.tree_map(
        lambda t: t.contiguous() if isinstance(t, Tensor) and t.dim() == 4 else t, out)
