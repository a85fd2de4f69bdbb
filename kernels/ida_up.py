"""Triton kernels of the IDA-Up step (spec: dla_fused/ops/primitives.py, csrc/ops.cpp).

The depthwise ConvTranspose2d(kernel 2f, stride f, padding f // 2) is a gather: output row oy
reads input rows iy0 = (oy + pad) // f (tap ky0 = oy + pad - iy0 f) and iy0 - 1 (tap ky0 + f),
likewise for columns, so every output pixel sums 2 x 2 taps of p = relu(z * scale + shift),
which is recomputed on the fly from the coarse z and never stored.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from dla_fused.ops.primitives import acc_dtype, upsampled_size

from ._common import TL_DTYPES, empty_like_format, grid, round_to, tunable

UPSAMPLE_CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
                    for p, c, w in ((64, 64, 4), (256, 16, 4), (32, 128, 4), (128, 32, 4), (128, 64, 8))]
# BLOCK_P is the same in every backward config: it sets the number of up_weight-gradient partials.
BACKWARD_CONFIGS = [triton.Config({"BLOCK_P": 64, "BLOCK_C": c}, num_warps=w)
                    for c, w in ((16, 4), (32, 4), (64, 4), (64, 8))]
INTERPRETER = dict(BLOCK_P=16, BLOCK_C="channels")  # backward; the forward has f x f times more pixels


@triton.jit
def _projected(z_ptr, offsets, mask, scale_ptr, shift_ptr, c, c_ok, HAS_BN: tl.constexpr, ACC: tl.constexpr):
    """(pre-activation, p): z * scale + shift and its relu, or z and z without BatchNorm."""
    pre = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(ACC)
    if HAS_BN:
        scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
        shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
        pre = pre * scale[None, :] + shift[None, :]
        p = tl.maximum(pre, 0.0)
    else:
        p = pre
    return pre, p


@triton.jit
def _coordinates(q, height, width):
    """(n, y, x) of flat pixel indices q = (n * height + y) * width + x; n as int64."""
    n = q // (height * width)
    r = q - n * (height * width)
    y = r // width
    return n.to(tl.int64), y, r - y * width


@tunable(UPSAMPLE_CONFIGS, key=["num_pixels", "channels", "factor", "so_c"],
         interpreter=dict(INTERPRETER, BLOCK_P=64))
@triton.jit(do_not_specialize=["num_pixels"])
def _upsample_kernel(out_ptr, so_n, so_c, so_h, so_w, z_ptr, sz_n, sz_c, sz_h, sz_w, scale_ptr, shift_ptr,
                     u_ptr, su_c, su_h, su_w, skip_ptr, sk_n, sk_c, sk_h, sk_w,
                     num_pixels, out_h, out_w, in_h, in_w, channels, factor: tl.constexpr,
                     HAS_BN: tl.constexpr, HAS_UP: tl.constexpr, HAS_SKIP: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile: BLOCK_P output pixels (flat over N * out_h * out_w) x BLOCK_C channels."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    mask = (q < num_pixels)[:, None] & c_ok[None, :]
    n, oy, ox = _coordinates(q, out_h, out_w)
    z_base = (n * sz_n)[:, None] + (c * sz_c)[None, :]
    if HAS_UP:
        pad = factor // 2
        iy0 = (oy + pad) // factor
        ix0 = (ox + pad) // factor
        ky0 = oy + pad - iy0 * factor
        kx0 = ox + pad - ix0 * factor
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
        for dy in tl.static_range(2):
            iy = iy0 - dy
            for dx in tl.static_range(2):
                ix = ix0 - dx
                ok = mask & ((iy >= 0) & (iy < in_h) & (ix >= 0) & (ix < in_w))[:, None]
                _, p = _projected(z_ptr, z_base + (iy * sz_h + ix * sz_w)[:, None], ok, scale_ptr, shift_ptr,
                                  c, c_ok, HAS_BN, ACC)
                tap = ((ky0 + dy * factor) * su_h + (kx0 + dx * factor) * su_w)[:, None] + (c * su_c)[None, :]
                u = tl.load(u_ptr + tap, mask=ok, other=0.0).to(ACC)
                acc += tl.where(ok, p * u, 0.0)
    else:
        _, acc = _projected(z_ptr, z_base + (oy * sz_h + ox * sz_w)[:, None], mask, scale_ptr, shift_ptr,
                            c, c_ok, HAS_BN, ACC)
    if HAS_SKIP:
        skip = (n * sk_n + oy * sk_h + ox * sk_w)[:, None] + (c * sk_c)[None, :]
        acc += tl.load(skip_ptr + skip, mask=mask, other=0.0).to(ACC)
    out = (n * so_n + oy * so_h + ox * so_w)[:, None] + (c * so_c)[None, :]
    tl.store(out_ptr + out, round_to(acc, out_ptr.dtype.element_ty), mask=mask)


@tunable(BACKWARD_CONFIGS, key=["num_pixels", "channels", "factor", "sg_c"], interpreter=INTERPRETER)
@triton.jit(do_not_specialize=["num_pixels"])
def _upsample_backward_kernel(gp_ptr, sp_n, sp_c, sp_h, sp_w, go_ptr, sg_n, sg_c, sg_h, sg_w,
                              z_ptr, sz_n, sz_c, sz_h, sz_w, scale_ptr, shift_ptr, u_ptr, su_c, su_h, su_w,
                              gu_part, num_pixels, in_h, in_w, out_h, out_w, channels, factor: tl.constexpr,
                              HAS_BN: tl.constexpr, HAS_UP: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile: BLOCK_P coarse pixels x BLOCK_C channels. grad p[iy, ix] = sum over the 2f x 2f taps of
    grad_out[iy f - pad + ky, ix f - pad + kx] u[ky, kx]; this tile's share of
    grad u[c, ky, kx] = sum of p * that grad_out goes to gu_part[tile, c, ky, kx]."""
    tile_id = tl.program_id(0).to(tl.int64)
    q = tile_id * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    mask = (q < num_pixels)[:, None] & c_ok[None, :]
    n, iy, ix = _coordinates(q, in_h, in_w)
    pre, p = _projected(z_ptr, (n * sz_n + iy * sz_h + ix * sz_w)[:, None] + (c * sz_c)[None, :], mask,
                        scale_ptr, shift_ptr, c, c_ok, HAS_BN, ACC)
    go_base = (n * sg_n)[:, None] + (c * sg_c)[None, :]
    if HAS_UP:
        pad = factor // 2
        taps = 2 * factor
        grad = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
        for ky in tl.static_range(2 * factor):  # factor is a compile-time constant: both loops unroll
            oy = iy * factor - pad + ky
            for kx in tl.static_range(2 * factor):
                ox = ix * factor - pad + kx
                ok = mask & ((oy >= 0) & (oy < out_h) & (ox >= 0) & (ox < out_w))[:, None]
                go = tl.load(go_ptr + go_base + (oy * sg_h + ox * sg_w)[:, None], mask=ok, other=0.0).to(ACC)
                u = tl.load(u_ptr + c * su_c + ky * su_h + kx * su_w, mask=c_ok, other=0.0).to(ACC)
                grad += go * u[None, :]
                tl.store(gu_part + (tile_id * channels + c) * (taps * taps) + ky * taps + kx,
                         tl.sum(go * p, axis=0), mask=c_ok)
    else:
        grad = tl.load(go_ptr + go_base + (iy * sg_h + ix * sg_w)[:, None], mask=mask, other=0.0).to(ACC)
    if HAS_BN:
        grad = tl.where(pre > 0, grad, 0.0)
    gp = (n * sp_n + iy * sp_h + ix * sp_w)[:, None] + (c * sp_c)[None, :]
    tl.store(gp_ptr + gp, round_to(grad, gp_ptr.dtype.element_ty), mask=mask)


def _bn_args(scale, shift, dummy):
    return (scale, shift) if scale is not None else (dummy, dummy)


def ida_upsample(z: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                 up_weight: Optional[torch.Tensor], factor: int, skip: Optional[torch.Tensor]) -> torch.Tensor:
    n, c, h, w = z.shape
    acc = acc_dtype(z.dtype)
    out_h, out_w = (upsampled_size(h, factor), upsampled_size(w, factor)) if up_weight is not None else (h, w)
    out = empty_like_format((n, c, out_h, out_w), z)
    num_pixels = n * out_h * out_w
    dummy = z.new_empty(1, dtype=acc)
    u = up_weight if up_weight is not None else dummy.view(1, 1, 1, 1)
    sk = skip if skip is not None else out
    _upsample_kernel[grid((num_pixels, "BLOCK_P"), (c, "BLOCK_C"))](
        out, *out.stride(), z, *z.stride(), *_bn_args(scale, shift, dummy), u, u.stride(0), u.stride(2), u.stride(3),
        sk, *sk.stride(), num_pixels, out_h, out_w, h, w, c, factor,
        HAS_BN=scale is not None, HAS_UP=up_weight is not None, HAS_SKIP=skip is not None, ACC=TL_DTYPES[acc])
    return out


def ida_upsample_backward(grad_out: torch.Tensor, z: torch.Tensor, scale: Optional[torch.Tensor],
                          shift: Optional[torch.Tensor], up_weight: Optional[torch.Tensor], factor: int):
    n, c, h, w = z.shape
    acc = acc_dtype(z.dtype)
    grad_p = empty_like_format(z.shape, z)
    num_pixels = n * h * w
    dummy = z.new_empty(1, dtype=acc)
    u = up_weight if up_weight is not None else dummy.view(1, 1, 1, 1)
    (block_p,) = set(_upsample_backward_kernel.candidates("BLOCK_P"))
    taps = 2 * factor
    tiles = triton.cdiv(num_pixels, block_p)
    gu_part = z.new_empty((tiles, c, taps, taps), dtype=acc) if up_weight is not None else dummy
    _upsample_backward_kernel[grid(tiles, (c, "BLOCK_C"))](
        grad_p, *grad_p.stride(), grad_out, *grad_out.stride(), z, *z.stride(), *_bn_args(scale, shift, dummy),
        u, u.stride(0), u.stride(2), u.stride(3), gu_part, num_pixels, h, w, grad_out.shape[2], grad_out.shape[3],
        c, factor, HAS_BN=scale is not None, HAS_UP=up_weight is not None, ACC=TL_DTYPES[acc])
    if up_weight is None:
        return grad_p, z.new_empty(0)
    return grad_p, gu_part.sum(dim=0).view(c, 1, taps, taps).to(up_weight.dtype)
