"""Builds pyramid_ext's C++/CUDA extension against the installed torch.

CUDA kernels are compiled when torch is a CUDA build, nvcc is found (CUDA_HOME)
and either a GPU is visible or FORCE_CUDA=1. TORCH_CUDA_ARCH_LIST is honoured.
PYRAMID_EXT_WERROR=1 turns warnings in the project's own sources into errors.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, include_paths

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    if os.environ.get("FORCE_CPU", "0") == "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return os.environ.get("FORCE_CUDA", "0") == "1" or torch.cuda.is_available()


def torch_libstdcxx():
    """[path] of the libstdc++ that torch runs with (Linux), to link the extension against it.

    A toolchain that links libstdc++ statically (its specs say -static-libstdc++, or only
    libstdc++.a is beside it, as with the GPU machine image's GCC 13 in /opt/gcc) otherwise puts a
    second copy of libstdc++ into the extension, whose locale state is never set up: the numbers in
    an op's error message then format to nothing (the message ends at its first number; seen here
    with -static-libstdc++) or crash (a segfault in std::ostream::_M_insert<long>, on that image).
    Named on the link line ahead of the toolchain's own libstdc++ (which g++ appends last), the
    shared library resolves every libstdc++ symbol, so nothing is copied in; where the toolchain
    links it dynamically anyway this changes nothing."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as maps:  # torch, imported above, has loaded it
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return [path]
    except OSError:
        pass
    return []


def extensions():
    with_cuda = want_cuda()
    sources = [os.path.join("csrc", name) for name in ("ops.cpp", "autograd.cpp", "fast_calls.cpp", "fast_call_gate.cpp",
                                                       "uc_conv_fast.cpp", "branch_tails.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    werror = os.environ.get("PYRAMID_EXT_WERROR", "0") == "1"
    # torch's headers as system headers: -Werror applies to our sources only.
    system_includes = []
    for d in include_paths():
        system_includes += ["-isystem", d]
    # -ffp-contract=off: no FMA contraction, so every ISA (and the CUDA build, --fmad=false below)
    # rounds each operation of the shared formulas once, in the order written.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter"] + system_includes
    if werror:
        # array-bounds stays a warning: GCC 13 reports a false out-of-bounds memmove in
        # std::vector<bool>::reserve as inlined from torch 2.11's autograd::Function::apply
        # (custom_function.h) into autograd.cpp, seen on the GPU machine's image.
        cxx += ["-Werror", "-Wno-error=array-bounds"]
    define_macros = [("PYRAMID_EXT_VERSION", f'"{VERSION}"')]
    extra_link_args = torch_libstdcxx() + ["-fopenmp"]
    extra_compile_args = {"cxx": cxx}
    ext_cls = CppExtension
    if with_cuda:
        ext_cls = CUDAExtension
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        define_macros += [("PYRAMID_EXT_WITH_CUDA", None), ("PYRAMID_EXT_CUDA_ARCHS", f'"{archs}"')]
        # --fmad=false: no FMA contraction, as -ffp-contract=off for the CPU build, so the CUDA kernels
        # round every operation of pyramid_index.h's formulas as the CPU kernels and the CPU-run emulated
        # CUDA build do (see that header). The kernels are memory-bound, so this should cost nothing
        # measurable (not timed on a GPU yet; the sm_90 PTX): multi_pool2d's is the same instructions
        # either way (sums and divisions, nothing to fuse); upsample_concat's has 372 more of 15,523
        # (each FMA a mul and an add: a few per output element, which moves at least 4 bytes of DRAM).
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"] + system_includes
        if werror:
            nvcc += ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"]
        extra_compile_args["nvcc"] = nvcc
    return [
        ext_cls(
            "pyramid_ext._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(
    name="pyramid_ext",
    version=VERSION,
    description="Fused pyramid pooling kernels for PyTorch (CPU, CUDA, Triton)",
    packages=find_packages(include=["pyramid_ext", "pyramid_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"models": ["torchvision", "segmentation-models-pytorch", "transformers"], "triton": ["triton"],
                    "plot": ["matplotlib"]},
    zip_safe=False,
)
