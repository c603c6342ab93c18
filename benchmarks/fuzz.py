"""The long run of the structure-aware fuzzer (tests/fuzzing.py): a live secure server and a live
secure coordinator, each fed mutated valid messages under a worker key, in this process.

    .venv/bin/python benchmarks/fuzz.py                              # 1M messages per role (target)
    .venv/bin/python benchmarks/fuzz.py --messages 20000 --json fuzz.json

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

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from downpour.config import parse_job  # noqa: E402
from downpour.transport import create_job_keys  # noqa: E402
from tests.conftest import make_images, write_idx  # noqa: E402
from tests.fuzzing import Tally, fuzz_coordinator, fuzz_server  # noqa: E402


def _report(role: str, t: Tally) -> dict:
    out = {"role": role, "messages": t.messages, "messages_per_s": round(t.rate(), 1), "seconds": round(t.seconds, 1),
           "refused": t.refused, "accepted": t.accepted, "unanswered": t.unanswered, "counted": t.counted,
           "crashes": t.crashes, "codes": dict(t.codes)}
    print(f"{role:12s} {t.messages:>9,d} messages in {t.seconds:7.1f} s = {t.rate():8,.0f}/s; refused {t.refused:,d} "
          f"(counted {t.counted:,d}), accepted {t.accepted:,d}, unanswered {t.unanswered:,d}, crashes {t.crashes}")
    print(f"{'':12s} codes: {dict(sorted(t.codes.items(), key=lambda kv: -kv[1]))}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000, help="messages per role")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--roles", default="server,coordinator")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # refusals are logged as warnings: millions of them
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        keys = create_job_keys(os.path.join(tmp, "keys"))
        for role in args.roles.split(","):
            if role == "server":
                results.append(_report(role, fuzz_server(keys, args.messages, args.seed)))
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
                results.append(_report(role, fuzz_coordinator(keys, job, args.messages, args.seed)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
