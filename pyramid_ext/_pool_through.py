"""Pyramid pooling that hands x on, so that x's gradient is written once.

In a pyramid module x feeds two ops: the pooling, and the concatenation
(``upsample_concat(x, branches)``), which hands back grad_out's x slice as
x's gradient. Left to autograd, the two contributions reach x from two nodes:
the pooling backward writes a fresh x-sized gradient and autograd adds the
slice to it (``aten::add``), so the x gradient goes through memory three
times. Here the pooling is one autograd node that also returns x itself
(``x_through``); the concatenation is given ``x_through``, so autograd
delivers both contributions to this one node, whose backward is one
``multi_pool2d_backward(..., addend=x_slice)`` call: the pooling gradient is
added to the slice, read through its strides, as grad_x is written.

The backward calls the backend's backward op, which has autograd of its own
(``_ops.make_pool_backward_autograd``, the addend's derivative included), so
double backward goes through it as through the plain ops. Only the compiled
and Triton backends have a backward op; elsewhere (the torch backend, ONNX
export, an x that needs no gradient) this is the plain pooling and x itself.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import backends, export
from . import functional as pf
from .plan import POOL_AVG
from .windows import level_shapes, pyramid_windows


def _backward_op(backend: str):
    if backend == "cpp":
        return torch.ops.pyramid_ext.multi_pool2d_backward.default
    if backend == "triton":
        return torch.ops.pyramid_ext.multi_pool2d_backward_triton.default
    return None


class _AvgPoolHandingOnX(torch.autograd.Function):
    """(*levels, x_through) = (*multi_pool2d(x, avg) per level, x); one backward for all."""

    @staticmethod
    def forward(ctx, x, backend: str, h_bounds, w_bounds, level_bins, channels_last_levels: bool):
        impl = backends.implementation(backend)
        values, _ = impl.multi_pool2d(x, h_bounds, w_bounds, level_bins, POOL_AVG, channels_last_levels)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zeros written)
        ctx.backend = backend
        ctx.args = (list(x.shape), list(h_bounds), list(w_bounds), list(level_bins), channels_last_levels,
                    pf._channels_last(x))
        # Each level is an output of this node, an alias of the packed buffer
        # (detach: not a view for autograd, so a tail may modify it in place).
        # Levels sliced outside the node would each send back a packed-sized
        # zero-filled gradient (slice_backward) for autograd to add up; here
        # the backward packs the level gradients with one cat.
        levels = pf._unpack(values, level_bins, x.shape[1], channels_last_levels, False)
        # x itself: autograd returns it as a view whose gradient comes to this node.
        return (*[level.detach() for level in levels], x)

    @staticmethod
    def backward(ctx, *grads):
        shape, h_bounds, w_bounds, level_bins, cl_levels, cl_input = ctx.args
        grad_levels, grad_x_through = grads[:-1], grads[-1]
        if all(g is None for g in grad_levels):
            return grad_x_through, None, None, None, None, None
        grad_values = _pack_levels(grad_levels, level_bins, shape, cl_levels)
        grad_x = _backward_op(ctx.backend)(grad_values, None, shape, h_bounds, w_bounds, level_bins,
                                           POOL_AVG, cl_levels, cl_input, grad_x_through)
        return grad_x, None, None, None, None, None


def _pack_levels(grad_levels, level_bins, shape, channels_last_levels: bool) -> torch.Tensor:
    """The packed (N, C * total) gradient of the levels, in the layout
    ``functional._unpack`` reads, written once: each level's gradient copied
    into its view of one empty buffer, a level without a gradient's view
    zeroed (as ``_C._PoolCall``'s ``pack_level_grads``, csrc/fast_calls.cpp)."""
    n, c = shape[0], shape[1]
    some = next(g for g in grad_levels if g is not None)
    packed = some.new_empty(n, c * sum(bh * bw for bh, bw in level_shapes(level_bins)))
    for g, view in zip(grad_levels, pf._unpack(packed, level_bins, c, channels_last_levels, False)):
        if g is None:
            view.zero_()
        else:
            view.copy_(g)
    return packed


def avg_pool_handing_on_x(x: torch.Tensor, bins) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``(multi_adaptive_avg_pool2d(x, bins), x_through)``: x_through equals x;
    pass it (not x) to the op that also reads x, and the gradients x gets from
    both come to one node (see the module docstring)."""
    fn = "multi_adaptive_avg_pool2d"
    backend = None
    if (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad and x.dim() == 4
            and not export.active() and not export.pool_needs_standard_ops(x, "adaptive", None)):
        # The eager fast path (functional._fast_pool): the compiled ops, the
        # node in C++ (fast_calls.cpp), the windows and level views cached per
        # (shape, bins, ...). Under a functorch transform (which refuses both
        # nodes, this C++ one and _AvgPoolHandingOnX), the plain pooling: the
        # ops' own autograd takes x's two gradients, and autograd adds them.
        if torch._C._are_functorch_transforms_active():
            return pf.multi_adaptive_avg_pool2d(x, bins), x
        call = pf._fast_pool(x, bins, POOL_AVG, None, "adaptive", None, fn)
        if call is not None:
            return call.levels_handing_on_x(x)
        backend = backends.resolve(None, x.device, "multi_pool2d")
    if _backward_op(backend) is None:
        return pf.multi_adaptive_avg_pool2d(x, bins), x
    pairs = pf._pool_args(x, bins, fn)
    x4 = pf._dense(x)
    h_bounds, w_bounds, level_bins = pyramid_windows(x4.shape[-2], x4.shape[-1], pairs, "adaptive")
    channels_last_levels = pf._channels_last(x4)
    *levels, x_through = _AvgPoolHandingOnX.apply(x4, backend, h_bounds, w_bounds, level_bins, channels_last_levels)
    return levels, x_through
