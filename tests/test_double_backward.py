"""Second (and third) derivatives of every op, every backend.

The backward ops are linear in the incoming gradient and are the adjoints of
the forward ops, so their derivatives are the forward ops again (pooling for
avg, a gather through the recorded indices for max, a resize for the
upsampling). Checked two ways: fp64 ``gradgradcheck`` (analytic against
finite differences), and gradient-penalty / Hessian-vector products compared
with the same computation through PyTorch's own ops.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import pyramid_ext as pe
from pyramid_ext import backends

from .conftest import layout, need_backend

def _need(name):
    if name == "triton" and not (backends.triton_installed() and backends.triton_interpret()):
        pytest.skip("Triton runs here only under TRITON_INTERPRET=1 (the CUDA-environment CI step runs this file)")
    need_backend(name)
    return name


# gradgradcheck calls the kernels thousands of times: too slow for Triton's
# interpreter, which gets the cheap checks below and fast-mode gradgradchecks.
@pytest.fixture(params=["cpp", "torch"])
def backend(request):
    return _need(request.param)


@pytest.fixture(params=["cpp", "torch", "triton"])
def every_backend(request):
    return _need(request.param)


def _x(shape, kind="nchw", seed=0):
    g = torch.Generator().manual_seed(seed)
    # Distinct values (no ties), so max pooling is differentiable at the point.
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    return layout(x, kind).requires_grad_(True)


def _flat(levels):
    return torch.cat([t.flatten(1) for t in levels], 1)


# --------------------------------------------------------------------------
# gradgradcheck
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("window", ["adaptive", "sppnet", "keras_same"])
def test_avg_pool_gradgrad(backend, kind, window):
    x = _x((1, 3, 9, 6) if window == "sppnet" else (1, 3, 7, 5), kind)
    bins = (1, 2, 3, 6) if window == "adaptive" else (1, 2, 3)
    fn = lambda t: _flat(pe.multi_adaptive_avg_pool2d(t, bins, window=window, backend=backend))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("window", ["adaptive", "sppnet"])
def test_max_pool_gradgrad(backend, kind, window):
    x = _x((1, 2, 9, 6), kind)
    bins = ((1, 1), (2, 3), (4, 4), (7, 6)) if window == "adaptive" else (1, 2, 3)
    fn = lambda t: _flat(pe.multi_adaptive_max_pool2d(t, bins, window=window, backend=backend))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_spatial_pyramid_pool_gradgrad(backend, mode, kind):
    x = _x((2, 4, 8, 5), kind)
    fn = lambda t: pe.spatial_pyramid_pool(t, (4, 2, 1), mode=mode, backend=backend)
    assert gradgradcheck(fn, (x,))


def test_unbatched_pool_gradgrad(backend):
    x = _x((3, 5, 4))
    fn = lambda t: _flat([v.unsqueeze(0) for v in pe.multi_adaptive_avg_pool2d(t, (1, 3), backend=backend)])
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("has_x", [True, False])
@pytest.mark.parametrize("x_first", [True, False])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_upsample_concat_gradgrad(backend, has_x, x_first, align_corners, kind):
    size = (7, 5)
    x = _x((2, 3, *size), kind) if has_x else None
    # Smaller, equal and larger than the output, non-divisible.
    branches = [_x((2, c, h, w), kind, seed=i + 1) for i, (c, h, w) in enumerate([(2, 1, 1), (1, 3, 2), (2, 9, 11)])]
    inputs = ([x] if has_x else []) + branches

    def fn(*ts):
        xx = ts[0] if has_x else None
        bs = list(ts[1:] if has_x else ts)
        return pe.upsample_concat(xx, bs, size=size, align_corners=align_corners, x_first=x_first,
                                  backend=backend)

    assert gradgradcheck(fn, inputs)


def test_upsample_concat_gradgrad_unused_branch_grad(backend):
    """A second derivative where only some branch gradients reach the loss
    (the other incoming gradients of the backward are None)."""
    x = _x((1, 2, 6, 6))
    b0, b1 = _x((1, 2, 2, 2), seed=1), _x((1, 1, 3, 3), seed=2)

    def fn(x, b0, b1):
        out = pe.upsample_concat(x, [b0, b1], backend=backend)
        (g0,) = torch.autograd.grad(out.pow(2).sum(), [b0], create_graph=True)
        return g0

    assert gradcheck(fn, (x, b0, b1))


def test_third_derivative(backend):
    """gradgradcheck of the gradient itself: derivatives of order three."""
    x = _x((1, 2, 5, 4))
    b = _x((1, 2, 2, 3), seed=3)

    def grad_fn(x, b):
        pooled = _flat(pe.multi_adaptive_avg_pool2d(x, (1, 2, 3), backend=backend))
        out = pe.upsample_concat(x, [b], align_corners=False, backend=backend)
        loss = pooled.pow(3).sum() + out.pow(3).sum()
        return torch.autograd.grad(loss, (x, b), create_graph=True)

    assert gradgradcheck(grad_fn, (x, b))


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_gradgrad_fast_every_backend(every_backend, mode):
    x = _x((1, 2, 7, 5), "channels_last")
    fn = lambda t: pe.spatial_pyramid_pool(t, (3, 2, 1), mode=mode, backend=every_backend)
    assert gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_concat_gradgrad_fast_every_backend(every_backend, align_corners):
    x = _x((1, 2, 5, 4))
    branches = [_x((1, 2, 2, 3), seed=1), _x((1, 1, 7, 6), seed=2)]
    fn = lambda x, *bs: pe.upsample_concat(x, list(bs), align_corners=align_corners, x_first=False,
                                           backend=every_backend)
    assert gradgradcheck(fn, (x, *branches), fast_mode=True)


# --------------------------------------------------------------------------
# Against PyTorch's own ops: gradient penalties and Hessian-vector products
# --------------------------------------------------------------------------


def _penalty_grads(fn, inputs):
    """d/dinputs of sum(grad(sum(fn(inputs)^2))^2): a second-order quantity."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
    return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_pool_penalty_matches_pytorch(every_backend, dtype, mode, kind):
    backend = every_backend
    bins = (1, 2, 3, 6)
    x = _x((2, 5, 13, 10), kind).detach().to(dtype).requires_grad_(True)
    eager_pool = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
    fused = pe.multi_adaptive_avg_pool2d if mode == "avg" else pe.multi_adaptive_max_pool2d
    (got,) = _penalty_grads(lambda t: _flat(fused(t, bins, backend=backend)), (x,))
    (want,) = _penalty_grads(lambda t: _flat([eager_pool(t, b) for b in bins]), (x,))
    scale = want.abs().max().item()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
def test_upsample_concat_penalty_matches_pytorch(every_backend, dtype, align_corners, x_first):
    backend = every_backend
    size = (11, 9)
    x = _x((2, 3, *size)).detach().to(dtype).requires_grad_(True)
    branches = [_x((2, c, h, w), seed=i + 1).detach().to(dtype).requires_grad_(True)
                for i, (c, h, w) in enumerate([(2, 1, 1), (3, 4, 3), (1, 13, 17)])]

    def fused(x, *bs):
        return pe.upsample_concat(x, list(bs), align_corners=align_corners, x_first=x_first, backend=backend)

    def eager(x, *bs):
        ups = [F.interpolate(b, size=size, mode="bilinear", align_corners=align_corners) for b in bs]
        return torch.cat([x] + ups if x_first else ups + [x], 1)

    got = _penalty_grads(fused, (x, *branches))
    want = _penalty_grads(eager, (x, *branches))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=tol * w.abs().max().item())


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


def _module_penalty(module, x, backend):
    """Second-order gradients of a module w.r.t. its input and parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    with pe.use_backend(backend):
        return _penalty_grads(lambda x, *ps: module(x), (x, *params))


def _check_module(module, x, backend):
    """gradgradcheck in x (fast mode: random projections, the full Jacobian of
    every parameter is too slow), and every second-order parameter gradient
    against the same module on PyTorch's own ops (the torch backend calls
    F.adaptive_avg_pool2d / F.interpolate for these windows)."""
    module = module.double()
    with pe.use_backend(backend):
        assert gradgradcheck(module, (x,), fast_mode=True)
    got = _module_penalty(module, x, backend)
    want = _module_penalty(module, x, "torch")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10 * max(w.abs().max().item(), 1.0))


@pytest.mark.parametrize("preset", ["gn", "paper", "smp_eval"])
def test_pyramid_pooling_module_gradgrad(backend, preset):
    torch.manual_seed(0)
    if preset == "gn":
        m = pe.nn.PyramidPooling(4, 2, (1, 2, 3), norm="gn", gn_groups=1, act=torch.nn.Tanh, out_channels=3,
                                 out_kernel_size=3)
    elif preset == "paper":
        m = pe.nn.PyramidPooling.paper(4, 3, (1, 2, 3))
    else:
        m = pe.nn.PyramidPooling.smp(4, (1, 2, 3)).eval()
    _check_module(m, _x((2, 4, 7, 6)), backend)


def test_spp_and_fpa_modules_gradgrad(backend):
    torch.manual_seed(0)
    _check_module(pe.nn.SpatialPyramidPooling((3, 1), mode="max"), _x((2, 3, 7, 5)), backend)
    _check_module(pe.nn.FeaturePyramidAttention(2, 2).eval(), _x((1, 2, 8, 8)), backend)


# --------------------------------------------------------------------------
# No silent path
# --------------------------------------------------------------------------


def test_no_unregistered_autograd_warning(every_backend):
    """PyTorch warns (and would silently return zeros) when a backward op has
    no autograd kernel; every backward op here has one."""
    backend = every_backend
    x = _x((1, 2, 6, 5))
    b = _x((1, 2, 2, 2), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in ("avg", "max"):
            out = pe.spatial_pyramid_pool(x, (2, 1), mode=mode, backend=backend)
            (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
            g.sum().backward()
        out = pe.upsample_concat(x, [b], backend=backend)
        (g,) = torch.autograd.grad(out.pow(2).sum(), b, create_graph=True)
        g.sum().backward()


def test_double_backward_under_compile_raises_like_pytorch(backend):
    """torch.compile (AOTAutograd) does not support double backward for any op;
    through our ops it raises the same error as through PyTorch's, never a
    wrong value. First-order gradients under compile are tested elsewhere."""
    x = _x((1, 2, 6, 5))

    def fused(t):
        return _flat(pe.multi_adaptive_avg_pool2d(t, (1, 2), backend=backend))

    def eager(t):
        return _flat([F.adaptive_avg_pool2d(t, b) for b in (1, 2)])

    for fn in (fused, eager):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        (g,) = torch.autograd.grad(compiled(x).pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="does not currently support double backward"):
            g.sum().backward()
