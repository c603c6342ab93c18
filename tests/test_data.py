"""IDX data: gzipped and raw files load, scale and index correctly; broken or missing data is a DataError."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from downpour.config import DataConfig
from downpour.data import ArrayDataset, build_dataset, load_idx_dataset, read_idx
from downpour.errors import ConfigError, DataError

NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CODES = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D, np.dtype(">i4"): 0x0C}


def idx_bytes(array: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, CODES[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, (6, 4, 3), dtype=np.uint8),
        "train_y": rng.integers(0, 10, 6, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (2, 4, 3), dtype=np.uint8),
        "test_y": rng.integers(0, 10, 2, dtype=np.uint8),
    }


def write_folder(folder: Path, data: dict[str, np.ndarray], gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in data.items():
        write_idx(folder / NAMES[key], array, gz)
    return folder


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_a_folder_of_idx_files_loads_with_the_right_shapes(tmp_path, gz):
    ds = load_idx_dataset(str(write_folder(tmp_path, arrays(), gz)))
    assert len(ds.train) == 6 and len(ds.test) == 2
    x, y = ds.train.take(np.arange(6))
    assert x.shape == (6, 4, 3) and x.dtype == torch.float32
    assert y.shape == (6,) and y.dtype == torch.int64


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_pixels_are_scaled_to_zero_one_and_labels_kept(tmp_path, gz):
    data = arrays()
    data["train_x"][0, 0, :3] = [0, 128, 255]
    ds = load_idx_dataset(str(write_folder(tmp_path, data, gz)))
    x, y = ds.train.take(np.arange(6))
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    torch.testing.assert_close(x, torch.from_numpy(data["train_x"]).float() / 255.0)
    assert x[0, 0, 0] == 0.0 and x[0, 0, 2] == 1.0
    assert torch.equal(y, torch.from_numpy(data["train_y"]).long())


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_take_returns_examples_in_the_order_asked(tmp_path, gz):
    data = arrays()
    ds = load_idx_dataset(str(write_folder(tmp_path, data, gz)))
    order = np.array([4, 0, 5, 0])
    x, y = ds.train.take(order)
    torch.testing.assert_close(x, torch.from_numpy(data["train_x"][order]).float() / 255.0)
    assert y.tolist() == data["train_y"][order].tolist()
    tx, _ = ds.test.take(np.array([1]))
    torch.testing.assert_close(tx[0], torch.from_numpy(data["test_x"][1]).float() / 255.0)


def test_test_examples_of_another_shape_than_the_training_ones_are_refused_before_training(tmp_path):
    data = arrays()
    data["test_x"] = np.zeros((2, 3, 3), dtype=np.uint8)
    with pytest.raises(DataError, match=r"the test examples are 3x3 .*, the training examples 4x3 .*one model cannot take both"):
        load_idx_dataset(str(write_folder(tmp_path, data, True)))


def test_raw_files_are_memory_mapped(tmp_path):
    path = write_idx(tmp_path / "x", arrays()["train_x"], gz=False)
    assert isinstance(read_idx(str(path)), np.memmap)


def test_a_mix_of_gzipped_and_raw_files_loads(tmp_path):
    data = arrays()
    write_folder(tmp_path, {k: v for k, v in data.items() if k.endswith("x")}, gz=True)
    write_folder(tmp_path, {k: v for k, v in data.items() if k.endswith("y")}, gz=False)
    assert len(load_idx_dataset(str(tmp_path)).train) == 6


def test_build_dataset_loads_the_idx_builtin_from_data_path(tmp_path):
    ds = build_dataset(DataConfig(name="idx", path=str(write_folder(tmp_path, arrays(), gz=True))))
    assert len(ds.train) == 6


def test_build_dataset_with_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="'idx'"):
        build_dataset(DataConfig(name="cifar"))


# -- broken files ----------------------------------------------------------------


def read_error(tmp_path: Path, content: bytes, gz: bool, match: str) -> None:
    path = tmp_path / "broken"
    if gz:
        path = tmp_path / "broken.gz"
        with gzip.open(path, "wb") as f:
            f.write(content)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        read_idx(str(path))
    assert str(path) in str(info.value)


GOOD = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
@pytest.mark.parametrize(
    ("content", "match"),
    [
        (GOOD[:-1], "shorter|holds"),  # one byte of data missing
        (GOOD[:10], "truncated IDX header"),  # the dimensions cut off
        (b"\x00\x00", "bad magic"),
        (b"\x01\x00\x08\x03" + GOOD[4:], "bad magic"),
        (b"\x00\x00\x07\x03" + GOOD[4:], "bad magic"),  # unknown type code
        (b"\x00\x00\x08\x00", "truncated IDX header"),  # zero dimensions
    ],
    ids=["short-data", "short-header", "two-bytes", "bad-zero-bytes", "bad-type", "no-dims"],
)
def test_a_broken_idx_file_is_a_data_error_naming_it(tmp_path, content, gz, match):
    read_error(tmp_path, content, gz, match)


def test_a_gz_file_that_is_not_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(GOOD)
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(str(path))


def test_a_cut_off_gzip_stream_is_a_data_error(tmp_path):
    path = write_idx(tmp_path / "x", np.arange(200, dtype=np.uint8).reshape(2, 10, 10), gz=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(str(path))


def test_a_folder_with_a_truncated_file_fails_to_load(tmp_path):
    write_folder(tmp_path, arrays(), gz=False)
    labels = tmp_path / NAMES["train_y"]
    labels.write_bytes(labels.read_bytes()[:-2])
    with pytest.raises(DataError, match=NAMES["train_y"]):
        load_idx_dataset(str(tmp_path))


def test_inputs_and_labels_of_different_lengths_are_a_data_error(tmp_path):
    data = arrays()
    data["train_y"] = data["train_y"][:5]
    with pytest.raises(DataError, match="6 inputs but 5 labels"):
        load_idx_dataset(str(write_folder(tmp_path, data, gz=True)))
    with pytest.raises(DataError):
        ArrayDataset(np.zeros((3, 2)), np.zeros(2))


# -- missing data ------------------------------------------------------------------


def test_a_missing_folder_says_how_to_get_the_data(tmp_path):
    folder = tmp_path / "no-such-folder"
    with pytest.raises(DataError) as info:
        load_idx_dataset(str(folder))
    msg = str(info.value)
    assert str(folder) in msg and "no such folder" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_a_folder_missing_one_file_names_it(tmp_path):
    data = arrays()
    del data["test_y"]
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte") as info:
        load_idx_dataset(str(write_folder(tmp_path, data, gz=True)))
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "train-images" not in str(info.value).split("missing", 1)[1].split(".", 1)[0]


# -- other IDX types -------------------------------------------------------------------


def test_big_endian_idx_files_read_as_their_values(tmp_path):
    values = (np.arange(12).reshape(3, 4) / 4).astype(">f4")
    assert np.array_equal(read_idx(str(write_idx(tmp_path / "f", values, gz=True))), values)


def test_examples_of_a_big_endian_float_idx_file_can_be_taken(tmp_path):
    data = arrays()
    data["train_x"] = (data["train_x"] / 255).astype(">f4")
    ds = load_idx_dataset(str(write_folder(tmp_path, data, gz=False)))
    x, _ = ds.train.take(np.array([1, 0]))
    torch.testing.assert_close(x, torch.from_numpy(data["train_x"][[1, 0]].astype(np.float32)))


def test_a_gzipped_idx_file_cut_short_is_refused_when_its_header_is_read(tmp_path):
    from downpour.data.idx import read_idx_header

    path = write_idx(tmp_path / "x", np.zeros((500, 28, 28), dtype=np.uint8) + np.arange(28, dtype=np.uint8), gz=True)
    assert read_idx_header(str(path))[1] == (500, 28, 28)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read IDX file .*x.gz \(damaged or cut short\?\)"):
        read_idx_header(str(path))
    two = tmp_path / "two.gz"  # a gzip of two members: its trailer holds the last one's length only
    raw = idx_bytes(np.ones((50, 3), dtype=np.uint8))
    two.write_bytes(gzip.compress(raw[:20]) + gzip.compress(raw[20:]))
    assert read_idx_header(str(two))[1] == (50, 3)


def test_an_idx_data_path_that_is_a_file_says_so(tmp_path):
    from downpour.data.idx import find_idx_files

    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\0")
    with pytest.raises(DataError, match=r"\(a file, not a folder of IDX files\)"):
        find_idx_files(str(path))


def test_a_batch_that_is_not_inputs_and_target_is_refused_saying_how_to_make_one():
    from downpour.data.loader import as_batch

    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert as_batch({"inputs": x, "target": y}, "data")[1] is y  # a dict of those two parts is one
    with pytest.raises(DataError, match=r"got a dict of \['image', 'label'\]: name its parts 'inputs' and 'target', or give "
                                        r"data.loader.collate_fn"):
        as_batch({"image": x, "label": y}, "data")
    with pytest.raises(DataError, match="got tuple of 3 items"):
        as_batch((x, y, y), "data")
