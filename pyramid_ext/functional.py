"""Public functional API, named like ``torch.nn.functional``.

Each function validates its arguments (errors name the argument), picks a
backend (see pyramid_ext.backends) and calls that backend's op. The compiled
and Triton ops are ``torch.library`` ops with fake kernels and autograd, so
everything here works under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _ops  # noqa: F401  (fake kernels and autograd of the compiled ops)
from . import backends, export, reference
from .reference import POOL_AVG, POOL_MAX
from .windows import level_shapes, normalize_bins, pyramid_windows

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


_channels_last = _ops._channels_last
_dense = _ops._dense


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float64, float32, float16 or bfloat16), got {t.dtype}")


def _triton_ops():
    from . import triton_ops  # imported lazily: importing Triton is slow

    return triton_ops


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


def _pool_packed(x, bins, mode: int, channels_last_levels, window: str, backend: Optional[str], fn: str):
    pairs = _pool_args(x, bins, fn)
    unbatched = x.dim() == 3
    x4 = x.unsqueeze(0) if unbatched else x
    x4 = _dense(x4)
    height, width = x4.shape[-2], x4.shape[-1]
    h_bounds, w_bounds, level_bins = pyramid_windows(height, width, pairs, window)
    if channels_last_levels is None:
        channels_last_levels = _channels_last(x4)
    name = backends.resolve(backend, x4.device, "multi_pool2d")
    if name == "cpp":
        values, indices = torch.ops.pyramid_ext.multi_pool2d(x4, h_bounds, w_bounds, level_bins, mode,
                                                             channels_last_levels)
    elif name == "triton":
        values, indices = _triton_ops().multi_pool2d(x4, h_bounds, w_bounds, level_bins, mode, channels_last_levels)
    else:
        values, indices = reference.multi_pool2d(x4, h_bounds, w_bounds, level_bins, mode, channels_last_levels,
                                                 adaptive=window == "adaptive")
    return values, indices, level_bins, unbatched, channels_last_levels


def _unpack(packed: torch.Tensor, level_bins, channels: int, channels_last_levels: bool, unbatched: bool):
    """Per-level (N, C, bh, bw) views into the packed (N, C * total) buffer."""
    out = []
    offset = 0
    n = packed.shape[0]
    for bh, bw in level_shapes(level_bins):
        block = packed[:, offset : offset + channels * bh * bw]
        offset += channels * bh * bw
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
    """
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
    name = backends.resolve(backend, ref.device, "upsample_concat")

    if out is not None:
        _check_out(out, x, branches, size, dtype, ref.device, fn)
        if torch.is_grad_enabled() and any(t.requires_grad for _, t in tensors):
            raise RuntimeError(f"{fn}: out= does not support automatic differentiation, but an input requires grad")
        if name == "cpp":
            torch.ops.pyramid_ext.upsample_concat_out(x, branches, align_corners, x_first, out)
        elif name == "triton":
            _triton_ops().upsample_concat_out(x, branches, align_corners, x_first, out)
        else:
            reference.upsample_concat_out(x, branches, align_corners, x_first, out)
        return out

    if name == "cpp":
        return torch.ops.pyramid_ext.upsample_concat(x, branches, list(size), align_corners, x_first, channels_last)
    if name == "triton":
        return _triton_ops().upsample_concat(x, branches, list(size), align_corners, x_first, channels_last)
    return reference.upsample_concat(x, branches, size, align_corners, x_first, channels_last)


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
