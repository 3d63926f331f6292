"""``convert(model)``: swaps the pyramid modules of an existing model for fused ones.

Recognised (exact classes; subclasses, which may change ``forward``, are left alone):

- ``segmentation_models_pytorch.decoders.pspnet.decoder.PSPModule`` (PSPNet's
  ``decoder.psp``) -> :class:`FusedSMPPSPModule`
- ``torchvision.models.segmentation.deeplabv3.ASPPPooling`` (DeepLabV3's image
  pooling branch) -> :class:`FusedASPPPooling`

A replacement holds the very same submodules as the module it replaces, so
parameters, buffers, ``state_dict`` keys, the training flag and hooks registered
on it or its children carry over: a checkpoint saved before loads after, and
the reverse. Neither library is imported here: a class is only looked up when
its module has already been imported (which it has, if the model uses it).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .nn import _bin_of, _module_label, fused_pyramid

__all__ = ["convert", "ConversionError", "ConversionReport", "Replacement", "FusedSMPPSPModule", "FusedASPPPooling"]


class ConversionError(RuntimeError):
    """A fused replacement did not reproduce the original module on ``example_input``."""


# --------------------------------------------------------------------------
# Replacements
# --------------------------------------------------------------------------


class FusedSMPPSPModule(nn.Module):
    """Fused ``segmentation_models_pytorch`` ``PSPModule``: same ``blocks``, same keys.

    Per block: pooling to ``pool_size`` (fused, all sizes in one pass), the
    block's ``Conv2dReLU`` on the pooled map, bilinear ``align_corners=True``;
    output ``cat([block_1, ..., block_k, x], 1)`` (x last) in one
    ``upsample_concat``. ONNX export goes through the ops' export path
    (pyramid_ext.export), like every fused module.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.blocks = original.blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_pyramid(x, [block.pool for block in self.blocks], align_corners=True, x_first=False,
                             label=_module_label(self, "blocks"))


class FusedASPPPooling(nn.Sequential):
    """Fused torchvision ``ASPPPooling``: same children (``0`` pool placeholder,
    ``1`` conv, ``2`` BatchNorm, ``3`` ReLU), same keys; global average pooling
    via the fused pooling op, resize back with ``align_corners=False`` via
    ``upsample_concat``."""

    def __init__(self, original: nn.Sequential):
        super().__init__(*original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_pyramid(x, [self], align_corners=False, with_x=False, label=_module_label(self, "branch"))


def _loaded_class(module_name: str, class_name: str):
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod is not None else None


def _smp_psp(m: nn.Module) -> Optional[str]:
    """None if ``m`` is an smp PSPModule the fused one reproduces, else why not."""
    blocks = getattr(m, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return "has no non-empty 'blocks' ModuleList"
    block_cls = _loaded_class("segmentation_models_pytorch.decoders.pspnet.decoder", "PSPBlock")
    for i, b in enumerate(blocks):
        if block_cls is None or type(b) is not block_cls:
            return f"blocks[{i}] is a {type(b).__name__}, not smp's PSPBlock"
        pool = getattr(b, "pool", None)
        if not isinstance(pool, nn.Sequential) or len(pool) < 2 or not isinstance(pool[0], nn.AdaptiveAvgPool2d):
            return f"blocks[{i}].pool is not Sequential(AdaptiveAvgPool2d, ...)"
        try:
            _bin_of(pool[0])
        except (TypeError, ValueError) as e:
            return f"blocks[{i}]: {e}"
    return None


def _tv_aspp_pooling(m: nn.Module) -> Optional[str]:
    if len(m) < 2 or not isinstance(m[0], nn.AdaptiveAvgPool2d):
        return "is not Sequential(AdaptiveAvgPool2d, ...)"
    try:
        _bin_of(m[0])
    except (TypeError, ValueError) as e:
        return str(e)
    return None


# (module of the class, class name, structural check, replacement factory)
_RECOGNISED: List[Tuple[str, str, Callable[[nn.Module], Optional[str]], Callable[[nn.Module], nn.Module]]] = [
    ("segmentation_models_pytorch.decoders.pspnet.decoder", "PSPModule", _smp_psp, FusedSMPPSPModule),
    ("torchvision.models.segmentation.deeplabv3", "ASPPPooling", _tv_aspp_pooling, FusedASPPPooling),
]


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class Replacement:
    name: str  # qualified name in the model
    old_class: str
    new_class: str
    checked: bool = False  # compared against the original on example_input
    max_abs_error: Optional[float] = None
    output_scale: Optional[float] = None  # largest magnitude of the original's output on example_input


@dataclass
class ConversionReport:
    """What ``convert`` replaced (iterable, ``len``), and what it recognised but left alone."""

    replacements: List[Replacement] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def __len__(self) -> int:
        return len(self.replacements)

    def __iter__(self):
        return iter(self.replacements)

    def __getitem__(self, i) -> Replacement:
        return self.replacements[i]

    @property
    def names(self) -> List[str]:
        return [r.name for r in self.replacements]

    def __str__(self) -> str:
        if not self.replacements and not self.skipped:
            return "convert(): no recognised pyramid module"
        lines = [f"{'module':<32} {'old class':<62} {'new class':<40} check"]
        for r in self.replacements:
            check = f"max abs err {r.max_abs_error:.3g} (output scale {r.output_scale:.3g})" if r.checked else "-"
            lines.append(f"{r.name:<32} {r.old_class:<62} {r.new_class:<40} {check}")
        for name, why in self.skipped:
            lines.append(f"{name:<32} left alone: {why}")
        return "\n".join(lines)


# --------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _carry_over(old: nn.Module, new: nn.Module, name: str) -> None:
    new.train(old.training)
    for attr in _HOOK_DICTS:  # share the dicts, so existing hook handles still remove them
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new._pe_name = name


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _call(model: nn.Module, example_input):
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)


def convert(model: nn.Module, *, example_input=None, rtol: Optional[float] = None) -> ConversionReport:
    """Replaces, in place, the pyramid modules of ``model`` it recognises with fused ones.

    Returns a :class:`ConversionReport` listing each replacement (qualified
    name, old class, new class). Parameters, buffers and ``state_dict`` keys
    are kept (the replacement holds the same submodules). Unrecognised modules
    are left alone.

    ``example_input`` (a tensor, a tuple of positional inputs, or a dict of
    keyword inputs): the model is run once in eval mode on it, the inputs of
    every module to replace are captured, and on each captured input the
    replacement is compared with the original (both in eval mode). If one does
    not match (max abs error above ``rtol`` times the output's largest
    magnitude, at least 1; ``rtol`` defaults by dtype, 1e-4 for float32), every
    replacement of this call is undone and a :class:`ConversionError` naming
    the module is raised. A module the example did not reach is replaced
    unchecked, with a warning. Training flags are restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert(): model must be an nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    found: List[Tuple[str, nn.Module, Callable]] = []
    for name, m in model.named_modules(remove_duplicate=False):
        for mod_name, cls_name, check, factory in _RECOGNISED:
            cls = _loaded_class(mod_name, cls_name)
            if cls is None or type(m) is not cls:
                continue
            why = check(m)
            if why is None and not name:
                why = "the root module cannot be replaced in place (convert a model that contains it)"
            if why is not None:
                report.skipped.append((name or "<root>", f"{_qualname(type(m))} {why}"))
            else:
                found.append((name, m, factory))

    captured: Dict[int, tuple] = {}
    if example_input is not None and found:
        def grab(mod, args, kwargs):
            if id(mod) not in captured:
                captured[id(mod)] = (_detached(args), _detached(kwargs))

        handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for _, m, _ in found]
        flags = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                _call(model, example_input)
        finally:
            for h in handles:
                h.remove()
            for m, t in flags:
                m.training = t

    new_of: Dict[int, nn.Module] = {}
    done: List[Tuple[str, nn.Module]] = []
    try:
        for name, old, factory in found:
            new = new_of.get(id(old))
            if new is None:
                new = factory(old)
                _carry_over(old, new, name)
                new_of[id(old)] = new
            entry = Replacement(name, _qualname(type(old)), _qualname(type(new)))
            if example_input is not None:
                if id(old) in captured:
                    entry.max_abs_error, entry.output_scale = _compare(old, new, captured[id(old)], name, rtol)
                    entry.checked = True
                else:
                    warnings.warn(f"convert(): '{name}' was not called by the model on example_input; "
                                  "it is replaced without a check", RuntimeWarning, stacklevel=2)
            _set(model, name, new)
            done.append((name, old))
            report.replacements.append(entry)
    except BaseException:
        for name, old in reversed(done):
            _set(model, name, old)
        raise
    return report


def _compare(old: nn.Module, new: nn.Module, inputs, name: str, rtol: Optional[float]) -> float:
    args, kwargs = inputs
    mods = list(old.modules()) + [new]
    flags = [(m, m.training) for m in mods]
    try:
        for m in mods:
            m.training = False
        with torch.no_grad():
            ref = old(*args, **kwargs)
            got = new(*args, **kwargs)
    finally:
        for m, t in flags:
            m.training = t
    if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor):
        raise ConversionError(f"convert(): '{name}': expected tensor outputs to compare; the model was left unchanged")
    if ref.shape != got.shape:
        raise ConversionError(f"convert(): the fused replacement of '{name}' ({_qualname(type(old))}) gives shape "
                              f"{tuple(got.shape)}, the original {tuple(ref.shape)}; the model was left unchanged")
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    tol = (rtol if rtol is not None else _tolerance(ref.dtype)) * max(1.0, scale)
    if not err <= tol:  # also catches NaN
        raise ConversionError(f"convert(): the fused replacement of '{name}' ({_qualname(type(old))}) does not match the "
                              f"original on example_input: max abs error {err:.3g} > tolerance {tol:.3g}; "
                              "the model was left unchanged")
    return err, scale
