"""Print an Nsight Compute raw CSV (``ncu --csv --page raw --log-file F``) as one line a kernel: its duration,
instructions, and the warp stall reasons (``smsp__average_warps_issue_stalled_<reason>_per_issue_active``:
warps stalled for that reason per issued instruction), largest first.

    python tools/ncu_table.py stalls.csv [--top 6]
"""

from __future__ import annotations

import argparse
import csv
import sys

STALL = ("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio")


def rows_of(path: str) -> tuple[list[str], list[list[str]]]:
    """The header (the first row naming "Kernel Name") and the kernel rows (an ID first); ncu's own log lines and
    the units row are dropped."""
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    head = next((i for i, r in enumerate(table) if "Kernel Name" in r), None)
    if head is None:
        return [], []
    return table[head], [r for r in table[head + 1:] if r and r[0].strip().isdigit()]


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=6, help="stall reasons a line")
    args = ap.parse_args()
    try:
        header, body = rows_of(args.csv)
    except OSError as e:
        print(f"{args.csv}: cannot read the Nsight Compute CSV ({e.strerror})")
        return 1
    if not header:
        print(f"{args.csv}: not an ncu --csv --page raw table (no 'Kernel Name' column)")
        return 1
    if not body:
        print(f"{args.csv}: no kernel rows")
        return 1
    name = header.index("Kernel Name")
    col = {h: i for i, h in enumerate(header)}
    for r in body:
        stalls = sorted(((number(r[i]), h[len(STALL[0]):-len(STALL[1])]) for h, i in col.items()
                         if h.startswith(STALL[0]) and h.endswith(STALL[1])), reverse=True)
        total = sum(v for v, _ in stalls if v == v)
        head = f"{r[name][:28]:28s}"
        if "gpu__time_duration.sum" in col:
            head += f" {number(r[col['gpu__time_duration.sum']]):9.0f} ns"
        if "smsp__inst_executed.sum" in col:
            head += f" {number(r[col['smsp__inst_executed.sum']]):9.0f} inst"
        share = " ".join(f"{k} {v:.2f}" for v, k in stalls[: args.top])
        print(f"{head}  stalls/inst {total:.2f}: {share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
