"""Speed of exported PPMs in onnxruntime (CPU, 2 threads by default).

    python benchmarks/bench_onnx.py            # (1, 2048, 64, 64) and (4, 512, 60, 60)
    python benchmarks/bench_onnx.py --small    # smoke run on tiny shapes

Contenders, same weights, each file run at the timed shape:

- ``fused-dynamo-dyn``: ``pyramid_ext.nn.PPM`` exported by the dynamo exporter
  with dynamic N, H and W (windows computed in the graph: pyramid_ext.export);
- ``fused-ts-dyn``: the same exported by the TorchScript exporter (``dynamic_axes``);
- ``eager-dynamo-static``: the eager PPM (hszhao/semseg, ``nn.AdaptiveAvgPool2d``
  per bin) exported by the dynamo exporter at the timed size (static: exported
  with dynamic H and W it fails at other sizes, see issue 8).

Interleaved rounds, medians; ``ratio`` = contender / eager-dynamo-static (the
target is at most 1.25 for the dynamic fused export). Every file's output is
checked against the PyTorch module before timing. Needs onnx, onnxscript and
onnxruntime. Timings on a machine shared with builds are meaningless.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pyramid_ext as pe  # noqa: E402
from bench_models import EagerPPM  # noqa: E402

FULL = [(1, 2048, 64, 64), (4, 512, 60, 60)]
SMALL = [(1, 64, 16, 16), (2, 32, 15, 15)]
BINS = (1, 2, 3, 6)


def export(model, x, path, dynamo: bool, dynamic: bool) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = None
            if dynamic:
                shapes = ({0: torch.export.Dim("N", min=1, max=1024), 2: torch.export.Dim("H", min=1, max=4096),
                           3: torch.export.Dim("W", min=1, max=4096)},)
            torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=shapes, verbose=False)
        else:
            axes = {"x": {0: "N", 2: "H", 3: "W"}} if dynamic else None
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], dynamic_axes=axes)
    return path


def session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def median_ms(runs, rounds: int, warmup: int):
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes, few rounds (smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    shapes = SMALL if args.small else FULL
    rounds = args.rounds or (3 if args.small else 30)
    warmup = 1 if args.small else 3
    torch.set_num_threads(args.threads)

    print(f"onnxruntime CPU, {args.threads} threads, {rounds} rounds (medians), PPM bins {BINS}, fp32")
    print(f"{'shape':<20} {'contender':<22} {'ms':>9} {'ratio':>7}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            n, c, h, w = shape
            torch.manual_seed(0)
            fused = pe.nn.PPM(c, c // 4, BINS).eval()
            eager = EagerPPM(c, c // 4, BINS).eval()
            eager.load_state_dict(fused.state_dict())
            # the dynamic exports see another size than the one timed
            x_export = torch.randn(2, c, h // 2 + 3, w // 2 + 1)
            x = torch.randn(shape)
            files = {
                "fused-dynamo-dyn": export(fused, x_export, os.path.join(tmp, "fd.onnx"), True, True),
                "fused-ts-dyn": export(fused, x_export, os.path.join(tmp, "ft.onnx"), False, True),
                "eager-dynamo-static": export(eager, x, os.path.join(tmp, "es.onnx"), True, False),
            }
            with torch.no_grad():
                ref = eager(x)
            feeds = {}
            for name, path in files.items():
                sess = session(path, args.threads)
                feed = {sess.get_inputs()[0].name: x.numpy()}
                got = torch.from_numpy(sess.run(None, feed)[0])
                err = (got - ref).abs().max().item()
                if not err <= 1e-5 * ref.abs().max().item():
                    raise SystemExit(f"{name} at {shape}: max abs error {err:.3g} against the PyTorch module")
                feeds[name] = (lambda s=sess, f=feed: s.run(None, f))
            ms = median_ms(feeds, rounds, warmup)
            base = ms["eager-dynamo-static"]
            for name in files:
                rows.append((shape, name, ms[name], ms[name] / base))
                print(f"{str(shape):<20} {name:<22} {ms[name]:>9.2f} {ms[name] / base:>7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
