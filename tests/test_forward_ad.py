"""Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) through the compiled ops.

multi_pool2d and upsample_concat carry tangents (csrc/autograd.cpp: the ops are
linear in their inputs, max pooling at its argmax), on the eager fast paths and the
general paths alike; so do upsample_shift_add (upsample_concat_conv2d's taps plan)
and the backward ops (forward over reverse: a gradient's tangent), whose tangents
were dropped silently once and refused later. Every tangent is checked against
PyTorch's own forward AD of the eager code (F.adaptive_*_pool2d, F.interpolate,
torch.cat, F.conv2d).
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import pyramid_ext as pe
from pyramid_ext import _extension

from ._helpers import eager_pool, eager_spp, eager_upsample_concat, layout, rand
from .test_upsample_concat_conv import forced_plan

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="the compiled extension is not built")

BINS = (1, 2, 3, 6)


def _jvp(fn, primals, tangents):
    """fn's outputs' (primal, tangent) pairs, with `tangents[i]` (None: none) on primals[i]."""
    with fwAD.dual_level():
        duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = fn(*duals)
        outs = out if isinstance(out, (list, tuple)) else [out]
        pairs = [fwAD.unpack_dual(o) for o in outs]
        return [(p.primal.clone(), None if p.tangent is None else p.tangent.clone()) for p in pairs]


def _assert_same(got, want):
    assert len(got) == len(want)
    for (gp, gt), (wp, wt) in zip(got, want):
        torch.testing.assert_close(gp, wp, rtol=0, atol=1e-12)
        assert gt is not None, "the tangent was dropped"
        torch.testing.assert_close(gt, wt, rtol=0, atol=1e-12)


POOL_CASES = {
    "avg": (lambda x: pe.multi_adaptive_avg_pool2d(x, BINS), lambda x: eager_pool(x, BINS, "avg")),
    "max": (lambda x: pe.multi_adaptive_max_pool2d(x, BINS), lambda x: eager_pool(x, BINS, "max")),
    "max_with_indices": (lambda x: pe.multi_adaptive_max_pool2d(x, BINS, return_indices=True)[0],
                         lambda x: eager_pool(x, BINS, "max")),
    "spp_max": (lambda x: pe.spatial_pyramid_pool(x, (4, 2, 1)), lambda x: _eager_spp(x, "max")),
    "spp_avg": (lambda x: pe.spatial_pyramid_pool(x, (4, 2, 1), mode="avg"), lambda x: _eager_spp(x, "avg")),
}


def _eager_spp(x, mode):
    """eager_spp, also for an unbatched x (a (C * bins,) vector)."""
    return eager_spp(x, (4, 2, 1), mode) if x.dim() == 4 else eager_spp(x.unsqueeze(0), (4, 2, 1), mode)[0]


@pytest.mark.parametrize("case", list(POOL_CASES))
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 5, 9, 7), (5, 9, 7), (1, 3, 2, 1)])
def test_pool_tangents_equal_pytorchs(case, kind, shape):
    fused, eager = POOL_CASES[case]
    x = rand(shape, dtype=torch.float64)
    if x.dim() == 4:
        x = layout(x, kind)
    t = layout(rand(shape, dtype=torch.float64, seed=1), "nchw")  # a tangent in another layout too
    want = _jvp(eager, [x], [t])
    for _ in range(2):  # the second call is served by the fast path's cached entry
        _assert_same(_jvp(fused, [x], [t]), want)


def test_max_tangent_follows_the_tie_and_nan_rule():
    """The tangent is x's tangent at the argmax ATen picks: the first of equal values, a NaN."""
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    x[0, 1, 2, 3] = float("nan")
    t = rand(x.shape, dtype=torch.float64, seed=2)
    want = _jvp(lambda v: eager_pool(v, BINS, "max"), [x], [t])
    got = _jvp(lambda v: pe.multi_adaptive_max_pool2d(v, BINS), [x], [t])
    for (gp, gt), (wp, wt) in zip(got, want):
        torch.testing.assert_close(gp, wp, equal_nan=True)
        torch.testing.assert_close(gt, wt)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("which", ["all", "x", "one_branch", "no_x"])
def test_upsample_concat_tangents_equal_pytorchs(kind, which):
    x = layout(rand((2, 4, 7, 5), dtype=torch.float64), kind)
    branches = [layout(rand((2, 3, b, b), dtype=torch.float64, seed=b), kind) for b in (1, 3)]
    tangents = [rand(t.shape, dtype=torch.float64, seed=10 + i) for i, t in enumerate([x] + branches)]
    if which == "x":
        tangents[1] = tangents[2] = None
    elif which == "one_branch":
        tangents[0] = tangents[2] = None
    if which == "no_x":
        fused = lambda b0, b1: pe.upsample_concat(None, [b0, b1], size=(7, 5), align_corners=True)  # noqa: E731
        eager = lambda b0, b1: eager_upsample_concat(None, [b0, b1], (7, 5), True)  # noqa: E731
        primals, tangents = branches, tangents[1:]
    else:
        fused = lambda v, b0, b1: pe.upsample_concat(v, [b0, b1], x_first=False)  # noqa: E731
        eager = lambda v, b0, b1: eager_upsample_concat(v, [b0, b1], (7, 5), False, x_first=False)  # noqa: E731
        primals = [x] + branches
    want = _jvp(eager, primals, tangents)
    for _ in range(2):
        _assert_same(_jvp(fused, primals, tangents), want)


def test_tangent_and_gradient_together():
    """x requires grad and carries a tangent: the backward is recorded as without one."""
    x = rand((2, 5, 9, 7), dtype=torch.float64).requires_grad_()
    t = rand(x.shape, dtype=torch.float64, seed=3)
    weights = [rand((2, 5, b, b), dtype=torch.float64, seed=b) for b in BINS]
    for fused, eager in [(pe.multi_adaptive_max_pool2d, lambda v, b: eager_pool(v, b, "max")),
                         (pe.multi_adaptive_avg_pool2d, lambda v, b: eager_pool(v, b, "avg"))]:
        with fwAD.dual_level():
            levels = fused(fwAD.make_dual(x, t), BINS)
            tangents = [fwAD.unpack_dual(v).tangent for v in levels]
            loss = sum((v * w).sum() for v, w in zip(levels, weights))
        (grad,) = torch.autograd.grad(loss, x)
        want = eager(x, BINS)
        (want_grad,) = torch.autograd.grad(sum((v * w).sum() for v, w in zip(want, weights)), x)
        torch.testing.assert_close(grad, want_grad)
        want_tangents = [p[1] for p in _jvp(lambda v: eager(v, BINS), [x.detach()], [t])]
        torch.testing.assert_close(tangents, want_tangents)


def tangent_and_grads(fn, x, branches, tangents):
    """fn(x, branches)'s tangent (tangents[i] on input i, None: none) and the gradients of a weighted sum of
    it with respect to x and the branches (zeros where unused), all of which require grad, in the same pass."""
    inputs = [x.detach().requires_grad_()] + [b.detach().requires_grad_() for b in branches]
    with fwAD.dual_level():
        duals = [v if t is None else fwAD.make_dual(v, t) for v, t in zip(inputs, tangents)]
        out = fn(duals[0], duals[1:])
        tangent = fwAD.unpack_dual(out).tangent
        loss = (out * rand(out.shape, dtype=out.dtype, seed=50).to(out.device)).sum()
    return tangent, torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("plan", ["taps", "resize"])
def test_conv_tangent_and_gradient_together(plan):
    """upsample_concat_conv2d with inputs that require grad and carry tangents: on the taps plan the kernel
    op's autograd is torch.library's, which has no jvp; inside a dual level the op runs through _functorch's
    autograd Functions, whose jvp serves the tangent while the gradient is recorded."""
    x = rand((2, 8, 9, 7), dtype=torch.float64)
    branches = [rand((2, 4, b, b), dtype=torch.float64, seed=b) for b in (1, 3)]
    weight = rand((6, 16, 3, 3), dtype=torch.float64, seed=6)
    tangents = [rand(x.shape, dtype=torch.float64, seed=7), None, rand(branches[1].shape, dtype=torch.float64)]
    with forced_plan(plan):
        got = tangent_and_grads(lambda v, bs: pe.upsample_concat_conv2d(v, bs, weight), x, branches, tangents)
    want = tangent_and_grads(lambda v, bs: F.conv2d(eager_upsample_concat(v, bs, (9, 7), False), weight, padding=1),
                             x, branches, tangents)
    assert got[0] is not None
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_func_jvp_equals_pytorchs():
    x = rand((2, 5, 9, 7), dtype=torch.float64)
    t = rand(x.shape, dtype=torch.float64, seed=4)

    def fused(v):
        return pe.upsample_concat(v, pe.multi_adaptive_avg_pool2d(v, (1, 2)))

    def eager(v):
        return eager_upsample_concat(v, eager_pool(v, (1, 2), "avg"), (9, 7), False)

    got = torch.func.jvp(fused, (x,), (t,))
    want = torch.func.jvp(eager, (x,), (t,))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("train", [False, True])
def test_ppm_module_tangent_equals_the_eager_modules(train):
    """pe.nn.PPM (its C++ tails and the pooling node that hands x on) against the
    same module on the torch backend, whose ops are PyTorch's own."""
    torch.manual_seed(0)
    module = pe.nn.PPM(8, 4, bins=(1, 2, 3)).double().train(train)
    x = rand((2, 8, 9, 7), dtype=torch.float64)
    t = rand(x.shape, dtype=torch.float64, seed=5)
    with pe.use_backend("torch"):
        want = _jvp(module, [x], [t])
    got = _jvp(module, [x], [t])
    for (gp, gt), (wp, wt) in zip(got, want):
        torch.testing.assert_close(gp, wp)
        torch.testing.assert_close(gt, wt)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("plan", ["taps", "resize"])
@pytest.mark.parametrize("which", ["all", "x", "branches"])
def test_upsample_concat_conv2d_tangents_equal_pytorchs(which, plan, kind):
    """The taps plan runs upsample_shift_add (its forward-mode AD at ADInplaceOrView), the resize plan
    upsample_concat; both against F.conv2d of the eager concatenation."""
    x = layout(rand((2, 8, 9, 7), dtype=torch.float64), kind)
    branches = [layout(rand((2, 4, b, b), dtype=torch.float64, seed=b), kind) for b in (1, 3)]
    weight = rand((6, 16, 3, 3), dtype=torch.float64, seed=6)
    tangents = [rand(t.shape, dtype=torch.float64, seed=20 + i) for i, t in enumerate([x] + branches)]
    if which == "x":
        tangents[1] = tangents[2] = None
    elif which == "branches":
        tangents[0] = None
    want = _jvp(lambda v, *bs: F.conv2d(eager_upsample_concat(v, bs, (9, 7), False), weight, padding=1),
                [x] + branches, tangents)
    with forced_plan(plan):
        got = _jvp(lambda v, *bs: pe.upsample_concat_conv2d(v, list(bs), weight), [x] + branches, tangents)
    _assert_same(got, want)


FORWARD_OVER_REVERSE = {
    "avg": (lambda x, bs: pe.multi_adaptive_avg_pool2d(x, BINS), lambda x, bs: eager_pool(x, BINS, "avg")),
    "max": (lambda x, bs: pe.multi_adaptive_max_pool2d(x, BINS), lambda x, bs: eager_pool(x, BINS, "max")),
    "upsample_concat": (lambda x, bs: pe.upsample_concat(x, bs),
                        lambda x, bs: eager_upsample_concat(x, bs, (9, 7), False)),
}


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(FORWARD_OVER_REVERSE) + ["conv_taps", "ppm"])
def test_forward_over_reverse_equals_pytorchs(case, kind):
    """torch.autograd.grad with dual cotangents: the backward ops (multi_pool2d_backward with and without
    its addend, upsample_concat_backward, upsample_shift_add_backward) carry the tangent of the gradient."""
    x = layout(rand((2, 8, 9, 7), dtype=torch.float64), kind)
    branches = [layout(rand((2, 4, b, b), dtype=torch.float64, seed=b), kind) for b in (1, 3)]
    if case == "conv_taps":
        weight = rand((6, 16, 3, 3), dtype=torch.float64, seed=6)
        fused = lambda v, bs: pe.upsample_concat_conv2d(v, bs, weight)  # noqa: E731
        eager = lambda v, bs: F.conv2d(eager_upsample_concat(v, bs, (9, 7), False), weight, padding=1)  # noqa: E731
    elif case == "ppm":  # the pooling node that hands x on adds its gradient into grad_out's x slice (addend)
        torch.manual_seed(0)
        module = pe.nn.PPM(8, 4, bins=(1, 2, 3)).double().eval()
        fused = lambda v, bs: module(v)  # noqa: E731

        def eager(v, bs):
            with pe.use_backend("torch"):
                return module(v)
    else:
        fused, eager = FORWARD_OVER_REVERSE[case]

    with forced_plan("taps"):
        got = dual_cotangent_grads(fused, x, branches)
    assert_same_grads(got, dual_cotangent_grads(eager, x, branches))


def dual_cotangent_grads(fn, x, branches):
    """The (primal, tangent) of the gradient of fn(x, branches) with respect to x and each branch (None where
    unused), taken with dual cotangents: forward mode through fn's backward."""
    inputs = [x.detach().requires_grad_()] + [b.detach().requires_grad_() for b in branches]
    with fwAD.dual_level():
        out = fn(inputs[0], inputs[1:])
        outs = out if isinstance(out, (list, tuple)) else [out]
        cotangents = [fwAD.make_dual(rand(o.shape, dtype=o.dtype, seed=30 + i).to(o.device),
                                     rand(o.shape, dtype=o.dtype, seed=40 + i).to(o.device))
                      for i, o in enumerate(outs)]
        gs = torch.autograd.grad(outs, inputs, cotangents, allow_unused=True)
        return [None if g is None else (fwAD.unpack_dual(g).primal.clone(), fwAD.unpack_dual(g).tangent) for g in gs]


def assert_same_grads(got, want, atol=1e-12):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g[1] is not None, "the gradient's tangent was dropped"
            torch.testing.assert_close(g, w, rtol=0, atol=atol)


def test_a_tangent_that_requires_grad_records_its_derivatives():
    """upsample_shift_add's tangent is computed with autograd on: backward through it matches eager's."""
    x = rand((2, 8, 9, 7), dtype=torch.float64)
    branches = [rand((2, 4, b, b), dtype=torch.float64, seed=b) for b in (1, 3)]
    weight = rand((6, 16, 3, 3), dtype=torch.float64, seed=6)

    def tangent_grad(fn):
        t = rand(x.shape, dtype=torch.float64, seed=7).requires_grad_()
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(fn(fwAD.make_dual(x, t))).tangent
        (g,) = torch.autograd.grad((tangent * tangent).sum(), t)
        return g

    want = tangent_grad(lambda v: F.conv2d(eager_upsample_concat(v, branches, (9, 7), False), weight, padding=1))
    with forced_plan("taps"):
        got = tangent_grad(lambda v: pe.upsample_concat_conv2d(v, branches, weight))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
