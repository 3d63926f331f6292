"""Builds and loads the emulated CUDA build (csrc/cuda_emu/): the kernels and
launchers of csrc/cuda/ compiled by the host C++ compiler against the CUDA
emulator, as a test-only extension that registers torch.ops.pyramid_ext_emu.

Not part of the shipped package: tests/test_cuda_emu.py builds it (cached in
build/cuda-emu) with torch.utils.cpp_extension.load. One process can load one
build only (the ops' namespace is registered once).
"""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = [
    os.path.join(CSRC, "cuda_emu", name)
    for name in ("module.cpp", "emu.cpp", "selftest.cpp", "multi_pool2d_emu.cpp", "upsample_concat_emu.cpp",
                 "upsample_shift_add_emu.cpp")
]
# The CUDA sources the emulated build compiles (for the list of kernels).
CUDA_SOURCES = [os.path.join(CSRC, "cuda", n)
                for n in ("multi_pool2d.cu", "upsample_concat.cu", "upsample_shift_add.cu", "common.cuh")]


def default_build_dir(plant_bug: int = 0) -> str:
    name = "cuda-emu" if plant_bug == 0 else f"cuda-emu-bug{plant_bug}"
    return os.path.join(ROOT, "build", name)


def load(build_dir: str | None = None, plant_bug: int = 0, verbose: bool = False):
    """Compiles (if stale) and imports the emulated build; returns its module."""
    import torch.utils.cpp_extension as ext

    build_dir = build_dir or default_build_dir(plant_bug)
    os.makedirs(build_dir, exist_ok=True)
    flags = [
        "-O2", "-DPYRAMID_EXT_CUDA_EMU", f"-DPE_EMU_PLANT_BUG={plant_bug}",
        # no FMA contraction, as the CPU build (-ffp-contract=off) and the CUDA build (--fmad=false)
        "-ffp-contract=off",
        "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-Werror",
    ]
    os.environ.setdefault("MAX_JOBS", "2")
    return ext.load(
        name="pyramid_ext_cuda_emu" if plant_bug == 0 else f"pyramid_ext_cuda_emu_bug{plant_bug}",
        sources=SOURCES,
        extra_include_paths=[CSRC],
        extra_cflags=flags,
        build_directory=build_dir,
        verbose=verbose,
    )


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--plant-bug", type=int, default=0)
    p.add_argument("--build-dir")
    a = p.parse_args()
    m = load(a.build_dir, a.plant_bug, verbose=True)
    print("built", m.__file__)
