"""torch.func support for the compiled ops (the "cpp" backend) and Triton's.

vmap: each op's batching rule (multi_pool2d, upsample_concat,
upsample_shift_add and their backward ops, in either backend) folds the vmapped
dimension into the ops' own batch dimension N (every op treats samples
independently), calls the op once and splits the result again; without a rule,
vmap ran multi_pool2d once per vmapped slice (PyTorch's batched fallback) and
could not run upsample_concat at all (a ``Tensor[]`` argument has no fallback).

grad, vjp, jacrev (nested too, e.g. jacrev(jacrev(f))): the compiled ops'
autograd is a C++ ``torch::autograd::Function`` (csrc/autograd.cpp), which
functorch's grad transforms refuse, and they refuse torch.library's autograd
(the backward ops', every Triton op's) as well (its generated Function has no
``setup_context``). Under such a transform both backends call the ops through
the Python ``torch.autograd.Function``s below instead (``functions(suffix)``,
one set per backend): the same formulas (``_ops.make_pool_autograd`` and the
rest; upsample_concat_conv2d's kernel op ``upsample_shift_add`` too), with
``setup_context``, as functorch requires; the backward ops get Functions of
their own. Only there: elsewhere the C++ node is the cheaper one.

Forward mode inside a grad transform (``torch.func.hessian``, ``jacfwd`` or
``jvp`` of ``grad``): each Function's ``jvp``. Every op here is linear in its
tensor inputs (max pooling at its recorded argmax), so an output's tangent is
the op (through these Functions, so it is differentiable again) of the inputs'
tangents, zeros standing in where an input has none; max pooling's is a gather
at the indices.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _ops

_ops_ns = torch.ops.pyramid_ext


def grad_transform_active() -> bool:
    """Whether a functorch transform that records gradients (grad, vjp, jacrev)
    is active: the C++ autograd Function raises there."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())


# --------------------------------------------------------------------------
# grad transforms: Python autograd Functions over one backend's ops
# --------------------------------------------------------------------------
# Each forward runs below the transform's grad level, where the op's own
# autograd records nothing. The ops' list arguments go in as _Leaf: vmap's
# generated rule pairs each input with one tangent when it runs a jvp, and
# counts a plain list as one input per element.


class _Leaf(tuple):
    """A list argument as one pytree leaf (a tuple subclass is not a pytree node)."""


class _Functions:
    """The six ops of one backend (``suffix`` "": the compiled ops; "_triton":
    Triton's) as functions over autograd Functions that functorch accepts:
    ``setup_context`` (the formulas of _ops.make_*_autograd), ``jvp`` and
    ``generate_vmap_rule``. Each op's derivatives call these functions again,
    so every order nests."""

    def __init__(self, suffix: str):
        op = {name: getattr(_ops_ns, name + suffix).default for name in _ops.SCHEMAS}
        self.suffix = suffix
        pool_backward, pool_setup = _ops.make_pool_autograd(self.multi_pool2d_backward)
        pool_backward_backward, pool_backward_setup = _ops.make_pool_backward_autograd(self.multi_pool2d)
        uc_setup = _ops.make_upsample_concat_autograd(self.upsample_concat_backward)[1]
        uc_backward_backward, uc_backward_setup = _ops.make_upsample_concat_backward_autograd(self.upsample_concat)
        sa_setup = _ops.make_upsample_shift_add_autograd(self.upsample_shift_add_backward)[1]
        sa_backward_backward, sa_backward_setup = _ops.make_upsample_shift_add_backward_autograd(
            self.upsample_shift_add)
        fns = self

        class Pool(torch.autograd.Function):
            generate_vmap_rule = True  # vmap(grad(...)): the forward under vmap, the ops' batching rules (below)

            @staticmethod
            def forward(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels):
                return op["multi_pool2d"](x, h_bounds, w_bounds, level_bins, mode, channels_last_levels)

            @staticmethod
            def setup_context(ctx, inputs, output):
                pool_setup(ctx, inputs, output)
                ctx.save_for_forward(output[1] if inputs[4] == _ops.POOL_MAX else None)

            @staticmethod
            def backward(ctx, grad_values, grad_indices):
                return pool_backward(ctx, grad_values, grad_indices)

            @staticmethod
            def jvp(ctx, x_t, *_):
                # linear in x (max at its argmax): the values' tangent is the pooling of x's
                _, h_bounds, w_bounds, level_bins, mode, cl_levels, _ = ctx.args
                if mode == _ops.POOL_MAX:
                    (indices,) = ctx.saved_tensors
                    return _ops.gather_packed(_ops._dense(x_t), indices, level_bins, cl_levels), None
                values, _ = fns.multi_pool2d(_ops._dense(x_t), h_bounds, w_bounds, level_bins, mode, cl_levels)
                return values, None

        class PoolBackward(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(grad, indices, input_shape, h_bounds, w_bounds, level_bins, mode, channels_last_levels,
                        channels_last_input, addend):
                return op["multi_pool2d_backward"](grad, indices, input_shape, h_bounds, w_bounds, level_bins, mode,
                                                   channels_last_levels, channels_last_input, addend)

            @staticmethod
            def setup_context(ctx, inputs, output):
                pool_backward_setup(ctx, inputs, output)
                ctx.input_shape, ctx.channels_last_input = list(inputs[2]), inputs[8]
                ctx.save_for_forward(inputs[1] if inputs[6] == _ops.POOL_MAX else None)

            @staticmethod
            def backward(ctx, grad_grad_x):
                return pool_backward_backward(ctx, grad_grad_x)

            @staticmethod
            def jvp(ctx, grad_t, _indices_t, *rest):
                # addend + (linear in grad): the backward op of grad's tangent onto addend's
                addend_t = rest[7] if len(rest) > 7 else None
                if grad_t is None:
                    return addend_t
                (indices,) = ctx.saved_tensors
                h_bounds, w_bounds, level_bins, mode, cl_levels = ctx.args
                return fns.multi_pool2d_backward(grad_t.contiguous(), indices, ctx.input_shape, h_bounds, w_bounds,
                                                 level_bins, mode, cl_levels, ctx.channels_last_input, addend_t)

        class UpsampleConcat(torch.autograd.Function):
            """The branches are separate arguments: autograd does not look into a list."""

            generate_vmap_rule = True

            @staticmethod
            def forward(x, size, align_corners, x_first, channels_last, *branches):
                return op["upsample_concat"](x, list(branches), size, align_corners, x_first, channels_last)

            @staticmethod
            def setup_context(ctx, inputs, output):
                x, size, align_corners, x_first, channels_last, *branches = inputs
                uc_setup(ctx, (x, branches, size, align_corners, x_first, channels_last), output)
                ctx.size = list(size)

            @staticmethod
            def backward(ctx, grad_out):
                need = ctx.needs_input_grad
                grad_x, grad_branches = _ops.upsample_concat_input_grads(ctx.args, grad_out, need[0], any(need[5:]),
                                                                         fns.upsample_concat_backward)
                return (grad_x, None, None, None, None, *(grad_branches or [None] * (len(need) - 5)))

            @staticmethod
            def jvp(ctx, x_t, _size, _align, _x_first, _cl, *branch_ts):
                # linear in x and the branches: the op of their tangents (zeros for those without one)
                shapes, cx, _, x_first, align_corners, channels_last, has_x = ctx.args
                like = next(t for t in (x_t, *branch_ts) if t is not None)
                n, size = like.shape[0], ctx.size
                if has_x and x_t is None:
                    x_t = like.new_zeros((n, cx, *size))
                branch_ts = [like.new_zeros((n, *shapes[3 * k:3 * k + 3])) if t is None else _ops._dense(t)
                             for k, t in enumerate(branch_ts)]
                return fns.upsample_concat(_ops._dense(x_t) if has_x else None, branch_ts, size, align_corners,
                                           x_first, channels_last)

        class ShiftAdd(torch.autograd.Function):
            """upsample_shift_add (upsample_concat_conv2d's kernel op); the taps are separate arguments."""

            generate_vmap_rule = True

            @staticmethod
            def forward(base, kernel_size, align_corners, *taps):
                return op["upsample_shift_add"](base, list(taps), kernel_size, align_corners)

            @staticmethod
            def setup_context(ctx, inputs, output):
                base, kernel_size, align_corners, *taps = inputs
                sa_setup(ctx, (base, taps, kernel_size, align_corners), output)
                ctx.base_shape, ctx.tap_channels = list(base.shape), kernel_size * kernel_size * base.shape[1]

            @staticmethod
            def backward(ctx, grad):
                need = ctx.needs_input_grad
                grad_base, grad_taps = _ops.upsample_shift_add_input_grads(ctx.args, grad, need[0], any(need[3:]),
                                                                           fns.upsample_shift_add_backward)
                return (grad_base, None, None, *(grad_taps or [None] * (len(need) - 3)))

            @staticmethod
            def jvp(ctx, base_t, _kernel_size, _align, *tap_ts):
                # linear in base and the taps: the op of their tangents (zeros for those without one)
                shapes, kernel_size, align_corners, _ = ctx.args
                like = next(t for t in (base_t, *tap_ts) if t is not None)
                if base_t is None:
                    base_t = like.new_zeros(ctx.base_shape)
                taps = [like.new_zeros((ctx.base_shape[0], ctx.tap_channels, shapes[2 * k], shapes[2 * k + 1]))
                        if t is None else _ops._dense(t) for k, t in enumerate(tap_ts)]
                return fns.upsample_shift_add(_ops._dense(base_t), taps, kernel_size, align_corners)

        self._pool, self._pool_backward, self._upsample_concat, self._shift_add = (Pool, PoolBackward,
                                                                                   UpsampleConcat, ShiftAdd)
        self._upsample_concat_backward = _list_backward_function(op["upsample_concat_backward"], uc_backward_setup,
                                                                 uc_backward_backward, self.upsample_concat_backward)
        self._shift_add_backward = _list_backward_function(op["upsample_shift_add_backward"], sa_backward_setup,
                                                           sa_backward_backward, self.upsample_shift_add_backward)

    def multi_pool2d(self, x, h_bounds, w_bounds, level_bins, mode, channels_last_levels):
        return self._pool.apply(x, _Leaf(h_bounds), _Leaf(w_bounds), _Leaf(level_bins), mode, channels_last_levels)

    def multi_pool2d_backward(self, grad, indices, input_shape, h_bounds, w_bounds, level_bins, mode,
                              channels_last_levels, channels_last_input, addend=None):
        return self._pool_backward.apply(grad, indices, _Leaf(input_shape), _Leaf(h_bounds), _Leaf(w_bounds),
                                         _Leaf(level_bins), mode, channels_last_levels, channels_last_input, addend)

    def upsample_concat(self, x, branches, size, align_corners, x_first, channels_last):
        return self._upsample_concat.apply(x, _Leaf(size), align_corners, x_first, channels_last, *branches)

    def upsample_concat_backward(self, grad_out, branch_shapes, channel_offset, align_corners, channels_last):
        return self._upsample_concat_backward.apply(grad_out, _Leaf(branch_shapes), channel_offset, align_corners,
                                                    channels_last)

    def upsample_shift_add(self, base, taps, kernel_size, align_corners):
        return self._shift_add.apply(base, kernel_size, align_corners, *taps)

    def upsample_shift_add_backward(self, grad, tap_shapes, kernel_size, align_corners, channels_last):
        return self._shift_add_backward.apply(grad, _Leaf(tap_shapes), kernel_size, align_corners,
                                              _Leaf(channels_last))


def _list_backward_function(op, setup_context, backward, differentiable_op):
    """An autograd.Function over a backward op that returns a list of tensors
    (returned as a tuple; its backward takes one gradient per tensor). The op
    is linear in its one tensor input: its jvp is `differentiable_op` (the op
    through this Function) of that input's tangent."""

    class ListBackward(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return tuple(op(*args))

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.jvp_args = inputs[1:]

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, grads)

        @staticmethod
        def jvp(ctx, grad_t, *_):
            return tuple(differentiable_op(_ops._dense(grad_t), *ctx.jvp_args))

    return ListBackward


_BY_SUFFIX = {}


def functions(suffix: str = "") -> _Functions:
    """The grad-transform entry points of the ops pyramid_ext::<op><suffix> (registered by then)."""
    if suffix not in _BY_SUFFIX:
        _BY_SUFFIX[suffix] = _Functions(suffix)
    return _BY_SUFFIX[suffix]


# --------------------------------------------------------------------------
# vmap: the vmapped dimension folded into N
# --------------------------------------------------------------------------


def _fold(t: Optional[torch.Tensor], bdim: Optional[int], size: int) -> Optional[torch.Tensor]:
    """t, whose per-sample shape is (N, ...), as (size * N, ...): the vmapped
    dimension `bdim` moved first and merged with N (an unbatched t repeated)."""
    if t is None:
        return None
    t = t.unsqueeze(0).expand(size, *t.shape) if bdim is None else t.movedim(bdim, 0)
    # A view where the strides allow (a channels_last sample stays channels_last),
    # else a copy. (No layout query: t may be batched by an outer vmap, which
    # answers only whether it is contiguous.)
    return t.reshape(-1, *t.shape[2:])


def _pool_vmap(op):
    """multi_pool2d's batching rule."""

    def rule(info, in_dims, x, h_bounds, w_bounds, level_bins, mode, channels_last_levels):
        size = info.batch_size
        values, indices = op(_fold(x, in_dims[0], size), h_bounds, w_bounds, level_bins, mode, channels_last_levels)
        values = values.unflatten(0, (size, -1))
        if indices.dim() == 2:  # max: one index per value; avg: an empty placeholder, not batched
            return (values, indices.unflatten(0, (size, -1))), (0, 0)
        return (values, indices), (0, None)

    return rule


def _pool_backward_vmap(op):
    """multi_pool2d_backward's batching rule."""

    def rule(info, in_dims, grad, indices, input_shape, h_bounds, w_bounds, level_bins, mode, channels_last_levels,
             channels_last_input, addend=None):
        size = info.batch_size
        shape = [size * input_shape[0], *input_shape[1:]]
        grad_x = op(_fold(grad, in_dims[0], size), _fold(indices, in_dims[1], size), shape, h_bounds, w_bounds,
                    level_bins, mode, channels_last_levels, channels_last_input,
                    _fold(addend, in_dims[9] if len(in_dims) > 9 else None, size))
        return grad_x.unflatten(0, (size, -1)), 0

    return rule


def _tensor_and_list_vmap(op):
    """The batching rule of an op (t, ts: Tensor[], *rest) -> Tensor whose tensors
    all carry N (upsample_concat, upsample_shift_add)."""

    def rule(info, in_dims, t, ts, *rest):
        n = info.batch_size
        out = op(_fold(t, in_dims[0], n), [_fold(u, d, n) for u, d in zip(ts, in_dims[1])], *rest)
        return out.unflatten(0, (n, -1)), 0

    return rule


def _list_result_vmap(op):
    """The batching rule of an op (grad, *rest) -> Tensor[] whose only tensor is
    grad (upsample_concat_backward, upsample_shift_add_backward)."""

    def rule(info, in_dims, grad, *rest):
        n = info.batch_size
        grads = op(_fold(grad, in_dims[0], n), *rest)
        return [g.unflatten(0, (n, -1)) for g in grads], [0] * len(grads)

    return rule


def register_vmap_rules(lib: str = "pyramid_ext::", suffix: str = "", library=None) -> None:
    """The batching rules of the ops pyramid_ext::<op><suffix> (the compiled ops, or Triton's with
    suffix "_triton", registered into their `library`)."""
    def op(name):
        return getattr(_ops_ns, name + suffix).default

    rules = {"multi_pool2d": _pool_vmap(op("multi_pool2d")),
             "multi_pool2d_backward": _pool_backward_vmap(op("multi_pool2d_backward"))}
    for name in ("upsample_concat", "upsample_shift_add"):
        rules[name] = _tensor_and_list_vmap(op(name))
        rules[name + "_backward"] = _list_result_vmap(op(name + "_backward"))
    for name, rule in rules.items():
        torch.library.register_vmap(lib + name + suffix, rule, lib=library)
