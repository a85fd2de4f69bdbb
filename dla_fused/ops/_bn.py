"""The 1x1-projection + BatchNorm part that both fused ops share (docs/design.md, section 3).

`P` is a backend's primitives namespace (dla_fused.backend). Optional `group` is a
torch.distributed process group: statistics and backward sums are combined across it, like
nn.SyncBatchNorm.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .primitives import IDENTITY, LEAKY_RELU, RELU


def no_autocast(like: Tensor):
    """The kernels choose their own precision (float32 accumulation, statistics in float32): run
    them, and the plain-PyTorch primitives, outside the caller's autocast region."""
    return torch.autocast(like.device.type, enabled=False)


def pixel_count(x: Tensor) -> int:
    return x.shape[0] * x.shape[2] * x.shape[3]


def affine(bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor, eps: float, P=None) -> Tuple[Tensor, Tensor]:
    """BatchNorm as y = scale * z + shift: returns (scale, shift). A backend `P` with `bn_affine`
    (Triton) computes them in one launch."""
    if getattr(P, "bn_affine", None) is not None:
        return P.bn_affine(bn_weight, bn_bias, mean, var, eps)
    scale = bn_weight.to(mean.dtype) * torch.rsqrt(var + eps)
    return scale, bn_bias.to(mean.dtype) - mean * scale


def combine_stats(group, mean: Tensor, var: Tensor, count: int) -> Tuple[Tensor, Tensor, int]:
    """Batch mean / biased variance over all ranks of `group`, merged with Chan's formula from
    each rank's (count, mean, var) so that large means do not cancel."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    stacked = torch.stack(gathered)
    c = mean.numel()
    means, variances, counts = stacked[:, :c], stacked[:, c:2 * c], stacked[:, 2 * c:]
    total = counts.sum()
    global_mean = (means * counts).sum(0) / total
    m2 = (variances * counts).sum(0) + ((means - global_mean) ** 2 * counts).sum(0)
    return global_mean, m2 / total, int(total.item())


def allreduce_sum_(group, *tensors: Tensor) -> None:
    import torch.distributed as dist
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    start = 0
    for t in tensors:
        t.copy_(flat[start:start + t.numel()].view_as(t))
        start += t.numel()


def product_with_stats(P, children: List[Tensor], weight2d: Tensor, group
                       ) -> Tuple[Tensor, Tensor, Tensor, int]:
    """z = W x (never concatenated) with its batch mean and biased variance per channel."""
    z, mean, var = P.agg_conv(children, weight2d, None, None, False, True)
    count = pixel_count(children[0])
    if group is not None:
        mean, var, count = combine_stats(group, mean, var, count)
    return z, mean, var, count


def product_stats_affine(P, children: List[Tensor], weight2d: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                         eps: float, group) -> Tuple[Tensor, Tensor, Tensor, int, Tensor, Tensor]:
    """product_with_stats and BatchNorm's (scale, shift) for those statistics: (z, mean, var,
    count, scale, shift). A backend with `agg_conv_affine` (Triton) emits the affine from its
    statistics kernel instead of a few per-channel launches here (not with a process group: the
    statistics are combined across ranks first)."""
    fused = getattr(P, "agg_conv_affine", None)
    if fused is not None and group is None:
        z, mean, var, scale, shift = fused(children, weight2d, bn_weight, bn_bias, eps)
        return z, mean, var, pixel_count(children[0]), scale, shift
    z, mean, var, count = product_with_stats(P, children, weight2d, group)
    scale, shift = affine(bn_weight, bn_bias, mean, var, eps)
    return z, mean, var, count, scale, shift


def recompute_product(P, children: List[Tensor], weight2d: Tensor) -> Tensor:
    return P.agg_conv(children, weight2d, None, None, False, False)[0]


def backward(P, grad: Tensor, mask_src: Optional[Tensor], children: List[Tensor], weight2d: Tensor,
             bn_weight: Tensor, mean: Tensor, var: Tensor, eps: float, batch_stats: bool,
             residual: bool, group=None, count: Optional[int] = None, bn_grads: bool = True,
             z: Optional[Tensor] = None, z_kept: bool = False, bn_bias: Optional[Tensor] = None,
             act: int = RELU, slope: float = 0.0
             ) -> Tuple[List[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of y = relu(bn(W x) (+ x_0)) given dL/dy = `grad`, with the ReLU mask taken from
    `mask_src > 0` (None: `grad` is already masked). Recomputes z = W x from the children into a
    buffer that then receives dz (or takes that buffer as `z`), or, with `z_kept`, reads the `z`
    the forward kept and leaves it unchanged (a retained graph can run backward again). `count` is the
    number of pixels the batch statistics were taken over (all ranks of `group`; default: this
    batch's). Returns (grad children, grad W (2-D), grad gamma,
    grad beta); the last two are None when neither batch statistics nor `bn_grads` ask for them.
    A backend with `agg_backward_fused` (Triton) takes the whole backward with batch statistics
    (needs `bn_bias`: the ReLU mask is recomputed from z as the forward formed the output, which
    is then not read; its forward must have been `agg_forward_train`).

    `act` (primitives.RELU, ...) is the activation: ReLU and LeakyReLU (negative slope `slope`)
    take their mask from `mask_src`; with no activation the gradient is not masked; SiLU's
    gradient is formed first from z and BatchNorm's affine (needs `bn_bias`), then the rest runs
    as without an activation."""
    fused = getattr(P, "agg_backward_fused", None)
    if act == RELU and fused is not None and batch_stats and group is None and bn_bias is not None:
        return tuple(fused(grad, children, weight2d, bn_weight, bn_bias, mean, var, eps, residual,
                           z if z_kept else None))
    if act not in (RELU, LEAKY_RELU):
        if act != IDENTITY:  # the activation's derivative needs its input: z -> BatchNorm (+ x_0)
            if z is None:
                z = recompute_product(P, children, weight2d)
            scale, shift = affine(bn_weight, bn_bias, mean, var, eps)
            grad = P.agg_activation_grad(grad, z, scale, shift, children[0] if residual else None, act, slope)
        mask_src, slope = None, 0.0
    need_z = batch_stats or bn_grads
    kept = z is not None and z_kept
    count = pixel_count(children[0]) if count is None else count
    fused = getattr(P, "agg_backward_coefficients", None)
    if fused is not None and need_z and group is None and slope == 0:
        # the backend's reduction emits every per-channel vector (Triton: two launches)
        if z is None:
            z = recompute_product(P, children, weight2d)
        grad_gamma, grad_beta, scale, z_coef, bias = fused(grad, mask_src, z, mean, var, bn_weight, eps, count,
                                                           batch_stats)
        coefs = (z_coef, bias, mean) if batch_stats else (None, None, None)
        return _backward_gemms(P, grad, mask_src, children, weight2d, scale, coefs, residual, z, kept, slope) + (
            grad_gamma, grad_beta)
    invstd = torch.rsqrt(var + eps)
    scale = bn_weight.to(mean.dtype) * invstd
    if need_z:
        if z is None:
            z = recompute_product(P, children, weight2d)
        sum_g, sum_gz = P.agg_backward_reduce(grad, mask_src, z, mean, slope)
        # gamma and beta get this rank's sums (DistributedDataParallel averages parameter
        # gradients); the input gradient needs the sums over all ranks, like nn.SyncBatchNorm.
        grad_gamma, grad_beta = sum_gz * invstd, sum_g
        if group is not None and batch_stats:
            sum_g, sum_gz = sum_g.clone(), sum_gz.clone()
            allreduce_sum_(group, sum_g, sum_gz)
    if batch_stats:
        # dz = scale * (g - mean(g) - xhat * mean(g xhat)), xhat = (z - mean) * invstd, so
        # dz = scale * g + z_coef * (z - mean) + bias with the per-channel coefficients below.
        coefs = (-scale * invstd * invstd * sum_gz / count, -scale * sum_g / count, mean)
    else:
        coefs = (None, None, None)
    grads = _backward_gemms(P, grad, mask_src, children, weight2d, scale, coefs, residual, z, kept, slope)
    if not need_z:
        return grads + (None, None)
    return grads + (grad_gamma, grad_beta)


def _backward_gemms(P, grad, mask_src, children, weight2d, scale, coefs, residual, z, kept, slope):
    """dz (into z's buffer unless z was kept), then (grad children, grad W)."""
    if kept:
        dz = P.agg_backward_dz(z, grad, mask_src, scale, *coefs, slope)
    else:
        dz = torch.empty_like(grad) if z is None else z
        P.agg_backward_dz_(dz, grad, mask_src, scale, *coefs, slope)
    residual_grad = (grad, mask_src) if residual else (None, None)
    grad_children, grad_weight = P.agg_backward_gemm(dz, children, weight2d, *residual_grad, slope)
    return grad_children, grad_weight


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                         mean: Tensor, var: Tensor, count: int) -> None:
    """running <- (1 - m) running + m batch, with the unbiased variance; momentum None is the
    cumulative average 1 / num_batches_tracked, as in nn.BatchNorm2d."""
    if running_mean is None:
        return
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / num_batches_tracked.to(running_mean.dtype)
        else:
            factor = momentum
        unbiased = var * (count / max(count - 1, 1))
        running_mean.lerp_(mean.to(running_mean.dtype), factor)  # (1 - factor) running + factor batch
        running_var.lerp_(unbiased.to(running_var.dtype), factor)
