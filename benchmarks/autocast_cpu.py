"""A bf16-autocast worker against float32 on the CPU: examples/s and test accuracy of the same job.

    .venv/bin/python benchmarks/autocast_cpu.py [--job examples/mnist.yaml] [--repeats 1] [--set key=value ...]

Runs the job with training.autocast none and bf16, alternately (so both see the same machine), and
prints one JSON line per run and a table. Figures in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment  # noqa: E402


def main() -> None:
    import downpour

    ap = argparse.ArgumentParser()
    ap.add_argument("--job", default="examples/mnist.yaml")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    rows = []
    for r in range(args.repeats):
        for mode in ("none", "bf16"):
            config = downpour.load_job(args.job, [*args.overrides, f"training.autocast={mode}", "monitor.tensorboard=false",
                                                  "monitor.dashboard=false", "checkpoint.enabled=false"])
            with tempfile.TemporaryDirectory() as tmp:
                s = downpour.train(config=config, run_dir=os.path.join(tmp, "run")).summary
            row = {"repeat": r, "autocast": mode, "examples_per_s": s["examples_per_s"], "test_accuracy": s["test_accuracy"],
                   "train_s": s["train_s"], "examples": s["examples"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"environment": environment(), "job": args.job, "overrides": args.overrides}))
    for row in rows:
        print(f"repeat {row['repeat']}  autocast {row['autocast']:<5} {row['examples_per_s']:>8.0f} examples/s  "
              f"test accuracy {row['test_accuracy']:.4f}  ({row['train_s']:.1f}s training)")


if __name__ == "__main__":
    main()
