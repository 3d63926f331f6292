"""pyramid_ext.plan (the Python statement of csrc/pyramid_index.h's segment
plan and packed layout) against brute-force computations written here: the
segments from the sorted distinct cut points, each coordinate's segment by
search, the levels' offsets by locating each level's block in a packed
vector, the packed positions against PyTorch's own pooling per level."""
from __future__ import annotations

import bisect
import random

import pytest
import torch
import torch.nn.functional as F

from pyramid_ext import backends, plan
from pyramid_ext.windows import normalize_bins, pyramid_windows

from .conftest import need_backend


def _random_windows(rng: random.Random, size: int, count: int):
    """`count` random non-empty windows of [0, size), possibly overlapping,
    possibly leaving coordinates uncovered, as a flat bounds list."""
    bounds = []
    for _ in range(count):
        start = rng.randrange(size)
        bounds += [start, rng.randrange(start + 1, size + 1)]
    return bounds


def _random_case(seed: int):
    rng = random.Random(seed)
    height, width = rng.randint(1, 40), rng.randint(1, 40)
    level_bins = []
    for _ in range(rng.randint(1, 4)):
        level_bins += [rng.randint(1, 5), rng.randint(1, 5)]
    h_bounds = _random_windows(rng, height, sum(level_bins[0::2]))
    w_bounds = _random_windows(rng, width, sum(level_bins[1::2]))
    return h_bounds, w_bounds, level_bins, height, width, rng.randint(1, 7)


def _brute_segments(bounds, size):
    windows = [(bounds[2 * k], bounds[2 * k + 1]) for k in range(len(bounds) // 2)]
    cuts = sorted({v for w in windows for v in w})
    seg_begin = [cuts.index(s) for s, _ in windows]
    seg_end = [cuts.index(e) for _, e in windows]
    seg_of = [bisect.bisect_right(cuts, i) - 1 if any(s <= i < e for s, e in windows) else -1 for i in range(size)]
    return cuts, seg_begin, seg_end, seg_of


def _brute_level_offsets(level_bins, channels):
    """Each level's block located in a packed vector labelled by level."""
    labels = torch.cat([torch.full((channels * level_bins[2 * l] * level_bins[2 * l + 1],), l)
                        for l in range(len(level_bins) // 2)])
    offsets = [int((labels == l).nonzero()[0]) for l in range(len(level_bins) // 2)]
    return offsets + [labels.numel()]


@pytest.mark.parametrize("seed", range(300))
def test_axis_segments_random_windows(seed):
    h_bounds, w_bounds, _, height, width, _ = _random_case(seed)
    for bounds, size in ((h_bounds, height), (w_bounds, width)):
        assert plan.axis_segments(bounds, size) == _brute_segments(bounds, size)


@pytest.mark.parametrize("window", ["adaptive", "sppnet", "keras_same"])
@pytest.mark.parametrize("size", [1, 6, 13, 36, 60])
def test_axis_segments_policy_windows(window, size):
    bins = normalize_bins((1, 2, 3, 6))
    try:
        h_bounds, w_bounds, _ = pyramid_windows(size, size + 5, bins, window)
    except ValueError:
        pytest.skip(f"window={window!r} cannot pool {size} into these bins")
    assert plan.axis_segments(list(h_bounds), size) == _brute_segments(h_bounds, size)
    assert plan.axis_segments(list(w_bounds), size + 5) == _brute_segments(w_bounds, size + 5)


def test_axis_segments_examples():
    # two overlapping windows, [5, 6) uncovered, [6, 8) covered
    assert plan.axis_segments([0, 3, 2, 5, 6, 8], 8) == (
        [0, 2, 3, 5, 6, 8], [0, 1, 4], [2, 3, 5], [0, 0, 1, 2, 2, -1, 4, 4])


@pytest.mark.parametrize("seed", range(100))
def test_level_offsets(seed):
    _, _, level_bins, _, _, channels = _random_case(seed)
    assert plan.level_offsets(level_bins, channels) == _brute_level_offsets(level_bins, channels)


def test_level_offsets_example():
    assert plan.level_offsets([1, 1, 2, 3], 4) == [0, 4, 28]


@pytest.mark.parametrize("seed", range(50))
def test_pool_plan_tuple(seed):
    h_bounds, w_bounds, level_bins, height, width, channels = _random_case(seed)
    got = plan.pool_plan(h_bounds, w_bounds, level_bins, height, width, channels)
    offsets = _brute_level_offsets(level_bins, channels)
    want = (*_brute_segments(h_bounds, height), *_brute_segments(w_bounds, width), offsets[:-1], offsets[-1])
    assert got == want
    assert all(isinstance(part, list) for part in got[:9]) and isinstance(got[9], int)


def test_pool_plan_equals_compiled():
    """The compiled test binding pyramid_ext._C._pool_plan (the C++ plan of
    csrc/pyramid_index.h) returns the same tuple."""
    need_backend("cpp")
    from pyramid_ext import _extension

    if not hasattr(_extension._C, "_pool_plan"):
        pytest.skip("this build of the extension has no _C._pool_plan test binding")
    cases = [_random_case(seed) for seed in range(200)]
    for bins in ((1, 2, 3, 6), (4, 2, 1), ((2, 5),)):
        for window in ("adaptive", "keras_same"):
            h_bounds, w_bounds, level_bins = pyramid_windows(37, 53, normalize_bins(bins), window)
            cases.append((list(h_bounds), list(w_bounds), list(level_bins), 37, 53, 3))
    for case in cases:
        compiled = tuple(list(v) if not isinstance(v, int) else v for v in _extension._C._pool_plan(*case))
        assert compiled == plan.pool_plan(*case), case


@pytest.mark.parametrize("channels_last_levels", [False, True])
def test_packed_index_locates_pytorch_pooling(any_backend, channels_last_levels):
    """Each packed position plan.packed_index names holds the value
    F.adaptive_avg_pool2d computes for that channel and bin."""
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64)
    bins = normalize_bins((1, 2, (3, 4)))
    h_bounds, w_bounds, level_bins = pyramid_windows(13, 11, bins)
    values, _ = backends.implementation(any_backend).multi_pool2d(x, h_bounds, w_bounds, level_bins, plan.POOL_AVG,
                                                                  channels_last_levels)
    offsets = plan.level_offsets(level_bins, 3)
    assert values.shape == (2, offsets[-1])
    seen = set()
    for level, (bh, bw) in enumerate(bins):
        want = F.adaptive_avg_pool2d(x, (bh, bw))
        for c in range(3):
            for i in range(bh):
                for j in range(bw):
                    k = plan.packed_index(offsets[level], 3, bh, bw, c, i, j, channels_last_levels)
                    seen.add(k)
                    torch.testing.assert_close(values[:, k], want[:, c, i, j], rtol=1e-12, atol=1e-12)
    assert seen == set(range(offsets[-1]))


BAD_ARGS = [
    # (x_shape, h_bounds, w_bounds, level_bins, mode, message)
    ((1, 2, 5, 5), [0, 5], [0, 5], [1, 1], 3, r"mode must be 0 \(avg\), 1 \(max\) or 2 \(max, values only\), got 3"),
    ((2, 5, 5), [0, 5], [0, 5], [1, 1], 0, r"x must be 4-D"),
    ((1, 2, 0, 5), [0, 5], [0, 5], [1, 1], 0, r"x must have non-zero H and W"),
    ((1, 2, 5, 5), [0, 5], [0, 5], [], 0, r"level_bins must hold \(bh, bw\) pairs, got 0 values"),
    ((1, 2, 5, 5), [0, 5], [0, 5], [1, 1, 1], 0, r"level_bins must hold \(bh, bw\) pairs, got 3 values"),
    ((1, 2, 5, 5), [], [0, 5], [0, 1], 0, r"level_bins must be positive, got \(0, 1\)"),
    ((1, 2, 5, 5), [0, 5], [0, 3, 3, 5], [1, 2, 1, -1], 0, r"level_bins must be positive, got \(1, -1\) for level 1"),
    ((1, 2, 5, 5), [0, 5, 0, 2], [0, 5], [1, 1], 0, r"h_bounds has 4 values, level_bins needs 2"),
    ((1, 2, 5, 5), [0, 5], [0, 5], [1, 2], 0, r"w_bounds has 2 values, level_bins needs 4"),
    ((1, 2, 5, 5), [0, 6], [0, 5], [1, 1], 0, r"h_bounds window 0, \[0, 6\), is empty or outside \[0, 5\)"),
    ((1, 2, 5, 5), [0, 5], [0, 3, 3, 3], [1, 2], 0, r"w_bounds window 1, \[3, 3\), is empty"),
    ((1, 2, 5, 5), [-1, 2], [0, 5], [1, 1], 0, r"h_bounds window 0, \[-1, 2\)"),
]


@pytest.mark.parametrize("x_shape,h_bounds,w_bounds,level_bins,mode,message", BAD_ARGS)
def test_check_pool_args_names_the_argument(x_shape, h_bounds, w_bounds, level_bins, mode, message):
    with pytest.raises(ValueError, match=r"^multi_pool2d: " + message):
        plan.check_pool_args(x_shape, h_bounds, w_bounds, level_bins, mode)


@pytest.mark.parametrize("x_shape,h_bounds,w_bounds,level_bins,mode,message", BAD_ARGS)
def test_torch_backend_checks_pool_args(x_shape, h_bounds, w_bounds, level_bins, mode, message):
    """The torch backend's op rejects what the compiled op rejects, with the
    plan's message (the public functions never pass such arguments)."""
    x = torch.randn(x_shape)
    with pytest.raises(ValueError, match=message):
        backends.implementation("torch").multi_pool2d(x, h_bounds, w_bounds, level_bins, mode, False)


def test_check_pool_args_accepts_valid_windows():
    plan.check_pool_args((1, 2, 5, 7), [0, 5, 0, 3, 2, 5], [0, 7, 0, 4, 3, 7], [1, 1, 2, 2], 1)
