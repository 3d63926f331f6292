"""The compiled host-side window plan every device builds for a multi_pool2d call
(csrc/pool_plan.h), through the test-only binding pyramid_ext._C._pool_plan,
against a brute-force computation from the windows' definition, and the level
offsets against the op's packed output."""
import random
import re

import pytest
import torch

import pyramid_ext as pe

from ._helpers import OVERLAPPING_WINDOWS, naive_window_pool
from .conftest import need_backend


@pytest.fixture(autouse=True)
def _cpp():
    need_backend("cpp")


def _plan(*args):
    return pe._extension._C._pool_plan(*args)


def brute_axis(bounds, size):
    """(cuts, seg_begin, seg_end, seg_of) from the definition: the cuts are
    every window boundary; a segment runs from one cut to the next; a window
    spans the segments between its start's and its end's cut; a coordinate
    belongs to the segment it lies in if some window reads it, else -1."""
    windows = [(bounds[k], bounds[k + 1]) for k in range(0, len(bounds), 2)]
    cuts = sorted({b for w in windows for b in w})
    seg_begin = [cuts.index(s) for s, _ in windows]
    seg_end = [cuts.index(e) for _, e in windows]
    seg_of = []
    for i in range(size):
        if not any(s <= i < e for s, e in windows):
            seg_of.append(-1)
        else:
            seg_of.append(max(k for k, c in enumerate(cuts) if c <= i))
    return cuts, seg_begin, seg_end, seg_of


def brute_plan(h_bounds, w_bounds, level_bins, height, width, channels):
    bins = [level_bins[k] * level_bins[k + 1] for k in range(0, len(level_bins), 2)]
    offsets = [channels * sum(bins[:l]) for l in range(len(bins))]
    return (*brute_axis(h_bounds, height), *brute_axis(w_bounds, width), offsets, channels * sum(bins))


def adaptive_bounds(size, n):
    out = []
    for i in range(n):
        out += [(i * size) // n, -((-(i + 1) * size) // n)]
    return out


def random_case(rng):
    height, width = rng.randint(1, 40), rng.randint(1, 40)
    levels = rng.randint(1, 4)
    h_bounds, w_bounds, level_bins = [], [], []
    for _ in range(levels):
        bh, bw = rng.randint(1, 5), rng.randint(1, 5)
        level_bins += [bh, bw]
        for bounds, size, n in ((h_bounds, height, bh), (w_bounds, width, bw)):
            for _ in range(n):  # any windows: overlapping, nested, gaps
                s = rng.randrange(size)
                bounds += [s, rng.randint(s + 1, size)]
    return h_bounds, w_bounds, level_bins, height, width, rng.randint(0, 7)


def test_plan_matches_brute_force_on_random_windows():
    rng = random.Random(13)
    for _ in range(300):
        case = random_case(rng)
        assert _plan(*case) == brute_plan(*case), case


@pytest.mark.parametrize("case", [
    (adaptive_bounds(9, 1) + adaptive_bounds(9, 2) + adaptive_bounds(9, 3), adaptive_bounds(7, 1)
     + adaptive_bounds(7, 2) + adaptive_bounds(7, 3), [1, 1, 2, 2, 3, 3], 9, 7, 5),
    (OVERLAPPING_WINDOWS["h_bounds"], OVERLAPPING_WINDOWS["w_bounds"], OVERLAPPING_WINDOWS["level_bins"],
     *OVERLAPPING_WINDOWS["size"], 3),
    ([0, 1], [3, 4], [1, 1], 1, 4, 1),  # a 1-high map; columns 0-2 read by no window
    (adaptive_bounds(5, 8), adaptive_bounds(3, 2), [8, 2], 5, 3, 0),  # more bins than rows; no channels
])
def test_plan_matches_brute_force(case):
    got = _plan(*case)
    assert got == brute_plan(*case)
    assert all(isinstance(v, list) for v in got[:9]) and isinstance(got[9], int)


@pytest.mark.parametrize("cl_levels", [False, True])
def test_level_offsets_locate_each_level_in_the_packed_output(cl_levels):
    hb, wb, lb = OVERLAPPING_WINDOWS["h_bounds"], OVERLAPPING_WINDOWS["w_bounds"], OVERLAPPING_WINDOWS["level_bins"]
    height, width = OVERLAPPING_WINDOWS["size"]
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    *_, offsets, total = _plan(hb, wb, lb, height, width, 3)
    values, _ = torch.ops.pyramid_ext.multi_pool2d(x, hb, wb, lb, 0, cl_levels)
    assert values.shape == (2, total)
    ho = wo = 0
    for level, offset in enumerate(offsets):
        bh, bw = lb[2 * level], lb[2 * level + 1]
        want, _ = naive_window_pool(x, [(hb[2 * k], hb[2 * k + 1]) for k in range(ho, ho + bh)],
                                    [(wb[2 * k], wb[2 * k + 1]) for k in range(wo, wo + bw)], "avg")
        ho, wo = ho + bh, wo + bw
        block = values[:, offset:offset + 3 * bh * bw]
        got = block.reshape(2, bh, bw, 3).permute(0, 3, 1, 2) if cl_levels else block.reshape(2, 3, bh, bw)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("args, message", [
    (([0, 9], [0, 8], [1, 1], 8, 8, 2), r"window [0, 9) along H is empty or outside [0, 8)"),
    (([0, 8], [3, 3], [1, 1], 8, 8, 2), r"window [3, 3) along W is empty or outside [0, 8)"),
    (([-1, 2], [0, 8], [1, 1], 8, 8, 2), r"window [-1, 2) along H"),
    (([0, 8], [0, 8], [1, 2], 8, 8, 2), r"w_bounds has 2 values, level_bins needs 4 (a [start, end) pair"),
    (([0, 8, 0, 8], [0, 8], [1, 1], 8, 8, 2), r"h_bounds has 4 values, level_bins needs 2"),
    (([0, 8], [0, 8], [1, 0], 8, 8, 2), r"level_bins must be positive, got (1, 0)"),
    (([0, 8], [0, 8], [1, 1, 1], 8, 8, 2), r"level_bins must hold (bh, bw) pairs, at least one, got 3 values"),
    (([], [], [], 8, 8, 2), r"level_bins must hold (bh, bw) pairs, at least one, got 0 values"),
])
def test_plan_rejects_bad_windows_naming_the_argument(args, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _plan(*args)


def test_ops_check_their_arguments_with_the_plan_messages():
    ops = torch.ops.pyramid_ext
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match=re.escape("pyramid_ext::multi_pool2d: window [0, 9) along H")):
        ops.multi_pool2d(x, [0, 9], [0, 8], [1, 1], 0, False)
    with pytest.raises(RuntimeError,
                       match=re.escape("multi_pool2d: mode must be 0 (avg), 1 (max) or 2 (max, values only), got 3")):
        ops.multi_pool2d(x, [0, 8], [0, 8], [1, 1], 3, False)
    with pytest.raises(RuntimeError, match="x must be contiguous in NCHW or channels_last memory format"):
        ops.multi_pool2d(x[:, :, ::2], [0, 4], [0, 8], [1, 1], 0, False)
    with pytest.raises(RuntimeError, match="x must be float64, float32, float16 or bfloat16, got Int"):
        ops.multi_pool2d(x.int(), [0, 8], [0, 8], [1, 1], 0, False)
    with pytest.raises(RuntimeError, match=re.escape("x must be 4-D (N, C, H, W), got 3-D")):
        ops.multi_pool2d(x[0], [0, 8], [0, 8], [1, 1], 0, False)
    with pytest.raises(RuntimeError, match="x must have non-zero height and width"):
        ops.multi_pool2d(x[:, :, :0], [0, 8], [0, 8], [1, 1], 0, False)
    values, indices = ops.multi_pool2d(x, [0, 8], [0, 8], [1, 1], 1, False)
    bwd = ops.multi_pool2d_backward
    with pytest.raises(RuntimeError, match=re.escape("multi_pool2d_backward: window [0, 9) along W")):
        bwd(values, None, [1, 2, 8, 8], [0, 8], [0, 9], [1, 1], 0, False, False)
    with pytest.raises(RuntimeError, match=re.escape("grad must have shape (1, 2) = (N, C * total), got [1, 3]")):
        bwd(torch.zeros(1, 3), None, [1, 2, 8, 8], [0, 8], [0, 8], [1, 1], 0, False, False)
    with pytest.raises(RuntimeError, match="input_shape must be"):
        bwd(values, None, [1, 2, 8], [0, 8], [0, 8], [1, 1], 0, False, False)
    with pytest.raises(RuntimeError, match="indices are required for max"):
        bwd(values, None, [1, 2, 8, 8], [0, 8], [0, 8], [1, 1], 1, False, False)
    with pytest.raises(RuntimeError, match="indices must be int64, got Int"):
        bwd(values, indices.int(), [1, 2, 8, 8], [0, 8], [0, 8], [1, 1], 1, False, False)
    with pytest.raises(RuntimeError, match="grad must be float64, float32, float16 or bfloat16"):
        bwd(values.int(), None, [1, 2, 8, 8], [0, 8], [0, 8], [1, 1], 0, False, False)
