"""Every CPU code path, forced, and bitwise determinism across thread counts
and processes.

The CPU kernels choose a path from the machine and the thread count: the
float loops run the AVX-512, AVX2 or baseline copy (csrc/cpu/simd_loops.cpp),
NCHW float average and max pooling use the AVX2 block kernels
(block_cells.cpp, max_pool_nchw.cpp) or the portable simd::sum_rows /
simd::max_rows loops, channels_last average and max pooling (forward, and
the max backward) run one task per sample or split the work (multi_pool2d.cpp,
max_pool.cpp, from N and the thread count). A CI machine runs one of each; the test-only switch
pyramid_ext._C._set_test_override forces the others, so each is checked
against PyTorch eager and, bit for bit, against the automatic choice (every
path sums in the same order).
"""
import contextlib
import hashlib
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pyramid_ext as pe

from ._helpers import TOL, as_pair, eager_pool, eager_upsample_concat, layout, rand
from ._shift_add import eager_shift_add
from .conftest import need_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISA_NAMES = {1: "baseline", 2: "avx2", 3: "avx512"}
SWITCHES = ("simd_isa", "no_block_kernel", "channels_last_avg_tasks", "channels_last_max_tasks", "no_streaming_stores",
            "channels_last_max_direct", "no_sum_trees", "no_cell_rows", "general_cell_loop", "max_cell_rows")


@pytest.fixture(autouse=True)
def _c():
    need_backend("cpp")
    from pyramid_ext import _C

    yield _C
    for name in SWITCHES:
        _C._set_test_override(name, 0)


def _available_isas(_C):
    return [i for i in (1, 2, 3) if _C._simd_isa_available(i)]


def _workload():
    """Every float op on the CPU paths the switches choose between: pooling
    (NCHW with partial blocks of 8 and groups of 32 planes, channels_last
    with N=3 so both task splits apply; segments taller and wider than a
    float run, and tall but narrow ones, so average pooling sums several
    runs per cell on every path),
    forward and backward, upsample_concat forward and backward and
    upsample_shift_add in both layouts. Returns the results and the eager expectations."""
    got, want = [], []
    cases = [((3, 37, 29, 70), (1, 2, 3, 6, (2, 5))), ((2, 11, 61, 50), (1, (2, 3))), ((2, 19, 50, 40), (1, (2, 5))),
             ((2, 40, 16, 16), (1, 2, 3, 6)),  # channels_last avg: simd::tree_means (float sum trees, 8 channels of a 16)
             # per-sample tasks of 2-3 samples: the sums in place overwrite a cell buffer the next sample reuses
             ((5, 40, 16, 16), (1, 2, 3, 6)),
             ((2, 40, 32, 32), (1, 2, 3, 6))]  # channels_last avg: simd::bin_means (few cells, too deep for float trees)
    for (shape, bins), kind, mode in itertools.product(cases, ("nchw", "channels_last"), ("avg", "max")):
        base = rand(shape, torch.float32, seed=1)
        x = layout(base, kind).requires_grad_()
        xe = layout(base, kind).requires_grad_()
        fn = pe.multi_adaptive_avg_pool2d if mode == "avg" else pe.multi_adaptive_max_pool2d
        outs = fn(x, bins, backend="cpp")
        refs = eager_pool(xe, bins, mode)
        ws = [rand(r.shape, torch.float32, seed=10 + k) for k, r in enumerate(refs)]
        torch.autograd.backward(outs, ws)
        torch.autograd.backward(refs, ws)
        got += [o.detach() for o in outs] + [x.grad]
        want += [r.detach() for r in refs] + [xe.grad]
    # spatial_pyramid_pool's flat [c][bin] output: channels_last average levels of 16, 4 and 2 bins are
    # written a channel at a time from permuted vectors (simd::tree_means' blocks), 9 and 64 element by
    # element; 40 channels end in a partial pass of 8
    for (shape, bins), kind in itertools.product((((2, 40, 16, 16), (4, 3, 2, 1)), ((2, 40, 16, 16), (8, 4, (1, 2)))),
                                                 ("nchw", "channels_last")):
        x = layout(rand(shape, torch.float32, seed=11), kind)
        got.append(pe.spatial_pyramid_pool(x, bins, mode="avg", backend="cpp"))
        want.append(torch.cat([F.adaptive_avg_pool2d(x, b).flatten(1) for b in bins], 1))
    for kind in ("nchw", "channels_last"):
        x = layout(rand((2, 5, 33, 47), torch.float32, seed=2), kind)
        brs = [layout(rand((2, 3, s, s + 1), torch.float32, seed=3 + s), kind).requires_grad_() for s in (1, 2, 6)]
        bre = [b.detach().clone().requires_grad_() for b in brs]
        out = pe.upsample_concat(x, brs, align_corners=False, backend="cpp")
        ref = eager_upsample_concat(x, bre, (33, 47), False)
        g = rand(ref.shape, torch.float32, seed=4)
        out.backward(g)
        ref.backward(g)
        got += [out.detach()] + [b.grad for b in brs]
        want += [ref.detach()] + [b.grad for b in bre]
    # upsample_shift_add (K = 3): tap maps of eight or more columns upsampled (simd::resize_row's vector
    # blocks, one clamped at the row's end), downsampled (gathered one by one) and narrow (all scalar)
    for kind in ("nchw", "channels_last"):
        base = layout(rand((2, 4, 33, 47), torch.float32, seed=5), kind)
        taps = [layout(rand((2, 36, h, w), torch.float32, seed=6 + w), kind)
                for h, w in ((9, 13), (17, 24), (40, 61), (3, 5))]
        for align_corners in (False, True):
            got.append(torch.ops.pyramid_ext.upsample_shift_add(base, taps, 3, align_corners))
            want.append(eager_shift_add(base, taps, 3, align_corners))
    # upsample_shift_add (K = 1) on a pyramid's taps: rows narrower than a vector (read in place, the
    # tensor's last plane from a padded copy), 2 * 7 planes (groups of four planes and single ones),
    # rows of 16 + 8 + 3 floats, channels_last chunks of 64 + 16 + 8 + 3 channels; taps in the base's
    # layout and in the other one
    for kind, tap_kind, cout in (("nchw", "nchw", 7), ("channels_last", "channels_last", 91),
                                 ("nchw", "channels_last", 7), ("channels_last", "nchw", 91)):
        base = layout(rand((2, cout, 16, 27), torch.float32, seed=7), kind)
        taps = [layout(rand((2, cout, b, b + 1), torch.float32, seed=8 + b), tap_kind) for b in (1, 2, 3, 6)]
        for align_corners in (False, True):
            got.append(torch.ops.pyramid_ext.upsample_shift_add(base, taps, 1, align_corners))
            want.append(eager_shift_add(base, taps, 1, align_corners))
    return got, want


def _check_against_eager(got, want):
    for k, (a, b) in enumerate(zip(got, want)):
        # gradients of 1x1 bins / branches sum whole planes: fp32 summation-order noise
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"result {k}: {m}")


@contextlib.contextmanager
def _threads(threads):
    """torch's intra-op thread count set to ``threads`` inside the block, restored after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _configs(_C):
    """(simd_isa, no_block_kernel, channels_last tasks) for every path this CPU can run; the tasks value
    is set for both channels_last_avg_tasks and channels_last_max_tasks."""
    out = []
    for isa in _available_isas(_C):
        blocks = (0, 1) if isa >= 2 else (1,)
        for nb, tasks in itertools.product(blocks, (1, 2)):
            out.append((isa, nb, tasks))
    return out


# The channels_last max paths of one task layout: (channels_last_max_direct, max_cell_rows). Per-sample
# tasks combine bins from cells or scan them from their windows' pixels (direct), the latter also with
# every window scanned by rows; the split has no direct choice, its cells scanned as chosen or by rows
# (the automatic choice takes no rows on these small samples).
_MAX_PATHS = {1: {"cells": (1, 0), "direct": (2, 0), "direct+rows": (2, 2)}, 2: {"auto": (0, 0), "rows": (0, 2)}}


def _max_configs(_C):
    """_configs with each of the task layout's _MAX_PATHS."""
    return [(isa, nb, tasks, path) for isa, nb, tasks in _configs(_C) for path in _MAX_PATHS[tasks]]


def _set_max_path(_C, isa, nb, tasks, path):
    direct, rows = _MAX_PATHS[tasks][path]
    _C._set_test_override("simd_isa", isa)
    _C._set_test_override("no_block_kernel", nb)
    _C._set_test_override("channels_last_max_tasks", tasks)
    _C._set_test_override("channels_last_max_direct", direct)
    _C._set_test_override("max_cell_rows", rows)


def test_switches_reject_unknown_names_and_unsupported_values(_c):
    with pytest.raises(ValueError, match="unknown test override: fast_path"):
        _c._set_test_override("fast_path", 1)
    with pytest.raises(ValueError, match="simd_isa=9 is not valid"):
        _c._set_test_override("simd_isa", 9)
    with pytest.raises(ValueError, match="channels_last_avg_tasks=3 is not valid"):
        _c._set_test_override("channels_last_avg_tasks", 3)
    with pytest.raises(ValueError, match="channels_last_max_tasks=3 is not valid"):
        _c._set_test_override("channels_last_max_tasks", 3)
    with pytest.raises(ValueError, match="channels_last_max_direct=3 is not valid"):
        _c._set_test_override("channels_last_max_direct", 3)
    with pytest.raises(ValueError, match="no_sum_trees=2 is not valid"):
        _c._set_test_override("no_sum_trees", 2)
    with pytest.raises(ValueError, match="no_cell_rows=2 is not valid"):
        _c._set_test_override("no_cell_rows", 2)
    with pytest.raises(ValueError, match="max_cell_rows=3 is not valid"):
        _c._set_test_override("max_cell_rows", 3)
    with pytest.raises(ValueError, match="no_streaming_stores=2 is not valid"):
        _c._set_test_override("no_streaming_stores", 2)


@pytest.mark.parametrize("isa", [1, 2, 3], ids=lambda i: ISA_NAMES[i])
def test_simd_isa_switch_takes_effect(_c, isa):
    if not _c._simd_isa_available(isa):
        pytest.skip(f"this CPU has no {ISA_NAMES[isa]}")
    _c._set_test_override("simd_isa", isa)
    assert _c._simd_isa() == ISA_NAMES[isa]
    assert f"simd_isa={isa}" in _c._test_overrides()


def test_every_forced_path_matches_eager_and_the_automatic_path_bitwise(_c):
    auto, want = _workload()
    _check_against_eager(auto, want)
    configs = _configs(_c)
    assert (1, 1, 1) in configs and (1, 1, 2) in configs  # the baseline loops always run here
    for isa, nb, tasks in configs:
        _c._set_test_override("simd_isa", isa)
        _c._set_test_override("no_block_kernel", nb)
        _c._set_test_override("channels_last_avg_tasks", tasks)
        _c._set_test_override("channels_last_max_tasks", tasks)
        got, _ = _workload()
        _check_against_eager(got, want)
        for k, (a, b) in enumerate(zip(got, auto)):
            assert torch.equal(a, b), (f"simd_isa={ISA_NAMES[isa]} no_block_kernel={nb} "
                                       f"channels_last_avg_tasks={tasks}: result {k} differs from the automatic path")


def _float_bits(t):
    """t's float32 bits as int32, every NaN as one pattern (payloads aside)."""
    bits = t.contiguous().view(torch.int32).clone()
    bits[torch.isnan(t)] = 0x7FC00000
    return bits


@pytest.mark.parametrize("tasks", [1, 2])
def test_tree_means_quotients_same_bits_on_every_isa(_c, tasks):
    """simd::tree_means' means: the AVX2 and AVX-512 loops divide in float with an FMA correction
    (quotients16), the baseline loops multiply in double; both are the correctly rounded s / area, so the
    same bits on sums of every magnitude: subnormal and below 2^-100 (the double fallback), just above it,
    huge (overflowing to inf in the sums), signed zeros, +-inf and NaN, sixteen magnitudes in each pass.
    The first three passes hold sums below 2^-100 (the AVX2 and AVX-512 loops' pass without a branch per
    mean, then rewritten); the fourth none (that pass kept), with -0.0, inf and NaN."""
    g = torch.Generator().manual_seed(3)
    shape = (3, 64, 16, 16)  # channels_last avg (1, 2, 3, 6): the float sum trees
    exps = torch.tensor([-149, -145, -140, -127, -120, -104, -101, -100, -99, -98, -80, -20, 0, 40, 100, 126],
                        dtype=torch.float64)
    normal = torch.tensor([-99, -98, -90, -80, -60, -40, -20, -10, 0, 5, 10, 20, 40, 60, 80, 100], dtype=torch.float64)
    k = torch.randint(-7, 8, shape, generator=g).double()
    x = (k * torch.exp2(torch.cat([exps.repeat(3), normal])).view(1, 64, 1, 1)).float()
    for inf, neg_inf, nan, both, neg_zero, one in ((5, 21, 37, 40, 8, 24), (53, 54, 61, 56, 50, 59)):
        x[0, inf, 3, 4] = float("inf")
        x[1, neg_inf, 9, 9] = -float("inf")
        x[2, nan, 0, 15] = float("nan")
        x[1, both, 2:7, 2:9] = float("inf")
        x[1, both, 4, 4] = -float("inf")
        x[:, neg_zero] = -0.0  # all -0.0: bins of one cell keep the sign
        x[0, one] = 1.0  # exact sums: q = s * RN(1 / area) needs the correction for areas of 3, 6, 9...
    x = x.contiguous(memory_format=torch.channels_last)
    bins = (1, 2, 3, 6)
    _c._set_test_override("channels_last_avg_tasks", tasks)
    results = {}
    for isa in _available_isas(_c):
        _c._set_test_override("simd_isa", isa)
        results[isa] = pe.multi_adaptive_avg_pool2d(x, bins, backend="cpp")
    base = results[1]
    for isa, got in results.items():
        for level, (a, b) in enumerate(zip(got, base)):
            assert torch.equal(_float_bits(a), _float_bits(b)), f"{ISA_NAMES[isa]}, bins {bins[level]}"
    want = [F.adaptive_avg_pool2d(x.double(), b).float() for b in bins]
    # small integers times powers of two: every float sum is exact, so each mean is the rounded fp64 one
    # (but where 2^126 overflows the float sums, and the NaN channels)
    exact = [c for c in range(64) if c % 16 != 15 and c not in (37, 40, 56, 61)]
    for level, (a, w) in enumerate(zip(base, want)):
        assert torch.equal(a[:, exact], w[:, exact]), f"bins {bins[level]}"
        for inf, nan, both in ((5, 37, 40), (53, 61, 56)):
            assert torch.isinf(a[0, inf]).any() and torch.isnan(a[2, nan]).any() and torch.isnan(a[1, both]).any()
        for c in (8, 50):  # -0.0 everywhere
            assert torch.equal(_float_bits(a[:, c]), _float_bits(torch.full_like(a[:, c], -0.0))), f"channel {c}"


def _assert_avg_same_bits_either_way(_c, x, bins, want, switch, where):
    """multi_adaptive_avg_pool2d of x with the test switch 0 and 1: the same bits, and within the float
    tolerance of eager's `want`."""
    _c._set_test_override(switch, 0)
    off = pe.multi_adaptive_avg_pool2d(x, bins, backend="cpp")
    _c._set_test_override(switch, 1)
    on = pe.multi_adaptive_avg_pool2d(x, bins, backend="cpp")
    for k, (a, b, e) in enumerate(zip(off, on, want)):
        assert torch.equal(a, b), f"{where}, level {k}: {switch}=0 and {switch}=1 differ"
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,bins", [((16, 256, 16, 16), (1, 2, 3, 6)),  # cells of 1 or 2 rows by 1 or 2 pixels
                                         ((3, 77, 12, 9), (1, 2, 3, 6)),  # channels past the last 32 and 8
                                         ((2, 40, 5, 7), (2, 3, 4)),  # 1 x 1, 1 x 2, 2 x 1 and 2 x 2 cells
                                         ((1, 64, 6, 6), (1, 3)),  # N = 1: the phases split
                                         ((2, 32, 7, 11), (1, 2))])  # wider cells: the general loop alone
def test_small_cells_sum_as_the_general_loop_bitwise(_c, shape, bins):
    """simd::cell_sum sums cells of at most 2 x 2 pixels without the general loop's branches on the pixels
    left; both make the same additions in the same order, so channels_last float average pooling (sum trees
    and double bins) agrees bit for bit with general_cell_loop=1, on every ISA copy, within the float
    tolerance of eager."""
    x = layout(rand(shape, torch.float32, seed=12), "channels_last")
    want = eager_pool(x, bins, "avg")
    for isa in _available_isas(_c):
        _c._set_test_override("simd_isa", isa)
        for trees_off in (0, 1):
            _c._set_test_override("no_sum_trees", trees_off)
            _assert_avg_same_bits_either_way(_c, x, bins, want, "general_cell_loop",
                                             f"{ISA_NAMES[isa]}, no_sum_trees={trees_off}")


@pytest.mark.parametrize("shape,bins", [((2, 130, 32, 32), (1, 2, 4)),  # 8 x 8 cells of 130 channels: 33 KB
                                         ((3, 600, 20, 20), (1, 2, 3)),  # 10 x 10 and uneven cells, 600 channels
                                         ((1, 300, 24, 24), (1, 3))])  # 8 x 8 cells, N = 1 (split phases)
def test_wide_one_run_cells_by_rows_match_cell_sum_bitwise(_c, shape, bins):
    """channels_last float average pooling sums a one-run cell wider than L1 by rows (set_row_sum then
    add_row_sum, all channels of four pixels at a time) instead of simd::cell_sum (a chunk of channels over
    the whole cell); both add the same pixels in the same order, so the results agree bit for bit, on every
    ISA copy, and stay within the float tolerance of eager."""
    x = layout(rand(shape, torch.float32, seed=11), "channels_last")
    want = eager_pool(x, bins, "avg")
    for isa in _available_isas(_c):
        _c._set_test_override("simd_isa", isa)
        _assert_avg_same_bits_either_way(_c, x, bins, want, "no_cell_rows", ISA_NAMES[isa])


@pytest.mark.parametrize("tasks,direct", [(1, 1), (2, 1), (1, 2)], ids=["per-sample", "split", "direct"])
@pytest.mark.parametrize("shape,bins", [((2, 130, 32, 32), (1, 2, 4)),  # 8 x 8 cells of 130 channels
                                         ((3, 600, 20, 20), (1, 2, 3)),  # uneven cells of 600 channels
                                         ((2, 300, 24, 24), (1, 3, (2, 5)))])  # a non-square level
def test_wide_max_cells_by_rows_match_cell_scan_bitwise(_c, shape, bins, tasks, direct):
    """channels_last max pooling with indices scans an H-segment with a wide cell (a quarter of L2, in a
    sample over 512 KiB) by rows (simd::max_pixels, all channels of a pixel at a time, then keys) instead
    of simd::max_cell_keys (a few vectors of channels over the whole cell), and so does a sample whose bins
    are scanned straight from their windows' pixels (channels_last_max_direct=2) for a wide window.
    max_cell_rows=2 takes rows for every cell and window, 1 never: the same scan of the same pixels by
    ATen's rule, so values and indices agree bit for bit with the cell scan, on every ISA copy and both
    task layouts, and equal eager's, on inputs of few distinct values (ties everywhere), -0.0 beside
    +0.0, -inf, and NaNs in some samples only."""
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-1, 2, shape, generator=g).float()
    base[base == 0] = torch.where(torch.rand(int((base == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    u = torch.rand(shape, generator=g)
    base[u > 0.995] = float("-inf")
    base[0, 3, 1, 2] = float("nan")  # sample 0 takes the NaN path, the others the keys
    x = layout(base, "channels_last")
    want = [F.adaptive_max_pool2d(x, as_pair(b), return_indices=True) for b in bins]
    _c._set_test_override("channels_last_max_tasks", tasks)
    _c._set_test_override("channels_last_max_direct", direct)  # 1: cells; 2: bins scanned from pixels
    for isa in _available_isas(_c):
        _c._set_test_override("simd_isa", isa)
        _c._set_test_override("max_cell_rows", 2)
        by_rows = pe.multi_adaptive_max_pool2d(x, bins, return_indices=True, backend="cpp")
        _c._set_test_override("max_cell_rows", 1)
        by_cells = pe.multi_adaptive_max_pool2d(x, bins, return_indices=True, backend="cpp")
        for k, ((v, i), (vc, ic), (ve, ie)) in enumerate(zip(zip(*by_rows), zip(*by_cells), want)):
            where = f"{ISA_NAMES[isa]}, level {k}"
            assert torch.equal(v.view(torch.int32), vc.view(torch.int32)), f"{where}: values differ from the cell scan"
            assert torch.equal(i, ic), f"{where}: indices differ from the cell scan"
            assert torch.equal(v.view(torch.int32), ve.view(torch.int32)), f"{where}: values differ from eager"
            assert torch.equal(i, ie), f"{where}: indices differ from eager"


def _max_workload():
    """Max pooling on float32 planes of few distinct values (ties everywhere), NaNs (single ones and a
    run of them) and -inf (whole planes and windows), NCHW and channels_last, 70 planes (groups of 32,
    a partial block of 8) and N=3: values, indices and gradients, with the eager expectations."""
    got, want = [], []
    bins = (1, 2, 3, 6, (2, 5), (4, 13))
    g = torch.Generator().manual_seed(7)
    base = torch.randint(0, 3, (3, 70, 29, 37), generator=g).float()
    u = torch.rand(base.shape, generator=g)
    base[u < 0.01] = float("nan")
    base[u > 0.98] = float("-inf")
    base[0, 1] = float("-inf")
    base[1, 2, 3:9, 4:20] = float("nan")
    base[2, 5, :, :18] = float("-inf")
    for kind in ("nchw", "channels_last"):
        x = layout(base, kind).requires_grad_()
        vals, idxs = pe.multi_adaptive_max_pool2d(x, bins, return_indices=True, backend="cpp")
        ws = [rand(v.shape, torch.float32, seed=20 + k) for k, v in enumerate(vals)]
        (gx,) = torch.autograd.grad(vals, x, ws)
        xe = layout(base, kind).requires_grad_()
        refs = [F.adaptive_max_pool2d(xe, as_pair(b), return_indices=True) for b in bins]
        (gxe,) = torch.autograd.grad([v for v, _ in refs], xe, ws)
        got += [("value", v.detach()) for v in vals] + [("index", i) for i in idxs] + [("grad", gx)]
        want += [v.detach() for v, _ in refs] + [i for _, i in refs] + [gxe]
    return got, want


def _check_max_against_eager(got, want):
    for k, ((what, a), b) in enumerate(zip(got, want)):
        if what == "index":
            assert torch.equal(a, b), f"result {k}: indices differ from PyTorch's"
        else:  # values exact, NaN where PyTorch has NaN; gradients summed over the levels in another order
            tol = 1e-5 if what == "grad" else 0
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"result {k} ({what}): {m}")


def _bits(t):
    """Integer view, so NaNs compare equal bit for bit."""
    return t.view(torch.int32) if t.is_floating_point() else t


def test_every_forced_max_path_keeps_atens_ties_and_nans(_c):
    """ATen's rule on every max path (first maximum in row-major order, the last NaN), values and
    indices exactly as PyTorch's, and every forced path bit for bit as the automatic one."""
    auto, want = _max_workload()
    _check_max_against_eager(auto, want)
    for isa, nb, tasks, path in _max_configs(_c):
        _set_max_path(_c, isa, nb, tasks, path)
        got, _ = _max_workload()
        for k, ((what, a), (_, b)) in enumerate(zip(got, auto)):
            assert torch.equal(_bits(a), _bits(b)), (
                f"simd_isa={ISA_NAMES[isa]} no_block_kernel={nb} channels_last_max_tasks={tasks} "
                f"path={path}: result {k} ({what}) differs from the automatic path")


def _sparse_nan_max_input():
    """Ties everywhere (values 0..2 and -inf), NaN in a few planes and samples only: the max kernels combine
    NaN-free blocks of 8 planes, groups of 32 and channels_last samples without the NaN rule (max_pool.cpp,
    max_pool_nchw.cpp), so blocks with and without NaN sit side by side here. 4 samples x 75 planes: plane
    3 (block 0, group 0) and plane 70 (the partial group) of sample 1 hold NaNs, sample 2 none; one whole
    row of -inf and a -inf plane in NaN-free blocks; rows of ties across whole windows."""
    g = torch.Generator().manual_seed(11)
    base = torch.randint(0, 3, (4, 75, 23, 31), generator=g).float()
    base[:, :, 5] = 2.0  # a whole row of equal maxima: the first in row-major order must win
    base[0, 40] = float("-inf")
    base[3, 9, :, 7] = float("-inf")
    base[1, 3, 4, 6] = float("nan")
    base[1, 3, 17, 2] = float("nan")
    base[1, 70, 0, 30] = float("nan")
    base[3, 74, 11:13, 20:22] = float("nan")
    return base


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_max_without_nan_rule_on_nan_free_blocks_keeps_atens_ties(_c, kind):
    """Values and indices exactly as PyTorch's on every forced path, NaN-free and NaN-holding blocks mixed;
    the values alone (mode 2, no indices tracked: channels_last samples with a NaN are computed again with
    indices) too."""
    base = _sparse_nan_max_input()
    bins = (1, 2, 3, 6, (4, 5), (7, 13))
    want = [F.adaptive_max_pool2d(layout(base, kind), as_pair(b), return_indices=True) for b in bins]
    for isa, nb, tasks, path in _max_configs(_c):
        _set_max_path(_c, isa, nb, tasks, path)
        for threads in (1, 2):
            with _threads(threads):
                vals, idxs = pe.multi_adaptive_max_pool2d(layout(base, kind), bins, return_indices=True,
                                                          backend="cpp")
                vals_only = pe.multi_adaptive_max_pool2d(layout(base, kind), bins, backend="cpp")
            for k, (v, i, vo, (wv, wi)) in enumerate(zip(vals, idxs, vals_only, want)):
                where = (f"simd_isa={ISA_NAMES[isa]} no_block_kernel={nb} tasks={tasks} path={path} "
                         f"threads={threads} level {k}")
                assert torch.equal(i, wi), f"{where}: indices differ from PyTorch's"
                assert torch.equal(_bits(v), _bits(wv)), f"{where}: values differ from PyTorch's"
                assert torch.equal(_bits(vo), _bits(wv)), f"{where}: values without indices differ from PyTorch's"


def _signed_ties_max_input():
    """Few distinct values of both signs, so ties everywhere: -0.0 beside +0.0 (equal for ATen: the first
    wins, and its sign is the output's), negative values, subnormals, +-inf and the largest floats. NaN-free
    channels_last samples combine their cells as ordered integer keys (simd::max_cell_keys in max_pool.cpp), which
    must order these exactly as ATen compares them. 3 samples x 75 channels (vectors of 64 and 8 channels
    and a tail of 3); sample 1 holds a NaN (the value rule instead)."""
    g = torch.Generator().manual_seed(13)
    values = torch.tensor([-0.0, 0.0, -1.5, -1e-45, 1e-45, 2.0, -3e38, 3e38, float("-inf"), float("inf")])
    base = values[torch.randint(0, len(values), (3, 75, 19, 26), generator=g)]
    zeros = torch.tensor([-0.0, 0.0])
    base[:, 0] = zeros[torch.randint(0, 2, (3, 19, 26), generator=g)]  # maxima only zeros: the first's sign
    base[:, 1] = -values[torch.randint(2, 4, (3, 19, 26), generator=g)].abs()  # only negative values
    base[:, 2] = float("-inf")
    base[:, 2, 7, 3] = -3e38
    base[:, 70] = zeros[torch.randint(0, 2, (3, 19, 26), generator=g)]  # in the tail of 3 channels
    base[:, 66] = -1e-45
    base[1, 40, 2, 9] = float("nan")
    return base


def test_max_channels_last_keys_keep_atens_order_of_signed_values(_c):
    """channels_last max pooling of NaN-free samples (integer keys) gives PyTorch's values bit for bit
    (the sign of a zero included) and its indices, levels packed channels_last (multi_adaptive_max_pool2d)
    or planar (spatial_pyramid_pool), on every forced path and thread count; so do the values-only calls
    (mode 2: spatial_pyramid_pool, multi_adaptive_max_pool2d without indices), whose bins with a zero
    maximum beside a -0.0 cell take the indexed combine."""
    x = layout(_signed_ties_max_input(), "channels_last")
    bins = (1, 2, 3, 6, (4, 5))
    want = [F.adaptive_max_pool2d(x, as_pair(b), return_indices=True) for b in bins]
    want_spp = torch.cat([v.flatten(1) for v, _ in want], 1)
    for isa, nb, tasks, path in _max_configs(_c):
        _set_max_path(_c, isa, nb, tasks, path)
        for threads in (1, 2):
            with _threads(threads):
                vals, idxs = pe.multi_adaptive_max_pool2d(x, bins, return_indices=True, backend="cpp")
                vals_only = pe.multi_adaptive_max_pool2d(x, bins, backend="cpp")
                spp = pe.spatial_pyramid_pool(x, bins, mode="max", backend="cpp")
            where = f"simd_isa={ISA_NAMES[isa]} tasks={tasks} path={path} threads={threads}"
            for k, (v, i, vo, (wv, wi)) in enumerate(zip(vals, idxs, vals_only, want)):
                assert torch.equal(i, wi), f"{where} level {k}: indices differ from PyTorch's"
                assert torch.equal(_bits(v), _bits(wv)), f"{where} level {k}: values differ from PyTorch's"
                assert torch.equal(_bits(vo), _bits(wv)), f"{where} level {k}: values-only differ from PyTorch's"
            assert torch.equal(_bits(spp), _bits(want_spp)), f"{where}: SPP values differ from PyTorch's"


def test_max_channels_last_indices_over_every_channel_vector_width(_c):
    """channels_last max pooling with indices scans each cell with its state in registers, a group of
    channels at a time (simd::max_cell_keys: 128 channels on AVX-512, then 16, 8 and one by one); 155
    channels take every group, with ties everywhere (few distinct values: a wrong index or a skipped pixel
    shows) and a NaN in sample 1 (that sample scanned again for the NaN rule). Indices and values as
    PyTorch's on every forced path and thread count."""
    g = torch.Generator().manual_seed(21)
    values = torch.tensor([-0.0, 0.0, -1.0, 1.0, 2.0])
    base = values[torch.randint(0, len(values), (2, 155, 13, 11), generator=g)]
    base[1, 130, 5, 4] = float("nan")
    x = layout(base, "channels_last")
    bins = (1, 2, 3, 6, (4, 5))
    want = [F.adaptive_max_pool2d(x, as_pair(b), return_indices=True) for b in bins]
    for isa, nb, tasks, path in _max_configs(_c):
        _set_max_path(_c, isa, nb, tasks, path)
        for threads in (1, 2):
            with _threads(threads):
                vals, idxs = pe.multi_adaptive_max_pool2d(x, bins, return_indices=True, backend="cpp")
            where = f"simd_isa={ISA_NAMES[isa]} tasks={tasks} path={path} threads={threads}"
            for k, (v, i, (wv, wi)) in enumerate(zip(vals, idxs, want)):
                assert torch.equal(i, wi), f"{where} level {k}: indices differ from PyTorch's"
                assert torch.equal(_bits(v), _bits(wv)), f"{where} level {k}: values differ from PyTorch's"


def test_max_values_only_takes_the_first_zero_and_the_last_nan_in_row_major_order(_c):
    """Values-only max (mode 2) keeps each cell's maximum alone, and combining cells in cell order differs
    from ATen's row-major scan where it matters: the sign of a zero maximum (the first zero in row-major
    order: here -0.0 at row 0 of a later cell, +0.0 at row 1 of an earlier one) and which NaN (the last:
    here a NaN with another sign bit at row 0 of a later cell). Both must come out as PyTorch's, bit for
    bit, on every forced path and thread count; sample 1 holds neither (the values path alone)."""
    bins = (1, 2, 3)  # on 12 x 12: cells cut at 0, 4, 6, 8, 12
    base = torch.full((2, 20, 12, 12), -1.0)
    base[:, :, 7, 7] = -0.5
    base[0, 3, 1, 0] = 0.0
    base[0, 3, 0, 5] = -0.0
    base[0, 17, 1, 0] = float("nan")
    base[0, 17, 0, 9] = -float("nan")
    x = layout(base, "channels_last")
    assert _bits(x[0, 17, 1, 0]) != _bits(x[0, 17, 0, 9])
    want = [F.adaptive_max_pool2d(x, b) for b in bins]
    assert _bits(want[0][0, 3, 0, 0]) == _bits(torch.tensor(-0.0))
    assert _bits(want[0][0, 17, 0, 0]) == _bits(x[0, 17, 1, 0])
    want_spp = torch.cat([v.flatten(1) for v in want], 1)
    for isa, nb, tasks, path in _max_configs(_c):
        _set_max_path(_c, isa, nb, tasks, path)
        for threads in (1, 2):
            with _threads(threads):
                vals = pe.multi_adaptive_max_pool2d(x, bins, backend="cpp")
                spp = pe.spatial_pyramid_pool(x, bins, mode="max", backend="cpp")
            where = f"simd_isa={ISA_NAMES[isa]} tasks={tasks} path={path} threads={threads}"
            for k, (v, wv) in enumerate(zip(vals, want)):
                assert torch.equal(_bits(v), _bits(wv)), f"{where} level {k}: values differ from PyTorch's"
            assert torch.equal(_bits(spp), _bits(want_spp)), f"{where}: SPP values differ from PyTorch's"


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_tiny_max_inputs_match_eager(_c, kind):
    """Inputs under the size at which the kernels stop splitting work across threads."""
    for shape in [(1, 8, 8, 8), (2, 3, 5, 7), (3, 16, 9, 4)]:
        base = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(5)).float()
        base.view(-1)[7] = float("nan")
        x = layout(base, kind)
        vals, idxs = pe.multi_adaptive_max_pool2d(x, (1, 2, 3), return_indices=True, backend="cpp")
        for b, v, i in zip((1, 2, 3), vals, idxs):
            wv, wi = F.adaptive_max_pool2d(x, b, return_indices=True)
            assert torch.equal(i, wi) and torch.equal(_bits(v), _bits(wv)), (shape, b)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("tasks", [1, 2])
def test_max_backward_rejects_an_index_out_of_range(_c, kind, tasks):
    _c._set_test_override("channels_last_max_tasks", tasks)
    x = layout(rand((3, 4, 6, 5), torch.float32), kind)
    h, w, lb = [0, 6], [0, 5], [1, 1]
    _, idx = torch.ops.pyramid_ext.multi_pool2d(x, h, w, lb, 1, False)
    grad = torch.ones(3, 4)
    for bad in (-1, 30):
        idx_bad = idx.clone()
        idx_bad[1, 2] = bad
        with pytest.raises(RuntimeError, match="index out of range"):
            torch.ops.pyramid_ext.multi_pool2d_backward(grad, idx_bad, [3, 4, 6, 5], h, w, lb, 1, False,
                                                        kind == "channels_last")


def test_max_backward_addend_on_every_path_equals_the_sum_bit_for_bit(_c):
    """The float max backward adds the addend per plane or sample while it is in cache (max_pool.cpp): on
    every forced path, both level layouts, addends of any strides, the result is addend + the plain
    backward bit for bit. Ties send several bins' gradients to one element (their sum is rounded before
    the addend is added), and a -0.0 addend where no bin sends one becomes +0.0, as in addend + grad."""
    from pyramid_ext.windows import pyramid_windows

    shape = (3, 21, 13, 11)
    g = torch.Generator().manual_seed(9)
    base = torch.randint(0, 3, shape, generator=g).float()
    hb, wb, lb = pyramid_windows(13, 11, [(1, 1), (2, 2), (3, 3), (2, 5)], "adaptive")
    op = torch.ops.pyramid_ext.multi_pool2d_backward
    for kind, cl_levels in itertools.product(("nchw", "channels_last"), (False, True)):
        cl = kind == "channels_last"
        x = layout(base, kind)
        _, idx = torch.ops.pyramid_ext.multi_pool2d(x, hb, wb, lb, 1, cl_levels)
        grad = torch.randn(idx.shape, generator=g)
        big = torch.randn(3, 26, 13, 11, generator=g)
        addends = {"dense": layout(torch.randn(shape, generator=g), kind), "slice_nchw": big[:, 2:23],
                   "slice_channels_last": big.contiguous(memory_format=torch.channels_last)[:, 3:24],
                   "transposed": torch.randn(3, 21, 11, 13, generator=g).transpose(2, 3)}
        for a in addends.values():
            a[:, :, 12, 10] = -0.0  # the last pixel: no bin's first maximum
        for isa, tasks in itertools.product(_available_isas(_c), (1, 2)):
            _c._set_test_override("simd_isa", isa)
            _c._set_test_override("channels_last_max_tasks", tasks)
            plain = op(grad, idx, list(shape), hb, wb, lb, 1, cl_levels, cl)
            assert (plain[:, :, 12, 10] == 0).all()
            for name, a in addends.items():
                got = op(grad, idx, list(shape), hb, wb, lb, 1, cl_levels, cl, a)
                assert torch.equal(_bits(got), _bits(a + plain)), (
                    f"{kind} channels_last_levels={cl_levels} simd_isa={ISA_NAMES[isa]} tasks={tasks} {name}")


def test_cached_plans_are_keyed_on_every_argument(_c):
    """multi_pool2d.cpp keeps the plans of recent calls: the same windows on another channel count or
    level layout get their own plan (against the torch backend, forward and backward), and windows that a
    cached plan passed for one map size are still checked against another."""
    from pyramid_ext import reference

    h, w, lb = [2, 6, 0, 3, 3, 6], [0, 4, 3, 5], [1, 1, 2, 1]
    for c, cl_levels, kind in [(4, False, "nchw"), (6, False, "nchw"), (6, True, "nchw"), (6, True, "channels_last"),
                               (4, True, "channels_last"), (4, False, "channels_last")]:
        x = layout(rand((2, c, 6, 5), torch.float32, seed=c), kind).requires_grad_()
        vals, idx = torch.ops.pyramid_ext.multi_pool2d(x.detach(), h, w, lb, 1, cl_levels)
        want, want_idx = reference.multi_pool2d(x, h, w, lb, 1, cl_levels)
        where = (c, cl_levels, kind)
        assert torch.equal(vals, want.detach()) and torch.equal(idx, want_idx), where
        grad = rand(vals.shape, torch.float32, seed=10 + c)
        gx = torch.ops.pyramid_ext.multi_pool2d_backward(grad, idx, [2, c, 6, 5], h, w, lb, 1, cl_levels,
                                                         kind == "channels_last")
        (want_gx,) = torch.autograd.grad(want, x, grad)
        torch.testing.assert_close(gx, want_gx, rtol=1e-6, atol=1e-6, msg=lambda m: f"{where}: {m}")
    x = rand((2, 3, 6, 5), torch.float32)
    torch.ops.pyramid_ext.multi_pool2d(x, h, w, lb, 0, False)
    message = r"window \[2, 6\) along H is empty or outside \[0, 5\)"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyramid_ext.multi_pool2d(x[:, :, :5].contiguous(), h, w, lb, 0, False)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyramid_ext.multi_pool2d_backward(torch.ones(2, 9), None, [2, 3, 5, 5], h, w, lb, 0, False, False)


def _digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    from tests.test_cpu_paths import _digest, _workload
    got, _ = _workload()
    print("DIGEST", torch.get_num_threads(), _digest(got))
    """
)


def test_bitwise_deterministic_across_thread_counts_and_processes(_c):
    """The same results, bit for bit, with 1, 2 and 3 threads in this process
    and in fresh processes (another thread pool, another allocation order)."""
    prev = torch.get_num_threads()
    digests = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            digests[f"in-process, {threads} threads"] = _digest(_workload()[0])
    finally:
        torch.set_num_threads(prev)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for threads in (1, 2, 3):
        r = subprocess.run([sys.executable, "-c", _SCRIPT, str(threads)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("DIGEST")][0].split()
        assert line[1] == str(threads)
        digests[f"process, {threads} threads"] = line[2]
    assert len(set(digests.values())) == 1, digests


def _tail_reference(x, weight, bias, bn, relu):
    """A pointwise tail in fp64, and the magnitude its float32 rounding error is bounded by."""
    x64, w64 = x.double(), weight.double().flatten(1)
    prod = torch.einsum("nchw,oc->nohw", x64, w64)
    mag = torch.einsum("nchw,oc->nohw", x64.abs(), w64.abs())
    if bias is not None:
        prod, mag = prod + bias.double().view(1, -1, 1, 1), mag + bias.double().abs().view(1, -1, 1, 1)
    if bn is not None:
        bw, bb, mean, var = (t.double().view(1, -1, 1, 1) for t in bn)
        alpha = bw / torch.sqrt(var + 1e-5)
        prod = (prod - mean) * alpha + bb
        mag = mag * alpha.abs() + (mean * alpha).abs() + bb.abs()
    if relu:
        prod = prod.relu()
    return prod, mag


def _tail_cases():
    """(x, weight, bias, bn, relu) over layouts (NCHW, channels_last, a pooled level whose samples lie
    apart), odd channel counts on both sides of the kernel's chunks of 16 and 64 output channels,
    1x1 to 13x11 maps, 1 to 5 samples, every tail form."""
    g = torch.Generator().manual_seed(3)
    # NCHW maps of a multiple of 16 pixels run along the planes (4x4 to 16x16 below)
    sizes = [(1, 1, 1, 1, 1), (3, 7, 2, 3, 15), (5, 64, 6, 6, 64), (2, 33, 5, 4, 17), (1, 3, 13, 11, 70),
             (4, 240, 3, 3, 130), (2, 16, 1, 1, 65), (3, 7, 4, 4, 15), (2, 33, 8, 6, 70), (5, 64, 16, 16, 64)]
    forms = [(b, nrm, r) for b in (False, True) for nrm in (False, True) for r in (0, 1, 2)]
    for k, (n, cin, h, w, cout) in enumerate(sizes):
        for kind in ("nchw", "cl", "level"):
            if kind == "level":  # channels_last samples with another level's pixels between them
                x = torch.randn(n, h * w + 5, cin, generator=g)[:, 5:].view(n, h, w, cin).permute(0, 3, 1, 2)
            else:
                x = torch.randn(n, cin, h, w, generator=g)
                x = x.contiguous(memory_format=torch.channels_last) if kind == "cl" else x
            bias, norm, relu = forms[(k * 3 + len(kind)) % len(forms)]
            weight = torch.randn(cout, cin, 1, 1, generator=g)
            b = torch.randn(cout, generator=g) if bias else None
            bn = (torch.randn(cout, generator=g), torch.randn(cout, generator=g), torch.randn(cout, generator=g),
                  torch.rand(cout, generator=g) + 0.5) if norm else None
            yield x, weight, b, bn, relu


def test_pointwise_product_weight_strides(_c):
    """The product kernel transposes the weight per call: 8x8 register transposes where the input
    channels are contiguous (also with rows further apart: upsample_concat_conv2d's column slices),
    a scalar loop for other strides. Every form gives the bits of the contiguous weight (the same
    products in the same order), on sizes with and without whole 8x8 blocks and on both layouts."""
    if not _c._pointwise_product_available():
        pytest.skip("this CPU has no AVX2 with FMA: the product kernel does not run")
    g = torch.Generator().manual_seed(5)
    for n, cin, h, w, cout in [(2, 64, 6, 6, 64), (3, 37, 5, 3, 19), (2, 24, 4, 4, 72), (1, 9, 3, 3, 130)]:
        weight = torch.randn(cout, cin, 1, 1, generator=g)
        wide = torch.randn(cout, 2 * cin + 3, 1, 1, generator=g)
        wide[:, 3:cin + 3] = weight
        forms = {"sliced": wide[:, 3:cin + 3],  # rows 2 * cin + 3 floats apart, channels contiguous
                 "transposed": weight.squeeze(-1).squeeze(-1).t().contiguous().t()[:, :, None, None],
                 "channels_last": weight.contiguous(memory_format=torch.channels_last)}
        assert forms["sliced"].stride(1) == 1 and forms["transposed"].stride(1) == cout
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=layout)
            base = _c._pointwise_tail(x, weight, None, None, None, None, None, 0.0, 0)
            ref = torch.nn.functional.conv2d(x.double(), weight.double())
            assert torch.allclose(base.double(), ref, rtol=1e-5, atol=1e-5)
            for name, wf in forms.items():
                got = _c._pointwise_tail(x, wf, None, None, None, None, None, 0.0, 0)
                assert torch.equal(got, base), (name, n, cin, cout, layout)


def test_pointwise_product_layouts_same_bits(_c):
    """The product kernel's rows (channels_last, a pooled level) and planes (NCHW maps of a
    multiple of 16 pixels, cut among 1-3 threads at multiples of 16 pixels) sum each output in
    the same order: the same bits in every layout."""
    if not _c._pointwise_product_available():
        pytest.skip("this CPU has no AVX2 with FMA: the product kernel does not run")
    g = torch.Generator().manual_seed(5)
    for n, cin, h, w, cout in ((3, 7, 4, 4, 15), (2, 33, 8, 6, 70), (5, 64, 16, 16, 64), (3, 16, 2, 3, 9)):
        x = torch.randn(n, cin, h, w, generator=g)
        weight, bias = torch.randn(cout, cin, 1, 1, generator=g), torch.randn(cout, generator=g)
        results = []
        for threads in (1, 2, 3):
            with _threads(threads):
                for xs in (x, x.contiguous(memory_format=torch.channels_last)):
                    results.append(_c._pointwise_tail(xs, weight, bias, None, None, None, None, 0.0, 1))
        assert all(torch.equal(r, results[0]) for r in results[1:]), (n, cin, h, w, cout)


def test_pointwise_product_kernel(_c):
    """_C._pointwise_tail without autograd (a PPM's branch tails, upsample_concat_conv2d's tap
    products) runs csrc/cpu/pointwise_product.cpp: the product, bias, eval BatchNorm and ReLU in
    one pass, in the result's layout. Within float32's dot-product bound of fp64 on every layout
    and tail form; no ATen product or BatchNorm called (the profiler sees none); the same bits on
    1, 2 and 3 threads (an output's sum never depends on the cut) and on both copies (AVX2 with
    FMA, AVX-512), and a NaN kept by the ReLU. Where the CPU has neither copy (simd_isa forced to
    baseline), and for weights over 2^15 floats (the kernel packs the weight per call; MKL is the
    faster product there), ATen's ops compute it, within the same bound."""
    isas = [i for i in _available_isas(_c) if i >= 2]
    if not _c._pointwise_product_available():
        pytest.skip("this CPU has no AVX2 with FMA: the product kernel does not run")
    u = 2.0 ** -24
    for x, weight, bias, bn, relu in _tail_cases():
        want, mag = _tail_reference(x, weight, bias, bn, relu)
        args = (x, weight, bias, *(bn or (None,) * 4), 1e-5, relu)
        results = []
        for isa in isas + [1]:
            _c._set_test_override("simd_isa", isa)
            assert _c._pointwise_product_available() == (isa >= 2)
            for threads in ((1, 2, 3) if isa >= 2 else (2,)):
                with _threads(threads):
                    if isa >= 2 and threads == 2:
                        with torch.profiler.profile() as prof:
                            got = _c._pointwise_tail(*args)
                        ops = {e.name for e in prof.events()}
                        assert not ops & {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                          "aten::native_batch_norm", "aten::relu_", "aten::relu"}, ops
                    else:
                        got = _c._pointwise_tail(*args)
                bound = (x.shape[1] + 8) * u * mag
                assert ((got.double() - want).abs() <= bound).all(), (tuple(x.shape), weight.shape[0], isa)
                if isa >= 2:
                    results.append(got)
        _c._set_test_override("simd_isa", 0)
        for r in results[1:]:
            assert torch.equal(r, results[0])
    x = torch.randn(2, 256, 3, 3)
    for cout, aten in ((128, False), (129, True)):
        with torch.profiler.profile() as prof:
            got = _c._pointwise_tail(x, torch.randn(cout, 256, 1, 1), None, None, None, None, None, 0.0, 0)
        assert ("aten::mm" in {e.name for e in prof.events()}) == aten, cout
    x = torch.randn(4, 8, 2, 2)
    x[1, :, 0, 1] = float("nan")
    got = _c._pointwise_tail(x, torch.randn(5, 8, 1, 1), None, None, None, None, None, 0.0, 2)
    assert got[1, :, 0, 1].isnan().all() and not got[0].isnan().any()
