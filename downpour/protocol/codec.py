"""Message <-> frames, without copying tensor data.

Wire format of one message (a ZeroMQ multipart message)::

    frame 0   header: msgpack [MAGIC, op, req_id, meta, [[dtype, [dims...]], ...]]
    frame 1.. one frame per tensor: the tensor's raw bytes (C order, little-endian)

Encoding hands the tensors' own memory to ZeroMQ (no copy here); decoding maps
each frame with ``torch.frombuffer`` (no copy either). Decoding validates
everything before anything is used: an unknown op, a bad header, a dtype not in
:data:`DTYPES`, a shape that does not match the frame's length, too many
tensors or too many bytes raise :class:`ProtocolError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from downpour.errors import ProtocolError
from downpour.protocol.messages import Message, Op

MAGIC = 0xD0  # first header field: version 0 of the wire format
MAX_TENSORS = 4096
MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 8

DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f64": torch.float64,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
_OPS = {int(o): o for o in Op}

# Received frames are read-only buffers; tensors made from them are only read
# (gradients are consumed, parameters are copied out), so the warning is noise.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def encode(msg: Message) -> list[Any]:
    """Frames for ``msg``: the header, then each tensor's memory (not copied).

    The caller must not modify a tensor until ZeroMQ has sent it (for a request:
    until its reply arrived).
    """
    descs = []
    frames: list[Any] = [None]
    for t in msg.tensors:
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        name = DTYPE_NAMES.get(t.dtype)
        if name is None:
            raise ProtocolError(f"dtype {t.dtype} cannot be sent; allowed: {sorted(DTYPES)}")
        descs.append([name, list(t.shape)])
        frames.append(_buffer(t))
    frames[0] = msgpack.packb([MAGIC, int(msg.op), msg.req_id, msg.meta, descs], use_bin_type=True)
    return frames


def _buffer(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: send the raw 16-bit words
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def decode(frames: Sequence[Any], max_bytes: int = 1 << 30) -> Message:
    """Parse and validate frames (``zmq.Frame``, bytes or memoryviews) into a Message."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) - 1 > MAX_TENSORS:
        raise ProtocolError(f"too many frames: {len(frames)} (limit {MAX_TENSORS + 1})")
    head = _view(frames[0])
    if len(head) > min(MAX_HEADER_BYTES, max_bytes):
        raise ProtocolError(f"header of {len(head)} bytes exceeds {min(MAX_HEADER_BYTES, max_bytes)}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable header: {type(err).__name__}") from None
    if not isinstance(header, list) or len(header) != 5 or header[0] != MAGIC:
        raise ProtocolError("header is not a Downpour v0 header")
    _, op_code, req_id, meta, descs = header
    if type(req_id) is not int or not 0 <= req_id < 1 << 63:
        raise ProtocolError(f"bad request id {req_id!r}")
    try:
        return _decode_body(op_code, req_id, meta, descs, frames, len(head), max_bytes)
    except ProtocolError as err:
        err.req_id = req_id  # the header was readable: the sender can be told what was wrong
        raise


def _decode_body(op_code, req_id, meta, descs, frames, total, max_bytes) -> Message:
    op = _OPS.get(op_code) if type(op_code) is int else None
    if op is None:
        raise ProtocolError(f"unknown op {op_code!r}")
    if not isinstance(meta, dict):
        raise ProtocolError("meta must be a mapping")
    if not isinstance(descs, list) or len(descs) != len(frames) - 1:
        raise ProtocolError(f"header describes {len(descs) if isinstance(descs, list) else '?'} tensors, message has {len(frames) - 1}")
    tensors = []
    for i, (desc, frame) in enumerate(zip(descs, frames[1:])):
        buf = _view(frame)
        total += len(buf)
        if total > max_bytes:
            raise ProtocolError(f"message exceeds {max_bytes} bytes")
        tensors.append(_tensor(i, desc, buf))
    return Message(op, req_id, meta, tensors)


def _view(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer
    return memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf


def _tensor(i: int, desc: Any, buf: memoryview) -> torch.Tensor:
    if not (isinstance(desc, list) and len(desc) == 2 and isinstance(desc[1], list)):
        raise ProtocolError(f"tensor {i}: bad descriptor")
    name, shape = desc
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"tensor {i}: dtype {name!r} not allowed; allowed: {sorted(DTYPES)}")
    if len(shape) > MAX_DIMS or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape):
        raise ProtocolError(f"tensor {i}: bad shape {shape!r}")
    itemsize = ITEMSIZE[name]
    count = math.prod(shape)
    if count * itemsize != len(buf):
        raise ProtocolError(f"tensor {i}: shape {shape} of {name} needs {count * itemsize} bytes, frame has {len(buf)}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bfloat16:
        return torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16).view(shape)
    t = torch.frombuffer(buf, dtype=dtype)
    return t if len(shape) == 1 else t.view(shape)
