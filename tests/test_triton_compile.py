"""Every Triton kernel compiled for sm_90 as a GPU would (no GPU needed):
tests/triton_compile_sm90.py, in its own process without TRITON_INTERPRET
(the interpreter, which the rest of the Triton tests use here, compiles nothing)."""
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")

SCRIPT = pathlib.Path(__file__).with_name("triton_compile_sm90.py")


@pytest.mark.parametrize("op", ["pool", "upsample_concat", "upsample_shift_add"])
def test_every_kernel_compiles_for_sm90(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(SCRIPT.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(SCRIPT), op], capture_output=True, text=True, env=env, cwd=root)
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert "calls compiled every kernel they launch for sm_90" in run.stdout
