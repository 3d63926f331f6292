import os

import pytest
import torch

import pyramid_ext as pe
from pyramid_ext import _extension

from ._helpers import DTYPES, LAYOUTS, TOL, layout  # noqa: F401  (re-exported for the test modules)

try:  # property-based tests (tests/test_properties.py)
    from hypothesis import HealthCheck, settings as _hyp_settings

    _HYP_COMMON = dict(deadline=None, print_blob=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    # CI: a fixed, derandomized run (a failure reproduces by rerunning it).
    _hyp_settings.register_profile("ci", max_examples=300, derandomize=True, database=None, **_HYP_COMMON)
    # Local runs: a new seed each run; a failure prints --hypothesis-seed=N.
    _hyp_settings.register_profile("dev", max_examples=300, **_HYP_COMMON)
    # `make fuzz`: many more examples, new seed each run.
    _hyp_settings.register_profile("fuzz", max_examples=5000, **_HYP_COMMON)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
except ImportError:  # test_properties.py then fails on import, naming hypothesis
    pass

# Backends the CPU test suite runs every op on. Triton runs in
# tests/test_triton.py (under TRITON_INTERPRET=1), CUDA in tests/test_cuda.py.
CPU_BACKENDS = ["cpp", "torch"]


def need_backend(name: str, device="cpu"):
    """Skips (with the reason) when `name` cannot run here. CI sets
    PYRAMID_EXT_REQUIRE_CPP=1, where a missing compiled backend fails instead."""
    if name not in pe.available_backends(device):
        if name == "cpp" and os.environ.get("PYRAMID_EXT_REQUIRE_CPP") == "1":
            pytest.fail(f"compiled extension required but not available: {_extension.LOAD_ERROR}")
        pytest.skip(f"backend {name!r} not available on {device}")


# For adaptive windows the "torch" backend *is* F.adaptive_*_pool2d and
# F.interpolate + torch.cat, the very expectations of the tests: there it would
# be compared with itself. Tests whose expectation is PyTorch eager on default
# windows take `backend` (the compiled kernels only); tests where the torch
# backend runs code of its own (non-adaptive windows, packing of levels, the
# empty-tensor path, out= copies) take `any_backend`.
@pytest.fixture(params=["cpp"])
def backend(request):
    need_backend(request.param)
    return request.param


@pytest.fixture(params=CPU_BACKENDS)
def any_backend(request):
    need_backend(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _fresh_uc_conv_registry():
    """Each test starts with no signature registered with upsample_concat_conv2d's C++ fast
    path (csrc/uc_conv_fast.cpp `_uc_conv_fast`): a test that exercises the Python path (a
    1x1 path chosen by a patched constant, a spy on the backend table) meets it on its
    first call, as a fresh process would. tests/test_fast_path.py tests that path."""
    if _extension.LOADED:
        _extension._C._uc_conv_forget()
    yield


def pytest_collection_modifyitems(config, items):
    # The `long` tests (tests/test_long_run.py, about a minute) run under
    # `make test-long` (PYRAMID_EXT_LONG=1), the `large` ones (tests/test_precision.py,
    # maps past 2^31 elements, about 10 GB of memory) under `make test-large`
    # (PYRAMID_EXT_LARGE=1); elsewhere they skip, saying how to run them.
    gated = {
        "long": ("PYRAMID_EXT_LONG", "long run: set PYRAMID_EXT_LONG=1 (make test-long)"),
        "large": ("PYRAMID_EXT_LARGE", "large map (about 10 GB): set PYRAMID_EXT_LARGE=1 (make test-large)"),
    }
    for marker, (env, reason) in gated.items():
        if os.environ.get(env) == "1":
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
