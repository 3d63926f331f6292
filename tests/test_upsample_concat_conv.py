"""upsample_concat_conv2d and its kernel op upsample_shift_add, against eager
PyTorch: F.conv2d over torch.cat of x and the F.interpolate'd branches."""
import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import pyramid_ext as pe
from pyramid_ext import functional as fx

from ._helpers import TOL

ops = torch.ops.pyramid_ext


def _eager(x, branches, weight, bias, size, align_corners, x_first):
    """The concatenating computation, eager PyTorch only."""
    ups = [F.interpolate(b, size=size, mode="bilinear", align_corners=align_corners) for b in branches]
    parts = ([x] + ups if x_first else ups + [x]) if x is not None else ups
    return F.conv2d(torch.cat(parts, 1), weight, bias, padding=weight.shape[-1] // 2)


@contextlib.contextmanager
def forced_plan(mode, chunks=None):
    """Forces every branch onto one strategy: "taps" (tap products and the
    kernel op, whatever the branch's size) or "resize" (resized first and
    convolved with x); `chunks` splits the output channels."""
    saved = fx._FORCED_PLAN
    fx._FORCED_PLAN = {"mode": mode, "chunks": chunks}
    try:
        yield
    finally:
        fx._FORCED_PLAN = saved


def _fmt(cl):
    return torch.channels_last if cl else torch.contiguous_format


def _inputs(n, cx, branch_specs, cout, k, size, dtype, cl=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, cx) + size, generator=g, dtype=torch.float64).to(dtype) if cx else None
    branches = [torch.randn((n, c, h, w), generator=g, dtype=torch.float64).to(dtype) for c, (h, w) in branch_specs]
    cin = cx + sum(c for c, _ in branch_specs)
    weight = (torch.randn((cout, cin, k, k), generator=g, dtype=torch.float64) / (cin * k) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=g, dtype=torch.float64).to(dtype) if bias else None
    if cl:
        x = x.contiguous(memory_format=torch.channels_last) if x is not None else None
        branches = [t.contiguous(memory_format=torch.channels_last) for t in branches]
    return x, branches, weight, b


# Output 7 x 9 and branches of every kind of size: 1x1, bins that do not
# divide, larger than half the output, equal to it, larger than it.
SIZE = (7, 9)
ODD_BRANCHES = [(2, (1, 1)), (3, (3, 4)), (2, (5, 6)), (2, (7, 9)), (3, (8, 11)), (1, (13, 2))]
STRATEGIES = {"auto": None, "taps": ("taps", None), "chunks": ("taps", 3), "resize": ("resize", None)}


def _with_strategy(strategy):
    spec = STRATEGIES[strategy]
    return forced_plan(*spec) if spec else contextlib.nullcontext()


def _scale(t):
    return t.abs().max().item()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("x_mode", ["first", "last", "absent"])
def test_matches_eager_fp64(any_backend, strategy, k, align_corners, x_mode):
    x, br, w, b = _inputs(2, 0 if x_mode == "absent" else 3, ODD_BRANCHES, 4, k, SIZE, torch.float64)
    x_first = x_mode != "last"
    with _with_strategy(strategy):
        got = pe.upsample_concat_conv2d(x, br, w, b, size=SIZE, align_corners=align_corners, x_first=x_first,
                                        backend=any_backend)
    want = _eager(x, br, w, b, SIZE, align_corners, x_first)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * _scale(want))


@pytest.mark.parametrize("small_pixels", [0, fx.SMALL_CONV_PIXELS], ids=["conv-or-bmm", "product"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_1x1_paths(monkeypatch, small_pixels, dtype, cl, bias):
    """functional._conv's 1x1 paths (one product over a small map's pixels; else a
    batched product per NCHW sample, or ATen's convolution) against F.conv2d, layout kept."""
    monkeypatch.setattr(fx, "SMALL_CONV_PIXELS", small_pixels)
    for shape in [(3, 5, 4, 6), (2, 5, 1, 1), (1, 5, 1, 7)]:
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=_fmt(cl))
        w = torch.randn(4, 5, 1, 1, dtype=dtype)
        b = torch.randn(4, dtype=dtype) if bias else None
        got, want = fx._conv(x, w, b, 0), F.conv2d(x, w, b)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, want, **tol)
        assert got.is_contiguous(memory_format=_fmt(cl)) == want.is_contiguous(memory_format=_fmt(cl))


@pytest.mark.parametrize("small_pixels", [0, 1 << 30], ids=["conv-or-bmm", "product"])
def test_matches_eager_every_1x1_path(any_backend, monkeypatch, small_pixels):
    monkeypatch.setattr(fx, "SMALL_CONV_PIXELS", small_pixels)
    for cl, k in itertools.product((False, True), (1, 3)):
        x, br, w, b = _inputs(2, 3, ODD_BRANCHES, 4, k, SIZE, torch.float64, cl=cl)
        got = pe.upsample_concat_conv2d(x, br, w, b, size=SIZE, backend=any_backend)
        want = _eager(x, br, w, b, SIZE, False, True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * _scale(want))


@pytest.mark.parametrize("out_size", [(1, 1), (1, 5), (6, 1), (2, 3)])
def test_tiny_outputs(any_backend, out_size):
    # 1x1 output (every shifted tap outside but the centre one), 1-wide maps
    specs = [(2, (1, 1)), (2, (3, 3)), (1, out_size), (2, (2, 7))]
    for strategy, k in itertools.product(STRATEGIES, (1, 3, 5)):
        x, br, w, b = _inputs(2, 2, specs, 3, k, out_size, torch.float64, seed=k)
        with _with_strategy(strategy):
            got = pe.upsample_concat_conv2d(x, br, w, b, backend=any_backend)
        want = _eager(x, br, w, b, out_size, False, True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * _scale(want))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("strategy", ["auto", "taps", "resize"])
def test_dtypes_and_layouts(any_backend, dtype, cl, strategy):
    size = (17, 13)
    specs = [(16, (1, 1)), (16, (2, 2)), (16, (3, 3)), (16, (6, 6)), (8, (9, 7))]
    x, br, w, b = _inputs(2, 12, specs, 8, 3, size, dtype, cl=cl)
    with _with_strategy(strategy):
        got = pe.upsample_concat_conv2d(x, br, w, b, align_corners=True, backend=any_backend)
    assert got.dtype == dtype
    assert got.is_contiguous(memory_format=_fmt(cl))
    want = _eager(x.double(), [t.double() for t in br], w.double(), b.double(), size, True, True)
    if dtype == torch.float64:
        atol = 1e-12
    elif dtype == torch.float32:
        atol = 1e-5  # of the output scale (the bound)
    else:
        # the tap products and convs round to 16 bits, as the eager 16-bit conv does
        eager16 = _eager(x, br, w, b, size, True, True).double()
        atol = 4 * (eager16 - want).abs().max().item() / _scale(want) + (4e-3 if dtype == torch.float16 else 3e-2)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol * _scale(want))


def test_float32_within_1e5_of_output_scale_larger_maps(any_backend):
    size = (45, 61)
    specs = [(32, (23, 31)), (32, (12, 16)), (32, (6, 8)), (32, (1, 1)), (16, (50, 70))]
    for cl in (False, True):
        x, br, w, b = _inputs(1, 32, specs, 16, 3, size, torch.float32, cl=cl, seed=3)
        got = pe.upsample_concat_conv2d(x, br, w, b, backend=any_backend)
        want = _eager(x.double(), [t.double() for t in br], w.double(), b.double(), size, False, True)
        assert (got.double() - want).abs().max().item() <= 1e-5 * _scale(want)


@pytest.mark.parametrize("strategy", ["auto", "taps", "chunks", "resize"])
@pytest.mark.parametrize("x_mode", ["first", "last", "absent"])
def test_gradcheck(any_backend, strategy, x_mode):
    cx = 0 if x_mode == "absent" else 2
    x, br, w, b = _inputs(2, cx, [(2, (1, 1)), (2, (3, 2)), (1, (5, 4)), (1, (6, 7))], 3, 3, (5, 4),
                          torch.float64)
    leaves = ([x] if x is not None else []) + br + [w, b]
    for t in leaves:
        t.requires_grad_()

    def fn(*args):
        xx = args[0] if x is not None else None
        rest = args[1:] if x is not None else args
        return pe.upsample_concat_conv2d(xx, list(rest[:4]), rest[4], rest[5], size=(5, 4), align_corners=False,
                                         x_first=x_mode != "last", backend=any_backend)

    with _with_strategy(strategy):
        assert torch.autograd.gradcheck(fn, leaves)
        assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("cl", [False, True])
def test_gradients_match_eager(any_backend, cl):
    x, br, w, b = _inputs(2, 4, ODD_BRANCHES, 5, 3, SIZE, torch.float64, cl=cl)
    for strategy in STRATEGIES:
        leaves = [t.detach().clone().requires_grad_() for t in [x, *br, w, b]]
        eager_leaves = [t.detach().clone().requires_grad_() for t in [x, *br, w, b]]
        with _with_strategy(strategy):
            out = pe.upsample_concat_conv2d(leaves[0], leaves[1:-2], leaves[-2], leaves[-1], align_corners=True,
                                            backend=any_backend)
        want = _eager(eager_leaves[0], eager_leaves[1:-2], eager_leaves[-2], eager_leaves[-1], SIZE, True, True)
        g = torch.randn_like(want)
        out.backward(g)
        want.backward(g)
        for got_leaf, want_leaf in zip(leaves, eager_leaves):
            torch.testing.assert_close(got_leaf.grad, want_leaf.grad, rtol=0,
                                       atol=1e-12 * _scale(want_leaf.grad))


# --------------------------------------------------------------------------
# The plan: strategies and the memory rule
# --------------------------------------------------------------------------


def _plan(n, cx, specs, cout, k, size):
    return fx._choose_plan(n, cx, [c for c, _ in specs], [s for _, s in specs], cout, k, *size)


def _peak(plan, n, cx, specs, cout, k, size):
    return fx._plan_peak(plan, n, cx, [c for c, _ in specs], [h * w for _, (h, w) in specs], cout, k,
                         size[0] * size[1])


def test_plan_upernet_and_pspnet():
    upernet = [(512, (64, 64)), (512, (32, 32)), (512, (16, 16))]
    plan = _plan(1, 512, upernet, 512, 3, (128, 128))
    assert plan.taps == [0, 1, 2] and plan.chunks == 1
    assert _peak(plan, 1, 512, upernet, 512, 3, (128, 128)) <= 2048 * 128 * 128
    psp = [(512, (b, b)) for b in (1, 2, 3, 6)]
    plan = _plan(1, 2048, psp, 512, 3, (64, 64))
    assert plan.taps == [0, 1, 2, 3] and plan.chunks == 1


def test_plan_kinds_of_branches():
    # same size: plain conv with x; tiny channel count: resize first; larger: resize first
    specs = [(64, (16, 16)), (64, (8, 8)), (1, (4, 4)), (64, (40, 40))]
    plan = _plan(1, 64, specs, 64, 3, (16, 16))
    assert plan.taps == [1] and sorted(plan.concat) == [0, 2, 3]


def test_plan_chunks_when_tap_products_exceed_the_budget():
    # A 5x5 conv to many channels from few: the tap products of the branch
    # (25 * 256 * h * w) exceed the concatenation (64 channels at H x W).
    specs = [(32, (16, 16))]
    plan = _plan(1, 32, specs, 256, 5, (32, 32))
    budget = 64 * 32 * 32
    assert plan.taps == [0] and plan.chunks > 1
    assert _peak(plan, 1, 32, specs, 256, 5, (32, 32)) <= budget
    assert _peak(fx._ConvPlan([0], [], plan.chunks - 1), 1, 32, specs, 256, 5, (32, 32)) > budget


def test_plan_resizes_first_when_no_chunk_fits():
    # Cheaper as tap products by cost, but one output channel's tap products
    # (49 * 16 * 18) and base already exceed the concatenation (20 * 24 * 24).
    specs = [(20, (16, 18))]
    plan = _plan(1, 0, specs, 600, 7, (24, 24))
    assert plan.taps == [] and plan.concat == [0]
    assert _plan(1, 0, specs, 600, 7, (48, 48)).taps == [0]  # at a larger output it fits


@pytest.mark.parametrize("cl", [False, True])
def test_chunked_plan_is_exact(any_backend, cl):
    # the automatic plan chooses chunks here; every output channel chunk must land where it belongs
    size = (32, 32)
    x, br, w, b = _inputs(1, 32, [(32, (16, 16))], 256, 5, size, torch.float64, cl=cl)
    plan = _plan(1, 32, [(32, (16, 16))], 256, 5, size)
    assert plan.chunks > 1
    got = pe.upsample_concat_conv2d(x, br, w, b, backend=any_backend)
    want = _eager(x, br, w, b, size, False, True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * _scale(want))
    assert got.is_contiguous(memory_format=_fmt(cl))


def test_forced_strategies_are_used(monkeypatch):
    """The strategy tests above test what they claim: the forced plan runs
    the kernel op (taps), or never does (resize)."""
    calls = []
    real = pe.backends.implementation

    class Spy:
        def __init__(self, impl):
            self.impl = impl

        def __getattr__(self, name):
            if name == "upsample_shift_add":
                def op(base, taps, *args):
                    calls.append(len(taps))
                    return self.impl.upsample_shift_add(base, taps, *args)
                return op
            return getattr(self.impl, name)

    monkeypatch.setattr(pe.backends, "implementation", lambda name: Spy(real(name)))
    x, br, w, b = _inputs(1, 2, ODD_BRANCHES, 4, 3, SIZE, torch.float64)
    with forced_plan("taps"):
        pe.upsample_concat_conv2d(x, br, w, b, backend="torch")
    assert calls == [len(br)]
    calls.clear()
    with forced_plan("taps", 3):
        pe.upsample_concat_conv2d(x, br, w, b, backend="torch")
    assert calls == [len(br)] * 2  # 4 channels in chunks of 2
    calls.clear()
    with forced_plan("resize"):
        pe.upsample_concat_conv2d(x, br, w, b, backend="torch")
    assert calls == []


def test_peak_memory_within_the_concatenation():
    """The plan's own account of its temporaries never exceeds the
    concatenation, over many shapes (the rule of docs/DESIGN.md)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 3, (1,), generator=g))
        size = tuple(int(v) for v in torch.randint(1, 40, (2,), generator=g))
        k = [1, 3, 5, 7][int(torch.randint(0, 4, (1,), generator=g))]
        cx = int(torch.randint(0, 64, (1,), generator=g))
        specs = [(int(torch.randint(0, 128, (1,), generator=g)),
                  tuple(int(v) for v in torch.randint(1, 48, (2,), generator=g)))
                 for _ in range(int(torch.randint(1, 5, (1,), generator=g)))]
        cout = int(torch.randint(1, 600, (1,), generator=g))
        plan = _plan(n, cx, specs, cout, k, size)
        budget = n * (cx + sum(c for c, _ in specs)) * size[0] * size[1]
        assert _peak(plan, n, cx, specs, cout, k, size) <= budget, (n, cx, specs, cout, k, size, plan)


# --------------------------------------------------------------------------
# The kernel op
# --------------------------------------------------------------------------


def _op_eager(base, taps, k, align_corners):
    """upsample_shift_add by its definition, in fp64: per tap, F.interpolate,
    then out[y, x] += up[y + a - p, x + c - p] inside the map (a zero-padded
    copy of up, sliced)."""
    out = base.double().clone()
    cout, height, width = base.shape[1:]
    p = k // 2
    for t in taps:
        for a in range(k):
            for c in range(k):
                first = (a * k + c) * cout
                up = F.interpolate(t[:, first : first + cout].double(), size=(height, width), mode="bilinear",
                                   align_corners=align_corners)
                padded = up.new_zeros(up.shape[:2] + (height + 2 * p, width + 2 * p))
                padded[:, :, p : p + height, p : p + width] = up
                out = out + padded[:, :, a : a + height, c : c + width]
    return out


def _op_args(k, dtype, cl_base, cl_taps, sizes=((1, 1), (3, 4), (5, 7), (8, 11), (2, 13)), n=2, cout=3,
             out=(5, 7)):
    g = torch.Generator().manual_seed(k)
    base = torch.randn((n, cout) + out, generator=g, dtype=torch.float64).to(dtype)
    taps = [torch.randn((n, k * k * cout, h, w), generator=g, dtype=torch.float64).to(dtype) for h, w in sizes]
    base = base.contiguous(memory_format=_fmt(cl_base))
    taps = [t.contiguous(memory_format=_fmt(cl)) for t, cl in zip(taps, itertools.cycle([cl_taps]))]
    return base, taps


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("cl_base", [False, True])
@pytest.mark.parametrize("cl_taps", [False, True])
def test_op_against_definition(any_backend, k, align_corners, cl_base, cl_taps):
    base, taps = _op_args(k, torch.float64, cl_base, cl_taps)
    impl = pe.backends.implementation(pe.backends.resolve(any_backend, base.device, "upsample_shift_add"))
    got = impl.upsample_shift_add(base, taps, k, align_corners)
    assert got.stride() == base.stride() and got.dtype == base.dtype
    torch.testing.assert_close(got, _op_eager(base, taps, k, align_corners), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
def test_op_16bit_accumulates_in_float(backend, dtype, cl):
    base, taps = _op_args(3, dtype, cl, cl)
    got = ops.upsample_shift_add(base, taps, 3, False)
    want = _op_eager(base, taps, 3, False)  # exact sums of the rounded inputs
    # one rounding of the result (plus float accumulation)
    eps = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=eps, atol=eps * _scale(want))


def test_op_empty_taps_copies_base(any_backend):
    base, _ = _op_args(3, torch.float32, False, False)
    impl = pe.backends.implementation(pe.backends.resolve(any_backend, base.device, "upsample_shift_add"))
    got = impl.upsample_shift_add(base, [], 3, False)
    assert torch.equal(got, base) and got.data_ptr() != base.data_ptr()


@pytest.mark.parametrize("cl_grad", [False, True])
@pytest.mark.parametrize("cl_taps", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_op_backward_against_autograd_of_definition(backend, cl_grad, cl_taps, k):
    base, taps = _op_args(k, torch.float64, cl_grad, cl_taps)
    g = torch.randn(base.shape, dtype=torch.float64).contiguous(memory_format=_fmt(cl_grad))
    shapes = [v for t in taps for v in t.shape[-2:]]
    got = ops.upsample_shift_add_backward(g, shapes, k, True, [cl_taps] * len(taps))
    leaves = [t.detach().requires_grad_() for t in taps]
    want = torch.autograd.grad(_op_eager(base, leaves, k, True), leaves, g)
    for a, b in zip(got, want):
        assert a.is_contiguous(memory_format=_fmt(cl_taps))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_op_backward_long_sums_precise(backend):
    # a 1x1 tap map's gradient sums the whole (shifted) plane: float runs + double
    g = torch.rand(1, 2, 700, 700)
    got = ops.upsample_shift_add_backward(g, [1, 1, 2, 3], 3, False, [False, False])
    want = ops.upsample_shift_add_backward(g.double(), [1, 1, 2, 3], 3, False, [False, False])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=0)
    cl = g.contiguous(memory_format=torch.channels_last)
    got = ops.upsample_shift_add_backward(cl, [1, 1, 2, 3], 3, False, [True, True])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=0)


def test_op_bitwise_deterministic_across_thread_counts(backend):
    base, taps = _op_args(3, torch.float32, False, False, sizes=((3, 3), (9, 10), (21, 33)), n=3, cout=16,
                          out=(19, 29))
    cl_base, cl_taps = _op_args(3, torch.float32, True, True, sizes=((3, 3), (9, 10), (21, 33)), n=3, cout=16,
                                out=(19, 29))
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            r = []
            for b, t in ((base, taps), (cl_base, cl_taps)):
                r.append(ops.upsample_shift_add(b, t, 3, False))
                shapes = [v for tt in t for v in tt.shape[-2:]]
                r += ops.upsample_shift_add_backward(b, shapes, 3, False, [b.stride(1) == 1] * len(t))
            results.append(r)
    finally:
        torch.set_num_threads(saved)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


@pytest.mark.parametrize("cl", [False, True])
def test_opcheck_upsample_shift_add(backend, cl):
    base, taps = _op_args(3, torch.float64, cl, not cl, sizes=((1, 1), (3, 2), (6, 9)))
    base.requires_grad_()
    for t in taps:
        t.requires_grad_()
    torch.library.opcheck(ops.upsample_shift_add.default, (base, taps, 3, False))
    torch.library.opcheck(ops.upsample_shift_add.default, (base, taps[:1], 3, True))


def test_opcheck_upsample_shift_add_backward(backend):
    g = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.upsample_shift_add_backward.default, (g, [1, 1, 3, 2, 6, 9], 3, False,
                                                                    [False, True, False]))


def test_op_double_backward_is_the_forward(backend):
    base, taps = _op_args(3, torch.float64, False, False, sizes=((2, 3), (6, 9)))
    g = torch.randn(base.shape, dtype=torch.float64, requires_grad=True)
    shapes = [v for t in taps for v in t.shape[-2:]]
    fn = lambda grad: ops.upsample_shift_add_backward(grad, shapes, 3, False, [False, False])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (g,))
    assert torch.autograd.gradgradcheck(fn, (g,))


@pytest.mark.parametrize("case", [
    ("base-3d", lambda b, t: (b[0], t, 3), ValueError, r"base must be a 4-D"),
    ("base-int", lambda b, t: (b.long(), t, 3), TypeError, r"base must be float64, float32"),
    ("base-zero-h", lambda b, t: (b[:, :, :0], t, 3), ValueError, r"base must have non-zero height"),
    ("kernel-even", lambda b, t: (b, t, 2), ValueError, r"kernel_size must be odd and positive, got 2"),
    ("kernel-zero", lambda b, t: (b, t, 0), ValueError, r"kernel_size must be odd and positive"),
    ("tap-3d", lambda b, t: (b, [t[0][0]], 3), ValueError, r"taps\[0\] must be a 4-D"),
    ("tap-batch", lambda b, t: (b, [t[0][:1]], 3), ValueError, r"taps\[0\] has batch size 1 but base has 2"),
    ("tap-channels", lambda b, t: (b, [t[0], t[1][:, :5]], 3), ValueError, r"taps\[1\] has 5 channels, expected"),
    ("tap-kernel-mismatch", lambda b, t: (b, t, 1), ValueError, r"taps\[0\] has 27 channels, expected .* 3"),
    ("tap-dtype", lambda b, t: (b, [t[0].double()], 3), TypeError, r"taps\[0\] has dtype"),
], ids=lambda c: c[0])
def test_op_bad_input(any_backend, case):
    _, make, exc, match = case
    base, taps = _op_args(3, torch.float32, False, False, sizes=((2, 2), (3, 3)))
    impl = pe.backends.implementation(pe.backends.resolve(any_backend, base.device, "upsample_shift_add"))
    with pytest.raises(exc, match=match) as info:
        impl.upsample_shift_add(*make(base, taps), False)
    assert type(info.value) is exc


# --------------------------------------------------------------------------
# torch.compile, autocast, backends
# --------------------------------------------------------------------------


def _head(backend_name):
    def fn(x, b0, b1, w, b):
        return pe.upsample_concat_conv2d(x, [b0, b1], w, b, align_corners=True, backend=backend_name)

    return fn


def _head_inputs(h, w, requires_grad=False):
    x, br, wt, b = _inputs(2, 3, [(8, (1, 1)), (8, (max(1, h // 2), max(1, w // 3)))], 4, 3, (h, w),
                           torch.float32, seed=h * 100 + w)
    leaves = [x, *br, wt, b]
    return [t.requires_grad_(requires_grad) for t in leaves]


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_compile_fullgraph(backend_name):
    torch._dynamo.reset()
    # The torch backend's backward (resize backward of 1x1 tap maps) makes
    # Inductor's CPU codegen (torch 2.13) assert on an atomic_add scatter;
    # it is traced and run through aot_eager instead.
    compile_backend = "aot_eager" if backend_name == "torch" else "inductor"
    fn = torch.compile(_head(backend_name), backend=compile_backend, fullgraph=True)
    leaves = _head_inputs(13, 17, requires_grad=True)
    out = fn(*leaves)
    want = _eager(leaves[0], leaves[1:3], leaves[3], leaves[4], (13, 17), True, True)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    for a, b in zip(grads, want_grads):  # float32 sums over N * H * W: relative to the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * _scale(b))


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_compile_dynamic(backend_name):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    fn = torch.compile(_head(backend_name), backend=counter, fullgraph=True, dynamic=True)
    for h, w in [(13, 17), (20, 31), (33, 47)]:
        leaves = _head_inputs(h, w)
        want = _eager(leaves[0], leaves[1:3], leaves[3], leaves[4], (h, w), True, True)
        torch.testing.assert_close(fn(*leaves), want, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1, f"recompiled {counter.frame_count} times"
    # and with autograd through aot_eager
    torch._dynamo.reset()
    fn = torch.compile(_head(backend_name), backend="aot_eager", fullgraph=True, dynamic=True)
    for h, w in [(13, 17), (24, 19)]:
        leaves = _head_inputs(h, w, requires_grad=True)
        grads = torch.autograd.grad(fn(*leaves).square().sum(), leaves)
        want = _eager(leaves[0], leaves[1:3], leaves[3], leaves[4], (h, w), True, True)
        want_grads = torch.autograd.grad(want.square().sum(), leaves)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * _scale(b))


@pytest.mark.parametrize("strategy", ["auto", "taps", "resize"])
def test_cpu_autocast_bfloat16(any_backend, strategy):
    x, br, w, b = _inputs(2, 8, [(16, (1, 1)), (16, (3, 3)), (16, (6, 6))], 8, 3, (12, 12), torch.float32)
    with _with_strategy(strategy), torch.autocast("cpu", dtype=torch.bfloat16):
        got = pe.upsample_concat_conv2d(x, br, w, b, backend=any_backend)
        eager = _eager(x, br, w, b, (12, 12), False, True)
    assert got.dtype == eager.dtype == torch.bfloat16
    want = _eager(x.double(), [t.double() for t in br], w.double(), b.double(), (12, 12), False, True)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2 * _scale(want))


def test_backends_agree_and_named_backend_is_used():
    x, br, w, b = _inputs(2, 4, ODD_BRANCHES, 5, 3, SIZE, torch.float64)
    with forced_plan("taps"):
        got = {name: pe.upsample_concat_conv2d(x, br, w, b, backend=name) for name in pe.available_backends("cpu")}
    for name, out in got.items():
        torch.testing.assert_close(out, got["torch"], rtol=0, atol=1e-12 * _scale(out))


def test_onnx_export_path_is_the_concatenation(monkeypatch):
    from pyramid_ext import export

    monkeypatch.setattr(export, "active", lambda: True)
    x, br, w, b = _inputs(1, 2, [(2, (3, 3))], 3, 3, (6, 6), torch.float64)
    got = pe.upsample_concat_conv2d(x, br, w, b)
    torch.testing.assert_close(got, _eager(x, br, w, b, (6, 6), False, True))


def test_tap_weights_made_one_at_a_time():
    """A K > 1 kernel's tap weights are copies (K*K*Cout x Cb): they are made one branch at a time,
    each freed after its product, so the peak holds about one of them (the PSPNet head's 3x3
    conv 4096 -> 512 has 9 MiB each; all four at once had raised its forward's peak from 18 to
    45 MB). Peak of the allocator's running total over one forward (torch.profiler)."""
    from pyramid_ext import model_bench

    torch.manual_seed(0)
    x = torch.randn(1, 64, 16, 16)
    branches = [torch.randn(1, 64, b, b) for b in (1, 2, 3, 6)]
    weight = torch.randn(256, 320, 3, 3)

    def forward():
        with torch.no_grad():
            pe.upsample_concat_conv2d(x, branches, weight, None)

    forward()
    tap_weight_mb = 9 * 256 * 64 * 4 / 2 ** 20
    assert model_bench.peak_memory_mb(forward) < 1.5 * tap_weight_mb
