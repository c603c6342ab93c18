"""The long run of the structure-aware fuzzer (tests/fuzzing.py): a live secure server and a live
secure coordinator, each fed mutated valid messages under a worker key, in this process.

    .venv/bin/python benchmarks/fuzz.py                              # 1M messages per role (target)
    .venv/bin/python benchmarks/fuzz.py --messages 20000 --json fuzz.json
    .venv/bin/python benchmarks/fuzz.py --roles server --json server.json   # one role per invocation

Prints a progress line every --report-every-s seconds and rewrites the --json file with the partial
figures each time, so a run stopped early (a time limit) still leaves what it measured.

Reports, per role: messages fuzzed, messages per second, refusals (by code), accepted, unanswered
(dropped or held), refusals counted by the node, crashes. Any broken invariant (a node that stops
answering, a parameter that is not finite or changed by refused messages, a refusal not counted)
ends the run with an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from downpour.config import parse_job  # noqa: E402
from downpour.transport import create_job_keys  # noqa: E402
from tests.conftest import make_images, write_idx  # noqa: E402
from tests.fuzzing import Tally, fuzz_coordinator, fuzz_server  # noqa: E402


def _figures(role: str, t: Tally) -> dict:
    return {"role": role, "messages": t.messages, "messages_per_s": round(t.rate(), 1), "seconds": round(t.seconds, 1),
           "refused": t.refused, "accepted": t.accepted, "unanswered": t.unanswered, "counted": t.counted,
           "crashes": t.crashes, "codes": dict(t.codes)}


def _report(role: str, t: Tally) -> dict:
    out = _figures(role, t)
    print(f"{role:12s} {t.messages:>9,d} messages in {t.seconds:7.1f} s = {t.rate():8,.0f}/s; refused {t.refused:,d} "
          f"(counted {t.counted:,d}), accepted {t.accepted:,d}, unanswered {t.unanswered:,d}, crashes {t.crashes}")
    print(f"{'':12s} codes: {dict(sorted(t.codes.items(), key=lambda kv: -kv[1]))}", flush=True)
    return out


class _Progress:
    """Prints a line and rewrites the JSON file every ``every_s`` seconds of a role's run."""

    def __init__(self, role: str, every_s: float, write) -> None:
        self.role, self.every_s, self.write = role, every_s, write
        self.next_at = time.monotonic() + every_s

    def __call__(self, t: Tally) -> None:
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.every_s
        print(f"  {self.role}: {t.messages:,d} messages, {t.seconds:.0f} s, {t.rate():,.0f}/s, refused {t.refused:,d}, "
              f"crashes {t.crashes}", flush=True)
        self.write(partial=_figures(self.role, t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000, help="messages per role")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--roles", default="server,coordinator")
    ap.add_argument("--json", help="write the results here (rewritten with partial figures as the run goes)")
    ap.add_argument("--report-every-s", type=float, default=30.0, help="progress line and partial JSON interval")
    ap.add_argument("--time-limit-s", type=float, default=None, help="stop each role after this long (reported)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # refusals are logged as warnings: millions of them
    results: list[dict] = []

    def write(partial: dict | None = None) -> None:
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({"environment": environment(), "args": vars(args), "results": results,
                           "in_progress": partial}, f, indent=2)
            os.replace(args.json + ".tmp", args.json)

    with tempfile.TemporaryDirectory() as tmp:
        keys = create_job_keys(os.path.join(tmp, "keys"))
        for role in args.roles.split(","):
            if role == "server":
                tally = fuzz_server(keys, args.messages, args.seed, time_limit_s=args.time_limit_s,
                                    progress=_Progress(role, args.report_every_s, write))
                results.append(_report(role, tally))
            else:
                data = os.path.join(tmp, "idx")
                os.makedirs(data, exist_ok=True)
                for name, seed, n in (("train", 1, 2400), ("t10k", 2, 400)):
                    x, y = make_images(n, seed)
                    write_idx(os.path.join(data, f"{name}-images-idx3-ubyte"), x)
                    write_idx(os.path.join(data, f"{name}-labels-idx1-ubyte"), y)
                job = parse_job({
                    "name": "fuzz", "model": {"name": "mlp", "args": {"hidden": [32]}},
                    "data": {"name": "idx", "path": data, "shard_size": 400},
                    "monitor": {"metrics": False, "dashboard": False}, "checkpoint": {"enabled": False},
                    "cluster": {"num_servers": 1, "num_workers": 2, "heartbeat_timeout_s": 3600.0,
                                "coordinator_timeout_s": 3600.0, "startup_timeout_s": 3600.0,
                                "coordinator_max_requests_per_s": 1e9}})
                tally = fuzz_coordinator(keys, job, args.messages, args.seed, time_limit_s=args.time_limit_s,
                                         progress=_Progress(role, args.report_every_s, write))
                results.append(_report(role, tally))
            write()


if __name__ == "__main__":
    main()
