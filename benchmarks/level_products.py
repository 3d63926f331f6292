#!/usr/bin/env python
"""The 1x1 convs of a PPM's branch tails on an NCHW x's pooled levels, three ways.

Why it exists: ``_C._pointwise_tail`` (csrc/branch_tails.cpp) computes a tail's 1x1 conv
on a pooled level either as ``bmm(weight, x[n])`` per sample (NCHW planes, no copy) or
as one ``mm`` over the rows of every sample's pixels (the level copied to rows, the
result copied back to NCHW). Below ``kBmmMinPixels`` (16) pixels a plane takes the rows:
MKL's ``bmm`` on planes of 2 to 15 pixels was several times slower. This times the four
levels (bins 1, 2, 3, 6, Cout = C / 4) under each rule, interleaved in one process
(medians of ``--rounds``):

    old    bmm for every plane of 2 or more pixels (the rule before)
    new    bmm from 16 pixels on, rows below (the rule now)
    rows   rows for every level

    python benchmarks/level_products.py                      # 2 threads, the four benchmark shapes
    python benchmarks/level_products.py --threads 1 --clock thread
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pyramid_ext as pe  # noqa: E402

SHAPES = ((16, 256, 16, 16), (2, 2048, 64, 64), (4, 512, 60, 60), (8, 512, 32, 32))


def _bmm(level, w):
    n, c, h, wd = level.shape
    return torch.bmm(w.expand(n, w.shape[0], c), level.reshape(n, c, h * wd)).view(n, w.shape[0], h, wd)


def _rows(level, w):
    n, c, h, wd = level.shape
    out = torch.mm(level.permute(0, 2, 3, 1).reshape(n * h * wd, c), w.t())
    return out.view(n, h, wd, w.shape[0]).permute(0, 3, 1, 2).contiguous()


def run(shape, rounds, clock):
    n, c, h, w = shape
    x = torch.randn(shape)
    levels = pe.multi_adaptive_avg_pool2d(x, (1, 2, 3, 6))
    weights = [torch.randn(c // 4, c) for _ in levels]

    def pixels(level):
        return level.shape[-2] * level.shape[-1]

    rules = {
        "old": lambda: [_rows(l, k) if pixels(l) == 1 else _bmm(l, k) for l, k in zip(levels, weights)],
        "new": lambda: [_rows(l, k) if pixels(l) < 16 else _bmm(l, k) for l, k in zip(levels, weights)],
        "rows": lambda: [_rows(l, k) for l, k in zip(levels, weights)],
    }
    for f in rules.values():
        for _ in range(5):
            f()
    times = {k: [] for k in rules}
    keys = list(rules)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t = clock()
            rules[k]()
            times[k].append(clock() - t)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    print(f"| x (NCHW) | old us | new us | rows us | new/old |   ({args.threads} thread(s), {args.clock} clock)")
    print("|---|---:|---:|---:|---:|")
    for shape in SHAPES:
        t = run(shape, args.rounds, clock)
        print(f"| {tuple(shape)} | {t['old']:.0f} | {t['new']:.0f} | {t['rows']:.0f} | {t['new'] / t['old']:.2f} |")


if __name__ == "__main__":
    main()
