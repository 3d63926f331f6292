"""Model-level benchmark: ``python -m pyramid_ext bench --model NAME``.

Builds a segmentation model from its config (random weights, nothing is
downloaded), converts a copy with :func:`pyramid_ext.convert`, checks that the
two agree on the benchmark input, and times them side by side: the whole model
and its decode head, forward in eval mode and a training step
(forward + backward in train mode), interleaved round by round after a
warm-up, medians reported. The decode head's peak memory is the allocator's:
``torch.profiler`` records every allocation and free (``profile_memory``), and
the peak is the largest running sum over one forward, at op granularity
(``tracemalloc`` does not see tensors).

Models (fp32, batch 1):

- ``upernet``: transformers ``UperNetForSemanticSegmentation``, ConvNeXt-T-sized
  backbone (depths 3, 3, 9, 3; widths 96 ... 768), hidden size 512, 150 labels, 512x512.
- ``segformer``: transformers ``SegformerForSemanticSegmentation``, mit-b2-sized
  (depths 3, 4, 6, 3; widths 64, 128, 320, 512; decoder 768), 150 labels, 512x512.
- ``pspnet``: the PSPNet head alone, ``pe.nn.PyramidPooling.csail`` (PPM with four
  512-channel branches + 3x3 conv 4096 -> 512 + BN + ReLU) on (1, 2048, 64, 64),
  against the same layers run the concatenating way (AdaptiveAvgPool2d,
  F.interpolate, torch.cat, conv).

Training steps keep the 1x1 pyramid bin's block in eval mode (its BatchNorm sees
one value per channel at batch size 1 and cannot train there).
- ``smp-pspnet``: segmentation_models_pytorch ``PSPNet`` with a ResNet-50 encoder, 512x512.
- ``deeplabv3``: torchvision ``deeplabv3_resnet50``, 512x512.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MODEL_NAMES = ("upernet", "segformer", "pspnet", "smp-pspnet", "deeplabv3")


def _progress(label: str, done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r[bench] {label:<44} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end,
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Models: (model, input, decode head attribute, output getter)
# --------------------------------------------------------------------------


class EagerPyramidHead(nn.Module):
    """``pe.nn.PyramidPooling``'s layers run the concatenating way (plain PyTorch)."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        size = x.shape[-2:]
        ups = [F.interpolate(b(x), size, mode="bilinear", align_corners=self.fused.align_corners)
               for b in self.fused.branches]
        cat = torch.cat([x] + ups if self.fused.x_first else ups + [x], 1)
        return self.fused.bottleneck(cat)


class _HeadOnly(nn.Module):
    """A model whose decode head is the whole model (the ``pspnet`` case)."""

    def __init__(self, head):
        super().__init__()
        self.decode_head = head

    def forward(self, x):
        return self.decode_head(x)


def _upernet():
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=512, num_labels=150))
    return model, torch.randn(1, 3, 512, 512), "decode_head", lambda out: out.logits


def _segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768,
                          num_attention_heads=[1, 2, 5, 8], num_labels=150)
    return SegformerForSemanticSegmentation(cfg), torch.randn(1, 3, 512, 512), "decode_head", lambda out: out.logits


def _pspnet():
    import pyramid_ext as pe

    fused = pe.nn.PyramidPooling.csail(fc_dim=2048, branch_channels=512, out_channels=512)
    return _HeadOnly(fused), torch.randn(1, 2048, 64, 64), "decode_head", lambda out: out


def _smp_pspnet():
    import segmentation_models_pytorch as smp

    model = smp.PSPNet(encoder_name="resnet50", encoder_weights=None, classes=21)
    return model, torch.randn(1, 3, 512, 512), "decoder", lambda out: out


def _deeplabv3():
    from torchvision.models.segmentation import deeplabv3_resnet50

    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21)
    return model, torch.randn(1, 3, 512, 512), "classifier", lambda out: out["out"]


BUILDERS: Dict[str, Callable] = {"upernet": _upernet, "segformer": _segformer, "pspnet": _pspnet,
                                 "smp-pspnet": _smp_pspnet, "deeplabv3": _deeplabv3}
# the targets (speedups), shown beside the measurements
TARGETS = {("upernet", "whole model, forward"): 1.5, ("upernet", "decode head, forward"): 1.7,
           ("segformer", "whole model, forward"): 2.5, ("segformer", "decode head, forward"): 5.0,
           ("pspnet", "decode head, forward"): 1.8, ("pspnet", "decode head, training step"): 1.6,
           ("smp-pspnet", "decode head, forward"): 2.0}


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _head_inputs(model, head_name, x):
    """The decode head's positional arguments on input x (captured with a pre-hook)."""
    seen = {}
    head = model.get_submodule(head_name)
    handle = head.register_forward_pre_hook(lambda m, args: seen.setdefault("args", args))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["args"]


def _train_mode(model: nn.Module, batch: int) -> None:
    model.train()
    if batch == 1:  # BatchNorm on a 1x1 map sees one value per channel: it cannot train there
        # (the 1x1 pyramid bin's block: torchvision's ASPPPooling and smp's PSPBlock are nn.Sequential,
        # transformers' UperNetPyramidPoolingBlock a Module holding the pool as child "0")
        for m in model.modules():
            if any(isinstance(c, nn.AdaptiveAvgPool2d) and c.output_size in (1, (1, 1)) for c in m.children()):
                m.eval()


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):  # transformers' output (a dict too)
        return out.logits
    if isinstance(out, dict):
        return out["out"]
    return out[0]


def _forward(module, args):
    def run():
        with torch.no_grad():
            module(*args)
    return run


def _training_step(module, args):
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        out = _first_tensor(module(*args))
        grads = torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
        del grads
    return run


def peak_memory_mb(fn) -> float:
    """Peak of the allocator's running total over one call of fn (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage)
                    for e in prof.events())
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak / 2 ** 20


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-12)


def run_model(name: str, rounds: int, warmup: int, train: bool = True) -> Dict:
    import pyramid_ext as pe

    torch.manual_seed(0)
    _progress(f"{name}: building", 0, 1)
    eager, x, head_name, logits = BUILDERS[name]()
    _randomize_bn(eager)
    eager.eval()
    converted = copy.deepcopy(eager)
    if name == "pspnet":  # eager = the same layers, concatenating
        eager = _HeadOnly(EagerPyramidHead(converted.decode_head))
        report = None
    else:
        report = pe.convert(converted, example_input=x)
    _progress(f"{name}: building", 1, 1)

    with torch.no_grad():
        want, got = logits(eager(x)), logits(converted(x))
    err = _max_rel_err(got, want)
    if not err <= 1e-4:
        raise RuntimeError(f"bench --model {name}: the converted model differs from the original by {err:.3g} "
                           "of the output scale")

    head_args = _head_inputs(eager, head_name, x)
    heads = {"eager": eager.get_submodule(head_name), "converted": converted.get_submodule(head_name)}
    measures: List[Tuple[str, Dict[str, Callable]]] = []
    if name != "pspnet":
        measures.append(("whole model, forward", {k: _forward(m, (x,)) for k, m in
                                                  (("eager", eager), ("converted", converted))}))
    measures.append(("decode head, forward", {k: _forward(h, head_args) for k, h in heads.items()}))
    if train:
        if name != "pspnet":
            measures.append(("whole model, training step", {k: _training_step(m, (x,)) for k, m in
                                                            (("eager", eager), ("converted", converted))}))
        head_train_args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else
                                [t.detach().requires_grad_() for t in a] for a in head_args)
        measures.append(("decode head, training step", {k: _training_step(h, head_train_args)
                                                        for k, h in heads.items()}))

    rows = []
    for label, fns in measures:
        training = "training" in label
        for m in (eager, converted):
            _train_mode(m, x.shape[0]) if training else m.eval()
        total = warmup * len(fns) + rounds * len(fns)
        done = 0
        for fn in fns.values():
            for _ in range(warmup):
                fn()
                done += 1
                _progress(f"{name}: {label}", done, total)
        times = {k: [] for k in fns}
        keys = list(fns)
        for r in range(rounds):
            for k in (keys if r % 2 == 0 else keys[::-1]):  # interleaved, alternating order
                t0 = time.perf_counter()
                fns[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
                done += 1
                _progress(f"{name}: {label}", done, total)
        e, c = statistics.median(times["eager"]), statistics.median(times["converted"])
        rows.append({"measure": label, "eager_ms": e, "converted_ms": c, "speedup": e / c,
                     "target": TARGETS.get((name, label))})
    for m in (eager, converted):
        m.eval()
    mem = {k: peak_memory_mb(_forward(h, head_args)) for k, h in heads.items()}
    return {"model": name, "input": tuple(x.shape), "max_rel_err": err, "rows": rows, "head_peak_mb": mem,
            "replaced": report.names if report is not None else ["(pe.nn.PyramidPooling)"]}


def format_tables(results: List[Dict], threads: int, rounds: int) -> str:
    load = ""
    if hasattr(os, "getloadavg"):
        load = " load average {:.2f} {:.2f} {:.2f};".format(*os.getloadavg())
    lines = [f"Models, CPU, {threads} threads, fp32, batch 1, median of {rounds} interleaved rounds;{load} "
             f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}",
             "| model | input | measure | eager ms | converted ms | speedup | target |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for res in results:
        shape = "x".join(map(str, res["input"]))
        for r in res["rows"]:
            target = f"{r['target']:.1f}x" if r["target"] else ""
            lines.append(f"| {res['model']} | {shape} | {r['measure']} | {r['eager_ms']:.1f} | "
                         f"{r['converted_ms']:.1f} | {r['speedup']:.2f}x | {target} |")
        m = res["head_peak_mb"]
        lines.append(f"| {res['model']} | {shape} | decode head peak memory (MB) | {m['eager']:.0f} | "
                     f"{m['converted']:.0f} | {m['eager'] / max(m['converted'], 1e-9):.2f}x less | |")
    lines.append("")
    for res in results:
        lines.append(f"{res['model']}: converted {', '.join(res['replaced'])}; output max error "
                     f"{res['max_rel_err']:.2g} of its scale")
    return "\n".join(lines)


def main(models: List[str], rounds: int, warmup: int, threads: int, train: bool = True) -> int:
    torch.set_num_threads(threads)
    results = []
    for name in models:
        try:
            results.append(run_model(name, rounds, warmup, train))
            if len(models) > 1:  # each model's rows as soon as they exist (the full table follows)
                print(format_tables(results[-1:], threads, rounds), flush=True)
        except ImportError as e:
            print(f"\n[bench] {name}: skipped, {e} (the model benchmarks need transformers, torchvision, "
                  "segmentation_models_pytorch: pip install pyramid_ext[models])", file=sys.stderr, flush=True)
    if results:
        print(format_tables(results, threads, rounds), flush=True)
    return 0
