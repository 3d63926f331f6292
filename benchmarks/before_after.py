"""Before/after compare of source trees, each with its own build (process-level interleaving).

Each cycle runs, for every tree (in alternating order), one child process with that tree first on PYTHONPATH,
which times compare.py's cases. BA_THREADS=1 (default) times one thread with its CPU time
(time.thread_time_ns), so other processes' load inflates the numbers less than wall time would; BA_THREADS=2
times two threads by wall clock. BA_CONTENDERS (default "fused-cpp,eager") picks compare.py's contenders: with
eager in every process, its time shows how much the process's state (load, allocator) moved. Reported: the
median over all cycles' samples per tree, and the ratio to the first tree.

    git worktree add /tmp/before <commit> && (cd /tmp/before && python setup.py build_ext --inplace)
    python benchmarks/before_after.py --trees before=/tmp/before,after=. --cycles 3 --rounds 10
"""
import argparse, json, os, statistics, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

THREADS = int(os.environ.get("BA_THREADS", "1"))

def child(out, rounds, ops, shapes):
    sys.path.insert(0, HERE)
    import compare  # noqa
    argv = ["--contenders", os.environ.get("BA_CONTENDERS", "fused-cpp,eager"), "--rounds", str(rounds), "--threads", str(THREADS), "--json", out,
            "--ops", ops, "--clock", "thread" if THREADS == 1 else "wall"]
    if shapes:
        argv += ["--shapes", shapes]
    compare.main(argv)

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trees", required=True)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ops", default="default")
    p.add_argument("--shapes", default="")
    p.add_argument("--thp", default="")
    p.add_argument("--child", default="")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.child:
        return child(a.child, a.rounds, a.ops, a.shapes)
    trees = [t.split("=", 1) for t in a.trees.split(",")]
    samples = {}  # (case, shape, tree, contender) -> list
    workdir = tempfile.mkdtemp(prefix="before_after-")
    for cyc in range(a.cycles):
        for name, path in (trees if cyc % 2 == 0 else trees[::-1]):
            out = os.path.join(workdir, f"{name}-{cyc}.json")
            env = dict(os.environ, PYTHONPATH=path)
            env.pop("THP_MEM_ALLOC_ENABLE", None)
            if a.thp:
                env["THP_MEM_ALLOC_ENABLE"] = a.thp
            print(f"[cycle {cyc}] {name}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--trees", a.trees, "--child", out, "--rounds",
                            str(a.rounds), "--ops", a.ops, "--shapes", a.shapes], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            with open(out) as f:
                data = json.load(f)
            for r in data["rows"]:
                for c, s in r["contenders"].items():
                    samples.setdefault((r["case"], r["shape"], name, c), []).extend(s["samples_ms"])
    names = [n for n, _ in trees]
    keys = sorted({(k[0], k[1]) for k in samples}, key=lambda k: list(dict.fromkeys(x[0] for x in samples)).index(k[0]))
    lines = ["| case | shape | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"{n}/{names[0]}" for n in names[1:]) + " | eager ms (" + "/".join(names) + ") |",
             "|---|---|" + "---:|" * (2 * len(names) - 1) + "---|"]
    res = {}
    for case, shape in keys:
        med = {n: statistics.median(samples[(case, shape, n, "fused-cpp")]) for n in names
               if (case, shape, n, "fused-cpp") in samples}
        eag = {n: statistics.median(samples[(case, shape, n, "eager")]) for n in names
               if (case, shape, n, "eager") in samples}
        res[f"{case} {shape}"] = {"fused": med, "eager": eag}
        lines.append(f"| {case} | {shape} | " + " | ".join(f"{med[n]:.3f}" for n in names) + " | "
                     + " | ".join(f"{med[n] / med[names[0]]:.3f}" for n in names[1:]) + " | "
                     + ("/".join(f"{eag[n]:.2f}" for n in names) if eag else "-") + " |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

if __name__ == "__main__":
    main()
