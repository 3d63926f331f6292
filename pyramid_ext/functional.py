"""Public functional API, named like ``torch.nn.functional``.

Each function validates its arguments (errors name the argument), resolves
the backend once (see pyramid_ext.backends) and calls that backend's op
through the backend table (``backends.implementation``). The compiled
and Triton ops are ``torch.library`` ops with fake kernels and autograd, so
everything here works under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import collections
import threading
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import _ops  # also registers the fake kernels and autograd of the compiled ops
from . import _extension, backends, export
from .plan import POOL_AVG, POOL_MAX, level_offsets
from .windows import level_shapes, normalize_bins, pyramid_windows

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


_channels_last = _ops._channels_last
_dense = _ops._dense


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float64, float32, float16 or bfloat16), got {t.dtype}")


# --------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------


def _pool_args(x, bins, fn: str):
    """Validates the pooling arguments; returns the bins as (bh, bw) pairs."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}(): x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{fn}(): x must be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    _check_float(x, f"{fn}(): x")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"{fn}(): x must have non-zero height and width, got shape {tuple(x.shape)}")
    return normalize_bins(bins, f"{fn}(): bins")


# The eager fast path. A call on a plain tensor, outside torch.compile and
# export, served by the compiled ops, depends on x only through (shape, dtype,
# device, layout): its windows, level_bins and the level views are computed
# (and checked, by the general path's own functions) once per such key and
# kept in a `_C._PoolCall` (csrc/fast_calls.cpp), which calls the op through
# the dispatcher without converting the window lists from Python again. On
# small inputs that per-call Python work cost more than the kernel (issue 12).
# The rest is one C++ call, `_C._pool_fast`: the gate (backend, ONNX export),
# the key (plain values: the cache keeps no memory alive), a bounded LRU of
# _PoolCalls (1024 entries; `_fast_pool_entry` builds one on a miss) and the
# call. Never traced by dynamo, which must see the ops and reads
# `_is_compiling()` as True. That is `torch.compiler.is_dynamo_compiling`, one
# Python frame, not `is_compiling()`, two frames that cost 4-5 us cold after
# the eager code (a thirtieth of the (16, 256, 16, 16) pooling): the tracing
# that only `is_compiling()` reports (non-strict torch.export, make_fx) runs
# on FakeTensors, subclasses, which the C++ checks decline, and a trace of the
# op through the dispatcher would see the op anyway.
_is_compiling = torch.compiler.is_dynamo_compiling
_WANT_CALL, _WANT_LEVELS, _WANT_LEVELS_WITH_INDICES, _WANT_SPP = range(4)  # what _C._pool_fast returns


def _declined(*args):
    """The C++ fast paths' stand-in without the extension: every call declined."""
    return None


_pool_fast = _extension._C._pool_fast if _extension.LOADED else _declined
_compiled_serves = _extension._C._compiled_serves if _extension.LOADED else _declined


def _fast_pool_entry(x, bins, mode: int, channels_last_levels, window: str, fn: str):
    """The _C._PoolCall of calls like this one (the general path's checks run here)."""
    pairs = _pool_args(x, bins, fn)
    unbatched = x.dim() == 3
    n, channels, height, width = (1,) + tuple(x.shape) if unbatched else tuple(x.shape)
    h_bounds, w_bounds, level_bins = pyramid_windows(height, width, pairs, window)
    if channels_last_levels is None:
        channels_last_levels = x.dim() == 4 and not x.is_contiguous()
    # Each level as one as_strided view of the packed (n, channels * total)
    # buffer: what _unpack's slice + view (+ permute) give, in one operation.
    offsets = level_offsets(level_bins, channels)
    row = offsets[-1]
    views = []
    for level, (bh, bw) in enumerate(level_shapes(level_bins)):
        if channels_last_levels:
            size, stride = [n, channels, bh, bw], [row, 1, bw * channels, channels]
        else:
            size, stride = [n, channels, bh, bw], [row, bh * bw, bw, 1]
        if unbatched:
            size, stride = size[1:], stride[1:]
        views.append((size, stride, offsets[level]))
    channels_last_input = x.dim() == 4 and not x.is_contiguous()  # the key's layout: NCHW or channels_last
    return _extension._C._PoolCall(list(h_bounds), list(w_bounds), list(level_bins), mode, channels_last_levels,
                                   unbatched, views, [n, channels, height, width], channels_last_input)


def _lru_get(cache, key):
    """cache[key] (an OrderedDict), marked most recently used, or None."""
    value = cache.get(key)
    if value is not None:
        try:
            cache.move_to_end(key)
        except KeyError:
            pass  # evicted by another thread since the get
    return value


def _fast_pool(x, bins, mode: int, channels_last_levels, window: str, backend: Optional[str], fn: str):
    """The _C._PoolCall serving this eager call, or None where the general path must run
    (also during ONNX export, whose path the caller takes next)."""
    if _is_compiling():
        return None
    return _pool_fast(x, bins, mode, channels_last_levels, window, backend, fn, _WANT_CALL)


if _extension.LOADED:  # a miss builds the call's entry (looked up here per miss: the tests replace it)
    _extension._C._pool_fast_init(lambda *args: _fast_pool_entry(*args))


def _pool_packed(x, bins, mode: int, channels_last_levels, window: str, backend: Optional[str], fn: str):
    pairs = _pool_args(x, bins, fn)
    unbatched = x.dim() == 3
    x4 = x.unsqueeze(0) if unbatched else x
    x4 = _dense(x4)
    height, width = x4.shape[-2], x4.shape[-1]
    h_bounds, w_bounds, level_bins = pyramid_windows(height, width, pairs, window)
    if channels_last_levels is None:
        channels_last_levels = _channels_last(x4)
    impl = backends.implementation(backends.resolve(backend, x4.device, "multi_pool2d"))
    values, indices = impl.multi_pool2d(x4, h_bounds, w_bounds, level_bins, mode, channels_last_levels)
    return values, indices, level_bins, unbatched, channels_last_levels


def _unpack(packed: torch.Tensor, level_bins, channels: int, channels_last_levels: bool, unbatched: bool):
    """Per-level (N, C, bh, bw) views into the packed (N, C * total) buffer."""
    out = []
    offsets = level_offsets(level_bins, channels)
    n = packed.shape[0]
    for level, (bh, bw) in enumerate(level_shapes(level_bins)):
        block = packed[:, offsets[level] : offsets[level + 1]]
        if channels_last_levels:
            level = block.view(n, bh, bw, channels).permute(0, 3, 1, 2)
        else:
            level = block.view(n, channels, bh, bw)
        out.append(level[0] if unbatched else level)
    return out


def multi_adaptive_avg_pool2d(x: torch.Tensor, bins=(1, 2, 3, 6), *, window: str = "adaptive",
                              backend: Optional[str] = None) -> List[torch.Tensor]:
    """Adaptive average pooling of ``x`` at every bin size, in one pass.

    Equal to ``[F.adaptive_avg_pool2d(x, b) for b in bins]``. ``bins``: ints or
    (h, w) pairs; ``x``: (N, C, H, W) or (C, H, W). The results are views into
    one packed buffer (see ``spatial_pyramid_pool``). ``window`` selects the
    window policy (pyramid_ext.windows); the default is PyTorch's.
    """
    if not _is_compiling():  # first: it declines under ONNX export (and export: not a plain tensor)
        levels = _pool_fast(x, bins, POOL_AVG, None, window, backend, "multi_adaptive_avg_pool2d", _WANT_LEVELS)
        if levels is not None:
            return levels
    if export.pool_needs_standard_ops(x, window, backend):  # ONNX export: windows from the runtime size
        return export.multi_pool2d(x, _pool_args(x, bins, "multi_adaptive_avg_pool2d"), "avg", window)[0]
    values, _, level_bins, unbatched, cl = _pool_packed(x, bins, POOL_AVG, None, window, backend,
                                                         "multi_adaptive_avg_pool2d")
    return _unpack(values, level_bins, x.shape[-3], cl, unbatched)


def multi_adaptive_max_pool2d(x: torch.Tensor, bins=(1, 2, 3, 6), *, return_indices: bool = False,
                              window: str = "adaptive", backend: Optional[str] = None):
    """Adaptive max pooling of ``x`` at every bin size, in one pass.

    Equal to ``[F.adaptive_max_pool2d(x, b) for b in bins]``; with
    ``return_indices=True`` also returns the list of int64 flat indices
    (``h * W + w``), identical to PyTorch's on CPU, NaN propagated.
    """
    if not _is_compiling():
        levels = _pool_fast(x, bins, POOL_MAX, None, window, backend, "multi_adaptive_max_pool2d",
                            _WANT_LEVELS_WITH_INDICES if return_indices else _WANT_LEVELS)
        if levels is not None:
            return levels
    if export.pool_needs_standard_ops(x, window, backend):
        vals, idx = export.multi_pool2d(x, _pool_args(x, bins, "multi_adaptive_max_pool2d"), "max", window,
                                        return_indices)
        return (vals, idx) if return_indices else vals
    values, indices, level_bins, unbatched, cl = _pool_packed(x, bins, POOL_MAX, None, window, backend,
                                                               "multi_adaptive_max_pool2d")
    vals = _unpack(values, level_bins, x.shape[-3], cl, unbatched)
    if return_indices:
        return vals, _unpack(indices, level_bins, x.shape[-3], cl, unbatched)
    return vals


def spatial_pyramid_pool(x: torch.Tensor, bins=(4, 2, 1), *, mode: str = "max", window: str = "adaptive",
                         backend: Optional[str] = None) -> torch.Tensor:
    """SPPNet's spatial pyramid pooling: a fixed-length (N, C * sum(bh * bw)) vector.

    Equal to ``torch.cat([F.adaptive_{mode}_pool2d(x, b).flatten(1) for b in bins], 1)``.
    """
    if mode not in ("max", "avg"):
        raise ValueError(f"spatial_pyramid_pool(): mode must be 'max' or 'avg', got {mode!r}")
    if not _is_compiling():
        vector = _pool_fast(x, bins, POOL_MAX if mode == "max" else POOL_AVG, False, window, backend,
                            "spatial_pyramid_pool", _WANT_SPP)
        if vector is not None:
            return vector
    if export.pool_needs_standard_ops(x, window, backend):
        return export.spatial_pyramid_pool(x, _pool_args(x, bins, "spatial_pyramid_pool"), mode, window)
    values, _, _, unbatched, _ = _pool_packed(x, bins, POOL_MAX if mode == "max" else POOL_AVG, False, window,
                                              backend, "spatial_pyramid_pool")
    return values[0] if unbatched else values


# --------------------------------------------------------------------------
# Upsample + concat
# --------------------------------------------------------------------------


def _traced_size(v) -> bool:
    """A size the TorchScript tracer (ONNX export, dynamo=False) hands out for
    ``x.shape[i]``: a 0-d integer tensor."""
    return isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point()


def _pair(size, name: str) -> Tuple[int, int]:
    if isinstance(size, int) or isinstance(size, torch.SymInt):
        size = (size, size)
    try:
        h, w = size
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or an (H, W) pair, got {size!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not (isinstance(v, (int, torch.SymInt)) or _traced_size(v)):
            raise TypeError(f"{name} must be an int or an (H, W) pair of ints, got {tuple(size)!r}")
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"{name} must be positive, got {tuple(size)!r}")
    return h, w


def upsample_concat(x: Optional[torch.Tensor], branches: Sequence[torch.Tensor], *,
                    size: Union[int, Tuple[int, int], None] = None, align_corners: bool = False,
                    x_first: bool = True, out: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Bilinearly resizes each branch to ``size`` and concatenates with ``x``.

    Equal to ``torch.cat([x] + [F.interpolate(b, size, mode="bilinear",
    align_corners=align_corners) for b in branches], 1)``, written in one pass
    into one output. ``size`` defaults to x's (H, W). ``x_first=False`` puts x
    last; ``x=None`` concatenates the branches alone (``size`` required).
    ``out``: a tensor (or a channel slice of a bigger buffer) to fill in place.
    An input whose memory overlaps ``out``'s (same storage, intersecting byte
    ranges) is copied first, so the result is computed from the inputs'
    values before the call, as PyTorch's ``out=`` ops do; an input that shares
    out's storage without overlapping it (another channel slice of the same
    buffer, for a batch of one) is read in place. Channel slices of a batch of
    several samples interleave in memory and count as overlapping.
    """
    if not _is_compiling():
        fast = _upsample_concat_fast(x, branches, size, align_corners, x_first, out, backend)
        if fast is not None:
            return fast
    fn = "upsample_concat()"
    if isinstance(branches, torch.Tensor):
        raise TypeError(f"{fn}: branches must be a list of tensors, got a single Tensor")
    try:
        branches = list(branches)
    except TypeError:
        raise TypeError(f"{fn}: branches must be a list of tensors, got {type(branches).__name__}") from None
    tensors = []
    if x is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: x must be a torch.Tensor or None, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{fn}: x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        _check_float(x, f"{fn}: x")
        if x.shape[-2] == 0 or x.shape[-1] == 0:
            raise ValueError(f"{fn}: x must have non-zero height and width, got shape {tuple(x.shape)}")
        tensors.append(("x", x))
    elif size is None:
        raise ValueError(f"{fn}: size is required when x is None")
    if x is None and not branches:
        raise ValueError(f"{fn}: needs x or at least one branch")
    for i, b in enumerate(branches):
        name = f"branches[{i}]"
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(b).__name__}")
        if b.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D (N, C, h, w) tensor, got shape {tuple(b.shape)}")
        _check_float(b, f"{fn}: {name}")
        if b.shape[-2] == 0 or b.shape[-1] == 0:
            raise ValueError(f"{fn}: {name} must have non-zero height and width, got shape {tuple(b.shape)}")
        tensors.append((name, b))
    ref_name, ref = tensors[0]
    for name, t in tensors[1:]:
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.shape[0] != ref.shape[0]:
            raise ValueError(f"{fn}: {name} has batch size {t.shape[0]} but {ref_name} has {ref.shape[0]}")
    size = _pair(size if size is not None else x.shape[-2:], f"{fn}: size")
    if x is not None and not any(map(_traced_size, size)) and (size[0] != x.shape[-2] or size[1] != x.shape[-1]):
        # x is concatenated as is, never resized.
        raise ValueError(f"{fn}: size {tuple(size)} must equal x's height and width {tuple(x.shape[-2:])} "
                         "(x is not resized; pass size only with x=None, or resize x first)")
    dtype = ref.dtype
    for _, t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if x is not None:
        x = _dense(x.to(dtype))
    branches = [_dense(b.to(dtype)) for b in branches]
    if export.active():
        return export.upsample_concat(x, branches, size, align_corners, x_first, out)
    channels_last = _channels_last(x) if x is not None else _channels_last(branches[0])
    impl = backends.implementation(backends.resolve(backend, ref.device, "upsample_concat"))

    if out is not None:
        _check_out(out, x, branches, size, dtype, ref.device, fn)
        if torch.is_grad_enabled() and any(t.requires_grad for _, t in tensors):
            raise RuntimeError(f"{fn}: out= does not support automatic differentiation, but an input requires grad")
        if torch.is_grad_enabled() and out.requires_grad:  # autograd would not see the write (as ATen's out= ops)
            raise RuntimeError(f"{fn}: out= does not support automatic differentiation, but out requires grad")
        # The ops reject inputs that overlap out (they read while writing out):
        # those are copied here, the others passed as they are.
        if x is not None and _ops.overlaps(x, out):
            x = x.clone()
        branches = [b.clone() if _ops.overlaps(b, out) else b for b in branches]
        impl.upsample_concat_out(x, branches, align_corners, x_first, out)
        return out
    return impl.upsample_concat(x, branches, list(size), align_corners, x_first, channels_last)


# upsample_concat's eager fast path, out= or not: the common call (plain
# tensors of one float dtype and device, dense, x's size or a given one; for
# out=, out dense, of the inputs' dtype, device and the result's shape,
# sharing no storage with any input, neither out nor an input requiring grad
# in grad mode), served by the compiled op, straight to it, checked in one C++
# call (csrc/fast_calls.cpp, `_upsample_concat_fast`, with the gate of
# csrc/fast_call_gate.cpp); None wherever anything differs (promotion, a
# copy, another backend, ONNX export, a subclass, an error), and the general
# path runs, raising its errors. Outside torch.compile only. Why C++: the
# checks as Python attribute reads took about 9 us, but 45 us right after the
# kernel had swept L1 and L2 (12 MiB on (16, 256, 16, 16)), a tenth of the op
# at one thread; before them the general path's checks had taken 80 us there.
_upsample_concat_fast = _extension._C._upsample_concat_fast if _extension.LOADED else _declined


def _check_out(out, x, branches, size, dtype, device, fn: str) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{fn}: out must be a torch.Tensor, got {type(out).__name__}")
    ref = x if x is not None else branches[0]
    channels = (x.shape[1] if x is not None else 0) + sum(b.shape[1] for b in branches)
    expected = (ref.shape[0], channels, size[0], size[1])
    if tuple(out.shape) != tuple(expected):
        raise ValueError(f"{fn}: out has shape {tuple(out.shape)}, expected {expected}")
    if out.dtype != dtype:
        raise TypeError(f"{fn}: out has dtype {out.dtype}, expected {dtype}")
    if out.device != device:
        raise ValueError(f"{fn}: out is on {out.device}, expected {device}")
    if torch._debug_has_internal_overlap(out) == 1:  # MemOverlap::Yes, e.g. expanded (stride 0)
        raise ValueError(f"{fn}: out has elements that share memory (e.g. an expanded tensor, stride "
                         f"{tuple(out.stride())}); it must be writable element by element")


# --------------------------------------------------------------------------
# Upsample + concat + conv, without the concatenation
# --------------------------------------------------------------------------

# Cost of the kernel op per tap, output element and output channel, in units
# of one multiply-add of a convolution (it reads four source values and
# writes once; measured against the ATen convs, docs/DESIGN.md).
_SHIFT_ADD_COST = 8

# Test only (tests/test_upsample_concat_conv.py, `forced_plan`): None, or a
# dict forcing the plan: {"mode": "taps" | "resize", "chunks": int or None}.
_FORCED_PLAN = None


class _ConvPlan:
    """How upsample_concat_conv2d computes each branch's share of the conv.

    ``taps``: branches computed as tap products at their own resolution (one
    1x1 conv each) and resized, shifted and added by the kernel op;
    ``concat``: branches concatenated with x (resized first where their size
    differs) and convolved with x's columns of the weight in one ATen conv;
    ``chunks``: the output channels are computed in that many chunks (each a
    conv of the concatenated part, the chunk's tap products and one kernel
    op call), so the tap products of one chunk only are held at once.
    """

    def __init__(self, taps, concat, chunks):
        self.taps, self.concat, self.chunks = list(taps), list(concat), chunks

    def __repr__(self):
        return f"_ConvPlan(taps={self.taps}, concat={self.concat}, chunks={self.chunks})"


def _plan_peak(plan: _ConvPlan, n, cx, channels, areas, cout, k, hw) -> int:
    """Temporary elements the plan holds at its peak (inputs and the result
    not counted), as upsample_concat_conv2d below computes it."""
    concat_members = (1 if cx else 0) + len(plan.concat)
    # The concatenation of x and the concat branches exists only when it has
    # more than one member or a member to resize (a lone x or same-size
    # branch is convolved as it is).
    held = 0
    if concat_members > 1 or any(areas[i] != hw for i in plan.concat):
        held = n * (cx + sum(channels[i] for i in plan.concat)) * hw
    if not plan.taps:
        return held
    tap_area = sum(areas[i] for i in plan.taps)
    if plan.chunks == 1:
        # conv(concat) -> base while the concatenation lives; then base + tap products
        return max(held + n * cout * hw, n * cout * hw + n * k * k * cout * tap_area)
    chunk = -(-cout // plan.chunks)
    # the concatenation for all chunks; per chunk its base, result and tap products
    return held + n * chunk * (2 * hw + k * k * tap_area)


def _choose_plan(n, cx, channels, sizes, cout, k, height, width) -> _ConvPlan:
    """Per branch by cost, then the memory rule: never more temporary memory
    than the concatenation (n * (cx + sum channels) * H * W elements)."""
    hw = height * width
    areas = [h * w for h, w in sizes]
    budget = n * (cx + sum(channels)) * hw
    forced = _FORCED_PLAN
    if forced is None and torch.compiler.is_exporting() and any(
            isinstance(v, torch.SymInt) for v in (n, height, width, *(d for hw_ in sizes for d in hw_))):
        # torch.export with dynamic sizes: the cost and memory comparisons below
        # would guard on the symbolic sizes (the program would hold for one plan's
        # sizes only); the concatenating way is exact at every size.
        return _ConvPlan([], [i for i, cb in enumerate(channels) if cb != 0], 1)
    taps, concat = [], []
    for i, ((h, w), cb) in enumerate(zip(sizes, channels)):
        if cb == 0:
            continue  # contributes nothing
        if forced is not None:
            (taps if forced["mode"] == "taps" else concat).append(i)
            continue
        if (h, w) == (height, width):
            concat.append(i)  # a plain conv, no resize
            continue
        # tap products at the branch's resolution plus the kernel op, against
        # the conv at the output's resolution (and the resize, ~4 per element)
        tap_cost = k * k * cout * (cb * areas[i] + _SHIFT_ADD_COST * hw)
        resize_cost = k * k * cout * cb * hw + 4 * cb * hw
        (taps if areas[i] < hw and tap_cost < resize_cost else concat).append(i)
    if forced is not None:  # test only: the strategy as forced, whatever the memory
        return _ConvPlan(taps, concat, min(forced.get("chunks") or 1, cout) if taps else 1)
    while taps:
        for chunks in range(1, cout + 1):
            if chunks > 1 and -(-cout // chunks) == -(-cout // (chunks - 1)):
                continue  # same chunk size
            plan = _ConvPlan(taps, concat, chunks)
            if _plan_peak(plan, n, cx, channels, areas, cout, k, hw) <= budget:
                return plan
        # even one output channel at a time does not fit: resize the branch
        # with the largest tap products first instead
        largest = max(taps, key=lambda i: areas[i])
        taps.remove(largest)
        concat.append(largest)
    return _ConvPlan([], concat, 1)


# Pixels (N*H*W) up to which a 1x1 convolution on CPU is one matrix product over
# the pixels: on small maps ATen's convolution is mostly oneDNN's reorders (2
# threads, channels_last, 64 to 64 channels on (16, 64, 6, 6): 51 against 27 us;
# 512 to 512 on (2, 512, 6, 6): 274 against 136 us); on (16, 256, 16, 16) (4096
# pixels) the convolution was faster (425 against 479 us). One sample: the
# convolution has a fast path there (7-18 against 12-19 us on 1x1 to 6x6 maps
# of 16 to 256 channels), and a batch of one is the tiny, overhead-bound case.
SMALL_CONV_PIXELS = 2048
PRODUCT_MIN_SAMPLES = 2  # (the one-sample reason above; pyramid_ext.nn skips its checks below it)


def _cpu_float_1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """A 1x1 convolution that ``_conv`` may compute as a matrix product: CPU float32/float64,
    weight and bias of x's dtype, no autocast (it would pick another dtype)."""
    return (x.device.type == "cpu" and x.dim() == 4 and weight.dim() == 4 and weight.shape[-2:] == (1, 1)
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and not torch.is_autocast_enabled("cpu"))


def _takes_as_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`_conv1x1_as_product` computes this 1x1 convolution."""
    # (compile: the size test would guard on symbolic sizes)
    if not _cpu_float_1x1(x, weight, bias) or torch.compiler.is_compiling():
        return False
    n, cin, height, width = x.shape
    return n >= PRODUCT_MIN_SAMPLES and n * height * width <= SMALL_CONV_PIXELS and weight.shape[1] == cin


def _conv1x1_as_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``F.conv2d(x, weight, bias)`` for a 1x1 weight as one product over x's pixels, in x's
    layout (channels_last stays channels_last, else NCHW), or None where that is not the
    faster or not the same computation: the compiled extension (csrc/branch_tails.cpp,
    pointwise_tail), CPU float32/float64 only, no autocast, at least two
    samples and at most SMALL_CONV_PIXELS pixels, eager only (compile and export keep the
    convolution). Sums in another order than the convolution (same dtype, same bound)."""
    if not _takes_as_product(x, weight, bias) or not _extension.LOADED:
        return None  # without the extension the convolution runs (the product is pointwise_tail's)
    return _extension._C._pointwise_tail(x, weight, bias, None, None, None, None, 0.0, 0)


def _products_in_one_call(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> bool:
    """Whether several 1x1 convolutions without bias are one ``_C._pointwise_tails`` call: two or
    more, each a product (``_takes_as_product``, any layout), float32 on our product kernel
    (csrc/cpu/pointwise_product.h), no autograd to record. The call cuts their samples
    among the threads, one parallel region for all of them (upsample_concat_conv2d's tap
    products of a PPM's four levels: four calls before, one with ATen's bmm for the NCHW 6x6
    level). Sums as ``_conv1x1_as_product`` does, each output in one order."""
    if len(xs) < 2 or not all(t.dtype == torch.float32 and _takes_as_product(t, w, None)
                              for t, w in zip(xs, weights)):
        return False
    return _kernel_without_autograd((*xs, *weights))


def _kernel_without_autograd(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """The gates' common part: products of these tensors (float32, checked by the caller)
    may run on the product kernel: the extension is built, autograd records nothing (the
    kernel has no backward; with autograd the ops or the tails node run), and the kernel has
    a copy for this CPU (``_C._pointwise_product_available``)."""
    if not _extension.LOADED or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors)):
        return False
    return _extension._C._pointwise_product_available()


def _large_product_on_kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether a 1x1 convolution of a float32 map, channels_last or NCHW of a multiple of 16
    pixels (the kernel's planes), runs on the product kernel (csrc/cpu/pointwise_product.h,
    through ``_C._pointwise_tail``) instead of ATen's convolution or the per-sample ``bmm``
    below: a weight of at most ``_C._PRODUCT_KERNEL_MAX_WEIGHT`` floats (cin * cout; the C++ bound,
    checked again there), no autograd to record, eager.
    Why: upsample_concat_conv2d's x on (16, 256, 16, 16) to 64 channels, two threads, Intel
    Xeon, in a loop / after eager code ran: channels_last, oneDNN's convolution 575 / 700 us,
    the kernel 478 / 505; NCHW, ``baddbmm`` 465 / 637, the kernel 460 / 567 (the same values
    here, each output an FMA chain over the input channels as MKL's)."""
    # (first: under compile or export the size tests below would guard on symbolic sizes)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not _extension.LOADED:
        return False
    if x.dtype != torch.float32 or x.dim() != 4 or x.shape[-2] * x.shape[-1] < 2:
        return False
    if x.stride(1) != 1 and not (x.is_contiguous() and (x.shape[-2] * x.shape[-1]) % 16 == 0):
        return False
    if (weight.shape[0] * weight.shape[1] > _extension._C._PRODUCT_KERNEL_MAX_WEIGHT
            or not _cpu_float_1x1(x, weight, bias)):
        return False
    return weight.shape[1] == x.shape[1] and _kernel_without_autograd((x, weight, bias))


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pad: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=pad)``; for a 1x1 float32/float64 weight on CPU,
    a small channels_last map (``_conv1x1_as_product``) is one product over its pixels, and
    an NCHW x one batched matrix product per sample (weight @ x[n] as (Cout, Cin) @ (Cin, H*W),
    the bias added by baddbmm), an NCHW result: ATen's
    convolution reorders an NCHW input and its output to its blocked layout on every call
    (on (16, 256, 16, 16) to 64 channels, one thread's CPU time under load: 3.2 against 2.6 ms
    for the product); an NCHW map of fewer than 16 pixels is the product over its pixels
    (``_conv1x1_as_product``: x's pixels copied in, the result out), where MKL's bmm was slower
    (the four tap products of upsample_concat_conv2d on (16, 64, b, b), b = 1, 2, 3, 6, one
    thread: 391-407 us with bmm from 2x2 on, 224-234 us so). A larger channels_last x keeps the
    convolution (an addmm over its pixels was slower there: 3.4 against 2.1 ms), unless the
    weight is small enough for the product kernel (``_large_product_on_kernel``, float32 without
    autograd, which also takes NCHW planes of a multiple of 16 pixels first).
    The product sums in another order than the convolution (same dtype, same bound)."""
    if pad == 0 and _large_product_on_kernel(x, weight, bias):
        return _extension._C._pointwise_tail(x, weight, bias, None, None, None, None, 0.0, 0)
    # NCHW x: the per-sample product below, but below 16 pixels pointwise_tail's rows (eager
    # only: compile and export take no product there and must not guard on the size)
    nchw = x.is_contiguous() and x.stride(1) != 1
    if pad == 0 and not (nchw and (torch.compiler.is_compiling() or x.shape[-2] * x.shape[-1] >= 16)):
        out = _conv1x1_as_product(x, weight, bias)
        if out is not None:
            return out
    if not _cpu_float_1x1(x, weight, bias) or not x.is_contiguous():
        return F.conv2d(x, weight, bias, padding=pad)
    n, cin, height, width = x.shape
    cout = weight.shape[0]
    w3d = weight.reshape(cout, cin).expand(n, cout, cin)
    cols = x.view(n, cin, height * width)
    if bias is None:
        return torch.bmm(w3d, cols).view(n, cout, height, width)
    return torch.baddbmm(bias.view(1, cout, 1).expand(n, cout, height * width), w3d, cols).view(n, cout, height, width)


def upsample_concat_conv2d(x: Optional[torch.Tensor], branches: Sequence[torch.Tensor], weight: torch.Tensor,
                           bias: Optional[torch.Tensor] = None, *, size: Union[int, Tuple[int, int], None] = None,
                           align_corners: bool = False, x_first: bool = True,
                           backend: Optional[str] = None) -> torch.Tensor:
    """The convolution of an upsample-concatenation, without the concatenation.

    Equal to ``F.conv2d(upsample_concat(x, branches, size=size,
    align_corners=align_corners, x_first=x_first), weight, bias,
    padding=weight.shape[-1] // 2)`` (stride 1, dilation 1, groups 1, odd
    square kernel). The weight is split along its input channels: x's
    columns convolve x; a branch smaller than the output is convolved at its
    own resolution with every kernel tap (one 1x1 conv giving K*K*Cout "tap
    products"), and the kernel op ``upsample_shift_add`` resizes, shifts and
    adds them into the output in one pass; other branches are resized first
    (or, at the output's size, taken as they are) and convolved with x. The
    choice is per branch, by cost, within the memory of the concatenation.
    ``backend`` names the backend of the kernel op (and of the resize of
    branches resized first); the convolutions are ATen's.
    """
    fast = _fast_uc_conv(x, branches, weight, bias, size, align_corners, x_first, backend)
    if fast is not None:
        return fast
    key = _fast_uc_conv_key(x, branches, weight, bias, size, x_first, backend)
    if key is not None:
        setup = _lru_get(_FAST_UC_CONV, key)
        if setup is not None:
            _remember_for_cpp(x, branches, weight, bias, setup, x_first)
            return _uc_conv_run(x, branches, weight, bias, setup, align_corners, backends.implementation("cpp"))
    fn = "upsample_concat_conv2d()"
    backends.requested_backend(backend)  # a bad name raises even where no backend op runs
    if isinstance(branches, torch.Tensor):
        raise TypeError(f"{fn}: branches must be a list of tensors, got a single Tensor")
    try:
        branches = list(branches)
    except TypeError:
        raise TypeError(f"{fn}: branches must be a list of tensors, got {type(branches).__name__}") from None
    tensors = []
    if x is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: x must be a torch.Tensor or None, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{fn}: x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        _check_float(x, f"{fn}: x")
        if x.shape[-2] == 0 or x.shape[-1] == 0:
            raise ValueError(f"{fn}: x must have non-zero height and width, got shape {tuple(x.shape)}")
        tensors.append(("x", x))
    elif size is None:
        raise ValueError(f"{fn}: size is required when x is None")
    if x is None and not branches:
        raise ValueError(f"{fn}: needs x or at least one branch")
    for i, b in enumerate(branches):
        name = f"branches[{i}]"
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(b).__name__}")
        if b.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D (N, C, h, w) tensor, got shape {tuple(b.shape)}")
        _check_float(b, f"{fn}: {name}")
        if b.shape[-2] == 0 or b.shape[-1] == 0:
            raise ValueError(f"{fn}: {name} must have non-zero height and width, got shape {tuple(b.shape)}")
        tensors.append((name, b))
    ref_name, ref = tensors[0]
    for name, t in tensors[1:]:
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.shape[0] != ref.shape[0]:
            raise ValueError(f"{fn}: {name} has batch size {t.shape[0]} but {ref_name} has {ref.shape[0]}")
    size = _pair(size if size is not None else x.shape[-2:], f"{fn}: size")
    if x is not None and not any(map(_traced_size, size)) and (size[0] != x.shape[-2] or size[1] != x.shape[-1]):
        raise ValueError(f"{fn}: size {tuple(size)} must equal x's height and width {tuple(x.shape[-2:])} "
                         "(x is not resized; pass size only with x=None, or resize x first)")
    dtype = ref.dtype
    for _, t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    cx = x.shape[1] if x is not None else 0
    channels = [b.shape[1] for b in branches]
    in_channels = cx + sum(channels)
    _check_conv_weight(weight, bias, in_channels, dtype, ref.device, fn)
    k = weight.shape[-1]
    pad = k // 2
    if x is not None:
        x = _dense(x.to(dtype))
    branches = [_dense(b.to(dtype)) for b in branches]
    if export.active():  # ONNX: the concatenating way, standard ops only
        return F.conv2d(export.upsample_concat(x, branches, size, align_corners, x_first, None), weight, bias,
                        padding=pad)

    setup = _uc_conv_setup(x, branches, weight, size, x_first)
    if key is not None:  # checked: later calls with this key take the fast path
        with _FAST_UC_CONV_LOCK:
            _FAST_UC_CONV[key] = setup
            while len(_FAST_UC_CONV) > _FAST_UC_CONV_MAX:
                _FAST_UC_CONV.popitem(last=False)
        _remember_for_cpp(x, branches, weight, bias, setup, x_first)
    return _uc_conv_run(x, branches, weight, bias, setup, align_corners, None, backend)


# The eager fast path of upsample_concat_conv2d: a call on plain dense tensors of
# one dtype, outside torch.compile and export, served by the compiled ops, depends
# on its arguments only through their sizes, dtypes, device and layouts, and on
# those only through a _UcConvSetup, kept per such key once the general path has
# checked a call with it (a bounded LRU; the key holds no tensor;
# an argument the checks would reject never gets a key cached, so the errors are
# the general path's). A hit skips the general path's checks and
# plan: about 0.2 ms of a 1.3 ms call on (16, 256, 16, 16) (one thread, under
# load; the checks ran with L1 and L2 swept by the convolutions of the call before).
_FAST_UC_CONV: "collections.OrderedDict" = collections.OrderedDict()
_FAST_UC_CONV_MAX = 256  # entries (a model has a few such layers)
_FAST_UC_CONV_LOCK = threading.Lock()


def _fast_uc_conv_key(x, branches, weight, bias, size, x_first, backend):
    """The cache key of a call the fast path may serve, else None."""
    if (type(x) is not torch.Tensor or (type(branches) is not list and type(branches) is not tuple)
            or type(weight) is not torch.Tensor or (bias is not None and type(bias) is not torch.Tensor)
            or torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or _FORCED_PLAN is not None  # (a forced plan: not a cached one)
            or torch._C._are_functorch_transforms_active()):  # (vmap answers no channels_last query)
        return None
    if x.dim() != 4:
        return None
    dtype, device = x.dtype, x.device
    if size is not None:
        if type(size) is not tuple or len(size) != 2 or type(size[0]) is not int \
                or type(size[1]) is not int or size[0] != x.shape[2] or size[1] != x.shape[3]:
            return None
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return None  # needs a copy: the general path
    shapes = []
    for b in branches:
        if type(b) is not torch.Tensor or b.dtype != dtype or b.device != device or b.dim() != 4 \
                or not (b.is_contiguous() or b.is_contiguous(memory_format=torch.channels_last)):
            return None
        shapes.append(b.shape)
    if weight.dtype != dtype or weight.device != device or (bias is not None and (
            bias.dtype != dtype or bias.device != device)):
        return None
    # both ops compiled for this backend and device, no ONNX export (the C++ fast paths' gate)
    if not _compiled_serves(backend, device.type, "upsample_shift_add") or \
            not _compiled_serves(backend, device.type, "upsample_concat"):
        return None
    return (x.shape, dtype, device, _channels_last(x), tuple(shapes), weight.shape, _channels_last(weight),
            None if bias is None else bias.shape, x_first)


def _fast_uc_conv(x, branches, weight, bias, size, align_corners, x_first, backend):
    """The C++ fast path (csrc/uc_conv_fast.cpp, `_uc_conv_fast`): a no-grad float32 call whose
    sizes and layouts ``_remember_for_cpp`` registered, computed in one C++ call (the
    general path's steps and bits, the shift-add in place); None elsewhere. Eager only:
    under compile, export and tracing the ops must be seen."""
    if _is_compiling() or _FORCED_PLAN is not None or not _extension.LOADED:
        return None
    return _extension._C._uc_conv_fast(x, branches, weight, bias, size, align_corners, x_first, backend)


def _remember_for_cpp(x, branches, weight, bias, setup: "_UcConvSetup", x_first) -> None:
    """Registers this call's sizes and layouts with the C++ fast path where its plan is the
    one that path computes: x given, a 1x1 kernel, every branch (two or more) as tap products
    in one chunk, x's product on the product kernel (``_large_product_on_kernel``) and the
    tap products in one call (``_products_in_one_call``), an NCHW-contiguous weight (the
    output in x's layout). The C++ side checks grad, modes and the kernel on every call."""
    # (autograd to record first: the general path runs here on every call the C++ path declined, a
    # training step's among them, which the gates below would reject only at their end)
    if not setup.cpp_plan or not _kernel_without_autograd((x, weight, bias, *branches)):
        return
    if _FORCED_PLAN is not None or _channels_last(weight) or not _large_product_on_kernel(
            x, weight[:, setup.first : setup.first + setup.cx], bias):
        return
    if _products_in_one_call(branches, [weight[:, o : o + c] for o, c in zip(setup.offsets, setup.channels)]):
        _extension._C._uc_conv_remember(x, list(branches), weight, bias, x_first)


class _UcConvSetup:
    """What upsample_concat_conv2d computes from its arguments' sizes and
    layouts alone (checked already): the plan, each branch's weight columns,
    the output's layout. The eager fast path keeps it per key."""

    __slots__ = ("plan", "offsets", "first", "cx", "channels", "fmt", "n", "cout", "height", "width", "k",
                 "cpp_plan")

    def __init__(self, plan, offsets, first, cx, channels, fmt, n, cout, height, width, k):
        self.plan, self.offsets, self.first, self.cx, self.channels = plan, offsets, first, cx, channels
        self.fmt, self.n, self.cout, self.height, self.width, self.k = fmt, n, cout, height, width, k
        # the plan _C._uc_conv_fast computes (_remember_for_cpp checks the rest)
        self.cpp_plan = (k == 1 and cx > 0 and plan.chunks == 1 and not plan.concat and len(channels) >= 2
                         and len(plan.taps) == len(channels))


def _uc_conv_setup(x, branches, weight, size, x_first) -> _UcConvSetup:
    # The output's layout: what F.conv2d over the concatenation gives (channels_last
    # when the concatenation, laid out as x or the first branch, or the weight is).
    lead = x if x is not None else branches[0]
    fmt = torch.channels_last if (_channels_last(lead) or _channels_last(weight)) else torch.contiguous_format
    n, cout = lead.shape[0], weight.shape[0]
    height, width = size
    k = weight.shape[-1]
    cx = x.shape[1] if x is not None else 0
    channels = [b.shape[1] for b in branches]
    # The weight's columns of x and of each branch, in concatenation order.
    first = 0 if x_first or x is None else sum(channels)
    offsets = []
    c = cx if x_first and x is not None else 0
    for cb in channels:
        offsets.append(c)
        c += cb
    plan = _choose_plan(n, cx, channels, [tuple(b.shape[-2:]) for b in branches], cout, k, height, width)
    return _UcConvSetup(plan, offsets, first, cx, channels, fmt, n, cout, height, width, k)


def _uc_conv_run(x, branches, weight, bias, setup: _UcConvSetup, align_corners, impl, backend=None):
    """upsample_concat_conv2d's computation (arguments checked, dense, of one dtype);
    impl: the backend entry of its ops, or None (resolved from backend)."""
    plan, offsets, channels, fmt, k = setup.plan, setup.offsets, setup.channels, setup.fmt, setup.k
    n, cout, height, width = setup.n, setup.cout, setup.height, setup.width
    pad = k // 2
    device = x.device if x is not None else branches[0].device
    w_x = weight[:, setup.first : setup.first + setup.cx]

    # x and the concat branches: one tensor to convolve (the concatenation,
    # resized where needed, or a lone x / same-size branch as it is) and its
    # weight columns.
    parts = [(x, w_x)] if x is not None else []
    parts += [(branches[i], weight[:, offsets[i] : offsets[i] + channels[i]]) for i in plan.concat]
    concat_in = concat_w = None
    if len(parts) == 1 and tuple(parts[0][0].shape[-2:]) == (height, width):
        concat_in, concat_w = parts[0]
    elif parts:
        resized = [p for p, _ in parts[1:]] if x is not None else [p for p, _ in parts]
        uc_impl = impl or backends.implementation(backends.resolve(backend, device, "upsample_concat"))
        concat_in = uc_impl.upsample_concat(x, resized, [height, width], align_corners, True,
                                            fmt == torch.channels_last)
        concat_w = torch.cat([w for _, w in parts], 1)
    del parts
    if not plan.taps:
        return _conv(concat_in, concat_w, bias, pad).contiguous(memory_format=fmt)

    impl = impl or backends.implementation(backends.resolve(backend, device, "upsample_shift_add"))

    def tap_weight(i, lo, hi):
        # (cc, Cb, K, K) -> (K*K*cc, Cb, 1, 1): channel (a * K + c) * cc + o, tap-major (a copy for K > 1)
        return weight[lo:hi, offsets[i] : offsets[i] + channels[i]].permute(2, 3, 0, 1).reshape(
            k * k * (hi - lo), channels[i], 1, 1)

    def taps_of(lo, hi):
        """Tap products of output channels [lo, hi) of every tap branch."""
        xs = [branches[i] for i in plan.taps]
        if k == 1:  # the weights are views: all of them at once, maybe one call
            ws = [tap_weight(i, lo, hi) for i in plan.taps]
            if _products_in_one_call(xs, ws):
                return _extension._C._pointwise_tails([(t, w, None, None, None, None, None, 0.0, 0)
                                                       for t, w in zip(xs, ws)])
            return [_conv(t, w, None, 0) for t, w in zip(xs, ws)]
        # one weight copy alive at a time (a 3x3 conv's 4096 -> 512 taps: 9 MiB each)
        return [_conv(t, tap_weight(i, lo, hi), None, 0) for t, i in zip(xs, plan.taps)]

    def result_of(lo, hi):
        """Output channels [lo, hi): conv(x and concat branches) + bias as the
        base, the tap products resized, shifted and added to it."""
        nonlocal concat_in
        bias_part = bias[lo:hi] if bias is not None else None
        if concat_in is not None:
            base = _conv(concat_in, concat_w[lo:hi], bias_part, pad).contiguous(memory_format=fmt)
            if hi - lo == cout:
                concat_in = None  # one chunk: freed before the tap products exist (unless autograd keeps it)
            return impl.upsample_shift_add(base, taps_of(lo, hi), k, align_corners)
        taps = taps_of(lo, hi)
        # the convs' dtype (the inputs', or autocast's)
        base = torch.empty((n, hi - lo, height, width), dtype=taps[0].dtype, device=device,
                           memory_format=fmt).zero_()
        if bias_part is not None:
            base.add_(bias_part.to(base.dtype).view(1, -1, 1, 1))
        return impl.upsample_shift_add(base, taps, k, align_corners)

    if plan.chunks == 1:
        return result_of(0, cout)
    # One chunk of output channels at a time, each written into the output.
    step = -(-cout // plan.chunks)
    out = None
    for lo in range(0, cout, step):
        part = result_of(lo, min(cout, lo + step))
        if out is None:
            out = torch.empty((n, cout, height, width), dtype=part.dtype, device=device, memory_format=fmt)
        out[:, lo : lo + part.shape[1]] = part
    return out


def _check_conv_weight(weight, bias, in_channels, dtype, device, fn: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"{fn}: weight must be a 4-D (Cout, Cin, K, K) tensor, got shape {tuple(weight.shape)}")
    if weight.shape[1] != in_channels:
        raise ValueError(f"{fn}: weight has {weight.shape[1]} input channels but the concatenation has "
                         f"{in_channels} (x and branches)")
    kh, kw = weight.shape[-2], weight.shape[-1]
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"{fn}: weight must have an odd square kernel (K, K), got ({kh}, {kw})")
    if weight.device != device:
        raise ValueError(f"{fn}: weight is on {weight.device} but the inputs are on {device}")
    autocast = torch.is_autocast_enabled(device.type)
    if weight.dtype != dtype and not autocast:
        raise TypeError(f"{fn}: weight has dtype {weight.dtype} but the inputs have {dtype}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{fn}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) (weight's output channels), "
                         f"got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"{fn}: bias is on {bias.device} but the inputs are on {device}")
    if bias.dtype != dtype and not autocast:
        raise TypeError(f"{fn}: bias has dtype {bias.dtype} but the inputs have {dtype}")
