"""Derive the run-time quantiles of ``sim.PHILLY_RUN_MIN`` from Microsoft's Philly trace.

    .venv/bin/python benchmarks/philly_fit.py --notebook "PATH/analysis/Philly Trace Analysis.ipynb"
    .venv/bin/python benchmarks/philly_fit.py --job-log PATH/trace-data/cluster_job_log

Source: github.com/msr-fiddle/philly-traces (Jeon et al., "Analysis of Large-Scale Multi-Tenant GPU
Clusters for DNN Training Workloads", USENIX ATC 2019). The trace itself (``trace-data.tar.gz``,
1.06 GB, Git LFS) was not reachable from this machine; the repository's analysis notebook was, with
its outputs stored: its "Job Runtimes (Figure 2)" cell plots, from the whole trace, the CDF of run
time (first attempt's start to last attempt's end, in minutes, every job status) per GPU-count bucket
(1, 2-4, 5-8, >8) on a log axis from 0.1 to 10^4 minutes. ``--notebook`` digitises that stored
plot: per bucket and pixel column, the median row of the pixels of the bucket's colour, mapped through
the axes' frame (0.1-10^4 min, 0-100 %), made monotone, then read at the quantiles below. Reading a
rendered plot is good to about a pixel: some 4 % in time, half a point in CDF. ``--job-log`` computes
the same quantiles from the trace itself with the notebook's definitions, where the data is present;
it also prints the job mix by GPU count, which the plot does not show.

Prints the table to paste into ``downpour/scheduler/sim.py``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import math
import struct
import sys
import zlib

import numpy as np

LEVELS = (2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90)   # CDF points (%) read, plus the plot's right edge
BUCKETS = {"1": (0, 128, 0), "2-4": (0, 0, 255), "5-8": (255, 0, 0), ">8": (128, 0, 128)}   # notebook's colours
X_MIN, X_MAX = 0.1, 1e4   # the figure's x limits, minutes


def read_png(data: bytes) -> np.ndarray:
    """Height x width x 3 array of an 8-bit, non-interlaced RGB(A) PNG (what matplotlib writes)."""
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    if depth != 8 or interlace or ctype not in (2, 6):
        raise ValueError("only 8-bit non-interlaced RGB/RGBA PNGs")
    ch, raw = {2: 3, 6: 4}[ctype], zlib.decompress(idat)
    stride, prev, rows, p = w * ch, [0] * (w * ch), [], 0
    for _ in range(h):
        f, line, p = raw[p], raw[p + 1:p + 1 + stride], p + 1 + stride
        cur = [0] * stride
        for i in range(stride):
            a, b, c = (cur[i - ch] if i >= ch else 0), prev[i], (prev[i - ch] if i >= ch else 0)
            if f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            else:
                pred = (0, a, b, (a + b) // 2)[f]
            cur[i] = (line[i] + pred) & 255
        rows.append(cur)
        prev = cur
    return np.array(rows, dtype=float).reshape(h, w, ch)[:, :, :3]


def digitise(img: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per bucket: (minutes, CDF %) along its curve, from the plot's pixels."""
    dark = img.sum(2) < 150
    h, w = dark.shape
    rows = [y for y in range(h) if dark[y].sum() > 0.6 * w]
    cols = [x for x in range(w) if dark[:, x].sum() > 0.6 * h]
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]   # the axes' frame
    white, out = np.array([255.0] * 3), {}
    for name, colour in BUCKETS.items():
        d = np.array(colour, float) - white
        t = ((img - white) @ d) / (d @ d)                     # how far from white towards the colour
        off = np.linalg.norm(img - white - t[..., None] * d, axis=2)
        mask = (t > 0.45) & (off < 40)
        mask[:, :left + 2] = mask[:, right - 1:] = False
        mask[:top + 2] = mask[bottom - 1:] = False
        mask[int(top + 0.6 * (bottom - top)):, int(left + 0.73 * (right - left)):] = False   # the legend box
        xs, ys = [], []
        for x in range(left + 2, right - 1):
            hit = np.nonzero(mask[:, x])[0]
            if len(hit):
                xs.append(x)
                ys.append(float(np.median(hit)))
        minutes = X_MIN * (X_MAX / X_MIN) ** ((np.array(xs) - left) / (right - left))
        cdf = np.maximum.accumulate(100.0 * (bottom - np.array(ys)) / (bottom - top))
        out[name] = (minutes, cdf)
    return out


def from_job_log(path: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, float]]:
    """Per bucket (minutes, CDF %) from the trace itself, with the notebook's definitions; and the job mix."""
    def t(s):
        return None if s in (None, "", "None") else datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S")

    with open(path) as f:
        log = json.load(f)
    times: dict[str, list[float]] = {b: [] for b in BUCKETS}
    counts = dict.fromkeys(BUCKETS, 0)
    for job in log:
        if not job["attempts"]:
            continue
        gpus = sum(len(d["gpus"]) for d in job["attempts"][0]["detail"])
        bucket = "1" if gpus == 1 else "2-4" if 2 <= gpus <= 4 else "5-8" if 5 <= gpus <= 8 else ">8" if gpus > 8 else None
        if bucket is None:
            continue
        counts[bucket] += 1
        start, end = t(job["attempts"][0]["start_time"]), t(job["attempts"][-1]["end_time"])
        if start is not None and end is not None:
            times[bucket].append((end - start).total_seconds() / 60.0)
    out = {}
    for b, v in times.items():
        v = np.sort(np.array(v))
        out[b] = (v, 100.0 * np.arange(len(v)) / max(1, len(v) - 1))
    total = sum(counts.values())
    return out, {b: c / total for b, c in counts.items()}


def quantiles(minutes: np.ndarray, cdf: np.ndarray) -> list[tuple[float, float]]:
    """(fraction, minutes) at LEVELS, then at the figure's right edge (what lies beyond is cut there)."""
    inside = minutes <= X_MAX
    minutes, cdf = minutes[inside], cdf[inside]
    pts = [(q / 100.0, float(minutes[np.argmax(cdf >= q)])) for q in LEVELS if cdf[-1] >= q]
    return [*pts, (round(float(cdf[-1]) / 100.0, 3), X_MAX)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--notebook", help="the philly-traces analysis notebook, with its outputs")
    src.add_argument("--job-log", help="the trace's cluster_job_log (JSON)")
    args = p.parse_args()
    if args.notebook:
        with open(args.notebook) as f:
            cells = json.load(f)["cells"]
        cell = next(i for i, c in enumerate(cells) if "Job Runtimes" in "".join(c["source"]))
        png = next(o["data"]["image/png"] for c in cells[cell:] for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
        curves = digitise(read_png(base64.b64decode(png)))
    else:
        curves, mix = from_job_log(args.job_log)
        print("# jobs by GPU count:", {b: round(f, 4) for b, f in mix.items()})
    print("PHILLY_RUN_MIN = {   # (cumulative fraction, minutes)")
    for name, (minutes, cdf) in curves.items():
        pts = ", ".join(f"({q:g}, {m:.3g})" for q, m in quantiles(minutes, cdf))
        print(f'    "{name}": ({pts}),')
    print("}")
    return 0 if all(not math.isnan(c[1][-1]) for c in curves.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
