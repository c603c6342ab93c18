"""Partitioners: policies that assign parameter slices to servers.

A partitioner is a function ``(params, num_servers, max_slice_elems) -> [(server, start, length)]``
registered under a name; :func:`make_layout` turns its answer into a checked
:class:`Layout`. Two ship:

* ``bytes`` (default): the flat vector is cut into ``num_servers`` contiguous
  ranges of equal size (to within one element), tensors split wherever a cut
  falls, then into slices of at most ``max_slice_bytes``. Each server's keys
  are one contiguous range, so a worker sends one zero-copy frame per server.
* ``greedy``: whole tensors (split only when larger than ``max_slice_bytes``)
  go largest-first to the least-loaded server, as TensorFlow's
  ``GreedyLoadBalancingStrategy`` does. Tensors stay whole, balance is coarser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from downpour.errors import ConfigError
from downpour.layout.spec import KeySlice, Layout, ParamSpec, TableSpec

Partitioner = Callable[[Sequence[ParamSpec], int, int], list[tuple[int, int, int]]]
PARTITIONERS: dict[str, Partitioner] = {}


def register_partitioner(name: str) -> Callable[[Partitioner], Partitioner]:
    def deco(fn: Partitioner) -> Partitioner:
        PARTITIONERS[name] = fn
        return fn

    return deco


def _pieces(start: int, length: int, max_elems: int) -> list[tuple[int, int]]:
    return [(s, min(max_elems, start + length - s)) for s in range(start, start + length, max_elems)]


@register_partitioner("bytes")
def partition_by_bytes(params: Sequence[ParamSpec], num_servers: int, max_elems: int) -> list[tuple[int, int, int]]:
    total = sum(p.numel for p in params)
    cuts = sorted({p.offset for p in params} | {total * i // num_servers for i in range(num_servers + 1)})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            continue
        server = min(num_servers - 1, max(i for i in range(num_servers) if total * i // num_servers <= a))
        out.extend((server, s, n) for s, n in _pieces(a, b - a, max_elems))
    return out


@register_partitioner("greedy")
def partition_greedy(params: Sequence[ParamSpec], num_servers: int, max_elems: int) -> list[tuple[int, int, int]]:
    load = [0] * num_servers
    out = []
    pieces = [pc for p in params for pc in _pieces(p.offset, p.numel, max_elems)]
    for start, n in sorted(pieces, key=lambda pc: -pc[1]):
        server = min(range(num_servers), key=lambda i: (load[i], i))
        load[server] += n
        out.append((server, start, n))
    return out


def make_layout(
    named_shapes: Sequence[tuple[str, tuple[int, ...]]],
    num_servers: int,
    dtype: str = "f32",
    partitioner: str = "bytes",
    max_slice_bytes: int = 4 << 20,
    itemsize: int = 4,
    tables: Sequence[tuple[str, int]] = (),
) -> Layout:
    """Lay ``named_shapes`` end to end and partition them over ``num_servers``; ``tables``
    ((name, dim) of each sparse table) are spread over every server by feature ID."""
    fn = PARTITIONERS.get(partitioner)
    if fn is None:
        raise ConfigError(f"cluster.partitioner: unknown {partitioner!r}; known: {sorted(PARTITIONERS)}")
    params, offset = [], 0
    for name, shape in named_shapes:
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            continue
        params.append(ParamSpec(name, tuple(shape), offset, numel))
        offset += numel
    if not params:
        raise ConfigError("the model has no parameters to serve")
    parts = sorted(fn(params, num_servers, max(1, max_slice_bytes // itemsize)), key=lambda t: (t[1]))
    slices = tuple(KeySlice(key, server, start, n) for key, (server, start, n) in enumerate(parts))
    layout = Layout(tuple(params), slices, num_servers, dtype, tuple(TableSpec(n, int(d)) for n, d in tables))
    layout.validate()
    return layout
