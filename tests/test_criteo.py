"""Criteo-format data: the generator writes what it promises, the reader parses it back exactly
(through memory:// and local folders, whole or by index), bad lines are refused by file and
line, the parse cache hits and misses when it should, and the scores match their definitions."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import uuid
from itertools import product

import fsspec
import numpy as np
import pytest
import torch

from downpour.cli.main import main
from downpour.config import DataConfig
from downpour.data import build_dataset, criteo_format, load_criteo_dataset, log_loss, parse_bytes, roc_auc
from downpour.data.criteo import ParseCache
from downpour.data.criteo_format import FIELD_STRIDE, MISSING, NUM_CAT, NUM_FIELDS, NUM_INT, format_lines
from downpour.data.criteo_gen import CAT_FIELDS, INT_FIELDS, CriteoSpec, generate, generate_rows, solve_bias
from downpour.errors import ConfigError, DataError

ROWS = 6000


def memory_url() -> str:
    return f"memory://criteo-{uuid.uuid4().hex}"


def drop(url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> tuple[str, dict]:
    """A small generated data set in a local folder: 3 files per split."""
    folder = str(tmp_path_factory.mktemp("criteo"))
    return folder, generate(CriteoSpec(rows=ROWS, seed=7, files=3), folder)


@pytest.fixture(scope="module")
def memory_data() -> tuple[str, dict]:
    url = memory_url()
    meta = generate(CriteoSpec(rows=ROWS, seed=7, files=2), url)
    yield url, meta
    drop(url)


def read_all(url: str) -> bytes:
    fs, root = fsspec.core.url_to_fs(url)
    return b"".join(fs.cat_file(p) for p in sorted(fs.glob(f"{root}/*.tsv")))


def expected_rows(spec: CriteoSpec):
    """The generator's own arrays for every row, train then test."""
    parts = list(generate_rows(spec, solve_bias(spec), 0, spec.rows))
    return {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("label", "ints", "int_missing", "values", "cat_missing")}


def line(label="0", ints=None, cats=None) -> str:
    ints = ["1"] * NUM_INT if ints is None else ints
    cats = ["0a1b2c3d"] * NUM_CAT if cats is None else cats
    return "\t".join([label, *ints, *cats]) + "\n"


# -- the generator ------------------------------------------------------------------------


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_bytes():
    a, b, c = memory_url(), memory_url(), memory_url()
    try:
        meta_a = generate(CriteoSpec(rows=3000, seed=1, files=2), a)
        meta_b = generate(CriteoSpec(rows=3000, seed=1, files=2), b)
        generate(CriteoSpec(rows=3000, seed=2, files=2), c)
        assert read_all(a) == read_all(b)
        assert read_all(a) != read_all(c)
        assert meta_a["optimum"] == meta_b["optimum"]
    finally:
        for url in (a, b, c):
            drop(url)


def test_the_rows_do_not_depend_on_the_number_of_files(memory_data):
    url, _ = memory_data
    other = memory_url()
    try:
        generate(CriteoSpec(rows=ROWS, seed=7, files=5), other)
        for split in ("train", "test"):
            fs, root = fsspec.core.url_to_fs(url)
            ofs, oroot = fsspec.core.url_to_fs(other)
            two = b"".join(fs.cat_file(p) for p in sorted(fs.glob(f"{root}/{split}-*.tsv")))
            five = b"".join(ofs.cat_file(p) for p in sorted(ofs.glob(f"{oroot}/{split}-*.tsv")))
            assert two == five and two
    finally:
        drop(other)


def test_generated_lines_have_criteo_fields_with_missing_values_at_the_field_rates(local_data):
    folder, meta = local_data
    lines = b"".join(open(os.path.join(folder, f), "rb").read() for f in meta["files"]).decode().splitlines()
    assert len(lines) == ROWS
    fields = [ln.split("\t") for ln in lines]
    assert all(len(f) == NUM_FIELDS for f in fields)
    assert {f[0] for f in fields} == {"0", "1"}
    for f in fields[:500]:
        assert all(x == "" or x.lstrip("-").isdigit() for x in f[1 : 1 + NUM_INT])
        assert all(x == "" or (len(x) == 8 and all(ch in "0123456789abcdef" for ch in x)) for x in f[1 + NUM_INT :])
    missing = np.array([[x == "" for x in f[1:]] for f in fields]).mean(axis=0)
    rates = np.array([r[2] for r in INT_FIELDS] + [c.missing for c in CAT_FIELDS])
    assert np.all(np.abs(missing - rates) < 0.03), (missing, rates)
    assert missing[NUM_INT + 21] > 0.6  # C22: about three quarters missing, as in Criteo


def test_the_metadata_counts_rows_and_the_optimum_scores_the_truth(local_data):
    folder, meta = local_data
    ds = load_criteo_dataset(folder, cache=False)
    with open(os.path.join(folder, "criteo.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["rows"] == {"train": len(ds.train), "test": len(ds.test)} == {"train": ROWS - 600, "test": 600}
    truth = ds.test_truth
    assert truth.shape == (600,) and np.all((truth > 0) & (truth < 1))
    labels = ds.test.labels
    assert ds.optimum == meta["optimum"]
    assert ds.optimum["test_auc"] == roc_auc(labels, truth)
    assert ds.optimum["test_logloss"] == log_loss(labels, truth)
    assert 0.2 < meta["ctr"]["train"] < 0.3
    assert meta["generator"]["seed"] == 7


def test_generator_settings_are_checked():
    with pytest.raises(ConfigError, match="test_fraction"):
        CriteoSpec(test_fraction=1.0)
    with pytest.raises(ConfigError, match="rows"):
        CriteoSpec(rows=1)


# -- reading ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "local"])
def test_reading_back_gives_the_generators_rows(where, memory_data, local_data):
    url = memory_data[0] if where == "memory" else local_data[0]
    ds = build_dataset(DataConfig(name="criteo", path=url, args={"cache": False}))
    rows = expected_rows(CriteoSpec(rows=ROWS, seed=7))
    n_train = len(ds.train)
    for split, lo, hi in (("train", 0, n_train), ("test", n_train, ROWS)):
        (dense, ids), y = getattr(ds, split).take(np.arange(hi - lo))
        assert dense.dtype == torch.float32 and dense.shape == (hi - lo, NUM_INT)
        assert ids.dtype == torch.int64 and ids.shape == (hi - lo, NUM_CAT)
        assert y.dtype == torch.float32 and y.tolist() == rows["label"][lo:hi].tolist()
        want_dense = np.where(rows["int_missing"][lo:hi], 0.0, np.log1p(np.maximum(rows["ints"][lo:hi], 0)))
        np.testing.assert_allclose(dense.numpy(), want_dense, rtol=1e-6)
        fields = np.arange(NUM_CAT) * FIELD_STRIDE
        want_ids = fields + np.where(rows["cat_missing"][lo:hi], MISSING, rows["values"][lo:hi].astype(np.int64))
        assert np.array_equal(ids.numpy(), want_ids)


def test_take_of_any_indices_equals_the_same_rows_of_the_whole_split(local_data):
    ds = load_criteo_dataset(local_data[0], cache=False)
    (dense, ids), y = ds.train.take(np.arange(len(ds.train)))
    shuffled = np.random.default_rng(0).permutation(len(ds.train))[:777]
    for idx in (np.array([5, 0, 5400 - 1, 17, 17]), shuffled, np.array([], dtype=np.int64)):
        (d, i), yy = ds.train.take(idx)
        assert torch.equal(d, dense[idx]) and torch.equal(i, ids[idx]) and torch.equal(yy, y[idx])


def test_ids_never_collide_across_fields_and_missing_has_an_id_per_field(tmp_path):
    same = ["0000beef"] * NUM_CAT  # the same value in every field
    empty = [""] * NUM_CAT
    (tmp_path / "train-0.tsv").write_text(line(cats=same) + line(cats=empty) + line(cats=["ffffffff"] * NUM_CAT))
    (tmp_path / "test-0.tsv").write_text(line())
    (_, ids), _ = load_criteo_dataset(str(tmp_path), cache=False).train.take(np.arange(3))
    ids = ids.numpy()
    assert len(np.unique(ids)) == ids.size  # 78 different IDs
    assert np.array_equal(ids // FIELD_STRIDE, np.broadcast_to(np.arange(NUM_CAT), (3, NUM_CAT)))
    assert np.all(ids[0] % FIELD_STRIDE == 0xBEEF)
    assert np.all(ids[1] % FIELD_STRIDE == MISSING)
    assert np.all(ids[2] % FIELD_STRIDE == 0xFFFFFFFF)  # the largest value stays below the missing ID


def test_parsing_handles_negative_large_short_uppercase_and_a_last_line_without_newline():
    ints = ["-3", "0", "", "123456789012", "7", *["1"] * 8]
    cats = ["1A", "ABCDEF01", "", "0", *["deadbeef"] * 22]
    p = parse_bytes((line("1", ints, cats) + line("0")).rstrip("\n").encode(), "x.tsv")
    assert p.label.tolist() == [1, 0]
    np.testing.assert_allclose(p.dense[0, :5], np.log1p([0, 0, 0, 123456789012, 7]).astype(np.float32))
    assert p.values[0, :4].tolist() == [0x1A, 0xABCDEF01, 0, 0]
    assert p.missing[0] == 1 << 2 and p.missing[1] == 0


def test_gzipped_files_are_read(tmp_path):
    with gzip.open(tmp_path / "train-0.tsv.gz", "wt") as f:
        f.write(line("1") * 3)
    (tmp_path / "test-0.tsv").write_text(line())
    ds = load_criteo_dataset(str(tmp_path), cache=False)
    assert len(ds.train) == 3 and ds.train.labels.tolist() == [1, 1, 1]
    assert ds.optimum is None and ds.test_truth is None


def test_files_are_read_in_sorted_order(tmp_path):
    (tmp_path / "train-b.tsv").write_text(line("1"))
    (tmp_path / "train-a.tsv").write_text(line("0"))
    (tmp_path / "test-0.tsv").write_text(line())
    assert load_criteo_dataset(str(tmp_path), cache=False).train.labels.tolist() == [0, 1]


def test_a_folder_without_files_says_how_to_make_them(tmp_path):
    with pytest.raises(DataError, match="downpour datagen criteo"):
        load_criteo_dataset(str(tmp_path))


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("\t".join(["0"] * 39) + "\n", "39 tab-separated fields, expected 40"),
        ("\t".join(["0"] * 41) + "\n", "41 tab-separated fields"),
        ("\t".join(["0"] * 41) + "\n" + "\t".join(["0"] * 39) + "\n", "41 tab-separated fields"),  # the total is right
        ("\n", "1 tab-separated fields"),
        (line(cats=["0a1b2c3g"] + ["0"] * 25), r"field 15 \(C1\) is '0a1b2c3g', expected up to 8 hex digits"),
        (line(cats=["123456789"] + ["0"] * 25), "field 15 .C1. is '123456789'"),
        (line(ints=["1.5"] + ["1"] * 12), r"field 2 \(I1\) is '1.5', expected an integer"),
        (line(ints=["1"] * 12 + ["-"]), r"field 14 \(I13\) is '-'"),
        (line(ints=["1"] * 12 + ["1" * 19]), r"field 14 \(I13\)"),
        (line(label="2"), r"field 1 \(label\) is '2', expected 0 or 1"),
        (line(label=""), r"field 1 \(label\) is ''"),
        (line(label="10"), r"field 1 \(label\) is '10'"),
    ],
    ids=[
        "39-fields",
        "41-fields",
        "41-then-39-fields",
        "empty-line",
        "non-hex",
        "long-hex",
        "decimal-point",
        "lone-minus",
        "19-digits",
        "label-2",
        "label-empty",
        "label-10",
    ],
)
def test_a_bad_line_is_a_data_error_naming_file_and_line(tmp_path, bad, match):
    good = line() * 4
    (tmp_path / "train-0.tsv").write_text(good)
    (tmp_path / "train-1.tsv").write_text(good + bad + good)
    (tmp_path / "test-0.tsv").write_text(good)
    ds = load_criteo_dataset(str(tmp_path), cache=False)
    with pytest.raises(DataError, match=match) as err:
        len(ds.train)
    assert f"{tmp_path / 'train-1.tsv'}:5:" in str(err.value)


def test_line_numbers_count_across_parse_blocks(monkeypatch):
    monkeypatch.setattr(criteo_format, "BLOCK_BYTES", 1000)  # a few lines per block
    text = line() * 50 + line(label="x") + line() * 5
    with pytest.raises(DataError, match=r"^f\.tsv:51: field 1"):
        parse_bytes(text.encode(), "f.tsv")
    assert len(parse_bytes((line() * 50).encode(), "f.tsv").label) == 50


# -- the cache ----------------------------------------------------------------------------


def cached_arrays(split) -> list[np.ndarray]:
    data = split._load()
    return [getattr(data, k) for k in data.NAMES]


def test_the_cache_is_written_once_then_memory_mapped_with_the_same_arrays(tmp_path):
    (tmp_path / "train-0.tsv").write_text(line("1") * 3 + line("0"))
    (tmp_path / "test-0.tsv").write_text(line())
    first = cached_arrays(load_criteo_dataset(str(tmp_path)).train)
    entries = sorted(os.listdir(tmp_path / ".criteo-cache"))
    assert [e.split("-")[0] for e in entries] == ["train"]
    again = cached_arrays(load_criteo_dataset(str(tmp_path)).train)
    assert all(isinstance(a, np.memmap) for a in again)
    assert not any(isinstance(a, np.memmap) for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_a_changed_file_misses_the_cache_and_replaces_its_entry(tmp_path):
    (tmp_path / "train-0.tsv").write_text(line("1") * 3)
    (tmp_path / "test-0.tsv").write_text(line())
    assert load_criteo_dataset(str(tmp_path)).train.labels.tolist() == [1, 1, 1]
    old = os.listdir(tmp_path / ".criteo-cache")
    (tmp_path / "train-0.tsv").write_text(line("0") * 3)  # same size, new content and mtime
    st = os.stat(tmp_path / "train-0.tsv")
    os.utime(tmp_path / "train-0.tsv", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_criteo_dataset(str(tmp_path)).train.labels.tolist() == [0, 0, 0]
    new = os.listdir(tmp_path / ".criteo-cache")
    assert len(new) == 1 and new != old


def test_an_added_file_misses_the_cache(tmp_path):
    (tmp_path / "train-0.tsv").write_text(line("1"))
    (tmp_path / "test-0.tsv").write_text(line())
    assert len(load_criteo_dataset(str(tmp_path)).train) == 1
    (tmp_path / "train-1.tsv").write_text(line("0"))
    assert load_criteo_dataset(str(tmp_path)).train.labels.tolist() == [1, 0]


def test_a_second_writer_of_the_same_entry_leaves_the_first_intact(tmp_path):
    cache = ParseCache(str(tmp_path))
    p = parse_bytes(line("1").encode(), "x")
    q = parse_bytes(line("0").encode(), "x")
    cache.store("train", "k", p)
    cache.store("train", "k", q)  # lost the race: the entry stands as written
    got = cache.load("train", "k")
    assert got.label.tolist() == [1]
    assert os.listdir(tmp_path) == ["train-k"]  # no temporary folder left behind


def _load_train(folder: str) -> list:
    return load_criteo_dataset(folder).train.labels.tolist()


def test_processes_filling_the_cache_at_once_all_read_the_same_data(local_data, tmp_path):
    folder = str(tmp_path / "data")
    os.makedirs(folder)
    for name in local_data[1]["files"]:
        with open(os.path.join(local_data[0], name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_load_train, [folder] * 4)
    want = load_criteo_dataset(local_data[0], cache=False).train.labels.tolist()
    assert all(r == want for r in results)
    assert [e for e in os.listdir(os.path.join(folder, ".criteo-cache")) if e.startswith("train-")] != []
    assert not [e for e in os.listdir(os.path.join(folder, ".criteo-cache")) if e.startswith(".tmp")]
    assert _load_train(folder) == want


def test_remote_data_is_cached_under_cache_dir_only(tmp_path, memory_data):
    url, _ = memory_data
    ds = load_criteo_dataset(url, cache_dir=str(tmp_path / "c"))
    n = len(ds.train)
    assert sorted(e.split("-")[0] for e in os.listdir(tmp_path / "c")) == ["train"]
    again = load_criteo_dataset(url, cache_dir=str(tmp_path / "c")).train
    assert len(again) == n and isinstance(again._load().values, np.memmap)
    assert load_criteo_dataset(url).train.cache is None  # remote without cache_dir: no cache


def test_an_unwritable_cache_folder_costs_only_the_cache(tmp_path):
    (tmp_path / "train-0.tsv").write_text(line("1"))
    (tmp_path / "test-0.tsv").write_text(line())
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    ds = load_criteo_dataset(str(tmp_path), cache_dir=str(tmp_path / "blocked"))
    assert ds.train.labels.tolist() == [1]


# -- the command line ---------------------------------------------------------------------


def test_downpour_datagen_criteo_writes_the_files(tmp_path, capsys):
    out = str(tmp_path / "data")
    assert main(["datagen", "criteo", "--rows", "2e3", "--out", out, "--files", "2", "--seed", "3", "--test-fraction", "0.25"]) == 0
    assert sorted(os.listdir(out)) == [
        "criteo.json",
        "test-00000.tsv",
        "test-00001.tsv",
        "test-truth.npy",
        "train-00000.tsv",
        "train-00001.tsv",
    ]
    meta = json.load(open(os.path.join(out, "criteo.json")))
    assert meta["rows"] == {"train": 1500, "test": 500} and meta["generator"]["seed"] == 3
    assert "optimum on the test split: AUC" in capsys.readouterr().out
    assert len(load_criteo_dataset(out, cache=False).test) == 500


def test_datagen_into_a_folder_holding_a_data_set_is_refused_unless_overwrite_removes_its_files(tmp_path, capsys):
    """Files of the old data set left beside the new one (more files, another size) would be read
    with it: a mixed data set scored against the new one's optimum."""
    out = str(tmp_path / "data")
    assert main(["datagen", "criteo", "--rows", "2e3", "--out", out, "--files", "3"]) == 0
    capsys.readouterr()
    assert main(["datagen", "criteo", "--rows", "1e3", "--out", out, "--files", "2"]) == 2
    assert "already holds a data set (criteo.json, test-00000.tsv" in capsys.readouterr().err
    assert len(load_criteo_dataset(out, cache=False).train) == 1800  # left as it was
    assert main(["datagen", "criteo", "--rows", "1e3", "--out", out, "--files", "2", "--overwrite"]) == 0
    assert "train-00002.tsv" not in os.listdir(out) and "test-00002.tsv" not in os.listdir(out)
    assert len(load_criteo_dataset(out, cache=False).train) == 900
    (tmp_path / "file").write_text("x")
    assert main(["datagen", "criteo", "--rows", "1e3", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot write to" in capsys.readouterr().err


def test_downpour_datagen_refuses_bad_settings(tmp_path, capsys):
    assert main(["datagen", "criteo", "--rows", "1", "--out", str(tmp_path)]) == 2
    assert "rows" in capsys.readouterr().err


# -- scores -------------------------------------------------------------------------------


def pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.integers(0, 6, n).astype(float)  # few distinct scores: many ties
    assert roc_auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)
    assert roc_auc(y, -s) == pytest.approx(1.0 - pairwise_auc(y, s), abs=1e-12)


def test_roc_auc_of_perfect_constant_and_one_class_scores():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.ones(4)) == 0.5
    with pytest.raises(DataError, match="both classes"):
        roc_auc(np.ones(4), np.arange(4.0))
    with pytest.raises(DataError, match="0 or 1"):
        roc_auc(np.array([0, 2]), np.arange(2.0))


def test_log_loss_is_the_mean_cross_entropy_with_clipping():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.5, 0.0])
    want = -np.mean([np.log(0.9), np.log(0.8), np.log(0.5), np.log(1 - 1e-7)])
    assert log_loss(y, p) == pytest.approx(want)
    assert log_loss(np.array([1]), np.array([0.0])) == pytest.approx(-np.log(1e-7))


def test_written_lines_parse_back_to_the_same_values():
    rng = np.random.default_rng(5)
    n = 300
    label = rng.integers(0, 2, n).astype(np.uint8)
    ints = rng.integers(-(10**9) + 1, 10**9, (n, NUM_INT)) // (10 ** rng.integers(0, 9, (n, NUM_INT)))
    int_missing = rng.random((n, NUM_INT)) < 0.3
    values = rng.integers(0, 2**32, (n, NUM_CAT), dtype=np.uint64).astype(np.uint32)
    values[0] = [0, 2**32 - 1] * (NUM_CAT // 2)
    cat_missing = rng.random((n, NUM_CAT)) < 0.3
    p = parse_bytes(format_lines(label, ints, int_missing, values, cat_missing), "x")
    assert np.array_equal(p.label, label)
    want = np.where(int_missing, 0.0, np.log1p(np.maximum(ints, 0))).astype(np.float32)
    np.testing.assert_allclose(p.dense, want, rtol=1e-6)
    assert np.array_equal(p.values, np.where(cat_missing, 0, values))
    bits = (p.missing[:, None] >> np.arange(NUM_CAT, dtype=np.uint32)) & 1
    assert np.array_equal(bits.astype(bool), cat_missing)
