"""Shared fixtures of the pytest-benchmark suite (see README.md and bench_cases.py).

    pytest benchmarks                          time everything (large shapes: minutes)
    PYRAMID_EXT_BENCH_SMALL=1 pytest benchmarks --benchmark-disable
                                               smoke run: every body once, tiny shapes
"""
from __future__ import annotations

import os

import pytest
import torch

import bench_cases as bc

THREADS_ENV = "PYRAMID_EXT_BENCH_THREADS"


def _threads() -> int:
    return int(os.environ.get(THREADS_ENV, "2"))


def pytest_report_header(config):
    device = bc.bench_device()
    backends = {op: bc.pe.available_backends(device, op=op) for op in ("multi_pool2d", "upsample_concat")}
    threads = f"{_threads()} threads" if device.type == "cpu" else "CUDA (synchronized in the timed function)"
    return [
        f"pyramid_ext benchmarks: device={device} ({threads}), "
        f"shapes={'small' if bc.env_flag(bc.SMALL_ENV) else 'full'}, "
        f"THP_MEM_ALLOC_ENABLE={bc.thp_status()}, torch.compile backend={bc.compile_backend()}",
        f"pyramid_ext {bc.pe.__version__} backends: {backends}; contenders: {', '.join(bc.enabled_contenders())}",
    ]


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    device = bc.bench_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{bc.DEVICE_ENV}={device} but CUDA is not available")
    bc.setup_process(device, _threads())
    return device


@pytest.fixture
def run_case(benchmark, bench_device):
    """run_case(case, contender): builds the inputs and the contender (skips if
    unavailable), checks its result against eager, warms it up (compile: the
    compilation happens here, untimed) and times its step()."""

    def run(case: bc.Case, contender: str) -> None:
        benchmark.group = case.group
        try:
            bc.check_available(case, contender, bench_device)
        except bc.Unavailable as exc:
            pytest.skip(str(exc))
        inputs = bc.make_inputs(case, bench_device)
        try:
            cont = bc.build(case, contender, inputs)  # compile: compiles here, untimed
        except bc.Unavailable as exc:
            pytest.skip(str(exc))
        benchmark.extra_info.update(
            op=case.op, mode=case.mode, layout=case.layout, shape=bc.shape_id(case.shape),
            contender=contender, device=str(bench_device), thp=bc.thp_status(),
            compile_backend=bc.compile_backend() if contender == "compile" else None,
            threads=torch.get_num_threads() if bench_device.type == "cpu" else None,
        )
        if cont.note:
            benchmark.extra_info["note"] = cont.note
        calls = 0
        if contender != "eager" and contender not in bc.FLOORS:
            bc.check_against(case, cont.run(), bc.reference_result(case, inputs))
            calls = 1
        if not getattr(benchmark, "disabled", False):
            for _ in range(cont.warmup - calls):
                cont.step()
        bc.sync(bench_device)
        benchmark(cont.step)

    return run
