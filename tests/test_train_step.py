"""The training step of the pyramid modules: x's gradient written once.

x feeds both the pooling and the concatenation; the fused modules route x
through the pooling node (pyramid_ext/_pool_through.py), whose backward is
one ``multi_pool2d_backward(..., addend=<grad_out's x slice>)`` call. Checked:
the op's addend (equal to ``addend + op(...)`` bit for bit, every dtype,
layout and stride pattern), the module's gradients against eager PPM (fp64,
fp32), that no ``aten::add`` and one backward kernel call produce x's
gradient (fails on the old two-node path), double backward, torch.compile.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.profiler import ProfilerActivity, profile

import pyramid_ext as pe
from pyramid_ext import backends
from pyramid_ext.windows import pyramid_windows

from ._helpers import DTYPES, layout
from .conftest import need_backend


def _need(name):
    if name == "triton" and not (backends.triton_installed() and backends.triton_interpret()):
        pytest.skip("Triton runs here only under TRITON_INTERPRET=1 (the CUDA-environment CI step runs this file)")
    need_backend(name)
    if name == "triton":
        import pyramid_ext.triton  # noqa: F401  (registers the *_triton ops)
    return name


@pytest.fixture(params=["cpp", "triton"])
def op_backend(request):
    """The backends with a backward op (the torch backend differentiates PyTorch's ops)."""
    return _need(request.param)


def _backward_op(backend):
    if backend == "cpp":
        return torch.ops.pyramid_ext.multi_pool2d_backward.default
    return torch.ops.pyramid_ext.multi_pool2d_backward_triton.default


def _forward_op(backend):
    if backend == "cpp":
        return torch.ops.pyramid_ext.multi_pool2d.default
    return torch.ops.pyramid_ext.multi_pool2d_triton.default


class EagerPPM(torch.nn.Module):
    """hszhao/semseg's PPM forward on PyTorch's own ops, sharing the layers."""

    def __init__(self, ppm):
        super().__init__()
        self.features = ppm.features

    def forward(self, x):
        size = x.shape[-2:]
        return torch.cat([x] + [F.interpolate(f(x), size, mode="bilinear", align_corners=True)
                                for f in self.features], 1)


def _addends(shape, kind, dtype, seed=1):
    """x-shaped addends with the strides the training step hands over (a
    channel slice of a bigger NCHW / channels_last gradient), plus odd ones."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(n, c + 5, h, w, generator=g).to(dtype)
    return {
        "dense": layout(torch.randn(shape, generator=g).to(dtype), kind),
        "slice_nchw": big[:, 2:2 + c],
        "slice_channels_last": big.contiguous(memory_format=torch.channels_last)[:, 3:3 + c],
        "transposed": torch.randn(n, c, w, h, generator=g).to(dtype).transpose(2, 3),
        "expanded": torch.randn(1, c, 1, w, generator=g).to(dtype).expand(shape),
    }


# --------------------------------------------------------------------------
# The op: multi_pool2d_backward(..., addend)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", [0, 1])
def test_addend_equals_sum_bit_for_bit(op_backend, dtype, kind, mode):
    shape = (2, 5, 9, 7)
    x = layout(torch.randn(shape).to(dtype), kind)
    cl = kind == "channels_last"
    hb, wb, lb = pyramid_windows(9, 7, [(1, 1), (2, 2), (3, 3), (2, 5)], "adaptive")
    values, indices = _forward_op(op_backend)(x, hb, wb, lb, mode, cl)
    grad = torch.randn(values.shape).to(dtype)
    idx = indices if mode == 1 else None
    op = _backward_op(op_backend)
    plain = op(grad, idx, list(shape), hb, wb, lb, mode, cl, cl)
    for name, addend in _addends(shape, kind, dtype).items():
        got = op(grad, idx, list(shape), hb, wb, lb, mode, cl, cl, addend)
        assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format), name
        torch.testing.assert_close(got, addend + plain, rtol=0, atol=0, msg=name)


def test_addend_with_uncovered_pixels_and_negative_zero(op_backend):
    """Pixels no window covers get the addend plus zero (so -0.0 becomes +0.0, as in addend + grad)."""
    op = _backward_op(op_backend)
    hb, wb, lb = [1, 3], [0, 2], [1, 1]  # one window: rows 1-2, columns 0-1 of a 5x4 map
    grad = torch.randn(2, 3)
    for cl in (False, True):
        addend = layout(torch.randn(2, 3, 5, 4), "channels_last" if cl else "nchw")
        addend[:, :, 4, 3] = -0.0
        got = op(grad, None, [2, 3, 5, 4], hb, wb, lb, 0, False, cl, addend)
        want = addend + op(grad, None, [2, 3, 5, 4], hb, wb, lb, 0, False, cl)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.signbit(got[:, :, 4, 3]).any()


@pytest.mark.parametrize("bad, message", [
    (lambda a: a[:, :2], "addend must have input_shape"),
    (lambda a: a.double(), "addend has dtype"),
])
def test_addend_bad_input_names_the_argument(op_backend, bad, message):
    op = _backward_op(op_backend)
    hb, wb, lb = pyramid_windows(6, 6, [(2, 2)], "adaptive")
    grad = torch.randn(1, 3 * 4)
    with pytest.raises(RuntimeError, match=message):
        op(grad, None, [1, 3, 6, 6], hb, wb, lb, 0, False, False, bad(torch.randn(1, 3, 6, 6)))


def test_opcheck_with_addend():
    need_backend("cpp")
    hb, wb, lb = pyramid_windows(11, 7, [(1, 1), (2, 2), (3, 3)], "adaptive")
    x = torch.randn(2, 3, 11, 7, dtype=torch.float64)
    for mode in (0, 1):
        values, indices = torch.ops.pyramid_ext.multi_pool2d(x, hb, wb, lb, mode, False)
        grad = torch.randn_like(values)
        addend = torch.randn(2, 5, 11, 7, dtype=torch.float64)[:, 1:4]
        torch.library.opcheck(torch.ops.pyramid_ext.multi_pool2d_backward.default,
                              (grad, indices if mode == 1 else None, list(x.shape), hb, wb, lb, mode, False, False,
                               addend))


def test_addend_op_gradgradcheck():
    """The op's derivatives with respect to grad and addend (fp64 finite differences)."""
    need_backend("cpp")
    hb, wb, lb = pyramid_windows(5, 4, [(1, 1), (2, 2)], "adaptive")
    op = torch.ops.pyramid_ext.multi_pool2d_backward

    def fn(grad, addend):
        return op(grad, None, [2, 3, 5, 4], hb, wb, lb, 0, False, False, addend)

    grad = torch.randn(2, 3 * 5, dtype=torch.float64, requires_grad=True)
    addend = torch.randn(2, 7, 5, 4, dtype=torch.float64)[:, 2:5].detach().requires_grad_()
    assert gradcheck(fn, (grad, addend))
    assert gradgradcheck(fn, (grad, addend))


# --------------------------------------------------------------------------
# The module: pe.nn.PPM's training step
# --------------------------------------------------------------------------


def _ppm_pair(c, reduction, bins, dtype, kind):
    torch.manual_seed(0)
    fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    ppm = pe.nn.PPM(c, reduction, bins).to(dtype=dtype, memory_format=fmt).train()
    with torch.no_grad():  # BatchNorm's affine parameters away from 1 / 0
        for m in ppm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return ppm, EagerPPM(ppm)


def _train_grads(module, x, grad, params, backend=None):
    state = {k: v.clone() for k, v in module.state_dict().items()}  # running stats: both see the same
    ctx = pe.use_backend(backend) if backend else torch.enable_grad()
    with ctx:
        out = module(x)
        grads = torch.autograd.grad(out, [x] + params, grad)
    module.load_state_dict(state)
    return [out] + list(grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_ppm_gradients_equal_eager(op_backend, dtype, kind):
    ppm, eager = _ppm_pair(6, 3, (1, 2, 3, 6), dtype, kind)
    x = layout(torch.randn(2, 6, 13, 11, dtype=dtype), kind).requires_grad_()
    grad = layout(torch.randn(2, 6 + 4 * 3, 13, 11, dtype=dtype), kind)
    params = list(ppm.parameters())
    got = _train_grads(ppm, x, grad, params, op_backend)
    want = _train_grads(eager, x, grad, params)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    assert got[1].is_contiguous(memory_format=torch.channels_last if kind == "channels_last"
                                else torch.contiguous_format)


def _profiled_ppm_backward(kind):
    """(profiler events of the backward, x's gradient, grad_out) of a small
    compiled-backend PPM, x of (2, 8, 12, 10)."""
    need_backend("cpp")
    ppm, _ = _ppm_pair(8, 2, (1, 2, 3, 6), torch.float32, kind)
    x = layout(torch.randn(2, 8, 12, 10), kind).requires_grad_()
    out = ppm(x)
    grad = torch.randn_like(out)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        (gx,) = torch.autograd.grad(out, [x], grad)
    return prof.events(), gx, grad


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_ppm_x_gradient_is_one_kernel_call(kind):
    """x's gradient comes from one multi_pool2d_backward call: no aten::add of
    two x-sized gradients in the backward and no copy of grad_out's x slice.
    (The two-node path ran an aten::add of the slice and the pooling gradient.)"""
    events, gx, grad = _profiled_ppm_backward(kind)
    x_shape = [2, 8, 12, 10]
    adds = [e.name for e in events if e.name in ("aten::add", "aten::add_") and x_shape in e.input_shapes]
    copies = [e.name for e in events if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and x_shape in e.input_shapes]
    pool_bwd = [e for e in events if e.name == "pyramid_ext::multi_pool2d_backward"]
    assert adds == [] and copies == []
    assert len(pool_bwd) == 1
    # grad_x is the pooling backward's own result (x-sized, fresh), not a view of grad_out.
    assert gx.untyped_storage().data_ptr() != grad.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_ppm_level_gradients_packed_once(kind):
    """The levels are outputs of the pooling node, whose backward packs their
    gradients once, each copied into its level's view of one buffer: no
    packed-sized zero fill, slice_backward, add or cat (levels sliced outside
    the node sent back one zero-filled packed gradient each, summed by autograd)."""
    events, _, _ = _profiled_ppm_backward(kind)
    packed = [2, 8 * (1 + 4 + 9 + 36)]
    extra = [e.name for e in events if packed in e.input_shapes
             and e.name in ("aten::fill_", "aten::zero_", "aten::add", "aten::add_", "aten::slice_backward")]
    assert extra == []
    assert [e for e in events if e.name == "aten::cat"] == []
    copies = [e.input_shapes[0] for e in events if e.name == "aten::copy_" and e.input_shapes
              and e.input_shapes[0] in [[2, 8, b, b] for b in (1, 2, 3, 6)]]
    assert all([2, 8, b, b] in copies for b in (1, 2, 3, 6)), copies  # each level's gradient into its view


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_pool_handing_on_x_some_levels_unused(kind):
    """A level whose output is not used gets no gradient (None): its block of
    the packed gradient is zeros, the others are where functional._unpack reads them."""
    need_backend("cpp")
    from pyramid_ext._pool_through import avg_pool_handing_on_x

    bins = [(1, 1), (2, 2), (3, 3), (2, 3)]
    x = layout(torch.randn(2, 5, 9, 7, dtype=torch.float64), kind).requires_grad_()
    weights = [torch.randn(2, 5, bh, bw, dtype=torch.float64) for bh, bw in bins]

    def loss(levels, x_cat):
        return (levels[1] * weights[1]).sum() + (levels[3] * weights[3]).sum() + x_cat.pow(2).sum()

    levels, x_through = avg_pool_handing_on_x(x, bins)
    assert x_through.grad_fn is not None
    (got,) = torch.autograd.grad(loss(levels, x_through), x)
    want_levels = [F.adaptive_avg_pool2d(x, b) for b in bins]
    (want,) = torch.autograd.grad(loss(want_levels, x), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for level, w in zip(levels, want_levels):
        torch.testing.assert_close(level, w, rtol=1e-12, atol=1e-12)


def test_pool_handing_on_x_level_modified_in_place():
    """The levels are not autograd views of one buffer: a tail may modify one in place."""
    need_backend("cpp")
    from pyramid_ext._pool_through import avg_pool_handing_on_x

    bins = [(1, 1), (2, 2), (3, 3)]
    x = torch.randn(2, 4, 8, 6, dtype=torch.float64, requires_grad=True)
    # (The levels share one version counter, as views of one buffer do: one
    # level modified in place, after the others' uses are recorded.)
    levels, x_through = avg_pool_handing_on_x(x, bins)
    levels[1].mul_(2).relu_()
    loss = sum((level * (i + 1)).sum() for i, level in enumerate(levels)) + x_through.sum()
    (got,) = torch.autograd.grad(loss, x)
    want_levels = [F.adaptive_avg_pool2d(x, b) for b in bins]
    want_levels[1] = (want_levels[1] * 2).relu()
    want_loss = sum((level * (i + 1)).sum() for i, level in enumerate(want_levels)) + x.sum()
    (want,) = torch.autograd.grad(want_loss, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_ppm_without_x_grad_or_branch_grads():
    """Only one of the node's two outputs carries a gradient: still right."""
    need_backend("cpp")
    ppm, eager = _ppm_pair(4, 2, (1, 3), torch.float64, "nchw")
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64, requires_grad=True)
    # x slice unused: the gradient flows only through the branches.
    for fn in (lambda m: m(x)[:, 4:].sum(), lambda m: m(x)[:, :4].pow(2).sum()):
        (got,) = torch.autograd.grad(fn(ppm), x)
        (want,) = torch.autograd.grad(fn(eager), x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_ppm_gradgradcheck(backend):
    need_backend(backend)
    torch.manual_seed(0)
    ppm = pe.nn.PPM(3, 2, (1, 2, 3)).double().eval()  # eval: BatchNorm is affine, its 2nd derivative exact
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    with pe.use_backend(backend):
        assert gradgradcheck(ppm, (x,), fast_mode=True)
        ppm.train()
        assert gradgradcheck(ppm, (x,), fast_mode=True)


def test_ppm_second_order_equals_eager():
    """A gradient penalty through x (create_graph) equals eager PPM's."""
    need_backend("cpp")
    ppm, eager = _ppm_pair(4, 2, (1, 2, 3), torch.float64, "nchw")
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    params = list(ppm.parameters())

    def penalty(m):
        state = {k: v.clone() for k, v in m.state_dict().items()}
        (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
        grads = torch.autograd.grad(gx.pow(2).sum(), [x] + params)
        m.load_state_dict(state)
        return grads

    for g, w in zip(penalty(ppm), penalty(eager)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_ppm_compile_fullgraph_dynamic(compile_backend):
    need_backend("cpp")
    torch._dynamo.reset()
    ppm, eager = _ppm_pair(4, 2, (1, 2, 3, 6), torch.float32, "nchw")
    params = list(ppm.parameters())
    compiled = torch.compile(ppm, fullgraph=True, dynamic=True, backend=compile_backend)
    for shape in ((2, 4, 9, 8), (3, 4, 12, 7)):
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape[0], 4 + 8, shape[2], shape[3])
        got = _train_grads(compiled, x, grad, params)
        want = _train_grads(eager, x, grad, params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
