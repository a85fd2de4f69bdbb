"""The IDA-Up step: [1x1 projection -> BN -> ReLU] -> learnable depthwise bilinear upsample
(ConvTranspose2d, kernel 2f, stride f, padding f//2, groups C) -> (+ skip), fused.

Top to bottom: the plain-PyTorch reference (the spec) -> the custom ops `dla_fused::ida_up` and
its backward, with fake kernels and autograd (what torch.compile sees) -> the same as an
autograd.Function (eager calls, synchronised statistics) -> the functional API -> the module.

The full-resolution output is never saved for backward, nor the projection output: backward
recomputes the coarse map from the input. Saved: the input, the weights (with BatchNorm's) and two
per-channel statistics vectors. The projection + BatchNorm part is shared with the aggregation node (ops/_bn.py).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import backend, prepack
from . import _bn, _checks
from .aggregation import is_plain_1x1
from .primitives import acc_dtype, memory_format_of, upsampled_size


# ---------------------------------------------------------------------------------------------
# Reference (the spec every backend is tested against)
# ---------------------------------------------------------------------------------------------
def ida_up_reference(x: Tensor, proj_weight: Optional[Tensor] = None, bn_weight: Optional[Tensor] = None,
                     bn_bias: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
                     running_var: Optional[Tensor] = None, num_batches_tracked: Optional[Tensor] = None,
                     training: bool = True, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                     up_weight: Optional[Tensor] = None, factor: int = 1,
                     skip: Optional[Tensor] = None) -> Tensor:
    """relu(bn(conv1x1(x))) (or x) -> conv_transpose2d (or identity) -> (+ skip)."""
    p = x
    if proj_weight is not None:
        factor_bn = 0.0 if momentum is None else momentum
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                factor_bn = 1.0 / float(num_batches_tracked)
        p = torch.relu_(F.batch_norm(F.conv2d(x, proj_weight), running_mean, running_var, bn_weight,
                                    bn_bias, training or running_mean is None, factor_bn, eps))
    if up_weight is not None:
        p = F.conv_transpose2d(p, up_weight, stride=factor, padding=factor // 2, groups=p.shape[1])
    if skip is not None:
        p = p + skip
    return p


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
def _forward(P, x, proj_weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps,
             up_weight, factor, skip, group=None, running=None) -> Tuple[Tensor, Tensor, Tensor, int, bool]:
    """(out, mean, var, pixel count, whether the running statistics were updated: `running` =
    (running_mean, running_var, num_batches_tracked, momentum), by a backend with
    `ida_forward_train` (Triton) in its statistics kernel; otherwise the caller does)."""
    count = _bn.pixel_count(x)
    with _bn.no_autocast(x):
        if proj_weight is None:
            empty = x.new_empty(0, dtype=acc_dtype(x.dtype))
            return P.ida_upsample(x, None, None, up_weight, factor, skip), empty, empty.clone(), count, False
        weight2d = proj_weight.flatten(1)
        fused = getattr(P, "ida_forward_train", None)
        if batch_stats and fused is not None and group is None:  # three launches
            out, mean, var = fused(x, weight2d, bn_weight, bn_bias, eps, up_weight, factor, skip, running)
            return out, mean, var, count, running is not None
        if batch_stats:
            z, mean, var, count, scale, shift = _bn.product_stats_affine(P, [x], weight2d, bn_weight, bn_bias, eps,
                                                                         group)
        else:
            z = _bn.recompute_product(P, [x], weight2d)
            acc = acc_dtype(x.dtype)
            mean, var = running_mean.to(acc).clone(), running_var.to(acc).clone()
            scale, shift = _bn.affine(bn_weight, bn_bias, mean, var, eps, P)
        return P.ida_upsample(z, scale, shift, up_weight, factor, skip), mean, var, count, False


def _backward(P, grad_out, x, proj_weight, bn_weight, bn_bias, mean, var, batch_stats, eps, up_weight,
              factor, group=None, count=None, bn_grads=True):
    """Returns (grad x, grad proj weight, grad gamma, grad beta, grad up weight); None where the
    input is absent."""
    grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
    with _bn.no_autocast(x):
        if proj_weight is None:
            grad_x, grad_up = P.ida_upsample_backward(grad_out, x, None, None, up_weight, factor)
            return grad_x, None, None, None, grad_up if up_weight is not None else None
        weight2d = proj_weight.flatten(1)
        fused = getattr(P, "ida_backward_fused", None)
        grads = None
        if batch_stats and fused is not None and group is None:  # two launches (None: too many tiles)
            grads = fused(grad_out, x, weight2d, bn_weight, bn_bias, mean, var, eps, up_weight, factor)
        if grads is not None:
            grad_x, grad_w, grad_g, grad_b, grad_up = grads
            return grad_x, grad_w.view_as(proj_weight), grad_g, grad_b, grad_up
        scale, shift = _bn.affine(bn_weight, bn_bias, mean, var, eps, P)
        z = _bn.recompute_product(P, [x], weight2d)
        grad_p, grad_up = P.ida_upsample_backward(grad_out, z, scale, shift, up_weight, factor)
        grads, grad_w, grad_g, grad_b = _bn.backward(P, grad_p, None, [x], weight2d, bn_weight, mean, var, eps,
                                                     batch_stats, False, group, count, bn_grads, z=z)
        return grads[0], grad_w.view_as(proj_weight), grad_g, grad_b, grad_up if up_weight is not None else None


def _primitives(x, proj_weight, batch_stats, up_weight, factor, trial=None):
    """The backend's primitives for this call; under tuning, `trial` (forward, + backward when
    batch_stats: training calls are followed by one) is what gets timed on first sight of the key."""
    if not backend.tunes(x.device):  # no key needed
        return backend.primitives_for(x.device, "ida_up")
    key = (tuple(x.shape), x.dtype, memory_format_of(x), None if proj_weight is None else proj_weight.shape[0],
           up_weight is not None, factor, batch_stats)
    return backend.primitives_for(x.device, "ida_up", key, trial)


def _trial(x, proj_weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, up_weight, factor,
           skip):
    def run(P):
        out, mean, var, _, _ = _forward(P, x, proj_weight, bn_weight, bn_bias, running_mean, running_var,
                                        batch_stats, eps, up_weight, factor, skip)
        if batch_stats:  # out stands in for the incoming gradient
            _backward(P, out, x, proj_weight, bn_weight, bn_bias, mean, var, True, eps, up_weight, factor)
    return run


@torch.library.custom_op("dla_fused::ida_up", mutates_args=())
def _ida_up_op(x: Tensor, proj_weight: Optional[Tensor], bn_weight: Optional[Tensor],
               bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
               batch_stats: bool, eps: float, up_weight: Optional[Tensor], factor: int,
               skip: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out, mean, var): the projection's statistics (empty without projection)."""
    P = _primitives(x, proj_weight, batch_stats, up_weight, factor, _trial(
        x, proj_weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, up_weight, factor, skip))
    out, mean, var, _, _ = _forward(P, x, proj_weight, bn_weight, bn_bias, running_mean, running_var,
                                    batch_stats, eps, up_weight, factor, skip)
    return out, mean, var


@_ida_up_op.register_fake
def _(x, proj_weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, up_weight,
      factor, skip):
    channels = x.shape[1] if proj_weight is None else proj_weight.shape[0]
    size = [x.shape[2], x.shape[3]]
    if up_weight is not None:
        size = [upsampled_size(s, factor) for s in size]
    out = torch.empty((x.shape[0], channels, *size), dtype=x.dtype, device=x.device,
                      memory_format=memory_format_of(x))
    stats = x.new_empty((0 if proj_weight is None else channels,), dtype=acc_dtype(x.dtype))
    return out, stats, torch.empty_like(stats)


@torch.library.custom_op("dla_fused::ida_up_backward", mutates_args=())
def _ida_up_backward_op(grad_out: Tensor, x: Tensor, proj_weight: Optional[Tensor],
                        bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor, var: Tensor,
                        batch_stats: bool, eps: float, up_weight: Optional[Tensor], factor: int,
                        bn_grads: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad x, grad proj weight, grad gamma, grad beta, grad up weight), absent ones
    as empty tensors."""
    P = _primitives(x, proj_weight, batch_stats, up_weight, factor)  # the forward's choice, by key
    grads = _backward(P, grad_out, x, proj_weight, bn_weight, bn_bias, mean, var, batch_stats, eps,
                      up_weight, factor, bn_grads=bn_grads)
    like = (x, proj_weight, bn_weight, bn_weight, up_weight)
    return tuple(x.new_empty(0) if g is None or ref is None else g.to(ref.dtype) for g, ref in zip(grads, like))


@_ida_up_backward_op.register_fake
def _(grad_out, x, proj_weight, bn_weight, bn_bias, mean, var, batch_stats, eps, up_weight, factor,
      bn_grads):
    with_proj = proj_weight is not None
    return (torch.empty_like(x),
            torch.empty_like(proj_weight) if with_proj else x.new_empty(0),
            torch.empty_like(bn_weight) if with_proj else x.new_empty(0),
            torch.empty_like(bn_weight) if with_proj else x.new_empty(0),
            torch.empty_like(up_weight) if up_weight is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, proj_weight, bn_weight, bn_bias, _, _, batch_stats, eps, up_weight, factor, skip = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, proj_weight, bn_weight, bn_bias, up_weight, mean, var)
    ctx.args = (batch_stats, eps, factor, skip is not None)


def _autograd_backward(ctx, grad_out, _grad_mean, _grad_var):
    x, proj_weight, bn_weight, bn_bias, up_weight, mean, var = ctx.saved_tensors
    batch_stats, eps, factor, has_skip = ctx.args
    bn_grads = proj_weight is not None and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    grad_x, grad_w, grad_g, grad_b, grad_up = torch.ops.dla_fused.ida_up_backward(
        grad_out, x, proj_weight, bn_weight, bn_bias, mean, var, batch_stats, eps, up_weight, factor, bn_grads)
    present = lambda g, t: g if t is not None else None  # noqa: E731
    return (grad_x, present(grad_w, proj_weight), present(grad_g, proj_weight), present(grad_b, proj_weight),
            None, None, None, None, present(grad_up, up_weight), None, grad_out if has_skip else None)


_ida_up_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _IDAUpFunction(torch.autograd.Function):
    """The same computation as the custom op, as a plain autograd.Function: eager calls take this
    path (less Python per call than the custom op, which torch.compile uses), and it is the only
    path that takes a process group. `count_box` (a list) receives the number of pixels the
    statistics were taken over, all ranks included, and whether the running statistics were
    updated; `running` (num_batches_tracked, momentum) or None, as in the aggregation node."""

    @staticmethod
    def forward(ctx, group, count_box, running, x, proj_weight, bn_weight, bn_bias, running_mean, running_var,
                batch_stats, eps, up_weight, factor, skip):
        P = _primitives(x, proj_weight, batch_stats, up_weight, factor, _trial(
            x, proj_weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, up_weight, factor,
            skip))
        update = (running_mean, running_var, *running) if running is not None else None
        out, mean, var, count, updated = _forward(P, x, proj_weight, bn_weight, bn_bias, running_mean, running_var,
                                                  batch_stats, eps, up_weight, factor, skip, group, update)
        count_box += [count, updated]
        ctx.save_for_backward(x, proj_weight, bn_weight, bn_bias, up_weight, mean, var)
        ctx.args = (P, group, batch_stats, eps, factor, count, skip is not None)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for mean and var
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        if grad_out is None:  # the output did not reach the loss
            return (None,) * 14
        x, proj_weight, bn_weight, bn_bias, up_weight, mean, var = ctx.saved_tensors
        P, group, batch_stats, eps, factor, count, has_skip = ctx.args
        bn_grads = proj_weight is not None and (ctx.needs_input_grad[5] or ctx.needs_input_grad[6])
        grad_x, grad_w, grad_g, grad_b, grad_up = _backward(P, grad_out, x, proj_weight, bn_weight, bn_bias, mean,
                                                            var, batch_stats, eps, up_weight, factor, group, count,
                                                            bn_grads)
        if grad_g is not None:
            grad_g, grad_b = grad_g.to(bn_weight.dtype), grad_b.to(bn_weight.dtype)
        return (None, None, None, grad_x, grad_w, grad_g, grad_b, None, None, None, None, grad_up, None,
                grad_out if has_skip else None)


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------
def _validate(x, proj_weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, batch_stats,
              momentum, eps, up_weight, factor, skip) -> None:
    _checks.activation("x", x)
    channels = x.shape[1]
    if proj_weight is not None:
        _checks.tensor("proj_weight", proj_weight, dims=4)
        _checks.same_dtype_device("proj_weight", proj_weight, "x", x)
        if proj_weight.shape[1:] != (x.shape[1], 1, 1):
            raise ValueError(f"proj_weight must have shape (C_out, {x.shape[1]}, 1, 1) for x with "
                             f"{x.shape[1]} channels, got {tuple(proj_weight.shape)}")
        channels = proj_weight.shape[0]
        if bn_weight is None or bn_bias is None:
            raise ValueError("bn_weight and bn_bias are required with proj_weight")
        _checks.vector("bn_weight", bn_weight, channels, x)
        _checks.vector("bn_bias", bn_bias, channels, x)
        _checks.batch_norm_args(running_mean, running_var, num_batches_tracked, momentum, eps, channels, x)
        if batch_stats:
            _checks.more_than_one_value(x, "x")
    _checks.factor(factor)
    size = (x.shape[2], x.shape[3])
    if up_weight is None:
        if factor != 1:
            raise ValueError(f"factor {factor} needs an up_weight of shape ({channels}, 1, {2 * factor}, "
                             f"{2 * factor}); without up_weight the factor must be 1")
    else:
        if factor < 2:
            raise ValueError(f"factor must be >= 2 with an up_weight (factor 1 is the identity), got {factor}")
        _checks.tensor("up_weight", up_weight, dims=4)
        _checks.same_dtype_device("up_weight", up_weight, "x", x)
        expected = (channels, 1, 2 * factor, 2 * factor)
        if tuple(up_weight.shape) != expected:
            raise ValueError(f"up_weight must be depthwise of shape {expected} for factor {factor}, "
                             f"got {tuple(up_weight.shape)}")
        size = tuple(upsampled_size(s, factor) for s in size)
    if skip is not None:
        _checks.activation("skip", skip)
        _checks.same_dtype_device("skip", skip, "x", x)
        expected = (x.shape[0], channels, *size)
        if tuple(skip.shape) != expected:
            raise ValueError(f"skip must have the upsampled shape {expected}, got {tuple(skip.shape)}")


def ida_up(x: Tensor, proj_weight: Optional[Tensor] = None, bn_weight: Optional[Tensor] = None,
           bn_bias: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
           running_var: Optional[Tensor] = None, num_batches_tracked: Optional[Tensor] = None,
           training: bool = True, momentum: Optional[float] = 0.1, eps: float = 1e-5,
           up_weight: Optional[Tensor] = None, factor: int = 1, skip: Optional[Tensor] = None,
           process_group=None) -> Tensor:
    """Fused IDA-Up step: ``up(relu(bn(conv1x1(x)))) (+ skip)``.

    Args:
        x: (N, C_in, h, w), float16/bfloat16/float32/float64,
            NCHW or channels_last (the output takes x's layout).
        proj_weight: 1x1 projection weight (C, C_in, 1, 1) or None (projection is the identity:
            then no BatchNorm and no ReLU either).
        bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps,
            training: the projection's BatchNorm, as in `aggregation_node`.
        up_weight: depthwise ConvTranspose2d weight (C, 1, 2f, 2f) with stride f and padding
            f // 2 (trainable), or None for factor 1.
        factor: the upsampling factor f (>= 2 with up_weight, 1 without).
        skip: tensor added to the output, shape (N, C, H, W) with H = (h - 1) f - 2 (f // 2) + 2 f
            (= h f for even f), or None.
        process_group: combine projection statistics over this group (like SyncBatchNorm).

    Returns (N, C, H, W) in x's dtype (under torch.autocast, float32 inputs are cast to the autocast
    dtype). Without projection and upsampling the step is the identity: it returns x itself (or
    x + skip), uncast, as the reference does. Saved for backward: x, the weights (BatchNorm's
    too) and two per-channel statistics vectors; neither the coarse projection nor the
    full-resolution output is kept.
    """
    identity = proj_weight is None and up_weight is None
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type) and not identity:
        x, proj_weight, up_weight, skip = (_checks.autocast(t) for t in (x, proj_weight, up_weight, skip))
    batch_stats = training or running_mean is None
    _validate(x, proj_weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, batch_stats,
              momentum, eps, up_weight, factor, skip)
    chosen = backend.resolve(x.device, "ida_up")  # raises if the selected backend cannot serve this device
    if identity:  # as the reference: x itself, no copy, no cast
        return x if skip is None else x + skip
    # like nn.SyncBatchNorm: synchronise in training only
    group = process_group if proj_weight is not None and training else None
    if chosen == "eager" and group is None:  # unfused
        return ida_up_reference(x, proj_weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                                training, momentum, eps, up_weight, factor, skip)
    if torch.compiler.is_compiling() and group is None:
        out, mean, var = torch.ops.dla_fused.ida_up(x, proj_weight, bn_weight, bn_bias, running_mean,
                                                    running_var, batch_stats, eps, up_weight, factor, skip)
        count = _bn.pixel_count(x)
    else:
        count_box = []
        running = (num_batches_tracked, momentum) if training and proj_weight is not None and (
            running_mean is not None and (momentum is not None or num_batches_tracked is not None)) else None
        out, mean, var = _IDAUpFunction.apply(group, count_box, running, x, proj_weight, bn_weight, bn_bias,
                                              running_mean, running_var, batch_stats, eps, up_weight, factor, skip)
        count, updated = count_box
        if updated:
            return out
    if training and proj_weight is not None:
        _bn.update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, count)
    return out


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------
class IDAUpStep(nn.Module):
    """One fused IDA-Up step with DLA-Up's parameter layout: `proj` is Sequential(Conv2d 1x1 no
    bias, BatchNorm2d, ReLU) or Identity (when in_channels == out_channels), `up` is the depthwise
    ConvTranspose2d(C, C, 2f, stride f, padding f // 2, groups C, bias False) with bilinear init
    (trainable) or Identity (factor 1). forward(x, skip) -> up(proj(x)) + skip when built with
    skip=True, forward(x) -> up(proj(x)) otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int, skip: bool = False,
                 process_group=None):
        super().__init__()
        _checks.factor(factor)
        from ..models.dla_up import fill_up_weights
        if in_channels == out_channels:
            self.proj = nn.Identity()
        else:
            self.proj = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        if factor == 1:
            self.up = nn.Identity()
        else:
            self.up = nn.ConvTranspose2d(out_channels, out_channels, 2 * factor, stride=factor,
                                         padding=factor // 2, groups=out_channels, bias=False)
            fill_up_weights(self.up)
        self.skip, self.process_group = skip, process_group

    @classmethod
    def from_modules(cls, proj: nn.Module, up: nn.Module, skip: Optional[bool] = None,
                     process_group=None) -> "IDAUpStep":
        """Wrap existing modules (parameters shared): `proj` a Sequential(Conv2d 1x1, BatchNorm2d,
        ReLU) or Identity; `up` a depthwise ConvTranspose2d (kernel 2f, stride f, padding f // 2)
        or Identity. skip=None leaves the skip argument of forward optional."""
        step = cls.__new__(cls)
        nn.Module.__init__(step)
        step.proj, step.up, step.skip, step.process_group = proj, up, skip, process_group
        step.fusion_problems()  # raises on modules that cannot be fused
        return step

    def to_modules(self) -> Tuple[nn.Module, nn.Module]:
        """The plain (proj, up) pair, sharing this module's parameters: up(proj(x)) (+ skip)."""
        return self.proj, self.up

    def extra_repr(self) -> str:
        return "" if self.skip is None else f"skip={self.skip}"

    def fusion_problems(self) -> None:
        proj, up = self.proj, self.up
        if not isinstance(proj, nn.Identity):
            ok = (isinstance(proj, nn.Sequential) and len(proj) == 3 and is_plain_1x1(proj[0])
                  and proj[0].bias is None and isinstance(proj[1], nn.BatchNorm2d) and proj[1].affine
                  and isinstance(proj[2], nn.ReLU))
            if not ok:
                raise ValueError("proj must be Identity or Sequential(Conv2d 1x1 without bias, "
                                 f"BatchNorm2d, ReLU); got {proj}")
        if not isinstance(up, nn.Identity):
            ok = (isinstance(up, nn.ConvTranspose2d) and up.bias is None and up.groups == up.in_channels
                  == up.out_channels and up.kernel_size[0] == up.kernel_size[1] == 2 * up.stride[0]
                  and up.stride[0] == up.stride[1] >= 2 and up.padding == (up.stride[0] // 2,) * 2
                  and up.output_padding == (0, 0) and up.dilation == (1, 1))
            if not ok:
                raise ValueError("up must be Identity or a depthwise ConvTranspose2d with kernel 2f, "
                                 f"stride f, padding f // 2 and no bias; got {up}")

    def _prepacked(self, x: Tensor, skip: Optional[Tensor]) -> Optional[Tensor]:
        """Eval forward with the projection as one prepacked oneDNN convolution (see
        dla_fused.prepack), or None when the backend serving this device is not `eager`, the
        projection's BN is training, or the input does not qualify."""
        conv, bn = self.proj[0], self.proj[1]
        if bn.training or backend.resolve(x.device, "ida_up") != "eager":
            return None
        up = None if isinstance(self.up, nn.Identity) else self.up
        factor = 1 if up is None else up.stride[0]
        _validate(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                  False, bn.momentum, bn.eps, None if up is None else up.weight, factor, skip)
        y = prepack.conv_unit(conv, bn, x, True)
        if y is None:
            return None
        if up is not None:
            y = F.conv_transpose2d(y, up.weight, stride=factor, padding=factor // 2, groups=up.weight.shape[0])
        return y.add_(skip) if skip is not None else y

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if self.skip is not None and self.skip != (skip is not None):
            raise ValueError("this IDAUpStep was built with skip=True: call it as step(x, skip)" if self.skip
                             else "this IDAUpStep was built with skip=False: call it as step(x)")
        up = None if isinstance(self.up, nn.Identity) else self.up
        factor = 1 if up is None else up.stride[0]
        if prepack.enabled(self) and not isinstance(self.proj, nn.Identity) and prepack.usable(x):
            out = self._prepacked(x, skip)
            if out is not None:
                return out
        if isinstance(self.proj, nn.Identity):
            return ida_up(x, up_weight=None if up is None else up.weight, factor=factor, skip=skip)
        conv, bn = self.proj[0], self.proj[1]
        return ida_up(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                      bn.num_batches_tracked, bn.training, bn.momentum, bn.eps,
                      None if up is None else up.weight, factor, skip, self.process_group)
