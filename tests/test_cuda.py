"""The compiled CUDA kernels (csrc/cuda/*.cu) against PyTorch on the CPU.

Every test runs the ``cpp`` backend on CUDA tensors and compares with PyTorch's
own CPU operators (F.adaptive_*_pool2d, F.interpolate + torch.cat) or the
pure-PyTorch reference, computed in float64 from the very same (rounded)
inputs, so a 16-bit result is checked to about one rounding of its dtype.
Max pooling values and indices must match exactly (ATen's CPU rule: first
maximum in row-major order, or the last NaN).

Skipped, with the reason, where there is no CUDA device or the extension was
built without its CUDA kernels; with PYRAMID_EXT_REQUIRE_CPP=1 (CI, `make
test`) a GPU machine whose build lacks the kernels fails instead.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import pyramid_ext as pe
from pyramid_ext import _extension, reference
from pyramid_ext.windows import normalize_bins, pyramid_windows

from ._helpers import TOL_VS_FP64 as TOL
from ._helpers import as_pair as _pair
from ._helpers import is_channels_last as _is_cl
from ._helpers import OVERLAPPING_WINDOWS, SUM_ATOL_VS_FP64 as SUM_ATOL
from ._helpers import (check_out_overlap_rule, fp64_resize_grad, fp64_window_means, keras_same_avg, naive_multi_pool,
                       rand as _rand, sppnet_pool)
from ._helpers import ties_nan_inf_input
from ._shift_add import (BACKWARD_CHAIN, EAGER_ATOL, check_shift_add, eager_shift_add, forward_chain,
                         shift_add_backward_fp64, shift_add_fp64, tap_shapes, weight_dtype)

pytestmark = pytest.mark.cuda

OP_NAMES = ["multi_pool2d", "multi_pool2d_backward", "upsample_concat", "upsample_concat_out",
            "upsample_concat_backward", "upsample_shift_add", "upsample_shift_add_backward"]


def _missing_kernels_reason():
    """Why a GPU machine cannot run these tests (None when it can)."""
    if not _extension.LOADED:
        return f"the compiled extension is not available ({_extension.LOAD_ERROR}); {_extension.BUILD_HINT}"
    missing = [op for op in OP_NAMES if not _extension.has_kernel(op, "cuda")]
    if missing:
        return (f"the compiled extension has no CUDA kernel for {missing}: it was built without CUDA "
                "(rebuild with a CUDA build of torch and nvcc, FORCE_CUDA=1)")
    return None


def _skip_or_fail():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)
    reason = _missing_kernels_reason()
    if reason is None:
        return
    if os.environ.get("PYRAMID_EXT_REQUIRE_CPP") == "1":
        # A GPU is here and the build must have its kernels: a skip would
        # count a broken build as passing.
        pytest.fail(f"PYRAMID_EXT_REQUIRE_CPP=1 on a CUDA machine: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


_skip_or_fail()

OPS = torch.ops.pyramid_ext
DEV = torch.device("cuda")
CPP = "cpp"

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# TOL (_helpers.TOL_VS_FP64): against a float64 computation on the same
# inputs, about one rounding of the result's dtype.
# The sums of many products (a 1x1 branch's gradient sums a whole plane).
# The kernels are built with --fmad=false (setup.py), so they round as the CPU
# kernels do, bit for bit (csrc/pyramid_index.h): against the same references
# the CPU kernels need atol 7.9e-7 beyond rtol in these tests (measured with
# the CPU op on the tests' inputs). That is not zero because the float32
# reference, F.interpolate on the CPU, computes the tap source
# `scale * (dst + 0.5) - 0.5` as one FMA (torch 2.13's CPU build), so its
# weights may differ by one rounding of src: about 6e-8 * src times the
# difference of two neighbours. UP_ATOL_F32 keeps a margin of 6 over that (was
# 2e-5 while nvcc contracted the kernels' own tap source too).
UP_ATOL_F32 = 5e-6
BIN_SETS = [(1, 2, 3, 6), (6, 3, 2, 1), (4, 2, 1), ((2, 3), (5, 1), 1, (1, 7))]
SIZES = [(33, 47), (65, 65), (3, 5), (1, 1), (97, 129)]
LAYOUTS = ["nchw", "channels_last"]


def _cuda(x: torch.Tensor, kind: str = "nchw") -> torch.Tensor:
    fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    return x.detach().to(DEV).contiguous(memory_format=fmt)


def _close(got: torch.Tensor, want: torch.Tensor, dtype, **kw):
    """got (CUDA, dtype) against want (CPU, float64)."""
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().double(), want.double(), **{**TOL[dtype], **kw})


# --------------------------------------------------------------------------
# multi_pool2d forward
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bins", BIN_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_avg_pool_matches_cpu(size, bins, dtype, kind):
    x = _rand((2, 5, *size), dtype)
    got = pe.multi_adaptive_avg_pool2d(_cuda(x, kind), bins, backend=CPP)
    assert len(got) == len(bins)
    for g, b in zip(got, bins):
        assert g.device.type == DEV.type and g.shape == (2, 5, *_pair(b))
        _close(g, F.adaptive_avg_pool2d(x.double(), _pair(b)), dtype)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bins", BIN_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_max_pool_values_and_indices_match_cpu(size, bins, dtype, kind):
    x = _rand((2, 5, *size), dtype, seed=1)
    vals, idxs = pe.multi_adaptive_max_pool2d(_cuda(x, kind), bins, return_indices=True, backend=CPP)
    for v, i, b in zip(vals, idxs, bins):
        # Upcasting is exact and keeps order and ties: float64 gives the same answer.
        want_v, want_i = F.adaptive_max_pool2d(x.double(), _pair(b), return_indices=True)
        assert v.dtype == dtype and i.dtype == torch.int64
        assert torch.equal(v.cpu().double(), want_v)
        assert torch.equal(i.cpu(), want_i), b


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_max_pool_ties_nan_and_inf_follow_cpu(kind, dtype):
    x, bins = ties_nan_inf_input(dtype)
    vals, idxs = pe.multi_adaptive_max_pool2d(_cuda(x, kind), bins, return_indices=True, backend=CPP)
    for v, i, b in zip(vals, idxs, bins):
        want_v, want_i = F.adaptive_max_pool2d(x.float(), _pair(b), return_indices=True)
        torch.testing.assert_close(v.cpu().float(), want_v, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(i.cpu(), want_i), b


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("cl_levels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_packed_layout_matches_reference(kind, mode, cl_levels, dtype):
    x = _rand((3, 7, 33, 47), dtype, seed=2)
    bins = normalize_bins((1, 2, 3, 6, (2, 5)))
    hb, wb, lb = pyramid_windows(33, 47, bins)
    values, indices = OPS.multi_pool2d(_cuda(x, kind), hb, wb, lb, mode, cl_levels)
    want_v, want_i = reference.multi_pool2d(x.double(), hb, wb, lb, mode, cl_levels)
    assert values.shape == want_v.shape and values.is_contiguous()
    _close(values, want_v, dtype)
    if mode == 1:
        assert torch.equal(indices.cpu(), want_i)
    else:
        assert indices.shape == (0,) and indices.dtype == torch.int64 and indices.device.type == DEV.type


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("bins", [(4, 2, 1), (6, 3, 2, 1), ((2, 3), 5)])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_spatial_pyramid_pool(mode, bins, kind):
    x = _rand((3, 5, 29, 18), torch.float32)
    got = pe.spatial_pyramid_pool(_cuda(x, kind), bins, mode=mode, backend=CPP)
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    want = torch.cat([pool(x.double(), _pair(b)).flatten(1) for b in bins], 1)
    _close(got, want, torch.float32)


@pytest.mark.parametrize("window,size,bins", [
    ("sppnet", (24, 36), (4, 2, 1)),
    ("keras_same", (33, 47), (1, 2, 3, 6)),
    ("keras_same", (60, 60), (1, 2, 3, 6)),
])
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", [0, 1])
def test_window_policies_match_independent_reference(window, size, bins, kind, mode):
    x = _rand((2, 6, *size), torch.float64, seed=4)
    hb, wb, lb = pyramid_windows(size[0], size[1], normalize_bins(bins), window)
    got_v, got_i = OPS.multi_pool2d(_cuda(x, kind), hb, wb, lb, mode, kind == "channels_last")
    cl = kind == "channels_last"
    want_v, want_i = naive_multi_pool(x, hb, wb, lb, mode, cl)
    # The bounds windows.py gave the op are the policy's: the same levels from
    # PyTorch's pooling with the documents' kernel/stride/padding (keras_same
    # is an average-pooling policy; its max is checked against the loop only).
    name = "max" if mode == 1 else "avg"
    if window == "sppnet" or mode == 0:
        levels = [sppnet_pool(x, n, name) if window == "sppnet" else keras_same_avg(x, n) for n in bins]
        packed = torch.cat([(t.permute(0, 2, 3, 1) if cl else t).flatten(1) for t in levels], 1)
        torch.testing.assert_close(want_v, packed)
    _close(got_v, want_v, torch.float64)
    if mode == 1:
        assert torch.equal(got_i.cpu(), want_i)


# Window sets that exceed the by-value plan (more than 64 segments or 256
# windows per axis, more than 32 levels) run the direct kernels.
FALLBACK_BINS = [(70,), (2, 300), tuple(range(1, 36)), ((1, 80), (3, 3))]


@pytest.mark.parametrize("bins", FALLBACK_BINS)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", [0, 1])
def test_many_windows_direct_path(bins, kind, mode):
    size = (97, 129) if len(bins) < 10 else (40, 37)
    x = _rand((1, 3, *size), torch.float32, seed=5)
    hb, wb, lb = pyramid_windows(size[0], size[1], normalize_bins(bins))
    xg = _cuda(x, kind).requires_grad_()
    values, indices = OPS.multi_pool2d(xg, hb, wb, lb, mode, False)
    want_v, want_i = reference.multi_pool2d(x.double(), hb, wb, lb, mode, False)
    _close(values, want_v, torch.float32)
    if mode == 1:
        assert torch.equal(indices.cpu(), want_i)
    # backward through the same path
    w = _rand(values.shape, torch.float32, seed=6)
    (values * w.to(DEV)).sum().backward()
    xr = x.detach().double().requires_grad_()
    rv, _ = reference.multi_pool2d(xr, hb, wb, lb, mode, False)
    (rv * w.double()).sum().backward()
    _close(xg.grad, xr.grad, torch.float32)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", [0, 1])
def test_overlapping_and_uncovered_windows(kind, mode):
    win = OVERLAPPING_WINDOWS
    x = _rand((2, 3, *win["size"]), torch.float64, seed=7)
    hb, wb, lb = win["h_bounds"], win["w_bounds"], win["level_bins"]
    xg = _cuda(x, kind).requires_grad_()
    values, indices = OPS.multi_pool2d(xg, hb, wb, lb, mode, kind == "channels_last")
    want_v, want_i = naive_multi_pool(x, hb, wb, lb, mode, kind == "channels_last")
    _close(values, want_v, torch.float64)
    if mode == 1:
        assert torch.equal(indices.cpu(), want_i)
    w = _rand(values.shape, torch.float64, seed=8)
    (values * w.to(DEV)).sum().backward()
    xr = x.detach().clone().requires_grad_()
    rv, _ = naive_multi_pool(xr, hb, wb, lb, mode, kind == "channels_last")
    (rv * w).sum().backward()
    _close(xg.grad, xr.grad, torch.float64)


def test_pool_empty_batch_and_channels():
    for shape in [(0, 3, 9, 9), (2, 0, 9, 9)]:
        x = torch.randn(shape, device=DEV)
        for mode in (0, 1):
            hb, wb, lb = pyramid_windows(9, 9, normalize_bins((1, 2, 3)))
            v, i = OPS.multi_pool2d(x, hb, wb, lb, mode, False)
            assert v.shape == (shape[0], shape[1] * 14)
            gx = OPS.multi_pool2d_backward(torch.zeros_like(v), i if mode == 1 else None, list(shape), hb, wb, lb,
                                           mode, False, False)
            assert gx.shape == shape


def test_pool_rejects_misuse():
    x = torch.randn(1, 2, 8, 8, device=DEV)
    with pytest.raises(RuntimeError, match=r"window \[0, 9\) along H is empty or outside \[0, 8\)"):
        OPS.multi_pool2d(x, [0, 9], [0, 8], [1, 1], 0, False)
    with pytest.raises(RuntimeError, match=r"mode must be 0 \(avg\), 1 \(max\) or 2 \(max, values only\), got 3"):
        OPS.multi_pool2d(x, [0, 8], [0, 8], [1, 1], 3, False)
    with pytest.raises(RuntimeError, match="x must be contiguous in NCHW or channels_last memory format"):
        OPS.multi_pool2d(x[:, :, ::2], [0, 4], [0, 8], [1, 1], 0, False)
    with pytest.raises(RuntimeError, match="x must be float64, float32, float16 or bfloat16, got Int"):
        OPS.multi_pool2d(x.int(), [0, 8], [0, 8], [1, 1], 0, False)


# --------------------------------------------------------------------------
# multi_pool2d backward
# --------------------------------------------------------------------------


def _pool_grads(x, bins, mode, kind, seed=10):
    """(grad from the CUDA op, grad of F.adaptive_*_pool2d in float64 on CPU)."""
    dtype = x.dtype
    xg = _cuda(x, kind).requires_grad_()
    if mode == "max":
        outs = pe.multi_adaptive_max_pool2d(xg, bins, backend=CPP)
    else:
        outs = pe.multi_adaptive_avg_pool2d(xg, bins, backend=CPP)
    ws = [_rand(o.shape, dtype, seed=seed + k) for k, o in enumerate(outs)]
    sum((o * w.to(DEV)).sum() for o, w in zip(outs, ws)).backward()
    xr = x.detach().double().requires_grad_()
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    sum((pool(xr, _pair(b)) * w.double()).sum() for b, w in zip(bins, ws)).backward()
    return xg.grad, xr.grad


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bins", BIN_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_backward_matches_cpu_autograd(size, bins, dtype, kind, mode):
    x = _rand((2, 4, *size), dtype, seed=9)
    got, want = _pool_grads(x, bins, mode, kind)
    assert got.shape == x.shape
    _close(got, want, dtype)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("cl_levels", [False, True])
def test_backward_op_memory_format_and_values(kind, mode, cl_levels):
    x = _rand((2, 6, 33, 47), torch.float64, seed=11)
    bins = normalize_bins((1, 2, 3, 6))
    hb, wb, lb = pyramid_windows(33, 47, bins)
    v, i = OPS.multi_pool2d(_cuda(x, kind), hb, wb, lb, mode, cl_levels)
    g = _rand(v.shape, torch.float64, seed=12)
    cl_input = kind == "channels_last"
    gx = OPS.multi_pool2d_backward(g.to(DEV), i if mode == 1 else None, list(x.shape), hb, wb, lb, mode, cl_levels,
                                   cl_input)
    assert gx.shape == x.shape
    assert gx.is_contiguous(memory_format=torch.channels_last if cl_input else torch.contiguous_format)
    xr = x.detach().clone().requires_grad_()
    rv, _ = reference.multi_pool2d(xr, hb, wb, lb, mode, cl_levels)
    (rv * g).sum().backward()
    _close(gx, xr.grad, torch.float64)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_backward_op_addend(kind, mode, dtype):
    """addend (any strides) + the gradient, equal to `addend + backward(...)` bit for bit."""
    x = _rand((2, 6, 33, 47), dtype, seed=13)
    hb, wb, lb = pyramid_windows(33, 47, normalize_bins((1, 2, 3, 6)))
    v, i = OPS.multi_pool2d(_cuda(x, kind), hb, wb, lb, mode, False)
    g = _rand(v.shape, dtype, seed=14).to(DEV)
    cl = kind == "channels_last"
    args = (g, i if mode == 1 else None, list(x.shape), hb, wb, lb, mode, False, cl)
    plain = OPS.multi_pool2d_backward(*args)
    big = _rand((2, 9, 33, 47), dtype, seed=15).to(DEV)
    addends = (big[:, 2:8], big.contiguous(memory_format=torch.channels_last)[:, 1:7],
               big[:1, :6].expand(2, 6, 33, 47))
    for addend in addends:
        got = OPS.multi_pool2d_backward(*args, addend)
        assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        torch.testing.assert_close(got, addend + plain, rtol=0, atol=0)


# --------------------------------------------------------------------------
# upsample_concat
# --------------------------------------------------------------------------

BRANCH_SETS = [(1, 2, 3, 6), (6, 3, 2, 1), ((2, 3), (5, 1), 1, (1, 7))]


def _branches(n, sizes, dtype, seed=20, channels=(3, 2, 4, 1)):
    return [_rand((n, channels[k % len(channels)], *_pair(s)), dtype, seed=seed + k) for k, s in enumerate(sizes)]


def _acc(dtype):
    """The accumulation type: the tap weights are computed in it (ATen's opmath)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ref_upcat(x, branches, size, align_corners, x_first, dtype=torch.float64):
    """torch.cat of x and F.interpolate'd branches on the CPU, computed in `dtype`
    (the accumulation type of the inputs' dtype, so that the bilinear weights
    are ATen's for that dtype, bit for bit), returned as float64."""
    ups = [F.interpolate(b.to(dtype), size=size, mode="bilinear", align_corners=align_corners) for b in branches]
    parts = ups if x is None else ([x.to(dtype)] + ups if x_first else ups + [x.to(dtype)])
    return torch.cat(parts, 1).double()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("sizes", BRANCH_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_concat_matches_cpu(size, sizes, dtype, kind, align_corners):
    x = _rand((2, 5, *size), dtype, seed=21)
    bs = _branches(2, sizes, dtype)
    got = pe.upsample_concat(_cuda(x, kind), [_cuda(b, kind) for b in bs], align_corners=align_corners,
                             backend=CPP)
    assert got.device.type == DEV.type and got.shape == (2, 5 + sum(b.shape[1] for b in bs), *size)
    if kind == "channels_last":
        # a 1 x 1 map is contiguous in both formats: only the general case can tell them apart
        assert _is_cl(got) and (not got.is_contiguous() or size == (1, 1))
    else:
        assert got.is_contiguous()
    kw = dict(atol=UP_ATOL_F32) if dtype == torch.float32 else {}
    _close(got, _ref_upcat(x, bs, size, align_corners, True, _acc(dtype)), dtype, **kw)


@pytest.mark.parametrize("x_first", [True, False])
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_concat_order_no_x_and_downsampling(x_first, kind, align_corners):
    size = (33, 47)
    x = _rand((2, 3, *size), torch.float32, seed=22)
    # up- and down-sampling, a same-size branch (a copy, as ATen does), 1x1
    sizes = [(80, 90), (33, 47), (1, 1), (7, 60)]
    bs = _branches(2, sizes, torch.float32, seed=23)
    bg = [_cuda(b, kind) for b in bs]
    got = pe.upsample_concat(_cuda(x, kind), bg, align_corners=align_corners, x_first=x_first, backend=CPP)
    # sources up to 90 wide: eager's FMA tap source (see UP_ATOL_F32) moves its weights by up to
    # ~6e-8 * 89; the CPU kernels, same arithmetic as these, need atol 1.1e-5 here (was 1e-4)
    _close(got, _ref_upcat(x, bs, size, align_corners, x_first, torch.float32), torch.float32, atol=5e-5)
    got = pe.upsample_concat(None, bg, size=size, align_corners=align_corners, backend=CPP)
    _close(got, _ref_upcat(None, bs, size, align_corners, True, torch.float32), torch.float32, atol=5e-5)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_upsample_concat_out_into_channel_slice(kind, dtype):
    size = (65, 65)
    x = _rand((2, 4, *size), dtype, seed=24)
    bs = _branches(2, (1, 2, 3, 6), dtype, seed=25)
    channels = 4 + sum(b.shape[1] for b in bs)
    fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    buf = torch.full((2, channels + 7, *size), 7.0, dtype=dtype, device=DEV).contiguous(memory_format=fmt)
    out = buf[:, 3:3 + channels]
    res = pe.upsample_concat(_cuda(x, kind), [_cuda(b, kind) for b in bs], out=out, backend=CPP)
    assert res.data_ptr() == out.data_ptr()
    kw = dict(atol=UP_ATOL_F32) if dtype == torch.float32 else {}
    _close(out, _ref_upcat(x, bs, size, False, True, _acc(dtype)), dtype, **kw)
    assert bool((buf[:, :3] == 7).all()) and bool((buf[:, 3 + channels:] == 7).all())


@pytest.mark.parametrize("x_kind", LAYOUTS)
def test_upsample_concat_mixed_layouts(x_kind):
    # x in one layout, the branches alternating: each read through its own
    # strides; forward and backward against float64 eager on the CPU.
    size = (33, 47)
    other = "nchw" if x_kind == "channels_last" else "channels_last"
    kinds = [other, x_kind, other]
    x = _rand((2, 5, *size), torch.float32, seed=26)
    bs = _branches(2, (1, 3, 6), torch.float32, seed=27)
    xg = _cuda(x, x_kind).requires_grad_()
    bg = [_cuda(b, kd).requires_grad_() for b, kd in zip(bs, kinds)]
    got = pe.upsample_concat(xg, bg, backend=CPP)
    _close(got, _ref_upcat(x, bs, size, False, True, torch.float32), torch.float32, atol=UP_ATOL_F32)
    w = _rand(got.shape, torch.float32, seed=28)
    (got * w.to(DEV)).sum().backward()
    xr = x.double().requires_grad_()
    br = [b.double().requires_grad_() for b in bs]
    (_ref_upcat(xr, br, size, False, True) * w.double()).sum().backward()
    _close(xg.grad, xr.grad, torch.float32)
    for g, r in zip(bg, br):
        _close(g.grad, r.grad, torch.float32, atol=SUM_ATOL[torch.float32])


def test_upsample_concat_reads_any_strides():
    # The C++ op reads inputs through their strides (the Python layer makes
    # them dense, a direct call need not).
    size = (17, 23)
    x = torch.randn(2, 6, 17, 46, device=DEV, dtype=torch.float64)[..., ::2]
    b = torch.randn(2, 3, 5, 4, device=DEV, dtype=torch.float64).transpose(2, 3)
    got = OPS.upsample_concat(x, [b], list(size), False, True, False)
    want = _ref_upcat(x.cpu(), [b.cpu()], size, False, True)
    _close(got, want, torch.float64)


def test_upsample_concat_rejects_misuse():
    x = torch.randn(2, 3, 8, 8, device=DEV)
    b = torch.randn(2, 2, 2, 2, device=DEV)
    with pytest.raises(RuntimeError, match=r"branches\[0\] has dtype Double but out has Float"):
        OPS.upsample_concat(x, [b.double()], [8, 8], False, True, False)
    with pytest.raises(RuntimeError, match=r"branches\[0\] is on cpu but out is on cuda"):
        OPS.upsample_concat(x, [b.cpu()], [8, 8], False, True, False)
    with pytest.raises(RuntimeError, match=r"x has spatial size \(8, 8\) but the output has \(9, 8\)"):
        OPS.upsample_concat(x, [b], [9, 8], False, True, False)
    with pytest.raises(RuntimeError, match=r"branches\[0\] has batch size 1 but out has 2"):
        OPS.upsample_concat(x, [b[:1]], [8, 8], False, True, False)
    out = torch.empty(2, 4, 8, 8, device=DEV)
    with pytest.raises(RuntimeError, match="the inputs have 5 channels in all but out has 4"):
        OPS.upsample_concat_out(x, [b], False, True, out)
    with pytest.raises(RuntimeError, match="x has dtype Float but out has Half"):
        OPS.upsample_concat_out(x, [b], False, True, torch.empty(2, 5, 8, 8, device=DEV, dtype=torch.float16))


def test_upsample_concat_out_may_share_storage_only_without_overlap():
    check_out_overlap_rule(OPS.upsample_concat_out, DEV)


def test_upsample_concat_empty():
    x = torch.randn(0, 3, 8, 8, device=DEV)
    b = torch.randn(0, 2, 2, 2, device=DEV)
    out = OPS.upsample_concat(x, [b], [8, 8], False, True, False)
    assert out.shape == (0, 5, 8, 8)
    x = torch.randn(2, 3, 8, 8, device=DEV)
    b = torch.randn(2, 0, 2, 2, device=DEV)
    out = OPS.upsample_concat(x, [b], [8, 8], False, True, False)
    assert torch.equal(out, x)
    grads = OPS.upsample_concat_backward(torch.randn(2, 3, 8, 8, device=DEV), [0, 2, 2], 3, False, False)
    assert grads[0].shape == (2, 0, 2, 2)


def _upcat_grads(x, bs, size, align_corners, x_first, kind, seed=30):
    dtype = bs[0].dtype
    xg = _cuda(x, kind).requires_grad_() if x is not None else None
    bg = [_cuda(b, kind).requires_grad_() for b in bs]
    out = pe.upsample_concat(xg, bg, size=size, align_corners=align_corners, x_first=x_first, backend=CPP)
    w = _rand(out.shape, dtype, seed=seed)
    (out * w.to(DEV)).sum().backward()
    xr = x.detach().double().requires_grad_() if x is not None else None
    br = [b.detach().double().requires_grad_() for b in bs]
    (_ref_upcat(xr, br, size, align_corners, x_first) * w.double()).sum().backward()
    return (xg, bg), (xr, br)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("sizes", BRANCH_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_concat_backward_matches_cpu_autograd(size, sizes, dtype, kind, align_corners):
    x = _rand((2, 3, *size), dtype, seed=31)
    # 33 channels: more than one 32-channel tile in the channels_last kernels
    bs = _branches(2, sizes, dtype, seed=32, channels=(33, 2, 4, 1))
    (xg, bg), (xr, br) = _upcat_grads(x, bs, size, align_corners, True, kind)
    _close(xg.grad, xr.grad, dtype)
    for g, r in zip(bg, br):
        assert g.grad.shape == r.shape
        # a 1x1 branch sums a whole plane: allow for the accumulation
        _close(g.grad, r.grad, dtype, atol=SUM_ATOL[dtype])


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("x_first", [True, False])
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_concat_backward_downsampling_and_offsets(kind, x_first, align_corners):
    size = (33, 47)
    x = _rand((2, 3, *size), torch.float64, seed=33)
    bs = _branches(2, [(80, 90), (33, 47), (1, 1), (7, 60), (97, 129)], torch.float64, seed=34)
    (xg, bg), (xr, br) = _upcat_grads(x, bs, size, align_corners, x_first, kind)
    _close(xg.grad, xr.grad, torch.float64)
    for g, r in zip(bg, br):
        _close(g.grad, r.grad, torch.float64)
    # and without x
    (_, bg), (_, br) = _upcat_grads(None, bs, size, align_corners, True, kind)
    for g, r in zip(bg, br):
        _close(g.grad, r.grad, torch.float64)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_upsample_backward_op_memory_format(kind):
    g = _cuda(_rand((2, 9, 20, 30), torch.float32, seed=35), kind)
    cl = kind == "channels_last"
    grads = OPS.upsample_concat_backward(g, [3, 1, 1, 2, 4, 5], 4, False, cl)
    assert [t.shape for t in grads] == [(2, 3, 1, 1), (2, 2, 4, 5)]
    for t in grads:
        assert t.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    # 1x1 with align_corners=False: every output reads the single pixel with weight 1
    torch.testing.assert_close(grads[0].cpu().double().flatten(1),
                               g[:, 4:7].double().sum((2, 3)).cpu(), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------
# upsample_shift_add (the kernel op of upsample_concat_conv2d)
# --------------------------------------------------------------------------


def _taps(n, cout, k, sizes, dtype, seed=50):
    return [_rand((n, k * k * cout, *_pair(s)), dtype, seed=seed + i) for i, s in enumerate(sizes)]


def _shift_add_case(base, taps, k, align_corners, kind, tap_kinds=None, seed=60):
    """The CUDA op forward and backward against fp64 on the CPU: with the
    kernels' float tap weights, within the error bound of the sum; against
    F.interpolate (in the accumulation type) and autograd of it."""
    dtype = base.dtype
    tap_kinds = tap_kinds or [kind] * len(taps)
    base_dev = _cuda(base, kind)
    out = OPS.upsample_shift_add(base_dev, [_cuda(t, tk) for t, tk in zip(taps, tap_kinds)], k, align_corners)
    assert out.device.type == DEV.type and out.shape == base.shape and out.stride() == base_dev.stride()
    want, terms = shift_add_fp64(base, taps, k, align_corners, weight_dtype(dtype))
    check_shift_add(out, want, terms, dtype, forward_chain(len(taps), k), "forward")
    acc = weight_dtype(dtype)
    _close(out, eager_shift_add(base.double(), [t.to(acc) for t in taps], k, align_corners, acc), dtype,
           atol=EAGER_ATOL[dtype])
    g = _rand(base.shape, dtype, seed=seed)
    grads = OPS.upsample_shift_add_backward(_cuda(g, kind), tap_shapes(taps), k, align_corners,
                                            [tk == "channels_last" for tk in tap_kinds])
    expected = shift_add_backward_fp64(g, [t.shape[2:] for t in taps], k, align_corners, weight_dtype(dtype))
    tr = [t.double().requires_grad_() for t in taps]
    (eager_shift_add(base.double(), tr, k, align_corners) * g.double()).sum().backward()
    for i, (got, (want, terms), r, tk) in enumerate(zip(grads, expected, tr, tap_kinds)):
        assert got.shape == taps[i].shape and got.device.type == DEV.type
        fmt = torch.channels_last if tk == "channels_last" else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt)
        check_shift_add(got, want, terms, dtype, BACKWARD_CHAIN, f"grad taps[{i}]")
        _close(got, r.grad, dtype, atol=SUM_ATOL[dtype])
    return out, grads


# per output size: tap tensors smaller than, equal to and larger than it, and 1x1
SHIFT_ADD_TAPS = {(33, 47): [(1, 1), (6, 6), (33, 47), (40, 61)], (65, 65): [(2, 3), (17, 17), (65, 65)],
                  (1, 1): [(1, 1), (3, 2)], (3, 5): [(7, 2), (3, 5)]}


@pytest.mark.parametrize("size", sorted(SHIFT_ADD_TAPS))
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_shift_add_matches_fp64(size, k, dtype, kind, align_corners):
    base = _rand((2, 5, *size), dtype, seed=51)
    _shift_add_case(base, _taps(2, 5, k, SHIFT_ADD_TAPS[size], dtype, seed=52), k, align_corners, kind)


def test_upsample_shift_add_mixed_layouts_many_taps_and_strides():
    for base_kind, tap_kinds in (("nchw", ["channels_last", "nchw", "channels_last"]),
                                 ("channels_last", ["nchw", "channels_last", "nchw"])):
        base = _rand((2, 40, 17, 23), torch.float32, seed=53)
        _shift_add_case(base, _taps(2, 40, 3, [(1, 1), (6, 7), (30, 20)], torch.float32, seed=54), 3, False,
                        base_kind, tap_kinds)
    # 19 tap tensors: two launches, the running sum in float32 between them
    for dtype in (torch.float32, torch.bfloat16):
        base = _rand((1, 3, 9, 10), dtype, seed=55)
        _shift_add_case(base, _taps(1, 3, 3, [(k % 4 + 1, k % 3 + 2) for k in range(19)], dtype, seed=56), 3, True,
                        "nchw")
    # tap tensors through other strides: a channel slice, a transpose
    base = _rand((1, 2, 9, 10), torch.float64, seed=57)
    taps = [_rand((1, 40, 3, 4), torch.float64, seed=58)[:, 5:23],
            _rand((1, 18, 6, 5), torch.float64, seed=59).transpose(2, 3)]
    got = OPS.upsample_shift_add(base.to(DEV), [t.to(DEV) for t in taps], 3, True)
    want, terms = shift_add_fp64(base, taps, 3, True, torch.float64)
    check_shift_add(got, want, terms, torch.float64, forward_chain(2, 3))


def test_upsample_shift_add_empty_and_misuse():
    base = _rand((2, 3, 5, 4), torch.float32, seed=60).to(DEV)
    out = OPS.upsample_shift_add(base, [], 3, False)
    assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()
    for shape in [(0, 3, 5, 4), (2, 0, 5, 4)]:
        b = torch.zeros(shape, device=DEV)
        assert OPS.upsample_shift_add(b, [torch.zeros(shape[0], 9 * shape[1], 2, 2, device=DEV)], 3,
                                      False).shape == shape
        grads = OPS.upsample_shift_add_backward(b, [2, 2, 3, 1], 3, False, [False, True])
        assert [tuple(g.shape) for g in grads] == [(shape[0], 9 * shape[1], 2, 2), (shape[0], 9 * shape[1], 3, 1)]
    tap = torch.randn(2, 27, 2, 2, device=DEV)
    with pytest.raises(ValueError, match=r"taps\[0\] has 26 channels"):
        OPS.upsample_shift_add(base, [tap[:, :26]], 3, False)
    with pytest.raises(ValueError, match="kernel_size must be odd and positive"):
        OPS.upsample_shift_add(base, [tap], 2, False)
    with pytest.raises(TypeError, match=r"taps\[0\] has dtype"):
        OPS.upsample_shift_add(base, [tap.double()], 3, False)
    with pytest.raises(ValueError, match=r"taps\[0\] is on cpu"):
        OPS.upsample_shift_add(base, [tap.cpu()], 3, False)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_upsample_shift_add_gradcheck(kind):
    base = _cuda(_rand((1, 2, 6, 7), torch.float64, seed=61), kind).requires_grad_()
    taps = [_cuda(t, kind).requires_grad_() for t in _taps(1, 2, 3, [(1, 1), (3, 2), (9, 11)], torch.float64, 62)]

    def f(b, *ts):
        return OPS.upsample_shift_add(b, list(ts), 3, kind == "nchw")

    assert torch.autograd.gradcheck(f, (base, *taps), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(f, (base, *taps), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_upsample_shift_add_backward_1x1_taps_within_1e6_of_fp64(kind):
    """The gradient of a 1x1 (and a 2x3) tap tensor with K = 3 sums a shifted
    4096 x 4096 plane."""
    cout = 1 if kind == "nchw" else 3
    g = torch.full((1, cout, 4096, 4096), 0.1)
    g[0, :, 300, 17] = 1e3
    hws = [(1, 1), (2, 3)]
    grads = OPS.upsample_shift_add_backward(_cuda(g, kind), [v for hw in hws for v in hw], 3, False,
                                            [kind == "channels_last"] * 2)
    for hw, got, (want, terms) in zip(hws, grads, shift_add_backward_fp64(g, hws, 3, False)):
        err = ((got.cpu().double() - want).abs() / terms).max().item()
        assert err <= 1e-6, f"taps {hw}: error {err:.3g} x sum|terms|"


# --------------------------------------------------------------------------
# Determinism, streams, CUDA graphs, gradcheck
# --------------------------------------------------------------------------


def _run_all(kind):
    x = _cuda(_rand((2, 40, 65, 65), torch.float32, seed=40), kind).requires_grad_()
    outs = []
    for mode in ("avg", "max"):
        fn = pe.multi_adaptive_avg_pool2d if mode == "avg" else pe.multi_adaptive_max_pool2d
        levels = fn(x, (1, 2, 3, 6), backend=CPP)
        ups = pe.upsample_concat(x, levels, backend=CPP)
        w = torch.linspace(-1, 1, ups.numel(), device=DEV).view_as(ups)
        (gx,) = torch.autograd.grad((ups * w).sum(), x)
        outs += [t.detach().clone() for t in levels] + [ups.detach().clone(), gx]
    # upsample_shift_add, every backward kernel (a block, a warp or a thread per element; channels_last tiles)
    base = _cuda(_rand((2, 40, 65, 65), torch.float32, seed=39), kind)
    taps = [_cuda(t, kind) for t in _taps(2, 40, 3, [(1, 1), (6, 6), (65, 65), (70, 40)], torch.float32, seed=38)]
    out = OPS.upsample_shift_add(base, taps, 3, False)
    w = torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)
    outs += [out] + list(OPS.upsample_shift_add_backward(w, tap_shapes(taps), 3, False, [kind != "nchw"] * 4))
    return outs


@pytest.mark.parametrize("kind", LAYOUTS)
def test_bitwise_deterministic(kind):
    a = _run_all(kind)
    b = _run_all(kind)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        c = _run_all(kind)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(u, v) for u, v in zip(a, c))


def test_runs_on_the_current_stream():
    """Every op enqueues its kernels on the current stream. On a side stream a
    long sleep kernel runs first, then the inputs are overwritten, then the
    op: launched on the side stream, the op reads the new inputs; launched on
    the default stream (or any other), it would run during the sleep and read
    the old ones."""
    old = _rand((4, 16, 33, 47), torch.float32, seed=41)
    new = _rand((4, 16, 33, 47), torch.float32, seed=42)
    x = _cuda(old)
    new_dev = _cuda(new)
    hb, wb, lb = pyramid_windows(33, 47, normalize_bins((4, 2, 1)))
    g_old = torch.zeros(4, 16 * 21, device=DEV)
    g_new = _rand((4, 16 * 21), torch.float32, seed=43).to(DEV)
    gu_old = torch.zeros(4, 20, 33, 47, device=DEV)
    gu_new = _rand((4, 20, 33, 47), torch.float32, seed=44).to(DEV)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(int(2e8))  # ~0.1 s of spinning, on s only
        x.copy_(new_dev)
        g_old.copy_(g_new)
        gu_old.copy_(gu_new)
        spp = pe.spatial_pyramid_pool(x, (4, 2, 1), mode="avg", backend=CPP)
        vals, idx = OPS.multi_pool2d(x, hb, wb, lb, 1, False)
        gx = OPS.multi_pool2d_backward(g_old, idx, list(x.shape), hb, wb, lb, 1, False, False)
        up = pe.upsample_concat(x, [x[:, :, :4, :4]], backend=CPP)
        (gb,) = OPS.upsample_concat_backward(gu_old, [4, 5, 5], 16, False, False)
        shifted = OPS.upsample_shift_add(x[:, :1], [x[:, 1:10, :5, :6]], 3, False)
        (gs,) = OPS.upsample_shift_add_backward(gu_old[:, :2], [5, 6], 3, False, [False])
    torch.cuda.synchronize()
    want_spp = torch.cat([F.adaptive_avg_pool2d(new.double(), b).flatten(1) for b in (4, 2, 1)], 1)
    _close(spp, want_spp, torch.float32)
    want_v, want_i = naive_multi_pool(new, hb, wb, lb, 1, False)
    assert torch.equal(vals.cpu().double(), want_v) and torch.equal(idx.cpu(), want_i)
    xr = new.double().requires_grad_()
    (naive_multi_pool(xr, hb, wb, lb, 1, False)[0] * g_new.cpu().double()).sum().backward()
    _close(gx, xr.grad, torch.float32)
    assert torch.equal(up[:, :16].cpu(), new)
    _close(up[:, 16:], F.interpolate(new[:, :, :4, :4].double(), size=(33, 47), mode="bilinear"), torch.float32,
           atol=UP_ATOL_F32)
    br = torch.zeros(4, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (F.interpolate(br, size=(33, 47), mode="bilinear") * gu_new[:, 16:].cpu().double()).sum().backward()
    _close(gb, br.grad, torch.float32, atol=SUM_ATOL[torch.float32])
    want, terms = shift_add_fp64(new[:, :1], [new[:, 1:10, :5, :6]], 3, False)
    check_shift_add(shifted, want, terms, torch.float32, forward_chain(1, 3), "upsample_shift_add")
    ((want, terms),) = shift_add_backward_fp64(gu_new[:, :2].cpu(), [(5, 6)], 3, False)
    check_shift_add(gs, want, terms, torch.float32, BACKWARD_CHAIN, "upsample_shift_add_backward")


def test_cuda_graph_capture():
    # The by-value plan needs no host-to-device copy: the ops capture.
    x = _cuda(_rand((2, 8, 33, 47), torch.float32, seed=42))
    static_x = x.clone()

    def step():
        levels = pe.multi_adaptive_max_pool2d(static_x, (1, 2, 3, 6), backend=CPP)
        up = pe.upsample_concat(static_x, levels, backend=CPP)
        # 20 tap tensors: two launches with the running sum in between, no host copy either
        taps = [up[:, :9 * 2, :k + 1, :k + 2] for k in range(20)]
        shifted = OPS.upsample_shift_add(static_x[:, :2], taps, 3, False)
        return up, shifted, OPS.upsample_shift_add_backward(shifted, tap_shapes(taps), 3, False, [False] * 20)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    new_x = _cuda(_rand((2, 8, 33, 47), torch.float32, seed=43))
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    static_x.copy_(new_x)
    up, shifted, grads = step()
    assert torch.equal(static_out[0], up) and torch.equal(static_out[1], shifted)
    assert all(torch.equal(a, b) for a, b in zip(static_out[2], grads))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    dev = torch.device("cuda", 1)
    x = _rand((2, 4, 33, 47), torch.float32, seed=44)
    xs = x.to(dev)
    got = pe.spatial_pyramid_pool(xs, (4, 2, 1), mode="max", backend=CPP)
    assert got.device == dev
    want = torch.cat([F.adaptive_max_pool2d(x, b).flatten(1) for b in (4, 2, 1)], 1)
    assert torch.equal(got.cpu(), want)
    up = pe.upsample_concat(xs, [xs[:, :, :3, :3]], backend=CPP)
    assert up.device == dev


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_gradcheck(kind, mode):
    x = _cuda(_rand((2, 3, 7, 9), torch.float64, seed=45), kind).requires_grad_()
    fn = pe.multi_adaptive_avg_pool2d if mode == "avg" else pe.multi_adaptive_max_pool2d

    def f(t):
        return tuple(fn(t, (1, 2, (3, 4)), backend=CPP))

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_concat_gradcheck(kind, align_corners):
    x = _cuda(_rand((2, 2, 6, 7), torch.float64, seed=46), kind).requires_grad_()
    b1 = _cuda(_rand((2, 3, 1, 1), torch.float64, seed=47), kind).requires_grad_()
    b2 = _cuda(_rand((2, 2, 3, 2), torch.float64, seed=48), kind).requires_grad_()
    b3 = _cuda(_rand((2, 1, 9, 11), torch.float64, seed=49), kind).requires_grad_()

    def f(x, b1, b2, b3):
        return pe.upsample_concat(x, [b1, b2, b3], align_corners=align_corners, backend=CPP)

    assert torch.autograd.gradcheck(f, (x, b1, b2, b3), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Long sums: within 1e-6 of fp64 (float runs per thread, double after them)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("bins", [(1, 2, (2, 3)), (1, (1, 65))], ids=["planned", "direct"])
def test_avg_pool_long_sums_within_1e6_of_fp64(kind, bins):
    x = torch.full((1, 2, 4096, 4096), 0.1)
    x[0, 1, 300, 17] = 1e4
    got = pe.multi_adaptive_avg_pool2d(_cuda(x, kind), bins, backend=CPP)
    want, abs_want = fp64_window_means(x, bins, nonnegative=True)
    for b, g, m, am in zip(bins, got, want, abs_want):
        err = ((g.cpu().double() - m).abs() / am).max().item()
        assert err <= 1e-6, f"bins {b}: error {err:.3g} x mean|x|"


@pytest.mark.parametrize("kind", LAYOUTS)
def test_upsample_backward_1x1_branch_within_1e6_of_fp64(kind):
    """A 1x1 branch's gradient sums a whole plane (its tap weights sum to 1,
    so nvcc's FMA in the source coordinate does not move it)."""
    C = 1 if kind == "nchw" else 3
    g = torch.full((1, C, 4096, 4096), 0.1)
    g[0, :, 300, 17] = 1e3
    (grad,) = OPS.upsample_concat_backward(_cuda(g, kind), [C, 1, 1], 0, False, kind == "channels_last")
    for c in range(C):
        want, terms = fp64_resize_grad(g, c, (1, 1), False, nonnegative=True)
        err = ((grad[0, c].cpu().double() - want).abs() / terms).max().item()
        assert err <= 1e-6, f"channel {c}: error {err:.3g} x sum|terms|"


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_forward_mode_tangents_match_pytorchs(kind):
    """The C++ autograd's forward-mode AD (csrc/autograd.cpp) on the CUDA kernels:
    tangents of the pooling (avg, max at its argmax) and of upsample_concat against
    PyTorch's forward AD of the eager code."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(0)
    x = _cuda(torch.randn(2, 5, 13, 11, generator=g, dtype=torch.float64), kind)
    t = _cuda(torch.randn(2, 5, 13, 11, generator=g, dtype=torch.float64))
    b = _cuda(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), kind)
    bins = (1, 2, 3, 6)

    def tangents(fn):
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(x, t))
            return [fwAD.unpack_dual(o).tangent for o in (out if isinstance(out, list) else [out])]

    cases = [
        (lambda v: pe.multi_adaptive_avg_pool2d(v, bins), lambda v: [F.adaptive_avg_pool2d(v, s) for s in bins]),
        (lambda v: pe.multi_adaptive_max_pool2d(v, bins), lambda v: [F.adaptive_max_pool2d(v, s) for s in bins]),
        (lambda v: pe.upsample_concat(v, [b]),
         lambda v: torch.cat([v, F.interpolate(b, (13, 11), mode="bilinear", align_corners=False)], 1)),
    ]
    for fused, eager in cases:
        for got, want in zip(tangents(fused), tangents(eager)):
            assert got is not None
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
