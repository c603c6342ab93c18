"""Schedules and scaling through real processes: a one-worker sync job with an lr schedule
matches torch.optim with the same scheduler, and summary.json shows the effective values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from downpour.api import resolve_job
from downpour.coordinator.shards import ShardLedger
from downpour.data import load_idx_dataset
from downpour.data.order import example_order
from downpour.errors import ConfigError
from downpour.launch import LocalLauncher
from downpour.models import build_model
from tests.conftest import tiny_job

pytestmark = pytest.mark.slow

SCHEDULES = {
    "step": ({"name": "step", "step_size": 10, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, 10, 0.5)),
    "cosine": ({"name": "cosine", "t_max": 30, "eta_min": 0.005},
               lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 30, 0.005)),
}


def reference(job_dict: dict, data: str, steps: int, make_scheduler) -> dict[str, torch.Tensor]:
    """torch.optim with the scheduler on one process: same model, data order and seed."""
    job = resolve_job(job_dict)
    t = job.training
    model = build_model(job.model, t.seed)
    opt = torch.optim.SGD(model.parameters(), lr=job.optimizer.lr, momentum=job.optimizer.momentum)
    sched = make_scheduler(opt)
    ds = load_idx_dataset(data)
    ledger = ShardLedger(len(ds.train), job.data.shard_size, t.epochs, t.seed)
    done = 0
    while done < steps:
        shard = ledger.next("w")
        positions = example_order(len(ds.train), t.seed, shard["epoch"])[shard["start"] : shard["stop"]]
        x_all, y_all = ds.train.take(np.random.default_rng([t.seed, shard["epoch"], shard["shard"]]).permutation(positions))
        for b in range(0, len(y_all), t.batch_size):
            if done == steps:
                break
            opt.zero_grad()
            F.cross_entropy(model(x_all[b : b + t.batch_size]), y_all[b : b + t.batch_size]).backward()
            opt.step()
            sched.step()
            done += 1
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_one_sync_worker_with_an_lr_schedule_matches_torch(tmp_path, tiny_data, name):
    cfg, make = SCHEDULES[name]
    steps = 40
    job = tiny_job(tiny_data, training={"consistency": "sync", "steps": steps},
                   optimizer={"lr": 0.05, "momentum": 0.9, "schedule": cfg}, cluster={"num_workers": 1})
    s = LocalLauncher(resolve_job(job), str(tmp_path / "run")).run().summary
    assert s["status"] == "ok" and s["steps"] == steps
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for param, value in reference(job, tiny_data, steps, make).items():
        torch.testing.assert_close(got[param], value, rtol=1e-5, atol=1e-5)
    opt = s["optimizer"]
    assert opt["stated"]["lr"] == 0.05 and opt["stated"]["schedule"]["name"] == name
    trace = opt["effective"]["trace"]
    assert trace[0][:2] == [0, 0.05] and trace[-1][0] == steps - 1
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    sched = make(probe)
    for _ in range(steps - 1):
        probe.step()
        sched.step()
    assert trace[-1][1] == pytest.approx(probe.param_groups[0]["lr"])  # the lr of the last step


def test_an_async_job_reports_the_lookahead_it_applied_by_default(tmp_path, tiny_data):
    job = tiny_job(tiny_data, cluster={"num_workers": 3})
    s = LocalLauncher(resolve_job(job), str(tmp_path / "run")).run().summary
    assert s["status"] == "ok"
    eff = s["optimizer"]["effective"]
    assert eff["plan"]["async_rule"] == "lookahead"
    assert max(row[4] for row in eff["trace"]) > 0  # three workers make pushes stale ...
    assert all(row[1:4] == [0.05, 0.9, 0.9] for row in eff["trace"])  # ... and the job's lr and momentum apply


def test_an_async_job_reports_the_compensation_it_applied(tmp_path, tiny_data):
    job = tiny_job(tiny_data, cluster={"num_workers": 3}, optimizer={"scaling_options": {"async_rule": "momentum"}})
    s = LocalLauncher(resolve_job(job), str(tmp_path / "run")).run().summary
    assert s["status"] == "ok"
    eff = s["optimizer"]["effective"]
    assert eff["plan"]["async_rule"] == "momentum"
    stale = [row[4] for row in eff["trace"]]
    assert max(stale) > 0  # three workers make pushes stale ...
    assert min(row[2] for row in eff["trace"]) < 0.9  # ... and the explicit momentum went down
    assert all(row[3] == pytest.approx(0.9) for row in eff["trace"] if 0 < row[4] < 9)  # the total stayed at 0.9


def test_a_warmup_longer_than_the_job_is_refused_before_any_process_starts(tmp_path, tiny_data):
    job = tiny_job(tiny_data, training={"consistency": "sync"}, optimizer={"scaling_options": {"warmup_steps": 100}})
    from downpour.api import check_data

    with pytest.raises(ConfigError, match=r"warmup_steps \(100\) is longer than the job \(75 job steps"):
        check_data(resolve_job(job))
    assert not (tmp_path / "run").exists()
