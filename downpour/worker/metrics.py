"""A worker's Prometheus metrics, read from its trainer and RPC counters when scraped."""

from __future__ import annotations

from collections.abc import Callable

from downpour.monitor import Families
from downpour.worker.trainer import Trainer


def worker_metrics(trainer: Callable[[], Trainer | None]) -> Callable[[Families], None]:
    """``trainer`` returns the worker's trainer once it exists (None during start-up)."""

    def fill(f: Families) -> None:
        t = trainer()
        if t is None:
            return
        f.counter("downpour_worker_steps_total", "Training steps taken (batches computed).", t.steps)
        f.counter("downpour_worker_pushes_total", "Updates pushed (one per step, or one per training.accumulate "
                  "or training.local_steps steps).", t.pushes)
        f.counter("downpour_worker_examples_total", "Training examples processed.", t.examples)
        f.gauge("downpour_worker_examples_per_second", "Training examples per second over the last few seconds.", t.rate.rate)
        f.gauge("downpour_worker_loss", "Training loss (moving average over about 50 steps).", t.loss_ema)
        doc = ("Time spent per phase of a step: compute (forward, backward), push (encode and send the push+pull), "
               "pull_wait (wait for the pulled values).")
        f.counter("downpour_worker_step_phase_seconds_total", doc, t.compute_s, phase="compute")
        f.counter("downpour_worker_step_phase_seconds_total", doc, t.push_s, phase="push")
        f.counter("downpour_worker_step_phase_seconds_total", doc, t.wait_s, phase="pull_wait")
        if t.step_times is not None:
            f.histogram("downpour_worker_step_seconds", "Wall time of one training step.", t.step_times)
        f.counter("downpour_worker_sent_bytes_total", "Bytes sent to servers (frames, and values through shared memory).",
                  t.kv.bytes_sent)
        f.counter("downpour_worker_received_bytes_total", "Bytes received from servers.", t.kv.bytes_received)
        doc = ("Bytes of pushes and of pulled values by part: values, indices and scales (what a codec sends), "
               "headers (message headers).")
        for direction, parts in t.kv.wire.items():
            for part in ("values", "indices", "scales", "headers"):
                f.counter("downpour_worker_wire_bytes_total", doc, parts.get(part, 0), direction=direction, part=part)

    return fill
