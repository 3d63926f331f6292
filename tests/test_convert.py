"""pyramid_ext.convert on segmentation_models_pytorch's PSPNet and torchvision's DeepLabV3.

The model tests need segmentation_models_pytorch / torchvision and are skipped
without them (the CPU CI environment lacks them; a second one has them).
"""
import importlib.util
import io

import pytest
import torch
from torch import nn

import pyramid_ext as pe
from pyramid_ext.convert import ConversionError, FusedASPPPooling, FusedSMPPSPModule, convert

from ._helpers import randomize_bn

HAS_SMP = importlib.util.find_spec("segmentation_models_pytorch") is not None
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_smp = pytest.mark.skipif(not HAS_SMP, reason="segmentation_models_pytorch is not installed "
                                                   "(pip install segmentation-models-pytorch)")
needs_tv = pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed (pip install torchvision)")


@pytest.fixture
def backend(backend):
    """conftest's CPU backends (compiled and pure PyTorch; a missing one skips, or
    fails under PYRAMID_EXT_REQUIRE_CPP=1), selected for the whole test."""
    with pe.use_backend(backend):
        yield backend


def close(a, b, rel=1e-5):
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item() + 1e-7, f"max abs error {err:.3g}"


def checkpoint(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


def smp_pspnet():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return randomize_bn(smp.PSPNet(encoder_name="resnet50", encoder_weights=None, classes=3))


def deeplab():
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    return randomize_bn(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4))


@needs_smp
def test_smp_pspnet(backend):
    from segmentation_models_pytorch.decoders.pspnet.decoder import PSPModule

    model = smp_pspnet().eval()
    x = torch.randn(2, 3, 64, 48)
    before_sd = checkpoint(model)
    with torch.no_grad():
        before = model(x)

    report = convert(model)
    assert report.names == ["decoder.psp"] and len(report) == 1
    r = report[0]
    assert r.old_class == "segmentation_models_pytorch.decoders.pspnet.decoder.PSPModule"
    assert r.new_class == "pyramid_ext.convert.FusedSMPPSPModule" and not r.checked
    assert isinstance(model.decoder.psp, FusedSMPPSPModule)
    assert "decoder.psp" in str(report)

    with torch.no_grad():
        close(model(x), before)
    # checkpoints load across, both ways, with the same keys
    after_sd = model.state_dict()
    assert list(after_sd) == list(before_sd)
    model.load_state_dict(before_sd, strict=True)
    fresh = smp_pspnet()
    fresh.load_state_dict(after_sd, strict=True)
    assert not any(isinstance(m, PSPModule) for m in model.modules())
    assert convert(model).names == []  # nothing left to convert


@needs_smp
def test_smp_pspnet_train_mode_and_gradients(backend):
    model = smp_pspnet().train()
    ref = smp_pspnet().train()
    convert(model)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)  # PSPDecoder's Dropout2d
    out = model(x)
    torch.manual_seed(1)
    r_out = ref(x)
    close(out, r_out)
    g = torch.randn_like(out)
    out.backward(g)
    r_out.backward(g)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), n  # encoder stages past encoder_depth are unused
        if p.grad is not None:
            close(p.grad, q.grad, rel=1e-4)


@needs_smp
def test_smp_pspnet_with_example_input(backend):
    model = smp_pspnet().train()
    original = smp_pspnet().train()
    original.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    report = convert(model, example_input=x)
    assert report[0].checked and report[0].max_abs_error <= 1e-5 * max(1.0, report[0].output_scale)
    assert model.training and model.decoder.psp.training  # flags restored
    # convert's own report is not the evidence: the outputs of the converted
    # model and of an unconverted copy, compared here (eval: no dropout, BN
    # with running statistics; train: the same batch statistics).
    assert not any(isinstance(m, type(original.decoder.psp)) for m in model.modules())
    for train, inp in ((False, x), (True, torch.randn(2, 3, 64, 64))):
        model.train(train)
        original.train(train)
        torch.manual_seed(1)
        got = model(inp)
        torch.manual_seed(1)
        want = original(inp)
        close(got, want)


@needs_smp
def test_example_input_mismatch_is_undone(monkeypatch):
    from segmentation_models_pytorch.decoders.pspnet.decoder import PSPModule

    model = smp_pspnet().eval()
    monkeypatch.setattr(FusedSMPPSPModule, "forward", lambda self, x: torch.cat([x, x], 1) * 2)
    with pytest.raises(ConversionError, match=r"'decoder\.psp'.*does not match"):
        convert(model, example_input=torch.randn(1, 3, 32, 32))
    assert type(model.decoder.psp) is PSPModule  # left unchanged


@needs_tv
def test_deeplabv3(backend):
    from torchvision.models.segmentation.deeplabv3 import ASPPPooling

    model = deeplab().eval()
    x = torch.randn(1, 3, 33, 41)
    before_sd = checkpoint(model)
    with torch.no_grad():
        before = model(x)["out"]

    report = convert(model, example_input=x)
    assert report.names == ["classifier.0.convs.4"]
    assert report[0].old_class == "torchvision.models.segmentation.deeplabv3.ASPPPooling"
    assert report[0].checked and report[0].max_abs_error <= 1e-5 * max(1.0, report[0].output_scale)
    assert isinstance(model.classifier[0].convs[4], FusedASPPPooling)
    assert not any(type(m) is ASPPPooling for m in model.modules())

    with torch.no_grad():
        close(model(x)["out"], before)
    assert list(model.state_dict()) == list(before_sd)
    model.load_state_dict(before_sd, strict=True)
    fresh = deeplab()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        close(fresh.eval()(x)["out"], before)


@needs_tv
def test_aspp_pooling_train_mode_and_hooks(backend):
    from torchvision.models.segmentation.deeplabv3 import ASPPPooling

    torch.manual_seed(0)
    ref = ASPPPooling(4, 3)
    parent = nn.Sequential(ASPPPooling(4, 3))
    parent[0].load_state_dict(ref.state_dict())
    seen = []
    handle = parent[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    convert(parent)
    x = torch.randn(3, 4, 7, 5, requires_grad=True)
    out = parent(x)
    assert seen == [out.shape]  # the hook came along
    handle.remove()
    parent(x)
    assert len(seen) == 1
    xr = x.detach().clone().requires_grad_(True)
    r = ref(xr)
    close(out, r)
    g = torch.randn_like(r)
    out.backward(g)
    r.backward(g)
    close(x.grad, xr.grad)
    close(parent[0][1].weight.grad, ref[1].weight.grad)


@needs_tv
def test_aspp_pooling_batch_size_1_training_names_the_module():
    from torchvision.models.segmentation.deeplabv3 import ASPPPooling

    parent = nn.Sequential(nn.Identity(), ASPPPooling(4, 3))
    convert(parent)
    with pytest.raises(ValueError, match=r"'?1.*batch size is 1"):
        parent.train()(torch.randn(1, 4, 5, 5))


def test_unrecognised_modules_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(2), pe.nn.PPM(4, 1, (1, 2)))
    before = [type(m) for m in model.modules()]
    report = convert(model, example_input=torch.randn(2, 3, 8, 8))
    assert len(report) == 0 and report.names == []
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(TypeError, match="nn.Module"):
        convert(lambda x: x)


def test_convert_is_exported():
    assert pe.convert is convert
