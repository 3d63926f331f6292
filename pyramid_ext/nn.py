"""Drop-in ``nn`` modules computing pyramid pooling with the fused ops.

Every module here keeps the constructor, parameter names and ``state_dict``
keys of the layout it reproduces, so migrating is a change of import. The
pooling of every bin is one ``multi_adaptive_avg_pool2d`` call, the per-bin
1x1 conv / norm / activation run on the tiny pooled maps, and the upsampling of
every branch plus the concatenation with ``x`` is one ``upsample_concat``
call. Where a conv follows the concatenation (``PyramidPooling`` with a
``bottleneck``, ``PSPModule``'s bottleneck, ``PSPNet``'s ``cls[0]``), the
concatenation is not written at all: ``pe.upsample_concat_conv2d`` applies
each branch's share of the conv at the branch's own (bin) size and
accumulates the resized results (``conv_after_concat``); the module then
calls that conv's weights directly, so hooks on the conv (or on ``PSPNet.ppm``
and ``cls``) do not fire. The backend is whatever ``pyramid_ext`` selects (``use_backend``,
``PYRAMID_EXT_BACKEND``, or auto); nothing here names one.

Branches are ``nn.Sequential`` s whose index 0 is the original
``nn.AdaptiveAvgPool2d`` (kept as a placeholder: it holds no state and the
fused forward does not call it, it only records the bin), followed by the
layers applied to the pooled map.

BatchNorm and the 1x1 bin: in training, BatchNorm needs more than one value per
channel, and a 1x1 bin at batch size 1 gives exactly one. Where a branch would
hit that, the modules raise a ``ValueError`` naming the module and the branch
(PyTorch's own error would come from deep inside ``F.batch_norm``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _extension, export
from . import functional as pf
from ._pool_through import avg_pool_handing_on_x
from .windows import WINDOW_POLICIES, normalize_bins

__all__ = [
    "PPM",
    "PSPModule",
    "PyramidPooling",
    "SpatialPyramidPooling",
    "FeaturePyramidAttention",
    "PSPNet",
    "fused_pyramid",
    "pyramid_branches",
    "conv_after_concat",
]


# --------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------


def _bin_of(pool: nn.Module) -> Tuple[int, int]:
    """The (bh, bw) an ``nn.AdaptiveAvgPool2d`` placeholder pools to."""
    if not isinstance(pool, nn.AdaptiveAvgPool2d):
        raise TypeError(f"expected an nn.AdaptiveAvgPool2d as a branch's first module, got {type(pool).__name__}")
    size = pool.output_size
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"AdaptiveAvgPool2d output_size {size!r} is not a fixed (h, w); the fused pooling needs one")
    return pair


def _syncs_across_processes(m: nn.Module) -> bool:
    return (isinstance(m, nn.SyncBatchNorm) and torch.distributed.is_available()
            and torch.distributed.is_initialized())


def _check_batchnorm(tail: Sequence[nn.Module], pooled: torch.Tensor, label: str, index: int,
                     bin_hw: Tuple[int, int]) -> None:
    """Raises a clear error where BatchNorm in training would see one value per channel.
    The branch's name (``label[index] (bin hxw)``) is formatted only then (per call, the
    names and the module walk had cost about 6 us of a 150 us PPM on (1, 8, 8, 8))."""
    if pooled.shape[0] * pooled.shape[-2] * pooled.shape[-1] != 1:
        return
    for t in tail:
        for m in t.modules() if t._modules else (t,):  # a leaf is its own only module
            if isinstance(m, _BatchNorm) and m.training and not _syncs_across_processes(m):
                bh, bw = pooled.shape[-2], pooled.shape[-1]
                raise ValueError(
                    f"{label}[{index}] (bin {bin_hw[0]}x{bin_hw[1]}): {type(m).__name__} in training mode needs more "
                    f"than one value per channel, but this "
                    f"branch pools to a {bh}x{bw} bin and the batch size is 1, so it sees exactly one. Train with a "
                    "batch size of at least 2, put the module in eval mode, or build it without a norm layer on the "
                    "1x1 branch (PyramidPooling(..., norm_on_1x1=False), as segmentation_models_pytorch does)."
                )


def _own_hooks_free(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks_free() -> bool:
    mod = nn.modules.module
    return not (getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None)
                or getattr(mod, "_global_backward_hooks", None) or getattr(mod, "_global_backward_pre_hooks", None))


def _hooks_free(m: nn.Module) -> bool:
    """No forward/backward hook on ``m`` or on every module (calling its weights directly skips them)."""
    return _own_hooks_free(m) and _global_hooks_free()


def _direct_calls_allowed() -> bool:
    """Whether a tail's modules may be replaced by the ops they run (:func:`_direct_call`):
    eager only (under torch.compile, export, tracing, scripting, a torch function mode or
    ONNX export the modules are called), and no global module hook (it would not fire)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch._C._is_torch_function_mode_enabled() or export.onnx_flags_set()) and _global_hooks_free()


_MISSING = object()


def _param(m: nn.Module, name: str):
    """``getattr(m, name)`` for a parameter: read from ``m._parameters`` (where nn.Module keeps
    it, None when registered as absent) unless something else took the name. Why:
    ``m.weight`` goes through nn.Module.__getattr__, a Python call each, 40 of them in a PPM
    forward (the four tails' arguments 36 -> 18 us, one thread)."""
    value = m._parameters.get(name, _MISSING)
    return getattr(m, name) if value is _MISSING else value


def _buffer(m: nn.Module, name: str):
    """``getattr(m, name)`` for a buffer, as :func:`_param`."""
    value = m._buffers.get(name, _MISSING)
    return getattr(m, name) if value is _MISSING else value


def _product_conv(m: nn.Module, x: torch.Tensor) -> bool:
    """A plain 1x1 ``nn.Conv2d`` without a hook of its own that ``functional._conv1x1_as_product`` computes on x."""
    return (type(m) is nn.Conv2d and type(x) is torch.Tensor and x.shape[0] >= pf.PRODUCT_MIN_SAMPLES  # the product's own rule, first
            and tuple(m.stride) == (1, 1) and m.groups == 1 and m.padding in ((0, 0), "valid")
            and m.padding_mode == "zeros" and _own_hooks_free(m)
            and pf._takes_as_product(x, _param(m, "weight"), _param(m, "bias")))


def _eval_batchnorm(m: nn.Module) -> bool:
    """An ``nn.BatchNorm2d`` in eval mode with running statistics, without a hook of its own."""
    return (type(m) is nn.BatchNorm2d and not m.training and _buffer(m, "running_mean") is not None
            and _buffer(m, "running_var") is not None and _own_hooks_free(m))


def _direct_call(m: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``m(x)`` through the op it runs, for the modules of a branch tail on a pooled map, or
    None (call the module); only where :func:`_direct_calls_allowed`.

    Why: a branch tail is a few modules on a tiny map, and the module calls cost as much
    as their ops: on (16, 256) pooled to bins 1, 2, 3, 6 (a PPM), the four tails' convs
    as matrix products, BatchNorm and ReLU calls were about a third of the forward.
    - a plain 1x1 ``nn.Conv2d``: one matrix product (``functional._conv1x1_as_product``:
      CPU float32/64, small maps, at least two samples);
    - an ``nn.BatchNorm2d`` in eval mode with running statistics: ``torch.batch_norm``
      with them, as its forward calls it (nothing to update in eval mode);
    - an ``nn.ReLU``: ``torch.relu`` / ``torch.relu_`` as its ``inplace``.
    Exact types only (a subclass may override forward) and no hook on the module. With the
    compiled extension, :func:`_run_modules` runs such a conv and the BatchNorm and ReLU right
    after it as one call (``_C._pointwise_tail``, the same ops called from C++)."""
    kind = type(m)
    if kind is nn.Conv2d:
        return pf._conv1x1_as_product(x, _param(m, "weight"), _param(m, "bias")) if _product_conv(m, x) else None
    if kind is nn.BatchNorm2d:
        if x.dim() != 4 or not _eval_batchnorm(m):
            return None
        return torch.batch_norm(x, _param(m, "weight"), _param(m, "bias"), _buffer(m, "running_mean"),
                                _buffer(m, "running_var"), False, 0.0, m.eps, torch.backends.cudnn.enabled)
    if kind is nn.ReLU:
        if not _own_hooks_free(m):
            return None
        return torch.relu_(x) if m.inplace else torch.relu(x)
    return None


def _pointwise_conv(conv: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``conv(x)`` for a plain 1x1 ``nn.Conv2d`` on a pooled map, as one matrix product
    (``functional._conv1x1_as_product``: CPU float32/64, small maps), or None.

    Why: on the tiny pooled maps (1x1 to 6x6) ATen's convolution is mostly oneDNN's
    reorders and a contiguous copy of each level view: on (16, 256) to 64 channels, bins
    1, 2, 3, 6, the four convolutions took 270-390 us against 140-190 us for the products
    (2 threads). Eager only: under torch.compile, export or tracing, or with a hook on the
    conv (calling its weights directly would skip it), the module is called."""
    if type(conv) is not nn.Conv2d or not _direct_calls_allowed():
        return None
    return _direct_call(conv, x)


def _run_tail(modules, x: torch.Tensor) -> torch.Tensor:
    """Each module on x in turn; plain 1x1 convs, eval BatchNorm2d and ReLU through their
    ops (:func:`_direct_call`), plain ``nn.Sequential`` s (their own forward not overridden,
    no hooks) walked into. One sample: no product applies (:func:`_direct_call`), so each
    module is just called (the checks per module were most of this function's cost on a
    tiny input)."""
    if type(x) is torch.Tensor and x.shape[0] < pf.PRODUCT_MIN_SAMPLES:
        for m in modules:
            x = m(x)
        return x
    return _run_modules(modules, x, _direct_calls_allowed())


def _flat_modules(modules) -> List[nn.Module]:
    """``modules`` with plain ``nn.Sequential`` s (their own forward, no hooks) walked into."""
    flat = []
    for m in modules:
        if type(m).forward is nn.Sequential.forward and _hooks_free(m):
            flat += _flat_modules(m)
        else:
            flat.append(m)
    return flat


def _pointwise_call(mods: Sequence[nn.Module], i: int, x: torch.Tensor) -> Optional[Tuple[tuple, int]]:
    """Where ``mods[i]`` is a product 1x1 conv on x: ``_C._pointwise_tail``'s arguments for
    it and an eval BatchNorm and a ReLU right after it (each if there), and the index of the
    module after them; else None."""
    conv = mods[i]
    if not _product_conv(conv, x):
        return None
    i += 1
    bn = mods[i] if i < len(mods) and _eval_batchnorm(mods[i]) else None
    i += bn is not None
    relu = mods[i] if i < len(mods) and type(mods[i]) is nn.ReLU and _own_hooks_free(mods[i]) else None
    i += relu is not None
    norm = ((_param(bn, "weight"), _param(bn, "bias"), _buffer(bn, "running_mean"), _buffer(bn, "running_var"), bn.eps)
            if bn is not None else (None,) * 4 + (0.0,))
    return (x, _param(conv, "weight"), _param(conv, "bias"), *norm, 0 if relu is None else 2 if relu.inplace else 1), i


def _run_modules(modules, x: torch.Tensor, direct: bool) -> torch.Tensor:
    mods = _flat_modules(modules)
    i = 0
    while i < len(mods):
        call = _pointwise_call(mods, i, x) if direct and _extension.LOADED else None
        if call is not None:  # the conv, and an eval BatchNorm and a ReLU right after it, in one call
            args, i = call
            x = _extension._C._pointwise_tail(*args)
            continue
        m = mods[i]
        i += 1
        y = _direct_call(m, x) if direct else None
        x = m(x) if y is None else y
    return x


def _tail_call_args(tail, pooled: torch.Tensor) -> Optional[tuple]:
    """``_C._pointwise_tail``'s arguments for a tail that is exactly one such call (a product
    1x1 conv, optionally an eval BatchNorm, optionally a ReLU), or None."""
    mods = _flat_modules(tail)
    call = _pointwise_call(mods, 0, pooled) if mods else None
    return call[0] if call is not None and call[1] == len(mods) else None


def _run_tails_side_by_side(stages: Sequence[nn.Sequential], pooled: Sequence[torch.Tensor]):
    """Every stage's tail in one ``_C._pointwise_tails`` call, the branches side by side on
    the intra-op threads (csrc/branch_tails.cpp: each op of a pooled map is too small to
    share among threads), or None where some tail is not one such call (then each tail
    runs in turn). Eager only, as the direct calls, and not under a dispatch mode (its
    handler would see the branches' ops interleaved)."""
    if (len(stages) < 2 or not _extension.LOADED or not _direct_calls_allowed()  # (first: compile, export)
            or torch._C._len_torch_dispatch_stack() > 0):
        return None
    if pooled[0].shape[0] < pf.PRODUCT_MIN_SAMPLES:
        return None  # one sample: no tail is a product (_product_conv), and asking each stage cost microseconds a call
    args = []
    for stage, p in zip(stages, pooled):
        a = _tail_call_args(list(stage)[1:], p)
        if a is None:
            return None
        args.append(a)
    return _extension._C._pointwise_tails(args)


def _apply_tail(stage: nn.Sequential, pooled: torch.Tensor, label: str, index: int,
                bin_hw: Tuple[int, int]) -> torch.Tensor:
    tail = list(stage)[1:]
    _check_batchnorm(tail, pooled, label, index, bin_hw)
    return _run_tail(tail, pooled)


def pyramid_branches(x: torch.Tensor, stages: Sequence[nn.Sequential], *, label: str = "pyramid",
                     hand_on_x: bool = False):
    """``[stage(x) for stage in stages]`` at the bins' own sizes, with one fused pooling call.

    ``stages``: Sequentials whose index 0 is an ``nn.AdaptiveAvgPool2d``
    (its bin is read, the module itself is not called) and whose remaining
    modules are applied to the pooled map. ``hand_on_x=True`` also returns the
    x to concatenate, routed through the pooling node: ``(branches, x)``.
    """
    bins = [_bin_of(next(iter(s))) for s in stages]  # iter: Sequential indexing walks its modules per call
    if hand_on_x:
        # x reaches the concatenation through the pooling node, so its two
        # gradients are summed in one backward call (see _pool_through).
        pooled, x_through = avg_pool_handing_on_x(x, bins)
    else:
        pooled = pf.multi_adaptive_avg_pool2d(x, bins)
    branches = _run_tails_side_by_side(stages, pooled)
    if branches is None:
        branches = [_apply_tail(s, p, label, i, b) for i, (s, p, b) in enumerate(zip(stages, pooled, bins))]
    return (branches, x_through) if hand_on_x else branches


def fused_pyramid(x: torch.Tensor, stages: Sequence[nn.Sequential], *, align_corners: bool, x_first: bool = True,
                  with_x: bool = True, label: str = "pyramid") -> torch.Tensor:
    """``cat([x] + [interpolate(stage(x), x's size)] ...)`` with the fused ops.

    One multi-bin pooling call, the stage tails on the pooled maps
    (:func:`pyramid_branches`), one upsample-concat call. ``x_first=False``
    puts x last; ``with_x=False`` returns the upsampled branches only.
    """
    if with_x:
        branches, x_cat = pyramid_branches(x, stages, label=label, hand_on_x=True)
    else:
        branches, x_cat = pyramid_branches(x, stages, label=label), None
    return pf.upsample_concat(x_cat, branches, size=tuple(x.shape[-2:]),
                              align_corners=align_corners, x_first=x_first)


def concat_free_conv(conv: nn.Module) -> Optional[str]:
    """None if ``conv`` can be applied without the concatenation
    (``pe.upsample_concat_conv2d``: a plain ``nn.Conv2d``, square odd kernel,
    "same" zero padding, stride 1, dilation 1, groups 1), else why not."""
    if type(conv) is not nn.Conv2d:
        return f"is a {type(conv).__name__}, not an nn.Conv2d"
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 != 1:
        return f"has kernel_size {tuple(k)}, not a square odd kernel"
    if tuple(conv.padding) != (k[0] // 2, k[0] // 2) or conv.padding_mode != "zeros":
        return f"has padding {conv.padding!r} ({conv.padding_mode}), not {k[0] // 2} with zeros"
    if tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        return "has a stride, dilation or groups other than 1"
    return None


def conv_after_concat(conv: nn.Conv2d, x: Optional[torch.Tensor], branches: Sequence[torch.Tensor], *, size=None,
                      align_corners: bool, x_first: bool = True) -> torch.Tensor:
    """``conv(upsample_concat(x, branches, ...))`` without writing the concatenation.

    ``pe.upsample_concat_conv2d`` with ``conv``'s weight and bias: each
    branch's share of the conv applied at the branch's own resolution where
    that is cheaper, then resized and accumulated. A conv that function
    cannot take (:func:`concat_free_conv`) runs over the concatenation.
    """
    if concat_free_conv(conv) is not None:
        return conv(pf.upsample_concat(x, branches, size=size, align_corners=align_corners, x_first=x_first))
    return pf.upsample_concat_conv2d(x, branches, conv.weight, conv.bias, size=size, align_corners=align_corners,
                                     x_first=x_first)


def _module_label(module: nn.Module, attr: str) -> str:
    # convert() sets _pe_name (a plain attribute, so in __dict__) to the qualified
    # name of the replaced module. Read from __dict__: getattr with a default goes
    # through nn.Module.__getattr__, which raises and catches per call.
    return f"{module.__dict__.get('_pe_name') or type(module).__name__}.{attr}"


# --------------------------------------------------------------------------
# hszhao/semseg PPM
# --------------------------------------------------------------------------


class PPM(nn.Module):
    """Pyramid Pooling Module, hszhao/semseg layout, fused.

    Per bin: adaptive average pooling -> 1x1 conv (no bias) -> BatchNorm2d ->
    ReLU, bilinearly upsampled with ``align_corners=True``; returns
    ``cat([x, branch_1, ...], 1)`` with ``in_dim + len(bins) * reduction_dim``
    channels. Same constructor and ``state_dict`` keys as the original
    (``features.{i}.1.weight`` conv, ``features.{i}.2.*`` BatchNorm), so
    replacing the import is the whole migration.
    """

    def __init__(self, in_dim: int, reduction_dim: int, bins: Sequence[int]):
        super().__init__()
        self.features = nn.ModuleList([
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),  # placeholder: records the bin; pooling is fused
                nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False),
                nn.BatchNorm2d(reduction_dim),
                nn.ReLU(inplace=True),
            ) for b in bins
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_pyramid(x, self.features, align_corners=True, x_first=True,
                             label=_module_label(self, "features"))


# --------------------------------------------------------------------------
# Lextal/pspnet-pytorch PSPModule
# --------------------------------------------------------------------------


class PSPModule(nn.Module):
    """PSP module, Lextal/pspnet-pytorch layout, fused.

    Per size: adaptive average pooling -> full-width 1x1 conv without bias
    (``stages.{i}.1.weight``), bilinearly upsampled with
    ``align_corners=False`` (PyTorch's default for ``F.upsample``); the
    concatenation puts ``x`` LAST: ``[stage_1, ..., stage_k, x]``; then the
    biased 1x1 ``bottleneck`` conv to ``out_features`` and a ReLU.

    The blog listing this is documented from reassigns ``x`` inside its loop
    (each stage then pools the previous stage's upsampled output, and the
    result is discarded anyway); this module follows the original repository's
    intent, ``priors = [upsample(stage(x)) for stage in stages] + [x]``.
    """

    def __init__(self, features: int, out_features: int = 1024, sizes: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList([self._make_stage(features, size) for size in sizes])
        self.bottleneck = nn.Conv2d(features * (len(sizes) + 1), out_features, kernel_size=1)
        self.relu = nn.ReLU()

    @staticmethod
    def _make_stage(features: int, size: int) -> nn.Sequential:
        prior = nn.AdaptiveAvgPool2d(output_size=(size, size))  # placeholder: pooling is fused
        conv = nn.Conv2d(features, features, kernel_size=1, bias=False)
        return nn.Sequential(prior, conv)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # the bottleneck conv without the concatenation: each stage's share at its bin's size
        branches = pyramid_branches(feats, self.stages, label=_module_label(self, "stages"))
        return self.relu(conv_after_concat(self.bottleneck, feats, branches, align_corners=False, x_first=False))


# --------------------------------------------------------------------------
# Configurable pyramid pooling (paper / mmsegmentation / smp / CSAIL layouts)
# --------------------------------------------------------------------------

NormSpec = Union[None, str, Callable[[int], nn.Module]]


def _make_norm(norm: NormSpec, channels: int, gn_groups: int) -> Optional[nn.Module]:
    if norm is None or norm is False:
        return None
    if callable(norm) and not isinstance(norm, str):
        return norm(channels)
    name = str(norm).lower()
    if name in ("bn", "batchnorm", "batchnorm2d"):
        return nn.BatchNorm2d(channels)
    if name in ("syncbn", "syncbatchnorm"):
        return nn.SyncBatchNorm(channels)
    if name in ("gn", "groupnorm"):
        if channels % gn_groups:
            raise ValueError(f"norm='gn': {channels} channels are not divisible into gn_groups={gn_groups} groups")
        return nn.GroupNorm(gn_groups, channels)
    raise ValueError(f"norm must be None, 'bn', 'syncbn', 'gn' or a callable(num_channels) -> nn.Module, got {norm!r}")


def _make_act(act) -> Optional[nn.Module]:
    if act is None or act is False:
        return None
    if isinstance(act, str):
        if act.lower() == "relu":
            return nn.ReLU(inplace=True)
        raise ValueError(f"act must be None, 'relu' or a callable() -> nn.Module, got {act!r}")
    return act()


_SAME = object()


class PyramidPooling(nn.Module):
    """One configurable pyramid pooling module reproducing the common layouts.

    Per bin: adaptive average pooling -> 1x1 conv -> norm -> activation, all
    branches bilinearly upsampled to x's size and concatenated with x (first
    or last), optionally followed by an output conv -> norm -> activation
    (``bottleneck``). Pooling and upsample-concat are the fused ops.

    Parameters (keyword-only after ``bins``):

    - ``branch_channels``: channels of each branch (default ``in_channels // len(bins)``).
    - ``norm``: ``None``, ``"bn"``, ``"syncbn"``, ``"gn"`` (``gn_groups`` groups) or a
      callable ``(num_channels) -> nn.Module``; ``act``: ``"relu"``, ``None`` or a callable.
    - ``branch_bias``: conv bias of the branches; default: only without a norm.
    - ``norm_on_1x1``: ``False`` drops the norm (and adds the conv bias) on 1x1 bins,
      as segmentation_models_pytorch does.
    - ``align_corners``, ``x_first``.
    - ``out_channels``: ``None`` returns the concatenation; else a ``bottleneck``
      conv (``out_kernel_size``, "same" padding) to ``out_channels``, with ``out_norm``
      / ``out_act`` / ``out_bias`` (defaults: same as the branches).

    Layout presets (classmethods): :meth:`paper`, :meth:`mmseg`, :meth:`smp`, :meth:`csail`.

    Structure / ``state_dict``: ``branches.{i}`` is ``Sequential(pool placeholder,
    conv, norm-or-Identity, act-or-Identity)``; ``bottleneck`` is
    ``Sequential(conv, norm-or-Identity, act-or-Identity)`` or ``None``.
    BatchNorm on a 1x1 bin in training at batch size 1 raises a ``ValueError``
    naming the module (see the module docstring).
    """

    def __init__(self, in_channels: int, branch_channels: Optional[int] = None, bins: Sequence = (1, 2, 3, 6), *,
                 norm: NormSpec = "bn", act="relu", branch_bias: Optional[bool] = None, norm_on_1x1: bool = True,
                 align_corners: bool = False, x_first: bool = True, out_channels: Optional[int] = None,
                 out_kernel_size: int = 1, out_norm=_SAME, out_act=_SAME, out_bias: Optional[bool] = None,
                 gn_groups: int = 32):
        super().__init__()
        pairs = normalize_bins(bins, "PyramidPooling(): bins")
        if branch_channels is None:
            branch_channels = in_channels // len(pairs)
        if branch_channels <= 0:
            raise ValueError(f"PyramidPooling(): branch_channels must be positive, got {branch_channels}")
        self.in_channels = in_channels
        self.branch_channels = branch_channels
        self.bins = pairs
        self.align_corners = bool(align_corners)
        self.x_first = bool(x_first)
        self.branches = nn.ModuleList()
        for bh, bw in pairs:
            n = None if (bh, bw) == (1, 1) and not norm_on_1x1 else _make_norm(norm, branch_channels, gn_groups)
            bias = (n is None) if branch_bias is None else branch_bias
            self.branches.append(nn.Sequential(
                nn.AdaptiveAvgPool2d((bh, bw)),  # placeholder: pooling is fused
                nn.Conv2d(in_channels, branch_channels, kernel_size=1, bias=bias),
                n if n is not None else nn.Identity(),
                _make_act(act) or nn.Identity(),
            ))
        self.concat_channels = in_channels + len(pairs) * branch_channels
        self.out_channels = out_channels
        if out_channels is None:
            self.bottleneck = None
        else:
            if out_kernel_size % 2 != 1:
                raise ValueError(f"PyramidPooling(): out_kernel_size must be odd, got {out_kernel_size}")
            on = _make_norm(norm if out_norm is _SAME else out_norm, out_channels, gn_groups)
            oa = _make_act(act if out_act is _SAME else out_act)
            self.bottleneck = nn.Sequential(
                nn.Conv2d(self.concat_channels, out_channels, out_kernel_size, padding=out_kernel_size // 2,
                          bias=(on is None) if out_bias is None else out_bias),
                on if on is not None else nn.Identity(),
                oa or nn.Identity(),
            )

    # ---- layout presets -------------------------------------------------

    @classmethod
    def paper(cls, in_channels: int, out_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> "PyramidPooling":
        """The first document's PPM: per bin a biased 1x1 conv to ``in_channels // 4``
        (no norm, no activation), bilinear ``align_corners=True``, concat
        ``[x, b1, b2, b3, b6]``, biased 1x1 output conv (no norm, no activation).
        (The listing upsamples to ``(H, H)``; this uses ``(H, W)``, equal on square inputs.)"""
        return cls(in_channels, in_channels // 4, bins, norm=None, act=None, align_corners=True, x_first=True,
                   out_channels=out_channels, out_kernel_size=1)

    @classmethod
    def mmseg(cls, in_channels: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6), *,
              norm: NormSpec = "bn", align_corners: bool = False) -> "PyramidPooling":
        """mmsegmentation's PSPHead up to its bottleneck: ConvModule branches
        (1x1 conv, bias only without norm, norm, ReLU), ``align_corners=False``, x first,
        3x3 ConvModule bottleneck to ``channels`` (the ``cls_seg`` classifier is not part of it)."""
        return cls(in_channels, channels, pool_scales, norm=norm, act="relu", align_corners=align_corners,
                   x_first=True, out_channels=channels, out_kernel_size=3)

    @classmethod
    def smp(cls, in_channels: int, sizes: Sequence[int] = (1, 2, 3, 6), use_batchnorm: bool = True) -> "PyramidPooling":
        """segmentation_models_pytorch's ``PSPModule`` (decoders/pspnet/decoder.py):
        per size ``Conv2dReLU`` to ``in_channels // len(sizes)`` (1x1 conv, BatchNorm
        unless ``use_batchnorm=False`` or the size is 1, then a biased conv; ReLU),
        ``align_corners=True``, x LAST, no output conv."""
        return cls(in_channels, in_channels // len(sizes), sizes, norm="bn" if use_batchnorm else None, act="relu",
                   norm_on_1x1=False, align_corners=True, x_first=False, out_channels=None)

    @classmethod
    def csail(cls, fc_dim: int = 4096, pool_scales: Sequence[int] = (1, 2, 3, 6), branch_channels: int = 512,
              out_channels: Optional[int] = 512, *, norm: NormSpec = "bn") -> "PyramidPooling":
        """CSAIL semantic-segmentation-pytorch's PPM decoder: 512-channel branches
        (1x1 conv without bias, BatchNorm, ReLU), ``align_corners=False``, x first,
        then ``conv_last``'s 3x3 conv (no bias) + BatchNorm + ReLU to 512
        (its dropout and classifier are not part of it; ``out_channels=None`` drops it)."""
        return cls(fc_dim, branch_channels, pool_scales, norm=norm, act="relu", align_corners=False, x_first=True,
                   out_channels=out_channels, out_kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = _module_label(self, "branches")
        if self.bottleneck is None:
            return fused_pyramid(x, self.branches, align_corners=self.align_corners, x_first=self.x_first, label=label)
        # the bottleneck conv without the concatenation: each branch's share at its bin's size
        branches = pyramid_branches(x, self.branches, label=label)
        out = conv_after_concat(self.bottleneck[0], x, branches, align_corners=self.align_corners,
                                x_first=self.x_first)
        return self.bottleneck[2](self.bottleneck[1](out))

    def extra_repr(self) -> str:
        return (f"bins={[b[0] if b[0] == b[1] else b for b in self.bins]}, align_corners={self.align_corners}, "
                f"x_first={self.x_first}")


# --------------------------------------------------------------------------
# SPPNet spatial pyramid pooling
# --------------------------------------------------------------------------


class SpatialPyramidPooling(nn.Module):
    """SPPNet's spatial pyramid pooling: a fixed-length vector from any input size.

    Pools every level (``levels`` of n x n bins, or (h, w) pairs) and
    concatenates the flattened levels, level by level, channel-major within a
    level: ``(N, C * sum(n * n))``; one ``pyramid_ext.spatial_pyramid_pool`` call.

    ``window``: ``"adaptive"`` (PyTorch's adaptive pooling windows),
    ``"sppnet"`` (the paper's kernel ``ceil(a/n)``, stride ``floor(a/n)``; an
    input size where that does not give n bins raises a ``ValueError`` naming
    the size), or ``"keras_same"`` (TensorFlow ``AveragePooling2D`` with
    pool = stride = ``round(a/n)``, padding 'same', padding excluded; it yields
    ``ceil(a / round(a/n))`` bins, which is not always n, so its length can
    depend on the input size).
    """

    def __init__(self, levels: Sequence = (4, 2, 1), mode: str = "max", window: str = "adaptive"):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"SpatialPyramidPooling(): mode must be 'max' or 'avg', got {mode!r}")
        if window not in WINDOW_POLICIES:
            raise ValueError(f"SpatialPyramidPooling(): window must be one of {WINDOW_POLICIES}, got {window!r}")
        self.levels = normalize_bins(levels, "SpatialPyramidPooling(): levels")
        self.mode = mode
        self.window = window

    def output_features(self, channels: int) -> int:
        """Length of the output vector for ``channels`` input channels (adaptive / sppnet windows)."""
        return channels * sum(bh * bw for bh, bw in self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if export.active():  # name the module in what the export refuses
            try:
                return pf.spatial_pyramid_pool(x, self.levels, mode=self.mode, window=self.window)
            except ValueError as e:
                raise ValueError(f"{type(self).__name__}(levels={self.levels}, window={self.window!r}) cannot be "
                                 f"exported with this example input: {e}") from e
        return pf.spatial_pyramid_pool(x, self.levels, mode=self.mode, window=self.window)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}, window={self.window!r}"


# --------------------------------------------------------------------------
# Pyramid Attention Network: Feature Pyramid Attention
# --------------------------------------------------------------------------


def _conv_bn_elu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ELU(inplace=True))


class FeaturePyramidAttention(nn.Module):
    """Feature Pyramid Attention (Pyramid Attention Network), fused where it pools or resizes.

    Parameter names as in the document's ``PyramidAttention``: ``glob`` (global
    average pool + 1x1 conv), ``down2_1``/``down2_2`` (5x5, stride 2),
    ``down3_1``/``down3_2`` (3x3, stride 2), ``conv1`` (1x1); conv-BN-ELU blocks.
    ``out = conv1(x) * up(down2_2(d2) + up(down3_2(d3))) + glob(x)``, bilinear
    with ``align_corners=True``.

    The listing hard-codes ``scale_factor=16`` for the global branch and
    ``scale_factor=2`` for the pyramid, which only fits 16x16 inputs. Here the
    global branch (1x1) is broadcast over the input size and each upsampling
    targets the size of the map it is combined with, so any input size works;
    on 16x16 inputs this equals the listing. The global pooling is the fused
    pooling op, the upsamplings are ``upsample_concat(None, [t], size=...)``.
    """

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.glob = nn.Sequential(nn.AdaptiveAvgPool2d(1),  # placeholder: pooling is fused
                                  nn.Conv2d(input_dim, output_dim, kernel_size=1, bias=False))
        self.down2_1 = _conv_bn_elu(input_dim, input_dim, 5, stride=2)
        self.down2_2 = _conv_bn_elu(input_dim, output_dim, 5)
        self.down3_1 = _conv_bn_elu(input_dim, input_dim, 3, stride=2)
        self.down3_2 = _conv_bn_elu(input_dim, output_dim, 3)
        self.conv1 = _conv_bn_elu(input_dim, output_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (pooled,) = pf.multi_adaptive_avg_pool2d(x, [1])
        x_glob = self.glob[1](pooled)  # (N, output_dim, 1, 1), broadcast below

        d2 = self.down2_1(x)
        d3 = self.down3_1(d2)
        d2 = self.down2_2(d2)
        d3 = self.down3_2(d3)

        d2 = d2 + pf.upsample_concat(None, [d3], size=tuple(d2.shape[-2:]), align_corners=True)
        d2 = pf.upsample_concat(None, [d2], size=tuple(x.shape[-2:]), align_corners=True)
        return self.conv1(x) * d2 + x_glob


# --------------------------------------------------------------------------
# PSPNet end to end
# --------------------------------------------------------------------------


def _torchvision_resnet(layers: int):
    try:
        from torchvision import models
    except ImportError as e:
        raise ImportError(
            "pyramid_ext.nn.PSPNet needs torchvision for its ResNet backbone: pip install pyramid_ext[models]"
        ) from e
    try:
        return {50: models.resnet50, 101: models.resnet101, 152: models.resnet152}[layers]
    except KeyError:
        raise ValueError(f"PSPNet(): layers must be 50, 101 or 152, got {layers!r}") from None


class PSPNet(nn.Module):
    """PSPNet end to end (the fifth document), with the fused :class:`PPM`.

    Backbone: torchvision ResNet (``layers`` = 50/101/152) with
    ``replace_stride_with_dilation=[False, True, True]`` (output stride 8) and
    ``weights=None`` by default (nothing is downloaded); ``layer0`` = conv1, bn1,
    relu, maxpool. Then the PPM on layer4 (``2048 / len(bins)`` channels per
    bin), the classifier ``cls`` (3x3 conv 512, BN, ReLU, Dropout2d, 1x1 conv to
    ``classes``), the auxiliary head ``aux`` on layer3 (3x3 conv 256 ...), and
    bilinear (``align_corners=True``) upsampling to
    ``int((H - 1) / 8 * zoom_factor + 1)`` when ``zoom_factor != 1``.

    ``forward(x, y=None)``: in training with targets ``y`` returns
    ``(output, main_loss, aux_loss)`` (logits and the criterion on the main and
    auxiliary outputs); otherwise the logits. Needs torchvision
    (``pip install pyramid_ext[models]``).
    """

    def __init__(self, layers: int = 50, bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 classes: int = 2, zoom_factor: int = 8, use_ppm: bool = True,
                 criterion: Optional[nn.Module] = None, weights=None):
        super().__init__()
        factory = _torchvision_resnet(layers)
        if 2048 % len(bins) != 0:
            raise ValueError(f"PSPNet(): 2048 channels must divide evenly among the {len(bins)} bins")
        if classes < 2:
            raise ValueError(f"PSPNet(): classes must be at least 2, got {classes}")
        if zoom_factor not in (1, 2, 4, 8):
            raise ValueError(f"PSPNet(): zoom_factor must be 1, 2, 4 or 8, got {zoom_factor}")
        self.zoom_factor = zoom_factor
        self.use_ppm = use_ppm
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss(ignore_index=255)

        resnet = factory(weights=weights, replace_stride_with_dilation=[False, True, True])
        self.layer0 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

        fea_dim = 2048
        if use_ppm:
            self.ppm = PPM(fea_dim, fea_dim // len(bins), bins)
            fea_dim *= 2
        self.cls = nn.Sequential(
            nn.Conv2d(fea_dim, 512, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(512, classes, kernel_size=1),
        )
        self.aux = nn.Sequential(
            nn.Conv2d(1024, 256, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(256, classes, kernel_size=1),
        )

    def _out_size(self, h: int, w: int) -> Tuple[int, int]:
        # int((h - 1) / 8 * zoom + 1) in integers (zoom divides 8), so a symbolic
        # or traced size stays symbolic (dynamic-size export)
        return (h - 1) * self.zoom_factor // 8 + 1, (w - 1) * self.zoom_factor // 8 + 1

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        h, w = self._out_size(x.shape[-2], x.shape[-1])
        x = self.layer0(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x3 = self.layer3(x)
        x = self.layer4(x3)
        if self.use_ppm:
            # cls[0] (3x3, 4096 -> 512) without the concatenation the PPM would return
            branches = pyramid_branches(x, self.ppm.features, label=_module_label(self, "ppm.features"))
            x = conv_after_concat(self.cls[0], x, branches, align_corners=True, x_first=True)
            for layer in list(self.cls)[1:]:
                x = layer(x)
        else:
            x = self.cls(x)
        if self.zoom_factor != 1:
            x = pf.upsample_concat(None, [x], size=(h, w), align_corners=True)
        if self.training and y is not None:
            aux = self.aux(x3)
            if self.zoom_factor != 1:
                aux = pf.upsample_concat(None, [aux], size=(h, w), align_corners=True)
            return x, self.criterion(x, y), self.criterion(aux, y)
        return x
