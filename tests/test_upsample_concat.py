"""upsample_concat against torch.cat of F.interpolate'd branches."""
import pytest
import torch
import torch.nn.functional as F

import pyramid_ext as pe

from .conftest import DTYPES, LAYOUTS, TOL, layout, need_backend

OUT_SIZES = [(1, 1), (33, 47), (65, 65), (97, 129), (6, 6)]


def _rand(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _branches(n, sizes, channels, dtype, seed=1, kind="nchw"):
    return [layout(_rand((n, c, h, w), dtype, seed + k), kind) for k, ((h, w), c) in enumerate(zip(sizes, channels))]


def _interpolate(b, size, align_corners):
    if b.numel() == 0:  # F.interpolate rejects empty tensors
        return b.new_zeros((b.shape[0], b.shape[1]) + tuple(size))
    return F.interpolate(b, size=size, mode="bilinear", align_corners=align_corners)


def _eager(x, branches, size, align_corners, x_first):
    ups = [_interpolate(b, size, align_corners) for b in branches]
    if x is None:
        return torch.cat(ups, 1)
    return torch.cat([x] + ups if x_first else ups + [x], 1)


PYRAMID = [(1, 1), (2, 2), (3, 3), (6, 6)]
MIXED = [(1, 3), (2, 5), (7, 2), (40, 50)]  # the last is larger than some outputs: downsampling


@pytest.mark.parametrize("size", OUT_SIZES)
@pytest.mark.parametrize("branch_sizes", [PYRAMID, MIXED])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
def test_matches_eager_fp64(backend, size, branch_sizes, align_corners, x_first):
    x = _rand((2, 3) + size, torch.float64)
    br = _branches(2, branch_sizes, (2, 1, 3, 2), torch.float64)
    got = pe.upsample_concat(x, br, align_corners=align_corners, x_first=x_first, backend=backend)
    want = _eager(x, br, size, align_corners, x_first)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_dtypes_and_layouts(backend, dtype, kind, align_corners):
    size = (33, 47)
    x = layout(_rand((2, 4) + size, dtype), kind)
    br = _branches(2, PYRAMID, (3, 3, 2, 1), dtype, kind=kind)
    got = pe.upsample_concat(x, br, align_corners=align_corners, backend=backend)
    assert got.dtype == dtype
    # 16-bit: PyTorch's own result in that dtype, within the dtype's tolerance.
    torch.testing.assert_close(got, _eager(x, br, size, align_corners, True), **TOL[dtype])
    # and against an fp32 computation of the same inputs
    want32 = _eager(x.float(), [b.float() for b in br], size, align_corners, True)
    torch.testing.assert_close(got.float(), want32, **TOL[dtype if dtype.itemsize == 2 else torch.float32])
    if kind == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()


def test_x_none_needs_size(backend):
    br = _branches(2, MIXED, (1, 2, 3, 4), torch.float64)
    got = pe.upsample_concat(None, br, size=(21, 13), align_corners=True, backend=backend)
    torch.testing.assert_close(got, _eager(None, br, (21, 13), True, True))
    got = pe.upsample_concat(None, br, size=9, backend=backend)
    torch.testing.assert_close(got, _eager(None, br, (9, 9), False, True))
    with pytest.raises(ValueError, match="size is required when x is None"):
        pe.upsample_concat(None, br, backend=backend)


def test_explicit_size_resizes_branches_not_x(backend):
    x = _rand((1, 2, 5, 7), torch.float64)
    with pytest.raises(RuntimeError):
        pe.upsample_concat(x, [_rand((1, 2, 3, 3), torch.float64)], size=(6, 7), backend=backend)


def test_align_corners_true_output_of_size_one(backend):
    br = [_rand((2, 3, 5, 4), torch.float64)]
    for ac in (False, True):
        got = pe.upsample_concat(None, br, size=(1, 1), align_corners=ac, backend=backend)
        torch.testing.assert_close(got, _eager(None, br, (1, 1), ac, True))


def test_mixed_dtypes_promote_like_cat(backend):
    x = _rand((1, 2, 9, 9), torch.float32)
    br = [_rand((1, 2, 3, 3), torch.float64), _rand((1, 1, 2, 2), torch.float16)]
    got = pe.upsample_concat(x, br, backend=backend)
    want = _eager(x, br, (9, 9), False, True)
    assert got.dtype == want.dtype == torch.float64
    # eager interpolates the fp16 branch in fp16 before cat promotes it
    torch.testing.assert_close(got, want, **TOL[torch.float16])
    exact = _eager(x.double(), [b.double() for b in br], (9, 9), False, True)
    torch.testing.assert_close(got, exact)


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 0, 8, 8)])
def test_empty_batch_or_channels(backend, shape):
    x = torch.randn(shape)
    br = [torch.randn(shape[0], 2, 3, 3), torch.randn(shape[0], 0, 2, 2)]  # a 0-channel branch, as cat accepts
    got = pe.upsample_concat(x, br, backend=backend)
    assert got.shape == (shape[0], shape[1] + 2, 8, 8)
    torch.testing.assert_close(got, _eager(x, br, (8, 8), False, True))


def test_out_fills_in_place(backend):
    x = _rand((2, 3, 17, 19))
    br = _branches(2, PYRAMID, (2, 2, 2, 2), torch.float32)
    out = torch.full((2, 11, 17, 19), float("nan"))
    ptr = out.data_ptr()
    res = pe.upsample_concat(x, br, out=out, align_corners=True, backend=backend)
    assert res is out and out.data_ptr() == ptr
    torch.testing.assert_close(out, _eager(x, br, (17, 19), True, True))


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_out_channel_slice_of_bigger_buffer(backend, kind):
    x = layout(_rand((2, 3, 17, 19)), kind)
    br = _branches(2, MIXED, (2, 1, 2, 3), torch.float32, kind=kind)
    buf = layout(torch.full((2, 20, 17, 19), -7.0), kind)
    out = buf[:, 5:16]
    pe.upsample_concat(x, br, out=out, x_first=False, backend=backend)
    torch.testing.assert_close(out, _eager(x, br, (17, 19), False, False))
    assert torch.all(buf[:, :5] == -7.0) and torch.all(buf[:, 16:] == -7.0)


def test_out_errors_leave_out_untouched(backend):
    x = _rand((2, 3, 8, 8))
    br = [_rand((2, 2, 2, 2))]
    for bad, exc, msg in [
        (torch.zeros(2, 6, 8, 8), ValueError, "out has shape"),
        (torch.zeros(2, 5, 8, 8, dtype=torch.float64), TypeError, "out has dtype"),
        (torch.zeros(2, 5, 8, 8, device="meta"), ValueError, "out is on meta"),
    ]:
        before = bad.clone() if bad.device.type != "meta" else None
        with pytest.raises(exc, match=msg):
            pe.upsample_concat(x, br, out=bad, backend=backend)
        if before is not None:
            assert torch.equal(bad, before)


def test_out_refuses_autograd(backend):
    x = _rand((1, 2, 8, 8)).requires_grad_()
    with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
        pe.upsample_concat(x, [_rand((1, 1, 2, 2))], out=torch.empty(1, 3, 8, 8), backend=backend)


# --------------------------------------------------------------- backward ---


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_gradcheck(backend, align_corners, x_first, kind):
    x = layout(_rand((2, 2, 5, 7), torch.float64), kind).requires_grad_()
    br = [b.requires_grad_() for b in _branches(2, [(1, 1), (2, 3), (3, 3), (9, 4)], (1, 2, 1, 2), torch.float64,
                                                kind=kind)]
    fn = lambda x, *b: pe.upsample_concat(x, list(b), align_corners=align_corners, x_first=x_first, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, *br))


def test_gradcheck_x_none(backend):
    br = [b.requires_grad_() for b in _branches(1, [(1, 1), (3, 2)], (2, 1), torch.float64)]
    assert torch.autograd.gradcheck(lambda *b: pe.upsample_concat(None, list(b), size=(4, 6), backend=backend), br)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_backward_matches_eager(backend, dtype, kind, align_corners):
    size = (33, 47)
    xb = layout(_rand((2, 3) + size, dtype), kind)
    brb = _branches(2, PYRAMID + [(40, 50)], (2, 3, 1, 2, 1), dtype, kind=kind)
    g = layout(_rand((2, 12) + size, dtype, seed=9), kind)
    x1, x2 = xb.clone().requires_grad_(), xb.clone().requires_grad_()
    b1 = [b.clone().requires_grad_() for b in brb]
    b2 = [b.clone().requires_grad_() for b in brb]
    pe.upsample_concat(x1, b1, align_corners=align_corners, backend=backend).backward(g)
    _eager(x2, b2, size, align_corners, True).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else TOL[dtype]
    if dtype in (torch.float16, torch.bfloat16):
        tol = dict(rtol=3e-2, atol=0.3)  # whole-plane sums of 16-bit grads: eager sums in another order
    for a, b in zip(b1, b2):
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_grad_of_x_is_a_slice_without_copy(backend):
    x = _rand((1, 3, 6, 6)).requires_grad_()
    br = [_rand((1, 2, 2, 2)).requires_grad_()]
    out = pe.upsample_concat(x, br, backend=backend)
    (gx,) = torch.autograd.grad(out, [x], torch.ones_like(out), retain_graph=True)
    assert torch.equal(gx, torch.ones_like(x))


def test_backward_deterministic_for_1x1_branch(backend):
    x = _rand((2, 8, 64, 64)).requires_grad_()
    br = [_rand((2, 8, 1, 1)).requires_grad_(), _rand((2, 8, 2, 2)).requires_grad_()]
    g = _rand((2, 24, 64, 64), seed=5)

    def run():
        out = pe.upsample_concat(x, br, backend=backend)
        return torch.autograd.grad(out, br, g)

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = run(), run()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


# ------------------------------------------------------------- bad input ---


def test_bad_input_errors(backend):
    x = _rand((2, 3, 8, 8))
    b = _rand((2, 1, 2, 2))
    with pytest.raises(ValueError, match="x must be a 4-D"):
        pe.upsample_concat(_rand((3, 8, 8)), [b], backend=backend)
    with pytest.raises(ValueError, match=r"branches\[1\] must be a 4-D"):
        pe.upsample_concat(x, [b, _rand((1, 2, 2))], backend=backend)
    with pytest.raises(ValueError, match=r"branches\[0\] has batch size 3 but x has 2"):
        pe.upsample_concat(x, [_rand((3, 1, 2, 2))], backend=backend)
    with pytest.raises(ValueError, match=r"branches\[0\] is on meta but x is on cpu"):
        pe.upsample_concat(x, [torch.empty(2, 1, 2, 2, device="meta")], backend=backend)
    with pytest.raises(TypeError, match="branches must be a list"):
        pe.upsample_concat(x, b, backend=backend)
    with pytest.raises(TypeError, match=r"branches\[0\] must be a floating-point"):
        pe.upsample_concat(x, [torch.ones(2, 1, 2, 2, dtype=torch.int32)], backend=backend)
    with pytest.raises(ValueError, match="size must be positive"):
        pe.upsample_concat(None, [b], size=(0, 4), backend=backend)
    with pytest.raises(ValueError, match="needs x or at least one branch"):
        pe.upsample_concat(None, [], size=4, backend=backend)
    with pytest.raises(ValueError, match=r"branches\[0\] must have non-zero height"):
        pe.upsample_concat(x, [torch.randn(2, 1, 0, 2)], backend=backend)


def test_cpp_op_checks_its_arguments():
    need_backend("cpp")
    x = torch.randn(1, 2, 4, 4)
    out = torch.empty(1, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.pyramid_ext.upsample_concat_out(x, [torch.randn(1, 1, 2, 2)], False, True, out)
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.pyramid_ext.upsample_concat_out(x, [torch.randn(1, 2, 2, 2)], False, True, torch.empty(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match="alias"):
        buf = torch.randn(1, 3, 4, 4)
        torch.ops.pyramid_ext.upsample_concat_out(buf[:, :2], [torch.randn(1, 1, 2, 2)], False, True, buf)
