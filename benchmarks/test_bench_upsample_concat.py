"""upsample_concat benchmarks: x (N, C, H, W) plus four branches (N, C/4, b, b), b = 1, 2, 3, 6, bilinear,
align_corners=False, NCHW and channels_last. Modes: "fresh" (a new output each call), "out" (out= into
a preallocated output), "fwdbwd" (forward + backward to x and every branch). "copy-x"
(out[:, :C].copy_(x)) is the floor of the forward modes.

One benchmark group per (mode, layout, shape); the contenders inside a group are comparable.
"""
import pytest

import bench_cases as bc

SHAPES = bc.bench_shapes()


@pytest.mark.parametrize("contender", bc.CONTENDERS)
@pytest.mark.parametrize("layout", bc.LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=bc.shape_id)
@pytest.mark.parametrize("mode", ["fresh", "out"])
def test_upsample_concat(run_case, mode, shape, layout, contender):
    run_case(bc.Case("uc", mode, layout, shape), contender)


@pytest.mark.parametrize("contender", [c for c in bc.CONTENDERS if c not in bc.FLOORS])
@pytest.mark.parametrize("layout", bc.LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=bc.shape_id)
def test_upsample_concat_fwdbwd(run_case, shape, layout, contender):
    run_case(bc.Case("uc", "fwdbwd", layout, shape), contender)
