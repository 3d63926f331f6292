"""The "torch" backend: pure-PyTorch implementations of the op contracts.

Same inputs and outputs as the compiled ops (packed pooling output, fused
upsample-concat), built from PyTorch's own operators, so it runs wherever
PyTorch runs and autograd differentiates it. It is the fallback when no
compiled or Triton kernel can serve a tensor, and the readable statement of
what the fused kernels compute.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _ops
from .plan import POOL_AVG, POOL_MAX, POOL_MAX_VALUES, check_pool_args
from .windows import adaptive_windows, level_shapes


def _pack(levels: List[torch.Tensor], channels_last_levels: bool) -> torch.Tensor:
    flat = []
    for t in levels:
        if channels_last_levels:
            t = t.permute(0, 2, 3, 1)
        flat.append(t.flatten(1))
    return torch.cat(flat, 1)


def _window_max(x: torch.Tensor, hs: int, he: int, ws: int, we: int):
    """Max of x[..., hs:he, ws:we] and its flat index into the plane, with
    ATen's CPU rule: the first maximum in row-major order, or the last NaN."""
    width = x.shape[-1]
    win = x[:, :, hs:he, ws:we].reshape(x.shape[0], x.shape[1], -1)
    length = win.shape[-1]
    top = win.detach().amax(-1)
    first_max = (win.detach() == top.unsqueeze(-1)).to(torch.uint8).argmax(-1)
    nan = torch.isnan(win.detach())
    last_nan = (length - 1) - nan.flip(-1).to(torch.uint8).argmax(-1)
    local = torch.where(nan.any(-1), last_nan, first_max)
    wcols = we - ws
    idx = (hs + local // wcols) * width + ws + local % wcols
    # The value gathered at the index, so the gradient goes to that element
    # alone, as ATen's max pooling does (amax would split it among ties).
    val = x.reshape(x.shape[0], x.shape[1], -1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return val, idx


def _are_adaptive(windows, size, n: int) -> bool:
    """Whether `windows` are PyTorch's adaptive windows of n bins over size.
    With the sizes of torch.compile(dynamic=True) both sides are the same
    symbolic expressions (windows.adaptive_windows made them), so the
    comparison is decided without a guard."""
    for (s, e), (adaptive_s, adaptive_e) in zip(windows, adaptive_windows(size, n)):
        if s != adaptive_s or e != adaptive_e:
            return False
    return True


def _generic_level(x, hwins, wwins, mode):
    """Pools x over explicit windows (any policy); used when the windows are
    not PyTorch's adaptive ones, so no single ATen op computes the level."""
    if mode == POOL_AVG:
        height, width = x.shape[-2], x.shape[-1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        ph = torch.zeros(len(hwins), height, dtype=acc, device=x.device)
        pw = torch.zeros(len(wwins), width, dtype=acc, device=x.device)
        for i, (s, e) in enumerate(hwins):
            ph[i, s:e] = 1.0 / (e - s)
        for j, (s, e) in enumerate(wwins):
            pw[j, s:e] = 1.0 / (e - s)
        return torch.einsum("ih,nchw,jw->ncij", ph, x.to(acc), pw).to(x.dtype), None
    vals, idxs = [], []
    for hs, he in hwins:
        row_v, row_i = [], []
        for ws, we in wwins:
            v, i = _window_max(x, hs, he, ws, we)
            row_v.append(v)
            row_i.append(i)
        vals.append(torch.stack(row_v, -1))
        idxs.append(torch.stack(row_i, -1))
    return torch.stack(vals, -2), torch.stack(idxs, -2)


def multi_pool2d(
    x: torch.Tensor,
    h_bounds: Sequence[int],
    w_bounds: Sequence[int],
    level_bins: Sequence[int],
    mode: int,
    channels_last_levels: bool,
):
    """Reference for ``torch.ops.pyramid_ext.multi_pool2d``. A level whose
    windows are PyTorch's adaptive ones is one ``F.adaptive_*_pool2d`` call
    (exactly PyTorch's numbers); other windows are pooled explicitly."""
    check_pool_args(x.shape, h_bounds, w_bounds, level_bins, mode)
    if mode == POOL_MAX_VALUES:  # max pooling's values, no indices; no gradient (as the compiled op)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("multi_pool2d: mode 2 (max, values only) has no gradient, and x requires grad: "
                               "use mode 1")
        values, _ = multi_pool2d(x, h_bounds, w_bounds, level_bins, POOL_MAX, channels_last_levels)
        return values, x.new_empty((0,), dtype=torch.int64)
    if x.numel() == 0:
        # ATen's pooling rejects C == 0; the result is empty either way.
        total = sum(bh * bw for bh, bw in level_shapes(level_bins))
        values = x.new_zeros((x.shape[0], x.shape[1] * total)) + x.sum() * 0  # keeps the graph
        indices = x.new_zeros(values.shape if mode == POOL_MAX else (0,), dtype=torch.int64)
        return values, indices
    values, indices = [], []
    ho = wo = 0
    for bh, bw in level_shapes(level_bins):
        hwins = [(h_bounds[2 * k], h_bounds[2 * k + 1]) for k in range(ho, ho + bh)]
        wwins = [(w_bounds[2 * k], w_bounds[2 * k + 1]) for k in range(wo, wo + bw)]
        ho += bh
        wo += bw
        adaptive = _are_adaptive(hwins, x.shape[-2], bh) and _are_adaptive(wwins, x.shape[-1], bw)
        if adaptive and mode == POOL_AVG:
            v, i = F.adaptive_avg_pool2d(x, (bh, bw)), None
        elif adaptive:
            v, i = F.adaptive_max_pool2d(x, (bh, bw), return_indices=True)
        else:
            v, i = _generic_level(x, hwins, wwins, mode)
        values.append(v)
        indices.append(i)
    packed = _pack(values, channels_last_levels)
    if mode == POOL_MAX:
        return packed, _pack(indices, channels_last_levels)
    return packed, x.new_empty((0,), dtype=torch.int64)


def _interpolate(b: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    if b.numel() == 0:  # ATen's upsampling rejects empty tensors; cat accepts them
        return b.new_zeros((b.shape[0], b.shape[1], size[0], size[1]))
    return F.interpolate(b, size=tuple(size), mode="bilinear", align_corners=align_corners)


def upsample_concat(
    x: Optional[torch.Tensor],
    branches: Sequence[torch.Tensor],
    size: Sequence[int],
    align_corners: bool,
    x_first: bool,
    channels_last: bool,
) -> torch.Tensor:
    """Reference for ``torch.ops.pyramid_ext.upsample_concat``."""
    ups = [_interpolate(b, size, align_corners) for b in branches]
    parts = ([x] + ups if x_first else ups + [x]) if x is not None else ups
    out = torch.cat(parts, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=fmt)


def upsample_concat_out(x, branches, align_corners: bool, x_first: bool, out: torch.Tensor) -> torch.Tensor:
    """Reference for ``torch.ops.pyramid_ext.upsample_concat_out``; returns out."""
    _ops.check_out_disjoint("upsample_concat_out", x, branches, out)
    c = 0
    parts = list(branches)
    if x is not None:
        parts = [x] + parts if x_first else parts + [x]
    size = tuple(out.shape[-2:])
    for p in parts:
        if p is not x:
            p = _interpolate(p, size, align_corners)
        out[:, c : c + p.shape[1]].copy_(p)
        c += p.shape[1]
    return out


def upsample_shift_add(base: torch.Tensor, taps: Sequence[torch.Tensor], kernel_size: int,
                       align_corners: bool) -> torch.Tensor:
    """Reference for ``torch.ops.pyramid_ext.upsample_shift_add``: per kernel
    tap (a, c), the tap's Cout channels resized to base's (H, W), shifted by
    (a - K // 2, c - K // 2) with zero fill (as a stride-1 conv pads), and
    added. 16-bit inputs are accumulated in float32 and rounded once."""
    _ops.check_shift_add_args("upsample_shift_add", base, taps, kernel_size)
    acc = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
    k, pad = kernel_size, kernel_size // 2
    cout, height, width = base.shape[1], base.shape[2], base.shape[3]
    out = base.to(acc, copy=True)  # keeps base's memory format
    for t in taps:
        t = t.to(acc)
        for a in range(k):
            for c in range(k):
                first = (a * k + c) * cout
                up = _interpolate(t[:, first : first + cout], (height, width), align_corners)
                # out[y, x] += up[y + a - pad, x + c - pad] where that is inside the map
                padded = F.pad(up, (pad, pad, pad, pad))
                out += padded[:, :, a : a + height, c : c + width]
    return out.to(base.dtype)
