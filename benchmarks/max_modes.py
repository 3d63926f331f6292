"""(python benchmarks/max_modes.py [NxCxHxW,...]; env ROUNDS, LAYOUTS=cl,nchw, ISA=1/2/3)
Max pooling without indices: the op's mode 1 (indexed, the kernel every max call ran before) against
mode 2 (values only), the public call, and eager, interleaved in one process, one thread's CPU time."""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import pyramid_ext as pe
from pyramid_ext.windows import normalize_bins, pyramid_windows

torch.set_num_threads(1)
clock = time.thread_time_ns
ops = torch.ops.pyramid_ext
ROUNDS = int(os.environ.get("ROUNDS", "15"))
isa = int(os.environ.get("ISA", "0"))
if isa:
    pe._C._set_test_override("simd_isa", isa)


def case(shape, bins, cl, spp):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    hb, wb, lb = pyramid_windows(shape[2], shape[3], normalize_bins(bins, "bins"), "adaptive")
    hb, wb, lb = list(hb), list(wb), list(lb)
    cll = cl and not spp
    if spp:
        eager = lambda: torch.cat([F.adaptive_max_pool2d(x, b).flatten(1) for b in bins], 1)
        public = lambda: pe.spatial_pyramid_pool(x, bins)
    else:
        eager = lambda: [F.adaptive_max_pool2d(x, b) for b in bins]
        public = lambda: pe.multi_adaptive_max_pool2d(x, bins)
    fns = {"mode1": lambda: ops.multi_pool2d(x, hb, wb, lb, 1, cll),
           "mode2": lambda: ops.multi_pool2d(x, hb, wb, lb, 2, cll),
           "public": public, "eager": eager}
    v1, _ = fns["mode1"]()
    v2, i2 = fns["mode2"]()
    assert i2.numel() == 0 and torch.equal(v1.view(torch.int32), v2.view(torch.int32))
    names = list(fns)
    calls = max(1, int(2e6 // x.numel()))
    for n in names:
        for _ in range(2):
            fns[n]()
    samples = {n: [] for n in names}
    for r in range(ROUNDS):
        for n in names[r % 4:] + names[:r % 4]:
            t0 = clock()
            for _ in range(calls):
                fns[n]()
            samples[n].append((clock() - t0) / calls / 1e3)
    med = {n: statistics.median(s) for n, s in samples.items()}
    tag = f"{'spp' if spp else 'max'} {bins} {'cl' if cl else 'nchw'} {tuple(shape)}"
    print(f"{tag:<44} mode1 {med['mode1']:9.1f} us  mode2 {med['mode2']:9.1f} us  public {med['public']:9.1f} us"
          f"  eager {med['eager']:9.1f} us | mode1/mode2 {med['mode1'] / med['mode2']:.2f}"
          f"  eager/public {med['eager'] / med['public']:.2f}  eager/mode1 {med['eager'] / med['mode1']:.2f}",
          flush=True)


print(f"# load {os.getloadavg()[0]:.2f}, 1 thread, thread CPU time, {ROUNDS} rounds, medians, simd_isa={isa or 'auto'}")
shapes = [tuple(int(v) for v in s.split("x")) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else \
    [(1, 2048, 64, 64), (4, 512, 60, 60), (8, 512, 32, 32), (16, 256, 16, 16), (1, 8, 8, 8)]
layouts = os.environ.get("LAYOUTS", "cl").split(",")
for shape in shapes:
    for cl in [l == "cl" for l in layouts]:
        case(shape, (4, 2, 1), cl, True)
        case(shape, (1, 2, 3, 6), cl, False)
print(f"# load {os.getloadavg()[0]:.2f}")
