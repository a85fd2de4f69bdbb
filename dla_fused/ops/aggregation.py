"""The aggregation node: relu(bn(conv1x1(concat(children))) (+ children[0])), fused.

Top to bottom: the plain-PyTorch reference (the spec) -> the custom ops `dla_fused::aggregation_node`
and its backward, with fake kernels and autograd (what torch.compile sees) -> the same as an
autograd.Function (eager calls, synchronised statistics) -> the functional API (checks, autocast,
running statistics, backend choice) -> the module.

What the fused op saves for backward: the children and weights (already alive), its output (alive)
and two per-channel statistics vectors. The conv output z is recomputed from the children in backward; the
concatenation is never materialised (the product is a sum of per-child products).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import backend, prepack
from . import _bn, _checks
from .primitives import IDENTITY, LEAKY_RELU, RELU, SILU, acc_dtype, memory_format_of

# The activations the node applies after BatchNorm (+ residual): name -> primitive code, and
# name -> f(y, negative_slope) for the module's unfused path.
ACTIVATIONS = {"relu": RELU, "leaky_relu": LEAKY_RELU, "silu": SILU, "none": IDENTITY}
_ACTIVATION_FUNCTIONS = {"relu": lambda y, _: torch.relu(y), "leaky_relu": F.leaky_relu,
                         "silu": lambda y, _: F.silu(y), "none": lambda y, _: y}


# ---------------------------------------------------------------------------------------------
# Reference (the spec every backend is tested against)
# ---------------------------------------------------------------------------------------------
def aggregation_node_reference(children: Sequence[Tensor], weight: Tensor, bn_weight: Tensor,
                               bn_bias: Tensor, running_mean: Optional[Tensor] = None,
                               running_var: Optional[Tensor] = None,
                               num_batches_tracked: Optional[Tensor] = None, training: bool = True,
                               momentum: Optional[float] = 0.1, eps: float = 1e-5,
                               residual: bool = False, activation: str = "relu",
                               negative_slope: float = 0.01) -> Tensor:
    """cat -> conv1x1 -> BatchNorm (nn.BatchNorm2d's semantics) -> (+ children[0]) -> activation
    (ReLU, LeakyReLU with `negative_slope`, SiLU or none)."""
    z = F.conv2d(torch.cat(list(children), dim=1), weight, padding=(weight.shape[-1] - 1) // 2)
    factor = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias,
                     training or running_mean is None, factor, eps)
    if residual:  # in place, as DLA's Root does (BatchNorm's backward does not read its output)
        y += children[0]
    if activation == "relu":
        return torch.relu_(y)
    if activation == "leaky_relu":
        return F.leaky_relu_(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    return y


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------
def _forward(P, children: List[Tensor], weight: Tensor, bn_weight: Tensor, bn_bias: Tensor,
             running_mean: Optional[Tensor], running_var: Optional[Tensor], batch_stats: bool,
             eps: float, residual: bool, keep_z: bool, group=None, running=None, act: int = RELU,
             slope: float = 0.0) -> Tuple[Tensor, Tensor, Tensor, int, Optional[Tensor], bool]:
    """(out, mean, var, pixel count, z when kept for backward else None, whether the running
    statistics were updated). `running` = (running_mean, running_var, num_batches_tracked,
    momentum): a backend with `agg_forward_train` (Triton) updates them in its statistics kernel;
    otherwise the caller does."""
    weight2d = weight.flatten(1)
    res = children[0] if residual else None
    fused = getattr(P, "agg_forward_train", None)
    if batch_stats and fused is not None and group is None and act == RELU:  # the forward in three launches
        out, mean, var, z = fused(children, weight2d, bn_weight, bn_bias, eps, residual, keep_z, running)
        return out, mean, var, _bn.pixel_count(children[0]), z, running is not None
    if batch_stats:
        z, mean, var, count, scale, shift = _bn.product_stats_affine(P, children, weight2d, bn_weight, bn_bias,
                                                                     eps, group)
        if keep_z:  # the output in a buffer of its own: backward reads z instead of recomputing it
            return P.agg_apply(z, scale, shift, res, act, slope), mean, var, count, z, False
        # memory-efficient: the product is normalised in place (no extra buffer), and recomputed
        # in backward
        P.agg_apply_(z, scale, shift, res, act, slope)
        return z, mean, var, count, None, False
    # Eval: BatchNorm folded into the weights, one GEMM with a bias + residual + activation epilogue.
    acc = acc_dtype(weight.dtype)
    mean, var = running_mean.to(acc), running_var.to(acc)
    scale, shift = _bn.affine(bn_weight, bn_bias, mean, var, eps, P)
    folded = (weight2d.to(acc) * scale[:, None]).to(weight.dtype)
    out = P.agg_conv(children, folded, shift, res, True, False, act, slope)[0]
    return out, mean.clone(), var.clone(), _bn.pixel_count(children[0]), None, False


def _primitives(children: List[Tensor], batch_stats: bool, residual: bool, keep_z: bool, trial=None,
                act: int = RELU):
    """The backend's primitives for this call; under tuning, `trial` (forward, + backward when
    batch_stats: training calls are followed by one) is what gets timed on first sight of the key."""
    x = children[0]
    if not backend.tunes(x.device):  # no key needed
        return backend.primitives_for(x.device, "aggregation_node")
    key = (tuple(tuple(c.shape) for c in children), x.dtype, memory_format_of(x), batch_stats, residual, keep_z, act)
    return backend.primitives_for(x.device, "aggregation_node", key, trial)


def _trial(children, weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, residual, keep_z,
           act=RELU, slope=0.0):
    def run(P):
        out, mean, var, _, z, _ = _forward(P, children, weight, bn_weight, bn_bias, running_mean, running_var,
                                           batch_stats, eps, residual, keep_z, act=act, slope=slope)
        if batch_stats:  # out stands in for the incoming gradient
            _bn.backward(P, out, out, children, weight.flatten(1), bn_weight, mean, var, eps, True, residual,
                         z=z, z_kept=z is not None, bn_bias=bn_bias, act=act, slope=slope)
    return run


@torch.library.custom_op("dla_fused::aggregation_node", mutates_args=())
def _aggregation_node_op(children: List[Tensor], weight: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                         running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         batch_stats: bool, eps: float, residual: bool, keep_z: bool, act: int = RELU,
                         slope: float = 0.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, mean, var, z): the statistics used (the batch's when batch_stats, else copies
    of the running ones) and the conv output when keep_z and batch_stats (else an empty tensor).
    Running statistics are not touched here: the caller updates them once."""
    keep_z = keep_z and batch_stats
    with _bn.no_autocast(children[0]):
        P = _primitives(children, batch_stats, residual, keep_z, _trial(
            children, weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, residual, keep_z,
            act, slope), act)
        out, mean, var, _, z, _ = _forward(P, children, weight, bn_weight, bn_bias, running_mean, running_var,
                                           batch_stats, eps, residual, keep_z, act=act, slope=slope)
    return out, mean, var, out.new_empty(0) if z is None else z


@_aggregation_node_op.register_fake
def _(children, weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, residual, keep_z, act=RELU,
      slope=0.0):
    x = children[0]
    out = torch.empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), dtype=x.dtype,
                      device=x.device, memory_format=memory_format_of(x))
    stats = x.new_empty((weight.shape[0],), dtype=acc_dtype(x.dtype))
    z = torch.empty_like(out) if keep_z and batch_stats else out.new_empty(0)
    return out, stats, torch.empty_like(stats), z


@torch.library.custom_op("dla_fused::aggregation_node_backward", mutates_args=())
def _aggregation_node_backward_op(grad_out: Tensor, out: Tensor, children: List[Tensor], weight: Tensor,
                                  bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor, z: Tensor,
                                  batch_stats: bool,
                                  eps: float, residual: bool, bn_grads: bool, act: int = RELU, slope: float = 0.0
                                  ) -> Tuple[List[Tensor], Tensor, Tensor, Tensor]:
    """z: the forward's kept conv output, or an empty tensor (then it is recomputed)."""
    keep_z = z.numel() > 0
    P = _primitives(children, batch_stats, residual, keep_z, act=act)  # the forward's choice, by key
    grad_out = grad_out.contiguous(memory_format=memory_format_of(children[0]))  # out's layout
    with _bn.no_autocast(children[0]):
        mask_src = out if out.numel() else None  # not saved unless the activation's mask needs it
        grads, grad_w, grad_g, grad_b = _bn.backward(P, grad_out, mask_src, children, weight.flatten(1), bn_weight,
                                                     mean, var, eps, batch_stats, residual, bn_grads=bn_grads,
                                                     z=z if keep_z else None, z_kept=keep_z, bn_bias=bn_bias,
                                                     act=act, slope=slope)
    if grad_g is None:
        grad_g = grad_b = mean.new_zeros(mean.shape)
    return grads, grad_w.view_as(weight), grad_g.to(bn_weight.dtype), grad_b.to(bn_weight.dtype)


@_aggregation_node_backward_op.register_fake
def _(grad_out, out, children, weight, bn_weight, bn_bias, mean, var, z, batch_stats, eps, residual, bn_grads, act=RELU,
      slope=0.0):
    return ([torch.empty_like(c) for c in children], torch.empty_like(weight),
            torch.empty_like(bn_weight), torch.empty_like(bn_weight))


def _setup_context(ctx, inputs, output):
    children, weight, bn_weight, bn_bias, _, _, batch_stats, eps, residual, _, act, slope = inputs
    out, mean, var, z = output
    ctx.mark_non_differentiable(mean, var, z)
    # out is read by backward only for the ReLU / LeakyReLU mask: otherwise it is not saved (an
    # in-place op on it after the node stays legal)
    ctx.save_for_backward(out if act in (RELU, LEAKY_RELU) else out.new_empty(0), mean, var, z, weight, bn_weight,
                          bn_bias, *children)
    ctx.args = (batch_stats, eps, residual, act, slope)


def _backward(ctx, grad_out, _grad_mean, _grad_var, _grad_z):
    out, mean, var, z, weight, bn_weight, bn_bias, *children = ctx.saved_tensors
    batch_stats, eps, residual, act, slope = ctx.args
    bn_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    grads, grad_w, grad_g, grad_b = torch.ops.dla_fused.aggregation_node_backward(
        grad_out, out, children, weight, bn_weight, bn_bias, mean, var, z, batch_stats, eps, residual, bn_grads,
        act, slope)
    return grads, grad_w, grad_g, grad_b, None, None, None, None, None, None, None, None


_aggregation_node_op.register_autograd(_backward, setup_context=_setup_context)


class _AggregationNodeFunction(torch.autograd.Function):
    """The same computation as the custom op, as a plain autograd.Function: eager calls take this
    path (a few tens of microseconds less Python per call than the custom op, which torch.compile
    uses), and it is the only path that takes a process group. `count_box` (a list) receives the
    number of pixels the statistics were taken over, all ranks included, and whether the running
    statistics were updated. `running` (num_batches_tracked, momentum), or None: the running
    statistics to update in the forward's own kernels where the backend can."""

    @staticmethod
    def forward(ctx, group, count_box, running, weight, bn_weight, bn_bias, running_mean, running_var, batch_stats,
                eps, residual, keep_z, act, slope, *children):
        children = list(children)
        keep_z = keep_z and batch_stats
        with _bn.no_autocast(children[0]):
            P = _primitives(children, batch_stats, residual, keep_z, _trial(
                children, weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, residual, keep_z,
                act, slope), act)
            update = (running_mean, running_var, *running) if running is not None else None
            out, mean, var, count, z, updated = _forward(P, children, weight, bn_weight, bn_bias, running_mean,
                                                         running_var, batch_stats, eps, residual, keep_z, group,
                                                         update, act, slope)
        count_box += [count, updated]
        mask_src = out if act in (RELU, LEAKY_RELU) else None  # saved only for the ReLU / LeakyReLU mask
        if z is None:
            ctx.save_for_backward(mask_src, mean, var, weight, bn_weight, bn_bias, *children)
        else:
            ctx.save_for_backward(mask_src, mean, var, weight, bn_weight, bn_bias, z, *children)
        ctx.args = (P, group, batch_stats, eps, residual, act, slope, count, z is not None)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for mean and var
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        if grad_out is None:  # the output did not reach the loss
            # saved: out, mean, var, weight, bn_weight, bn_bias, [z]
            children = len(ctx.saved_tensors) - 6 - ctx.args[-1]
            return (None,) * (14 + children)
        P, group, batch_stats, eps, residual, act, slope, count, kept = ctx.args
        out, mean, var, weight, bn_weight, bn_bias, *children = ctx.saved_tensors
        z = children.pop(0) if kept else None
        grad_out = grad_out.contiguous(memory_format=memory_format_of(children[0]))  # out's layout
        bn_grads = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        with _bn.no_autocast(children[0]):
            grads, grad_w, grad_g, grad_b = _bn.backward(P, grad_out, out, children, weight.flatten(1), bn_weight,
                                                         mean, var, eps, batch_stats, residual, group=group,
                                                         count=count, bn_grads=bn_grads, z=z, z_kept=kept,
                                                         bn_bias=bn_bias, act=act, slope=slope)
        if grad_g is not None:
            grad_g, grad_b = grad_g.to(bn_weight.dtype), grad_b.to(bn_weight.dtype)
        return (None, None, None, grad_w.view_as(weight), grad_g, grad_b, None, None, None, None, None, None, None,
                None, *grads)


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------
def check_activation(activation, negative_slope) -> None:
    """Raise unless `activation` is one of ACTIVATIONS and `negative_slope` a finite float >= 0."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) or not (
            0 <= negative_slope < float("inf")):
        raise ValueError(f"negative_slope must be a finite number >= 0 (LeakyReLU's slope for x < 0), "
                         f"got {negative_slope!r}")


def _validate(children, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
              batch_stats, momentum, eps, residual, activation="relu", negative_slope=0.01) -> None:
    check_activation(activation, negative_slope)
    if isinstance(children, Tensor) or not isinstance(children, (list, tuple)) or not children:
        raise TypeError("children must be a non-empty list or tuple of 4-D tensors")
    names = [f"children[{i}]" for i in range(len(children))]
    for name, child in zip(names, children):
        _checks.activation(name, child)
    for name, child in zip(names[1:], children[1:]):
        _checks.same_dtype_device(name, child, "children[0]", children[0])
    _checks.same_batch_and_size(names, children)
    _checks.tensor("weight", weight, dims=4)
    _checks.same_dtype_device("weight", weight, "children[0]", children[0])
    total = sum(c.shape[1] for c in children)
    if weight.shape[1:] != (total, 1, 1):
        raise ValueError(f"weight must have shape (C_out, {total}, 1, 1) for children with "
                         f"{[c.shape[1] for c in children]} channels, got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    _checks.vector("bn_weight", bn_weight, c_out, children[0])
    _checks.vector("bn_bias", bn_bias, c_out, children[0])
    _checks.batch_norm_args(running_mean, running_var, num_batches_tracked, momentum, eps, c_out, children[0])
    if residual and children[0].shape[1] != c_out:
        raise ValueError(f"residual=True needs children[0] with {c_out} channels (the output's), "
                         f"got {children[0].shape[1]}")
    if batch_stats:
        _checks.more_than_one_value(children[0], "children[0]")


# Default of `memory_efficient` per device type (others: True). Measured on the CPU
# (benchmarks/RESULTS.md, "Keeping z or recomputing it"): keeping z saves one of the four matrix
# products of a training step. On CUDA chosen by the traffic model (benchmarks/roofline.py):
# with the Triton path's kernels, keeping z moves no more bytes than recomputing it at every DLA
# root (each has C_in >= 2 C_out) and saves FLOPs; untested on a GPU.
MEMORY_EFFICIENT_DEFAULT = {"cpu": False, "cuda": False}


def default_memory_efficient(device: torch.device) -> bool:
    return MEMORY_EFFICIENT_DEFAULT.get(device.type, True)


def aggregation_node(children: Sequence[Tensor], weight: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                     running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                     num_batches_tracked: Optional[Tensor] = None, training: bool = True,
                     momentum: Optional[float] = 0.1, eps: float = 1e-5, residual: bool = False,
                     process_group=None, memory_efficient: Optional[bool] = None, activation: str = "relu",
                     negative_slope: float = 0.01) -> Tensor:
    """Fused aggregation node: ``act(bn(conv1x1(cat(children))) (+ children[0] if residual))``.

    Args:
        children: 1 or more tensors (N, C_i, H, W), same N, H, W, dtype and device; float16,
            bfloat16, float32 or float64; NCHW or channels_last
            (the output takes children[0]'s layout).
        weight: the 1x1 conv weight (C_out, sum C_i, 1, 1), the children's dtype.
        bn_weight, bn_bias: BatchNorm affine parameters (C_out,), any float dtype.
        running_mean, running_var, num_batches_tracked: BatchNorm buffers, updated in place once
            per call in training (momentum None: cumulative average), or None (then batch
            statistics are used in eval too, like BatchNorm with track_running_stats=False).
        training: batch statistics (True) or running statistics folded into the weights (False).
        residual: add children[0] (needs C_0 == C_out) before the activation.
        process_group: combine statistics over this torch.distributed group (like SyncBatchNorm).
        memory_efficient: in training, True recomputes the conv output in backward (one more
            matrix product), False keeps it for backward (one more (N, C_out, H, W) tensor
            saved); None: the device's default, False on CPU (measured faster) and CUDA (the
            traffic model's choice), True elsewhere.
        activation: 'relu' (default), 'leaky_relu' (slope `negative_slope` >= 0 for x < 0),
            'silu' or 'none'. On the Triton backend only 'relu' takes the fused training path
            (five launches); the others run its separate statistics, elementwise and product kernels.

    Returns (N, C_out, H, W) in the children's dtype. Under torch.autocast the children and weight
    are cast to the autocast dtype (float32 ones only, as autocast does). Saved for backward: the
    children, weight, bn_weight, output and two per-channel statistics vectors, plus the conv
    output unless memory_efficient. Every input error raises before any state changes.
    """
    children = list(children) if isinstance(children, (list, tuple)) else children
    if isinstance(children, list) and children and isinstance(children[0], Tensor):
        device_type = children[0].device.type
        if torch.is_autocast_enabled(device_type):
            children = [_checks.autocast(c) for c in children]
            weight = _checks.autocast(weight)
    batch_stats = training or running_mean is None
    _validate(children, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
              batch_stats, momentum, eps, residual, activation, negative_slope)
    act = ACTIVATIONS[activation]
    slope = float(negative_slope) if act == LEAKY_RELU else 0.0
    _checks.memory_efficient(memory_efficient)
    device = children[0].device
    chosen = backend.resolve(device, "aggregation_node")  # raises if the backend cannot serve it
    group = process_group if training else None  # like nn.SyncBatchNorm: synchronise in training only
    if chosen == "eager" and group is None:  # unfused
        return aggregation_node_reference(children, weight, bn_weight, bn_bias, running_mean, running_var,
                                          num_batches_tracked, training, momentum, eps, residual, activation,
                                          negative_slope)
    keep_z = batch_stats and torch.is_grad_enabled() and not (
        default_memory_efficient(device) if memory_efficient is None else memory_efficient)
    if torch.compiler.is_compiling() and group is None:
        out, mean, var, _ = torch.ops.dla_fused.aggregation_node(
            children, weight, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, residual, keep_z,
            act, slope)
        count = _bn.pixel_count(children[0])
    else:
        count_box = []
        # the running statistics in the forward's kernels where the backend can (cumulative
        # averaging needs num_batches_tracked)
        running = (num_batches_tracked, momentum) if training and running_mean is not None and (
            momentum is not None or num_batches_tracked is not None) else None
        out, mean, var = _AggregationNodeFunction.apply(group, count_box, running, weight, bn_weight, bn_bias,
                                                        running_mean, running_var, batch_stats, eps, residual, keep_z,
                                                        act, slope, *children)
        count, updated = count_box
        if updated:
            return out
    if training:
        _bn.update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, count)
    return out


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------
def is_plain_1x1(conv: nn.Module) -> bool:
    """A 1x1 Conv2d the fused op computes exactly: stride 1, no padding, no dilation, one group."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1)


class AggregationNode(nn.Module):
    """Drop-in fused DLA `Root`: parameters `conv.weight` and `bn.*` exactly as the reference
    module, so state dicts move both ways. forward(*children) -> act(bn(conv(cat)) (+ x_0)), the
    activation `activation` ('relu', 'leaky_relu' with `negative_slope`, 'silu' or 'none').

    `in_channels` is the total input channel count, or a list of per-child counts (then checked
    on every call). A kernel size other than 1 cannot be fused and runs the reference path.
    `process_group` (optional) synchronises batch statistics like nn.SyncBatchNorm.
    `memory_efficient` (None: the device's default) recomputes the conv output in backward
    instead of keeping it (see `aggregation_node`).
    """

    def __init__(self, in_channels: Union[int, Sequence[int]], out_channels: int, kernel_size: int = 1,
                 residual: bool = False, process_group=None, momentum: Optional[float] = 0.1,
                 eps: float = 1e-5, memory_efficient: Optional[bool] = None, activation: str = "relu",
                 negative_slope: float = 0.01):
        super().__init__()
        check_activation(activation, negative_slope)
        self.child_channels = None if isinstance(in_channels, int) else [int(c) for c in in_channels]
        total = in_channels if isinstance(in_channels, int) else sum(self.child_channels)
        self.conv = nn.Conv2d(total, out_channels, kernel_size, stride=1, bias=False,
                              padding=(kernel_size - 1) // 2)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.residual = residual
        self.process_group = process_group
        self.memory_efficient = memory_efficient
        self.activation, self.negative_slope = activation, negative_slope

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: bool = False,
                     process_group=None, memory_efficient: Optional[bool] = None, activation: str = "relu",
                     negative_slope: float = 0.01) -> "AggregationNode":
        """Wrap an existing bias-free Conv2d and BatchNorm2d (their parameters are shared)."""
        check_activation(activation, negative_slope)
        if conv.bias is not None or not is_plain_1x1(conv):
            raise ValueError("conv must be a bias-free, ungrouped 1x1 Conv2d (stride 1, no padding, no "
                             f"dilation) to be fused, got {conv}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"bn has {bn.num_features} features but conv has {conv.out_channels} outputs")
        node = cls.__new__(cls)
        nn.Module.__init__(node)
        node.child_channels, node.conv, node.bn = None, conv, bn
        node.residual, node.process_group = residual, process_group
        node.memory_efficient = memory_efficient
        node.activation, node.negative_slope = activation, negative_slope
        return node

    def to_modules(self) -> Tuple[nn.Conv2d, nn.BatchNorm2d]:
        """The plain (conv, bn) pair, sharing this module's parameters."""
        return self.conv, self.bn

    @property
    def fused(self) -> bool:
        return is_plain_1x1(self.conv) and self.bn.affine

    def forward(self, *children: Tensor) -> Tensor:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):  # timm passes one list
            children = tuple(children[0])
        if self.child_channels is not None:
            got = [c.shape[1] if isinstance(c, Tensor) and c.dim() == 4 else None for c in children]
            if got != self.child_channels:
                raise ValueError(f"expected children with channels {self.child_channels}, got {got}")
        bn = self.bn
        activation = getattr(self, "activation", "relu")  # modules pickled before activations existed
        slope = getattr(self, "negative_slope", 0.01)
        if (prepack.enabled(self) and activation == "relu" and not bn.training and prepack.usable(children[0])
                and self.fused):
            out = self._prepacked(children)
            if out is not None:
                return out
        if not self.fused:  # the modules themselves, so that a synchronised bn still synchronises
            y = bn(self.conv(torch.cat(children, dim=1)))
            y = y + children[0] if self.residual else y
            return _ACTIVATION_FUNCTIONS[activation](y, slope)
        return aggregation_node(children, self.conv.weight, bn.weight, bn.bias, bn.running_mean,
                                bn.running_var, bn.num_batches_tracked, bn.training, bn.momentum,
                                bn.eps, self.residual, self.process_group,
                                getattr(self, "memory_efficient", None), activation, slope)

    def _prepacked(self, children: Sequence[Tensor]) -> Optional[Tensor]:
        """Eval forward as one prepacked oneDNN convolution (see dla_fused.prepack), or None when
        the backend serving this device is not `eager` or the input does not qualify."""
        bn = self.bn
        _validate(children, self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                  bn.num_batches_tracked, False, bn.momentum, bn.eps, self.residual)
        if backend.resolve(children[0].device, "aggregation_node") != "eager":
            return None
        x = children[0] if len(children) == 1 else torch.cat(children, dim=1)
        return prepack.conv_unit(self.conv, bn, x, True, children[0] if self.residual else None)

    def extra_repr(self) -> str:
        activation = getattr(self, "activation", "relu")
        if activation == "leaky_relu":
            activation = f"activation=leaky_relu, negative_slope={self.negative_slope}"
        elif activation != "relu":
            activation = f"activation={activation}"
        text = f"residual={self.residual}" + ("" if activation == "relu" else f", {activation}")
        return text + ("" if self.fused else ", reference path (kernel_size != 1)")
