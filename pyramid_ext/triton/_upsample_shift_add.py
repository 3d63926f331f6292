"""Triton upsample_shift_add: kernels and the op implementations.

Forward: one launch per tap tensor. Each program takes a block of output
channels x pixels and adds, for every tap (a, c) of the K x K kernel whose
shifted position (y + a - p, x + c - p) lies inside the output, the bilinear
sample of the tap tensor's channel (a*K + c)*Cout + o there (ATen's taps,
_upsample_concat._bilinear_tap; a tensor of the output's size is read
directly). The running sum starts from base and is carried between the
launches in the accumulation type (the output itself for float32/64, a
float32 buffer for 16-bit), so each element is rounded to the dtype once, by
the last launch. Per element the order is the CUDA kernel's: base, then the
tap tensors in order, the taps row-major.

Backward: the resize backward of _upsample_concat (a gather over the
contiguous reader ranges, no atomics, bitwise deterministic; runs of _RUN
rows per lane in the accumulation type, everything after them in fp64) with
each tap's reader ranges clipped to the positions whose shift lies inside
grad, and grad read shifted. One program per (sample, block of tap-tensor
channels, row, block of columns); the channels of a block may belong to
different taps, so the clipped ranges are per channel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _ops
from ._common import _LAUNCH, _RUN, _TILE, _acc, _cast_out, _channel_block, _check_device, _next_pow2, _tile
from ._upsample_concat import _bilinear_tap, _reader_counts, _sizes_and_scales

_OP = "upsample_shift_add_triton"
_BACKWARD_OP = "upsample_shift_add_backward_triton"


@triton.jit
def _shift_add_kernel(
    base_ptr, tap_ptr, part_ptr, out_ptr,
    C, IH, IW, OH, OW, K, num_cblocks, num_pblocks,
    sbn, sbc, sbh, sbw, stn, stc, sth, stw, son, soc, soh, sow,
    FIRST: tl.constexpr, LAST: tl.constexpr, COPY: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One tap tensor's share of out[:, :, :, :] for a block of channels x
    pixels: running sum (base when FIRST, else part) plus every in-bounds
    shifted sample; stored to out (rounded) when LAST, else to part."""
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
    o_at = n * son + c[:, None] * soc + (oh * soh + ow * sow)[None, :]
    if FIRST:
        acc = tl.load(base_ptr + n * sbn + c[:, None] * sbc + (oh * sbh + ow * sbw)[None, :], mask=m,
                      other=0.0).to(ACC)
    else:
        acc = tl.load(part_ptr + o_at, mask=m, other=0.0).to(ACC)

    IH64, IW64, OH64, OW64, scale_h, scale_w = _sizes_and_scales(IH, IW, OH, OW, ALIGN, ACC, ACC_FP64)
    pad = K // 2
    src = tap_ptr + n * stn + c[:, None] * stc
    for a in range(0, K):
        Y = oh + a - pad
        y_in = (Y >= 0) & (Y < OH64)
        Yc = tl.minimum(tl.maximum(Y, 0), OH64 - 1)  # an address for the lanes outside (masked)
        h0, h1, wh0, wh1 = _bilinear_tap(Yc, IH64, OH64, scale_h, ALIGN, ACC)
        for cc in range(0, K):
            X = ow + cc - pad
            inside = y_in & (X >= 0) & (X < OW64)
            Xc = tl.minimum(tl.maximum(X, 0), OW64 - 1)
            plane = src + ((a * K + cc) * C) * stc
            lm = m & inside[None, :]
            if COPY:
                v = tl.load(plane + (Yc * sth + Xc * stw)[None, :], mask=lm, other=0.0).to(ACC)
            else:
                x0, x1, ww0, ww1 = _bilinear_tap(Xc, IW64, OW64, scale_w, ALIGN, ACC)
                v00 = tl.load(plane + (h0 * sth + x0 * stw)[None, :], mask=lm, other=0.0).to(ACC)
                v01 = tl.load(plane + (h0 * sth + x1 * stw)[None, :], mask=lm, other=0.0).to(ACC)
                v10 = tl.load(plane + (h1 * sth + x0 * stw)[None, :], mask=lm, other=0.0).to(ACC)
                v11 = tl.load(plane + (h1 * sth + x1 * stw)[None, :], mask=lm, other=0.0).to(ACC)
                top = wh0[None, :] * (ww0[None, :] * v00 + ww1[None, :] * v01)
                bottom = wh1[None, :] * (ww0[None, :] * v10 + ww1[None, :] * v11)
                v = top + bottom
            # skipped, not added as zero: the sum is the CUDA kernel's, signed zeros included
            acc = tl.where(inside[None, :], acc + v, acc)
    if LAST:
        tl.store(out_ptr + o_at, _cast_out(acc, out_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(part_ptr + o_at, acc.to(part_ptr.dtype.element_ty), mask=m)


@triton.jit
def _shift_add_backward_kernel(
    g_ptr, gt_ptr,
    COUT, IH, IW, OH, OW, K, num_cblocks, num_xblocks,
    sgn, sgc, sgh, sgw, stn, stc, sth, stw,
    ALIGN: tl.constexpr, ACC: tl.constexpr, ACC_FP64: tl.constexpr, RUN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Gradient of a block of tap-tensor channels ch = t*COUT + o (tap
    t = a*K + c, shift (dy, dx) = (a - p, c - p) per channel), of one row y,
    columns [xb * BLOCK_X, ...): the sum of grad[o, Y - dy, X - dx] * wh * ww
    over the rows Y / columns X of the resized plane whose taps read (y, x)
    (contiguous ranges, as taps are monotone) and whose shift back lies inside
    grad. Tile: channel x column x reader column."""
    pid = tl.program_id(0).to(tl.int64)
    xb = pid % num_xblocks
    rest = pid // num_xblocks
    y = rest % IH
    rest = rest // IH
    cb = rest % num_cblocks
    n = rest // num_cblocks
    IH64, IW64, OH64, OW64, scale_h, scale_w = _sizes_and_scales(IH, IW, OH, OW, ALIGN, ACC, ACC_FP64)

    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = ch < K * K * COUT
    t = ch // COUT
    o = ch % COUT
    pad = K // 2
    dy = t // K - pad
    dx = t % K - pad
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
    fw_acc = tl.zeros([BLOCK_X, BLOCK_O], dtype=tl.int64)
    lw_acc = tl.zeros([BLOCK_X, BLOCK_O], dtype=tl.int64)
    for d0 in range(0, OW64, BLOCK_O):
        d = d0 + o_range[None, :]
        before, upto = _reader_counts(x[:, None], d, d < OW64, IW64, OW64, scale_w, ALIGN, ACC)
        fw_acc += before
        lw_acc += upto
    # clipped, per channel, to the readers whose shifted position is inside grad
    fh = tl.maximum(tl.sum(fh_acc, axis=0), dy)  # [C]
    lh = tl.minimum(tl.sum(lh_acc, axis=0) - 1, OH64 - 1 + dy)
    fw = tl.maximum(tl.sum(fw_acc, axis=1)[None, :], dx[:, None])  # [C, X]
    lw = tl.minimum(tl.sum(lw_acc, axis=1)[None, :] - 1, OW64 - 1 + dx[:, None])
    cx = cmask[:, None] & xmask[None, :]
    span = tl.max(tl.max(tl.where(cx, lw - fw + 1, 0), axis=1), axis=0)
    row_first = tl.min(tl.where(cmask, fh, OH64), axis=0)
    row_last = tl.max(tl.where(cmask, lh, -1), axis=0)

    g_base = g_ptr + n * sgn + (o * sgc)[:, None, None]
    r_range = tl.arange(0, BLOCK_R).to(tl.int64)
    # runs of at most RUN rows per lane in ACC (a term rounded at most twice,
    # g * (wh * ww); rows outside a channel's range add nothing), the runs and
    # the tree over the reader columns in fp64 (bound in
    # csrc/cuda/upsample_concat.cu)
    total = tl.zeros([BLOCK_C, BLOCK_X], dtype=tl.float64)
    for oh0 in range(row_first, row_last + 1, RUN):
        for r0 in range(0, span, BLOCK_R):
            ow = fw[:, :, None] + r0 + r_range[None, None, :]  # [C, X, R]
            rmask = cx[:, :, None] & (ow <= lw[:, :, None])
            x0, x1, ww0, ww1 = _bilinear_tap(ow, IW64, OW64, scale_w, ALIGN, ACC)
            xs = x[None, :, None]
            ww = tl.where(x0 == xs, ww0, 0.0) + tl.where(x1 == xs, ww1, 0.0)
            col_at = ((ow - dx[:, None, None]) * sgw)
            acc = tl.zeros([BLOCK_C, BLOCK_X, BLOCK_R], dtype=ACC)
            for oh in range(oh0, tl.minimum(oh0 + RUN, row_last + 1)):
                h0, h1, wh0, wh1 = _bilinear_tap(oh, IH64, OH64, scale_h, ALIGN, ACC)
                wh = tl.where(h0 == y, wh0, 0.0) + tl.where(h1 == y, wh1, 0.0)
                rows_in = (oh >= fh) & (oh <= lh)
                m = rmask & rows_in[:, None, None]
                g = tl.load(g_base + ((oh - dy) * sgh)[:, None, None] + col_at, mask=m, other=0.0).to(ACC)
                acc += g * (wh * ww)
            total += tl.sum(acc.to(tl.float64), axis=2)
    total = total.to(ACC)
    dst = gt_ptr + n * stn + ch[:, None] * stc + y * sth + x[None, :] * stw
    tl.store(dst, _cast_out(total, gt_ptr.dtype.element_ty), mask=cx)


# --------------------------------------------------------------------------
# Op implementations
# --------------------------------------------------------------------------


def _upsample_shift_add_impl(base, taps, kernel_size, align_corners):
    taps = list(taps)
    _ops.check_shift_add_args(_OP, base, taps, kernel_size)
    _check_device(base, *taps)
    out = _ops.upsample_shift_add_fake(base, taps, kernel_size, align_corners)
    if out.numel() == 0:
        return out
    if not taps:
        return out.copy_(base)
    n, c, oh, ow = base.shape
    acc, acc64 = _acc(base.dtype)
    # the running sum between launches: out itself where it is the accumulation type
    part = out if base.dtype in (torch.float32, torch.float64) else torch.empty_like(out, dtype=torch.float32)
    block_c = _channel_block(c)
    block_p = max(1, min(_next_pow2(oh * ow), max(16, 2048 // block_c)))
    ncb = triton.cdiv(c, block_c)
    npb = triton.cdiv(oh * ow, block_p)
    for i, t in enumerate(taps):
        ih, iw = t.shape[2], t.shape[3]
        _shift_add_kernel[(n * ncb * npb,)](
            base, t, part, out,
            c, ih, iw, oh, ow, kernel_size, ncb, npb,
            base.stride(0), base.stride(1), base.stride(2), base.stride(3),
            t.stride(0), t.stride(1), t.stride(2), t.stride(3),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            FIRST=i == 0, LAST=i == len(taps) - 1, COPY=(ih, iw) == (oh, ow), ALIGN=bool(align_corners), ACC=acc,
            ACC_FP64=acc64, BLOCK_C=block_c, BLOCK_P=block_p, **_LAUNCH,
        )
    return out


def _check_backward_args(grad, tap_shapes, kernel_size, channels_last) -> None:
    """The compiled backward op's checks (csrc/upsample_shift_add_checks.h), same rules and words."""
    op = _BACKWARD_OP
    if grad.dim() != 4:
        raise ValueError(f"{op}: grad must be a 4-D (N, Cout, H, W) tensor, got shape {tuple(grad.shape)}")
    if grad.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: grad must be float64, float32, float16 or bfloat16, got {grad.dtype}")
    if grad.shape[2] == 0 or grad.shape[3] == 0:
        raise ValueError(f"{op}: grad must have non-zero height and width, got shape {tuple(grad.shape)}")
    if kernel_size <= 0 or kernel_size % 2 != 1:
        raise ValueError(f"{op}: kernel_size must be odd and positive, got {kernel_size}")
    if len(tap_shapes) % 2:
        raise ValueError(f"{op}: tap_shapes must hold (h, w) pairs, got {len(tap_shapes)} values")
    if len(channels_last) * 2 != len(tap_shapes):
        raise ValueError(f"{op}: channels_last must have one entry per tap tensor ({len(tap_shapes) // 2}), "
                         f"got {len(channels_last)}")
    if any(s <= 0 for s in tap_shapes):
        raise ValueError(f"{op}: tap_shapes must be positive, got {list(tap_shapes)}")


def _upsample_shift_add_backward_impl(grad, tap_shapes, kernel_size, align_corners, channels_last):
    tap_shapes = [int(s) for s in tap_shapes]
    _check_backward_args(grad, tap_shapes, kernel_size, channels_last)
    _check_device(grad)
    grads = _ops.upsample_shift_add_backward_fake(grad, tap_shapes, kernel_size, align_corners, channels_last)
    n, cout, oh, ow = grad.shape
    acc, acc64 = _acc(grad.dtype)
    for gt in grads:
        if gt.numel() == 0:
            continue
        ih, iw = gt.shape[2], gt.shape[3]
        channels = gt.shape[1]
        block_c = _channel_block(channels, 16)
        ncb = triton.cdiv(channels, block_c)
        # the readers of one source column span about 2 * ow / iw + 2 output columns
        block_r = _tile(_TILE, block_c, want=min(2 * triton.cdiv(ow, iw) + 2, 64))
        block_x = _tile(_TILE, block_c, block_r, want=iw)
        block_o = _tile(_TILE, block_x, want=min(max(oh, ow), 256))
        nxb = triton.cdiv(iw, block_x)
        _shift_add_backward_kernel[(n * ncb * ih * nxb,)](
            grad, gt,
            cout, ih, iw, oh, ow, kernel_size, ncb, nxb,
            grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
            gt.stride(0), gt.stride(1), gt.stride(2), gt.stride(3),
            ALIGN=bool(align_corners), ACC=acc, ACC_FP64=acc64, RUN=_RUN,
            BLOCK_C=block_c, BLOCK_X=block_x, BLOCK_R=block_r, BLOCK_O=block_o, **_LAUNCH,
        )
    return grads
