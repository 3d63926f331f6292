"""Every CPU code path, forced, and bitwise determinism across thread counts
and processes.

The CPU kernels choose a path from the machine and the thread count: the
float loops run the AVX-512, AVX2 or baseline copy (csrc/cpu/simd_loops.cpp),
NCHW float average pooling uses the AVX2 block kernel (block_cells.cpp) or
the portable simd::sum_rows loops, channels_last average pooling runs one
task per sample or splits its phases (multi_pool2d.cpp, from N and the
thread count). A CI machine runs one of each; the test-only switch
pyramid_ext._C._set_test_override forces the others, so each is checked
against PyTorch eager and, bit for bit, against the automatic choice (every
path sums in the same order).
"""
import hashlib
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyramid_ext as pe

from ._helpers import TOL, eager_pool, eager_upsample_concat, layout, rand
from .conftest import need_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISA_NAMES = {1: "baseline", 2: "avx2", 3: "avx512"}


@pytest.fixture(autouse=True)
def _c():
    need_backend("cpp")
    from pyramid_ext import _C

    yield _C
    for name in ("simd_isa", "no_block_kernel", "channels_last_avg_tasks"):
        _C._set_test_override(name, 0)


def _available_isas(_C):
    return [i for i in (1, 2, 3) if _C._simd_isa_available(i)]


def _workload():
    """Every float op on the CPU paths the switches choose between: pooling
    (NCHW with partial blocks of 8 and groups of 32 planes, channels_last
    with N=3 so both task splits apply; segments taller and wider than a
    float run, and tall but narrow ones, so average pooling sums several
    runs per cell on every path),
    forward and backward, and upsample_concat forward and backward in both
    layouts. Returns the results and the eager expectations."""
    got, want = [], []
    cases = [((3, 37, 29, 70), (1, 2, 3, 6, (2, 5))), ((2, 11, 61, 50), (1, (2, 3))), ((2, 19, 50, 40), (1, (2, 5)))]
    for (shape, bins), kind, mode in itertools.product(cases, ("nchw", "channels_last"), ("avg", "max")):
        base = rand(shape, torch.float32, seed=1)
        x = layout(base, kind).requires_grad_()
        xe = layout(base, kind).requires_grad_()
        fn = pe.multi_adaptive_avg_pool2d if mode == "avg" else pe.multi_adaptive_max_pool2d
        outs = fn(x, bins, backend="cpp")
        refs = eager_pool(xe, bins, mode)
        ws = [rand(r.shape, torch.float32, seed=10 + k) for k, r in enumerate(refs)]
        torch.autograd.backward(outs, ws)
        torch.autograd.backward(refs, ws)
        got += [o.detach() for o in outs] + [x.grad]
        want += [r.detach() for r in refs] + [xe.grad]
    for kind in ("nchw", "channels_last"):
        x = layout(rand((2, 5, 33, 47), torch.float32, seed=2), kind)
        brs = [layout(rand((2, 3, s, s + 1), torch.float32, seed=3 + s), kind).requires_grad_() for s in (1, 2, 6)]
        bre = [b.detach().clone().requires_grad_() for b in brs]
        out = pe.upsample_concat(x, brs, align_corners=False, backend="cpp")
        ref = eager_upsample_concat(x, bre, (33, 47), False)
        g = rand(ref.shape, torch.float32, seed=4)
        out.backward(g)
        ref.backward(g)
        got += [out.detach()] + [b.grad for b in brs]
        want += [ref.detach()] + [b.grad for b in bre]
    return got, want


def _check_against_eager(got, want):
    for k, (a, b) in enumerate(zip(got, want)):
        # gradients of 1x1 bins / branches sum whole planes: fp32 summation-order noise
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"result {k}: {m}")


def _configs(_C):
    """(simd_isa, no_block_kernel, channels_last_avg_tasks) for every path this CPU can run."""
    out = []
    for isa in _available_isas(_C):
        blocks = (0, 1) if isa >= 2 else (1,)
        for nb, tasks in itertools.product(blocks, (1, 2)):
            out.append((isa, nb, tasks))
    return out


def test_switches_reject_unknown_names_and_unsupported_values(_c):
    with pytest.raises(ValueError, match="unknown test override: fast_path"):
        _c._set_test_override("fast_path", 1)
    with pytest.raises(ValueError, match="simd_isa=9 is not valid"):
        _c._set_test_override("simd_isa", 9)
    with pytest.raises(ValueError, match="channels_last_avg_tasks=3 is not valid"):
        _c._set_test_override("channels_last_avg_tasks", 3)


@pytest.mark.parametrize("isa", [1, 2, 3], ids=lambda i: ISA_NAMES[i])
def test_simd_isa_switch_takes_effect(_c, isa):
    if not _c._simd_isa_available(isa):
        pytest.skip(f"this CPU has no {ISA_NAMES[isa]}")
    _c._set_test_override("simd_isa", isa)
    assert _c._simd_isa() == ISA_NAMES[isa]
    assert f"simd_isa={isa}" in _c._test_overrides()


def test_every_forced_path_matches_eager_and_the_automatic_path_bitwise(_c):
    auto, want = _workload()
    _check_against_eager(auto, want)
    configs = _configs(_c)
    assert (1, 1, 1) in configs and (1, 1, 2) in configs  # the baseline loops always run here
    for isa, nb, tasks in configs:
        _c._set_test_override("simd_isa", isa)
        _c._set_test_override("no_block_kernel", nb)
        _c._set_test_override("channels_last_avg_tasks", tasks)
        got, _ = _workload()
        _check_against_eager(got, want)
        for k, (a, b) in enumerate(zip(got, auto)):
            assert torch.equal(a, b), (f"simd_isa={ISA_NAMES[isa]} no_block_kernel={nb} "
                                       f"channels_last_avg_tasks={tasks}: result {k} differs from the automatic path")


def _digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    from tests.test_cpu_paths import _digest, _workload
    got, _ = _workload()
    print("DIGEST", torch.get_num_threads(), _digest(got))
    """
)


def test_bitwise_deterministic_across_thread_counts_and_processes(_c):
    """The same results, bit for bit, with 1, 2 and 3 threads in this process
    and in fresh processes (another thread pool, another allocation order)."""
    prev = torch.get_num_threads()
    digests = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            digests[f"in-process, {threads} threads"] = _digest(_workload()[0])
    finally:
        torch.set_num_threads(prev)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for threads in (1, 2, 3):
        r = subprocess.run([sys.executable, "-c", _SCRIPT, str(threads)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("DIGEST")][0].split()
        assert line[1] == str(threads)
        digests[f"process, {threads} threads"] = line[2]
    assert len(set(digests.values())) == 1, digests
