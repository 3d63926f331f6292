"""Benchmark cases and contenders shared by the pytest-benchmark suite and compare.py.

A *case* is one (op, mode, layout, shape):
    op      "avg"  multi_adaptive_avg_pool2d, bins (1, 2, 3, 6)
            "max"  multi_adaptive_max_pool2d, bins (1, 2, 3, 6)
            "spp"  spatial_pyramid_pool(mode="max"), bins (4, 2, 1)
            forward only (mode "fwd"):
            "maxidx"  multi_adaptive_max_pool2d(return_indices=True), bins (1, 2, 3, 6)
            "sppavg"  spatial_pyramid_pool(mode="avg"), bins (4, 2, 1)
            "ucconv"  upsample_concat_conv2d: the "uc" inputs and a 1x1 conv (2C -> C/4, bias), as
                      PSPModule's bottleneck; eager: F.conv2d over the upsample-concatenation
            "ppm"     pyramid_ext.nn.PPM(C, C/4, (1, 2, 3, 6)) in eval mode against the eager PPM
                      (hszhao/semseg, benchmarks/bench_models.EagerPPM) with the same weights
            "uc"   upsample_concat: x (N, C, H, W) + four branches (N, C/4, b, b), b in 1, 2, 3, 6,
                   bilinear, align_corners=False
    mode    pooling: "fwd", "fwdbwd";  upsample_concat: "fresh" (new output each call),
            "out" (out= preallocated output), "fwdbwd"
    layout  "nchw" or "cl" (channels_last), for the input and every tensor derived from it
A *contender* is one way of computing the case:
    fused-cpp     pyramid_ext with backend="cpp" (compiled C++/CUDA)
    fused-triton  pyramid_ext with backend="triton" (CUDA tensors only: Triton on CPU is an interpreter)
    fused-torch   pyramid_ext with backend="torch" (the pure-PyTorch fallback)
    eager         the loop as users write it: nn.AdaptiveAvgPool2d / AdaptiveMaxPool2d per bin,
                  F.interpolate per branch + torch.cat
    compile       torch.compile of that same eager function (static shapes, fullgraph)
    copy-x        upsample_concat floor: out[:, :C].copy_(x) into a preallocated out (fresh/out only)
    read-x        pooling floor: x.sum(), one read of x (the forward of avg, max, spp, maxidx, sppavg only)

``build(case, contender, inputs)`` returns a ``Contender`` whose ``run()`` computes the case once and
returns the result (forward outputs, or the input gradients for "fwdbwd") and whose ``step()`` is the
timed function: ``run()`` with the result dropped at once (plus a CUDA synchronize). Contenders that
cannot run here raise ``Unavailable(reason)``.

Environment:
    PYRAMID_EXT_BENCH_DEVICE       "cpu" (default) or "cuda" / "cuda:N"
    PYRAMID_EXT_BENCH_SMALL=1      tiny shapes (smoke runs); same structure, bins and ratios
    PYRAMID_EXT_BENCH_CONTENDERS   comma list restricting the contenders (e.g. "fused-cpp,eager")
    PYRAMID_EXT_BENCH_COMPILE_BACKEND  torch.compile backend of "compile" (default "inductor"; "aot_eager"
                                   makes smoke runs fast: Dynamo + AOTAutograd without code generation)
    PYRAMID_EXT_BENCH_COMPILE_STRICT=1 the known torch.compile failure raises too (others always raise)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import pyramid_ext as pe
except ImportError:  # running from a source checkout without PYTHONPATH
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import pyramid_ext as pe

FULL_SHAPES: List[Tuple[int, int, int, int]] = [(1, 2048, 64, 64), (4, 512, 60, 60), (8, 512, 32, 32)]
# Same batch sizes and the odd/even H, W of the full shapes (60 -> 15 keeps the
# non-divisible adaptive windows), far fewer bytes.
SMALL_SHAPES: List[Tuple[int, int, int, int]] = [(1, 128, 16, 16), (4, 32, 15, 15), (8, 32, 8, 8)]
# Issue 12 item 3's small inputs: a large-batch 32x32 map and a lightweight
# backbone's last stage (compare.py --shapes stages).
STAGE_SHAPES: List[Tuple[int, int, int, int]] = [(8, 512, 32, 32), (16, 256, 16, 16)]

POOL_BINS = (1, 2, 3, 6)
SPP_BINS = (4, 2, 1)
UC_BINS = (1, 2, 3, 6)

POOL_OPS = ("avg", "max", "spp")
FWD_ONLY_OPS = ("maxidx", "sppavg", "ucconv", "ppm")  # mode "fwd" only
POOL_MODES = ("fwd", "fwdbwd")
UC_MODES = ("fresh", "out", "fwdbwd")
LAYOUTS = ("nchw", "cl")

FUSED = ("fused-cpp", "fused-triton", "fused-torch")
CONTENDERS = FUSED + ("eager", "compile", "copy-x", "read-x")
FLOORS = ("copy-x", "read-x")  # memory floors: not checked against the reference

DEVICE_ENV = "PYRAMID_EXT_BENCH_DEVICE"
SMALL_ENV = "PYRAMID_EXT_BENCH_SMALL"
CONTENDERS_ENV = "PYRAMID_EXT_BENCH_CONTENDERS"
COMPILE_BACKEND_ENV = "PYRAMID_EXT_BENCH_COMPILE_BACKEND"
COMPILE_STRICT_ENV = "PYRAMID_EXT_BENCH_COMPILE_STRICT"

SEED = 0


class Unavailable(Exception):
    """The contender cannot run here; str(exc) says why."""


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def bench_device(default: Optional[str] = None) -> torch.device:
    return torch.device(default or os.environ.get(DEVICE_ENV) or "cpu")


def bench_shapes(small: Optional[bool] = None) -> List[Tuple[int, int, int, int]]:
    if small is None:
        small = env_flag(SMALL_ENV)
    return list(SMALL_SHAPES if small else FULL_SHAPES)


def enabled_contenders() -> Tuple[str, ...]:
    """CONTENDERS, restricted by PYRAMID_EXT_BENCH_CONTENDERS when set."""
    raw = os.environ.get(CONTENDERS_ENV, "").strip()
    if not raw:
        return CONTENDERS
    wanted = [c.strip() for c in raw.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CONTENDERS]
    if unknown:
        raise ValueError(f"{CONTENDERS_ENV}: unknown contender(s) {unknown}; choose from {CONTENDERS}")
    return tuple(c for c in CONTENDERS if c in wanted)


def compile_backend() -> str:
    return os.environ.get(COMPILE_BACKEND_ENV, "").strip() or "inductor"


def thp_status() -> str:
    """THP_MEM_ALLOC_ENABLE as this process saw it at start (c10 reads it once)."""
    v = os.environ.get("THP_MEM_ALLOC_ENABLE")
    return "unset" if v is None else v


def setup_process(device: torch.device, threads: int = 2) -> None:
    """Thread count for CPU runs; seeds."""
    if device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(SEED)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape_id(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def parse_shape(text: str) -> Tuple[int, int, int, int]:
    parts = [int(p) for p in text.lower().replace(",", "x").split("x") if p]
    if len(parts) != 4:
        raise ValueError(f"shape must be NxCxHxW, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str
    mode: str
    layout: str
    shape: Tuple[int, int, int, int]

    def __post_init__(self):
        if self.op not in POOL_OPS + ("uc",) + FWD_ONLY_OPS:
            raise ValueError(f"unknown op {self.op!r}")
        modes = UC_MODES if self.op == "uc" else ("fwd",) if self.op in FWD_ONLY_OPS else POOL_MODES
        if self.mode not in modes:
            raise ValueError(f"op {self.op!r}: mode must be one of {modes}, got {self.mode!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.op in ("uc", "ucconv", "ppm") and self.shape[1] % 4:
            raise ValueError(f"{self.op} cases need C divisible by 4, got shape {self.shape}")

    @property
    def name(self) -> str:
        """op.mode.layout, e.g. avg.fwdbwd.cl"""
        return f"{self.op}.{self.mode}.{self.layout}"

    @property
    def group(self) -> str:
        return f"{self.name} {shape_id(self.shape)}"

    @property
    def backward(self) -> bool:
        return self.mode == "fwdbwd"

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "cl" else torch.contiguous_format

    @property
    def pe_op(self) -> str:
        """The op name pyramid_ext.available_backends() takes."""
        return "upsample_concat" if self.op in ("uc", "ucconv", "ppm") else "multi_pool2d"

    def contenders(self) -> Tuple[str, ...]:
        """The contenders that make sense for this case (before availability)."""
        names = list(CONTENDERS)
        if not (self.op == "uc" and self.mode in ("fresh", "out")):
            names.remove("copy-x")
        if self.op in ("uc", "ucconv", "ppm") or self.backward:
            names.remove("read-x")
        return tuple(names)


def case_names() -> List[str]:
    names = [f"{op}.{mode}.{layout}" for op in POOL_OPS for mode in POOL_MODES for layout in LAYOUTS]
    names += [f"uc.{mode}.{layout}" for mode in UC_MODES for layout in LAYOUTS]
    names += [f"{op}.fwd.{layout}" for op in FWD_ONLY_OPS for layout in LAYOUTS]
    return names


def parse_case_name(name: str, shape) -> Case:
    op, mode, layout = name.split(".")
    return Case(op, mode, layout, tuple(shape))


# --------------------------------------------------------------------------
# Inputs (shared by every contender of a case)
# --------------------------------------------------------------------------


@dataclass
class Inputs:
    device: torch.device
    x: torch.Tensor
    branches: List[torch.Tensor]
    weight: Optional[torch.Tensor]  # ucconv: the conv's weight and bias
    bias: Optional[torch.Tensor]
    out: Optional[torch.Tensor]  # uc fresh/out: preallocated output (out= and copy-x)
    grads: List[torch.Tensor]  # fwdbwd: the gradient of each output (random, fixed)


def _randn(shape, gen, device, fmt) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)


def make_inputs(case: Case, device: torch.device) -> Inputs:
    gen = torch.Generator().manual_seed(SEED)
    fmt = case.memory_format
    n, c, h, w = case.shape
    x = _randn(case.shape, gen, device, fmt)
    branches: List[torch.Tensor] = []
    out = None
    grads: List[torch.Tensor] = []
    weight = bias = None
    if case.op == "ucconv":
        branches = [_randn((n, c // 4, b, b), gen, device, fmt) for b in UC_BINS]
        weight = (torch.randn((c // 4, 2 * c, 1, 1), generator=gen) / (2 * c) ** 0.5).to(device)
        bias = torch.randn((c // 4,), generator=gen).to(device)
    if case.op == "uc":
        branches = [_randn((n, c // 4, b, b), gen, device, fmt) for b in UC_BINS]
        out_shape = (n, c + len(UC_BINS) * (c // 4), h, w)
        if case.mode in ("fresh", "out"):
            out = torch.zeros(out_shape, device=device).contiguous(memory_format=fmt)
        if case.backward:
            grads = [_randn(out_shape, gen, device, fmt)]
    elif case.backward:
        if case.op == "spp":
            grads = [_randn((n, c * sum(b * b for b in SPP_BINS)), gen, device, torch.contiguous_format)]
        else:
            grads = [_randn((n, c, b, b), gen, device, fmt) for b in POOL_BINS]
    if case.backward:
        x.requires_grad_(True)
        for b in branches:
            b.requires_grad_(True)
    return Inputs(device, x, branches, weight, bias, out, grads)


# --------------------------------------------------------------------------
# The functions being compared
# --------------------------------------------------------------------------


def eager_pool_fn(op: str) -> Callable:
    """The reference loop as users write it: one adaptive-pool module per bin."""
    if op == "avg":
        pools = nn.ModuleList(nn.AdaptiveAvgPool2d(b) for b in POOL_BINS)

        def eager_avg(x):
            return [pool(x) for pool in pools]

        return eager_avg
    if op == "max":
        pools = nn.ModuleList(nn.AdaptiveMaxPool2d(b) for b in POOL_BINS)

        def eager_max(x):
            return [pool(x) for pool in pools]

        return eager_max
    if op == "spp":
        pools = nn.ModuleList(nn.AdaptiveMaxPool2d(b) for b in SPP_BINS)

        def eager_spp(x):
            return torch.cat([pool(x).flatten(1) for pool in pools], 1)

        return eager_spp
    raise ValueError(op)


def eager_upsample_concat(x, branches):
    size = x.shape[-2:]
    return torch.cat([x] + [F.interpolate(b, size=size, mode="bilinear", align_corners=False) for b in branches], 1)


def eager_upsample_concat_out(x, branches, out):
    size = x.shape[-2:]
    torch.cat([x] + [F.interpolate(b, size=size, mode="bilinear", align_corners=False) for b in branches], 1,
              out=out)
    return out


def eager_upsample_concat_copy(x, branches, out):
    """What a torch.compile user writes when Dynamo rejects cat(out=) (non-contiguous out)."""
    out.copy_(eager_upsample_concat(x, branches))
    return out


def fused_pool_fn(op: str, backend: str) -> Callable:
    if op == "avg":
        return lambda x: pe.multi_adaptive_avg_pool2d(x, POOL_BINS, backend=backend)
    if op == "max":
        return lambda x: pe.multi_adaptive_max_pool2d(x, POOL_BINS, backend=backend)
    if op == "spp":
        return lambda x: pe.spatial_pyramid_pool(x, SPP_BINS, mode="max", backend=backend)
    raise ValueError(op)


def _ppm_pair(c: int, device: torch.device):
    """The eager PPM and pe.nn.PPM with the same (seeded) weights, eval mode."""
    from bench_models import EagerPPM  # noqa: E402  (benchmarks/ is on sys.path)

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    eager = EagerPPM(c, c // 4, POOL_BINS).eval().to(device)
    torch.random.set_rng_state(gen_state)
    gen = torch.Generator().manual_seed(SEED + 1)
    for bn in (m for m in eager.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():  # non-trivial statistics, so the check means something
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=gen) - 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    fused = pe.nn.PPM(c, c // 4, POOL_BINS).eval().to(device)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def eager_fwd_only_fn(case: "Case", inputs: "Inputs") -> Callable:
    x, branches = inputs.x, inputs.branches
    if case.op == "maxidx":
        return lambda: [F.adaptive_max_pool2d(x, b, return_indices=True) for b in POOL_BINS]
    if case.op == "sppavg":
        return lambda: torch.cat([F.adaptive_avg_pool2d(x, b).flatten(1) for b in SPP_BINS], 1)
    if case.op == "ucconv":
        weight, bias = inputs.weight, inputs.bias
        return lambda: F.conv2d(eager_upsample_concat(x, branches), weight, bias)
    if case.op == "ppm":
        eager, _ = _ppm_pair(case.shape[1], inputs.device)
        return lambda: eager(x)
    raise ValueError(case.op)


def fused_fwd_only_fn(case: "Case", backend: str, inputs: "Inputs") -> Callable:
    x, branches = inputs.x, inputs.branches
    if case.op == "maxidx":
        return lambda: list(zip(*pe.multi_adaptive_max_pool2d(x, POOL_BINS, return_indices=True, backend=backend)))
    if case.op == "sppavg":
        return lambda: pe.spatial_pyramid_pool(x, SPP_BINS, mode="avg", backend=backend)
    if case.op == "ucconv":
        weight, bias = inputs.weight, inputs.bias
        return lambda: pe.upsample_concat_conv2d(x, branches, weight, bias, backend=backend)
    if case.op == "ppm":
        _, fused = _ppm_pair(case.shape[1], inputs.device)

        def ppm():
            with pe.use_backend(backend):
                return fused(x)

        return ppm
    raise ValueError(case.op)


def compile_fn(fn: Callable) -> Callable:
    """torch.compile with static shapes and no graph breaks. Dynamo's caches are
    reset first: every case builds its eager function from the same code
    objects, and stale entries would count against the recompile limit (and
    turn shapes dynamic)."""
    if hasattr(torch, "_dynamo") and hasattr(torch._dynamo, "is_dynamo_supported"):
        if not torch._dynamo.is_dynamo_supported():
            raise Unavailable("torch.compile is not supported on this Python/platform")
    torch._dynamo.reset()
    return torch.compile(fn, backend=compile_backend(), dynamic=False, fullgraph=True)


# --------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------


def _known_compile_failure(case: "Case", device: torch.device, exc: BaseException) -> Optional[str]:
    """Names the known torch.compile bug `exc` is, or None. Known: torch 2.13's
    inductor on CPU fails (InductorError wrapping an AssertionError in the C++
    codegen of the bilinear-upsample backward's atomic-add scatter) on the
    upsample_concat backward of the eager reference code."""
    if compile_backend() != "inductor" or device.type != "cpu":
        return None
    if case.op != "uc" or not case.backward:
        return None
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    if type(exc).__name__ != "InductorError" or not (isinstance(inner, AssertionError) or "AssertionError" in str(exc)):
        return None
    return "known inductor bug: CPU codegen of the bilinear-upsample backward"


def _describe(exc: BaseException) -> str:
    """One line naming an exception: its type, message, and the innermost frame it came from."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:240]
    tb = inner.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        text += f" (at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})"
    return text


@dataclass
class Contender:
    name: str
    run: Callable[[], Any]  # computes once, returns the result (outputs or input grads)
    step: Callable[[], None]  # the timed function: run(), result dropped, CUDA synced
    warmup: int  # untimed calls before timing (compile: compiled already by build())
    note: str = ""


def _why_backend_unavailable(backend: str, case: Case, device: torch.device) -> Optional[str]:
    if device.type != "cuda" and backend == "triton":
        return ("Triton is benchmarked on CUDA tensors only (on CPU it runs only in the TRITON_INTERPRET=1 "
                "interpreter, which is not a meaningful timing)")
    if backend in pe.available_backends(device, op=case.pe_op):
        return None
    why = getattr(pe.backends, "_why_not", None)
    if why is not None:
        try:
            reason = why(backend, device, case.pe_op)
        except Exception:  # noqa: BLE001 - a reason string is best effort
            reason = None
        if reason:
            return f"backend {backend!r} unavailable on {device.type}: {reason}"
    return f"backend {backend!r} unavailable on {device.type} (pyramid_ext.available_backends says no)"


def check_available(case: Case, name: str, device: torch.device) -> None:
    """Raises Unavailable if contender `name` cannot run `case` on `device`."""
    if name not in case.contenders():
        raise Unavailable(f"{name} is not a contender for {case.name}")
    if name not in enabled_contenders():
        raise Unavailable(f"{name} excluded by {CONTENDERS_ENV}={os.environ.get(CONTENDERS_ENV)}")
    if name.startswith("fused-"):
        reason = _why_backend_unavailable(name[len("fused-"):], case, device)
        if reason:
            raise Unavailable(reason)
    if name == "compile" and hasattr(torch._dynamo, "is_dynamo_supported") and not torch._dynamo.is_dynamo_supported():
        raise Unavailable("torch.compile is not supported on this Python/platform")


def build(case: Case, name: str, inputs: Inputs, *, check: bool = True) -> Contender:
    """The contender `name` for `case` over `inputs`; raises Unavailable."""
    device = inputs.device
    if check:
        check_available(case, name, device)
    x, branches, out, grads = inputs.x, inputs.branches, inputs.out, inputs.grads
    warmup = 2
    note = ""

    if name == "read-x":  # pooling forward: one read of x
        def run():
            return x.sum()

    elif case.op in FWD_ONLY_OPS:
        if name.startswith("fused-"):
            fn = fused_fwd_only_fn(case, name[len("fused-"):], inputs)
        elif name in ("eager", "compile"):
            fn = eager_fwd_only_fn(case, inputs)
            if name == "compile":
                fn = compile_fn(fn)
        else:
            raise AssertionError(name)

        def run():
            return fn()

    elif case.op in POOL_OPS:
        if name.startswith("fused-"):
            fn = fused_pool_fn(case.op, name[len("fused-"):])
        elif name == "eager":
            fn = eager_pool_fn(case.op)
        elif name == "compile":
            fn = compile_fn(eager_pool_fn(case.op))
        else:
            raise AssertionError(name)

        if case.backward:
            def run():
                outs = fn(x)
                outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
                return torch.autograd.grad(outs, [x], grads)
        else:
            def run():
                return fn(x)

    else:  # upsample_concat
        c = case.shape[1]
        if name == "copy-x":
            def run():
                out[:, :c].copy_(x)
                return out
        elif case.mode == "out":
            if name.startswith("fused-"):
                backend = name[len("fused-"):]

                def fn(x, branches, out):
                    return pe.upsample_concat(x, branches, out=out, backend=backend)
            elif name == "eager":
                fn = eager_upsample_concat_out
            elif name == "compile":
                if case.layout == "cl":
                    # Dynamo rejects torch.cat(out=) with a non-contiguous out.
                    fn = compile_fn(eager_upsample_concat_copy)
                    note = "compiles out.copy_(torch.cat(...)): Dynamo rejects cat(out=) on channels_last"
                else:
                    fn = compile_fn(eager_upsample_concat_out)
            else:
                raise AssertionError(name)

            def run():
                return fn(x, branches, out)
        else:  # fresh / fwdbwd
            if name.startswith("fused-"):
                backend = name[len("fused-"):]

                def fn(x, branches):
                    return pe.upsample_concat(x, branches, backend=backend)
            elif name == "eager":
                fn = eager_upsample_concat
            elif name == "compile":
                fn = compile_fn(eager_upsample_concat)
            else:
                raise AssertionError(name)

            if case.backward:
                def run():
                    return torch.autograd.grad([fn(x, branches)], [x] + branches, grads)
            else:
                def run():
                    return fn(x, branches)

    if name == "compile":
        # Compile now (the first call), untimed. Only the one known torch.compile
        # bug is reported as unavailable (with the error); any other failure to
        # compile fails the benchmark (PYRAMID_EXT_BENCH_COMPILE_STRICT=1 makes
        # the known one fail too).
        try:
            run()
        except Exception as exc:  # noqa: BLE001
            known = _known_compile_failure(case, device, exc)
            if known is None or env_flag(COMPILE_STRICT_ENV):
                raise
            raise Unavailable(f"torch.compile(backend={compile_backend()!r}) fails on {case.name} "
                              f"{shape_id(case.shape)} ({known}): {_describe(exc)}") from exc
        sync(device)
        warmup = 2

    if device.type == "cuda":
        def step():
            run()
            torch.cuda.synchronize(device)
    else:
        def step():
            run()

    return Contender(name, run, step, warmup, note)


# --------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------


def _flat(result) -> List[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in _flat(r)]


def check_against(case: Case, result, reference) -> None:
    """Asserts a contender's result equals the eager one (values, shapes; layout not required)."""
    got, want = _flat(result), _flat(reference)
    if len(got) != len(want):
        raise AssertionError(f"{case.group}: {len(got)} outputs, eager gives {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        # Gradients of small branches sum thousands of terms (a 1x1 branch sums
        # the whole plane), in another order than eager: scale atol with them.
        scale = max(1.0, float(w.detach().abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(g.detach(), w.detach(), rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, i=i: f"{case.group}: output {i} differs from eager: {m}")


def reference_result(case: Case, inputs: Inputs):
    """The eager result (for check_against); out= cases write into a scratch output."""
    if case.mode == "out":
        inputs = Inputs(inputs.device, inputs.x, inputs.branches, inputs.weight, inputs.bias,
                        torch.empty_like(inputs.out), inputs.grads)
    return build(case, "eager", inputs, check=False).run()
