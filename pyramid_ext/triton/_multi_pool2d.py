"""Triton pooling (multi_pool2d): kernels, host-side plans and the op implementations.

One pass over x: the union of all window boundaries cuts each axis into
segments (host-side tables, cached); kernel 1 reduces every segment cell that
some bin reads exactly once (sum, or max value + flat index); kernel 2
combines cells into the windows of every level and writes the packed output.
Backward is a gather with no atomics: avg computes each cell's gradient once
(the sum of grad / area over the bins covering it, in level order) and
expands it to the cell's pixels; max compares each pixel's flat index with
the saved indices of the bins covering its cell.
"""
from __future__ import annotations

import functools
import threading
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from .. import _ops
from ..plan import POOL_AVG, POOL_MAX, POOL_MAX_VALUES, axis_segments, check_pool_args, level_offsets
from ..windows import level_shapes
from ._common import _LAUNCH, _RUN, _TILE, _acc, _cast_out, _channel_block, _check_device, _device_fn, _div, _tile

_BIG_INDEX = tl.constexpr(1 << 62)


# --------------------------------------------------------------------------
# Pooling kernels
# --------------------------------------------------------------------------


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
# Host-side plans (pure Python, cached)
# --------------------------------------------------------------------------


class _PoolPlan:
    """Segment tables of one (bounds, input size) combination (pyramid_ext.plan:
    the segments of each axis, the offset of each level per channel)."""

    def __init__(self, h_bounds, w_bounds, level_bins, height, width):
        hc, hb, he, self.seg_h = axis_segments(h_bounds, height)
        wc, wb, we, self.seg_w = axis_segments(w_bounds, width)
        self.SH, self.SW = len(hc) - 1, len(wc) - 1
        self.num_cells = max(self.SH * self.SW, 1)
        bins = []  # per bin t: hsb, hse, wsb, wse, area, prior, pos, bh*bw
        covering: List[List[int]] = [[] for _ in range(self.num_cells)]
        priors = level_offsets(level_bins, 1)  # bins of the levels before, per channel
        ho = wo = 0
        for level, (bh, bw) in enumerate(level_shapes(level_bins)):
            prior = priors[level]
            for i in range(bh):
                for j in range(bw):
                    kh, kw = ho + i, wo + j
                    area = (h_bounds[2 * kh + 1] - h_bounds[2 * kh]) * (w_bounds[2 * kw + 1] - w_bounds[2 * kw])
                    t = len(bins)
                    bins.append([hb[kh], he[kh], wb[kw], we[kw], area, prior, i * bw + j, bh * bw])
                    for a in range(hb[kh], he[kh]):
                        for b in range(wb[kw], we[kw]):
                            covering[a * self.SW + b].append(t)
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


# --------------------------------------------------------------------------
# Op implementations
# --------------------------------------------------------------------------


def _pool_impl(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels):
    _check_device(x)
    check_pool_args(x.shape, h_bounds, w_bounds, level_bins, mode, "multi_pool2d_triton")
    if mode == POOL_MAX_VALUES:  # the max kernels, indices dropped
        values, _ = _pool_impl(x, h_bounds, w_bounds, level_bins, POOL_MAX, channels_last_levels)
        return values, x.new_empty((0,), dtype=torch.int64)
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
                        channels_last_input, addend=None):
    _check_device(grad, indices)
    check_pool_args(input_shape, h_bounds, w_bounds, level_bins, mode, "multi_pool2d_backward_triton", backward=True)
    _ops.check_pool_addend("multi_pool2d_backward_triton", addend, grad, [int(v) for v in input_shape])
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
    if addend is not None:
        # A correct composition, not one pass: the same values as the compiled
        # ops' (addend + the gradient rounded to the dtype).
        grad_x.add_(addend)
    return grad_x

