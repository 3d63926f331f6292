"""Triton kernels and the ``pyramid_ext::*_triton`` custom ops.

The ops have the same schemas and semantics as the compiled ops declared in
csrc/ops.cpp (see docs/DESIGN.md); their fake kernels and autograd come from
pyramid_ext/_ops.py. Kernels run on CUDA tensors, and on CPU tensors when
Triton's interpreter is on (``TRITON_INTERPRET=1`` set before Triton is
imported).

Modules: ``_common`` (device helpers, launch settings), ``_multi_pool2d``
(pooling kernels, plans, op implementations), ``_upsample_concat`` (resize
kernels, op implementations), ``_upsample_shift_add`` (resize-shift-add
kernels, op implementations); this module registers the ops and holds the
entry points pyramid_ext.functional calls.

Block sizes keep each program's tile at about _common._TILE elements.
"""
from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as forward_ad

from .. import _extension, _functorch, _ops, backends
from ._common import INTERPRETED
from ._multi_pool2d import _pool_backward_impl, _pool_impl
from ._upsample_concat import _upsample_concat_backward_impl, _upsample_concat_impl, _upsample_concat_out_impl
from ._upsample_shift_add import _upsample_shift_add_backward_impl, _upsample_shift_add_impl


# --------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------

# Every op of _ops.SCHEMAS, declared as pyramid_ext::<op>_triton with that schema.
_IMPLS = {
    "multi_pool2d": (_pool_impl, _ops.pool_fake),
    "multi_pool2d_backward": (_pool_backward_impl, _ops.pool_backward_fake),
    "upsample_concat": (_upsample_concat_impl, _ops.upsample_concat_fake),
    "upsample_concat_out": (_upsample_concat_out_impl, _ops.upsample_concat_out_fake),
    "upsample_concat_backward": (_upsample_concat_backward_impl, _ops.upsample_concat_backward_fake),
    "upsample_shift_add": (_upsample_shift_add_impl, _ops.upsample_shift_add_fake),
    "upsample_shift_add_backward": (_upsample_shift_add_backward_impl, _ops.upsample_shift_add_backward_fake),
}
if _IMPLS.keys() != _ops.SCHEMAS.keys():
    raise RuntimeError(f"pyramid_ext.triton implements {sorted(_IMPLS)}, _ops.SCHEMAS declares {sorted(_ops.SCHEMAS)}")


def _registered(name: str) -> bool:
    return hasattr(torch.ops.pyramid_ext, name)


def _refusing_tangents(op: str, impl):
    """impl, raising where an input carries a forward-mode tangent, for the ops
    whose tangents nothing computes: every op without the compiled extension
    (its ADInplaceOrView kernels, csrc/autograd.cpp, carry the Triton ops'
    tangents), and the out= variant always. Below torch.library's autograd,
    which has no jvp, the tangent would be dropped silently. Checked only
    inside a dual level."""
    if _extension.LOADED and op != "upsample_concat_out":
        return impl
    why = ("the out= variant has none" if op == "upsample_concat_out" else
           "the compiled extension, which carries the Triton ops' tangents, is not loaded")

    @functools.wraps(impl)
    def checked(*args):
        if forward_ad._current_level >= 0:
            for a in args:
                for t in (a if isinstance(a, (list, tuple)) else (a,)):
                    if isinstance(t, torch.Tensor) and torch._VF._unpack_dual(t, 0).tangent is not None:
                        raise RuntimeError(f"pyramid_ext::{op}_triton has no forward-mode AD here (a tangent reached "
                                           f"it: torch.autograd.forward_ad or torch.func.jvp): {why}; the torch "
                                           "backend has it for every op")
        return impl(*args)

    return checked


def _register() -> None:
    if _registered("multi_pool2d_triton"):  # module re-imported (e.g. reload): keep the first registration
        return
    global _LIB
    _LIB = torch.library.Library("pyramid_ext", "FRAGMENT")
    for op, (impl, fake) in _IMPLS.items():
        _LIB.define(_ops.schema(op, "_triton"))
        qualname = "pyramid_ext::" + op + "_triton"
        torch.library.impl(qualname, ("cpu", "cuda"), _refusing_tangents(op, impl), lib=_LIB)
        torch.library.register_fake(qualname, fake, lib=_LIB)
    ops = torch.ops.pyramid_ext
    backward, setup = _ops.make_pool_autograd(ops.multi_pool2d_backward_triton.default)
    torch.library.register_autograd("pyramid_ext::multi_pool2d_triton", backward, setup_context=setup, lib=_LIB)
    backward, setup = _ops.make_upsample_concat_autograd(ops.upsample_concat_backward_triton.default)
    torch.library.register_autograd("pyramid_ext::upsample_concat_triton", backward, setup_context=setup, lib=_LIB)
    backward, setup = _ops.make_pool_backward_autograd(ops.multi_pool2d_triton.default)
    torch.library.register_autograd("pyramid_ext::multi_pool2d_backward_triton", backward, setup_context=setup,
                                    lib=_LIB)
    backward, setup = _ops.make_upsample_concat_backward_autograd(ops.upsample_concat_triton.default)
    torch.library.register_autograd("pyramid_ext::upsample_concat_backward_triton", backward, setup_context=setup,
                                    lib=_LIB)
    backward, setup = _ops.make_upsample_shift_add_autograd(ops.upsample_shift_add_backward_triton.default)
    torch.library.register_autograd("pyramid_ext::upsample_shift_add_triton", backward, setup_context=setup, lib=_LIB)
    backward, setup = _ops.make_upsample_shift_add_backward_autograd(ops.upsample_shift_add_triton.default)
    torch.library.register_autograd("pyramid_ext::upsample_shift_add_backward_triton", backward,
                                    setup_context=setup, lib=_LIB)
    _functorch.register_vmap_rules(suffix="_triton", library=_LIB)


_LIB = None
_register()


# --------------------------------------------------------------------------
# Entry points: the "triton" entry of the backend table (pyramid_ext.backends)
# --------------------------------------------------------------------------


# Under a grad transform (torch.func.grad, vjp, jacrev, hessian), which refuses
# torch.library's autograd, and inside a forward-AD dual level (that autograd
# has no jvp), the ops run through _functorch's autograd Functions.


def multi_pool2d(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels):
    if backends.autograd_functions_needed():
        return backends.grad_functions("_triton").multi_pool2d(x, list(h_bounds), list(w_bounds), list(level_bins),
                                                               int(mode), bool(channels_last_levels))
    return torch.ops.pyramid_ext.multi_pool2d_triton(x, list(h_bounds), list(w_bounds), list(level_bins), int(mode),
                                                      bool(channels_last_levels))


def upsample_concat(x, branches, size, align_corners, x_first, channels_last):
    if backends.autograd_functions_needed():
        return backends.grad_functions("_triton").upsample_concat(x, list(branches), list(size), bool(align_corners),
                                                                  bool(x_first), bool(channels_last))
    return torch.ops.pyramid_ext.upsample_concat_triton(x, list(branches), list(size), bool(align_corners),
                                                        bool(x_first), bool(channels_last))


def upsample_concat_out(x, branches, align_corners, x_first, out):
    torch.ops.pyramid_ext.upsample_concat_out_triton(x, list(branches), bool(align_corners), bool(x_first), out)
    return out


def upsample_shift_add(base, taps, kernel_size, align_corners):
    if backends.autograd_functions_needed():
        return backends.grad_functions("_triton").upsample_shift_add(base, list(taps), int(kernel_size),
                                                                     bool(align_corners))
    return torch.ops.pyramid_ext.upsample_shift_add_triton(base, list(taps), int(kernel_size), bool(align_corners))


def upsample_shift_add_backward(grad, tap_shapes, kernel_size, align_corners, channels_last):
    return torch.ops.pyramid_ext.upsample_shift_add_backward_triton(grad, list(tap_shapes), int(kernel_size),
                                                                     bool(align_corners),
                                                                     [bool(c) for c in channels_last])


__all__ = ["multi_pool2d", "upsample_concat", "upsample_concat_out", "upsample_shift_add",
           "upsample_shift_add_backward", "INTERPRETED"]
