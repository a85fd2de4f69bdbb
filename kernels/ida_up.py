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

from ._common import (TL_DTYPES, dot_types, empty_like_format, grid, interpreted, pixel_view,
                      round_to, tunable)
from .aggregation import (MAX_GRID_Y, _backward_vectors, _bn_affine, _chained_backward, _chained_blocks,
                          _chained_recomputes, _counters, _gemm, _normalize, _product, block_k_of, product_tile)

UPSAMPLE_CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
                    for p, c, w in ((64, 64, 4), (256, 16, 4), (32, 128, 4), (128, 32, 4), (128, 64, 8))]
# BLOCK_P is the same in every backward config: it sets the number of up_weight-gradient partials.
BACKWARD_CONFIGS = [triton.Config({"BLOCK_P": 64, "BLOCK_C": c}, num_warps=w)
                    for c, w in ((16, 4), (32, 4), (64, 4), (64, 8))]
INTERPRETER = dict(BLOCK_P=32, BLOCK_C="channels")  # backward; the forward has f x f times more pixels


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
         interpreter=dict(INTERPRETER, BLOCK_P=256))
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


@triton.jit
def _tap_gradients(go_ptr, sg_n, sg_c, sg_h, sg_w, u_ptr, su_c, su_h, su_w, gu_part, tile_id, channels, p,
                   n, iy, ix, c, c_ok, mask, out_h, out_w, factor: tl.constexpr, HAS_UP: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The gradient of p for a tile of coarse pixels: the sum over the 2f x 2f taps of
    grad_out[iy f - pad + ky, ix f - pad + kx] u[ky, kx] (grad_out itself without the upsample);
    this tile's share of grad u[c, ky, kx] = sum of p * that grad_out goes to
    gu_part[tile, c, ky, kx]."""
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
    return grad


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
    grad = _tap_gradients(go_ptr, sg_n, sg_c, sg_h, sg_w, u_ptr, su_c, su_h, su_w, gu_part, tile_id, channels, p,
                          n, iy, ix, c, c_ok, mask, out_h, out_w, factor, HAS_UP, ACC, BLOCK_P, BLOCK_C)
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


# ------------------------------------------------------------------------------------------------
# The fused training path with the projection: forward in three launches, backward in two

@triton.jit(do_not_specialize=["num_pixels"])
def _upsample_backward_fused_kernel(gp_ptr, sp_n, sp_c, sp_h, sp_w, go_ptr, sg_n, sg_c, sg_h, sg_w,
                                    children, w_ptr, sw_o, sw_k, zs_ptr, szs_n, szs_c, szs_p,
                                    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, count,
                                    u_ptr, su_c, su_h, su_w, gu_part, gu_ptr, sgu_c, sgu_h, sgu_w,
                                    part_ptr, counters, vec_ptr, gg_ptr, gb_ptr,
                                    num_pixels, in_h, in_w, out_h, out_w, channels, factor: tl.constexpr,
                                    HAS_UP: tl.constexpr, STORE_Z: tl.constexpr, ACC: tl.constexpr,
                                    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
                                    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """The backward's first pass: program (channel block j, coarse tile t) recomputes its tile of
    the projection z = W x (aggregation's _product, rounded as the forward rounded it; stored
    when STORE_Z), p = relu(scale z + shift) as the forward formed it, the gradient of p through
    the taps (_tap_gradients, with this tile's up-weight partials), masked by p > 0, which it
    stores; and this tile's sums of that g and g (z - mean). The last tile of block j to finish
    (an atomic count, left at zero again) merges the tiles in order: grad u in u's dtype, grad
    gamma, grad beta and the chained pass's vectors (scale, shift, z_coef, bias) as in
    aggregation's _backward_sums_kernel."""
    pid_c = tl.program_id(0)
    tile_id = tl.program_id(1).to(tl.int64)
    tiles = tl.num_programs(1)
    q = tile_id * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    q_ok = q < num_pixels
    mask = q_ok[:, None] & c_ok[None, :]
    n, iy, ix = _coordinates(q, in_h, in_w)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    var = tl.load(var_ptr + c, mask=c_ok, other=1.0)
    scale, shift = _bn_affine(tl.load(gamma_ptr + c, mask=c_ok, other=0.0),
                              tl.load(beta_ptr + c, mask=c_ok, other=0.0), mean, var, eps)
    pix = iy * in_w + ix
    z = round_to(_product(children, w_ptr, sw_k, c * sw_o, c_ok, n, pix, q_ok, ACC, DOT, PRECISION, BLOCK_P,
                          BLOCK_C, BLOCK_K), gp_ptr.dtype.element_ty)
    if STORE_Z:
        tl.store(zs_ptr + (n * szs_n + pix * szs_p)[:, None] + (c * szs_c)[None, :], z, mask=mask)
    pre = _normalize(z, scale, shift)
    p = tl.where(mask, tl.maximum(pre, 0.0), 0.0)
    grad = _tap_gradients(go_ptr, sg_n, sg_c, sg_h, sg_w, u_ptr, su_c, su_h, su_w, gu_part, tile_id, channels, p,
                          n, iy, ix, c, c_ok, mask, out_h, out_w, factor, HAS_UP, ACC, BLOCK_P, BLOCK_C)
    grad = tl.where(mask & (pre > 0), grad, 0.0)
    tl.store(gp_ptr + (n * sp_n + iy * sp_h + ix * sp_w)[:, None] + (c * sp_c)[None, :],
             round_to(grad, gp_ptr.dtype.element_ty), mask=mask)
    # the sums of the BatchNorm backward, of g as stored (the chained pass reads it back)
    g = round_to(grad, gp_ptr.dtype.element_ty).to(ACC)
    tl.store(part_ptr + tile_id * channels + c, tl.sum(g, axis=0), mask=c_ok)
    tl.store(part_ptr + (tiles + tile_id) * channels + c, tl.sum(g * (z.to(ACC) - mean[None, :]), axis=0),
             mask=c_ok)
    tl.debug_barrier()  # every thread's stores before the count (acq_rel atomic)
    if tl.atomic_add(counters + pid_c, 1) == tiles - 1:
        _backward_vectors(part_ptr, tiles, c, c_ok, channels, var, eps, count, scale, shift, gg_ptr, gb_ptr, vec_ptr,
                          ACC, BLOCK_S, BLOCK_C)
        if HAS_UP:
            taps = 2 * factor
            for k in range(0, taps * taps):  # a runtime loop: the merge need not unroll
                acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC)
                for s0 in range(0, tiles, BLOCK_S):
                    rows = s0 + tl.arange(0, BLOCK_S)
                    ok = (rows < tiles)[:, None] & c_ok[None, :]
                    acc += tl.load(gu_part + (rows[:, None] * channels + c[None, :]) * (taps * taps) + k, mask=ok,
                                   other=0.0, cache_modifier=".cg")
                tl.store(gu_ptr + c * sgu_c + (k // taps) * sgu_h + (k % taps) * sgu_w,
                         tl.sum(acc, axis=0).to(gu_ptr.dtype.element_ty), mask=c_ok)
        tl.atomic_xchg(counters + pid_c, 0)  # clean for the next launch


def ida_forward_train(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                      eps: float, up_weight: Optional[torch.Tensor], factor: int, skip: Optional[torch.Tensor],
                      running=None):
    """The projected step's training forward in three launches: the projection's GEMM with its
    statistics, the finalize (scale, shift; with `running` = (running_mean, running_var,
    num_batches_tracked or None, momentum or None) the running statistics too), the upsample.
    Returns (out, mean, var); z is not kept (the backward recomputes it)."""
    z = empty_like_format((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), x)
    mean, var, scale, shift = _gemm(z, [x], weight, stats=True, affine=(bn_weight, bn_bias, float(eps)),
                                    running=running, tile=product_tile(*weight.shape))
    return ida_upsample(z, scale, shift, up_weight, factor, skip), mean, var


def ida_backward_fused(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor,
                       bn_bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                       up_weight: Optional[torch.Tensor], factor: int):
    """The projected step's training backward in two launches: the fused upsample backward
    (z recomputed, the masked gradient of p stored, the BatchNorm sums, every per-channel vector
    and the up-weight gradient), then aggregation's chained pass over the one child x (z
    recomputed there, or stored by the first pass and read when recomputing would pass the ridge
    point). Returns (grad x, grad W (2-D), grad gamma, grad beta, grad up weight or None), or None
    when the coarse tiles would pass the grid's axis-1 limit (the unfused kernels then serve)."""
    n, c_in, h, w = x.shape
    c = weight.shape[0]
    acc = acc_dtype(x.dtype)
    dev = x.device
    num_pixels = n * h * w
    xv, x_strides = pixel_view(x)
    children = ((xv, c_in, *x_strides),)
    grad_p = empty_like_format((n, c, h, w), x)
    dot, precision = dot_types(x.dtype, weight.dtype)
    if interpreted():
        tile = product_tile(c, c_in)
        block_p, block_c, block_s = tile["BLOCK_P"], tile["BLOCK_CO"], 16
    else:
        # about 8k values per tile at factor 2 (fewer tiles, fewer up-weight partials), fewer at
        # larger factors: the (2f)^2 taps unroll
        block_c = min(64, max(16, triton.next_power_of_2(c)))
        block_p, block_s = max(16, 8192 // block_c // max(1, factor // 2) ** 2), 32
    block_k = block_k_of(c_in)
    c_blocks, tiles = triton.cdiv(c, block_c), triton.cdiv(num_pixels, block_p)
    if tiles > MAX_GRID_Y:  # past the grid's axis-1 limit: the caller takes the unfused kernels
        return None
    _, _, block_ci, _ = _chained_blocks(c, c_in)
    ci_blocks = triton.cdiv(c_in, block_ci)
    store_z = not _chained_recomputes(grad_p, [x], c_in, ci_blocks)
    z = empty_like_format((n, c, h, w), x) if store_z else grad_p
    zv, z_strides = pixel_view(z)
    taps = 2 * factor
    has_up = up_weight is not None
    gu_part = x.new_empty((tiles, c, taps, taps) if has_up else (1,), dtype=acc)
    grad_up = x.new_empty(up_weight.shape, dtype=up_weight.dtype) if has_up else gu_part.view(1, 1, 1, 1)
    u = up_weight if has_up else gu_part.view(1, 1, 1, 1)
    part = x.new_empty((2, tiles, c), dtype=acc)
    vectors = x.new_empty((4, c), dtype=acc)
    grad_gamma, grad_beta = x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)
    counters = _counters(dev, max(c_blocks, ci_blocks))
    go = grad_out
    _upsample_backward_fused_kernel[(c_blocks, tiles)](
        grad_p, *grad_p.stride(), go, *go.stride(), children, weight, *weight.stride(), zv, *z_strides,
        mean, var, bn_weight, bn_bias, float(eps), float(num_pixels),
        u, u.stride(0), u.stride(2), u.stride(3), gu_part, grad_up, grad_up.stride(0), grad_up.stride(2),
        grad_up.stride(3), part, counters, vectors, grad_gamma, grad_beta,
        num_pixels, h, w, go.shape[2], go.shape[3], c, factor, HAS_UP=has_up, STORE_Z=store_z,
        ACC=TL_DTYPES[acc], DOT=dot, PRECISION=precision, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k,
        BLOCK_S=block_s, num_warps=8 if block_p * block_c >= 8192 else 4)
    grads, grad_weight = _chained_backward(grad_p, [x], weight, vectors, mean, z if store_z else None, False,
                                           mask=False)
    return grads[0], grad_weight, grad_gamma, grad_beta, grad_up if has_up else None
