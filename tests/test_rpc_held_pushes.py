"""Unprompted messages that arrive before a node installs its handler are held, not lost."""

from downpour.protocol import Message, Op, decode, encode
from downpour.protocol.rpc import RpcClient
from downpour.transport import Listener, Poller, new_context


def test_a_membership_that_arrives_during_registration_reaches_the_handler_set_later():
    ctx = new_context()
    listener = Listener(ctx, "tcp://127.0.0.1:*", 1 << 20)
    rpc = RpcClient(ctx, "server-x", request_timeout_s=5.0)
    try:
        rpc.connect("coordinator", listener.address)
        fut = rpc.request("coordinator", Message(Op.REGISTER, meta={"role": "server"}))
        poller = Poller()
        poller.register(listener)
        assert poller.poll(5.0)
        peer, frames = listener.recv()
        request = decode(frames)
        listener.send(peer, encode(request.reply({"rank": 0})))
        listener.send(peer, encode(Message(Op.MEMBERSHIP, meta={"workers": ["worker-0"]})))
        assert fut.result(5.0).meta == {"rank": 0}
        rpc.pump(1.0)  # the MEMBERSHIP comes in while nobody handles it yet
        seen = []
        rpc.on_push = lambda who, msg: seen.append((who, msg.op, msg.meta))
        assert seen == [("coordinator", Op.MEMBERSHIP, {"workers": ["worker-0"]})]
    finally:
        rpc.close()
        listener.close()
        ctx.term()
