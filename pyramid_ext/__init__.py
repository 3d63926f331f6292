"""pyramid_ext: fused pyramid pooling for PyTorch.

Ops (each one pass over the input, gather-style backward, no atomics):
    multi_adaptive_avg_pool2d, multi_adaptive_max_pool2d, spatial_pyramid_pool,
    upsample_concat, upsample_concat_conv2d
Backends: "cpp" (compiled C++/CUDA), "triton", "torch" (pure PyTorch); see
``available_backends(device)`` and ``use_backend(name)``.
"""
from . import _extension
from .backends import BACKENDS, available_backends, use_backend
from .functional import (
    multi_adaptive_avg_pool2d,
    multi_adaptive_max_pool2d,
    spatial_pyramid_pool,
    upsample_concat,
    upsample_concat_conv2d,
)
from .memory import cpu_cache_stats, empty_cache, set_cpu_cache_limit
from . import nn  # noqa: E402  (drop-in modules)
from .convert import convert  # noqa: E402  (model conversion)

__version__ = "0.1.0"

if not _extension.LOADED:
    _extension.warn_if_missing()


def build_info() -> dict:
    """What the compiled extension holds: version, CUDA, archs, OpenMP."""
    return _extension.build_info()


__all__ = [
    "BACKENDS",
    "available_backends",
    "build_info",
    "convert",
    "cpu_cache_stats",
    "empty_cache",
    "multi_adaptive_avg_pool2d",
    "multi_adaptive_max_pool2d",
    "nn",
    "set_cpu_cache_limit",
    "spatial_pyramid_pool",
    "upsample_concat",
    "upsample_concat_conv2d",
    "use_backend",
]
