"""Precision of the long sums: average pooling over large windows (and, in
the `large` tests, maps of more than 2^31 elements), max pooling indices
past 2^31, and the upsample_concat backward of a small branch, which sums a
whole gradient plane.

The kernels sum float elements in short runs in float and add the runs in
double (csrc/cpu/simd_loops.h states the bound): a mean is within 1e-6 of
an fp64 computation, relative to the mean of |x|. Plain float accumulation
drifts by up to n * 2^-24 over n elements; the normal-size tests here use
data where that drift (measured on the earlier kernels: 1e-5 on a
4096x4096 map of 0.1) is far above the bound.

Expectations are fp64 sums computed in chunks (tests/_helpers.py:
fp64_window_means, fp64_resize_grad; never an fp64 copy of a large map).
The `large` tests share one 8.6 GB buffer (12.4 GB peak, about 75 s) and
run under `make test-large` (PYRAMID_EXT_LARGE=1; they skip below 13 GiB of
free memory); elsewhere they skip, saying so.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import pyramid_ext as pe

from ._helpers import TOL, adaptive_windows, bilinear_taps, fp64_resize_grad, fp64_window_means, pairs
from .conftest import need_backend

REL = 1e-6  # the bound of the accumulation, relative to the mean of |x|


def assert_means_within(got, bins, want, abs_want, rel=REL, what=""):
    for b, g, m, am in zip(pairs(bins), got, want, abs_want):
        err = (g.double() - m).abs() / am
        worst = err.max().item()
        assert worst <= rel, f"{what} bins {b}: error {worst:.3g} x mean|x| > {rel:g} (got {g.flatten()[:4].tolist()}, want {m.flatten()[:4].tolist()})"


def assert_rounded_mean(got, bins, want, dtype, what=""):
    """16-bit outputs: each mean is the fp64 mean rounded to the dtype, except
    where the fp64 mean lies within 1e-6 (relative) of a rounding tie."""
    for b, g, m in zip(pairs(bins), got, want):
        r = m.to(dtype)
        lo = torch.minimum(r.double(), torch.nextafter(r, torch.full_like(r, -math.inf)).double())
        hi = torch.maximum(r.double(), torch.nextafter(r, torch.full_like(r, math.inf)).double())
        near_tie = torch.minimum(((lo + r.double()) / 2 - m).abs(), ((hi + r.double()) / 2 - m).abs()) <= 1e-6 * m.abs()
        bad = (g != r) & ~near_tie
        assert not bool(bad.any()), f"{what} bins {b}: {int(bad.sum())} means are not the fp64 mean rounded to {dtype}"


@pytest.fixture
def _c():
    need_backend("cpp")
    from pyramid_ext import _C

    yield _C
    for name in ("simd_isa", "no_block_kernel", "channels_last_avg_tasks", "no_sum_trees"):
        _C._set_test_override(name, 0)


# ------------------------------------------------------------------ normal size

BINS = (1, 2, 3, 6, (2, 3))


@pytest.mark.parametrize("path", ["auto", "portable"])
def test_avg_pool_long_windows_nchw(_c, path):
    """4096x4096 of 0.1 with a spike: float accumulation of a 2^22-element
    window drifted 1e-5; the bound is 1e-6."""
    if path == "portable":
        _c._set_test_override("no_block_kernel", 1)
    x = torch.full((1, 1, 4096, 4096), 0.1)
    x[0, 0, 1365, 819] = 1e6
    got = pe.multi_adaptive_avg_pool2d(x, BINS, backend="cpp")
    assert_means_within(got, BINS, *fp64_window_means(x, BINS), what=path)


@pytest.mark.parametrize("tasks", [1, 2])
@pytest.mark.parametrize("shape,bins", [((2, 8, 512, 512), BINS), ((1, 19, 2048, 40), (1, 2, (3, 4)))],
                         ids=["wide_cells", "narrow_cells"])
def test_avg_pool_long_windows_channels_last(_c, tasks, shape, bins):
    """channels_last, both task splits, cells wider than a float run and
    narrow ones (runs of several rows): float accumulation drifted 4e-5."""
    _c._set_test_override("channels_last_avg_tasks", tasks)
    x = torch.full(shape, 0.1).contiguous(memory_format=torch.channels_last)
    x[-1, 3, 300, 17] = 1e4
    got = pe.multi_adaptive_avg_pool2d(x, bins, backend="cpp")
    assert_means_within(got, bins, *fp64_window_means(x, bins), what=f"tasks={tasks}")


@pytest.mark.parametrize("tasks", [1, 2])
@pytest.mark.parametrize("shape,bins", [((2, 40, 16, 16), (1, 2, 3, 6)), ((1, 19, 13, 13), (1, 2, 3, 6)),
                                        ((3, 5, 8, 8), (1, 2, 4, 8)), ((2, 33, 22, 9), (1, (2, 3), 5))])
def test_avg_pool_small_maps_channels_last_sum_trees(_c, tasks, shape, bins):
    """Small channels_last float maps: the bins are balanced trees of float
    additions (simd::tree_means), at most 11 float roundings deep per
    element; within 1e-6 of fp64 as the double bin sums are (no_sum_trees=1),
    on values of mixed magnitude and sign, and not the same bits as those
    (both paths ran)."""
    _c._set_test_override("channels_last_avg_tasks", tasks)
    g = torch.Generator().manual_seed(5)
    base = torch.rand(shape, generator=g) * 2 - 0.5
    base[..., ::3, ::4] *= 3e3
    x = base.contiguous(memory_format=torch.channels_last)
    want = fp64_window_means(x, bins)
    got = pe.multi_adaptive_avg_pool2d(x, bins, backend="cpp")
    assert_means_within(got, bins, *want, what="trees")
    _c._set_test_override("no_sum_trees", 1)
    got_double = pe.multi_adaptive_avg_pool2d(x, bins, backend="cpp")
    assert_means_within(got_double, bins, *want, what="double bins")
    assert any(not torch.equal(a, b) for a, b in zip(got, got_double)), "no_sum_trees changed nothing"


@pytest.mark.parametrize("tasks", [1, 2])
@pytest.mark.parametrize("shape,bins", [((2, 40, 16, 16), (1, 2, 3, 6)), ((1, 19, 13, 13), (1, 2, 3, 6)),
                                        ((3, 5, 8, 8), (1, 2, 4, 8)), ((2, 33, 22, 9), (1, (2, 3), 5)),
                                        ((2, 24, 16, 16), (1, 3)), ((1, 17, 12, 12), tuple(range(1, 13))),
                                        ((2, 16, 20, 20), (4, 2, 1)), ((1, 48, 6, 9), (1, 2, 3, 6))])
def test_avg_pool_sum_trees_add_each_cell_once(_c, tasks, shape, bins):
    """The sum trees' shape (bins split along any cut that reuses a node, the
    plan's choice) changes no sum's terms: on small integers every float sum
    is exact, so each bin is the correctly rounded mean, bit for bit, on the
    trees and on the double path alike. A bin that missed a cell or added one
    twice would be off by a whole value."""
    _c._set_test_override("channels_last_avg_tasks", tasks)
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-8, 9, shape, generator=g).float().contiguous(memory_format=torch.channels_last)
    want = [F.adaptive_avg_pool2d(x.double(), b).float() for b in bins]
    for no_trees in (0, 1):
        _c._set_test_override("no_sum_trees", no_trees)
        got = pe.multi_adaptive_avg_pool2d(x, bins, backend="cpp")
        for b, a, w in zip(bins, got, want):
            assert torch.equal(a, w), f"bins {b}, no_sum_trees={no_trees}: {(a - w).abs().max().item()}"
    if all(isinstance(b, int) for b in bins):
        flat = pe.spatial_pyramid_pool(x, bins, mode="avg", backend="cpp")
        assert torch.equal(flat, torch.cat([w.flatten(1) for w in want], 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_avg_pool_16bit_is_the_rounded_fp64_mean(_c, dtype):
    """16-bit inputs (the generic loops: float runs, double cells): each mean
    is the fp64 mean correctly rounded. At this size the output rounding
    (2^-11, 2^-8) hides float drift except next to a tie; the `large` test
    covers a 16-bit map past 2^31 elements."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, 1, 4096, 4096), generator=g).to(dtype)
    bins = (16, 32, 64)
    got = pe.multi_adaptive_avg_pool2d(x, bins, backend="cpp")
    assert_rounded_mean(got, bins, fp64_window_means(x, bins)[0], dtype)


def test_bilinear_taps_match_the_helper():
    from ._helpers import bilinear_weights

    for n_in, n_out in [(1, 7), (2, 9), (3, 10), (6, 61), (40, 33), (5, 5)]:
        for ac in (False, True):
            torch.testing.assert_close(bilinear_taps(n_in, n_out, ac), bilinear_weights(n_in, n_out, ac), rtol=0, atol=0)


UC_BRANCHES = [(1, 1), (2, 2), (3, 3), (6, 6)]


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_upsample_concat_backward_small_branch_sums_a_plane(kind):
    """A 1x1 branch's gradient is the sum of a whole gradient plane: float
    accumulation of 4096 rows of 0.1 drifted 4e-5 (NCHW), 1e-5 (channels_last
    at 1024 x 1024); the bound is 1e-6 of the sum of |terms|."""
    need_backend("cpp")
    S, C = (4096, 1) if kind == "nchw" else (1024, 4)
    fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    brs = [torch.zeros(1, C, h, w).contiguous(memory_format=fmt).requires_grad_() for h, w in UC_BRANCHES]
    out = pe.upsample_concat(None, brs, size=(S, S), backend="cpp")
    g = torch.full(out.shape, 0.1).contiguous(memory_format=fmt)
    g[0, :, S // 3, S // 5] = 1e3
    out.backward(g)
    for k, (hw, b) in enumerate(zip(UC_BRANCHES, brs)):
        for c in range(C):
            want, terms = fp64_resize_grad(g, k * C + c, hw, False)
            err = ((b.grad[0, c].double() - want).abs() / terms).max().item()
            assert err <= REL, f"branch {hw} channel {c}: error {err:.3g} x sum|terms| > {REL:g}"


# ------------------------------------------------------------------ large maps
#
# 46341^2 = 2,147,488,281 > 2^31 elements: 8.6 GB in float32. Every large
# test views one module-wide buffer of that size (the first touch of fresh
# memory costs more than a test's arithmetic), and no reference holds an
# fp64 copy: peak memory about 12 GB (the upsample test's F.interpolate).

BIG = 46341
CL_SHAPE = (1, 16, 11586, 11586)  # 2,147,730,336 elements, channels_last
UC_SIZE = 26755  # upsample_concat output (1, 3, 26755, 26755): 2,147,490,075 elements
GIB = 2 ** 30


@pytest.fixture(scope="module")
def big_buffer():
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = None
    if avail is not None and avail < 13 * GIB:
        pytest.skip(f"needs 13 GiB of free memory, {avail / GIB:.1f} GiB available")
    buf = torch.empty(math.prod(CL_SHAPE), dtype=torch.float32)
    yield buf
    del buf


def _big_map(buf, fill, shape=(1, 1, BIG, BIG), dtype=torch.float32, channels_last=False):
    n = math.prod(shape)
    assert n > 2 ** 31
    flat = buf.view(dtype)[:n]
    if channels_last:
        N, C, H, W = shape
        x = flat.view(N, H, W, C).permute(0, 3, 1, 2)
        assert x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = flat.view(shape)
    fill(x)
    return x


LARGE_BINS = (1, 2, 3, 6, (2, 3))


def _ones_spike(x):
    x.fill_(1.0)
    x[0, 0, BIG - 2, BIG - 5] = 1e6  # flat index past 2^31


def _uniform(x):
    """Uniform [0, 1): a random block of 1024 rows, each copy rolled along W by
    a different amount (drawing 2^31 numbers would take longer than the test)."""
    g = torch.Generator().manual_seed(0)
    N, C, H, W = x.shape
    block = torch.rand((N, C, 1024, W), generator=g).to(x.dtype)
    for k, r in enumerate(range(0, H, 1024)):
        x[:, :, r:r + 1024] = block[:, :, :min(1024, H - r)].roll(k * 7919 % W, dims=-1)


@pytest.mark.large
@pytest.mark.parametrize("fill", [_ones_spike, _uniform], ids=["ones_spike", "uniform"])
def test_large_avg_pool_nchw(_c, big_buffer, fill):
    """The issue's case: float accumulation gave 1.000385 for a mean of
    1.000466 (8e-5). Both NCHW float paths: the AVX2 block kernel (where the
    CPU has it) and the portable loops."""
    x = _big_map(big_buffer, fill)
    want = fp64_window_means(x, LARGE_BINS, nonnegative=True)
    for path in ("auto", "portable"):
        _c._set_test_override("no_block_kernel", int(path == "portable"))
        got = pe.multi_adaptive_avg_pool2d(x, LARGE_BINS, backend="cpp")
        assert_means_within(got, LARGE_BINS, *want, what=path)


@pytest.mark.large
def test_large_avg_pool_channels_last(_c, big_buffer):
    x = _big_map(big_buffer, _uniform, CL_SHAPE, channels_last=True)
    got = pe.multi_adaptive_avg_pool2d(x, LARGE_BINS, backend="cpp")
    assert_means_within(got, LARGE_BINS, *fp64_window_means(x, LARGE_BINS, nonnegative=True), what="channels_last")


@pytest.mark.large
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_avg_pool_16bit(_c, big_buffer, dtype):
    x = _big_map(big_buffer, _uniform, dtype=dtype)
    got = pe.multi_adaptive_avg_pool2d(x, LARGE_BINS, backend="cpp")
    assert_rounded_mean(got, LARGE_BINS, fp64_window_means(x, LARGE_BINS, nonnegative=True)[0], dtype)


@pytest.mark.large
def test_large_max_pool_values_and_indices(_c, big_buffer):
    """Distinct spikes at the bottom-right corner of every 6x6 window (the
    last row's flat indices are past 2^31): each bin's max and its int64
    index are the largest spike it contains, found here from the spike list."""
    x = _big_map(big_buffer, lambda t: t.fill_(1.0))
    spikes = []  # (value, h, w)
    for i, (h0, h1) in enumerate(adaptive_windows(BIG, 6)):
        for j, (w0, w1) in enumerate(adaptive_windows(BIG, 6)):
            v, h, w = 2.0 + i * 6 + j, h1 - 1, w1 - 2
            x[0, 0, h, w] = v
            spikes.append((v, h, w))
    assert max(h * BIG + w for _, h, w in spikes) > 2 ** 31
    got, idx = pe.multi_adaptive_max_pool2d(x, LARGE_BINS, return_indices=True, backend="cpp")
    for (bh, bw), g, ix in zip(pairs(LARGE_BINS), got, idx):
        assert ix.dtype == torch.int64
        for i, (h0, h1) in enumerate(adaptive_windows(BIG, bh)):
            for j, (w0, w1) in enumerate(adaptive_windows(BIG, bw)):
                v, h, w = max((v, h, w) for v, h, w in spikes if h0 <= h < h1 and w0 <= w < w1)
                assert g[0, 0, i, j].item() == v, (bh, bw, i, j)
                assert ix[0, 0, i, j].item() == h * BIG + w, (bh, bw, i, j)


@pytest.mark.large
def test_large_upsample_concat_output_past_2e31(_c, big_buffer):
    """An output of 3 x 26755^2 > 2^31 elements (x absent, three branches,
    written into the buffer with out=): the last channel (flat indices past
    2^31) equals F.interpolate, the first is spot-checked; then the same
    buffer, refilled, is the gradient, and each branch's gradient is within
    1e-6 of an fp64 Wy^T G Wx."""
    S = UC_SIZE
    hws = [(1, 1), (2, 2), (6, 6)]
    g = torch.Generator().manual_seed(0)
    brs = [torch.rand((1, 1) + hw, generator=g) for hw in hws]
    out = _big_map(big_buffer, lambda t: t.fill_(math.nan), (1, 3, S, S))
    pe.upsample_concat(None, brs, size=(S, S), out=out, backend="cpp")
    want = F.interpolate(brs[2], size=(S, S), mode="bilinear", align_corners=False)
    for r in range(0, S, 2048):  # in row chunks: assert_close's temporaries would double the memory
        torch.testing.assert_close(out[:, 2:, r:r + 2048], want[:, :, r:r + 2048], **TOL[torch.float32])
    del want
    want = F.interpolate(brs[0], size=(S, S), mode="bilinear", align_corners=False)
    for r in (0, S // 2, S - 1):
        torch.testing.assert_close(out[0, 0, r], want[0, 0, r], **TOL[torch.float32])
    del want
    # The gradient: uniform [0, 1) in the first channel, 0.1 with a spike in the others.
    _uniform(out[:, :1])
    out[:, 1:].fill_(0.1)
    out[0, 2, S - 1, S - 2] = 1e4  # flat index past 2^31
    grads = torch.ops.pyramid_ext.upsample_concat_backward(out, [v for hw in hws for v in (1,) + hw], 0, False, False)
    for k, (hw, gb) in enumerate(zip(hws, grads)):
        want, terms = fp64_resize_grad(out, k, hw, False, nonnegative=True)
        err = ((gb[0, 0].double() - want).abs() / terms).max().item()
        assert err <= REL, f"branch {hw}: error {err:.3g} x sum|terms| > {REL:g}"
