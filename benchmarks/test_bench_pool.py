"""Pooling benchmarks: multi_adaptive_avg_pool2d / multi_adaptive_max_pool2d (bins 1, 2, 3, 6) and
spatial_pyramid_pool (max, bins 4, 2, 1), forward and forward+backward, NCHW and channels_last.

One benchmark group per (op, mode, layout, shape); the contenders inside a group are comparable.
"""
import pytest

import bench_cases as bc

SHAPES = bc.bench_shapes()


@pytest.mark.parametrize("contender", [c for c in bc.CONTENDERS if c not in bc.FLOORS])
@pytest.mark.parametrize("layout", bc.LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=bc.shape_id)
@pytest.mark.parametrize("mode", bc.POOL_MODES)
@pytest.mark.parametrize("op", bc.POOL_OPS)
def test_pool(run_case, op, mode, shape, layout, contender):
    run_case(bc.Case(op, mode, layout, shape), contender)
