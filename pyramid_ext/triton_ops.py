"""Triton kernels and the ``pyramid_ext::*_triton`` custom ops.

The ops have the same schemas and semantics as the compiled ops declared in
csrc/ops.cpp (see docs/DESIGN.md); their fake kernels and autograd come from
pyramid_ext/_ops.py. Kernels run on CUDA tensors, and on CPU tensors when
Triton's interpreter is on (``TRITON_INTERPRET=1`` set before Triton is
imported).

Pooling (one pass over x): the union of all window boundaries cuts each axis
into segments (host-side tables, cached); kernel 1 reduces every segment cell
that some bin reads exactly once (sum, or max value + flat index); kernel 2
combines cells into the windows of every level and writes the packed output.
Backward is a gather with no atomics: avg computes each cell's gradient once
(the sum of grad / area over the bins covering it, in level order) and
expands it to the cell's pixels; max compares each pixel's flat index with
the saved indices of the bins covering its cell.

Upsample + concat: one launch per part (x copied, each branch bilinearly
resized with ATen's taps) writing its channel range of ``out`` through out's
strides. Taps are computed in the kernels exactly as ATen's
upsample_bilinear2d (csrc/pyramid_index.h, bilinear_tap), with IEEE division
and no fma contraction. Backward: for each branch element, a gather over the
contiguous ranges of output rows / columns whose taps read it (found by
counting the output coordinates whose taps lie before it: taps are monotone),
no atomics, so the result is bitwise deterministic. A 1x1 branch is one
program per (sample, channel block) reducing the whole grad plane.

Block sizes keep each program's tile at about _TILE elements.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _ops
from .reference import POOL_AVG, POOL_MAX
from .windows import level_shapes

# Triton decides at decoration time whether @triton.jit functions are
# interpreted, so what matters is the variable's value when this module loads.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_BIG_INDEX = tl.constexpr(1 << 62)


def _device_fn(fn):
    """@triton.jit for helpers called from kernels. Under the interpreter a
    @triton.jit helper re-patches triton.language on every call (about a
    millisecond each); there the helper runs as the plain Python function it
    is, on the interpreter's tensors, with the same arithmetic."""
    return fn if INTERPRETED else triton.jit(fn)


# --------------------------------------------------------------------------
# Small helpers (device code)
# --------------------------------------------------------------------------


if INTERPRETED:

    def _cast_out(v, dtype):
        """v (fp32/fp64) in the output dtype, rounded to nearest even. The
        interpreter truncates fp32 -> bfloat16, so round the bits here, as
        c10::BFloat16 (and the GPU's cvt.rn) does; NaN stays a quiet NaN."""
        if dtype == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(v != v, 0x7FC0, bits)
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return v.to(dtype)

else:

    @triton.jit
    def _cast_out(v, dtype: tl.constexpr):
        return v.to(dtype)  # round to nearest even



@_device_fn
def _div(a, b, ACC_FP64: tl.constexpr):
    # IEEE-rounded division: Triton's `/` on fp32 is approximate on GPUs.
    if ACC_FP64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@_device_fn
def _bilinear_scale(in_size, out_size, ALIGN: tl.constexpr, ACC: tl.constexpr, ACC_FP64: tl.constexpr):
    """ATen's area_pixel_compute_scale (no scale_factor given)."""
    if ALIGN:
        num = (in_size - 1).to(ACC)
        den = tl.maximum(out_size - 1, 1).to(ACC)
        scale = _div(num, den, ACC_FP64)
        scale = tl.where(out_size > 1, scale, 0.0)
    else:
        scale = _div(in_size.to(ACC), out_size.to(ACC), ACC_FP64)
    return scale


@_device_fn
def _bilinear_tap(dst, in_size, out_size, scale, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """(i0, i1, w0, w1) for output coordinate(s) `dst` (int64), as
    bilinear_tap in csrc/pyramid_index.h / ATen's compute_source_index_and_lambda."""
    dst = tl.cast(dst, tl.int64)  # also a loop counter (a plain int under the interpreter)
    dst_f = dst.to(ACC)
    if ALIGN:
        src = scale * dst_f
    else:
        src = scale * (dst_f + 0.5) - 0.5
        src = tl.where(src < 0.0, 0.0, src)
    i0 = tl.floor(src).to(tl.int64)
    i0 = tl.minimum(i0, in_size - 1)
    lam = src - i0.to(ACC)
    lam = tl.where(lam < 0.0, 0.0, tl.where(lam > 1.0, 1.0, lam))
    i1 = i0 + tl.where(i0 < in_size - 1, 1, 0).to(tl.int64)
    w0 = 1.0 - lam
    same = in_size == out_size  # ATen: sizes match -> index = dst, weights (1, 0)
    i0 = tl.where(same, dst, i0)
    i1 = tl.where(same, dst, i1)
    w0 = tl.where(same, 1.0, w0)
    w1 = tl.where(same, 0.0, lam)
    return i0, i1, w0, w1


@_device_fn
def _reader_counts(src, d, dmask, in_size, out_size, scale, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """For source coordinate(s) `src` (shape S, broadcast against the output
    coordinates `d`, shape S x D or D), how many of the `d` have i1 < src and
    how many have i0 <= src. Summed over every d, these are the first reader
    and one past the last reader of src (taps are monotone in d)."""
    i0, i1, _w0, _w1 = _bilinear_tap(d, in_size, out_size, scale, ALIGN, ACC)
    before = tl.where(dmask & (i1 < src), 1, 0).to(tl.int64)
    upto = tl.where(dmask & (i0 <= src), 1, 0).to(tl.int64)
    return before, upto


@_device_fn
def _max_combine(val, idx, oval, oidx):
    """max_pool_combine of the header, elementwise: NaN wins (the later NaN
    among NaNs), else the larger value (the earlier index among equals)."""
    nan = val != val
    onan = oval != oval
    take_nan = onan & ((~nan) | (oidx > idx))
    take_num = (oval > val) | ((oval == val) & (oidx < idx))
    take = tl.where(nan | onan, take_nan, take_num)
    return tl.where(take, oval, val), tl.where(take, oidx, idx)


# --------------------------------------------------------------------------
# Pooling kernels
# --------------------------------------------------------------------------


@_device_fn
def _max_reduce(v, idx, m, AXIS: tl.constexpr):
    """(value, flat index) of one row-major scan over the masked elements,
    reduced along AXIS: the last NaN if any, else the max at its first index."""
    isnan = (v != v) & m
    nan_idx = tl.max(tl.where(isnan, idx, -1), axis=AXIS)
    clean = tl.where(isnan | (~m), float("-inf"), v)
    vmax = tl.max(clean, axis=AXIS)
    hit = m & (~isnan) & (clean == tl.expand_dims(vmax, AXIS))
    max_idx = tl.min(tl.where(hit, idx, _BIG_INDEX), axis=AXIS)
    has_nan = nan_idx >= 0
    return tl.where(has_nan, float("nan"), vmax), tl.where(has_nan, nan_idx, max_idx)


@triton.jit
def _pool_cells_kernel(
    x_ptr, cell_tab_ptr, cell_val_ptr, cell_idx_ptr,
    C, W, num_cells, num_needed, num_cblocks, num_sblocks,
    sxn, sxc, sxh, sxw,
    MODE: tl.constexpr, ACC: tl.constexpr, RUN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Reduces BLOCK_S segment cells (rows [h0, h1) x cols [w0, w1) each) of
    one sample for a block of channels, each exactly once: the sum (avg, into
    fp64 cells) or the max and its flat index h * W + w (max). Tile: channel
    x cell x element."""
    pid = tl.program_id(0).to(tl.int64)
    sb = pid % num_sblocks
    rest = pid // num_sblocks
    cb = rest % num_cblocks
    n = rest // num_cblocks

    k = sb * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    kmask = k < num_needed
    h0 = tl.load(cell_tab_ptr + k * 5 + 0, mask=kmask, other=0)
    h1 = tl.load(cell_tab_ptr + k * 5 + 1, mask=kmask, other=0)
    w0 = tl.load(cell_tab_ptr + k * 5 + 2, mask=kmask, other=0)
    w1 = tl.load(cell_tab_ptr + k * 5 + 3, mask=kmask, other=1)
    cell = tl.load(cell_tab_ptr + k * 5 + 4, mask=kmask, other=0)
    cw = w1 - w0
    area = (h1 - h0) * cw
    max_area = tl.max(area, axis=0)

    c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    c3 = c[:, None, None]
    e_range = tl.arange(0, BLOCK_E).to(tl.int64)
    base = x_ptr + n * sxn + c3 * sxc
    out_off = (n * num_cells + cell[None, :]) * C + c[:, None]
    out_mask = cmask[:, None] & kmask[None, :]

    if MODE == 0:
        # Each lane sums runs of RUN elements in ACC, adds them in fp64; the
        # lanes, cells and bins are combined in fp64 (the error bound in
        # csrc/cpu/simd_loops.h: at most RUN - 1 float additions per element).
        total = tl.zeros([BLOCK_C, BLOCK_S, BLOCK_E], dtype=tl.float64)
        for e1 in range(0, max_area, BLOCK_E * RUN):
            acc = tl.zeros([BLOCK_C, BLOCK_S, BLOCK_E], dtype=ACC)
            for e0 in range(e1, tl.minimum(e1 + BLOCK_E * RUN, max_area), BLOCK_E):
                e = e0 + e_range[None, :]
                h = h0[:, None] + e // cw[:, None]
                w = w0[:, None] + e % cw[:, None]
                m = cmask[:, None, None] & (e < area[:, None])[None, :, :]
                v = tl.load(base + (h * sxh + w * sxw)[None, :, :], mask=m, other=0.0)
                acc += v.to(ACC)
            total += acc.to(tl.float64)
        tl.store(cell_val_ptr + out_off, tl.sum(total, axis=2), mask=out_mask)
    else:
        run_v = tl.full([BLOCK_C, BLOCK_S], float("-inf"), ACC)
        run_i = tl.full([BLOCK_C, BLOCK_S], _BIG_INDEX, tl.int64)
        for e0 in range(0, max_area, BLOCK_E):
            e = e0 + e_range[None, :]
            h = h0[:, None] + e // cw[:, None]
            w = w0[:, None] + e % cw[:, None]
            m = cmask[:, None, None] & (e < area[:, None])[None, :, :]
            v = tl.load(base + (h * sxh + w * sxw)[None, :, :], mask=m, other=float("-inf")).to(ACC)
            flat = (h * W + w)[None, :, :] + tl.zeros([BLOCK_C, BLOCK_S, BLOCK_E], dtype=tl.int64)
            cv, ci = _max_reduce(v, flat, m, 2)
            run_v, run_i = _max_combine(run_v, run_i, cv, ci)
        tl.store(cell_val_ptr + out_off, run_v, mask=out_mask)
        tl.store(cell_idx_ptr + out_off, run_i, mask=out_mask)


@_device_fn
def _bin_out_offset(n, c, C, T, prior, pos, bhbw, CL_LEVELS: tl.constexpr):
    """packed_index of the header (c: BLOCK_C x 1, bin columns: 1 x BLOCK_T)."""
    if CL_LEVELS:
        return n * C * T + C * prior + pos * C + c
    else:
        return n * C * T + C * prior + c * bhbw + pos


@triton.jit
def _pool_bins_kernel(
    cell_val_ptr, cell_idx_ptr, bin_tab_ptr, val_ptr, idx_ptr,
    C, T, SW, num_cells, num_cblocks, num_tblocks,
    MODE: tl.constexpr, CL_LEVELS: tl.constexpr, ACC: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Combines the cells of BLOCK_T bins (windows) into their packed
    outputs. Tile: channel x bin x cell of the bin."""
    pid = tl.program_id(0).to(tl.int64)
    tb = pid % num_tblocks
    rest = pid // num_tblocks
    cb = rest % num_cblocks
    n = rest // num_cblocks

    t = tb * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    tmask = t < T
    hsb = tl.load(bin_tab_ptr + t * 8 + 0, mask=tmask, other=0)
    hse = tl.load(bin_tab_ptr + t * 8 + 1, mask=tmask, other=0)
    wsb = tl.load(bin_tab_ptr + t * 8 + 2, mask=tmask, other=0)
    wse = tl.load(bin_tab_ptr + t * 8 + 3, mask=tmask, other=1)
    area = tl.load(bin_tab_ptr + t * 8 + 4, mask=tmask, other=1)
    prior = tl.load(bin_tab_ptr + t * 8 + 5, mask=tmask, other=0)
    pos = tl.load(bin_tab_ptr + t * 8 + 6, mask=tmask, other=0)
    bhbw = tl.load(bin_tab_ptr + t * 8 + 7, mask=tmask, other=1)
    nb = wse - wsb
    ncell = (hse - hsb) * nb
    max_ncell = tl.max(ncell, axis=0)

    c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    k_range = tl.arange(0, BLOCK_K).to(tl.int64)
    cell_base = (n * num_cells) * C + c[:, None, None]
    out_off = _bin_out_offset(n, c[:, None], C, T, prior[None, :], pos[None, :], bhbw[None, :], CL_LEVELS)
    out_mask = cmask[:, None] & tmask[None, :]

    if MODE == 0:  # fp64 cells, fp64 sums, the mean rounded to ACC, then to the output dtype
        acc = tl.zeros([BLOCK_C, BLOCK_T, BLOCK_K], dtype=tl.float64)
        for k0 in range(0, max_ncell, BLOCK_K):
            k = k0 + k_range[None, :]
            cid = (hsb[:, None] + k // nb[:, None]) * SW + wsb[:, None] + k % nb[:, None]
            m = cmask[:, None, None] & (k < ncell[:, None])[None, :, :]
            acc += tl.load(cell_val_ptr + cell_base + cid[None, :, :] * C, mask=m, other=0.0)
        res = _div(tl.sum(acc, axis=2), area[None, :].to(tl.float64), True).to(ACC)
        tl.store(val_ptr + out_off, _cast_out(res, val_ptr.dtype.element_ty), mask=out_mask)
    else:
        run_v = tl.full([BLOCK_C, BLOCK_T], float("-inf"), ACC)
        run_i = tl.full([BLOCK_C, BLOCK_T], _BIG_INDEX, tl.int64)
        for k0 in range(0, max_ncell, BLOCK_K):
            k = k0 + k_range[None, :]
            cid = (hsb[:, None] + k // nb[:, None]) * SW + wsb[:, None] + k % nb[:, None]
            m = cmask[:, None, None] & (k < ncell[:, None])[None, :, :]
            off = cell_base + cid[None, :, :] * C
            v = tl.load(cell_val_ptr + off, mask=m, other=float("-inf"))
            i = tl.load(cell_idx_ptr + off, mask=m, other=_BIG_INDEX)
            cv, ci = _max_reduce(v, i, m, 2)
            run_v, run_i = _max_combine(run_v, run_i, cv, ci)
        tl.store(val_ptr + out_off, _cast_out(run_v, val_ptr.dtype.element_ty), mask=out_mask)
        tl.store(idx_ptr + out_off, run_i, mask=out_mask)


@triton.jit
def _pool_bwd_cells_kernel(
    grad_ptr, bin_tab_ptr, cell_list_ptr, cell_ptr_ptr, cell_bins_ptr, cell_grad_ptr,
    C, T, num_cells, num_needed, num_cblocks, num_sblocks, max_cover,
    CL_LEVELS: tl.constexpr, ACC: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """avg backward, for BLOCK_S needed cells: the sum over the bins covering
    each cell (level order) of grad / area, computed once per cell."""
    pid = tl.program_id(0).to(tl.int64)
    sb = pid % num_sblocks
    rest = pid // num_sblocks
    cb = rest % num_cblocks
    n = rest // num_cblocks

    k = sb * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    kmask = k < num_needed
    cell = tl.load(cell_list_ptr + k, mask=kmask, other=0)
    start = tl.load(cell_ptr_ptr + cell, mask=kmask, other=0)
    count = tl.load(cell_ptr_ptr + cell + 1, mask=kmask, other=0) - start
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for q in range(0, max_cover):
        has = kmask & (q < count)
        t = tl.load(cell_bins_ptr + start + q, mask=has, other=0)
        area = tl.load(bin_tab_ptr + t * 8 + 4, mask=has, other=1)
        prior = tl.load(bin_tab_ptr + t * 8 + 5, mask=has, other=0)
        pos = tl.load(bin_tab_ptr + t * 8 + 6, mask=has, other=0)
        bhbw = tl.load(bin_tab_ptr + t * 8 + 7, mask=has, other=1)
        off = _bin_out_offset(n, c[:, None], C, T, prior[None, :], pos[None, :], bhbw[None, :], CL_LEVELS)
        m = cmask[:, None] & has[None, :]
        g = tl.load(grad_ptr + off, mask=m, other=0.0).to(ACC)
        acc += tl.where(m, _div(g, area[None, :].to(ACC), ACC_FP64), 0.0)
    tl.store(cell_grad_ptr + (n * num_cells + cell[None, :]) * C + c[:, None], acc,
             mask=cmask[:, None] & kmask[None, :])


@triton.jit
def _pool_bwd_pixels_kernel(
    grad_ptr, idx_ptr, cell_grad_ptr, bin_tab_ptr, seg_h_ptr, seg_w_ptr, cell_ptr_ptr, cell_bins_ptr, gx_ptr,
    C, H, W, T, SW, num_cells, num_cblocks, num_pblocks, max_cover,
    sgn, sgc, sgh, sgw,
    MODE: tl.constexpr, CL_LEVELS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Writes grad_x for a block of pixels and channels, every element once:
    avg copies its cell's gradient; max sums the grads of the covering bins
    whose saved index is this pixel (level order). Uncovered pixels get 0."""
    pid = tl.program_id(0).to(tl.int64)
    pb = pid % num_pblocks
    rest = pid // num_pblocks
    cb = rest % num_cblocks
    n = rest // num_cblocks

    p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = p < H * W
    h = p // W
    w = p % W
    sh = tl.load(seg_h_ptr + h, mask=pmask, other=-1)
    sw = tl.load(seg_w_ptr + w, mask=pmask, other=-1)
    valid = pmask & (sh >= 0) & (sw >= 0)
    cell = tl.where(valid, sh * SW + sw, 0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    start = tl.load(cell_ptr_ptr + cell, mask=valid, other=0)
    count = tl.load(cell_ptr_ptr + cell + 1, mask=valid, other=0) - start

    if MODE == 0:
        # a cell inside covered rows and columns may still be in no bin (the
        # rows covered by one level, the columns by another): no cell value
        m2 = cmask[:, None] & (valid & (count > 0))[None, :]
        g = tl.load(cell_grad_ptr + (n * num_cells + cell[None, :]) * C + c[:, None], mask=m2, other=0.0)
    else:
        flat = (h * W + w)[None, :]
        g = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
        for q in range(0, max_cover):
            has = valid & (q < count)
            t = tl.load(cell_bins_ptr + start + q, mask=has, other=0)
            prior = tl.load(bin_tab_ptr + t * 8 + 5, mask=has, other=0)
            pos = tl.load(bin_tab_ptr + t * 8 + 6, mask=has, other=0)
            bhbw = tl.load(bin_tab_ptr + t * 8 + 7, mask=has, other=1)
            off = _bin_out_offset(n, c[:, None], C, T, prior[None, :], pos[None, :], bhbw[None, :], CL_LEVELS)
            mq = cmask[:, None] & has[None, :]
            bi = tl.load(idx_ptr + off, mask=mq, other=-1)
            gv = tl.load(grad_ptr + off, mask=mq, other=0.0).to(ACC)
            g += tl.where(mq & (bi == flat), gv, 0.0)
    out = gx_ptr + n * sgn + c[:, None] * sgc + h[None, :] * sgh + w[None, :] * sgw
    tl.store(out, _cast_out(g, gx_ptr.dtype.element_ty), mask=cmask[:, None] & pmask[None, :])


# --------------------------------------------------------------------------
# Upsample + concat kernels
# --------------------------------------------------------------------------


@triton.jit
def _resize_into_kernel(
    src_ptr, out_ptr,
    C, IH, IW, OH, OW, c_offset, num_cblocks, num_pblocks,
    ssn, ssc, ssh, ssw, son, soc, soh, sow,
    COPY: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[:, c_offset:c_offset+C] = bilinear resize of src (or a copy)."""
    pid = tl.program_id(0).to(tl.int64)
    pb = pid % num_pblocks
    rest = pid // num_pblocks
    cb = rest % num_cblocks
    n = rest // num_cblocks

    p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = p < OH * OW
    oh = p // OW
    ow = p % OW
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    m = cmask[:, None] & pmask[None, :]
    src = src_ptr + n * ssn + c[:, None] * ssc
    dst = out_ptr + n * son + (c_offset + c)[:, None] * soc + (oh * soh + ow * sow)[None, :]
    if COPY:
        v = tl.load(src + (oh * ssh + ow * ssw)[None, :], mask=m, other=0.0)
        tl.store(dst, v, mask=m)
    else:
        IH64 = IH.to(tl.int64)
        IW64 = IW.to(tl.int64)
        scale_h = _bilinear_scale(IH64, OH, ALIGN, ACC, ACC_FP64)
        scale_w = _bilinear_scale(IW64, OW, ALIGN, ACC, ACC_FP64)
        h0, h1, wh0, wh1 = _bilinear_tap(oh, IH64, OH, scale_h, ALIGN, ACC)
        x0, x1, ww0, ww1 = _bilinear_tap(ow, IW64, OW, scale_w, ALIGN, ACC)
        v00 = tl.load(src + (h0 * ssh + x0 * ssw)[None, :], mask=m, other=0.0).to(ACC)
        v01 = tl.load(src + (h0 * ssh + x1 * ssw)[None, :], mask=m, other=0.0).to(ACC)
        v10 = tl.load(src + (h1 * ssh + x0 * ssw)[None, :], mask=m, other=0.0).to(ACC)
        v11 = tl.load(src + (h1 * ssh + x1 * ssw)[None, :], mask=m, other=0.0).to(ACC)
        a = wh0[None, :] * (ww0[None, :] * v00 + ww1[None, :] * v01)
        b = wh1[None, :] * (ww0[None, :] * v10 + ww1[None, :] * v11)
        tl.store(dst, _cast_out((a + b), out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _resize_backward_kernel(
    g_ptr, gb_ptr,
    C, IH, IW, OH, OW, c_offset, num_cblocks, num_xblocks,
    sgn, sgc, sgh, sgw, sbn, sbc, sbh, sbw,
    ALIGN: tl.constexpr, ACC: tl.constexpr, ACC_FP64: tl.constexpr, RUN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Gradient of one branch row y, columns [xb * BLOCK_X, ...), for a block
    of channels: the sum of grad_out * wh * ww over the output rows / columns
    whose taps read (y, x) -- contiguous ranges, since taps are monotone.
    Tile: channel x source column x reader column."""
    pid = tl.program_id(0).to(tl.int64)
    xb = pid % num_xblocks
    rest = pid // num_xblocks
    y = rest % IH
    rest = rest // IH
    cb = rest % num_cblocks
    n = rest // num_cblocks
    IH64 = IH.to(tl.int64)
    IW64 = IW.to(tl.int64)
    OH64 = OH.to(tl.int64)
    OW64 = OW.to(tl.int64)
    scale_h = _bilinear_scale(IH64, OH64, ALIGN, ACC, ACC_FP64)
    scale_w = _bilinear_scale(IW64, OW64, ALIGN, ACC, ACC_FP64)

    x = xb * BLOCK_X + tl.arange(0, BLOCK_X).to(tl.int64)
    xmask = x < IW64
    o_range = tl.arange(0, BLOCK_O).to(tl.int64)
    # readers of row y: [fh, lh]; of each column x: [fw, lw]
    fh_acc = tl.zeros([BLOCK_O], dtype=tl.int64)
    lh_acc = tl.zeros([BLOCK_O], dtype=tl.int64)
    for d0 in range(0, OH64, BLOCK_O):
        d = d0 + o_range
        before, upto = _reader_counts(y, d, d < OH64, IH64, OH64, scale_h, ALIGN, ACC)
        fh_acc += before
        lh_acc += upto
    fh = tl.sum(fh_acc, axis=0)
    lh = tl.sum(lh_acc, axis=0) - 1
    fw_acc = tl.zeros([BLOCK_X, BLOCK_O], dtype=tl.int64)
    lw_acc = tl.zeros([BLOCK_X, BLOCK_O], dtype=tl.int64)
    for d0 in range(0, OW64, BLOCK_O):
        d = d0 + o_range[None, :]
        before, upto = _reader_counts(x[:, None], d, d < OW64, IW64, OW64, scale_w, ALIGN, ACC)
        fw_acc += before
        lw_acc += upto
    fw = tl.sum(fw_acc, axis=1)
    lw = tl.sum(lw_acc, axis=1) - 1
    span = tl.max(tl.where(xmask, lw - fw + 1, 0), axis=0)

    c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    g_base = g_ptr + n * sgn + (c_offset + c)[:, None, None] * sgc
    r_range = tl.arange(0, BLOCK_R).to(tl.int64)
    # A small branch's element reads a whole plane: each lane sums runs of
    # RUN output rows in ACC (a term is rounded at most twice, wh * ww * g),
    # the runs and the tree over the reader columns in fp64 (bound in
    # csrc/cuda/upsample_concat.cu).
    total = tl.zeros([BLOCK_C, BLOCK_X], dtype=tl.float64)
    for oh0 in range(fh, lh + 1, RUN):
        for r0 in range(0, span, BLOCK_R):
            ow = fw[:, None] + r0 + r_range[None, :]
            rmask = xmask[:, None] & (ow <= lw[:, None])
            x0, x1, ww0, ww1 = _bilinear_tap(ow, IW64, OW64, scale_w, ALIGN, ACC)
            ww = tl.where(x0 == x[:, None], ww0, 0.0) + tl.where(x1 == x[:, None], ww1, 0.0)
            m = cmask[:, None, None] & rmask[None, :, :]
            acc = tl.zeros([BLOCK_C, BLOCK_X, BLOCK_R], dtype=ACC)
            for oh in range(oh0, tl.minimum(oh0 + RUN, lh + 1)):
                h0, h1, wh0, wh1 = _bilinear_tap(oh, IH64, OH64, scale_h, ALIGN, ACC)
                wh = tl.where(h0 == y, wh0, 0.0) + tl.where(h1 == y, wh1, 0.0)
                g = tl.load(g_base + oh * sgh + (ow * sgw)[None, :, :], mask=m, other=0.0).to(ACC)
                acc += g * (wh * ww)[None, :, :]
            total += tl.sum(acc.to(tl.float64), axis=2)
    total = total.to(ACC)
    dst = gb_ptr + n * sbn + c[:, None] * sbc + y * sbh + x[None, :] * sbw
    tl.store(dst, _cast_out(total, gb_ptr.dtype.element_ty), mask=cmask[:, None] & xmask[None, :])


# --------------------------------------------------------------------------
# Host-side plans (pure Python, cached)
# --------------------------------------------------------------------------


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _axis_segments(bounds: Sequence[int], size: int):
    """make_axis_segments of the header: (cuts, seg_begin, seg_end, seg_of)."""
    is_cut = [False] * (size + 1)
    covered = [False] * size
    nwin = len(bounds) // 2
    for k in range(nwin):
        s, e = bounds[2 * k], bounds[2 * k + 1]
        is_cut[s] = is_cut[e] = True
        for i in range(s, e):
            covered[i] = True
    cuts, seg_at = [], [-1] * (size + 1)
    for i in range(size + 1):
        if is_cut[i]:
            seg_at[i] = len(cuts)
            cuts.append(i)
    seg_of, seg = [-1] * size, -1
    for i in range(size):
        if is_cut[i]:
            seg = seg_at[i]
        if covered[i]:
            seg_of[i] = seg
    seg_begin = [seg_at[bounds[2 * k]] for k in range(nwin)]
    seg_end = [seg_at[bounds[2 * k + 1]] for k in range(nwin)]
    return cuts, seg_begin, seg_end, seg_of


class _PoolPlan:
    """Segment tables of one (bounds, input size) combination."""

    def __init__(self, h_bounds, w_bounds, level_bins, height, width):
        hc, hb, he, self.seg_h = _axis_segments(h_bounds, height)
        wc, wb, we, self.seg_w = _axis_segments(w_bounds, width)
        self.SH, self.SW = len(hc) - 1, len(wc) - 1
        self.num_cells = max(self.SH * self.SW, 1)
        bins = []  # per bin t: hsb, hse, wsb, wse, area, prior, pos, bh*bw
        covering: List[List[int]] = [[] for _ in range(self.num_cells)]
        prior = ho = wo = 0
        for bh, bw in level_shapes(level_bins):
            for i in range(bh):
                for j in range(bw):
                    kh, kw = ho + i, wo + j
                    area = (h_bounds[2 * kh + 1] - h_bounds[2 * kh]) * (w_bounds[2 * kw + 1] - w_bounds[2 * kw])
                    t = len(bins)
                    bins.append([hb[kh], he[kh], wb[kw], we[kw], area, prior, i * bw + j, bh * bw])
                    for a in range(hb[kh], he[kh]):
                        for b in range(wb[kw], we[kw]):
                            covering[a * self.SW + b].append(t)
            prior += bh * bw
            ho += bh
            wo += bw
        self.T = len(bins)
        self.bin_tab = bins
        needed = [cid for cid in range(self.num_cells) if covering[cid]]
        self.needed = needed
        self.cell_tab = []
        max_area = 1
        for cid in needed:
            a, b = divmod(cid, self.SW)
            h0, h1, w0, w1 = hc[a], hc[a + 1], wc[b], wc[b + 1]
            self.cell_tab.append([h0, h1, w0, w1, cid])
            max_area = max(max_area, (h1 - h0) * (w1 - w0))
        self.max_cell_area = max_area
        self.max_bin_cells = max(((r[1] - r[0]) * (r[3] - r[2]) for r in bins), default=1)
        ptr = [0]
        flat: List[int] = []
        for lst in covering:
            flat += lst
            ptr.append(len(flat))
        self.cell_ptr = ptr
        self.cell_bins = flat if flat else [0]
        self.max_cover = max((len(c) for c in covering), default=0)
        self._tensors = {}
        # A plan is shared by every thread (the lru_cache below): its device
        # tables are built once per device, under this lock, so no two threads
        # build them concurrently and every caller gets the same tensors.
        self._lock = threading.Lock()

    def tensors(self, device):
        key = str(device)
        with self._lock:
            if key not in self._tensors:
                def t(v):
                    return torch.tensor(v, dtype=torch.int64, device=device)

                self._tensors[key] = dict(
                    bin_tab=t(self.bin_tab), cell_tab=t(self.cell_tab if self.cell_tab else [[0] * 5]),
                    cell_list=t(self.needed if self.needed else [0]), cell_ptr=t(self.cell_ptr),
                    cell_bins=t(self.cell_bins), seg_h=t(self.seg_h), seg_w=t(self.seg_w),
                )
            return self._tensors[key]


@functools.lru_cache(maxsize=128)
def _pool_plan(h_bounds: Tuple[int, ...], w_bounds: Tuple[int, ...], level_bins: Tuple[int, ...], height: int,
               width: int) -> _PoolPlan:
    return _PoolPlan(h_bounds, w_bounds, level_bins, height, width)


# Held while a plan is looked up or built: lru_cache alone may build one key
# twice when two threads miss at once, handing them different plans.
_PLAN_LOCK = threading.Lock()


def _plan_for(h_bounds, w_bounds, level_bins, height, width) -> _PoolPlan:
    key = (tuple(int(v) for v in h_bounds), tuple(int(v) for v in w_bounds), tuple(int(v) for v in level_bins),
           int(height), int(width))
    with _PLAN_LOCK:
        return _pool_plan(*key)


def _acc(dtype: torch.dtype):
    return (tl.float64, True) if dtype == torch.float64 else (tl.float32, False)


def _check_device(*tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRETED:
            raise RuntimeError(
                "pyramid_ext Triton ops run on CPU tensors only under Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing triton / pyramid_ext.triton_ops (it was not set when the "
                "kernels were defined); otherwise use CUDA tensors or another backend"
            )


def _channel_block(c: int, cap: int = 32) -> int:
    return max(1, min(cap, _next_pow2(c)))


# --------------------------------------------------------------------------
# Op implementations
# --------------------------------------------------------------------------


def _tile(budget: int, *fixed: int, want: int) -> int:
    """Largest power of two <= want's next power of two that keeps the tile
    (fixed dims times it) within `budget` elements."""
    room = max(1, budget // max(1, _prod(fixed)))
    return max(1, min(_next_pow2(want), _prev_pow2(room)))


def _prod(vals) -> int:
    out = 1
    for v in vals:
        out *= v
    return out


def _prev_pow2(v: int) -> int:
    return 1 << (max(1, int(v)).bit_length() - 1)


_TILE = 4096  # elements per program tile
# Long sums (average pooling, the resize backward) add float terms in runs of
# at most _RUN per lane, the runs in fp64: within 1e-6 of fp64 for up to 2^31
# elements (the run length and bound of csrc/cpu/simd_loops.h).
_RUN = 12

# No mul+add -> fma contraction on GPUs: the taps, weights and sums round
# operation by operation, as ATen's CPU kernels and the interpreter do.
_LAUNCH = dict(enable_fp_fusion=False)


def _pool_impl(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels):
    _check_device(x)
    if mode not in (POOL_AVG, POOL_MAX):
        raise ValueError(f"multi_pool2d_triton: mode must be 0 (avg) or 1 (max), got {mode}")
    values, indices = _ops.pool_fake(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels)
    n, c, height, width = x.shape
    if values.numel() == 0:
        return values, indices
    plan = _plan_for(h_bounds, w_bounds, level_bins, height, width)
    tabs = plan.tensors(x.device)
    acc, acc64 = _acc(x.dtype)
    acc_dtype = torch.float64 if acc64 else torch.float32
    budget = _TILE if mode == POOL_AVG else _TILE // 2
    block_c = _channel_block(c, 16)
    ncb = triton.cdiv(c, block_c)
    nneed = len(plan.needed)
    block_e = _tile(budget, block_c, want=min(plan.max_cell_area, 64))
    block_s = _tile(budget, block_c, block_e, want=nneed)
    nsb = triton.cdiv(nneed, block_s)
    cell_val = torch.empty((n, plan.num_cells, c), dtype=acc_dtype if mode == POOL_MAX else torch.float64,
                           device=x.device)
    cell_idx = torch.empty((n, plan.num_cells, c), dtype=torch.int64, device=x.device) if mode == POOL_MAX \
        else cell_val
    _pool_cells_kernel[(n * ncb * nsb,)](
        x, tabs["cell_tab"], cell_val, cell_idx,
        c, width, plan.num_cells, nneed, ncb, nsb,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        MODE=mode, ACC=acc, RUN=_RUN, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_E=block_e, **_LAUNCH,
    )
    block_k = _tile(budget, block_c, want=min(plan.max_bin_cells, 64))
    block_t = _tile(budget, block_c, block_k, want=plan.T)
    ntb = triton.cdiv(plan.T, block_t)
    idx_out = indices if mode == POOL_MAX else values
    _pool_bins_kernel[(n * ncb * ntb,)](
        cell_val, cell_idx, tabs["bin_tab"], values, idx_out,
        c, plan.T, plan.SW, plan.num_cells, ncb, ntb,
        MODE=mode, CL_LEVELS=bool(channels_last_levels), ACC=acc, ACC_FP64=acc64,
        BLOCK_C=block_c, BLOCK_T=block_t, BLOCK_K=block_k, **_LAUNCH,
    )
    return values, indices


def _pool_backward_impl(grad, indices, input_shape, h_bounds, w_bounds, level_bins, mode, channels_last_levels,
                        channels_last_input):
    _check_device(grad, indices)
    if mode not in (POOL_AVG, POOL_MAX):
        raise ValueError(f"multi_pool2d_backward_triton: mode must be 0 (avg) or 1 (max), got {mode}")
    if mode == POOL_MAX and indices is None:
        raise ValueError("multi_pool2d_backward_triton: indices are required for max pooling")
    grad_x = _ops.pool_backward_fake(grad, indices, input_shape, h_bounds, w_bounds, level_bins, mode,
                                     channels_last_levels, channels_last_input)
    n, c, height, width = (int(v) for v in input_shape)
    if grad_x.numel() == 0:
        return grad_x
    grad = grad.contiguous()
    plan = _plan_for(h_bounds, w_bounds, level_bins, height, width)
    tabs = plan.tensors(grad.device)
    acc, acc64 = _acc(grad.dtype)
    acc_dtype = torch.float64 if acc64 else torch.float32
    block_c = _channel_block(c, 16)
    ncb = triton.cdiv(c, block_c)
    cl = bool(channels_last_levels)
    if mode == POOL_AVG:
        cell_grad = torch.empty((n, plan.num_cells, c), dtype=acc_dtype, device=grad.device)
        nneed = len(plan.needed)
        block_s = _tile(_TILE, block_c, want=nneed)
        nsb = triton.cdiv(nneed, block_s)
        _pool_bwd_cells_kernel[(n * ncb * nsb,)](
            grad, tabs["bin_tab"], tabs["cell_list"], tabs["cell_ptr"], tabs["cell_bins"], cell_grad,
            c, plan.T, plan.num_cells, nneed, ncb, nsb, plan.max_cover,
            CL_LEVELS=cl, ACC=acc, ACC_FP64=acc64, BLOCK_C=block_c, BLOCK_S=block_s, **_LAUNCH,
        )
        idx = grad  # unused
    else:
        cell_grad = grad  # unused
        idx = indices.contiguous()
    block_p = _tile(_TILE, block_c, want=height * width)
    npb = triton.cdiv(height * width, block_p)
    _pool_bwd_pixels_kernel[(n * ncb * npb,)](
        grad, idx, cell_grad, tabs["bin_tab"], tabs["seg_h"], tabs["seg_w"], tabs["cell_ptr"], tabs["cell_bins"],
        grad_x,
        c, height, width, plan.T, plan.SW, plan.num_cells, ncb, npb, plan.max_cover,
        grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3),
        MODE=mode, CL_LEVELS=cl, ACC=acc, BLOCK_C=block_c, BLOCK_P=block_p, **_LAUNCH,
    )
    return grad_x


def _write_part(src: torch.Tensor, out: torch.Tensor, c_offset: int, align_corners: bool, copy: bool) -> None:
    n, c, ih, iw = src.shape
    oh, ow = out.shape[2], out.shape[3]
    if n == 0 or c == 0 or oh * ow == 0:
        return
    acc, acc64 = _acc(out.dtype)
    block_c = _channel_block(c)
    block_p = max(1, min(_next_pow2(oh * ow), max(16, 2048 // block_c)))
    ncb = triton.cdiv(c, block_c)
    npb = triton.cdiv(oh * ow, block_p)
    _resize_into_kernel[(n * ncb * npb,)](
        src, out,
        c, ih, iw, oh, ow, c_offset, ncb, npb,
        src.stride(0), src.stride(1), src.stride(2), src.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        COPY=copy, ALIGN=bool(align_corners), ACC=acc, ACC_FP64=acc64, BLOCK_C=block_c, BLOCK_P=block_p, **_LAUNCH,
    )


def _fill(x, branches, align_corners, x_first, out) -> None:
    _check_device(x, *branches, out)
    parts = [(b, False) for b in branches]
    if x is not None:
        parts = [(x, True)] + parts if x_first else parts + [(x, True)]
    offset = 0
    for t, is_x in parts:
        if t.dtype != out.dtype or t.device != out.device:
            raise ValueError("upsample_concat_triton: all tensors must share out's dtype and device")
        same = tuple(t.shape[-2:]) == tuple(out.shape[-2:])
        if is_x and not same:
            raise ValueError(f"upsample_concat_triton: x has spatial size {tuple(t.shape[-2:])}, "
                             f"expected {tuple(out.shape[-2:])}")
        _write_part(t, out, offset, align_corners, copy=same)
        offset += t.shape[1]
    if offset != out.shape[1]:
        raise ValueError(f"upsample_concat_triton: out has {out.shape[1]} channels, inputs have {offset}")


def _upsample_concat_impl(x, branches, size, align_corners, x_first, channels_last):
    out = _ops.upsample_concat_fake(x, branches, [int(s) for s in size], align_corners, x_first, channels_last)
    _fill(x, list(branches), align_corners, x_first, out)
    return out


def _upsample_concat_out_impl(x, branches, align_corners, x_first, out) -> None:
    _fill(x, list(branches), align_corners, x_first, out)


def _upsample_concat_backward_impl(grad_out, branch_shapes, channel_offset, align_corners, channels_last):
    _check_device(grad_out)
    grads = _ops.upsample_concat_backward_fake(grad_out, branch_shapes, channel_offset, align_corners, channels_last)
    n, _, oh, ow = grad_out.shape
    acc, acc64 = _acc(grad_out.dtype)
    offset = int(channel_offset)
    for gb in grads:
        c, ih, iw = gb.shape[1], gb.shape[2], gb.shape[3]
        if gb.numel() > 0:
            block_c = _channel_block(c, 16)
            ncb = triton.cdiv(c, block_c)
            # the readers of one source column span about 2 * ow / iw + 2 output columns
            block_r = _tile(_TILE, block_c, want=min(2 * triton.cdiv(ow, iw) + 2, 64))
            block_x = _tile(_TILE, block_c, block_r, want=iw)
            block_o = _tile(_TILE, block_x, want=min(max(oh, ow), 256))
            nxb = triton.cdiv(iw, block_x)
            _resize_backward_kernel[(n * ncb * ih * nxb,)](
                grad_out, gb,
                c, ih, iw, oh, ow, offset, ncb, nxb,
                grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
                gb.stride(0), gb.stride(1), gb.stride(2), gb.stride(3),
                ALIGN=bool(align_corners), ACC=acc, ACC_FP64=acc64, RUN=_RUN,
                BLOCK_C=block_c, BLOCK_X=block_x, BLOCK_R=block_r, BLOCK_O=block_o, **_LAUNCH,
            )
        offset += c
    return grads


# --------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------

_SCHEMAS = {
    "multi_pool2d_triton": (
        "multi_pool2d_triton(Tensor x, SymInt[] h_bounds, SymInt[] w_bounds, int[] level_bins, int mode, "
        "bool channels_last_levels) -> (Tensor, Tensor)"
    ),
    "multi_pool2d_backward_triton": (
        "multi_pool2d_backward_triton(Tensor grad, Tensor? indices, SymInt[] input_shape, SymInt[] h_bounds, "
        "SymInt[] w_bounds, int[] level_bins, int mode, bool channels_last_levels, bool channels_last_input) "
        "-> Tensor"
    ),
    "upsample_concat_triton": (
        "upsample_concat_triton(Tensor? x, Tensor[] branches, SymInt[] size, bool align_corners, bool x_first, "
        "bool channels_last) -> Tensor"
    ),
    "upsample_concat_out_triton": (
        "upsample_concat_out_triton(Tensor? x, Tensor[] branches, bool align_corners, bool x_first, "
        "Tensor(a!) out) -> ()"
    ),
    "upsample_concat_backward_triton": (
        "upsample_concat_backward_triton(Tensor grad_out, SymInt[] branch_shapes, SymInt channel_offset, "
        "bool align_corners, bool channels_last) -> Tensor[]"
    ),
}

_IMPLS = {
    "multi_pool2d_triton": (_pool_impl, _ops.pool_fake),
    "multi_pool2d_backward_triton": (_pool_backward_impl, _ops.pool_backward_fake),
    "upsample_concat_triton": (_upsample_concat_impl, _ops.upsample_concat_fake),
    "upsample_concat_out_triton": (_upsample_concat_out_impl, _ops.upsample_concat_out_fake),
    "upsample_concat_backward_triton": (_upsample_concat_backward_impl, _ops.upsample_concat_backward_fake),
}


def _registered(name: str) -> bool:
    return hasattr(torch.ops.pyramid_ext, name)


def _register() -> None:
    if _registered("multi_pool2d_triton"):  # module re-imported (e.g. reload): keep the first registration
        return
    global _LIB
    _LIB = torch.library.Library("pyramid_ext", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        _LIB.define(schema)
        impl, fake = _IMPLS[name]
        qualname = "pyramid_ext::" + name
        torch.library.impl(qualname, ("cpu", "cuda"), impl, lib=_LIB)
        torch.library.register_fake(qualname, fake, lib=_LIB)
    ops = torch.ops.pyramid_ext
    backward, setup = _ops.make_pool_autograd(ops.multi_pool2d_backward_triton.default)
    torch.library.register_autograd("pyramid_ext::multi_pool2d_triton", backward, setup_context=setup, lib=_LIB)
    backward, setup = _ops.make_upsample_concat_autograd(ops.upsample_concat_backward_triton.default)
    torch.library.register_autograd("pyramid_ext::upsample_concat_triton", backward, setup_context=setup, lib=_LIB)
    backward, setup = _ops.make_pool_backward_autograd(ops.multi_pool2d_triton.default)
    torch.library.register_autograd("pyramid_ext::multi_pool2d_backward_triton", backward, setup_context=setup,
                                    lib=_LIB)
    backward, setup = _ops.make_upsample_concat_backward_autograd(ops.upsample_concat_triton.default)
    torch.library.register_autograd("pyramid_ext::upsample_concat_backward_triton", backward, setup_context=setup,
                                    lib=_LIB)


_LIB = None
_register()


# --------------------------------------------------------------------------
# Entry points called by pyramid_ext.functional
# --------------------------------------------------------------------------


def multi_pool2d(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels):
    return torch.ops.pyramid_ext.multi_pool2d_triton(x, list(h_bounds), list(w_bounds), list(level_bins), int(mode),
                                                      bool(channels_last_levels))


def upsample_concat(x, branches, size, align_corners, x_first, channels_last):
    return torch.ops.pyramid_ext.upsample_concat_triton(x, list(branches), list(size), bool(align_corners),
                                                        bool(x_first), bool(channels_last))


def upsample_concat_out(x, branches, align_corners, x_first, out):
    torch.ops.pyramid_ext.upsample_concat_out_triton(x, list(branches), bool(align_corners), bool(x_first), out)
    return out


__all__ = ["multi_pool2d", "upsample_concat", "upsample_concat_out", "INTERPRETED"]
