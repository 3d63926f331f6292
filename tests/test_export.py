"""Export of fused models: ONNX (both exporters), torch.export, AOTInductor.

The ONNX tests export with dynamic N, H and W, run the file in onnxruntime at
the export size and at least six other sizes (non-divisible ones, sizes below
the largest bin, 1x1) and compare with the PyTorch module at each size; the
same files run in OpenVINO's CPU runtime. They need onnx, onnxscript,
onnxruntime and openvino (and torchvision / segmentation_models_pytorch for
the converted models): CI runs them in the CUDA-build environment
(``make test-cuda-env``), which sets PYRAMID_EXT_REQUIRE_EXPORT=1 so a missing
package fails instead of skipping. The window and op tests run everywhere.
"""
import functools
import importlib
import importlib.util
import os
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyramid_ext as pe
from pyramid_ext import export, windows
from pyramid_ext.export import ExportUnsupportedError

from ._helpers import randomize_bn

REQUIRE = os.environ.get("PYRAMID_EXT_REQUIRE_EXPORT") == "1"


def need(module: str):
    """Imports ``module`` or skips (fails under PYRAMID_EXT_REQUIRE_EXPORT=1)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        if REQUIRE:
            pytest.fail(f"{module} is required (PYRAMID_EXT_REQUIRE_EXPORT=1) but not installed")
        pytest.skip(f"{module} is not installed (the export tests run in `make test-cuda-env`)")
    return importlib.import_module(module)


def randomize(model: nn.Module, seed=0) -> nn.Module:
    """Non-trivial BatchNorm statistics, eval mode."""
    return randomize_bn(model, seed).eval()


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, rel=1e-5):
    """Within ``rel`` of the output's scale (its largest magnitude); integer outputs exactly."""
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not ref.is_floating_point():
        assert torch.equal(got.to(ref.dtype), ref), f"{what}: integer outputs differ"
        return
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= rel * max(scale, 1e-3), f"{what}: max abs error {err:.3g} > {rel} x output scale {scale:.3g}"


# --------------------------------------------------------------------------
# Windows in the graph == pyramid_ext.windows (eager ints; no exporter needed)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("window", windows.WINDOW_POLICIES)
def test_axis_windows_equal_windows_py(window):
    policy = {"adaptive": windows.adaptive_windows, "sppnet": windows.sppnet_windows,
              "keras_same": windows.keras_same_windows}[window]
    defined = undefined = 0
    for size in range(1, 90):
        for n in range(1, 13):
            start, end, valid, longest = export.axis_windows(size, n, window)
            try:
                expected = policy(size, n)
            except ValueError:
                assert not bool(valid), f"{window}: size {size}, {n} bins: undefined in windows.py, valid in the graph"
                undefined += 1
                continue
            assert bool(valid), f"{window}: size {size}, {n} bins"
            got = list(zip(start.tolist(), end.tolist()))
            assert got == [(int(s), int(e)) for s, e in expected], f"{window}: size {size}, {n} bins"
            assert max(e - s for s, e in got) <= longest
            defined += 1
    assert defined > 500
    assert (undefined > 0) == (window != "adaptive")


# --------------------------------------------------------------------------
# The export path, run eagerly, against PyTorch's own ops
# --------------------------------------------------------------------------

SIZES = [(65, 47), (33, 97), (97, 129), (3, 5), (1, 1), (64, 64), (7, 2), (13, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_export_path_pooling_equals_pytorch(dtype):
    g = torch.Generator().manual_seed(1)
    bins = [(1, 1), (2, 2), (3, 3), (6, 6), (2, 5), (8, 1)]
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w, generator=g, dtype=dtype)
        x[0, 0, 0, 0] = x[0, 0, -1, -1] = x[0, 0].max()  # a tie: the first one in row-major order wins
        avg, _ = export.multi_pool2d(x, bins, "avg", "adaptive")
        mx, idx = export.multi_pool2d(x, bins, "max", "adaptive", return_indices=True)
        for b, a, m, i in zip(bins, avg, mx, idx):
            assert_close(a, F.adaptive_avg_pool2d(x, b), f"avg {b} at {h}x{w}",
                         rel=1e-5 if dtype == torch.float32 else 1e-12)
            ref_m, ref_i = F.adaptive_max_pool2d(x, b, return_indices=True)
            assert torch.equal(m, ref_m), f"max {b} at {h}x{w}"
            assert torch.equal(i, ref_i), f"max indices {b} at {h}x{w}"


def _windows_fp64(x, bins, mode, window):
    """Independent fp64 pooling over the windows of pyramid_ext.windows."""
    out = []
    for bh, bw in bins:
        hw, ww = windows.pyramid_windows(x.shape[-2], x.shape[-1], [(bh, bw)], window)[:2]
        rows = [(hw[2 * k], hw[2 * k + 1]) for k in range(len(hw) // 2)]
        cols = [(ww[2 * k], ww[2 * k + 1]) for k in range(len(ww) // 2)]
        level = torch.empty(x.shape[0], x.shape[1], len(rows), len(cols), dtype=torch.float64)
        for i, (hs, he) in enumerate(rows):
            for j, (ws, we) in enumerate(cols):
                win = x[:, :, hs:he, ws:we].double()
                level[:, :, i, j] = win.mean((-2, -1)) if mode == "avg" else win.amax((-2, -1))
        out.append(level)
    return out


@pytest.mark.parametrize("window", ["sppnet", "keras_same"])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_export_path_window_policies(window, mode):
    g = torch.Generator().manual_seed(2)
    bins = [(1, 1), (2, 2), (3, 4)]
    checked = nan_checked = 0
    for h, w in SIZES + [(12, 16), (24, 36), (4, 8)]:
        x = torch.randn(1, 2, h, w, generator=g)
        got, _ = export.multi_pool2d(x, bins, mode, window)
        for b, level in zip(bins, got):
            try:
                (ref,) = _windows_fp64(x, [b], mode, window)
            except ValueError:  # undefined at this size: PyTorch raises, the graph gives NaN
                assert torch.isnan(level).all(), f"{window} {b} at {h}x{w}"
                nan_checked += 1
                continue
            assert_close(level, ref.float(), f"{window} {mode} {b} at {h}x{w}")
            checked += 1
    assert checked >= 10 and nan_checked >= 1


def test_export_path_upsample_concat_equals_pytorch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 13, 6, generator=g)
    bs = [torch.randn(2, 2, s, s, generator=g) for s in (1, 2, 3, 6)]
    for ac in (False, True):
        ups = [F.interpolate(b, size=(13, 6), mode="bilinear", align_corners=ac) for b in bs]
        torch.testing.assert_close(export.upsample_concat(x, bs, (13, 6), ac, True), torch.cat([x] + ups, 1))
        torch.testing.assert_close(export.upsample_concat(x, bs, (13, 6), ac, False), torch.cat(ups + [x], 1))
        torch.testing.assert_close(export.upsample_concat(None, bs, (13, 6), ac, True), torch.cat(ups, 1))


def test_public_ops_outside_export_do_not_take_the_export_path(monkeypatch):
    # is_in_onnx_export() is False under eager, torch.compile and torch.export
    assert not export.active()
    called = []
    monkeypatch.setattr(export, "multi_pool2d", lambda *a, **k: called.append(a))
    x = torch.randn(1, 2, 8, 8)
    pe.multi_adaptive_avg_pool2d(x, (1, 2))
    torch.compile(lambda t: pe.multi_adaptive_avg_pool2d(t, (1, 2)), fullgraph=True, backend="eager")(x)
    assert called == []


def test_pool_takes_the_export_path_during_onnx_export_even_when_cached(monkeypatch):
    """The eager fast path runs before the export check (its C++ gate reads the
    exporters' flags itself): with an entry cached for the call, a
    pooling call during ONNX export still takes the standard-op path."""
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    x = torch.randn(1, 2, 8, 8)
    calls = [lambda: pe.multi_adaptive_avg_pool2d(x, (1, 2)), lambda: pe.multi_adaptive_max_pool2d(x, (1, 2)),
             lambda: pe.multi_adaptive_max_pool2d(x, (1, 2), return_indices=True)[1],
             lambda: pe.spatial_pyramid_pool(x, (2, 1), mode="avg")]
    want = [fn() for fn in calls]  # also fills the fast path's cache
    called = []
    for name in ("multi_pool2d", "spatial_pyramid_pool"):
        real = getattr(export, name)
        monkeypatch.setattr(export, name, lambda *a, real=real, name=name, **k: called.append(name) or real(*a, **k))
    monkeypatch.setattr(GLOBALS, "in_onnx_export", True)
    assert export.active()
    got = [fn() for fn in calls]
    monkeypatch.setattr(GLOBALS, "in_onnx_export", False)
    assert called[:4] == ["multi_pool2d"] * 3 + ["spatial_pyramid_pool"]  # (which pools through multi_pool2d)
    torch.testing.assert_close(got, want)


def test_out_is_refused_during_export_with_a_clear_error():
    with pytest.raises(ExportUnsupportedError, match=r"upsample_concat\(\): out= .* cannot express"):
        export.upsample_concat(None, [torch.randn(1, 1, 2, 2)], (4, 4), False, True, out=torch.empty(1, 1, 4, 4))


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

C = 8


class FunctionalUser(nn.Module):
    """A user's module calling every public op directly (several outputs)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        avg = pe.multi_adaptive_avg_pool2d(x, [1, (2, 3), 6])
        mx, idx = pe.multi_adaptive_max_pool2d(x, (2, 7), return_indices=True)
        spp = pe.spatial_pyramid_pool(x, (4, 2, 1), mode="avg")
        first = pe.upsample_concat(self.conv(x), avg, align_corners=False, x_first=False)
        alone = pe.upsample_concat(None, mx, size=(x.shape[-2] + 3, x.shape[-1] * 2), align_corners=True)
        unbatched = pe.multi_adaptive_max_pool2d(x[0], [3])[0]
        return first, alone, idx[0], idx[1], spp, unbatched


def _modules():
    P = pe.nn.PyramidPooling
    return {
        "PPM": lambda: pe.nn.PPM(C, 2, (1, 2, 3, 6)),
        "PSPModule": lambda: pe.nn.PSPModule(C, 6, (1, 2, 3, 6)),
        "paper": lambda: P.paper(C, 4),
        "mmseg": lambda: P.mmseg(C, 4),
        "smp": lambda: P.smp(C),
        "csail": lambda: P.csail(fc_dim=C, branch_channels=4, out_channels=4),
        "custom_gn_rect_bins": lambda: P(C, 4, [(1, 2), (3, 1), 5], norm="gn", gn_groups=2, x_first=False),
        "SPP_max_adaptive": lambda: pe.nn.SpatialPyramidPooling((4, 2, 1), "max"),
        "SPP_avg_adaptive": lambda: pe.nn.SpatialPyramidPooling((6, 3, (1, 2)), "avg"),
        # (few levels: the dynamo exporter is slow on keras_same's size expressions)
        "SPP_avg_keras_same": lambda: pe.nn.SpatialPyramidPooling((3, 1), "avg", window="keras_same"),
        "SPP_max_keras_same": lambda: pe.nn.SpatialPyramidPooling((2,), "max", window="keras_same"),
        "FPA": lambda: pe.nn.FeaturePyramidAttention(C, 4),
        "functional": FunctionalUser,
    }


MODULES = _modules()
# (H, W) at which the exported files are run; the export size is 24 x 20.
EXPORT_SIZE = (2, 24, 20)
RUN_SIZES = [(1, 65, 47), (2, 33, 97), (1, 97, 129), (1, 3, 5), (1, 1, 1), (3, 64, 64), (1, 6, 11), EXPORT_SIZE]
# window="sppnet" is defined only where kernel ceil(a/n), stride floor(a/n) give n bins for every level
SPPNET_SIZES = [(1, 12, 16), (2, 24, 24), (1, 4, 8), (1, 36, 20), (3, 16, 44), (1, 8, 4), (1, 40, 28)]


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize(MODULES[name]())


def as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def export_onnx(model, x, path, dynamo: bool, opset=None, batch=True):
    kwargs = {} if opset is None else {"opset_version": opset}
    if dynamo:
        dims = {2: torch.export.Dim("H", min=1, max=4096), 3: torch.export.Dim("W", min=1, max=4096)}
        if batch:
            dims[0] = torch.export.Dim("N", min=1, max=1024)
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=(dims,), **kwargs)
    else:
        axes = {2: "H", 3: "W"}
        if batch:
            axes[0] = "N"
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": axes}, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(name, dynamo, opset=None) -> path of ``make(name)`` exported with
    dynamic N, H, W at EXPORT_SIZE; each file is exported once per module run."""
    folder = tmp_path_factory.mktemp("onnx")
    files = {}

    def get(name: str, dynamo: bool, opset=None) -> str:
        need("onnx")
        need("onnxscript")
        key = (name, dynamo, opset)
        if key not in files:
            x = torch.randn(*EXPORT_SIZE[:1], C, *EXPORT_SIZE[1:])
            path = folder / f"{name}_{'dynamo' if dynamo else 'ts'}_{opset}.onnx"
            files[key] = export_onnx(make(name), x, path, dynamo, opset=opset)
        return files[key]

    return get


def check_graph(path: str):
    """Standard ONNX operators only: no custom domain, no ATen fallback."""
    onnx = need("onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model)
    domains = {n.domain for n in model.graph.node} | {f.domain for f in model.functions}
    assert domains <= {"", "ai.onnx"}, f"non-standard domains {domains}"
    ops = {n.op_type for n in model.graph.node}
    assert not any("ATen" in op or "pyramid" in op.lower() for op in ops), ops
    return model


def _file_key(path: str):
    """A file's identity for the runtime caches below: a file written again at
    the same path (new size or modification time) gets a new session."""
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size


# One runtime session per exported file, shared by every size a test runs it at
# (and by the tests sharing the `exported` fixture's files): each run reads only
# its own input, so a session serves every size as a fresh one would. Loading and
# optimizing a file cost more than running it at a small size. A few files only,
# so the larger converted models do not stay in memory.
@functools.lru_cache(maxsize=4)
def _onnxruntime_session(key):
    ort = need("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(key[0], opts, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=4)
def _openvino_model(key):
    ov = need("openvino")
    return ov.Core().compile_model(key[0], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def run_onnxruntime(path: str, x: torch.Tensor):
    need("onnxruntime")
    sess = _onnxruntime_session(_file_key(path))
    return [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


def run_openvino(path: str, x: torch.Tensor):
    need("openvino")
    compiled = _openvino_model(_file_key(path))
    result = compiled(x.numpy())
    return [torch.from_numpy(result[out].copy()) for out in compiled.outputs]


def check_sizes(model, path, sizes, runtime="onnxruntime", channels=C):
    run = run_onnxruntime if runtime == "onnxruntime" else run_openvino
    for n, h, w in sizes:
        x = torch.randn(n, channels, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
        try:
            with torch.no_grad():
                refs = as_list(model(x))
        except ValueError as e:
            # a window policy undefined at this size: PyTorch raises, the graph
            # cannot, so the affected levels are NaN (pyramid_ext.export)
            assert "window=" in str(e), e
            assert any(torch.isnan(g).any() for g in run(path, x)), f"{runtime}: no NaN at {h}x{w}"
            continue
        got = run(path, x)
        assert len(got) == len(refs)
        for k, (g, r) in enumerate(zip(got, refs)):
            assert_close(g, r, f"{runtime}, output {k} at {(n, C, h, w)}")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(MODULES))
def test_onnx_module_exact_at_every_size(name, dynamo, exported):
    need("onnxruntime")
    model = make(name)
    path = exported(name, dynamo)
    check_graph(path)
    check_sizes(model, path, RUN_SIZES)


# The other tests export with the exporters' default opset (20 with torch 2.14);
# here 17 and 18.
@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["PPM", "SPP_max_adaptive"])
def test_onnx_opsets(name, dynamo, opset, exported):
    need("onnxruntime")
    model = make(name)
    path = exported(name, dynamo, opset)
    assert [o.version for o in check_graph(path).opset_import if o.domain in ("", "ai.onnx")] == [opset]
    check_sizes(model, path, RUN_SIZES[:7])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_onnx_sppnet_window(mode, dynamo, tmp_path):
    need("onnxruntime")
    model = pe.nn.SpatialPyramidPooling((4, 2, 1), mode, window="sppnet").eval()
    path = export_onnx(model, torch.randn(2, C, 24, 24), tmp_path / "spp.onnx", dynamo)
    check_graph(path)
    check_sizes(model, path, SPPNET_SIZES)
    # where the policy is undefined PyTorch raises; the graph cannot, so it returns NaN for that level
    x = torch.randn(1, C, 7, 24)
    with pytest.raises(ValueError, match="sppnet"):
        model(x)
    (got,) = run_onnxruntime(path, x)
    assert torch.isnan(got[:, : C * 16]).all()
    # an example input the policy rejects is refused at export, as in eager mode
    # (the dynamo exporter wraps the ValueError in its own error, with the message)
    with pytest.raises(Exception, match=r"SpatialPyramidPooling\(levels=.*window='sppnet'\) cannot be exported "
                                        r"with this example input: window='sppnet' cannot pool a size of 7 into 4 bins"):
        export_onnx(model, x, tmp_path / "bad.onnx", dynamo)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["PPM", "PSPModule", "SPP_max_adaptive", "SPP_avg_keras_same", "functional"])
def test_openvino_runs_the_same_files(name, dynamo, exported):
    need("openvino")
    model = make(name)
    path = exported(name, dynamo)
    check_sizes(model, path, RUN_SIZES, runtime="openvino")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_max_nan_and_inf_like_pytorch(dynamo, exported):
    need("onnxruntime")
    model = make("SPP_max_adaptive")
    path = exported("SPP_max_adaptive", dynamo)
    x = torch.randn(2, C, 13, 11)
    x[0, 0, 1, 1] = x[1, 3, 12, 10] = float("nan")
    x[1, 2, 7, 7] = float("inf")
    x[0, 5] = -float("inf")  # a whole plane
    (got,) = run_onnxruntime(path, x)
    ref = model(x)
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(got.nan_to_num(0.0), ref.nan_to_num(0.0))


def test_onnx_export_needs_no_extra_arguments(tmp_path):
    """The plain call from the issue, both exporters, static size."""
    need("onnxruntime")
    model = randomize(pe.nn.PPM(C, 2, (1, 2, 3, 6)))
    x = torch.randn(1, C, 64, 64)
    for dynamo in (True, False):
        path = str(tmp_path / f"plain_{dynamo}.onnx")
        torch.onnx.export(model, (x,), path, dynamo=dynamo)
        check_graph(path)
        with torch.no_grad():
            assert_close(run_onnxruntime(path, x)[0], model(x), f"plain export dynamo={dynamo}")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_pspnet_end_to_end(dynamo, tmp_path):
    """pyramid_ext.nn.PSPNet (ResNet-50 backbone, weights=None): the output size
    int((H - 1) / 8 * zoom + 1) stays symbolic, the PPM exact at every size."""
    need("onnxruntime")
    need("torchvision")
    torch.manual_seed(0)
    model = randomize(pe.nn.PSPNet(layers=50, classes=2, zoom_factor=4))
    path = export_onnx(model, torch.randn(2, 3, 40, 36), tmp_path / "pspnet.onnx", dynamo)
    check_graph(path)
    # the backbone's output stride is 8: 65x47 -> 9x6 features, 17x9 -> 3x2 (below the bin 6), 3x5 -> 1x1
    check_sizes(model, path, [(1, 65, 47), (1, 17, 9), (1, 3, 5), (2, 33, 97), (1, 1, 1), (1, 40, 36)], channels=3)


# ---- converted models ----------------------------------------------------


def smp_model(arch, names, **kw):
    def build():
        smp = need("segmentation_models_pytorch")
        torch.manual_seed(0)
        model = randomize(getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=3, **kw))
        report = pe.convert(model)
        assert report.names == names
        return model
    return build


smp_pspnet = smp_model("PSPNet", ["decoder", "decoder.psp"])


def tv_deeplab():
    segmentation = need("torchvision.models.segmentation")
    torch.manual_seed(0)
    model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    model = randomize(model)
    report = pe.convert(model)
    assert report.names == ["classifier.0", "classifier.0.convs.4"]
    return model


class OutTensor(nn.Module):
    """torchvision's segmentation models return a dict, transformers' an output
    object; export the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out["out"]


def hf_upernet():
    transformers = need("transformers")
    torch.manual_seed(0)
    backbone = transformers.ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=3, auxiliary_channels=8)
    model = randomize(transformers.UperNetForSemanticSegmentation(cfg))
    assert pe.convert(model).names == ["decode_head"]
    return OutTensor(model).eval()


def hf_segformer():
    transformers = need("transformers")
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 40, 64], decoder_hidden_size=32,
                                       num_attention_heads=[1, 1, 2, 2], num_labels=3)
    model = randomize(transformers.SegformerForSemanticSegmentation(cfg))
    assert pe.convert(model).names == ["decode_head"]
    return OutTensor(model).eval()


CONVERTED = {"smp_pspnet": smp_pspnet, "tv_deeplabv3": lambda: OutTensor(tv_deeplab()).eval(),
             "smp_upernet": smp_model("UPerNet", ["decoder", "decoder.psp"], decoder_channels=16),
             "smp_segformer": smp_model("Segformer", ["decoder"], decoder_segmentation_channels=16),
             "hf_upernet": hf_upernet, "hf_segformer": hf_segformer}
# smp checks that H and W divide by its output stride (8 for PSPNet, 32 for
# UPerNet and Segformer); the pyramid then sees H/8 x W/8: 65x47, 3x5 (below the bin 6), 1x1, ...
_STRIDE32 = [(1, 32 * h, 32 * w) for h, w in [(3, 5), (1, 1), (2, 7), (5, 2)]]
CONVERTED_SIZES = {
    "smp_pspnet": [(1, 8 * h, 8 * w) for h, w in [(65, 47), (33, 17), (3, 5), (1, 1), (6, 11), (12, 9)]],
    "tv_deeplabv3": [(1, 65, 47), (1, 33, 97), (1, 97, 129), (1, 3, 5), (1, 1, 1), (1, 64, 64)],
    "smp_upernet": _STRIDE32, "smp_segformer": _STRIDE32,
    "hf_upernet": [(1, 65, 47), (1, 33, 97), (1, 97, 129), (1, 32, 32), (1, 40, 72)],
    "hf_segformer": [(1, 65, 47), (1, 33, 97), (1, 97, 129), (1, 32, 32), (1, 40, 72)],
}
# smp asserts H % s == W % s == 0 (s its output stride): H and W are multiples of s
SMP_STRIDE = {"smp_pspnet": 8, "smp_upernet": 32, "smp_segformer": 32}
# the newer converted models, one exporter x opset each (keeps the test time small)
NEW_CONVERTED = ["smp_upernet", "smp_segformer", "hf_upernet", "hf_segformer"]


def _export_converted(name, model, x, path, dynamo, opset=None):
    kwargs = {} if opset is None else {"opset_version": opset}
    if dynamo and name in SMP_STRIDE:
        s = SMP_STRIDE[name]
        dims = {2: s * torch.export.Dim("h", min=1, max=4096 // s), 3: s * torch.export.Dim("w", min=1, max=4096 // s)}
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=(dims,), **kwargs)
    else:
        export_onnx(model, x, path, dynamo, opset=opset, batch=False)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["smp_pspnet", "tv_deeplabv3"])
def test_onnx_converted_models(name, dynamo, tmp_path):
    need("onnxruntime")
    model = CONVERTED[name]()
    x = torch.randn(1, 3, 64, 48)
    path = tmp_path / f"{name}.onnx"
    _export_converted(name, model, x, path, dynamo)
    check_graph(str(path))
    check_sizes(model, str(path), CONVERTED_SIZES[name] + [(1, 64, 48)], channels=3)
    check_sizes(model, str(path), CONVERTED_SIZES[name][:3], runtime="openvino", channels=3)


@pytest.mark.parametrize("dynamo,opset", [(True, 18), (False, 17)], ids=["dynamo-opset18", "torchscript-opset17"])
@pytest.mark.parametrize("name", NEW_CONVERTED)
def test_onnx_concat_free_models(name, dynamo, opset, tmp_path):
    """The concat-free heads export as the concatenating computation (standard ops)
    and run in onnxruntime equal to PyTorch at several sizes."""
    need("onnxruntime")
    model = CONVERTED[name]()
    x = torch.randn(1, 3, 64, 96)
    path = tmp_path / f"{name}.onnx"
    _export_converted(name, model, x, path, dynamo, opset)
    onnx_model = check_graph(str(path))
    assert [o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    check_sizes(model, str(path), CONVERTED_SIZES[name] + [(1, 64, 96)], channels=3)


# --------------------------------------------------------------------------
# torch.export keeps the fused ops; AOTInductor runs them
# --------------------------------------------------------------------------


def _fused_targets(ep):
    return {str(n.target) for n in ep.graph.nodes if "pyramid_ext" in str(n.target)}


# keras_same's window count depends on the size, so the fused op's window list
# cannot be symbolic: with dynamic H and W those modules export as standard ops
# (windows computed in the graph, the count an unbacked size); the others keep the fused ops
STANDARD_OPS_UNDER_DYNAMIC_EXPORT = [n for n in MODULES if "keras_same" in n]


ROUND_TRIP = list(MODULES) + list(CONVERTED)


def _converted_export_case(name):
    """(example input, dynamic_shapes dims, sizes to compare at) for torch.export of a
    converted model with dynamic H and W. The constraints are what the library's own
    (unconverted) model needs to export, no more: the converted heads add no guard on
    H or W (the libraries' lines that emit each guard are named below)."""
    dim = torch.export.Dim
    if name in SMP_STRIDE:
        st = SMP_STRIDE[name]
        # smp asserts H % s == W % s == 0 (s its output stride), so H = s*h, W = s*w. And
        # h, w >= 2: the resnet encoder's last BasicBlock guards on its 1/32 map not being 1 pixel
        # high or wide (torchvision/models/resnet.py:92-94, conv1, bn1, relu: the layout checks of
        # a map with a size-1 axis), so the unconverted model exports with this range too (its own
        # UPerNet decoder adds the same guards, smp decoders/upernet/decoder.py:45, 59-63).
        # 8x8 for PSPNet, 32x32 for the others, is outside it.
        x = torch.randn(1, 3, 64, 96) if st == 32 else torch.randn(1, 3, 64, 48)
        dims = {2: st * dim("h", min=2, max=4096 // st), 3: st * dim("w", min=2, max=4096 // st)}
        sizes = [s for s in CONVERTED_SIZES[name] if min(s[1:]) >= 2 * st][:4]
        return x, dims, sizes
    if name == "hf_upernet":
        # The ConvNext backbone (transformers/models/convnext/modeling_convnext.py): its stages'
        # outputs are channels_last-strided (ConvNextLayer permutes to NHWC and back), so the
        # eval-mode BatchNorm of UperNetConvModule (modeling_upernet.py:56, on each lateral
        # conv's output, modeling_upernet.py:173) makes torch pick the output layout by stride
        # comparisons (torch/_prims_common/__init__.py `should_swap`), guards such as
        # `1 % (16 * (W // 4)) != 0` that the solver proves only when W is a multiple of 32; and
        # the stage-4 downsampling conv (modeling_convnext.py:187) guards H/32 > 1 (the layout of
        # a 1-pixel-high map). The unconverted model exports under exactly these Dims.
        x = torch.randn(2, 3, 64, 96)
        dims = {2: 32 * dim("h", min=2, max=128), 3: 32 * dim("w", min=2, max=128)}
        return x, dims, [(2, h, w) for h, w in [(64, 64), (96, 160), (64, 224), (160, 64), (128, 96)]]
    if name == "hf_segformer":
        # The efficient self-attention of stage 1 (transformers/models/segformer/modeling_segformer.py:106,
        # the sequence-reduction conv, kernel and stride 8 over the H/4 map) gives 1 row below H = 61,
        # which torch.export specializes (the unconverted model: the same range)
        x = torch.randn(2, 3, 64, 96)
        dims = {2: dim("H", min=64, max=4096), 3: dim("W", min=64, max=4096)}
        return x, dims, [(2, h, w) for h, w in [(65, 97), (97, 129), (64, 64), (129, 71), (80, 200)]]
    # DeepLabV3: the stride-2 convolutions of MobileNet would otherwise need guards on sizes near 1
    assert name == "tv_deeplabv3", name
    dims = {2: dim("H", min=32, max=4096), 3: dim("W", min=32, max=4096)}
    sizes = [(2, h, w) for h, w in [(65, 47), (33, 97), (97, 129), (32, 32)]]
    return torch.randn(2, 3, 40, 36), dims, sizes


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_torch_export_round_trip_dynamic_hw(name):
    model = make(name) if name in MODULES else CONVERTED[name]()
    channels = 3 if name in CONVERTED else C
    if name in CONVERTED:
        x, dims, sizes = _converted_export_case(name)
    else:
        # the stride-2 convolutions of FPA would otherwise need guards on sizes near 1
        low = {"FPA": 8}.get(name, 1)
        x = torch.randn(2, channels, 40, 36)
        dims = {2: torch.export.Dim("H", min=low, max=4096), 3: torch.export.Dim("W", min=low, max=4096)}
        sizes = [(2, h, w) for h, w in [(65, 47), (33, 97), (97, 129), (3, 5), (1, 1), (8, 8), (32, 32)]
                 if min(h, w) >= low]
    ep = torch.export.export(model, (x,), dynamic_shapes=(dims,))
    if name in STANDARD_OPS_UNDER_DYNAMIC_EXPORT:
        assert not _fused_targets(ep)
        # sizes where keras_same is defined for every level (round(a / n) >= 1)
        sizes = [(n, h, w) for n, h, w in sizes if min(h, w) >= 4] + [(2, 4, 7), (2, 5, 6)]
    else:
        assert _fused_targets(ep), "the exported program lost the fused ops"
    for n, h, w in sizes:
        xx = torch.randn(n, channels, h, w)
        with torch.no_grad():
            for k, (g, r) in enumerate(zip(as_list(ep.module()(xx)), as_list(model(xx)))):
                assert_close(g, r, f"{name}: output {k} at {h}x{w}")


def test_torch_export_keras_same_static_keeps_fused_ops():
    model = make("SPP_max_keras_same")
    x = torch.randn(2, C, 40, 36)
    ep = torch.export.export(model, (x,))
    assert _fused_targets(ep)
    assert_close(ep.module()(x), model(x), "static keras_same export")


def test_torch_export_keras_same_dynamic_named_backend_raises():
    class Named(torch.nn.Module):
        def forward(self, x):
            return pe.spatial_pyramid_pool(x, (2, 1), mode="avg", window="keras_same", backend="cpp")

    dims = {2: torch.export.Dim("H", min=4, max=512), 3: torch.export.Dim("W", min=4, max=512)}
    with pytest.raises(Exception, match=r"window='keras_same' with a dynamic height or width cannot run on "
                                        r"backend='cpp' under torch.export"):
        torch.export.export(Named(), (torch.randn(1, C, 40, 36),), dynamic_shapes=(dims,))


@pytest.mark.skipif(os.environ.get("CI") == "true" and not REQUIRE,
                    reason="AOTInductor compiles for about 40 s: CI runs this once, in `make test-cuda-env`")
def test_aoti_package_runs_the_fused_ops(tmp_path):
    """AOTInductor compiles a fused PPM into a package that calls the extension's ops."""
    model = make("PPM")
    x = torch.randn(2, C, 24, 20)
    dims = {2: torch.export.Dim("H", min=2, max=1024), 3: torch.export.Dim("W", min=2, max=1024)}
    ep = torch.export.export(model, (x,), dynamic_shapes=(dims,))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "ppm.pt2"))
    with zipfile.ZipFile(path) as z:  # the ops the package's code calls through the dispatcher
        calls = b"".join(z.read(n) for n in z.namelist() if n.endswith(".json"))
    assert b'"pyramid_ext::multi_pool2d"' in calls and b'"pyramid_ext::upsample_concat"' in calls
    loaded = torch._inductor.aoti_load_package(path)
    for h, w in [(24, 20), (65, 47), (3, 5), (97, 129)]:
        xx = torch.randn(2, C, h, w)
        with torch.no_grad():
            assert_close(loaded(xx), model(xx), f"AOTInductor at {h}x{w}")
