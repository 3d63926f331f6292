"""(python benchmarks/max_isa.py 8x512x32x32,16x256x16x16; env ROUNDS)
channels_last max pooling per ISA copy (simd_isa 3 AVX-512, 2 AVX2, 1 baseline), interleaved in one process,
one thread's CPU time, medians: the AVX2 and baseline copies against the AVX-512 one."""
import os, statistics, sys, time
import torch
import torch.nn.functional as F
import pyramid_ext as pe
from pyramid_ext.windows import normalize_bins, pyramid_windows

torch.set_num_threads(1)
ops = torch.ops.pyramid_ext
ROUNDS = int(os.environ.get("ROUNDS", "9"))
print(f"# load {os.getloadavg()[0]:.2f}, 1 thread, thread CPU time, {ROUNDS} rounds, medians")
for shape in [tuple(int(v) for v in s.split("x")) for s in sys.argv[1].split(",")]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    for bins in ((4, 2, 1), (1, 2, 3, 6)):
        hb, wb, lb = [list(v) for v in pyramid_windows(shape[2], shape[3], normalize_bins(bins, "b"), "adaptive")]
        for mode in (1, 2):
            samples = {3: [], 2: [], 1: []}
            for r in range(ROUNDS):
                for isa in (3, 2, 1) if r % 2 == 0 else (1, 2, 3):
                    pe._C._set_test_override("simd_isa", isa)
                    t0 = time.thread_time_ns()
                    ops.multi_pool2d(x, hb, wb, lb, mode, True)
                    samples[isa].append((time.thread_time_ns() - t0) / 1e6)
            m = {k: statistics.median(v) for k, v in samples.items()}
            print(f"{tuple(shape)} bins {bins} mode {mode}: avx512 {m[3]:.3f} ms  avx2 {m[2]:.3f} ms  baseline "
                  f"{m[1]:.3f} ms | avx2/avx512 {m[2] / m[3]:.2f}  baseline/avx512 {m[1] / m[3]:.2f}", flush=True)
pe._C._set_test_override("simd_isa", 0)
print(f"# load {os.getloadavg()[0]:.2f}")
