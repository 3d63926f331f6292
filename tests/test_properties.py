"""Property-based tests (hypothesis): random shapes, bins, window policies,
dtypes, layouts, out= views and flags, on every backend that runs here,
against PyTorch's eager ops (or tests/_helpers.py's independent window
references) computed in float64 on the same rounded inputs, forward and
backward.

Profiles (tests/conftest.py): "ci" (chosen when CI is set) is derandomized,
so a CI failure reproduces by rerunning the same test; "dev" (default) draws
a fresh seed per run and a failure names it (`--hypothesis-seed=N`); "fuzz"
(`make fuzz`) runs many more examples.
"""
from __future__ import annotations

import functools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, seed, settings
from hypothesis import strategies as st

import pyramid_ext as pe

from ._helpers import as_pair, eager_upsample_concat, keras_same_avg, keras_same_max, sppnet_kernel_stride, sppnet_pool
from ._helpers import EPS, acc_dtype
from .conftest import need_backend

BACKENDS = ["cpp", "torch", "triton"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUT_KINDS = ["nchw", "channels_last", "noncontig", "expanded"]
MAX_ELEMENTS = 60_000  # per input: keeps an example in milliseconds

# One seed per session unless --hypothesis-seed is given (which hypothesis
# then forces on every test); named in every failure's message.
_SESSION_SEED = random.randrange(2 ** 32)


def _examples(backend: str) -> int:
    n = settings.default.max_examples
    # The Triton interpreter runs a kernel thousands of times slower.
    return max(5, n // 10) if backend == "triton" else n


def _acc(dtype, backend):
    """The accumulation type: fp32 for 16-bit in our kernels; PyTorch's own
    CPU ops (the torch backend) round 16-bit sums and bilinear weights in the
    dtype itself."""
    return dtype if backend == "torch" else acc_dtype(dtype)


def _run(request, backend: str, strategy, body):
    """Runs `body(case)` over `strategy` with the profile's settings; a
    failure says how to reproduce it."""
    need_backend(backend)
    forced = request.config.getoption("hypothesis_seed", None)
    used_seed = int(forced) if forced is not None else _SESSION_SEED
    test = given(case=strategy)(lambda case: body(case))
    test = settings(max_examples=_examples(backend))(test)
    test = seed(used_seed)(test)
    try:
        test()
    except BaseException as e:
        if settings.default.derandomize:
            how = (f"derandomized profile {settings._current_profile!r}: rerun "
                   f"HYPOTHESIS_PROFILE={settings._current_profile} pytest '{request.node.nodeid}'")
        else:
            how = f"rerun pytest '{request.node.nodeid}' --hypothesis-seed={used_seed}"
        if hasattr(e, "add_note"):
            e.add_note(f"To reproduce: {how}")
        print(f"\nTo reproduce: {how}")
        raise


def grad_close(got, want, dtype, terms=None, n_sum=1, extra=0.0, what="", acc=None):
    """got (computed in dtype, accumulated in acc_dtype(dtype)) against the
    fp64 want: |got - want| <= 2 u |want| + 2 n_sum u_acc terms + extra + the
    dtype's subnormal spacing (float16 results below 6e-5 are subnormal),
    where terms sums the absolute values of what was summed into the element
    and extra bounds the error of weights computed in the accumulation type."""
    assert tuple(got.shape) == tuple(want.shape), (what, tuple(got.shape), tuple(want.shape))
    if not want.numel():
        return
    got, want = got.double(), want.double()
    fi = torch.finfo(dtype)
    bound = 2 * EPS[dtype] * want.abs() + fi.smallest_normal * fi.eps + extra
    if terms is not None:
        bound = bound + 2 * n_sum * EPS[acc or acc_dtype(dtype)] * terms.double()
    err = (got - want).abs()
    bad = err > bound
    if bool(bad.any()):
        k = int((err / bound).flatten().argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements exceed the error bound; worst (flat "
                             f"index {k}): got {got.flatten()[k].item():.9g}, want {want.flatten()[k].item():.9g}, "
                             f"err {err.flatten()[k].item():.3g} > bound {bound.flatten()[k].item():.3g}")


# ----------------------------------------------------------------- inputs ---


def _values(g: torch.Generator, shape, dtype, distinct: bool) -> torch.Tensor:
    """Standard normals in fp64 from g, rounded to dtype (for max tests with
    `distinct`, a shuffled ramp: few ties, except in 16-bit)."""
    if distinct:
        n = math.prod(shape)
        v = (torch.randperm(max(n, 1), generator=g)[:n].double() / max(n, 1) * 8 - 4).reshape(shape)
    else:
        v = torch.randn(shape, generator=g, dtype=torch.float64)
    return v.to(dtype)


def _lay_out(x: torch.Tensor, kind: str, expand_dim: int) -> torch.Tensor:
    """Same values (for "expanded": the values of one slice along
    expand_dim, broadcast with stride 0) in the given memory layout."""
    if kind == "nchw":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "noncontig":
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1] + 1,), dtype=x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    if kind == "expanded":
        return x.narrow(expand_dim, 0, min(1, x.shape[expand_dim])).expand(x.shape)
    raise AssertionError(kind)


@st.composite
def input_4d(draw, max_side=130, c_max=4, n_max=3):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    n = draw(st.integers(0, n_max))
    c = draw(st.integers(0, c_max))
    while n * c * h * w > MAX_ELEMENTS:
        c -= 1
    return n, c, h, w


def _bin_value(max_bin):
    return st.integers(1, max_bin)


@st.composite
def pool_cases(draw):
    n, c, h, w = draw(input_4d())
    window = draw(st.sampled_from(["adaptive", "adaptive", "sppnet", "keras_same"]))
    # Bins up to past the map's sides (adaptive windows then repeat pixels).
    max_bin = min(max(h, w) + 4, 40)
    if window == "adaptive":
        one = st.one_of(_bin_value(max_bin), st.tuples(_bin_value(max_bin), _bin_value(max_bin)))
    else:  # the window references take square bins
        one = _bin_value(max_bin)
    bins = draw(st.lists(one, min_size=1, max_size=4))
    return dict(shape=(n, c, h, w), bins=bins, window=window, dtype=draw(st.sampled_from(DTYPES)),
                kind=draw(st.sampled_from(LAYOUT_KINDS)), expand_dim=draw(st.integers(0, 3)),
                unbatched=draw(st.booleans()) and n == 1, gen_seed=draw(st.integers(0, 2 ** 31 - 1)))


def _sppnet_possible(size: int, n: int) -> bool:
    """SPPNet's formula (document 002) yields n windows over size."""
    k, s = sppnet_kernel_stride(size, n)
    return s > 0 and (size - k) // s + 1 == n


def _reference_levels(xd, bins, window, mode):
    """fp64 expectation per level (None where the policy cannot pool)."""
    out = []
    for b in bins:
        if window == "adaptive":
            pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
            out.append(pool(xd, as_pair(b)))
        elif window == "sppnet":
            if not (_sppnet_possible(xd.shape[-2], b) and _sppnet_possible(xd.shape[-1], b)):
                return None
            out.append(sppnet_pool(xd, b, mode))
        else:
            if round(xd.shape[-2] / b) == 0 or round(xd.shape[-1] / b) == 0:
                return None
            out.append((keras_same_max if mode == "max" else keras_same_avg)(xd, b))
    return out


def _empty_safe(fn, xd, *args):
    """F.* pooling rejects zero-sized N or C: pool a (1, 1) slice for the
    output shape instead and return its empty counterpart."""
    if xd.numel() > 0:
        return fn(xd, *args)
    probe = torch.zeros((1, 1) + tuple(xd.shape[-2:]), dtype=xd.dtype)
    levels = fn(probe, *args)
    return None if levels is None else [t.new_zeros(xd.shape[:2] + t.shape[-2:]) for t in levels]


def _check_pool(case, backend, mode):
    draw = torch.Generator().manual_seed(case["gen_seed"])
    close = functools.partial(grad_close, acc=_acc(case["dtype"], backend))
    dtype, window = case["dtype"], case["window"]
    # Max tests: a shuffled ramp keeps ties rare; where they occur (16-bit,
    # expanded inputs) ATen's rule on the same rounded values decides.
    base = _values(draw, case["shape"], dtype, distinct=mode == "max")
    x = _lay_out(base, case["kind"], case["expand_dim"])
    xd = x.double()
    want = _empty_safe(lambda t, *a: _reference_levels(t, case["bins"], window, mode), xd)
    call = pe.multi_adaptive_max_pool2d if mode == "max" else pe.multi_adaptive_avg_pool2d
    x_in = x[0] if case["unbatched"] else x
    if want is None:
        with pytest.raises(ValueError, match=f"window='{window}'"):
            call(x_in, case["bins"], window=window, backend=backend)
        return
    x_in = x_in.detach().requires_grad_(True)
    kwargs = dict(window=window, backend=backend)
    if mode == "max":
        got, idx = call(x_in, case["bins"], return_indices=True, **kwargs)
    else:
        got = call(x_in, case["bins"], **kwargs)
    assert len(got) == len(want)
    for lv, (g, wv) in enumerate(zip(got, want)):
        if case["unbatched"]:
            wv = wv[0]
        assert g.dtype == dtype and tuple(g.shape) == tuple(wv.shape), (lv, g.shape, wv.shape)
        if mode == "max":
            # One of the input's values, so exact in any dtype.
            torch.testing.assert_close(g.double(), wv, rtol=0, atol=0)
        else:
            area = _empty_safe(lambda t: _reference_levels(t, case["bins"], window, "avg"), xd.abs())[lv]
            close(g, wv, dtype, terms=area[0] if case["unbatched"] else area,
                       n_sum=case["shape"][2] * case["shape"][3], what=f"level {lv}")
    if mode == "max" and window == "adaptive" and x.numel() > 0:
        for lv, b in enumerate(case["bins"]):
            _, wi = F.adaptive_max_pool2d(xd.contiguous(), as_pair(b), return_indices=True)
            assert torch.equal(idx[lv], wi[0] if case["unbatched"] else wi), f"indices of level {lv}"
    if x_in.requires_grad and x.numel() > 0:
        gs = [_values(draw, tuple(t.shape), dtype, distinct=False) for t in got]
        (grad,) = torch.autograd.grad(got, x_in, gs)
        xr = xd.detach().requires_grad_(True)
        ref = _reference_levels(xr, case["bins"], window, mode)
        ref = [r[0] for r in ref] if case["unbatched"] else ref
        (want_grad,) = torch.autograd.grad(ref, xr, [g.double() for g in gs], retain_graph=True)
        (terms,) = torch.autograd.grad(ref, xr, [g.double().abs() for g in gs])
        if case["unbatched"]:
            want_grad, terms = want_grad[0], terms[0]
        # Each input gets at most 4 windows per level (adaptive windows
        # overlap by one pixel per axis), each once.
        close(grad, want_grad, dtype, terms=terms, n_sum=4 * len(case["bins"]), what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_avg_pool_properties(request, backend):
    _run(request, backend, pool_cases(), lambda case: _check_pool(case, backend, "avg"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_properties(request, backend):
    _run(request, backend, pool_cases(), lambda case: _check_pool(case, backend, "max"))


@st.composite
def spp_cases(draw):
    n, c, h, w = draw(input_4d())
    max_bin = min(max(h, w) + 4, 20)
    bins = draw(st.lists(st.one_of(_bin_value(max_bin), st.tuples(_bin_value(max_bin), _bin_value(max_bin))),
                         min_size=1, max_size=3))
    return dict(shape=(n, c, h, w), bins=bins, mode=draw(st.sampled_from(["max", "avg"])),
                dtype=draw(st.sampled_from(DTYPES)), kind=draw(st.sampled_from(LAYOUT_KINDS)),
                expand_dim=draw(st.integers(0, 3)), gen_seed=draw(st.integers(0, 2 ** 31 - 1)))


def _check_spp(case, backend):
    mode, dtype = case["mode"], case["dtype"]
    draw = torch.Generator().manual_seed(case["gen_seed"])
    close = functools.partial(grad_close, acc=_acc(case["dtype"], backend))
    x = _lay_out(_values(draw, case["shape"], dtype, distinct=mode == "max"), case["kind"], case["expand_dim"])
    x = x.detach().requires_grad_(True)
    got = pe.spatial_pyramid_pool(x, case["bins"], mode=mode, backend=backend)
    xd = x.detach().double().requires_grad_(True)
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    if x.numel() == 0:
        total = sum(bh * bw for bh, bw in map(as_pair, case["bins"]))
        assert tuple(got.shape) == (x.shape[0], x.shape[1] * total)
        return
    want = torch.cat([pool(xd, as_pair(b)).flatten(1) for b in case["bins"]], 1)
    assert got.dtype == dtype and got.shape == want.shape
    if mode == "max":
        torch.testing.assert_close(got.double(), want, rtol=0, atol=0)
    else:
        terms = torch.cat([pool(xd.detach().abs(), as_pair(b)).flatten(1) for b in case["bins"]], 1)
        close(got, want, dtype, terms=terms, n_sum=x.shape[2] * x.shape[3], what="spp")
    g = _values(draw, tuple(got.shape), dtype, distinct=False)
    (grad,) = torch.autograd.grad(got, x, g)
    (want_grad,) = torch.autograd.grad(want, xd, g.double(), retain_graph=True)
    (terms,) = torch.autograd.grad(want, xd, g.double().abs())
    close(grad, want_grad, dtype, terms=terms, n_sum=4 * len(case["bins"]), what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_pyramid_pool_properties(request, backend):
    _run(request, backend, spp_cases(), lambda case: _check_spp(case, backend))


# --------------------------------------------------------- upsample_concat ---


@st.composite
def upsample_cases(draw):
    n = draw(st.integers(0, 3))
    size = (draw(st.integers(1, 130)), draw(st.integers(1, 130)))
    with_x = draw(st.booleans())
    branches = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 48), st.integers(1, 48)),
                             min_size=0 if with_x else 1, max_size=4))
    cx = draw(st.integers(0, 3))
    channels = (cx if with_x else 0) + sum(c for c, _, _ in branches)
    while n * max(channels, 1) * size[0] * size[1] > MAX_ELEMENTS:
        size = (max(1, size[0] // 2), max(1, size[1] // 2))
    return dict(n=n, size=size, cx=cx if with_x else None, branches=branches,
                align_corners=draw(st.booleans()), x_first=draw(st.booleans()),
                pass_size=draw(st.booleans()) or not with_x,
                out=draw(st.sampled_from([None, "fresh", "slice"])), dtype=draw(st.sampled_from(DTYPES)),
                kinds=draw(st.lists(st.sampled_from(LAYOUT_KINDS), min_size=5, max_size=5)),
                expand_dim=draw(st.integers(0, 3)), gen_seed=draw(st.integers(0, 2 ** 31 - 1)))


def _check_upsample(case, backend):
    dtype, n, size = case["dtype"], case["n"], case["size"]
    draw = torch.Generator().manual_seed(case["gen_seed"])
    close = functools.partial(grad_close, acc=_acc(case["dtype"], backend))
    x = None
    if case["cx"] is not None:
        x = _lay_out(_values(draw, (n, case["cx"]) + size, dtype, False), case["kinds"][0], case["expand_dim"])
    branches = [_lay_out(_values(draw, (n, c, h, w), dtype, False), case["kinds"][1 + k], case["expand_dim"])
                for k, (c, h, w) in enumerate(case["branches"])]
    kwargs = dict(align_corners=case["align_corners"], x_first=case["x_first"], backend=backend)
    if case["pass_size"]:
        kwargs["size"] = size
    xd = None if x is None else x.double()
    want = eager_upsample_concat(xd, [b.double() for b in branches], size, case["align_corners"], case["x_first"])
    abs_up = eager_upsample_concat(None if x is None else xd.abs(), [b.double().abs() for b in branches], size,
                                   case["align_corners"], case["x_first"])
    # Bilinear: 4 taps, and weights computed in the accumulation type, whose
    # source coordinate (up to the input size) is rounded once or twice.
    # A tap weight computed in the accumulation type is off by up to about
    # (source coordinate + 2) u_acc: at most 4 taps per output.
    biggest = max([max(h, w) for _, h, w in case["branches"]] + [1])
    u_acc = EPS[_acc(dtype, backend)]
    max_in = max([t.abs().max().item() for t in branches if t.numel()] + [0.0])
    n_sum = 4
    extra = 8 * (biggest + 2) * u_acc * max_in
    if case["out"] is not None:
        channels = want.shape[1]
        if case["out"] == "fresh":
            out = torch.full(tuple(want.shape), float("nan"), dtype=dtype)
        else:  # a channel slice of a bigger buffer, between two sentinels
            buf = torch.full((n, channels + 3) + size, 7.0, dtype=dtype)
            out = buf[:, 1:1 + channels]
        got = pe.upsample_concat(x, branches, out=out, **kwargs)
        assert got is out
        if case["out"] == "slice":
            assert bool((buf[:, :1] == 7).all()) and bool((buf[:, 1 + channels:] == 7).all()), "wrote outside out"
        close(got, want, dtype, terms=abs_up, n_sum=n_sum, extra=extra, what="out=")
        return
    leaves = ([] if x is None else [x]) + branches
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    x_in = None if x is None else leaves[0]
    br_in = leaves[0 if x is None else 1:]
    got = pe.upsample_concat(x_in, br_in, **kwargs)
    assert got.dtype == dtype and got.shape == want.shape
    close(got, want, dtype, terms=abs_up, n_sum=n_sum, extra=extra, what="forward")
    if got.numel() == 0:
        return
    g = _values(draw, tuple(got.shape), dtype, False)
    grads = torch.autograd.grad(got, leaves, g, allow_unused=True)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    rx = None if x is None else ref_leaves[0]
    ref = eager_upsample_concat(rx, ref_leaves[0 if x is None else 1:], size, case["align_corners"],
                                case["x_first"])
    want_grads = torch.autograd.grad(ref, ref_leaves, g.double(), retain_graph=True, allow_unused=True)
    terms = torch.autograd.grad(ref, ref_leaves, g.double().abs(), allow_unused=True)
    for k, (gr, wg, tm, leaf) in enumerate(zip(grads, want_grads, terms, leaves)):
        if leaf.numel() == 0:
            continue
        h, w = leaf.shape[-2:]
        # An input pixel gathers the gradient of up to (size/h + 2) x (size/w + 2) outputs.
        chain = (size[0] // h + 3) * (size[1] // w + 3)
        extra_g = 0.0 if (k == 0 and x is not None) else 2 * chain * (max(h, w) + 2) * u_acc * g.abs().max().item()
        close(gr, wg, dtype, terms=tm, n_sum=chain, extra=extra_g, what=f"grad of input {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_upsample_concat_properties(request, backend):
    _run(request, backend, upsample_cases(), lambda case: _check_upsample(case, backend))
