"""The pooling plan in Python: segments of each axis and the packed layout.

Mirrors csrc/pyramid_index.h (``make_axis_segments``, ``packed_index``) and
the op-level argument checks of the compiled ``multi_pool2d``
(csrc/cpu/multi_pool2d.cpp, ``make_plan``), for the backends written in
Python: the Triton backend's plans (pyramid_ext/triton/_multi_pool2d.py) and
the torch backend (pyramid_ext/reference.py). The checks of the window
policies (a size a policy cannot pool) stay in pyramid_ext/windows.py and
pyramid_ext/functional.py.

Bounds are flat ``[start_0, end_0, start_1, end_1, ...]`` over every level's
windows along one axis; ``level_bins`` is flat ``[bh_0, bw_0, bh_1, bw_1, ...]``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

# Pooling modes of the multi_pool2d ops (csrc/pyramid_index.h: kPoolAvg, kPoolMax).
POOL_AVG = 0
POOL_MAX = 1
# Max pooling, values only: kPoolMax's values and an empty indices tensor; no
# backward (the eager fast path's calls that return no indices, below autograd).
POOL_MAX_VALUES = 2


def axis_segments(bounds: Sequence[int], size: int) -> Tuple[List[int], List[int], List[int], List[int]]:
    """``make_axis_segments`` of the header: the axis [0, size) cut at every
    window boundary.

    Returns ``(cuts, seg_begin, seg_end, seg_of)``: the sorted distinct
    boundaries (segment s is ``[cuts[s], cuts[s + 1])``); for each window k,
    the index in ``cuts`` of its start and of its end (so it covers segments
    ``seg_begin[k] .. seg_end[k] - 1``); for each coordinate, its segment, or
    -1 where no window covers it.
    """
    is_cut = [False] * (size + 1)
    covered = [False] * size
    num_windows = len(bounds) // 2
    for k in range(num_windows):
        start, end = bounds[2 * k], bounds[2 * k + 1]
        is_cut[start] = is_cut[end] = True
        for i in range(start, end):
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
    seg_begin = [seg_at[bounds[2 * k]] for k in range(num_windows)]
    seg_end = [seg_at[bounds[2 * k + 1]] for k in range(num_windows)]
    return cuts, seg_begin, seg_end, seg_of


def level_offsets(level_bins: Sequence[int], channels: int) -> List[int]:
    """Per-sample offset, in elements, of each level's block in the packed
    output (level l's block holds channels * bh_l * bw_l values), followed by
    the total, channels * sum(bh * bw): ``len(level_bins) // 2 + 1`` values."""
    offsets = [0]
    for l in range(len(level_bins) // 2):
        offsets.append(offsets[-1] + channels * level_bins[2 * l] * level_bins[2 * l + 1])
    return offsets


def packed_index(level_offset: int, channels: int, bh: int, bw: int, c: int, i: int, j: int,
                 channels_last_levels: bool) -> int:
    """``packed_index`` of the header: the position, within one sample, of
    channel c, bin (i, j) of the level starting at level_offset."""
    if channels_last_levels:
        return level_offset + (i * bw + j) * channels + c
    return level_offset + (c * bh + i) * bw + j


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_windows(h_bounds: Sequence[int], w_bounds: Sequence[int], level_bins: Sequence[int], height, width,
                  op: str = "multi_pool2d") -> None:
    """The checks of the compiled ops' ``make_plan``: level_bins holds
    positive (bh, bw) pairs, each bounds list one [start, end) pair per window
    of every level, and every window satisfies 0 <= start < end <= size.
    Window values that are not plain ints (SymInts while torch.compile traces
    the torch backend) are left to the ops that run on concrete values."""
    if len(level_bins) == 0 or len(level_bins) % 2 != 0:
        raise ValueError(f"{op}: level_bins must hold (bh, bw) pairs, got {len(level_bins)} values")
    for l in range(len(level_bins) // 2):
        bh, bw = level_bins[2 * l], level_bins[2 * l + 1]
        if not (bh > 0 and bw > 0):
            raise ValueError(f"{op}: level_bins must be positive, got ({bh}, {bw}) for level {l}")
    for name, bounds, bins, size, axis in (("h_bounds", h_bounds, level_bins[0::2], height, "H"),
                                           ("w_bounds", w_bounds, level_bins[1::2], width, "W")):
        num_windows = sum(bins)
        if len(bounds) != 2 * num_windows:
            raise ValueError(f"{op}: {name} has {len(bounds)} values, level_bins needs {2 * num_windows} "
                             f"(a [start, end) pair per window of every level along {axis})")
        if not (_is_int(size) and all(_is_int(v) for v in bounds)):
            continue
        for k in range(num_windows):
            start, end = bounds[2 * k], bounds[2 * k + 1]
            if not (0 <= start < end <= size):
                raise ValueError(f"{op}: {name} window {k}, [{start}, {end}), is empty or outside [0, {size}) "
                                 f"(the size along {axis})")


def check_pool_args(x_shape: Sequence[int], h_bounds: Sequence[int], w_bounds: Sequence[int],
                    level_bins: Sequence[int], mode: int, op: str = "multi_pool2d", backward: bool = False) -> None:
    """The op-level checks of multi_pool2d (and, ``backward``, of its
    backward, with the input shape): x 4-D with non-zero H and W, mode 0
    (avg), 1 (max) or, forward only, 2 (max, values only), and
    ``check_windows``. Errors name the argument."""
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {tuple(x_shape)}")
    if backward and mode not in (POOL_AVG, POOL_MAX):
        raise ValueError(f"{op}: mode must be {POOL_AVG} (avg) or {POOL_MAX} (max), got {mode} "
                         f"(mode {POOL_MAX_VALUES}, max values only, has no backward: use {POOL_MAX})")
    if mode not in (POOL_AVG, POOL_MAX, POOL_MAX_VALUES):
        raise ValueError(f"{op}: mode must be {POOL_AVG} (avg), {POOL_MAX} (max) or {POOL_MAX_VALUES} "
                         f"(max, values only), got {mode}")
    height, width = x_shape[2], x_shape[3]
    if _is_int(height) and _is_int(width) and not (height > 0 and width > 0):
        raise ValueError(f"{op}: x must have non-zero H and W, got shape {tuple(x_shape)}")
    check_windows(h_bounds, w_bounds, level_bins, height, width, op)


def pool_plan(h_bounds: Sequence[int], w_bounds: Sequence[int], level_bins: Sequence[int], height: int, width: int,
              channels: int):
    """The plan of one call, as the compiled test binding
    ``pyramid_ext._C._pool_plan`` returns it (lists of ints):
    ``(h_cuts, h_seg_begin, h_seg_end, h_seg_of, w_cuts, w_seg_begin,
    w_seg_end, w_seg_of, level_offsets, total)``, level_offsets one per
    level, total = channels * sum(bh * bw)."""
    check_windows(h_bounds, w_bounds, level_bins, height, width, "pool_plan")
    offsets = level_offsets(level_bins, channels)
    return (*axis_segments(h_bounds, height), *axis_segments(w_bounds, width), offsets[:-1], offsets[-1])


__all__ = [
    "POOL_AVG",
    "POOL_MAX",
    "POOL_MAX_VALUES",
    "axis_segments",
    "check_pool_args",
    "check_windows",
    "level_offsets",
    "packed_index",
    "pool_plan",
]
