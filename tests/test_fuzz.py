"""A bounded run of the structure-aware fuzzer (tests/fuzzing.py) against a live secure server and a
live secure coordinator: nothing crashes, parameters stay finite and unchanged by refused messages,
every refusal is counted. ``benchmarks/fuzz.py`` is the long run."""

from __future__ import annotations

import pytest

from downpour.config import parse_job
from downpour.transport import create_job_keys
from tests.conftest import tiny_job
from tests.fuzzing import fuzz_coordinator, fuzz_server

MESSAGES = 1500


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> str:
    return create_job_keys(str(tmp_path_factory.mktemp("fuzz") / "keys"))


def fuzz_job(data: str):
    return parse_job(tiny_job(data, monitor={"metrics": False, "dashboard": False}, checkpoint={"enabled": False},
                              cluster={"num_servers": 1, "num_workers": 2, "heartbeat_timeout_s": 3600.0, "coordinator_timeout_s": 3600.0,
                                       "startup_timeout_s": 3600.0, "coordinator_max_requests_per_s": 1e9}))


def test_fuzzing_a_live_server_with_a_worker_key(keys):
    tally = fuzz_server(keys, MESSAGES, seed=1)
    assert tally.messages == MESSAGES and tally.crashes == 0
    assert tally.refused > MESSAGES // 3 and tally.accepted > 0  # both paths were reached
    assert len(tally.codes) >= 2


def test_fuzzing_a_live_coordinator_with_a_worker_key(keys, tiny_data):
    tally = fuzz_coordinator(keys, fuzz_job(tiny_data), MESSAGES, seed=2)
    assert tally.messages == MESSAGES and tally.crashes == 0
    assert tally.refused > MESSAGES // 3 and tally.accepted > 0
    assert {"invalid", "forbidden"} <= set(tally.codes)
