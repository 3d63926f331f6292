"""The CPU output-buffer cache (csrc/cpu/output_buffers.h).

The CPU kernels take their large outputs (the concatenated output, the
gradient of x: 8 MiB and up) from buffers that earlier outputs of the same
size freed, so a training loop does not pay page faults on fresh memory for
them every step. Like torch.cuda's caching allocator, but limited to these
outputs and to ``limit_bytes`` of freed memory (default 1 GiB, or
``PYRAMID_EXT_CPU_CACHE_LIMIT_MB`` at start-up). These functions mirror
``torch.cuda.empty_cache`` / ``memory_stats``.
"""
from __future__ import annotations

from typing import Dict

from . import _extension


def _c():
    if not _extension.LOADED:
        raise RuntimeError(f"pyramid_ext: the compiled extension is not available ({_extension.LOAD_ERROR}); "
                           "the CPU output cache belongs to it")
    return _extension._C


def empty_cache() -> int:
    """Frees the cached CPU output buffers (live tensors keep theirs); returns the bytes freed."""
    return _c()._empty_cpu_cache()


def set_cpu_cache_limit(limit_bytes: int) -> int:
    """Keeps at most ``limit_bytes`` of freed CPU output buffers for reuse (0 turns the cache off);
    returns the previous limit. Buffers over the new limit are freed now, oldest first."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: limit_bytes must be an int >= 0, got {limit_bytes!r}")
    return _c()._set_cpu_cache_limit(limit_bytes)


def cpu_cache_stats() -> Dict[str, int]:
    """limit_bytes, cached_bytes, cached_buffers, and hits / misses (large outputs served from the
    cache / from new memory) since start-up."""
    return dict(_c()._cpu_cache_stats())
