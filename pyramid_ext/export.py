"""The ONNX export path of the public ops: standard torch ops only.

During ``torch.onnx.export`` (either exporter: ``torch.onnx.is_in_onnx_export()``
is true under both, and false under ``torch.export`` and ``torch.compile``) the
public functions in ``pyramid_ext.functional`` call the functions here instead
of the fused ops, so the exported graph holds only standard ONNX operators (no
custom domain, no ATen fallback) and runs in any ONNX runtime.

The pooling windows are computed *in the graph* from the runtime size, with
the formulas of ``pyramid_ext.windows`` written as integer arithmetic on the
size (a Python int in eager mode, a ``SymInt`` under the dynamo exporter, a
0-d int64 tensor under the TorchScript exporter), so a model exported with
dynamic H and W pools exactly at every size, including bins larger than the
input:

- average pooling: ``P_h @ x @ P_w^T`` with window matrices
  ``P[i, h] = [start_i <= h < end_i] / (end_i - start_i)`` (one MatMul reads x
  once for every level), accumulated in float32 for 16-bit inputs;
- max pooling: per window a Gather of ``K`` positions ``min(start + k, end - 1)``
  (``K`` bounds the longest window; the repeated last position cannot change
  a maximum or the first argmax), ArgMax and the value there, along W then H;
- bilinear upsampling: ``F.interpolate``, exported as ONNX ``Resize`` with
  ``half_pixel`` (``align_corners=False``) or ``align_corners`` coordinates,
  which equal PyTorch's source-index formula at every size (output size 1
  included); the concatenation is one ``Concat`` in the module's order.

What the path guarantees: the values PyTorch computes (max exactly, averages
to float rounding: the sums are formed in another order). Max windows
holding NaN are NaN, as in PyTorch (propagated explicitly: ONNX's max
reductions need not, and onnxruntime's do not); +-inf are ordinary values there.
Averages assume finite inputs: an inf or NaN in an average window reaches,
through the MatMul (0 * inf = NaN), every window sharing its rows or columns.
``return_indices=True`` gives PyTorch's flat indices (first maximum in
row-major order) for inputs without NaN. Sizes where a window
policy is undefined (``sppnet`` when ``kernel``/``stride`` do not give the
requested bins, ``keras_same`` when ``round(a/n) == 0``) raise in PyTorch; the
exported graph cannot raise, so its level is NaN at such sizes.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import windows
from .windows import WINDOW_POLICIES

__all__ = ["active", "axis_windows", "multi_pool2d", "upsample_concat", "ExportUnsupportedError"]


class ExportUnsupportedError(RuntimeError):
    """A call the ONNX export path cannot express (raised during export only)."""


_onnx_state = None  # (flags module, TorchScript exporter globals), imported on the first call


def active() -> bool:
    """True while a model is being exported to ONNX (either exporter).

    ``torch.onnx.is_in_onnx_export()``, reading its two flags directly: it
    imports both modules on every call, a cost every public call would pay."""
    if torch.compiler.is_compiling():  # dynamo knows this function, not the flags' getters
        return torch.onnx.is_in_onnx_export()
    return onnx_flags_set()


def onnx_flag_objects() -> tuple:
    """(the dynamo exporter's flags module, the TorchScript exporter's
    globals), whose ``_is_onnx_exporting`` and ``in_onnx_export`` say that an
    export runs, imported on the first call; () where this torch has not
    both (then ``torch.onnx.is_in_onnx_export()`` answers)."""
    global _onnx_state
    if _onnx_state is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

            _flags._is_onnx_exporting, GLOBALS.in_onnx_export  # noqa: B018 (both exist)
            _onnx_state = (_flags, GLOBALS)
        except (ImportError, AttributeError):
            _onnx_state = ()
    return _onnx_state


def onnx_flags_set() -> bool:
    """``active()`` outside torch.compile: the two exporters' flags (the eager
    fast paths, which have checked that they are not compiling, read only
    these; the C++ ones read the same objects, csrc/fast_call_gate.cpp)."""
    state = _onnx_state if _onnx_state is not None else onnx_flag_objects()
    if not state:
        return torch.onnx.is_in_onnx_export()
    flags, torchscript_globals = state
    return bool(torchscript_globals.in_onnx_export or flags._is_onnx_exporting)


def _symbolic(v) -> bool:
    return isinstance(v, torch.SymInt) and not isinstance(v.node.maybe_as_int(), int)


def pool_needs_standard_ops(x, window: str, backend: Optional[str]) -> bool:
    """True where a pooling call must take this module's standard-op path.

    Always during ONNX export. Under ``torch.export`` only for ``keras_same``
    with a symbolic height or width: its window count, ``ceil(a / round(a /
    n))``, is a function of the size, and the fused op's window list (an int
    list whose length is that count) cannot be symbolic, so torch.export would
    pin H and W. The standard-op path computes the windows in the graph, with
    the count as an unbacked size (see ``axis_windows``). A backend the caller
    named is never replaced: that raises.
    """
    if active():
        return True
    if window != "keras_same" or not torch.compiler.is_exporting():
        return False
    if not isinstance(x, torch.Tensor) or not any(_symbolic(v) for v in x.shape[-2:]):
        return False
    from .backends import requested_backend

    named = requested_backend(backend)
    if named not in ("auto", "torch"):
        raise ExportUnsupportedError(
            f"window='keras_same' with a dynamic height or width cannot run on backend={named!r} under "
            "torch.export (its window count depends on the size, which the fused op's window list cannot "
            "express); leave backend unset (or 'torch') to export it as standard ops, or export with static sizes")
    return True


# --------------------------------------------------------------------------
# Integer arithmetic on sizes that may be ints, SymInts or 0-d tensors
# --------------------------------------------------------------------------


def _tensor(v, device) -> torch.Tensor:
    """v as a 0-d int64 tensor, without a guard on a SymInt."""
    if isinstance(v, torch.Tensor):
        return v.to(torch.int64)
    return torch.zeros((), dtype=torch.int64, device=device) + v


def _max(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(_tensor(a, None), _tensor(b, None))
    return torch.sym_max(a, b)


def _example_size(v) -> Optional[int]:
    """The example input's value of a size (int, SymInt or traced 0-d tensor)."""
    if isinstance(v, int):
        return v
    if isinstance(v, torch.SymInt):
        return v.node.hint if isinstance(v.node.hint, int) else None
    with warnings.catch_warnings():  # the tracer warns that the value is not traced: it is only checked
        warnings.simplefilter("ignore")
        return int(v)


def _ceil_div(a, n):
    """ceil(a / n) for a >= 0, n > 0, without negative operands (ONNX integer
    Div truncates; floor and truncation agree on non-negative values)."""
    return (a + n - 1) // n


def axis_windows(size, n: int, window: str, device=None):
    """Windows of one axis, computed from ``size`` as graph arithmetic.

    Returns ``(start, end, valid, longest)``: int64 tensors of shape
    (count,), a 0-d bool tensor (False where the policy is undefined at this
    size), and an int-like upper bound on ``end - start``. ``count`` is ``n``
    for ``adaptive`` and ``sppnet``, ``ceil(a / round(a / n))`` for
    ``keras_same``. Same windows as ``pyramid_ext.windows`` wherever that
    defines them (tests/test_export.py compares the two at many sizes).
    """
    if window == "adaptive":
        i = torch.arange(n, dtype=torch.int64, device=device)
        start = (i * size) // n
        end = _ceil_div((i + 1) * size, n)
        # end - start < size / n + 2
        return start, end, torch.ones((), dtype=torch.bool, device=device), size // n + 2
    if window == "sppnet":
        kernel = _ceil_div(size, n)
        stride = size // n
        count = (size - kernel) // _max(stride, 1) + 1
        valid = (_tensor(stride, device) > 0) & (_tensor(count, device) == n)
        i = torch.arange(n, dtype=torch.int64, device=device)
        start = i * stride
        return start, start + kernel, valid, kernel
    if window == "keras_same":
        # pool = round(a / n) with round-half-to-even, in integers (no guard):
        # with a = q n + r, [2r > n] = 2r // (n + 1) and [2r == n] = 2r // n - 2r // (n + 1).
        q = size // n
        twice_r = 2 * (size - q * n)
        above = twice_r // (n + 1)
        half = twice_r // n - above
        pool = q + above + half * (q % 2)
        valid = _tensor(pool, device) > 0
        if _symbolic(size) and not active():
            return _keras_same_unbacked(size, pool, valid, device)
        pool = _max(pool, 1)
        count = _ceil_div(size, pool)
        pad_before = _max(count * pool - size, 0) // 2
        i = torch.arange(count, dtype=torch.int64, device=device)
        raw = i * pool - pad_before
        start = torch.clamp(raw, min=0)
        end = torch.minimum(raw + pool, _tensor(size, device))
        return start, end, valid, pool
    raise ValueError(f"window must be one of {WINDOW_POLICIES}, got {window!r}")


def _keras_same_unbacked(size, pool, valid, device):
    """keras_same's windows under torch.export with a symbolic size.

    Used as SymInts, ``max(pool, 1)`` and the count are expressions the
    symbolic-shape solver cannot prove positive (they appear in strides as
    ``Max(1, count)``), so its guards would pin the size. As unbacked sizes
    read from tensors, with runtime asserts that they are >= 1 (true at every
    size), they stay symbolic; the exported program computes them per call.
    """
    pool_t = torch.clamp(_tensor(pool, device), min=1)
    count_t = _ceil_div(_tensor(size, device), pool_t)
    pool_u = pool_t.item()
    torch._check(pool_u >= 1)
    count_u = count_t.item()
    torch._check(count_u >= 1)
    pad_before = torch.clamp(count_t * pool_t - size, min=0) // 2
    raw = torch.arange(count_u, dtype=torch.int64, device=device) * pool_t - pad_before
    start = torch.clamp(raw, min=0)
    end = torch.minimum(raw + pool_t, _tensor(size, device))
    return start, end, valid, pool_u


# --------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------


def _avg_matrix(start: torch.Tensor, end: torch.Tensor, size, dtype) -> torch.Tensor:
    """(count, size): row i averages positions [start_i, end_i)."""
    pos = torch.arange(size, dtype=torch.int64, device=start.device)
    inside = (pos.unsqueeze(0) >= start.unsqueeze(1)) & (pos.unsqueeze(0) < end.unsqueeze(1))
    return inside.to(dtype) / (end - start).to(dtype).unsqueeze(1)


def _gather_positions(start: torch.Tensor, end: torch.Tensor, longest) -> torch.Tensor:
    """(count, K) positions min(start + k, end - 1), k < K; flattened for a Gather."""
    k = torch.arange(longest, dtype=torch.int64, device=start.device)
    return torch.minimum(start.unsqueeze(1) + k.unsqueeze(0), (end - 1).unsqueeze(1))


def _window_max(x: torch.Tensor, dim: int, start, end, longest, fixed_count: Optional[int]):
    """Max over each window of axis ``dim``; returns (values, first argmax within the window)."""
    pos = _gather_positions(start, end, longest)
    g = _split_axis(x.index_select(dim, pos.reshape(-1)), dim, fixed_count, longest)
    # ArgMax (first maximum, as ONNX's default select_last_index=0) and a gather of
    # its value, not ReduceMax: the dynamo exporter cannot convert ReduceMax to
    # opset 17 when its axes are computed (onnx's axes_input_to_attribute adapter)
    arg = torch.argmax(g, dim + 1, keepdim=True)
    values = torch.gather(g, dim + 1, arg).squeeze(dim + 1)
    # PyTorch's max pooling propagates NaN; ONNX's max reductions need not (onnxruntime's do not)
    has_nan = torch.isnan(g).to(g.dtype).sum(dim + 1) > 0
    values = torch.where(has_nan, torch.full_like(values, float("nan")), values)
    return values, arg.squeeze(dim + 1)


def _window_mean(x: torch.Tensor, dim: int, start, end, longest):
    """Mean over each window of axis ``dim`` (window count not fixed)."""
    pos = _gather_positions(start, end, longest)
    k = torch.arange(longest, dtype=torch.int64, device=start.device)
    inside = k.unsqueeze(0) < (end - start).unsqueeze(1)  # (count, K): repeated positions excluded
    shape = [1] * x.dim() + [1]
    shape[dim], shape[dim + 1] = -1, longest  # broadcast over the other axes
    g = _split_axis(x.index_select(dim, pos.reshape(-1)), dim, None, longest)
    total = torch.where(inside.reshape(shape), g, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim + 1)
    length = (end - start).to(x.dtype).reshape(shape[:dim + 1] + shape[dim + 2:])
    return total / length


def _split_axis(t: torch.Tensor, dim: int, fixed_count: Optional[int], longest) -> torch.Tensor:
    """Axis ``dim`` of length count * K split into (count, K). The shape is
    built from t's own sizes, which the TorchScript exporter traces (a size
    passed to ``unflatten`` would be frozen to the export size)."""
    inner = [fixed_count, -1] if fixed_count is not None else [-1, longest]
    return t.reshape(list(t.shape[:dim]) + inner + list(t.shape[dim + 1:]))


def multi_pool2d(x: torch.Tensor, bins: Sequence[Tuple[int, int]], mode: str, window: str,
                 return_indices: bool = False) -> Tuple[List[torch.Tensor], Optional[List[torch.Tensor]]]:
    """Per-level pooled maps of ``x`` ((N, C, H, W) or (C, H, W)): lists of (N, C, bh, bw).

    ``bins``: normalized (bh, bw) pairs; ``mode``: "avg" or "max". With
    ``return_indices`` (max only) also the flat ``h * W + w`` indices.
    """
    if window not in WINDOW_POLICIES:
        raise ValueError(f"window must be one of {WINDOW_POLICIES}, got {window!r}")
    unbatched = x.dim() == 3
    x4 = x.unsqueeze(0) if unbatched else x
    height, width = x4.shape[-2], x4.shape[-1]
    device = x4.device
    if window != "adaptive" and (active() or torch.compiler.is_exporting()):
        # the example input must be one the policy accepts, as in eager mode (the
        # graph cannot raise: at other sizes where it is undefined it gives NaN)
        example = (_example_size(height), _example_size(width))
        if None not in example:
            windows.pyramid_windows(example[0], example[1], bins, window)
    fixed = window != "keras_same"  # adaptive and sppnet always give the requested bins
    rows = [axis_windows(height, bh, window, device) for bh, _ in bins]
    cols = [axis_windows(width, bw, window, device) for _, bw in bins]
    values: List[torch.Tensor] = []
    indices: List[torch.Tensor] = []

    if mode == "avg":
        acc = torch.float64 if x4.dtype == torch.float64 else torch.float32
        xa = x4.to(acc)
        if fixed:  # one MatMul over x for the W side of every level
            pw = torch.cat([_avg_matrix(s, e, width, acc) for s, e, _, _ in cols], 0)
            per_level = torch.matmul(xa, pw.transpose(0, 1)).split([bw for _, bw in bins], -1)
            for (s, e, _, _), y in zip(rows, per_level):
                values.append(torch.matmul(_avg_matrix(s, e, height, acc), y).to(x4.dtype))
        else:
            # keras_same: the window count depends on the size; the MatMuls' shape
            # checks would make the dynamo exporter pin it, so gather and sum instead
            for (hs, he, _, hk), (ws, we, _, wk) in zip(rows, cols):
                y = _window_mean(xa, 3, ws, we, wk)
                values.append(_window_mean(y, 2, hs, he, hk).to(x4.dtype))
    elif mode == "max":
        for (bh, bw), (hs, he, _, hk), (ws, we, _, wk) in zip(bins, rows, cols):
            v, w_arg = _window_max(x4, 3, ws, we, wk, bw if fixed else None)  # (N, C, H, bw)
            v, h_arg = _window_max(v, 2, hs, he, hk, bh if fixed else None)  # (N, C, bh, bw)
            values.append(v)
            if return_indices:
                # the column of the maximum in the row that won along H
                w_pos = ws + w_arg  # (N, C, H, bw)
                rows_pos = _gather_positions(hs, he, hk)
                w_pos = _split_axis(w_pos.index_select(2, rows_pos.reshape(-1)), 2, bh if fixed else None, hk)
                w_pos = torch.gather(w_pos, 3, h_arg.unsqueeze(3)).squeeze(3)
                h_pos = hs.unsqueeze(1) + h_arg
                indices.append(h_pos * width + w_pos)
    else:
        raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")

    if window != "adaptive":  # NaN where the policy is undefined at this size
        for k, ((_, _, h_ok, _), (_, _, w_ok, _)) in enumerate(zip(rows, cols)):
            values[k] = torch.where(h_ok & w_ok, values[k], torch.full_like(values[k], float("nan")))
    if unbatched:
        values = [v[0] for v in values]
        indices = [i[0] for i in indices]
    return values, (indices if return_indices else None)


def spatial_pyramid_pool(x: torch.Tensor, bins, mode: str, window: str) -> torch.Tensor:
    """(N, C * sum(bh * bw)): every level flattened (c, i, j), level after level."""
    values, _ = multi_pool2d(x, bins, mode, window)
    return torch.cat([v.flatten(-3) for v in values], -1)


# --------------------------------------------------------------------------
# Upsample + concat
# --------------------------------------------------------------------------


def upsample_concat(x: Optional[torch.Tensor], branches: Sequence[torch.Tensor], size, align_corners: bool,
                    x_first: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``cat([x] + [interpolate(b, size)] ...)`` (x first, last or absent) in standard ops."""
    if out is not None:
        raise ExportUnsupportedError(
            "upsample_concat(): out= writes into an existing tensor in place, which the ONNX export path cannot "
            "express; call it without out= (the result is the same)")
    ups = [F.interpolate(b, size=(size[0], size[1]), mode="bilinear", align_corners=align_corners)
           for b in branches]
    parts = ups if x is None else ([x] + ups if x_first else ups + [x])
    return torch.cat(parts, 1)
