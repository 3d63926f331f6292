"""Helpers shared by the test modules: inputs, PyTorch eager references,
independent window-policy references and tolerance tables.

Expectations here are PyTorch's own operators (F.adaptive_*_pool2d,
F.max_pool2d / F.avg_pool2d, F.interpolate, torch.cat) or fp64 loops written
from the policies' definitions in the source documents; nothing here calls
pyramid_ext, so no test compares the code under test with itself.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Against PyTorch's own result in the same dtype (PyTorch rounds too).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# Against a float64 computation on the same (rounded) inputs: about one
# rounding of the result's dtype, plus summation-order noise for the wide types.
TOL_VS_FP64 = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}

# Against fp64, for the sums of many products (a 1x1 branch's gradient sums a whole plane).
SUM_ATOL_VS_FP64 = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-1}

# The Triton kernels against PyTorch eager (16-bit: eager computed in fp32
# and rounded once, like the kernels' fp32 accumulation).
TOL_TRITON = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}

# Unit roundoff of each dtype (half an ulp of 1).
EPS = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def rand(shape, dtype=torch.float32, seed=0, device="cpu") -> torch.Tensor:
    """Standard normals drawn in float64 from a seeded generator, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def as_pair(b) -> Tuple[int, int]:
    return (b, b) if isinstance(b, int) else tuple(b)


def pairs(bins) -> List[Tuple[int, int]]:
    return [as_pair(b) for b in bins]


LAYOUTS = ["nchw", "channels_last", "noncontig"]


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x in NCHW, channels_last, or a non-contiguous view of the same values."""
    if kind == "nchw":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "noncontig":
        # Same values, every stride non-standard: a slice of a wider tensor.
        big = torch.zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3] + 1, dtype=x.dtype, device=x.device)
        big[..., 1::2] = x
        return big[..., 1::2]
    raise ValueError(kind)


def is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are views of one storage (no copy between them)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ------------------------------------------------------------- references ---


def eager_pool(x, bins, mode: str):
    """F.adaptive_{avg,max}_pool2d of every level."""
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return [pool(x, as_pair(b)) for b in bins]


def eager_spp(x, bins, mode: str):
    return torch.cat([t.flatten(1) for t in eager_pool(x, bins, mode)], 1)


def interpolate(b, size, align_corners):
    if b.numel() == 0:  # F.interpolate rejects empty tensors
        return b.new_zeros((b.shape[0], b.shape[1]) + tuple(size))
    return F.interpolate(b, size=tuple(size), mode="bilinear", align_corners=align_corners)


def eager_upsample_concat(x, branches, size, align_corners, x_first=True):
    """torch.cat of x and the F.interpolate'd branches."""
    ups = [interpolate(b, size, align_corners) for b in branches]
    if x is None:
        return torch.cat(ups, 1)
    return torch.cat([x] + ups if x_first else ups + [x], 1)


def check_out_overlap_rule(upsample_concat_out, device="cpu"):
    """The op-level out= rule of upsample_concat_out (csrc/upsample_concat_checks.h),
    for the op `upsample_concat_out(x, branches, align_corners, x_first, out)`
    of one backend: an input may share out's storage only where their memory
    provably does not overlap; full, partial and possible (not provably
    disjoint) overlap raise naming the input, and so does an out whose own
    elements share memory. Accepted calls must match eager (float64)."""
    def f64(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=device)

    # Disjoint dense pieces of one storage: x and a branch beside out.
    store = f64(1000)
    out, b, x = store[:180].view(1, 5, 6, 6), store[500:518].view(1, 2, 3, 3), store[600:708].view(1, 3, 6, 6)
    want = eager_upsample_concat(x, [b], (6, 6), False)
    upsample_concat_out(x, [b], False, True, out)
    torch.testing.assert_close(out, want)
    # Disjoint channel slices of one (N=1) buffer: x the first three channels, out the rest.
    buf = f64(1, 8, 6, 6)
    x, before = buf[:, :3], buf[:, :3].clone()
    b = f64(1, 2, 4, 5)
    want = eager_upsample_concat(before, [b], (6, 6), True, x_first=False)
    upsample_concat_out(x, [b], True, False, buf[:, 3:])
    torch.testing.assert_close(buf[:, 3:], want)
    assert torch.equal(buf[:, :3], before)

    def rejects(name, *args):
        with pytest.raises(RuntimeError, match=re.escape(f"out must not overlap the inputs, but {name} shares")):
            upsample_concat_out(*args)

    buf = f64(1, 8, 6, 6)
    rejects("x", buf[:, :3], [f64(1, 2, 3, 3)], False, True, buf[:, 2:7])  # partial
    rejects("x", buf, [], False, True, buf)  # full: out is x
    rejects("branches[0]", None, [buf[:, :5]], False, True, buf[:, :5])  # full: out is the branch
    store = f64(1000)
    rejects("branches[1]", None, [f64(1, 1, 3, 3), store[100:118].view(1, 2, 3, 3)], False, True,
            store[:108].view(1, 3, 6, 6))  # partial, one element shared
    # Disjoint, but channel slices of a batch of two are not dense: not provably disjoint.
    buf = f64(2, 8, 6, 6)
    rejects("x", buf[:, :3], [f64(2, 2, 3, 3)], False, True, buf[:, 3:])
    with pytest.raises(RuntimeError, match="out must not overlap itself"):
        upsample_concat_out(f64(1, 3, 6, 6), [], False, True, f64(1, 1, 6, 6).expand(1, 3, 6, 6))


def bilinear_weights(in_size: int, out_size: int, align_corners: bool, dtype=torch.float32) -> torch.Tensor:
    """(out_size, in_size) fp64 matrix of ATen's bilinear tap weights along one
    axis, computed in `dtype` (the kernels' accumulation type) with ATen's
    formulas (UpSample.h: area_pixel_compute_scale, area_pixel_compute_source_index,
    compute_source_index_and_lambda), one rounding per operation as there."""
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    if in_size == out_size:
        return w + torch.eye(in_size, dtype=torch.float64)
    if align_corners:
        scale = torch.tensor((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0, dtype=dtype)
    else:
        scale = torch.tensor(in_size, dtype=dtype) / torch.tensor(out_size, dtype=dtype)
    for o in range(out_size):
        dst = torch.tensor(float(o), dtype=dtype)
        src = scale * dst if align_corners else scale * (dst + 0.5) - 0.5
        src = torch.clamp_min(src, 0.0)
        i0 = min(int(torch.floor(src)), in_size - 1)
        lam1 = torch.clamp(src - i0, 0.0, 1.0)
        lam0 = 1.0 - lam1
        i1 = i0 + (1 if i0 < in_size - 1 else 0)
        w[o, i0] += float(lam0)
        w[o, i1] += float(lam1)
    return w


def bilinear_backward_fp64(g: torch.Tensor, in_hw, align_corners: bool, dtype=torch.float32):
    """The gradient of a bilinear resize from in_hw to g's size, Wy^T G Wx in
    fp64 with the weights of bilinear_weights; also the sums of the absolute
    terms (for grad_close) and of |G| over every tap with a nonzero weight."""
    wy = bilinear_weights(in_hw[0], g.shape[-2], align_corners, dtype)
    wx = bilinear_weights(in_hw[1], g.shape[-1], align_corners, dtype)
    gd = g.double().cpu()
    grad = torch.einsum("oi,ncop,pj->ncij", wy, gd, wx)
    terms = torch.einsum("oi,ncop,pj->ncij", wy.abs(), gd.abs(), wx.abs())
    return grad, terms


def sppnet_kernel_stride(a: int, n: int) -> Tuple[int, int]:
    """Document 002 (SPPNet): kernel = ceil(a/n), stride = floor(a/n)."""
    return math.ceil(a / n), math.floor(a / n)


def sppnet_pool(x, n, mode: str):
    """SPPNet's level of n x n bins as PyTorch's F.max_pool2d / F.avg_pool2d
    with the document's kernel and stride (no padding)."""
    kh, sh = sppnet_kernel_stride(x.shape[-2], n)
    kw, sw = sppnet_kernel_stride(x.shape[-1], n)
    pool = F.max_pool2d if mode == "max" else F.avg_pool2d
    return pool(x, (kh, kw), (sh, sw))


def keras_same_avg(x, n):
    """Document 001: Keras AveragePooling2D(pool=strides=round(a/n),
    padding='same') (np.round, half to even, as Python's round), TensorFlow's
    SAME padding (out = ceil(a/pool), the odd padded element after), padded
    positions excluded from the mean: zero-padded sums over padded counts,
    with F.pad and F.avg_pool2d."""
    pads, kernel = [], []
    for a in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        p = int(round(a / n))
        out = -(-a // p)
        total = max((out - 1) * p + p - a, 0)
        pads += [total // 2, total - total // 2]
        kernel.insert(0, p)
    s = F.avg_pool2d(F.pad(x, pads), kernel, stride=kernel)
    cnt = F.avg_pool2d(F.pad(torch.ones_like(x[..., :1, :, :]), pads), kernel, stride=kernel)
    return s / cnt


def keras_same_max(x, n):
    """Max over document 001's keras_same windows (the policy's windows with
    max instead of mean): -inf padding, F.max_pool2d(pool, stride=pool)."""
    pads, kernel = [], []
    for a in (x.shape[-1], x.shape[-2]):
        p = int(round(a / n))
        out = -(-a // p)
        total = max((out - 1) * p + p - a, 0)
        pads += [total // 2, total - total // 2]
        kernel.insert(0, p)
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel, stride=kernel)


def naive_window_pool(x: torch.Tensor, h_windows, w_windows, mode: str):
    """fp64 loop over explicit [start, end) windows: (values, flat indices).
    Values are the mean or max of each window (differentiable); for max the
    index is the first maximum in row-major order, as h * W + w (inputs
    without NaN or ties, where that is the only rule)."""
    xd = x.double()
    width = x.shape[-1]
    rows_v, rows_i = [], []
    for hs, he in h_windows:
        vals, idxs = [], []
        for ws, we in w_windows:
            win = xd[..., hs:he, ws:we].flatten(-2)
            if mode == "max":
                vals.append(win.amax(-1))
                r = win.argmax(-1)
                idxs.append((hs + r // (we - ws)) * width + ws + r % (we - ws))
            else:
                vals.append(win.sum(-1) / win.shape[-1])
        rows_v.append(torch.stack(vals, -1))
        if idxs:
            rows_i.append(torch.stack(idxs, -1))
    return torch.stack(rows_v, -2), (torch.stack(rows_i, -2) if rows_i else None)


def naive_multi_pool(x, h_bounds, w_bounds, level_bins, mode: int, channels_last_levels: bool):
    """The multi_pool2d op contract (docs/DESIGN.md) written out: every level's
    windows pooled by naive_window_pool, packed level after level as (c, i, j)
    or, with channels_last_levels, (i, j, c). Returns fp64 values and, for
    max (mode 1), int64 indices, else None."""
    vals, idxs = [], []
    ho = wo = 0
    for lv in range(0, len(level_bins), 2):
        bh, bw = level_bins[lv], level_bins[lv + 1]
        hw = [(h_bounds[2 * k], h_bounds[2 * k + 1]) for k in range(ho, ho + bh)]
        ww = [(w_bounds[2 * k], w_bounds[2 * k + 1]) for k in range(wo, wo + bw)]
        ho, wo = ho + bh, wo + bw
        v, i = naive_window_pool(x, hw, ww, "max" if mode == 1 else "avg")
        if channels_last_levels:
            v = v.permute(0, 2, 3, 1)
            i = i.permute(0, 2, 3, 1) if i is not None else None
        vals.append(v.flatten(1))
        if i is not None:
            idxs.append(i.flatten(1))
    return torch.cat(vals, 1), (torch.cat(idxs, 1) if idxs else None)


# -------------------------------------------------------------- tolerances ---


def acc_dtype(dtype):
    """The accumulation type of the kernels (ATen's opmath type)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_close(got: torch.Tensor, want: torch.Tensor, dtype, terms: Optional[torch.Tensor] = None, n_sum: int = 1,
               what=""):
    """A result computed in dtype (accumulated in acc_dtype(dtype)) against an
    fp64 one, element by element, with the textbook error bound of a sum:
    |got - want| <= 2 u_dtype |want| + 2 n_sum u_acc terms, where `terms` is
    the sum of the absolute values of the terms summed into the element and
    n_sum the length of the longest chain of additions (the first part is the
    final rounding to dtype). So a gradient entry of order 1 gets a bound of
    order u, not a fixed absolute tolerance."""
    got, want = got.double().cpu(), want.double().cpu()
    bound = 2 * EPS[dtype] * want.abs() + 1e-300
    if terms is not None:
        bound = bound + 2 * n_sum * EPS[acc_dtype(dtype)] * terms.double().cpu()
    err = (got - want).abs()
    bad = err > bound
    k = int((err / bound).flatten().argmax())
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {err.numel()} elements exceed the error bound; worst "
                                 f"(flat index {k}): got {got.flatten()[k].item():.9g}, want {want.flatten()[k].item():.9g}, "
                                 f"err {err.flatten()[k].item():.3g} > bound {bound.flatten()[k].item():.3g}")


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm running statistics (so eval mode is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def ties_nan_inf_input(dtype):
    """Max-pooling input with many ties, NaNs and -inf windows (ATen's rule:
    first maximum in row-major order, or the last NaN); bins to use with it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (2, 4, 13, 11), generator=g).to(dtype)  # many ties
    x[0, 0, 2, 3] = float("nan")
    x[0, 0, 5, 7] = float("nan")
    x[0, 1, 12, 10] = float("nan")
    x[1, 2, :, :6] = float("-inf")
    x[1, 3] = float("-inf")  # whole plane: the index is each window's first element
    return x, (1, 2, 3, 6, (4, 13))


# Windows given as data (multi_pool2d's h_bounds, w_bounds, level_bins) for a
# 20 x 17 map: overlapping, nested, and leaving rows and columns that no window
# reads (their gradient must be zero). Level 0: bh=2 (H windows 0, 1), bw=1
# (W window 0); level 1: bh=2 (H windows 2, 3), bw=3 (W windows 1, 2, 3).
# Row 0, rows 9-11, row 19 and column 16 are read by no window.
OVERLAPPING_WINDOWS = dict(h_bounds=[1, 5, 3, 9, 12, 19, 2, 8], w_bounds=[1, 4, 6, 16, 0, 8, 8, 9],
                           level_bins=[2, 1, 2, 3], size=(20, 17))


# ---------------------------------------------------------------- long sums in fp64
# For tests/test_precision.py and the precision tests of the CUDA emulator and
# Triton: fp64 sums of large maps in chunks (never an fp64 copy of the map).

def adaptive_windows(size: int, n: int):
    """PyTorch's adaptive windows: [floor(i*a/n), ceil((i+1)*a/n))."""
    return [(i * size // n, -(-(i + 1) * size // n)) for i in range(n)]


def fp64_window_means(x: torch.Tensor, bins, nonnegative: bool = False, chunk_elems: int = 1 << 24):
    """Per level, the (N, C, bh, bw) fp64 means of x and of |x| over
    PyTorch's adaptive windows: one pass over x, H-segment by H-segment (the
    rows between consecutive window bounds), each segment's column sums
    accumulated in fp64 (numpy's float64 reduction) from chunks of rows;
    16-bit chunks are widened to float32 first (exactly). `nonnegative`
    (the caller's data): mean|x| is the mean, no second pass."""
    N, C, H, W = x.shape
    bins = pairs(bins)
    cuts = sorted({v for bh, _ in bins for win in adaptive_windows(H, bh) for v in win})
    rows_per_chunk = max(1, chunk_elems // max(1, N * C * W))
    seg_sum, seg_abs = {}, {}
    for h0, h1 in zip(cuts[:-1], cuts[1:]):
        s = np.zeros((N, C, W))
        a = s if nonnegative else np.zeros((N, C, W))
        for r in range(h0, h1, rows_per_chunk):
            chunk = x[:, :, r:min(h1, r + rows_per_chunk)].detach().cpu()
            if chunk.dtype not in (torch.float32, torch.float64):
                chunk = chunk.float()
            chunk = chunk.numpy()
            s += chunk.sum(axis=2, dtype=np.float64)
            if not nonnegative:
                a += np.abs(chunk).sum(axis=2, dtype=np.float64)
        seg_sum[h0], seg_abs[h0] = torch.from_numpy(s), torch.from_numpy(a)
    means, abs_means = [], []
    for bh, bw in bins:
        m = torch.empty(N, C, bh, bw, dtype=torch.float64)
        am = torch.empty_like(m)
        for i, (h0, h1) in enumerate(adaptive_windows(H, bh)):
            starts = [c for c in cuts if h0 <= c < h1]
            rows_sum = sum(seg_sum[c] for c in starts)
            rows_abs = sum(seg_abs[c] for c in starts)
            for j, (w0, w1) in enumerate(adaptive_windows(W, bw)):
                area = (h1 - h0) * (w1 - w0)
                m[:, :, i, j] = rows_sum[..., w0:w1].sum(-1) / area
                am[:, :, i, j] = rows_abs[..., w0:w1].sum(-1) / area
        means.append(m)
        abs_means.append(am)
    return means, abs_means


def bilinear_taps(in_size: int, out_size: int, align_corners: bool) -> torch.Tensor:
    """(out_size, in_size) fp64 matrix of ATen's bilinear tap weights along one
    axis, computed in float32 with ATen's formulas, one rounding per
    operation: bilinear_weights (above) vectorized over the output
    coordinates (that one loops in Python, too slow for 26755 of them)."""
    f32 = torch.float32
    dst = torch.arange(out_size, dtype=f32)
    if in_size == out_size:
        i0 = torch.arange(out_size)
        lam1 = torch.zeros(out_size, dtype=f32)
    else:
        if align_corners:
            scale = torch.tensor((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0, dtype=f32)
            src = scale * dst
        else:
            scale = torch.tensor(in_size, dtype=f32) / torch.tensor(out_size, dtype=f32)
            src = scale * (dst + 0.5) - 0.5
        src = torch.clamp_min(src, 0.0)
        i0 = torch.floor(src).long().clamp_max(in_size - 1)
        lam1 = torch.clamp(src - i0.to(f32), 0.0, 1.0)
    lam0 = 1.0 - lam1
    i1 = i0 + (i0 < in_size - 1).long()
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    w.index_put_((rows, i0), lam0.double(), accumulate=True)
    w.index_put_((rows, i1), lam1.double(), accumulate=True)
    return w


def fp64_resize_grad(g: torch.Tensor, channel: int, in_hw, align_corners: bool, nonnegative: bool = False,
                     rows_per_chunk: int = 2048):
    """Wy^T G Wx of one channel of g (N = 1) in fp64, and the same with |.|
    (the bound's scale; for non-negative G the same), from chunks of rows."""
    H, W = g.shape[-2:]
    wy = bilinear_taps(in_hw[0], H, align_corners)
    wx = bilinear_taps(in_hw[1], W, align_corners)
    rows = torch.zeros(in_hw[0], W, dtype=torch.float64)
    rows_abs = rows if nonnegative else torch.zeros_like(rows)
    for r in range(0, H, rows_per_chunk):
        chunk = g[0, channel, r:r + rows_per_chunk].detach().cpu().double()
        rows += wy[r:r + rows_per_chunk].T @ chunk
        if not nonnegative:
            rows_abs += wy[r:r + rows_per_chunk].abs().T @ chunk.abs_()
    return rows @ wx, rows_abs @ wx.abs()
