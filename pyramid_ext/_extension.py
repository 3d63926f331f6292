"""Loads the compiled extension, if it was built, and answers what it holds."""
from __future__ import annotations

import functools
import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.pyramid_ext.*)

    LOADED = True
    LOAD_ERROR = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    LOADED = False
    # A missing module reads as a circular import on Python >= 3.10; say what it is.
    LOAD_ERROR = "pyramid_ext._C is not built" if "cannot import name '_C'" in str(e) else e

BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` (or `make build`) from the pyramid_ext source tree, "
    "against the torch you run"
)

_warned = False


def warn_if_missing() -> None:
    global _warned
    if not LOADED and not _warned:
        _warned = True
        warnings.warn(
            f"pyramid_ext: the compiled extension is not available ({LOAD_ERROR}); falling back to the "
            f"pure-PyTorch backend. To get the fused kernels, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )


@functools.lru_cache(maxsize=None)
def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether torch.ops.pyramid_ext.<op_name> has a kernel for device_type."""
    if not LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyramid_ext::{op_name}", key)


def build_info() -> dict:
    if not LOADED:
        return {"extension": False, "error": str(LOAD_ERROR)}
    return {
        "extension": True,
        "version": getattr(_C, "__version__", "unknown"),
        "cuda": _C.with_cuda(),
        "cuda_archs": _C.cuda_archs(),
        "openmp": _C.with_openmp(),
    }
