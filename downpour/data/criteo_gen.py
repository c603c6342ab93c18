"""Synthetic click logs in the Criteo display-ads format, drawn from a known model.

Each row is a label, 13 integer features and 26 categorical features (the format:
:mod:`downpour.data.criteo_format`). Rows are independent draws:

* categorical field *f* is missing at the field's rate; otherwise, with probability
  ``tail``, its ID comes from a flat tail of ~4·10⁹ values (practically always new:
  the millions of one-off IDs of Criteo's big fields), else from a Zipf law of
  exponent ``s`` over the field's ``head`` IDs. An ID is written as 8 hex digits
  through a per-field bijection of the 32-bit numbers, so IDs never share a string;
* integer field *j* is ⌊expm1(μ_j + σ_j·z)⌋ clipped at 0 (counts: many zeros, a heavy
  tail), missing at the field's rate (a missing integer counts as 0);
* the label is 1 with probability sigmoid(logit),
  ``logit = bias + Σ_f w_f(ID_f) + Σ_j β_j·log1p(x_j) + γ·⟨u(ID_a), v(ID_b)⟩/√k``.
  An ID seen in a fraction q of rows has a raw weight z·sqrt(q / (q + signal_freq)),
  z ~ N(0, 1): frequent IDs carry the signal, rare ones (which no model learns from a
  few sightings) little. Each field's weights are then shifted and scaled to mean 0 and
  spread ``CatField.scale`` over the rows, so the optimum hardly depends on the seed.
  β_j = ±effect_j/σ_j. The last term, an interaction of two small fields through
  hidden k-dim vectors, is for models with embeddings; a linear model cannot learn it.

Every hidden weight is a hash of (seed, field, rank): head weights are tabled on first
use (at most 200k per field), tail weights computed when drawn. Rows are drawn in
chunks of ``CHUNK_ROWS``, each from its own random stream, so the data depend on the
seed and the row count only (not on the number of files). The bias is solved on a
pilot sample for the click rate ``ctr``. The test rows' true probabilities are written
too, and the best AUC and log loss any model can reach on that test set: the truth
scored against the sampled labels.

Why one module over 400 lines: it is one generative model, read top to bottom (the spec with
its documented defaults, the hidden weights, the draw, then the files). Every stage reads the
same spec and hash streams, and the tests check them together against the truth they write.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import NamedTuple

import fsspec
import numpy as np

from downpour.data.criteo import META_FILE, SPLIT_PATTERNS, TRUTH_FILE
from downpour.data.criteo_format import NUM_CAT, NUM_INT, format_lines
from downpour.data.scoring import log_loss, roc_auc
from downpour.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CHUNK_ROWS = 1 << 15  # rows drawn at a time, each chunk from its own random stream


class CatField(NamedTuple):
    """How one categorical field draws its IDs. With probability ``tail`` an ID comes from a
    flat tail of ~4·10⁹ values (practically each new, as most IDs of Criteo's big fields),
    otherwise from a Zipf law (exponent ``s``) over ``head`` IDs."""

    head: int
    s: float
    tail: float
    missing: float
    scale: float  # spread of the hidden weights of frequent IDs (logit units)


# After Criteo's Kaggle release: six fields of millions of distinct IDs (missing 3.4% of
# the time), a few of tens of thousands, several with about half the values missing, and
# a few with under 30 values.
CAT_FIELDS: tuple[CatField, ...] = (
    CatField(1460, 1.2, 0.0, 0.0, 0.23),
    CatField(583, 1.1, 0.0, 0.0, 0.23),
    CatField(200_000, 1.1, 0.40, 0.034, 0.32),
    CatField(100_000, 1.1, 0.30, 0.034, 0.28),
    CatField(305, 1.2, 0.0, 0.0, 0.19),
    CatField(24, 1.0, 0.0, 0.12, 0.28),
    CatField(12_517, 1.3, 0.0, 0.0, 0.23),
    CatField(633, 1.2, 0.0, 0.0, 0.19),
    CatField(3, 0.5, 0.0, 0.0, 0.19),
    CatField(20_000, 1.2, 0.05, 0.0, 0.23),
    CatField(5683, 1.3, 0.0, 0.0, 0.19),
    CatField(150_000, 1.1, 0.38, 0.034, 0.28),
    CatField(3194, 1.3, 0.0, 0.0, 0.19),
    CatField(27, 0.8, 0.0, 0.0, 0.28),
    CatField(14_992, 1.3, 0.0, 0.0, 0.19),
    CatField(100_000, 1.1, 0.33, 0.034, 0.28),
    CatField(10, 0.8, 0.0, 0.0, 0.28),
    CatField(5652, 1.3, 0.0, 0.0, 0.19),
    CatField(2173, 1.2, 0.0, 0.44, 0.19),
    CatField(4, 0.5, 0.0, 0.44, 0.28),
    CatField(120_000, 1.1, 0.35, 0.034, 0.28),
    CatField(18, 1.0, 0.0, 0.76, 0.19),
    CatField(15, 1.0, 0.0, 0.0, 0.28),
    CatField(50_000, 1.2, 0.12, 0.034, 0.23),
    CatField(105, 1.1, 0.0, 0.44, 0.19),
    CatField(30_000, 1.2, 0.15, 0.44, 0.23),
)
TAIL_START = 1 << 22  # tail IDs are ranks in [TAIL_START, 2**32): above every head


class IntField(NamedTuple):
    """How one integer field draws its values: ⌊expm1(mu + sd·z)⌋ clipped at 0."""

    mu: float
    sd: float  # spread of log1p(x) before clipping
    missing: float
    effect: float  # |β| · sd: how far one spread of log1p(x) moves the logit


# Counts with many zeros and heavy tails, missing at the rates of the same release.
INT_FIELDS: tuple[IntField, ...] = (
    IntField(0.7, 1.0, 0.45, 0.23),
    IntField(1.5, 1.5, 0.0, 0.16),
    IntField(2.0, 1.2, 0.21, 0.16),
    IntField(1.6, 1.0, 0.22, 0.19),
    IntField(7.5, 2.0, 0.026, 0.23),
    IntField(3.5, 1.7, 0.22, 0.16),
    IntField(1.3, 1.3, 0.043, 0.23),
    IntField(2.2, 1.0, 0.0005, 0.08),
    IntField(3.8, 1.5, 0.043, 0.19),
    IntField(0.4, 0.7, 0.45, 0.16),
    IntField(0.9, 1.0, 0.043, 0.23),
    IntField(0.2, 0.8, 0.77, 0.12),
    IntField(1.5, 1.1, 0.22, 0.19),
)
assert len(CAT_FIELDS) == NUM_CAT and len(INT_FIELDS) == NUM_INT
MAX_INT = 10**9 - 1  # integers are written with at most 9 digits
MISSING_RANK = 1 << 32  # the rank that stands for a missing value (its weight is its own)


@dataclass(frozen=True)
class CriteoSpec:
    """What to generate. The defaults are calibrated (docs/ctr-data.md): a Wide&Deep model
    with 16-dim embeddings trained one epoch on 3M rows gets within 0.01 of the optimum AUC."""

    rows: int = 3_000_000
    seed: int = 0
    test_fraction: float = 0.1
    files: int = 4  # files per split
    ctr: float = 0.25  # mean click rate; the bias is solved for it
    cat_scale: float = 1.0  # multiplies every categorical field's spread (CatField.scale)
    num_scale: float = 1.0  # multiplies every integer field's effect (IntField.effect)
    # An ID seen in a fraction q of rows gets a hidden weight ∝ z·sqrt(q / (q + signal_freq)):
    # IDs much rarer than signal_freq carry little signal, as no model learns them from a few
    # sightings. (In 2.7M training rows, 1e-3 is 2,700 sightings.)
    signal_freq: float = 1e-3
    interaction: float = 0.2  # γ: spread of the interaction term in logit units
    interaction_fields: tuple[int, int] = (5, 13)  # categorical fields (0-based) that interact
    interaction_dim: int = 4
    # The IDs' hex values come from this seed when set (else from ``seed``): a stream with concept
    # drift keeps its IDs and changes their hidden weights by changing ``seed`` only.
    id_seed: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "rows": self.rows >= 2,
            "seed": self.seed >= 0,
            "test_fraction": 0.0 < self.test_fraction < 1.0,
            "files": self.files >= 1,
            "ctr": 0.0 < self.ctr < 1.0,
            "signal_freq": self.signal_freq >= 0,
            "interaction_dim": self.interaction_dim >= 1,
            "interaction_fields": all(0 <= f < NUM_CAT for f in self.interaction_fields)
            and self.interaction_fields[0] != self.interaction_fields[1],
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"criteo generator: bad {name}: {getattr(self, name)!r}")

    @property
    def num_test(self) -> int:
        return min(self.rows - 1, max(1, round(self.rows * self.test_fraction)))


# -- hashing: every hidden number is a function of (seed, purpose, field, rank) ----------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _key(seed: int, purpose: int, field: int) -> np.uint64:
    k = np.array([(seed * 0x9E3779B97F4A7C15 + purpose * 0x632BE59BD9B4E019 + field * 0x85157AF5) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    return _mix64(k)[0]


def _uniform(seed: int, purpose: int, field: int, index: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per index, a pure function of (seed, purpose, field, index)."""
    h = _mix64(np.asarray(index, dtype=np.uint64) ^ _key(seed, purpose, field))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _normal(seed: int, purpose: int, field: int, index: np.ndarray) -> np.ndarray:
    """One standard normal per index, a pure function of (seed, purpose, field, index)."""
    h = _mix64(np.asarray(index, dtype=np.uint64) ^ _key(seed, purpose, field))
    u1 = ((h >> np.uint64(40)).astype(np.float64) + 1.0) / float(1 << 24)  # (0, 1]
    u2 = (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(1 << 24)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def numeric_weight(spec: CriteoSpec, j: int) -> float:
    """β_j = ±effect_j / sd_j · num_scale: the sign is the seed's, the size the field's."""
    field = INT_FIELDS[j]
    sign = 1.0 if _uniform(spec.seed, 2, j, np.zeros(1))[0] < 0.5 else -1.0
    return sign * spec.num_scale * field.effect / field.sd


def hex_value(seed: int, field: int, rank: np.ndarray) -> np.ndarray:
    """The 32-bit value written for an ID: murmur3's fmix32 of (rank XOR a field key), a
    bijection, so two ranks of a field never share a value."""
    x = (np.asarray(rank, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32) ^ np.uint32(int(_key(seed, 1, field)) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x85EBCA6B)
        x ^= x >> np.uint32(13)
        x *= np.uint32(0xC2B2AE35)
        x ^= x >> np.uint32(16)
    return x


# -- sampling ---------------------------------------------------------------------------


def zipf_ranks(rng: np.random.Generator, n: int, cardinality: int, s: float) -> np.ndarray:
    """n ranks in [0, cardinality), P(r) ≈ ∝ (r + 1)^-s (inverse CDF of the continuous law)."""
    u = rng.random(n)
    top = cardinality + 1.0
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * math.log(top))
    else:
        x = (1.0 + u * (top ** (1.0 - s) - 1.0)) ** (1.0 / (1.0 - s))
    return np.minimum(x.astype(np.int64) - 1, cardinality - 1)


def rank_probability(rank: np.ndarray, field: CatField) -> np.ndarray:
    """P(ID of rank ``rank``) in a field, among present values (missing ranks get 1)."""
    top = field.head + 1.0
    if abs(field.s - 1.0) < 1e-9:
        cdf = lambda x: np.log(x) / math.log(top)
    else:
        cdf = lambda x: (x ** (1.0 - field.s) - 1.0) / (top ** (1.0 - field.s) - 1.0)
    r = np.minimum(np.asarray(rank, dtype=np.float64), field.head)
    p = np.where(rank < TAIL_START, (1.0 - field.tail) * (cdf(r + 2.0) - cdf(r + 1.0)), field.tail / ((1 << 32) - TAIL_START))
    return np.where(rank == MISSING_RANK, 1.0, p)


def _raw_weight(seed: int, signal_freq: float, f: int, rank: np.ndarray) -> np.ndarray:
    """z·sqrt(q / (q + signal_freq)) for IDs of probability q: ~z for frequent IDs, ~0 for rare ones."""
    q = rank_probability(rank, CAT_FIELDS[f])
    return _normal(seed, 3, f, rank) * np.sqrt(q / (q + signal_freq))


@functools.lru_cache(maxsize=128)
def _field_weights(seed: int, signal_freq: float, f: int) -> tuple[np.ndarray, float, float]:
    """Field f's weights of its head IDs (then of the missing value, last), normalised to mean
    0 and spread ``scale`` over the rows (tail IDs, ~0 raw, counted too); and the raw mean and
    spread used, to weigh tail IDs alike. Kept as a table: heads hold at most 200k IDs."""
    field = CAT_FIELDS[f]
    ranks = np.r_[np.arange(field.head), MISSING_RANK]
    p = np.r_[(1.0 - field.missing) * rank_probability(ranks[:-1], field), field.missing]
    w = _raw_weight(seed, signal_freq, f, ranks)
    mean = float(p @ w)
    var = float(p @ (w - mean) ** 2) + (1.0 - field.missing) * field.tail * mean**2
    sd = math.sqrt(var) if var > 0 else 1.0
    return field.scale * (w - mean) / sd, mean, sd


def cat_weight(spec: CriteoSpec, f: int, rank: np.ndarray) -> np.ndarray:
    """w_f(rank): the hidden weight of an ID (or of a missing value, MISSING_RANK). Over the
    rows, field f's weights have mean 0 and spread CatField.scale · cat_scale."""
    field = CAT_FIELDS[f]
    table, mean, sd = _field_weights(spec.seed, spec.signal_freq, f)
    rank = np.asarray(rank, dtype=np.int64)
    at = np.where(rank == MISSING_RANK, field.head, rank)
    in_table = at <= field.head  # head IDs and missing; tail ranks start far above any head
    w = table[np.where(in_table, at, 0)]
    if not in_table.all():
        tail = rank[~in_table]
        w[~in_table] = field.scale * (_raw_weight(spec.seed, spec.signal_freq, f, tail) - mean) / sd
    return spec.cat_scale * w


@functools.lru_cache(maxsize=16)
def _latent(seed: int, f: int, dim: int, offset: int) -> np.ndarray:
    """Hidden [head + 1, dim] vectors of field f's head IDs (row ``head``: the missing value)."""
    ranks = np.r_[np.arange(CAT_FIELDS[f].head), MISSING_RANK]
    return np.stack([_normal(seed, offset + d, f, ranks) for d in range(dim)], axis=1)


@dataclass
class Rows:
    """A block of rows as arrays: labels, integers (0 where missing), categorical ranks."""

    label: np.ndarray  # uint8 [n]
    ints: np.ndarray  # int64 [n, 13]
    int_missing: np.ndarray  # bool [n, 13]
    values: np.ndarray  # uint32 [n, 26]: the hex values
    cat_missing: np.ndarray  # bool [n, 26]
    prob: np.ndarray  # float64 [n]: the true click probability

    def slice(self, lo: int, hi: int) -> Rows:
        return Rows(*(getattr(self, k)[lo:hi] for k in ("label", "ints", "int_missing", "values", "cat_missing", "prob")))


def _draw(spec: CriteoSpec, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features of n rows and their logit without the bias."""
    seed = spec.seed
    logit = np.zeros(n)
    ints = np.zeros((n, NUM_INT), dtype=np.int64)
    int_missing = rng.random((n, NUM_INT)) < np.array([f.missing for f in INT_FIELDS])
    for j, field in enumerate(INT_FIELDS):
        x = np.clip(np.floor(np.expm1(np.maximum(field.mu + field.sd * rng.standard_normal(n), 0.0))), 0, MAX_INT)
        x[int_missing[:, j]] = 0
        ints[:, j] = x
        logit += numeric_weight(spec, j) * np.log1p(x)
    values = np.zeros((n, NUM_CAT), dtype=np.uint32)
    cat_missing = rng.random((n, NUM_CAT)) < np.array([f.missing for f in CAT_FIELDS])
    ranks = np.zeros((n, NUM_CAT), dtype=np.int64)
    for f, field in enumerate(CAT_FIELDS):
        r = zipf_ranks(rng, n, field.head, field.s)
        in_tail = rng.random(n) < field.tail
        r[in_tail] = rng.integers(TAIL_START, 1 << 32, int(in_tail.sum()))
        r[cat_missing[:, f]] = MISSING_RANK
        ranks[:, f] = r
        values[:, f] = np.where(cat_missing[:, f], 0, hex_value(seed if spec.id_seed is None else spec.id_seed, f, r))
        logit += cat_weight(spec, f, r)
    if spec.interaction > 0:
        a, b = spec.interaction_fields
        k = spec.interaction_dim
        both = ~(cat_missing[:, a] | cat_missing[:, b] | (ranks[:, a] >= TAIL_START) | (ranks[:, b] >= TAIL_START))
        u = _latent(seed, a, k, 4)[np.where(both, ranks[:, a], 0)]
        v = _latent(seed, b, k, 4 + k)[np.where(both, ranks[:, b], 0)]
        dot = np.einsum("nd,nd->n", u, v)  # ⟨u(ID_a), v(ID_b)⟩
        logit += np.where(both, spec.interaction * dot / math.sqrt(k), 0.0)
    return logit, ints, int_missing, values, cat_missing


def solve_bias(spec: CriteoSpec, pilot_rows: int = 100_000) -> float:
    """The bias that makes the mean click probability ``spec.ctr`` on a pilot sample of its own."""
    logit = _draw(spec, np.random.default_rng([spec.seed, 0]), pilot_rows)[0]
    b = math.log(spec.ctr / (1.0 - spec.ctr)) - float(np.median(logit))
    for _ in range(50):  # Newton on mean(sigmoid(logit + b)) = ctr
        p = 1.0 / (1.0 + np.exp(-(logit + b)))
        err, slope = float(p.mean()) - spec.ctr, float((p * (1.0 - p)).mean())
        b -= err / slope
        if abs(err) < 1e-9:
            break
    return b


def generate_rows(spec: CriteoSpec, bias: float, start: int, stop: int) -> Iterator[Rows]:
    """Rows [start, stop) of the data set, one block per chunk they touch."""
    for chunk in range(start // CHUNK_ROWS, (stop - 1) // CHUNK_ROWS + 1):
        yield _chunk_rows(spec, bias, chunk, start, stop)


def _chunk_rows(spec: CriteoSpec, bias: float, chunk: int, start: int, stop: int) -> Rows:
    """The rows of chunk ``chunk`` that fall in [start, stop)."""
    rng = np.random.default_rng([spec.seed, 1, chunk])
    logit, ints, int_missing, values, cat_missing = _draw(spec, rng, CHUNK_ROWS)
    prob = 1.0 / (1.0 + np.exp(-(logit + bias)))
    label = (rng.random(CHUNK_ROWS) < prob).astype(np.uint8)
    lo, hi = max(start - chunk * CHUNK_ROWS, 0), min(stop - chunk * CHUNK_ROWS, CHUNK_ROWS)
    return Rows(label[lo:hi], ints[lo:hi], int_missing[lo:hi], values[lo:hi], cat_missing[lo:hi], prob[lo:hi])


# -- files ----------------------------------------------------------------------------


def split_files(spec: CriteoSpec) -> list[tuple[str, int, int]]:
    """(name, first row, end row) of every file, train files then test files."""
    n_train = spec.rows - spec.num_test
    out = []
    for split, lo, hi in (("train", 0, n_train), ("test", n_train, spec.rows)):
        k = max(1, min(spec.files, hi - lo))
        edges = np.linspace(lo, hi, k + 1).round().astype(int)
        out += [(f"{split}-{i:05d}.tsv", int(edges[i]), int(edges[i + 1])) for i in range(k)]
    return out


def _data_files(fs, root: str) -> list[str]:
    """The files of a data set already under ``root`` (this generator's, or any Criteo-format one)."""
    if not fs.isdir(root):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    return sorted(n for n in names if n in (META_FILE, TRUTH_FILE) or any(fnmatch.fnmatchcase(n, p) for p in SPLIT_PATTERNS))


def generate(spec: CriteoSpec, out: str, threads: int = 2, overwrite: bool = False) -> dict:
    """Write the data set under ``out`` (a folder or any fsspec URL); return the metadata
    also written to ``out/criteo.json`` (counts, click rates, the optimum, the parameters).
    ``threads`` chunks are drawn and formatted at a time (numpy releases the GIL in its
    large operations); the files are written in order by the calling thread. A folder that
    holds a data set already is refused (its files left would be read with the new ones), unless
    ``overwrite``: then that data set's files are removed first."""
    fs, root = fsspec.core.url_to_fs(out)
    old = _data_files(fs, root)
    if old and not overwrite:
        raise DataError(f"{out} already holds a data set ({', '.join(old[:4])}{' ...' if len(old) > 4 else ''}): a reader "
                        "would take its files with the new ones; write to an empty folder, or give --overwrite to remove them first")
    for name in old:
        fs.rm(f"{root}/{name}")
    fs.makedirs(root, exist_ok=True)
    bias = solve_bias(spec)
    n_train = spec.rows - spec.num_test
    files = split_files(spec)
    truth = np.empty(spec.num_test)
    test_labels = np.empty(spec.num_test, dtype=np.uint8)
    clicks = {"train": 0, "test": 0}

    def work(chunk: int) -> list[tuple[str, int, Rows, bytes]]:
        """The chunk's rows cut at file boundaries: (file, first row, rows, text) per piece."""
        c_lo, c_hi = chunk * CHUNK_ROWS, min((chunk + 1) * CHUNK_ROWS, spec.rows)
        rows = _chunk_rows(spec, bias, chunk, c_lo, c_hi)
        pieces = []
        for name, lo, hi in files:
            a, b = max(lo, c_lo), min(hi, c_hi)
            if a < b:
                part = rows.slice(a - c_lo, b - c_lo)
                pieces.append((name, a, part, format_lines(part.label, part.ints, part.int_missing, part.values, part.cat_missing)))
        return pieces

    f, current = None, None
    chunks = range((spec.rows - 1) // CHUNK_ROWS + 1)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for pieces in _in_order(pool, work, chunks, ahead=max(1, threads)):
            for name, first, rows, text in pieces:
                if name != current:
                    if f is not None:
                        f.close()
                    f, current = fs.open(f"{root}/{name}", "wb"), name
                f.write(text)
                split = "test" if first >= n_train else "train"
                clicks[split] += int(rows.label.sum())
                if split == "test":
                    truth[first - n_train : first - n_train + len(rows.prob)] = rows.prob
                    test_labels[first - n_train : first - n_train + len(rows.prob)] = rows.label
    if f is not None:
        f.close()
    with fs.open(f"{root}/{TRUTH_FILE}", "wb") as out_f:
        np.save(out_f, truth, allow_pickle=False)
    meta = {
        "format": "criteo-tsv",
        "rows": {"train": n_train, "test": spec.num_test},
        "files": [name for name, _, _ in files],
        "ctr": {"train": clicks["train"] / n_train, "test": clicks["test"] / spec.num_test},
        "optimum": _optimum(test_labels, truth),
        "bias": bias,
        "generator": asdict(spec),
    }
    with fs.open(f"{root}/{META_FILE}", "w") as out_f:
        json.dump(meta, out_f, indent=2)
    log.info("criteo generator: %d rows in %s (optimum %s)", spec.rows, out, meta["optimum"])
    return meta


def _in_order(pool: ThreadPoolExecutor, fn, items, ahead: int) -> Iterator:
    """fn over items in the pool, results in order, at most ``ahead`` + 1 pending at a time."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _optimum(labels: np.ndarray, truth: np.ndarray) -> dict | None:
    if labels.min() == labels.max():  # one class only: no AUC
        return None
    return {"test_auc": roc_auc(labels, truth), "test_logloss": log_loss(labels, truth)}
