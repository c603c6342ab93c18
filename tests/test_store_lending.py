"""Zero-copy replies lend the shard's memory to the transport; changes then copy on write."""

import torch

from downpour.config import SGDConfig
from downpour.layout import make_layout
from downpour.server.optim import make_rule
from downpour.server.store import ShardStore


class Tracker:
    """A send that never finishes (``done=False``) or has finished."""

    def __init__(self, done: bool) -> None:
        self.done = done

    def wait(self, timeout: float) -> None:
        if not self.done:
            raise TimeoutError("still sending")


def store() -> ShardStore:
    layout = make_layout([("w", (8,))], 1)
    s = ShardStore(layout.server_slices(0), lambda n: make_rule(SGDConfig(lr=1.0), 1.0, n))
    s.write(s.all, torch.arange(8.0))
    s.initialized = True
    return s


def test_an_update_leaves_values_still_being_sent_untouched():
    s = store()
    lent = s.read(s.all, snapshot=False)
    assert s.shares_memory(lent)
    s.lend(lent, Tracker(done=False))
    s.apply(s.all, torch.ones(8))
    assert torch.equal(lent, torch.arange(8.0))  # what the transport still reads
    assert torch.equal(s.data, torch.arange(8.0) - 1)
    assert not s.shares_memory(lent) and s.lent == []


def test_once_the_sends_are_done_updates_happen_in_place():
    s = store()
    lent = s.read(s.all, snapshot=False)
    s.lend(lent, Tracker(done=True))
    s.apply(s.all, torch.ones(8))
    assert s.shares_memory(lent)
    assert torch.equal(lent, torch.arange(8.0) - 1)


def test_a_snapshot_read_never_shares_memory():
    s = store()
    assert not s.shares_memory(s.read(s.all))


def test_an_update_of_other_keys_does_not_wait_for_a_send():
    layout = make_layout([("a", (4,)), ("b", (4,))], 1)
    s = ShardStore(layout.server_slices(0), lambda n: make_rule(SGDConfig(lr=1.0), 1.0, n))
    s.write(s.all, torch.arange(8.0))
    first = s.read([0], snapshot=False)
    s.lend(first, Tracker(done=False))
    s.apply([1], torch.ones(4))
    assert s.shares_memory(first) and torch.equal(first, torch.arange(4.0))
    assert torch.equal(s.data[4:], torch.arange(4.0, 8.0) - 1)
