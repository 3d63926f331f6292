"""The eager fast path (pyramid_ext/functional.py `_fast_pool`, csrc/fast_calls.cpp).

Timing is measured in benchmarks/tiny_overhead.py (a ratio asserted here would be
flaky on a shared machine); these tests pin what makes it fast, by counting what
runs per call, and that it returns what the general path and PyTorch return.
"""
import collections
import contextlib
import gc
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pyramid_ext as pe
from pyramid_ext import _extension, backends, functional

from ._helpers import eager_pool, eager_upsample_concat, layout, rand

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="the compiled extension is not built")

BINS = (1, 2, 3, 6)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func))
        return func(*args, **(kwargs or {}))


def _ops_of(fn):
    with CountOps() as mode:
        fn()
    return mode.ops


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_pool_is_one_op_and_one_view_per_level(kind):
    x = layout(rand((2, 3, 9, 7)), kind)
    pe.multi_adaptive_avg_pool2d(x, BINS)  # fills the cache
    assert _ops_of(lambda: pe.multi_adaptive_avg_pool2d(x, BINS)) == ["multi_pool2d"] + ["as_strided"] * 4
    assert _ops_of(lambda: pe.spatial_pyramid_pool(x, (4, 2, 1))) == ["multi_pool2d"]
    ops = _ops_of(lambda: pe.multi_adaptive_max_pool2d(x, BINS, return_indices=True))
    assert ops == ["multi_pool2d"] + ["as_strided"] * 8


def test_upsample_concat_is_one_op():
    x = rand((1, 4, 8, 8))
    branches = [rand((1, 2, b, b), seed=b) for b in BINS]
    assert _ops_of(lambda: pe.upsample_concat(x, branches)) == ["upsample_concat"]


@pytest.fixture
def pool_cache():
    """The pooling fast path's C++ cache (`_C._pool_fast`), empty; its bound restored after."""
    C = _extension._C
    C._pool_cache_clear()
    bound = C._pool_cache_set_max(1024)
    C._pool_cache_set_max(bound)
    yield C
    C._pool_cache_set_max(bound)
    C._pool_cache_clear()


def test_windows_are_computed_once_per_key(monkeypatch, pool_cache):
    calls = []
    entry = functional._fast_pool_entry
    monkeypatch.setattr(functional, "_fast_pool_entry", lambda *a: calls.append(1) or entry(*a))
    x = rand((1, 3, 11, 5))
    for _ in range(3):
        pe.multi_adaptive_avg_pool2d(x, BINS)
    pe.multi_adaptive_avg_pool2d(x, [1, 2, 3, 6])  # the same key
    assert len(calls) == 1
    pe.multi_adaptive_avg_pool2d(rand((1, 3, 11, 6)), BINS)  # another shape
    pe.multi_adaptive_max_pool2d(x, BINS)  # another mode
    assert len(calls) == 3


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_fast_path_equals_pytorch(kind, mode):
    for shape in [(1, 8, 8, 8), (2, 3, 13, 7), (3, 5, 1, 1)]:
        x = layout(rand(shape, dtype=torch.float64), kind).requires_grad_()
        fn = pe.multi_adaptive_avg_pool2d if mode == "avg" else pe.multi_adaptive_max_pool2d
        got = fn(x, BINS)
        want = eager_pool(x, BINS, mode)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        weights = [rand(w.shape, dtype=torch.float64, seed=k) for k, w in enumerate(want)]
        grad_got = torch.autograd.grad(sum((g * wt).sum() for g, wt in zip(got, weights)), x)[0]
        grad_want = torch.autograd.grad(sum((w * wt).sum() for w, wt in zip(want, weights)), x)[0]
        torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=1e-12)
        if mode == "max":
            _, idx = pe.multi_adaptive_max_pool2d(x, BINS, return_indices=True)
            for i, b in zip(idx, BINS):
                assert torch.equal(i, F.adaptive_max_pool2d(x, b, return_indices=True)[1])


def test_unbatched_and_levels_share_one_buffer():
    x = rand((3, 10, 9))
    got = pe.multi_adaptive_avg_pool2d(x, BINS)
    for g, b in zip(got, BINS):
        torch.testing.assert_close(g, F.adaptive_avg_pool2d(x, b))
    assert len({g.untyped_storage().data_ptr() for g in got}) == 1
    spp = pe.spatial_pyramid_pool(x, (2, 1), mode="avg")
    torch.testing.assert_close(spp, torch.cat([F.adaptive_avg_pool2d(x, b).flatten() for b in (2, 1)]))


def test_levels_can_be_modified_in_place_under_autograd():
    x = rand((1, 2, 6, 6), dtype=torch.float64).requires_grad_()
    levels = pe.multi_adaptive_avg_pool2d(x, (1, 2))
    levels[1].mul_(3)  # a single-output view: in place is allowed, as for the eager outputs
    (levels[0].sum() + levels[1].sum()).backward()
    want = torch.full_like(x, 1 / 36) + 3 * torch.full_like(x, 1 / 9)
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_levels_without_grad_are_plain_tensors_as_eager_outputs(kind):
    """Without grad the levels are aliases of the packed buffer made below autograd,
    not autograd views: like F.adaptive_*_pool2d's outputs, one made under no_grad
    can be modified in place by a tensor requiring grad later (a view made in
    no_grad mode raises there)."""
    x = layout(rand((2, 3, 9, 7), dtype=torch.float64), kind)
    with torch.no_grad():
        levels = pe.multi_adaptive_avg_pool2d(x.requires_grad_(), BINS)
    values, indices = pe.multi_adaptive_max_pool2d(x.detach(), BINS, return_indices=True)
    for t in levels + values + indices:
        assert not t._is_view() and not t.requires_grad
    assert len({t.untyped_storage().data_ptr() for t in levels}) == 1
    w = torch.full((1,), 2.0, dtype=torch.float64, requires_grad=True)
    levels[1].mul_(w)
    (levels[1].sum()).backward()
    want = eager_pool(x.detach(), BINS, "avg")[1]
    torch.testing.assert_close(w.grad, want.sum().view(1))


def test_bool_bins_still_rejected_after_int_bins_are_cached():
    x = rand((1, 2, 4, 4))
    pe.multi_adaptive_avg_pool2d(x, (1,))
    with pytest.raises(TypeError, match="bins"):
        pe.multi_adaptive_avg_pool2d(x, (True,))


def test_a_named_backend_is_not_served_by_the_fast_path():
    x = rand((1, 2, 6, 6))
    pe.multi_adaptive_avg_pool2d(x, BINS)
    ops = _ops_of(lambda: pe.multi_adaptive_avg_pool2d(x, BINS, backend="torch"))
    assert "multi_pool2d" not in ops
    with pe.use_backend("torch"):
        assert "multi_pool2d" not in _ops_of(lambda: pe.multi_adaptive_avg_pool2d(x, BINS))
    branches = [rand((1, 2, 3, 3))]
    assert "upsample_concat" not in _ops_of(lambda: pe.upsample_concat(x, branches, backend="torch"))


@pytest.mark.parametrize("x_first", [True, False])
def test_upsample_concat_fast_path_equals_pytorch(x_first):
    x = rand((2, 3, 7, 5), dtype=torch.float64).requires_grad_()
    branches = [rand((2, 2, b, b), dtype=torch.float64, seed=b).requires_grad_() for b in (1, 3)]
    got = pe.upsample_concat(x, branches, x_first=x_first, align_corners=True)
    want = eager_upsample_concat(x, branches, (7, 5), True, x_first)
    torch.testing.assert_close(got, want)
    g = rand(want.shape, dtype=torch.float64, seed=9)
    torch.testing.assert_close(torch.autograd.grad(got, [x] + branches, g),
                               torch.autograd.grad(want, [x] + branches, g))
    alone = pe.upsample_concat(None, branches, size=(4, 6))
    torch.testing.assert_close(alone, eager_upsample_concat(None, branches, (4, 6), False))


def _general_out_calls(monkeypatch):
    """The calls that take the general out= path (it alone runs _check_out)."""
    calls = []
    check = functional._check_out
    monkeypatch.setattr(functional, "_check_out", lambda *a: calls.append(1) or check(*a))
    return calls


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("x_first", [True, False])
def test_upsample_concat_out_fast_path_equals_pytorch(monkeypatch, kind, x_first):
    general = _general_out_calls(monkeypatch)
    x = layout(rand((2, 3, 7, 5)), kind)
    branches = [layout(rand((2, 2, b, b), seed=b), kind) for b in (1, 3)]
    out = layout(torch.full((2, 7, 7, 5), float("nan")), kind)
    assert pe.upsample_concat(x, branches, x_first=x_first, align_corners=True, out=out) is out
    torch.testing.assert_close(out, eager_upsample_concat(x, branches, (7, 5), True, x_first))
    assert _ops_of(lambda: pe.upsample_concat(x, branches, out=out)) == ["upsample_concat_out"]
    alone = layout(torch.full((2, 4, 4, 6), float("nan")), kind)
    with torch.no_grad():  # requiring grad outside grad mode is no reason to leave the fast path
        pe.upsample_concat(None, [b.requires_grad_() for b in branches], size=(4, 6), out=alone)
    torch.testing.assert_close(alone, eager_upsample_concat(None, branches, (4, 6), False))
    assert general == []


def test_upsample_concat_out_falls_back_to_the_general_path(monkeypatch):
    general = _general_out_calls(monkeypatch)
    x = rand((1, 3, 6, 6))
    branches = [rand((1, 2, b, b), seed=b) for b in (1, 3)]
    want = eager_upsample_concat(x, branches, (6, 6), False)
    buf = torch.zeros(1, 7, 6, 6)
    buf[:, :3] = x
    pe.upsample_concat(buf[:, :3], branches, out=buf)  # x inside out: copied first
    torch.testing.assert_close(buf, want)
    big = torch.zeros(1, 7, 6, 8)
    pe.upsample_concat(x, branches, out=big[..., 1:7])  # out not dense
    torch.testing.assert_close(big[..., 1:7], want)
    out64 = torch.empty(1, 7, 6, 6, dtype=torch.float64)
    pe.upsample_concat(x, [branches[0].double(), branches[1]], out=out64)  # promotion
    torch.testing.assert_close(out64, eager_upsample_concat(x.double(), [b.double() for b in branches], (6, 6), False))
    with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
        pe.upsample_concat(x, [branches[0].clone().requires_grad_(), branches[1]], out=torch.empty(1, 7, 6, 6))
    with pytest.raises(ValueError, match="out has shape"):
        pe.upsample_concat(x, branches, out=torch.empty(1, 6, 6, 6))
    assert len(general) == 5


# csrc/autograd.cpp calls the op below autograd, without a node, when grad mode
# is off or no input requires grad; any input requiring grad (a branch alone
# included) still records the node and its backward.
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_without_grad_records_nothing_and_with_grad_one_node(mode):
    x = rand((2, 3, 9, 7), dtype=torch.float64)
    fused = pe.multi_adaptive_avg_pool2d if mode == "avg" else pe.multi_adaptive_max_pool2d
    plain = fused(x, BINS)
    assert all(v.grad_fn is None and not v.requires_grad for v in plain)
    torch.testing.assert_close(plain, eager_pool(x, BINS, mode))
    x.requires_grad_()
    with torch.no_grad():
        off = fused(x, BINS)
    assert all(v.grad_fn is None and not v.requires_grad for v in off)
    torch.testing.assert_close(off, eager_pool(x.detach(), BINS, mode))
    on = fused(x, BINS)
    assert all(v.requires_grad for v in on)
    g = [rand(v.shape, dtype=torch.float64, seed=i) for i, v in enumerate(on)]
    torch.testing.assert_close(torch.autograd.grad(on, x, g), torch.autograd.grad(eager_pool(x, BINS, mode), x, g))


def test_upsample_concat_records_when_only_a_branch_requires_grad():
    x = rand((2, 3, 7, 5), dtype=torch.float64)
    branches = [rand((2, 2, b, b), dtype=torch.float64, seed=b) for b in (1, 3)]
    plain = pe.upsample_concat(x, branches)
    assert plain.grad_fn is None and not plain.requires_grad
    torch.testing.assert_close(plain, eager_upsample_concat(x, branches, (7, 5), False))
    branches[1].requires_grad_()
    with torch.no_grad():
        assert not pe.upsample_concat(x, branches).requires_grad
    got = pe.upsample_concat(x, branches)
    assert got.requires_grad
    want = eager_upsample_concat(x, branches, (7, 5), False)
    g = rand(want.shape, dtype=torch.float64, seed=9)
    torch.testing.assert_close(torch.autograd.grad(got, branches[1], g), torch.autograd.grad(want, branches[1], g))
    alone = pe.upsample_concat(None, branches, size=(4, 6))
    assert alone.requires_grad


def test_cache_is_a_bounded_lru(monkeypatch, pool_cache):
    pool_cache._pool_cache_set_max(2)
    calls = []
    entry = functional._fast_pool_entry
    monkeypatch.setattr(functional, "_fast_pool_entry", lambda *a: calls.append(a[1]) or entry(*a))
    x = rand((1, 2, 7, 7))
    for bins in [(1,), (2,), (1,), (3,)]:  # (1,) used again before (3,) evicts the least recent, (2,)
        pe.multi_adaptive_avg_pool2d(x, bins)
    assert calls == [(1,), (2,), (3,)] and pool_cache._pool_cache_size() == 2
    pe.multi_adaptive_avg_pool2d(x, (1,))  # still cached
    pe.multi_adaptive_avg_pool2d(x, (2,))  # evicted: built again
    assert calls == [(1,), (2,), (3,), (2,)] and pool_cache._pool_cache_size() == 2
    pool_cache._pool_cache_set_max(1)  # a lower bound evicts at once
    assert pool_cache._pool_cache_size() == 1


def test_cache_keeps_no_tensor_alive(pool_cache):
    x = rand((1, 2, 7, 7))
    ref = weakref.ref(x)
    levels = pe.multi_adaptive_max_pool2d(x, BINS, return_indices=True)
    assert pool_cache._pool_cache_size() == 1
    del x, levels
    gc.collect()
    assert ref() is None


def test_cache_is_shared_by_threads_and_gives_each_its_answer(pool_cache):
    """Threads hitting, missing and evicting entries at once (bound 2, three keys):
    every call returns PyTorch's values for its own input."""
    pool_cache._pool_cache_set_max(2)
    inputs = [rand((2, 3, 5 + k, 6), seed=k) for k in range(3)]
    wants = [eager_pool(x, BINS, "avg") for x in inputs]
    errors = []

    def work(offset):
        try:
            for i in range(60):
                k = (i + offset) % 3
                for g, w in zip(pe.multi_adaptive_avg_pool2d(inputs[k], BINS), wants[k]):
                    torch.testing.assert_close(g, w)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert pool_cache._pool_cache_size() <= 2


# With grad, the levels are the outputs of one C++ node (_PoolCall's PoolLevels,
# csrc/fast_calls.cpp), not as_strided views of the packed values: the backward
# of such views wrote a zero-filled packed-sized gradient per level and added
# them up (new_zeros, fill_, copy_, add per level); the node packs the level
# gradients into one buffer and calls multi_pool2d_backward once.
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_with_grad_is_one_node_and_packs_level_grads_once(kind, mode):
    x = layout(rand((2, 3, 9, 7), dtype=torch.float64), kind).requires_grad_()
    fused = pe.multi_adaptive_avg_pool2d if mode == "avg" else pe.multi_adaptive_max_pool2d
    fused(x, BINS)  # fills the cache
    assert _ops_of(lambda: fused(x, BINS)) == ["multi_pool2d"] + ["as_strided"] * 4
    levels = fused(x, BINS)
    names = {v.grad_fn.name() for v in levels}
    assert len(names) == 1 and "PoolLevels" in names.pop(), [v.grad_fn for v in levels]
    assert not any(v._is_view() for v in levels)
    want = eager_pool(x, BINS, mode)
    grads = [layout(rand(w.shape, dtype=torch.float64, seed=k), kind) for k, w in enumerate(want)]
    for used in [(0, 1, 2, 3), (1, 3), (2,)]:  # every level, some, one: the others' gradients are None
        outs, gs = [levels[i] for i in used], [grads[i] for i in used]
        with CountOps() as counted:
            (got,) = torch.autograd.grad(outs, x, gs, retain_graph=True)
        (expect,) = torch.autograd.grad([want[i] for i in used], x, gs, retain_graph=True)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
        ops = counted.ops
        assert ops.count("multi_pool2d_backward") == 1 and ops.count("empty") == 1, ops
        assert ops.count("copy_") == len(used) and ops.count("zero_") == 4 - len(used), ops
        assert not {"new_zeros", "zeros", "fill_", "add", "add_", "cat"} & set(ops), ops


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_pool_level_grads_of_any_layout_and_unbatched(kind):
    """Level gradients with odd strides (expanded by sum(), a level used twice, a
    transposed one) and an unbatched x, against F.adaptive_*_pool2d."""
    for shape in [(2, 5, 13, 11), (5, 13, 11)]:
        x = rand(shape, dtype=torch.float64)
        if len(shape) == 4:
            x = layout(x, kind)
        x.requires_grad_()
        for fused, mode in [(pe.multi_adaptive_avg_pool2d, "avg"), (pe.multi_adaptive_max_pool2d, "max")]:
            got_levels, want_levels = fused(x, BINS), eager_pool(x, BINS, mode)

            def loss(levels):
                return (levels[0].sum() + (levels[1] * levels[1]).sum() + levels[1].sum()
                        + (levels[3].transpose(-1, -2) * torch.arange(36.0, dtype=torch.float64).view(6, 6)).sum())

            (got,) = torch.autograd.grad(loss(got_levels), x)
            (expect,) = torch.autograd.grad(loss(want_levels), x)
            torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)


def test_max_index_level_modified_in_place_fails_the_backward():
    """The node saves the packed indices; an index level is an alias of them
    sharing their version counter (not an autograd view), so modifying one in
    place makes the backward raise instead of using it."""
    x = rand((1, 2, 6, 6), dtype=torch.float64).requires_grad_()
    values, indices = pe.multi_adaptive_max_pool2d(x, (1, 2), return_indices=True)
    for i, b in zip(indices, (1, 2)):
        assert torch.equal(i, F.adaptive_max_pool2d(x, b, return_indices=True)[1])
        assert not i._is_view()
    indices[1].zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        values[1].sum().backward()


# The pyramid modules' pooling node that hands x on (pyramid_ext/_pool_through.py):
# served by _C._PoolCall.levels_handing_on_x (a C++ autograd node, cached windows)
# for a dense x on the compiled backend, by the Python autograd.Function otherwise.
_PYRAMID = [(1, 1), (2, 2), (3, 3), (6, 6)]


def _handing_on_x_case(kind, dense=True):
    from pyramid_ext._pool_through import avg_pool_handing_on_x

    base = layout(rand((2, 5, 9, 7), dtype=torch.float64), kind)
    x = (base if dense else base[:, 1:4]).detach().requires_grad_()
    levels, x_through = avg_pool_handing_on_x(x, _PYRAMID)
    return x, levels, x_through


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_pool_handing_on_x_is_one_cpp_node(kind):
    from pyramid_ext._pool_through import avg_pool_handing_on_x

    x, levels, x_through = _handing_on_x_case(kind)
    assert "CppNode<pyramid_ext::" in x_through.grad_fn.name(), x_through.grad_fn.name()  # the C++ node
    assert torch.equal(x_through, x) and x_through.data_ptr() == x.data_ptr()
    ops = _ops_of(lambda: avg_pool_handing_on_x(x, _PYRAMID))
    # The levels are outputs of the node: four aliases (as_strided + detach) of the packed buffer.
    assert ops.count("multi_pool2d") == 1 and ops.count("as_strided") == 4 and ops.count("detach") == 4, ops
    assert len(ops) <= 10, ops
    assert all(level.grad_fn.name() == x_through.grad_fn.name() for level in levels)
    # Not dense: the Python autograd.Function (after a copy of x).
    _, _, through = _handing_on_x_case(kind, dense=False)
    assert through.grad_fn.name() == "_AvgPoolHandingOnXBackward"
    for dense in [True, False]:
        # Backward: the level gradients (level 2's unused) packed into one buffer, one backward op.
        x, levels, x_through = _handing_on_x_case(kind, dense)
        grads = [rand(v.shape, dtype=torch.float64, seed=k) for k, v in enumerate(levels)]
        outs = [levels[0], levels[1], levels[3], x_through]
        with CountOps() as counted:
            torch.autograd.grad(outs, x, [grads[0], grads[1], grads[3], torch.ones_like(x)])
        ops = counted.ops
        assert ops.count("multi_pool2d_backward") == 1 and ops.count("empty") + ops.count("new_empty") == 1, ops
        assert ops.count("copy_") == 3 and ops.count("zero_") == 1, ops
        assert not {"new_zeros", "zeros", "fill_", "add", "cat"} & set(ops), ops


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_pool_handing_on_x_equals_pytorch(kind, dense):
    """Values and both gradients (each output's alone and together) against
    F.adaptive_avg_pool2d and x itself, on both paths."""
    x, levels, x_through = _handing_on_x_case(kind, dense)
    want = eager_pool(x, [b for b, _ in _PYRAMID], "avg")
    for g, w in zip(levels, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_through, x, rtol=0, atol=0)
    weights = [rand(w.shape, dtype=torch.float64, seed=k) for k, w in enumerate(want)]
    g_through = rand(x.shape, dtype=torch.float64, seed=7)
    pooled_got = sum((g * wt).sum() for g, wt in zip(levels, weights))
    pooled_want = sum((w * wt).sum() for w, wt in zip(want, weights))
    for got, expect in [(pooled_got + (x_through * g_through).sum(), pooled_want + (x * g_through).sum()),
                        (pooled_got, pooled_want), ((x_through * g_through).sum(), (x * g_through).sum())]:
        (grad_got,) = torch.autograd.grad(got, x, retain_graph=True)
        (grad_want,) = torch.autograd.grad(expect, x, retain_graph=True)
        torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=1e-12)


def test_upsample_concat_fast_path_takes_the_common_call_and_declines_the_rest(monkeypatch):
    # The C++ checks (_upsample_concat_fast) take the common call whole and send
    # anything else to the general path (the backend table), which gives the same result.
    general = []
    implementation = backends.implementation
    monkeypatch.setattr(backends, "implementation", lambda name: general.append(name) or implementation(name))
    x = layout(rand((2, 3, 7, 5)), "channels_last")
    branches = [layout(rand((2, 2, b, b), seed=b), "channels_last") for b in (1, 3)]
    want = eager_upsample_concat(x, branches, (7, 5), False)
    alone = eager_upsample_concat(None, branches, (4, 6), False)

    def taken(fn, expected):
        general.clear()
        torch.testing.assert_close(fn(), expected)
        return not general

    out = torch.empty_like(want)
    # common calls: list or tuple of branches, size omitted or x's (a torch.Size too), out= or not
    assert taken(lambda: pe.upsample_concat(x, branches), want)
    assert taken(lambda: pe.upsample_concat(x, tuple(branches), size=x.shape[-2:]), want)
    assert taken(lambda: pe.upsample_concat(x, branches, size=(7, 5), out=out), want)
    assert taken(lambda: pe.upsample_concat(None, tuple(branches), size=(4, 6)), alone)

    class Sub(torch.Tensor):
        pass

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def under_mode():
        with Mode():
            return pe.upsample_concat(x, branches)

    declined = [
        lambda: pe.upsample_concat(x.as_subclass(Sub), branches).as_subclass(torch.Tensor),
        lambda: pe.upsample_concat(x, [branches[0].as_subclass(Sub), branches[1]]).as_subclass(torch.Tensor),
        under_mode,
        lambda: pe.upsample_concat(x, branches, size=[7, 5]),  # a list, not a tuple
        lambda: pe.upsample_concat(x, [branches[0], branches[1].double()]).float(),  # promotion
        lambda: pe.upsample_concat(x, [branches[0], branches[1].transpose(2, 3).contiguous().transpose(2, 3)[..., :3]]),
        lambda: pe.upsample_concat(x, branches, out=torch.empty_like(want).as_subclass(Sub)).as_subclass(torch.Tensor),
        lambda: pe.upsample_concat(x, branches, out=torch.empty(2, 7, 7, 6)[..., :5]),  # out not dense
    ]
    for i, fn in enumerate(declined):
        assert not taken(fn, want), i
    assert not taken(lambda: pe.upsample_concat(None, branches, size=[4, 6]), alone)
    with pytest.raises(TypeError, match="pair of ints"):  # a bool is no size: the general path's error
        pe.upsample_concat(None, branches, size=(True, 6))


def _uc_conv_inputs(kind, k=1):
    """x (2, 8, 9, 11) and branches of 16 channels, small enough for tap products."""
    g = torch.Generator().manual_seed(3)
    x = layout(torch.randn(2, 8, 9, 11, generator=g), kind)
    brs = [layout(torch.randn(2, 16, s, s + 1, generator=g), kind) for s in (1, 2, 5)]
    return x, brs, torch.randn(4, 56, k, k, generator=g), torch.randn(4, generator=g)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("x_first", [True, False])
def test_upsample_concat_conv2d_fast_path_equals_the_general_path_and_pytorch(monkeypatch, kind, k, x_first):
    monkeypatch.setattr(functional, "_FAST_UC_CONV", collections.OrderedDict())
    x, brs, w, b = _uc_conv_inputs(kind, k)
    plan = functional._choose_plan(2, 8, [16] * 3, [tuple(t.shape[-2:]) for t in brs], 4, k, 9, 11)
    assert plan.taps == [0, 1, 2]  # the fast path runs the kernel op
    first = pe.upsample_concat_conv2d(x, brs, w, b, x_first=x_first)  # the general path, which keeps the setup
    assert len(functional._FAST_UC_CONV) == 1
    planned = []
    monkeypatch.setattr(functional, "_uc_conv_setup", lambda *args: planned.append(args))
    again = pe.upsample_concat_conv2d(x, brs, w, b, size=(9, 11), x_first=x_first)
    assert not planned  # served from the cache
    assert torch.equal(again, first) and again.stride() == first.stride()
    ups = [F.interpolate(t, size=(9, 11), mode="bilinear", align_corners=False) for t in brs]
    want = F.conv2d(torch.cat([x] + ups if x_first else ups + [x], 1), w, b, padding=k // 2)
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)
    assert again.is_contiguous(memory_format=torch.channels_last) == (kind == "channels_last")


def test_upsample_concat_conv2d_fast_path_keeps_the_general_paths_errors(monkeypatch):
    monkeypatch.setattr(functional, "_FAST_UC_CONV", collections.OrderedDict())
    x, brs, w, b = _uc_conv_inputs("nchw")
    pe.upsample_concat_conv2d(x, brs, w, b)
    for _ in range(2):  # a rejected call's key is never kept
        with pytest.raises(ValueError, match="odd square kernel"):
            pe.upsample_concat_conv2d(x, brs, torch.randn(4, 56, 2, 2), b)
        with pytest.raises(ValueError, match="weight has 57 input channels"):
            pe.upsample_concat_conv2d(x, brs, torch.randn(4, 57, 1, 1), b)
        with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
            pe.upsample_concat_conv2d(x, brs, w, torch.randn(5))
        with pytest.raises(ValueError, match="has batch size 1"):
            pe.upsample_concat_conv2d(x, [brs[0][:1]] + brs[1:], w, b)
        with pytest.raises(ValueError, match="must equal x's height and width"):
            pe.upsample_concat_conv2d(x, brs, w, b, size=(9, 12))
    assert len(functional._FAST_UC_CONV) == 1
    pe.upsample_concat_conv2d(x, brs, w, b, backend="torch")  # a named Python backend: the general path
    pe.upsample_concat_conv2d(x.double(), brs, w.double(), b.double())  # promotion: the general path
    assert len(functional._FAST_UC_CONV) == 1


def _uc_conv_cpp_inputs(kind):
    """x (2, 32, 8, 8) (64 pixels: the product kernel's NCHW planes) and branches of 32
    channels at 1x1, 2x2 and 3x3: a plan of tap products only, which the C++ path computes."""
    g = torch.Generator().manual_seed(5)
    x = layout(torch.randn(2, 32, 8, 8, generator=g), kind)
    brs = [layout(torch.randn(2, 32, s, s, generator=g), kind) for s in (1, 2, 3)]
    return x, brs, torch.randn(8, 128, 1, 1, generator=g), torch.randn(8, generator=g)


def _python_runs(monkeypatch):
    """Calls of the Python computation (_uc_conv_run), which the C++ fast path does not make."""
    runs = []
    run = functional._uc_conv_run
    monkeypatch.setattr(functional, "_uc_conv_run", lambda *a, **k: runs.append(1) or run(*a, **k))
    return runs


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_concat_conv2d_cpp_path_gives_the_python_paths_bits(monkeypatch, kind, align_corners, x_first, bias):
    if not _extension._C._pointwise_product_available():
        pytest.skip("the product kernel has no copy for this CPU: the C++ path declines (tested below)")
    x, brs, w, b = _uc_conv_cpp_inputs(kind)
    b = b if bias else None
    plan = functional._choose_plan(2, 32, [32] * 3, [(s, s) for s in (1, 2, 3)], 8, 1, 8, 8)
    assert plan.taps == [0, 1, 2] and plan.chunks == 1
    runs = _python_runs(monkeypatch)
    with torch.no_grad():
        first = pe.upsample_concat_conv2d(x, brs, w, b, align_corners=align_corners, x_first=x_first)
        assert runs == [1]  # the general path, which registers the sizes
        again = pe.upsample_concat_conv2d(x, tuple(brs), w, b, size=(8, 8), align_corners=align_corners,
                                          x_first=x_first)
    assert runs == [1]  # served in C++
    assert torch.equal(again, first) and again.stride() == first.stride()
    ups = [F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=align_corners) for t in brs]
    want = F.conv2d(torch.cat([x] + ups if x_first else ups + [x], 1), w, b)
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)
    assert again.is_contiguous(memory_format=torch.channels_last) == (kind == "channels_last")
    # x's product is written once: the shift-add adds into it (no second output of x's size)
    assert again.data_ptr() != first.data_ptr()


def test_upsample_concat_conv2d_cpp_path_declines_what_it_does_not_compute(monkeypatch):
    if not _extension._C._pointwise_product_available():
        pytest.skip("the product kernel has no copy for this CPU")
    x, brs, w, b = _uc_conv_cpp_inputs("channels_last")
    with torch.no_grad():
        want = pe.upsample_concat_conv2d(x, brs, w, b)  # registers
    runs = _python_runs(monkeypatch)

    def python_ran(fn):
        runs.clear()
        out = fn()
        torch.testing.assert_close(out.as_subclass(torch.Tensor), want, rtol=1e-5, atol=1e-5)
        return bool(runs)

    class Sub(torch.Tensor):
        pass

    def with_grad():
        return pe.upsample_concat_conv2d(x.detach().requires_grad_(), brs, w, b).detach()

    def under_dispatch_mode():
        with CountOps() as mode:
            out = pe.upsample_concat_conv2d(x, brs, w, b)
        assert "upsample_shift_add" in mode.ops  # the mode sees the ops
        return out

    def under_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pe.upsample_concat_conv2d(x, brs, w, b)
        return out.float()

    def forward_ad():
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            out = pe.upsample_concat_conv2d(fwAD.make_dual(x, torch.ones_like(x)), brs, w, b)
            return fwAD.unpack_dual(out).primal

    def other_branch_layout():
        return pe.upsample_concat_conv2d(x, [brs[0], brs[1].contiguous(), brs[2]], w, b)

    with torch.no_grad():
        assert not python_ran(lambda: pe.upsample_concat_conv2d(x, brs, w, b))
    assert not python_ran(lambda: pe.upsample_concat_conv2d(x, brs, w, b))  # grad mode, nothing requires grad
    declined = [
        with_grad,
        under_dispatch_mode,
        forward_ad,  # a tangent: the C++ path would drop it
        other_branch_layout,
        lambda: pe.upsample_concat_conv2d(x.as_subclass(Sub), brs, w, b),
        lambda: pe.upsample_concat_conv2d(x, brs, w, b, size=[8, 8]),  # a list: the general path's rules
        lambda: pe.upsample_concat_conv2d(x, brs, w, b, backend="torch"),  # a named Python backend
    ]
    for i, fn in enumerate(declined):
        assert python_ran(fn), i
    runs.clear()
    with torch.no_grad():
        under_autocast()
    assert runs
    # a later call of the registered sizes is served again
    assert not python_ran(lambda: pe.upsample_concat_conv2d(x, brs, w, b))


def test_upsample_concat_conv2d_cpp_path_registered_by_a_later_call_without_grad(monkeypatch):
    if not _extension._C._pointwise_product_available():
        pytest.skip("the product kernel has no copy for this CPU")
    x, brs, w, b = _uc_conv_cpp_inputs("nchw")
    runs = _python_runs(monkeypatch)
    w.requires_grad_()
    pe.upsample_concat_conv2d(x, brs, w, b).sum().backward()  # with autograd: nothing registered
    assert _extension._C._uc_conv_forget() == 0
    w.requires_grad_(False)
    for _ in range(3):
        pe.upsample_concat_conv2d(x, brs, w, b)
    assert runs == [1, 1]  # the general path, its cached setup (which registers), then C++
    assert _extension._C._uc_conv_forget() == 1


def test_upsample_concat_conv2d_cpp_path_not_registered_for_other_plans(monkeypatch):
    runs = _python_runs(monkeypatch)
    x, brs, w, b = _uc_conv_cpp_inputs("nchw")
    cases = [
        (x[..., :7].contiguous(), brs, w, b),  # 56 pixels: x's NCHW product is not the kernel's
        (x, brs[:1], w[:, :64], b),  # one branch: its product is not one call with others
        (x, brs, torch.randn(8, 128, 3, 3), b),  # a 3x3 kernel
        (x, brs + [torch.randn(2, 32, 8, 8)], torch.randn(8, 160, 1, 1), b),  # a branch at x's size: concatenated
    ]
    for args in cases:
        for _ in range(3):
            pe.upsample_concat_conv2d(*args)
    assert len(runs) == 3 * len(cases)
    assert _extension._C._uc_conv_forget() == 0


# The fast paths' gate (csrc/fast_call_gate.cpp): whether a call goes to the compiled
# op, read in C++ from Python's own state (use_backend's thread-local stack,
# os.environ, the ONNX exporters' flags). It must agree with backends.resolve.
def _resolves_to_cpp(backend, device_type, op):
    try:
        return backends.resolve(backend, torch.device(device_type), op) == "cpp"
    except (RuntimeError, ValueError):  # a named backend that cannot serve, an invalid name
        return False


@pytest.mark.parametrize("op", ["multi_pool2d", "upsample_concat", "upsample_shift_add"])
def test_gate_agrees_with_resolve(monkeypatch, op):
    gate = _extension._C._compiled_serves
    names = [None, "cpp", "auto", "torch", "triton", "nope"]
    for env in [None, "", "cpp", "auto", "torch", "bogus"]:
        if env is None:
            monkeypatch.delenv(backends.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(backends.ENV_VAR, env)
        for stack in [[], [None], ["torch"], ["cpp"], ["torch", None], ["cpp", "torch"], ["torch", "auto"]]:
            with contextlib.ExitStack() as contexts:
                for name in stack:
                    contexts.enter_context(pe.use_backend(name))
                for backend in names:
                    for device_type in ["cpu", "cuda", "meta"]:
                        want = _resolves_to_cpp(backend, device_type, op)
                        assert gate(backend, device_type, op) == want, (env, stack, backend, device_type)


def test_gate_reads_each_threads_own_use_backend():
    gate = _extension._C._compiled_serves
    seen = {}

    def other():
        seen["other"] = gate(None, "cpu", "multi_pool2d")
        with pe.use_backend("torch"):
            seen["other, torch"] = gate(None, "cpu", "multi_pool2d")

    with pe.use_backend("torch"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        seen["main, torch"] = gate(None, "cpu", "multi_pool2d")
    seen["main"] = gate(None, "cpu", "multi_pool2d")
    assert seen == {"other": True, "other, torch": False, "main, torch": False, "main": True}


def test_gate_declines_during_an_onnx_export(monkeypatch):
    from pyramid_ext import export

    gate = _extension._C._compiled_serves
    flags = export.onnx_flag_objects()
    assert len(flags) == 2, "this torch has both exporters' flags"
    assert gate(None, "cpu", "multi_pool2d")
    for obj, attr in zip(flags, ["_is_onnx_exporting", "in_onnx_export"]):
        with monkeypatch.context() as m:
            m.setattr(obj, attr, True)
            assert export.onnx_flags_set() and not gate(None, "cpu", "multi_pool2d")
            x = rand((1, 2, 6, 6))
            assert functional._fast_pool(x, BINS, 0, None, "adaptive", None, "f") is None
    assert gate(None, "cpu", "multi_pool2d")


def test_fast_paths_follow_the_backend_in_force(monkeypatch, pool_cache):
    """use_backend("cpp") and PYRAMID_EXT_BACKEND=cpp keep the fast path; "torch" in either
    sends the call to the torch backend; an invalid environment value raises, naming it."""
    x = rand((1, 2, 6, 6))
    pe.multi_adaptive_avg_pool2d(x, BINS)
    assert pool_cache._pool_cache_size() == 1
    fast = ["multi_pool2d"] + ["as_strided"] * 4
    with pe.use_backend("cpp"):
        assert _ops_of(lambda: pe.multi_adaptive_avg_pool2d(x, BINS)) == fast
    monkeypatch.setenv(backends.ENV_VAR, "cpp")
    assert _ops_of(lambda: pe.multi_adaptive_avg_pool2d(x, BINS)) == fast
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert "multi_pool2d" not in _ops_of(lambda: pe.multi_adaptive_avg_pool2d(x, BINS))
    assert "upsample_concat" not in _ops_of(lambda: pe.upsample_concat(x, [rand((1, 2, 3, 3))]))
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        pe.multi_adaptive_avg_pool2d(x, BINS)
    with pytest.raises(ValueError, match="backend"):
        pe.multi_adaptive_avg_pool2d(x, BINS, backend="nope")


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_traces_the_general_path_with_an_entry_cached(strict):
    """The fast paths are skipped in Python only under dynamo (is_dynamo_compiling);
    non-strict torch.export runs the Python on FakeTensors, which the C++ checks
    decline: the graph holds the general path's ops, not the cached call's aliases."""

    class Pyramid(torch.nn.Module):
        def forward(self, x):
            levels = pe.multi_adaptive_avg_pool2d(x, BINS)
            return pe.upsample_concat(x, levels), pe.spatial_pyramid_pool(x, (2, 1))

    x = rand((2, 4, 9, 7))
    want = Pyramid()(x)  # fills the caches
    program = torch.export.export(Pyramid(), (x,), strict=strict)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("pyramid_ext.multi_pool2d.default") == 2 and "aten.as_strided.default" not in targets
    torch.testing.assert_close(program.module()(x), want)
