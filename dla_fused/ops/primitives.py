"""The kernel-level primitives of both fused ops, written with plain PyTorch.

Every backend (C++ CPU in csrc/cpu, C++/CUDA in csrc/cuda, Triton in kernels/) implements these
same functions with the same signatures (schemas in csrc/ops.cpp). This file is their
specification: the `reference` backend runs it, and the kernel tests compare each backend's
primitive against it. It is written for clarity, not speed or memory (it concatenates, and it
computes in the accumulation type).

Conventions shared by all backends:
  * activations are 4-D (N, C, H, W), NCHW or channels_last; a result takes the memory format of
    its first activation argument (`memory_format_of`);
  * per-channel vectors are in the accumulation type (`acc_dtype`): float64 for float64
    activations, float32 otherwise; statistics are returned in it too;
  * `weight` of the aggregation node is the 2-D (C_out, sum C_i) view of the 1x1 conv weight.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when x is laid out that way (and not also plain contiguous), like ATen's
    suggest_memory_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _vec(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _as_result(value: Tensor, like: Tensor) -> Tensor:
    return value.to(like.dtype).contiguous(memory_format=memory_format_of(like))


# Activation codes of the aggregation node's primitives (csrc/ops.cpp): `slope` is LeakyReLU's
# negative slope (>= 0).
IDENTITY, RELU, LEAKY_RELU, SILU = 0, 1, 2, 3


def activate(y: Tensor, act: int, slope: float) -> Tensor:
    if act == RELU:
        return torch.relu(y)
    if act == LEAKY_RELU:
        return F.leaky_relu(y, slope)
    if act == SILU:
        return F.silu(y)
    return y


def _masked_grad(grad_out: Tensor, out: Optional[Tensor], acc: torch.dtype, slope: float = 0.0) -> Tensor:
    """grad_out where out > 0, slope * grad_out elsewhere (grad_out itself when out is None)."""
    g = grad_out.to(acc)
    if out is None:
        return g
    return g * (out > 0) if slope == 0 else torch.where(out > 0, g, g * slope)


def agg_conv(children: List[Tensor], weight: Tensor, shift: Optional[Tensor],
             residual: Optional[Tensor], activate_: bool, stats: bool, act: int = RELU,
             slope: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(children[0].dtype)
    x = torch.cat([c.to(acc) for c in children], dim=1)
    z = F.conv2d(x, weight.to(acc)[:, :, None, None])
    if stats:
        mean = z.mean(dim=(0, 2, 3))
        var = z.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean = var = z.new_empty(0)
    if shift is not None:
        z = z + _vec(shift)
    if residual is not None:
        z = z + residual.to(acc)
    if activate_:
        z = activate(z, act, slope)
    return _as_result(z, children[0]), mean, var


def _normalized(z: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor]) -> Tensor:
    y = z.to(scale.dtype) * _vec(scale) + _vec(shift)
    return y if residual is None else y + residual.to(scale.dtype)


def agg_apply_(z: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], act: int = RELU,
               slope: float = 0.0) -> None:
    z.copy_(activate(_normalized(z, scale, shift, residual), act, slope))


def agg_apply(z: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], act: int = RELU,
              slope: float = 0.0) -> Tensor:
    return _as_result(activate(_normalized(z, scale, shift, residual), act, slope), z)


def agg_activation_grad(grad_out: Tensor, z: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                        act: int, slope: float) -> Tensor:
    y = _normalized(z, scale, shift, residual)
    g = grad_out.to(scale.dtype)
    if act == RELU:
        g = g * (y > 0)
    elif act == LEAKY_RELU:
        g = torch.where(y > 0, g, g * slope)
    elif act == SILU:
        s = torch.sigmoid(y)
        g = g * (s * (1 + y * (1 - s)))
    return _as_result(g, grad_out)


def agg_backward_reduce(grad_out: Tensor, out: Optional[Tensor], z: Tensor,
                        mean: Tensor, slope: float = 0.0) -> Tuple[Tensor, Tensor]:
    g = _masked_grad(grad_out, out, mean.dtype, slope)
    return g.sum(dim=(0, 2, 3)), (g * (z.to(mean.dtype) - _vec(mean))).sum(dim=(0, 2, 3))


def agg_backward_dz_(z: Tensor, grad_out: Tensor, out: Optional[Tensor], scale: Tensor,
                     z_coef: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                     slope: float = 0.0) -> None:
    dz = _masked_grad(grad_out, out, scale.dtype, slope) * _vec(scale)
    if z_coef is not None:
        dz = dz + _vec(z_coef) * (z.to(scale.dtype) - _vec(mean)) + _vec(bias)
    z.copy_(dz)


def agg_backward_dz(z: Tensor, grad_out: Tensor, out: Optional[Tensor], scale: Tensor,
                    z_coef: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                    slope: float = 0.0) -> Tensor:
    dz = torch.empty_like(z)
    dz.copy_(z)
    agg_backward_dz_(dz, grad_out, out, scale, z_coef, bias, mean, slope)
    return dz


def agg_backward_gemm(dz: Tensor, children: List[Tensor], weight: Tensor,
                      grad_out: Optional[Tensor], out: Optional[Tensor],
                      slope: float = 0.0) -> Tuple[List[Tensor], Tensor]:
    acc = acc_dtype(dz.dtype)
    d = dz.to(acc)
    grads, weight_grads, start = [], [], 0
    for i, child in enumerate(children):
        w = weight[:, start:start + child.shape[1]].to(acc)
        start += child.shape[1]
        grad = torch.einsum("oc,nohw->nchw", w, d)
        if i == 0 and grad_out is not None:
            grad = grad + _masked_grad(grad_out, out, acc, slope)
        grads.append(_as_result(grad, child))
        weight_grads.append(torch.einsum("nohw,nchw->oc", d, child.to(acc)))
    return grads, torch.cat(weight_grads, dim=1).to(weight.dtype)


def _projected(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    acc = acc_dtype(z.dtype)
    if scale is None:
        return z.to(acc, copy=True)  # results never alias inputs
    return torch.relu(z.to(acc) * _vec(scale) + _vec(shift))


def upsampled_size(size: int, factor: int) -> int:
    """Output length of ConvTranspose2d(kernel 2f, stride f, padding f // 2): size * f for even f."""
    return (size - 1) * factor - 2 * (factor // 2) + 2 * factor


def ida_upsample(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                 up_weight: Optional[Tensor], factor: int, skip: Optional[Tensor]) -> Tensor:
    p = _projected(z, scale, shift)
    if up_weight is not None:
        p = F.conv_transpose2d(p, up_weight.to(p.dtype), stride=factor, padding=factor // 2,
                               groups=p.shape[1])
    if skip is not None:
        p = p + skip.to(p.dtype)
    return _as_result(p, z)


def ida_upsample_backward(grad_out: Tensor, z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                          up_weight: Optional[Tensor], factor: int) -> Tuple[Tensor, Tensor]:
    p = _projected(z, scale, shift)
    g = grad_out.to(p.dtype, copy=True)
    if up_weight is None:
        grad_up = z.new_empty(0)
    else:
        # conv_transpose2d(., U) is the adjoint of conv2d(., U) with the same stride and padding.
        conv = dict(stride=factor, padding=factor // 2, groups=p.shape[1])
        grad_up = torch.nn.grad.conv2d_weight(g, up_weight.shape, p, **conv).to(up_weight.dtype)
        g = F.conv2d(g, up_weight.to(p.dtype), **conv)
    if scale is not None:
        g = g * (p > 0)
    return _as_result(g, z), grad_up
