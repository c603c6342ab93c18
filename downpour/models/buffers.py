"""A model's buffers (BatchNorm running statistics, counters): what travels, and how workers' are merged.

Buffers are not trained by the servers: each worker's copy evolves with the batches it sees.
At the end of training every worker sends its buffers with its final statistics; the
coordinator merges them per buffer (``training.buffers`` and ``training.buffer_policies``):

* ``average``: the mean over the workers, weighted by the examples each trained (integer
  buffers, such as BatchNorm's ``num_batches_tracked``, take the largest value);
* ``evaluator``: the evaluating worker's own.

The evaluator loads the merged buffers before it evaluates, and the coordinator writes them into
``model.pt`` beside the parameters (and into the final checkpoint's ``job.json``), so that the
saved model loads with a strict ``load_state_dict`` and evaluates as reported.

On the wire the buffers are tensor frames of the WORKER_DONE request (and of the evaluator's
answer), their names in the meta (:func:`pack`, :func:`unpack`); in ``job.json`` they are
``{"dtype", "shape", "data": base64}`` (:func:`to_json`). Never pickle.
"""

from __future__ import annotations

import base64
import fnmatch
from typing import Any

import numpy as np
import torch
from torch import nn

from downpour.config import TrainingConfig
from downpour.errors import ProtocolError

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                       torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def aliases(model: nn.Module, trained: set[str]) -> dict[str, str]:
    """State_dict names that are another name of a ``trained`` parameter (tied weights:
    ``b.weight = a.weight``), each mapped to the name the servers keep it under."""
    named = {id(p): n for n, p in model.named_parameters() if n in trained}
    return {n: named[id(t)] for n, t in model.state_dict(keep_vars=True).items() if n not in trained and id(t) in named}


def model_buffers(model: nn.Module, trained: set[str]) -> dict[str, torch.Tensor]:
    """What a state_dict holds besides the ``trained`` parameters (the servers' keys): persistent
    buffers, and frozen parameters (``requires_grad=False``), by state_dict name. Other names of
    trained parameters are not buffers: their values are the servers'."""
    tied = aliases(model, trained)
    return {n: t for n, t in model.state_dict().items() if n not in trained and n not in tied}


def check_sendable(buffers: dict[str, torch.Tensor]) -> None:
    """A :class:`ConfigError` naming the first buffer whose dtype no message can carry (a complex
    buffer, say): checked before the job starts, not found at its end, when the workers report
    their buffers for ``model.pt``."""
    from downpour.errors import ConfigError
    from downpour.protocol.codec import DTYPE_NAMES

    for name, t in buffers.items():
        if t.dtype not in DTYPE_NAMES and t.dtype != torch.bool:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in [*DTYPE_NAMES, torch.bool])
            raise ConfigError(f"model: buffer {name!r} is {str(t.dtype).removeprefix('torch.')}, which the workers cannot "
                              f"send for model.pt (allowed: {allowed}); keep it as two real buffers, or register it with "
                              "persistent=False")


def pack(buffers: dict[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """Names (for the message's meta) and contiguous CPU tensors (its frames); bool goes as uint8."""
    names, tensors = [], []
    for name, t in buffers.items():
        t = t.detach().cpu()
        names.append(name)
        tensors.append((t.to(torch.uint8) if t.dtype == torch.bool else t).contiguous())
    return names, tensors


def unpack(names: Any, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`pack`'s inverse (copies, so the message's memory may go); :class:`ProtocolError` when malformed."""
    if not isinstance(names, list) or len(names) != len(tensors) or not all(isinstance(n, str) and n for n in names):
        raise ProtocolError(f"buffers: {len(tensors)} tensors but names {str(names)[:80]}")
    if len(set(names)) != len(names):
        raise ProtocolError("buffers: a name appears twice")
    return {n: t.clone() for n, t in zip(names, tensors)}


def encode(buffers: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, t in buffers.items():
        t = t.detach().cpu().contiguous()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
        out[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": raw.numpy().tobytes()}
    return out


def decode(encoded: Any) -> dict[str, torch.Tensor]:
    """Tensors from :func:`encode`'s form; :class:`ProtocolError` for anything malformed."""
    if not isinstance(encoded, dict):
        raise ProtocolError("buffers: expected a mapping")
    out = {}
    for name, e in encoded.items():
        if not (isinstance(name, str) and isinstance(e, dict) and e.get("dtype") in _DTYPES and isinstance(e.get("shape"), list)
                and all(isinstance(s, int) and s >= 0 for s in e["shape"]) and isinstance(e.get("data"), (bytes, bytearray))):
            raise ProtocolError(f"buffers: malformed entry {name!r}")
        dtype = _DTYPES[e["dtype"]]
        raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
        numel = int(np.prod(e["shape"])) if e["shape"] else 1
        if len(e["data"]) != numel * raw_dtype.itemsize:
            raise ProtocolError(f"buffers: {name!r} holds {len(e['data'])} bytes, not {numel} x {raw_dtype.itemsize}")
        t = torch.frombuffer(bytearray(e["data"]), dtype=raw_dtype) if numel else torch.empty(0, dtype=raw_dtype)
        out[name] = t.view(dtype).reshape(e["shape"]).clone()
    return out


def policy_of(name: str, t: TrainingConfig) -> str:
    for pattern, policy in t.buffer_policies.items():
        if fnmatch.fnmatchcase(name, pattern):
            return policy
    return t.buffers


def merge(reports: list[tuple[float, dict[str, torch.Tensor]]], evaluator: dict[str, torch.Tensor] | None,
          t: TrainingConfig) -> dict[str, torch.Tensor]:
    """Each buffer by its policy, from (examples, buffers) per worker and the evaluator's buffers."""
    names = list(evaluator) if evaluator is not None else (list(reports[0][1]) if reports else [])
    out = {}
    for name in names:
        have = [(w, b[name]) for w, b in reports if name in b]
        if policy_of(name, t) == "evaluator" and evaluator is not None:
            out[name] = evaluator[name]
        elif not have:
            continue
        elif have[0][1].is_floating_point():
            total = sum(w for w, _ in have)
            weights = [w / total for w, _ in have] if total > 0 else [1.0 / len(have)] * len(have)
            acc = sum(b.double() * k for k, (_, b) in zip(weights, have))
            out[name] = acc.to(have[0][1].dtype)
        else:
            out[name] = torch.stack([b for _, b in have]).max(0).values
    return out


def to_json(buffers: dict[str, torch.Tensor]) -> dict[str, Any]:
    """For the checkpoint's job.json: :func:`encode` with the bytes in base64."""
    return {n: {**e, "data": base64.b64encode(e["data"]).decode()} for n, e in encode(buffers).items()}


def from_json(encoded: dict[str, Any]) -> dict[str, torch.Tensor]:
    return decode({n: {**e, "data": base64.b64decode(e["data"])} for n, e in encoded.items()})
