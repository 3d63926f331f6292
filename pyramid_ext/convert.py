"""``convert(model)``: swaps the pyramid modules and decoder heads of an existing model for fused ones.

Recognised (exact classes; subclasses, which may change ``forward``, are left alone):

- segmentation_models_pytorch: PSPNet's ``PSPDecoder`` -> :class:`ConcatFreeSMPPSPDecoder`
  and its ``PSPModule`` -> :class:`FusedSMPPSPModule`; UPerNet's ``UPerNetDecoder`` ->
  :class:`ConcatFreeSMPUPerNetDecoder` and its ``PSPModule`` -> :class:`ConcatFreeSMPUPerNetPSP`;
  Segformer's ``SegformerDecoder`` -> :class:`ConcatFreeSMPSegformerDecoder`
- transformers: ``UperNetHead`` -> :class:`ConcatFreeUperNetHead`, ``SegformerDecodeHead``
  -> :class:`ConcatFreeSegformerDecodeHead`
- torchvision: DeepLabV3's ``ASPP`` -> :class:`ConcatFreeASPP` and its image pooling branch
  ``ASPPPooling`` -> :class:`FusedASPPPooling`

"Concat-free": where the original upsamples several maps, concatenates them
and applies a conv, the replacement calls ``pe.upsample_concat_conv2d`` with
that conv's weight: each branch's share of the conv is computed at the
branch's own resolution, resized and accumulated, and the concatenation is
never written (forward or backward). The pyramid bins are pooled in one fused
call. Everything else (backbone, lateral and FPN convs, norms, classifier) runs
as before.

A replacement holds the very same submodules (and parameters, buffers) as the
module it replaces, in the same order, so parameters, buffers, ``state_dict``
keys, the training flag and hooks registered on the replaced module carry over:
a checkpoint saved before loads after, and the reverse. Hooks on the convs
whose weights the replacement applies itself (and on a child it computes from
its children, e.g. ``decoder.psp`` of an smp PSPNet) do not fire. None of the
libraries is imported here: a class is only looked up when its module has
already been imported (which it has, if the model uses it).
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import export
from . import functional as pf
from .nn import _bin_of, _module_label, concat_free_conv, conv_after_concat, fused_pyramid, pyramid_branches

__all__ = ["convert", "ConversionError", "ConversionReport", "Replacement", "FusedSMPPSPModule", "FusedASPPPooling",
           "ConcatFreeSMPPSPDecoder", "ConcatFreeSMPUPerNetPSP", "ConcatFreeSMPUPerNetDecoder",
           "ConcatFreeSMPSegformerDecoder", "ConcatFreeUperNetHead", "ConcatFreeSegformerDecodeHead",
           "ConcatFreeASPP"]


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


class _SameChildren(nn.Module):
    """Base of the replacements: holds the original's parameters, buffers and
    children (same objects, same order, hence the same ``state_dict`` keys) and
    the plain attributes named in ``_ATTRS`` that its forward reads."""

    _ATTRS: Tuple[str, ...] = ()

    def __init__(self, original: nn.Module):
        super().__init__()
        for name, p in original._parameters.items():
            self.register_parameter(name, p)
        for name, b in original._buffers.items():
            self.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)
        for name, m in original._modules.items():
            self.add_module(name, m)
        for attr in self._ATTRS:
            setattr(self, attr, getattr(original, attr))


def _conv_norm_act(block: nn.Module, x: Optional[torch.Tensor], branches: Sequence[torch.Tensor], *,
                   align_corners: bool, x_first: bool = True, size=None) -> torch.Tensor:
    """A conv-norm-activation block (smp ``Conv2dReLU``: children 0, 1, 2; transformers
    ``UperNetConvModule``: conv, batch_norm, activation) applied to the concatenation of
    x and the resized branches, without writing it."""
    if isinstance(block, nn.Sequential):
        conv, *rest = list(block)
    else:
        conv, rest = block.conv, [block.batch_norm, block.activation]
    out = conv_after_concat(conv, x, branches, size=size, align_corners=align_corners, x_first=x_first)
    for layer in rest:
        out = layer(out)
    return out


def _as_conv1x1(linear: nn.Linear) -> torch.Tensor:
    return linear.weight[:, :, None, None]


def _project_and_fuse(levels: Sequence[torch.Tensor], projections: Sequence[nn.Linear], fuse: nn.Conv2d):
    """SegFormer's ``fuse(cat[resize(proj_k(level_k)) ...])`` as arguments of
    ``upsample_concat_conv2d``: (branches, weight, bias), in the concatenation order.

    ``proj_k`` (a per-pixel Linear) and its slice ``F_k`` of the 1x1 ``fuse`` compose
    into one linear map, and resizing commutes with both (bilinear weights sum to
    one, so the bias passes through), so a level either enters as itself with the
    folded weight ``F_k @ W_k`` and bias ``F_k @ b_k`` (cheaper when the level has
    fewer channels than pixels: the fold costs Cout*D*C_k, the conv C_k*Cout*h*w)
    or as ``proj_k(level_k)`` at its own resolution with the weight ``F_k``. The
    fold is computed from the held weights on every call, so training updates both.
    """
    d = projections[0].out_features
    w_fuse = fuse.weight.flatten(1)  # (Cout, K * D)
    cout = w_fuse.shape[0]
    branches, weights = [], []
    bias = fuse.bias
    for k, (level, proj) in enumerate(zip(levels, projections)):
        f_k = w_fuse[:, k * d:(k + 1) * d]
        c_k, h, w = level.shape[1], level.shape[-2], level.shape[-1]
        fold = True
        if isinstance(h, int) and isinstance(w, int):  # a traced size: either way computes the same
            fold = cout * d * c_k + c_k * cout * h * w <= c_k * d * h * w + d * cout * h * w
        if fold:
            branches.append(level)
            weights.append(f_k @ proj.weight)
            if proj.bias is not None:
                b_k = f_k @ proj.bias
                bias = b_k if bias is None else bias + b_k
        else:
            branches.append(F.conv2d(level, _as_conv1x1(proj), proj.bias))
            weights.append(f_k)
    if _original_is_channels_last(levels, d):
        # the original's projected maps are transposed views (channels_last strides),
        # which its resize, concatenation and conv keep: give the result that layout
        # too (the branches are small; dropout after the head then draws the same mask)
        branches = [t.contiguous(memory_format=torch.channels_last) for t in branches]
    return branches, torch.cat(weights, 1)[:, :, None, None], bias


def _original_is_channels_last(levels: Sequence[torch.Tensor], d: int) -> bool:
    """Whether SegFormer's concatenation of the resized projected levels is channels_last:
    each projected level, (N, h*w, D) transposed to (N, D, h, w), has channels_last
    strides, unambiguous when D > 1 and h*w > 1; the resize and the concatenation
    keep a layout all inputs share. Traced sizes: left as they are."""
    sizes = [(t.shape[-2], t.shape[-1]) for t in levels]
    if not all(isinstance(v, int) for hw in sizes for v in hw):
        return False
    return d > 1 and all(h * w > 1 for h, w in sizes)


# ---- segmentation_models_pytorch -----------------------------------------


class ConcatFreeSMPPSPDecoder(_SameChildren):
    """smp PSPNet's ``PSPDecoder`` (children ``psp``, ``conv``, ``dropout``): the
    pyramid of ``psp.blocks`` pooled in one call, then ``conv`` (1x1 Conv2dReLU over
    ``[block_1, ..., block_k, x]``, ``align_corners=True``) without the concatenation."""

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        branches = pyramid_branches(x, [b.pool for b in self.psp.blocks], label=_module_label(self, "psp.blocks"))
        out = _conv_norm_act(self.conv, x, branches, align_corners=True, x_first=False)
        return self.dropout(out)


class ConcatFreeSMPUPerNetPSP(_SameChildren):
    """smp UPerNet's ``PSPModule`` (``blocks``, ``out_conv``): ``out_conv`` (3x3
    Conv2dReLU over ``[x, block_1, ...]``, ``align_corners=False``) without the concatenation."""

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        branches = pyramid_branches(feature, self.blocks, label=_module_label(self, "blocks"))
        return _conv_norm_act(self.out_conv, feature, branches, align_corners=False)


class ConcatFreeSMPUPerNetDecoder(_SameChildren):
    """smp ``UPerNetDecoder``: as the original up to the FPN outputs, then
    ``fusion_block`` (3x3 Conv2dReLU over the four levels resized to 1/4,
    finest first) without the concatenation."""

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        features = features[2:]
        features = [norm(f) for norm, f in zip(self.feature_norms, features)] + features[len(self.feature_norms):]
        psp_out = self.psp(features[-1])
        fpn_lateral_features = features[:-1][::-1]
        fpn_features = [psp_out]
        for i, block in enumerate(self.fpn_lateral_blocks):
            fpn_features.append(block(fpn_features[-1], fpn_lateral_features[i]))
        for i, conv_block in enumerate(self.fpn_conv_blocks, start=1):
            fpn_features[i] = conv_block(fpn_features[i])
        # original: fusion_block(cat(resize(f) for f in fpn_features[::-1])); the finest
        # level is at the target size (its resize is the identity)
        finest, *coarser = fpn_features[::-1]
        return _conv_norm_act(self.fusion_block, finest, coarser, align_corners=False)


class ConcatFreeSMPSegformerDecoder(_SameChildren):
    """smp ``SegformerDecoder`` (``mlp_stage``, ``fuse_stage``): each level's MLP
    and its slice of ``fuse_stage``'s 1x1 conv folded where cheaper (see
    ``_project_and_fuse``), the levels accumulated at 1/4 without the concatenation."""

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        target_size = [dim // 4 for dim in features[0].shape[2:]]
        features = features[2:] if features[1].size(1) == 0 else features[1:]
        features = features[::-1]
        branches, weight, bias = _project_and_fuse(features, [m.linear for m in self.mlp_stage], self.fuse_stage[0])
        out = pf.upsample_concat_conv2d(None, branches, weight, bias, size=tuple(target_size), align_corners=False)
        for layer in list(self.fuse_stage)[1:]:
            out = layer(out)
        return out


# ---- transformers ----------------------------------------------------------


class ConcatFreeUperNetHead(_SameChildren):
    """transformers ``UperNetHead``: ``bottleneck`` (3x3 over ``[x, psp branches]``)
    and ``fpn_bottleneck`` (3x3 over the four FPN levels resized to the finest)
    without their concatenations, the pyramid pooled in one call; lateral convs,
    top-down path, ``fpn_convs`` and ``classifier`` as the original."""

    _ATTRS = ("config", "pool_scales", "in_channels", "channels", "align_corners")

    def psp_forward(self, inputs):
        x = inputs[-1]
        stages = [block.layers for block in self.psp_modules.blocks]
        branches = pyramid_branches(x, stages, label=_module_label(self, "psp_modules"))
        return _conv_norm_act(self.bottleneck, x, branches, align_corners=self.psp_modules.align_corners)

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        laterals = [lateral_conv(encoder_hidden_states[i]) for i, lateral_conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(encoder_hidden_states))
        used_backbone_levels = len(laterals)
        for i in range(used_backbone_levels - 1, 0, -1):
            prev_shape = laterals[i - 1].shape[2:]
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=prev_shape, mode="bilinear", align_corners=self.align_corners)
        fpn_outs = [self.fpn_convs[i](laterals[i]) for i in range(used_backbone_levels - 1)]
        fpn_outs.append(laterals[-1])
        out = _conv_norm_act(self.fpn_bottleneck, fpn_outs[0], fpn_outs[1:], align_corners=self.align_corners)
        return self.classifier(out)


class ConcatFreeSegformerDecodeHead(_SameChildren):
    """transformers ``SegformerDecodeHead``: each level's ``linear_projections``
    MLP and its slice of ``linear_fuse`` folded where cheaper (see
    ``_project_and_fuse``), the levels accumulated at the finest level's size
    without the concatenation (nor the transposed copies the original resizes)."""

    _ATTRS = ("config",)

    def forward(self, encoder_hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        batch_size = encoder_hidden_states[-1].shape[0]
        levels = []
        for state in encoder_hidden_states:
            if self.config.reshape_last_stage is False and state.ndim == 3:
                height = width = int(math.sqrt(state.shape[-1]))
                state = state.reshape(batch_size, height, width, -1).permute(0, 3, 1, 2).contiguous()
            levels.append(state)
        # the original concatenates the resized levels last first
        projections = [m.proj for m in self.linear_projections]
        branches, weight, bias = _project_and_fuse(levels[::-1], projections[::-1], self.linear_fuse)
        out = pf.upsample_concat_conv2d(None, branches, weight, bias, size=tuple(encoder_hidden_states[0].shape[2:]),
                                        align_corners=False)
        out = self.dropout(self.activation(self.batch_norm(out)))
        return self.classifier(out)


# ---- torchvision ------------------------------------------------------------


class ConcatFreeASPP(_SameChildren):
    """torchvision ``ASPP`` (``convs``, ``project``): the full-resolution branches
    and the image pooling branch (kept at 1x1: its share of ``project``'s 1x1
    conv is a per-sample, per-channel constant) go into ``project`` without the
    concatenation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *full, pooling = list(self.convs)
        res = [conv(x) for conv in full]
        (pooled,) = pyramid_branches(x, [pooling], label=_module_label(self, f"convs.{len(full)}"))
        out = _accumulate_1x1(self.project[0], res, pooled)
        if out is None:
            out = conv_after_concat(self.project[0], None, res + [pooled], size=tuple(x.shape[-2:]),
                                    align_corners=False)
        for layer in list(self.project)[1:]:
            out = layer(out)
        return out


def _accumulate_1x1(conv: nn.Conv2d, full: Sequence[torch.Tensor], pooled: torch.Tensor) -> Optional[torch.Tensor]:
    """``conv(cat[full..., resize(pooled)])`` for a 1x1 ``conv``, full-resolution NCHW
    maps and a 1x1 ``pooled`` map, as one accumulating batched GEMM per branch.

    The pooled branch's share (and the bias) is a per-sample, per-channel
    constant (bilinear resizing of a 1x1 map is that value everywhere); it starts
    the sum, and each full-resolution branch's share is added in place
    (``baddbmm_``), so neither the concatenation nor per-branch outputs are
    written. Measured faster than the concatenation on CPU (README). None
    where this does not apply (another kernel, channels_last, ONNX export:
    there ``upsample_concat_conv2d`` takes over).
    """
    if tuple(conv.kernel_size) != (1, 1) or concat_free_conv(conv) is not None or export.active():
        return None
    if tuple(pooled.shape[-2:]) != (1, 1) or not all(t.is_contiguous() for t in full):
        return None
    n, _, h, w = full[0].shape
    weight = conv.weight.flatten(1)  # (Cout, Cin)
    if any(t.dtype != weight.dtype for t in list(full) + [pooled]):
        return None
    offset = 0
    parts = []
    for t in full:
        parts.append(weight[:, offset:offset + t.shape[1]])
        offset += t.shape[1]
    w_pool = weight[:, offset:]
    out = torch.matmul(w_pool, pooled.reshape(n, -1, 1))  # (N, Cout, 1)
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, 1)
    out = out.expand(n, weight.shape[0], h * w)
    for t, w_t in zip(full, parts):
        w_b = w_t.expand(n, -1, -1)
        out = torch.baddbmm(out, w_b, t.reshape(n, t.shape[1], h * w)) if out.stride(-1) == 0 \
            else out.baddbmm_(w_b, t.reshape(n, t.shape[1], h * w))
    return out.view(n, -1, h, w)


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


def _stage_check(stage, label: str) -> Optional[str]:
    """A pyramid stage: indexable, [0] an AdaptiveAvgPool2d with a fixed bin, then the layers."""
    try:
        first, n = stage[0], len(stage)
    except (TypeError, IndexError, KeyError):
        return f"{label} is not a sequence of layers"
    if n < 2 or not isinstance(first, nn.AdaptiveAvgPool2d):
        return f"{label} is not (AdaptiveAvgPool2d, layers ...)"
    try:
        _bin_of(first)
    except (TypeError, ValueError) as e:
        return f"{label}: {e}"
    return None


def _first_conv(block, label: str) -> Optional[str]:
    """``block`` is conv-norm-act: a Sequential starting with an nn.Conv2d, or a module with ``.conv``."""
    conv = block[0] if isinstance(block, nn.Sequential) and len(block) else getattr(block, "conv", None)
    if type(conv) is not nn.Conv2d:
        return f"{label} does not start with an nn.Conv2d"
    if not isinstance(block, nn.Sequential) and not all(hasattr(block, a) for a in ("batch_norm", "activation")):
        return f"{label} is not conv, batch_norm, activation"
    return None


def _first_error(*checks) -> Optional[str]:
    return next((c for c in checks if c is not None), None)


def _smp_psp_decoder(m: nn.Module) -> Optional[str]:
    psp = getattr(m, "psp", None)
    if type(psp) is not _loaded_class("segmentation_models_pytorch.decoders.pspnet.decoder", "PSPModule"):
        return "has no smp PSPModule 'psp'"
    return _first_error(_smp_psp(psp), _first_conv(getattr(m, "conv", None), "conv"),
                        None if isinstance(getattr(m, "dropout", None), nn.Module) else "has no 'dropout'")


def _smp_upernet_psp(m: nn.Module) -> Optional[str]:
    blocks = getattr(m, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return "has no non-empty 'blocks' ModuleList"
    return _first_error(*(_stage_check(b, f"blocks[{i}]") for i, b in enumerate(blocks)),
                        _first_conv(getattr(m, "out_conv", None), "out_conv"))


def _smp_upernet_decoder(m: nn.Module) -> Optional[str]:
    for attr in ("feature_norms", "fpn_lateral_blocks", "fpn_conv_blocks"):
        if not isinstance(getattr(m, attr, None), nn.ModuleList):
            return f"has no ModuleList '{attr}'"
    if not isinstance(getattr(m, "psp", None), nn.Module):
        return "has no 'psp'"
    return _first_conv(getattr(m, "fusion_block", None), "fusion_block")


def _linear_fuse(projections, fuse, label: str) -> Optional[str]:
    if len(projections) == 0 or not all(type(p) is nn.Linear for p in projections):
        return "its per-level projections are not nn.Linear"
    d = projections[0].out_features
    if any(p.out_features != d for p in projections):
        return "its per-level projections differ in width"
    if type(fuse) is not nn.Conv2d or tuple(fuse.kernel_size) != (1, 1) or fuse.groups != 1 \
            or tuple(fuse.stride) != (1, 1) or tuple(fuse.padding) != (0, 0) or fuse.in_channels != d * len(projections):
        return f"{label} is not a 1x1 conv over the {len(projections)} projected levels"
    return None


def _smp_segformer_decoder(m: nn.Module) -> Optional[str]:
    stages, fuse = getattr(m, "mlp_stage", None), getattr(m, "fuse_stage", None)
    if not isinstance(stages, nn.ModuleList) or not isinstance(fuse, nn.Sequential) or len(fuse) == 0:
        return "has no 'mlp_stage' ModuleList and 'fuse_stage' Sequential"
    return _linear_fuse([getattr(s, "linear", None) for s in stages], fuse[0], "fuse_stage[0]")


def _hf_upernet_head(m: nn.Module) -> Optional[str]:
    blocks = getattr(getattr(m, "psp_modules", None), "blocks", None)
    if not isinstance(blocks, list) or not blocks:
        return "has no psp_modules.blocks"
    for attr in ("lateral_convs", "fpn_convs"):
        if not isinstance(getattr(m, attr, None), nn.ModuleList):
            return f"has no ModuleList '{attr}'"
    return _first_error(*(_stage_check(getattr(b, "layers", None), f"psp_modules.blocks[{i}].layers")
                          for i, b in enumerate(blocks)),
                        _first_conv(getattr(m, "bottleneck", None), "bottleneck"),
                        _first_conv(getattr(m, "fpn_bottleneck", None), "fpn_bottleneck"))


def _hf_segformer_head(m: nn.Module) -> Optional[str]:
    projections = getattr(m, "linear_projections", None)
    if not isinstance(projections, nn.ModuleList):
        return "has no 'linear_projections'"
    return _linear_fuse([getattr(p, "proj", None) for p in projections], getattr(m, "linear_fuse", None),
                        "linear_fuse")


def _tv_aspp(m: nn.Module) -> Optional[str]:
    convs, project = getattr(m, "convs", None), getattr(m, "project", None)
    if not isinstance(convs, nn.ModuleList) or len(convs) < 2:
        return "has no 'convs' ModuleList"
    pooling_classes = (_loaded_class("torchvision.models.segmentation.deeplabv3", "ASPPPooling"), FusedASPPPooling)
    if type(convs[-1]) not in pooling_classes:
        return f"convs[{len(convs) - 1}] is a {type(convs[-1]).__name__}, not the ASPPPooling branch"
    why = _tv_aspp_pooling(convs[-1])
    if why is not None:
        return f"convs[{len(convs) - 1}] {why}"
    if not isinstance(project, nn.Sequential) or len(project) == 0 or type(project[0]) is not nn.Conv2d:
        return "project does not start with an nn.Conv2d"
    return None


_SMP = "segmentation_models_pytorch.decoders"
# (module of the class, class name, structural check, replacement factory); a
# parent comes before the children it contains (named_modules' order), so a
# child replaced too is set on the parent's replacement.
_RECOGNISED: List[Tuple[str, str, Callable[[nn.Module], Optional[str]], Callable[[nn.Module], nn.Module]]] = [
    (f"{_SMP}.pspnet.decoder", "PSPDecoder", _smp_psp_decoder, ConcatFreeSMPPSPDecoder),
    (f"{_SMP}.pspnet.decoder", "PSPModule", _smp_psp, FusedSMPPSPModule),
    (f"{_SMP}.upernet.decoder", "UPerNetDecoder", _smp_upernet_decoder, ConcatFreeSMPUPerNetDecoder),
    (f"{_SMP}.upernet.decoder", "PSPModule", _smp_upernet_psp, ConcatFreeSMPUPerNetPSP),
    (f"{_SMP}.segformer.decoder", "SegformerDecoder", _smp_segformer_decoder, ConcatFreeSMPSegformerDecoder),
    ("transformers.models.upernet.modeling_upernet", "UperNetHead", _hf_upernet_head, ConcatFreeUperNetHead),
    ("transformers.models.segformer.modeling_segformer", "SegformerDecodeHead", _hf_segformer_head,
     ConcatFreeSegformerDecodeHead),
    ("torchvision.models.segmentation.deeplabv3", "ASPP", _tv_aspp, ConcatFreeASPP),
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
