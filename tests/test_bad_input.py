"""Bad input, every error class per public function and module: each case
asserts the exact exception class and that the message names the argument."""
import re
import sys
import types

import pytest
import torch
import torch.nn as nn

import pyramid_ext as pe
from pyramid_ext.convert import ConversionError

from .conftest import need_backend

X = torch.randn(2, 3, 8, 8)
BR = [torch.randn(2, 2, 2, 2)]
AVG, MAX, SPP, UP = pe.multi_adaptive_avg_pool2d, pe.multi_adaptive_max_pool2d, pe.spatial_pyramid_pool, pe.upsample_concat
POOLS = [("avg", AVG), ("max", MAX), ("spp", SPP)]


def _pool_cases():
    cases = []
    for tag, fn in POOLS:
        fname = fn.__name__
        cases += [
            # types and ranks
            (f"{tag}-x-list", lambda fn=fn: fn([[1.0]]), TypeError, rf"{fname}\(\): x must be a torch.Tensor"),
            (f"{tag}-x-none", lambda fn=fn: fn(None), TypeError, r"x must be a torch.Tensor"),
            (f"{tag}-x-2d", lambda fn=fn: fn(torch.randn(8, 8)), ValueError, r"x must be a 3-D .* or 4-D"),
            (f"{tag}-x-5d", lambda fn=fn: fn(torch.randn(1, 1, 1, 8, 8)), ValueError, r"x must be a 3-D .* or 4-D"),
            # sizes
            (f"{tag}-x-zero-h", lambda fn=fn: fn(torch.randn(1, 2, 0, 8)), ValueError, r"x must have non-zero height"),
            (f"{tag}-x-zero-w", lambda fn=fn: fn(torch.randn(1, 2, 8, 0)), ValueError, r"x must have non-zero height"),
            (f"{tag}-x-zero-hw-3d", lambda fn=fn: fn(torch.randn(2, 0, 0)), ValueError, r"x must have non-zero"),
            # dtypes
            (f"{tag}-x-int", lambda fn=fn: fn(X.long()), TypeError, r"x must be a floating-point tensor.*int64"),
            (f"{tag}-x-uint8", lambda fn=fn: fn(X.to(torch.uint8)), TypeError, r"x must be a floating-point.*uint8"),
            (f"{tag}-x-bool", lambda fn=fn: fn(X > 0), TypeError, r"x must be a floating-point tensor.*bool"),
            (f"{tag}-x-complex", lambda fn=fn: fn(X.to(torch.complex64)), TypeError, r"x must be a floating-point.*complex"),
            # bins
            (f"{tag}-bins-zero", lambda fn=fn: fn(X, 0), ValueError, r"bins entries must be positive, got 0"),
            (f"{tag}-bins-negative", lambda fn=fn: fn(X, [2, -1]), ValueError, r"bins entries must be positive, got -1"),
            (f"{tag}-bins-pair-zero", lambda fn=fn: fn(X, [(2, 0)]), ValueError, r"bins entries must be positive"),
            (f"{tag}-bins-float", lambda fn=fn: fn(X, [1.5]), TypeError, r"bins entries must be ints or \(h, w\) pairs"),
            (f"{tag}-bins-float-scalar", lambda fn=fn: fn(X, 2.0), TypeError, r"bins must be a sequence"),
            (f"{tag}-bins-bool", lambda fn=fn: fn(X, [True]), TypeError, r"bins entries must be ints"),
            (f"{tag}-bins-str", lambda fn=fn: fn(X, "12"), TypeError, r"bins entries must be ints"),
            (f"{tag}-bins-none", lambda fn=fn: fn(X, None), TypeError, r"bins must be a sequence"),
            (f"{tag}-bins-empty", lambda fn=fn: fn(X, []), ValueError, r"bins must name at least one bin"),
            (f"{tag}-bins-triple", lambda fn=fn: fn(X, [(1, 2, 3)]), TypeError, r"bins entries must be ints or \(h, w\)"),
            (f"{tag}-bins-single", lambda fn=fn: fn(X, [(1,)]), TypeError, r"bins entries must be ints or \(h, w\)"),
            (f"{tag}-bins-pair-float", lambda fn=fn: fn(X, [(1, 2.0)]), TypeError, r"bins entries must be ints"),
            # window policies
            (f"{tag}-window-unknown", lambda fn=fn: fn(X, window="same"), ValueError, r"window must be one of"),
            (f"{tag}-window-none", lambda fn=fn: fn(X, window=None), ValueError, r"window must be one of"),
            (f"{tag}-window-sppnet-impossible", lambda fn=fn: fn(torch.randn(1, 1, 5, 5), [3], window="sppnet"),
             ValueError, r"window='sppnet' cannot pool a size of 5 into 3 bins"),
            (f"{tag}-window-sppnet-too-many-bins", lambda fn=fn: fn(torch.randn(1, 1, 4, 9), [6], window="sppnet"),
             ValueError, r"window='sppnet' cannot pool a size of 4 into 6 bins"),
            (f"{tag}-window-keras-too-many-bins", lambda fn=fn: fn(torch.randn(1, 1, 2, 2), [6], window="keras_same"),
             ValueError, r"window='keras_same' cannot pool a size of 2 into 6 bins"),
            # backend
            (f"{tag}-backend-unknown", lambda fn=fn: fn(X, backend="cudnn"), ValueError, r"backend must be one of"),
            (f"{tag}-backend-int", lambda fn=fn: fn(X, backend=1), ValueError, r"backend must be one of"),
        ]
    cases.append(("spp-mode", lambda: SPP(X, mode="sum"), ValueError, r"mode must be 'max' or 'avg', got 'sum'"))
    cases.append(("spp-mode-none", lambda: SPP(X, mode=None), ValueError, r"mode must be 'max' or 'avg'"))
    return cases


def _out(*shape, **kw):
    return torch.empty(*shape, **kw)


UP_CASES = [
    # types and ranks
    ("branches-tensor", lambda: UP(X, BR[0]), TypeError, r"branches must be a list of tensors, got a single Tensor"),
    ("branches-none", lambda: UP(X, None), TypeError, r"branches must be a list of tensors, got NoneType"),
    ("branches-int", lambda: UP(X, 3), TypeError, r"branches must be a list of tensors, got int"),
    ("branches-entry-list", lambda: UP(X, [[1.0]]), TypeError, r"branches\[0\] must be a torch.Tensor"),
    ("branches-entry-none", lambda: UP(X, [BR[0], None]), TypeError, r"branches\[1\] must be a torch.Tensor"),
    ("x-list", lambda: UP([1.0], BR), TypeError, r"x must be a torch.Tensor or None"),
    ("x-3d", lambda: UP(X[0], BR), ValueError, r"x must be a 4-D"),
    ("x-5d", lambda: UP(X[None], BR), ValueError, r"x must be a 4-D"),
    ("branch-3d", lambda: UP(X, [BR[0][0]]), ValueError, r"branches\[0\] must be a 4-D"),
    # sizes
    ("x-zero-h", lambda: UP(torch.randn(2, 3, 0, 8), BR), ValueError, r"x must have non-zero height and width"),
    ("x-zero-w", lambda: UP(torch.randn(2, 3, 8, 0), BR), ValueError, r"x must have non-zero height and width"),
    ("branch-zero-h", lambda: UP(X, [torch.randn(2, 2, 0, 2)]), ValueError, r"branches\[0\] must have non-zero"),
    ("branch-zero-w", lambda: UP(X, [BR[0], torch.randn(2, 2, 2, 0)]), ValueError, r"branches\[1\] must have non-zero"),
    ("batch-mismatch", lambda: UP(X, [torch.randn(3, 2, 2, 2)]), ValueError, r"branches\[0\] has batch size 3 but x has 2"),
    ("batch-mismatch-no-x", lambda: UP(None, [BR[0], torch.randn(1, 1, 2, 2)], size=4), ValueError,
     r"branches\[1\] has batch size 1 but branches\[0\] has 2"),
    ("no-x-no-size", lambda: UP(None, BR), ValueError, r"size is required when x is None"),
    ("no-x-no-branches", lambda: UP(None, [], size=4), ValueError, r"needs x or at least one branch"),
    ("size-differs-from-x", lambda: UP(X, BR, size=(4, 4)), ValueError, r"size \(4, 4\) must equal x's height and width"),
    ("size-zero", lambda: UP(None, BR, size=0), ValueError, r"size must be positive"),
    ("size-negative", lambda: UP(None, BR, size=(3, -1)), ValueError, r"size must be positive"),
    ("size-str", lambda: UP(None, BR, size="ab"), TypeError, r"size must be an int or an \(H, W\) pair"),
    ("size-float", lambda: UP(None, BR, size=(2.5, 3)), TypeError, r"size must be an int or an \(H, W\) pair of ints"),
    ("size-float-scalar", lambda: UP(None, BR, size=2.0), TypeError, r"size must be an int or an \(H, W\) pair"),
    ("size-bool", lambda: UP(None, BR, size=(True, 3)), TypeError, r"size must be an int or an \(H, W\) pair of ints"),
    ("size-triple", lambda: UP(None, BR, size=(2, 3, 4)), TypeError, r"size must be an int or an \(H, W\) pair"),
    # dtypes
    ("x-int", lambda: UP(X.long(), BR), TypeError, r"x must be a floating-point tensor.*int64"),
    ("x-bool", lambda: UP(X > 0, BR), TypeError, r"x must be a floating-point tensor.*bool"),
    ("x-complex", lambda: UP(X.to(torch.complex128), BR), TypeError, r"x must be a floating-point.*complex128"),
    ("branch-int", lambda: UP(X, [BR[0].int()]), TypeError, r"branches\[0\] must be a floating-point.*int32"),
    ("branch-bool", lambda: UP(X, [BR[0] > 0]), TypeError, r"branches\[0\] must be a floating-point.*bool"),
    ("branch-complex", lambda: UP(X, [BR[0].to(torch.complex64)]), TypeError, r"branches\[0\] must be a floating-point"),
    # devices (meta against cpu: the mismatch that can be made without a GPU)
    ("branch-on-meta", lambda: UP(X, [BR[0].to("meta")]), ValueError, r"branches\[0\] is on meta but x is on cpu"),
    ("x-on-meta", lambda: UP(X.to("meta"), BR), ValueError, r"branches\[0\] is on cpu but x is on meta"),
    ("branches-on-two-devices", lambda: UP(None, [BR[0], BR[0].to("meta")], size=4), ValueError,
     r"branches\[1\] is on meta but branches\[0\] is on cpu"),
    # backend
    ("backend-unknown", lambda: UP(X, BR, backend="nope"), ValueError, r"backend must be one of"),
    # out=
    ("out-list", lambda: UP(X, BR, out=[1]), TypeError, r"out must be a torch.Tensor, got list"),
    ("out-shape-channels", lambda: UP(X, BR, out=_out(2, 4, 8, 8)), ValueError, r"out has shape \(2, 4, 8, 8\), expected \(2, 5, 8, 8\)"),
    ("out-shape-batch", lambda: UP(X, BR, out=_out(1, 5, 8, 8)), ValueError, r"out has shape \(1, 5, 8, 8\)"),
    ("out-shape-size", lambda: UP(X, BR, out=_out(2, 5, 8, 9)), ValueError, r"out has shape \(2, 5, 8, 9\)"),
    ("out-rank", lambda: UP(X, BR, out=_out(5, 8, 8)), ValueError, r"out has shape \(5, 8, 8\)"),
    ("out-dtype", lambda: UP(X, BR, out=_out(2, 5, 8, 8, dtype=torch.float64)), TypeError,
     r"out has dtype torch.float64, expected torch.float32"),
    ("out-dtype-int", lambda: UP(X, BR, out=_out(2, 5, 8, 8, dtype=torch.int32)), TypeError, r"out has dtype torch.int32"),
    ("out-device", lambda: UP(X, BR, out=_out(2, 5, 8, 8, device="meta")), ValueError, r"out is on meta, expected cpu"),
    ("out-expanded", lambda: UP(X, BR, out=_out(1, 5, 8, 8).expand(2, 5, 8, 8)), ValueError,
     r"out has elements that share memory"),
    ("out-with-grad", lambda: UP(X.clone().requires_grad_(True), BR, out=_out(2, 5, 8, 8)), RuntimeError,
     r"out= does not support automatic differentiation"),
]


CONV = pe.upsample_concat_conv2d
CW = torch.randn(4, 5, 3, 3)  # weight for X (3 channels) and BR (2 channels)
CONV_CASES = [
    ("branches-tensor", lambda: CONV(X, BR[0], CW), TypeError, r"branches must be a list of tensors, got a single"),
    ("branches-none", lambda: CONV(X, None, CW), TypeError, r"branches must be a list of tensors, got NoneType"),
    ("branches-entry-none", lambda: CONV(X, [None], CW), TypeError, r"branches\[0\] must be a torch.Tensor"),
    ("x-list", lambda: CONV([1.0], BR, CW), TypeError, r"x must be a torch.Tensor or None"),
    ("x-3d", lambda: CONV(X[0], BR, CW), ValueError, r"x must be a 4-D"),
    ("branch-3d", lambda: CONV(X, [BR[0][0]], CW), ValueError, r"branches\[0\] must be a 4-D"),
    ("x-zero-h", lambda: CONV(torch.randn(2, 3, 0, 8), BR, CW), ValueError, r"x must have non-zero height"),
    ("branch-zero-w", lambda: CONV(X, [torch.randn(2, 2, 2, 0)], CW), ValueError, r"branches\[0\] must have non-zero"),
    ("batch-mismatch", lambda: CONV(X, [torch.randn(3, 2, 2, 2)], CW), ValueError,
     r"branches\[0\] has batch size 3 but x has 2"),
    ("no-x-no-size", lambda: CONV(None, BR, CW[:, :2]), ValueError, r"size is required when x is None"),
    ("no-x-no-branches", lambda: CONV(None, [], CW, size=4), ValueError, r"needs x or at least one branch"),
    ("size-differs-from-x", lambda: CONV(X, BR, CW, size=(4, 4)), ValueError, r"size \(4, 4\) must equal x's"),
    ("size-zero", lambda: CONV(None, BR, CW[:, :2], size=0), ValueError, r"size must be positive"),
    ("x-int", lambda: CONV(X.long(), BR, CW), TypeError, r"x must be a floating-point tensor.*int64"),
    ("branch-bool", lambda: CONV(X, [BR[0] > 0], CW), TypeError, r"branches\[0\] must be a floating-point.*bool"),
    ("branch-on-meta", lambda: CONV(X, [BR[0].to("meta")], CW), ValueError, r"branches\[0\] is on meta but x is on cpu"),
    ("weight-none", lambda: CONV(X, BR, None), TypeError, r"weight must be a torch.Tensor, got NoneType"),
    ("weight-3d", lambda: CONV(X, BR, CW[0]), ValueError, r"weight must be a 4-D \(Cout, Cin, K, K\)"),
    ("weight-channels", lambda: CONV(X, BR, CW[:, :4]), ValueError,
     r"weight has 4 input channels but the concatenation has 5"),
    ("weight-even-kernel", lambda: CONV(X, BR, torch.randn(4, 5, 2, 2)), ValueError,
     r"weight must have an odd square kernel \(K, K\), got \(2, 2\)"),
    ("weight-not-square", lambda: CONV(X, BR, torch.randn(4, 5, 3, 1)), ValueError,
     r"weight must have an odd square kernel"),
    ("weight-dtype", lambda: CONV(X, BR, CW.double()), TypeError,
     r"weight has dtype torch.float64 but the inputs have torch.float32"),
    ("weight-on-meta", lambda: CONV(X, BR, CW.to("meta")), ValueError, r"weight is on meta but the inputs are on cpu"),
    ("bias-list", lambda: CONV(X, BR, CW, [0.0] * 4), TypeError, r"bias must be a torch.Tensor or None, got list"),
    ("bias-shape", lambda: CONV(X, BR, CW, torch.zeros(5)), ValueError, r"bias must have shape \(4,\)"),
    ("bias-2d", lambda: CONV(X, BR, CW, torch.zeros(1, 4)), ValueError, r"bias must have shape \(4,\)"),
    ("bias-dtype", lambda: CONV(X, BR, CW, torch.zeros(4, dtype=torch.float64)), TypeError,
     r"bias has dtype torch.float64 but the inputs have torch.float32"),
    ("backend-unknown", lambda: CONV(X, BR, CW, backend="nope"), ValueError, r"backend must be one of"),
]

def _check(fn, exc, match, backend):
    with pytest.raises(exc, match=match) as info:
        with pe.use_backend(backend):
            fn()
    assert type(info.value) is exc, f"raised {type(info.value).__name__}, expected exactly {exc.__name__}"


@pytest.mark.parametrize("case", _pool_cases(), ids=lambda c: c[0])
def test_pooling_bad_input(any_backend, case):
    _, fn, exc, match = case
    _check(fn, exc, match, any_backend)


@pytest.mark.parametrize("case", UP_CASES, ids=lambda c: c[0])
def test_upsample_concat_bad_input(any_backend, case):
    _, fn, exc, match = case
    _check(fn, exc, match, any_backend)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c[0])
def test_upsample_concat_conv2d_bad_input(any_backend, case):
    _, fn, exc, match = case
    _check(fn, exc, match, any_backend)


def test_named_backend_that_cannot_serve(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for fn, args, op in [(AVG, (X,), "multi_pool2d"), (UP, (X, BR), "upsample_concat")]:
        with pytest.raises(RuntimeError, match=rf"backend='triton' cannot run {op} on a cpu tensor") as info:
            fn(*args, backend="triton")
        assert type(info.value) is RuntimeError


def test_backend_env_var_unknown(monkeypatch):
    monkeypatch.setenv("PYRAMID_EXT_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"environment variable PYRAMID_EXT_BACKEND must be one of"):
        AVG(X)
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of"):
        with pe.use_backend("fast"):
            pass


def test_out_overlapping_inputs_is_correct(any_backend):
    """out= sharing memory with x or a branch is not an error: the result is
    the one PyTorch computes from the inputs' values before the call."""
    import torch.nn.functional as F

    buf = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    x = buf[:, :3]  # x is out's own first channels
    br = [torch.randn(2, 2, 3, 3, dtype=torch.float64)]
    want = torch.cat([x.clone(), F.interpolate(br[0], size=(8, 8), mode="bilinear")], 1)
    got = UP(x, br, out=buf, backend=any_backend)
    torch.testing.assert_close(got, want)
    # a branch read from the channels out overwrites
    buf = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    b = buf[:, 3:]  # (2, 2, 8, 8), resized to (8, 8): an identity copy
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = torch.cat([x, b.clone()], 1)
    got = UP(x, [b], out=buf, backend=any_backend)
    torch.testing.assert_close(got, want)


def test_triton_interpreter_with_numpy_it_cannot_use_is_named(monkeypatch):
    # Triton 3.6's interpreter with numpy >= 2.4 fails in every kernel with a
    # cryptic InterpreterError; backend="triton" says why instead, and "auto"
    # does not pick it. (Seen: torch 2.11's Triton 3.6 with numpy 2.4.6.)
    from pyramid_ext import backends

    versions = {"triton": (3, 6), "numpy": (2, 4)}
    monkeypatch.setattr(backends, "_version", lambda module: versions[module])
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends._interpreter_problem.cache_clear()
    try:
        reason = backends._why_not("triton", torch.device("cpu"), "multi_pool2d")
        assert reason is not None and "numpy 2.4" in reason and "Triton >= 3.8" in reason
        assert "triton" not in backends.available_backends("cpu")
        with pytest.raises(RuntimeError, match=r"backend='triton' cannot run .*Triton 3\.6's interpreter"):
            pe.multi_adaptive_avg_pool2d(torch.randn(1, 2, 4, 4), (1, 2), backend="triton")
        versions["numpy"] = (2, 3)  # an older numpy: no objection
        backends._interpreter_problem.cache_clear()
        assert backends._interpreter_problem() is None
        versions.update(triton=(3, 8), numpy=(2, 4))  # a newer Triton: none either
        backends._interpreter_problem.cache_clear()
        assert backends._interpreter_problem() is None
    finally:
        backends._interpreter_problem.cache_clear()


# ------------------------------------------------ out= sharing memory ---
# The rule, every backend: the ops reject an input that overlaps out ("out
# must not overlap <input>"); upsample_concat(out=) copies exactly those
# inputs first (PyTorch's out= semantics), and reads the others in place.


def _overlap_backend(name):
    if name == "triton":
        from pyramid_ext import backends

        if not (backends.triton_installed() and backends.triton_interpret()):
            pytest.skip("Triton runs here only under TRITON_INTERPRET=1 (the CUDA-environment CI step runs this file)")
    need_backend(name)
    return name


@pytest.fixture(params=["cpp", "torch", "triton"])
def out_backend(request):
    return _overlap_backend(request.param)


def _cpp_has_old_alias_rule() -> bool:
    """Whether the compiled CPU op still rejects every input that shares out's
    storage ("out must not alias an input"), disjoint or not: the rule before
    at::get_overlap_status (csrc/ is changed on another branch)."""
    buf = torch.zeros(1, 4, 2, 2)
    try:
        torch.ops.pyramid_ext.upsample_concat_out(buf[:, :2], [], False, True, buf[:, 2:])
    except RuntimeError as e:
        return "must not alias" in str(e)
    return False


def _op_out_error(backend, name):
    """The op-level error for an input `name` overlapping out. The compiled
    op's message before the csrc/ change names no input: accepted until then."""
    named = rf"{re.escape(name)}(?![\w\[])"  # the name itself: "x", not the x of "x_first"
    if backend == "cpp":
        return rf"(out must not overlap.*{named}|out must not alias an input)"
    return rf"out must not overlap {named}"


def _entry(backend):
    from pyramid_ext import backends

    backends.resolve(backend, torch.device("cpu"), "upsample_concat")  # loads the entry
    return backends.implementation(backend)


def _spy_out_op(monkeypatch, backend):
    """Records the data pointers of the tensors the backend's out= op gets."""
    entry = _entry(backend)
    original = entry.upsample_concat_out
    calls = []

    def spy(x, branches, align_corners, x_first, out):
        calls.append(([x.data_ptr()] if x is not None else []) + [b.data_ptr() for b in branches] + [out.data_ptr()])
        return original(x, branches, align_corners, x_first, out)

    monkeypatch.setattr(entry, "upsample_concat_out", spy)
    return calls


def _up(t, size, align_corners=False):
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=align_corners)


def test_out_is_x(out_backend, monkeypatch):
    """x is out's own memory (out=buf, x=buf; and x = out's first channels,
    written after a branch overwrote them): the result is x before the call."""
    buf = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    want = buf.clone()
    calls = _spy_out_op(monkeypatch, out_backend)
    got = UP(buf, [], out=buf, backend=out_backend)
    assert got is buf and torch.equal(buf, want)
    assert calls[0][0] != buf.data_ptr()  # x was copied
    buf = torch.randn(1, 5, 6, 6, dtype=torch.float64)
    x = buf[:, :3]  # contiguous (a batch of one): read in place unless copied
    br = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    want = torch.cat([_up(br, (6, 6)), x.clone()], 1)
    got = UP(x, [br], x_first=False, out=buf, backend=out_backend)
    assert got is buf
    torch.testing.assert_close(buf, want, rtol=1e-12, atol=1e-12)


def test_out_branch_is_view_of_out(out_backend, monkeypatch):
    """A branch that is a contiguous view of out's memory, sample for sample
    (its batch stride is out's): resized from its values before the call."""
    buf = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    br = buf.view(2, 4, 16, 4)
    want = _up(br.clone(), (8, 8))
    calls = _spy_out_op(monkeypatch, out_backend)
    got = UP(None, [br], size=(8, 8), out=buf, backend=out_backend)
    assert got is buf and calls[0][0] != br.data_ptr()
    torch.testing.assert_close(buf, want, rtol=1e-12, atol=1e-12)
    # with x in front: the branch spans out's memory, x does not touch it
    buf = torch.randn(2, 7, 8, 8, dtype=torch.float64)
    br = buf.view(2, 4, 28, 4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = torch.cat([x, _up(br.clone(), (8, 8), True)], 1)
    got = UP(x, [br], align_corners=True, out=buf, backend=out_backend)
    assert got is buf
    torch.testing.assert_close(buf, want, rtol=1e-12, atol=1e-12)


def test_out_disjoint_slices_of_one_buffer_not_copied(out_backend, monkeypatch):
    """x, out and a branch are disjoint channel slices of one buffer (a batch
    of one, so each slice is contiguous): written in place, nothing copied."""
    if out_backend == "cpp" and _cpp_has_old_alias_rule():
        pytest.xfail("the compiled op still rejects any input sharing out's storage (the csrc/ change to "
                     "at::get_overlap_status is on another branch)")
    buf = torch.randn(1, 10, 6, 6, dtype=torch.float64)
    x, out, br = buf[:, 0:3], buf[:, 3:8], buf[:, 8:10]
    want = torch.cat([x, br], 1).clone()
    calls = _spy_out_op(monkeypatch, out_backend)
    got = UP(x, [br], out=out, backend=out_backend)
    assert got is out and got.data_ptr() == buf[:, 3].data_ptr()
    assert calls == [[x.data_ptr(), br.data_ptr(), out.data_ptr()]]  # the inputs themselves, no copies
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(buf[:, 0:3], want[:, 0:3], rtol=0, atol=0)  # x untouched


def test_out_op_rejects_overlapping_inputs(out_backend):
    """The ops themselves (the backend table's upsample_concat_out, below the
    public function's copies) reject an input overlapping out, naming it."""
    op = _entry(out_backend).upsample_concat_out
    buf = torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match=_op_out_error(out_backend, "x")):
        op(buf, [], False, True, buf)
    buf = torch.randn(2, 4, 8, 8)
    other = torch.randn(2, 1, 3, 3)
    with pytest.raises(RuntimeError, match=_op_out_error(out_backend, "branches[0]")):
        op(None, [buf.view(2, 4, 16, 4)], False, True, buf)
    buf = torch.randn(2, 5, 8, 8)
    with pytest.raises(RuntimeError, match=_op_out_error(out_backend, "branches[1]")):
        op(None, [other, buf.view(2, 4, 10, 8)], False, True, buf)
    # partial overlap: x is out's first channel and two channels before it
    buf = torch.randn(1, 7, 4, 4)
    with pytest.raises(RuntimeError, match=_op_out_error(out_backend, "x")):
        op(buf[:, 0:3], [torch.randn(1, 2, 2, 2)], False, True, buf[:, 2:7])


def test_out_op_accepts_disjoint_slices(out_backend):
    if out_backend == "cpp" and _cpp_has_old_alias_rule():
        pytest.xfail("the compiled op still rejects any input sharing out's storage (the csrc/ change to "
                     "at::get_overlap_status is on another branch)")
    op = _entry(out_backend).upsample_concat_out
    buf = torch.randn(1, 9, 5, 5, dtype=torch.float64)
    x, out, br = buf[:, 6:9], buf[:, 1:6], buf[:, 0:1]  # out between its inputs
    small = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    want = torch.cat([x, br, _up(small, (5, 5))], 1).clone()
    op(x, [br, small], False, True, out)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------- modules ---


MODULE_CASES = [
    ("PyramidPooling-gn-groups", lambda: pe.nn.PyramidPooling(30, 10, norm="gn", gn_groups=4), ValueError,
     r"norm='gn': 10 channels are not divisible into gn_groups=4"),
    ("PyramidPooling-norm", lambda: pe.nn.PyramidPooling(32, norm="ln"), ValueError, r"norm must be None, 'bn'"),
    ("PyramidPooling-act", lambda: pe.nn.PyramidPooling(32, act="gelu"), ValueError, r"act must be None, 'relu'"),
    ("PyramidPooling-branch-channels", lambda: pe.nn.PyramidPooling(2, bins=(1, 2, 3)), ValueError,
     r"PyramidPooling\(\): branch_channels must be positive, got 0"),
    ("PyramidPooling-bins-zero", lambda: pe.nn.PyramidPooling(8, bins=[0]), ValueError,
     r"PyramidPooling\(\): bins entries must be positive"),
    ("PyramidPooling-bins-empty", lambda: pe.nn.PyramidPooling(8, bins=[]), ValueError,
     r"PyramidPooling\(\): bins must name at least one bin"),
    ("PyramidPooling-bins-float", lambda: pe.nn.PyramidPooling(8, bins=[1.5]), TypeError,
     r"PyramidPooling\(\): bins entries must be ints"),
    ("PyramidPooling-out-kernel-size", lambda: pe.nn.PyramidPooling(8, out_channels=4, out_kernel_size=2),
     ValueError, r"PyramidPooling\(\): out_kernel_size must be odd"),
    ("PyramidPooling-forward-3d", lambda: pe.nn.PyramidPooling(8, 2, norm=None)(torch.randn(8, 4, 4)), ValueError,
     r"x must be a 4-D"),
    ("PyramidPooling-forward-int", lambda: pe.nn.PyramidPooling(8, 2, norm=None)(torch.ones(1, 8, 4, 4).long()),
     TypeError, r"x must be a floating-point tensor"),
    ("PyramidPooling-forward-zero-h", lambda: pe.nn.PyramidPooling(8, 2, norm=None)(torch.randn(1, 8, 0, 4)),
     ValueError, r"x must have non-zero height and width"),
    # the wrong channel count: the branch conv's own error, as the unfused module raises it
    ("PyramidPooling-forward-channels", lambda: pe.nn.PyramidPooling(8, 2, norm=None)(torch.randn(1, 7, 4, 4)),
     RuntimeError, r"to have 8 channels, but got 7 channels"),
    ("PyramidPooling-bn-1x1-batch-1", lambda: pe.nn.PyramidPooling(8, 2).train()(torch.randn(1, 8, 4, 4)),
     ValueError, r"PyramidPooling.branches\[0\] \(bin 1x1\): BatchNorm2d in training mode"),
    ("SpatialPyramidPooling-mode", lambda: pe.nn.SpatialPyramidPooling(mode="sum"), ValueError,
     r"SpatialPyramidPooling\(\): mode must be 'max' or 'avg'"),
    ("SpatialPyramidPooling-window", lambda: pe.nn.SpatialPyramidPooling(window="x"), ValueError,
     r"SpatialPyramidPooling\(\): window must be one of"),
    ("SpatialPyramidPooling-levels", lambda: pe.nn.SpatialPyramidPooling(levels=[0]), ValueError,
     r"SpatialPyramidPooling\(\): levels entries must be positive"),
    ("SpatialPyramidPooling-forward-sppnet", lambda: pe.nn.SpatialPyramidPooling([3], window="sppnet")(
        torch.randn(1, 1, 5, 5)), ValueError, r"window='sppnet' cannot pool a size of 5 into 3 bins"),
    ("SpatialPyramidPooling-forward-2d", lambda: pe.nn.SpatialPyramidPooling()(torch.randn(5, 5)), ValueError,
     r"x must be a 3-D .* or 4-D"),
    ("PPM-forward-channels", lambda: pe.nn.PPM(4, 2, (1, 2)).eval()(torch.randn(1, 3, 8, 8)), RuntimeError,
     r"to have 4 channels, but got 3 channels"),
    ("PPM-bn-1x1-batch-1", lambda: pe.nn.PPM(4, 2, (1, 2)).train()(torch.randn(1, 4, 8, 8)), ValueError,
     r"PPM.features\[0\] \(bin 1x1\): BatchNorm2d in training mode"),
    ("PSPModule-forward-channels", lambda: pe.nn.PSPModule(4, 8, (1, 2))(torch.randn(1, 3, 8, 8)), RuntimeError,
     r"to have 4 channels, but got 3 channels"),
    ("PSPModule-forward-int", lambda: pe.nn.PSPModule(4, 8, (1, 2))(torch.ones(1, 4, 8, 8).long()), TypeError,
     r"x must be a floating-point tensor"),
    ("FeaturePyramidAttention-forward-int", lambda: pe.nn.FeaturePyramidAttention(4, 8)(
        torch.ones(1, 4, 16, 16).long()), TypeError, r"x must be a floating-point tensor"),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: c[0])
def test_module_bad_input(any_backend, case):
    _, fn, exc, match = case
    _check(fn, exc, match, any_backend)


def test_pspnet_bad_arguments():
    pytest.importorskip("torchvision")  # PSPNet's backbone; the CUDA-environment suite has it
    for kwargs, match in [(dict(layers=34), r"PSPNet\(\): layers must be 50, 101 or 152"),
                          (dict(classes=1), r"PSPNet\(\): classes must be at least 2"),
                          (dict(zoom_factor=3), r"PSPNet\(\): zoom_factor must be 1, 2, 4 or 8"),
                          (dict(bins=(1, 2, 3)), r"PSPNet\(\): 2048 channels must divide evenly")]:
        with pytest.raises(ValueError, match=match) as info:
            pe.nn.PSPNet(**kwargs)
        assert type(info.value) is ValueError


def test_pspnet_without_torchvision_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now raises ImportError
    with pytest.raises(ImportError, match=r"PSPNet needs torchvision.*pip install") as info:
        pe.nn.PSPNet()
    assert type(info.value) is ImportError


# --------------------------------------------------------------- convert ---


def test_convert_not_a_module():
    with pytest.raises(TypeError, match=r"convert\(\): model must be an nn.Module, got str") as info:
        pe.convert("model")
    assert type(info.value) is TypeError


@pytest.fixture
def fake_aspp(monkeypatch):
    """A stand-in for torchvision's ASPPPooling class (convert recognises
    classes by module and name among the loaded modules), so the cases where
    convert cannot convert are testable without torchvision."""
    mod = types.ModuleType("torchvision.models.segmentation.deeplabv3")

    class ASPPPooling(nn.Sequential):  # torchvision's forward: pool, conv..., resize back
        def forward(self, x):
            size = x.shape[-2:]
            for mod in self:
                x = mod(x)
            return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)

    ASPPPooling.__module__ = mod.__name__
    mod.ASPPPooling = ASPPPooling
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return ASPPPooling


def test_convert_reports_what_it_cannot_convert(fake_aspp):
    model = nn.Sequential(
        fake_aspp(nn.Conv2d(2, 2, 1), nn.AdaptiveAvgPool2d(1)),  # not Sequential(AdaptiveAvgPool2d, ...)
        fake_aspp(nn.AdaptiveAvgPool2d((None, 2)), nn.Conv2d(2, 2, 1)),  # no fixed bin
    )
    report = pe.convert(model)
    assert len(report) == 0
    assert [name for name, _ in report.skipped] == ["0", "1"]
    assert "is not Sequential(AdaptiveAvgPool2d, ...)" in report.skipped[0][1]
    assert "is not a fixed (h, w)" in report.skipped[1][1]
    text = str(report)
    assert "left alone: " in text and "ASPPPooling" in text
    # the root module itself cannot be replaced in place
    root = pe.convert(fake_aspp(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2, 2, 1)))
    assert root.skipped == [("<root>", root.skipped[0][1])]
    assert "the root module cannot be replaced in place" in root.skipped[0][1]
    # nothing recognised at all
    assert str(pe.convert(nn.Sequential(nn.Conv2d(1, 1, 1)))) == "convert(): no recognised pyramid module"


def test_convert_mismatch_raises_and_undoes(fake_aspp, monkeypatch):
    need_backend("cpp")
    conv = sys.modules["pyramid_ext.convert"]  # (pe.convert is the function)

    example = torch.randn(1, 2, 5, 5)
    make = lambda: nn.Sequential(fake_aspp(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2, 2, 1)))  # noqa: E731
    # the stand-in converts and checks when the replacement is right
    report = pe.convert(make(), example_input=example)
    assert report.names == ["0"] and report[0].checked
    # A replacement that computes something else (values, then shape): convert
    # notices on the example, raises ConversionError naming the module, undoes.
    for wrong, match in [(lambda self, x: torch.zeros_like(x) + 1, r"'0'.*does not match"),
                         (lambda self, x: x[..., :1, :], r"'0'.*gives shape \(1, 2, 1, 5\), the original \(1, 2, 5, 5\)")]:
        model = make()
        original = model[0]
        monkeypatch.setattr(conv.FusedASPPPooling, "forward", wrong)
        with pytest.raises(ConversionError, match=match) as info:
            pe.convert(model, example_input=example)
        assert type(info.value) is ConversionError
        assert model[0] is original
