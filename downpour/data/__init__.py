"""Training data: the dataset contract, IDX (MNIST-format) files, Criteo-format click logs, and scores."""

from downpour.data.criteo import CriteoDataset, CriteoSplit, load_criteo_dataset
from downpour.data.criteo_format import parse_bytes
from downpour.data.dataset import ArrayDataset, Dataset, Split, build_dataset
from downpour.data.idx import load_idx_dataset, read_idx
from downpour.data.scoring import log_loss, roc_auc
from downpour.data.stream import StreamDataset

__all__ = [
    "ArrayDataset",
    "CriteoDataset",
    "CriteoSplit",
    "Dataset",
    "Split",
    "StreamDataset",
    "build_dataset",
    "load_criteo_dataset",
    "load_idx_dataset",
    "log_loss",
    "parse_bytes",
    "read_idx",
    "roc_auc",
]
