"""Custom-op citizenship: opcheck, fake kernels, torch.compile, autocast."""
import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pyramid_ext as pe

from .conftest import need_backend

ops = None


@pytest.fixture(autouse=True)
def _cpp():
    need_backend("cpp")
    global ops
    ops = torch.ops.pyramid_ext


def _bounds(size, n):
    out = []
    for i in range(n):
        out += [(i * size) // n, -((-(i + 1) * size) // n)]
    return out


def _pool_args(shape, bins, mode, cl, requires_grad=True):
    x = torch.randn(shape, dtype=torch.float64)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(requires_grad)
    hb, wb, lb = [], [], []
    for b in bins:
        hb += _bounds(shape[2], b)
        wb += _bounds(shape[3], b)
        lb += [b, b]
    return (x, hb, wb, lb, mode, cl)


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("cl", [False, True])
def test_opcheck_multi_pool2d(mode, cl):
    args = _pool_args((2, 3, 11, 7), (1, 2, 3), mode, cl)
    if mode == 1:  # distinct values: gradients of max are well defined
        with torch.no_grad():
            args[0].copy_(torch.randperm(args[0].numel()).view(args[0].shape).double())
    torch.library.opcheck(ops.multi_pool2d.default, args)


@pytest.mark.parametrize("mode", [0, 1])
def test_opcheck_multi_pool2d_backward(mode):
    x, hb, wb, lb, _, cl = _pool_args((2, 3, 11, 7), (1, 2, 3), mode, False, requires_grad=False)
    values, indices = ops.multi_pool2d(x, hb, wb, lb, mode, False)
    grad = torch.randn_like(values)
    torch.library.opcheck(ops.multi_pool2d_backward.default,
                          (grad, indices if mode == 1 else None, list(x.shape), hb, wb, lb, mode, False, False))


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
def test_opcheck_upsample_concat(cl, x_first):
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    br = [torch.randn(2, c, s, s, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
          for c, s in ((1, 1), (2, 3))]
    torch.library.opcheck(ops.upsample_concat.default, (x, br, [9, 7], False, x_first, cl))
    torch.library.opcheck(ops.upsample_concat.default, (None, br, [5, 4], True, x_first, cl))


def test_opcheck_upsample_concat_out_and_backward():
    x = torch.randn(2, 3, 9, 7)
    br = [torch.randn(2, 2, 3, 3)]
    out = torch.empty(2, 5, 9, 7)
    torch.library.opcheck(ops.upsample_concat_out.default, (x, br, True, True, out))
    g = torch.randn(2, 5, 9, 7)
    torch.library.opcheck(ops.upsample_concat_backward.default, (g, [2, 3, 3], 3, True, False))


def _ppm_like(x):
    levels = pe.multi_adaptive_avg_pool2d(x, (1, 2, 3, 6))
    return pe.upsample_concat(x, [t * 2 for t in levels], align_corners=True)


def _ppm_eager(x):
    levels = [F.adaptive_avg_pool2d(x, b) for b in (1, 2, 3, 6)]
    ups = [F.interpolate(t * 2, x.shape[-2:], mode="bilinear", align_corners=True) for t in levels]
    return torch.cat([x] + ups, 1)


def test_compile_fullgraph_inductor():
    fn = torch.compile(_ppm_like, fullgraph=True)
    x = torch.randn(2, 4, 13, 17, requires_grad=True)
    out = fn(x)
    torch.testing.assert_close(out, _ppm_eager(x))
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    _ppm_eager(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_compile_max_and_spp_fullgraph():
    def fn(x):
        vals, idx = pe.multi_adaptive_max_pool2d(x, (1, 3), return_indices=True)
        return pe.spatial_pyramid_pool(x, (4, 2, 1)), vals[1], idx[1]

    x = torch.randn(2, 3, 14, 9)
    spp, v, i = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    want_v, want_i = F.adaptive_max_pool2d(x, 3, return_indices=True)
    torch.testing.assert_close(spp, torch.cat([F.adaptive_max_pool2d(x, b).flatten(1) for b in (4, 2, 1)], 1))
    assert torch.equal(v, want_v) and torch.equal(i, want_i)


def test_compile_dynamic_no_recompile_per_size():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    fn = torch.compile(_ppm_like, backend=counter, fullgraph=True, dynamic=True)
    for h, w in [(13, 17), (20, 31), (33, 47), (64, 64), (61, 29)]:
        x = torch.randn(2, 4, h, w)
        torch.testing.assert_close(fn(x), _ppm_eager(x))
    assert counter.frame_count == 1, f"recompiled {counter.frame_count} times"


def test_compile_dynamic_backward_aot():
    torch._dynamo.reset()
    fn = torch.compile(_ppm_like, backend="aot_eager", fullgraph=True, dynamic=True)
    for h, w in [(13, 17), (40, 23)]:
        x = torch.randn(1, 3, h, w, requires_grad=True)
        fn(x).square().sum().backward()
        x2 = x.detach().clone().requires_grad_()
        _ppm_eager(x2).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)


def test_autocast_runs_in_input_dtype():
    # The ops are not autocast-listed: under autocast they run in the input's
    # dtype (as F.adaptive_avg_pool2d and F.interpolate do), same values.
    x = torch.randn(1, 4, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        levels = pe.multi_adaptive_avg_pool2d(x, (1, 2))
        out = pe.upsample_concat(x, levels)
        eager = F.adaptive_avg_pool2d(x, 2)
        ref = torch.cat([x] + [F.interpolate(t, (12, 12), mode="bilinear") for t in levels], 1)
    assert levels[1].dtype == eager.dtype == torch.float32
    assert out.dtype == ref.dtype == torch.float32
    # the values, against eager outside autocast
    torch.testing.assert_close(levels[0], F.adaptive_avg_pool2d(x, 1))
    torch.testing.assert_close(levels[1], F.adaptive_avg_pool2d(x, 2))
    want = torch.cat([x] + [F.interpolate(F.adaptive_avg_pool2d(x, b), (12, 12), mode="bilinear") for b in (1, 2)], 1)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out, ref)


def test_build_info():
    info = pe.build_info()
    assert info["extension"] is True
    assert isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool)
    for op in ("multi_pool2d", "multi_pool2d_backward", "upsample_concat", "upsample_concat_out",
               "upsample_concat_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyramid_ext::{op}", "CPU")


def _needed(path: str):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[-1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


_LINUX_BINUTILS = pytest.mark.skipif(not sys.platform.startswith("linux") or not shutil.which("readelf")
                                     or not shutil.which("g++"), reason="needs Linux, g++ and readelf")


@_LINUX_BINUTILS
def test_extension_links_torchs_libstdcxx():
    """_C.so uses the shared libstdc++ that torch loaded (setup.py's torch_libstdcxx), and an
    error message's numbers reach Python."""
    assert "libstdc++.so.6" in _needed(pe._C.__file__)
    with pytest.raises(RuntimeError, match=r"window \[0, 9\) along H is empty or outside \[0, 8\)"):
        ops.multi_pool2d(torch.zeros(1, 1, 8, 8), [0, 9], [0, 8], [1, 1], 0, False)


@_LINUX_BINUTILS
def test_setup_links_libstdcxx_dynamically_under_a_static_toolchain(tmp_path):
    """The defect torch_libstdcxx prevents, on a small library linked with
    -static-libstdc++ (as the GPU machine image's GCC 13 links): without the
    path it gets its own copy of libstdc++ (on this project's CI image that
    copy formats a number to nothing; on the GPU image it segfaulted); with the
    path torch_libstdcxx gives, it imports libstdc++ and formats the number.
    Each library is called in a child process, so a crash fails the test
    instead of ending it."""
    tree = ast.parse((pathlib.Path(__file__).parents[1] / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "torch_libstdcxx")
    scope = {"os": os, "sys": sys}
    exec(compile(ast.Module([fn], type_ignores=[]), "setup.py", "exec"), scope)
    libstdcxx = scope["torch_libstdcxx"]()
    assert len(libstdcxx) == 1 and os.path.basename(libstdcxx[0]).startswith("libstdc++.so")
    src = tmp_path / "fmt.cpp"
    src.write_text('#include <sstream>\n#include <string>\n'
                   'extern "C" int fmt(long v, char* buf) { std::ostringstream s; s << "v=" << v;'
                   ' std::string r = s.str(); r.copy(buf, r.size()); buf[r.size()] = 0; return (int)r.size(); }\n')
    call = ("import ctypes, sys\nbuf = ctypes.create_string_buffer(64)\n"
            "ctypes.CDLL(sys.argv[1]).fmt(ctypes.c_long(42), buf)\nprint(buf.value.decode())\n")
    results = {}
    for name, extra in (("static", []), ("shared", libstdcxx)):
        lib = tmp_path / f"{name}.so"
        subprocess.run(["g++", "-O2", "-fPIC", "-shared", str(src), *extra, "-o", str(lib), "-static-libstdc++"],
                       check=True)
        run = subprocess.run([sys.executable, "-c", call, str(lib)], capture_output=True, text=True)
        results[name] = ("libstdc++.so.6" in _needed(str(lib)), run.returncode, run.stdout.strip())
    assert results["shared"] == (True, 0, "v=42"), results
    assert results["static"][0] is False, results  # the toolchain fault was really reproduced: a private copy


# --------------------------------------------------------------------------
# The backend table (pyramid_ext.backends)
# --------------------------------------------------------------------------


def _table_backends():
    names = ["cpp", "torch"]
    if "triton" in pe.available_backends("cpu") or "triton" in pe.available_backends("cuda"):
        names.append("triton")
    return names


def test_backend_table_one_signature_per_op():
    """Every entry has every op, with the very same parameters: functional.py
    calls them all the same way."""
    import inspect

    from pyramid_ext import backends

    names = _table_backends()
    for name in names:
        backends._load(name)
    for op in backends.OPS:
        sigs = {name: list(inspect.signature(getattr(backends.implementation(name), op)).parameters)
                for name in names}
        assert len({tuple(s) for s in sigs.values()}) == 1, f"{op}: {sigs}"


def _ppm_on(backend_name):
    def fn(x):
        levels = pe.multi_adaptive_avg_pool2d(x, (1, 2, 3, 6), backend=backend_name)
        spp = pe.spatial_pyramid_pool(x, (2, 1), mode="max", backend=backend_name)
        sppnet = pe.spatial_pyramid_pool(x, (2, 1), mode="avg", window="sppnet", backend=backend_name)
        return pe.upsample_concat(x, [t * 2 for t in levels], align_corners=True, backend=backend_name), spp, sppnet

    return fn


def _ppm_on_eager(x):
    sppnet = []
    for n in (2, 1):  # SPPNet's windows: kernel ceil(a/n), stride floor(a/n)
        kernel = (-(-x.shape[-2] // n), -(-x.shape[-1] // n))
        stride = (x.shape[-2] // n, x.shape[-1] // n)
        sppnet.append(F.avg_pool2d(x, kernel, stride).flatten(1))
    spp = torch.cat([F.adaptive_max_pool2d(x, b).flatten(1) for b in (2, 1)], 1)
    return _ppm_eager(x), spp, torch.cat(sppnet, 1)


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_compile_dynamic_through_the_table(backend_name):
    """Every backend's table entry traces into one graph (fullgraph), and with
    dynamic=True the adaptive windows stay symbolic: one compilation for
    every size, the torch backend's check for adaptive windows included."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    fn = torch.compile(_ppm_on(backend_name), backend=counter, fullgraph=True, dynamic=True)
    for h, w in [(12, 16), (20, 30), (34, 46)]:  # SPPNet's windows need sizes that give n windows
        x = torch.randn(2, 4, h, w)
        for got, want in zip(fn(x), _ppm_on_eager(x)):
            torch.testing.assert_close(got, want)
    # sppnet's window count depends on the size (windows.sppnet_windows reads
    # it as an int), so that part specializes; the rest must not recompile.
    torch._dynamo.reset()
    counter = CompileCounter()
    adaptive_only = torch.compile(lambda x: _ppm_on(backend_name)(x)[:2], backend=counter, fullgraph=True,
                                  dynamic=True)
    for h, w in [(13, 17), (20, 31), (33, 47), (61, 29)]:
        x = torch.randn(2, 4, h, w)
        for got, want in zip(adaptive_only(x), _ppm_on_eager(x)[:2]):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1, f"recompiled {counter.frame_count} times"


# --------------------------------------------------------------------------
# Op schemas: the Triton ops' (from pyramid_ext._ops.SCHEMAS) equal the compiled ones
# --------------------------------------------------------------------------


def _schema_fields(schema):
    """Everything of a schema but its name: the text after the name (types as
    written, SymInt included, defaults, alias annotations, returns) and the
    parsed arguments and returns."""

    def arg(a):
        alias = a.alias_info
        return (a.name, str(a.type), str(a.real_type), a.N, a.has_default_value(), a.default_value, a.kwarg_only,
                a.is_out, None if alias is None else (alias.is_write, sorted(alias.before_set), sorted(alias.after_set)))

    text = str(schema)
    return dict(text=text[text.index("("):], overload=schema.overload_name, mutable=schema.is_mutable,
                arguments=[arg(a) for a in schema.arguments], returns=[arg(r) for r in schema.returns])


def _schema_diff(compiled, other) -> list:
    a, b = _schema_fields(compiled), _schema_fields(other)
    return [f"{key}: compiled {a[key]!r} != {b[key]!r}" for key in a if a[key] != b[key]]


def _registered_schemas(suffix: str):
    """{op: schema} of the registered pyramid_ext ops whose name ends with
    `suffix` ("" for the compiled ones: those without the "_triton" suffix)."""
    out = {}
    for s in torch._C._jit_get_all_schemas():
        if not s.name.startswith("pyramid_ext::"):
            continue
        name = s.name[len("pyramid_ext::"):]
        if suffix and name.endswith(suffix):
            out[name[: -len(suffix)]] = s
        elif not suffix and not name.endswith("_triton"):
            out[name] = s
    return out


def _triton_loaded() -> bool:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    import pyramid_ext.triton  # noqa: F401  (registers the pyramid_ext::*_triton ops)

    return True


def test_triton_schemas_equal_compiled():
    """Every compiled op has a Triton op with the same schema (argument names,
    types, defaults, alias annotations, returns) and vice versa: checked on
    the Python statement the Triton ops are declared from and, where Triton
    is installed, on the registered Triton ops themselves."""
    from pyramid_ext import _ops

    compiled = _registered_schemas("")
    assert compiled, "no compiled op registered"
    sides = {"pyramid_ext._ops.SCHEMAS": {op: torch._C.parse_schema("pyramid_ext::" + _ops.schema(op, "_triton"))
                                          for op in _ops.SCHEMAS}}
    if _triton_loaded():
        sides["registered Triton ops"] = _registered_schemas("_triton")
    for side, schemas in sides.items():
        assert set(compiled) == set(schemas), (
            f"compiled only: {sorted(set(compiled) - set(schemas))}; {side} only: {sorted(set(schemas) - set(compiled))}")
        for op in compiled:
            assert schemas[op].name == f"pyramid_ext::{op}_triton"
            diff = _schema_diff(compiled[op], schemas[op])
            assert not diff, f"{op} ({side}): " + "; ".join(diff)


@pytest.mark.parametrize("change", [("SymInt[] h_bounds", "int[] h_bounds"),
                                    ("bool channels_last_input", "bool channels_last_input=False"),
                                    ("Tensor? indices", "Tensor indices"), ("int mode", "int modes"),
                                    ("-> Tensor", "-> Tensor(a)")])
def test_schema_diff_sees_every_field(change):
    """The comparison above can fail: one changed type, default, optional
    marker, name or alias annotation is a difference."""
    from pyramid_ext import _ops

    op = "multi_pool2d_backward"
    compiled = _registered_schemas("")[op]
    text = _ops.schema(op, "_triton")
    assert change[0] in text
    changed = torch._C.parse_schema("pyramid_ext::" + text.replace(change[0], change[1]))
    assert _schema_diff(compiled, changed)
    assert not _schema_diff(compiled, torch._C.parse_schema("pyramid_ext::" + text))
