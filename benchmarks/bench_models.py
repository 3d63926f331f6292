"""Module-level speed of converted models: a model's pyramid module before and
after ``pyramid_ext.convert``, timed side by side (interleaved rounds, medians).

    python benchmarks/bench_models.py --both-env

Cases: segmentation_models_pytorch's PSPNet (resnet50 encoder, weights=None)
pyramid module ``decoder.psp`` on the features a 1x3x512x512 image gives it,
in eval mode; and the fused ``pyramid_ext.nn.PPM`` against the eager PPM
layout (hszhao/semseg), forward and forward+backward, on (1, 2048, 64, 64) and
(4, 512, 60, 60). CPU, 2 threads unless --threads says otherwise.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pyramid_ext as pe  # noqa: E402


class EagerPPM(nn.Module):
    """hszhao/semseg's PPM, as users have it (the reference for pe.nn.PPM)."""

    def __init__(self, in_dim, reduction_dim, bins):
        super().__init__()
        self.features = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
                          nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True)) for b in bins])

    def forward(self, x):
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), x.shape[-2:], mode="bilinear", align_corners=True))
        return torch.cat(out, 1)


def _time(fns, rounds, warmup):
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _fwd(m, x):
    def run():
        with torch.no_grad():
            m(x)
    return run


def _fwdbwd(m, x, g):
    params = [p for p in m.parameters() if p.requires_grad]

    def run():
        xx = x.detach().requires_grad_()
        out = m(xx)
        torch.autograd.grad(out, [xx] + params, g)
    return run


def bench_ppm(shape, rounds, warmup):
    n, c, h, w = shape
    eager = EagerPPM(c, c // 4, (1, 2, 3, 6)).eval()
    fused = pe.nn.PPM(c, c // 4, (1, 2, 3, 6)).eval()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(shape)
    g = torch.randn(n, 2 * c, h, w)
    rows = []
    for mode, make in (("forward", lambda m: _fwd(m, x)), ("forward+backward", lambda m: _fwdbwd(m, x, g))):
        t = _time({"eager": make(eager), "fused": make(fused)}, rounds, warmup)
        rows.append((f"PPM {tuple(shape)}", mode, t["eager"], t["fused"]))
    return rows


def bench_smp(rounds, warmup):
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        print("(segmentation_models_pytorch not installed: smp PSPNet case skipped)")
        return []
    model = smp.PSPNet(encoder_name="resnet50", encoder_weights=None).eval()
    feats = {}
    def capture(module, inputs, output):  # returns None: the output is left alone
        feats["x"] = inputs[0]

    hook = model.decoder.psp.register_forward_hook(capture)
    with torch.no_grad():
        model(torch.randn(1, 3, 512, 512))
    hook.remove()
    x = feats["x"]
    before = copy.deepcopy(model.decoder.psp)
    pe.convert(model, example_input=torch.randn(1, 3, 512, 512))
    after = model.decoder.psp
    t = _time({"eager": _fwd(before, x), "fused": _fwd(after, x)}, rounds, warmup)
    return [(f"smp PSPNet decoder.psp {tuple(x.shape)}", "forward (eval)", t["eager"], t["fused"])]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--both-env", action="store_true", help="run again with THP_MEM_ALLOC_ENABLE=1")
    args = ap.parse_args()
    if args.both_env:
        rc = 0
        for thp in (False, True):
            env = dict(os.environ)
            env.pop("THP_MEM_ALLOC_ENABLE", None)
            if thp:
                env["THP_MEM_ALLOC_ENABLE"] = "1"
            argv = [a for a in sys.argv[1:] if a != "--both-env"]
            rc |= subprocess.call([sys.executable, os.path.abspath(__file__)] + argv, env=env)
        return rc
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = bench_ppm((1, 2048, 64, 64), args.rounds, args.warmup)
    rows += bench_ppm((4, 512, 60, 60), args.rounds, args.warmup)
    rows += bench_smp(args.rounds, args.warmup)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    print(f"\nModules, CPU, {args.threads} threads, fp32, median of {args.rounds} interleaved rounds, "
          f"THP_MEM_ALLOC_ENABLE={thp}, backend {pe.available_backends('cpu')[0]}")
    print("| case | mode | eager ms | fused ms | speedup |")
    print("| --- | --- | --- | --- | --- |")
    for case, mode, e, f in rows:
        print(f"| {case} | {mode} | {e:.2f} | {f:.2f} | {e / f:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
