"""Sparse embedding tables: the server-side table, its row-wise update rules, and the
optional compiled kernels (``_native.c``) that the table runs when they are built."""

from downpour.sparse.rules import FTRL, RULES, SGD, Adagrad, Adam, RowRule, make_row_rule
from downpour.sparse.table import EMPTY, Index, SparseTable

__all__ = ["EMPTY", "FTRL", "RULES", "SGD", "Adagrad", "Adam", "Index", "RowRule", "SparseTable", "make_row_rule"]
