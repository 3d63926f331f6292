"""Backend selection: which implementation serves a call.

``"cpp"``: the compiled extension (C++ on CPU, CUDA kernels on GPU).
``"triton"``: Triton kernels (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1).
``"torch"``: pure PyTorch (pyramid_ext.reference), runs everywhere.

A call's ``backend=`` argument wins, then the innermost ``use_backend(...)``
context, then the ``PYRAMID_EXT_BACKEND`` environment variable, then "auto":
cpp when the extension has a kernel for the device, else triton for CUDA
tensors when Triton is installed, else torch. A backend that was *named* and
cannot serve the tensor raises; it never silently switches.

The backend table: ``implementation(name)`` is the backend's entry in it, an
object with one function per op and the same signature in every backend
(``OPS``); pyramid_ext.functional resolves the backend once per call and
calls through it. A new op is one function in each entry.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from typing import List, Optional, Tuple

import torch
import torch.autograd.forward_ad as forward_ad

from . import _extension, reference

BACKENDS = ("cpp", "triton", "torch")
ENV_VAR = "PYRAMID_EXT_BACKEND"

class _Local(threading.local):
    """Per thread: ``stack``, use_backend's names, innermost last (None until
    the thread's first use_backend: the class default, which the C++ fast
    paths' gate reads without raising an AttributeError per call)."""

    stack: Optional[list] = None


_local = _Local()


def _stack() -> list:
    if _local.stack is None:
        _local.stack = []
    return _local.stack


def _check_name(name, what: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{what} must be one of {BACKENDS} or 'auto' (or None), got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Context manager selecting the backend for pyramid_ext calls inside it."""
    if name is not None:
        _check_name(name, "use_backend(name)")
    _stack().append(name)
    try:
        yield
    finally:
        _stack().pop()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _version(module: str) -> Tuple[int, ...]:
    from importlib.metadata import version
    return tuple(int(p) for p in version(module).split(".")[:2] if p.isdigit())


@functools.lru_cache(maxsize=None)  # package metadata is read once
def _interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run the kernels here, or None. Triton
    3.6's interpreter (torch 2.11's pin) turns a loop bound that a reduction
    gives (`range(0, tl.max(...), ...)`) into a 1-element array and calls
    int() on it, which numpy 2.4 refuses: every kernel failed with
    "only 0-dimensional arrays can be converted to Python scalars". With numpy
    2.3, or with Triton 3.8 and numpy 2.4, they run."""
    try:
        triton_v, numpy_v = _version("triton"), _version("numpy")
    except Exception:  # no metadata: nothing to say
        return None
    if triton_v <= (3, 6) and numpy_v >= (2, 4):
        return (f"Triton {'.'.join(map(str, triton_v))}'s interpreter cannot run these kernels with numpy "
                f"{'.'.join(map(str, numpy_v))} (it converts 1-element arrays to ints, which numpy 2.4 refuses): "
                "use numpy < 2.4 or Triton >= 3.8 for TRITON_INTERPRET=1")
    return None


def _why_not(name: str, device: torch.device, op: str) -> Optional[str]:
    """None if backend `name` can serve `op` on `device`, else the reason."""
    if name == "torch":
        return None
    if name == "cpp":
        if not _extension.LOADED:
            return f"the compiled extension is not available ({_extension.LOAD_ERROR}); {_extension.BUILD_HINT}"
        if not _extension.has_kernel(op, device.type):
            if device.type == "cuda":
                return (
                    "the extension was built without CUDA kernels (rebuild with a CUDA build of torch and nvcc, "
                    "or FORCE_CUDA=1)"
                )
            return f"the extension has no kernel for {device.type} tensors"
        return None
    if name == "triton":
        if not triton_installed():
            return "Triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return _interpreter_problem()
        return f"Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"
    raise AssertionError(name)


def available_backends(device="cpu", op: str = "multi_pool2d") -> List[str]:
    """The backends that can serve tensors on `device`, in auto-selection order."""
    device = torch.device(device)
    return [b for b in BACKENDS if _why_not(b, device, op) is None]


def _environ_lookup():
    """A cheap read of ENV_VAR for every call. ``os.environ.get`` raises and
    catches a KeyError when the variable is unset (~1 us, a twentieth of a
    tiny input's whole call); the mapping's own dict (``os.environ._data``,
    which ``os.environ[...] = ...`` and ``monkeypatch.setenv`` update) is read
    directly where CPython has one."""
    data = getattr(os.environ, "_data", None)
    try:
        key = os.environ.encodekey(ENV_VAR)
        decode = os.environ.decodevalue
    except AttributeError:
        data = None
    if not isinstance(data, dict):
        return lambda: os.environ.get(ENV_VAR)

    def lookup():
        raw = data.get(key)
        return None if raw is None else decode(raw)

    return lookup


_env_backend = _environ_lookup()


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend name in force: argument, context, environment, or 'auto'."""
    if backend is not None:
        return _check_name(backend, "backend")
    stack = _local.stack  # _stack() without creating it: every eager call reads it
    if stack:
        for name in reversed(stack):
            if name is not None:
                return name
    env = _env_backend()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return "auto"


def resolve(backend: Optional[str], device: torch.device, op: str) -> str:
    """Chooses the backend for one call; raises if a named one cannot serve.

    Under torch.compile the choice is made once, at trace time (a constant of
    the graph), like any other Python-level configuration. The chosen
    backend's table entry is loaded (``implementation(name)``).
    """
    return _resolve(backend, device.type, op)


@torch._dynamo.assume_constant_result
def _resolve(backend: Optional[str], device_type: str, op: str) -> str:
    device = torch.device(device_type)
    name = requested_backend(backend)
    if name == "auto":
        if _why_not("cpp", device, op) is None:
            name = "cpp"
        elif device.type == "cuda" and _why_not("triton", device, op) is None:
            name = "triton"
        else:
            _extension.warn_if_missing()
            name = "torch"
    else:
        reason = _why_not(name, device, op)
        if reason is not None:
            raise RuntimeError(f"pyramid_ext: backend={name!r} cannot run {op} on a {device.type} tensor: {reason}")
    _load(name)
    return name


def _register_fast_gate() -> None:
    """Hands the C++ fast paths' gate (csrc/fast_call_gate.cpp) the state it
    reads per call instead of asking resolve(): this thread's use_backend
    names (``_local``), os.environ's dict (as ``_env_backend`` reads it), the
    encoded values of ENV_VAR that select the compiled ops, and the ONNX
    exporters' flags (export.onnx_flag_objects, imported on the first call).
    Without it (no extension, no such dict) the fast paths decline every call
    and the general path serves them."""
    data = getattr(os.environ, "_data", None)
    if not _extension.LOADED or not isinstance(data, dict):
        return
    from . import export

    try:
        key = os.environ.encodekey(ENV_VAR)
        compiled = tuple(os.environ.encodevalue(v) for v in ("", "auto", "cpp"))
    except AttributeError:
        return
    _extension._C._fast_gate_init(_local, data, key, compiled, export.onnx_flag_objects,
                                  lambda: torch.onnx.is_in_onnx_export())


_register_fast_gate()


# --------------------------------------------------------------------------
# The backend table
# --------------------------------------------------------------------------

# The ops every entry provides, each with one signature in every backend:
#   multi_pool2d(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels) -> (values, indices)
#   upsample_concat(x, branches, size, align_corners, x_first, channels_last) -> out
#   upsample_concat_out(x, branches, align_corners, x_first, out) -> out
#   upsample_shift_add(base, taps, kernel_size, align_corners) -> out
# (the contracts of docs/DESIGN.md, "Op contracts").
OPS = ("multi_pool2d", "upsample_concat", "upsample_concat_out", "upsample_shift_add")


def _functorch():
    from . import _functorch as module  # (needs the compiled ops registered)

    return module


def grad_functions(suffix: str = ""):
    """The entry points of the ops pyramid_ext::<op><suffix> under a grad
    transform (_functorch: autograd Functions that functorch accepts)."""
    return _functorch().functions(suffix)


def grad_transform_active() -> bool:
    """Under torch.func.grad / vjp / jacrev, where the compiled ops' C++ autograd
    Function and torch.library's autograd (the Triton ops') raise: the ops run
    through grad_functions() there."""
    return (not torch.compiler.is_dynamo_compiling() and torch._C._are_functorch_transforms_active()
            and _functorch().grad_transform_active())


def autograd_functions_needed() -> bool:
    """Where the ops whose autograd is torch.library's (upsample_shift_add, every
    Triton op) run through grad_functions(): under a grad transform, and inside
    a forward-AD dual level, where that autograd has no jvp for an input that
    requires grad and carries a tangent (the Functions' jvp serves both)."""
    return (not torch.compiler.is_dynamo_compiling()
            and (forward_ad._current_level >= 0 or grad_transform_active()))


class _Compiled:
    """The "cpp" entry: the compiled ops (C++ on CPU, CUDA kernels on GPU)."""

    @staticmethod
    def multi_pool2d(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels):
        if grad_transform_active():
            return grad_functions().multi_pool2d(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels)
        return torch.ops.pyramid_ext.multi_pool2d(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels)

    @staticmethod
    def upsample_concat(x, branches, size, align_corners, x_first, channels_last):
        if grad_transform_active():
            return grad_functions().upsample_concat(x, branches, size, align_corners, x_first, channels_last)
        return torch.ops.pyramid_ext.upsample_concat(x, branches, size, align_corners, x_first, channels_last)

    @staticmethod
    def upsample_concat_out(x, branches, align_corners, x_first, out):
        torch.ops.pyramid_ext.upsample_concat_out(x, branches, align_corners, x_first, out)
        return out

    @staticmethod
    def upsample_shift_add(base, taps, kernel_size, align_corners):
        if autograd_functions_needed():
            return grad_functions().upsample_shift_add(base, taps, kernel_size, align_corners)
        return torch.ops.pyramid_ext.upsample_shift_add(base, taps, kernel_size, align_corners)


# "triton" (the module pyramid_ext.triton) is added by _load, on the first call
# that resolves to it: importing Triton is slow.
_TABLE = {"cpp": _Compiled, "torch": reference}


def _load(name: str) -> None:
    if name == "triton" and name not in _TABLE:
        from . import triton

        _TABLE[name] = triton


def implementation(name: str):
    """The table entry of backend `name`, a name `resolve` returned (which
    has loaded it: under torch.compile the lookup is then a plain dict read
    of the traced code, the import having run at trace time)."""
    return _TABLE[name]
