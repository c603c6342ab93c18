"""The scaling model's arithmetic (benchmarks/scale_model.py), on made-up costs: no timing here."""

import math
from dataclasses import replace

import pytest

from benchmarks.scale_model import Costs, Topology, Workload, at_scale, job_cores, mva, predict, run_queue_mva, step_bytes

US, NS = 1e-6, 1e-9
COSTS = Costs(
    worker_msg_s=100 * US, worker_byte_s=1 * NS, server_msg_s=50 * US, server_byte_s=0.5 * NS, apply_s_per_param=1 * NS, latency_s=25 * US
)
REF = Workload("ref", params=100_000, batch=32, compute_s=300 * US, worker_step_s=200 * US)


def test_one_step_costs_add_up_per_request_per_byte_and_per_parameter():
    p = predict(COSTS, REF, Topology(2, 3, cores=2))
    nbytes = 400_000  # 4 bytes a parameter, each way
    assert step_bytes(REF) == nbytes
    assert p.requests_per_server == 1
    assert p.worker_cpu_per_step_s == pytest.approx(300 * US + 200 * US + 2 * 100 * US + 2 * nbytes * NS)
    assert p.server_cpu_per_step_s == pytest.approx(2 * 50 * US + 2 * nbytes * 0.5 * NS + 100_000 * NS)
    assert p.cpu_per_example_s(32)["worker"] == pytest.approx(p.worker_cpu_per_step_s / 32)


def test_on_one_host_the_whole_demand_shares_the_cores_once_there_are_enough_workers():
    p = predict(COSTS, REF, Topology(2, 8, cores=2))
    demand = p.worker_cpu_per_step_s + p.server_cpu_per_step_s
    assert p.bottleneck == "cpu"
    assert p.bounds["cpu"] == pytest.approx(2 / demand)
    assert p.examples_per_s == pytest.approx(32 * 2 / demand)


def test_one_worker_is_a_serial_chain_of_its_step_one_servers_share_and_two_latencies():
    p = predict(COSTS, REF, Topology(1, 1, cores=2))
    chain = p.worker_cpu_per_step_s + p.server_cpu_per_step_s + 2 * 25 * US
    assert p.bottleneck.startswith("worker")
    assert p.examples_per_s == pytest.approx(32 / chain)
    # Twice the workers, twice the chain bound.
    assert predict(COSTS, REF, Topology(1, 2, cores=None)).bounds["worker"] == pytest.approx(2 / chain)


def test_a_share_larger_than_a_request_is_split_into_requests():
    big = Workload("big", params=10_000_000, batch=32, compute_s=0.1)
    p = predict(COSTS, big, Topology(4, 1, max_request_bytes=2 << 20))
    per_server = 4 * 10_000_000 / 4
    assert p.requests_per_server == math.ceil(per_server / (2 << 20))
    assert p.worker_cpu_per_step_s == pytest.approx(0.1 + 4 * p.requests_per_server * 100 * US + 2 * 4e7 * NS)


def test_at_scale_a_slow_link_bounds_a_large_model_by_its_servers_links():
    big = Workload("big", params=100_000_000, batch=32, compute_s=0.01)
    cheap_servers = replace(COSTS, server_byte_s=0.0, apply_s_per_param=0.0)
    costs = at_scale(cheap_servers, gbit_s=10, latency_s=50 * US)
    assert costs.bandwidth_Bps == 1.25e9 and costs.latency_s == 50 * US
    p = predict(costs, big, Topology(20, 100))
    assert p.bottleneck == "network"
    assert p.bounds["network"] == pytest.approx(1.25e9 * 20 / 4e8)
    # The worker's own link is in its chain: two transfers of the whole model per step.
    assert p.bounds["worker"] < 100 / (2 * 4e8 / 1.25e9)
    faster = predict(at_scale(cheap_servers, 25, 50 * US), big, Topology(20, 100))
    assert faster.examples_per_s > p.examples_per_s


def test_sparse_rows_add_bytes_and_server_work_and_several_requests_per_server():
    ctr = Workload(
        "ctr", params=100_000, batch=512, compute_s=4e-3, sparse_rows=8000, row_bytes=42, server_row_s=500 * NS, requests_per_server=3
    )
    p = predict(COSTS, ctr, Topology(2, 3, cores=2))
    nbytes = 400_000 + 8000 * 42
    assert step_bytes(ctr) == nbytes
    assert p.requests_per_server == 3
    assert p.server_cpu_per_step_s == pytest.approx(2 * 3 * 50 * US + 2 * nbytes * 0.5 * NS + 100_000 * NS + 8000 * 500 * NS)


def test_a_topology_without_servers_or_workers_is_refused():
    with pytest.raises(ValueError, match="at least one server and one worker"):
        predict(COSTS, REF, Topology(0, 1))


def test_two_hosts_on_one_machine_share_its_cores_and_send_every_step_through_one_link():
    costs = replace(COSTS, bandwidth_Bps=12.5e6)  # 100 Mbit/s
    p = predict(costs, REF, Topology(2, 3, cores=2, split=True))
    assert p.bottleneck == "network"
    assert p.bounds["network"] == pytest.approx(12.5e6 / step_bytes(REF))  # not twice that: one link, not one per server
    assert p.bounds["cpu"] == pytest.approx(2 / (p.worker_cpu_per_step_s + p.server_cpu_per_step_s))
    # Without a link limit the split changes nothing: the cores bound it as on one host.
    fast = predict(COSTS, REF, Topology(2, 3, cores=2, split=True))
    assert fast.examples_per_s == predict(COSTS, REF, Topology(2, 3, cores=2)).examples_per_s


def test_mva_of_two_equal_queues_with_three_customers_keeps_each_busy_three_quarters_of_the_time():
    rate, residence = mva({"push": (1.0, 1), "pull": (1.0, 1)}, 3)
    assert rate == pytest.approx(0.75)  # X(n) = n / (n + 1) / D for two queues of demand D
    assert residence["push"] == pytest.approx(2.0)
    # A delay adds its demand and never queues; a station of 2 servers with 1 customer is a plain delay.
    assert mva({"cpu": (1.0, 2), "latency": (0.5, 0)}, 1)[0] == pytest.approx(1 / 1.5)


def test_queueing_is_the_serial_chain_for_one_worker_and_the_least_bound_for_many():
    costs = replace(COSTS, bandwidth_Bps=12.5e6)
    one = predict(costs, REF, Topology(1, 1, cores=2, split=True, queueing=True))
    chain = one.worker_cpu_per_step_s + one.server_cpu_per_step_s + 2 * 25 * US + 2 * step_bytes(REF) / 12.5e6
    assert one.examples_per_s == pytest.approx(32 / chain)
    assert one.examples_per_s == pytest.approx(one.bounds_examples_per_s)
    many = predict(costs, REF, Topology(2, 200, cores=2, split=True, queueing=True))
    assert many.examples_per_s == pytest.approx(32 * many.bounds["network"], rel=0.02)
    assert many.bottleneck == "network" and many.stations["push"]["utilisation"] == pytest.approx(1, rel=0.02)


def test_at_the_knee_queueing_predicts_less_than_the_least_bound():
    costs = replace(COSTS, bandwidth_Bps=12.5e6)
    knee = predict(costs, REF, Topology(2, 3, cores=2, split=True, queueing=True))
    assert knee.examples_per_s < 0.8 * knee.bounds_examples_per_s
    assert knee.bottleneck == "network"
    # The least bound is unchanged by the option, and without it nothing changes.
    plain = predict(costs, REF, Topology(2, 3, cores=2, split=True))
    assert plain.examples_per_s == plain.bounds_examples_per_s == knee.bounds_examples_per_s
    assert plain.stations == {}


def test_queueing_needs_the_cores():
    with pytest.raises(ValueError, match="cores"):
        predict(COSTS, REF, Topology(2, 3, queueing=True))


def test_other_load_takes_cores_from_the_cpu_bound():
    p = predict(COSTS, REF, Topology(2, 8, cores=2, other_load=0.5))
    demand = p.worker_cpu_per_step_s + p.server_cpu_per_step_s
    assert p.bounds["cpu"] == pytest.approx(1.5 / demand)
    assert job_cores(Topology(1, 1, cores=2, other_load=5)) == pytest.approx(0.02)  # never below a hundredth of the cores
    with pytest.raises(ValueError, match="cores"):
        predict(COSTS, REF, Topology(2, 3, other_load=0.5))


def test_run_queue_with_one_worker_on_one_server_is_the_serial_chain():
    p = predict(COSTS, REF, Topology(1, 1, cores=2, queueing=True, shared_cores=True))
    chain = p.worker_cpu_per_step_s + p.server_cpu_per_step_s + 2 * 25 * US
    assert p.examples_per_s == pytest.approx(32 / chain)
    assert p.stations["cpu"]["wait_s"] == pytest.approx(0.0, abs=1e-12)


def test_run_queue_two_steps_on_two_cores_wait_where_two_ideal_servers_would_not():
    d, z = 1e-3, 1e-4
    exact, _ = mva({"cpu": (d, 2), "latency": (z, 0)}, 2)
    assert exact == pytest.approx(2 / (d + z))  # two customers, two servers: nobody queues
    rate, wait = run_queue_mva(d, 0.0, 2, 0.0, z, 2)
    # Seidmann: the second step finds Q(1) = X(1)·D/2 of work queued at a queue twice as fast.
    assert wait == pytest.approx(d / 2 * (d / 2) / (d + z))
    assert rate == pytest.approx(2 / (d + z + wait))


def test_run_queue_tends_to_the_cores_bound_with_many_workers_and_counts_other_load():
    cheap_servers = replace(COSTS, server_msg_s=10 * US)  # the cores bind, not one server's request loop
    for other in (0.0, 0.5):
        p = predict(cheap_servers, REF, Topology(2, 60, cores=2, queueing=True, shared_cores=True, other_load=other))
        demand = p.worker_cpu_per_step_s + p.server_cpu_per_step_s
        assert p.examples_per_s == pytest.approx(32 * (2 - other) / demand, rel=0.01)
        assert p.bottleneck == "cpu"


def test_run_queue_keeps_the_servers_of_one_step_in_parallel():
    p = predict(COSTS, REF, Topology(3, 1, cores=2, queueing=True, shared_cores=True))
    exact = predict(COSTS, REF, Topology(3, 1, cores=2, queueing=True))
    chain = p.worker_cpu_per_step_s + p.server_cpu_per_step_s / 3 + 2 * 25 * US
    assert p.stations["cpu"]["serial_s"] == pytest.approx(chain - 2 * 25 * US)
    # Between the chain with one server's share (the other two only load the cores) and exact MVA's
    # chain with all three.
    assert exact.examples_per_s < p.examples_per_s < 32 / chain
    rate, _ = run_queue_mva(chain - 2 * 25 * US, p.server_cpu_per_step_s * 2 / 3, 2, 0.0, 2 * 25 * US, 1)
    assert p.examples_per_s == pytest.approx(32 * rate)


def test_run_queue_is_for_one_host_without_links():
    with pytest.raises(ValueError, match="link"):
        predict(replace(COSTS, bandwidth_Bps=1e8), REF, Topology(2, 3, cores=2, split=True, queueing=True, shared_cores=True))
