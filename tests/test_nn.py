"""pyramid_ext.nn against plain-PyTorch references written from the source documents.

Each reference below is written here from the documents' semantics (bins,
where norm/activation sit, align_corners, concat order) with
nn.AdaptiveAvgPool2d / F.interpolate / torch.cat; the same weights are loaded
into reference and fused module and outputs and gradients compared, in train
and eval mode, on every backend available for CPU tensors.
"""
import copy
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyramid_ext as pe
from pyramid_ext.nn import FeaturePyramidAttention, PPM, PSPModule, PyramidPooling, SpatialPyramidPooling

from ._helpers import keras_same_avg as ref_keras_same_avg  # document 001's AveragePooling2D(padding='same')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_SMP = importlib.util.find_spec("segmentation_models_pytorch") is not None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def backend(backend):
    """conftest's compiled CPU backend (a missing one skips, or fails under
    PYRAMID_EXT_REQUIRE_CPP=1), selected for the whole test. The torch
    backend would compare F.adaptive_avg_pool2d with itself here."""
    with pe.use_backend(backend):
        yield backend


@pytest.fixture
def any_backend(any_backend):
    """Compiled and pure PyTorch, for the window policies whose torch-backend
    code is its own (not F.adaptive_*), selected for the whole test."""
    with pe.use_backend(any_backend):
        yield any_backend


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def close(got, ref, rel=1e-5, what="output", slack=0.0):
    """max |got - ref| within rel times the reference's scale (plus ``slack``)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= max(rel * scale, slack) + 1e-7, f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"


def randomize(m: nn.Module, seed=0):
    """Random weights and BatchNorm statistics, so eval mode is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.dtype == torch.long:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.3 if t.dim() > 1 else 0.5))
    return m


def copy_state(src: nn.Module, dst: nn.Module):
    """Copies src's parameters and buffers into dst in order (names may differ)."""
    a, b = list(src.state_dict().values()), list(dst.state_dict().values())
    assert len(a) == len(b)
    with torch.no_grad():
        for s, d in zip(a, b):
            assert s.shape == d.shape
            d.copy_(s)


def _run(m, x, g, train):
    m.train(train)
    m.zero_grad()
    xi = x.detach().clone().requires_grad_(True)
    out = m(xi)
    g = torch.randn_like(out) if g is None else g.to(out.dtype)
    out.backward(g)
    tensors = [out.detach(), xi.grad] + [p.grad for p in m.parameters()]
    tensors += [b for b in m.buffers() if b.dtype != torch.long]
    return tensors, g


def compare(fused, ref, x, *, train, rel=1e-5):
    """Output, input gradient, parameter gradients and buffers of fused vs ref.

    Each tensor must agree within ``rel`` times its scale. Where the fp32
    reference itself is less accurate than that (BatchNorm backward over a
    1x1 bin and a batch of two is ill-conditioned), the bound is four times the
    reference's own error against an fp64 run of the same reference.
    """
    ref64 = copy.deepcopy(ref).double()
    want, g = _run(ref, x, None, train)
    got, _ = _run(fused, x, g, train)
    truth, _ = _run(ref64, x.double(), g, train)
    names = ["output", "input grad"] + [f"grad of {n}" for n, _ in fused.named_parameters()]
    names += [f"buffer {n}" for n, b in fused.named_buffers() if b.dtype != torch.long]
    assert len(got) == len(want) == len(names)
    for name, a, b, t in zip(names, got, want, truth):
        ref_err = (b.double() - t).abs().max().item()
        close(a, b, rel, name, slack=4 * ref_err)


# --------------------------------------------------------------------------
# references, from the documents
# --------------------------------------------------------------------------


class RefPPM(nn.Module):
    """hszhao/semseg PPM (documents 001 and 004)."""

    def __init__(self, in_dim, reduction_dim, bins):
        super().__init__()
        self.features = nn.ModuleList([nn.Sequential(
            nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
            nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True)) for b in bins])

    def forward(self, x):
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), x.shape[2:], mode="bilinear", align_corners=True))
        return torch.cat(out, 1)


class RefLextal(nn.Module):
    """Lextal/pspnet-pytorch PSPModule (document 001's "old pytorch", the repository's intent)."""

    def __init__(self, features, out_features=1024, sizes=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d((s, s)),
                                                   nn.Conv2d(features, features, 1, bias=False)) for s in sizes])
        self.bottleneck = nn.Conv2d(features * (len(sizes) + 1), out_features, 1)
        self.relu = nn.ReLU()

    def forward(self, feats):
        h, w = feats.shape[2:]
        priors = [F.interpolate(s(feats), size=(h, w), mode="bilinear", align_corners=False)
                  for s in self.stages] + [feats]
        return self.relu(self.bottleneck(torch.cat(priors, 1)))


class RefPaper(nn.Module):
    """Document 000's PPM: biased 1x1 convs to C/4, no norm, align_corners=True, 1x1 out conv."""

    def __init__(self, inchannel, outchannel):
        super().__init__()
        inter = int(inchannel / 4)
        self.conv1 = nn.Conv2d(inchannel, inter, 1)
        self.conv2 = nn.Conv2d(inchannel, inter, 1)
        self.conv3 = nn.Conv2d(inchannel, inter, 1)
        self.conv4 = nn.Conv2d(inchannel, inter, 1)
        self.out = nn.Conv2d(inchannel * 2, outchannel, 1)

    def forward(self, x):
        size = x.shape[2]  # the listing upsamples to size[0] (square inputs)
        outs = [conv(F.adaptive_avg_pool2d(x, b)) for conv, b in
                ((self.conv1, 1), (self.conv2, 2), (self.conv3, 3), (self.conv4, 6))]
        ups = [F.interpolate(o, size, mode="bilinear", align_corners=True) for o in outs]
        return self.out(torch.cat([x] + ups, 1))


class RefConvModule(nn.Module):
    """mmcv ConvModule: conv (bias only without norm) -> norm -> ReLU."""

    def __init__(self, cin, cout, k, norm=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class RefMMSeg(nn.Module):
    """mmsegmentation PSPHead up to the bottleneck (PPM of ConvModules, align_corners=False, 3x3 bottleneck)."""

    def __init__(self, in_channels, channels, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.psp_modules = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), RefConvModule(in_channels, channels, 1))
                                          for s in pool_scales])
        self.bottleneck = RefConvModule(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x):
        outs = [x] + [F.interpolate(p(x), size=x.shape[2:], mode="bilinear", align_corners=False)
                      for p in self.psp_modules]
        return self.bottleneck(torch.cat(outs, 1))


class RefSMP(nn.Module):
    """segmentation_models_pytorch PSPModule: Conv2dReLU blocks (no BN on size 1), align_corners=True, x last."""

    def __init__(self, in_channels, sizes=(1, 2, 3, 6), use_batchnorm=True):
        super().__init__()
        out = in_channels // len(sizes)
        self.blocks = nn.ModuleList()
        for s in sizes:
            bn = use_batchnorm and s != 1
            self.blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(in_channels, out, 1, bias=not bn),
                                             nn.BatchNorm2d(out) if bn else nn.Identity(), nn.ReLU(inplace=True)))

    def forward(self, x):
        xs = [F.interpolate(b(x), size=x.shape[2:], mode="bilinear", align_corners=True) for b in self.blocks]
        return torch.cat(xs + [x], 1)


class RefCSAIL(nn.Module):
    """CSAIL semantic-segmentation-pytorch PPM: 512-channel branches (BN, ReLU), align_corners=False,
    conv_last's 3x3 conv + BN + ReLU (channel counts are parameters here, to keep tests small)."""

    def __init__(self, fc_dim=4096, pool_scales=(1, 2, 3, 6), branch=512, out=512):
        super().__init__()
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(fc_dim, branch, 1, bias=False),
                                                nn.BatchNorm2d(branch), nn.ReLU(inplace=True)) for s in pool_scales])
        self.conv_last = nn.Sequential(nn.Conv2d(fc_dim + len(pool_scales) * branch, out, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(out), nn.ReLU(inplace=True))

    def forward(self, conv5):
        size = conv5.shape[2:]
        outs = [conv5] + [F.interpolate(p(conv5), size, mode="bilinear", align_corners=False) for p in self.ppm]
        return self.conv_last(torch.cat(outs, 1))


class RefGeneric(nn.Module):
    """Pool -> conv -> norm -> ReLU branches with a given norm factory, for the norm options."""

    def __init__(self, cin, cb, bins, norm, align_corners, x_first):
        super().__init__()
        self.bins, self.ac, self.x_first = bins, align_corners, x_first
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(cin, cb, 1, bias=norm is None),
                                                     norm(cb) if norm else nn.Identity()) for _ in bins])

    def forward(self, x):
        ups = [F.interpolate(F.relu(br(F.adaptive_avg_pool2d(x, b))), x.shape[2:], mode="bilinear",
                             align_corners=self.ac) for b, br in zip(self.bins, self.branches)]
        return torch.cat([x] + ups if self.x_first else ups + [x], 1)


class RefPyramidAttention(nn.Module):
    """Document 003's PyramidAttention; `general=True` resizes to the target map's size instead of
    the listing's fixed scale factors (16 for the global branch, 2 in the pyramid)."""

    def __init__(self, input_dim, output_dim, general=False):
        super().__init__()
        self.general = general

        def cbe(cin, cout, k, s=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride=s, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                                 nn.ELU(True))

        self.glob = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(input_dim, output_dim, 1, bias=False))
        self.down2_1 = cbe(input_dim, input_dim, 5, 2)
        self.down2_2 = cbe(input_dim, output_dim, 5)
        self.down3_1 = cbe(input_dim, input_dim, 3, 2)
        self.down3_2 = cbe(input_dim, output_dim, 3)
        self.conv1 = cbe(input_dim, output_dim, 1)

    def up(self, t, factor, like):
        if self.general:
            return F.interpolate(t, size=like.shape[2:], mode="bilinear", align_corners=True)
        return F.interpolate(t, scale_factor=factor, mode="bilinear", align_corners=True)

    def forward(self, x):
        x_glob = self.up(self.glob(x), 16, x)
        d2 = self.down2_1(x)
        d3 = self.down3_1(d2)
        d2 = self.down2_2(d2)
        d3 = self.down3_2(d3)
        d2 = d2 + self.up(d3, 2, d2)
        d2 = self.up(d2, 2, x)
        return self.conv1(x) * d2 + x_glob


# --------------------------------------------------------------------------
# PPM, PSPModule
# --------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(2, 8, 13, 11), (3, 8, 6, 6)])
def test_ppm_matches_semseg(backend, train, shape):
    ref = randomize(RefPPM(8, 3, [1, 2, 3, 6]))
    fused = PPM(8, 3, [1, 2, 3, 6])
    fused.load_state_dict(ref.state_dict())  # same keys: the migration is the import
    compare(fused, ref, torch.randn(*shape), train=train)


def test_ppm_state_dict_round_trip():
    ref = randomize(RefPPM(6, 2, (1, 3)))
    fused = PPM(6, 2, (1, 3))
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert "features.1.1.weight" in fused.state_dict() and "features.1.2.running_var" in fused.state_dict()
    fused.load_state_dict(ref.state_dict(), strict=True)
    back = RefPPM(6, 2, (1, 3))
    back.load_state_dict(fused.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_ppm_channels_last_and_unusual_bins(backend):
    ref = randomize(RefPPM(4, 2, [1, 4, 7]))
    fused = PPM(4, 2, [1, 4, 7])
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 9).contiguous(memory_format=torch.channels_last)  # bins larger than the input too
    compare(fused, ref, x, train=True)
    compare(fused, ref, x, train=False)


@pytest.mark.parametrize("train", [True, False])
def test_psp_module_matches_lextal(backend, train):
    ref = randomize(RefLextal(4, out_features=6, sizes=(1, 2, 3, 6)))
    fused = PSPModule(4, out_features=6, sizes=(1, 2, 3, 6))
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert "stages.0.1.weight" in fused.state_dict() and "bottleneck.bias" in fused.state_dict()
    fused.load_state_dict(ref.state_dict())
    compare(fused, ref, torch.randn(2, 4, 10, 7), train=train)
    back = RefLextal(4, out_features=6)
    back.load_state_dict(fused.state_dict(), strict=True)


# --------------------------------------------------------------------------
# PyramidPooling layouts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_pyramid_pooling_paper(backend, train):
    ref = randomize(RefPaper(8, 5))
    fused = PyramidPooling.paper(8, 5)
    copy_state(ref, fused)
    compare(fused, ref, torch.randn(2, 8, 13, 13), train=train)


@pytest.mark.parametrize("train", [True, False])
def test_pyramid_pooling_mmseg(backend, train):
    ref = randomize(RefMMSeg(6, 4, (1, 2, 3, 6)))
    fused = PyramidPooling.mmseg(6, 4, (1, 2, 3, 6))
    copy_state(ref, fused)
    compare(fused, ref, torch.randn(2, 6, 9, 12), train=train)


@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_pyramid_pooling_smp(backend, train, use_bn):
    ref = randomize(RefSMP(8, (1, 2, 3, 6), use_batchnorm=use_bn))
    fused = PyramidPooling.smp(8, (1, 2, 3, 6), use_batchnorm=use_bn)
    copy_state(ref, fused)
    compare(fused, ref, torch.randn(2, 8, 11, 10), train=train)


@pytest.mark.skipif(not HAS_SMP, reason="segmentation_models_pytorch is not installed")
@pytest.mark.parametrize("train", [True, False])
def test_pyramid_pooling_smp_matches_installed_smp(backend, train):
    from segmentation_models_pytorch.decoders.pspnet.decoder import PSPModule as SMPPSPModule

    ref = randomize(SMPPSPModule(8, (1, 2, 3, 6), use_norm="batchnorm"))
    fused = PyramidPooling.smp(8, (1, 2, 3, 6))
    copy_state(ref, fused)
    compare(fused, ref, torch.randn(2, 8, 11, 10), train=train)
    # batch size 1 trains: smp has no BatchNorm on the 1x1 bin
    compare(fused, ref, torch.randn(1, 8, 7, 7), train=True)


@pytest.mark.parametrize("train", [True, False])
def test_pyramid_pooling_csail(backend, train):
    assert PyramidPooling.csail(fc_dim=16, out_channels=None).branch_channels == 512  # CSAIL's width
    ref = randomize(RefCSAIL(fc_dim=6, branch=3, out=5))
    fused = PyramidPooling.csail(fc_dim=6, branch_channels=3, out_channels=5)
    copy_state(ref, fused)
    compare(fused, ref, torch.randn(2, 6, 9, 9), train=train)


@pytest.mark.parametrize("norm,factory", [
    (None, None),
    ("gn", lambda c: nn.GroupNorm(2, c)),
    ("syncbn", nn.BatchNorm2d),  # SyncBatchNorm without a process group computes BatchNorm
    (lambda c: nn.InstanceNorm2d(c, affine=True), lambda c: nn.InstanceNorm2d(c, affine=True)),
])
@pytest.mark.parametrize("x_first,align_corners", [(True, False), (False, True)])
def test_pyramid_pooling_norm_options(backend, norm, factory, x_first, align_corners):
    bins = (2, 3, 6) if norm is not None and not isinstance(norm, str) else (1, 2, 3, 6)
    ref = randomize(RefGeneric(6, 4, bins, factory, align_corners, x_first))
    fused = PyramidPooling(6, 4, bins, norm=norm, gn_groups=2, align_corners=align_corners, x_first=x_first)
    if norm == "syncbn":
        assert isinstance(fused.branches[0][2], nn.SyncBatchNorm)
    copy_state(ref, fused)
    for train in (True, False):
        compare(fused, ref, torch.randn(4, 6, 8, 7), train=train)


def test_pyramid_pooling_bad_arguments():
    with pytest.raises(ValueError, match="norm must be"):
        PyramidPooling(8, 2, norm="layernorm")
    with pytest.raises(ValueError, match="gn_groups"):
        PyramidPooling(8, 3, norm="gn", gn_groups=2)
    with pytest.raises(ValueError, match="bins"):
        PyramidPooling(8, 2, bins=(1, 0))


def test_batchnorm_1x1_bin_batch_size_1_is_a_clear_error():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match=r"PPM\.features\[0\] \(bin 1x1\).*batch size is 1"):
        PPM(4, 2, (1, 2)).train()(x)
    with pytest.raises(ValueError, match=r"PyramidPooling\.branches\[0\].*BatchNorm2d"):
        PyramidPooling.mmseg(4, 2, (1, 2)).train()(x)
    # documented ways out: eval mode, or no norm on the 1x1 bin (smp), or a batch of 2
    assert PPM(4, 2, (1, 2)).eval()(x).shape == (1, 8, 6, 6)
    assert PyramidPooling.smp(4, (1, 2)).train()(x).shape == (1, 8, 6, 6)
    assert PyramidPooling(4, 2, (1, 2), norm_on_1x1=False).train()(x).shape == (1, 8, 6, 6)
    assert PPM(4, 2, (1, 2)).train()(torch.randn(2, 4, 6, 6)).shape == (2, 8, 6, 6)


# --------------------------------------------------------------------------
# SpatialPyramidPooling
# --------------------------------------------------------------------------


def ref_spp_sppnet(x, levels):
    """Document 002's SPP: max pooling with kernel ceil(a/n), stride floor(a/n), flattened, concatenated."""
    b, _, h, w = x.shape
    return torch.cat([F.max_pool2d(x, kernel_size=(math.ceil(h / n), math.ceil(w / n)),
                                   stride=(math.floor(h / n), math.floor(w / n))).reshape(b, -1) for n in levels], 1)


def ref_spp_adaptive(x, levels, mode):
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return torch.cat([pool(x, n).flatten(1) for n in levels], 1)


@pytest.mark.parametrize("shape", [(2, 3, 10, 20), (1, 2, 13, 9)])
def test_spp_sppnet_window_matches_document(any_backend, shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    spp = SpatialPyramidPooling((4, 2, 1), mode="max", window="sppnet")
    out = spp(x)
    ref = ref_spp_sppnet(x, (4, 2, 1))
    assert out.shape == (shape[0], spp.output_features(shape[1]))
    close(out, ref)
    g = torch.randn_like(ref)
    close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], what="input grad")


def test_spp_sppnet_window_names_the_size():
    # 10 into 6 bins: kernel 2, stride 1 give 9 windows
    with pytest.raises(ValueError, match=r"size of 10 into 6 bins"):
        SpatialPyramidPooling((6, 3, 2, 1), window="sppnet")(torch.randn(1, 2, 10, 20))


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_adaptive(backend, mode):
    x = torch.randn(3, 4, 11, 7, requires_grad=True)
    spp = SpatialPyramidPooling((4, 2, 1), mode=mode)
    out, ref = spp(x), ref_spp_adaptive(x, (4, 2, 1), mode)
    assert out.shape == (3, 4 * 21)
    close(out, ref)
    g = torch.randn_like(ref)
    close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], what="input grad")


@pytest.mark.parametrize("size", [(30, 30), (13, 17)])
def test_spp_keras_same(any_backend, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    levels = (1, 2, 3, 6)
    out = SpatialPyramidPooling(levels, mode="avg", window="keras_same")(x)
    ref = torch.cat([ref_keras_same_avg(x, n).flatten(1) for n in levels], 1)
    close(out, ref)
    g = torch.randn_like(ref)
    close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], what="input grad")


def test_spp_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        SpatialPyramidPooling(mode="sum")
    with pytest.raises(ValueError, match="window"):
        SpatialPyramidPooling(window="same")


# --------------------------------------------------------------------------
# FeaturePyramidAttention
# --------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_fpa_matches_listing_on_16x16(backend, train):
    ref = randomize(RefPyramidAttention(4, 3))
    fused = FeaturePyramidAttention(4, 3)
    assert list(fused.state_dict()) == list(ref.state_dict())  # the listing's parameter names
    fused.load_state_dict(ref.state_dict())
    compare(fused, ref, torch.randn(2, 4, 16, 16), train=train)


@pytest.mark.parametrize("size", [(13, 13), (9, 20)])
def test_fpa_any_input_size(backend, size):
    ref = randomize(RefPyramidAttention(3, 2, general=True))
    fused = FeaturePyramidAttention(3, 2)
    fused.load_state_dict(ref.state_dict())
    for train in (True, False):
        compare(fused, ref, torch.randn(2, 3, *size), train=train)


# --------------------------------------------------------------------------
# gradcheck, fp64: one small module per layout
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make,shape", [
    (lambda: PPM(3, 2, (1, 2, 3)), (2, 3, 5, 4)),
    (lambda: PSPModule(2, 3, (1, 2, 3)), (2, 2, 5, 5)),
    (lambda: PyramidPooling.paper(4, 2, (1, 2, 3)), (2, 4, 5, 5)),
    (lambda: PyramidPooling.mmseg(3, 2, (1, 2, 3)), (2, 3, 4, 5)),
    (lambda: PyramidPooling.smp(4, (1, 2)), (1, 4, 5, 5)),
    (lambda: PyramidPooling.csail(3, (1, 2), branch_channels=2, out_channels=2), (2, 3, 4, 4)),
    (lambda: PyramidPooling(4, 4, (1, 3), norm="gn", gn_groups=2), (2, 4, 5, 5)),
    (lambda: SpatialPyramidPooling((3, 2, 1), "max"), (2, 2, 7, 6)),
    (lambda: SpatialPyramidPooling((2, 1), "avg", window="keras_same"), (1, 2, 5, 7)),
    (lambda: FeaturePyramidAttention(2, 2), (2, 2, 8, 7)),
], ids=["ppm", "lextal", "paper", "mmseg", "smp", "csail", "gn", "spp-max", "spp-keras", "fpa"])
def test_gradcheck(backend, make, shape):
    torch.manual_seed(0)
    m = make().double().train()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    params = [p for p in m.parameters()]
    assert torch.autograd.gradcheck(lambda inp, *ps: m(inp), (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


# --------------------------------------------------------------------------
# 1x1 convs on the pooled maps as matrix products (nn._pointwise_conv)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_pointwise_conv_matches_the_convolution(backend, dtype, bias, channels_last):
    from pyramid_ext.nn import _pointwise_conv
    x = torch.randn(3, 7, 9, 8, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    conv = nn.Conv2d(7, 5, 1, bias=bias).to(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    # the pooled levels are strided views of one packed output, both layouts
    for level in pe.multi_adaptive_avg_pool2d(x, (1, 2, 3, (2, 5))):
        got = _pointwise_conv(conv, level)
        assert got is not None
        want = conv(level)
        torch.testing.assert_close(got, want, **tol)
        assert got.is_contiguous() == want.is_contiguous()  # the convolution's layout
        assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
            memory_format=torch.channels_last)


def test_pointwise_conv_declines_what_it_does_not_compute(backend):
    from pyramid_ext.nn import _pointwise_conv
    x = torch.randn(2, 4, 3, 3)
    assert _pointwise_conv(nn.Conv2d(4, 2, 3, padding=1), x) is None
    assert _pointwise_conv(nn.Conv2d(4, 2, 1, stride=2), x) is None
    assert _pointwise_conv(nn.Conv2d(4, 2, 1, groups=2), x) is None
    assert _pointwise_conv(nn.Conv2d(4, 2, 1, padding=1), x) is None
    assert _pointwise_conv(nn.Conv2d(4, 2, 1).half(), x.half()) is None
    assert _pointwise_conv(nn.ReLU(), x) is None
    assert _pointwise_conv(nn.Conv2d(4, 2, 1), x[:1]) is None  # one sample: the convolution is faster
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _pointwise_conv(nn.Conv2d(4, 2, 1), x) is None
    conv = nn.Conv2d(4, 2, 1)
    assert _pointwise_conv(conv, x) is not None
    handle = conv.register_forward_hook(lambda *args: None)
    assert _pointwise_conv(conv, x) is None  # calling the weights directly would skip the hook
    handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda *args: None)
    try:
        assert _pointwise_conv(conv, x) is None
    finally:
        handle.remove()


def test_stage_convs_run_as_products_unless_hooked(backend, monkeypatch):
    """A stage's plain 1x1 conv, also inside a nested Sequential, skips the module; a hook
    on it brings the module call back, and the hook fires."""
    from pyramid_ext.nn import pyramid_branches
    calls = []
    real = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, *a: calls.append(1) or real(self, *a))
    stages = nn.ModuleList([
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 4, 1), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Sequential(nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4))),
    ]).eval()
    x = torch.randn(2, 6, 5, 5)
    got = pyramid_branches(x, stages)
    assert calls == []
    torch.testing.assert_close(got, [stage[1:](F.adaptive_avg_pool2d(x, stage[0].output_size)) for stage in stages])
    assert len(calls) == 2  # the reference above called both modules
    fired = []
    stages[1][1][0].register_forward_hook(lambda *args: fired.append(1))
    torch.testing.assert_close(pyramid_branches(x, stages), got)
    assert fired == [1] and len(calls) == 3


@pytest.mark.parametrize("extension", [True, False], ids=["one-call", "per-module"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_stage_batchnorm_and_relu_run_as_ops_in_eval_mode(backend, monkeypatch, channels_last, extension):
    """An eval-mode BatchNorm2d with running statistics and a ReLU in a stage tail run as
    their ops: with the extension, after a 1x1 conv, all three in one call
    (_C._pointwise_tail), else each through nn._direct_call. Same values and autograd as
    the modules; the module is called in training mode, without running statistics, for
    a subclass or with a hook."""
    from pyramid_ext import _extension
    from pyramid_ext.nn import pyramid_branches
    if extension and not _extension.LOADED:
        pytest.skip("the compiled extension is not built")
    monkeypatch.setattr(_extension, "LOADED", extension)

    class MyBN(nn.BatchNorm2d):
        pass

    calls = []
    for cls in (nn.BatchNorm2d, nn.ReLU):
        real = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, inp, real=real: calls.append(type(self)) or real(self, inp))
    torch.manual_seed(0)
    stages = nn.ModuleList([
        nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        for b in (1, 2, 3)
    ])
    stages.append(nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Conv2d(6, 4, 1), MyBN(4), nn.ReLU()))
    stages.append(nn.Sequential(nn.AdaptiveAvgPool2d((3, 2)), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, affine=False),
                                nn.ReLU()))
    stages.append(nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)))
    for m in stages.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 2)
                    m.bias.uniform_(-1, 1)
    x = torch.randn(3, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    stages = stages.double().eval()

    def reference():
        return [stage[1:](F.adaptive_avg_pool2d(x, stage[0].output_size)) for stage in stages]

    got = pyramid_branches(x, stages)
    # the modules called: the subclass and the BatchNorm without running statistics
    assert calls == [MyBN, nn.BatchNorm2d]
    want = reference()
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(sum((g * torch.arange(g.numel(), dtype=g.dtype).view_as(g)).sum() for g in got),
                                [x] + list(stages.parameters()), allow_unused=True)
    want_grads = torch.autograd.grad(sum((w * torch.arange(w.numel(), dtype=w.dtype).view_as(w)).sum() for w in want),
                                     [x] + list(stages.parameters()), allow_unused=True)
    for g, w in zip(grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)
    calls.clear()
    fired = []
    stages[0][2].register_forward_hook(lambda *args: fired.append(1))
    stages[1].train()  # batch statistics: the module runs (and updates its running statistics)
    before = stages[1][2].num_batches_tracked.item()
    pyramid_branches(x, stages)
    assert fired == [1] and stages[1][2].num_batches_tracked.item() == before + 1
    assert calls[:2] == [nn.BatchNorm2d, nn.BatchNorm2d]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_stage_tails_run_side_by_side(channels_last, threads):
    """Where every stage tail is one _C._pointwise_tail call (a product 1x1 conv, optionally
    an eval BatchNorm, optionally a ReLU), pyramid_branches makes one _C._pointwise_tails
    call for all of them, the branches side by side on the intra-op threads: the values,
    layouts and autograd of the one-by-one calls; no graph under no_grad (the caller's
    grad mode reaches the workers); not taken with a hook on a tail's module, a BatchNorm
    in training mode or a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pyramid_ext import _extension
    from pyramid_ext import nn as pnn
    if not _extension.LOADED:
        pytest.skip("the compiled extension is not built")
    torch.manual_seed(0)
    stages = nn.ModuleList([
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True)),
        nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Conv2d(8, 4, 1), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)),
                      nn.ReLU(inplace=True)),
        nn.Sequential(nn.AdaptiveAvgPool2d(6), nn.Conv2d(8, 4, 1)),  # 36/50 of the work: still shared on 2 threads
    ]).double().eval()
    for m in stages.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    x = torch.randn(3, 8, 13, 11, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    calls = []
    real = _extension._C._pointwise_tails

    def spy(args):
        calls.append(len(args))
        return real(args)

    def one_by_one():
        saved = pnn._run_tails_side_by_side
        pnn._run_tails_side_by_side = lambda *a: None
        try:
            return pnn.pyramid_branches(x, stages)
        finally:
            pnn._run_tails_side_by_side = saved

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_extension._C, "_pointwise_tails", spy)
            got = pnn.pyramid_branches(x, stages)
            assert calls == [4]
            want = one_by_one()
            assert calls == [4]
            torch.testing.assert_close(got, want)
            assert [g.stride() for g in got] == [w.stride() for w in want]
            # the modules' own values and layout (NCHW planes under 16 pixels go over rows, then back to NCHW)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            torch.testing.assert_close(got, [s[1:](F.adaptive_avg_pool2d(x, s[0].output_size)) for s in stages])
            assert all(g.is_contiguous(memory_format=fmt) for g in got)
            params = [x] + list(stages.parameters())
            grads = torch.autograd.grad(sum((g * g).sum() for g in got), params)
            want_grads = torch.autograd.grad(sum((w * w).sum() for w in want), params)
            torch.testing.assert_close(grads, want_grads)
            with torch.no_grad():
                assert not any(g.requires_grad or g.grad_fn is not None for g in pnn.pyramid_branches(x, stages))
            assert calls == [4, 4]

            class Passthrough(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    return func(*args, **(kwargs or {}))

            with Passthrough():
                torch.testing.assert_close(pnn.pyramid_branches(x, stages), want)
            fired = []
            handle = stages[2][1][0].register_forward_hook(lambda *args: fired.append(1))
            torch.testing.assert_close(pnn.pyramid_branches(x, stages), want)
            assert fired == [1]
            handle.remove()
            stages[0][2].train()
            pnn.pyramid_branches(x, stages)
            assert calls == [4, 4]  # neither the mode, the hook nor the training BatchNorm took it
    finally:
        torch.set_num_threads(before)


def test_tail_parameters_read_as_getattr_reads_them():
    """The tails' arguments read parameters and buffers from the module's own dicts
    (nn._param / nn._buffer, not nn.Module.__getattr__): what getattr returns, also where the
    name is registered as None and where a plain attribute took it."""
    from pyramid_ext import nn as pnn
    conv, bn = nn.Conv2d(4, 2, 1, bias=False), nn.BatchNorm2d(2, track_running_stats=False)
    assert pnn._param(conv, "weight") is conv.weight and pnn._param(conv, "bias") is None
    assert pnn._buffer(bn, "running_mean") is None and pnn._param(bn, "bias") is bn.bias
    plain = torch.ones(2, 4, 1, 1)
    del conv.weight
    conv.weight = plain  # no longer a parameter: an attribute of the instance
    assert pnn._param(conv, "weight") is plain
    with pytest.raises(AttributeError):
        pnn._buffer(conv, "running_mean")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_stage_tails_cut_by_samples(channels_last, dtype, threads):
    """_C._pointwise_tails cuts the tails' samples into pieces, an even share of the products
    for each thread (a PPM's 6x6 level is most of the work; _C._tail_pieces shows the cut).
    Without autograd each piece writes its slice of the branch's result: bit for bit the
    values and strides of one _C._pointwise_tail per branch, for every tail form (bias or
    not, eval BatchNorm or not, ReLU none / out of place / in place), on the levels of one
    pooled call (each sample's pixels side by side with its other levels) and a map of its
    own. With a tensor that requires grad the call records one node for all tails
    (test_tails_node): the same cut forward, and the values, strides and gradients of the
    one-by-one calls."""
    from pyramid_ext import _extension
    if not _extension.LOADED:
        pytest.skip("the compiled extension is not built")
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(16, 256, 13, 11, dtype=dtype).contiguous(memory_format=fmt)
    levels = list(pe.multi_adaptive_avg_pool2d(x, (1, (2, 3), 6), backend="cpp"))
    levels.append(torch.randn(16, 256, 2, 2, dtype=dtype).contiguous(memory_format=fmt))  # a map of its own
    forms = [(bias, norm, relu) for bias in (False, True) for norm in (False, True) for relu in (0, 1, 2)]

    def tail_args(level, form, requires_grad=False):
        bias, norm, relu = form
        cout = 64
        weight = torch.randn(cout, 256, 1, 1, dtype=dtype, requires_grad=requires_grad)
        a = [level, weight, torch.randn(cout, dtype=dtype) if bias else None]
        a += ([torch.randn(cout, dtype=dtype), torch.randn(cout, dtype=dtype), torch.randn(cout, dtype=dtype),
               torch.rand(cout, dtype=dtype) + 0.5] if norm else [None] * 4)
        return tuple(a + [1e-5, relu])

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, form in enumerate(forms):
            args = [tail_args(level, forms[(k + i) % len(forms)]) for i, level in enumerate(levels)]
            pieces = _extension._C._tail_pieces(args, threads)
            assert len(pieces) == threads and all(pieces)
            cut = [p[0] for mine in pieces for p in mine]
            assert len(cut) > len(set(cut)), pieces  # some branch is shared among threads
            assert sorted((b, n0, n1) for mine in pieces for b, n0, n1 in mine if n1 > n0) == sorted(
                p for mine in pieces for p in mine)
            got = _extension._C._pointwise_tails(args)
            want = [_extension._C._pointwise_tail(*a) for a in args]
            for g, w in zip(got, want):
                assert torch.equal(g, w) and g.stride() == w.stride(), (form, tuple(g.shape))
                assert not g.requires_grad
        x.requires_grad_()
        levels = list(pe.multi_adaptive_avg_pool2d(x, (1, (2, 3), 6), backend="cpp")) + levels[-1:]
        for k in (0, 7, 11):  # no norm and no ReLU, norm and ReLU in place, all of it
            args = [tail_args(level, forms[(k + i) % len(forms)], requires_grad=True) for i, level in
                    enumerate(levels)]
            got = _extension._C._pointwise_tails(args)
            want = [_extension._C._pointwise_tail(*a) for a in args]
            for g, w in zip(got, want):
                assert torch.equal(g, w) and g.stride() == w.stride()
                assert g.requires_grad and g.grad_fn is not None
            params = [x] + [a[1] for a in args]
            grads = torch.autograd.grad(sum((g * g).sum() for g in got), params)
            want_grads = torch.autograd.grad(sum((w * w).sum() for w in want), params)
            torch.testing.assert_close(grads, want_grads)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------
# PSPNet
# --------------------------------------------------------------------------


def ref_pspnet_forward(model, ref_ppm, x, y=None):
    """Document 004's forward, over the model's own layers with the reference PPM."""
    h = int((x.shape[2] - 1) / 8 * model.zoom_factor + 1)
    w = int((x.shape[3] - 1) / 8 * model.zoom_factor + 1)
    x = model.layer1(model.layer0(x))
    x = model.layer2(x)
    x3 = model.layer3(x)
    x = ref_ppm(model.layer4(x3))
    x = model.cls(x)
    if model.zoom_factor != 1:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)
    if model.training and y is not None:
        aux = model.aux(x3)
        if model.zoom_factor != 1:
            aux = F.interpolate(aux, size=(h, w), mode="bilinear", align_corners=True)
        return x, model.criterion(x, y), model.criterion(aux, y)
    return x


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed (PSPNet's backbone)")
def test_pspnet_end_to_end(backend):
    from pyramid_ext.nn import PSPNet

    torch.manual_seed(0)
    model = PSPNet(layers=50, classes=3, zoom_factor=8)
    assert model.layer4[0].conv2.dilation == (2, 2) and model.layer4[1].conv2.dilation == (4, 4)
    ref_ppm = RefPPM(2048, 512, (1, 2, 3, 6))
    ref_ppm.load_state_dict(model.ppm.state_dict())
    x = torch.randn(2, 3, 17, 17)
    y = torch.randint(0, 3, (2, 17, 17))
    y[0, 0, :4] = 255  # ignore_index

    model.train()
    torch.manual_seed(1)
    out, main_loss, aux_loss = model(x, y)
    torch.manual_seed(1)
    r_out, r_main, r_aux = ref_pspnet_forward(model, ref_ppm, x, y)
    assert out.shape == (2, 3, 17, 17)
    close(out, r_out)
    close(main_loss, r_main)
    close(aux_loss, r_aux)
    shared = [model.layer1[0].conv1.weight, model.aux[4].weight, model.cls[0].weight]
    g = torch.autograd.grad(main_loss + 0.4 * aux_loss, [model.ppm.features[3][1].weight] + shared)
    rg = torch.autograd.grad(r_main + 0.4 * r_aux, [ref_ppm.features[3][1].weight] + shared)
    # End to end, gradients flow back through ResNet-50 and through BatchNorm over the
    # 1x1 bin at batch size 2 (ill-conditioned: see compare()); the fp32 reference's own
    # error there is of the order of 1e-5, so parameter gradients are held to 1e-4.
    for a, b in zip(g, rg):
        close(a, b, rel=1e-4, what="parameter grad")
    for a, b in zip(model.ppm.buffers(), ref_ppm.buffers()):  # same BatchNorm statistics after one step
        close(a.float(), b.float(), what="ppm buffer")
    assert model(x).shape == (2, 3, 17, 17)  # training without targets: the output

    model.eval()
    ref_ppm.load_state_dict(model.ppm.state_dict())
    ref_ppm.eval()
    with torch.no_grad():
        close(model(x, y), ref_pspnet_forward(model, ref_ppm, x))


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed (PSPNet's backbone)")
def test_pspnet_zoom_factor_1():
    from pyramid_ext.nn import PSPNet

    model = PSPNet(classes=2, zoom_factor=1, bins=(1, 2)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 17, 17)).shape == (1, 2, 3, 3)


def test_pspnet_without_torchvision(monkeypatch):
    from pyramid_ext.nn import PSPNet

    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(ImportError, match=r"pip install pyramid_ext\[models\]"):
        PSPNet()


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pyramid_ext", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = _cli("bench", "--shape", "2", "8", "9", "9", "--rounds", "2", "--no-compile", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "speedup vs eager" in r.stdout and "max abs err vs eager" in r.stdout
    for b in pe.available_backends("cpu"):
        assert f"pyramid_ext[{b}]" in r.stdout
    assert "forward+backward" in r.stdout and "failed" not in r.stdout
    assert "round 2/2" in r.stderr  # progress goes to stderr
    import json

    rows = json.loads(out.read_text())["rows"]
    assert {row["mode"] for row in rows} == {"forward", "forward+backward"}
    assert all(0 <= row["max_rel_err"] <= 1e-4 for row in rows)


def test_cli_plot_without_matplotlib_is_a_clear_error(tmp_path):
    if importlib.util.find_spec("matplotlib") is not None:
        r = _cli("bench", "--shape", "1", "4", "6", "6", "--rounds", "1", "--no-compile", "--no-backward",
                 "--plot", str(tmp_path / "b.png"))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "b.png").exists()
    else:
        r = _cli("bench", "--shape", "1", "4", "6", "6", "--rounds", "1", "--plot", str(tmp_path / "b.png"))
        assert r.returncode != 0 and "matplotlib" in r.stderr


def test_cli_info():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    for key in ("pyramid_ext", "torch", "backends on cpu", "CUDA archs", "OpenMP threads", "triton"):
        assert key in r.stdout


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_modules_under_torch_compile_fullgraph(backend, compile_backend):
    # The compiled fused module against the eager plain-PyTorch reference
    # (RefPPM: F.adaptive_avg_pool2d, F.interpolate, torch.cat), not against
    # itself; aot_eager checks the traced graph, inductor the generated code
    # around the custom ops.
    torch._dynamo.reset()
    fused = randomize(PPM(6, 2, (1, 2, 3, 6))).train()
    ref = RefPPM(6, 2, (1, 2, 3, 6)).train()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 9, 7)
    xr = x.clone().requires_grad_()
    want = ref(xr)
    (want_grad,) = torch.autograd.grad(want.sum(), xr)
    xc = x.clone().requires_grad_()
    out = torch.compile(fused, fullgraph=True, backend=compile_backend)(xc)
    close(out, want)
    close(torch.autograd.grad(out.sum(), xc)[0], want_grad, what="input grad")
    for name, a, b in zip(fused.state_dict(), fused.state_dict().values(), ref.state_dict().values()):
        close(a.float(), b.float(), what=f"buffer {name} after the step")  # BatchNorm statistics


def _tail_args(dtype, fmt, form, shapes, requires_grad=True, seed=0):
    """_C._pointwise_tail(s) arguments per shape: weight to 4 channels, ``form`` = (bias, norm, relu)."""
    g = torch.Generator().manual_seed(seed)
    bias, norm, relu = form
    args = []
    for s in shapes:
        x = torch.randn(*s, dtype=dtype, generator=g).contiguous(memory_format=fmt).requires_grad_(requires_grad)
        p = lambda *size: torch.randn(*size, dtype=dtype, generator=g).requires_grad_(requires_grad)  # noqa: E731
        bn = ([p(4), p(4), torch.randn(4, dtype=dtype, generator=g), torch.rand(4, dtype=dtype, generator=g) + 0.5]
              if norm else [None] * 4)
        args.append((x, p(4, s[1], 1, 1), p(4) if bias else None, *bn, 1e-5, relu))
    return args


def _eager_tail(a):
    x, w, b, bw, bb, mean, var, eps, relu = a
    y = F.conv2d(x, w, b)
    if mean is not None:
        y = F.batch_norm(y, mean, var, bw, bb, False, 0.0, eps)
    return y.relu() if relu else y


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_tails_node(channels_last):
    """With autograd, _C._pointwise_tail(s) record the tails as one node (PointwiseTailsBackward): the
    forward is the no-grad computation (cut at samples, the product kernel), the same bits with grad
    enabled or not; the backward is ATen's ops on the saved inputs, so fp64 gradcheck and gradgradcheck
    hold for every tail form, and float32 gradients match the eager modules'. Not taken (ATen's ops
    recorded one by one, as before) for a running statistic that requires grad (which raises as eager's
    batch_norm does), a forward-mode tangent, or under a TorchDispatchMode (which then sees the ops)."""
    from torch.autograd import gradcheck, gradgradcheck
    from torch.utils._python_dispatch import TorchDispatchMode
    import torch.autograd.forward_ad as fwAD
    from pyramid_ext import _extension
    if not _extension.LOADED:
        pytest.skip("the compiled extension is not built")
    C = _extension._C
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    forms = [(b, n, r) for b in (False, True) for n in (False, True) for r in (0, 1, 2)]
    shapes = ((3, 5, 1, 1), (3, 5, 2, 3), (3, 5, 3, 3))
    for k, form in enumerate(forms):
        args = _tail_args(torch.float64, fmt, form, shapes, seed=k)
        inputs = [t for a in args for t in a[:5] if t is not None]

        def tails(*flat, args=args):
            it = iter(flat)
            return tuple(C._pointwise_tails([(*(next(it) if t is not None else None for t in a[:5]), *a[5:])
                                              for a in args]))

        outs = tails(*inputs)
        assert all(o.grad_fn.name() == "pyramid_ext::PointwiseTailsBackward" for o in outs)
        for a, o in zip(args, outs):
            torch.testing.assert_close(o, _eager_tail(a))
        assert gradcheck(tails, inputs, eps=1e-6, atol=1e-5)
        assert gradgradcheck(tails, inputs, eps=1e-6, atol=1e-5)
        # one branch's gradient only: the others' inputs get none
        grads = torch.autograd.grad(outs[1].sum(), inputs, allow_unused=True)
        first = [g for g, t in zip(grads, inputs) if any(t is u for u in args[0][:5])]
        assert first and all(g is None or not g.any() for g in first)

    # float32: the same values as without grad; gradients as the eager modules'
    args = _tail_args(torch.float32, fmt, (True, True, 2), ((16, 64, 1, 1), (16, 64, 2, 2), (16, 64, 6, 6)))
    outs = C._pointwise_tails(args)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outs, C._pointwise_tails(args)))
    assert all(torch.equal(a, C._pointwise_tail(*t)) for a, t in zip(outs, args))
    inputs = [t for a in args for t in a[:5]]
    got = torch.autograd.grad(sum((o * o).sum() for o in outs), inputs)
    want = torch.autograd.grad(sum((e * e).sum() for e in map(_eager_tail, args)), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)

    # not taken: a running mean that requires grad (ATen's batch_norm raises, as eager's), a tangent,
    # a dispatch mode
    args = _tail_args(torch.float64, fmt, (True, True, 1), shapes[1:])
    a = list(args[0])
    a[5] = a[5].clone().requires_grad_()
    for f in (lambda: C._pointwise_tail(*a), lambda: _eager_tail(a)):
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
            f()
    with fwAD.dual_level():
        x = fwAD.make_dual(args[0][0].detach(), torch.ones_like(args[0][0]))
        dual = (x, *args[0][1:])
        out = C._pointwise_tail(*dual)
        assert out.grad_fn.name() != "pyramid_ext::PointwiseTailsBackward"
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(_eager_tail(dual)).tangent)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.__name__)
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        out = C._pointwise_tails(args)
    assert any(name.startswith(("mm", "bmm", "addmm", "baddbmm")) for name in seen.ops), seen.ops
    assert all(o.grad_fn.name() != "pyramid_ext::PointwiseTailsBackward" for o in out)
