"""Where each parameter lives: the key layout and the partitioners that make it."""

from downpour.layout.partition import PARTITIONERS, make_layout, register_partitioner
from downpour.layout.spec import KeySlice, Layout, ParamSpec, TableSpec

__all__ = ["PARTITIONERS", "KeySlice", "Layout", "ParamSpec", "TableSpec", "make_layout", "register_partitioner"]
