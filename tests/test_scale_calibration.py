"""The scaling model's calibration fit (benchmarks/scale_measure.py), on made-up measurements: no timing here."""

import argparse

import numpy as np
import pytest

from benchmarks.scale_measure import calibration_topologies, check_topologies, cpu_per_step, nonnegative_lstsq, solve_request_costs

US, NS = 1e-6, 1e-9
REF_P, BIG_P, REF_C, BIG_C, APPLY = 100_000, 800_000, 300 * US, 2_000 * US, 1 * NS


def job(servers, workers, params, compute, *, step=200 * US, wmsg=60 * US, wbyte=0.05 * NS, smsg=150 * US, sbyte=0.02 * NS,
        noise=(0.0, 0.0)):
    """A measure() result made from known costs (one request per server per step), with relative noise."""
    nbytes = 4 * params
    worker = compute + step + servers * wmsg + 2 * nbytes * wbyte
    server = servers * smsg + 2 * nbytes * sbyte + APPLY * params
    return {"servers": servers, "workers": workers, "requests_per_step": float(servers),
            "worker_cpu_per_step_s": worker * (1 + noise[0]), "server_cpu_per_step_s": server * (1 + noise[1])}


def fit(points, wide):
    return solve_request_costs(points, wide, REF_P, BIG_P, REF_C, BIG_C, APPLY, 40 * US)


def test_the_fit_recovers_the_costs_the_measurements_were_made_from():
    points = [job(s, w, REF_P, REF_C) for w in (1, 3) for s in (1, 2, 3, 4)]
    costs, step = fit(points, job(1, 1, BIG_P, BIG_C))
    assert step == pytest.approx(200 * US, rel=1e-6)
    assert costs.worker_msg_s == pytest.approx(60 * US, rel=1e-6)
    assert costs.worker_byte_s == pytest.approx(0.05 * NS, rel=1e-6)
    assert costs.server_msg_s == pytest.approx(150 * US, rel=1e-6)
    assert costs.server_byte_s == pytest.approx(0.02 * NS, rel=1e-6)
    assert (costs.apply_s_per_param, costs.latency_s) == (APPLY, 40 * US)


def test_noise_on_three_jobs_cannot_make_a_cost_negative_and_more_jobs_average_it_out():
    # Three jobs, 1x1 read 10 % high and 2x1 10 % low on the worker: an exact solve gives a negative
    # worker CPU per request (what a noisy calibration once did); the fit gives none below zero.
    few = [job(1, 1, REF_P, REF_C, noise=(0.10, 0.0)), job(2, 1, REF_P, REF_C, noise=(-0.10, 0.0))]
    wide = job(1, 1, BIG_P, BIG_C)
    exact = np.linalg.solve(
        np.array([[1.0, 1, 8 * REF_P], [1.0, 2, 8 * REF_P], [1.0, 1, 8 * BIG_P]]),
        np.array([few[0]["worker_cpu_per_step_s"] - REF_C, few[1]["worker_cpu_per_step_s"] - REF_C,
                  wide["worker_cpu_per_step_s"] - BIG_C]),
    )
    assert exact[1] < 0
    costs, step = fit(few, wide)
    assert min(costs.worker_msg_s, costs.worker_byte_s, costs.server_msg_s, costs.server_byte_s, step) >= 0
    # the same ±10 % alternating over eight jobs across 1..4 servers: the per-request cost within 25 %
    rng = np.random.default_rng(0)
    many = [job(s, w, REF_P, REF_C, noise=tuple(rng.uniform(-0.1, 0.1, 2))) for w in (1, 3) for s in (1, 2, 3, 4)]
    costs, _ = fit(many, wide)
    assert costs.worker_msg_s == pytest.approx(60 * US, rel=0.25)
    assert costs.server_msg_s == pytest.approx(150 * US, rel=0.25)


def test_one_request_count_is_refused():
    with pytest.raises(ValueError, match="two request counts"):
        fit([job(2, 1, REF_P, REF_C), job(2, 3, REF_P, REF_C)], job(1, 1, BIG_P, BIG_C))


def test_nonnegative_lstsq_is_the_least_squares_optimum_on_the_non_negative_orthant():
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, y = rng.normal(size=(7, 3)), rng.normal(size=7)
        x = nonnegative_lstsq(a, y)
        assert (x >= 0).all()
        r = np.sum((a @ x - y) ** 2)
        for _ in range(200):  # no non-negative point nearby does better
            z = np.clip(x + rng.normal(scale=0.1, size=3), 0, None)
            assert np.sum((a @ z - y) ** 2) >= r - 1e-9


def args(**kw):
    base = {"servers": 4, "workers": 8, "check_servers": None, "topologies": None, "calibrate_on": None}
    return argparse.Namespace(**{**base, **kw})


def test_the_calibration_topologies_follow_the_check():
    assert calibration_topologies(args()) == [(s, w) for w in (3, 6) for s in (1, 2, 3, 4)]
    assert calibration_topologies(args(servers=2, workers=2)) == [(1, 2), (2, 2)]
    assert calibration_topologies(args(servers=2, workers=4)) == [(1, 3), (2, 3), (1, 4), (2, 4)]
    # a check of one server count still calibrates on two
    assert calibration_topologies(args(check_servers="3")) == [(1, 3), (3, 3), (1, 6), (3, 6)]
    assert calibration_topologies(args(calibrate_on="1x1, 2X4")) == [(1, 1), (2, 4)]
    assert check_topologies(args(topologies="2x3,1x1")) == [(2, 3), (1, 1)]
    with pytest.raises(SystemExit, match="two server counts"):
        calibration_topologies(args(calibrate_on="2x3,2x6"))
    with pytest.raises(SystemExit, match="not a topology"):
        calibration_topologies(args(calibrate_on="2by3"))
    with pytest.raises(SystemExit, match="at least one server"):
        check_topologies(args(topologies="0x3"))


def test_the_two_host_check_calibrates_on_its_server_counts_with_3_and_6_workers():
    from benchmarks import scale_two_hosts

    def tops(topologies, calibrate_on=None):
        return scale_two_hosts.calibration_topologies(argparse.Namespace(topologies=topologies, calibrate_on=calibrate_on))

    assert tops("2x3") == [(1, 3), (2, 3), (1, 6), (2, 6)]
    assert tops("1x1,2x3,1x3") == [(1, 3), (2, 3), (1, 6), (2, 6)]
    assert tops("3x4") == [(1, 3), (3, 3), (1, 6), (3, 6)]
    assert tops("2x3", "1x2,2x2") == [(1, 2), (2, 2)]


def test_cpu_per_step_takes_the_steady_window_when_the_run_was_sampled_and_the_totals_otherwise():
    m = job(2, 3, REF_P, REF_C)
    assert cpu_per_step(m, "worker") == m["worker_cpu_per_step_s"]
    # 0.5 s window at 3,200 examples/s of batch 32: 50 steps; the workers' threads ran 60 ms, the servers' 20 ms
    # (the sampler's groups: each role's threads by kind, and each process's apart, not to be counted twice)
    groups = {"worker.main": {"run": 0.055}, "worker.zmq": {"run": 0.005}, "worker-0.main": {"run": 0.03},
              "worker-1.main": {"run": 0.025}, "server.main": {"run": 0.02}, "server-0.main": {"run": 0.02},
              "coordinator.main": {"run": 0.5}}
    m = {**m, "examples_per_s": 3200.0, "batch": 32, "long": {"probe": {"window_s": 0.5, "groups": groups}}}
    assert cpu_per_step(m, "worker") == pytest.approx(0.06 / 50)
    assert cpu_per_step(m, "server") == pytest.approx(0.02 / 50)
