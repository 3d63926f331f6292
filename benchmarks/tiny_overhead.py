#!/usr/bin/env python
"""Per-call time of every public op against the eager code it replaces, on tiny inputs.

On a (1, 8, 8, 8) map the kernels take a microsecond or two; what is timed is the
Python and dispatcher work around them (argument checks, windows, backend choice,
level views, autograd glue), against the same work in the eager calls. Target
(issue 12, item 3): fused <= eager, with and without an input that requires grad.

Each case's contenders run in interleaved rounds in one process (the order rotated
every round); a sample is the mean of ``--calls`` back-to-back calls; medians of
``--rounds`` samples. Ratio eager/fused >= 1 means the fused call is not slower.

    python benchmarks/tiny_overhead.py                 # all cases, 1 thread
    python benchmarks/tiny_overhead.py --cases 'avg*' --rounds 50
    python benchmarks/tiny_overhead.py --clock thread  # CPU time of this thread (loaded machine)
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyramid_ext as pe  # noqa: E402
from bench_models import EagerPPM  # noqa: E402

BINS = (1, 2, 3, 6)
SPP_LEVELS = (4, 2, 1)


def _x(shape, grad, channels_last=False):
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def pool_case(mode, grad, cl):
    x = _x((1, 8, 8, 8), grad, cl)
    if mode == "avg":
        return (lambda: pe.multi_adaptive_avg_pool2d(x, BINS),
                lambda: [F.adaptive_avg_pool2d(x, b) for b in BINS])
    if mode == "max":
        return (lambda: pe.multi_adaptive_max_pool2d(x, BINS),
                lambda: [F.adaptive_max_pool2d(x, b) for b in BINS])
    if mode == "maxidx":
        return (lambda: pe.multi_adaptive_max_pool2d(x, BINS, return_indices=True),
                lambda: [F.adaptive_max_pool2d(x, b, return_indices=True) for b in BINS])
    pool = F.adaptive_max_pool2d if mode == "sppmax" else F.adaptive_avg_pool2d
    m = "max" if mode == "sppmax" else "avg"
    return (lambda: pe.spatial_pyramid_pool(x, SPP_LEVELS, mode=m),
            lambda: torch.cat([pool(x, b).flatten(1) for b in SPP_LEVELS], 1))


def uc_case(grad, cl):
    x = _x((1, 8, 8, 8), grad, cl)
    branches = [_x((1, 4, b, b), grad, cl) for b in BINS]
    return (lambda: pe.upsample_concat(x, branches),
            lambda: torch.cat([x] + [F.interpolate(b, size=(8, 8), mode="bilinear", align_corners=False)
                                     for b in branches], 1))


def ppm_case(grad, cl):
    torch.manual_seed(0)
    eager = EagerPPM(8, 2, BINS).eval()
    fused = pe.nn.PPM(8, 2, BINS).eval()
    fused.load_state_dict(eager.state_dict())
    x = _x((1, 8, 8, 8), grad, cl)
    return (lambda: fused(x), lambda: eager(x))


def spp_module_case(grad, cl):
    x = _x((1, 8, 8, 8), grad, cl)
    fused = pe.nn.SpatialPyramidPooling(SPP_LEVELS, mode="max")
    return (lambda: fused(x),
            lambda: torch.cat([F.adaptive_max_pool2d(x, b).flatten(1) for b in SPP_LEVELS], 1))


def cases():
    out = {}
    for grad in (False, True):
        g = ".grad" if grad else ""
        for cl in (False, True):
            layout = ".cl" if cl else ""
            for mode in ("avg", "max", "maxidx", "sppmax", "sppavg"):
                out[f"{mode}{layout}{g}"] = (lambda mode=mode, grad=grad, cl=cl: pool_case(mode, grad, cl))
            out[f"uc{layout}{g}"] = lambda grad=grad, cl=cl: uc_case(grad, cl)
            out[f"PPM{layout}{g}"] = lambda grad=grad, cl=cl: ppm_case(grad, cl)
            out[f"SPPmodule{layout}{g}"] = lambda grad=grad, cl=cl: spp_module_case(grad, cl)
    return out


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_pair(fused, eager, rounds, calls, warmup=50, clock=time.perf_counter):
    for _ in range(warmup):
        fused()
        eager()
    samples = {"fused": [], "eager": []}
    fns = [("fused", fused), ("eager", eager)]
    for r in range(rounds):
        for name, fn in (fns if r % 2 == 0 else fns[::-1]):
            t = clock()
            for _ in range(calls):
                fn()
            samples[name].append((clock() - t) / calls)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="*", help="comma-separated fnmatch patterns (default: all)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=50, help="calls per sample (default 50)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or thread: this thread's CPU time, for a loaded machine (with --threads 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    all_cases = cases()
    pats = [s.strip() for s in args.cases.split(",") if s.strip()]
    names = [n for n in all_cases if any(fnmatch.fnmatchcase(n, pt) for pt in pats)]
    print(f"# torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()[0]:.2f}, "
          f"{args.rounds} rounds x {args.calls} calls, medians, {args.clock} clock")
    print(f"{'case':<20} {'fused us':>9} {'eager us':>9} {'eager/fused':>12}")
    worst = None
    for name in names:
        fused, eager = all_cases[name]()
        t = time_pair(fused, eager, args.rounds, args.calls, clock=CLOCKS[args.clock])
        ratio = t["eager"] / t["fused"]
        worst = ratio if worst is None else min(worst, ratio)
        print(f"{name:<20} {t['fused']:9.1f} {t['eager']:9.1f} {ratio:12.2f}", flush=True)
    print(f"# worst eager/fused: {worst:.2f}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
