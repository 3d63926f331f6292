"""Where the PPM training step's time goes (issue 12 item 2), eager against fused.

Per contender (the eager hszhao/semseg PPM and ``pe.nn.PPM``, same weights, the
step ``python -m pyramid_ext bench`` times: forward + ``autograd.grad`` of x and
the parameters with a preallocated incoming gradient, train mode):

- ``--what alloc``: every tensor an op allocates during one step, from a
  TorchDispatchMode (an output whose storage is none of the op's inputs'),
  summed per op and in total, with the bytes above glibc's largest mmap
  threshold (32 MiB: such a block is a fresh mmap each time, so each byte is
  a first-touch page fault) and the minor page faults of a step (getrusage).
- ``--what profile``: torch.profiler self CPU time per op (record_shapes).
- ``--what floor``: the floor: what the step must produce, allocated and
  written once, in this process's environment: the output (x copied, the
  branch channels written), x's gradient (grad_out's x slice read, written
  fresh), the parameter gradients; plus the reads the ops cannot avoid (x for
  the pooling, grad_out's branch channels for the resize backward). Timed as
  the same plain memory operations (fresh ``torch.empty`` + ``copy_``/``fill_``),
  huge pages advised on the fresh blocks as the compiled kernels do.

Run once per environment (``THP_MEM_ALLOC_ENABLE=1`` is read at start-up).
"""
from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pyramid_ext as pe
from pyramid_ext.__main__ import EagerPPM

MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def _storages(args):
    out = set()
    for a in torch.utils._pytree.tree_leaves(args):
        if isinstance(a, torch.Tensor):
            out.add(a.untyped_storage().data_ptr())
    return out


class AllocCounter(TorchDispatchMode):
    """Bytes of the fresh storages each op returns."""

    def __init__(self):
        super().__init__()
        self.per_op = defaultdict(lambda: [0, 0])  # name -> [calls with a fresh output, bytes]
        self.large = []  # (name, bytes) of blocks above the mmap threshold

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _storages((args, kwargs))
        result = func(*args, **kwargs)
        seen = set()
        for t in torch.utils._pytree.tree_leaves(result):
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr in inputs or ptr in seen or s.nbytes() == 0:
                continue
            seen.add(ptr)
            entry = self.per_op[str(func)]
            entry[0] += 1
            entry[1] += s.nbytes()
            if s.nbytes() > MMAP_THRESHOLD_MAX:
                self.large.append((str(func), s.nbytes()))
        return result


def build(shape, bins, dtype=torch.float32):
    torch.manual_seed(0)
    n, c, h, w = shape
    reduction = max(c // len(bins), 1)
    ppm = pe.nn.PPM(c, reduction, bins).to(dtype).train()
    eager = EagerPPM(ppm)
    x = torch.randn(shape, dtype=dtype).requires_grad_()
    grad = torch.randn(n, c + len(bins) * reduction, h, w, dtype=dtype)
    return ppm, eager, x, grad, list(ppm.parameters())


def step(module, x, grad, params):
    out = module(x)
    return [out] + list(torch.autograd.grad(out, [x] + params, grad))


def minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def what_alloc(contenders, x, grad, params):
    for label, module in contenders:
        step(module, x, grad, params)
        counter = AllocCounter()
        with counter:
            result = step(module, x, grad, params)
        del result
        total = sum(b for _, b in counter.per_op.values())
        large = sum(b for _, b in counter.large)
        print(f"\n== {label}: {total / 2**20:.1f} MiB allocated in one step, "
              f"{large / 2**20:.1f} MiB in {len(counter.large)} blocks above 32 MiB")
        for name, (calls, b) in sorted(counter.per_op.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"   {b / 2**20:9.1f} MiB  {calls:3d} x  {name}")
        for name, b in counter.large:
            print(f"   large: {b / 2**20:7.1f} MiB  {name}")
        faults = []
        for _ in range(3):
            f0 = minflt()
            r = step(module, x, grad, params)
            del r
            faults.append(minflt() - f0)
        print(f"   minor page faults per step: {faults} (x 4 KiB = {statistics.median(faults) * 4 / 1024:.1f} MiB)")


def what_profile(contenders, x, grad, params, rows):
    from torch.profiler import ProfilerActivity, profile

    for label, module in contenders:
        for _ in range(2):
            step(module, x, grad, params)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(3):
                step(module, x, grad, params)
        print(f"\n== {label}: torch.profiler, 3 steps (times are totals over the 3)")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                                  max_name_column_width=60,
                                                                  max_shapes_column_width=70))


_libc = ctypes.CDLL(None, use_errno=True)


def advise(t):
    """madvise(MADV_HUGEPAGE) as csrc/cpu/huge_pages.h does for fresh outputs."""
    huge = 2 << 20
    begin = t.data_ptr()
    first = (begin + huge - 1) & ~(huge - 1)
    last = (begin + t.nbytes) & ~(huge - 1)
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 14)  # MADV_HUGEPAGE
    return t


def what_floor(shape, bins, x, grad, params, contenders, rounds):
    n, c, h, w = shape
    xd = x.detach()
    out_c = grad.shape[1]
    mb = lambda t: t.nbytes / 2**20  # noqa: E731

    def out_step():  # the output: x copied in, the branch channels written once
        out = advise(torch.empty(n, out_c, h, w))
        out[:, :c].copy_(xd)
        out[:, c:].fill_(1.0)
        return out

    def gx_step():  # x's gradient: grad_out's x slice read, written to a fresh tensor
        gx = advise(torch.empty(n, c, h, w))
        gx.copy_(grad[:, :c])
        return gx

    def param_step():  # the parameter gradients, fresh
        return [torch.empty_like(p).fill_(1.0) for p in params]

    def read_x():  # the pooling's read of x
        return xd.sum()

    def read_branch_grad():  # the resize backward's read of grad_out's branch channels
        return grad[:, c:].sum()

    parts = [("output, written once (x copied)", out_step), ("x gradient, written once (slice read)", gx_step),
             ("parameter gradients", param_step), ("read x (pooling)", read_x),
             ("read grad_out's branch channels", read_branch_grad)]
    everything = [(label, lambda m=m: step(m, x, grad, params)) for label, m in contenders]
    jobs = parts + everything
    # Wall time, and this process's CPU time (all threads; page faults are
    # system time): on a loaded machine the CPU time is the steadier measure.
    wall = {label: [] for label, _ in jobs}
    cpu = {label: [] for label, _ in jobs}
    for fn in jobs:
        fn[1]()
    for _ in range(rounds):
        for label, fn in jobs:
            t0, c0 = time.perf_counter(), time.process_time()
            r = fn()
            c1, t1 = time.process_time(), time.perf_counter()
            wall[label].append((t1 - t0) * 1e3)
            cpu[label].append((c1 - c0) * 1e3)
            del r
    print(f"\n== floor on {tuple(shape)}: output {mb(grad):.0f} MiB, x gradient {mb(xd):.0f} MiB, "
          f"parameters {sum(mb(p) for p in params):.1f} MiB (median of {rounds} interleaved rounds, ms)")
    for name, times in (("wall", wall), ("cpu", cpu)):
        med = {label: statistics.median(v) for label, v in times.items()}
        floor = sum(med[label] for label, _ in parts)
        print(f"  {name} time")
        for label, _ in parts:
            print(f"   {med[label]:8.2f}  {label}")
        print(f"   {floor:8.2f}  floor (sum)")
        for label, _ in everything:
            print(f"   {med[label]:8.2f}  {label} step  ({med[label] / floor:.2f}x the floor)")
        if "eager" in med:
            print(f"   best speed-up the floor allows: {med['eager'] / floor:.2f}x eager")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", type=int, nargs=4, default=[2, 2048, 64, 64])
    p.add_argument("--bins", type=int, nargs="+", default=[1, 2, 3, 6])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--what", nargs="+", default=["alloc", "profile", "floor"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ppm, eager, x, grad, params = build(args.shape, args.bins)
    contenders = [("eager", eager), ("fused", ppm)]
    if "alloc" in args.what:
        what_alloc(contenders, x, grad, params)
    if "profile" in args.what:
        what_profile(contenders, x, grad, params, args.rows)
    if "floor" in args.what:
        what_floor(args.shape, args.bins, x, grad, params, contenders, args.rounds)


if __name__ == "__main__":
    main()
