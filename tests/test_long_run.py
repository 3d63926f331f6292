"""Long runs: 20,000 calls of each op (forward and backward, NCHW and
channels_last) leave resident memory flat and no Python objects behind; a
saved model (fused modules, converted models) loads in a fresh process.

The repeated-call tests are marked `long` (about a minute): `make test-long`
runs them (PYRAMID_EXT_LONG=1); `make test` skips them, saying so.
"""
import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import pyramid_ext as pe

from .conftest import need_backend

CALLS = 20_000
WARMUP = 2_000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ops(kind):
    fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 8, 17, 19).contiguous(memory_format=fmt).requires_grad_(True)
    br = [torch.randn(2, 3, b, b).contiguous(memory_format=fmt).requires_grad_(True) for b in (1, 2, 3, 6)]

    def avg():
        sum(t.sum() for t in pe.multi_adaptive_avg_pool2d(x, (1, 2, 3, 6))).backward()

    def max_():
        sum(t.sum() for t in pe.multi_adaptive_max_pool2d(x, (1, 2, 3, 6))).backward()

    def spp():
        pe.spatial_pyramid_pool(x, (4, 2, 1)).sum().backward()

    def up():
        pe.upsample_concat(x, br).sum().backward()

    return {"avg": avg, "max": max_, "spp": spp, "upsample_concat": up}, [x] + br


@pytest.mark.long
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("op", ["avg", "max", "spp", "upsample_concat"])
def test_many_calls_leave_memory_flat(op, kind):
    need_backend("cpp")
    ops, leaves = _ops(kind)
    call = ops[op]
    for _ in range(WARMUP):
        call()
    for t in leaves:
        t.grad = None
    gc.collect()
    rss0, objs0 = _rss_bytes(), len(gc.get_objects())
    for i in range(CALLS):
        call()
        if i % 1000 == 0:
            for t in leaves:
                t.grad = None
    for t in leaves:
        t.grad = None
    gc.collect()
    rss1, objs1 = _rss_bytes(), len(gc.get_objects())
    assert rss1 <= rss0 * 1.05, f"{op} {kind}: RSS grew from {rss0 / 2**20:.1f} MiB to {rss1 / 2**20:.1f} MiB"
    assert objs1 <= objs0, f"{op} {kind}: {objs1 - objs0} more Python objects after {CALLS} calls"


def _run_fresh(code: str, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_saved_fused_model_loads_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(pe.nn.PyramidPooling(8, 2, out_channels=4, out_kernel_size=3), nn.Conv2d(4, 2, 1),
                          pe.nn.SpatialPyramidPooling((2, 1))).double().eval()
    x = torch.randn(2, 8, 11, 13, dtype=torch.float64)
    torch.save({"model": model, "state": model.state_dict(), "x": x, "y": model(x).detach()}, tmp_path / "m.pt")
    out = _run_fresh("""
        import sys, torch, pyramid_ext as pe
        saved = torch.load(sys.argv[1], weights_only=False)
        m = saved["model"]
        assert type(m[0]) is pe.nn.PyramidPooling, type(m[0])
        torch.testing.assert_close(m(saved["x"]), saved["y"], rtol=0, atol=0)
        fresh = torch.nn.Sequential(pe.nn.PyramidPooling(8, 2, out_channels=4, out_kernel_size=3),
                                    torch.nn.Conv2d(4, 2, 1), pe.nn.SpatialPyramidPooling((2, 1))).double().eval()
        fresh.load_state_dict(saved["state"])
        torch.testing.assert_close(fresh(saved["x"]), saved["y"], rtol=0, atol=0)
        print("ok")
    """, str(tmp_path / "m.pt"))
    assert out.strip() == "ok"


def test_saved_converted_model_loads_in_fresh_process(tmp_path):
    deeplab = pytest.importorskip("torchvision.models.segmentation.deeplabv3")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), deeplab.ASPPPooling(8, 4)).double().eval()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    want = model(x).detach()
    report = pe.convert(model, example_input=x)
    assert report.names == ["1"]
    torch.save({"model": model, "x": x, "y": want}, tmp_path / "c.pt")
    out = _run_fresh("""
        import sys, torch, pyramid_ext as pe
        saved = torch.load(sys.argv[1], weights_only=False)
        m = saved["model"]
        assert type(m[1]).__name__ == "FusedASPPPooling", type(m[1])
        torch.testing.assert_close(m(saved["x"]), saved["y"])
        print("ok")
    """, str(tmp_path / "c.pt"))
    assert out.strip() == "ok"
