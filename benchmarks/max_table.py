"""Max pyramid pooling on CPU: fused vs eager vs torch.compile, forward, forward with
indices and forward+backward, NCHW and channels_last (issue #12 item 1's table).

One process times every contender of a row in interleaved rounds (rotating order),
so the ratios of a row share the machine's load; medians in ms.

    python benchmarks/max_table.py --rounds 15 --json out.json
    python benchmarks/max_table.py --ops max,spp --modes fwd,fwdidx,fwdbwd --layouts nchw,cl
    # before/after two source trees, alternating processes:
    python benchmarks/max_table.py --trees before=/tmp/before,after=. --cycles 2
    # both environments (without and with THP_MEM_ALLOC_ENABLE=1), each a table:
    python benchmarks/max_table.py --both-env --trees before=/tmp/before,after=. --cycles 2
    # on a loaded machine: this thread's CPU time (other processes' load inflates it less)
    python benchmarks/max_table.py --clock thread --threads 1 --trees before=/tmp/before,after=. --cycles 2
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(1, 2048, 64, 64), (4, 512, 60, 60), (8, 512, 32, 32)]
# wall: elapsed time; thread: CPU time of the timing thread (only meaningful
# with --threads 1: the kernels' other threads are not counted).
THP = "THP_MEM_ALLOC_ENABLE"
CLOCKS = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}
BINS = {"max": (1, 2, 3, 6), "spp": (4, 2, 1)}


def make_fns(op, mode, layout, shape, contenders=("fused", "eager", "compile")):
    import torch
    import torch.nn.functional as F
    import pyramid_ext as pe

    bins = BINS[op]
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    want_idx = mode == "fwdidx"

    if op == "max":
        def fused(x):
            return pe.multi_adaptive_max_pool2d(x, bins, return_indices=want_idx)

        def eager(x):
            return [F.adaptive_max_pool2d(x, b, return_indices=want_idx) for b in bins]
    else:
        def fused(x):
            return pe.spatial_pyramid_pool(x, bins, mode="max")

        def eager(x):
            return torch.cat([F.adaptive_max_pool2d(x, b).flatten(1) for b in bins], 1)

    torch._dynamo.reset()
    compiled = torch.compile(eager, dynamic=False, fullgraph=True) if "compile" in contenders else None

    def flat(r):
        if isinstance(r, torch.Tensor):
            return [r]
        out = []
        for t in r:
            out.extend(flat(t))
        return out

    if mode == "fwdbwd":
        x.requires_grad_(True)
        outs = flat(eager(x))
        grads = [torch.randn(o.shape, generator=gen).contiguous(memory_format=torch.contiguous_format
                                                                 if o.dim() != 4 else fmt) for o in outs]

        def wrap(fn):
            def run():
                return torch.autograd.grad(flat(fn(x)), [x], grads)
            return run
    else:
        def wrap(fn):
            def run():
                return fn(x)
            return run

    runs = {"fused": wrap(fused), "eager": wrap(eager), "compile": wrap(compiled)}
    runs = {name: runs[name] for name in ("fused", "eager", "compile") if name in contenders}
    # Check once (max values and indices exactly).
    ref = [t.detach() for t in flat(runs["eager"]())]
    for name in [n for n in ("fused", "compile") if n in runs]:
        got = [t.detach() for t in flat(runs[name]())]
        if op == "max" and mode != "fwdbwd":
            if want_idx and name == "fused":  # (values..., indices...) -> (v0, i0, v1, i1, ...)
                half = len(got) // 2
                got = [t for pair in zip(got[:half], got[half:]) for t in pair]
            for g, w in zip(got, ref):
                assert torch.equal(g.reshape(w.shape), w), (name, op, mode, layout, shape)
        elif mode == "fwdbwd":
            for g, w in zip(got, ref):
                torch.testing.assert_close(g, w)
        else:
            for g, w in zip(got, ref):
                assert torch.equal(g, w), (name, op, mode, layout, shape)
    return runs


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    rows = []
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for op in args.ops.split(","):
        for mode in args.modes.split(","):
            if op == "spp" and mode == "fwdidx":
                continue
            for layout in args.layouts.split(","):
                for shape in shapes:
                    runs = make_fns(op, mode, layout, shape, args.contenders.split(","))
                    names = list(runs)
                    for name in names:
                        for _ in range(args.warmup):
                            runs[name]()
                    samples = {n: [] for n in names}
                    for r in range(args.rounds):
                        order = names[r % len(names):] + names[:r % len(names)]
                        for n in order:
                            t0 = clock()
                            runs[n]()
                            samples[n].append((clock() - t0) / 1e6)
                    med = {n: statistics.median(s) for n, s in samples.items()}
                    rows.append({"op": op, "mode": mode, "layout": layout, "shape": "x".join(map(str, shape)),
                                 "ms": med, "samples": samples})
                    print(f"{op}.{mode}.{layout} {rows[-1]['shape']}: " + " ".join(
                        f"{n} {med[n]:.3f}" for n in names) + f" eager/F {med['eager'] / med['fused']:.2f}",
                        file=sys.stderr, flush=True)
    with open(args.json, "w") as f:
        json.dump({"thp": os.environ.get(THP, ""), "load": os.getloadavg()[0], "rows": rows}, f)


def table(results):
    """results: {tree: [rows...]} (samples pooled over cycles)."""
    trees = list(results)
    keys = []
    for r in results[trees[0]]:
        k = (r["op"], r["mode"], r["layout"], r["shape"])
        if k not in keys:
            keys.append(k)
    names = [n for n in ("fused", "eager", "compile") if n in results[trees[0]][0]["samples"]]
    cols = [f"{n} ms" for n in names] + [f"{n}/F" for n in names if n != "fused"]
    head = "| case | shape | " + " | ".join(f"{t} {c}" for t in trees for c in cols) + " |"
    lines = [head, "|---|---|" + "---:|" * (len(cols) * len(trees))]
    for k in keys:
        cells = []
        for t in trees:
            s = {n: [] for n in names}
            for r in results[t]:
                if (r["op"], r["mode"], r["layout"], r["shape"]) == k:
                    for n in s:
                        s[n].extend(r["samples"][n])
            m = {n: statistics.median(v) for n, v in s.items()}
            cells.append(" | ".join([f"{m[n]:.3f}" for n in names] +
                                    [f"{m[n] / m['fused']:.2f}" for n in names if n != "fused"]))
        lines.append(f"| {k[0]}.{k[1]}.{k[2]} | {k[3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="max,spp")
    p.add_argument("--modes", default="fwd,fwdidx,fwdbwd")
    p.add_argument("--layouts", default="nchw,cl")
    p.add_argument("--shapes", default="")
    p.add_argument("--contenders", default="fused,eager,compile",
                   help="which of fused,eager,compile to time (fused and eager always; compile costs a compilation "
                        "per row)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or thread: this thread's CPU time, for a loaded machine (needs --threads 1)")
    p.add_argument("--json", default="")
    p.add_argument("--trees", default="", help="name=path,... : run each tree in its own process, alternating")
    p.add_argument("--cycles", type=int, default=1)
    p.add_argument("--both-env", action="store_true", help=f"run without {THP} and with {THP}=1")
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread times the calling thread only: use it with --threads 1")
    if args.child:
        return child(args)
    trees = [t.split("=", 1) for t in args.trees.split(",")] if args.trees else [("this", os.getcwd())]
    # THP_MEM_ALLOC_ENABLE is read once when c10 starts: each environment is its own processes.
    envs = [None, "1"] if args.both_env else [os.environ.get(THP)]
    all_results = {}
    for thp in envs:
        results = {name: [] for name, _ in trees}
        loads = [os.getloadavg()[0]]
        for cyc in range(args.cycles):
            for name, path in (trees if cyc % 2 == 0 else trees[::-1]):
                out = f"/tmp/max_table-{os.getpid()}-{name}-{cyc}-{thp}.json"
                env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
                env.pop(THP, None)
                if thp is not None:
                    env[THP] = thp
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--json", out]
                for opt in ("ops", "modes", "layouts", "shapes", "contenders", "rounds", "warmup", "threads", "clock"):
                    cmd += [f"--{opt}", str(getattr(args, opt))]
                print(f"[{THP}={thp or 'unset'}, cycle {cyc}] {name}", file=sys.stderr, flush=True)
                subprocess.run(cmd, env=env, check=True)
                with open(out) as f:
                    got = json.load(f)
                os.remove(out)
                results[name].extend(got["rows"])
                loads.append(got["load"])
        loads.append(os.getloadavg()[0])
        print(f"{THP}={thp or 'unset'}, {args.threads} threads, {args.rounds} rounds x {args.cycles} cycles, "
              f"medians, {args.clock} clock; 1-minute load average {min(loads):.2f}-{max(loads):.2f} "
              f"({os.cpu_count()} CPUs)")
        print(table(results), flush=True)
        all_results[thp or "unset"] = results
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f)

if __name__ == "__main__":
    main()
