"""Asserts that the extension was built with CUDA kernels for every op.

Run by `make cuda-check` after a FORCE_CUDA=1 build (no GPU needed).
"""
import sys

import torch

import pyramid_ext as pe

OPS = ["multi_pool2d", "multi_pool2d_backward", "upsample_concat", "upsample_concat_out", "upsample_concat_backward",
       "upsample_shift_add", "upsample_shift_add_backward"]

info = pe.build_info()
print("torch", torch.__version__, "CUDA", torch.version.cuda, "build", info)
if not info.get("extension"):
    sys.exit(f"extension did not load: {info}")
if not info["cuda"]:
    sys.exit("extension was built without CUDA")
missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyramid_ext::{op}", "CUDA")]
missing += [op + " (CPU)" for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyramid_ext::{op}", "CPU")]
if missing:
    sys.exit(f"ops without a kernel: {missing}")
print(f"CUDA build check passed: {len(OPS)} ops have CUDA and CPU kernels; archs {info['cuda_archs']!r}")
