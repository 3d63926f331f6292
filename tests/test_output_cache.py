"""The CPU output-buffer cache (csrc/cpu/output_buffers.h, pyramid_ext.memory).

Large CPU outputs (8 MiB and up) reuse buffers that earlier outputs of the same
size freed. What must hold: a reused buffer gives the same numbers as a fresh
one (whatever the previous owner left in it), no two live tensors share a
buffer, the limit bounds what is kept, and the cache survives threads and fork.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import pyramid_ext as pe

from .conftest import need_backend

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _cpp_and_clean_cache():
    need_backend("cpp")
    previous = pe.set_cpu_cache_limit(1 << 30)
    pe.empty_cache()
    yield
    pe.set_cpu_cache_limit(previous)
    pe.empty_cache()


def _eager_concat(x, levels, size):
    return torch.cat([x] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in levels], 1)


def _inputs(channels_last, c=512, hw=64):
    torch.manual_seed(0)
    x = torch.randn(1, c, hw, hw)
    levels = [torch.randn(1, c // 4, b, b) for b in (1, 2, 3, 6)]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        levels = [t.contiguous(memory_format=torch.channels_last) for t in levels]
    return x, levels


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_reused_concat_output_is_exact_whatever_it_held(channels_last):
    x, levels = _inputs(channels_last)
    ref = _eager_concat(x, levels, (64, 64))
    first = pe.upsample_concat(x, levels, backend="cpp")
    assert first.nbytes >= 8 * MIB
    address = first.data_ptr()
    first.fill_(float("nan"))  # what the next owner finds in the buffer
    del first
    before = pe.cpu_cache_stats()
    assert before["cached_buffers"] == 1
    again = pe.upsample_concat(x, levels, backend="cpp")
    after = pe.cpu_cache_stats()
    assert again.data_ptr() == address and after["hits"] == before["hits"] + 1
    assert again.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_reused_x_gradient_is_exact_whatever_it_held(mode, channels_last):
    x, _ = _inputs(channels_last)
    pool = pe.multi_adaptive_avg_pool2d if mode == "avg" else pe.multi_adaptive_max_pool2d
    eager_pool = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
    bins = (1, 2, 3, 6)
    grads = [torch.randn(1, x.shape[1], b, b) for b in bins]

    def x_grad(fn):
        xr = x.detach().requires_grad_()
        outs = fn(xr)
        return torch.autograd.grad(outs, xr, grads)[0]

    ref = x_grad(lambda t: [eager_pool(t, b) for b in bins])
    first = x_grad(lambda t: pool(t, bins, backend="cpp"))
    assert first.nbytes >= 8 * MIB
    address = first.data_ptr()
    first.fill_(float("nan"))
    del first
    hits = pe.cpu_cache_stats()["hits"]
    again = x_grad(lambda t: pool(t, bins, backend="cpp"))
    assert again.data_ptr() == address and pe.cpu_cache_stats()["hits"] == hits + 1
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-6)


def test_reused_conv_output_is_exact_whatever_it_held():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 64, 64)
    branches = [torch.randn(1, 256, b, b) for b in (1, 2, 3, 6)]  # wide: one output chunk of tap products
    weight = torch.randn(512, 16 + 4 * 256, 3, 3) / 100
    ref = F.conv2d(_eager_concat(x, branches, (64, 64)), weight, padding=1)
    first = pe.upsample_concat_conv2d(x, branches, weight, backend="cpp")
    first.fill_(float("nan"))
    del first
    hits = pe.cpu_cache_stats()["hits"]
    again = pe.upsample_concat_conv2d(x, branches, weight, backend="cpp")
    assert pe.cpu_cache_stats()["hits"] > hits
    torch.testing.assert_close(again, ref, rtol=1e-4, atol=1e-4)


def test_live_outputs_never_share_a_buffer():
    x, levels = _inputs(False, c=256)
    live = [pe.upsample_concat(x, levels, backend="cpp") for _ in range(3)]
    del live[1]  # one buffer back in the cache, then taken again below
    live += [pe.upsample_concat(x, levels, backend="cpp") for _ in range(3)]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in live)
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert end <= begin, "two live outputs overlap"
    for i, t in enumerate(live):  # each holds its own values
        t.fill_(i)
    assert [t.unique().tolist() for t in live] == [[float(i)] for i in range(len(live))]


def test_limit_bounds_what_is_kept_and_empty_cache_frees_it():
    x, levels = _inputs(False, c=256)  # outputs of 8 MiB
    nbytes = pe.upsample_concat(x, levels, backend="cpp").nbytes
    pe.empty_cache()
    outs = [pe.upsample_concat(x, levels, backend="cpp") for _ in range(3)]
    pe.set_cpu_cache_limit(2 * nbytes)
    del outs
    stats = pe.cpu_cache_stats()
    assert stats["cached_buffers"] == 2 and stats["cached_bytes"] == 2 * nbytes <= stats["limit_bytes"]
    assert pe.set_cpu_cache_limit(nbytes) == 2 * nbytes  # shrinking frees the oldest now
    assert pe.cpu_cache_stats()["cached_bytes"] == nbytes
    assert pe.empty_cache() == nbytes
    assert pe.cpu_cache_stats()["cached_bytes"] == 0
    pe.set_cpu_cache_limit(0)
    misses = pe.cpu_cache_stats()["misses"]
    del x
    x, levels = _inputs(False, c=256)
    for _ in range(2):
        pe.upsample_concat(x, levels, backend="cpp")
    stats = pe.cpu_cache_stats()
    assert stats["cached_bytes"] == 0 and stats["misses"] == misses + 2


def test_small_outputs_bypass_the_cache():
    x, levels = _inputs(False, c=32, hw=32)
    before = pe.cpu_cache_stats()
    out = pe.upsample_concat(x, levels, backend="cpp")
    del out
    assert pe.cpu_cache_stats() == before


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit_is_a_value_error(bad):
    with pytest.raises(ValueError, match="limit_bytes"):
        pe.set_cpu_cache_limit(bad)


def test_resizing_an_output_works():
    x, levels = _inputs(False, c=256)
    out = pe.upsample_concat(x, levels, backend="cpp")
    ref = out.clone()
    out.resize_(2, *out.shape[1:])
    torch.testing.assert_close(out[:1], ref)
    out[1:] = 3.0
    assert out[1:].eq(3.0).all()


def test_threads_share_the_cache_safely():
    x, levels = _inputs(False, c=256)
    ref = _eager_concat(x, levels, (64, 64))
    errors = []
    start = threading.Barrier(4)

    def work(k):
        try:
            start.wait()
            for i in range(8):
                out = pe.upsample_concat(x, levels, backend="cpp")
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
                out.fill_(k * 100 + i)  # a buffer shared with another thread would change under it
                assert out.eq(k * 100 + i).all()
        except Exception as e:  # reported below, with the thread
            errors.append((k, e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _child_concat(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP's pool does not survive fork
    x, levels = _inputs(False, c=256)
    hits = pe.cpu_cache_stats()["hits"]
    out = pe.upsample_concat(x, levels, backend="cpp")
    exact = bool(torch.allclose(out, _eager_concat(x, levels, (64, 64)), rtol=1e-5, atol=1e-5))
    queue.put((exact, pe.cpu_cache_stats()["hits"] - hits))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_uses_the_cache_it_inherited():
    keep = [pe.upsample_concat(*_inputs(False, c=256), backend="cpp") for _ in range(2)]
    del keep  # the child inherits two cached buffers
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_concat, args=(queue,))
    child.start()
    child.join(120)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5) == (True, 1)


@pytest.mark.parametrize("value, expect", [("0", "limit_bytes 0"), ("12", f"limit_bytes {12 * MIB}"),
                                           ("lots", "PYRAMID_EXT_CPU_CACHE_LIMIT_MB")])
def test_limit_from_the_environment(value, expect):
    code = ("import torch, pyramid_ext as pe\n"
            "x = torch.randn(1, 256, 64, 64)\n"
            "try:\n"
            "    pe.upsample_concat(x, [x[:, :8, :2, :2]], backend='cpp')\n"
            "    print('limit_bytes', pe.cpu_cache_stats()['limit_bytes'])\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, PYRAMID_EXT_CPU_CACHE_LIMIT_MB=value)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout


# The cache's buffers are written with streaming stores where whole lines are
# written (csrc/cpu/simd_loops_body.inc store_or_stream): upsample_concat's
# channels_last output when every part is at a multiple of 16 channels, its
# NCHW output of 16 MiB or more when planes are contiguous whole lines; the
# gradients of x.
# The test switch no_streaming_stores writes the same outputs with plain
# stores; the values must not differ by a bit, on any ISA copy.
_STREAM_CASES = {
    "cl-aligned": (True, 256, 48, 64),  # 256 + 4 * 64 channels: streamed
    "cl-odd-channels": (True, 333, 45, 47),  # 333 + 4 * 83: plain stores
    "nchw-planes": (False, 256, 45, 47),  # planes of 2115 floats, not whole lines: plain stores
    "nchw-aligned": (False, 256, 64, 64),  # 16 MiB: streamed (under 16 MiB NCHW outputs are not)
}


@contextlib.contextmanager
def _switch(name, value):
    from pyramid_ext import _C

    _C._set_test_override(name, value)
    try:
        yield
    finally:
        _C._set_test_override(name, 0)


def _isas():
    from pyramid_ext import _C

    return [i for i in (1, 2, 3) if _C._simd_isa_available(i)]


@pytest.mark.parametrize("case", list(_STREAM_CASES))
def test_streamed_concat_equals_plain_stores_bitwise_on_every_isa(case):
    channels_last, c, h, w = _STREAM_CASES[case]
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c, h, w).contiguous(memory_format=fmt)
    levels = [torch.randn(2, c // 4, b, b).contiguous(memory_format=fmt) for b in (1, 2, 3, 6)]
    ref = _eager_concat(x, levels, (h, w))
    for isa in _isas():
        with _switch("simd_isa", isa):
            misses = pe.cpu_cache_stats()["misses"]
            fresh = pe.upsample_concat(x, levels, backend="cpp")
            assert fresh.nbytes >= 8 * MIB and pe.cpu_cache_stats()["misses"] == misses + 1  # one of the cache's
            with _switch("no_streaming_stores", 1):
                plain = pe.upsample_concat(x, levels, backend="cpp")
            out = torch.full_like(fresh, float("nan"))  # the caller's out=: plain stores
            pe.upsample_concat(x, levels, backend="cpp", out=out)
        assert torch.equal(fresh, plain) and torch.equal(fresh, out), f"isa {isa}"
        torch.testing.assert_close(fresh, ref, rtol=1e-5, atol=1e-5)
        del fresh, plain
        pe.empty_cache()


def _check_streamed_gradient(backward, ref, addend, rtol):
    """backward(addend or None), a gradient of x of 8 MiB or more: streamed (the default) equal to plain
    stores bit for bit on every ISA copy, and to eager's gradient `ref` (+ addend) within rtol."""
    for isa in _isas():
        for add in (None, addend):
            with _switch("simd_isa", isa):
                fresh = backward(add)
                assert fresh.nbytes >= 8 * MIB
                with _switch("no_streaming_stores", 1):
                    plain = backward(add)
            assert torch.equal(fresh, plain), f"isa {isa}, addend {add is not None}"
            want = ref if add is None else ref + addend
            torch.testing.assert_close(fresh, want, rtol=rtol, atol=1e-6, equal_nan=True)
            del fresh, plain


# (N, C, H, W), layout: channels_last rows of W * C floats (whole lines when a
# multiple of 16), NCHW planes of H * W floats; bins (4, 2, 1) and (1, 2, 3, 6).
_MAX_STREAM_CASES = {
    "cl-rows": ((2, 512, 48, 48), True),  # 4.5 MiB samples
    "cl-rows-not-lines": ((2, 1025, 33, 33), True),  # W * C odd: plain stores
    "nchw-planes": ((4, 512, 32, 32), False),
    "nchw-planes-not-lines": ((5, 257, 45, 43), False),
}


@pytest.mark.parametrize("case", list(_MAX_STREAM_CASES))
@pytest.mark.parametrize("bins", [(4, 2, 1), (1, 2, 3, 6)], ids=["spp", "ppm"])
def test_streamed_max_gradient_equals_plain_stores_bitwise(case, bins):
    from pyramid_ext.windows import pyramid_windows

    shape, channels_last = _MAX_STREAM_CASES[case]
    n, c, h, w = shape
    torch.manual_seed(1)
    x = torch.randn(shape)
    x[0, :, 3, 5] = float("nan")  # a NaN wins its windows; ties: every value appears twice in sample 1
    x[1] = x[1].flatten(1)[:, torch.arange(h * w) // 2].view(c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    hb, wb, lb = pyramid_windows(h, w, [(b, b) for b in bins])
    vals, idx = torch.ops.pyramid_ext.multi_pool2d(x, list(hb), list(wb), list(lb), 1, False)
    grad = torch.randn(vals.shape)
    addend = torch.randn(n, 2 * c, h, w)[:, c // 2: c // 2 + c]  # a channel slice, as the pyramid modules pass

    def backward(add):
        return torch.ops.pyramid_ext.multi_pool2d_backward(grad, idx, list(shape), list(hb), list(wb), list(lb), 1,
                                                           False, channels_last, add)

    xr = x.detach().requires_grad_()
    eager = torch.cat([F.adaptive_max_pool2d(xr, b).flatten(1) for b in bins], 1)  # the packed layout
    (ref,) = torch.autograd.grad(eager, xr, grad.view(n, -1))
    _check_streamed_gradient(backward, ref, addend, rtol=1e-6)


_AVG_STREAM_CASES = {
    "cl-rows": ((2, 512, 48, 48), True),
    "cl-rows-not-lines": ((2, 1025, 33, 33), True),  # W * C odd: plain stores
    "nchw-planes": ((4, 512, 32, 32), False),
    "nchw-planes-not-lines": ((5, 257, 45, 43), False),
}


@pytest.mark.parametrize("case", list(_AVG_STREAM_CASES))
def test_streamed_avg_gradient_equals_plain_stores_bitwise(case):
    from pyramid_ext.windows import pyramid_windows

    shape, channels_last = _AVG_STREAM_CASES[case]
    n, c, h, w = shape
    bins = (1, 2, 3, 6)
    torch.manual_seed(2)
    hb, wb, lb = pyramid_windows(h, w, [(b, b) for b in bins])
    total = sum(b * b for b in bins)
    grad = torch.randn(n, c * total)
    addend = torch.randn(n, 2 * c, h, w)[:, c // 2: c // 2 + c]

    def backward(add):
        return torch.ops.pyramid_ext.multi_pool2d_backward(grad, None, list(shape), list(hb), list(wb), list(lb), 0,
                                                           False, channels_last, add)

    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xr = x.requires_grad_()
    eager = torch.cat([F.adaptive_avg_pool2d(xr, b).flatten(1) for b in bins], 1)  # the packed layout
    (ref,) = torch.autograd.grad(eager, xr, grad)
    _check_streamed_gradient(backward, ref, addend, rtol=1e-5)
