"""One table from a ``bnkernels bench --json`` file: per operation, shape
and dtype, each bnkernels candidate's GB/s, its % of the same-size copy and
its speed-up over torch and the textbook code of the same run.

    python -m bnkernels.bench.summary RESULTS.json
"""
from __future__ import annotations

import json
import sys

from .ops import CANDIDATE


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def summary_rows(results: list[dict]) -> list[tuple[str, ...]]:
    """Rows of strings: op, shape, layout, dtype, implementation, GB/s, %
    copy, x copy (time ratio), vs torch, vs textbook (``-`` where a figure is missing); wrong or
    failed candidates show their status instead of figures."""
    rows = []
    for r in results:
        if r.get("role") != CANDIDATE:
            continue
        head = (r["op"], r["shape_name"], r["layout"], r["dtype"], r["implementation"])
        if r["status"] != "ok":
            rows.append(head + (r["status"].upper(), "", "", "", ""))
            continue
        rows.append(head + (_fmt(r["gbps"], ".1f"), _fmt(r["pct_of_copy"], ".0f", "%"),
                            _fmt(r.get("copy_time_ratio"), ".2f", "x"), _fmt(r["speedup_vs_torch"], ".2f", "x"), _fmt(r["speedup_vs_textbook"], ".2f", "x")))
    return rows


def format_summary(doc: dict) -> str:
    """The table, with the devices it was measured on."""
    header = ("op", "shape", "layout", "dtype", "implementation", "GB/s", "% copy", "x copy", "vs torch",
              "vs textbook")
    rows = [header] + summary_rows(doc["results"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    devices = ", ".join(sorted({r["device_name"] for r in doc["results"] if r.get("device_name")}))
    return f"measured on: {devices}\n" + "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bnkernels.bench.summary RESULTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(format_summary(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
