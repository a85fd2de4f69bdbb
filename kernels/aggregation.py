"""Triton kernels of the aggregation node (spec: dla_fused/ops/primitives.py, csrc/ops.cpp).

Forward: one GEMM over all children z = sum_i W_i x_i (no concatenation), with epilogues for
batch statistics (per-tile mean and M2, combined by Chan's formula), or shift + residual + ReLU.
Backward: two elementwise passes around a per-channel reduction, then the GEMMs
dx_i = W_i^T dz (the forward GEMM on W^T) and dW = sum over pixels of dz x^T (split over pixels).
Every activation is addressed as (N, C, P = H*W) through its strides, so NCHW and channels_last
(and children in different layouts) need no copies.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from dla_fused.ops.primitives import acc_dtype

from ._common import (TL_DTYPES, dot_types, empty_like_format, grid, interpreted, interpreter_block, num_sms,
                      offsets, pixel_coords, pixel_view, round_to, split, tile, tunable)

# Every config of the product kernel takes the input channels PRODUCT_K at a time, as the fused
# backward kernels do: a product recomputed there is then the same sequence of tl.dot calls, so
# the same bits, as the forward's (the ReLU mask is recomputed, not read).
PRODUCT_K = 32
GEMM_CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_CO": co, "BLOCK_K": PRODUCT_K}, num_warps=w, num_stages=s)
                for p, co, w, s in ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3),
                                    (128, 64, 8, 4))]
WEIGHT_GRAD_CONFIGS = [triton.Config({"BLOCK_CO": co, "BLOCK_CI": ci, "BLOCK_K": k}, num_warps=w, num_stages=s)
                       for co, ci, k, w, s in ((64, 64, 64, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3),
                                               (128, 128, 32, 8, 4), (64, 64, 128, 4, 4))]
ELEMENTWISE_CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
                       for p, c, w in ((64, 64, 4), (256, 16, 4), (32, 128, 4), (128, 64, 8), (128, 32, 4))]
GEMM_INTERPRETER = dict(BLOCK_P=16, BLOCK_CO="c_out", BLOCK_K="c_in")
ELEMENTWISE_INTERPRETER = dict(BLOCK_P=16, BLOCK_C="channels")


# ------------------------------------------------------------------------------------------------
# Forward GEMM and statistics

@triton.jit
def _accumulate(acc, x_ptr, c_in, s_n, s_c, s_p, w_ptr, sw_k, w_cols, co_ok, n, p, q_ok,
                DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[p, o] += sum_k x[p, k] * w[o, k] over one child's c_in channels (w_cols: offsets of o)."""
    rows = n * s_n + p * s_p
    for k0 in range(0, c_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < c_in
        x = tl.load(x_ptr + rows[:, None] + (k * s_c)[None, :], mask=q_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (k * sw_k)[:, None] + w_cols[None, :], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc += tl.dot(x.to(DOT), w.to(DOT), input_precision=PRECISION)
    return acc


@triton.jit
def _product(children, w_ptr, sw_k, w_cols, co_ok, n, p, q_ok, ACC: tl.constexpr, DOT: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_P, BLOCK_CO] tile of z = sum over children i of W_i x_i, child by child, BLOCK_K
    input channels at a time: every kernel that forms z (forward or recomputed) calls this."""
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC)
    for i in tl.static_range(len(children)):  # children: (x, channels, s_n, s_c, s_p) each
        x, c_i, s_n, s_c, s_p = children[i]
        acc = _accumulate(acc, x, c_i, s_n, s_c, s_p, w_ptr, sw_k, w_cols, co_ok, n, p, q_ok, DOT, PRECISION, BLOCK_K)
        w_ptr += c_i * sw_k
    return acc


@triton.jit
def _normalize(z, scale, shift):
    """BatchNorm of z (in its storage dtype) as scale * z + shift, in scale's dtype: the one
    expression that forms the forward's output and, in backward, its recomputed ReLU mask."""
    return z.to(scale.dtype) * scale[None, :] + shift[None, :]


@triton.jit
def _activate(y, slope, ACT: tl.constexpr):
    """The node's activation (codes as dla_fused/ops/primitives.py): 0 none, 1 ReLU, 2 LeakyReLU
    (negative slope `slope`), 3 SiLU."""
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = tl.where(y > 0, y, y * slope)
    elif ACT == 3:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _mask(g, out, slope, MASK: tl.constexpr):
    """g masked by the activation's output: 0 none, 1 ReLU (0 where out <= 0), 2 LeakyReLU."""
    if MASK == 1:
        g = tl.where(out > 0, g, 0.0)
    elif MASK == 2:
        g = tl.where(out > 0, g, g * slope)
    return g


@triton.jit
def _bn_affine(gamma, beta, mean, var, eps):
    """(scale, shift) of BatchNorm: gamma / sqrt(var + eps), beta - mean * scale."""
    scale = gamma.to(var.dtype) / tl.sqrt(var + eps)
    return scale, beta.to(var.dtype) - mean * scale


@tunable(GEMM_CONFIGS, key=["num_pixels", "c_out", "c_in", "so_c"], interpreter=GEMM_INTERPRETER,
         dot_tiles=[("BLOCK_P", "BLOCK_K"), ("BLOCK_K", "BLOCK_CO")])
@triton.jit(do_not_specialize=["num_pixels"])
def _conv_kernel(out_ptr, so_n, so_c, so_p, w_ptr, sw_o, sw_k, scale_ptr, shift_ptr,
                 res_ptr, sr_n, sr_c, sr_p, gate_ptr, sg_n, sg_c, sg_p,
                 mean_part, m2_part, count_part, tiles_used, counters, n_counters, num_pixels, hw, c_out, c_in,
                 slope, children,
                 HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 GATE: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr, STORE: tl.constexpr,
                 CO_FIRST: tl.constexpr,
                 ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[p, o] = epilogue(sum over children i, channels k of W[o, off_i + k] x_i[p, k]).
    Tile: BLOCK_P pixels (flat over N*H*W) x BLOCK_CO output channels. One compile per number of
    children (the tuple's length). Epilogues: STATS (per-tile statistics; STORE False: nothing
    else is stored), HAS_SCALE (BatchNorm on the product rounded to out's dtype, as the forward
    that stored z applied it) or HAS_SHIFT (a bias), the residual (GATE: masked by the
    activation output `gate`, as _mask), the activation ACT (_activate). CO_FIRST puts
    the output-channel blocks on grid axis 0, so that the programs reading the same pixel tile run
    one after another and the children are streamed from memory once, not once per output block."""
    if CO_FIRST:
        pid_co = tl.program_id(0)
        pid_p = tl.program_id(1)
        p_tiles = tl.num_programs(1)
    else:
        pid_p = tl.program_id(0)
        pid_co = tl.program_id(1)
        p_tiles = tl.num_programs(0)
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    n, p = pixel_coords(q, hw)
    q_ok = q < num_pixels
    co_ok = co < c_out
    mask = q_ok[:, None] & co_ok[None, :]
    acc = _product(children, w_ptr, sw_k, co * sw_o, co_ok, n, p, q_ok, ACC, DOT, PRECISION, BLOCK_P, BLOCK_CO,
                   BLOCK_K)

    if STATS:  # this tile's mean and sum of squared deviations (M2) over its valid pixels
        count = tl.minimum(num_pixels - pid_p * BLOCK_P, BLOCK_P)
        tile_mean = tl.sum(acc, axis=0) / count  # rows past num_pixels are exact zeros
        deviation = tl.where(mask, acc - tile_mean[None, :], 0.0)
        tl.store(mean_part + pid_p * c_out + co, tile_mean, mask=co_ok)
        tl.store(m2_part + pid_p * c_out + co, tl.sum(deviation * deviation, axis=0), mask=co_ok)
        if pid_co == 0:
            tl.store(count_part + pid_p, count.to(ACC))
            if pid_p == 0:  # the finalize reads this many tiles (whatever config ran, or ran before)
                tl.store(tiles_used, p_tiles)
    if (pid_p == 0) & (pid_co == 0):
        # zero the counts the next launch uses (the finalize's chunk counts, or the weight
        # gradient's tile counts after the first dgrad GEMM): no fill launch
        for k0 in range(0, n_counters, 64):
            slots = k0 + tl.arange(0, 64)
            tl.store(counters + slots, tl.zeros((64,), dtype=tl.int32), mask=slots < n_counters)
    if HAS_SCALE:
        acc = _normalize(round_to(acc, out_ptr.dtype.element_ty), tl.load(scale_ptr + co, mask=co_ok, other=0.0),
                         tl.load(shift_ptr + co, mask=co_ok, other=0.0))
    elif HAS_SHIFT:
        acc += tl.load(shift_ptr + co, mask=co_ok, other=0.0)[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(res_ptr + offsets(n, p, co, sr_n, sr_c, sr_p), mask=mask, other=0.0).to(ACC)
        if GATE != 0:
            gate = tl.load(gate_ptr + offsets(n, p, co, sg_n, sg_c, sg_p), mask=mask, other=0.0)
            residual = _mask(residual, gate, slope, GATE)
        acc += residual
    acc = _activate(acc, slope, ACT)
    if STORE:
        tl.store(out_ptr + offsets(n, p, co, so_n, so_c, so_p), round_to(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chan_merge(mean_rows, m2_rows, count_rows, r0, r1, c, c_ok, channels,
                ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan et al.'s parallel combination of rows r in [r0, r1) of (count n_r, mean m_r, M2_r):
    n = sum n_r;  mean = sum n_r m_r / n;  M2 = sum M2_r + sum n_r (m_r - mean)^2. Rows merge in a
    fixed order (blocks of BLOCK_T, then a tree over the block): deterministic. An empty range
    gives (0, 0, 0). Loads bypass L1 (.cg): rows written by other programs of the same launch."""
    counts = tl.zeros((BLOCK_T,), dtype=ACC)
    weighted = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
    for t0 in range(r0, r1, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < r1
        n_t = tl.load(count_rows + t, mask=t_ok, other=0.0, cache_modifier=".cg")
        m_t = tl.load(mean_rows + t[:, None] * channels + c[None, :], mask=t_ok[:, None] & c_ok[None, :],
                      other=0.0, cache_modifier=".cg")
        counts += n_t
        weighted += n_t[:, None] * m_t
    total = tl.sum(counts, axis=0)
    mean = tl.where(total > 0, tl.sum(weighted, axis=0) / tl.maximum(total, 1.0), 0.0)
    m2 = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
    for t0 in range(r0, r1, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < r1
        ok = t_ok[:, None] & c_ok[None, :]
        n_t = tl.load(count_rows + t, mask=t_ok, other=0.0, cache_modifier=".cg")
        m_t = tl.load(mean_rows + t[:, None] * channels + c[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        m2_t = tl.load(m2_rows + t[:, None] * channels + c[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        delta = tl.where(ok, m_t - mean[None, :], 0.0)
        m2 += m2_t + n_t[:, None] * delta * delta
    return total, mean, tl.sum(m2, axis=0)


@triton.jit
def _finalize_stats_kernel(mean_part, m2_part, count_part, tiles_used, chunk_mean, chunk_m2, chunk_count, counters,
                           mean_ptr, var_ptr, gamma_ptr, beta_ptr, scale_ptr, shift_ptr, eps, channels,
                           tiles_per_chunk, rmean_ptr, rvar_ptr, nbt_ptr, momentum, unbias,
                           AFFINE: tl.constexpr, RUNNING: tl.constexpr, HAS_NBT: tl.constexpr,
                           CUMULATIVE: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """Batch statistics from the GEMM's per-tile (count, mean, M2), in parallel: program (j, k)
    merges tile chunk k for channel block j into chunk_*[k]; the last program of block j to finish
    (an atomic count per block, zeroed by the GEMM) merges the chunks in order 0, 1, ... and stores
    mean and biased variance, and with AFFINE the BatchNorm as scale = gamma / sqrt(var + eps),
    shift = beta - mean * scale. The result does not depend on which program finishes last.
    RUNNING: that program also updates the running statistics as nn.BatchNorm2d does,
    running <- lerp(running, batch, factor) with the unbiased variance (var * unbias); factor is
    `momentum`, or with CUMULATIVE 1 / (num_batches_tracked + 1). The last block to finish
    (counters[blocks], zeroed by the GEMM too) adds 1 to num_batches_tracked (HAS_NBT), after
    every block has read it."""
    block = tl.program_id(0)
    k = tl.program_id(1)
    chunks = tl.num_programs(1)
    c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    num_tiles = tl.load(tiles_used)
    start = k * tiles_per_chunk
    n_k, mean_k, m2_k = _chan_merge(mean_part, m2_part, count_part, start,
                                    tl.minimum(start + tiles_per_chunk, num_tiles), c, c_ok, channels,
                                    ACC, BLOCK_T, BLOCK_C)
    tl.store(chunk_mean + k * channels + c, mean_k, mask=c_ok)
    tl.store(chunk_m2 + k * channels + c, m2_k, mask=c_ok)
    tl.store(chunk_count + k, n_k)
    tl.debug_barrier()  # every thread's stores before the count (acq_rel atomic)
    if tl.atomic_add(counters + block, 1) == chunks - 1:
        total, mean, m2 = _chan_merge(chunk_mean, chunk_m2, chunk_count, 0, chunks, c, c_ok, channels,
                                      ACC, BLOCK_T, BLOCK_C)
        var = m2 / total
        tl.store(mean_ptr + c, mean, mask=c_ok)
        tl.store(var_ptr + c, var, mask=c_ok)
        if AFFINE:
            scale, shift = _bn_affine(tl.load(gamma_ptr + c, mask=c_ok, other=0.0),
                                      tl.load(beta_ptr + c, mask=c_ok, other=0.0), mean, var, eps)
            tl.store(scale_ptr + c, scale, mask=c_ok)
            tl.store(shift_ptr + c, shift, mask=c_ok)
        if RUNNING:
            factor = tl.zeros((BLOCK_C,), dtype=ACC) + momentum
            if CUMULATIVE:
                factor = tl.zeros((BLOCK_C,), dtype=ACC) + 1.0 / (tl.load(nbt_ptr) + 1).to(ACC)
            _lerp_(rmean_ptr, c, c_ok, mean, factor)
            _lerp_(rvar_ptr, c, c_ok, var * unbias, factor)
            if HAS_NBT:
                tl.debug_barrier()  # this block has read num_batches_tracked
                if tl.atomic_add(counters + tl.num_programs(0), 1) == tl.num_programs(0) - 1:
                    tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def _lerp_(ptr, c, c_ok, end, weight):
    """ptr[c] <- lerp(ptr[c], end, weight) in end's dtype, by torch.lerp's formula (from the end
    for weights of 1/2 and more), stored in ptr's dtype."""
    start = tl.load(ptr + c, mask=c_ok, other=0.0).to(end.dtype)
    diff = end - start
    value = tl.where(weight < 0.5, start + weight * diff, end - diff * (1.0 - weight))
    tl.store(ptr + c, value.to(ptr.dtype.element_ty), mask=c_ok)


FINALIZE_BLOCK_C = 64
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2


def _finalize_grid(c_out: int, tiles: int, device):
    """(channel blocks, tile chunks, tiles per chunk, BLOCK_T, BLOCK_C) of the finalize launch:
    about two programs per multiprocessor, each over at least 32 tiles (3 chunks at most under
    the interpreter, to exercise the merge)."""
    if interpreted():
        block_c, block_t = interpreter_block(c_out), 16
        blocks = triton.cdiv(c_out, block_c)
        chunks, per = split(tiles, 3)
    else:
        block_c, block_t = FINALIZE_BLOCK_C, 32
        blocks = triton.cdiv(c_out, block_c)
        chunks, per = split(tiles, min(triton.cdiv(tiles, 32), max(1, 2 * num_sms(device) // blocks)))
    return blocks, chunks, per, block_t, block_c


def _gemm(out, xs, weight, shift=None, residual=None, gate=None, act=0, stats=False, affine=None,
          zero=None, scale=None, store=True, running=None, slope=0.0, tile=None):
    """out = epilogue(sum_i weight[:, off_i:off_i + C_i] x_i); weight is 2-D (C_out, sum C_i), any
    strides. `act`: the activation (_activate's codes, `slope` LeakyReLU's); `gate`: the residual
    masked by it (slope 0: ReLU's mask). Returns (mean, var) of the pre-epilogue values when stats, else two empty vectors;
    with `affine` = (gamma, beta, eps) also BatchNorm's (scale, shift) for those statistics, and
    with `running` = (running_mean, running_var, num_batches_tracked or None, momentum or None)
    the running statistics updated by the finalize. `scale` (with `shift`): BatchNorm of the
    product as the forward applies it. `store` False: statistics only, `out` only gives the shape
    and dtype (it may be an expanded one-element tensor). `zero`: an int32 vector the launch
    zeroes for the next one (not with stats). `tile`: block sizes to launch with (product_tile)."""
    acc = acc_dtype(out.dtype)
    n, c_out, h, w = out.shape
    num_pixels = n * h * w
    dummy = out.new_empty(1, dtype=acc)  # stands for absent vectors (same dtype: same autotune key)
    children = tuple((x, x.shape[1], *strides) for x, strides in map(pixel_view, xs))
    out_view, out_strides = pixel_view(out) if store else (out, (0, 0, 0))
    res, res_strides = pixel_view(residual) if residual is not None else (out_view, out_strides)
    gate_t, gate_strides = pixel_view(gate) if gate is not None else (out_view, out_strides)
    if stats:
        tiles = triton.cdiv(num_pixels, min(_conv_kernel.candidates("BLOCK_P")))
        blocks, chunks, per, block_t, block_c = _finalize_grid(c_out, tiles, out.device)
        # one int32 scratch: the tile count, then a chunk count per channel block and the count
        # of finished blocks (num_batches_tracked's update)
        scratch = out.new_empty(2 + blocks, dtype=torch.int32)
        parts = [out.new_empty((tiles, c_out), dtype=acc), out.new_empty((tiles, c_out), dtype=acc),
                 out.new_empty(tiles, dtype=acc), scratch[:1], scratch[1:], blocks + 1]
    else:
        int_dummy = out.new_empty(1, dtype=torch.int32)
        parts = [dummy] * 3 + [int_dummy] + ([int_dummy, 0] if zero is None else [zero, zero.numel()])
    dot, precision = dot_types(xs[0].dtype, weight.dtype)
    # output blocks on axis 0 unless the pixel tiles would pass the grid's axis-1 limit
    co_first = triton.cdiv(num_pixels, 16) <= MAX_GRID_Y
    dims = ((c_out, "BLOCK_CO"), (num_pixels, "BLOCK_P")) if co_first else ((num_pixels, "BLOCK_P"), (c_out, "BLOCK_CO"))
    _conv_kernel[grid(*dims)](
        out_view, *out_strides, weight, *weight.stride(), scale if scale is not None else dummy,
        shift if shift is not None else dummy,
        res, *res_strides, gate_t, *gate_strides, *parts, num_pixels, h * w, c_out, weight.shape[1], float(slope),
        children, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RESIDUAL=residual is not None,
        GATE=0 if gate is None else 1 if slope == 0 else 2, ACT=act, STATS=stats, STORE=store, CO_FIRST=co_first,
        ACC=TL_DTYPES[acc],
        DOT=dot, PRECISION=precision, **(tile or {}))
    if out_view is not out:
        out.copy_(out_view)
    if not stats:
        return out.new_empty(0, dtype=acc), out.new_empty(0, dtype=acc)
    # mean and var on their own (they leave the op: no aliasing), scale, shift and the chunk
    # partials (count, mean, M2) in one buffer
    mean, var = out.new_empty(c_out, dtype=acc), out.new_empty(c_out, dtype=acc)
    vectors = out.new_empty(2 * c_out + chunks * (2 * c_out + 1), dtype=acc)
    bn_scale, bn_shift = vectors[:c_out], vectors[c_out:2 * c_out]
    chunk = vectors[2 * c_out:]
    gamma, beta, eps = affine if affine is not None else (dummy, dummy, 0.0)
    running_mean, running_var, nbt, momentum = running if running is not None else (dummy, dummy, None, 0.0)
    _finalize_stats_kernel[(blocks, chunks)](
        *parts[:4], chunk[:chunks * c_out], chunk[chunks * c_out:2 * chunks * c_out], chunk[2 * chunks * c_out:],
        parts[4], mean, var, gamma, beta, bn_scale, bn_shift, eps, c_out, per,
        running_mean, running_var, nbt if nbt is not None else parts[3], float(momentum or 0.0),
        num_pixels / max(num_pixels - 1, 1), AFFINE=affine is not None, RUNNING=running is not None,
        HAS_NBT=nbt is not None, CUMULATIVE=running is not None and momentum is None,
        ACC=TL_DTYPES[acc], BLOCK_T=block_t, BLOCK_C=block_c)
    return (mean, var) if affine is None else (mean, var, bn_scale, bn_shift)


def agg_conv(children: List[torch.Tensor], weight: torch.Tensor, shift: Optional[torch.Tensor],
             residual: Optional[torch.Tensor], activate: bool, stats: bool, act: int = 1, slope: float = 0.0):
    first = children[0]
    out = empty_like_format((first.shape[0], weight.shape[0], first.shape[2], first.shape[3]), first)
    mean, var = _gemm(out, children, weight, shift, residual, act=act if activate else 0, stats=stats, slope=slope)
    return out, mean, var


def agg_conv_affine(children: List[torch.Tensor], weight: torch.Tensor, bn_weight: torch.Tensor,
                    bn_bias: torch.Tensor, eps: float):
    """z = W x with its batch statistics and BatchNorm's (scale, shift) for them, in two launches
    (the GEMM, the parallel finalize): (z, mean, var, scale, shift)."""
    first = children[0]
    out = empty_like_format((first.shape[0], weight.shape[0], first.shape[2], first.shape[3]), first)
    mean, var, scale, shift = _gemm(out, children, weight, stats=True, affine=(bn_weight, bn_bias, float(eps)))
    return out, mean, var, scale, shift


# ------------------------------------------------------------------------------------------------
# Elementwise passes and the per-channel reduction of the backward

@tunable(ELEMENTWISE_CONFIGS, key=["num_pixels", "channels", "sz_c"], interpreter=ELEMENTWISE_INTERPRETER,
         restore_value=["z_ptr"])
@triton.jit(do_not_specialize=["num_pixels"])
def _apply_kernel(z_ptr, sz_n, sz_c, sz_p, out_ptr, so_n, so_c, so_p, scale_ptr, shift_ptr, res_ptr, sr_n, sr_c,
                  sr_p, num_pixels, hw, channels, slope, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = act(z * scale + shift (+ residual)); out may be z (in place)."""
    n, p, q_ok, c, c_ok = tile(num_pixels, hw, channels, BLOCK_P, BLOCK_C)
    mask = q_ok[:, None] & c_ok[None, :]
    y = _pre_activation(z_ptr, sz_n, sz_c, sz_p, res_ptr, sr_n, sr_c, sr_p, scale_ptr, shift_ptr, n, p, c, c_ok,
                        mask, HAS_RESIDUAL)
    tl.store(out_ptr + offsets(n, p, c, so_n, so_c, so_p), round_to(_activate(y, slope, ACT), out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _pre_activation(z_ptr, sz_n, sz_c, sz_p, res_ptr, sr_n, sr_c, sr_p, scale_ptr, shift_ptr, n, p, c, c_ok, mask,
                    HAS_RESIDUAL: tl.constexpr):
    """y = z * scale + shift (+ residual) of a tile, in the vectors' dtype: what the activation takes."""
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
    y = _normalize(tl.load(z_ptr + offsets(n, p, c, sz_n, sz_c, sz_p), mask=mask, other=0.0), scale, shift)
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offsets(n, p, c, sr_n, sr_c, sr_p), mask=mask, other=0.0).to(scale.dtype)
    return y


@triton.jit
def _masked_grad(go_ptr, sg_n, sg_c, sg_p, out_ptr, so_n, so_c, so_p, n, p, c, mask, slope, dtype: tl.constexpr,
                 MASK: tl.constexpr):
    """g = grad_out masked by the activation output (_mask; MASK 0: no out, grad_out itself), in
    `dtype`."""
    g = tl.load(go_ptr + offsets(n, p, c, sg_n, sg_c, sg_p), mask=mask, other=0.0).to(dtype)
    if MASK != 0:
        out = tl.load(out_ptr + offsets(n, p, c, so_n, so_c, so_p), mask=mask, other=0.0)
        g = _mask(g, out, slope, MASK)
    return g


@tunable(ELEMENTWISE_CONFIGS, key=["num_pixels", "channels", "sz_c"], interpreter=ELEMENTWISE_INTERPRETER)
@triton.jit(do_not_specialize=["num_pixels", "chunk"])
def _reduce_kernel(part_ptr, go_ptr, sg_n, sg_c, sg_p, out_ptr, so_n, so_c, so_p, z_ptr, sz_n, sz_c, sz_p,
                   mean_ptr, num_pixels, hw, channels, chunk, slope, MASK: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (s, j): sums of g and g * (z - mean) over pixels [s * chunk, (s + 1) * chunk) for
    channel block j, written to part[0, s] and part[1, s]."""
    split_id = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    sum_g = tl.zeros((BLOCK_P, BLOCK_C), dtype=mean.dtype)
    sum_gz = tl.zeros((BLOCK_P, BLOCK_C), dtype=mean.dtype)
    start = split_id * chunk
    end = tl.minimum(start + chunk, num_pixels)
    for q0 in range(start, end, BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        mask = (q < end)[:, None] & c_ok[None, :]
        n, p = pixel_coords(q, hw)
        g = _masked_grad(go_ptr, sg_n, sg_c, sg_p, out_ptr, so_n, so_c, so_p, n, p, c, mask, slope, mean.dtype,
                         MASK)
        z = tl.load(z_ptr + offsets(n, p, c, sz_n, sz_c, sz_p), mask=mask, other=0.0)
        z = z.to(mean.dtype)
        sum_g += g
        sum_gz += g * (z - mean[None, :])
    tl.store(part_ptr + split_id * channels + c, tl.sum(sum_g, axis=0), mask=c_ok)
    tl.store(part_ptr + (tl.num_programs(0) + split_id) * channels + c, tl.sum(sum_gz, axis=0), mask=c_ok)


@tunable(ELEMENTWISE_CONFIGS, key=["num_pixels", "channels", "sz_c"], interpreter=ELEMENTWISE_INTERPRETER,
         restore_value=["z_ptr"])
@triton.jit(do_not_specialize=["num_pixels"])
def _dz_kernel(z_ptr, sz_n, sz_c, sz_p, go_ptr, sg_n, sg_c, sg_p, out_ptr, so_n, so_c, so_p,
               scale_ptr, coef_ptr, bias_ptr, mean_ptr, num_pixels, hw, channels, slope,
               MASK: tl.constexpr, HAS_COEF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """z = scale * g (+ coef * (z - mean) + bias), in place."""
    n, p, q_ok, c, c_ok = tile(num_pixels, hw, channels, BLOCK_P, BLOCK_C)
    mask = q_ok[:, None] & c_ok[None, :]
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    g = _masked_grad(go_ptr, sg_n, sg_c, sg_p, out_ptr, so_n, so_c, so_p, n, p, c, mask, slope, scale.dtype, MASK)
    dz = g * scale[None, :]
    z_ptrs = z_ptr + offsets(n, p, c, sz_n, sz_c, sz_p)
    if HAS_COEF:
        coef = tl.load(coef_ptr + c, mask=c_ok, other=0.0)
        bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0)
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
        z = tl.load(z_ptrs, mask=mask, other=0.0).to(scale.dtype)
        dz += coef[None, :] * (z - mean[None, :]) + bias[None, :]
    tl.store(z_ptrs, round_to(dz, z_ptr.dtype.element_ty), mask=mask)


def _optional_view(t, fallback):
    return pixel_view(t) if t is not None else fallback


def _mask_code(out, slope: float) -> int:
    return 0 if out is None else 1 if slope == 0 else 2


def _apply(z: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
           residual: Optional[torch.Tensor], act: int = 1, slope: float = 0.0) -> None:
    n, c, h, w = z.shape
    zv, z_strides = pixel_view(z)
    ov, o_strides = (zv, z_strides) if out is z else pixel_view(out)
    res, res_strides = _optional_view(residual, (zv, z_strides))
    _apply_kernel[grid((n * h * w, "BLOCK_P"), (c, "BLOCK_C"))](
        zv, *z_strides, ov, *o_strides, scale, shift, res, *res_strides, n * h * w, h * w, c, float(slope),
        HAS_RESIDUAL=residual is not None, ACT=act)
    if ov is not out:
        out.copy_(ov)


def agg_apply_(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: Optional[torch.Tensor],
               act: int = 1, slope: float = 0.0) -> None:
    _apply(z, z, scale, shift, residual, act, slope)


def agg_backward_reduce(grad_out: torch.Tensor, out: Optional[torch.Tensor], z: torch.Tensor, mean: torch.Tensor,
                        slope: float = 0.0):
    part = _reduce_parts(grad_out, out, z, mean, slope)
    return part[0].sum(dim=0), part[1].sum(dim=0)


@triton.jit
def _coefficients_kernel(part_ptr, splits, var_ptr, gamma_ptr, eps, count, channels, gg_ptr, gb_ptr, out_ptr,
                         BATCH_STATS: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """The backward's per-channel vectors from the reduction's split partials (sums of g and of
    g (z - mean), merged in a fixed order): grad gamma = sum_gz / sqrt(var + eps),
    grad beta = sum_g, scale = gamma / sqrt(var + eps) and, with BATCH_STATS, the dz coefficients
    z_coef = -scale sum_gz / ((var + eps) count), bias = -scale sum_g / count; grad gamma and grad
    beta to their own vectors (gg, gb: they leave the op), the other three to rows of out."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    sum_g = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC)
    sum_gz = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC)
    for s0 in range(0, splits, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        ok = (rows < splits)[:, None] & c_ok[None, :]
        sum_g += tl.load(part_ptr + rows[:, None] * channels + c[None, :], mask=ok, other=0.0)
        sum_gz += tl.load(part_ptr + (splits + rows)[:, None] * channels + c[None, :], mask=ok, other=0.0)
    g = tl.sum(sum_g, axis=0)
    gz = tl.sum(sum_gz, axis=0)
    var_eps = tl.load(var_ptr + c, mask=c_ok, other=1.0) + eps
    invstd = 1.0 / tl.sqrt(var_eps)
    scale = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(ACC) * invstd
    tl.store(gg_ptr + c, gz * invstd, mask=c_ok)
    tl.store(gb_ptr + c, g, mask=c_ok)
    tl.store(out_ptr + c, scale, mask=c_ok)
    if BATCH_STATS:
        tl.store(out_ptr + channels + c, -scale * gz / (var_eps * count), mask=c_ok)
        tl.store(out_ptr + 2 * channels + c, -scale * g / count, mask=c_ok)


@triton.jit
def _affine_kernel(gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, channels, out_ptr, ACC: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """BatchNorm as out[0] * z + out[1]: scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    var = tl.load(var_ptr + c, mask=c_ok, other=1.0).to(ACC)
    scale = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(ACC) / tl.sqrt(var + eps)
    shift = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(ACC) - tl.load(mean_ptr + c, mask=c_ok, other=0.0) * scale
    tl.store(out_ptr + c, scale, mask=c_ok)
    tl.store(out_ptr + channels + c, shift, mask=c_ok)


def bn_affine(bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float):
    """(scale, shift) of BatchNorm with statistics (mean, var), in one launch."""
    c = mean.numel()
    out = mean.new_empty((2, c))
    block_c = interpreter_block(c) if interpreted() else 128
    _affine_kernel[(triton.cdiv(c, block_c),)](bn_weight, bn_bias, mean, var, float(eps), c, out,
                                               ACC=TL_DTYPES[mean.dtype], BLOCK_C=block_c)
    return out[0], out[1]


def _reduce_parts(grad_out: torch.Tensor, out: Optional[torch.Tensor], z: torch.Tensor, mean: torch.Tensor,
                  slope: float = 0.0):
    """The reduction launch: (2, splits, C) partial sums of g and g (z - mean)."""
    n, c, h, w = z.shape
    num_pixels = n * h * w
    go, go_strides = pixel_view(grad_out)
    zv, z_strides = pixel_view(z)
    out_t, out_strides = _optional_view(out, (go, go_strides))
    if interpreted():
        splits, chunk = split(num_pixels, 3)
    else:  # about four programs per multiprocessor, each over at least 512 pixels
        splits, chunk = split(num_pixels, min(triton.cdiv(num_pixels, 512),
                                              max(1, 4 * num_sms(z.device) // triton.cdiv(c, 64))))
    part = z.new_empty((2, splits, c), dtype=mean.dtype)
    _reduce_kernel[grid(splits, (c, "BLOCK_C"))](
        part, go, *go_strides, out_t, *out_strides, zv, *z_strides, mean, num_pixels, h * w, c, chunk, float(slope),
        MASK=_mask_code(out, slope))
    return part


def agg_backward_coefficients(grad_out: torch.Tensor, out: Optional[torch.Tensor], z: torch.Tensor,
                              mean: torch.Tensor, var: torch.Tensor, bn_weight: torch.Tensor, eps: float,
                              count: int, batch_stats: bool):
    """(grad gamma, grad beta, scale, z_coef, bias) of the BatchNorm backward in two launches
    (the reduction, the coefficients); z_coef and bias are None without batch statistics. The same
    vectors as ops/_bn.py's composition of agg_backward_reduce, without its per-vector launches."""
    part = _reduce_parts(grad_out, out, z, mean)
    c = z.shape[1]
    grad_gamma, grad_beta = z.new_empty(c, dtype=mean.dtype), z.new_empty(c, dtype=mean.dtype)
    vectors = z.new_empty((3, c), dtype=mean.dtype)
    block_s, block_c = (16, interpreter_block(c)) if interpreted() else (32, 64)
    _coefficients_kernel[(triton.cdiv(c, block_c),)](
        part, part.shape[1], var, bn_weight, float(eps), float(count), c, grad_gamma, grad_beta, vectors,
        BATCH_STATS=batch_stats, ACC=TL_DTYPES[mean.dtype], BLOCK_S=block_s, BLOCK_C=block_c)
    scale, z_coef, bias = vectors
    return grad_gamma, grad_beta, scale, (z_coef if batch_stats else None), (bias if batch_stats else None)


def agg_backward_dz_(z: torch.Tensor, grad_out: torch.Tensor, out: Optional[torch.Tensor], scale: torch.Tensor,
                     z_coef: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     mean: Optional[torch.Tensor], slope: float = 0.0) -> None:
    n, c, h, w = z.shape
    zv, z_strides = pixel_view(z)
    go, go_strides = pixel_view(grad_out)
    out_t, out_strides = _optional_view(out, (go, go_strides))
    has_coef = z_coef is not None
    _dz_kernel[grid((n * h * w, "BLOCK_P"), (c, "BLOCK_C"))](
        zv, *z_strides, go, *go_strides, out_t, *out_strides, scale, z_coef if has_coef else scale,
        bias if has_coef else scale, mean if has_coef else scale, n * h * w, h * w, c, float(slope),
        MASK=_mask_code(out, slope), HAS_COEF=has_coef)
    if zv is not z:
        z.copy_(zv)


def agg_apply(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
              residual: Optional[torch.Tensor], act: int = 1, slope: float = 0.0) -> torch.Tensor:
    """Out of place (the keep-z mode): one launch, z unchanged."""
    out = torch.empty_like(z)
    _apply(z, out, scale, shift, residual, act, slope)
    return out


@tunable(ELEMENTWISE_CONFIGS, key=["num_pixels", "channels", "sz_c"], interpreter=ELEMENTWISE_INTERPRETER)
@triton.jit(do_not_specialize=["num_pixels"])
def _activation_grad_kernel(go_ptr, sg_n, sg_c, sg_p, z_ptr, sz_n, sz_c, sz_p, res_ptr, sr_n, sr_c, sr_p,
                            out_ptr, so_n, so_c, so_p, scale_ptr, shift_ptr, num_pixels, hw, channels, slope,
                            HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """out = grad_out * act'(y), y = z * scale + shift (+ residual) as _apply_kernel forms it."""
    n, p, q_ok, c, c_ok = tile(num_pixels, hw, channels, BLOCK_P, BLOCK_C)
    mask = q_ok[:, None] & c_ok[None, :]
    y = _pre_activation(z_ptr, sz_n, sz_c, sz_p, res_ptr, sr_n, sr_c, sr_p, scale_ptr, shift_ptr, n, p, c, c_ok,
                        mask, HAS_RESIDUAL)
    g = tl.load(go_ptr + offsets(n, p, c, sg_n, sg_c, sg_p), mask=mask, other=0.0).to(y.dtype)
    if ACT == 1:
        g = tl.where(y > 0, g, 0.0)
    elif ACT == 2:
        g = tl.where(y > 0, g, g * slope)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-y))
        g = g * (s * (1.0 + y * (1.0 - s)))
    tl.store(out_ptr + offsets(n, p, c, so_n, so_c, so_p), round_to(g, out_ptr.dtype.element_ty), mask=mask)


def agg_activation_grad(grad_out: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        residual: Optional[torch.Tensor], act: int, slope: float) -> torch.Tensor:
    """grad_out * act'(z * scale + shift (+ residual)), in grad_out's layout: one launch."""
    n, c, h, w = grad_out.shape
    result = torch.empty_like(grad_out)
    go, go_strides = pixel_view(grad_out)
    zv, z_strides = pixel_view(z)
    ov, o_strides = pixel_view(result)
    res, res_strides = _optional_view(residual, (zv, z_strides))
    _activation_grad_kernel[grid((n * h * w, "BLOCK_P"), (c, "BLOCK_C"))](
        go, *go_strides, zv, *z_strides, res, *res_strides, ov, *o_strides, scale, shift, n * h * w, h * w, c,
        float(slope), HAS_RESIDUAL=residual is not None, ACT=act)
    if ov is not result:
        result.copy_(ov)
    return result


def agg_backward_dz(z: torch.Tensor, grad_out: torch.Tensor, out: Optional[torch.Tensor], scale: torch.Tensor,
                    z_coef: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    mean: Optional[torch.Tensor], slope: float = 0.0) -> torch.Tensor:
    """Out of place, as agg_apply: a copy of z, then the in-place kernel."""
    result = z.clone()
    agg_backward_dz_(result, grad_out, out, scale, z_coef, bias, mean, slope)
    return result


# ------------------------------------------------------------------------------------------------
# Backward GEMMs

@triton.jit
def _weight_grad_tile(acc, dz_ptr, sd_n, sd_c, sd_p, x_ptr, sx_n, sx_c, sx_p, co, co_ok, ci, ci_ok, start, end, hw,
                      DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[o, i] += sum over pixels q in [start, end) of dz[q, o] x[q, i] (the pixels are the K)."""
    for q0 in range(start, end, BLOCK_K):
        q = q0 + tl.arange(0, BLOCK_K)
        q_ok = q < end
        n, p = pixel_coords(q, hw)
        d = tl.load(dz_ptr + (co * sd_c)[:, None] + (n * sd_n + p * sd_p)[None, :],
                    mask=co_ok[:, None] & q_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offsets(n, p, ci, sx_n, sx_c, sx_p), mask=q_ok[:, None] & ci_ok[None, :], other=0.0)
        acc += tl.dot(d.to(DOT), x.to(DOT), input_precision=PRECISION)
    return acc


@tunable(WEIGHT_GRAD_CONFIGS, key=["num_pixels", "c_out", "c_in"],
         interpreter=dict(BLOCK_CO="c_out", BLOCK_CI="c_in", BLOCK_K=16),
         dot_tiles=[("BLOCK_CO", "BLOCK_K"), ("BLOCK_K", "BLOCK_CI")])
@triton.jit(do_not_specialize=["num_pixels", "chunk"])
def _weight_grad_kernel(gw_ptr, sgw_o, sgw_i, part_ptr, counters, dz_ptr, sd_n, sd_c, sd_p, children,
                        num_pixels, hw, c_out, c_in, chunk, ACC: tl.constexpr, DOT: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """grad W[o, off_i + k] = sum over pixels of dz[q, o] x_i[q, k] for every child in one launch.
    Program (output block, input block, pixel split); the input blocks run child by child. With
    one split the tile goes straight to grad W (in W's dtype); with more, each split stores an fp32
    partial and the last split of a tile to finish (an atomic count per tile) sums the partials in
    split order (deterministic), stores grad W and zeroes its count again."""
    pid_co = tl.program_id(0)
    pid_ci = tl.program_id(1)
    split_id = tl.program_id(2)
    splits = tl.num_programs(2)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < c_out
    start = split_id * chunk
    end = tl.minimum(start + chunk, num_pixels)
    first_block = 0
    first_col = 0
    for i in tl.static_range(len(children)):  # children: (x, channels, s_n, s_c, s_p) each
        x, c_i, sx_n, sx_c, sx_p = children[i]
        blocks = tl.cdiv(c_i, BLOCK_CI)
        if (pid_ci >= first_block) & (pid_ci < first_block + blocks):
            ci = (pid_ci - first_block) * BLOCK_CI + tl.arange(0, BLOCK_CI)
            ci_ok = ci < c_i
            acc = _weight_grad_tile(tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC), dz_ptr, sd_n, sd_c, sd_p, x,
                                    sx_n, sx_c, sx_p, co, co_ok, ci, ci_ok, start, end, hw, DOT, PRECISION, BLOCK_K)
            cols = first_col + ci
            # (the count is left at zero again: autotuning reruns the launch)
            _store_split_sum(gw_ptr + co[:, None] * sgw_o + cols[None, :] * sgw_i, acc, part_ptr, split_id, splits,
                             c_out * c_in, co[:, None] * c_in + cols[None, :], co_ok[:, None] & ci_ok[None, :],
                             counters + pid_co * tl.num_programs(1) + pid_ci, ACC, BLOCK_CO, BLOCK_CI)
        first_block += blocks
        first_col += c_i


# fp32 weight-gradient partials may take at most this share of the bytes the kernel reads
WEIGHT_GRAD_PARTIALS = 0.05


def _weight_grad_splits(num_pixels: int, c_out: int, children, dz) -> int:
    """Pixel splits of the weight gradient: about two programs per multiprocessor, each over at
    least 256 pixels, with partials under WEIGHT_GRAD_PARTIALS of the bytes read (dz and x)."""
    if interpreted():
        return 2
    c_in = sum(c.shape[1] for c in children)
    tiles = triton.cdiv(c_out, 64) * sum(triton.cdiv(c.shape[1], 64) for c in children)
    read = dz.numel() * dz.element_size() + sum(c.numel() * c.element_size() for c in children)
    budget = int(WEIGHT_GRAD_PARTIALS * read) // (c_out * c_in * 4)
    return max(1, min(triton.cdiv(num_pixels, 256), 2 * num_sms(dz.device) // tiles, budget))


def agg_backward_gemm(dz: torch.Tensor, children: List[torch.Tensor], weight: torch.Tensor,
                      grad_out: Optional[torch.Tensor], out: Optional[torch.Tensor], slope: float = 0.0):
    """(grad of each child, grad W in W's dtype): one dgrad GEMM launch per child (the residual,
    masked by the activation output `out`, in the first one's epilogue), one weight-gradient
    launch for all children."""
    acc = acc_dtype(dz.dtype)
    n, c_out, h, w = dz.shape
    num_pixels = n * h * w
    dzv, dz_strides = pixel_view(dz)
    c_in = weight.shape[1]
    splits, chunk = split(num_pixels, _weight_grad_splits(num_pixels, c_out, children, dz))
    if splits > 1:
        part = dz.new_empty((splits, c_out, c_in), dtype=acc)
        # a count per output tile, for blocks of at least 16 (every config and the interpreter),
        # zeroed by the first dgrad launch
        counters = dz.new_empty(triton.cdiv(c_out, 16) * sum(triton.cdiv(c.shape[1], 16) for c in children),
                                dtype=torch.int32)
    else:
        part = counters = None
    grads, start = [], 0
    for i, child in enumerate(children):
        c_i = child.shape[1]
        grad = empty_like_format(child.shape, child)
        residual = grad_out if i == 0 else None
        _gemm(grad, [dzv], weight[:, start:start + c_i].t(), residual=residual,
              gate=out if residual is not None else None, zero=counters if i == 0 else None, slope=slope)
        grads.append(grad)
        start += c_i
    if part is None:
        part = counters = dz.new_empty(1, dtype=torch.int32)
    dot, precision = dot_types(dz.dtype, children[0].dtype)
    xs = tuple((x, x.shape[1], *strides) for x, strides in map(pixel_view, children))
    grad_weight = dz.new_empty(weight.shape, dtype=weight.dtype)

    def weight_grid(meta):
        return (triton.cdiv(c_out, meta["BLOCK_CO"]), sum(triton.cdiv(c.shape[1], meta["BLOCK_CI"]) for c in children),
                splits)
    _weight_grad_kernel[weight_grid](
        grad_weight, *grad_weight.stride(), part, counters, dzv, *dz_strides, xs, num_pixels, h * w, c_out, c_in,
        chunk, ACC=TL_DTYPES[acc], DOT=dot, PRECISION=precision)
    return grads, grad_weight


# ------------------------------------------------------------------------------------------------
# The fused training path: forward in three launches, backward in two

@triton.jit
def _recomputed_tile(children, z_ptr, sz_n, sz_c, sz_p, w_ptr, sw_o, sw_k, res_ptr, sr_n, sr_c, sr_p,
                     scale, shift, co, co_ok, n, p, q_ok, RECOMPUTE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     STORAGE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """(z, ReLU mask) of a [BLOCK_P, BLOCK_CO] tile: z recomputed from the children (RECOMPUTE:
    _product, rounded to the storage dtype as the forward rounded it) or loaded from the kept z,
    in ACC; the mask out > 0 from the same expression that formed out (_normalize, + residual,
    rounded), so that it is the forward's own mask bit for bit."""
    mask = q_ok[:, None] & co_ok[None, :]
    if RECOMPUTE:
        z = round_to(_product(children, w_ptr, sw_k, co * sw_o, co_ok, n, p, q_ok, ACC, DOT, PRECISION, BLOCK_P,
                              BLOCK_CO, BLOCK_K), STORAGE)
    else:
        z = tl.load(z_ptr + offsets(n, p, co, sz_n, sz_c, sz_p), mask=mask, other=0.0)
    pre = _normalize(z, scale, shift)
    if HAS_RESIDUAL:
        pre += tl.load(res_ptr + offsets(n, p, co, sr_n, sr_c, sr_p), mask=mask, other=0.0).to(ACC)
    return z.to(ACC), round_to(pre, STORAGE) > 0


@triton.jit
def _pixel_tile(t, num_pixels, hw, BLOCK_P: tl.constexpr):
    """(n, p, valid) of pixel tile t: pixels t BLOCK_P ... (t + 1) BLOCK_P - 1."""
    q = t * BLOCK_P + tl.arange(0, BLOCK_P)
    n, p = pixel_coords(q, hw)
    return n, p, q < num_pixels


@triton.jit(do_not_specialize=["num_pixels"])
def _backward_sums_kernel(go_ptr, sg_n, sg_c, sg_p, z_ptr, sz_n, sz_c, sz_p, res_ptr, sr_n, sr_c, sr_p,
                          w_ptr, sw_o, sw_k, children, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, count,
                          part_ptr, counters, vec_ptr, gg_ptr, gb_ptr, num_pixels, hw, c_out,
                          RECOMPUTE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr,
                          DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """The backward's first pass: program (output block j, split s) walks pixel tiles s, s + S, ...
    with z recomputed (or loaded) and the ReLU mask recomputed (_recomputed_tile), summing
    g = grad_out * mask and g (z - mean) into a partial row per split. The last split of block j
    to finish (an atomic count, left at zero again) merges the rows in split order and stores
    grad gamma = sum g (z - mean) / sqrt(var + eps), grad beta = sum g, and for the second pass
    vec = (scale, shift, z_coef, bias): BatchNorm's affine as the forward had it and the dz
    coefficients z_coef = -scale sum g (z - mean) / ((var + eps) count), bias = -scale sum g / count,
    so that dz = scale g + z_coef (z - mean) + bias."""
    pid_co = tl.program_id(0)
    split_id = tl.program_id(1)
    splits = tl.num_programs(1)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < c_out
    mean = tl.load(mean_ptr + co, mask=co_ok, other=0.0)
    var = tl.load(var_ptr + co, mask=co_ok, other=1.0)
    scale, shift = _bn_affine(tl.load(gamma_ptr + co, mask=co_ok, other=0.0),
                              tl.load(beta_ptr + co, mask=co_ok, other=0.0), mean, var, eps)
    sum_g = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC)
    sum_gz = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC)
    for t in range(split_id, tl.cdiv(num_pixels, BLOCK_P), splits):
        n, p, q_ok = _pixel_tile(t, num_pixels, hw, BLOCK_P)
        z, relu_mask = _recomputed_tile(children, z_ptr, sz_n, sz_c, sz_p, w_ptr, sw_o, sw_k, res_ptr, sr_n, sr_c,
                                        sr_p, scale, shift, co, co_ok, n, p, q_ok, RECOMPUTE, HAS_RESIDUAL,
                                        go_ptr.dtype.element_ty, ACC, DOT, PRECISION, BLOCK_P, BLOCK_CO, BLOCK_K)
        g = tl.load(go_ptr + offsets(n, p, co, sg_n, sg_c, sg_p), mask=q_ok[:, None] & co_ok[None, :], other=0.0)
        g = tl.where(relu_mask, g.to(ACC), 0.0)
        sum_g += g
        sum_gz += g * (z - mean[None, :])
    tl.store(part_ptr + split_id * c_out + co, tl.sum(sum_g, axis=0), mask=co_ok)
    tl.store(part_ptr + (splits + split_id) * c_out + co, tl.sum(sum_gz, axis=0), mask=co_ok)
    tl.debug_barrier()  # every thread's stores before the count (acq_rel atomic)
    if tl.atomic_add(counters + pid_co, 1) == splits - 1:
        _backward_vectors(part_ptr, splits, co, co_ok, c_out, var, eps, count, scale, shift, gg_ptr, gb_ptr, vec_ptr,
                          ACC, BLOCK_S, BLOCK_CO)
        tl.atomic_xchg(counters + pid_co, 0)  # clean for the next launch


@triton.jit
def _backward_vectors(part_ptr, rows_total, c, c_ok, channels, var, eps, count, scale, shift, gg_ptr, gb_ptr,
                      vec_ptr, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The BatchNorm backward's per-channel vectors from the partial rows part[0, r] (sums of g) and
    part[1, r] (sums of g (z - mean)), r < rows_total, merged in row order: grad gamma, grad beta,
    and vec = (scale, shift, z_coef, bias) with z_coef = -scale sum g (z - mean) / ((var + eps)
    count), bias = -scale sum g / count. Loads bypass L1 (.cg): rows of other programs."""
    rows_g = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC)
    rows_gz = tl.zeros((BLOCK_S, BLOCK_C), dtype=ACC)
    for s0 in range(0, rows_total, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        ok = (rows < rows_total)[:, None] & c_ok[None, :]
        rows_g += tl.load(part_ptr + rows[:, None] * channels + c[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        rows_gz += tl.load(part_ptr + (rows_total + rows)[:, None] * channels + c[None, :], mask=ok, other=0.0,
                           cache_modifier=".cg")
    total_g = tl.sum(rows_g, axis=0)
    total_gz = tl.sum(rows_gz, axis=0)
    var_eps = var + eps
    tl.store(gg_ptr + c, total_gz / tl.sqrt(var_eps), mask=c_ok)
    tl.store(gb_ptr + c, total_g, mask=c_ok)
    tl.store(vec_ptr + c, scale, mask=c_ok)
    tl.store(vec_ptr + channels + c, shift, mask=c_ok)
    tl.store(vec_ptr + 2 * channels + c, -scale * total_gz / (var_eps * count), mask=c_ok)
    tl.store(vec_ptr + 3 * channels + c, -scale * total_g / count, mask=c_ok)


@triton.jit
def _store_split_sum(gw, acc, part_ptr, split_id, splits, plane, tile_offsets, mask, count_ptr,
                     ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Store a [BLOCK_A, BLOCK_B] tile summed over `splits` programs: with one split, acc itself
    (in gw's dtype); with more, each split stores acc as an fp32 partial (part[split] of `plane`
    values), and the last split to finish (the atomic count at count_ptr, left at zero again) sums
    the partials in split order (deterministic) and stores the sum."""
    if splits == 1:
        tl.store(gw, acc.to(gw.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + split_id * plane + tile_offsets, acc, mask=mask)
        tl.debug_barrier()  # every thread's stores before the count (acq_rel atomic)
        if tl.atomic_add(count_ptr, 1) == splits - 1:
            total = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
            for s in range(0, splits):
                total += tl.load(part_ptr + s * plane + tile_offsets, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(gw, total.to(gw.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr, 0)  # clean for the next launch


@triton.jit(do_not_specialize=["num_pixels"])
def _backward_chained_kernel(go_ptr, sg_n, sg_c, sg_p, z_ptr, sz_n, sz_c, sz_p, res_ptr, sr_n, sr_c, sr_p,
                             w_ptr, sw_o, sw_k, children, grads, vec_ptr, mean_ptr, gw_ptr, sgw_o, sgw_i,
                             part_ptr, counters, num_pixels, hw, c_out, c_in,
                             RECOMPUTE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MASK: tl.constexpr,
                             ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
                             BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr):
    """The backward's second pass, both GEMMs chained: program (input block b over all children,
    split s) walks pixel tiles s, s + S, ...; per tile it forms dz for every output channel in
    registers (z and the ReLU mask from _recomputed_tile, g from grad_out, the coefficients of the
    first pass), stores its block of grad x = W^T dz (+ g for the residual child's block, through
    a one-hot product: exact) and accumulates its block of grad W = dz^T x over the tiles. With one
    split the block goes straight to grad W (in W's dtype); with more, each split stores an fp32
    partial and the last split to finish (an atomic count per block, left at zero again) sums them
    in split order. Needs BLOCK_CO >= c_out. The children's tuple is walked once per tile for the
    product and once for the block's own child (code size linear in the number of children).
    MASK False: grad_out is already masked (the IDA-Up step's gradient of p)."""
    pid_ci = tl.program_id(0)
    split_id = tl.program_id(1)
    splits = tl.num_programs(1)
    co = tl.arange(0, BLOCK_CO)
    co_ok = co < c_out
    scale = tl.load(vec_ptr + co, mask=co_ok, other=0.0)
    shift = tl.load(vec_ptr + c_out + co, mask=co_ok, other=0.0)
    z_coef = tl.load(vec_ptr + 2 * c_out + co, mask=co_ok, other=0.0)
    bias = tl.load(vec_ptr + 3 * c_out + co, mask=co_ok, other=0.0)
    mean = tl.load(mean_ptr + co, mask=co_ok, other=0.0)
    storage = go_ptr.dtype.element_ty
    # which child this input block belongs to, its first column in W and its channel count
    child = 0
    local = pid_ci
    first_col = 0
    channels = 0
    first_block = 0
    col = 0
    for i in tl.static_range(len(children)):  # children: (x, channels, s_n, s_c, s_p) each
        c_i = children[i][1]
        blocks = tl.cdiv(c_i, BLOCK_CI)
        if (pid_ci >= first_block) & (pid_ci < first_block + blocks):
            child = i
            local = pid_ci - first_block
            first_col = col
            channels = c_i
        first_block += blocks
        col += c_i
    ci = local * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < channels
    cols = first_col + ci
    w_block = tl.load(w_ptr + co[:, None] * sw_o + cols[None, :] * sw_k, mask=co_ok[:, None] & ci_ok[None, :],
                      other=0.0).to(DOT)
    acc_w = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC)
    for t in range(split_id, tl.cdiv(num_pixels, BLOCK_P), splits):
        n, p, q_ok = _pixel_tile(t, num_pixels, hw, BLOCK_P)
        z, relu_mask = _recomputed_tile(children, z_ptr, sz_n, sz_c, sz_p, w_ptr, sw_o, sw_k, res_ptr, sr_n, sr_c,
                                        sr_p, scale, shift, co, co_ok, n, p, q_ok, RECOMPUTE, HAS_RESIDUAL, storage,
                                        ACC, DOT, PRECISION, BLOCK_P, BLOCK_CO, BLOCK_K)
        g = tl.load(go_ptr + offsets(n, p, co, sg_n, sg_c, sg_p), mask=q_ok[:, None] & co_ok[None, :], other=0.0)
        if MASK:
            g = tl.where(relu_mask, g, 0.0)
        dz = g.to(ACC) * scale[None, :] + z_coef[None, :] * (z - mean[None, :]) + bias[None, :]
        # dz in the activations' dtype, as the unfused path stores it; rows past the end are zero
        dz = tl.where(q_ok[:, None], round_to(dz, storage), 0.0).to(DOT)
        dx = tl.dot(dz, w_block, input_precision=PRECISION).to(ACC)
        if HAS_RESIDUAL:
            if child == 0:  # the residual's gradient: g at this block's channels
                one_hot = tl.where(co[:, None] == ci[None, :], 1.0, 0.0).to(DOT)
                dx += tl.dot(g.to(DOT), one_hot, input_precision=PRECISION).to(ACC)
        x_mask = q_ok[:, None] & ci_ok[None, :]
        x = tl.zeros((BLOCK_P, BLOCK_CI), dtype=storage)
        for i in tl.static_range(len(children)):  # predicated, not branched: only child `child` moves data
            x_ptr, _, sx_n, sx_c, sx_p = children[i]
            gx_ptr, sd_n, sd_c, sd_p = grads[i]
            mine = x_mask & (child == i)
            tl.store(gx_ptr + offsets(n, p, ci, sd_n, sd_c, sd_p), round_to(dx, gx_ptr.dtype.element_ty), mask=mine)
            x += tl.load(x_ptr + offsets(n, p, ci, sx_n, sx_c, sx_p), mask=mine, other=0.0)
        acc_w += tl.dot(tl.trans(dz), x.to(DOT), input_precision=PRECISION)
    _store_split_sum(gw_ptr + co[:, None] * sgw_o + cols[None, :] * sgw_i, acc_w, part_ptr, split_id, splits,
                     c_out * c_in, co[:, None] * c_in + cols[None, :], co_ok[:, None] & ci_ok[None, :],
                     counters + pid_ci, ACC, BLOCK_CO, BLOCK_CI)


_COUNTERS = {}


def _counters(device, size: int) -> torch.Tensor:
    """int32 zeros for the atomic counts of the fused backward kernels, one buffer per device and
    stream, reused: every kernel leaves its counts at zero again, so only the first call (or a
    larger one) allocates (and fills)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = _COUNTERS[key] = torch.zeros(max(size, 256), dtype=torch.int32, device=device)
    return buffer


def agg_forward_train(children: List[torch.Tensor], weight: torch.Tensor, bn_weight: torch.Tensor,
                      bn_bias: torch.Tensor, eps: float, residual: bool, keep_z: bool, running=None):
    """The training forward relu(bn(W x) (+ x_0)) in three launches: the product's statistics
    (z stored only when keep_z), the parallel finalize (BatchNorm's scale and shift; with
    `running` = (running_mean, running_var, num_batches_tracked or None, momentum or None) also
    the running statistics' update), then the output: from the kept z (one elementwise pass) or
    from the product recomputed in the GEMM's epilogue. Returns (out, mean, var, z or None)."""
    first = children[0]
    shape = (first.shape[0], weight.shape[0], first.shape[2], first.shape[3])
    res = first if residual else None
    tile = product_tile(*weight.shape)
    if keep_z:
        z = empty_like_format(shape, first)
        mean, var, scale, shift = _gemm(z, children, weight, stats=True, affine=(bn_weight, bn_bias, float(eps)),
                                        running=running, tile=tile)
        out = torch.empty_like(z)
        _apply(z, out, scale, shift, res)
        return out, mean, var, z
    shape_only = first.new_empty(1).expand(shape)
    mean, var, scale, shift = _gemm(shape_only, children, weight, stats=True, store=False,
                                    affine=(bn_weight, bn_bias, float(eps)), running=running, tile=tile)
    out = empty_like_format(shape, first)
    _gemm(out, children, weight, shift=shift, residual=res, act=1, scale=scale, tile=tile)
    return out, mean, var, None


# fp32 weight-gradient partials of the chained backward may take at most this share of the bytes it reads
CHAINED_PARTIALS = WEIGHT_GRAD_PARTIALS
# FLOPs per byte at the ridge point of an H100/H200-class GPU in 16-bit (~989 TFLOP/s over
# ~4.3 TB/s): the chained backward recomputes z from the children it reads anyway, instead of
# reading the kept z, while its FLOPs per byte stay under this (benchmarks/roofline.py's model;
# untested on a GPU). None: that rule; True or False forces the choice (tests).
RIDGE_FLOP_PER_BYTE = 230
CHAINED_RECOMPUTE = None


def _chained_recomputes(grad_out, children, c_in: int, ci_blocks: int) -> bool:
    """Whether the chained backward recomputes z when z was kept: one product per input block
    plus the two GEMMs, over the bytes it then moves (grad_out, the children, grad x)."""
    if CHAINED_RECOMPUTE is not None:
        return CHAINED_RECOMPUTE
    if grad_out.dtype not in (torch.float16, torch.bfloat16):  # no 16-bit tensor-core rate
        return False
    n, c_out, h, w = grad_out.shape
    gemm = 2 * n * h * w * c_in * c_out
    moved = grad_out.numel() * grad_out.element_size() + 2 * sum(x.numel() * x.element_size() for x in children)
    return (2 + ci_blocks) * gemm <= RIDGE_FLOP_PER_BYTE * moved


def _chained_blocks(c_out: int, c_in: int):
    """(BLOCK_P, BLOCK_CO, BLOCK_CI, num_warps) of the chained backward: every output channel in
    one block, about 8k fp32 values per [BLOCK_P, BLOCK_CO] tile."""
    if interpreted():
        tile = product_tile(c_out, c_in)
        return tile["BLOCK_P"], tile["BLOCK_CO"], interpreter_block(c_in), 4
    block_co = max(16, triton.next_power_of_2(c_out))
    block_p = max(16, min(64, 8192 // block_co))
    return block_p, block_co, (16 if block_co >= 256 else 32), (8 if block_co >= 256 else 4)


def agg_backward_fused(grad_out: torch.Tensor, children: List[torch.Tensor], weight: torch.Tensor,
                       bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                       eps: float, residual: bool, z: Optional[torch.Tensor]):
    """The training backward (batch statistics) in two launches: the sums pass (z recomputed
    when `z` is None, else read; the ReLU mask recomputed from it), which ends in every
    per-channel vector, then the chained pass: dz in registers, grad x and grad W from it, with
    z recomputed from the children it reads anyway when `z` is None or while that stays under the
    ridge point (_chained_recomputes), else read.
    Returns (grad of each child, grad W (2-D, W's dtype), grad gamma, grad beta)."""
    acc = acc_dtype(grad_out.dtype)
    n, c_out, h, w = grad_out.shape
    num_pixels = n * h * w
    go, go_strides = pixel_view(grad_out)
    zv, z_strides = pixel_view(z) if z is not None else (go, go_strides)
    res, res_strides = pixel_view(children[0]) if residual else (go, go_strides)
    xs = tuple((x, x.shape[1], *strides) for x, strides in map(pixel_view, children))
    dot, precision = dot_types(children[0].dtype, weight.dtype)
    # pass 1: sums, then the vectors; program (output block, split) over about two programs per
    # multiprocessor
    tile = product_tile(c_out, weight.shape[1])
    block_p, block_co = (tile["BLOCK_P"], tile["BLOCK_CO"]) if tile else (64, 64)
    co_blocks = triton.cdiv(c_out, block_co)
    tiles = triton.cdiv(num_pixels, block_p)
    splits = min(tiles, 3) if interpreted() else max(1, min(tiles, 2 * num_sms(grad_out.device) // co_blocks))
    part = grad_out.new_empty((2, splits, c_out), dtype=acc)
    vectors = grad_out.new_empty((4, c_out), dtype=acc)
    grad_gamma, grad_beta = grad_out.new_empty(c_out, dtype=acc), grad_out.new_empty(c_out, dtype=acc)
    _backward_sums_kernel[(co_blocks, splits)](
        go, *go_strides, zv, *z_strides, res, *res_strides, weight, *weight.stride(), xs, mean, var, bn_weight,
        bn_bias, float(eps), float(num_pixels), part, _counters(grad_out.device, co_blocks), vectors, grad_gamma,
        grad_beta, num_pixels, h * w, c_out, RECOMPUTE=z is None, HAS_RESIDUAL=residual, ACC=TL_DTYPES[acc],
        DOT=dot, PRECISION=precision, BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_K=block_k_of(weight.shape[1]),
        BLOCK_S=16 if interpreted() else 32, num_warps=4)

    grads, grad_weight = _chained_backward(grad_out, children, weight, vectors, mean, z, residual)
    return grads, grad_weight, grad_gamma, grad_beta


def _chained_backward(grad_out, children, weight, vectors, mean, z, residual, mask=True):
    """The chained pass (_backward_chained_kernel): (grad of each child, grad W in W's dtype)
    from the first pass's vectors (scale, shift, z_coef, bias); z recomputed when `z` is None or
    _chained_recomputes says so, else read."""
    acc = acc_dtype(grad_out.dtype)
    n, c_out, h, w = grad_out.shape
    num_pixels = n * h * w
    c_in = weight.shape[1]
    go, go_strides = pixel_view(grad_out)
    zv, z_strides = pixel_view(z) if z is not None else (go, go_strides)
    res, res_strides = pixel_view(children[0]) if residual else (go, go_strides)
    xs = tuple((x, x.shape[1], *strides) for x, strides in map(pixel_view, children))
    dot, precision = dot_types(children[0].dtype, weight.dtype)
    block_p, block_co, block_ci, warps = _chained_blocks(c_out, c_in)
    ci_blocks = sum(triton.cdiv(x.shape[1], block_ci) for x in children)
    tiles = triton.cdiv(num_pixels, block_p)
    if interpreted():
        splits = min(tiles, 2)
    else:  # about one (large) program per multiprocessor, partials under CHAINED_PARTIALS of the bytes read
        read = sum(x.numel() * x.element_size() for x in children) + 2 * grad_out.numel() * grad_out.element_size()
        budget = int(CHAINED_PARTIALS * read) // (c_out * c_in * 4)
        splits = max(1, min(tiles, triton.cdiv(num_sms(grad_out.device), ci_blocks), budget))
    counters = _counters(grad_out.device, ci_blocks)
    grads = [empty_like_format(x.shape, x) for x in children]
    gx = tuple((g, *strides) for g, strides in map(pixel_view, grads))
    grad_weight = grad_out.new_empty(weight.shape, dtype=weight.dtype)
    part = grad_out.new_empty((splits, c_out, c_in), dtype=acc) if splits > 1 else counters
    recompute = z is None or _chained_recomputes(grad_out, children, c_in, ci_blocks)
    _backward_chained_kernel[(ci_blocks, splits)](
        go, *go_strides, zv, *z_strides, res, *res_strides, weight, *weight.stride(), xs, gx, vectors, mean,
        grad_weight, *grad_weight.stride(), part, counters, num_pixels, h * w, c_out, c_in,
        RECOMPUTE=recompute, HAS_RESIDUAL=residual, MASK=mask, ACC=TL_DTYPES[acc], DOT=dot, PRECISION=precision,
        BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_K=block_k_of(c_in), num_warps=warps)
    for g, (view, *_) in zip(grads, gx):
        if view is not g:
            g.copy_(view)
    return grads, grad_weight


def block_k_of(c_in: int) -> int:
    """The K chunk of every product over c_in input channels (GEMM_INTERPRETER's under the interpreter)."""
    return interpreter_block(c_in) if interpreted() else PRODUCT_K


def product_tile(c_out: int, c_in: int) -> dict:
    """Under the interpreter, the block sizes of every product of a training step's z: the
    forward GEMMs, the backward's sums pass and chained pass (and the IDA-Up step's fused
    backward) all take the chained pass's tile, every output channel at once, so that a z
    recomputed in backward is the same NumPy products of the same data as the forward's z, hence
    its bits whatever BLAS kernel the CPU picks (docs/design.md, section 2). Empty on a GPU, where
    the forward's blocks are tuned: there recomputed z is only within the bound of section 2."""
    if not interpreted():
        return {}
    return dict(BLOCK_P=16, BLOCK_CO=max(16, triton.next_power_of_2(c_out)), BLOCK_K=block_k_of(c_in))
