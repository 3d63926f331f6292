"""Schemas, fake kernels and autograd for the pyramid_ext ops.

The compiled ops' schemas are declared in csrc/op_schemas.h; ``SCHEMAS``
states them once in Python, and the Triton ops (pyramid_ext/triton/, named
``<op>_triton``) are declared from it (tests/test_library.py checks it equals
the compiled ops' schemas). Both reuse the fake kernels and autograd below,
so every backend has identical shapes, strides and gradients.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import _extension
from .plan import POOL_AVG, POOL_MAX, POOL_MAX_VALUES
from .windows import level_shapes, packed_size


# The schema of every op, after its name: the same as csrc/op_schemas.h.
SCHEMAS = {
    "multi_pool2d": (
        "(Tensor x, SymInt[] h_bounds, SymInt[] w_bounds, int[] level_bins, int mode, bool channels_last_levels) "
        "-> (Tensor, Tensor)"
    ),
    "multi_pool2d_backward": (
        "(Tensor grad, Tensor? indices, SymInt[] input_shape, SymInt[] h_bounds, SymInt[] w_bounds, "
        "int[] level_bins, int mode, bool channels_last_levels, bool channels_last_input, Tensor? addend=None) "
        "-> Tensor"
    ),
    "upsample_concat": (
        "(Tensor? x, Tensor[] branches, SymInt[] size, bool align_corners, bool x_first, bool channels_last) "
        "-> Tensor"
    ),
    "upsample_concat_out": "(Tensor? x, Tensor[] branches, bool align_corners, bool x_first, Tensor(a!) out) -> ()",
    "upsample_concat_backward": (
        "(Tensor grad_out, SymInt[] branch_shapes, SymInt channel_offset, bool align_corners, bool channels_last) "
        "-> Tensor[]"
    ),
    "upsample_shift_add": "(Tensor base, Tensor[] taps, int kernel_size, bool align_corners) -> Tensor",
    "upsample_shift_add_backward": (
        "(Tensor grad, SymInt[] tap_shapes, int kernel_size, bool align_corners, bool[] channels_last) "
        "-> Tensor[]"
    ),
}


def schema(op: str, suffix: str = "") -> str:
    """The schema of `op` as declared under the name op + suffix."""
    return op + suffix + SCHEMAS[op]


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t if its layout is one the kernels read directly, else a contiguous copy
    (always contiguous under a functorch transform: vmap cannot ask for another
    layout, and the layout of its per-sample results cannot be asked either)."""
    if t.is_contiguous():
        return t
    if not torch.compiler.is_dynamo_compiling() and torch._C._are_functorch_transforms_active():
        return t.contiguous()
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may share memory: the same storage and intersecting
    byte ranges, each range from the tensor's first to its last element.
    Conservative: two channel slices of a batch of several samples interleave,
    so they count as overlapping although no element is shared."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def byte_range(t):
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    a_begin, a_end = byte_range(a)
    b_begin, b_end = byte_range(b)
    return a_begin < b_end and b_begin < a_end


def check_pool_addend(op: str, addend, grad: torch.Tensor, input_shape) -> None:
    """multi_pool2d_backward's addend (every backend, same messages as
    csrc/pool_plan.h): x's shape, grad's dtype and device; any strides."""
    if addend is None:
        return
    if tuple(addend.shape) != tuple(input_shape):
        raise RuntimeError(f"{op}: addend must have input_shape {list(input_shape)}, got {list(addend.shape)}")
    if addend.dtype != grad.dtype:
        raise RuntimeError(f"{op}: addend has dtype {addend.dtype} but grad has {grad.dtype}")
    if addend.device != grad.device:
        raise RuntimeError(f"{op}: addend is on {addend.device} but grad is on {grad.device}")


def check_out_disjoint(op: str, x, branches, out: torch.Tensor) -> None:
    """The upsample_concat_out ops' rule (every backend): no input may overlap
    out, since out is written while the inputs are read. (The public function
    copies such inputs first.)"""
    named = ([("x", x)] if x is not None else []) + [(f"branches[{i}]", b) for i, b in enumerate(branches)]
    for name, t in named:
        if overlaps(t, out):
            raise RuntimeError(f"{op}: out must not overlap {name} (they share memory); pass a copy of {name}")


# --------------------------------------------------------------------------
# multi_pool2d
# --------------------------------------------------------------------------


def pool_fake(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels):
    total = packed_size(level_bins)
    values = x.new_empty((x.shape[0], x.shape[1] * total))
    if mode == POOL_MAX:
        indices = x.new_empty((x.shape[0], x.shape[1] * total), dtype=torch.int64)
    else:
        indices = x.new_empty((0,), dtype=torch.int64)
    return values, indices


def pool_backward_fake(grad, indices, input_shape, h_bounds, w_bounds, level_bins, mode, channels_last_levels,
                       channels_last_input, addend=None):
    fmt = torch.channels_last if channels_last_input else torch.contiguous_format
    return torch.empty(input_shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)


def make_pool_autograd(backward_op: Callable):
    """(backward, setup_context) for a multi_pool2d-shaped op whose gradient
    is computed by `backward_op` (a multi_pool2d_backward-shaped op)."""

    def setup_context(ctx, inputs, output):
        x, h_bounds, w_bounds, level_bins, mode, channels_last_levels = inputs
        if mode == POOL_MAX_VALUES:  # the message of csrc/autograd.cpp
            raise RuntimeError("multi_pool2d: mode 2 (max, values only) has no gradient, and x requires grad: "
                               "use mode 1")
        _, indices = output
        ctx.args = (list(x.shape), list(h_bounds), list(w_bounds), list(level_bins), mode, channels_last_levels,
                    _channels_last(x))
        ctx.save_for_backward(indices if mode == POOL_MAX else None)
        ctx.mark_non_differentiable(indices)

    def backward(ctx, grad_values, grad_indices):
        (indices,) = ctx.saved_tensors
        shape, h_bounds, w_bounds, level_bins, mode, cl_levels, cl_input = ctx.args
        grad_x = backward_op(grad_values.contiguous(), indices, shape, h_bounds, w_bounds, level_bins, mode,
                             cl_levels, cl_input)
        return grad_x, None, None, None, None, None

    return backward, setup_context


def _packed_channels(channels: int, level_bins, channels_last_levels: bool, device) -> torch.Tensor:
    """The channel of every packed position of one sample (see packed_index)."""
    c = torch.arange(channels, device=device)
    parts = [c.repeat(bh * bw) if channels_last_levels else c.repeat_interleave(bh * bw)
             for bh, bw in level_shapes(level_bins)]
    return torch.cat(parts) if parts else c.new_empty((0,))


def gather_packed(plane_values: torch.Tensor, indices: torch.Tensor, level_bins, channels_last_levels: bool):
    """values[n, k] = plane_values[n, c(k), indices[n, k]]: the packed max-pool
    output of `plane_values` through recorded indices (ATen's max-pool double
    backward). Differentiable: gather's derivative scatters back."""
    n, c, h, w = plane_values.shape
    flat = plane_values.reshape(n, c * h * w)
    offset = _packed_channels(c, level_bins, channels_last_levels, indices.device) * (h * w)
    return flat.gather(1, indices + offset)


def make_pool_backward_autograd(forward_op: Callable):
    """(backward, setup_context) for a multi_pool2d_backward-shaped op.

    The backward is linear in `grad` and is the adjoint of the forward, so its
    own derivative is the forward again: average pooling of the incoming
    gradient for avg (`forward_op`, the same backend's multi_pool2d), a gather
    through the recorded indices for max. Both are differentiable in turn, so
    any order of derivative is exact.
    """

    def setup_context(ctx, inputs, output):
        grad, indices, input_shape, h_bounds, w_bounds, level_bins, mode, channels_last_levels, _ = inputs[:9]
        ctx.args = (list(h_bounds), list(w_bounds), list(level_bins), mode, channels_last_levels)
        ctx.save_for_backward(indices if mode == POOL_MAX else None)

    def backward(ctx, grad_grad_x):
        (indices,) = ctx.saved_tensors
        h_bounds, w_bounds, level_bins, mode, cl_levels = ctx.args
        grad_grad = None
        if ctx.needs_input_grad[0]:
            if mode == POOL_MAX:
                grad_grad = gather_packed(grad_grad_x, indices, level_bins, cl_levels)
            else:
                grad_grad, _ = forward_op(_dense(grad_grad_x), h_bounds, w_bounds, level_bins, POOL_AVG, cl_levels)
        # The result is addend + (linear in grad): the addend's derivative is the identity.
        # (A call that leaves addend at its default passes 9 inputs, so needs_input_grad has 9.)
        grad_addend = grad_grad_x if len(ctx.needs_input_grad) > 9 and ctx.needs_input_grad[9] else None
        return grad_grad, None, None, None, None, None, None, None, None, grad_addend

    return backward, setup_context


# --------------------------------------------------------------------------
# upsample_concat
# --------------------------------------------------------------------------


def upsample_concat_fake(x, branches, size, align_corners, x_first, channels_last):
    ref = x if x is not None else branches[0]
    channels = (x.shape[1] if x is not None else 0) + sum(b.shape[1] for b in branches)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((ref.shape[0], channels, size[0], size[1]), dtype=ref.dtype, device=ref.device,
                       memory_format=fmt)


def upsample_concat_out_fake(x, branches, align_corners, x_first, out):
    return None


def upsample_concat_backward_fake(grad_out, branch_shapes, channel_offset, align_corners, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    n = grad_out.shape[0]
    return [
        torch.empty((n, branch_shapes[3 * k], branch_shapes[3 * k + 1], branch_shapes[3 * k + 2]),
                    dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)
        for k in range(len(branch_shapes) // 3)
    ]


def make_upsample_concat_autograd(backward_op: Callable):
    def setup_context(ctx, inputs, output):
        x, branches, size, align_corners, x_first, channels_last = inputs
        shapes = []
        for b in branches:
            shapes += [b.shape[1], b.shape[2], b.shape[3]]
        cx = x.shape[1] if x is not None else 0
        cb = sum(b.shape[1] for b in branches)
        ctx.args = (shapes, cx, cb, x_first, align_corners, channels_last, x is not None)

    def backward(ctx, grad_out):
        grad_x, grad_branches = upsample_concat_input_grads(ctx.args, grad_out, ctx.needs_input_grad[0],
                                                           ctx.needs_input_grad[1], backward_op)
        return grad_x, grad_branches, None, None, None, None

    return backward, setup_context


def upsample_concat_input_grads(args, grad_out, need_x: bool, need_branches: bool, backward_op: Callable):
    """(grad_x, grad_branches) of upsample_concat from grad_out: x's slice of it,
    and the branches' gradients by `backward_op` (make_upsample_concat_autograd's
    setup_context made `args`)."""
    shapes, cx, cb, x_first, align_corners, channels_last, has_x = args
    branch_offset = cx if x_first else 0
    x_offset = 0 if x_first else cb
    grad_x = grad_out[:, x_offset : x_offset + cx] if has_x and need_x else None
    # An empty list, not None, when there are no branches: autograd
    # checks that the gradients have the structure of the inputs.
    grad_branches = None if shapes else []
    if need_branches and shapes:
        g = _dense(grad_out)
        grad_branches = list(backward_op(g, shapes, branch_offset, align_corners, _channels_last(g)))
    return grad_x, grad_branches


def make_upsample_concat_backward_autograd(forward_op: Callable):
    """(backward, setup_context) for an upsample_concat_backward-shaped op.

    The backward (Wy^T G Wx per branch) is linear in grad_out and the adjoint
    of the resize, so its derivative resizes each branch's incoming gradient
    back into that branch's channels (`forward_op`, the same backend's
    upsample_concat) and is zero in the other channels of grad_out.
    """

    def setup_context(ctx, inputs, output):
        grad_out, branch_shapes, channel_offset, align_corners, _ = inputs
        ctx.args = (list(grad_out.shape), list(branch_shapes), channel_offset, align_corners)

    def backward(ctx, grad_grad_branches):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (n, channels, height, width), shapes, offset, align_corners = ctx.args
        ref = next(g for g in grad_grad_branches if g is not None)
        parts = []
        for k, g in enumerate(grad_grad_branches):
            if g is None:  # that branch's gradient was not used downstream
                g = ref.new_zeros((n, shapes[3 * k], shapes[3 * k + 1], shapes[3 * k + 2]))
            parts.append(_dense(g))
        resized = forward_op(None, parts, [height, width], align_corners, True, _channels_last(parts[0]))
        after = channels - offset - resized.shape[1]
        return F.pad(resized, (0, 0, 0, 0, offset, after)), None, None, None, None

    return backward, setup_context


# --------------------------------------------------------------------------
# upsample_shift_add (the kernel of upsample_concat_conv2d)
# --------------------------------------------------------------------------

_SHIFT_ADD_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_shift_add_args(op: str, base, taps, kernel_size) -> None:
    """upsample_shift_add's argument rules, for the backends written in Python
    (torch, Triton); the C++ kernels check the same with the same words."""
    if base.dim() != 4:
        raise ValueError(f"{op}: base must be a 4-D (N, Cout, H, W) tensor, got shape {tuple(base.shape)}")
    if base.dtype not in _SHIFT_ADD_DTYPES:
        raise TypeError(f"{op}: base must be float64, float32, float16 or bfloat16, got {base.dtype}")
    if base.shape[2] == 0 or base.shape[3] == 0:
        raise ValueError(f"{op}: base must have non-zero height and width, got shape {tuple(base.shape)}")
    if isinstance(kernel_size, bool) or kernel_size <= 0 or kernel_size % 2 != 1:
        raise ValueError(f"{op}: kernel_size must be odd and positive, got {kernel_size}")
    channels = kernel_size * kernel_size * base.shape[1]
    for i, t in enumerate(taps):
        name = f"taps[{i}]"
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D (N, K*K*Cout, h, w) tensor, got shape {tuple(t.shape)}")
        if t.shape[0] != base.shape[0]:
            raise ValueError(f"{op}: {name} has batch size {t.shape[0]} but base has {base.shape[0]}")
        if t.shape[1] != channels:
            raise ValueError(f"{op}: {name} has {t.shape[1]} channels, expected kernel_size^2 * base channels = "
                             f"{channels}")
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise ValueError(f"{op}: {name} must have non-zero height and width, got shape {tuple(t.shape)}")
        if t.dtype != base.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but base has {base.dtype}")
        if t.device != base.device:
            raise ValueError(f"{op}: {name} is on {t.device} but base is on {base.device}")


def upsample_shift_add_fake(base, taps, kernel_size, align_corners):
    return torch.empty_like(base)


def upsample_shift_add_backward_fake(grad, tap_shapes, kernel_size, align_corners, channels_last):
    n, cout = grad.shape[0], grad.shape[1]
    return [
        torch.empty((n, kernel_size * kernel_size * cout, tap_shapes[2 * i], tap_shapes[2 * i + 1]),
                    dtype=grad.dtype, device=grad.device,
                    memory_format=torch.channels_last if channels_last[i] else torch.contiguous_format)
        for i in range(len(tap_shapes) // 2)
    ]


def make_upsample_shift_add_autograd(backward_op: Callable):
    """(backward, setup_context) for an upsample_shift_add-shaped op: the
    result is linear in base (gradient: grad itself) and in the taps (their
    gradient: `backward_op`, the gather-form adjoint)."""

    def setup_context(ctx, inputs, output):
        base, taps, kernel_size, align_corners = inputs
        shapes = []
        for t in taps:
            shapes += [t.shape[2], t.shape[3]]
        ctx.args = (shapes, kernel_size, align_corners, [_channels_last(t) for t in taps])

    def backward(ctx, grad):
        grad_base, grad_taps = upsample_shift_add_input_grads(ctx.args, grad, ctx.needs_input_grad[0],
                                                              ctx.needs_input_grad[1], backward_op)
        return grad_base, grad_taps, None, None

    return backward, setup_context


def upsample_shift_add_input_grads(args, grad, need_base: bool, need_taps: bool, backward_op: Callable):
    """(grad_base, grad_taps) of upsample_shift_add from grad (make_upsample_shift_add_autograd's
    setup_context made `args`)."""
    shapes, kernel_size, align_corners, channels_last = args
    grad_base = grad if need_base else None
    grad_taps = None if shapes else []  # [] when there are no taps: the structure of the input
    if need_taps and shapes:
        grad_taps = list(backward_op(_dense(grad), shapes, kernel_size, align_corners, channels_last))
    return grad_base, grad_taps


def make_upsample_shift_add_backward_autograd(forward_op: Callable):
    """(backward, setup_context) for an upsample_shift_add_backward-shaped op.
    It is linear in grad and the adjoint of the taps' part of the forward, so
    its derivative is the forward (`forward_op`, same backend) of the incoming
    tap gradients onto a zero base."""

    def setup_context(ctx, inputs, output):
        grad, tap_shapes, kernel_size, align_corners, channels_last = inputs
        ctx.args = (kernel_size, align_corners, list(grad.shape), list(tap_shapes), _channels_last(grad))
        ctx.like = dict(dtype=grad.dtype, device=grad.device)

    def backward(ctx, grad_grad_taps):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        kernel_size, align_corners, grad_shape, tap_shapes, grad_channels_last = ctx.args
        n, cout = grad_shape[0], grad_shape[1]
        parts = []
        for i, g in enumerate(grad_grad_taps):
            if g is None:  # that tap tensor's gradient was not used downstream
                g = torch.zeros((n, kernel_size * kernel_size * cout, tap_shapes[2 * i], tap_shapes[2 * i + 1]),
                                **ctx.like)
            parts.append(_dense(g))
        fmt = torch.channels_last if grad_channels_last else torch.contiguous_format
        zero = torch.empty(grad_shape, memory_format=fmt, **ctx.like).zero_()
        return forward_op(zero, parts, kernel_size, align_corners), None, None, None, None

    return backward, setup_context


# --------------------------------------------------------------------------
# Registration of the compiled ops
# --------------------------------------------------------------------------


def _register_compiled() -> None:
    lib = "pyramid_ext::"
    torch.library.register_fake(lib + "multi_pool2d")(pool_fake)
    torch.library.register_fake(lib + "multi_pool2d_backward")(pool_backward_fake)
    torch.library.register_fake(lib + "upsample_concat")(upsample_concat_fake)
    torch.library.register_fake(lib + "upsample_concat_out")(upsample_concat_out_fake)
    torch.library.register_fake(lib + "upsample_concat_backward")(upsample_concat_backward_fake)

    # multi_pool2d's and upsample_concat's autograd is csrc/autograd.cpp (the same
    # formulas as make_pool_autograd / make_upsample_concat_autograd, without the
    # Python per-call cost); the backward ops' (double backward) is here.
    ops = torch.ops.pyramid_ext
    backward, setup = make_pool_backward_autograd(ops.multi_pool2d.default)
    torch.library.register_autograd(lib + "multi_pool2d_backward", backward, setup_context=setup)
    backward, setup = make_upsample_concat_backward_autograd(ops.upsample_concat.default)
    torch.library.register_autograd(lib + "upsample_concat_backward", backward, setup_context=setup)

    from . import _functorch  # vmap rules of the compiled ops

    _functorch.register_vmap_rules(lib)

    torch.library.register_fake(lib + "upsample_shift_add")(upsample_shift_add_fake)
    torch.library.register_fake(lib + "upsample_shift_add_backward")(upsample_shift_add_backward_fake)
    backward, setup = make_upsample_shift_add_autograd(ops.upsample_shift_add_backward.default)
    torch.library.register_autograd(lib + "upsample_shift_add", backward, setup_context=setup)
    backward, setup = make_upsample_shift_add_backward_autograd(ops.upsample_shift_add.default)
    torch.library.register_autograd(lib + "upsample_shift_add_backward", backward, setup_context=setup)


if _extension.LOADED:
    _register_compiled()
