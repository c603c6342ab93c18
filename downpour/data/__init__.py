"""Training data: the dataset contract, IDX (MNIST-format) files, and sharding."""

from downpour.data.dataset import ArrayDataset, Dataset, Split, build_dataset
from downpour.data.idx import load_idx_dataset, read_idx

__all__ = ["ArrayDataset", "Dataset", "Split", "build_dataset", "load_idx_dataset", "read_idx"]
