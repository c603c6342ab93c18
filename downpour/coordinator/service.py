"""The coordinator process: a listener, a clock, and the state machine.

The service owns the sockets and the run folder; every decision is made by
:class:`CoordinatorState`. It writes ``summary.json`` (and its own address, so
a launcher can find it) into the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch
import zmq

from downpour.config import JobConfig
from downpour.coordinator.state import CoordinatorState, Finish, Reply, SaveModel
from downpour.data import build_dataset
from downpour.errors import DownpourError, ProtocolError
from downpour.layout import Layout, make_layout
from downpour.models import build_model, param_shapes
from downpour.protocol import decode, encode
from downpour.transport import Listener, Poller

log = logging.getLogger(__name__)

_TICK_S = 0.05


def plan_layout(job: JobConfig) -> Layout:
    """Build the model on the meta device (no memory) to learn its parameters, then partition them."""
    try:
        with torch.device("meta"):
            model = build_model(job.model, job.training.seed)
    except (RuntimeError, NotImplementedError):  # a factory that cannot run on meta tensors
        model = build_model(job.model, job.training.seed)
    cl = job.cluster
    return make_layout(param_shapes(model), cl.num_servers, "f32", cl.partitioner, cl.max_slice_bytes)


def write_atomic(path: str, text: str) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class Coordinator:
    def __init__(self, ctx: zmq.Context, job: JobConfig, address: str, run_dir: str | None) -> None:
        self.job = job
        self.run_dir = run_dir
        layout = plan_layout(job)
        num_train = len(build_dataset(job.data).train)
        self.state = CoordinatorState(job, layout, num_train, time.monotonic())
        self.ctx = ctx
        self.layout = layout
        self.listener = Listener(ctx, address, job.cluster.max_message_bytes)
        self.address = self.listener.address
        self.rejected = 0
        log.info("coordinator: listening on %s; %d parameters in %d keys over %d servers",
                 self.address, layout.numel, len(layout.slices), layout.num_servers)
        if run_dir:
            write_atomic(os.path.join(run_dir, "coordinator.addr"), self.address)

    def _perform(self, actions: list) -> Finish | None:
        finish = None
        for a in actions:
            if isinstance(a, Reply):
                self.listener.send(a.to, encode(a.msg))
            elif isinstance(a, Finish):
                finish = a
            elif isinstance(a, SaveModel):
                self._save_model(a)
        return finish

    def _save_model(self, action: SaveModel) -> None:
        """Write the trained parameters as a state_dict (``model.pt``, read with
        ``torch.load(path, weights_only=True)``) into the run folder."""
        if not self.run_dir:
            return
        from downpour.protocol.rpc import RpcClient
        from downpour.worker.client import KVClient

        rpc = RpcClient(self.ctx, f"coordinator-save-{os.getpid()}", self.job.cluster.request_timeout_s)
        try:
            for s in action.servers:
                rpc.connect(s["name"], s["address"])
            kv = KVClient(rpc, self.layout, {int(s["rank"]): s["name"] for s in action.servers})
            flat = torch.empty(self.layout.numel)
            kv.wait(kv.pull(flat))
            state = {p.name: flat[p.offset : p.offset + p.numel].view(p.shape).clone() for p in self.layout.params}
            path = os.path.join(self.run_dir, "model.pt")
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
            log.info("coordinator: saved the trained parameters to %s", path)
        except DownpourError as err:
            log.error("coordinator: could not save the trained parameters: %s", err)
        finally:
            rpc.close()

    def serve(self) -> int:
        """Run until the job finishes or fails; returns the exit code (0 on success)."""
        poller = Poller()
        poller.register(self.listener)
        finish = None
        while finish is None:
            if poller.poll(_TICK_S):
                while True:
                    try:
                        peer, frames = self.listener.recv()
                    except zmq.Again:
                        break
                    try:
                        msg = decode(frames, self.job.cluster.max_message_bytes)
                    except ProtocolError as err:
                        self.rejected += 1
                        log.warning("coordinator: dropped a malformed message: %s", err)
                        continue
                    finish = self._perform(self.state.handle(peer, msg, time.monotonic())) or finish
            finish = self._perform(self.state.tick(time.monotonic())) or finish
        summary = dict(finish.summary, coordinator_rejected=self.rejected)
        if self.run_dir:
            write_json(os.path.join(self.run_dir, "summary.json"), summary)
        if finish.code == 0:
            log.info("coordinator: job finished: test accuracy %s", summary.get("test_accuracy"))
        else:
            log.error("coordinator: job failed: %s", summary.get("error"))
        # Answer status queries a moment longer, so a launcher polling us sees the end.
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            if poller.poll(0.05):
                try:
                    peer, frames = self.listener.recv()
                    msg = decode(frames)
                    self._perform([a for a in self.state.handle(peer, msg, time.monotonic()) if isinstance(a, Reply)])
                except (zmq.Again, ProtocolError):
                    pass
        self.listener.close()
        return finish.code
