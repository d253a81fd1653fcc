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
    """The header and the kernel rows (the units row and ncu's own log lines dropped)."""
    with open(path, newline="") as f:
        table = [r for r in csv.reader(f) if len(r) > 5]
    if not table:
        return [], []
    header, body = table[0], table[1:]
    if body and not body[0][0].strip().isdigit():  # the units row
        body = body[1:]
    return header, body


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
    header, body = rows_of(args.csv)
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
