"""CUDA workers: one device per worker, pinned host buffers with asynchronous copies, autocast.
Marked ``gpu``: skipped without a CUDA device (run them with benchmarks/gpu_check.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from downpour.config import parse_job
from downpour.data.loader import Batches
from downpour.layout import make_layout
from downpour.models import build_model, param_shapes
from downpour.worker.flat import FlatModel
from downpour.worker.precision import Precision
from downpour.worker.service import device_for
from downpour.worker.trainer import _to
from tests.byo_factories import image_splits
from tests.conftest import tiny_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODEL = {"name": "mlp", "args": {"hidden": [64], "dropout": 0.0}}


def _job(**training):
    return parse_job({"model": MODEL, "training": training, "monitor": {"metrics": False}})


def test_each_worker_takes_its_own_gpu_or_the_one_named():
    n = torch.cuda.device_count()
    for rank in range(3):
        assert device_for(_job(device="cuda"), rank) == torch.device("cuda", rank % n)
    assert device_for(_job(device="cuda"), 5, local_rank=0) == torch.device("cuda", 0)  # LOCAL_RANK wins
    assert device_for(_job(device="cuda:0"), 3) == torch.device("cuda", 0)
    assert device_for(_job(device=["cpu", "cuda:0"]), 1) == torch.device("cuda", 0)
    assert device_for(_job(device=["cpu", "cuda:0"]), 2) == torch.device("cpu")


def test_the_flat_model_on_a_gpu_has_a_pinned_mirror_and_moves_values_in_and_gradients_out():
    job = _job(device="cuda")
    model = build_model(job.model, 0)
    flat = FlatModel(model, make_layout(param_shapes(model), 1), torch.device("cuda", 0))
    assert flat.flat.is_cuda and flat.host.is_pinned() and torch.equal(flat.host, flat.flat.cpu())
    flat.host.copy_(torch.randn_like(flat.host))
    flat.host_to_device()  # non_blocking from pinned memory
    first = next(model.parameters())
    assert torch.equal(first.detach().reshape(-1).cpu(), flat.host[: first.numel()])
    model(torch.randn(4, 28, 28, device="cuda")).sum().backward()
    grad = flat.grad_vector()
    assert grad.device.type == "cpu" and torch.equal(grad[: first.numel()], first.grad.reshape(-1).cpu())


def test_a_bf16_model_keeps_a_float32_master_on_the_gpu():
    job = _job()
    model = build_model(job.model, 0).to(torch.bfloat16)
    flat = FlatModel(model, make_layout(param_shapes(model), 1), torch.device("cuda", 0))
    assert flat.flat.dtype == torch.float32 and len(flat.cast) == len(list(model.parameters()))
    flat.host.fill_(0.5)
    flat.host_to_device()
    assert all(bool((p == 0.5).all()) and p.dtype == torch.bfloat16 for p in model.parameters())
    model(torch.randn(4, 28, 28, device="cuda", dtype=torch.bfloat16)).float().sum().backward()
    assert flat.grad_vector().dtype == torch.float32


def test_loader_batches_are_pinned_and_reach_the_gpu_without_blocking():
    train, _ = image_splits(128, 8)
    job = parse_job({"model": MODEL, "data": {"factory": "tests.byo_factories:image_splits",
                                              "loader": {"num_workers": 2, "collate_fn": "tests.byo_factories:collate_scaled"}}})
    x, y = next(iter(Batches(train, 32, job.data.loader, pin_memory=True)(np.arange(64))))
    assert x.is_pinned() and y.is_pinned()
    gx, gy = _to(x, torch.device("cuda", 0)), _to(y, torch.device("cuda", 0))
    torch.cuda.synchronize()
    assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_autocast_on_the_gpu_gives_float32_gradients_close_to_full_precision(mode):
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(dev)
    x, y = torch.randn(128, 64, device=dev), torch.randint(0, 10, (128,), device=dev)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    prec = Precision(mode, dev)
    with prec.autocast():
        out = model(x)
        assert out.dtype == (torch.bfloat16 if mode == "bf16" else torch.float16)
        loss = torch.nn.functional.cross_entropy(out, y)
    prec.backward(loss)
    assert prec.unscale(list(model.parameters()))
    for p, g in zip(model.parameters(), full):
        assert p.grad.dtype == torch.float32
        assert torch.allclose(p.grad, g, rtol=0.05, atol=2e-3)


@pytest.mark.slow
def test_a_job_of_two_cuda_workers_with_bf16_autocast_trains(tmp_path, tiny_data):
    from downpour.api import resolve_job
    from downpour.launch import LocalLauncher

    job = tiny_job(tiny_data, training={"device": "cuda", "autocast": "bf16", "epochs": 2})
    job["monitor"] = {"metrics": False, "dashboard": False, "tensorboard": False}
    s = LocalLauncher(resolve_job(job), str(tmp_path / "run")).run().summary
    assert s["status"] == "ok" and s["test_accuracy"] > 0.8
