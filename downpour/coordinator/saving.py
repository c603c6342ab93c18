"""The trained model on disk: the coordinator pulls every key's final value from the servers and
writes ``model.pt`` (a state_dict, read with ``torch.load(path, weights_only=True)``).

A plain PULL per server (float32 values in key order, never compressed, never through shared
memory), split into requests of at most ``max_request_bytes`` of values, so the coordinator needs
no worker's client (:class:`~downpour.worker.client.KVClient` is the workers').
"""

from __future__ import annotations

import os

import torch

from downpour.errors import ProtocolError
from downpour.layout import KeySlice, Layout
from downpour.protocol import Message, Op
from downpour.protocol.rpc import RpcClient


def _requests(slices: list[KeySlice], max_request_bytes: int) -> list[list[KeySlice]]:
    """One server's keys in requests of at most ``max_request_bytes`` of float32 values (a key
    larger than that goes alone)."""
    out: list[list[KeySlice]] = []
    size = 0
    for s in slices:
        if not out or size + 4 * s.length > max_request_bytes:
            out.append([])
            size = 0
        out[-1].append(s)
        size += 4 * s.length
    return out


def pull_parameters(rpc: RpcClient, layout: Layout, servers: dict[int, str], max_request_bytes: int) -> torch.Tensor:
    """Every key's value, as one flat float32 vector of ``layout.numel``. ``servers``: rank ->
    peer name (connected on ``rpc``). Raises RemoteError, RequestTimeout (naming the server) or
    ProtocolError (a reply of the wrong size)."""
    flat = torch.empty(layout.numel)
    pending = []
    for rank, peer in sorted(servers.items()):
        for group in _requests(layout.server_slices(rank), max_request_bytes):
            pending.append((group, rpc.request(peer, Message(Op.PULL, meta={"keys": [s.key for s in group]}))))
    for group, fut in pending:
        reply = fut.result()
        want = sum(s.length for s in group)
        values = reply.tensors[0] if len(reply.tensors) == 1 else None
        if values is None or values.dtype != torch.float32 or values.numel() != want:
            got = "no values" if values is None else f"{values.numel()} {values.dtype} values"
            raise ProtocolError(f"{fut.peer} returned {got} for {want} float32 expected")
        at = 0
        for s in group:
            flat[s.start : s.stop].copy_(values[at : at + s.length])
            at += s.length
    return flat


def write_model(path: str, layout: Layout, flat: torch.Tensor, buffers: dict[str, torch.Tensor] | None,
                aliases: dict[str, str] | None = None) -> None:
    """The parameters (views of ``flat`` by the layout) and the merged buffers as a state_dict at
    ``path``, atomically (a reader never sees half a file). ``aliases``: other names of parameters
    (tied weights), written as the same tensor so that a strict load finds every key."""
    state = {p.name: flat[p.offset : p.offset + p.numel].view(p.shape).clone() for p in layout.params}
    state.update(buffers or {})  # BatchNorm statistics and other buffers, merged from the workers
    state.update({alias: state[name] for alias, name in (aliases or {}).items() if name in state})
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
