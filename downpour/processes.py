"""Operating-system settings of a job's processes: their CPU scheduling policy.

A training job's processes are batch work: what counts is how much they get done, not how soon
one of them runs after it wakes up. Under Linux's ``SCHED_BATCH`` a thread that wakes (a server
receiving a request, a worker receiving its reply) does not preempt the thread running on that
core; it runs when that one blocks or its time slice ends. On a machine with fewer cores than the
job's busy processes that spares a context switch, and the caches it costs, per message: the
reference job on 2 cores ran 3-10 % more examples/s with it (benchmarks/RESULTS.md §30). It is
not a priority: the processes' nice value stays, and any user may set it on their own processes.
``cluster.cpu_policy: normal`` keeps the default policy (e.g. where a latency-bound neighbour
shares the cores and the job should not wait behind it).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# The exit code of a worker the coordinator stopped (the job failed or is over, its request refused
# with job_failed): not a crash, so its launcher starts no replacement. A node the coordinator
# declared dead exits 1 instead: its work went to others and a replacement takes its rank.
EXIT_STOPPED = 3


def apply_cpu_policy(policy: str) -> bool:
    """Put every thread of this process under ``policy`` (``batch`` or ``normal``); threads started
    later inherit it from the thread that starts them. Returns whether it was applied (False where
    the system has no such policy, e.g. not Linux, or refused it: the process then runs as it was)."""
    if policy not in ("batch", "normal"):
        raise ValueError(f"cpu policy must be batch or normal, not {policy!r}")
    value = getattr(os, "SCHED_BATCH" if policy == "batch" else "SCHED_OTHER", None)
    if value is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    applied = True
    for tid in tids:
        try:
            os.sched_setscheduler(tid, value, os.sched_param(0))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError as err:
            log.debug("cpu policy %s not applied to thread %d: %s", policy, tid, err)
            applied = False
    return applied
