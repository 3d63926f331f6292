"""Triton backend: pyramid_ext.triton against PyTorch eager.

Runs on CUDA tensors when a GPU is present, else on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, which must be set before Triton is imported;
the CI does). Shapes stay small: the interpreter is slow.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install triton)", allow_module_level=True)
if not _INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device and TRITON_INTERPRET != '1': run with TRITON_INTERPRET=1 to test the Triton kernels on CPU",
        allow_module_level=True,
    )

import pyramid_ext as pe  # noqa: E402
from pyramid_ext import triton as pe_triton  # noqa: E402
from pyramid_ext.triton import _multi_pool2d as triton_pool  # noqa: E402
from pyramid_ext.windows import pyramid_windows, normalize_bins  # noqa: E402

from ._helpers import TOL_TRITON, eager_spp, keras_same_avg, keras_same_max, pairs, rand, sppnet_pool  # noqa: E402
from ._helpers import eager_upsample_concat as _helpers_eager_upsample_concat  # noqa: E402
from ._helpers import bilinear_backward_fp64, fp64_resize_grad, fp64_window_means, grad_close, naive_multi_pool  # noqa: E402
from ._helpers import SUM_ATOL_VS_FP64  # noqa: E402
from ._shift_add import (BACKWARD_CHAIN, EAGER_ATOL, check_shift_add, eager_shift_add, forward_chain,  # noqa: E402
                         shift_add_backward_fp64, shift_add_fp64, tap_shapes, weight_dtype)

if _INTERPRET and not pe_triton.INTERPRETED:
    pytest.skip("pyramid_ext.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

DEVICE = "cpu" if _INTERPRET else "cuda"
OPS = torch.ops.pyramid_ext
T = "triton"


def _rand(*shape, dtype=torch.float32, seed=0):
    return rand(shape, dtype, seed, DEVICE)


def _pairs(bins):
    return pairs(bins)


def _tol(dtype):
    return TOL_TRITON[dtype]


def _eager_avg(x, b):
    if x.dtype in (torch.float16, torch.bfloat16):  # reference in fp32, like the kernels' accumulation
        return F.adaptive_avg_pool2d(x.float(), b).to(x.dtype)
    return F.adaptive_avg_pool2d(x, b)


# --------------------------------------------------------------------------
# Pooling forward
# --------------------------------------------------------------------------

POOL_CASES = [
    ((2, 3, 33, 47), (1, 2, 3, 6)),
    ((2, 3, 13, 11), (4, 2, 1)),
    ((1, 2, 9, 14), [(1, 3), (2, 1), (4, 6), 3]),
    ((2, 2, 3, 5), (6, (2, 7), 1)),  # bins larger than the input: overlapping windows
    ((1, 3, 1, 1), (1, 2, 3)),
]


@pytest.mark.parametrize("shape,bins", POOL_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_avg_pool_matches_adaptive_avg_pool2d(shape, bins, dtype):
    x = _rand(*shape, dtype=dtype)
    outs = pe.multi_adaptive_avg_pool2d(x, bins, backend=T)
    for b, o in zip(_pairs(bins), outs):
        torch.testing.assert_close(o, F.adaptive_avg_pool2d(x, b), **_tol(dtype))


@pytest.mark.parametrize("shape,bins", POOL_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_max_pool_matches_adaptive_max_pool2d(shape, bins, dtype):
    x = _rand(*shape, dtype=dtype, seed=1)
    vals, idxs = pe.multi_adaptive_max_pool2d(x, bins, return_indices=True, backend=T)
    for b, v, i in zip(_pairs(bins), vals, idxs):
        rv, ri = F.adaptive_max_pool2d(x, b, return_indices=True)
        assert torch.equal(v, rv)
        assert torch.equal(i, ri)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_16bit(dtype):
    x = _rand(2, 3, 17, 23, dtype=dtype, seed=2)
    bins = (1, 2, 3, 6)
    for b, o in zip(_pairs(bins), pe.multi_adaptive_avg_pool2d(x, bins, backend=T)):
        assert o.dtype == dtype
        torch.testing.assert_close(o, _eager_avg(x, b), **_tol(dtype))
    vals, idxs = pe.multi_adaptive_max_pool2d(x, bins, return_indices=True, backend=T)
    for b, v, i in zip(_pairs(bins), vals, idxs):
        rv, ri = F.adaptive_max_pool2d(x.float(), b, return_indices=True)  # exact: upcasting keeps order and ties
        assert torch.equal(v, rv.to(dtype))
        assert torch.equal(i, ri)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_outputs_round_to_nearest_even(dtype):
    # means of two 16-bit values are exact in fp32 and often halfway between two 16-bit values: the stored
    # result must be ATen's (round to nearest, ties to even), not a truncation
    x = _rand(2, 8, 2, 16, dtype=dtype, seed=14)
    (out,) = pe.multi_adaptive_avg_pool2d(x, [(1, 16)], backend=T)
    assert torch.equal(out, F.adaptive_avg_pool2d(x.float(), (1, 16)).to(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_pool_layouts(layout):
    base = _rand(2, 6, 15, 19, seed=3)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[:, ::2, 1:, ::2]
    else:
        x = base.transpose(2, 3)
    bins = (1, 2, 3, 6)
    for b, o in zip(_pairs(bins), pe.multi_adaptive_avg_pool2d(x, bins, backend=T)):
        torch.testing.assert_close(o, F.adaptive_avg_pool2d(x, b), **_tol(x.dtype))
    vals, idxs = pe.multi_adaptive_max_pool2d(x, bins, return_indices=True, backend=T)
    for b, v, i in zip(_pairs(bins), vals, idxs):
        rv, ri = F.adaptive_max_pool2d(x, b, return_indices=True)
        assert torch.equal(v, rv) and torch.equal(i, ri)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_pyramid_pool(mode, channels_last):
    x = _rand(2, 3, 13, 17, seed=4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bins = (4, 2, 1)
    out = pe.spatial_pyramid_pool(x, bins, mode=mode, backend=T)
    fn = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    expected = torch.cat([fn(x, b).flatten(1) for b in bins], 1)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_max_pool_nan_inf_and_ties():
    # small integers: many ties; NaNs (several in one window) and infinities
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (2, 3, 11, 13), generator=g).double()
    x[0, 0, 0, 0] = float("nan")
    x[0, 0, 3, 4] = float("nan")
    x[0, 1, 5, 5] = float("nan")
    x[1, 2, 10, 12] = float("nan")
    x[1, 0] = float("-inf")
    x[1, 0, 7, 2] = float("nan")
    x[1, 1, 2:6, 3:9] = float("inf")
    x[0, 2] = float("-inf")  # an all -inf plane: index of the first element
    x = x.to(DEVICE)
    bins = (1, 2, 3, 6, (4, 9))
    vals, idxs = pe.multi_adaptive_max_pool2d(x, bins, return_indices=True, backend=T)
    for b, v, i in zip(_pairs(bins), vals, idxs):
        rv, ri = F.adaptive_max_pool2d(x, b, return_indices=True)
        assert torch.equal(v, rv) or torch.allclose(v, rv, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(i, ri)
    # channels_last input, same answer
    xc = x.contiguous(memory_format=torch.channels_last)
    vals2, idxs2 = pe.multi_adaptive_max_pool2d(xc, bins, return_indices=True, backend=T)
    for v, i, v2, i2 in zip(vals, idxs, vals2, idxs2):
        assert torch.allclose(v, v2, equal_nan=True, rtol=0, atol=0) and torch.equal(i, i2)


def test_pool_empty_batch_and_channels():
    for shape in ((0, 3, 9, 7), (2, 0, 9, 7)):
        x = _rand(*shape)
        outs = pe.multi_adaptive_avg_pool2d(x, (1, 2, 3), backend=T)
        assert [tuple(o.shape) for o in outs] == [(shape[0], shape[1], b, b) for b in (1, 2, 3)]
        vals, idxs = pe.multi_adaptive_max_pool2d(x, (1, 2, 3), return_indices=True, backend=T)
        assert [tuple(v.shape) for v in vals] == [(shape[0], shape[1], b, b) for b in (1, 2, 3)]
        assert all(i.dtype == torch.int64 for i in idxs)
        out = pe.spatial_pyramid_pool(x, (4, 2, 1), backend=T)
        assert tuple(out.shape) == (shape[0], shape[1] * 21)
    x = _rand(0, 3, 9, 7).requires_grad_()
    sum(o.sum() for o in pe.multi_adaptive_avg_pool2d(x, (1, 2), backend=T)).backward()
    assert x.grad.shape == x.shape


def test_pool_unbatched():
    x = _rand(3, 10, 12, seed=6)
    for b, o in zip((1, 2, 5), pe.multi_adaptive_avg_pool2d(x, (1, 2, 5), backend=T)):
        torch.testing.assert_close(o, F.adaptive_avg_pool2d(x, b))


@pytest.mark.parametrize("window", ["sppnet", "keras_same"])
def test_pool_window_policies_match_documents(window):
    # sppnet leaves the tail of an axis uncovered; keras_same has uneven
    # windows. Expectations from the documents' formulas with PyTorch's
    # pooling (_helpers.sppnet_pool, keras_same_avg / keras_same_max).
    x = _rand(2, 3, 13, 14, seed=7, dtype=torch.float64).requires_grad_()
    bins = (1, 2, 3)
    for fn, mode in ((pe.multi_adaptive_avg_pool2d, "avg"), (pe.multi_adaptive_max_pool2d, "max")):
        got = fn(x, bins, window=window, backend=T)
        if window == "sppnet":
            ref = [sppnet_pool(x, n, mode) for n in bins]
        else:
            ref = [(keras_same_avg if mode == "avg" else keras_same_max)(x, n) for n in bins]
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        w = [_rand(*o.shape, dtype=torch.float64, seed=8 + k) for k, o in enumerate(ref)]
        (gx,) = torch.autograd.grad(sum((o * wk).sum() for o, wk in zip(got, w)), x)
        (rx,) = torch.autograd.grad(sum((o * wk).sum() for o, wk in zip(ref, w)), x)
        torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last_levels", [False, True])
@pytest.mark.parametrize("mode", [0, 1])
def test_pool_op_arbitrary_windows(mode, channels_last_levels):
    # windows with gaps and overlaps, given directly to the op
    x = _rand(2, 3, 10, 12, dtype=torch.float64, seed=9)
    h_bounds = [0, 4, 3, 7, 1, 2, 5, 8]  # rows 8, 9 uncovered
    w_bounds = [2, 7, 0, 12, 6, 11, 9, 10, 0, 3, 4, 5]
    level_bins = [2, 3, 2, 3]
    xg = x.clone().requires_grad_()
    values, indices = pe_triton.multi_pool2d(xg, h_bounds, w_bounds, level_bins, mode, channels_last_levels)
    xr = x.clone().requires_grad_()
    ref_v, ref_i = naive_multi_pool(xr, h_bounds, w_bounds, level_bins, mode, channels_last_levels)
    torch.testing.assert_close(values, ref_v, rtol=1e-12, atol=1e-12)
    if mode == 1:
        assert torch.equal(indices, ref_i)
    else:
        assert indices.shape == (0,) and indices.dtype == torch.int64
    w = _rand(*values.shape, dtype=torch.float64, seed=10)
    (values * w).sum().backward()
    (ref_v * w).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-12, atol=1e-12)
    assert xg.grad[:, :, 8:].abs().sum() == 0


# --------------------------------------------------------------------------
# Pooling backward
# --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pool_backward_matches_eager(layout, dtype):
    x = _rand(2, 3, 14, 17, dtype=dtype, seed=11)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bins = (1, 2, 3, 6)
    for kind in ("avg", "max"):
        xt = x.clone().requires_grad_()
        xe = x.clone().requires_grad_()
        if kind == "avg":
            got = pe.multi_adaptive_avg_pool2d(xt, bins, backend=T)
            ref = [F.adaptive_avg_pool2d(xe, b) for b in bins]
        else:
            got = pe.multi_adaptive_max_pool2d(xt, bins, backend=T)
            ref = [F.adaptive_max_pool2d(xe, b) for b in bins]
        w = [_rand(*r.shape, dtype=dtype, seed=20 + k) for k, r in enumerate(ref)]
        sum((o * wk).sum() for o, wk in zip(got, w)).backward()
        sum((o * wk).sum() for o, wk in zip(ref, w)).backward()
        torch.testing.assert_close(xt.grad, xe.grad, **_tol(dtype))
        if layout == "channels_last":
            assert xt.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_backward_16bit(dtype):
    x = _rand(1, 2, 9, 11, dtype=dtype, seed=12)
    bins = (1, 2, 3)
    xt = x.clone().requires_grad_()
    xe = x.float().requires_grad_()
    got = pe.multi_adaptive_avg_pool2d(xt, bins, backend=T)
    ref = [F.adaptive_avg_pool2d(xe, b) for b in bins]
    sum(o.float().sum() for o in got).backward()
    sum(o.sum() for o in ref).backward()
    assert xt.grad.dtype == dtype
    torch.testing.assert_close(xt.grad.float(), xe.grad, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_backward_16bit(dtype, channels_last):
    # distinct values (exact in 16 bits): one argmax per window, the gradient
    # is a gather of the incoming 16-bit gradients, exact except where windows
    # overlap (sums, in fp32 then rounded once)
    perm = torch.randperm(2 * 3 * 9 * 11, generator=torch.Generator().manual_seed(15))
    x = (perm.to(torch.float64) / 8).view(2, 3, 9, 11).to(dtype=dtype, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bins = (1, 2, 3, (4, 6))
    xt = x.clone().requires_grad_()
    xe = x.double().requires_grad_()
    got = pe.multi_adaptive_max_pool2d(xt, bins, backend=T)
    ref = [F.adaptive_max_pool2d(xe, b) for b in pairs(bins)]
    w = [_rand(*r.shape, dtype=dtype, seed=30 + k) for k, r in enumerate(ref)]
    torch.autograd.backward(got, w)
    torch.autograd.backward(ref, [t.double() for t in w])
    assert xt.grad.dtype == dtype
    # the fp64 sum of the (exact) 16-bit gradients, rounded once to dtype
    torch.testing.assert_close(xt.grad, xe.grad.to(dtype), rtol=0, atol=0)
    if channels_last:
        assert xt.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_spatial_pyramid_pool_channels_last_backward(mode):
    base = _rand(2, 5, 13, 10, dtype=torch.float64, seed=16)
    if mode == "max":  # distinct values
        base = torch.randperm(base.numel(), generator=torch.Generator().manual_seed(16)).to(
            dtype=torch.float64, device=DEVICE).view(base.shape)
    x1 = base.contiguous(memory_format=torch.channels_last).requires_grad_()
    x2 = base.contiguous(memory_format=torch.channels_last).requires_grad_()
    bins = (4, 2, 1, (2, 3))
    got = pe.spatial_pyramid_pool(x1, bins, mode=mode, backend=T)
    want = eager_spp(x2, bins, mode)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = _rand(*want.shape, dtype=torch.float64, seed=17)
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    assert x1.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_gradcheck(mode):
    x = _rand(1, 2, 5, 7, dtype=torch.float64, seed=13).requires_grad_()
    bins = (1, 2, (3, 4))

    def fn(inp):
        if mode == "avg":
            return tuple(pe.multi_adaptive_avg_pool2d(inp, bins, backend=T))
        return tuple(pe.multi_adaptive_max_pool2d(inp, bins, backend=T))

    # fast_mode: a random projection of the Jacobian (the full one costs a forward per input element under the
    # interpreter); test_pool_backward_matches_eager compares every gradient element with ATen's.
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, fast_mode=True)


# --------------------------------------------------------------------------
# Upsample + concat
# --------------------------------------------------------------------------


def _eager_upsample_concat(x, branches, size, align_corners, x_first):
    return _helpers_eager_upsample_concat(x, branches, size, align_corners, x_first)


def _branches(n, sizes, channels=(2, 3, 1, 2), dtype=torch.float32, seed=30):
    return [_rand(n, channels[k % len(channels)], h, w, dtype=dtype, seed=seed + k) for k, (h, w) in enumerate(sizes)]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upsample_concat_matches_eager(align_corners, x_first, dtype):
    x = _rand(2, 4, 33, 47, dtype=dtype, seed=40)
    branches = _branches(2, [(1, 1), (2, 2), (3, 3), (6, 6)], dtype=dtype)
    out = pe.upsample_concat(x, branches, size=None, align_corners=align_corners, x_first=x_first, out=None,
                             backend=T)
    ref = _eager_upsample_concat(x, branches, (33, 47), align_corners, x_first)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **_tol(dtype))
    if x_first:
        assert torch.equal(out[:, :4], x)
    else:
        assert torch.equal(out[:, -4:], x)


@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_concat_odd_sizes(align_corners):
    # branch larger than the output (downsampling), equal along one axis, equal in both, 1xN, and size 1 outputs
    for size, sizes in (((5, 7), [(9, 11), (5, 3), (5, 7), (1, 4)]), ((1, 1), [(3, 2), (1, 1)]),
                        ((3, 5), [(1, 1), (2, 7)]), ((1, 6), [(4, 2)])):
        x = _rand(2, 3, *size, dtype=torch.float64, seed=41)
        branches = _branches(2, sizes, dtype=torch.float64)
        out = pe.upsample_concat(x, branches, align_corners=align_corners, backend=T)
        torch.testing.assert_close(out, _eager_upsample_concat(x, branches, size, align_corners, True),
                                   rtol=1e-12, atol=1e-12)


def test_upsample_concat_without_x():
    branches = _branches(2, [(2, 3), (4, 4)], dtype=torch.float64)
    for align_corners in (False, True):
        out = pe.upsample_concat(None, branches, size=(9, 10), align_corners=align_corners, backend=T)
        torch.testing.assert_close(out, _eager_upsample_concat(None, branches, (9, 10), align_corners, True),
                                   rtol=1e-12, atol=1e-12)
    out = pe.upsample_concat(None, branches, size=7, backend=T)
    assert out.shape == (2, 5, 7, 7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upsample_concat_16bit(dtype):
    x = _rand(2, 3, 11, 13, dtype=dtype, seed=42)
    branches = _branches(2, [(1, 1), (3, 3), (6, 5)], dtype=dtype)
    out = pe.upsample_concat(x, branches, backend=T)
    ref = _eager_upsample_concat(x.float(), [b.float() for b in branches], (11, 13), False, True).to(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, **_tol(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_upsample_concat_layouts(layout):
    x = _rand(2, 4, 12, 15, seed=43)
    branches = _branches(2, [(1, 1), (3, 4), (6, 6)])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        branches = [b.contiguous(memory_format=torch.channels_last) for b in branches]
    else:
        x = _rand(2, 8, 12, 30, seed=44)[:, ::2, :, ::2]
        branches = [b.transpose(2, 3).contiguous().transpose(2, 3) for b in branches[:2]] + \
            [_rand(2, 6, 6, 6, seed=45)[:, ::3]]
    out = pe.upsample_concat(x, branches, backend=T)
    torch.testing.assert_close(out, _eager_upsample_concat(x, branches, (12, 15), False, True), rtol=1e-5, atol=1e-6)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_upsample_concat_mixed_layouts():
    # x and branches each NCHW or channels_last, in both directions; forward and backward against eager
    size = (10, 13)
    for x_cl, kinds in ((False, [True, False, True]), (True, [False, True, False])):
        xb = _rand(2, 3, *size, dtype=torch.float64, seed=47)
        brb = _branches(2, [(1, 1), (3, 4), (6, 5)], dtype=torch.float64, seed=48)
        fmt = lambda t, cl: t.contiguous(memory_format=torch.channels_last) if cl else t.contiguous()  # noqa: E731
        x1 = fmt(xb, x_cl).requires_grad_()
        b1 = [fmt(b, cl).requires_grad_() for b, cl in zip(brb, kinds)]
        x2 = xb.detach().clone().requires_grad_()
        b2 = [b.detach().clone().requires_grad_() for b in brb]
        out = pe.upsample_concat(x1, b1, backend=T)
        ref = _eager_upsample_concat(x2, b2, size, False, True)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g = _rand(*ref.shape, dtype=torch.float64, seed=49)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
        for a, b in zip(b1, b2):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_concat_out_channel_slice(channels_last):
    x = _rand(2, 3, 10, 9, seed=46)
    branches = _branches(2, [(1, 1), (2, 3), (5, 5)])
    ctot = 3 + 2 + 3 + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    buf = torch.full((2, ctot + 5, 10, 9), 7.0, device=DEVICE).contiguous(memory_format=fmt)
    out = buf[:, 2 : 2 + ctot]
    ret = pe.upsample_concat(x, branches, x_first=False, out=out, backend=T)
    assert ret.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, _eager_upsample_concat(x, branches, (10, 9), False, False), rtol=1e-5,
                               atol=1e-6)
    assert torch.all(buf[:, :2] == 7.0) and torch.all(buf[:, 2 + ctot :] == 7.0)
    # a full, separate out tensor
    full = torch.empty(2, ctot, 10, 9, device=DEVICE)
    pe.upsample_concat(x, branches, align_corners=True, out=full, backend=T)
    torch.testing.assert_close(full, _eager_upsample_concat(x, branches, (10, 9), True, True), rtol=1e-5, atol=1e-6)


def test_upsample_concat_empty():
    for n, c in ((0, 3), (2, 0)):
        x = _rand(n, c, 6, 7)
        branches = [_rand(n, 2, 2, 2), _rand(n, c, 3, 3)]
        out = pe.upsample_concat(x, branches, backend=T)
        assert out.shape == (n, 2 * c + 2, 6, 7)
        torch.testing.assert_close(out, _eager_upsample_concat(x, branches, (6, 7), False, True))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_concat_backward_matches_eager(align_corners, x_first, channels_last):
    dtype = torch.float64
    x = _rand(2, 3, 13, 17, dtype=dtype, seed=50)
    branches = _branches(2, [(1, 1), (2, 2), (3, 5), (6, 6), (15, 20)], dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        branches = [b.contiguous(memory_format=torch.channels_last) for b in branches]
    xt = x.clone().requires_grad_()
    bt = [b.clone().requires_grad_() for b in branches]
    xe = x.clone().requires_grad_()
    be = [b.clone().requires_grad_() for b in branches]
    out = pe.upsample_concat(xt, bt, align_corners=align_corners, x_first=x_first, backend=T)
    ref = _eager_upsample_concat(xe, be, (13, 17), align_corners, x_first)
    w = _rand(*ref.shape, dtype=dtype, seed=51)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(xt.grad, xe.grad, rtol=1e-12, atol=1e-12)
    for a, b in zip(bt, be):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
        if channels_last:
            assert a.grad.is_contiguous(memory_format=torch.channels_last)


def test_upsample_concat_backward_float32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        branches = _branches(1, [(1, 1), (4, 3)], dtype=dtype)
        bt = [b.clone().requires_grad_() for b in branches]
        be = [b.float().requires_grad_() for b in branches]
        w = _rand(1, 5, 9, 11, seed=52)
        (pe.upsample_concat(None, bt, size=(9, 11), backend=T).float() * w).sum().backward()
        (_eager_upsample_concat(None, be, (9, 11), False, True) * w).sum().backward()
        for a, b in zip(bt, be):
            assert a.grad.dtype == dtype
            torch.testing.assert_close(a.grad.float(), b.grad, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_concat_backward_16bit(dtype, align_corners):
    # every branch gradient against Wy^T G Wx in fp64 with the kernels' fp32
    # tap weights, within the error bound of its sum (_helpers.grad_close)
    size = (9, 11)
    x = _rand(2, 2, *size, dtype=dtype, seed=54)
    branches = _branches(2, [(1, 1), (4, 3), (6, 6), (13, 15)], dtype=dtype, seed=55)
    bt = [b.clone().requires_grad_() for b in branches]
    xt = x.clone().requires_grad_()
    out = pe.upsample_concat(xt, bt, align_corners=align_corners, backend=T)
    g = _rand(*out.shape, dtype=dtype, seed=56)
    out.backward(g)
    assert torch.equal(xt.grad, g[:, :2])
    offset = 2
    for k, (a, b) in enumerate(zip(bt, branches)):
        gk = g[:, offset:offset + b.shape[1]]
        offset += b.shape[1]
        want, terms = bilinear_backward_fp64(gk, b.shape[-2:], align_corners, torch.float32)
        assert a.grad.dtype == dtype
        grad_close(a.grad, want, dtype, terms=terms, n_sum=sum(size), what=f"branch {k}")


@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_concat_gradcheck(align_corners):
    x = _rand(1, 2, 4, 5, dtype=torch.float64, seed=53).requires_grad_()
    branches = [b.requires_grad_() for b in _branches(1, [(1, 1), (2, 3), (6, 4)], channels=(1, 2, 1),
                                                       dtype=torch.float64)]

    def fn(x, *bs):
        return pe.upsample_concat(x, list(bs), align_corners=align_corners, backend=T)

    assert torch.autograd.gradcheck(fn, (x, *branches), eps=1e-6, atol=1e-7, fast_mode=True)
    # the full Jacobian of a tiny case: a 1x1 branch and a downsampled one
    small = [b.requires_grad_() for b in _branches(1, [(1, 1), (4, 3)], channels=(1,), dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *bs: pe.upsample_concat(None, list(bs), size=(3, 2),
                                                                   align_corners=align_corners, backend=T),
                                     tuple(small), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# upsample_shift_add (the kernel op of upsample_concat_conv2d)
# --------------------------------------------------------------------------

# smaller than, equal to and larger than the (7, 9) output, and 1x1
SHIFT_TAP_SIZES = [(1, 1), (3, 4), (7, 9), (10, 13)]


def _shift_taps(n, cout, k, sizes, dtype=torch.float32, seed=90):
    return [_rand(n, k * k * cout, h, w, dtype=dtype, seed=seed + i) for i, (h, w) in enumerate(sizes)]


def _check_shift_add_forward(out, base, taps, k, align_corners):
    """Against fp64 with the kernels' tap weights (error bound of the sum)
    and against F.interpolate in the accumulation type, summed in fp64."""
    dtype = base.dtype
    assert out.shape == base.shape and out.dtype == dtype and out.stride() == base.stride()
    want, terms = shift_add_fp64(base, taps, k, align_corners, weight_dtype(dtype))
    check_shift_add(out, want, terms, dtype, forward_chain(len(taps), k), "forward")
    acc = weight_dtype(dtype)
    eager = eager_shift_add(base.double(), [t.to(acc) for t in taps], k, align_corners, acc)
    torch.testing.assert_close(out.double().cpu(), eager.cpu(), rtol=_tol(dtype)["rtol"], atol=EAGER_ATOL[dtype])


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_shift_add_forward(k, dtype, align_corners):
    # 16-bit: more than one tap tensor, so the float32 running sum between the launches is exercised
    base = _rand(2, 3, 7, 9, dtype=dtype, seed=91)
    taps = _shift_taps(2, 3, k, SHIFT_TAP_SIZES, dtype)
    _check_shift_add_forward(pe_triton.upsample_shift_add(base, taps, k, align_corners), base, taps, k, align_corners)


def test_upsample_shift_add_forward_one_by_one_output():
    for k in (1, 3):
        base = _rand(2, 2, 1, 1, dtype=torch.float64, seed=92)
        taps = _shift_taps(2, 2, k, [(1, 1), (3, 2)], torch.float64)
        _check_shift_add_forward(pe_triton.upsample_shift_add(base, taps, k, True), base, taps, k, True)


def test_upsample_shift_add_layouts_and_strides():
    fmt = lambda t, cl: t.contiguous(memory_format=torch.channels_last) if cl else t.contiguous()  # noqa: E731
    for base_cl, tap_cl in ((False, [True, False, True]), (True, [False, True, False]), (True, [True] * 3)):
        base = fmt(_rand(2, 3, 7, 9, dtype=torch.float64, seed=93), base_cl)
        taps = [fmt(t, cl) for t, cl in zip(_shift_taps(2, 3, 3, [(1, 1), (4, 5), (9, 11)], torch.float64), tap_cl)]
        out = pe_triton.upsample_shift_add(base, taps, 3, False)
        assert out.is_contiguous(memory_format=torch.channels_last if base_cl else torch.contiguous_format)
        _check_shift_add_forward(out, base, taps, 3, False)
    # tap tensors read through other strides: a channel slice, a transpose
    base = _rand(1, 2, 7, 9, dtype=torch.float64, seed=94)
    taps = [_rand(1, 40, 3, 4, dtype=torch.float64, seed=95)[:, 5:23],
            _rand(1, 18, 6, 5, dtype=torch.float64, seed=96).transpose(2, 3)]
    _check_shift_add_forward(pe_triton.upsample_shift_add(base, taps, 3, True), base, taps, 3, True)


def _check_shift_add_backward(base, taps, k, align_corners, g, channels_last):
    dtype = g.dtype
    grads = pe_triton.upsample_shift_add_backward(g, tap_shapes(taps), k, align_corners, channels_last)
    expected = shift_add_backward_fp64(g, [t.shape[2:] for t in taps], k, align_corners, weight_dtype(dtype))
    tr = [t.detach().double().requires_grad_() for t in taps]
    (eager_shift_add(base.double(), tr, k, align_corners) * g.double()).sum().backward()
    for i, (got, (want, terms), r, cl) in enumerate(zip(grads, expected, tr, channels_last)):
        assert got.shape == taps[i].shape and got.dtype == dtype
        assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        check_shift_add(got, want, terms, dtype, BACKWARD_CHAIN, f"grad taps[{i}]")
        torch.testing.assert_close(got.double().cpu(), r.grad.cpu(), rtol=_tol(dtype)["rtol"],
                                   atol=SUM_ATOL_VS_FP64[dtype])


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upsample_shift_add_backward(k, align_corners, dtype):
    base = _rand(1, 2, 7, 9, dtype=dtype, seed=97)
    taps = _shift_taps(1, 2, k, SHIFT_TAP_SIZES, dtype)
    g = _rand(1, 2, 7, 9, dtype=dtype, seed=98)
    if k == 3:
        g = g.contiguous(memory_format=torch.channels_last)
    _check_shift_add_backward(base, taps, k, align_corners, g, [False, True, False, True])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upsample_shift_add_backward_16bit(dtype):
    base = _rand(1, 2, 7, 9, dtype=dtype, seed=99)
    taps = _shift_taps(1, 2, 3, [(1, 1), (4, 3), (9, 11)], dtype)
    _check_shift_add_backward(base, taps, 3, False, _rand(1, 2, 7, 9, dtype=dtype, seed=100), [False, True, False])


def test_upsample_shift_add_autograd_gradcheck_and_double_backward():
    """Autograd of the Triton op (from _ops): base's gradient is grad itself,
    the taps' the backward op; the backward op's own derivative is the
    forward again (double backward)."""
    base = _rand(1, 1, 3, 4, dtype=torch.float64, seed=101).requires_grad_()
    taps = [t.requires_grad_() for t in _shift_taps(1, 1, 3, [(1, 1), (2, 5)], torch.float64, seed=102)]

    def fn(b, *ts):
        return OPS.upsample_shift_add_triton(b, list(ts), 3, False)

    assert torch.autograd.gradcheck(fn, (base, *taps), eps=1e-6, atol=1e-7, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (base, *taps), eps=1e-6, atol=1e-7, fast_mode=True)
    # through autograd, against eager's autograd
    g = _rand(1, 1, 3, 4, dtype=torch.float64, seed=103)
    got = torch.autograd.grad(fn(base, *taps), [base, *taps], g)
    want = torch.autograd.grad(eager_shift_add(base, taps, 3, False), [base, *taps], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_upsample_shift_add_empty_and_no_taps():
    base = _rand(2, 3, 5, 4, seed=104)
    for cl in (False, True):
        b = base.contiguous(memory_format=torch.channels_last) if cl else base
        out = pe_triton.upsample_shift_add(b, [], 3, False)
        assert torch.equal(out, b) and out.stride() == b.stride() and out.data_ptr() != b.data_ptr()
    for shape in [(0, 3, 5, 4), (2, 0, 5, 4)]:
        b = torch.zeros(shape, device=DEVICE)
        assert pe_triton.upsample_shift_add(b, [torch.zeros(shape[0], 9 * shape[1], 2, 2, device=DEVICE)], 3,
                                            False).shape == shape
        grads = pe_triton.upsample_shift_add_backward(b, [2, 2, 3, 1], 3, False, [False, True])
        assert [tuple(t.shape) for t in grads] == [(shape[0], 9 * shape[1], 2, 2), (shape[0], 9 * shape[1], 3, 1)]


def test_upsample_shift_add_op_checks():
    """The Triton ops check their arguments with the words of the compiled
    ops (csrc/upsample_shift_add_checks.h), naming the argument."""
    base = _rand(2, 3, 5, 4)
    tap = _rand(2, 27, 2, 2)
    cases = [((base[0], [tap], 3), ValueError, r"base must be a 4-D \(N, Cout, H, W\) tensor"),
             ((base, [tap, tap[:1]], 3), ValueError, r"taps\[1\] has batch size 1 but base has 2"),
             ((base, [tap[:, :26]], 3), ValueError, r"taps\[0\] has 26 channels, expected kernel_size\^2 \* "
                                                    r"base channels = 27"),
             ((base, [tap], 2), ValueError, "kernel_size must be odd and positive, got 2"),
             ((base, [tap.double()], 3), TypeError, r"taps\[0\] has dtype torch.float64 but base has torch.float32")]
    for (b, t, k), error, message in cases:
        with pytest.raises(error, match="upsample_shift_add_triton: " + message):
            OPS.upsample_shift_add_triton(b, t, k, False)
    bwd = [(([2, 2], 3, [False, True]), r"channels_last must have one entry per tap tensor \(1\), got 2"),
           (([2, 2, 3], 3, [False]), r"tap_shapes must hold \(h, w\) pairs, got 3 values"),
           (([2, 0], 3, [False]), r"tap_shapes must be positive, got \[2, 0\]"),
           (([2, 2], 4, [False]), "kernel_size must be odd and positive, got 4")]
    for (shapes, k, cl), message in bwd:
        with pytest.raises(ValueError, match="upsample_shift_add_backward_triton: " + message):
            OPS.upsample_shift_add_backward_triton(base, shapes, k, False, cl)


def test_opcheck_upsample_shift_add_ops():
    base = _rand(1, 2, 4, 5, dtype=torch.float64, seed=105)
    taps = _shift_taps(1, 2, 3, [(1, 1), (3, 2)], torch.float64, seed=106)
    taps[1] = taps[1].contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(OPS.upsample_shift_add_triton.default,
                          (base.clone().requires_grad_(), [t.clone().requires_grad_() for t in taps], 3, True))
    g = _rand(1, 2, 4, 5, dtype=torch.float64, seed=107).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(OPS.upsample_shift_add_backward_triton.default, (g, [1, 1, 3, 2], 3, True, [False, True]))


def test_upsample_shift_add_compile_fullgraph_dynamic():
    from torch._dynamo.testing import CompileCounter

    def fn(base, tap):
        return pe_triton.upsample_shift_add(base, [tap * 2], 3, False)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for h, w in [(5, 6), (7, 4)]:
        base = _rand(1, 2, h, w, dtype=torch.float64, seed=h)
        tap = _rand(1, 18, 2, 3, dtype=torch.float64, seed=w)
        torch.testing.assert_close(compiled(base, tap), eager_shift_add(base, [tap * 2], 3, False))
    assert counter.frame_count == 1, f"recompiled {counter.frame_count} times"
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    tap = _rand(1, 18, 2, 3, dtype=torch.float64, seed=108).requires_grad_()
    base = _rand(1, 2, 5, 6, dtype=torch.float64, seed=109)
    compiled(base, tap).square().sum().backward()
    tap2 = tap.detach().clone().requires_grad_()
    eager_shift_add(base, [tap2 * 2], 3, False).square().sum().backward()
    torch.testing.assert_close(tap.grad, tap2.grad)


def test_upsample_shift_add_deterministic():
    base = _rand(1, 3, 9, 7, seed=110)
    taps = _shift_taps(1, 3, 3, [(1, 1), (4, 3)], seed=111)
    g = _rand(1, 3, 9, 7, seed=112)
    runs = [[pe_triton.upsample_shift_add(base, taps, 3, False)] +
            pe_triton.upsample_shift_add_backward(g, tap_shapes(taps), 3, False, [False, True]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# --------------------------------------------------------------------------
# Ops: opcheck, determinism, errors
# --------------------------------------------------------------------------


def _pool_args(x, bins, mode, cl_levels):
    h, w, lb = pyramid_windows(x.shape[2], x.shape[3], normalize_bins(bins))
    return (x, h, w, lb, mode, cl_levels)


def test_opcheck_pool_ops():
    x = _rand(2, 3, 7, 6, dtype=torch.float64, seed=60)
    for mode in (0, 1):
        for cl in (False, True):
            args = _pool_args(x.clone().requires_grad_(), (1, 2, 3), mode, cl)
            torch.library.opcheck(OPS.multi_pool2d_triton.default, args)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        x_, h, w, lb, _, _ = _pool_args(x_cl, (1, 2, 3), mode, False)
        values, indices = OPS.multi_pool2d_triton(x_, h, w, lb, mode, False)
        grad = _rand(*values.shape, dtype=torch.float64, seed=61)
        idx = indices if mode == 1 else None
        torch.library.opcheck(OPS.multi_pool2d_backward_triton.default,
                              (grad, idx, list(x.shape), h, w, lb, mode, False, True))


def test_opcheck_upsample_ops():
    x = _rand(2, 3, 6, 7, dtype=torch.float64, seed=62)
    branches = _branches(2, [(1, 1), (3, 2)], dtype=torch.float64)
    for align_corners in (False, True):
        args = (x.clone().requires_grad_(), [b.clone().requires_grad_() for b in branches], [6, 7], align_corners,
                False, False)
        torch.library.opcheck(OPS.upsample_concat_triton.default, args)
    torch.library.opcheck(OPS.upsample_concat_triton.default, (None, branches, [5, 4], True, True, False))
    out = torch.empty(2, 8, 6, 7, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(OPS.upsample_concat_out_triton.default, (x, branches, False, True, out))
    g = _rand(2, 8, 6, 7, dtype=torch.float64, seed=63).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(OPS.upsample_concat_backward_triton.default, (g, [2, 1, 1, 3, 3, 2], 3, False, True))


def test_compile_fullgraph_dynamic():
    """The Triton entry of the backend table under torch.compile: one graph
    (fullgraph), one compilation for every size (dynamic=True), forward and
    backward against eager PyTorch."""
    from torch._dynamo.testing import CompileCounter

    def ppm(x):
        levels = pe.multi_adaptive_avg_pool2d(x, (1, 2, 3), backend=T)
        return pe.upsample_concat(x, [t * 2 for t in levels], align_corners=True, backend=T)

    def ppm_eager(x):
        ups = [F.interpolate(F.adaptive_avg_pool2d(x, b) * 2, x.shape[-2:], mode="bilinear", align_corners=True)
               for b in (1, 2, 3)]
        return torch.cat([x] + ups, 1)

    torch._dynamo.reset()
    counter = CompileCounter()
    fn = torch.compile(ppm, backend=counter, fullgraph=True, dynamic=True)
    for h, w in [(7, 9), (11, 6), (13, 10)]:
        x = _rand(1, 2, h, w, dtype=torch.float64, seed=h)
        torch.testing.assert_close(fn(x), ppm_eager(x))
    assert counter.frame_count == 1, f"recompiled {counter.frame_count} times"
    torch._dynamo.reset()
    fn = torch.compile(ppm, backend="aot_eager", fullgraph=True, dynamic=True)
    x = _rand(2, 3, 9, 8, dtype=torch.float64, seed=64).requires_grad_()
    fn(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ppm_eager(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_op_checks_pool_args():
    """The Triton ops check their arguments as the compiled ops do
    (pyramid_ext.plan.check_pool_args), naming the argument."""
    x = _rand(1, 2, 5, 5)
    cases = [(([0, 6], [0, 5], [1, 1], 0), r"h_bounds window 0, \[0, 6\), is empty or outside \[0, 5\)"),
             (([0, 5], [0, 5, 1, 2], [1, 1], 0), r"w_bounds has 4 values, level_bins needs 2"),
             (([0, 5], [0, 5], [1, 0], 0), r"level_bins must be positive"),
             (([0, 5], [0, 5], [1, 1], 3), r"mode must be 0 \(avg\), 1 \(max\) or 2 \(max, values only\), got 3")]
    for (hb, wb, lb, mode), message in cases:
        with pytest.raises(ValueError, match="multi_pool2d_triton: " + message):
            OPS.multi_pool2d_triton(x, hb, wb, lb, mode, False)
        if mode == 3:  # the backward's message: modes 0 and 1 only
            message = r"mode must be 0 \(avg\) or 1 \(max\), got 3"
        with pytest.raises(ValueError, match="multi_pool2d_backward_triton: " + message):
            OPS.multi_pool2d_backward_triton(torch.zeros(1, 2, device=DEVICE), None, [1, 2, 5, 5], hb, wb, lb, mode,
                                             False, False)


def test_deterministic():
    x = _rand(2, 5, 21, 19, seed=70)
    bins = (1, 2, 3, 6)
    a = pe.spatial_pyramid_pool(x, bins, mode="avg", backend=T)
    b = pe.spatial_pyramid_pool(x, bins, mode="avg", backend=T)
    assert torch.equal(a, b)
    branches = _branches(2, [(1, 1), (3, 3), (6, 6)])
    grads = []
    for _ in range(2):
        bt = [t.clone().requires_grad_() for t in branches]
        xt = x.clone().requires_grad_()
        out = pe.upsample_concat(xt, bt, backend=T)
        pooled = pe.multi_adaptive_avg_pool2d(xt, bins, backend=T)
        (out.square().sum() + sum(p.square().sum() for p in pooled)).backward()
        grads.append([out.detach(), xt.grad] + [t.grad for t in bt])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


def test_plan_cache_under_threads(monkeypatch):
    """Eight threads, each with its own shapes and bins, hammer the plan cache
    (_multi_pool2d._plan_for and _PoolPlan.tensors): each plan's device tables
    are built once and shared, and the ops that use them match eager. Building
    a table is slowed down to widen any race window. On a GPU the threads run
    the ops themselves; Triton's interpreter is not thread-safe (it patches
    triton.language while a kernel runs), so there the threads build the plans
    and the ops then run, on those plans, in this thread."""
    import threading
    import time

    triton_pool._pool_plan.cache_clear()
    real_tensor = torch.tensor
    builds = []

    def slow_tensor(*a, **k):
        if sys._getframe(1).f_code.co_name == "t":  # _PoolPlan.tensors' table builder
            builds.append(threading.get_ident())
            time.sleep(0.002)
        return real_tensor(*a, **k)

    monkeypatch.setattr(triton_pool.torch, "tensor", slow_tensor)
    shapes = [(1, 2, 7 + k % 4, 9 + k // 2) for k in range(8)]
    binsets = [(1, 2, 3), (2, 3), (1, 4), (3, 1, 2)]
    errors, tables, cases = [], {}, []
    start = threading.Barrier(8)

    def check_op(x, bins):
        outs = pe.multi_adaptive_avg_pool2d(x, bins, backend=T)
        for b, o in zip(pairs(bins), outs):
            torch.testing.assert_close(o, F.adaptive_avg_pool2d(x, b), rtol=1e-12, atol=1e-12)

    def plan_tables(shape, bins):
        h, w, lb = pyramid_windows(shape[2], shape[3], normalize_bins(bins))
        plan = triton_pool._plan_for(h, w, lb, shape[2], shape[3])
        tables.setdefault((shape[2:], bins), set()).add(id(plan.tensors(torch.device(DEVICE))["bin_tab"]))

    def work(k):
        try:
            start.wait()
            plan_tables((1, 1, 40, 50), (1, 2, 3, 6))  # all eight threads at once, one plan
            for it in range(3):
                shape, bins = shapes[(k + it) % 8], binsets[(k + it) % 4]
                x = _rand(*shape, dtype=torch.float64, seed=80 + k)
                plan_tables(shape, bins)
                if _INTERPRET:
                    cases.append((x, bins))
                else:
                    check_op(x, bins)
        except Exception as e:  # noqa: BLE001 - reported below with the thread
            errors.append((k, repr(e)))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(len(ids) == 1 for ids in tables.values()), "a plan's tables were built more than once"
    assert len(builds) == 7 * len(tables)  # seven tables per plan, each built once
    for x, bins in cases:
        check_op(x, bins)
    assert len(builds) == 7 * len(tables)  # the ops reused the tables the threads built


def test_no_atomics_in_kernels():
    package = os.path.dirname(pe_triton.__file__)
    sources = [f for f in os.listdir(package) if f.endswith(".py")]
    assert {"__init__.py", "_common.py", "_multi_pool2d.py", "_upsample_concat.py",
            "_upsample_shift_add.py"} <= set(sources)
    for name in sources:
        src = open(os.path.join(package, name)).read()
        assert "tl.atomic" not in src and ".atomic_" not in src, name


@pytest.mark.skipif(not _INTERPRET, reason="the CPU error is about running without the interpreter")
def test_cpu_without_interpreter_raises_clearly():
    code = textwrap.dedent(
        """
        import torch
        from pyramid_ext import triton
        x = torch.randn(1, 2, 5, 5)
        try:
            triton.multi_pool2d(x, [0, 5], [0, 5], [1, 1], 0, False)
        except RuntimeError as e:
            print("ERR", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pyramid_ext.triton import _multi_pool2d as pool, _upsample_concat as up, _upsample_shift_add as shift

    def compile_(fn, ptrs, consts, i32=()):
        sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32" if a in i32 else "i64") for a in fn.arg_names}
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(enable_fp_fusion=False))

    for dt, acc, a64 in (("bf16", tl.float32, False), ("fp64", tl.float64, True)):
        accs = "fp64" if a64 else "fp32"
        for mode in (0, 1):
            other = "*i64" if mode else "*" + dt
            compile_(pool._pool_cells_kernel, {"x_ptr": "*" + dt, "cell_tab_ptr": "*i64", "cell_val_ptr": "*" + accs,
                                             "cell_idx_ptr": "*i64"},
                     dict(MODE=mode, ACC=acc, BLOCK_C=16, BLOCK_S=4, BLOCK_E=32))
            compile_(pool._pool_bins_kernel, {"cell_val_ptr": "*" + accs, "cell_idx_ptr": "*i64", "bin_tab_ptr": "*i64",
                                            "val_ptr": "*" + dt, "idx_ptr": other},
                     dict(MODE=mode, CL_LEVELS=bool(mode), ACC=acc, ACC_FP64=a64, BLOCK_C=16, BLOCK_T=4, BLOCK_K=32))
            compile_(pool._pool_bwd_pixels_kernel, {"grad_ptr": "*" + dt, "idx_ptr": other, "cell_grad_ptr": "*" + accs,
                                                  "bin_tab_ptr": "*i64", "seg_h_ptr": "*i64", "seg_w_ptr": "*i64",
                                                  "cell_ptr_ptr": "*i64", "cell_bins_ptr": "*i64", "gx_ptr": "*" + dt},
                     dict(MODE=mode, CL_LEVELS=bool(mode), ACC=acc, BLOCK_C=16, BLOCK_P=256))
        compile_(pool._pool_bwd_cells_kernel, {"grad_ptr": "*" + dt, "bin_tab_ptr": "*i64", "cell_list_ptr": "*i64",
                                             "cell_ptr_ptr": "*i64", "cell_bins_ptr": "*i64",
                                             "cell_grad_ptr": "*" + accs},
                 dict(CL_LEVELS=False, ACC=acc, ACC_FP64=a64, BLOCK_C=16, BLOCK_S=64))
        for copy in (False, True):
            compile_(up._resize_into_kernel, {"src_ptr": "*" + dt, "out_ptr": "*" + dt},
                     dict(COPY=copy, ALIGN=not copy, ACC=acc, ACC_FP64=a64, BLOCK_C=16, BLOCK_P=128),
                     i32=("IH", "IW", "OH", "OW"))
        compile_(up._resize_backward_kernel, {"g_ptr": "*" + dt, "gb_ptr": "*" + dt},
                 dict(ALIGN=a64, ACC=acc, ACC_FP64=a64, BLOCK_C=16, BLOCK_X=8, BLOCK_R=16, BLOCK_O=64),
                 i32=("IH", "IW", "OH", "OW"))
        for first, last, copy in ((True, False, False), (False, True, True)):
            compile_(shift._shift_add_kernel, {"base_ptr": "*" + dt, "tap_ptr": "*" + dt, "part_ptr": "*" + accs,
                                              "out_ptr": "*" + dt},
                     dict(FIRST=first, LAST=last, COPY=copy, ALIGN=not copy, ACC=acc, ACC_FP64=a64, BLOCK_C=16,
                          BLOCK_P=128),
                     i32=("IH", "IW", "OH", "OW", "K"))
        compile_(shift._shift_add_backward_kernel, {"g_ptr": "*" + dt, "gt_ptr": "*" + dt},
                 dict(ALIGN=a64, ACC=acc, ACC_FP64=a64, RUN=12, BLOCK_C=16, BLOCK_X=8, BLOCK_R=16, BLOCK_O=64),
                 i32=("IH", "IW", "OH", "OW", "K"))
    print("COMPILED")
    """
)


@pytest.mark.skipif(not _INTERPRET, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_gpu():
    """The interpreter runs the kernels as Python; this compiles every kernel
    for sm_90 (no GPU needed), so CPU-only CI also checks the GPU code path."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("Triton has no CUDA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert "COMPILED" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


# --------------------------------------------------------------------------
# Long sums: float runs per lane, fp64 after them (tests/test_precision.py)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_avg_pool_long_sums_within_1e6_of_fp64(layout):
    """512 x 512 of 0.1 with a spike: float accumulation per lane drifted
    by 4e-6 of the mean here (3e-5 at 1024 x 1024); the bound is 1e-6."""
    x = torch.full((1, 2, 512, 512), 0.1)
    x[0, 1, 170, 102] = 1e3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bins = (1, 2, (2, 3))
    got = pe.multi_adaptive_avg_pool2d(x.to(DEVICE), bins, backend=T)
    want, abs_want = fp64_window_means(x, bins, nonnegative=True)
    for b, g, m, am in zip(bins, got, want, abs_want):
        err = ((g.cpu().double() - m).abs() / am).max().item()
        assert err <= 1e-6, f"bins {b}: error {err:.3g} x mean|x|"


def test_upsample_concat_backward_long_sums_within_1e6_of_fp64():
    """A 1x1 (and a 2x3) branch's gradient sums a 256 x 256 plane of 0.1:
    float accumulation drifted 1e-5; within 1e-6 of the fp64 sum of |terms|."""
    g = torch.full((1, 2, 256, 256), 0.1)
    g[0, :, 85, 51] = 1e3
    hws = [(1, 1), (2, 3)]
    grads = OPS.upsample_concat_backward_triton(g.to(DEVICE), [v for hw in hws for v in (1,) + hw], 0, False, False)
    for k, (hw, gb) in enumerate(zip(hws, grads)):
        want, terms = fp64_resize_grad(g, k, hw, False, nonnegative=True)
        err = ((gb[0, 0].cpu().double() - want).abs() / terms).max().item()
        assert err <= 1e-6, f"branch {hw}: error {err:.3g} x sum|terms|"


def test_upsample_shift_add_backward_long_sums_within_1e6_of_fp64():
    """A 1x1 (and a 2x3) tap tensor's gradient with K = 3 sums a shifted
    256 x 256 plane of 0.1: within 1e-6 of the fp64 sum of |terms|."""
    g = torch.full((1, 1, 256, 256), 0.1)
    g[0, :, 85, 51] = 1e3
    hws = [(1, 1), (2, 3)]
    grads = pe_triton.upsample_shift_add_backward(g.to(DEVICE), [v for hw in hws for v in hw], 3, False,
                                                  [False, False])
    for hw, got, (want, terms) in zip(hws, grads, shift_add_backward_fp64(g, hws, 3, False)):
        err = ((got.cpu().double() - want).abs() / terms).max().item()
        assert err <= 1e-6, f"taps {hw}: error {err:.3g} x sum|terms|"


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_forward_mode_tangents_match_pytorchs(kind):
    """Every Triton op carries forward-mode tangents (the compiled extension's ADInplaceOrView kernels,
    csrc/autograd.cpp): the pooling in every mode, upsample_concat, upsample_concat_conv2d's taps plan
    (upsample_shift_add_triton), gradients taken with dual cotangents (the backward ops), and inputs that
    require grad and carry tangents, against PyTorch's forward AD of the eager code. The out= variant still
    refuses a tangent."""
    import torch.autograd.forward_ad as fwAD

    from ._helpers import layout
    from .test_forward_ad import POOL_CASES, FORWARD_OVER_REVERSE, _assert_same, _jvp, assert_same_grads, \
        dual_cotangent_grads, tangent_and_grads
    from .test_upsample_concat_conv import forced_plan

    x = layout(_rand(2, 4, 9, 7, dtype=torch.float64), kind)
    branches = [layout(_rand(2, 2, b, b, dtype=torch.float64, seed=b), kind) for b in (1, 3)]
    weight = _rand(3, 8, 3, 3, dtype=torch.float64, seed=6)
    tangents = [_rand(*t.shape, dtype=torch.float64, seed=20 + i) for i, t in enumerate([x] + branches)]

    def conv(fn):
        return lambda v, *bs: fn(v, list(bs))

    eager_conv = conv(lambda v, bs: F.conv2d(_helpers_eager_upsample_concat(v, bs, (9, 7), False), weight,
                                             padding=1))
    with pe.use_backend(T), forced_plan("taps"):
        for fused, eager in POOL_CASES.values():
            _assert_same(_jvp(fused, [x], tangents[:1]), _jvp(eager, [x], tangents[:1]))
        fused_uc, eager_uc = FORWARD_OVER_REVERSE["upsample_concat"]
        _assert_same(_jvp(conv(fused_uc), [x] + branches, [tangents[0], None, tangents[2]]),
                     _jvp(conv(eager_uc), [x] + branches, [tangents[0], None, tangents[2]]))
        fused_conv = conv(lambda v, bs: pe.upsample_concat_conv2d(v, bs, weight))
        _assert_same(_jvp(fused_conv, [x] + branches, tangents), _jvp(eager_conv, [x] + branches, tangents))
        for fused, eager in [*FORWARD_OVER_REVERSE.values(),
                             (lambda v, bs: pe.upsample_concat_conv2d(v, bs, weight),
                              lambda v, bs: F.conv2d(_helpers_eager_upsample_concat(v, bs, (9, 7), False), weight,
                                                     padding=1))]:
            assert_same_grads(dual_cotangent_grads(fused, x, branches), dual_cotangent_grads(eager, x, branches))
        # inputs that require grad and carry tangents: the ops run through _functorch's Functions
        for fused, eager in [(lambda v, bs: pe.multi_adaptive_max_pool2d(v, (2, 3))[1],
                              lambda v, bs: F.adaptive_max_pool2d(v, 3)),
                             (lambda v, bs: pe.upsample_concat(v, bs), FORWARD_OVER_REVERSE["upsample_concat"][1]),
                             (lambda v, bs: pe.upsample_concat_conv2d(v, bs, weight),
                              lambda v, bs: F.conv2d(_helpers_eager_upsample_concat(v, bs, (9, 7), False), weight,
                                                     padding=1))]:
            got = tangent_and_grads(fused, x, branches, tangents)
            assert got[0] is not None
            torch.testing.assert_close(got, tangent_and_grads(eager, x, branches, tangents), rtol=0, atol=1e-10)
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, tangents[0])
            out = torch.empty((2, 4 + 4, 9, 7), dtype=torch.float64, device=DEVICE)
            with pytest.raises(RuntimeError, match="upsample_concat_out_triton has no forward-mode AD"):
                pe.upsample_concat(dual, branches, out=out)


@pytest.mark.parametrize("name", ["avg", "max", "spp", "uc", "ucconv"])
def test_torch_func_grad_transforms_match_eager(name):
    """grad, vmap(grad) (per-sample gradients), jacrev(jacrev), hessian and jvp(grad) through the Triton ops:
    under a grad transform, which refuses torch.library's autograd, they run through _functorch's autograd
    Functions, vmapped by the ops' batching rules (none runs slice by slice: PyTorch's fallback warns)."""
    from .test_functorch import _close, _cubic, _eager, _fused, _hessians, _loss

    gen = torch.Generator().manual_seed(11)
    x = torch.randn((2, 1, 2, 4, 5), generator=gen, dtype=torch.float64).to(DEVICE)  # (vmapped, N, C, H, W)
    branches = [torch.randn((2, 1, 2, 2, 3), generator=gen, dtype=torch.float64).to(DEVICE)] \
        if name in ("uc", "ucconv") else []
    if name == "ucconv":  # the taps plan: upsample_shift_add_triton and its backward
        from .test_upsample_concat_conv import forced_plan

        weight = torch.randn((3, 4, 3, 3), generator=gen, dtype=torch.float64).to(DEVICE)
        eager = lambda t, b: F.conv2d(_eager("uc")(t, b), weight, padding=1)  # noqa: E731
        fused = lambda t, b: pe.upsample_concat_conv2d(t, [b], weight)  # noqa: E731
        plan = forced_plan("taps")
    else:
        eager, fused = _eager(name), _fused(name)
        plan = contextlib.nullcontext()
    args = (x[0], *[b[0] for b in branches])
    with torch.no_grad():
        outs = eager(*args)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(DEVICE) for o in outs]
    tangents = tuple(torch.randn(a.shape, generator=gen, dtype=torch.float64).to(DEVICE) for a in args)
    argnums = tuple(range(len(args)))

    def transforms(fn):
        return (torch.func.grad(_loss(fn, weights), argnums=argnums)(*args),
                torch.vmap(torch.func.grad(_loss(fn, weights), argnums=argnums))(x, *branches),
                torch.func.jacrev(torch.func.jacrev(_loss(fn, weights), argnums=argnums), argnums=argnums)(*args),
                _hessians(_cubic(fn, weights), args, tangents))

    want = transforms(eager)
    previous = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with pe.use_backend(T), plan, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = transforms(fused)
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(previous)
    fallbacks = [str(w.message) for w in caught if "batching rule" in str(w.message) and "pyramid_ext" in str(w.message)]
    assert not fallbacks, fallbacks
    _close(got, want)
