"""pyramid_ext.convert on segmentation_models_pytorch (PSPNet, UPerNet, Segformer),
transformers (UperNet, SegFormer) and torchvision (DeepLabV3).

The model tests need segmentation_models_pytorch / transformers / torchvision
and are skipped without them, saying which (the CPU CI environment lacks them;
`make test-cuda-env` runs them). Every model is built from a small config with
random weights (nothing downloads) and compared with an unconverted copy of
itself: outputs in eval and train mode, every gradient, state_dict keys,
checkpoints loading both ways, and convert's own example_input check.
"""
import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyramid_ext as pe
from pyramid_ext import functional as pf
from pyramid_ext.convert import ConversionError, FusedASPPPooling, FusedSMPPSPModule, convert

from ._helpers import randomize_bn

HAS_SMP = importlib.util.find_spec("segmentation_models_pytorch") is not None
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_smp = pytest.mark.skipif(not HAS_SMP, reason="segmentation_models_pytorch is not installed "
                                                   "(pip install segmentation-models-pytorch)")
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_tv = pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed (pip install torchvision)")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed "
                                                                     "(pip install transformers)")


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
    assert report.names == ["decoder", "decoder.psp"] and len(report) == 2
    r = report[1]
    assert r.old_class == "segmentation_models_pytorch.decoders.pspnet.decoder.PSPModule"
    assert r.new_class == "pyramid_ext.convert.FusedSMPPSPModule" and not r.checked
    assert report[0].new_class == "pyramid_ext.convert.ConcatFreeSMPPSPDecoder"
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
    for r in report:
        assert r.checked and r.max_abs_error <= 1e-5 * max(1.0, r.output_scale), r
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
    assert type(model.decoder).__name__ == "PSPDecoder"  # the replacement checked before it is undone too


@needs_tv
def test_deeplabv3(backend):
    from torchvision.models.segmentation.deeplabv3 import ASPPPooling

    model = deeplab().eval()
    x = torch.randn(1, 3, 33, 41)
    before_sd = checkpoint(model)
    with torch.no_grad():
        before = model(x)["out"]

    report = convert(model, example_input=x)
    assert report.names == ["classifier.0", "classifier.0.convs.4"]
    assert report[0].old_class == "torchvision.models.segmentation.deeplabv3.ASPP"
    assert report[1].old_class == "torchvision.models.segmentation.deeplabv3.ASPPPooling"
    for r in report:
        assert r.checked and r.max_abs_error <= 1e-5 * max(1.0, r.output_scale), r
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


# --------------------------------------------------------------------------
# Every library model convert knows, against an unconverted copy of itself
# --------------------------------------------------------------------------


def _smp(arch, **kw):
    def build():
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=3, **kw)
    return build


def _hf_upernet():
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=3,
                                                        auxiliary_channels=8))


def _hf_segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    # at 64x64 the levels are 16x16 ... 2x2 with 8, 16, 40, 64 channels against a
    # decoder width of 32: the first two levels are folded into linear_fuse, the
    # last two projected at their own size first (both ways are tested)
    cfg = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 40, 64], decoder_hidden_size=32,
                          num_attention_heads=[1, 1, 2, 2], num_labels=3)
    return SegformerForSemanticSegmentation(cfg)


def _tv(name):
    def build():
        from torchvision.models import segmentation

        return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3)
    return build


def _logits(out):
    if hasattr(out, "logits"):  # transformers' output (a dict too)
        return out.logits
    return out["out"] if isinstance(out, dict) else out


# name -> (skip mark, builder, the modules convert replaces, input (N, 3, H, W))
MODELS = {
    "smp_pspnet": (needs_smp, _smp("PSPNet"), ["decoder", "decoder.psp"], (2, 3, 64, 48)),
    "smp_upernet": (needs_smp, _smp("UPerNet", decoder_channels=32), ["decoder", "decoder.psp"], (2, 3, 64, 96)),
    "smp_segformer": (needs_smp, _smp("Segformer", decoder_segmentation_channels=32), ["decoder"], (2, 3, 64, 64)),
    "hf_upernet": (needs_transformers, _hf_upernet, ["decode_head"], (2, 3, 64, 96)),
    "hf_segformer": (needs_transformers, _hf_segformer, ["decode_head"], (2, 3, 64, 64)),
    "tv_deeplabv3_mobilenet": (needs_tv, _tv("deeplabv3_mobilenet_v3_large"), ["classifier.0", "classifier.0.convs.4"],
                               (2, 3, 65, 47)),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(MODELS[name][1](), seed)


MODEL_PARAMS = [pytest.param(n, marks=MODELS[n][0]) for n in MODELS]


@pytest.fixture
def spy_concat_free(monkeypatch):
    """Counts the calls of pe.upsample_concat_conv2d (the converted modules call it through the module)."""
    calls = []
    real = pf.upsample_concat_conv2d

    def spy(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs["branches"])
        return real(*args, **kwargs)
    monkeypatch.setattr(pf, "upsample_concat_conv2d", spy)
    return calls


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_converted_model_equals_original(name, backend, spy_concat_free):
    """Eval and train outputs, every gradient, state_dict keys, checkpoints both ways."""
    _, _, names, shape = MODELS[name]
    model, original = build(name), build(name)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    sd_before = checkpoint(original)

    report = convert(model, example_input=x[:1])
    assert report.names == names, str(report)
    for r in report:
        assert r.checked and r.max_abs_error <= 1e-5 * max(1.0, r.output_scale), str(report)
        assert r.new_class.startswith("pyramid_ext.convert."), r
    assert convert(model).names == []  # nothing left to convert

    # the keys (and their order), and checkpoints loading both ways
    assert list(model.state_dict()) == list(sd_before)
    fresh = build(name, seed=5)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(sd_before, strict=True)

    for train in (False, True):
        model.train(train)
        original.train(train)
        spy_concat_free.clear()
        xm = x.clone().requires_grad_(train)
        xo = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            torch.manual_seed(2)  # dropout and stochastic depth draw the same numbers
            got = _logits(model(xm))
            torch.manual_seed(2)
            want = _logits(original(xo))
        # (DeepLabV3's ASPP accumulates its 1x1 project per branch instead: convert._accumulate_1x1)
        assert spy_concat_free or name.startswith("tv_"), "the converted model did not call upsample_concat_conv2d"
        close(got, want)
        if not train:
            continue
        g = torch.randn_like(want)
        got.backward(g)
        want.backward(g)
        close(xm.grad, xo.grad, rel=1e-4)
        # each gradient within 1e-4 of its own scale; one that is zero in exact
        # arithmetic (a norm's bias right before a BatchNorm) is rounding noise of
        # the terms that cancel, so the floor is 1e-6 of the model's largest gradient
        floor = 1e-6 * max(q.grad.abs().max().item() for q in original.parameters() if q.grad is not None)
        for (n, p), q in zip(model.named_parameters(), original.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                err = (p.grad - q.grad).abs().max().item()
                assert err <= 1e-4 * q.grad.abs().max().item() + floor, f"{n}: max abs error {err:.3g}"
    # the running statistics the training step updated are the same
    for (n, b), c in zip(model.named_buffers(), original.buffers()):
        if b.is_floating_point():
            close(b, c, rel=1e-5)


@needs_transformers
def test_segformer_fold_is_computed_from_the_held_weights(backend):
    """Training updates the projections and linear_fuse themselves: after an optimizer
    step the converted head still equals an unconverted one with the same weights."""
    model, original = build("hf_segformer"), build("hf_segformer")
    convert(model)
    x = torch.randn(2, 3, 64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _logits(model.train()(x)).square().mean().backward()
    opt.step()
    head = model.decode_head
    assert not torch.equal(head.linear_fuse.weight, original.decode_head.linear_fuse.weight)
    assert not torch.equal(head.linear_projections[0].proj.weight, original.decode_head.linear_projections[0].proj.weight)
    original.load_state_dict(model.state_dict())
    with torch.no_grad():
        close(_logits(model.eval()(x)), _logits(original.eval()(x)))


@needs_smp
def test_smp_pspnet_decoder_without_psp_replacement(backend):
    """The decoder replacement computes from psp.blocks, whichever class psp is."""
    model, original = build("smp_pspnet").eval(), build("smp_pspnet").eval()
    from segmentation_models_pytorch.decoders.pspnet.decoder import PSPModule

    report = convert(model)
    assert isinstance(model.decoder.psp, FusedSMPPSPModule)
    model.decoder.psp = original.decoder.psp  # back to smp's own module, shared weights
    assert type(model.decoder.psp) is PSPModule
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        close(model(x), original(x))
    assert report.names == ["decoder", "decoder.psp"]


def test_pe_nn_modules_with_a_conv_after_the_concatenation_do_not_concatenate(monkeypatch, backend):
    """PyramidPooling with a bottleneck, PSPModule and PSPNet call upsample_concat_conv2d
    and never upsample_concat (which writes the concatenation)."""
    def refuse(*a, **k):
        raise AssertionError("upsample_concat was called")
    called = []
    real = pf.upsample_concat_conv2d
    monkeypatch.setattr(pf, "upsample_concat", refuse)
    monkeypatch.setattr(pf, "upsample_concat_conv2d", lambda *a, **k: called.append(1) or real(*a, **k))
    x = torch.randn(2, 8, 13, 11)
    for module in (pe.nn.PyramidPooling.mmseg(8, 4), pe.nn.PyramidPooling.paper(8, 4), pe.nn.PSPModule(8, 6),
                   pe.nn.PyramidPooling.csail(fc_dim=8, branch_channels=4, out_channels=4)):
        called.clear()
        assert module(x).shape[1] in (4, 6)
        assert called == [1], type(module).__name__


def test_aspp_accumulated_project_equals_the_concatenation():
    """convert._accumulate_1x1 (ASPP's project as accumulated GEMMs, the pooled branch a
    constant) against F.conv2d over torch.cat of the branches and the resized 1x1 map."""
    from pyramid_ext.convert import _accumulate_1x1

    g = torch.Generator().manual_seed(4)
    full = [torch.randn(3, c, 13, 7, generator=g, dtype=torch.float64, requires_grad=True) for c in (4, 5, 3)]
    pooled = torch.randn(3, 6, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    conv = nn.Conv2d(18, 5, 1, bias=True).double()
    got = _accumulate_1x1(conv, full, pooled)
    want = F.conv2d(torch.cat(full + [F.interpolate(pooled, (13, 7), mode="bilinear", align_corners=False)], 1),
                    conv.weight, conv.bias)
    close(got, want, rel=1e-12)
    inputs = full + [pooled, conv.weight, conv.bias]
    gout = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, inputs, gout), torch.autograd.grad(want, inputs, gout)):
        close(a, b, rel=1e-12)
    assert _accumulate_1x1(nn.Conv2d(18, 5, 3, padding=1).double(), full, pooled) is None  # 1x1 only
    assert _accumulate_1x1(conv, [t.contiguous(memory_format=torch.channels_last) for t in full], pooled) is None


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_model_bench_training_step_at_batch_one(name):
    """`python -m pyramid_ext bench --model` trains at batch 1: its train mode leaves the 1x1 bin's block in
    eval (BatchNorm cannot train on one value per channel), for the original and the converted model alike."""
    from pyramid_ext.model_bench import _train_mode

    shape = (1,) + MODELS[name][3][1:]
    converted = build(name)
    convert(converted, example_input=torch.randn(shape))
    for model in (build(name), converted):
        _train_mode(model, batch=1)  # (without it transformers' UperNet and torchvision's ASPP raise here)
        out = model(torch.randn(shape))
        out = out.logits if hasattr(out, "logits") else out["out"] if isinstance(out, dict) else out
        out.sum().backward()
