"""torch.func transforms over the public ops: vmap (the ops' batching rules, pyramid_ext/_functorch.py),
grad / vjp / jacrev (the compiled ops' Python autograd Functions under a grad transform), their nestings
(vmap(grad), jacrev(jacrev)), and forward mode inside a grad transform (hessian, jvp of grad: the Functions'
jvp), against PyTorch's own eager code under the same transforms."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import pyramid_ext as pe

from .test_upsample_concat_conv import forced_plan

# `backend` (tests/conftest.py): the compiled ops (the torch backend is the eager code itself).
BINS = (1, 2, 3)


def _eager(name):
    """The eager code each public op replaces, as a function of x (and branches)."""
    if name == "avg":
        return lambda x: [F.adaptive_avg_pool2d(x, b) for b in BINS]
    if name == "max":
        return lambda x: [F.adaptive_max_pool2d(x, b) for b in BINS]
    if name == "spp":
        return lambda x: torch.cat([F.adaptive_max_pool2d(x, b).flatten(1) for b in BINS], 1)
    if name == "uc":
        return lambda x, *branches: torch.cat(
            [x] + [F.interpolate(b, size=x.shape[-2:], mode="bilinear", align_corners=False) for b in branches], 1)
    raise ValueError(name)


def _fused(name):
    if name == "avg":
        return lambda x: pe.multi_adaptive_avg_pool2d(x, BINS)
    if name == "max":
        return lambda x: pe.multi_adaptive_max_pool2d(x, BINS)
    if name == "spp":
        return lambda x: pe.spatial_pyramid_pool(x, BINS)
    if name == "uc":
        return lambda x, *branches: pe.upsample_concat(x, list(branches))
    raise ValueError(name)


def _loss(fn, weights):
    """A scalar of fn's outputs that weights each element differently (so every gradient entry matters)."""
    def loss(*args):
        outs = fn(*args)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return sum((o * w).sum() + (o * o).sum() for o, w in zip(outs, weights))
    return loss


def _inputs(name, batch, channels_last, gen):
    shape = (batch, 2, 5, 9, 7)  # (vmapped, N, C, H, W): odd, non-divisible maps
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if channels_last:  # every sample channels_last
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    branches = [torch.randn((batch, 2, 3, b, b + 1), generator=gen, dtype=torch.float64) for b in (1, 2)] \
        if name == "uc" else []
    return x, branches


def _case(name, batch, channels_last, seed):
    """(gen, x, branches) batched by `batch` (_inputs), the first sample's arguments, and weights for _loss of
    the shapes of the eager outputs."""
    gen = torch.Generator().manual_seed(seed)
    x, branches = _inputs(name, batch, channels_last, gen)
    args = (x[0], *[b[0] for b in branches])
    with torch.no_grad():
        outs = _eager(name)(*args)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    return gen, x, branches, args, weights


def _close(a, b):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _close(u, v)
        return
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("name", ["avg", "max", "spp", "uc"])
def test_vmap_matches_eager(name, channels_last, backend):
    gen = torch.Generator().manual_seed(1)
    x, branches = _inputs(name, 3, channels_last, gen)
    with pe.use_backend(backend):
        got = torch.vmap(_fused(name))(x, *branches)
    want = torch.vmap(_eager(name))(x, *branches)
    _close(got, want)


def test_vmap_other_dims_and_unbatched_branches(backend):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((2, 4, 5, 9, 7), generator=gen, dtype=torch.float64)  # vmapped along dim 1
    b0 = torch.randn((2, 3, 2, 2), generator=gen, dtype=torch.float64)  # not vmapped: shared by every slice
    b1 = torch.randn((2, 3, 3, 2, 4), generator=gen, dtype=torch.float64)  # vmapped along its last dim
    with pe.use_backend(backend):
        got = torch.vmap(lambda t, u: pe.upsample_concat(t, [b0, u], x_first=False), in_dims=(1, 4))(x, b1)
        levels, indices = torch.vmap(lambda t: pe.multi_adaptive_max_pool2d(t, BINS, return_indices=True),
                                     in_dims=1)(x)
    want = torch.stack([torch.cat([F.interpolate(b0, size=(9, 7), mode="bilinear"),
                                   F.interpolate(b1[..., k], size=(9, 7), mode="bilinear"), x[:, k]], 1)
                        for k in range(4)])
    _close(got, want)
    for b, level, index in zip(BINS, levels, indices):
        for k in range(4):
            v, i = F.adaptive_max_pool2d(x[:, k], b, return_indices=True)
            assert torch.equal(level[k], v) and torch.equal(index[k], i)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("name", ["avg", "max", "spp", "uc"])
def test_grad_vjp_and_per_sample_grads_match_eager(name, channels_last, backend):
    """torch.func.grad (all inputs), torch.func.vjp, and vmap(grad): per-sample gradients."""
    _, x, branches, args, weights = _case(name, 3, channels_last, seed=3)
    argnums = tuple(range(len(args)))
    want = torch.func.grad(_loss(_eager(name), weights), argnums=argnums)(*args)
    want_per_sample = torch.vmap(torch.func.grad(_loss(_eager(name), weights), argnums=argnums))(x, *branches)
    with pe.use_backend(backend):
        got = torch.func.grad(_loss(_fused(name), weights), argnums=argnums)(*args)
        got_per_sample = torch.vmap(torch.func.grad(_loss(_fused(name), weights), argnums=argnums))(x, *branches)
        out, vjp_fn = torch.func.vjp(_fused(name), *args)
    _close(got, want)
    _close(got_per_sample, want_per_sample)
    cotangents = out if isinstance(out, torch.Tensor) else type(out)(out)
    _, eager_vjp = torch.func.vjp(_eager(name), *args)
    _close(vjp_fn(cotangents), eager_vjp(cotangents))


@pytest.mark.parametrize("name", ["avg", "max", "spp", "uc"])
def test_second_order_jacrev_of_jacrev(name, backend):
    """jacrev(jacrev(f)): the backward ops under a grad transform (double backward), batched by jacrev's vmap."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((1, 2, 4, 5), generator=gen, dtype=torch.float64)
    branches = [torch.randn((1, 2, 2, 3), generator=gen, dtype=torch.float64)] if name == "uc" else []
    with torch.no_grad():
        outs = _eager(name)(x, *branches)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    want = torch.func.jacrev(torch.func.jacrev(_loss(_eager(name), weights)))(x, *branches)
    with pe.use_backend(backend):
        got = torch.func.jacrev(torch.func.jacrev(_loss(_fused(name), weights)))(x, *branches)
    _close(got, want)


def _cubic(fn, weights):
    """A scalar of fn's outputs whose Hessian depends on the point (a third power) and weights every element."""
    def loss(*args):
        outs = fn(*args)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return sum((o * w).sum() + (o * o * o).sum() for o, w in zip(outs, weights))
    return loss


def _hessians(fn, args, tangents):
    """torch.func.hessian (jacfwd of jacrev) of fn over every argument, and jvp of its grad (Hessian-vector
    products): forward mode through the ops and through their backward ops inside a grad transform (the
    autograd Functions' jvp)."""
    argnums = tuple(range(len(args)))
    hessian = torch.func.hessian(fn, argnums=argnums)(*args)
    _, hvp = torch.func.jvp(torch.func.grad(fn, argnums=argnums), args, tangents)
    return hessian, hvp


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("name", ["avg", "max", "spp", "uc"])
def test_hessian_and_forward_over_reverse_match_eager(name, channels_last, backend):
    gen, _, _, args, weights = _case(name, 1, channels_last, seed=8)
    tangents = tuple(torch.randn(a.shape, generator=gen, dtype=torch.float64) for a in args)
    want = _hessians(_cubic(_eager(name), weights), args, tangents)
    with pe.use_backend(backend):
        got = _hessians(_cubic(_fused(name), weights), args, tangents)
    _close(got, want)


@pytest.mark.parametrize("plan", ["taps", "resize"])
@pytest.mark.parametrize("varies", ["x", "branches", "both"])
def test_forward_over_reverse_with_inputs_held_constant(varies, plan, backend):
    """Hessian-vector products of upsample_concat and upsample_concat_conv2d (upsample_shift_add on the taps
    plan) where some inputs are constants: the Functions' jvp stands zeros in for their tangents."""
    gen = torch.Generator().manual_seed(9)
    x, branches = _inputs("uc", 1, False, gen)
    x, branches = x[0], [b[0] for b in branches]
    weight = torch.randn((4, 5 + 6, 3, 3), generator=gen, dtype=torch.float64)
    weights = [torch.randn((2, 11, 9, 7), generator=gen, dtype=torch.float64),
               torch.randn((2, 4, 9, 7), generator=gen, dtype=torch.float64)]

    def model(uc, conv):
        def fn(t, *bs):
            t = x if varies == "branches" else t
            bs = branches if varies == "x" else bs
            return [uc(t, *bs), conv(t, *bs)]
        return fn

    eager = model(_eager("uc"), lambda t, *bs: F.conv2d(_eager("uc")(t, *bs), weight, padding=1))
    fused = model(_fused("uc"), lambda t, *bs: pe.upsample_concat_conv2d(t, list(bs), weight))
    args = (x, *branches)
    tangents = tuple(torch.randn(a.shape, generator=gen, dtype=torch.float64) for a in args)
    want = _hessians(_cubic(eager, weights), args, tangents)
    with pe.use_backend(backend), forced_plan(plan):
        got = _hessians(_cubic(fused, weights), args, tangents)
    _close(got, want)


def test_ppm_module_hessian_vector_product(backend):
    """pe.nn.PPM (its pooling node that hands x on steps aside) under jvp of grad."""
    torch.manual_seed(10)
    fused = pe.nn.PPM(6, 2, (1, 2, 3)).double().eval()
    x = torch.randn((2, 6, 7, 9), dtype=torch.float64)
    t = torch.randn_like(x)

    def loss(v):
        return (fused(v) ** 3).sum()

    with pe.use_backend("torch"):
        want = torch.func.jvp(torch.func.grad(loss), (x,), (t,))
    with pe.use_backend(backend):
        got = torch.func.jvp(torch.func.grad(loss), (x,), (t,))
    _close(got, want)


def test_ppm_module_under_grad(backend):
    """pe.nn.PPM's pooling node that hands on x (_pool_through) steps aside under a transform."""
    torch.manual_seed(5)
    fused = pe.nn.PPM(6, 2, (1, 2, 3)).double().eval()
    x = torch.randn((3, 6, 7, 9), dtype=torch.float64)
    xr = x.clone().requires_grad_()
    with pe.use_backend(backend):
        (want,) = torch.autograd.grad(fused(xr).square().sum(), xr)
        got = torch.func.grad(lambda t: fused(t).square().sum())(x)
        per_sample = torch.vmap(torch.func.grad(lambda t: fused(t[None]).square().sum()))(x)
    _close(got, want)
    for k in range(3):
        xk = x[k:k + 1].clone().requires_grad_()
        with pe.use_backend(backend):
            (gk,) = torch.autograd.grad(fused(xk).square().sum(), xk)
        _close(per_sample[k], gk[0])


@pytest.mark.parametrize("plan", ["taps", "resize"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_vmap_upsample_concat_conv2d_and_its_grad(kernel_size, channels_last, plan, backend):
    """upsample_concat_conv2d; with the "taps" plan its kernel op upsample_shift_add and that op's backward run
    under vmap (their batching rules)."""
    gen = torch.Generator().manual_seed(6)
    x, branches = _inputs("uc", 3, channels_last, gen)
    weight = torch.randn((4, 5 + 6, kernel_size, kernel_size), generator=gen, dtype=torch.float64)

    def eager(t, *bs):
        return F.conv2d(_eager("uc")(t, *bs), weight, padding=kernel_size // 2)

    def fused(t, *bs):
        return pe.upsample_concat_conv2d(t, list(bs), weight)

    with pe.use_backend(backend), forced_plan(plan):
        got = torch.vmap(fused)(x, *branches)
        got_grad = torch.vmap(torch.func.grad(lambda *a: fused(*a).square().sum(), argnums=(0, 1, 2)))(x, *branches)
    _close(got, torch.vmap(eager)(x, *branches))
    _close(got_grad, torch.vmap(torch.func.grad(lambda *a: eager(*a).square().sum(), argnums=(0, 1, 2)))(x, *branches))


def _square_sum(outs):
    """The sum of squares of every float tensor in a nest of outputs (max's indices left out)."""
    if isinstance(outs, torch.Tensor):
        return outs.square().sum() if outs.is_floating_point() else 0
    return sum(_square_sum(o) for o in outs)


def test_vmap_runs_no_op_slice_by_slice(backend):
    """Every op a public call reaches under vmap has a batching rule: PyTorch's batched fallback (one call per
    slice) warns, naming the op, where one is missing."""
    gen = torch.Generator().manual_seed(7)
    x, branches = _inputs("uc", 3, False, gen)
    weight = torch.randn((4, 5 + 6, 3, 3), generator=gen, dtype=torch.float64)
    calls = [lambda t, *bs: pe.multi_adaptive_avg_pool2d(t, BINS),
             lambda t, *bs: pe.multi_adaptive_max_pool2d(t, BINS, return_indices=True),
             lambda t, *bs: pe.spatial_pyramid_pool(t, BINS),
             lambda t, *bs: pe.upsample_concat(t, list(bs)),
             lambda t, *bs: pe.upsample_concat_conv2d(t, list(bs), weight)]
    previous = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with pe.use_backend(backend), forced_plan("taps"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for call in calls:
                torch.vmap(call)(x, *branches)
                torch.vmap(torch.func.grad(lambda *a, c=call: _square_sum(c(*a))))(x, *branches)
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(previous)
    fallbacks = [str(w.message) for w in caught if "batching rule" in str(w.message) and "pyramid_ext" in str(w.message)]
    assert not fallbacks, fallbacks
