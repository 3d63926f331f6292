import os

import pytest
import torch

import pyramid_ext as pe
from pyramid_ext import _extension

# Backends the CPU test suite runs every op on. Triton runs in
# tests/test_triton.py (under TRITON_INTERPRET=1), CUDA in tests/test_cuda.py.
CPU_BACKENDS = ["cpp", "torch"]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Tolerances against PyTorch's own result in the same dtype.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def need_backend(name: str, device="cpu"):
    """Skips (with the reason) when `name` cannot run here. CI sets
    PYRAMID_EXT_REQUIRE_CPP=1, where a missing compiled backend fails instead."""
    if name not in pe.available_backends(device):
        if name == "cpp" and os.environ.get("PYRAMID_EXT_REQUIRE_CPP") == "1":
            pytest.fail(f"compiled extension required but not available: {_extension.LOAD_ERROR}")
        pytest.skip(f"backend {name!r} not available on {device}")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    need_backend(request.param)
    return request.param


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x in NCHW, channels_last, or a non-contiguous view of the same values."""
    if kind == "nchw":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "noncontig":
        # Same values, every stride non-standard: a slice of a wider tensor.
        big = torch.zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3] + 1, dtype=x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    raise ValueError(kind)


LAYOUTS = ["nchw", "channels_last", "noncontig"]
