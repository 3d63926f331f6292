#!/usr/bin/env python
"""Ratio table of the fused pyramid_ext ops against eager PyTorch and torch.compile.

For each case (op.mode.layout, see bench_cases.py) and shape, every contender is
warmed up (torch.compile's compilation happens there, untimed), then timed in
N interleaved rounds: round r calls every contender once, in an order rotated by
r, so drift in machine load hits all contenders alike. Each call is made the way
users make it (fresh outputs are allocated by the call and dropped before the
next call). Reported: the median ms per contender and the ratios
    eager/F, compile/F   > 1: the fused op F is that many times faster
    F/read-x             >= 1: how far F (a pooling forward) is from the cost of
                          one read of x (x.sum(); 1 = the floor)
    F/copy-x             >= 1: how far F (upsample_concat forward) is from the
                          cost of just copying x into the output (1 = the floor)
where F is each fused contender present (cpp, triton; torch only when neither
can run). The last column, "IQR%", is the largest interquartile range of any
contender in the row, as a percentage of its median: the row's noise.

THP_MEM_ALLOC_ENABLE (transparent huge pages for large CPU allocations) is read
once by c10 when the process starts; --both-env runs this script twice in
subprocesses, without it and with THP_MEM_ALLOC_ENABLE=1, and prints both
tables.

    python benchmarks/compare.py                       # default cases, full shapes
    python benchmarks/compare.py --ops 'uc.*' --shapes 4x512x60x60 --rounds 50
    python benchmarks/compare.py --both-env --json bench.json
    PYRAMID_EXT_BENCH_SMALL=1 python benchmarks/compare.py --rounds 3   # smoke
    # issue 12 item 3: every op's forward on the small shapes, CPU time of one thread (loaded machine)
    python benchmarks/compare.py --shapes stages --contenders fused-cpp,eager --threads 1 --clock thread \
        --ops 'avg.fwd.*,max.fwd.*,maxidx.fwd.*,spp.fwd.*,sppavg.fwd.*,uc.fresh.*,ucconv.fwd.*,ppm.fwd.*'
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cases as bc  # noqa: E402

DEFAULT_OPS = [
    "avg.fwd.nchw", "avg.fwdbwd.nchw", "avg.fwd.cl", "avg.fwdbwd.cl",
    "spp.fwd.nchw", "spp.fwdbwd.nchw",
    "uc.fresh.nchw", "uc.out.nchw", "uc.fwdbwd.nchw",
    "uc.fresh.cl", "uc.out.cl", "uc.fwdbwd.cl",
]
AUTO_CONTENDERS = ("fused-cpp", "fused-triton", "eager", "compile", "copy-x", "read-x")
THP = "THP_MEM_ALLOC_ENABLE"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


def select_ops(spec: str) -> List[str]:
    names = bc.case_names()
    if spec == "default":
        return list(DEFAULT_OPS)
    if spec == "all":
        return names
    chosen: List[str] = []
    for pat in (p.strip() for p in spec.split(",")):
        if not pat:
            continue
        if pat == "default":
            hits = DEFAULT_OPS
        else:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise SystemExit(f"--ops: {pat!r} matches no case; cases are: {', '.join(names)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def select_shapes(spec: Optional[str]):
    if spec is None:
        return bc.bench_shapes()
    named = {"full": bc.FULL_SHAPES, "small": bc.SMALL_SHAPES, "stages": bc.STAGE_SHAPES}
    shapes = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        for shape in named[item] if item in named else [bc.parse_shape(item)]:
            if tuple(shape) not in shapes:
                shapes.append(tuple(shape))
    return shapes


def select_contenders(spec: str) -> Optional[List[str]]:
    """None means auto (see contenders_for)."""
    if spec == "auto":
        return None
    names = [c.strip() for c in spec.split(",") if c.strip()]
    bad = [c for c in names if c not in bc.CONTENDERS]
    if bad:
        raise SystemExit(f"--contenders: unknown {bad}; choose from {', '.join(bc.CONTENDERS)} or 'auto'")
    return names


def contenders_for(case: bc.Case, explicit: Optional[List[str]], device: torch.device) -> List[str]:
    if explicit is not None:
        return [c for c in explicit if c in case.contenders()]
    names = [c for c in AUTO_CONTENDERS if c in case.contenders()]
    compiled = [c for c in ("fused-cpp", "fused-triton") if c in names and _available(case, c, device)]
    if not compiled:  # no compiled kernel here: show the pure-PyTorch fallback as "fused"
        names.insert(0, "fused-torch")
    return names


def _available(case, name, device) -> bool:
    try:
        bc.check_available(case, name, device)
        return True
    except bc.Unavailable:
        return False


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def _quantile(sorted_vals: List[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(samples: List[float]) -> dict:
    s = sorted(samples)
    return {
        "median_ms": statistics.median(s),
        "p25_ms": _quantile(s, 0.25),
        "p75_ms": _quantile(s, 0.75),
        "min_ms": s[0],
        "n": len(s),
        "samples_ms": samples,
    }


CLOCKS = {
    "wall": time.perf_counter_ns,
    # CPU time of the calling thread: on a shared, loaded machine it leaves out
    # the time other processes hold the core. Meaningful with --threads 1 only
    # (at::parallel_for then runs inline on this thread).
    "thread": time.thread_time_ns,
}


def time_case(case: bc.Case, names: List[str], device: torch.device, rounds: int, warmup: int,
              check: bool, clock_name: str = "wall") -> dict:
    inputs = bc.make_inputs(case, device)
    conts: Dict[str, bc.Contender] = {}
    skipped: Dict[str, str] = {}
    notes: Dict[str, str] = {}
    for name in names:
        try:
            conts[name] = bc.build(case, name, inputs)
        except bc.Unavailable as exc:
            skipped[name] = str(exc)
            continue
        if conts[name].note:
            notes[name] = conts[name].note

    t_warm = time.perf_counter()
    if check:
        ref = bc.reference_result(case, inputs)
        for name, cont in conts.items():
            if name != "eager" and name not in bc.FLOORS:
                bc.check_against(case, cont.run(), ref)
        del ref
    for cont in conts.values():
        for _ in range(max(warmup, cont.warmup)):
            cont.step()
    bc.sync(device)
    t_warm = time.perf_counter() - t_warm

    order = list(conts)
    samples: Dict[str, List[float]] = {n: [] for n in order}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        clock = CLOCKS[clock_name]
        for r in range(rounds):
            k = r % len(order) if order else 0
            for name in order[k:] + order[:k]:
                step = conts[name].step
                t0 = clock()
                step()
                samples[name].append((clock() - t0) / 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()

    stats = {n: summarize(v) for n, v in samples.items()}
    med = {n: s["median_ms"] for n, s in stats.items()}
    ratios = {}
    for f in (n for n in order if n.startswith("fused-")):
        short = f[len("fused-"):]
        if "eager" in med:
            ratios[f"eager/{short}"] = med["eager"] / med[f]
        if "compile" in med:
            ratios[f"compile/{short}"] = med["compile"] / med[f]
        for floor in bc.FLOORS:
            if floor in med:
                ratios[f"{short}/{floor}"] = med[f] / med[floor]
    iqr = max(((s["p75_ms"] - s["p25_ms"]) / s["median_ms"] * 100 for s in stats.values()), default=0.0)
    del conts, inputs
    gc.collect()
    return {
        "case": case.name, "op": case.op, "mode": case.mode, "layout": case.layout,
        "shape": bc.shape_id(case.shape), "contenders": stats, "skipped": skipped, "notes": notes,
        "ratios": ratios, "max_iqr_pct": iqr, "warmup_s": t_warm,
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def environment(device: torch.device, args) -> dict:
    try:
        build = bc.pe.build_info()
    except Exception as exc:  # noqa: BLE001
        build = f"unavailable ({exc.__class__.__name__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "gpu": gpu,
        "cpu": cpu,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        THP: bc.thp_status(),
        "torch": torch.__version__,
        "pyramid_ext": bc.pe.__version__,
        "backends": {op: bc.pe.available_backends(device, op=op) for op in ("multi_pool2d", "upsample_concat")},
        "build_info": build,
        "python": platform.python_version(),
        "compile_backend": bc.compile_backend(),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "clock": args.clock,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def render(env: dict, rows: List[dict]) -> str:
    lines = []
    where = env["gpu"] or env["cpu"]
    threads = f", {env['threads']} threads" if env["threads"] else ""
    lines.append(f"### pyramid_ext: {env['device']}{threads}, {THP}={env[THP]}")
    lines.append("")
    lines.append(f"- {where}; torch {env['torch']}, python {env['python']}, pyramid_ext {env['pyramid_ext']}, "
                 f"backends {env['backends']['multi_pool2d']}, torch.compile backend {env['compile_backend']}; "
                 f"{env['date']}")
    clock = "this thread's CPU time" if env.get("clock") == "thread" else "wall time"
    lines.append(f"- {env['rounds']} interleaved rounds (rotating order) after warm-up; median ms ({clock}) per call; "
                 "eager/F and compile/F > 1: fused op F faster; F/copy-x, F/read-x: distance to the memory floor "
                 "(copy x into the output; read x once; 1 = floor)")
    if not any(r["contenders"].get(c) for r in rows for c in ("fused-cpp", "fused-triton")):
        lines.append("- **no compiled fused kernel ran**: the fused column is the pure-PyTorch fallback "
                     "(fused-torch), not the fused ops")
    lines.append("")
    contenders = [c for c in bc.CONTENDERS if any(c in r["contenders"] for r in rows)]
    ratio_keys: List[str] = []
    for r in rows:
        for k in r["ratios"]:
            if k not in ratio_keys:
                ratio_keys.append(k)
    header = ["case", "shape"] + [f"{c} ms" for c in contenders] + ratio_keys + ["IQR%"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for r in rows:
        cells = [r["case"], r["shape"]]
        cells += [_fmt_ms(r["contenders"][c]["median_ms"]) if c in r["contenders"] else "—" for c in contenders]
        cells += [f"{r['ratios'][k]:.2f}" if k in r["ratios"] else "—" for k in ratio_keys]
        cells.append(f"{r['max_iqr_pct']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    extra: List[str] = []
    for r in rows:
        for c, why in r["skipped"].items():
            line = f"- skipped {c}: {why}"
            if line not in extra:
                extra.append(line)
        for c, note in r["notes"].items():
            line = f"- note {c}: {note}"
            if line not in extra:
                extra.append(line)
    if extra:
        lines.append("")
        lines += extra
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="default",
                   help="comma list of cases op.mode.layout (globs allowed, e.g. 'uc.*,avg.fwd.*'), "
                        "'default' or 'all'; --list shows them")
    p.add_argument("--shapes", default=None,
                   help="comma list of NxCxHxW and the names 'full' / 'small' / 'stages' (issue 12's "
                        "(8,512,32,32), (16,256,16,16)), e.g. full,stages (default: full, small under "
                        f"{bc.SMALL_ENV}=1)")
    p.add_argument("--contenders", default="auto",
                   help="comma list from " + ", ".join(bc.CONTENDERS) + "; 'auto' (default): fused-cpp, "
                        "fused-triton, eager, compile, copy-x, read-x, plus fused-torch where no compiled kernel runs")
    p.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per contender first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or thread: the calling thread's CPU time, for a loaded machine "
                        "(needs --threads 1: other threads' work would not be counted)")
    p.add_argument("--device", default=None, help=f"cpu, cuda, cuda:N (default: ${bc.DEVICE_ENV} or cpu)")
    p.add_argument("--compile-backend", default=None,
                   help=f"torch.compile backend of 'compile' (default: ${bc.COMPILE_BACKEND_ENV} or inductor)")
    p.add_argument("--json", metavar="FILE", help="also write environment, samples, medians and ratios as JSON")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip checking every contender's result against eager before timing")
    p.add_argument("--both-env", action="store_true",
                   help=f"run twice in subprocesses: without {THP} and with {THP}=1")
    p.add_argument("--list", action="store_true", help="list the case names and exit")
    return p.parse_args(argv)


def both_env(argv: List[str], args) -> int:
    child_args = [a for a in argv if a != "--both-env"]
    # drop a --json FILE / --json=FILE of ours: each child writes its own
    cleaned, skip = [], False
    for a in child_args:
        if skip:
            skip = False
            continue
        if a == "--json":
            skip = True
            continue
        if a.startswith("--json="):
            continue
        cleaned.append(a)
    runs, rc = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for label, value in (("unset", None), ("1", "1")):
            env = dict(os.environ)
            env.pop(THP, None)
            if value is not None:
                env[THP] = value
            out = os.path.join(tmp, f"thp-{label}.json")
            log(f"[compare] running with {THP}={label}")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + cleaned + ["--json", out], env=env)
            print(flush=True)
            rc = rc or proc.returncode
            if os.path.exists(out):
                with open(out) as f:
                    runs.append(json.load(f))
    if len(runs) == 2:
        print(thp_effect(runs[0], runs[1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs}, f, indent=1)
    return rc


def thp_effect(base: dict, thp: dict) -> str:
    """Median with THP=1 / median without, per case and contender (< 1: THP helps)."""
    rows_b = {(r["case"], r["shape"]): r for r in base["rows"]}
    contenders = [c for c in bc.CONTENDERS if any(c in r["contenders"] for r in thp["rows"])]
    lines = [f"### {THP}=1 vs unset: median ratio THP/unset (< 1: huge pages help)", ""]
    lines.append("| case | shape | " + " | ".join(contenders) + " |")
    lines.append("|---|---|" + "|".join(["---:"] * len(contenders)) + "|")
    for r in thp["rows"]:
        b = rows_b.get((r["case"], r["shape"]))
        if b is None:
            continue
        cells = []
        for c in contenders:
            if c in r["contenders"] and c in b["contenders"]:
                cells.append(f"{r['contenders'][c]['median_ms'] / b['contenders'][c]['median_ms']:.2f}")
            else:
                cells.append("—")
        lines.append(f"| {r['case']} | {r['shape']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        print("\n".join(bc.case_names()))
        return 0
    if args.both_env:
        return both_env(argv, args)
    if args.compile_backend:
        os.environ[bc.COMPILE_BACKEND_ENV] = args.compile_backend
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if args.clock == "thread" and args.threads != 1:
        raise SystemExit("--clock thread counts the calling thread only: use it with --threads 1")
    ops = select_ops(args.ops)
    shapes = select_shapes(args.shapes)
    explicit = select_contenders(args.contenders)
    device = bc.bench_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available")
    bc.setup_process(device, args.threads)
    env = environment(device, args)

    rows = []
    for op in ops:
        for shape in shapes:
            case = bc.parse_case_name(op, shape)
            names = contenders_for(case, explicit, device)
            t0 = time.perf_counter()
            row = time_case(case, names, device, args.rounds, args.warmup, args.check, args.clock)
            log(f"[compare] {case.group}: " + ", ".join(
                f"{n} {s['median_ms']:.3f} ms" for n, s in row["contenders"].items())
                + f"  ({time.perf_counter() - t0:.1f}s, warm-up {row['warmup_s']:.1f}s)")
            rows.append(row)

    print(render(env, rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
