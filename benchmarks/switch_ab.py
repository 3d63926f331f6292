"""In-process A/B of CPU code paths chosen by the test switches (pyramid_ext._C._set_test_override).

One call of a fused op, timed under each switch configuration in turn, interleaved round by round (the order
reversed every other round), wall clock, medians: the way to compare two paths on a noisy machine, where two
processes run minutes apart measure the machine as much as the code. --cold reads a buffer of that many MiB
before every call, so x comes from memory rather than from the caches, as it does in a benchmark whose other
contenders ran in between.

    python benchmarks/switch_ab.py 4x512x60x60 maxidx auto max_cell_rows=1 --cold 64
    python benchmarks/switch_ab.py 8x512x32x32 spp.fwdbwd auto max_cell_rows=2 --cold 64
    python benchmarks/switch_ab.py 16x256x16x16 avg auto simd_isa=2 --layout nchw --threads 1

A configuration is 'auto' (every switch 0, the automatic choice) or name=value pairs joined by commas; the
names are those of csrc/cpu/test_overrides.h. Every switch is reset to 0 at the end.
"""
import argparse
import gc
import statistics
import time

import torch

import pyramid_ext as pe
from pyramid_ext import _C

# the switch names as the extension lists them ("name=value,name=value,...")
SWITCHES = tuple(pair.partition("=")[0] for pair in _C._test_overrides().split(","))
POOL_BINS = (1, 2, 3, 6)
SPP_BINS = (4, 2, 1)


def make_call(op: str, x: torch.Tensor):
    """The timed call: op is avg, max, maxidx, spp, sppavg, uc, read-x, copy-x, or max.fwdbwd / spp.fwdbwd /
    avg.fwdbwd. uc: upsample_concat of x and four branches of C / 4 channels at bins 1, 2, 3, 6 (fresh output);
    copy-x: x copied into the channels of x of such an output (compare.py's floor)."""
    if op == "read-x":
        return lambda: x.sum()
    if op in ("uc", "copy-x"):
        n, c = x.shape[:2]
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        gen = torch.Generator().manual_seed(1)
        branches = [torch.randn(n, c // 4, b, b, generator=gen).contiguous(memory_format=fmt) for b in POOL_BINS]
        if op == "uc":
            return lambda: pe.upsample_concat(x, branches)
        out = pe.upsample_concat(x, branches)
        return lambda: out[:, :c].copy_(x)
    if op == "avg":
        return lambda: pe.multi_adaptive_avg_pool2d(x, POOL_BINS)
    if op == "max":
        return lambda: pe.multi_adaptive_max_pool2d(x, POOL_BINS)
    if op == "maxidx":
        return lambda: pe.multi_adaptive_max_pool2d(x, POOL_BINS, return_indices=True)
    if op == "spp":
        return lambda: pe.spatial_pyramid_pool(x, SPP_BINS)
    if op == "sppavg":
        return lambda: pe.spatial_pyramid_pool(x, SPP_BINS, mode="avg")
    if op.endswith(".fwdbwd"):
        base = op[: -len(".fwdbwd")]
        xg = x.detach().requires_grad_(True)
        fwd = {"avg": lambda: pe.multi_adaptive_avg_pool2d(xg, POOL_BINS),
               "max": lambda: pe.multi_adaptive_max_pool2d(xg, POOL_BINS),
               "spp": lambda: [pe.spatial_pyramid_pool(xg, SPP_BINS)]}.get(base)
        if fwd is None:
            raise SystemExit(f"unknown op {op!r}")
        grads = [torch.randn_like(o) for o in fwd()]
        return lambda: torch.autograd.grad(list(fwd()), [xg], grads)
    raise SystemExit(f"unknown op {op!r}")


def apply(config: str) -> None:
    for name in SWITCHES:
        _C._set_test_override(name, 0)
    if config == "auto":
        return
    for pair in config.split(","):
        name, _, value = pair.partition("=")
        if name not in SWITCHES or not value.isdigit():
            raise SystemExit(f"bad configuration {config!r}: expected name=value pairs of {', '.join(SWITCHES)}")
        _C._set_test_override(name, int(value))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", help="NxCxHxW")
    p.add_argument("op", help="avg, max, maxidx, spp, sppavg, uc, read-x, copy-x, avg.fwdbwd, max.fwdbwd, spp.fwdbwd")
    p.add_argument("configs", nargs="+", help="'auto' or name=value[,name=value...]")
    p.add_argument("--layout", choices=("cl", "nchw"), default="cl")
    p.add_argument("--cold", type=int, default=0, metavar="MIB", help="read a buffer of MIB MiB before each call")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split("x"))
    fmt = torch.channels_last if args.layout == "cl" else torch.contiguous_format
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=fmt)
    call = make_call(args.op, x)
    evict = torch.ones(args.cold << 18) if args.cold else None  # MiB of float32
    samples = {c: [] for c in args.configs}
    try:
        for c in args.configs:  # warm-up: plans, scratch, the output cache
            apply(c)
            for _ in range(3):
                call()
        gc.collect()
        gc.freeze()
        for r in range(args.rounds):
            for c in args.configs if r % 2 == 0 else args.configs[::-1]:
                apply(c)
                if evict is not None:
                    evict.sum()
                t0 = time.perf_counter()
                out = call()
                samples[c].append((time.perf_counter() - t0) * 1e3)
                del out
    finally:
        apply("auto")
    print(f"# {args.op} {shape} {args.layout}, {args.threads} threads, {args.rounds} rounds"
          + (f", {args.cold} MiB read before each call" if args.cold else "") + ", wall ms")
    for c, v in samples.items():
        v = sorted(v)
        print(f"{c:48s} median {statistics.median(v):.3f}  p25 {v[len(v) // 4]:.3f}  min {v[0]:.3f}")


if __name__ == "__main__":
    main()
