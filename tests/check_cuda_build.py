"""Asserts that the extension was built with CUDA kernels for every op.

Run by `make cuda-check` after a FORCE_CUDA=1 build (no GPU needed).
"""
import os
import shutil
import subprocess
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

# An op's error message must reach Python, numbers and all. On the GPU machine's
# image (torch 2.11, GCC 13 in /opt/gcc; 2026-12-04) the extension came out
# with libstdc++ linked statically (not among its NEEDED libraries; its own
# std::ostream::_M_insert<long>), and formatting a number in a message
# segfaulted. setup.py now links the shared libstdc++ torch loaded
# (torch_libstdcxx); the same toolchain fault reproduced here with
# -static-libstdc++ cuts the message at its first number instead. A child
# process, so a crash is reported rather than fatal.
so = pe._C.__file__
if shutil.which("nm"):
    defined = [line for line in subprocess.run(["nm", "-DC", "--defined-only", so], capture_output=True,
                                               text=True).stdout.splitlines() if "_M_insert<long>" in line]
    print("libstdc++'s std::ostream::_M_insert<long>:", "DEFINED in " + so if defined else "imported (as it should be)")
if shutil.which("readelf"):
    needed = [line.split("[")[-1].rstrip("]") for line in subprocess.run(["readelf", "-d", so], capture_output=True,
                                                                        text=True).stdout.splitlines()
              if "NEEDED" in line]
    print("NEEDED:", " ".join(needed))
    if sys.platform.startswith("linux") and not any(n.startswith("libstdc++.so") for n in needed):
        sys.exit(f"{so} does not import libstdc++.so: the toolchain linked a private copy of libstdc++ into it "
                 "(setup.py's torch_libstdcxx should have prevented this)")
child = subprocess.run([sys.executable, "-c", (
    "import torch, pyramid_ext\n"
    "try:\n"
    "    torch.ops.pyramid_ext.multi_pool2d(torch.zeros(1, 1, 8, 8), [0, 9], [0, 8], [1, 1], 0, False)\n"
    "except RuntimeError as e:\n"
    "    print(str(e).splitlines()[0])\n")], capture_output=True, text=True,
    env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))))
if child.returncode != 0 or "window [0, 9) along H is empty" not in child.stdout:
    sys.exit(f"an op's error message did not reach Python (exit status {child.returncode}): "
             f"{(child.stdout + child.stderr).strip()[-2000:]}")
print("error path:", child.stdout.strip())
print(f"CUDA build check passed: {len(OPS)} ops have CUDA and CPU kernels; archs {info['cuda_archs']!r}")
