"""The wire codec: round trips, zero-copy decoding, and every rejection as a ProtocolError."""

from __future__ import annotations

import ctypes

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from downpour.errors import ProtocolError
from downpour.protocol import Message, Op, decode, encode
from downpour.protocol.codec import MAGIC, MAX_DIMS, MAX_TENSORS

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
SHAPES = [(), (0,), (5,), (2, 3), (3, 0, 2), (1, 2, 1, 3)]


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 200, shape, generator=g).to(dtype)


def header(*fields) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def good_header(descs: list, op: int = int(Op.PUSH), req_id: int = 7, meta: object = None) -> bytes:
    return header(MAGIC, op, req_id, {} if meta is None else meta, descs)


def address_of(buf: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


# -- round trips -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_one_tensor_of_any_dtype_and_shape_round_trips(dtype, shape):
    t = sample(shape, dtype)
    msg = decode(encode(Message(Op.PUSH, 9, {"keys": [1, 2]}, [t])))
    assert msg.op == Op.PUSH and msg.req_id == 9 and msg.meta == {"keys": [1, 2]}
    (out,) = msg.tensors
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert torch.equal(out, t)


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_messages_with_zero_to_three_mixed_tensors_round_trip(count):
    tensors = [sample(SHAPES[(i + 2) % len(SHAPES)], DTYPES[i % len(DTYPES)], seed=i) for i in range(count)]
    meta = {"node": "worker-0", "progress": {"loss": 0.5, "steps": 3}, "blob": b"\x00\x01"}
    msg = decode(encode(Message(Op.PUSHPULL, 123, meta, tensors)))
    assert msg.op == Op.PUSHPULL and msg.req_id == 123 and msg.meta == meta
    assert len(msg.tensors) == count
    for got, want in zip(msg.tensors, tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_non_contiguous_tensor_round_trips_as_its_values():
    t = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    (out,) = decode(encode(Message(Op.OK, 1, {}, [t]))).tensors
    assert torch.equal(out, t)


def test_encoding_an_unsupported_dtype_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode(Message(Op.PUSH, 1, {}, [torch.zeros(3, dtype=torch.bool)]))


def test_encoding_lends_the_tensors_memory_without_copying():
    t = torch.arange(16, dtype=torch.float32)
    frames = encode(Message(Op.PUSH, 1, {}, [t]))
    assert np.frombuffer(frames[1], dtype=np.uint8).ctypes.data == t.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=str)
def test_decoding_maps_the_frame_buffer_without_copying(dtype):
    t = sample((4, 2), dtype)
    frames = encode(Message(Op.PUSH, 1, {}, [t]))
    frame = bytearray(frames[1])
    (out,) = decode([frames[0], frame]).tensors
    assert out.data_ptr() == address_of(frame)
    frame[:] = bytes(len(frame))  # writing the frame is seen through the tensor: same memory
    assert torch.equal(out, torch.zeros_like(t))


# -- rejections --------------------------------------------------------------


def rejects(frames, match: str | None = None, max_bytes: int = 1 << 30) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(frames, max_bytes)
    return info.value


def test_an_empty_message_is_rejected_without_a_request_id():
    assert rejects([], "empty").req_id is None


def test_a_garbage_header_is_rejected_without_a_request_id():
    assert rejects([b"\xc1\xff not msgpack"], "undecodable").req_id is None


@pytest.mark.parametrize(
    "head",
    [
        header(0xD1, int(Op.PULL), 1, {}, []),  # wrong MAGIC
        header(MAGIC, int(Op.PULL), 1, {}),  # four fields
        msgpack.packb({"magic": MAGIC}),  # not a list
        msgpack.packb(5),
    ],
    ids=["wrong-magic", "short", "mapping", "scalar"],
)
def test_a_header_that_is_not_downpour_v0_is_rejected(head):
    assert rejects([head], "not a Downpour v0 header").req_id is None


@pytest.mark.parametrize("req_id", [-1, 1 << 63, "7", 1.5, True, None], ids=repr)
def test_a_bad_request_id_is_rejected(req_id):
    rejects([header(MAGIC, int(Op.PULL), req_id, {}, [])], "bad request id")


@pytest.mark.parametrize("op", [0, 99, "PULL", None, 2.0], ids=repr)
def test_an_unknown_op_is_rejected_and_names_the_request(op):
    assert rejects([good_header([], op=op)], "unknown op").req_id == 7


@pytest.mark.parametrize("meta", [[], "x", 3, None], ids=repr)
def test_meta_that_is_not_a_mapping_is_rejected(meta):
    head = header(MAGIC, int(Op.PULL), 7, meta, [])
    assert rejects([head], "meta must be a mapping").req_id == 7


def test_more_frames_than_descriptors_is_rejected():
    assert rejects([good_header([]), b"\x00" * 4], "describes 0 tensors, message has 1").req_id == 7


def test_more_descriptors_than_frames_is_rejected():
    assert rejects([good_header([["f32", [1]]])], "describes 1 tensors, message has 0").req_id == 7


def test_descriptors_that_are_not_a_list_are_rejected():
    assert rejects([good_header({"a": 1})], "describes").req_id == 7


@pytest.mark.parametrize("desc", [["f32"], "f32", ["f32", 4], ["f32", [1], 0]], ids=repr)
def test_a_malformed_descriptor_is_rejected(desc):
    assert rejects([good_header([desc]), b"\x00" * 4], "bad descriptor").req_id == 7


@pytest.mark.parametrize("name", ["f128", "bool", "c64", 3, None], ids=repr)
def test_an_unknown_dtype_is_rejected_listing_the_allowed_ones(name):
    err = rejects([good_header([[name, [1]]]), b"\x00" * 4], "not allowed")
    assert "f32" in str(err) and err.req_id == 7


@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -2], [1.0], ["2"], [True], [None], [1] * (MAX_DIMS + 1), [1 << 40]],
    ids=["negative", "negative-2d", "float", "string", "bool", "none", "too-many-dims", "too-large"],
)
def test_a_bad_shape_is_rejected(shape):
    assert rejects([good_header([["u8", shape]]), b"\x00"], "bad shape").req_id == 7


@pytest.mark.parametrize(
    ("name", "shape", "nbytes"),
    [("f32", [3], 11), ("f32", [3], 13), ("f16", [2, 2], 4), ("i64", [], 4), ("u8", [0], 1), ("bf16", [1], 0)],
)
def test_a_frame_whose_length_does_not_match_its_shape_is_rejected(name, shape, nbytes):
    assert rejects([good_header([[name, shape]]), b"\x00" * nbytes], "needs .* bytes, frame has").req_id == 7


def test_too_many_frames_are_rejected():
    frames = [good_header([["u8", [0]]] * (MAX_TENSORS + 1))] + [b""] * (MAX_TENSORS + 1)
    rejects(frames, "too many frames")


def test_a_message_over_max_bytes_is_rejected():
    frames = encode(Message(Op.PUSH, 5, {}, [torch.zeros(100)]))
    decode(frames, max_bytes=len(frames[0]) + 400)  # exactly at the limit: accepted
    assert rejects(frames, "exceeds", max_bytes=len(frames[0]) + 399).req_id == 5


def test_a_header_only_message_over_max_bytes_is_rejected():
    frames = encode(Message(Op.PULL, 5, {"padding": "x" * 1000}))
    rejects(frames, "exceeds", max_bytes=100)


# -- property ----------------------------------------------------------------

plain = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(), st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(
    plain, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6
)
descriptor = st.one_of(
    values, st.tuples(st.sampled_from(["f32", "bf16", "i64", "u8", "x"]), st.lists(st.integers(-2, 4), max_size=3)).map(list)
)
headers = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda *f: msgpack.packb(list(f), use_bin_type=True),
              st.sampled_from([MAGIC, 0]), st.one_of(st.sampled_from([int(o) for o in Op]), values),
              st.one_of(st.integers(-1, 10), values), st.one_of(st.dictionaries(st.text(max_size=4), values, max_size=3), values),
              st.lists(descriptor, max_size=3)),
)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=headers, rest=st.lists(st.binary(max_size=24), max_size=3))
def test_arbitrary_frames_never_raise_anything_but_protocol_error(head, rest):
    try:
        msg = decode([head, *map(bytearray, rest)], max_bytes=1 << 16)
    except ProtocolError:
        return
    assert isinstance(msg, Message) and len(msg.tensors) == len(rest)
