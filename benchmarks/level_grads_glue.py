#!/usr/bin/env python
"""Forward + backward of the eager fast path's pyramid levels: the node that takes the
level gradients directly (``_C._PoolCall.levels`` with grad, csrc/fast_calls.cpp's
PoolLevelsBackward) against the glue it replaced, in one process.

The replaced glue, rebuilt here from the same ``_PoolCall``: the op's own autograd node
(``packed()``) and one ``as_strided`` view per level, whose backward (AsStridedBackward0)
writes a zero-filled packed-sized gradient per level for autograd to add up. Both against
eager ``F.adaptive_*_pool2d`` per level. Interleaved rounds (order rotated), medians;
``--clock thread`` (default with one thread) times this thread's CPU time, for a loaded
machine. Checks first that both give x's gradient bit for bit.

    python benchmarks/level_grads_glue.py                       # (16, 256, 16, 16) channels_last
    python benchmarks/level_grads_glue.py --shape 1x8x8x8 --layout nchw --rounds 200
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pyramid_ext import functional as pf  # noqa: E402
from pyramid_ext.plan import POOL_AVG, POOL_MAX  # noqa: E402

BINS = (1, 2, 3, 6)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16x256x16x16", help="NxCxHxW (default 16x256x16x16)")
    p.add_argument("--layout", choices=("cl", "nchw"), default="cl")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("thread", "wall"), default=None,
                   help="thread (default with --threads 1) or wall")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("thread" if args.threads == 1 else "wall")
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    shape = tuple(int(v) for v in args.shape.split("x"))
    fmt = torch.channels_last if args.layout == "cl" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=fmt).requires_grad_()
    grads = [torch.randn(shape[0], shape[1], b, b, generator=g).contiguous(memory_format=fmt) for b in BINS]
    print(f"# torch {torch.__version__}, {args.threads} thread(s), {clock_name} clock, {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.2f}")
    for mode, name in [(POOL_AVG, "avg"), (POOL_MAX, "max")]:
        call = pf._fast_pool(x, BINS, mode, None, "adaptive", None, "level_grads_glue")
        assert call is not None, "the eager fast path does not serve this call (extension not built?)"
        eager_pool = F.adaptive_avg_pool2d if mode == POOL_AVG else F.adaptive_max_pool2d
        views = [(tuple(v.shape), v.stride(), v.storage_offset()) for v in call.levels(x.detach())]

        def replaced():
            values = call.packed(x, True)[0]
            return torch.autograd.grad([values.as_strided(*v) for v in views], x, grads)

        def node():
            return torch.autograd.grad(call.levels(x), x, grads)

        def eager():
            return torch.autograd.grad([eager_pool(x, b) for b in BINS], x, grads)

        assert torch.equal(replaced()[0], node()[0])
        fns = [("node", node), ("replaced", replaced), ("eager", eager)]
        samples = {k: [] for k, _ in fns}
        for r in range(args.rounds):
            for k, fn in fns[r % 3:] + fns[:r % 3]:
                t = clock()
                fn()
                samples[k].append(clock() - t)
        m = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        print(f"{name}.fwdbwd.{args.layout} {args.shape}: node {m['node']:.3f} ms, replaced glue "
              f"{m['replaced']:.3f} ms, eager {m['eager']:.3f} ms; replaced/node {m['replaced'] / m['node']:.2f}, "
              f"eager/node {m['eager'] / m['node']:.2f}, eager/replaced {m['eager'] / m['replaced']:.2f}")
    print(f"# load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
