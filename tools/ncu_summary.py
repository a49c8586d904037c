#!/usr/bin/env python3
"""Sums an Nsight Compute kernel-time profile by kernel: the table docs/BENCHMARKS.md's profiles show.

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
        detox bench sft --profile --iters 1 > profile.csv
    python3 tools/ncu_summary.py profile.csv [--top 25]

Prints the total, then one row per kernel name (cuBLAS's products under one name), largest first:
launches, time in ms and share of the total.
"""
import argparse
import collections
import csv
import io
import sys

UNITS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}
# cuBLAS and CUTLASS kernel names differ by tile and algorithm; their time is one line.
GEMM_MARKERS = ("gemm", "xmma", "cutlass", "nvjet", "cublas")


def kernel_kind(name):
    base = name.split("(")[0].strip()
    if any(m in base.lower() for m in GEMM_MARKERS):
        return "matrix products (cuBLAS)"
    return base


def read_rows(text):
    # ncu prints its own log lines before the CSV header; the header starts with "ID".
    start = next((i for i, line in enumerate(text.splitlines()) if line.startswith('"ID"')), None)
    if start is None:
        sys.exit("no ncu CSV header (a line starting with \"ID\") in the input")
    return csv.DictReader(io.StringIO("\n".join(text.splitlines()[start:])))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu --csv output with gpu__time_duration.sum")
    p.add_argument("--top", type=int, default=25, help="rows to print")
    a = p.parse_args()
    with open(a.csv, encoding="utf-8", errors="replace") as f:
        rows = read_rows(f.read())
    count, time_ms = collections.Counter(), collections.Counter()
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit", "")
        if unit not in UNITS:
            sys.exit(f"unknown time unit {unit!r} in {a.csv}")
        kind = kernel_kind(r["Kernel Name"])
        count[kind] += 1
        time_ms[kind] += float(r["Metric Value"].replace(",", "")) * UNITS[unit]
    total = sum(time_ms.values())
    if total == 0:
        sys.exit(f"no kernel times in {a.csv}")
    print(f"{sum(count.values())} kernels, {total:.2f} ms of kernel time")
    print("| kernel | launches | time (ms) | share |")
    print("|---|---|---|---|")
    for kind, t in time_ms.most_common(a.top):
        print(f"| {kind} | {count[kind]} | {t:.2f} | {100 * t / total:.1f}% |")


if __name__ == "__main__":
    main()
