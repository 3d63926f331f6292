"""Triton upsample + concat: kernels and the op implementations.

One launch per part (x copied, each branch bilinearly resized with ATen's
taps) writing its channel range of ``out`` through out's strides. Taps are
computed in the kernels exactly as ATen's upsample_bilinear2d
(csrc/pyramid_index.h, bilinear_tap), with IEEE division and no fma
contraction. Backward: for each branch element, a gather over the contiguous
ranges of output rows / columns whose taps read it (found by counting the
output coordinates whose taps lie before it: taps are monotone), no atomics,
so the result is bitwise deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _ops
from ._common import _LAUNCH, _RUN, _TILE, _acc, _cast_out, _channel_block, _check_device, _device_fn, _div, _next_pow2
from ._common import _tile

# --------------------------------------------------------------------------
# Bilinear taps (device code)
# --------------------------------------------------------------------------


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
def _sizes_and_scales(IH, IW, OH, OW, ALIGN: tl.constexpr, ACC: tl.constexpr, ACC_FP64: tl.constexpr):
    """The sizes as int64 and both axes' scales. tl.cast, not .to: the compiler
    passes a size equal to 1 as a plain int (its specialisation of 1), which
    has no .to (tests/triton_compile_sm90.py)."""
    IH64 = tl.cast(IH, tl.int64)
    IW64 = tl.cast(IW, tl.int64)
    OH64 = tl.cast(OH, tl.int64)
    OW64 = tl.cast(OW, tl.int64)
    scale_h = _bilinear_scale(IH64, OH64, ALIGN, ACC, ACC_FP64)
    scale_w = _bilinear_scale(IW64, OW64, ALIGN, ACC, ACC_FP64)
    return IH64, IW64, OH64, OW64, scale_h, scale_w


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
        IH64, IW64, OH64, OW64, scale_h, scale_w = _sizes_and_scales(IH, IW, OH, OW, ALIGN, ACC, ACC_FP64)
        h0, h1, wh0, wh1 = _bilinear_tap(oh, IH64, OH64, scale_h, ALIGN, ACC)
        x0, x1, ww0, ww1 = _bilinear_tap(ow, IW64, OW64, scale_w, ALIGN, ACC)
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
    IH64, IW64, OH64, OW64, scale_h, scale_w = _sizes_and_scales(IH, IW, OH, OW, ALIGN, ACC, ACC_FP64)

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
# Op implementations
# --------------------------------------------------------------------------


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
    _ops.check_out_disjoint("upsample_concat_out_triton", x, branches, out)
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


