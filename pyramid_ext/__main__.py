"""Command line: ``python -m pyramid_ext {bench,info}``.

``bench`` times the fused :class:`pyramid_ext.nn.PPM` on every available
backend against the eager reference module (AdaptiveAvgPool2d, F.interpolate,
torch.cat; same weights) and ``torch.compile`` of it, forward and
forward+backward. ``bench --model upernet segformer ...`` (or ``all``) times
whole segmentation models and their decode heads before and after
``pyramid_ext.convert`` instead (``pyramid_ext/model_bench.py``). Contenders are interleaved round by round after a warm-up;
medians are reported. ``info`` prints versions and what is built/available.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import pyramid_ext as pe
from pyramid_ext.model_bench import MODEL_NAMES

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class EagerPPM(nn.Module):
    """The reference: the hszhao/semseg PPM forward, in plain PyTorch, sharing
    the fused module's layers (each ``features[i]`` is a complete Sequential)."""

    def __init__(self, ppm: "pe.nn.PPM"):
        super().__init__()
        self.features = ppm.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [F.interpolate(f(x), size, mode="bilinear", align_corners=True)
                                for f in self.features], 1)


class _WithBackend(nn.Module):
    def __init__(self, module: nn.Module, backend: str):
        super().__init__()
        self.module = module
        self.backend = backend

    def forward(self, x):
        with pe.use_backend(self.backend):
            return self.module(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(module: nn.Module, x: torch.Tensor, grad: Optional[torch.Tensor], params: List[torch.Tensor]):
    """One forward (no grad) or forward+backward; returns the tensors to compare."""
    if grad is None:
        with torch.no_grad():
            return [module(x)]
    out = module(x)
    return [out] + list(torch.autograd.grad(out, [x] + params, grad))


def _max_err(a: List[torch.Tensor], b: List[torch.Tensor]):
    """Max abs error over the compared tensors, and the max of each tensor's
    error relative to its largest eager magnitude (gradients are large sums)."""
    errs = [((u.double() - v.double()).abs().max().item(), v.double().abs().max().item()) for u, v in zip(a, b)]
    return max(e for e, _ in errs), max(e / s if s else e for e, s in errs)


def run_bench(args) -> Dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, c, h, w = args.shape
    bins = args.bins
    reduction = args.reduction or max(c // len(bins), 1)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    ppm = pe.nn.PPM(c, reduction, bins).to(device=device, dtype=dtype, memory_format=fmt)
    eager = EagerPPM(ppm)
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
    params = list(ppm.parameters())

    contenders: List[tuple] = [("eager", eager)]
    if args.compile:
        contenders.append(("torch.compile", torch.compile(EagerPPM(ppm))))
    for b in pe.available_backends(device):
        contenders.append((f"pyramid_ext[{b}]", _WithBackend(ppm, b)))

    modes = ["forward"] + (["forward+backward"] if args.backward else [])
    rows = []
    # forward+backward runs the module in training mode, except at batch size 1,
    # where BatchNorm on the 1x1 bin cannot train (then eval mode; see the header)
    train_bn = n > 1
    for mode in modes:
        backward = mode != "forward"
        ppm.train(backward and train_bn)
        xin = x.detach().requires_grad_(backward)
        grad = None
        if backward:
            out_c = c + len(bins) * reduction
            grad = torch.randn(n, out_c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)

        live, errors, failures = [], {}, {}
        reference = None
        for label, module in contenders:
            _log(f"[bench] {mode}: warm-up {label} ...")
            try:
                result = _step(module, xin, grad, params)
                for _ in range(max(args.warmup - 1, 0)):
                    _step(module, xin, grad, params)
                _sync(device)
            except Exception as e:  # a contender that cannot run is reported, not fatal
                failures[label] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                _log(f"[bench] {mode}: {label} failed: {failures[label]}")
                continue
            if label == "eager":
                reference = result
            errors[label] = _max_err(result, reference) if reference is not None else (None, None)
            live.append((label, module))

        times: Dict[str, List[float]] = {label: [] for label, _ in live}
        for r in range(args.rounds):
            _log(f"[bench] {mode}: round {r + 1}/{args.rounds}")
            for label, module in live:
                _sync(device)
                t0 = time.perf_counter()
                _step(module, xin, grad, params)
                _sync(device)
                times[label].append((time.perf_counter() - t0) * 1e3)

        base = statistics.median(times["eager"]) if times.get("eager") else None
        for label, _ in contenders:
            if label in failures:
                rows.append({"backend": label, "mode": mode, "ms": None, "speedup": None, "max_abs_err": None,
                             "max_rel_err": None, "error": failures[label]})
                continue
            ms = statistics.median(times[label]) if times[label] else float("nan")
            rows.append({"backend": label, "mode": mode, "ms": ms, "speedup": (base / ms) if base and ms else None,
                         "max_abs_err": errors[label][0], "max_rel_err": errors[label][1],
                         "times_ms": times[label]})
    return {
        "config": {"shape": [n, c, h, w], "bins": list(bins), "reduction": reduction, "dtype": args.dtype,
                   "device": str(device), "channels_last": args.channels_last, "rounds": args.rounds,
                   "warmup": args.warmup, "backward_bn_mode": "train" if train_bn else "eval", "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "pyramid_ext": pe.__version__},
        "rows": rows,
    }


def format_table(result: Dict) -> str:
    cfg = result["config"]
    head = (f"PPM x={tuple(cfg['shape'])} bins={tuple(cfg['bins'])} reduction={cfg['reduction']} {cfg['dtype']} "
            f"{'channels_last ' if cfg['channels_last'] else ''}on {cfg['device']} "
            f"({cfg['threads']} threads), median of {cfg['rounds']} interleaved rounds; "
            f"forward in eval mode, forward+backward in {cfg['backward_bn_mode']} mode")
    lines = [head, f"{'backend':<22} {'mode':<17} {'ms':>10} {'speedup vs eager':>17} {'max abs err vs eager':>21} "
                   f"{'rel to scale':>12}"]
    for r in result["rows"]:
        if r["ms"] is None:
            lines.append(f"{r['backend']:<22} {r['mode']:<17} {'failed':>10}  {r['error']}")
            continue
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.3g}"
        rel = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.2g}"
        lines.append(f"{r['backend']:<22} {r['mode']:<17} {r['ms']:>10.3f} {speed:>17} {err:>21} {rel:>12}")
    return "\n".join(lines)


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib, which is not installed: "
                         "pip install matplotlib (or pip install pyramid_ext[plot])") from None
    return plt


def plot(result: Dict, path: str, plt) -> None:
    rows = [r for r in result["rows"] if r["ms"] is not None]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    labels = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(labels) * len(modes), 4))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        ys = [next((r["ms"] for r in rows if r["mode"] == m and r["backend"] == label), 0.0) for m in modes]
        ax.bar([k + i * width for k in range(len(modes))], ys, width, label=label)
    ax.set_xticks([k + width * (len(labels) - 1) / 2 for k in range(len(modes))])
    ax.set_xticklabels(modes)
    ax.set_ylabel("ms (median)")
    cfg = result["config"]
    ax.set_title(f"PPM {tuple(cfg['shape'])} {cfg['dtype']} on {cfg['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


THP_VAR = "THP_MEM_ALLOC_ENABLE"


def _bench_both_envs(argv: List[str]) -> int:
    """Runs the benchmark twice, in subprocesses: c10 reads THP_MEM_ALLOC_ENABLE
    once at start-up, and on CPU fresh large outputs cost page faults that
    huge pages cut, so both environments are reported."""
    import subprocess

    rc = 0
    for thp in ("0", "1"):
        env = dict(os.environ)
        if thp == "1":
            env[THP_VAR] = "1"
        else:
            env.pop(THP_VAR, None)
        label = "THP_MEM_ALLOC_ENABLE=1" if thp == "1" else "default environment"
        print(f"\n### {label}\n", flush=True)
        cmd = [sys.executable, "-m", "pyramid_ext", "bench", "--env", "current"] + argv
        rc = subprocess.call(cmd, env=env) or rc
    return rc


def cmd_bench(args) -> int:
    if args.env == "both" and not (args.plot or args.json):
        return _bench_both_envs(args.passthrough)
    if args.model:
        from . import model_bench

        if args.plot or args.json:
            raise SystemExit("error: --plot/--json are for the PPM benchmark, not --model")
        names = list(model_bench.MODEL_NAMES) if "all" in args.model else list(dict.fromkeys(args.model))
        return model_bench.main(names, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                                train=args.backward)
    if args.env == "both":
        _log(f"[bench] --plot/--json: one environment, this process's ({THP_VAR}={os.environ.get(THP_VAR, 'unset')})")
    plt = _require_matplotlib() if args.plot else None
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be at least 1")
    result = run_bench(args)
    print(format_table(result), flush=True)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            _log(f"[bench] wrote {args.json}")
    if plt is not None:
        plot(result, args.plot, plt)
        _log(f"[bench] wrote {args.plot}")
    return 0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args) -> int:
    info = pe.build_info()
    print(f"pyramid_ext      {pe.__version__}")
    print(f"python           {platform.python_version()}")
    print(f"torch            {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})")
    print(f"torchvision      {_version('torchvision')}")
    print(f"extension        {'built' if info.get('extension') else 'not available: ' + str(info.get('error'))}")
    for k, v in info.items():
        if k not in ("extension", "error"):
            print(f"  {k:<14} {v}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devices:
        print(f"backends on {d:<4} {', '.join(pe.available_backends(d))}")
    if not torch.cuda.is_available():
        print("backends on cuda (no CUDA device)")
    else:
        print(f"cuda device      {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    print(f"CUDA archs       torch: {' '.join(torch.cuda.get_arch_list()) or '-'}; "
          f"extension: {info.get('cuda_archs') or '-'}")
    print(f"OpenMP threads   {torch.get_num_threads()}")
    triton = _version("triton")
    where = (["CUDA"] if torch.cuda.is_available() else []) + (["CPU (TRITON_INTERPRET=1)"]
                                                               if pe.backends.triton_interpret() else [])
    usable = "-" if triton == "not installed" else (
        "usable on " + " and ".join(where) if where else "installed; needs a CUDA device or TRITON_INTERPRET=1")
    print(f"triton           {triton} ({usable})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyramid_ext", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the fused PPM against eager and torch.compile")
    b.add_argument("--shape", type=int, nargs=4, metavar=("N", "C", "H", "W"), default=[2, 2048, 64, 64],
                   help="input shape (default: 2 2048 64 64, PSPNet-ResNet-50's PPM input)")
    b.add_argument("--bins", type=int, nargs="+", default=[1, 2, 3, 6], help="pyramid bins (default: 1 2 3 6)")
    b.add_argument("--reduction", type=int, default=None, help="channels per bin (default: C / len(bins))")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    b.add_argument("--channels-last", action="store_true", help="input and weights in channels_last")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--rounds", type=int, default=10, help="timed rounds (default: 10)")
    b.add_argument("--warmup", type=int, default=2, help="warm-up runs per contender (default: 2)")
    b.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default: 2)")
    b.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                   help="also time forward+backward (default: on)")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="include torch.compile of the eager module (default: on)")
    b.add_argument("--env", choices=("both", "current"), default="both",
                   help="both (default): run once in the default environment and once with THP_MEM_ALLOC_ENABLE=1 "
                        "(c10 reads it at start-up); current: this process's environment only (also what "
                        "--plot/--json use)")
    b.add_argument("--model", nargs="+", choices=("all",) + MODEL_NAMES,
                   help="time these segmentation models (whole model and decode head, forward and training step) "
                        "before and after pyramid_ext.convert instead of the PPM (CPU; --rounds, --warmup, --threads, "
                        "--backward apply)")
    b.add_argument("--plot", metavar="FILE.png", help="bar chart of the medians (needs matplotlib)")
    b.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' for stdout)")
    b.set_defaults(func=cmd_bench)
    i = sub.add_parser("info", help="versions, built and available backends")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # What a re-run per environment passes on: everything but --env.
    args.passthrough = [a for i, a in enumerate(argv[1:]) if a != "--env" and (i == 0 or argv[i] != "--env")]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
