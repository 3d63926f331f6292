"""Device helpers, launch settings and host-side helpers shared by the Triton ops."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether @triton.jit functions are
# interpreted, so what matters is the variable's value when this module loads.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_fn(fn):
    """@triton.jit for helpers called from kernels. Under the interpreter a
    @triton.jit helper re-patches triton.language on every call (about a
    millisecond each); there the helper runs as the plain Python function it
    is, on the interpreter's tensors, with the same arithmetic."""
    return fn if INTERPRETED else triton.jit(fn)


# --------------------------------------------------------------------------
# Small helpers (device code)
# --------------------------------------------------------------------------


if INTERPRETED:

    def _cast_out(v, dtype):
        """v (fp32/fp64) in the output dtype, rounded to nearest even. The
        interpreter truncates fp32 -> bfloat16, so round the bits here, as
        c10::BFloat16 (and the GPU's cvt.rn) does; NaN stays a quiet NaN."""
        if dtype == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(v != v, 0x7FC0, bits)
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return v.to(dtype)

else:

    @triton.jit
    def _cast_out(v, dtype: tl.constexpr):
        return v.to(dtype)  # round to nearest even


@_device_fn
def _div(a, b, ACC_FP64: tl.constexpr):
    # IEEE-rounded division: Triton's `/` on fp32 is approximate on GPUs.
    if ACC_FP64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


# --------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _acc(dtype: torch.dtype):
    return (tl.float64, True) if dtype == torch.float64 else (tl.float32, False)


def _check_device(*tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRETED:
            raise RuntimeError(
                "pyramid_ext Triton ops run on CPU tensors only under Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing triton / pyramid_ext.triton (it was not set when the "
                "kernels were defined); otherwise use CUDA tensors or another backend"
            )


def _channel_block(c: int, cap: int = 32) -> int:
    return max(1, min(cap, _next_pow2(c)))


def _tile(budget: int, *fixed: int, want: int) -> int:
    """Largest power of two <= want's next power of two that keeps the tile
    (fixed dims times it) within `budget` elements."""
    room = max(1, budget // max(1, _prod(fixed)))
    return max(1, min(_next_pow2(want), _prev_pow2(room)))


def _prod(vals) -> int:
    out = 1
    for v in vals:
        out *= v
    return out


def _prev_pow2(v: int) -> int:
    return 1 << (max(1, int(v)).bit_length() - 1)


_TILE = 4096  # elements per program tile
# Long sums (average pooling, the resize backward) add float terms in runs of
# at most _RUN per lane, the runs in fp64: within 1e-6 of fp64 for up to 2^31
# elements (the run length and bound of csrc/cpu/simd_loops.h).
_RUN = 12

# No mul+add -> fma contraction on GPUs: the taps, weights and sums round
# operation by operation, as ATen's CPU kernels and the interpreter do.
_LAUNCH = dict(enable_fp_fusion=False)

