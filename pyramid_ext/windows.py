"""Pooling windows as data: every window policy in one place.

The fused kernels pool over arbitrary windows given, per axis, as a flat list
``[start_0, end_0, start_1, end_1, ...]`` over every level. A window policy
turns an input size and a bin count into those bounds:

``"adaptive"``
    PyTorch's ``AdaptiveAvgPool2d``/``AdaptiveMaxPool2d``: window ``i`` of
    ``n`` over ``a`` is ``[floor(i*a/n), ceil((i+1)*a/n))``. Always ``n`` bins.
``"sppnet"``
    SPPNet's pooling layer: ``kernel = ceil(a/n)``, ``stride = floor(a/n)``,
    no padding. Yields ``floor((a - kernel)/stride) + 1`` windows, which is not
    always ``n``; a size where it is not raises a ``ValueError``.
``"keras_same"``
    Keras ``AveragePooling2D(pool, strides=pool, padding="same")`` with
    ``pool = round(a/n)`` (as the TensorFlow PSPNet ports compute it):
    ``ceil(a/pool)`` windows, padding split as TensorFlow does (less before),
    and padded positions excluded from the average.

Sizes may be Python ints or SymInts (``torch.compile(dynamic=True)``): the
adaptive policy uses only integer arithmetic, so no guard is added per size.
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple, Union

import torch

from .plan import check_windows

Bin = Union[int, Tuple[int, int]]

WINDOW_POLICIES = ("adaptive", "sppnet", "keras_same")


def normalize_bins(bins, name: str = "bins") -> List[Tuple[int, int]]:
    """Returns bins as a list of (bh, bw) pairs; a bin is an int or a pair."""
    if isinstance(bins, int) and not isinstance(bins, bool):
        bins = [bins]
    try:
        items = list(bins)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints or (h, w) pairs, got {bins!r}") from None
    if not items:
        raise ValueError(f"{name} must name at least one bin, got {bins!r}")
    out = []
    for b in items:
        if isinstance(b, bool):
            raise TypeError(f"{name} entries must be ints or (h, w) pairs, got {b!r}")
        if isinstance(b, int):
            pair = (b, b)
        elif isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in b):
            pair = (int(b[0]), int(b[1]))
        else:
            raise TypeError(f"{name} entries must be ints or (h, w) pairs, got {b!r}")
        if pair[0] <= 0 or pair[1] <= 0:
            raise ValueError(f"{name} entries must be positive, got {b!r}")
        out.append(pair)
    return out


def _ceil_div(a, b):
    return -((-a) // b)


def adaptive_windows(size, n: int) -> List[Tuple[object, object]]:
    """PyTorch's adaptive pooling windows: n windows over ``size``."""
    return [((i * size) // n, _ceil_div((i + 1) * size, n)) for i in range(n)]


def sppnet_windows(size: int, n: int) -> List[Tuple[int, int]]:
    """SPPNet's windows: kernel ceil(a/n), stride floor(a/n); must give n."""
    size = int(size)
    kernel = _ceil_div(size, n)
    stride = size // n
    count = (size - kernel) // stride + 1 if stride > 0 else 0
    if stride <= 0 or count != n:
        raise ValueError(
            f"window='sppnet' cannot pool a size of {size} into {n} bins: kernel=ceil({size}/{n})={kernel}, "
            f"stride=floor({size}/{n})={stride} give {max(count, 0)} windows (use window='adaptive')"
        )
    return [(i * stride, i * stride + kernel) for i in range(n)]


def keras_same_windows(size: int, n: int) -> List[Tuple[int, int]]:
    """Keras AveragePooling2D(pool=stride=round(a/n), padding='same') windows."""
    size = int(size)
    pool = int(round(size / n))  # np.round: banker's rounding, like Python's round
    if pool <= 0:
        raise ValueError(f"window='keras_same' cannot pool a size of {size} into {n} bins: pool=round({size}/{n})=0")
    count = _ceil_div(size, pool)
    pad_total = max((count - 1) * pool + pool - size, 0)
    pad_before = pad_total // 2
    wins = []
    for i in range(count):
        s = i * pool - pad_before
        wins.append((max(s, 0), min(s + pool, size)))
    return wins


_POLICY = {"adaptive": adaptive_windows, "sppnet": sppnet_windows, "keras_same": keras_same_windows}


def pyramid_windows(height, width, bins: Sequence[Tuple[int, int]], window: str = "adaptive"):
    """Bounds of every level's windows for an input of ``height`` x ``width``.

    Returns ``(h_bounds, w_bounds, level_bins)``: flat [start, end) lists per
    axis over all levels, and the flat (bh, bw) of each level's output (which
    for ``keras_same`` may differ from the requested bins).
    """
    # Cached per size in eager mode (the Python overhead of a call); traced as
    # plain code under torch.compile, where it runs once per graph anyway.
    if isinstance(height, int) and isinstance(width, int) and not torch.compiler.is_compiling():
        return _pyramid_windows_cached(height, width, tuple(bins), window)
    return _pyramid_windows(height, width, bins, window)


@functools.lru_cache(maxsize=256)
def _pyramid_windows_cached(height: int, width: int, bins, window: str):
    h_bounds, w_bounds, level_bins = _pyramid_windows(height, width, bins, window)
    check_bounds(h_bounds, w_bounds, level_bins, height, width)
    return tuple(h_bounds), tuple(w_bounds), tuple(level_bins)


def _pyramid_windows(height, width, bins, window):
    if window not in _POLICY:
        raise ValueError(f"window must be one of {WINDOW_POLICIES}, got {window!r}")
    policy = _POLICY[window]
    h_bounds, w_bounds, level_bins = [], [], []
    for bh, bw in bins:
        hw = policy(height, bh)
        ww = policy(width, bw)
        for s, e in hw:
            h_bounds += [s, e]
        for s, e in ww:
            w_bounds += [s, e]
        level_bins += [len(hw), len(ww)]
    return h_bounds, w_bounds, level_bins


def level_shapes(level_bins: Sequence[int]) -> List[Tuple[int, int]]:
    return [(level_bins[2 * i], level_bins[2 * i + 1]) for i in range(len(level_bins) // 2)]


def packed_size(level_bins: Sequence[int]) -> int:
    """Number of packed values per channel: sum of bh * bw over levels."""
    return sum(bh * bw for bh, bw in level_shapes(level_bins))


def check_bounds(h_bounds, w_bounds, level_bins, height, width) -> None:
    """Validates a policy's window bounds (concrete values; symbolic ones are
    skipped): the checks of the ops themselves, pyramid_ext.plan.check_windows."""
    check_windows(h_bounds, w_bounds, level_bins, height, width, "pyramid_windows")


__all__ = [
    "WINDOW_POLICIES",
    "normalize_bins",
    "adaptive_windows",
    "sppnet_windows",
    "keras_same_windows",
    "pyramid_windows",
    "level_shapes",
    "packed_size",
    "check_bounds",
]
