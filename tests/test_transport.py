"""The ZeroMQ transport's listener (transport/zmq_transport.py): reading a burst of requests by
``ready()`` gets every message, in order, and ends without an exception."""

from __future__ import annotations

import time

import pytest
import zmq

from downpour.protocol.schema import Int, List, Record, SchemaError, Str, Tuple
from downpour.transport import Channel, Listener, Poller, WouldBlock

WAIT_S = 5.0


@pytest.fixture
def ctx():
    context = zmq.Context(io_threads=1)
    yield context
    context.destroy(linger=0)


def test_a_listener_is_ready_exactly_while_a_message_waits(ctx):
    listener = Listener(ctx, "tcp://127.0.0.1:*", 1 << 20)
    channel = Channel(ctx, listener.address, identity=b"worker-0")
    try:
        assert not listener.ready()
        for i in range(5):
            channel.send([b"m%d" % i])
        poller = Poller()
        poller.register(listener)
        assert poller.poll(WAIT_S) == [listener]
        deadline = time.monotonic() + WAIT_S
        got = []
        while len(got) < 5 and time.monotonic() < deadline:  # (the five may arrive over several bursts)
            while listener.ready():
                peer, frames = listener.recv()
                got.append((peer, frames[0].bytes))
            poller.poll(0.05)
        assert got == [(b"worker-0", b"m%d" % i) for i in range(5)]
        assert not listener.ready()
        with pytest.raises(WouldBlock):  # what a recv without a message does (the loops no longer end on it)
            listener.recv()
    finally:
        channel.close()
        listener.close()


def test_a_schema_error_names_the_nested_field_it_is_about():
    """Paths are built only when a check fails, by checking the failing field again: the text names
    the same field as a check that built every path."""
    schema = Record({"shm": Tuple(Str(16), Int(1)), "keys": List(Int(0, 9)), "n": Int(0, 5)}, required=("n",))
    schema.check({"shm": ["slot", 3], "keys": [1, 2], "n": 1}, "meta")
    cases = [({"shm": ["slot", 0], "n": 1}, "meta.shm[1]: expected an integer in [1, "),
             ({"shm": [7, 1], "n": 1}, "meta.shm[0]: expected a string"),
             ({"keys": [1, "2"], "n": 1}, "meta.keys[1]: expected an integer in [0, 9]"),
             ({"n": 6}, "meta.n: expected an integer in [0, 5]"),
             ({"m": 1, "n": 1}, "meta.m: unknown field"),
             ({}, "meta.n: required")]
    for value, text in cases:
        with pytest.raises(SchemaError) as err:
            schema.check(value, "meta")
        assert str(err.value).startswith(text), (value, str(err.value))
