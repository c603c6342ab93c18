"""The training loop of one worker: shards from the coordinator, steps against the servers.

One step (async, ``overlap: true``)::

    forward + backward on the current values     while the previous step's
    gradient -> one flat vector                  push+pull is in flight
    wait for that push+pull (new values land in the model)
    push+pull this gradient (returns at once)

so communication hides behind compute at the price of one step of extra
staleness. Sync mode (or ``overlap: false``) waits for each push+pull before
the next step, which BSP requires.

Delayed updates push less often: ``accumulate: k`` sums k micro-batches'
gradients and pushes their mean once (weighted by examples, so it equals one
batch k times larger); ``local_steps: H`` steps a local copy of the job's
optimizer H times and pushes the change of the parameters, which the servers
add (Paddle's geo-SGD). Either way the pull comes with the push. The schedule
is a small strategy of its own (:mod:`downpour.worker.schedule`).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from downpour.config import JobConfig
from downpour.data import Dataset
from downpour.data.loader import Batches, split_len
from downpour.data.order import example_order
from downpour.data.scoring import log_loss, roc_auc
from downpour.errors import ConfigError, RemoteError, RequestTimeout
from downpour.extensions import checked_loss, metric_value, resolve_loss, resolve_metrics
from downpour.monitor import Buckets, RateMeter
from downpour.protocol.ops import Code
from downpour.worker.client import Handle, KVClient
from downpour.worker.flat import FlatModel
from downpour.worker.online import OnlineLoop
from downpour.worker.precision import Precision
from downpour.worker.schedule import push_schedule
from downpour.worker.sparse import SparseClient

log = logging.getLogger(__name__)


# A batch's inputs: one tensor, or a tuple of tensors (e.g. CTR data: dense features and feature IDs).
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def _to(x: Inputs, device: torch.device) -> Inputs:
    """To ``device``; asynchronous where the source is pinned (the copy overlaps what runs next)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=x.is_pinned()) if x.device != device else x
    return tuple(_to(t, device) for t in x)  # type: ignore[misc]


def _forward(model: torch.nn.Module, x: Inputs) -> torch.Tensor:
    return model(x) if isinstance(x, torch.Tensor) else model(*x)


def _shape_of(x: Any) -> str:
    """A batch's shape(s) and dtype(s), for an error message."""
    if isinstance(x, torch.Tensor):
        return f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    return "(" + ", ".join(_shape_of(t) for t in x) + ")" if isinstance(x, (tuple, list)) else type(x).__name__


def _with_next(items: Iterator[Any]) -> Iterator[tuple[Any, Any]]:
    """Each item with the one after it (None after the last): the batch after the one training is known."""
    item = next(items, None)
    while item is not None:
        after = next(items, None)
        yield item, after
        item = after


class LeaveOrder:
    """The coordinator asked this worker to leave: a graceful stop of the job. Set from the heartbeat
    thread, read by the training loop before each step. ``at_version`` (sync jobs): leave once the
    values held are of that round, so that every worker stops after the same round. ``signalled``:
    the worker process got SIGTERM (set by its handler, which takes no lock): leave after this step."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at_version: int | None = None
        self.signalled = False

    def set(self, at_version: object) -> None:
        self.at_version = at_version if type(at_version) is int and at_version >= 0 else None
        self.event.set()

    def asked(self) -> bool:
        return self.signalled or self.event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Whether leaving was asked for, waiting up to ``timeout_s`` for the coordinator's order."""
        return self.signalled or self.event.wait(timeout_s) or self.signalled

    def due(self, versions: list[int]) -> bool:
        if self.signalled:
            return True
        if not self.event.is_set():
            return False
        return self.at_version is None or min(versions, default=0) >= self.at_version


class Trainer:
    def __init__(self, job: JobConfig, flat: FlatModel, kv: KVClient, dataset: Dataset, name: str, rank: int = 0,
                 sparse: SparseClient | None = None) -> None:
        self.job, self.flat, self.kv, self.data, self.name, self.rank = job, flat, kv, dataset, name, rank
        self.sparse = sparse  # the model's SparseEmbedding rows (None: a dense model)
        self.rows_ahead = sparse is not None and job.sparse_prefetch  # each batch's rows pulled during the step before
        t = job.training
        self.overlap = (t.overlap and t.consistency == "async" and not t.consistency_groups
                        and t.accumulate == 1 and t.local_steps == 1)
        if not self.overlap and flat.device.type == "cpu":
            # The parameters move into shared memory where the servers take it: each reply's values
            # are written straight into them (nothing reads them while a push+pull is in flight).
            values = kv.share_values()
            if values is not None:
                flat.place(values)
        self.pushes = 0
        self.pushes_at = 0  # self.steps at the last push
        # [epoch, shard, examples of it done] of the last push the servers acknowledged (the
        # heartbeat carries it: where the shard resumes if this worker dies), and of the one in flight.
        self.position: list[int] | None = None
        self._inflight_position: list[int] | None = None
        self._last_position: list[int] | None = None  # the data position of the last step's batch
        self._stream_from: int | None = None  # a stream push: the offset before its first event
        self.stream_gaps = 0  # stream pushes a server refused (stream_gap): the partition rewinds
        self.dropped = 0  # pushes a sync server refused as being for a past round (after a wait or a join)
        self.schedule = push_schedule(job, flat)  # when to push, and what (worker/schedule.py)
        slow = t.slowdown
        self.slow_factor = slow.factor if slow is not None and slow.rank in (None, rank) else 1.0
        self.slow_p = slow.probability if slow is not None else 0.0
        self._slow_rng = np.random.default_rng([t.seed, rank, 7])
        self.curve: list[list[float]] = []  # [seconds of training, examples, test accuracy] (monitor.eval_every_shards)
        self.max_steps = t.steps
        # The coordinator may ask this worker to leave (a graceful stop of the job): training then
        # ends after a step, with its push settled, so the position it leaves at is exact.
        self.leave = LeaveOrder()
        self.left = False  # training ended because of that order
        # A server refused the last push because a graceful stop ended the sync rounds (a worker
        # left after its last round, see SyncPolicy.freeze): that push was not applied; leave.
        self.halted = False
        self.steps = 0
        self.examples = 0
        self.loss_ema: float | None = None
        self._grads_checked = False  # the first step looked for trained parameters that get no gradient
        self.inflight: Handle | None = None
        self.compute_s = 0.0  # forward, backward, gradient to one vector
        self.push_s = 0.0  # handing the push+pull to ZeroMQ (encode, send)
        self.wait_s = 0.0  # waiting for the pulled values (the reply to the push+pull)
        self.train_s = 0.0
        self.shard: dict | None = None  # the shard being trained ({epoch, shard, start, stop})
        # Step times for the metrics; None when the job turned metrics off (nothing recorded).
        self.step_times: Buckets | None = Buckets() if job.monitor.metrics else None
        self.rate = RateMeter()
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, that epoch's example order)
        self.last_output: torch.Tensor | None = None  # the last batch's model output (scored before its update)
        # A live stream (data.name: stream): shards are partitions, read event by event.
        self.online = OnlineLoop(self, dataset, name) if getattr(dataset, "source", None) is not None else None
        self.loss_fn = resolve_loss(t.loss)
        self.metrics = resolve_metrics(t.metrics)
        pin = flat.device.type == "cuda"
        self.batches = Batches(dataset.train, t.batch_size, job.data.loader, pin, "data (train split)") if dataset is not None else None
        self._test_batches: Batches | None = None
        self.precision = Precision(t.autocast, flat.device)
        if t.autocast == "fp16" and sparse is not None:
            raise ConfigError("training.autocast: fp16 scales the loss, which the sparse tables' row gradients would "
                              "carry to the servers; use bf16 with SparseEmbedding")
        torch.manual_seed(t.seed * 1000 + 17 + rank)  # dropout masks: reproducible, distinct per worker

    @property
    def finished(self) -> bool:
        return self.max_steps is not None and self.steps >= self.max_steps

    def progress(self) -> dict[str, Any]:
        """What the heartbeat carries (called from the heartbeat thread: reads plain numbers only)."""
        rate = self.rate.update(self.examples)
        out: dict[str, Any] = {
            # (0 once training is over: the meter's last window would otherwise stand for ever)
            "steps": self.steps, "examples": self.examples, "examples_per_s": 0.0 if self.train_s > 0 else rate,
            "compute_s": self.compute_s, "push_s": self.push_s, "pull_wait_s": self.wait_s,
            "bytes_sent": self.kv.bytes_sent, "bytes_received": self.kv.bytes_received,
        }
        if self.position is not None:
            out["position"] = self.position
        shard = self.shard
        if shard is not None:
            out["shard"] = [shard["epoch"], shard["shard"]]
        if self.loss_ema is not None:
            out["loss"] = self.loss_ema
        if self.online is not None:
            out.update(self.online.progress())
        return out

    def run(self, next_shard: Callable[[], dict | None], shard_done: Callable[[int, int, int, int, int, int], None]) -> None:
        """Train shards until the coordinator has none left (or ``training.steps`` is reached)."""
        t0 = time.perf_counter()
        every = self.job.monitor.eval_every_shards if self.rank == 0 else None
        trained = 0
        while not self.finished:
            if self.halted or self.leave.due(self.kv.versions):
                self.left = True
                break
            if self.sparse is not None and trained:
                # The rows of the last step go out now: asked for a shard, this worker may leave the
                # membership to wait, and a checkpoint's cut then takes it as complete (snapshot.py).
                self.sparse.flush()
            shard = next_shard()
            if shard is None:
                self.left = self.leave.asked()  # the wait for a shard ended by the order to leave
                break
            self.shard = shard
            n = self.train_shard(shard)
            # With overlap the shard's last push may still be in flight: it is answered before the shard
            # is reported done or another one is asked for (a worker that waits for a shard counts as
            # settled at a checkpoint's cut, and a dead worker's shard resumes from its last answered push).
            self._settle()
            if n == shard["stop"] - shard["start"] - shard.get("skip", 0):  # cut short by training.steps: unfinished
                shard_done(shard["epoch"], shard["shard"], n, self.steps, self.examples, self.pushes)
                self.shard = None  # (a worker waiting for the next one holds none: its heartbeat says so)
            trained += 1
            if every and trained % every == 0:
                self._settle()
                if self.sparse is not None:
                    self.sparse.flush()
                if not self.schedule.own_values:  # the servers' values, not the quantized ones (local SGD: its own)
                    self.kv.wait(self.kv.pull(self.flat.host, exact=True))
                    self.flat.host_to_device()
                self.curve.append([time.perf_counter() - t0, self.examples, self.evaluate()["test_accuracy"]])
        self.shard = None
        # What accumulation or local SGD still holds goes out with the data position of its last batch:
        # a checkpoint, a graceful stop's LEAVE and a resume then know those examples were trained.
        self._flush(self._last_position)
        self._settle()
        if self.sparse is not None:
            self.sparse.flush()
        self.train_s = time.perf_counter() - t0

    def train_shard(self, shard: dict) -> int:
        if self.online is not None:
            return self.online.train(shard)
        t = self.job.training
        if self._order is None or self._order[0] != shard["epoch"]:
            self._order = (shard["epoch"], example_order(len(self.data.train), t.seed, shard["epoch"]))
        positions = self._order[1][shard["start"] : shard["stop"]]
        rng = np.random.default_rng([t.seed, shard["epoch"], shard["shard"]])
        skip = shard.get("skip", 0)  # examples already trained (a shard resumed from a checkpoint)
        done = 0
        device = self.flat.device
        batches = ((_to(x, device), _to(y, device)) for x, y in self.batches(rng.permutation(positions)[skip:]))
        for (x, y), after in _with_next(batches):
            if self.finished:
                break
            if self.leave.due(self.kv.versions):
                self.left = True
                break
            n = len(y)
            if self.rows_ahead:  # the next batch's sparse rows travel while this one trains
                last = after is None or (self.max_steps is not None and self.steps + 1 >= self.max_steps)
                self.sparse.prepare(x, None if last else after[0])
            self.step(x, y, [shard["epoch"], shard["shard"], skip + done + n])
            if self.halted:  # its push was refused, not applied: the shard resumes before this batch
                self.steps, self.examples = self.steps - 1, self.examples - n
                self.left = True
                break
            done += n
        return done

    def step(self, x: Inputs, y: torch.Tensor, position: list[int] | None = None, start: int | None = None) -> None:
        """One step on a batch; ``position`` is where the batch ends in the data (saved by checkpoints).
        ``start``: a stream batch's offset before its first event (its pushes cover (start, position[2]])."""
        if start is not None and self._stream_from is None:
            self._stream_from = start  # the first batch of the next push
        self._last_position = position
        c0 = time.perf_counter()
        # The versions the model's values have now: the gradient is computed on them, so the
        # servers measure its staleness from here (not from the push+pull settled below).
        base = list(self.kv.versions)
        model = self.flat.model
        if not model.training:  # (train() walks every module: 12 µs a step for the reference MLP)
            model.train()
        self.flat.zero_grad()
        t = self.job.training
        with self.precision.autocast():
            out = _forward(model, x)
            loss = checked_loss(t.loss, self.loss_fn(out, y))
        # scored before its update (online learning's prequential metrics); a model may return a tuple or
        # a dict for its own loss to take apart
        self.last_output = out.detach() if isinstance(out, torch.Tensor) else None
        self.precision.backward(loss)
        if not self._grads_checked:
            self._grads_checked = True
            self._warn_no_gradient()
        if not self.precision.unscale(self.flat.params):  # fp16 overflow: this batch is skipped, the scale halves
            self.flat.zero_grad()
        if t.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(self.flat.params, t.clip_grad_value)
        if t.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.flat.params, t.clip_grad_norm)
        if self.sparse is not None:  # the rows' gradients go with the next batch's pull
            self.sparse.after_backward()
            if self.online is not None:  # ... or now, ahead of the dense push that carries the data position
                self.sparse.send_pending(position, start)
        self.steps += 1
        self.examples += len(y)
        ready = self.schedule.after_backward(len(y), self.steps)
        c1 = time.perf_counter()
        if self.slow_factor > 1.0 and (self.slow_p >= 1.0 or self._slow_rng.random() < self.slow_p):  # a simulated straggler
            time.sleep((self.slow_factor - 1.0) * (c1 - c0))
        if ready:
            self._flush(position, base)
        self.compute_s += c1 - c0
        if self.step_times is not None:
            self.step_times.observe(time.perf_counter() - c0)
        value = float(loss.item())
        if math.isfinite(value):
            self.loss_ema = value if self.loss_ema is None else 0.98 * self.loss_ema + 0.02 * value

    def _warn_no_gradient(self) -> None:
        """Trained parameters the first step gave no gradient (a module the forward never calls): the
        servers update them with a zero gradient, so weight decay and momentum still move them, where
        torch.optim skips a parameter whose ``.grad`` is None. Said once, by rank 0."""
        missing = [spec.name for p, spec in zip(self.flat.params, self.flat.layout.params) if p.grad is None]
        if missing and self.rank == 0:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            log.warning("%s: parameter(s) %s got no gradient in the first step (not used by the forward?): the servers update "
                        "them with a zero gradient, so weight decay and momentum still change them (torch.optim would skip "
                        "them); freeze them with requires_grad=False if they are not to be trained", self.name, shown)

    def _flush(self, position: list[int] | None, base: list[int] | None = None) -> None:
        """Push what the steps since the last push produced (if anything) and pull the new values."""
        owed = self.schedule.take(self.steps, self.pushes_at)
        if owed is None:
            return
        grad, weight, is_delta = owed
        self._settle()
        p0 = time.perf_counter()
        self.inflight = self.kv.push_pull(grad, self.flat.host, weight=weight, versions=base, position=position, delta=is_delta,
                                          start=self._stream_from if position is not None else None)
        self._stream_from = None
        self._inflight_position = position
        self.pushes += 1
        self.pushes_at = self.steps
        self.push_s += time.perf_counter() - p0
        if not self.overlap:
            self._settle()

    def _settle(self) -> None:
        """Wait for the push+pull in flight; its values then sit in the model."""
        if self.inflight is None:
            return
        w0 = time.perf_counter()
        try:
            self.kv.wait(self.inflight)
        except RemoteError as err:
            if err.code not in ("sync_round", "sync_duplicate", "peer_replaced", "not_member", "stream_gap", Code.STOPPING):
                raise
            if err.code == Code.STOPPING:  # the job stops and its sync rounds ended: nothing of this push was applied
                log.info("%s: the job is stopping; the last push was not applied, leaving before it", self.name)
                self.inflight, self._inflight_position, self.halted = None, None, True
                return
            if err.code == "stream_gap":  # a server lacks events before this push: the stream loop rewinds
                self.stream_gaps += 1
            # This worker waited for a shard (or joined) while sync rounds went on: its gradient is for
            # a past round. Or a server was replaced (it restored a checkpoint) while the push was in
            # flight. Drop the push, take the current values, and go on from there.
            self.dropped += 1
            log.info("%s: %s; dropped one push and pulled", self.name,
                     "a server was replaced" if err.code == "peer_replaced" else "a sync round passed while this worker waited")
            self.pull_all()
        except RequestTimeout as err:  # a server died: its replacement's address comes with a heartbeat
            log.warning("%s: %s; pulling again", self.name, err)
            self.dropped += 1
            self.pull_all()
        self.inflight = None
        if self._inflight_position is not None:
            self.position = self._inflight_position
        self.flat.host_to_device()
        self.schedule.received(self.flat.host)
        self.wait_s += time.perf_counter() - w0

    def pull_all(self, attempts: int = 5, exact: bool = False) -> None:
        """Pull every value, riding out a server being replaced (its old process times out or
        its requests end with ``peer_replaced`` once the new one's address is known)."""
        for attempt in range(attempts):
            try:
                self.kv.wait(self.kv.pull(self.flat.host, exact=exact))
                return
            except (RequestTimeout, RemoteError) as err:
                if attempt == attempts - 1 or (isinstance(err, RemoteError) and err.code != "peer_replaced"):
                    raise
                log.info("%s: pull failed (%s); again", self.name, err)

    def warm_up(self, steps: int = 2) -> None:
        """Forward and backward passes on the first examples of the training split, before training
        starts (while the other workers may still be starting): torch's first calls (allocations,
        kernel choices; on a GPU its libraries' start-up) then belong to start-up, not to the first
        steps. Nothing of it stays: the gradients are dropped, the model's buffers and the random
        generator are restored, and the parameters are not changed. Not for sparse models (their
        forward pulls rows) or data read through a loader or a stream."""
        if self.sparse is not None or self.online is not None or self.batches is None or self.batches.loader is not None:
            return
        size = split_len(self.data.train)
        if size <= 0:
            return
        model, device = self.flat.model, self.flat.device
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.train()
            for x, y in itertools.islice(self.batches(np.arange(min(size, self.job.training.batch_size))), 1):
                for _ in range(steps):
                    try:
                        with self.precision.autocast():
                            out = _forward(model, _to(x, device))
                            self._check_classes(out)
                            loss = self.loss_fn(out, _to(y, device))
                        loss.float().sum().backward()
                    except torch.cuda.OutOfMemoryError:
                        raise  # (the device's memory, not the data)
                    except (RuntimeError, ValueError, IndexError, TypeError) as err:
                        # (a model for other data: torch's words alone do not say which side is wrong)
                        raise ConfigError(f"the model cannot train on the data's first batch (inputs {_shape_of(x)}, "
                                          f"labels {_shape_of(y)}): {type(err).__name__}: {err}") from err
                    self.flat.zero_grad()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)

    def _check_classes(self, out: torch.Tensor) -> None:
        """With cross entropy over class logits: every training label must name one of the model's outputs
        (else torch fails in the middle of training, on the first batch holding a larger one)."""
        y = getattr(self.data.train, "y", None)
        if self.job.training.loss != "cross_entropy" or out.dim() != 2 or not isinstance(y, (np.ndarray, torch.Tensor)) or not len(y):
            return
        if y.dtype.kind not in "iu" if isinstance(y, np.ndarray) else y.is_floating_point():
            return
        top = int(y.max())
        if top >= out.shape[1]:
            raise ConfigError(f"the training labels go up to {top}, but the model has {out.shape[1]} outputs (classes 0.."
                              f"{out.shape[1] - 1}): give it at least {top + 1} (model.args.num_classes for a built-in model)")

    def start(self) -> None:
        """After the first pull: local SGD measures its first delta from these values."""
        self.schedule.received(self.flat.host)

    def evaluate(self, batch_size: int = 1000) -> dict[str, Any]:
        """Test loss and accuracy of the model's current values over the whole test split; with
        binary cross entropy also AUC and log loss (and the data's best achievable ones, if known);
        the job's metrics (``training.metrics``) under ``metrics``. No test split: no figures."""
        model = self.flat.model
        model.eval()
        test = self.data.test
        if test is None:
            return {"test_accuracy": None, "test_loss": None, "test_examples": 0}
        t = self.job.training
        kind = t.loss
        if self._test_batches is None:
            self._test_batches = Batches(test, batch_size, self.job.data.loader, self.flat.device.type == "cuda",
                                         "data (test split)")
        total_loss, correct, n, countable = 0.0, 0, 0, True
        outs, targets, other = [], [], None  # other: the type of an output that is not a tensor
        keep = kind == "binary_cross_entropy" or bool(self.metrics)
        size = split_len(test)
        with torch.no_grad():
            for x, y in self._test_batches(np.arange(size) if size >= 0 else None):
                x, y = _to(x, self.flat.device), _to(y, self.flat.device)
                with self.precision.autocast():
                    out = _forward(model, x)
                    total_loss += float(checked_loss(kind, self.loss_fn(out, y))) * len(y)
                n += len(y)
                if not isinstance(out, torch.Tensor):  # a tuple or dict for a custom loss: its test loss only
                    countable, other = False, type(out).__name__
                    continue
                if kind == "binary_cross_entropy":
                    correct += int(((torch.sigmoid(out.float().reshape(-1)) > 0.5).to(y.dtype) == y.reshape(-1)).sum())
                elif out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
                    correct += int((out.argmax(1) == y).sum())
                else:
                    countable = False  # a custom loss over other targets: no accuracy
                if keep:
                    outs.append(out.float().cpu())
                    targets.append(y.cpu())
        result: dict[str, Any] = {"test_accuracy": correct / n if n and countable else None,
                                  "test_loss": total_loss / n if n else None, "test_examples": n}
        if kind == "binary_cross_entropy" and n and other is None:
            y_all, p_all = torch.cat(targets).reshape(-1).numpy(), torch.sigmoid(torch.cat(outs).reshape(-1)).numpy()
            positives = int(y_all.sum())
            finite = bool(np.isfinite(p_all).all())
            if 0 < positives < len(y_all) and finite:
                result["test_auc"] = roc_auc(y_all, p_all)
            elif not finite:  # (an AUC over NaN scores would be a number that means nothing)
                result["test_auc"] = None
                result["test_auc_undefined"] = "the model's outputs are not finite on some test examples: no AUC"
                log.warning("%s: %s", self.name, result["test_auc_undefined"])
            else:  # undefined on one class (a small sample of rare clicks): the loss still says how the model does
                result["test_auc"] = None
                result["test_auc_undefined"] = (f"the test split holds one class only ({positives} positives, "
                                                f"{len(y_all) - positives} negatives): no AUC")
                log.warning("%s: %s", self.name, result["test_auc_undefined"])
            result["test_logloss"] = log_loss(y_all, p_all)
            optimum = getattr(self.data, "optimum", None)
            if optimum:
                result["optimum_auc"] = optimum.get("test_auc")
                result["optimum_logloss"] = optimum.get("test_logloss")
        if self.metrics and n and other is not None:
            result["metrics"] = {}
            result["metric_errors"] = {name: f"the model's output is a {other}, not a tensor: metrics take a tensor"
                                       for name in self.metrics}
        elif self.metrics and n:
            out_all, y_all_t = torch.cat(outs), torch.cat(targets)
            result["metrics"], errors = {}, {}
            for name, fn in self.metrics.items():
                # A metric that fails (raises, or returns no number) is reported, not fatal: the
                # trained model and the job's other figures are kept.
                try:
                    result["metrics"][name] = metric_value(name, t.metrics[name], fn(out_all, y_all_t))
                except Exception as err:  # noqa: BLE001  (user code: any error)
                    errors[name] = f"{type(err).__name__}: {err}"[:1000]
                    log.error("%s: training.metrics.%s (%s) failed: %s", self.name, name, t.metrics[name], errors[name])
            if errors:
                result["metric_errors"] = errors
        for key, what in (("test_loss", "test loss"), ("test_logloss", "test log loss")):
            value = result.get(key)
            if value is not None and not math.isfinite(value):  # (the report takes finite numbers only)
                result[key] = None
                result[f"{key}_undefined"] = (f"the {what} is {value}: the model's outputs or the loss are not finite on "
                                              "some test examples")
                log.warning("%s: %s", self.name, result[f"{key}_undefined"])
        return result

    def stats(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "examples": self.examples,
            "train_s": self.train_s,
            "compute_s": self.compute_s,
            "push_s": self.push_s,
            "wait_s": self.wait_s,
            "examples_per_s": self.examples / self.train_s if self.train_s > 0 else 0.0,
            "final_loss": self.loss_ema,
            "bytes_sent": self.kv.bytes_sent,
            "bytes_received": self.kv.bytes_received,
            "pushes": self.pushes,
            "dropped_pushes": self.dropped,
            "wire": {d: dict(c) for d, c in self.kv.wire.items()},
            "shm_requests": self.kv.shm_requests,
            "curve": self.curve,
            **({"sparse": self.sparse.stats()} if self.sparse is not None else {}),
            **({"online": self.online.stats()} if self.online is not None else {}),
            "cpu_s": time.process_time(),
        }
