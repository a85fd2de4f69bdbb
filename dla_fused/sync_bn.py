"""Batch statistics shared across processes, on CPU (gloo) as well as GPU (nccl).

nn.SyncBatchNorm runs on GPUs only; `CrossProcessBatchNorm2d` is a BatchNorm2d whose training
statistics are merged over a process group with differentiable collectives, so gradients flow
through the global mean and variance. `synchronize_batch_norm(model)` makes a whole model use
global statistics: fused aggregation nodes and IDA-Up steps get the process group (their kernels
combine statistics themselves) and every other BatchNorm2d becomes a CrossProcessBatchNorm2d.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


class _AllGather(torch.autograd.Function):
    """Stack of every rank's `local` (world, *local.shape); backward returns this rank's slice of
    the gradient summed over all ranks (each rank's loss depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.group = group
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local.contiguous(), group=group)
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with statistics over all ranks of `process_group` (default: the world) in
    training. Same parameters and buffers as nn.BatchNorm2d. Each rank contributes (count, mean,
    variance), merged with Chan's formula so large means do not cancel."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, process_group=None):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.process_group = process_group

    def _synchronised(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self._synchronised():
            return super().forward(x)
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"expected an input of shape (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xa = x.to(acc)
        count = x.new_full((1,), x.shape[0] * x.shape[2] * x.shape[3], dtype=acc)
        local = torch.cat([xa.mean((0, 2, 3)), xa.var((0, 2, 3), unbiased=False), count])
        stacked = _AllGather.apply(local, self.process_group)
        c = self.num_features
        means, variances, counts = stacked[:, :c], stacked[:, c:2 * c], stacked[:, 2 * c:]
        total = counts.sum()
        mean = (means * counts).sum(0) / total
        var = ((variances + (means - mean) ** 2) * counts).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = total.item()
                self.running_mean.mul_(1 - factor).add_(mean.detach() * factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1)) * factor)
        y = (xa - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def synchronize_batch_norm(model: nn.Module, process_group=None) -> nn.Module:
    """Make every BatchNorm of `model` use statistics over `process_group` (default: the world),
    in place; parameters, buffers and state_dict keys stay as they are."""
    from .fuse import fused_steps
    from .ops.aggregation import AggregationNode
    fused_bns = set()
    for module in model.modules():
        if isinstance(module, AggregationNode):
            module.process_group = process_group if process_group is not None else dist.group.WORLD
            if module.fused:  # an unfused node runs its bn module, converted below
                fused_bns.add(id(module.bn))
        for step in fused_steps(module):
            step.process_group = process_group if process_group is not None else dist.group.WORLD
            if not isinstance(step.proj, nn.Identity):
                fused_bns.add(id(step.proj[1]))
    for module in model.modules():
        if type(module) is nn.BatchNorm2d and id(module) not in fused_bns:
            module.__class__ = CrossProcessBatchNorm2d
            module.process_group = process_group
    return model
