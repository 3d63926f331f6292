"""Compiles every Triton kernel as a GPU would run it, on a machine with no GPU.

Triton's interpreter (TRITON_INTERPRET=1, how CI runs tests/test_triton.py)
never compiles a kernel, so it cannot see what only the compiler does: an int
argument equal to 1 is specialised into a constant (a Python int inside the
kernel, with no `.to`), pointers and ints are specialised on their alignment,
every block shape must be a power of two, and ptxas must accept the code. On
the H200 (2026-12-04) 45 tests of test_triton.py failed on the first of these.

This script calls the ops' Triton implementations on CPU tensors with Triton's
active driver replaced by one that reports an sm_90 GPU: each launch compiles
its kernel for sm_90 through Triton's own path (specialisation, TTIR, TTGIR,
LLVM, PTX, and the bundled ptxas to a cubin), then the launch does nothing.
Only compilation is checked (outputs are never computed); the shapes put 1 into
every size, stride and channel count a kernel takes, and every dtype, layout,
mode and flag that selects a different specialisation.

Run as its own process (tests/test_triton_compile.py does), without
TRITON_INTERPRET: `python tests/triton_compile_sm90.py [pool|upsample_concat|
upsample_shift_add ...]` (default: all three) prints one line per failing call
and exits 1 if any failed.
"""
import os
import sys
import traceback
from types import SimpleNamespace

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile_sm90.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from pyramid_ext import triton as pet  # noqa: E402
from pyramid_ext.triton import _multi_pool2d, _upsample_concat, _upsample_shift_add  # noqa: E402
from pyramid_ext.windows import normalize_bins, pyramid_windows  # noqa: E402

OPS = torch.ops.pyramid_ext


class _Sm90Driver:
    """Triton's driver interface as far as compiling and (not) launching needs."""

    def __init__(self):
        props = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}
        self.utils = SimpleNamespace(
            get_device_properties=lambda device: props,
            load_binary=lambda name, kernel, shared, device: (1, 1, 0, 0, 1024),
            unload_module=lambda module: None,
        )
        self.launcher_cls = lambda src, metadata: (lambda *args, **kwargs: None)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_capability(self, device=None):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)


def _no_device_check(*tensors):
    pass


# Each call compiles its kernels once per specialisation (about 2 s each on this
# machine's CPUs), so the cases cross the float32 ones with every shape, layout
# and flag, and take the other dtypes on one general shape.
OTHER_DTYPES = (torch.float16, torch.bfloat16, torch.float64)


def _leaf(shape, dtype, cl):
    t = torch.randn(shape, dtype=dtype)
    return (t.contiguous(memory_format=torch.channels_last) if cl else t).requires_grad_(True)


def _pool_cases():
    shapes = [((1, 1, 1, 1), (1,)), ((2, 3, 7, 5), (1, 2, 3)), ((1, 16, 16, 32), (1, 2, 6)), ((2, 1, 9, 1), ((3, 1),))]
    runs = [(shape, bins, mode, torch.float32, cl) for shape, bins in shapes for mode in ("avg", "max")
            for cl in (False, True)]
    runs += [(shapes[1][0], shapes[1][1], mode, dtype, i % 2 == 1) for i, dtype in enumerate(OTHER_DTYPES)
             for mode in ("avg", "max")]
    for shape, bins, mode, dtype, cl in runs:
        yield f"pool {mode} {tuple(shape)} bins={bins} {dtype} cl={cl}", (shape, bins, mode, dtype, cl)


def _run_pool(shape, bins, mode, dtype, cl):
    x = _leaf(shape, dtype, cl)
    hb, wb, lb = pyramid_windows(shape[2], shape[3], normalize_bins(bins))
    values, _ = OPS.multi_pool2d_triton(x, hb, wb, lb, 0 if mode == "avg" else 1, cl)
    values.sum().backward()
    if mode == "max":  # values only: its own path
        OPS.multi_pool2d_triton(x.detach(), hb, wb, lb, 2, cl)


def _upcat_cases():
    shapes = [((1, 1, 1, 1), [(1, 1, 1, 1)], (1, 1)),
              ((2, 3, 7, 5), [(2, 2, 1, 1), (2, 1, 2, 3), (2, 4, 6, 6)], (7, 5)),
              ((1, 16, 32, 32), [(1, 16, 1, 2), (1, 1, 3, 1)], (32, 32)),
              ((2, 2, 1, 9), [(2, 1, 1, 4)], (1, 9))]
    runs = [shape + (torch.float32, cl, align) for shape in shapes for cl in (False, True) for align in (False, True)]
    runs += [shapes[1] + (dtype, i % 2 == 1, align) for i, dtype in enumerate(OTHER_DTYPES) for align in (False, True)]
    for xshape, bshapes, size, dtype, cl, align in runs:
        yield (f"upsample_concat x={xshape} branches={bshapes} {dtype} cl={cl} align={align}",
               (xshape, bshapes, size, dtype, cl, align))


def _run_upcat(xshape, bshapes, size, dtype, cl, align):
    x, branches = _leaf(xshape, dtype, cl), [_leaf(s, dtype, cl) for s in bshapes]
    for x_first in (True, False):
        out = OPS.upsample_concat_triton(x, branches, list(size), align, x_first, cl)
        out.sum().backward()
        OPS.upsample_concat_out_triton(x.detach(), [b.detach() for b in branches], align, x_first,
                                       torch.empty_like(out))


def _shift_cases():
    shapes = [((1, 1, 1, 1), [(1, 1)]), ((2, 3, 7, 5), [(1, 1), (2, 3), (6, 6)]), ((1, 16, 16, 16), [(1, 2), (3, 1)])]
    runs = [shape + (k, torch.float32, False, align) for shape in shapes for k in (1, 3) for align in (False, True)]
    runs += [shapes[1] + (k, torch.float32, True, False) for k in (1, 3)]
    runs += [shapes[1] + (3, dtype, i % 2 == 1, align) for i, dtype in enumerate(OTHER_DTYPES)
             for align in (False, True)]
    for base_shape, tap_sizes, k, dtype, cl, align in runs:
        yield (f"upsample_shift_add base={base_shape} taps={tap_sizes} k={k} {dtype} cl={cl} align={align}",
               (base_shape, tap_sizes, k, dtype, cl, align))


def _run_shift(base_shape, tap_sizes, k, dtype, cl, align):
    n, c = base_shape[:2]
    base = _leaf(base_shape, dtype, cl)
    taps = [_leaf((n, c * k * k, h, w), dtype, cl) for h, w in tap_sizes]
    out = OPS.upsample_shift_add_triton(base, taps, k, align)
    out.sum().backward()


CASES = {"pool": (_pool_cases, _run_pool), "upsample_concat": (_upcat_cases, _run_upcat),
         "upsample_shift_add": (_shift_cases, _run_shift)}


def main(ops) -> int:
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        sys.exit(f"unknown op(s) {unknown}: choose from {list(CASES)}")
    driver.set_active(_Sm90Driver())
    for module in (_multi_pool2d, _upsample_concat, _upsample_shift_add):
        module._check_device = _no_device_check
    assert not pet.INTERPRETED
    failures = []
    count = 0
    for op in ops:
        cases, run = CASES[op]
        for name, args in cases():
            count += 1
            try:
                run(*args)
            except Exception as e:  # noqa: BLE001 -- every failure is reported, then the exit status says so
                first = str(e).strip().splitlines()
                failures.append(name)
                print(f"FAILED {name}: {type(e).__name__}: {' | '.join(first[-3:]) if first else ''}", flush=True)
                if os.environ.get("VERBOSE"):
                    traceback.print_exc()
    print(f"{count - len(failures)} of {count} calls compiled every kernel they launch for sm_90 "
          f"(Triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(CASES)))
