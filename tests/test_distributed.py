"""Distributed training with the fused modules: two processes (gloo on CPU)
training under DistributedDataParallel end with the parameters of one process
training on the concatenated batch; also with torch.compile on the DDP
model. And SyncBatchNorm conversion of every pe.nn module.

SyncBatchNorm in training mode needs GPU tensors (PyTorch's SyncBatchNorm
raises on CPU inputs), so that part (per-process batch 1 on the 1x1 bin
included) belongs to the GPU suite; here it runs in eval mode, and training
on CPU is checked to raise PyTorch's own error, not a wrong result.
"""
import copy
import os
import socket
import tempfile
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import pyramid_ext as pe

from .conftest import need_backend

WORLD = 2
GLOBAL_BATCH = 4
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, out_dir, timeout_s=300.0, grace_s=30.0):
    """Runs WORLD processes of `worker(rank, port, out_dir)`. A gloo worker was
    once seen (1 run in 8, then 0 in 20) to hang in dist.destroy_process_group()
    after saving its results: the main thread, holding the GIL, joins gloo's
    run loop, which is destroying a finished allreduce whose saved thread-local
    state holds a Python object (it needs the GIL). A torch teardown race, not a
    result: with every rank's file written, hung workers are killed and the
    results used (grace_s after the start); without, the test fails after
    timeout_s instead of hanging CI."""
    ctx = mp.spawn(worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False)
    start = time.monotonic()
    files = [os.path.join(out_dir, f"rank{r}.pt") for r in range(WORLD)]
    while not ctx.join(timeout=1):  # raises if a worker failed
        if all(os.path.exists(f) for f in files) and time.monotonic() > start + grace_s:
            warnings.warn("a distributed test worker hung in its teardown after saving its results; killed")
            break
        if time.monotonic() > start + timeout_s:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} worker processes did not finish in {timeout_s:.0f} s")
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    return files


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        pe.nn.PyramidPooling(8, 4, bins=(1, 2, 3, 6), norm="gn", gn_groups=2, out_channels=6, out_kernel_size=3),
        nn.Conv2d(6, 3, 1),
    ).double()


def _eval_pyramid() -> nn.Module:
    # Seeded: the worker and the test build it after different histories of
    # the global generator (the training above, the tests run before).
    torch.manual_seed(2)
    return pe.nn.PyramidPooling(8, 4, bins=(1, 2)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 8, 13, 11, generator=g, dtype=torch.float64)
    y = torch.randn(STEPS, GLOBAL_BATCH, 3, 13, 11, generator=g, dtype=torch.float64)
    return x, y


def _train(model, x, y, rows):
    """STEPS of SGD with momentum on the rows `rows` of each step's batch;
    the loss is the mean over those rows (DDP averages gradients over ranks,
    so equal shares give the mean over the whole batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        opt.zero_grad()
        loss = ((model(x[step, rows]) - y[step, rows]) ** 2).mean()
        loss.backward()
        opt.step()


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        share = GLOBAL_BATCH // WORLD
        rows = slice(rank * share, (rank + 1) * share)
        results = {}
        for mode in ("eager", "compiled"):
            model = _model()
            ddp = nn.parallel.DistributedDataParallel(model)
            run = torch.compile(ddp, backend="aot_eager") if mode == "compiled" else ddp
            _train(run, x, y, rows)
            results[mode] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        # SyncBatchNorm with a process group: eval mode runs on CPU
        # (running statistics); training needs GPU tensors.
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(_eval_pyramid())
        assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
        results["syncbn_eval"] = sync.eval()(x[0, rows]).detach()
        try:
            sync.train()(x[0, rank:rank + 1])  # per-process batch 1 on the 1x1 bin
            results["syncbn_train_cpu"] = "ran"
        except Exception as e:  # PyTorch's SyncBatchNorm: GPU only in training
            results["syncbn_train_cpu"] = f"{type(e).__name__}: {e}"
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    with tempfile.TemporaryDirectory() as out_dir:
        return [torch.load(f, weights_only=False) for f in _spawn(_worker, out_dir)]


def _single_process_reference():
    model = _model()
    x, y = _data()
    _train(model, x, y, slice(0, GLOBAL_BATCH))
    return model.state_dict()


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_ddp_matches_single_process(ddp_results, mode):
    need_backend("cpp")  # the workers use the default (auto) backend: the compiled one here
    want = _single_process_reference()
    initial = _model().state_dict()
    for rank, res in enumerate(ddp_results):
        got = res[mode]
        assert got.keys() == want.keys()
        for k in want:
            err = (got[k] - want[k]).abs().max().item()
            assert err <= 1e-6, f"rank {rank} {mode}: {k} differs from the single-process run by {err:.3g}"
            # and training moved it (a test that cannot fail is no test)
            if want[k].is_floating_point():
                assert not torch.equal(want[k], initial[k]) or k.endswith("running_var"), k
    for k in want:  # the ranks agree with each other exactly
        assert torch.equal(ddp_results[0][mode][k], ddp_results[1][mode][k]), k


def test_syncbatchnorm_under_a_process_group(ddp_results):
    x, _ = _data()
    ref = _eval_pyramid().eval()
    for rank, res in enumerate(ddp_results):
        rows = slice(rank * 2, rank * 2 + 2)
        # (to rounding: the workers and this process may run the double convs
        # on other thread counts, which differed by 1 ulp on an AMD EPYC)
        torch.testing.assert_close(res["syncbn_eval"], ref(x[0, rows]), rtol=1e-12, atol=1e-12)
        # Training on CPU: PyTorch's SyncBatchNorm refuses CPU tensors (it
        # would otherwise need all-reduce of statistics). On GPU this runs:
        # the GPU suite covers it.
        msg = res["syncbn_train_cpu"]
        assert msg.startswith("ValueError: SyncBatchNorm expected input tensor to be on GPU"), msg


def _modules():
    mods = {
        "PPM": lambda: pe.nn.PPM(8, 2, (1, 2, 3, 6)),
        "PSPModule": lambda: pe.nn.PSPModule(8, 16, (1, 2, 3, 6)),
        "PyramidPooling-bn": lambda: pe.nn.PyramidPooling(8, 2, out_channels=4, out_kernel_size=3),
        "PyramidPooling-syncbn": lambda: pe.nn.PyramidPooling(8, 2, norm="syncbn"),
        "PyramidPooling-gn": lambda: pe.nn.PyramidPooling(8, 2, norm="gn", gn_groups=2),
        "PyramidPooling.mmseg": lambda: pe.nn.PyramidPooling.mmseg(8, 4),
        "PyramidPooling.smp": lambda: pe.nn.PyramidPooling.smp(8),
        "PyramidPooling.csail": lambda: pe.nn.PyramidPooling.csail(8, branch_channels=4, out_channels=4),
        "PyramidPooling.paper": lambda: pe.nn.PyramidPooling.paper(8, 4),
        "SpatialPyramidPooling": lambda: pe.nn.SpatialPyramidPooling((4, 2, 1)),
        "FeaturePyramidAttention": lambda: pe.nn.FeaturePyramidAttention(8, 4),
    }
    return mods


@pytest.mark.parametrize("name", list(_modules()))
def test_convert_sync_batchnorm_every_module(name):
    """convert_sync_batchnorm leaves every pe.nn module working: same
    state_dict keys, and in eval mode (where SyncBatchNorm runs on CPU) the
    same output as before the conversion; in training mode without a process
    group, the same output and running statistics as BatchNorm."""
    torch.manual_seed(0)
    module = _modules()[name]().double()
    # non-trivial running statistics, so eval mode uses them
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    original = copy.deepcopy(module)
    before = module.eval()(x)
    keys = list(module.state_dict())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module).eval()
    assert list(converted.state_dict()) == keys
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert all(not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.SyncBatchNorm)
               for m in converted.modules())
    torch.testing.assert_close(converted(x), before, rtol=0, atol=0)
    # Training without a process group: SyncBatchNorm is plain BatchNorm
    # (with one, it needs GPU tensors: test_syncbatchnorm_under_a_process_group).
    plain = copy.deepcopy(original).train()
    torch.testing.assert_close(converted.train()(x), plain(x), rtol=0, atol=0)
    if has_bn:  # the per-batch statistics moved the running ones alike
        for (k, a), (_, b) in zip(converted.state_dict().items(), plain.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_convert_sync_batchnorm_pspnet():
    pytest.importorskip("torchvision")
    model = nn.SyncBatchNorm.convert_sync_batchnorm(pe.nn.PSPNet(layers=50, classes=3)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65))
    assert out.shape == (1, 3, 65, 65)


# ------------------------------------------------------------------ GPU ---
# SyncBatchNorm in training (GPU tensors only, PyTorch's restriction), the
# 1x1 bin at a per-process batch of 1 included: one process per GPU (NCCL
# refuses two ranks on one GPU), so it needs two GPUs and skips elsewhere.


def _syncbn_model(norm):
    torch.manual_seed(0)
    return nn.Sequential(pe.nn.PyramidPooling(8, 4, bins=(1, 2, 3), norm=norm), nn.Conv2d(24, 3, 1)).double()


def _gpu_worker(rank, port, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        model = _syncbn_model("syncbn").cuda()
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
        rows = slice(rank, rank + 1)  # batch 1 per process: the 1x1 bin sees one value here, two in all
        _train(ddp, x[:, :WORLD].cuda(), y[:, :WORLD].cuda(), rows)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="SyncBatchNorm training needs GPU tensors and NCCL, one GPU per process (two GPUs)")
def test_syncbatchnorm_training_per_process_batch_1_gpu():
    with tempfile.TemporaryDirectory() as out_dir:
        got = [torch.load(f) for f in _spawn(_gpu_worker, out_dir)]
    # one process with plain BatchNorm on the concatenated batch of 2
    model = _syncbn_model("bn").cuda()
    x, y = _data()
    _train(model, x[:, :WORLD].cuda(), y[:, :WORLD].cuda(), slice(0, WORLD))
    for k, want in model.state_dict().items():
        for r in range(WORLD):
            err = (got[r][k].double() - want.cpu().double()).abs().max().item()
            assert err <= 1e-6, f"rank {r}: {k} differs by {err:.3g}"
