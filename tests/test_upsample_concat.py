"""upsample_concat against torch.cat of F.interpolate'd branches."""
import pytest
import torch
import torch.nn.functional as F

import pyramid_ext as pe

from ._helpers import DTYPES, LAYOUTS, TOL, acc_dtype, bilinear_backward_fp64, check_out_overlap_rule, grad_close, layout
from ._helpers import rand as _rand, same_storage
from ._helpers import eager_upsample_concat as _eager
from .conftest import need_backend

OUT_SIZES = [(1, 1), (33, 47), (65, 65), (97, 129), (6, 6)]


def _branches(n, sizes, channels, dtype, seed=1, kind="nchw"):
    return [layout(_rand((n, c, h, w), dtype, seed + k), kind) for k, ((h, w), c) in enumerate(zip(sizes, channels))]


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


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
@pytest.mark.parametrize("x_channels", [5, 27])
def test_channels_last_parts_of_16_8_and_odd_channels(backend, align_corners, x_first, x_channels):
    # the float CPU kernel writes each output pixel part after part
    # (simd::concat_pixels), a part's channels 16, then 8 at a time as
    # vectors, then one by one: 27 = 16 + 8 + 3; x copied the same way
    x = layout(_rand((2, x_channels, 9, 7), torch.float32), "channels_last")
    br = [layout(_rand((2, c, b, b + 1), torch.float32, seed=c), "channels_last") for c, b in ((27, 2), (16, 3), (8, 1))]
    want = _eager(x, br, (9, 7), align_corners, x_first)
    got = pe.upsample_concat(x, br, align_corners=align_corners, x_first=x_first, backend=backend)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    # into a channel slice of a wider channels_last buffer (pixels further apart than their channels)
    buf = layout(torch.full((2, want.shape[1] + 6, 9, 7), float("nan")), "channels_last")
    pe.upsample_concat(x, br, align_corners=align_corners, x_first=x_first, out=buf[:, 2:-4], backend=backend)
    torch.testing.assert_close(buf[:, 2:-4], want, **TOL[torch.float32])
    assert buf[:, :2].isnan().all() and buf[:, -4:].isnan().all()


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
    with pytest.raises(ValueError, match=r"size \(6, 7\) must equal x's height and width \(5, 7\)"):
        pe.upsample_concat(x, [_rand((1, 2, 3, 3), torch.float64)], size=(6, 7), backend=backend)
    # the op itself (no Python validation) still refuses
    with pytest.raises(RuntimeError, match="upsample_concat: x must have out's height and width"):
        torch.ops.pyramid_ext.upsample_concat(x, [_rand((1, 2, 3, 3), torch.float64)], [6, 7], False, True, False)


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
def test_empty_batch_or_channels(any_backend, shape):
    x = torch.randn(shape)
    br = [torch.randn(shape[0], 2, 3, 3), torch.randn(shape[0], 0, 2, 2)]  # a 0-channel branch, as cat accepts
    got = pe.upsample_concat(x, br, backend=any_backend)
    assert got.shape == (shape[0], shape[1] + 2, 8, 8)
    torch.testing.assert_close(got, _eager(x, br, (8, 8), False, True))


def test_out_fills_in_place(any_backend):
    x = _rand((2, 3, 17, 19))
    br = _branches(2, PYRAMID, (2, 2, 2, 2), torch.float32)
    out = torch.full((2, 11, 17, 19), float("nan"))
    ptr = out.data_ptr()
    res = pe.upsample_concat(x, br, out=out, align_corners=True, backend=any_backend)
    assert res is out and out.data_ptr() == ptr
    torch.testing.assert_close(out, _eager(x, br, (17, 19), True, True))


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_out_channel_slice_of_bigger_buffer(any_backend, kind):
    x = layout(_rand((2, 3, 17, 19)), kind)
    br = _branches(2, MIXED, (2, 1, 2, 3), torch.float32, kind=kind)
    buf = layout(torch.full((2, 20, 17, 19), -7.0), kind)
    out = buf[:, 5:16]
    pe.upsample_concat(x, br, out=out, x_first=False, backend=any_backend)
    torch.testing.assert_close(out, _eager(x, br, (17, 19), False, False))
    assert torch.all(buf[:, :5] == -7.0) and torch.all(buf[:, 16:] == -7.0)


def test_out_errors_leave_out_untouched(any_backend):
    x = _rand((2, 3, 8, 8))
    br = [_rand((2, 2, 2, 2))]
    for bad, exc, msg in [
        (torch.zeros(2, 6, 8, 8), ValueError, "out has shape"),
        (torch.zeros(2, 5, 8, 8, dtype=torch.float64), TypeError, "out has dtype"),
        (torch.zeros(2, 5, 8, 8, device="meta"), ValueError, "out is on meta"),
    ]:
        before = bad.clone() if bad.device.type != "meta" else None
        with pytest.raises(exc, match=msg):
            pe.upsample_concat(x, br, out=bad, backend=any_backend)
        if before is not None:
            assert torch.equal(bad, before)


def test_out_refuses_autograd(any_backend):
    x = _rand((1, 2, 8, 8)).requires_grad_()
    with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
        pe.upsample_concat(x, [_rand((1, 1, 2, 2))], out=torch.empty(1, 3, 8, 8), backend=any_backend)
    # an out that requires grad: autograd would not record the write into it
    out = torch.zeros(1, 3, 8, 8, requires_grad=True)
    for dest in (out, out.clone()):
        with pytest.raises(RuntimeError, match="out= does not support automatic differentiation, but out requires"):
            pe.upsample_concat(_rand((1, 2, 8, 8)), [_rand((1, 1, 2, 2))], out=dest, backend=any_backend)
    with torch.no_grad():  # no graph is recorded: written as asked
        pe.upsample_concat(_rand((1, 2, 8, 8)), [_rand((1, 1, 2, 2))], out=out, backend=any_backend)
    assert out.abs().sum() > 0


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
    # Each branch gradient against an fp64 computation, Wy^T G Wx with the
    # kernel's (ATen's) tap weights in the accumulation type, within the error
    # bound of its sum: the final rounding of the entry's own magnitude plus
    # the accumulation error over the terms summed into it (sum |g| * weight,
    # in chains of at most H + W additions).
    offset = x1.shape[1]
    for k, (a, b) in enumerate(zip(b1, brb)):
        gk = g[:, offset:offset + b.shape[1]]
        offset += b.shape[1]
        want, terms = bilinear_backward_fp64(gk, b.shape[-2:], align_corners, acc_dtype(dtype))
        assert a.grad.dtype == dtype
        grad_close(a.grad, want, dtype, terms=terms, n_sum=sum(size), what=f"branch {k}")
        if kind == "channels_last":
            assert a.grad.is_contiguous(memory_format=torch.channels_last)


def test_grad_of_x_is_a_slice_without_copy(backend):
    x = _rand((1, 3, 6, 6)).requires_grad_()
    br = [_rand((1, 2, 2, 2)).requires_grad_()]
    out = pe.upsample_concat(x, br, backend=backend)
    g = _rand(out.shape, seed=3)
    (gx,) = torch.autograd.grad(out, [x], g, retain_graph=True)
    assert torch.equal(gx, g[:, :3])
    # no copy: x's gradient is a view into the incoming gradient's storage
    assert same_storage(gx, g) and gx.data_ptr() == g.data_ptr()


def test_mixed_nchw_and_channels_last_inputs(backend):
    # x NCHW, branches in both layouts (and the reverse): each read through its
    # own strides; the output takes x's layout (the first input's).
    size = (17, 23)
    for x_kind, kinds in (("nchw", ["channels_last", "nchw", "channels_last"]),
                          ("channels_last", ["nchw", "channels_last", "nchw"])):
        xb = _rand((2, 3) + size, seed=4)
        brb = [_rand((2, 2 + k, s, s + 1), seed=5 + k) for k, s in enumerate((1, 3, 6))]
        x1 = layout(xb, x_kind).requires_grad_()
        b1 = [layout(b, kd).requires_grad_() for b, kd in zip(brb, kinds)]
        x2 = xb.detach().clone().requires_grad_()
        b2 = [b.detach().clone().requires_grad_() for b in brb]
        got = pe.upsample_concat(x1, b1, backend=backend)
        want = _eager(x2, b2, size, False)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        g = _rand(want.shape, seed=9)
        got.backward(g)
        want.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
        for a, b, kd in zip(b1, b2, kinds):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
            assert a.grad.shape == b.shape


def test_backward_deterministic_across_thread_counts(backend):
    x = _rand((3, 8, 64, 64)).requires_grad_()
    br = [_rand((3, 8, 1, 1)).requires_grad_(), _rand((3, 8, 2, 2)).requires_grad_(),
          _rand((3, 8, 80, 70)).requires_grad_()]
    g = _rand((3, 32, 64, 64), seed=5)

    def run(kind):
        out = pe.upsample_concat(layout(x, kind), [layout(b, kind) for b in br], backend=backend)
        return [out.detach()] + list(torch.autograd.grad(out, br, layout(g, kind)))

    prev_threads = torch.get_num_threads()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for kind in ("nchw", "channels_last"):
            results = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append(run(kind))
            for threads, r in zip((2, 3), results[1:]):
                assert all(torch.equal(p, q) for p, q in zip(results[0], r)), f"{kind}: {threads} threads differ"
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev)


def test_small_planes_in_runs_split_across_threads(backend):
    """NCHW float on 16x16 planes (the CPU kernel resizes a task's run of a branch's planes in one call): runs
    that start and end inside a branch, at every thread count, against eager and bitwise equal to one thread."""
    x = _rand((3, 8, 16, 16), torch.float32)
    br = _branches(3, PYRAMID, (37, 37, 37, 37), torch.float32)
    want = _eager(x, br, (16, 16), False, True)
    prev_threads = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(pe.upsample_concat(x, br, backend=backend))
            torch.testing.assert_close(results[-1], want, **TOL[torch.float32])
        assert all(torch.equal(results[0], r) for r in results[1:])
    finally:
        torch.set_num_threads(prev_threads)


# ------------------------------------------------------------- bad input ---


def test_bad_input_errors(any_backend):
    x = _rand((2, 3, 8, 8))
    b = _rand((2, 1, 2, 2))
    with pytest.raises(ValueError, match="x must be a 4-D"):
        pe.upsample_concat(_rand((3, 8, 8)), [b], backend=any_backend)
    with pytest.raises(ValueError, match=r"branches\[1\] must be a 4-D"):
        pe.upsample_concat(x, [b, _rand((1, 2, 2))], backend=any_backend)
    with pytest.raises(ValueError, match=r"branches\[0\] has batch size 3 but x has 2"):
        pe.upsample_concat(x, [_rand((3, 1, 2, 2))], backend=any_backend)
    with pytest.raises(ValueError, match=r"branches\[0\] is on meta but x is on cpu"):
        pe.upsample_concat(x, [torch.empty(2, 1, 2, 2, device="meta")], backend=any_backend)
    with pytest.raises(TypeError, match="branches must be a list"):
        pe.upsample_concat(x, b, backend=any_backend)
    with pytest.raises(TypeError, match=r"branches\[0\] must be a floating-point"):
        pe.upsample_concat(x, [torch.ones(2, 1, 2, 2, dtype=torch.int32)], backend=any_backend)
    with pytest.raises(ValueError, match="size must be positive"):
        pe.upsample_concat(None, [b], size=(0, 4), backend=any_backend)
    with pytest.raises(ValueError, match="needs x or at least one branch"):
        pe.upsample_concat(None, [], size=4, backend=any_backend)
    with pytest.raises(ValueError, match=r"branches\[0\] must have non-zero height"):
        pe.upsample_concat(x, [torch.randn(2, 1, 0, 2)], backend=any_backend)


def test_cpp_op_checks_its_arguments():
    need_backend("cpp")
    x = torch.randn(1, 2, 4, 4)
    out = torch.empty(1, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.pyramid_ext.upsample_concat_out(x, [torch.randn(1, 1, 2, 2)], False, True, out)
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.pyramid_ext.upsample_concat_out(x, [torch.randn(1, 2, 2, 2)], False, True, torch.empty(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match=r"out must not overlap the inputs, but x shares"):
        buf = torch.randn(1, 3, 4, 4)
        torch.ops.pyramid_ext.upsample_concat_out(buf[:, :2], [torch.randn(1, 1, 2, 2)], False, True, buf)


def test_cpp_op_out_may_share_storage_only_without_overlap():
    need_backend("cpp")
    check_out_overlap_rule(torch.ops.pyramid_ext.upsample_concat_out)


def test_x_without_branches_backward(any_backend):
    # Found by tests/test_properties.py: autograd rejected the None gradient
    # returned for an empty branches list.
    x = _rand((2, 3, 4, 5), torch.float64).requires_grad_(True)
    got = pe.upsample_concat(x, [], backend=any_backend)
    torch.testing.assert_close(got, x.detach(), rtol=0, atol=0)
    g = _rand(got.shape, torch.float64, seed=3)
    (grad,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(grad, g, rtol=0, atol=0)
